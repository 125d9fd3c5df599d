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
# Phases (each under `timeout`, all inside a time budget of FASTCLR_SUITE_BUDGET_S, default 470 s;
# a failed phase does not stop the suite):
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
#   pytest_gpu      pytest -m gpu -q [-k "$FASTCLR_SUITE_PYTEST_K"], junit xml -> OUT_DIR/junit-gpu.xml
#   throughput      benchmarks/throughput.py --device cuda (all backends) + hw_decoder_load sweep
#                   [+ $FASTCLR_SUITE_THROUGHPUT_ARGS]
# OUT_DIR gets summary.json (every phase: status, exit code, seconds), logs/, gpu.json and charts.
# Exit status: 0 if no phase failed, 1 otherwise. --dry-run prints every command and checks the
# carry layout without running anything (works on a CPU machine).
set -euo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
REPO="$(cd "$(dirname "$SELF")/.." && pwd)"
# shellcheck source=benchmarks/gpu/_lib.sh
source "$(dirname "$SELF")/gpu/_lib.sh"
SWEEP="hw_decoder_load=0.0,0.65,0.9"
DALI_PKG="nvidia_dali_cuda130"

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

# ------------------------------------------------------------------------------------------------
# Carry layout: CARRY_DIR/* and CARRY_DIR/carry*/* ; NAME.part-xx pieces; SHA256SUMS
# ------------------------------------------------------------------------------------------------

