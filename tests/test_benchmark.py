"""benchmarks/: throughput.py --quick end to end (JSON schema, every stage present or skipped with a
reason, ratios well-formed, smoke results kept out of benchmarks/results/), merge_results.py,
gpu_suite.sh --dry-run and its carry reassembly, gpu/carry.sh --dry-run, FFCV's one dependency list
(setup.py, read by gpu/deps.py), semisup_report.py, and shellcheck on every shell script when it is
installed. No timing is asserted (DESIGN: speed claims live in the benchmark's JSON, never in tests)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THROUGHPUT = ROOT / "benchmarks" / "throughput.py"
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
CARRY = ROOT / "benchmarks" / "gpu" / "carry.sh"
INSTALL = ROOT / "benchmarks" / "gpu" / "install.sh"
DEPS = ROOT / "benchmarks" / "gpu" / "deps.py"
STAGES = ("read", "decode", "geometry", "photometry", "augment", "h2d", "model", "teacher", "loss", "optim", "step",
          "e2e")
RATIOS = ("augment_vs_torchvision", "augment_vs_lightly", "lars_fused_vs_loop", "ntxent_vs_lightly",
          "loss_chunked_memory_flat", "e2e_vs_synthetic_step", "loader_two_view_images_per_s",
          "e2e_vs_synthetic_step_every_backend", "step_views_per_s", "lars_vs_sgd_floor",
          "photometry_fused_ms_per_512_views")


def _run(cmd, timeout, env=None, cwd=ROOT):
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "quick.json"
    # torch backend only (+ peers): the other backends' JIT/pipeline start-up would dominate the run.
    proc = _run([sys.executable, str(THROUGHPUT), "--quick", "--backends", "torch", "--out", str(out),
                 "--cache", str(tmp / "cache")], timeout=300)
    assert proc.returncode == 0, f"throughput.py --quick failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(out.read_text()), proc.stdout, out


def test_quick_meta(quick_result):
    res, _, _ = quick_result
    assert set(res) >= {"meta", "stages", "ratios", "sweeps"}
    meta = res["meta"]
    for key in ("device", "cpu_count", "versions", "git_sha", "args", "date", "config"):
        assert key in meta, f"meta lacks {key}"
    assert isinstance(meta["cpu_count"], int) and meta["cpu_count"] >= 1
    assert meta["device"]
    for pkg in ("torch", "torchvision", "numpy", "dali", "ffcv", "lightly"):
        assert pkg in meta["versions"], f"versions lacks {pkg}"
    assert meta["versions"]["torch"]
    assert meta["args"]["quick"] is True and meta["args"]["backends"] == ["torch"]
    assert meta["complete"] is True


@pytest.mark.e2e
def test_killed_run_leaves_partial_json(tmp_path, monkeypatch):
    """The GPU suite kills throughput.py at its time limit: what was measured before must be on disk."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("throughput_partial", THROUGHPUT)
    tp = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, tp)  # dataclasses look their module up there
    spec.loader.exec_module(tp)  # puts the repo root on sys.path, as running the file does
    from benchmarks import stages

    def killed(bench):
        raise KeyboardInterrupt  # what a SIGINT/timeout does mid-stage: not caught as a stage failure

    monkeypatch.setitem(stages.RUNNERS, "decode", killed)
    out = tmp_path / "partial.json"
    with pytest.raises(KeyboardInterrupt):
        tp.main(["--quick", "--backends", "torch", "--no-peers", "--stages", "read,decode", "--out", str(out),
                 "--cache", str(tmp_path / "cache"), "--no-chart"])
    res = json.loads(out.read_text())
    assert res["meta"]["complete"] is False
    assert list(res["stages"]) == ["read"] and res["stages"]["read"]["status"] == "ok"


