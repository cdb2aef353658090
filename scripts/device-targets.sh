#!/usr/bin/env bash
# Runs on the GPU machine (the `device` tool) from the repository root, with the CUDA build in
# .device/parallax.xz (scripts/device-pack.sh). Issue 30's targets and what stands between the
# wall step and the GPU's work, in one call:
#   - `dev selfcheck` (every kernel against its CPU reference);
#   - FLUX.1-dev 1024 px, 8 steps, bf16 and FP8, each with the usual wait between steps and with
#     PARALLAX_BENCH_NO_STEP_SYNC=1 (steps queued back to back: what the wait, the finite check
#     and the host's start of a step cost, the part of launch overhead a CUDA graph of a step
#     could not remove either), ROUNDS rounds alternating;
#   - the whole-image targets: FLUX.1-dev 28 steps FP8 + text + decode, FLUX.1-schnell 4 steps
#     FP8 (and bf16);
#   - the SM clock, power and throttle reasons sampled by nvidia-smi every 100 ms, summarised per
#     run (is a step power-bound?).
# Logs, JSON lines (session.jsonl) and smi.csv in $OUT.
# `attention` instead: the FP8 attention scores (`--fp8-attention`) against bf16 attention:
# per call (dev profile, 1024 and 2048 px), FLUX.1-dev steps in FP8 and bf16 alternating, the
# whole-image targets with it, and two 4-step random:dev images (with and without) for the error.
# `gemm`: the FP8 products' cuBLASLt switches (PARALLAX_FP8_FAST_ACCUM=0, the f32-promoted
# accumulation; PARALLAX_GEMM_AUTOTUNE=1; src/kernels/lt_algo.rs) and the norm + quantisation
# unfused (PARALLAX_FUSED_FP8_QUANT=0) against the default, and against the build in
# .device/before/ (FP8 and bf16), alternating; the selfcheck and fp8-error with each
# accumulation; schnell's whole image with the autotune.
# TARGET_ENV="NAME=V ..." puts those variables in every bench of the call (a switch that paid in
# `gemm`, timed again in `targets` without a rebuild).
# `fp8targets`: only the FP8 rows of `targets`; `wholefp8`: only its two whole images; `steps`:
# only the dev step in FP8 and bf16, alternating; `ab`: a switch (AB_ENV) against the default.
# SKIP_SELFCHECK=1 leaves out the selfcheck (a second part in the same call).
#   [ROUNDS=2] [TARGET_ENV=...] [SKIP_SELFCHECK=1] bash scripts/device-targets.sh \
#       [targets|fp8targets|wholefp8|steps|ab|attention|gemm]
set -uo pipefail
part=${1:-targets}
out=${OUT:-/tmp/parallax-out}
mkdir -p "$out" /tmp/pbin
source .device/gpu-env.sh
xz -dc .device/parallax.xz > /tmp/pbin/parallax && chmod +x /tmp/pbin/parallax
b=/tmp/pbin/parallax
# .device/before/parallax.xz, when carried: the build before the latest change, timed beside
# this one by the `gemm` and `attention` parts.
before=""
if [[ -f .device/before/parallax.xz ]]; then
    xz -dc .device/before/parallax.xz > /tmp/pbin/before && chmod +x /tmp/pbin/before && before=/tmp/pbin/before
fi
read -ra tenv <<< "${TARGET_ENV:-}"
log="$out/targets.log"
echo "TARGET_ENV=${TARGET_ENV:-}" | tee -a "$log"
marks="$out/marks.tsv"
nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv | tee -a "$log"
if [[ -z ${SKIP_SELFCHECK:-} ]]; then
    timeout 150 $b dev selfcheck --device cuda > "$out/selfcheck.log" 2>&1
    echo "selfcheck rc=$?" | tee -a "$log"
    grep -Ei "ln_modulate|ln_fp8|fused|fp8 scores|FAIL|passed" "$out/selfcheck.log" | tail -40 | tee -a "$log"
fi

nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.active \
    --format=csv,noheader,nounits -lms 100 > "$out/smi.csv" 2>/dev/null &
