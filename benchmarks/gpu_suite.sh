#!/usr/bin/env bash
# One command that proves every GPU path of fastclr on a bare GPU machine without network.
#
#   bash benchmarks/gpu_suite.sh [--dry-run] [CARRY_DIR] [OUT_DIR]      (defaults: gpu_carry gpu_out)
#   bash benchmarks/gpu_suite.sh --assemble-only CARRY_DIR               (reassemble + verify, then stop)
#
# The machine is expected to have Python 3.12 with PyTorch, torchvision, numpy, numba and opencv.
# Everything else comes from CARRY_DIR, as written by benchmarks/gpu/carry.sh on a machine with
# network: wheels (big ones split into NAME.part-aa, NAME.part-ab, ... and spread over several
# CARRY_DIR/carry*/ folders, because one device call carries at most 64 MiB), SHA256SUMS of the
# whole files, the FFCV sdist and the native kit FFCV builds against (libturbojpeg + OpenCV core /
# imgproc, headers and shared libraries).
#
# Phases (each under `timeout`, all inside a time budget of FASTCLR_SUITE_BUDGET_S, default 540 s;
# a failed phase does not stop the suite; the most important measurements run first):
#   assemble        reassemble split files, verify sha256 against SHA256SUMS
#   build_tools     setuptools/wheel if missing (needed by --no-build-isolation)
#   install_fastclr pip install --no-deps --no-build-isolation -e .
#   test_deps       pytest, hypothesis, tqdm if missing
#   install_dali    pip install --no-index --find-links <wheels> nvidia-dali-cuda130 (+ codecs)
#   install_ffcv    build ffcv 1.0.2 from the sdist against the native kit (pkg-config shim, rpath)
#   install_peers   lightly (for the peer rows), matplotlib (charts), when carried
#                   (each install is skipped when its package already imports, e.g. on a warm machine
#                   where an earlier call installed it)
#   env             nvidia-smi, torch/DALI/FFCV import check -> OUT_DIR/logs/env.log
#   throughput_core throughput.py --device cuda --stages photometry,step,e2e (the colour recipe alone,
#                   every step variant, each backend on the fastest step) -> OUT_DIR/gpu-core.json
#   pytest_gpu      pytest -m "gpu or slow" -q [-k "$FASTCLR_SUITE_PYTEST_K"] (the GPU tests, and the CPU
#                   tests that compile with inductor: many cores compile fast), junit xml -> OUT_DIR/junit-gpu.xml
#   throughput_rest the other stages + hw_decoder_load sweep -> OUT_DIR/gpu-rest.json
#                   (both throughput phases [+ $FASTCLR_SUITE_THROUGHPUT_ARGS])
#   merge           merge_results.py: OUT_DIR/gpu.json (+ charts) from the two
#   semisup         the GPU variant of `make semisup` (SEMISUP_DEVICE=cuda experiments/semisup.sh) on the
#                   Fashion-MNIST files in CARRY_DIR/fmnist -> OUT_DIR/semisup_gpu.{json,md} + step logs;
#                   skipped (with the reason) without those files or with < 240 s of budget left.
#                   FASTCLR_SUITE_SEMISUP=only runs it alone (its own device call), =0 never
# OUT_DIR gets summary.json (every phase: status, exit code, seconds), logs/, gpu.json and charts.
# Exit status: 0 if no phase failed, 1 otherwise. --dry-run prints every command and checks the
# carry layout without running anything (works on a CPU machine).
# The reassembly and install phases live in benchmarks/gpu/install.sh (sourced here).
set -euo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
REPO="$(cd "$(dirname "$SELF")/.." && pwd)"
# shellcheck source=benchmarks/gpu/_lib.sh
source "$(dirname "$SELF")/gpu/_lib.sh"
# shellcheck source=benchmarks/gpu/install.sh
source "$(dirname "$SELF")/gpu/install.sh"
SWEEP="hw_decoder_load=0.0,0.65,0.9"

