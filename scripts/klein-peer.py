"""The peer for FLUX.2 klein on one GPU: diffusers' Flux2Transformer2DModel at klein 4B's and 9B's
sizes with random weights in bf16, one denoising step (the transformer's forward) at a given
resolution, eager and under torch.compile, timed with CUDA events (median of repeats after
warm-up), and its peak memory. Prints one JSON line per (model, mode).

    python klein-peer.py [--size 1024] [--txt 512] [--repeats 10] [--models 4b,9b] [--compile]
"""

import argparse
import json
import statistics

import torch
from diffusers import Flux2Transformer2DModel

CONFIGS = {
    "4b": dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680),
    "9b": dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288),
}


def build(name):
    cfg = dict(
        patch_size=1,
        in_channels=128,
        attention_head_dim=128,
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(32, 32, 32, 32),
        rope_theta=2000,
        guidance_embeds=False,
        **CONFIGS[name],
    )
    with torch.device("cuda"):
        m = Flux2Transformer2DModel(**cfg).to(torch.bfloat16).eval()
    return m


def inputs(size, txt_len, txt_dim):
    n = (size // 16) ** 2
    side = size // 16
    img = torch.randn(1, n, 128, device="cuda", dtype=torch.bfloat16)
    txt = torch.randn(1, txt_len, txt_dim, device="cuda", dtype=torch.bfloat16)
    t = torch.full((1,), 0.5, device="cuda", dtype=torch.bfloat16)
    # The pipeline's own position ids (4 axes), as Flux2KleinPipeline makes them.
    from diffusers import Flux2KleinPipeline
    ti = Flux2KleinPipeline._prepare_text_ids(txt).to("cuda")
    ii = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, 128, side, side)).to("cuda")
    return dict(hidden_states=img, encoder_hidden_states=txt, timestep=t, img_ids=ii, txt_ids=ti,
                guidance=None, return_dict=False)


def time_it(f, repeats):
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    ms = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        f()
        b.record()
        torch.cuda.synchronize()
        ms.append(a.elapsed_time(b))
    return ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--txt", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--models", default="4b,9b")
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    for name in a.models.split(","):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        m = build(name)
        kw = inputs(a.size, a.txt, CONFIGS[name]["joint_attention_dim"])
        modes = [("eager", m)]
        if a.compile:
            modes.append(("compile", torch.compile(m)))
        for mode, f in modes:
            with torch.inference_mode():
                ms = time_it(lambda: f(**kw), a.repeats)
            print(json.dumps({
                "peer": "diffusers", "model": f"klein-{name}", "mode": mode, "size": a.size,
                "txt_tokens": a.txt, "step_ms_median": statistics.median(ms),
                "step_ms_min": min(ms), "step_ms_max": max(ms), "repeats": len(ms),
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                "params": sum(p.numel() for p in m.parameters()),
            }), flush=True)
        del m, modes
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
