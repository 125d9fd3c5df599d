# shellcheck shell=bash
# The install half of benchmarks/gpu_suite.sh, sourced by it (not run on its own): reassembling the
# carried files (benchmarks/gpu/carry.sh writes them) and installing fastclr, DALI, FFCV and the peers
# from them. It uses the suite's phase bookkeeping (phase, skip_phase, importable) and its globals
# (PY, DRY_RUN, CARRY_DIR, SELF, REPO).

DALI_PKG="nvidia_dali_cuda130"

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
    # The rest of setup.py's extras["ffcv"], less what the machine already has (benchmarks/gpu/deps.py).
    local -a deps=()
    mapfile -t deps < <("$PY" "$REPO/benchmarks/gpu/deps.py" ffcv-carry)
    (( ${#deps[@]} )) || { echo "cannot read FFCV's dependencies from $REPO/setup.py"; return 1; }
    "$PY" -m pip install --no-index --find-links "$wheels" --no-build-isolation "${deps[@]}" \
        || echo "warning: some FFCV runtime deps missing"
    LD_LIBRARY_PATH="$native/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        "$PY" -c 'import ffcv, ffcv.libffcv; print("ffcv imports:", ffcv.__file__)'
}

# ------------------------------------------------------------------------------------------------
# Install phases
# ------------------------------------------------------------------------------------------------

has() {  # has WHEELS GLOB: a reassembled file (dry run: a carried file or split file) matches GLOB
    local wheels=$1 n
    if (( ! DRY_RUN )); then
        compgen -G "$wheels/$2" >/dev/null
        return
    fi
    while IFS= read -r n; do
        n=$(basename "$n")
        n=${n%.part-[a-z][a-z]}
        # $2 is a glob on purpose: unquoted on the right of ==
        # shellcheck disable=SC2053
        [[ "$n" == $2 ]] && return 0
    done < <(carry_files "$CARRY_DIR")
    return 1
}

# install_phases WHEELS NATIVE: one phase per install, each skipped when its package already
# imports or when nothing for it was carried.
install_phases() {
    local wheels=$1 native=$2
    local pipw=("$PY" -m pip install --no-index --find-links "$wheels" --no-build-isolation)
    phase build_tools 60 0 bash "$SELF" __pip_missing "$wheels" setuptools=setuptools wheel=wheel
    phase install_fastclr 90 0 "$PY" -m pip install --no-deps --no-build-isolation -e .
    phase test_deps 60 0 bash "$SELF" __pip_missing "$wheels" pytest=pytest hypothesis=hypothesis tqdm=tqdm
    # A package that already imports (installed by an earlier call on this warm machine, or by the
    # image) is not installed again: the phase is recorded as skipped with that reason.
    if importable nvidia.dali; then
        skip_phase install_dali "nvidia.dali already importable"
    elif has "$wheels" "nvidia_dali_cuda*.whl"; then
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
    elif has "$wheels" "ffcv-native.tar.gz"; then
        phase install_ffcv 180 0 bash "$SELF" __install_ffcv "$wheels" "$native"
    else
        skip_phase install_ffcv "no ffcv sdist + ffcv-native.tar.gz in $CARRY_DIR (make gpu-carry)"
    fi
    if importable lightly; then
        skip_phase install_peers "lightly already importable"
    elif has "$wheels" "lightly-*.whl"; then
        phase install_peers 90 0 "${pipw[@]}" lightly
    else
        skip_phase install_peers "no lightly wheel in $CARRY_DIR: peer rows from lightly will be skipped"
    fi
    if has "$wheels" "matplotlib-*.whl"; then
        phase install_plot 60 0 bash "$SELF" __pip_missing "$wheels" matplotlib=matplotlib
    fi
}
