#!/usr/bin/env python3
"""One line from `parallax bench`'s JSON (stdin, after any log lines): step median/min/max,
TFLOP/s, floor ratio, whole-image time, decode time, GPU memory. Label from argv[1]."""
import json
import sys

text = sys.stdin.read()
try:
    j = json.loads(text[text.index("{"):])
except ValueError as e:
    print(f"{sys.argv[1] if len(sys.argv) > 1 else ''}: no JSON ({e}): {text[-300:]}")
    sys.exit(1)
s = j["step_ms"]
print(
    f"{sys.argv[1] if len(sys.argv) > 1 else ''}: step median {s['median']:.1f} ms "
    f"(min {s['min']:.1f}, max {s['max']:.1f}; host queues it in {s.get('queued_median') or 0:.1f}), {j.get('achieved_tflops') or 0:.0f} TFLOP/s, "
    f"floor x{j.get('floor', {}).get('ratio', 0):.3f}, total {j['total_ms']['median']:.0f} ms, "
    f"decode {j.get('vae_decode_ms_median') or 0:.1f} ms, GPU mem {j.get('gpu_memory_used_max_mib') or 0:.0f} MiB"
)
