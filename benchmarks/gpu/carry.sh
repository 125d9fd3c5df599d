#!/usr/bin/env bash
# Prepare what benchmarks/gpu_suite.sh installs on a GPU machine that has no network.
#
#   bash benchmarks/gpu/carry.sh [--dry-run] [--offline] [--only GROUPS] OUT_DIR     (make gpu-carry: OUT_DIR=gpu_carry)
#
# Runs on a CPU machine with network to PyPI (and, for the FFCV kit, libturbojpeg0-dev + libopencv-dev
# installed, as `make install` does). Writes OUT_DIR/carry01, carry02, ...: each folder at most
# FASTCLR_CARRY_MIB (default 61) MiB, so that each fits one device call with the working tree (64 MiB
# carried per call, the ~1.3 MB source tree included).
# Files above 60 MiB are split into NAME.part-aa, NAME.part-ab, ... (gpu_suite.sh cats them back).
# Every folder holds a copy of SHA256SUMS (of the whole files). Groups (--only; default below):
#   dali   nvidia-dali-cuda130 + what it Requires (nvimgcodec[all]: nvjpeg, nvjpeg2k, nvtiff; libnvcomp;
#          astunparse, gast, six, optree, packaging, nvtx, makefun, libcst, pyyaml, wheel)
#   ffcv   the ffcv sdist and the rest of setup.py's extras["ffcv"] but numba and OpenCV (which the GPU
#          machine has), read by benchmarks/gpu/deps.py, and ffcv-native.tar.gz: turbojpeg.h,
#          the OpenCV 4 headers, libturbojpeg + libopencv_core/imgproc and their shared-library
#          dependencies (FFCV's C extension is built on the GPU machine against these)
#   tools  setuptools, wheel (for --no-build-isolation builds)
#   test   pytest, hypothesis and their deps, tqdm
#   peers  lightly and its deps (pytorch_lightning, hydra-core, ...) for the peer rows
#   plot   matplotlib and its deps (the PNG charts)
#   fmnist the demo data's four Fashion-MNIST IDX .gz files (30 MB, from Debian's dataset-fashion-mnist or
#          $FASTCLR_FMNIST), copied to OUT_DIR/fmnist/ (not a carryNN folder: carried on its own in
#          the call that runs the GPU variant of make semisup, gpu_suite.sh's semisup phase)
# Default groups: dali,ffcv,peers,fmnist (a stock CUDA PyTorch image has the rest); --only all adds the others.
# Wheels target CPython 3.12, manylinux x86_64 up to 2_28 (DALI's own tag).
# Downloads are cached in FASTCLR_CARRY_CACHE (default .bench_cache/gpu-carry-downloads); --offline
# packs what the cache holds without downloading (e.g. to re-pack with another FASTCLR_CARRY_MIB).
set -euo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
REPO="$(cd "$(dirname "$SELF")/../.." && pwd)"
# shellcheck source=benchmarks/gpu/_lib.sh
source "$(dirname "$SELF")/_lib.sh"
PYVER=3.12
# pip matches each --platform tag exactly: name every manylinux level up to DALI's 2_28 (nvidia-nvjpeg
# ships only manylinux2014 / 2_17 wheels).
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
    manylinux_2_12_x86_64 manylinux2010_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64)
PIECE_MIB=60
FOLDER_MIB=${FASTCLR_CARRY_MIB:-61}
CACHE=${FASTCLR_CARRY_CACHE:-$REPO/.bench_cache/gpu-carry-downloads}
ALL_GROUPS="dali,ffcv,tools,test,peers,plot,fmnist"

# Package lists, read by name through ${!var} indirection below (hence SC2034).
# shellcheck disable=SC2034
# Versions are pinned to this machine's .venv where it has the package (so the GPU
# machine runs what the CPU tests ran), unpinned otherwise.
GROUP_dali=(nvidia-dali-cuda130 nvidia-nvimgcodec-cu13 nvidia-libnvcomp-cu13 nvidia-nvjpeg nvidia-nvjpeg2k-cu13
    nvidia-nvtiff-cu13 astunparse gast six optree packaging nvtx makefun libcst pyyaml typing-extensions wheel)
