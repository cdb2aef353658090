"""Sample images from exported demo weights with the PyTorch networks (CPU or GPU): a quick look
at a checkpoint without the Rust build. Same sampler as Parallax: Euler steps on FLUX's shifted
schedule from seeded noise (PyTorch's generator, so not Parallax's noise).

    python sample.py WEIGHTS_DIR OUT.png [--steps 20] [--guidance 1] "prompt" ...
"""

import argparse
import math

import numpy as np
import torch

import models
from parity import read_safetensors


def schedule(steps, seq_len=256):
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq_len - 256)
    ts = []
    for i in range(steps + 1):
        t = 1 - i / steps
        ts.append(0.0 if t <= 0 else 1.0 if t >= 1 else math.exp(mu) / (math.exp(mu) + (1 / t - 1)))
    return ts


@torch.no_grad()
def sample(flux, ae, t5, clip, prompts, steps, guidance, seed=0, cfg=1.0):
    B = len(prompts)
    ids = [models.tokenize(p) for p in prompts]
    t5_ids = torch.tensor([a for a, _ in ids])
    clip_ids = torch.tensor([b for _, b in ids])
    txt, y = t5(t5_ids), clip(clip_ids)
    if cfg > 1:
        e5, ec = (torch.tensor([x]) for x in models.tokenize(""))
        txt_u, y_u = t5(e5.expand(B, -1)), clip(ec.expand(B, -1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 256, 64, generator=g)
    ts = schedule(steps)
    gv = torch.full((B,), float(guidance))
    for a, b in zip(ts[:-1], ts[1:]):
        t = torch.full((B,), a)
        v = flux(x, txt, y, t, gv, (16, 16))
        if cfg > 1:
            vu = flux(x, txt_u, y_u, t, gv, (16, 16))
            v = vu + cfg * (v - vu)
        x = x + (b - a) * v
    img = ae.decode(models.unpack(x, 32, 32))
    return ((img.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("weights")
    ap.add_argument("out")
    ap.add_argument("prompts", nargs="+")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--cfg", type=float, default=1.0)
    a = ap.parse_args()
    flux, ae, t5, clip = models.Flux(), models.AutoEncoder(), models.T5Encoder(), models.ClipText()
    for m, f in [(flux, "transformer"), (ae, "ae"), (t5, "t5"), (clip, "clip")]:
        m.load_state_dict(read_safetensors(f"{a.weights}/{f}.safetensors"))
        m.eval()
    imgs = sample(flux, ae, t5, clip, a.prompts, a.steps, a.guidance, cfg=a.cfg)
    from PIL import Image
    grid = np.concatenate(list(imgs), axis=1)
    Image.fromarray(grid).save(a.out)


if __name__ == "__main__":
    main()
