# shellcheck shell=bash
# Shared by benchmarks/gpu/carry.sh and benchmarks/gpu_suite.sh (sourced).

show_cmd() {  # print a copy-pasteable command line (plain words unquoted, the rest %q-quoted)
    local a re='^[][A-Za-z0-9_./=:,+@%-]+$'
    printf '  $'
    for a in "$@"; do
        if [[ "$a" =~ $re ]]; then
            printf ' %s' "$a"
        else
            printf ' %q' "$a"
        fi
    done
    printf '\n'
}