# GROUP_ffcv and FFCV_VERSION come from setup.py's extras["ffcv"] (benchmarks/gpu/deps.py), in main.
# shellcheck disable=SC2034
GROUP_tools=(setuptools wheel)
# shellcheck disable=SC2034
GROUP_test=(pytest pluggy iniconfig packaging hypothesis attrs sortedcontainers tqdm)
# shellcheck disable=SC2034
GROUP_peers=(lightly pytorch-lightning lightning-utilities torchmetrics hydra-core omegaconf antlr4-python3-runtime
    pyyaml fsspec aiohttp aiohappyeyeballs aiosignal frozenlist multidict propcache yarl idna typing-extensions
    packaging tqdm)
# shellcheck disable=SC2034
GROUP_plot=(matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six)

usage() {
    sed -n '2,25p' "$SELF" | sed 's/^# \{0,1\}//'
}

die() {
    echo "gpu_carry: error: $*" >&2
    exit 2
}

run() {  # print, then run unless --dry-run
    show_cmd "$@"
    (( DRY_RUN )) || "$@"
}

pinned() {  # NAME -> NAME==VERSION when the local venv has it
    local v
    v=$("$PY" -c 'import importlib.metadata as m, sys
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass' "$1" 2>/dev/null || true)
    if [[ -n "$v" ]]; then
        echo "$1==$v"
    else
        echo "$1"
    fi
}

download() {  # download SPEC: a cp312 manylinux wheel, else (pure Python only) the sdist
    local spec=$1
    if run "$PY" -m pip download -q --no-deps --dest "$CACHE" --only-binary=:all: \
        --python-version "$PYVER" "${PLATFORMS[@]/#/--platform=}" "$spec"; then
        return 0
    fi
    echo "  (no wheel for $spec; trying the sdist)"
    run "$PY" -m pip download -q --no-deps --dest "$CACHE" --no-binary=:all: "$spec"
}

lib_soname() {  # path -> its SONAME (file name if objdump is missing)
    local so
    so=$(objdump -p "$1" 2>/dev/null | awk '$1 == "SONAME" {print $2}')
    echo "${so:-$(basename "$1")}"
}

native_kit() {  # native_kit DEST_TAR: headers + shared libraries FFCV's setup.py/linker need
    local tarball=$1 stage libdir inc
    command -v pkg-config >/dev/null || die "pkg-config missing (apt-get install pkg-config libturbojpeg0-dev libopencv-dev)"
    libdir=$(pkg-config --variable=libdir opencv4) || die "opencv4.pc missing (apt-get install libopencv-dev)"
    inc=$(pkg-config --variable=includedir opencv4)
    local tj_inc tj_lib
    tj_inc=$(pkg-config --variable=includedir libturbojpeg) || die "libturbojpeg.pc missing (apt-get install libturbojpeg0-dev)"
    tj_lib=$(pkg-config --variable=libdir libturbojpeg)
    echo "FFCV native kit from $inc, $libdir, $tj_lib"
    if (( DRY_RUN )); then
        echo "  (dry run: would copy $tj_inc/turbojpeg.h, $inc, lib{turbojpeg,opencv_core,opencv_imgproc} + deps)"
        return 0
    fi
    stage=$(mktemp -d)
    mkdir -p "$stage/ffcv-native/include" "$stage/ffcv-native/lib"
    cp "$tj_inc/turbojpeg.h" "$stage/ffcv-native/include/"
    cp -r "$inc" "$stage/ffcv-native/include/"
    local top so real dep path
    # The libraries FFCV links (-lturbojpeg -lopencv_imgproc -lopencv_core) and, from ldd, everything
    # they load that a stock Linux might lack. glibc and the C++ runtime stay the target's own.
    for top in "$tj_lib/libturbojpeg.so" "$libdir/libopencv_core.so" "$libdir/libopencv_imgproc.so"; do
        [[ -e "$top" ]] || die "$top missing (apt-get install libturbojpeg0-dev libopencv-dev)"
        real=$(readlink -f "$top")
        so=$(lib_soname "$real")
        cp -L "$real" "$stage/ffcv-native/lib/$so"
        ln -sf "$so" "$stage/ffcv-native/lib/$(basename "$top")"
        while read -r dep path; do
            case "$dep" in
                libc.so*|libm.so*|libpthread.so*|libdl.so*|librt.so*|ld-linux*|libstdc++.so*|libgcc_s.so*|linux-vdso*) continue ;;
            esac
            [[ -f "$path" ]] && cp -L "$path" "$stage/ffcv-native/lib/$dep"
        done < <(ldd "$real" | awk '$2 == "=>" {print $1, $3}')
    done
    tar -czf "$tarball" -C "$stage" ffcv-native
    rm -rf "$stage"
    echo "  $(basename "$tarball"): $(du -h "$tarball" | cut -f1), $(tar -tzf "$tarball" | grep -c '/lib/') lib entries"
}

