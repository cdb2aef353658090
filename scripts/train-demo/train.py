"""Train Parallax's demo model: the autoencoder, then the transformer with its text encoders
(rectified flow), then guidance distillation (a guidance embedding like FLUX.1-dev's).

Resumable: every phase checkpoints into --state (a folder carried between device calls) and the
run stops cleanly before --budget seconds; run it again to go on. Fixed seeds: the same scenes in
the same order on every run. `--export DIR` writes the weights (f16) in the real file layouts'
tensor names: transformer.safetensors and ae.safetensors (BFL), t5.safetensors and
clip.safetensors (transformers).

    python train.py --data DIR --state DIR [--budget 560] [--export DIR]
"""

import argparse
import copy
import json
import math
import os
import struct
import time

import numpy as np
import torch
import torch.nn.functional as F

import models
import scenes

PHASES = dict(vae=2500, flux=24000, distill=3000)


def log(msg, f=None):
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if f:
        f.write(line + "\n")
        f.flush()


def save_safetensors(tensors, path, dtype=torch.float16):
    """The safetensors format by hand (no package needed): header length, JSON header, data."""
    header, blobs, off = {}, [], 0
    names = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64"}
    for k in sorted(tensors):
        t = tensors[k].detach().cpu()
        t = t.to(dtype) if t.is_floating_point() else t
        b = t.contiguous().numpy().tobytes()
        header[k] = dict(dtype=names[t.dtype], shape=list(t.shape), data_offsets=[off, off + len(b)])
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    tmp = str(path) + ".partial"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)
    os.replace(tmp, path)


def atomic_save(obj, path):
    tmp = str(path) + ".partial"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def sobel(x):
    k = torch.tensor([[1, 0, -1], [2, 0, -2], [1, 0, -1]], dtype=x.dtype, device=x.device)
    kx = k[None, None].repeat(x.shape[1], 1, 1, 1)
    ky = k.t()[None, None].repeat(x.shape[1], 1, 1, 1)
    return torch.cat([F.conv2d(x, kx, padding=1, groups=x.shape[1]), F.conv2d(x, ky, padding=1, groups=x.shape[1])], 1)


def shift_t(t, mu=0.5):
    e = math.exp(mu)
    return e / (e + (1 / t - 1))


