#!/usr/bin/env bash
set -uo pipefail
out=${OUT:-/tmp/out}; mkdir -p $out
source .device/gpu-env.sh; chmod +x .device/parallax; B=.device/parallax
timeout 300 $B selfcheck --device cuda > $out/selfcheck.log 2>&1; echo "selfcheck rc=$?: $(tail -1 $out/selfcheck.log)"; grep FAIL $out/selfcheck.log
summ() { python3 -c "
import json,sys
v=json.load(open(sys.argv[1])); st=' '.join(f'{k} {x:.0f}' for k,x in v.get('stages_ms',{}).items())
print(sys.argv[2], 'decode median', round(v['decode_ms']['median'],1), 'ms min', round(v['decode_ms']['min'],1), 'peak alloc GiB', round(v['peak_allocated_mib']/1024,2), '|', st)" "$@" 2>/dev/null || echo "$2: no result: $(tail -2 $3)"; }
for W in 1024 2048 4096; do for L in 25 27 29; do
  r=3; [[ $W == 4096 ]] && r=1
  PARALLAX_VAE_ATTN_BUDGET_LOG2=$L timeout 240 $B bench-vae --device cuda --width $W --runs $r --warmup 1 > $out/vae-$W-$L.json 2> $out/vae-$W-$L.err
  summ $out/vae-$W-$L.json "W=$W budget=2^$L" $out/vae-$W-$L.err
done; done
timeout 200 $B bench --device cuda --model random:dev --width 1024 --height 1024 --steps 8 --runs 3 --warmup 1 > $out/bench.json 2> $out/bench.err
python3 -c "import json; v=json.load(open('$out/bench.json')); print({k: v[k] for k in v if k in ('step_ms','tflops','floor_ratio','total_ms','gpu_memory_mib')})" || tail -3 $out/bench.err