fmnist_carry() {  # fmnist_carry OUT_DIR ASKED: the IDX files the GPU machine prepares the demo set from
    local src f asked=$2
    src=$(cd "$REPO" && "$PY" -c 'from loaders.demo_data import source_dir; print(source_dir())') \
        || die "cannot import loaders.demo_data (run from the repo's venv)"
    for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
        if [[ ! -f "$src/$f" ]]; then
            local why="$src/$f missing (apt-get install dataset-fashion-mnist, or set FASTCLR_FMNIST)"
            (( asked )) && die "$why"
            echo "gpu_carry: warning: no fmnist folder: $why"   # a default group: the wheels still go
            return 0
        fi
    done
    run rm -rf "$1/fmnist"
    run mkdir -p "$1/fmnist"
    run cp "$src"/train-images-idx3-ubyte.gz "$src"/train-labels-idx1-ubyte.gz \
        "$src"/t10k-images-idx3-ubyte.gz "$src"/t10k-labels-idx1-ubyte.gz "$1/fmnist/"
    echo "  fmnist: $1/fmnist (carry it in the call that runs the semisup phase)"
}

main() {
    DRY_RUN=0
    local only="dali,ffcv,peers,fmnist" out="" a offline=0 asked=0
    while (( $# )); do
        a=$1
        shift
        case "$a" in
            --dry-run) DRY_RUN=1 ;;
            --offline) offline=1 ;;
            --only) only=${1:?--only needs a comma list}; shift; asked=1; [[ "$only" != all ]] || only=$ALL_GROUPS ;;
            -h|--help) usage; exit 0 ;;
            -*) die "unknown option $a (see --help)" ;;
            *) [[ -z "$out" ]] || die "one OUT_DIR only"; out=$a ;;
        esac
    done
    [[ -n "$out" ]] || { usage; die "OUT_DIR missing"; }
    out=$(realpath -m -- "$out")  # absolute: the checksum step runs in a subshell that cd's elsewhere
    if [[ -n "${PYTHON:-}" ]]; then
        PY=$PYTHON
    elif [[ -x "$REPO/.venv/bin/python" ]]; then
        PY="$REPO/.venv/bin/python"
    else
        PY=python3
    fi
    local g ffcv_pin ffcv_deps
    ffcv_pin=$("$PY" "$(dirname "$SELF")/deps.py" ffcv-pin) || die "cannot read the ffcv pin from setup.py"
    ffcv_deps=$("$PY" "$(dirname "$SELF")/deps.py" ffcv-carry) || die "cannot read FFCV's dependencies from setup.py"
    FFCV_VERSION=${ffcv_pin#*==}
    # shellcheck disable=SC2034  # read through ${!var} like the other groups
    mapfile -t GROUP_ffcv <<< "$ffcv_deps"
    IFS=, read -r -a groups <<< "$only"
    for g in "${groups[@]}"; do
        [[ ",$ALL_GROUPS," == *",$g,"* ]] || die "unknown group $g (choose from $ALL_GROUPS)"
    done
    if [[ ",$only," == *",fmnist,"* ]]; then
        fmnist_carry "$out" "$asked"
        mapfile -t groups < <(printf '%s\n' "${groups[@]}" | grep -vx fmnist || true)
        only=$(IFS=,; echo "${groups[*]}")
        [[ -n "$only" ]] || return 0
    fi
    (( DRY_RUN )) || mkdir -p "$CACHE"
    echo "gpu_carry: groups $only -> $out (pieces of ${PIECE_MIB} MiB, folders <= ${FOLDER_MIB} MiB)$( (( DRY_RUN )) && echo ', DRY RUN')"

    # -- download -----------------------------------------------------------------------------------
    local -a want=()
    local pkg var
    for g in "${groups[@]}"; do
        var="GROUP_${g}[@]"
        for pkg in "${!var}"; do
            want+=("$(pinned "$pkg")")
        done
    done
    mapfile -t want < <(printf '%s\n' "${want[@]}" | sort -u)
    local failed=()
    local native_tar="$CACHE/ffcv-native.tar.gz"
    if (( offline )); then
        echo "gpu_carry: --offline: packing what $CACHE holds"
    else
        for pkg in "${want[@]}"; do
            download "$pkg" || failed+=("$pkg")
        done
        if [[ ",$only," == *",ffcv,"* ]]; then
            run "$PY" -m pip download -q --no-deps --dest "$CACHE" --no-binary=:all: "ffcv==$FFCV_VERSION" \
                || failed+=("ffcv==$FFCV_VERSION (sdist)")
        fi
    fi
    if [[ ",$only," == *",ffcv,"* ]]; then
        native_kit "$native_tar"
    fi
    if (( ${#failed[@]} )); then
        echo "gpu_carry: could not download: ${failed[*]}" >&2
    fi
    if (( DRY_RUN )); then
        echo "gpu_carry: dry run: would write SHA256SUMS, split files > ${PIECE_MIB} MiB into .part-aa..,"
        echo "           and pack $out/carry01, carry02, ... (<= ${FOLDER_MIB} MiB each)"
        return 0
    fi

    # -- select the files of the requested groups (the cache may hold more) ------------------------
    local stage="$out/.stage"
    rm -rf "$out"/carry[0-9]* "$stage"
    mkdir -p "$stage"
    local name norm f
    for pkg in "${want[@]}"; do
        name=${pkg%%==*}
        norm=${name,,}
        norm=${norm//[-.]/_}
        # Wheel names use _ for - and . ; sdists keep the project's spelling: match both, any case.
        f=$(find "$CACHE" -maxdepth 1 -type f \( -iname "${norm}-*.whl" -o -iname "${name}-*.tar.gz" \
            -o -iname "${norm}-*.tar.gz" -o -iname "${name//-/.}-*.tar.gz" \) \
            | { if [[ "$pkg" == *==* ]]; then grep -i -- "-${pkg##*==}[-.]" || true; else cat; fi; } | sort | tail -n 1)
        if [[ -n "$f" ]]; then
            ln -f "$f" "$stage/" 2>/dev/null || cp "$f" "$stage/"
        else
            echo "gpu_carry: warning: no file for $pkg in $CACHE"
        fi
    done
    if [[ ",$only," == *",ffcv,"* ]]; then
        for f in "$CACHE/ffcv-$FFCV_VERSION.tar.gz" "$native_tar"; do
            if [[ -f "$f" ]]; then
                cp "$f" "$stage/"
            else
                echo "gpu_carry: warning: $f missing"
            fi
        done
    fi

    # -- checksums of whole files, then split the big ones ----------------------------------------
    (cd "$stage" && sha256sum -- * > "$stage/../SHA256SUMS.tmp")
    mv "$out/SHA256SUMS.tmp" "$out/SHA256SUMS"
    for f in "$stage"/*; do
        if (( $(stat -c %s "$f") > PIECE_MIB * 1048576 )); then
            split -b "${PIECE_MIB}m" -a 2 "$f" "$f.part-"
            rm -f "$f"
        fi
    done

    # -- pack into carryNN folders, first fit by decreasing size ----------------------------------
    local sums_size budget
    sums_size=$(stat -c %s "$out/SHA256SUMS")
    budget=$(( FOLDER_MIB * 1048576 - sums_size ))
    local -a used=()
    local size i placed
    while read -r size f; do
        placed=0
        for i in "${!used[@]}"; do
            if (( used[i] + size <= budget )); then
                used[i]=$(( used[i] + size ))
                placed=1
                break
            fi
        done
        if (( ! placed )); then
            i=${#used[@]}
            used+=("$size")
        fi
        mkdir -p "$out/$(printf 'carry%02d' $(( i + 1 )))"
        mv "$f" "$out/$(printf 'carry%02d' $(( i + 1 )))/"
    done < <(find "$stage" -maxdepth 1 -type f -printf '%s %p\n' | sort -rn)
    rmdir "$stage"
    for i in "${!used[@]}"; do
        cp "$out/SHA256SUMS" "$out/$(printf 'carry%02d' $(( i + 1 )))/"
    done

    echo "gpu_carry: wrote ${#used[@]} folders:"
    local d
    for d in "$out"/carry[0-9]*/; do
        printf '  %s  %s  (%s files)\n' "$(du -sh "$d" | cut -f1)" "${d%/}" "$(find "$d" -type f | wc -l)"
    done
    echo "  total $(du -ch "$out"/carry[0-9]* | tail -n 1 | cut -f1)"
    echo "Carry each folder in its own device call, back to back (the machine keeps earlier folders while"
    echo "warm), then: bash benchmarks/gpu_suite.sh $out \$OUT   (see benchmarks/README.md)"
}

main "$@"
