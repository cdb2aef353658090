"""The peers for FLUX.1 on one GPU (issue 30): diffusers' FluxTransformer2DModel at FLUX.1-dev's
(or, with --schnell, FLUX.1-schnell's) config with random weights in bf16, one denoising step (one
transformer forward, with the inputs FluxPipeline makes: packed latents, T5 and CLIP embeddings,
the position ids of FluxPipeline._prepare_latent_image_ids and its all-zero text ids, the
timestep / 1000 and dev's guidance 3.5), in up to four modes:

    eager      the model as built;
    compile    torch.compile of the transformer (--compile-mode, default: torch's default mode);
    fp8        torchao's float8 dynamic quantisation, rowwise scales, of every nn.Linear
               (quantize_(model, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))),
               then torch.compile as in `compile`;
    fp8-eager  the same quantisation without torch.compile.

Each mode builds its own model (freed, with the compile caches reset, before the next), is timed
with CUDA events (median of --repeats after --warmup calls) and prints one JSON line: model, mode,
size, step times, the memory the model holds before its first call (weights_gib), the peak while it
was built and quantised (build_peak_gib) and the peak from its first call to the end of timing
(peak_gib), the first call's wall time (compile time under compile), and
the torch, diffusers and torchao versions. A mode that fails prints a JSON line with its error.
torchao's float8 config switches on inductor's coordinate-descent tuning for the whole process, so
for clean `compile` figures run each mode in its own process (scripts/device-peers.sh does).

With --regional, `compile` and `fp8` compile only the repeated blocks (diffusers'
compile_repeated_blocks: each double and single block class once, the rest eager), which takes a
fraction of the whole model's compile time; each line says which (compile_scope).

    python flux-peer.py [--size 1024] [--modes eager,compile,fp8] [--repeats 10] [--schnell]
                        [--compile-mode max-autotune-no-cudagraphs] [--fullgraph] [--regional]
    python flux-peer.py --device cpu --tiny --modes eager --repeats 2 --size 128   # a CPU check
"""

import argparse
import contextlib
import gc
import json
import platform
import statistics
import time
import traceback

import torch
from diffusers import FluxTransformer2DModel
import diffusers

# FLUX.1-dev's transformer config (diffusers' key names); schnell differs only in guidance.
DEV = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# A CPU-sized model of the same shape of code: 1 double block, 1 single block, 2 heads x 64.
TINY = dict(DEV, num_layers=1, num_single_layers=1, attention_head_dim=64, num_attention_heads=2,
            joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(8, 28, 28))


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def config(a):
    cfg = dict(TINY if a.tiny else DEV)
    if a.schnell:
        cfg["guidance_embeds"] = False
    return cfg


def build(cfg, device, dtype, seed):
    """The transformer with random weights, made on `device` in `dtype` from the start (12B
    parameters are neither built on the CPU nor held in f32 on the GPU)."""
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        m = FluxTransformer2DModel(**cfg)
    return m.to(device=device, dtype=dtype).eval()


def image_ids(side, device, dtype):
    """FluxPipeline's latent image ids: (0, row, column) per packed latent, row-major. Taken from
    the pipeline itself where it imports (it needs transformers); else the same rule here."""
    try:
        from diffusers import FluxPipeline
        return FluxPipeline._prepare_latent_image_ids(1, side, side, device, dtype), "FluxPipeline"
    except ImportError:
        ids = torch.zeros(side, side, 3)
        ids[..., 1] = torch.arange(side)[:, None]
        ids[..., 2] = torch.arange(side)[None, :]
        return ids.reshape(side * side, 3).to(device=device, dtype=dtype), "local"


def inputs(cfg, size, txt_len, schnell, device, dtype):
    """One step's inputs as FluxPipeline passes them to the transformer (batch 1), and where the
    image ids came from."""
    side = size // 16  # 8x VAE, then 2x2 packing
    img = torch.randn(1, side * side, cfg["in_channels"], device=device, dtype=dtype)
    txt = torch.randn(1, txt_len, cfg["joint_attention_dim"], device=device, dtype=dtype)
    pooled = torch.randn(1, cfg["pooled_projection_dim"], device=device, dtype=dtype)
    img_ids, ids_from = image_ids(side, device, dtype)
    txt_ids = torch.zeros(txt_len, 3, device=device, dtype=dtype)
    t = torch.full((1,), 1000.0, device=device).to(dtype)  # the pipeline's first timestep
    guidance = None if schnell else torch.full((1,), 3.5, device=device, dtype=torch.float32)
    kw = dict(hidden_states=img, timestep=t / 1000, guidance=guidance, pooled_projections=pooled,
              encoder_hidden_states=txt, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)
    return kw, ids_from


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_it(f, repeats, warmup, device):
    """(first call's wall seconds, step ms of each timed repeat)."""
    t0 = time.perf_counter()
    f()
    sync(device)
    first_s = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        f()
    sync(device)
    ms = []
    for _ in range(repeats):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            f()
            b.record()
            torch.cuda.synchronize()
            ms.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            f()
            ms.append((time.perf_counter() - t) * 1000)
    return first_s, ms


