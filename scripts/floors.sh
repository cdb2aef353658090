#!/usr/bin/env bash
# The library's floor plan, checked. Floors from the bottom: kernels (with collective.rs, device.rs,
# error.rs and files.rs beside them), model, pipeline, parallel, engine (placement), runtime, then cli and
# app. Code on one floor may name `crate::X` only for X on its own floor or below. Comment lines
# (`//`, `///`, `//!`, and the tail of a line after ` //`) do not count; every other mention does,
# `use` lines and fully qualified paths in code alike. A floor's folder that does not exist is
# skipped. Prints each offending line and exits 1 if there is one.
#   bash scripts/floors.sh
set -euo pipefail
cd "$(dirname "$0")/.."

failed=0

# check FLOOR FORBIDDEN PATH...: no file under PATH names crate::X for X in FORBIDDEN (a|b|c).
check() {
    local floor=$1 forbidden=$2
    shift 2
    local files hits
    mapfile -t files < <(find "$@" -name '*.rs' 2>/dev/null | sort)
    ((${#files[@]})) || return 0
    # `crate::X`, or X inside a `crate::{...}` group on the same line.
    hits=$(awk -v floor="$floor" -v forbid="$forbidden" \
        -v pat="crate::([{]([^}]*[ ,{])?)?($forbidden)([^A-Za-z0-9_]|\$)" '
        {
            line = $0
            sub(/(^|[ \t])\/\/.*$/, "", line)
            if (line ~ pat) {
                printf "%s:%d: %s may not use crate::(%s): %s\n", FILENAME, FNR, floor, forbid, $0
            }
        }' "${files[@]}")
    if [[ -n $hits ]]; then
        printf '%s\n' "$hits"
        failed=1
    fi
}

check kernels 'model|pipeline|scenes|parallel|engine|runtime|cli|app' \
    src/kernels src/collective.rs src/device.rs src/error.rs src/files.rs
check model 'pipeline|scenes|parallel|engine|runtime|cli|app' src/model
check pipeline 'parallel|engine|runtime|cli|app' src/pipeline src/scenes
check parallel 'engine|runtime|cli|app' src/parallel
check engine 'runtime|cli|app' src/engine
check runtime 'cli|app' src/runtime

if ((failed)); then
    echo "floors: the lines above import from a floor above their own" >&2
    exit 1
fi
echo "floors: ok"