usage() {
    sed -n '2,30p' "$SELF" | sed 's/^# \{0,1\}//'
}

die() {
    echo "gpu_suite: error: $*" >&2
    exit 2
}

find_python() {  # $PYTHON, else the first of python3 / python that imports torch
    if [[ -n "${PYTHON:-}" ]]; then
        echo "$PYTHON"
        return
    fi
    local c first=""
    for c in python3 python; do
        command -v "$c" >/dev/null 2>&1 || continue
        [[ -n "$first" ]] || first=$(command -v "$c")
        if "$c" -c 'import torch' >/dev/null 2>&1; then
            command -v "$c"
            return
        fi
    done
    echo "${first:-python3}"
}

env_report() {
    echo "== nvidia-smi"
    nvidia-smi || echo "nvidia-smi failed"
    echo "== python"
    "$PY" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "count", torch.cuda.device_count())
for m in ("torchvision", "numpy", "numba", "cv2", "nvidia.dali", "ffcv", "lightly", "matplotlib", "pytest", "fastclr"):
    try:
        mod = importlib.import_module(m)
        print(f"{m:12s} {getattr(mod, '__version__', 'ok')}")
    except Exception as e:
        print(f"{m:12s} MISSING ({type(e).__name__}: {e})")
EOF
}

# ------------------------------------------------------------------------------------------------
# Phase bookkeeping
# ------------------------------------------------------------------------------------------------

PHASES=()
FAILED=0

json_str() {  # JSON string literal of $1
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/ }
    s=${s//$'\t'/ }
    s=${s//$'\r'/ }
    printf '"%s"' "$s"
}

record() {  # record NAME STATUS RC SECONDS REASON
    PHASES+=("{\"name\": $(json_str "$1"), \"status\": $(json_str "$2"), \"rc\": $3, \"seconds\": $4, \"reason\": $(json_str "$5"), \"log\": $(json_str "logs/$1.log")}")
    if [[ "$2" == failed ]]; then
        FAILED=1
    fi
}

# phase NAME MAX_S RESERVE_S CMD...: run CMD under timeout min(MAX_S, time left - RESERVE_S).
# rc 3 from an internal subcommand = "skipped" (a missing prerequisite, reason in the log).
phase() {
    local name=$1 max=$2 reserve=$3
    shift 3
    local log="$OUT_DIR/logs/$name.log"
    if (( DRY_RUN )); then
        echo "[$name] timeout <= ${max}s"
        show_cmd "$@"
        record "$name" dry-run 0 0 ""
        return 0
    fi
    local now
    now=$(date +%s)
    local left=$(( DEADLINE - now - reserve ))
    local t=$(( max < left ? max : left ))
    if (( t < 10 )); then
        echo "[$name] FAILED: suite time budget exhausted"
        record "$name" failed 124 0 "suite time budget (FASTCLR_SUITE_BUDGET_S=$BUDGET) exhausted"
        return 0
    fi
    echo "[$name] running (timeout ${t}s) ..."
    local t0 rc=0
    t0=$(date +%s)
    timeout --kill-after=15 "$t" "$@" > "$log" 2>&1 || rc=$?
    now=$(date +%s)
    local dt=$(( now - t0 ))
    if (( rc == 0 )); then
        echo "[$name] ok (${dt}s)"
        record "$name" ok 0 "$dt" ""
    elif (( rc == 3 )); then
        local why
        why=$(tail -n 1 "$log")
        echo "[$name] skipped: $why"
        record "$name" skipped 3 "$dt" "$why"
    else
        local why="exit $rc"
        (( rc == 124 || rc == 137 )) && why="timed out after ${t}s"
        echo "[$name] FAILED ($why, ${dt}s); last lines of $log:"
        tail -n 25 "$log" | sed 's/^/    /'
        record "$name" failed "$rc" "$dt" "$why"
    fi
}

skip_phase() {  # skip_phase NAME REASON
    echo "[$1] skipped: $2"
    record "$1" skipped 0 0 "$2"
}

importable() {  # importable MODULE: it imports with $PY (always false in a dry run)
    (( ! DRY_RUN )) && "$PY" -c "import $1" >/dev/null 2>&1
}

bool() {  # bool N -> true / false
    if (( $1 )); then
        echo true
    else
        echo false
    fi
}

write_summary() {
    local out="$OUT_DIR/summary.json" i
    {
        printf '{\n "ok": %s,\n "dry_run": %s,\n "carry_dir": %s,\n "out_dir": %s,\n' \
            "$(bool $(( ! FAILED )))" "$(bool "$DRY_RUN")" \
            "$(json_str "$CARRY_DIR")" "$(json_str "$OUT_DIR")"
        printf ' "started": %s,\n "finished": %s,\n "budget_s": %s,\n "git_sha": %s,\n "phases": [\n' \
            "$(json_str "$STARTED")" "$(json_str "$(date -Iseconds)")" "$BUDGET" \
            "$(json_str "$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)")"
        for i in "${!PHASES[@]}"; do
            printf '  %s%s\n' "${PHASES[$i]}" "$( (( i + 1 < ${#PHASES[@]} )) && echo ,)"
        done
        printf ' ]\n}\n'
    } > "$out"
    echo "summary: $out"
}

