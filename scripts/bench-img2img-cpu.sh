#!/usr/bin/env bash
# Image-to-image on the demo model on the CPU at strengths 1.0, 0.6 and 0.3 (issue 29): the
# generation time `parallax generate` reports (prompt, steps, encode and decode; the model load
# is not in it), RUNS times each after one warm-up, median with min and max.
#
#   bash scripts/bench-img2img-cpu.sh [PARALLAX_BINARY] [RUNS]
set -euo pipefail
bin=${1:-./target/release/parallax}
runs=${2:-7}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
prompt="a red square to the left of a blue circle, night sky"
"$bin" generate --model demo --prompt "$prompt" --seed 5 --out "$out/source.png" --quiet
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for s in 1.0 0.6 0.3; do
    times=()
    for i in $(seq 0 "$runs"); do
        line=$("$bin" generate --model demo --image "$out/source.png" --strength "$s" \
            --prompt "a red square to the left of a yellow heart, night sky" --seed 7 \
            --out "$out/s$s.png" 2>&1 | grep -E ' in [0-9.]+s')
        # The first run warms up.
        [ "$i" -gt 0 ] && times+=("$(sed -E 's/.* in ([0-9.]+)s.*/\1/' <<<"$line")")
    done
    steps=$(sed -E 's/.*: ([0-9]+) steps computed.*/\1/' <<<"$line")
    printf '%s\n' "${times[@]}" | sort -g | awk -v s="$s" -v st="$steps" '
        { v[NR] = $1 }
        END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2;
              printf "strength %s: %s steps run, median %.2f s (min %.2f, max %.2f, %d runs)\n",
                     s, st, m, v[1], v[NR], NR }'
done
