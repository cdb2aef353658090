#!/usr/bin/env bash
# Cold start on the CPU with and without the prompt encoded while the transformer loads (issue 30,
# item 4; the GPU's figures come from scripts/device-cold.sh). Two models small enough for a CPU
# to load in well under a second: a tiny FLUX.1 transformer written by `parallax dev
# write-checkpoint --model random:tiny` with `--text-encoders random` (the demo-sized encoders
# drawn from fixed seeds), and the trained demo exported to a diffusers folder (`parallax dev
# export-demo`: every part read from its files). For each, ROUNDS rounds of `parallax bench`
# (one image, STEPS steps at SIZE px), alternating `overlap` (the default) and `plain`
# (PARALLAX_NO_LOAD_OVERLAP=1); the files stay in the page cache (a warm start from disk).
# Prints one JSON line per run and the medians per model and variant.
#   bash scripts/cpu-cold-overlap.sh      BIN=target/debug/parallax ROUNDS=9 STEPS=2 SIZE=256
set -euo pipefail
bin=${BIN:-target/debug/parallax}
rounds=${ROUNDS:-9}
steps=${STEPS:-2}
size=${SIZE:-256}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$bin" dev write-checkpoint --model random:tiny --dtype bf16 --out "$dir/tiny.safetensors" > /dev/null
"$bin" dev export-demo "$dir/demo" > /dev/null
rows="$dir/rows.jsonl"
for r in $(seq 1 "$rounds"); do
    for model in tiny demo; do
        case $model in
            tiny) args=(--model "$dir/tiny.safetensors" --text-encoders random) ;;
            demo) args=(--model "$dir/demo") ;;
        esac
        for variant in overlap plain; do
            no=$([ "$variant" = plain ] && echo 1 || echo 0)
            t0=$(date +%s.%N)
            PARALLAX_NO_LOAD_OVERLAP=$no "$bin" bench "${args[@]}" --runs 1 --warmup 0 --seed 1 \
                --steps "$steps" --width "$size" --height "$size" \
                --prompt "a red circle above a blue square" > "$dir/b.json"
            t1=$(date +%s.%N)
            python3 - "$model" "$variant" "$r" "$t0" "$t1" "$dir/b.json" <<'PY' | tee -a "$rows"
import json, sys
model, variant, r, t0, t1, path = sys.argv[1:7]
c = json.load(open(path))["cold_start"]
print(json.dumps({"model": model, "variant": variant, "run": int(r),
                  "launch_to_exit_ms": (float(t1) - float(t0)) * 1e3,
                  "load_ms": c["load_ms"],
                  "text_ready_from_load_start_ms": c["first_image"]["text_ready_from_load_start_ms"],
                  "job_text_encode_ms": c["first_image"]["text_encode_ms"],
                  "load_overlap": c["load_overlap"]}))
PY
        done
    done
done
python3 - "$rows" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
out = {}
for model in ("tiny", "demo"):
    for variant in ("overlap", "plain"):
        rs = [r for r in rows if r["model"] == model and r["variant"] == variant]
        med = lambda k: round(statistics.median(r[k] for r in rs), 1)
        v = {k: med(k) for k in ("load_ms", "text_ready_from_load_start_ms",
                                  "job_text_encode_ms", "launch_to_exit_ms")}
        v["runs"] = len(rs)
        if variant == "overlap":
            v["encoded_during_load_ms"] = round(statistics.median(r["load_overlap"]["text_encode_ms"] for r in rs), 1)
            v["hidden_ms"] = round(statistics.median(r["load_overlap"]["hidden_ms"] for r in rs), 1)
        out[f"{model} {variant}"] = v
print(json.dumps(out, indent=1))
PY