smi=$!
# run NAME TIMEOUT ARGS...: one bench, its JSON tagged NAME in session.jsonl, its start and end
# (epoch seconds) in marks.tsv for the clock summary.
run() {
    local name=$1 limit=$2
    shift 2
    local t0; t0=$(date +%s.%N)
    timeout "$limit" env "${tenv[@]}" "$@" > /tmp/r.json 2>> "$log"
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$t0" "$(date +%s.%N)" >> "$marks"
    python3 - "$name" "$rc" "$out/session.jsonl" "${TARGET_ENV:-}" <<'PY' | tee -a "$log"
import json, sys
name, rc, path = sys.argv[1:4]
txt = open("/tmp/r.json").read().strip()
try:
    v = json.loads(txt)
except Exception:
    v = {"error": txt[-300:]}
v["name"] = name
v["rc"] = int(rc)
v["target_env"] = sys.argv[4]
open(path, "a").write(json.dumps(v) + "\n")
s = v.get("step_ms", {})
print(name, "rc", rc, "step", s.get("median"), "loop", s.get("loop_median"), "queued", s.get("queued_median"),
      "total", v.get("total_ms", {}).get("median"), "text", v.get("text_encode_ms_median"),
      "decode", v.get("vae_decode_ms_median"), "steps", v.get("steps_run"))
PY
}
dev() { # name, precision, extra env... [-- extra bench arguments...]
    local name=$1 prec=$2
    shift 2
    local envs=() args=()
    while [[ $# -gt 0 && $1 != -- ]]; do envs+=("$1"); shift; done
    [[ ${1:-} == -- ]] && shift && args=("$@")
    run "$name" 120 env "${envs[@]}" $b bench --device cuda --model random:dev --width 1024 --height 1024 \
        --steps 8 --runs 3 --warmup 1 --precision "$prec" "${args[@]}"
}
# dev28 NAME [bench arguments...]: FLUX.1-dev 28 steps FP8, text + steps + decode (a target).
dev28() {
    local name=$1
    shift
    run "$name" 150 $b bench --device cuda --model random:dev --width 1024 --height 1024 --steps 28 \
        --runs 3 --warmup 1 --precision fp8 "$@"
}
# schnell4 NAME PRECISION [bench arguments...]: FLUX.1-schnell 4 steps, the whole image (a
# variable set before the call, as for any command, reaches the bench).
schnell4() {
    local name=$1 prec=$2
    shift 2
    run "$name" 120 $b bench --device cuda --model random:schnell --width 1024 --height 1024 \
        --steps 4 --runs 5 --warmup 1 --precision "$prec" "$@"
}
if [[ $part == targets ]]; then
    for round in $(seq 1 ${ROUNDS:-2}); do
        for prec in native fp8; do
            dev "dev-$prec-sync-r$round" $prec
            dev "dev-$prec-nosync-r$round" $prec PARALLAX_BENCH_NO_STEP_SYNC=1
        done
    done
    dev28 dev-fp8-28
    for prec in fp8 native; do
        schnell4 "schnell-$prec-4" $prec
    done
elif [[ $part == wholefp8 ]]; then
    # Only the two FP8 whole-image targets (the 28-step run's loop gives the step too), for a
    # lease with little device time left.
    dev28 dev-fp8-28
    schnell4 schnell-fp8-4 fp8
elif [[ $part == fp8targets ]]; then
    # Only the FP8 rows of `targets` (a step, 28 steps whole, schnell whole), for a switch in
    # TARGET_ENV that touches FP8 products only.
    dev "dev-fp8-sync-env" fp8
    dev28 dev-fp8-28-env
    schnell4 schnell-fp8-4-env fp8
elif [[ $part == steps ]]; then
    # Only the two dev steps, FP8 and bf16 alternating ROUNDS times: Parallax's side of a peer
    # comparison (scripts/device-peers.sh) in the same lease.
    for round in $(seq 1 ${ROUNDS:-2}); do
        dev "dev-fp8-r$round" fp8
        dev "dev-native-r$round" native
    done
elif [[ $part == ab ]]; then
    # A switch against the default, FP8: AB_ENV="NAME=V ..." in one bench of each pair, the dev
    # step alternating ROUNDS times (the switch first in odd rounds, last in even ones), then the
    # two FP8 whole-image targets each way.
    read -ra abenv <<< "${AB_ENV:?AB_ENV=\"NAME=V ...\" names the switch}"
    for round in $(seq 1 ${ROUNDS:-2}); do
        if (( round % 2 )); then
            dev "dev-fp8-ab-r$round" fp8 "${abenv[@]}"
            dev "dev-fp8-r$round" fp8
        else
            dev "dev-fp8-r$round" fp8
            dev "dev-fp8-ab-r$round" fp8 "${abenv[@]}"
        fi
    done
    dev28 dev-fp8-28
    (
        tenv+=("${abenv[@]}") # every bench of this subshell, as TARGET_ENV's are
        dev28 dev-fp8-28-ab
        schnell4 schnell-fp8-4-ab fp8
    )
    schnell4 schnell-fp8-4 fp8
elif [[ $part == gemm ]]; then
    # FP8 products (kernels/lt_algo.rs): the default fast accumulation against the f32-promoted
    # one, and the per-shape autotune against the heuristic's first choice, alternating; the
    # selfcheck (default: fast) and fp8-error with each accumulation (how much error fast adds).
    timeout 150 $b dev selfcheck --device cuda > "$out/selfcheck-fast.log" 2>&1
    echo "selfcheck with fast accumulation rc=$?" | tee -a "$log"
    grep -Ei "fp8|FAIL|passed" "$out/selfcheck-fast.log" | tail -30 | tee -a "$log"
    for round in $(seq 1 ${ROUNDS:-2}); do
        dev "dev-fp8-r$round" fp8
        dev "dev-fp8-promoted-r$round" fp8 PARALLAX_FP8_FAST_ACCUM=0
        dev "dev-fp8-tuned-r$round" fp8 PARALLAX_GEMM_AUTOTUNE=1 RUST_LOG=parallax=info
        dev "dev-fp8-promoted-tuned-r$round" fp8 PARALLAX_FP8_FAST_ACCUM=0 PARALLAX_GEMM_AUTOTUNE=1
        dev "dev-fp8-unfusedq-r$round" fp8 PARALLAX_FUSED_FP8_QUANT=0
        # The single blocks' linear1 halves each quantising the norm's rows again (as before).
        dev "dev-fp8-noshared-r$round" fp8 PARALLAX_NO_FUSED_FP8_QUANT=1
        if [[ -n $before ]]; then
            run "dev-fp8-before-r$round" 120 $before bench --device cuda --model random:dev --width 1024 \
                --height 1024 --steps 8 --runs 3 --warmup 1 --precision fp8
            run "dev-native-before-r$round" 120 $before bench --device cuda --model random:dev --width 1024 \
                --height 1024 --steps 8 --runs 3 --warmup 1 --precision native
        fi
        dev "dev-native-r$round" native
    done
    for fast in 0 1; do
        PARALLAX_FP8_FAST_ACCUM=$fast timeout 120 $b dev fp8-error --device cuda --model random:dev \
            --width 1024 --height 1024 --steps 4 --seed 3 > "$out/fp8-error-fast$fast.json" 2>> "$log"
        echo "fp8-error fast accumulation=$fast rc=$?" | tee -a "$log"
        tail -c 1500 "$out/fp8-error-fast$fast.json" | tee -a "$log"
    done
    # The autoencoder's banded convolutions written in place, against copying each band, and the
    # build before (decode median and image mean, which must agree).
    vae() { # tag, binary, env...
        local tag=$1 bin=$2
        shift 2
        timeout 120 env "$@" $bin bench-vae --device cuda --width 1024 --runs 3 --warmup 1 \
            > "$out/vae-$tag.json" 2>> "$log"
        python3 -c "import json,sys; v=json.load(open(sys.argv[1])); print(sys.argv[2], 'decode', \
v['decode_ms']['median'], 'all', v['decode_ms']['all'], 'mean', v.get('image_mean_abs'))" \
            "$out/vae-$tag.json" "vae-1024-$tag" 2>&1 | tail -1 | tee -a "$log"
    }
    for r in 1 2; do
        vae "in-place-r$r" $b
        vae "copied-r$r" $b PARALLAX_NO_CONV_BANDS_IN_PLACE=1
        [[ -n $before ]] && vae "before-r$r" $before
    done
    schnell4 schnell-fp8-4 fp8
    PARALLAX_GEMM_AUTOTUNE=1 schnell4 schnell-fp8-4-tuned fp8
else
    # FP8 attention scores (--fp8-attention) against bf16 attention, alternating.
    for w in ${PROFILE_WIDTHS:-1024 2048}; do
        timeout 120 $b dev profile --device cuda --width $w 2>&1 | grep -E "attention" | tee -a "$log"
    done
    # Most telling first (a lease can end early): FP8 with and without FP8 attention and the build
    # before, the whole-image targets, the two images; then bf16 with and without.
    for round in $(seq 1 ${ROUNDS:-2}); do
        dev "dev-fp8-r$round" fp8
        dev "dev-fp8-fp8attn-r$round" fp8 -- --fp8-attention
        if [[ -n $before ]]; then
            run "dev-fp8-before-r$round" 120 $before bench --device cuda --model random:dev --width 1024 \
                --height 1024 --steps 8 --runs 3 --warmup 1 --precision fp8
        fi
    done
    for a in "" --fp8-attention; do
        schnell4 "schnell-fp8-4${a}" fp8 $a
    done
    timeout 60 $b generate --device cuda --model random:dev --fp8-attention --width 1024 \
        --height 1024 --steps 4 --precision fp8 --seed 3 --out "$out/dev-fp8attn.png" >> "$log" 2>&1
    timeout 60 $b generate --device cuda --model random:dev --width 1024 --height 1024 --steps 4 \
        --precision fp8 --seed 3 --out "$out/dev-fp8.png" >> "$log" 2>&1
    echo "generate rc=$?" | tee -a "$log"
    dev28 dev-fp8-fp8attn-28 --fp8-attention
    dev dev-native native
    dev dev-native-fp8attn native -- --fp8-attention
fi
kill $smi 2>/dev/null
python3 - "$out/smi.csv" "$marks" <<'PY' | tee -a "$log"
import sys, datetime, statistics as st
smi, marks = sys.argv[1:3]
rows = []
for line in open(smi):
    p = [x.strip() for x in line.split(",")]
    try:
        t = datetime.datetime.strptime(p[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        rows.append((t, float(p[1]), float(p[2]), p[3]))
    except Exception:
        continue
print("clocks while each run's GPU was busy (samples drawing over 300 W): SM MHz median, power W median, throttle reasons")
for line in open(marks):
    name, a, b = line.split("\t")
    sel = [r for r in rows if float(a) <= r[0] <= float(b) and r[2] > 300]
    if sel:
        reasons = sorted({r[3] for r in sel})
        print(f"{name:28s} n={len(sel):4d} sm={st.median(r[1] for r in sel):6.0f} MHz  power={st.median(r[2] for r in sel):5.0f} W  {reasons}")
PY
