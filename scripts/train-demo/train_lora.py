"""Train the demo LoRA: a new word for the built-in demo model. The base dataset never draws
polka dots (`BackgroundKind::Polka`, src/scenes/spec.rs), so "red and blue polka dots" means
nothing to the shipped weights; this trains a low-rank path beside the transformer's linear
layers (the text encoders, the autoencoder and the base weights stay frozen) on scenes where half
the backgrounds are polka dots and half are the ordinary ones (so the rest is kept), with the
same rectified-flow loss as train.py at the demo's guidance 1.

The data is what `parallax dev dataset DIR --polka 0.5` writes. The LoRA is written in Black
Forest Labs' names with PEFT's tensor names (`diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`,
`.lora_B.weight`; no alpha, so scale 1), f16, as src/model/lora.rs reads it.

    python train_lora.py --data DIR --weights assets/demo --out assets/demo/lora-polka.safetensors

The shipped file: `parallax dev dataset DIR --count 6000 --seed 29 --polka 0.5`, then
`train_lora.py --data DIR --weights assets/demo --out lora-polka.safetensors --rank 4 --steps 3000
--batch 64 --pool 6000` on one H100 (155 s, final loss 0.027; on a CPU a step takes seconds).
tests/demo_lora.rs checks what it does.
"""

import argparse
import os
import time

import torch

import models
import scenes
from parity import read_safetensors
from train import Text, save_safetensors, shift_t


def targets(flux):
    """The linear layers that get a low-rank path: attention and MLP of every block."""
    names = []
    for i in range(len(flux.double_blocks)):
        for s in ["img", "txt"]:
            names += [f"double_blocks.{i}.{s}_attn.qkv", f"double_blocks.{i}.{s}_attn.proj",
                      f"double_blocks.{i}.{s}_mlp.0", f"double_blocks.{i}.{s}_mlp.2"]
    for i in range(len(flux.single_blocks)):
        names += [f"single_blocks.{i}.linear1", f"single_blocks.{i}.linear2"]
    return names


class LoraLinear(torch.nn.Module):
    """`base(x) + (x Aᵀ) Bᵀ`, B starting at zero (the LoRA starts as no change)."""

    def __init__(self, base, rank, gen):
        super().__init__()
        self.base = base
        self.A = torch.nn.Parameter(torch.randn(rank, base.in_features, generator=gen) / base.in_features ** 0.5)
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        return self.base(x) + (x @ self.A.t()) @ self.B.t()


def attach(flux, rank, seed):
    gen = torch.Generator().manual_seed(seed)
    loras = {}
    for name in targets(flux):
        parent, leaf = flux.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
        wrapped = LoraLinear(getattr(parent, leaf) if not leaf.isdigit() else parent[int(leaf)], rank, gen)
        if leaf.isdigit():
            parent[int(leaf)] = wrapped
        else:
            setattr(parent, leaf, wrapped)
        loras[name] = wrapped
    return loras


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--pool", type=int, default=2000, help="scenes encoded once and trained on")
    ap.add_argument("--size", type=int, default=256, help="image side the demo generates at")
    ap.add_argument("--keep", default="", help="also write the LoRA at these steps (comma-separated) as OUT-STEP")
    a = ap.parse_args()
    keep = {int(x) for x in a.keep.split(",") if x}
    torch.manual_seed(3)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.time()

    flux, ae, text = models.Flux(), models.AutoEncoder(), Text()
    flux.load_state_dict(read_safetensors(os.path.join(a.weights, "transformer.safetensors")))
    ae.load_state_dict(read_safetensors(os.path.join(a.weights, "ae.safetensors")))
    text.t5.load_state_dict(read_safetensors(os.path.join(a.weights, "t5.safetensors")))
    text.clip.load_state_dict(read_safetensors(os.path.join(a.weights, "clip.safetensors")))
    for m in (flux, ae, text):
        m.to(dev).eval().requires_grad_(False)

    data = scenes.load(os.path.join(a.data, "scenes.jsonl"), os.path.join(a.data, "spec.json"))
    n = min(a.pool, len(data["captions"]))
    polka = scenes.KINDS.index("polka")
    print(f"{n} scenes, {(data['kind'][:n] == polka).sum().item()} on polka dots", flush=True)
    rend = scenes.Renderer(data["spec"], a.size, dev)
    lat, txt, vec = [], [], []
    with torch.no_grad():
        for i in range(0, n, 32):
            j = torch.arange(i, min(n, i + 32))
            img = rend.render(data["kind"][j], data["bg"][j], data["obj"][j])
            lat.append(models.pack(ae.scale(ae.moments(img)[0])))
            t, y = text(data["t5"][j].to(dev), data["clip"][j].to(dev))
            txt.append(t)
            vec.append(y)
    lat, txt, vec = torch.cat(lat), torch.cat(txt), torch.cat(vec)
    hw = (a.size // 16, a.size // 16)
    print(f"encoded in {time.time() - t0:.0f}s: latents {tuple(lat.shape)}", flush=True)

    loras = attach(flux, a.rank, 4)
    flux.to(dev)
    params = [p for m in loras.values() for p in (m.A, m.B)]
    print(f"rank {a.rank} on {len(loras)} layers: {sum(p.numel() for p in params)} parameters", flush=True)
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(5)
    t1, run = time.time(), []
    for step in range(a.steps):
        for gr in opt.param_groups:
            gr["lr"] = a.lr * min(1.0, (step + 1) / 50) * (1 - 0.9 * step / a.steps)
        k = torch.randint(0, n, (a.batch,), generator=g)
        u = torch.where(torch.rand(a.batch, generator=g) < 0.9, torch.sigmoid(torch.randn(a.batch, generator=g)),
                        torch.rand(a.batch, generator=g))
        t = shift_t(u.clamp(1e-4, 1 - 1e-4)).to(dev)
        k = k.to(dev)
        x0 = lat[k]
        eps = torch.randn(x0.shape, generator=g).to(dev)
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
        pred = flux(xt, txt[k], vec[k], t, torch.ones(a.batch, device=dev), hw)
        loss = (pred - (eps - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        run.append(loss.item())
        if (step + 1) % 50 == 0:
            print(f"step {step + 1} loss {sum(run) / len(run):.4f} ({(time.time() - t1) / (step + 1):.2f}s/it)", flush=True)
            run = []
        if (step + 1) % 200 == 0 or step + 1 == a.steps or step + 1 in keep:
            out = {}
            for name, m in loras.items():
                out[f"diffusion_model.{name}.lora_A.weight"] = m.A
                out[f"diffusion_model.{name}.lora_B.weight"] = m.B
            save_safetensors(out, a.out)
            if step + 1 in keep:
                save_safetensors(out, f"{a.out}-{step + 1}")
    print(f"wrote {a.out} ({os.path.getsize(a.out)} bytes) after {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