def test_quick_every_stage_ok_or_skipped_with_reason(quick_result):
    res, stdout, _ = quick_result
    stages = res["stages"]
    assert set(stages) == set(STAGES)
    for name, st in stages.items():
        assert st["status"] in ("ok", "skipped"), (name, st)
        assert isinstance(st["rows"], list)
        if st["status"] == "skipped":
            assert st.get("reason"), f"stage {name} skipped without a reason"
        for r in st["rows"]:
            assert r["name"]
            if r.get("status") == "skipped":
                assert r.get("reason"), f"{name}: row {r['name']} skipped without a reason"
            else:
                has_rate = any(isinstance(r.get(k), (int, float)) and r[k] > 0
                               for k in ("images_per_s", "steps_per_s"))
                assert has_rate, f"{name}: row {r['name']} has no rate: {r}"
        assert f"== {name}" in stdout  # the table shows every stage
    # On CPU: no host-to-device stage, and compile is off unless asked.
    assert stages["h2d"]["status"] == "skipped" and "GPU" in stages["h2d"]["reason"]
    compiled = [r for r in stages["model"]["rows"] if r["name"].endswith("compiled")]
    assert compiled and all(r["status"] == "skipped" and "--compile" in r["reason"] for r in compiled)
    # Rows that must have run on any CPU machine.
    assert any(r.get("impl") == "fastclr" and r.get("steps_per_s") for r in stages["optim"]["rows"])
    assert any(r.get("impl") == "loop" and r.get("images_per_s") is None and r.get("steps_per_s")
               for r in stages["optim"]["rows"])
    loss = stages["loss"]["rows"]
    assert {r["impl"] for r in loss if r.get("status") != "skipped"} >= {"fastclr-dense", "fastclr-chunked"}
    assert all(r["peak_mem_bytes"] >= 0 for r in loss if r.get("status") != "skipped")
    # The colour recipe alone: the CPU default (subset) and the masked form ran; compiled is opt-in here.
    photometry = {r["mode"]: r for r in stages["photometry"]["rows"]}
    assert photometry["subset"].get("ms_per_512_views", 0) > 0 and photometry["where"].get("ms_per_512_views", 0) > 0
    assert photometry["fused"]["status"] == "skipped" and "--compile" in photometry["fused"]["reason"]
    # The step's eager variant ran (a CUDA graph needs a GPU), then fp32 and bf16 at the precision sizes
    # (the plan's dtype at the plan's size is the first row, not repeated).
    steps = stages["step"]["rows"]
    assert {r.get("variant") for r in steps} == {"eager"}
    assert [(r["size"], r["dtype"]) for r in steps] == [(64, "fp32"), (64, "bf16"), (32, "fp32"), (32, "bf16")]
    e2e = stages["e2e"]["rows"]
    assert [(r.get("backend"), r.get("dtype")) for r in e2e if r.get("status") != "skipped"] == [
        ("torch", "fp32"), ("torch", "bf16")]
    for r in e2e:
        if r.get("status") != "skipped":
            assert 0.0 <= r["data_wait"] <= 1.0


def test_quick_ratios(quick_result):
    res, stdout, _ = quick_result
    for name in RATIOS:
        r = res["ratios"][name]
        assert {"value", "target", "met", "baseline", "ours"} <= set(r), (name, r)
        assert isinstance(r["met"], bool)
        assert isinstance(r["target"], (int, float))
        if r["value"] is None:
            assert r.get("reason") and r["met"] is False
        else:
            assert r["value"] > 0
            assert r["met"] == (r["value"] >= r["target"] if r["direction"] == ">=" else r["value"] <= r["target"])
    assert "headline ratios" in stdout
    # bf16 vs fp32 on the CPU: measured pairs, reported without a target
    for name in ("cpu_bf16_vs_fp32_step_64px", "cpu_bf16_vs_fp32_step_32px", "cpu_bf16_vs_fp32_e2e"):
        r = res["ratios"][name]
        assert r["target"] is None and r["met"] is None and r["value"] > 0, (name, r)
        assert r["baseline"]["name"] != r["ours"]["name"] and "bf16" in r["ours"]["name"]
        assert r["value"] == pytest.approx(r["ours"]["images_per_s"] / r["baseline"]["images_per_s"], rel=2e-3)
    # Measured in the same run whenever both sides ran.
    optim = {r["impl"]: r for r in res["stages"]["optim"]["rows"] if r.get("status") != "skipped"}
    if {"fastclr", "loop"} <= set(optim):
        assert res["ratios"]["lars_fused_vs_loop"]["value"] is not None
    e2e = [r for r in res["stages"]["e2e"]["rows"] if r.get("status") != "skipped" and r["dtype"] == "fp32"]
    step = [r for r in res["stages"]["step"]["rows"] if r.get("status") != "skipped"]
    if e2e and step:
        ratio = res["ratios"]["e2e_vs_synthetic_step"]["value"]
        assert ratio == pytest.approx(max(r["images_per_s"] for r in e2e) / step[0]["images_per_s"], rel=1e-2)
    # an H100 goal: a CPU run names why it is not scored
    assert res["ratios"]["loader_two_view_images_per_s"]["value"] is None