carry_files() {  # every regular file of the carry layout, one per line
    local dir=$1 d f
    for d in "$dir" "$dir"/carry*/; do
        [[ -d "$d" ]] || continue
        for f in "$d"/*; do
            [[ -f "$f" ]] && printf '%s\n' "${f//\/\//\/}"
        done
    done
}

next_suffix() {  # aa -> ab ... az -> ba
    local s=$1 letters=abcdefghijklmnopqrstuvwxyz
    local a=${s:0:1} b=${s:1:1}
    local ia=${letters%%"$a"*} ib=${letters%%"$b"*}
    local i=$(( ${#ia} * 26 + ${#ib} + 1 ))
    printf '%s%s' "${letters:$(( i / 26 )):1}" "${letters:$(( i % 26 )):1}"
}

# assemble CARRY_DIR DEST [check-only]: whole files linked, split files concatenated, then verified.
# Prints one line per file; returns 1 if a split file is incomplete or a checksum does not match.
assemble() {
    local carry=$1 dest=$2 check_only=${3:-0}
    local status=0 f base name
    local -a whole=() sums=()
    local -A parts=()
    [[ -d "$carry" ]] || { echo "carry: no folder $carry (nothing to install from it)"; return 0; }
    (( check_only )) || mkdir -p "$dest"
    while IFS= read -r f; do
        base=$(basename "$f")
        case "$base" in
            SHA256SUMS) sums+=("$f") ;;
            *.part-[a-z][a-z]) name=${base%.part-??}; parts[$name]+="$f"$'\n' ;;
            *) whole+=("$f") ;;
        esac
    done < <(carry_files "$carry")
    for f in "${whole[@]+"${whole[@]}"}"; do
        echo "carry: $(basename "$f") ($(du -h "$f" | cut -f1))"
        (( check_only )) || ln -sf "$(cd "$(dirname "$f")" && pwd)/$(basename "$f")" "$dest/$(basename "$f")"
    done
    for name in "${!parts[@]}"; do
        # Sort the pieces by suffix (they may sit in different carry folders) and check none is missing.
        local -a list=()
        mapfile -t list < <(printf '%s' "${parts[$name]}" | awk -F'.part-' '{print $NF "\t" $0}' | sort | cut -f2-)
        local expect=aa ok=1 p
        for p in "${list[@]}"; do
            if [[ "${p##*.part-}" != "$expect" ]]; then
                echo "carry: $name: piece .part-$expect missing (have ${p##*.part-} next); carry every carry*/ folder"
                ok=0
                break
            fi
            expect=$(next_suffix "$expect")
        done
        if (( ! ok )); then
            status=1
            continue
        fi
        echo "carry: $name <- ${#list[@]} pieces"
        if (( ! check_only )); then
            rm -f "$dest/$name"
            cat "${list[@]}" > "$dest/$name.tmp"
            mv "$dest/$name.tmp" "$dest/$name"
        fi
    done
    if (( ${#sums[@]} == 0 )); then
        echo "carry: no SHA256SUMS: files are not verified"
        return "$status"
    fi
    (( check_only )) && return "$status"
    # Merge the SHA256SUMS copies; verify every listed file that is present.
    local sum file
    while read -r sum file; do
        [[ -n "$file" ]] || continue
        file=${file#\*}
        if [[ ! -e "$dest/$file" ]]; then
            echo "carry: $file listed in SHA256SUMS but not carried"
            continue
        fi
        if [[ "$(sha256sum "$dest/$file" | cut -d' ' -f1)" == "$sum" ]]; then
            echo "carry: $file sha256 OK"
        else
            echo "carry: $file sha256 MISMATCH (a piece is corrupt or from another download)"
            rm -f "$dest/$file"
            status=1
        fi
    done < <(sort -u "${sums[@]}")
    return "$status"
}

# ------------------------------------------------------------------------------------------------
# Internal subcommands (run under `timeout` by the phases)
# ------------------------------------------------------------------------------------------------

# __pip_missing WHEELS import=dist ...: install the distributions whose module does not import.
pip_missing() {
    local wheels=$1 spec mod dist
    shift
    local -a todo=()
    for spec in "$@"; do
        mod=${spec%%=*}
        dist=${spec#*=}
        if "$PY" -c "import $mod" >/dev/null 2>&1; then
            echo "$dist: already importable"
        else
            todo+=("$dist")
        fi
    done
    if (( ${#todo[@]} == 0 )); then
        return 0
    fi
    echo "installing ${todo[*]} from $wheels"
    "$PY" -m pip install --no-index --find-links "$wheels" --no-build-isolation "${todo[@]}"
}

# __install_ffcv WHEELS NATIVE_DIR: build ffcv from the sdist against the carried native kit.
install_ffcv() {
    local wheels=$1 native=$2 sdist kit shim
    sdist=$(find -L "$wheels" -maxdepth 1 -name 'ffcv-*.tar.gz' ! -name 'ffcv-native*' | sort | tail -n 1)
    kit="$wheels/ffcv-native.tar.gz"
    [[ -n "$sdist" && -f "$kit" ]] || { echo "no ffcv sdist or ffcv-native.tar.gz in $wheels"; return 3; }
    command -v g++ >/dev/null 2>&1 || command -v c++ >/dev/null 2>&1 || {
        echo "no C++ compiler (g++): FFCV builds a C extension"; return 3; }
    local inc
    inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
    [[ -f "$inc/Python.h" ]] || { echo "no Python.h in $inc (python3-dev): FFCV builds a C extension"; return 3; }
    rm -rf "$native"
    mkdir -p "$native"
    tar -xzf "$kit" -C "$native" --strip-components=1
    # FFCV's setup.py asks `pkg-config --cflags --libs opencv4` and `... libturbojpeg`: answer from the kit.
    shim="$native/bin"
    mkdir -p "$shim"
    cat > "$shim/pkg-config" <<EOF
#!/usr/bin/env bash
case "\$*" in
  *opencv*) echo "-I$native/include/opencv4 -L$native/lib -lopencv_imgproc -lopencv_core" ;;
  *turbojpeg*) echo "-I$native/include -L$native/lib -lturbojpeg" ;;
  *) echo "Package \$* was not found (fastclr pkg-config shim)"; exit 1 ;;
esac
EOF
    chmod +x "$shim/pkg-config"
    # DT_RPATH (not RUNPATH): also searched for the kit libraries' own dependencies (libtbb, lapack...).
    PATH="$shim:$PATH" LDFLAGS="-Wl,--disable-new-dtags,-rpath,$native/lib ${LDFLAGS:-}" \
        "$PY" -m pip install --no-index --find-links "$wheels" --no-build-isolation --no-deps "$sdist"
    "$PY" -m pip install --no-index --find-links "$wheels" --no-build-isolation \
        terminaltables pytorch_pfn_extras fastargs assertpy psutil || echo "warning: some FFCV runtime deps missing"
    LD_LIBRARY_PATH="$native/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        "$PY" -c 'import ffcv, ffcv.libffcv; print("ffcv imports:", ffcv.__file__)'
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
    BUDGET=${FASTCLR_SUITE_BUDGET_S:-470}
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

    has() {  # has GLOB: a reassembled file (dry run: a carried file or split file) matches GLOB
        local n
        if (( ! DRY_RUN )); then
            compgen -G "$wheels/$1" >/dev/null
            return
        fi
        while IFS= read -r n; do
            n=$(basename "$n")
            n=${n%.part-[a-z][a-z]}
            # $1 is a glob on purpose: unquoted on the right of ==
            # shellcheck disable=SC2053
            [[ "$n" == $1 ]] && return 0
        done < <(carry_files "$CARRY_DIR")
        return 1
    }

    # -- installs ---------------------------------------------------------------------------------
    local pipw=("$PY" -m pip install --no-index --find-links "$wheels" --no-build-isolation)
    phase build_tools 60 0 bash "$SELF" __pip_missing "$wheels" setuptools=setuptools wheel=wheel
    phase install_fastclr 90 0 "$PY" -m pip install --no-deps --no-build-isolation -e .
    phase test_deps 60 0 bash "$SELF" __pip_missing "$wheels" pytest=pytest hypothesis=hypothesis tqdm=tqdm
    # A package that already imports (installed by an earlier call on this warm machine, or by the
    # image) is not installed again: the phase is recorded as skipped with that reason.
    if importable nvidia.dali; then
        skip_phase install_dali "nvidia.dali already importable"
    elif has "nvidia_dali_cuda*.whl"; then
        # The wheel itself (cuda130, or cuda120 if that is what was carried); deps from the wheels dir.
        local dali_whl="$wheels/$DALI_PKG-*.whl"
        if (( ! DRY_RUN )); then
            dali_whl=$(compgen -G "$wheels/nvidia_dali_cuda*.whl" | sort | tail -n 1)
        fi
        phase install_dali 150 0 "${pipw[@]}" "$dali_whl"
    else
        skip_phase install_dali "no nvidia_dali wheel in $CARRY_DIR (make gpu-carry)"
    fi
    if LD_LIBRARY_PATH="$native/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" importable ffcv.libffcv; then
        skip_phase install_ffcv "ffcv already importable"
    elif has "ffcv-native.tar.gz"; then
        phase install_ffcv 180 0 bash "$SELF" __install_ffcv "$wheels" "$native"
    else
        skip_phase install_ffcv "no ffcv sdist + ffcv-native.tar.gz in $CARRY_DIR (make gpu-carry)"
    fi
    if importable lightly; then
        skip_phase install_peers "lightly already importable"
    elif has "lightly-*.whl"; then
        phase install_peers 90 0 "${pipw[@]}" lightly
    else
        skip_phase install_peers "no lightly wheel in $CARRY_DIR: peer rows from lightly will be skipped"
    fi
    if has "matplotlib-*.whl"; then
        phase install_plot 60 0 bash "$SELF" __pip_missing "$wheels" matplotlib=matplotlib
    fi

    # -- checks -----------------------------------------------------------------------------------
    # The FFCV extension finds its kit through its rpath; LD_LIBRARY_PATH is a second way in.
    export LD_LIBRARY_PATH="$native/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # works even if the editable install failed
    phase env 30 0 bash "$SELF" __env
    # pytest leaves >= 240 s of the budget to the benchmark.
    # FASTCLR_SUITE_PYTEST_K narrows the GPU tests (pytest -k), e.g. to "dali" when an earlier call on the
    # same machine already ran the others.
    local -a kexpr=()
    [[ -z "${FASTCLR_SUITE_PYTEST_K:-}" ]] || kexpr=(-k "$FASTCLR_SUITE_PYTEST_K")
    phase pytest_gpu 150 240 "$PY" -m pytest -m gpu -q -p no:cacheprovider "${kexpr[@]+"${kexpr[@]}"}" \
        --junitxml="$OUT_DIR/junit-gpu.xml"
    # FASTCLR_SUITE_THROUGHPUT_ARGS: extra throughput.py options, appended (a later --stages wins), e.g.
    # "--stages augment,e2e,step" when an earlier call on the same machine measured the other stages.
    local -a targs=()
    [[ -z "${FASTCLR_SUITE_THROUGHPUT_ARGS:-}" ]] || read -r -a targs <<< "$FASTCLR_SUITE_THROUGHPUT_ARGS"
    phase throughput 330 0 "$PY" benchmarks/throughput.py --device cuda --out "$OUT_DIR/gpu.json" --sweep "$SWEEP" \
        "${targs[@]+"${targs[@]}"}"
    if (( ! DRY_RUN )) && [[ -f "$OUT_DIR/logs/throughput.log" ]]; then
        grep -v '^\[throughput\]' "$OUT_DIR/logs/throughput.log" | tail -n 80 || true
    fi

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