def torchao_version():
    try:
        import torchao
        return torchao.__version__
    except Exception as e:  # not installed, or its import fails: said in the line, not fatal
        return f"unavailable: {type(e).__name__}: {e}"[:200]


def quantize_fp8(m):
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_
    quantize_(m, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    return m


def run_mode(a, mode, cfg, dtype, versions):
    dev = a.device
    rec = {"peer": "diffusers", "model": "schnell" if a.schnell else "dev", "tiny": a.tiny,
           "mode": mode, "size": a.size, "txt_tokens": a.txt, "device": dev, **versions}
    if mode in ("compile", "fp8"):
        rec["compile_mode"] = a.compile_mode or "default"
        rec["fullgraph"] = a.fullgraph
        rec["compile_scope"] = "repeated blocks" if a.regional else "whole model"
    m = f = None
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        t0 = time.perf_counter()
        m = build(cfg, dev, dtype, a.seed)
        rec["params"] = sum(p.numel() for p in m.parameters())
        rec["build_s"] = time.perf_counter() - t0
        if mode.startswith("fp8"):
            t0 = time.perf_counter()
            quantize_fp8(m)
            rec["quantize_s"] = time.perf_counter() - t0
            rec["linear_weight_types"] = sorted({type(x.weight).__name__ for x in m.modules()
                                                 if isinstance(x, torch.nn.Linear)})
        kw, rec["img_ids_from"] = inputs(cfg, a.size, a.txt, a.schnell, dev, dtype)
        f = m
        if mode in ("compile", "fp8"):
            if a.regional:
                m.compile_repeated_blocks(mode=a.compile_mode, fullgraph=a.fullgraph)
            else:
                f = torch.compile(m, mode=a.compile_mode, fullgraph=a.fullgraph)
            # torchao's config turns this on for the whole process (set_inductor_config=True): a
            # `compile` run after `fp8` in one process inherits it, so each line says.
            rec["inductor_coordinate_descent"] = torch._inductor.config.coordinate_descent_tuning
        if dev == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            rec["weights_gib"] = torch.cuda.memory_allocated() / 2**30
            rec["build_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30  # fp8: the bf16 too
            torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            first_s, ms = time_it(lambda: f(**kw), a.repeats, a.warmup, dev)
        rec.update(step_ms_median=statistics.median(ms), step_ms_min=min(ms), step_ms_max=max(ms),
                   repeats=len(ms), warmup=a.warmup, first_call_s=first_s)
        if dev == "cuda":
            rec["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    except Exception as e:
        rec["error"] = f"{type(e).__name__}: {e}"[:600]
        rec["traceback_tail"] = traceback.format_exc()[-1200:]
    finally:
        del m, f
        torch._dynamo.reset()
        gc.collect()
        if dev == "cuda":
            torch.cuda.empty_cache()
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels (multiple of 16)")
    ap.add_argument("--txt", type=int, default=None, help="text tokens (default 512, schnell 256)")
    ap.add_argument("--modes", default="eager,compile,fp8",
                    help="comma list of eager, compile, fp8, fp8-eager")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3, help="calls before timing (the first compiles)")
    ap.add_argument("--schnell", action="store_true", help="FLUX.1-schnell: no guidance, 256 tokens")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode (default, reduce-overhead, max-autotune, "
                         "max-autotune-no-cudagraphs)")
    ap.add_argument("--fullgraph", action="store_true", help="torch.compile(fullgraph=True)")
    ap.add_argument("--regional", action="store_true",
                    help="compile only the repeated blocks (diffusers' compile_repeated_blocks)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="a tiny config (for a check on the CPU)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.txt is None:
        a.txt = 256 if a.schnell else 512
    if a.size % 16:
        ap.error("--size must be a multiple of 16")
    modes = [x for x in a.modes.split(",") if x]
    bad = [x for x in modes if x not in ("eager", "compile", "fp8", "fp8-eager")]
    if bad:
        ap.error(f"unknown modes {bad}")
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    cfg = config(a)
    versions = {"torch": torch.__version__, "diffusers": diffusers.__version__,
                "torchao": torchao_version() if any(x.startswith("fp8") for x in modes) else None,
                "python": platform.python_version(),
                "gpu": torch.cuda.get_device_name() if a.device == "cuda" else None}
    for mode in modes:
        print(json.dumps(run_mode(a, mode, cfg, dtype, versions)), flush=True)


if __name__ == "__main__":
    main()
