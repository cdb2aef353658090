#!/usr/bin/env bash
# Runs on the GPU machine (the `device` tool), from the repository root, with the CUDA build in
# .device/: a cold start of FLUX.1-dev from disk (issue 30, part 4). For each checkpoint dtype
# asked (default: bf16 fp8), one at a time: check the disk has room, write a random dev-sized
# transformer in Black Forest Labs' single-file layout (`parallax dev write-checkpoint`), measure
# the disk's read speed on it with direct I/O (dd iflag=direct, past the page cache), then time
# `parallax bench` (one 1024 px, 28-step image; random text encoders and autoencoder made on the
# device) from launch to exit REPEATS times, each with the file dropped from the page cache first,
# and `parallax generate` once; then delete the file. bf16 runs in bf16, the FP8 file with
# --precision fp8. Each run is timed in both variants of the load, alternating: `overlap` (the
# prompt encoded while the transformer loads, the default) and `plain`
# (PARALLAX_NO_LOAD_OVERLAP=1: one part after the other); `generate` runs once in each and the
# two PNGs are compared byte for byte. Output: $OUT/cold.jsonl (one line per run, with bench's
# load phases, first image timings and load_overlap), $OUT/cold-summary.json (medians per dtype
# and variant), $OUT/cold.log.
#   bash scripts/device-cold.sh [bf16] [fp8]      REPEATS=3 STEPS=28 COLD_DIR=/tmp/cold
set -uo pipefail
out=${OUT:-/tmp/parallax-out}
mkdir -p "$out"
source .device/gpu-env.sh
bin=/tmp/pbin/parallax
mkdir -p /tmp/pbin
xz -dc .device/parallax.xz > "$bin" && chmod +x "$bin"
log="$out/cold.log"
repeats=${REPEATS:-3}
steps=${STEPS:-28}
dir=${COLD_DIR:-/tmp/cold}
mkdir -p "$dir"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$log"
df -h "$dir" | tee -a "$log"
dtypes=("$@")
[ ${#dtypes[@]} -eq 0 ] && dtypes=(bf16 fp8)

# Drop one file from the page cache (whole-file advice; root may drop every cache instead).
uncache() {
    sync
    dd if="$1" iflag=nocache count=0 status=none 2>> "$log"
    if [ -w /proc/sys/vm/drop_caches ]; then echo 1 > /proc/sys/vm/drop_caches; fi
}

for dt in "${dtypes[@]}"; do
    file="$dir/flux1-dev-random-$dt.safetensors"
    need=$([ "$dt" = bf16 ] && echo 26 || echo 14)
    avail=$(df -BG --output=avail "$dir" | tail -1 | tr -dc 0-9)
    if [ "${avail:-0}" -lt "$need" ]; then
        echo "{\"dtype\": \"$dt\", \"error\": \"only ${avail} GB free in $dir, need $need\"}" | tee -a "$out/cold.jsonl"
        continue
    fi
    "$bin" dev write-checkpoint --model random:dev --dtype "$dt" --out "$file" \
        > /tmp/w.json 2>> "$log"
    echo "{\"dtype\": \"$dt\", \"write\": $(cat /tmp/w.json)}" | tee -a "$out/cold.jsonl"
    uncache "$file"
    # The disk's sequential read speed on this file, page cache bypassed (8 GB at most).
    dd if="$file" of=/dev/null bs=64M count=128 iflag=direct 2> /tmp/dd.txt
    echo "{\"dtype\": \"$dt\", \"dd_direct\": \"$(tail -1 /tmp/dd.txt)\"}" | tee -a "$out/cold.jsonl"
    prec=$([ "$dt" = fp8 ] && echo fp8 || echo native)
    for r in $(seq 1 "$repeats"); do
      for variant in overlap plain; do
        no_overlap=$([ "$variant" = plain ] && echo 1 || echo 0)
        uncache "$file"
        t0=$(date +%s.%N)
        PARALLAX_NO_LOAD_OVERLAP=$no_overlap timeout 300 "$bin" bench --device cuda \
            --model "$file" --text-encoders random \
            --precision "$prec" --width 1024 --height 1024 --steps "$steps" --runs 1 \
            --warmup 0 --seed 1 > /tmp/b.json 2>> "$log"
        rc=$?
        t1=$(date +%s.%N)
        python3 - "$dt" "$r" "$rc" "$t0" "$t1" "$variant" <<'PY' | tee -a "$out/cold.jsonl"
import json, sys
dt, r, rc, t0, t1, variant = sys.argv[1:7]
row = {"dtype": dt, "variant": variant, "run": int(r), "rc": int(rc),
       "launch_to_exit_s": float(t1) - float(t0)}
try:
    v = json.load(open("/tmp/b.json"))
    row.update({"cold_start": v["cold_start"], "step_median_ms": v["step_ms"]["median"],
                "total_ms": v["total_ms"]["median"], "transformer_weights_mib": v["transformer_weights_mib"],
                "pool_peak_allocated_mib": (v.get("gpu_pool_peak_mib") or {}).get("allocated"),
                "dtype_run": v["dtype"]})
except Exception as e:
    row["error"] = str(e)
print(json.dumps(row))
PY
      done
    done
    for variant in overlap plain; do
        no_overlap=$([ "$variant" = plain ] && echo 1 || echo 0)
        uncache "$file"
        t0=$(date +%s.%N)
        PARALLAX_NO_LOAD_OVERLAP=$no_overlap timeout 300 "$bin" generate --device cuda \
            --model "$file" --text-encoders random \
            --precision "$prec" --width 1024 --height 1024 --steps "$steps" --seed 1 \
            --out "$out/cold-$dt-$variant.png" --quiet >> "$log" 2>&1
        rc=$?
        t1=$(date +%s.%N)
        echo "{\"dtype\": \"$dt\", \"variant\": \"$variant\", \"generate_rc\": $rc, \"generate_launch_to_exit_s\": $(awk "BEGIN{print $t1 - $t0}")}" | tee -a "$out/cold.jsonl"
    done
    same=$(cmp -s "$out/cold-$dt-overlap.png" "$out/cold-$dt-plain.png" && echo true || echo false)
    echo "{\"dtype\": \"$dt\", \"same_png_with_and_without_overlap\": $same}" | tee -a "$out/cold.jsonl"
    rm -f "$file"
done

python3 - "$out/cold.jsonl" <<'PY' | tee "$out/cold-summary.json"
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
summary = {}
for dt in sorted({r["dtype"] for r in rows}):
    s = {}
    for r in rows:
        if r["dtype"] != dt: continue
        for k in ("dd_direct", "write", "same_png_with_and_without_overlap"):
            if k in r: s[k] = r[k]
        if "generate_launch_to_exit_s" in r:
            s.setdefault("generate_launch_to_exit_s", {})[r.get("variant", "overlap")] = r["generate_launch_to_exit_s"]
    for variant in ("overlap", "plain"):
        runs = [r for r in rows if r["dtype"] == dt and "cold_start" in r
                and r.get("variant", "overlap") == variant]
        if not runs: continue
        med = lambda f: statistics.median(f(r) for r in runs)
        fi = lambda r: r["cold_start"]["first_image"]
        v = {"runs": len(runs)}
        v["launch_to_exit_s_median"] = med(lambda r: r["launch_to_exit_s"])
        v["load_ms_median"] = med(lambda r: r["cold_start"]["load_ms"])
        # From the load's start to the prompt ready for the first step (the overlap's gain).
        v["text_ready_from_load_start_ms_median"] = med(lambda r: fi(r)["text_ready_from_load_start_ms"] or 0.0)
        v["first_image_from_load_start_ms_median"] = med(lambda r: fi(r)["from_load_start_ms"])
        v["first_step_ms_median"] = med(lambda r: fi(r)["first_step_ms"])
        v["text_encode_ms_median"] = med(lambda r: fi(r)["text_encode_ms"])
        v["read_gb_per_s_median"] = med(lambda r: r["cold_start"]["read_gb_per_s"])
        ov = [r["cold_start"].get("load_overlap") for r in runs]
        if all(ov):
            v["overlap_encode_ms_median"] = statistics.median(o["text_encode_ms"] for o in ov)
            v["overlap_hidden_ms_median"] = statistics.median(o["hidden_ms"] for o in ov)
        v["load_phases_ms_median"] = {k: med(lambda r: r["cold_start"]["load_phases_ms"][k])
                                      for k in runs[0]["cold_start"]["load_phases_ms"]}
        s[variant] = v
    summary[dt] = s
print(json.dumps(summary, indent=1))
PY
