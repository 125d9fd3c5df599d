"""docs/config.md is the config reference: every entry point's --help, kept in sync with the code.
Regenerate with: python tests/test_docs.py"""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ["pretrain", "finetune", "distill", "linear_eval"]
DOC = ROOT / "docs" / "config.md"


def render() -> str:
    parts = ["# Configuration reference\n",
             "Every entry point's `--help`, generated from the code by `python tests/test_docs.py` "
             "(a test fails when this file is out of date).\n"]
    for name in ENTRY_POINTS:
        out = subprocess.run([sys.executable, str(ROOT / "fastclr" / f"{name}.py"), "--help"],
                             capture_output=True, text=True, check=True, cwd=ROOT).stdout
        parts.append(f"\n## `fastclr/{name}.py`\n\n```text\n{out.rstrip()}\n```\n")
    return "".join(parts)


@pytest.mark.e2e
def test_config_reference_is_up_to_date():
    assert DOC.read_text() == render(), "docs/config.md is stale: run python tests/test_docs.py"


@pytest.mark.e2e
def test_help_survives_a_closed_pipe():
    r = subprocess.run(f"{sys.executable} {ROOT / 'fastclr' / 'pretrain.py'} --help | head -1", shell=True,
                       capture_output=True, text=True)
    assert r.stdout.startswith("usage: pretrain.py") and "BrokenPipe" not in r.stderr, r.stderr


if __name__ == "__main__":
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render())
    print(f"wrote {DOC}")