def test_quick_charts(quick_result):
    res, _, out = quick_result
    charts = res["meta"].get("charts", {})
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "_skipped" in charts
        return
    assert charts, "matplotlib is installed but no chart was written"
    for stage, path in charts.items():
        assert Path(path).is_file() and Path(path).parent == out.parent, (stage, path)


@pytest.mark.e2e
def test_quick_run_writes_to_a_temporary_folder(tmp_path):
    """--quick without --out: the JSON goes to a new fastclr-bench-* folder of the temp dir, never into
    benchmarks/results/ (results meant to be committed), and the run says where it went."""
    results = ROOT / "benchmarks" / "results"
    before = set(results.iterdir())
    proc = _run([sys.executable, str(THROUGHPUT), "--quick", "--stages", "read", "--backends", "torch",
                 "--no-peers", "--no-chart", "--cache", str(tmp_path / "cache")], timeout=300,
                env={"TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert set(results.iterdir()) == before
    wrote = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 1, proc.stdout
    path = Path(wrote[0])
    assert path.is_file() and path.parent.parent == tmp_path and path.parent.name.startswith("fastclr-bench-")
    assert f"results -> {path}" in proc.stderr
    assert json.loads(path.read_text())["meta"]["complete"] is True


@pytest.mark.e2e
def test_bad_arguments_fail_fast():
    proc = _run([sys.executable, str(THROUGHPUT), "--stages", "read,warp"], timeout=120)
    assert proc.returncode == 2 and "unknown stage" in proc.stderr
    proc = _run([sys.executable, str(THROUGHPUT), "--sweep", "lr=1,2"], timeout=120)
    assert proc.returncode == 2 and "--sweep" in proc.stderr


# ------------------------------------------------------------------------------------------------
# gpu_suite.sh / gpu/carry.sh
# ------------------------------------------------------------------------------------------------

def _fake_carry(root: Path, corrupt: bool = False) -> bytes:
    """A 'wheel' split over two carry folders, plus a whole file, each folder with SHA256SUMS."""
    payload = os.urandom(5000)
    small = b"tiny sdist"
    sums = (f"{hashlib.sha256(payload).hexdigest()}  fake_pkg-1.0-py3-none-any.whl\n"
            f"{hashlib.sha256(small).hexdigest()}  small-1.0.tar.gz\n")
    a, b = root / "carry01", root / "carry02"
    a.mkdir(parents=True)
    b.mkdir()
    (a / "fake_pkg-1.0-py3-none-any.whl.part-aa").write_bytes(payload[:2000])
    (b / "fake_pkg-1.0-py3-none-any.whl.part-ab").write_bytes(payload[2000:4000])
    (a / "fake_pkg-1.0-py3-none-any.whl.part-ac").write_bytes(payload[4000:] + (b"x" if corrupt else b""))
    (b / "small-1.0.tar.gz").write_bytes(small)
    for d in (a, b):
        (d / "SHA256SUMS").write_text(sums)
    return payload


def test_gpu_suite_dry_run(tmp_path):
    carry = tmp_path / "carry"
    _fake_carry(carry)
    proc = _run(["bash", str(SUITE), "--dry-run", str(carry), str(tmp_path / "out")], timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "pytest -m gpu" in out
    assert "benchmarks/throughput.py --device cuda" in out and "hw_decoder_load=" in out
    assert "pip install --no-deps --no-build-isolation -e ." in out
    assert "fake_pkg-1.0-py3-none-any.whl <- 3 pieces" in out
    assert "install_dali] skipped" in out  # no DALI wheel in this carry: said so, not attempted
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["ok"] is True
    names = [p["name"] for p in summary["phases"]]
    # the goals' stages first, then the tests, the other stages and the merged JSON
    assert {"assemble", "install_fastclr", "pytest_gpu", "throughput_core", "throughput_rest", "merge"} <= set(names)
    assert names.index("throughput_core") < names.index("pytest_gpu") < names.index("throughput_rest")
    assert "--stages photometry,step,e2e" in out and "merge_results.py" in out
    assert all({"status", "rc", "seconds"} <= set(p) for p in summary["phases"])
    # the GPU variant of make semisup comes last (it is the phase a short lease drops)
    assert names[-1] == "semisup" and "SEMISUP_DEVICE=cuda" in out and "experiments/semisup.sh" in out


def test_gpu_suite_semisup_alone_and_its_data(tmp_path):
    """FASTCLR_SUITE_SEMISUP=only: the split-lease call runs only the chain, on the carried IDX files;
    =0 skips it with the reason; anything else is a one-line error."""
    carry = tmp_path / "carry"
    _fake_carry(carry)
    (carry / "fmnist").mkdir()
    (carry / "fmnist" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    proc = _run(["bash", str(SUITE), "--dry-run", str(carry), str(tmp_path / "out")], timeout=60,
                env={"FASTCLR_SUITE_SEMISUP": "only", "FASTCLR_FMNIST": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = [p["name"] for p in json.loads((tmp_path / "out" / "summary.json").read_text())["phases"]]
    assert "semisup" in names and not {"throughput_core", "pytest_gpu", "throughput_rest"} & set(names)
    assert f"FASTCLR_FMNIST={carry}/fmnist" in proc.stdout
    proc = _run(["bash", str(SUITE), "--dry-run", str(carry), str(tmp_path / "out0")], timeout=60,
                env={"FASTCLR_SUITE_SEMISUP": "0"})
    semi = [p for p in json.loads((tmp_path / "out0" / "summary.json").read_text())["phases"] if p["name"] == "semisup"]
    assert semi[0]["status"] == "skipped" and "SEMISUP=0" in semi[0]["reason"]
    proc = _run(["bash", str(SUITE), "--dry-run", str(carry), str(tmp_path / "o")], timeout=60,
                env={"FASTCLR_SUITE_SEMISUP": "sometimes"})
    assert proc.returncode == 2 and "FASTCLR_SUITE_SEMISUP must be auto, 0 or only" in proc.stderr


def test_gpu_suite_dry_run_reports_missing_piece(tmp_path):
    carry = tmp_path / "carry"
    _fake_carry(carry)
    (carry / "carry02" / "fake_pkg-1.0-py3-none-any.whl.part-ab").unlink()
    proc = _run(["bash", str(SUITE), "--dry-run", str(carry), str(tmp_path / "out")], timeout=60)
    assert ".part-ab missing" in proc.stdout
    assert proc.returncode != 0


def test_gpu_suite_assembles_and_verifies(tmp_path):
    carry = tmp_path / "carry"
    payload = _fake_carry(carry)
    work = tmp_path / "work"
    proc = _run(["bash", str(SUITE), "--assemble-only", str(carry), str(tmp_path / "out")], timeout=60,
                env={"FASTCLR_SUITE_WORK": str(work)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (work / "wheels" / "fake_pkg-1.0-py3-none-any.whl").read_bytes() == payload
    assert (work / "wheels" / "small-1.0.tar.gz").read_bytes() == b"tiny sdist"
    assert "fake_pkg-1.0-py3-none-any.whl sha256 OK" in proc.stdout

    bad = tmp_path / "bad"
    _fake_carry(bad, corrupt=True)
    proc = _run(["bash", str(SUITE), "--assemble-only", str(bad), str(tmp_path / "out2")], timeout=60,
                env={"FASTCLR_SUITE_WORK": str(tmp_path / "work2")})
    assert proc.returncode != 0 and "MISMATCH" in proc.stdout
    assert not (tmp_path / "work2" / "wheels" / "fake_pkg-1.0-py3-none-any.whl").exists()


@pytest.mark.e2e
def test_gpu_carry_dry_run(tmp_path):
    proc = _run(["bash", str(CARRY), "--dry-run", str(tmp_path / "carry")], timeout=120,
                env={"FASTCLR_CARRY_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pip download" in proc.stdout and "nvidia-dali-cuda130" in proc.stdout
    assert "--python-version 3.12" in proc.stdout
    assert "--no-binary=:all: ffcv==1.0.2" in proc.stdout
    assert not (tmp_path / "carry").exists()


def test_ffcv_deps_are_read_from_setup_py(tmp_path):
    """One FFCV dependency list, setup.py's extras["ffcv"]: gpu/deps.py reads it, the scripts use it and
    never repeat it. FFCV 1.0.2 declares fastargs (fastprogress is neither declared nor imported)."""
    def deps(cmd):
        proc = _run([sys.executable, str(DEPS), cmd], timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    assert deps("ffcv-pin") == ["ffcv==1.0.2"]
    carried = deps("ffcv-carry")
    assert "fastargs" in carried and "fastprogress" not in carried and "setuptools" in carried
    assert not {"ffcv", "numba", "opencv-python-headless"} & set(carried)  # the sdist; on the GPU machine
    for script in (CARRY, INSTALL):
        assert "fastargs" not in script.read_text() and "terminaltables" not in script.read_text(), script
    proc = _run(["bash", str(CARRY), "--dry-run", "--only", "ffcv", str(tmp_path / "carry")], timeout=120,
                env={"FASTCLR_CARRY_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    downloads = [line.split()[-1] for line in proc.stdout.splitlines() if "pip download" in line]
    assert {d.split("==")[0] for d in downloads} >= set(carried)


@pytest.mark.parametrize("script", [SUITE, CARRY, INSTALL, ROOT / "benchmarks" / "gpu" / "_lib.sh",
                                    ROOT / "experiments" / "semisup.sh", ROOT / "docs" / "slurm.sbatch"],
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    proc = _run(["shellcheck", "-x", str(script)], timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.e2e
def test_merge_results_keeps_measured_stages(quick_result, tmp_path):
    """merge_results: a stage that failed in a later run (skipped, or "ok" with every row failed) keeps
    the earlier measurement; a later measurement replaces an earlier failure; each stage names its
    run; ratios are recomputed from the merged stages, not copied from an input."""
    res, _, _ = quick_result
    first = json.loads(json.dumps(res))
    second = json.loads(json.dumps(res))
    first["stages"]["optim"] = {"status": "skipped", "reason": "failed: boom", "rows": []}
    second["stages"]["loss"] = {"status": "skipped", "reason": "failed: bang", "rows": []}
    second["stages"]["model"] = {"status": "ok", "rows": [{"name": "r18", "status": "skipped",
                                                           "reason": "failed: TypeError"}]}
    del second["stages"]["read"]
    for doc in (first, second):
        doc["ratios"] = {k: {"value": -1.0} for k in res["ratios"]}  # junk: must not survive
    paths = []
    for name, doc in (("a.json", first), ("b.json", second)):
        (tmp_path / name).write_text(json.dumps(doc))
        paths.append(str(tmp_path / name))
    out = tmp_path / "merged.json"
    proc = _run([sys.executable, str(ROOT / "benchmarks" / "merge_results.py"), str(out), *paths, "--no-chart"],
                timeout=120)
    assert proc.returncode == 0, proc.stderr
    merged = json.loads(out.read_text())
    st = merged["stages"]
    assert st["optim"]["source"] == paths[1] and st["optim"]["rows"] == res["stages"]["optim"]["rows"]
    assert st["loss"]["source"] == paths[0] and st["loss"]["status"] == res["stages"]["loss"]["status"]
    assert st["model"]["source"] == paths[0] and st["model"]["rows"] == res["stages"]["model"]["rows"]
    assert st["read"]["source"] == paths[0]
    assert [m["file"] for m in merged["meta"]["merged_from"]] == paths
    assert merged["ratios"].keys() == res["ratios"].keys()
    for k, r in res["ratios"].items():
        assert merged["ratios"][k].get("value") == r.get("value"), k


@pytest.mark.e2e
def test_semisup_report_results(tmp_path):
    """semisup.sh's bookkeeping (experiments/semisup_report.py): the results table and JSON from the step
    runs' last log records, a missing or unfinished step shown as '-', seconds summed per step."""
    out = tmp_path / "runs"
    for name, rec in (("pretrain", {"event": "done", "step": 10, "final_loss": 1.5}),
                      ("finetune_1pct", {"event": "done", "final_top1": 70.12, "step": 30})):
        (out / name).mkdir(parents=True)
        (out / name / "log.jsonl").write_text(json.dumps({"event": "start"}) + "\n" + json.dumps(rec) + "\n")
    (out / "timings.jsonl").write_text("".join(json.dumps({"step": s, "seconds": t}) + "\n"
                                               for s, t in (("pretrain", 120), ("finetune_1pct", 30),
                                                            ("pretrain", 60))))
    save = tmp_path / "saved" / "semisup_demo"
    proc = _run([sys.executable, "-m", "experiments.semisup_report", "results", str(out), "1", "18",
                 str(out / "pretrain"), str(save)], timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((out / "results.json").read_text())
    assert doc == json.loads(save.with_suffix(".json").read_text())
    assert doc["quick"] is True and doc["teacher_depth"] == 18 and doc["pretrain"]["step"] == 10
    assert doc["pretrain_seconds"] == 180 and doc["total_seconds"] == 210
    assert doc["results"]["finetune_1pct"]["top1"] == 70.12 and doc["results"]["finetune_10pct"]["top1"] is None
    md = (out / "results.md").read_text()
    assert "| SimCLR + fine-tune (SimCLRv2 step 2) | R18 | 70.1 | - |" in md and "SMOKE RUN" in md
    assert md in proc.stdout and f"results: {out}/results.json, {save}.json" in proc.stdout
    assert doc["device"] == "cpu" and all(t["met"] is None for t in doc["targets"])
    assert "| fine-tune >= linear probe, at 1 % and at 10 % | 70.1 vs -; - vs - | smoke run: not judged |" in md


_FAKE_PY = """#!/usr/bin/env python3
# semisup.sh's interpreter, faked: records each training step's argv and writes its "done" record
import json, os, subprocess, sys
a = sys.argv[1:]
if a[:2] == ["-m", "loaders.demo_data"]:
    print(os.environ["FAKE_DEMO"]); raise SystemExit(0)
if a[:1] == ["-m"]:
    raise SystemExit(subprocess.call([os.environ["REAL_PY"], *a]))
out = [x.split("=", 1)[1] for x in a if x.startswith("--run.out_dir=")][-1]
os.makedirs(out, exist_ok=True)
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(a) + "\\n")
with open(os.path.join(out, "log.jsonl"), "w") as f:
    f.write(json.dumps({"event": "done", "final_top1": 50.0, "step": 1}) + "\\n")
"""


@pytest.mark.e2e
def test_semisup_gpu_variant_wiring(tmp_path):
    """SEMISUP_DEVICE=cuda: every step on the GPU in bf16, eager (no compile, no CUDA graphs, no fused-op
    compile), the GPU schedules (pretraining epochs and batch, 30 fine-tuning epochs at 10 % only, 10
    distillation passes), and the results saved as semisup_gpu with the device named. The interpreter is
    faked so that this runs on a CPU: it checks the script, not the training."""
    fake = tmp_path / "py"
    fake.write_text(_FAKE_PY)
    fake.chmod(0o755)
    log = tmp_path / "argv.jsonl"
    env = {**{k: "" for k in os.environ if k.startswith("SEMISUP_")},
           "PY": str(fake), "REAL_PY": sys.executable, "FAKE_LOG": str(log), "FAKE_DEMO": str(tmp_path / "demo"),
           "SEMISUP_DEVICE": "cuda", "SEMISUP_OUT": str(tmp_path / "runs"), "SEMISUP_WORKERS": "5",
           "SEMISUP_SAVE": str(tmp_path / "saved" / "semisup_gpu")}
    proc = _run(["bash", str(ROOT / "experiments" / "semisup.sh")], timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = {[x for x in a if x.startswith("--run.out_dir=")][-1].rsplit("/", 1)[1]: a
             for a in map(json.loads, log.read_text().splitlines())}
    assert len(steps) == 13 and "pretrain" in steps
    from fastclr import config, presets
    from loaders.options import parse_into
    entry = {"pretrain.py": (config.PretrainConfig, presets.PRETRAIN),
             "finetune.py": (config.FinetuneConfig, presets.FINETUNE),
             "distill.py": (config.DistillConfig, presets.DISTILL),
             "linear_eval.py": (config.LinearEvalConfig, presets.LINEAR)}
    for a in steps.values():   # every option the script passes exists and is in range
        cls, table = entry[os.path.basename(a[0])]
        cfg = parse_into(cls(), a[1:], table)
        assert cfg.run.device == "cuda"
        # bf16 views for the networks, the raw-pixel baseline in fp32 (a step's own option wins over COMMON)
        assert cfg.run.precision == ("fp32" if "--raw_pixels=true" in a else "bf16"), a
    for name, a in steps.items():
        for opt in ("--run.device=cuda", "--run.precision=bf16", "--data.num_workers=5",
                    "--model.compile=false", "--run.cuda_graphs=false"):
            assert opt in a, (name, opt)
    assert {"--optim.epochs=40", "--optim.global_batch_size=512"} <= set(steps["pretrain"])
    assert "--optim.epochs=30" in steps["finetune_10pct"] and "--optim.epochs=30" in steps["scratch_10pct"]
    assert not any(x.startswith("--optim.epochs") for x in steps["finetune_1pct"])   # the preset's 60
    assert "--optim.epochs=10" in steps["distill_1pct"] and "--optim.epochs=10" in steps["self_distill_10pct"]
    doc = json.loads((tmp_path / "runs" / "results.json").read_text())
    assert doc["device"] == "cuda" and doc["results"]["finetune_10pct"]["top1"] == 50.0
    assert json.loads((tmp_path / "saved" / "semisup_gpu.json").read_text()) == doc


def test_semisup_targets_are_judged_from_the_results():
    """Each of the chain's targets: met only when every pair clears its margin (a tie counts, also where
    float addition would miss it); "fine-tune or linear" takes the better of the two; a student is held
    against its teacher's best top-1 (distill.py loads best.pt); a missing step leaves the target
    unjudged, and a smoke run is not judged at all."""
    from experiments.semisup_report import judge
    top = {"raw_pixels_1pct": 77.3, "raw_pixels_10pct": 81.3, "scratch_1pct": 68.0, "scratch_10pct": 80.0,
           "linear_1pct": 79.0, "linear_10pct": 84.4, "finetune_1pct": 80.3, "finetune_10pct": 84.0,
           "distill_1pct": 80.3, "self_distill_1pct": 80.5, "distill_10pct": 84.1, "self_distill_10pct": 83.9}
    res = {k: {"top1": v, "best_top1": v} for k, v in top.items()}
    got = {t["target"]: t["met"] for t in judge(res)}
    assert list(got.values()) == [True, True, True, False, False]
    fl = next(t for t in judge(res) if t["target"].startswith("fine-tune or linear"))
    assert fl["pairs"][0]["measured"] == "linear_10pct" and fl["pairs"][0]["value"] == 84.4
    res["finetune_10pct"] = {"top1": 84.4, "best_top1": 84.4}
    res["self_distill_10pct"]["top1"] = 84.4      # equal counts: ">="
    res["distill_10pct"]["top1"] = 84.5
    assert [t["met"] for t in judge(res)] == [True, True, True, True, True]
    res["finetune_1pct"]["best_top1"] = 80.6      # the teacher's best.pt beats both 1 % students
    assert [t["met"] for t in judge(res)] == [True, True, True, True, False]
    res["finetune_1pct"]["best_top1"] = 80.3
    res["scratch_1pct"]["top1"] = 70.31           # 80.3 < 70.31 + 10
    del res["distill_1pct"]
    assert [t["met"] for t in judge(res)] == [False, True, True, True, None]
    res["finetune_1pct"]["top1"] = 64.02
    res["raw_pixels_1pct"]["top1"] = 61.02        # 64.02 == 61.02 + 3, which float addition puts above 64.02
    assert 61.02 + 3 > 64.02
    assert judge(res)[1]["met"] is True
    assert all(t["met"] is None for t in judge(res, quick=True))
