#!/usr/bin/env bash
# The library's floor plan, checked. Floors from the bottom: kernels (with collective.rs, device.rs,
# error.rs and files.rs beside them), model, pipeline, scenes (the demo's dataset and scores, which
# draw RgbImages), parallel, engine (placement), runtime, then cli and app. Code on one floor may
# name `crate::X` only for X on its own floor or below. Comment lines (`//`, `///`, `//!`, and the
# tail of a line after ` //`) do not count; every other mention does, `use` lines and fully
# qualified paths in code alike. A floor's folder that does not exist is skipped.
# Every module of src/ must be on a floor (a new one is refused until it is placed here), and the
# rooms of a floor (its files and folders: model's flux1, shard, attention, ...) must not import
# each other in a circle (`crate::<floor>::room`, or `super::room` in a room's top file).
# Prints each offending line and exits 1 if there is one.
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

# Every module of the crate, by floor (lib.rs and main.rs are the house itself).
floors_known='kernels collective device error files model pipeline scenes parallel engine runtime cli app'
for m in src/*; do
    name=$(basename "$m" .rs)
    case $name in lib | main) continue ;; esac
    if [[ " $floors_known " != *" $name "* ]]; then
        echo "$m: a module on no floor: place it in scripts/floors.sh"
        failed=1
    fi
done

check kernels 'model|pipeline|scenes|parallel|engine|runtime|cli|app' \
    src/kernels src/collective.rs src/device.rs src/error.rs src/files.rs
check model 'pipeline|scenes|parallel|engine|runtime|cli|app' src/model
check pipeline 'scenes|parallel|engine|runtime|cli|app' src/pipeline
check scenes 'parallel|engine|runtime|cli|app' src/scenes
check parallel 'engine|runtime|cli|app' src/parallel
check engine 'runtime|cli|app' src/engine
check runtime 'cli|app' src/runtime

# rooms FLOOR: no circle among the rooms of src/FLOOR. A room is a file or folder of the floor; room
# A uses room B where a line of A's files names `crate::FLOOR::B`, or `super::B` in A's top file
# (FLOOR/A.rs or FLOOR/A/mod.rs). `pub use X as Y;` in FLOOR/mod.rs makes Y another name of X.
rooms() {
    local floor=$1 files cycle
    [[ -d src/$floor ]] || return 0
    mapfile -t files < <(find "src/$floor" -name '*.rs' ! -path "src/$floor/mod.rs" | sort)
    ((${#files[@]})) || return 0
    cycle=$(awk -v floor="$floor" '
        FNR == 1 {
            rest = substr(FILENAME, length("src/" floor "/") + 1)
            room = rest
            sub(/[\/.].*$/, "", room)
            top = (rest == room ".rs" || rest == room "/mod.rs")
        }
        {
            line = $0
            sub(/(^|[ \t])\/\/.*$/, "", line)
            code = line
            pre = "crate::" floor "::"
            while (match(line, "crate::" floor "::[A-Za-z0-9_]+")) {
                edge[room, substr(line, RSTART + length(pre), RLENGTH - length(pre))] = 1
                line = substr(line, RSTART + RLENGTH)
            }
            while (top && match(code, /super::[A-Za-z0-9_]+/)) {
                edge[room, substr(code, RSTART + 7, RLENGTH - 7)] = 1
                code = substr(code, RSTART + RLENGTH)
            }
        }
        END {
            modrs = "src/" floor "/mod.rs"
            while ((getline l < modrs) > 0) {
                if (l ~ /^pub use [A-Za-z0-9_]+ as [A-Za-z0-9_]+;/) {
                    split(l, w, /[ ;]+/)
                    alias[w[5]] = w[3]
                }
            }
            for (k in edge) {
                split(k, ab, SUBSEP)
                a = ab[1]
                b = (ab[2] in alias) ? alias[ab[2]] : ab[2]
                if (a != b) {
                    out[a] = out[a] " " b
                    node[a] = 1
                    node[b] = 1
                }
            }
            for (n in node) if (state[n] == 0 && dfs(n, 1)) exit
        }
        # Depth first: state 1 on the path (stack[1..depth]), 2 done; an edge back to a room on
        # the path closes a circle, printed from that room.
        function dfs(n, depth,    m, i, j, k, nexts, text) {
            state[n] = 1
            stack[depth] = n
            k = split(out[n], nexts, " ")
            for (i = 1; i <= k; i++) {
                m = nexts[i]
                if (state[m] == 1) {
                    for (j = 1; stack[j] != m; j++) {}
                    text = m
                    for (j++; j <= depth; j++) text = text " -> " stack[j]
                    print text " -> " m
                    return 1
                }
                if (state[m] == 0 && dfs(m, depth + 1)) return 1
            }
            state[n] = 2
            return 0
        }' "${files[@]}")
    if [[ -z $cycle ]]; then
        return 0
    elif [[ " $known_circles " == *" $floor "* ]]; then
        echo "src/$floor: rooms still in a circle (known, to undo): $cycle"
    else
        echo "src/$floor: rooms import each other in a circle: $cycle"
        failed=1
    fi
}

# Floors whose rooms are still in a circle (printed, not yet refused): none left.
known_circles=''
for floor in kernels model pipeline scenes parallel engine runtime cli app; do
    rooms "$floor"
done

if ((failed)); then
    echo "floors: the lines above import from a floor above their own" >&2
    exit 1
fi
echo "floors: ok"