class Text(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.t5 = models.T5Encoder()
        self.clip = models.ClipText()

    def forward(self, t5_ids, clip_ids):
        return self.t5(t5_ids), self.clip(clip_ids)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--state", required=True)
    ap.add_argument("--budget", type=float, default=560)
    ap.add_argument("--export")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--stop-after", default=None, help="end the run after this phase")
    ap.add_argument("--init-from", default=None,
                    help="with an empty --state: start from exported weights (e.g. assets/demo) and the steps its demo.json records")
    ap.add_argument("--phases", default=None, help="steps per phase, e.g. vae=5,flux=5,distill=3 (a smoke test)")
    ap.add_argument("--anneal-until", type=int, default=0,
                    help="decay the transformer's learning rate linearly from this call's first step to a tenth at this step")
    ap.add_argument("--pool", type=int, default=0,
                    help="encode this many scenes (drawn with a fixed seed) once per call and train on their "
                         "latents, instead of drawing and encoding every batch afresh")
    a = ap.parse_args()
    if a.phases:
        for kv in a.phases.split(","):
            k, v = kv.split("=")
            PHASES[k] = int(v)
    start = time.time()
    deadline = start + a.budget
    os.makedirs(a.state, exist_ok=True)
    logf = open(os.path.join(a.state, "train.log"), "a")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    log(f"device {dev} {torch.cuda.get_device_name() if dev.type == 'cuda' else ''}, torch {torch.__version__}", logf)

    data_path = os.path.join(a.data, "scenes.jsonl.xz")
    if not os.path.exists(data_path):
        data_path = os.path.join(a.data, "scenes.jsonl")
    data = scenes.load(data_path, os.path.join(a.data, "spec.json"))
    n = len(data["captions"])
    log(f"{n} scenes loaded in {time.time() - start:.1f}s", logf)
    rend = scenes.Renderer(data["spec"], 256, dev)
    empty_t5, empty_clip = (torch.tensor(x, device=dev) for x in models.tokenize(""))

    def batch(step, size, seed):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, n, (size,), generator=g)
        img = rend.render(data["kind"][idx], data["bg"][idx], data["obj"][idx])
        return idx, img

    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    pool = {}

    def encode(img):
        with torch.no_grad(), torch.autocast(**amp):
            return models.pack(ae.scale(ae.moments(img)[0].float())).float()

    def build_pool(seed):
        """Latents of `--pool` scenes, encoded once (bf16 on the device), and their scene ids."""
        g = torch.Generator().manual_seed(seed)
        ids = torch.randperm(n, generator=g)[: a.pool]
        lat = torch.empty(len(ids), 256, 64, dtype=torch.bfloat16, device=dev)
        t0 = time.time()
        for i in range(0, len(ids), a.batch):
            j = ids[i : i + a.batch]
            lat[i : i + len(j)] = encode(rend.render(data["kind"][j], data["bg"][j], data["obj"][j])).to(torch.bfloat16)
        log(f"pool of {len(ids)} latents encoded in {time.time() - t0:.1f}s", logf)
        pool.update(ids=ids, lat=lat)

    def latents_and_ids(step, seed):
        """A batch's clean packed latents (B, 256, 64) and its captions' T5 and CLIP ids."""
        if a.pool:
            if not pool:
                build_pool(seed)
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            k = torch.randint(0, len(pool["ids"]), (a.batch,), generator=g)
            idx = pool["ids"][k]
            x0 = pool["lat"][k.to(dev)].float()
        else:
            idx, img = batch(step, a.batch, seed)
            x0 = encode(img)
        return x0, data["t5"][idx].to(dev), data["clip"][idx].to(dev)
    st = lambda name: os.path.join(a.state, name)

    # ------------------------------------------------------------------ autoencoder
    torch.manual_seed(1)
    ae = models.AutoEncoder().to(dev)
    probe = torch.nn.Conv2d(16, 3, 1).to(dev)
    if a.init_from and not os.path.exists(st("vae.pt")):
        from parity import read_safetensors
        rec = json.load(open(os.path.join(a.init_from, "demo.json")))
        ae.load_state_dict(read_safetensors(os.path.join(a.init_from, "ae.safetensors")))
        atomic_save(dict(model=ae.state_dict(), probe=probe.state_dict(), step=rec["steps"]["vae"]), st("vae.pt"))
        f, t = models.Flux(), Text()
        f.load_state_dict(read_safetensors(os.path.join(a.init_from, "transformer.safetensors")))
        t.t5.load_state_dict(read_safetensors(os.path.join(a.init_from, "t5.safetensors")))
        t.clip.load_state_dict(read_safetensors(os.path.join(a.init_from, "clip.safetensors")))
        half = lambda m: {k: v.to(torch.bfloat16) for k, v in m.state_dict().items()}
        atomic_save(dict(flux=half(f), text=half(t), step=rec["steps"]["flux"]), st("flux.pt"))
        atomic_save([p.detach().clone() for p in list(f.parameters()) + list(t.parameters())], st("flux-ema.pt"))
        log(f"starting from {a.init_from}: {rec['steps']}", logf)
    vae_state = torch.load(st("vae.pt"), map_location=dev) if os.path.exists(st("vae.pt")) else None
    vstep = 0
    if vae_state:
        ae.load_state_dict(vae_state["model"])
        probe.load_state_dict(vae_state["probe"])
        vstep = vae_state["step"]
    if vstep < PHASES["vae"]:
        opt = torch.optim.AdamW(list(ae.parameters()) + list(probe.parameters()), lr=1e-3, weight_decay=0.0)
        if vae_state and "opt" in vae_state:
            opt.load_state_dict(vae_state["opt"])
        t0 = time.time()
        while vstep < PHASES["vae"] and time.time() < deadline - 30:
            lr = 1e-3 * min(1.0, (vstep + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * vstep / PHASES["vae"])))
            for gr in opt.param_groups:
                gr["lr"] = lr
            _, x = batch(vstep, a.vae_batch, 11)
            with torch.autocast(**amp):
                mean, logvar = ae.moments(x)
                logvar = logvar.float().clamp(-20, 5)
                mean = mean.float()
                z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
                rec = ae.decoder(z).float()
            l1 = (rec - x).abs().mean()
            edge = (sobel(rec) - sobel(x)).abs().mean()
            kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
            zs = ae.scale(mean)
            stats = zs.mean().pow(2) + (zs.std() - 1).pow(2)
            lin = (probe(zs) - F.avg_pool2d(x, 8)).pow(2).mean()
            loss = l1 + 0.25 * edge + 1e-4 * kl + 0.1 * stats + 0.1 * lin
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
            opt.step()
            vstep += 1
            if vstep % 100 == 0 or vstep == PHASES["vae"]:
                log(f"vae {vstep} loss {loss.item():.4f} l1 {l1.item():.4f} edge {edge.item():.4f} "
                    f"z mean {zs.mean().item():.3f} std {zs.std().item():.3f} probe {lin.item():.4f} "
                    f"({(time.time() - t0) / max(1, vstep - (vae_state or {}).get('step', 0)):.3f}s/it)", logf)
            if vstep % 500 == 0:
                atomic_save(dict(model=ae.state_dict(), probe=probe.state_dict(), opt=opt.state_dict(), step=vstep), st("vae.pt"))
        keep = dict(model=ae.state_dict(), probe=probe.state_dict(), step=vstep)
        if vstep < PHASES["vae"]:
            keep["opt"] = opt.state_dict()
        atomic_save(keep, st("vae.pt"))
        if vstep < PHASES["vae"]:
            log("budget spent in the autoencoder phase; run again to go on", logf)
            return finish(a, ae, None, None, logf, steps=dict(vae=vstep))
    ae.eval().requires_grad_(False)
    steps = dict(vae=vstep, batch=a.batch)
    if a.stop_after == "vae":
        return finish(a, ae, None, None, logf, steps=steps)

    # ------------------------------------------------------------------ transformer + text
    torch.manual_seed(2)
    flux = models.Flux().to(dev)
    text = Text().to(dev)
    # adaLN-zero style start: gates and the output projection begin at zero.
    with torch.no_grad():
        for m in flux.modules():
            if isinstance(m, models.Modulation):
                m.lin.weight.zero_(); m.lin.bias.zero_()
        flux.final_layer.linear.weight.zero_(); flux.final_layer.linear.bias.zero_()
        flux.final_layer.adaLN_modulation[1].weight.zero_(); flux.final_layer.adaLN_modulation[1].bias.zero_()
    params = list(flux.parameters()) + list(text.parameters())
    ema = [p.detach().clone() for p in params]
    fstep = 0
    fs = torch.load(st("flux.pt"), map_location=dev) if os.path.exists(st("flux.pt")) else None
    opt = torch.optim.AdamW(params, lr=4e-4, betas=(0.9, 0.99), weight_decay=0.0)
    if fs:
        # The training weights travel in bf16 (the EMA in f32); Adam starts afresh with a
        # short warm-up after a resume (its moments would not fit the files that come back).
        flux.load_state_dict({k: v.float() for k, v in fs["flux"].items()})
        text.load_state_dict({k: v.float() for k, v in fs["text"].items()})
        for e, v in zip(ema, torch.load(st("flux-ema.pt"), map_location=dev)):
            e.copy_(v)
        fstep = fs["step"]
    resumed_at = fstep

    def save_flux():
        half = lambda m: {k: v.to(torch.bfloat16) for k, v in m.state_dict().items()}
        atomic_save(dict(flux=half(flux), text=half(text), step=fstep), st("flux.pt"))
        atomic_save([e.cpu() for e in ema], st("flux-ema.pt"))

    def ema_model():
        f, t = copy.deepcopy(flux), copy.deepcopy(text)
        ps = list(f.parameters()) + list(t.parameters())
        with torch.no_grad():
            for p, e in zip(ps, ema):
                p.copy_(e)
        return f.eval().requires_grad_(False), t.eval().requires_grad_(False)

    hw = (16, 16)
    if fstep < PHASES["flux"]:
        t0, s0 = time.time(), fstep
        losses = []
        td = 0.0
        while fstep < PHASES["flux"] and time.time() < deadline - 40:
            lr = 4e-4 * min(1.0, (fstep + 1) / 500, (fstep - resumed_at + 1) / 200 if resumed_at else 1.0)
            if a.anneal_until > resumed_at:
                lr *= 1 - 0.9 * min(1.0, (fstep - resumed_at) / (a.anneal_until - resumed_at))
            for gr in opt.param_groups:
                gr["lr"] = lr
            timed = dev.type == "cuda" and fstep % 200 == 100
            if timed:
                torch.cuda.synchronize()
                td = time.time()
            x0, t5_ids, clip_ids = latents_and_ids(fstep, 22)
            if timed:
                torch.cuda.synchronize()
                td = time.time() - td
            B = x0.shape[0]
            drop = torch.rand(B, device=dev) < 0.1
            t5_ids = torch.where(drop[:, None], empty_t5[None], t5_ids)
            clip_ids = torch.where(drop[:, None], empty_clip[None], clip_ids)
            u = torch.where(torch.rand(B, device=dev) < 0.9, torch.sigmoid(torch.randn(B, device=dev)), torch.rand(B, device=dev))
            t = shift_t(u.clamp(1e-4, 1 - 1e-4))
            eps = torch.randn_like(x0)
            xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
            with torch.autocast(**amp):
                txt, y = text(t5_ids, clip_ids)
                # The guidance input varies but the target does not: until guidance distillation
                # (the phase below) runs, the embedding learns to leave the velocity alone, so a
                # guidance setting never pushes the model off what it learnt.
                g_in = torch.ones(B, device=dev) if fstep < 2200 else 1 + 4 * torch.rand(B, device=dev)
                pred = flux(xt, txt, y, t, g_in, hw)
            loss = (pred.float() - (eps - x0)).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            with torch.no_grad():
                d = min(0.9995, (1 + fstep) / (10 + fstep))
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
            fstep += 1
            losses.append(loss.item() if fstep % 50 == 0 else None)
            if fstep % 200 == 0:
                rec = [l for l in losses if l is not None]
                log(f"flux {fstep} loss {np.mean(rec):.4f} lr {lr:.2e} ({(time.time() - t0) / (fstep - s0):.3f}s/it, "
                    f"data {td:.3f}s)", logf)
                losses = []
            if fstep % 2000 == 0:
                save_flux()
        save_flux()
        if fstep < PHASES["flux"] and a.stop_after != "flux":
            log("budget spent in the transformer phase; run again to go on", logf)
            f, t = ema_model()
            return finish(a, ae, f, t, logf, steps=dict(steps, flux=fstep))
    steps["flux"] = fstep
    if a.stop_after == "flux":
        f, t = ema_model()
        return finish(a, ae, f, t, logf, steps=steps)

    # ------------------------------------------------------------------ guidance distillation
    teacher, text_t = ema_model()
    ds = torch.load(st("distill.pt"), map_location=dev) if os.path.exists(st("distill.pt")) else None
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    dstep = 0
    if ds:
        student.load_state_dict({k: v.float() for k, v in ds["flux"].items()})
        dstep = ds["step"]
    sparams = list(student.parameters())
    sema = [p.detach().clone() for p in sparams]
    if ds:
        for e, v in zip(sema, torch.load(st("distill-ema.pt"), map_location=dev)):
            e.copy_(v)
    d_resumed = dstep
    dopt = torch.optim.AdamW(sparams, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0)
    t0, s0 = time.time(), dstep
    while dstep < PHASES["distill"] and time.time() < deadline - 40:
        x0, t5_ids, clip_ids = latents_and_ids(dstep, 33)
        B = x0.shape[0]
        with torch.no_grad(), torch.autocast(**amp):
            txt, y = text_t(t5_ids, clip_ids)
            txt_u, y_u = text_t(empty_t5[None].expand(B, -1), empty_clip[None].expand(B, -1))
            u = torch.sigmoid(torch.randn(B, device=dev))
            t = shift_t(u.clamp(1e-4, 1 - 1e-4))
            eps = torch.randn_like(x0)
            xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
            ones = torch.ones(B, device=dev)
            vc = teacher(xt, txt, y, t, ones, hw).float()
            vu = teacher(xt, txt_u, y_u, t, ones, hw).float()
            g = 1 + 4 * torch.rand(B, device=dev)
            target = vu + g[:, None, None] * (vc - vu)
        for gr in dopt.param_groups:
            gr["lr"] = 1e-4 * min(1.0, (dstep - d_resumed + 1) / 100)
        with torch.autocast(**amp):
            pred = student(xt, txt, y, t, g, hw)
        loss = (pred.float() - target).pow(2).mean()
        dopt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sparams, 1.0)
        dopt.step()
        with torch.no_grad():
            torch._foreach_lerp_(sema, [p.detach() for p in sparams], 1 - 0.999)
        dstep += 1
        if dstep % 100 == 0:
            log(f"distill {dstep} loss {loss.item():.4f} ({(time.time() - t0) / (dstep - s0):.3f}s/it)", logf)
    atomic_save(dict(flux={k: v.to(torch.bfloat16) for k, v in student.state_dict().items()}, step=dstep), st("distill.pt"))
    atomic_save([e.cpu() for e in sema], st("distill-ema.pt"))
    with torch.no_grad():
        for p, e in zip(student.parameters(), sema):
            p.copy_(e)
    if dstep < PHASES["distill"]:
        log("budget spent in the distillation phase; run again to go on", logf)
    return finish(a, ae, student.eval(), text_t, logf, steps=dict(steps, distill=dstep))


def finish(a, ae, flux, text, logf, steps=None):
    if a.export:
        os.makedirs(a.export, exist_ok=True)
        save_safetensors(ae.state_dict(), os.path.join(a.export, "ae.safetensors"))
        if flux is not None:
            save_safetensors(flux.state_dict(), os.path.join(a.export, "transformer.safetensors"))
            save_safetensors(text.t5.state_dict(), os.path.join(a.export, "t5.safetensors"))
            save_safetensors(text.clip.state_dict(), os.path.join(a.export, "clip.safetensors"))
        json.dump(dict(flux=models.FLUX, vae=models.VAE, t5=models.T5, clip=models.CLIP,
                       steps=steps or {}), open(os.path.join(a.export, "demo.json"), "w"), indent=1)
        log(f"exported to {a.export}", logf)


if __name__ == "__main__":
    main()
