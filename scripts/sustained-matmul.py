"""Sustained bf16 matmul throughput on this GPU: a short burst (what "ceiling" figures usually
quote) against 20 s of back-to-back products (what a 28-step image sees under the power cap).
On the device machine (PyTorch there, no Rust needed): python3 scripts/sustained-matmul.py SMI.csv
(SMI.csv receives nvidia-smi's clock and power samples). Figures in BENCHMARKS.md."""
import subprocess, sys, time, torch

def run(m, n, k, seconds, fill="randn"):
    a = getattr(torch, fill)(m, k, device="cuda", dtype=torch.bfloat16)
    b = getattr(torch, fill)(k, n, device="cuda", dtype=torch.bfloat16)
    flop = 2 * m * n * k
    for _ in range(10):
        a @ b
    torch.cuda.synchronize()
    # burst: 20 products right after an idle pause
    time.sleep(2)
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record()
    for _ in range(20):
        a @ b
    e.record(); e.synchronize()
    burst = flop * 20 / (s.elapsed_time(e) / 1e3) / 1e12
    # sustained: back to back for `seconds`, throughput over the last half
    t0 = time.time(); rates = []
    while time.time() - t0 < seconds:
        s.record()
        for _ in range(50):
            a @ b
        e.record(); e.synchronize()
        rates.append(flop * 50 / (s.elapsed_time(e) / 1e3) / 1e12)
    half = rates[len(rates) // 2:]
    print(f"{fill:5s} {m}x{n}x{k}: burst {burst:.0f} TFLOP/s, sustained {sum(half)/len(half):.0f} TFLOP/s "
          f"(min {min(half):.0f}, max {max(half):.0f})", flush=True)

smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw", "--format=csv,noheader", "-lms", "250"],
                       stdout=open(sys.argv[1], "w"))
print(torch.cuda.get_device_name(), torch.__version__)
run(8192, 8192, 8192, 20)
run(4608, 12288, 3072, 20)
run(4608, 3072, 15360, 20)
run(8192, 8192, 8192, 20, fill="zeros")
smi.terminate()
