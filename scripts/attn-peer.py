"""Runs on the GPU machine: PyTorch's scaled-dot-product attention on FLUX.1's shapes (24 heads,
head dim 128, bf16, image tokens + 512 text tokens) through each backend PyTorch offers there
(cuDNN, FlashAttention-2, memory-efficient), median of 50 calls after 10 warm-up calls, timed with
CUDA events. The peer for Parallax's own attention kernel (`parallax dev profile`)."""
import json, sys
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

def time_backend(backend, n):
    q, k, v = (torch.randn(1, 24, n, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_kernel(backend):
        for _ in range(10):
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
        times = []
        for _ in range(50):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            torch.nn.functional.scaled_dot_product_attention(q, k, v)
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]

print(torch.__version__, torch.cuda.get_device_name(), file=sys.stderr)
for px in (1024, 2048, 4096):
    n = (px // 16) ** 2 + 512
    row = {"px": px, "tokens": n}
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash2", SDPBackend.FLASH_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            ms = time_backend(be, n)
            row[name + "_ms"] = round(ms, 4)
            row[name + "_tflops"] = round(4 * 24 * n * n * 128 / ms / 1e9, 1)
        except Exception as e:  # a backend PyTorch cannot use here
            row[name + "_ms"] = None
            row[name + "_error"] = str(e)[:200]
    print(json.dumps(row), flush=True)
