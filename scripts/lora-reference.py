#!/usr/bin/env python3
"""LoRA reference for tests/lora.rs: a tiny seeded FLUX.1 transformer in diffusers, one LoRA
written three ways (PEFT/diffusers, kohya, Black Forest Labs/ComfyUI) plus a second PEFT LoRA,
and the velocities diffusers computes with them applied through its PEFT integration
(`FluxPipeline.lora_state_dict` + `load_lora_into_transformer` + `set_adapters`), in f32.

Writes tests/fixtures/lora/: config.json, transformer.safetensors (diffusers names),
peft.safetensors, kohya.safetensors, bfl.safetensors, second.safetensors, peft-metadata.safetensors
(the first LoRA saved by diffusers itself, alpha in the header), io.safetensors.

Run: OMP_NUM_THREADS=1 nice -n 10 /work/pyref/bin/python scripts/lora-reference.py
"""

import json
import os

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file, save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "lora")
CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    guidance_embeds=True,
    axes_dims_rope=[4, 6, 6],
)
RANK = 4
ALPHA = 2.0  # scale alpha / rank = 0.5


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    base = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(base, os.path.join(OUT, "transformer.safetensors"))
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump({"_class_name": "FluxTransformer2DModel", **CONFIG}, f, indent=1)

    h = CONFIG["attention_head_dim"] * CONFIG["num_attention_heads"]
    mlp = 4 * h
    g = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    def dims(module):
        w = base[module + ".weight"]
        return w.shape[0], w.shape[1]

    # The first LoRA, by module (diffusers names): (down (r, in), up (out, r), alpha).
    peft = {}
    # Parts that share one down matrix (a fused layer's LoRA split the way diffusers splits it).
    shared = {}

    def lora(module, down=None):
        out, inp = dims(module)
        d = down if down is not None else rnd(RANK, inp)
        peft[module] = (d, rnd(out, RANK), ALPHA)

    b = "transformer_blocks.0"
    # Image q/k/v: three independent pairs (block diagonal once fused).
    for n in ["to_q", "to_k", "to_v"]:
        lora(f"{b}.attn.{n}")
    # Text q/k/v: one down shared (what a fused BFL/kohya LoRA becomes in diffusers).
    d = rnd(RANK, h)
    for n in ["add_q_proj", "add_k_proj", "add_v_proj"]:
        lora(f"{b}.attn.{n}", d)
    for n in ["attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
              "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear", "norm1_context.linear"]:
        lora(f"{b}.{n}")
    for i in range(CONFIG["num_single_layers"]):
        s = f"single_transformer_blocks.{i}"
        d = rnd(RANK, h)
        for n in ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]:
            lora(f"{s}.{n}", d)
        lora(f"{s}.proj_out")
        lora(f"{s}.norm.linear")
    for n in ["x_embedder", "context_embedder", "proj_out", "norm_out.linear",
              "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
              "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2",
              "time_text_embed.guidance_embedder.linear_1", "time_text_embed.guidance_embedder.linear_2"]:
        lora(n)

    t = {}
    for m, (dn, up, a) in peft.items():
        t[f"transformer.{m}.lora_A.weight"] = dn.clone()
        t[f"transformer.{m}.lora_B.weight"] = up.contiguous()
        t[f"transformer.{m}.alpha"] = torch.tensor(a)
    save_file(t, os.path.join(OUT, "peft.safetensors"))

    # The same weights under Black Forest Labs' names, fused layers joined: downs stacked and ups
    # placed block-diagonally, or (a shared down) the down once and the ups stacked.
    def fuse(parts):
        downs = [peft[p][0] for p in parts]
        ups = [peft[p][1] for p in parts]
        if all(torch.equal(x, downs[0]) for x in downs):
            return downs[0], torch.cat(ups, 0), ALPHA
        r = sum(x.shape[0] for x in downs)
        up = torch.zeros(sum(u.shape[0] for u in ups), r)
        row = col = 0
        for u in ups:
            up[row:row + u.shape[0], col:col + u.shape[1]] = u
            row += u.shape[0]
            col += u.shape[1]
        # alpha / rank must stay the part's scale with the larger joint rank.
        return torch.cat(downs, 0), up, ALPHA / RANK * r

    bfl = {}
    d0 = "double_blocks.0"
    bfl[f"{d0}.img_attn.qkv"] = fuse([f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"])
    bfl[f"{d0}.txt_attn.qkv"] = fuse([f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"])
    for src, dst in [("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                     ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                     ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2"),
                     ("norm1.linear", "img_mod.lin"), ("norm1_context.linear", "txt_mod.lin")]:
        bfl[f"{d0}.{dst}"] = peft[f"{b}.{src}"]
    for i in range(CONFIG["num_single_layers"]):
        s = f"single_transformer_blocks.{i}"
        bfl[f"single_blocks.{i}.linear1"] = fuse([f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp"])
        bfl[f"single_blocks.{i}.linear2"] = peft[f"{s}.proj_out"]
        bfl[f"single_blocks.{i}.modulation.lin"] = peft[f"{s}.norm.linear"]
    for src, dst in [("x_embedder", "img_in"), ("context_embedder", "txt_in"), ("proj_out", "final_layer.linear"),
                     ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
                     ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
                     ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
                     ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
                     ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
                     ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")]:
        bfl[dst] = peft[src]
    # diffusers' norm_out computes (scale, shift), BFL's final modulation (shift, scale).
    dn, up, a = peft["norm_out.linear"]
    bfl["final_layer.adaLN_modulation.1"] = (dn, torch.cat([up[h:], up[:h]], 0), a)

    t = {}
    for m, (dn, up, a) in bfl.items():
        t[f"diffusion_model.{m}.lora_A.weight"] = dn.clone()
        t[f"diffusion_model.{m}.lora_B.weight"] = up.contiguous()
        t[f"diffusion_model.{m}.alpha"] = torch.tensor(a)
    save_file(t, os.path.join(OUT, "bfl.safetensors"))
    t = {}
    for m, (dn, up, a) in bfl.items():
        k = "lora_unet_" + m.replace(".", "_")
        t[f"{k}.lora_down.weight"] = dn.clone()
        t[f"{k}.lora_up.weight"] = up.contiguous()
        t[f"{k}.alpha"] = torch.tensor(a)
    save_file(t, os.path.join(OUT, "kohya.safetensors"))

    # A second LoRA (PEFT names without the prefix, no alpha: scale 1), rank 2.
    second = {}
    for m in [f"{b}.attn.to_q", f"{b}.attn.to_v", f"{b}.ff.net.2", "single_transformer_blocks.1.proj_mlp",
              "single_transformer_blocks.0.proj_out"]:
        out, inp = dims(m)
        second[f"{m}.lora_A.weight"] = rnd(2, inp).contiguous()
        second[f"{m}.lora_B.weight"] = rnd(out, 2).contiguous()
    save_file(second, os.path.join(OUT, "second.safetensors"))

    # Inputs (fixed values) and velocities.
    n_txt, gh, gw = 3, 4, 4
    x = torch.sin(torch.arange(gh * gw * 64, dtype=torch.float32) * 0.37 + 0.1).reshape(1, gh * gw, 64)
    txt = torch.sin(torch.arange(n_txt * 32, dtype=torch.float32) * 0.37 + 0.2).reshape(1, n_txt, 32)
    y = torch.sin(torch.arange(16, dtype=torch.float32) * 0.37 + 0.3).reshape(1, 16)
    img_ids = torch.zeros(gh * gw, 3)
    for r in range(gh):
        for c in range(gw):
            img_ids[r * gw + c] = torch.tensor([0.0, r, c])
    txt_ids = torch.zeros(n_txt, 3)

    def velocity():
        with torch.no_grad():
            return model(hidden_states=x, encoder_hidden_states=txt, pooled_projections=y,
                         timestep=torch.tensor([0.6]), guidance=torch.tensor([3.5]),
                         img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]

    io = {"x": x, "txt": txt, "y": y, "base": velocity()}

    def load(name, adapter):
        # diffusers takes a pipeline's LoRA by its `transformer.` prefix: give it one where the
        # file has none (the Rust side reads the file as written).
        sd = load_file(os.path.join(OUT, name))
        sd = {(k if k.startswith("transformer.") else "transformer." + k): v for k, v in sd.items()}
        sd, alphas = FluxPipeline.lora_state_dict(sd, return_alphas=True)
        FluxPipeline.load_lora_into_transformer(sd, network_alphas=alphas, transformer=model,
                                                adapter_name=adapter)

    load("peft.safetensors", "first")
    model.set_adapters(["first"], weights=[1.0])
    io["first"] = velocity()
    model.set_adapters(["first"], weights=[-0.7])
    io["first_neg"] = velocity()
    load("second.safetensors", "second")
    model.set_adapters(["first", "second"], weights=[0.8, -0.5])
    io["both"] = velocity()

    # Self-check: diffusers' adapters against the LoRAs merged by hand into the base weights.
    def merged_velocity(s_first, s_second):
        merged = FluxTransformer2DModel(**CONFIG).eval()
        sd = {k: v.clone() for k, v in base.items()}
        for m, (dn, up, a) in peft.items():
            sd[m + ".weight"] += s_first * (a / RANK) * up @ dn
        for k, dn in second.items():
            if k.endswith(".lora_A.weight"):
                m = k[: -len(".lora_A.weight")]
                sd[m + ".weight"] += s_second * second[m + ".lora_B.weight"] @ dn
        merged.load_state_dict(sd)
        with torch.no_grad():
            return merged(hidden_states=x, encoder_hidden_states=txt, pooled_projections=y,
                          timestep=torch.tensor([0.6]), guidance=torch.tensor([3.5]),
                          img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]

    # The first LoRA as diffusers saves one itself: no alpha tensors, alpha and rank in the
    # file's `lora_adapter_metadata` header.
    layers = {}
    for m, (dn, up, _) in peft.items():
        layers[f"{m}.lora_A.weight"] = dn.clone()
        layers[f"{m}.lora_B.weight"] = up.clone()
    FluxPipeline.save_lora_weights(
        OUT, transformer_lora_layers=layers, weight_name="peft-metadata.safetensors",
        transformer_lora_adapter_metadata={"r": RANK, "lora_alpha": ALPHA,
                                           "target_modules": sorted(peft)})
    sd, alphas, meta = FluxPipeline.lora_state_dict(
        os.path.join(OUT, "peft-metadata.safetensors"), return_alphas=True, return_lora_metadata=True)
    FluxPipeline.load_lora_into_transformer(sd, network_alphas=alphas, transformer=model,
                                            adapter_name="meta", metadata=meta)
    model.set_adapters(["meta"], weights=[1.0])
    err = (velocity() - io["first"]).abs().max() / io["first"].abs().max()
    print(f"metadata alpha: rel {err:.2e}")
    assert err < 1e-5, err

    for key, s1, s2 in [("first", 1.0, 0.0), ("first_neg", -0.7, 0.0), ("both", 0.8, -0.5)]:
        want = merged_velocity(s1, s2)
        err = (want - io[key]).abs().max() / want.abs().max()
        print(f"{key}: diffusers' adapters vs merged by hand: rel {err:.2e}")
        assert err < 1e-5, err
    for k, v in io.items():
        print(k, tuple(v.shape), float(v.abs().max()))
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(OUT, "io.safetensors"))


if __name__ == "__main__":
    main()
