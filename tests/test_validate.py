"""loaders.validate: every unreadable file is listed with a reason, every good one is kept, the list
is what loaders.sources.folders.read_file_list (and DALI's file_list) reads, exit codes and summary line."""
import os
import re

import pytest

from conftest import NUM_CLASSES, PER_CLASS
from loaders.sources import synthetic
from loaders import validate
from loaders.sources.folders import list_image_folder, read_file_list

GOOD = NUM_CLASSES * PER_CLASS


def _report(path):
    """{relpath: reason} of the bad section and of the warnings section of a report file."""
    bad, warn, section = {}, {}, None
    with open(path) as f:
        lines = f.read().splitlines()
    for line in lines:
        if line.startswith("# bad"):
            section = bad
        elif line.startswith("# warnings"):
            section = warn
        elif line and not line.startswith("#"):
            rel, reason = line.split("\t", 1)
            section[rel] = reason
    return bad, warn


@pytest.mark.parametrize("kind", synthetic.UNREADABLE)
def test_check_file_gives_a_reason_for_unreadable(bad_files, kind):
    err, _ = validate.check_file(bad_files[kind])
    assert err, f"{kind} accepted"
    expected = {"empty": "empty", "text": "not an image", "truncated": "truncated"}[kind]
    assert expected in err


def test_check_file_warns_about_odd_but_readable(bad_files):
    warnings = {k: validate.check_file(bad_files[k]) for k in synthetic.READABLE}
    assert all(err is None for err, _ in warnings.values()), warnings
    assert "CMYK" in warnings["cmyk"][1]
    assert "PNG data named .JPEG" in warnings["png"][1]
    assert "mode L" in warnings["gray"][1]
    assert "tiny 1x1" in warnings["tiny"][1]
    assert "huge 6000x4000" in warnings["huge"][1]


def test_dali_checker_rejects_exactly_the_unreadable(bad_files):
    pytest.importorskip("nvidia.dali")
    paths = [bad_files[k] for k in sorted(bad_files)]
    found = validate.DaliChecker(threads=2, batch=4).failures(paths)
    assert set(found) == {bad_files[k] for k in synthetic.UNREADABLE}
    prefix = "DALI decoder: nvidia.dali.fn.decoders.image"
    assert all(reason.startswith(prefix) for reason in found.values()), found


@pytest.mark.e2e
def test_main_writes_clean_list_and_report(mixed_folder, tmp_path, capsys):
    out = tmp_path / "clean_list.txt"
    rc = validate.main([mixed_folder, "--out", str(out), "--workers", "2", "--quiet"])
    assert rc == 0
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1
    kept = GOOD + len(synthetic.READABLE)
    pattern = rf"validate: {kept} good, 3 bad, \d+ with warnings, of {kept + 3} files in "
    assert re.match(pattern, summary[0]), summary

    # The report names every unreadable file with a reason, and only those.
    bad, warn = _report(f"{out}.bad.txt")
    assert set(bad) == {f"n00000000/bad_{k}.JPEG" for k in synthetic.UNREADABLE}
    assert all(reason.strip() for reason in bad.values())
    assert "n00000000/bad_cmyk.JPEG" in warn and "n00000000/bad_png.JPEG" in warn

    # Every good file is kept, with its ImageFolder label, in the format read_file_list reads.
    samples, _ = read_file_list(out, mixed_folder)
    all_samples, _ = list_image_folder(mixed_folder)
    expected = [(p, label) for p, label in all_samples if not os.path.basename(p).startswith(
        tuple(f"bad_{k}" for k in synthetic.UNREADABLE))]
    assert samples == expected and len(samples) == kept
    for line in out.read_text().splitlines():
        rel, label = line.rsplit(" ", 1)
        assert not os.path.isabs(rel) and label.isdigit()


def test_main_report_option_strict_and_no_dali(mixed_folder, image_folder, tmp_path, capsys):
    out, report = tmp_path / "a.txt", tmp_path / "report.txt"
    rc = validate.main([mixed_folder, "--out", str(out), "--report", str(report), "--workers", "1",
                        "--quiet", "--strict", "--no-dali"])
    assert rc == 1  # bad files found and --strict
    assert report.is_file() and not os.path.exists(f"{out}.bad.txt")
    assert len(_report(report)[0]) == 3
    assert validate.main([image_folder, "--out", str(tmp_path / "b.txt"), "--workers", "1", "--quiet",
                          "--strict", "--no-dali"]) == 0
    assert "24 good, 0 bad" in capsys.readouterr().out


def test_main_missing_folder_exits_2(tmp_path, capsys):
    assert validate.main([str(tmp_path / "nope"), "--out", str(tmp_path / "x.txt"), "--quiet"]) == 2
    assert "not found" in capsys.readouterr().err


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        validate.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--out" in text and "--workers" in text and "file_list" in text