# semisup_phase MODE WORK: the GPU variant of `make semisup` (experiments/semisup.sh, SEMISUP_DEVICE=cuda)
# on the Fashion-MNIST files carried in CARRY_DIR/fmnist (or $FASTCLR_FMNIST, or Debian's package). Its
# run directories (checkpoints) stay in WORK; OUT_DIR gets semisup_gpu.{json,md} and the steps' logs.
semisup_phase() {
    local mode=$1 work=$2 fm=${FASTCLR_FMNIST:-$CARRY_DIR/fmnist}
    if [[ "$mode" == 0 ]]; then
        skip_phase semisup "FASTCLR_SUITE_SEMISUP=0"
        return 0
    fi
    local -a envs=(SEMISUP_DEVICE=cuda "SEMISUP_OUT=$work/semisup" "PY=$PY")
    if [[ -f "$fm/train-images-idx3-ubyte.gz" ]]; then
        envs+=("FASTCLR_FMNIST=$fm")
    elif (( ! DRY_RUN )) && ! "$PY" -c 'import os, sys; from loaders.demo_data import source_dir
sys.exit(not os.path.isfile(os.path.join(source_dir(), "train-images-idx3-ubyte.gz")))' 2>/dev/null; then
        skip_phase semisup "no Fashion-MNIST files in $fm (make gpu-carry writes gpu_carry/fmnist: carry it)"
        return 0
    fi
    if (( ! DRY_RUN )) && ! importable "torch, torchvision, PIL, tqdm"; then
        skip_phase semisup "$PY cannot import torch, torchvision, PIL and tqdm (carry tqdm/Pillow wheels)"
        return 0
    fi
    local left=$(( DEADLINE - $(date +%s) ))
    if (( ! DRY_RUN && left < 240 )); then
        skip_phase semisup "${left}s left of the suite budget (it needs ~240s): run it as its own call, FASTCLR_SUITE_SEMISUP=only"
        return 0
    fi
    # An earlier call's table must not pass for this one's (a warm machine keeps $work).
    (( DRY_RUN )) || rm -f "$work/semisup/results.json" "$work/semisup/results.md"
    phase semisup 420 0 env "${envs[@]}" bash "$REPO/experiments/semisup.sh"
    if (( ! DRY_RUN )) && [[ -d "$work/semisup" ]]; then
        local f d
        if [[ ! -f "$work/semisup/results.json" ]]; then  # cut short: the table of the steps that finished
            (cd "$REPO" && "$PY" -m experiments.semisup_report results "$work/semisup" 0 \
                "${SEMISUP_TEACHER_DEPTH:-18}" "$work/semisup/pretrain" "" --device=cuda) \
                > "$OUT_DIR/logs/semisup_partial.log" 2>&1 || true
        fi
        for f in json md; do
            [[ -f "$work/semisup/results.$f" ]] && cp "$work/semisup/results.$f" "$OUT_DIR/semisup_gpu.$f"
        done
        [[ -f "$work/semisup/timings.jsonl" ]] && cp "$work/semisup/timings.jsonl" "$OUT_DIR/semisup_gpu_timings.jsonl"
        mkdir -p "$OUT_DIR/semisup_logs"
        for d in "$work"/semisup/*/; do
            [[ -f "$d/log.jsonl" ]] && cp "$d/log.jsonl" "$OUT_DIR/semisup_logs/$(basename "$d").jsonl"
        done
    fi
    return 0
}

# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------

main() {
    DRY_RUN=0
    local assemble_only=0 a
    local -a pos=()
    for a in "$@"; do
        case "$a" in
            --dry-run) DRY_RUN=1 ;;
            --assemble-only) assemble_only=1 ;;
            -h|--help) usage; exit 0 ;;
            -*) die "unknown option $a (see --help)" ;;
            *) pos+=("$a") ;;
        esac
    done
    (( ${#pos[@]} <= 2 )) || die "too many arguments: ${pos[*]} (expected [CARRY_DIR] [OUT_DIR])"
    CARRY_DIR=${pos[0]:-gpu_carry}
    OUT_DIR=${pos[1]:-gpu_out}
    PY=$(find_python)
    export PYTHON="$PY"  # the internal subcommands use the same interpreter
    local semi=${FASTCLR_SUITE_SEMISUP:-auto}
    [[ "$semi" == auto || "$semi" == 0 || "$semi" == only ]] \
        || die "FASTCLR_SUITE_SEMISUP must be auto, 0 or only, got '$semi'"
    BUDGET=${FASTCLR_SUITE_BUDGET_S:-540}
    STARTED=$(date -Iseconds)
    DEADLINE=$(( $(date +%s) + BUDGET ))
    cd "$REPO"
    mkdir -p "$OUT_DIR/logs"
    OUT_DIR=$(cd "$OUT_DIR" && pwd)
    [[ -d "$CARRY_DIR" ]] && CARRY_DIR=$(cd "$CARRY_DIR" && pwd)
    # Reassembled wheels and the FFCV native kit live outside OUT_DIR (which is copied back).
    local work=${FASTCLR_SUITE_WORK:-${TMPDIR:-/tmp}/fastclr-gpu-suite}
    local wheels="$work/wheels"
    local native=${FASTCLR_FFCV_NATIVE:-${XDG_CACHE_HOME:-$HOME/.cache}/fastclr/ffcv-native}

    echo "gpu_suite: repo $REPO, carry $CARRY_DIR, out $OUT_DIR, python $PY, budget ${BUDGET}s$( (( DRY_RUN )) && echo ', DRY RUN')"

    # -- assemble ---------------------------------------------------------------------------------
    local t0 rc=0
    t0=$(date +%s)
    if (( DRY_RUN )); then
        echo "[assemble] checking the carry layout (nothing is written)"
        assemble "$CARRY_DIR" "$wheels" 1 || rc=$?
    else
        rm -rf "$wheels"
        assemble "$CARRY_DIR" "$wheels" 0 > "$OUT_DIR/logs/assemble.log" 2>&1 || rc=$?
        cat "$OUT_DIR/logs/assemble.log"
    fi
    if (( rc == 0 )); then
        local st=ok
        (( DRY_RUN )) && st=dry-run
        record assemble "$st" 0 $(( $(date +%s) - t0 )) ""
    else
        record assemble failed "$rc" $(( $(date +%s) - t0 )) "incomplete or corrupt carried files (see log)"
    fi
    if (( assemble_only )); then
        echo "assembled into $wheels"
        return "$rc"
    fi

    # The chain alone needs no installs: torch, torchvision, Pillow and tqdm (checked in its phase), and
    # the repo on PYTHONPATH.
    if [[ "$semi" == only ]]; then
        skip_phase installs "FASTCLR_SUITE_SEMISUP=only: the chain needs none"
    else
        install_phases "$wheels" "$native"
    fi

    # -- checks -----------------------------------------------------------------------------------
    # The FFCV extension finds its kit through its rpath; LD_LIBRARY_PATH is a second way in.
    export LD_LIBRARY_PATH="$native/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # works even if the editable install failed
    phase env 30 0 bash "$SELF" __env
    if [[ "$semi" != only ]]; then
        # FASTCLR_SUITE_THROUGHPUT_ARGS: extra throughput.py options, appended to both runs (a later --stages
        # wins), e.g. "--backends torch" when an earlier call on the same machine measured the others.
        local -a targs=()
        [[ -z "${FASTCLR_SUITE_THROUGHPUT_ARGS:-}" ]] || read -r -a targs <<< "$FASTCLR_SUITE_THROUGHPUT_ARGS"
        # First what the goals are about: the colour recipe, the step variants and end to end (each row is in
        # the JSON as soon as it is measured, so a time-out keeps what ran). It leaves >= 200 s for the rest.
        phase throughput_core 300 200 "$PY" benchmarks/throughput.py --device cuda --stages photometry,step,e2e \
            --out "$OUT_DIR/gpu-core.json" "${targs[@]+"${targs[@]}"}"
        # FASTCLR_SUITE_PYTEST_K narrows the GPU tests (pytest -k), e.g. to "dali" when an earlier call on the
        # same machine already ran the others. pytest leaves >= 90 s to the other stages.
        local -a kexpr=()
        [[ -z "${FASTCLR_SUITE_PYTEST_K:-}" ]] || kexpr=(-k "$FASTCLR_SUITE_PYTEST_K")
        phase pytest_gpu 180 90 "$PY" -m pytest -m "gpu or slow" -q -p no:cacheprovider "${kexpr[@]+"${kexpr[@]}"}" \
            --junitxml="$OUT_DIR/junit-gpu.xml"
        phase throughput_rest 300 10 "$PY" benchmarks/throughput.py --device cuda \
            --stages read,decode,geometry,augment,h2d,model,teacher,loss,optim --sweep "$SWEEP" \
            --out "$OUT_DIR/gpu-rest.json" "${targs[@]+"${targs[@]}"}"
        local -a jsons=()
        local f
        for f in gpu-core.json gpu-rest.json; do
            if (( DRY_RUN )) || [[ -f "$OUT_DIR/$f" ]]; then jsons+=("$OUT_DIR/$f"); fi
        done
        if (( ${#jsons[@]} )); then
            phase merge 60 0 "$PY" benchmarks/merge_results.py "$OUT_DIR/gpu.json" "${jsons[@]}"
        else
            skip_phase merge "no throughput JSON was written"
        fi
        if (( ! DRY_RUN )); then
            for f in throughput_core throughput_rest; do
                [[ -f "$OUT_DIR/logs/$f.log" ]] && grep -v '^\[throughput\]' "$OUT_DIR/logs/$f.log" | tail -n 60
            done
        fi
    fi
    semisup_phase "$semi" "$work"

    write_summary
    if (( FAILED )); then
        echo "gpu_suite: some phases FAILED (see $OUT_DIR/summary.json)"
        return 1
    fi
    echo "gpu_suite: all phases ok$( (( DRY_RUN )) && echo ' (dry run: nothing was run)')"
}

case "${1:-}" in
    __pip_missing) shift; PY=$(find_python); pip_missing "$@" ;;
    __install_ffcv) shift; PY=$(find_python); install_ffcv "$@" ;;
    __env) PY=$(find_python); env_report ;;
    *) main "$@" ;;
esac
