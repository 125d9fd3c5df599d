"""FFCV's dependencies for the GPU-machine scripts, read from setup.py's ``extras["ffcv"]``.

setup.py is the one list: carry.sh downloads from it and install.sh installs from it. It is read with
``ast`` (setup.py is not run, nothing but the standard library is imported), so this works on the
bare GPU machine as well as on the machine that prepares the carry.

    python benchmarks/gpu/deps.py ffcv-pin      # the pinned ffcv requirement: ffcv==1.0.2
    python benchmarks/gpu/deps.py ffcv-carry    # what to carry and install besides the sdist, one name per line
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

SETUP = Path(__file__).resolve().parents[2] / "setup.py"
# The GPU machine has these already (gpu_suite.sh's stated prerequisites: Python 3.12 with PyTorch,
# torchvision, numpy, numba and OpenCV): never carried, and installing them offline would fail.
ON_THE_MACHINE = {"torch", "torchvision", "numpy", "numba", "opencv-python", "opencv-python-headless"}


def canonical(name: str) -> str:
    """PEP 503 normalized project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    """The project name of a requirement string ("ffcv==1.0.2; python_version < '4'" -> "ffcv")."""
    return re.split(r"[\s\[<>=!~;@(]", req.strip(), maxsplit=1)[0]


def extras(setup: Path = SETUP) -> dict[str, list[str]]:
    """setup()'s ``extras_require``: a dict literal, or a module-level name bound to one."""
    tree = ast.parse(setup.read_text(encoding="utf-8"), str(setup))
    value = None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup":
            value = next((k.value for k in node.keywords if k.arg == "extras_require"), None)
    if isinstance(value, ast.Name):
        value = next((n.value for n in tree.body if isinstance(n, ast.Assign)
                      and any(getattr(t, "id", None) == value.id for t in n.targets)), None)
    if value is None:
        raise ValueError(f"{setup}: no extras_require literal in the setup() call")
    return ast.literal_eval(value)


def ffcv_pin(setup: Path = SETUP) -> str:
    pins = [r for r in extras(setup)["ffcv"] if canonical(requirement_name(r)) == "ffcv"]
    if len(pins) != 1 or "==" not in pins[0]:
        raise ValueError(f"{setup}: extras['ffcv'] must pin ffcv exactly once (ffcv==X.Y.Z), has {pins}")
    return pins[0].replace(" ", "")


def ffcv_carry(setup: Path = SETUP) -> list[str]:
    """extras["ffcv"] less ffcv itself (built from its sdist) and what the GPU machine already has."""
    names = [requirement_name(r) for r in extras(setup)["ffcv"]]
    return [n for n in names if canonical(n) != "ffcv" and canonical(n) not in ON_THE_MACHINE]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"ffcv-pin": lambda: [ffcv_pin()], "ffcv-carry": ffcv_carry}
    if len(argv) != 1 or argv[0] not in commands:
        print(f"usage: deps.py {{{','.join(commands)}}}", file=sys.stderr)
        return 2
    try:
        lines = commands[argv[0]]()
    except (OSError, ValueError, KeyError, SyntaxError) as e:
        print(f"deps.py: cannot read FFCV's dependencies from {SETUP}: {e}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
