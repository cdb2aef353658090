"""Write the parity fixture: the exported demo weights run through the PyTorch networks (f32, on
the CPU) on fixed inputs, so that a Rust test (tests/demo_model.rs) can check that Parallax's
transformer, autoencoder, T5, CLIP and tokenizer compute the same thing as the networks that were
trained.

    python parity.py WEIGHTS_DIR OUT.safetensors
"""

import json
import struct
import sys

import numpy as np
import torch

import models
from train import save_safetensors

CAPTION = "Two small Yellow stars above a green square, night sky"


def read_safetensors(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    out = {}
    kinds = {"F16": np.float16, "F32": np.float32, "I64": np.int64}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        arr = np.frombuffer(raw[8 + n + a:8 + n + b], dtype=kinds[v["dtype"]]).reshape(v["shape"])
        out[k] = torch.from_numpy(arr.astype(np.float32) if v["dtype"] != "I64" else arr.copy())
    return out


def main():
    src, dst = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    flux, ae, t5, clip = models.Flux(), models.AutoEncoder(), models.T5Encoder(), models.ClipText()
    for m, f in [(flux, "transformer"), (ae, "ae"), (t5, "t5"), (clip, "clip")]:
        m.load_state_dict(read_safetensors(f"{src}/{f}.safetensors"))
        m.eval()
    t5_ids, clip_ids = (torch.tensor([x]) for x in models.tokenize(CAPTION))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 64, 64, generator=g)
    z = torch.randn(1, 16, 8, 8, generator=g)
    img = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        txt = t5(t5_ids)
        y = clip(clip_ids)
        v = flux(x, txt, y, torch.tensor([0.7]), torch.tensor([2.5]), (8, 8))
        decoded = ae.decode(z)
        encoded = ae.scale(ae.moments(img)[0])
    save_safetensors(dict(t5_ids=t5_ids, clip_ids=clip_ids, txt=txt, y=y, x=x, v=v, z=z,
                          decoded=decoded, image=img, encoded=encoded), dst, dtype=torch.float32)
    print(f"wrote {dst}: caption {CAPTION!r}, |v| {v.abs().mean():.4f}, |decoded| {decoded.abs().mean():.4f}")


if __name__ == "__main__":
    main()
