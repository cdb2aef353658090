#!/usr/bin/env python3
"""Reference fixtures for the klein family (issue 28 part 3), made with diffusers on the CPU.

Builds tiny FLUX.2 models with seeded random weights in their real key layouts, runs them in f32
on fixed inputs, and writes under tests/fixtures/klein/:

  transformer/                 diffusers Flux2Transformer2DModel folder, no guidance embedder
                               (klein's layout: config.json + diffusion_pytorch_model.safetensors)
  flux2-guided-bfl.safetensors the same weights plus a guidance embedder, in Black Forest Labs'
                               names below ComfyUI's `model.diffusion_model.` prefix
  vae/                         diffusers AutoencoderKLFlux2 folder, decoding half only
  ae.safetensors               the same autoencoder in Black Forest Labs' names
  reference.safetensors        the inputs and the outputs (f32):
      img (1, 16, 128) packed latent tokens of a 4x4 grid, txt (1, 6, 48) text hidden states,
      t (1,) timestep in [0, 1], g (1,) guidance,
      velocity (1, 16, 128) of the transformer without guidance embedder,
      velocity_guided (1, 16, 128) of the one with it, at guidance g,
      z (1, 32, 8, 8) a latent as the transformer denoises it (batch-norm normalised),
      image (1, 3, 64, 64) its decode as Flux2KleinPipeline decodes (statistics undone, then
      the autoencoder).
  pipeline.safetensors         Flux2KleinPipeline end to end on the transformer above and this
                               autoencoder, fed prompt embeddings and the initial noise (f32):
      prompt, negative (1, 6, 48) text hidden states, noise (1, 16, 128) packed initial noise of
      a 64 x 64 image, image_distilled (1, 3, 64, 64) the distilled pipeline's image in [0, 1]
      (4 steps, no CFG), image_base the Base pipeline's (6 steps, true CFG at 4 against the
      negative prompt).

Weights are stored in f16 (to keep the files small) and the models run on exactly those values
in f32. `cargo test --test klein` checks Parallax against these files without Python; rerun this
script (with /work/pyref's diffusers, torch on the CPU) to remake them:

  OMP_NUM_THREADS=1 /work/pyref/bin/python scripts/klein-reference.py
"""

import json
import os
import re
import sys

import torch
from safetensors.torch import save_file

from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
)
from diffusers.loaders.single_file_utils import (
    convert_flux2_transformer_checkpoint_to_diffusers,
    convert_ldm_vae_checkpoint,
)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "klein")

TRANSFORMER = dict(
    patch_size=1,
    in_channels=128,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=48,
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(8, 8, 8, 8),
    rope_theta=2000,
    eps=1e-6,
)

VAE = dict(
    block_out_channels=(16, 16, 32, 32),
    layers_per_block=1,
    latent_channels=32,
    norm_num_groups=8,
    batch_norm_eps=1e-4,
)


def seeded_(model, seed):
    """Every parameter drawn from `seed`: matrices and kernels N(0, 1/fan_in), 1-D parameters
    (norm scales, biases) near their usual values, so no norm is the identity. Then rounded to
    f16 (what is stored) and run in f32."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() >= 2:
                fan_in = p[0].numel()
                v = torch.randn(p.shape, generator=g) / fan_in**0.5
            elif "norm" in name and name.endswith("weight"):
                v = 1.0 + 0.2 * torch.randn(p.shape, generator=g)
            else:
                v = 0.05 * torch.randn(p.shape, generator=g)
            p.copy_(v.half().float())
    return model


def to_bfl_transformer(sd):
    """diffusers Flux2Transformer2DModel names -> Black Forest Labs' (the inverse of diffusers'
    convert_flux2_transformer_checkpoint_to_diffusers, checked against it below)."""
    out = {}
    rename = {
        "x_embedder": "img_in",
        "context_embedder": "txt_in",
        "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
        "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
        "single_stream_modulation.linear": "single_stream_modulation.lin",
        "proj_out": "final_layer.linear",
    }
    double = {
        "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
        "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
        "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
        "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
        "attn.to_out.0.weight": "img_attn.proj.weight",
        "attn.to_add_out.weight": "txt_attn.proj.weight",
        "ff.linear_in.weight": "img_mlp.0.weight",
        "ff.linear_out.weight": "img_mlp.2.weight",
        "ff_context.linear_in.weight": "txt_mlp.0.weight",
        "ff_context.linear_out.weight": "txt_mlp.2.weight",
    }
    single = {
        "attn.to_qkv_mlp_proj.weight": "linear1.weight",
        "attn.to_out.weight": "linear2.weight",
        "attn.norm_q.weight": "norm.query_norm.scale",
        "attn.norm_k.weight": "norm.key_norm.scale",
    }
    for k, v in sd.items():
        m = re.match(r"transformer_blocks\.(\d+)\.(.*)", k)
        if m:
            i, rest = m.groups()
            if rest in double:
                out[f"double_blocks.{i}.{double[rest]}"] = v
            continue
        m = re.match(r"single_transformer_blocks\.(\d+)\.(.*)", k)
        if m:
            i, rest = m.groups()
            out[f"single_blocks.{i}.{single[rest]}"] = v
            continue
        if k == "norm_out.linear.weight":
            scale, shift = v.chunk(2, dim=0)
            out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale], dim=0)
            continue
        base, leaf = k.rsplit(".", 1)
        out[f"{rename[base]}.{leaf}"] = v
    n = len([k for k in sd if re.match(r"transformer_blocks\.\d+\.attn\.to_q\.weight", k)])
    for i in range(n):
        p = f"transformer_blocks.{i}.attn"
        out[f"double_blocks.{i}.img_attn.qkv.weight"] = torch.cat(
            [sd[f"{p}.to_q.weight"], sd[f"{p}.to_k.weight"], sd[f"{p}.to_v.weight"]]
        )
        out[f"double_blocks.{i}.txt_attn.qkv.weight"] = torch.cat(
            [sd[f"{p}.add_q_proj.weight"], sd[f"{p}.add_k_proj.weight"], sd[f"{p}.add_v_proj.weight"]]
        )
    return out


def to_bfl_vae_decoder(sd, levels):
    """diffusers AutoencoderKLFlux2 decoder names -> Black Forest Labs' (FLUX.1's LDM decoder
    names, the post-quant convolution inside `decoder.`, the statistics as `bn.`)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("bn."):
            out[k] = v
            continue
        if k.startswith("post_quant_conv."):
            out["decoder." + k] = v
            continue
        if not k.startswith("decoder."):
            continue
        n = k[len("decoder."):]
        n = n.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        m = re.match(r"up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)", n)
        if m:
            b, kind, j, rest = m.groups()
            level = levels - 1 - int(b)
            n = (
                f"up.{level}.block.{j}.{rest}"
                if kind == "resnets"
                else f"up.{level}.upsample.{rest}"
            )
        m = re.match(r"mid_block\.resnets\.(\d+)\.(.*)", n)
        if m:
            n = f"mid.block_{int(m.group(1)) + 1}.{m.group(2)}"
        m = re.match(r"mid_block\.attentions\.0\.(.*)", n)
        if m:
            layer, leaf = m.group(1).rsplit(".", 1)
            layer = {
                "group_norm": "norm",
                "to_q": "q",
                "to_k": "k",
                "to_v": "v",
                "to_out.0": "proj_out",
            }[layer]
            n = f"mid.attn_1.{layer}.{leaf}"
            if leaf == "weight" and layer != "norm":
                v = v[:, :, None, None]
        out["decoder." + n] = v
    return out


def half(sd):
    return {k: v.detach().half().contiguous() for k, v in sd.items()}


def main():
    torch.manual_seed(0)
    os.makedirs(os.path.join(OUT, "transformer"), exist_ok=True)
    os.makedirs(os.path.join(OUT, "vae"), exist_ok=True)

    # The transformer with a guidance embedder, and the same weights without one.
    guided = seeded_(Flux2Transformer2DModel(**TRANSFORMER, guidance_embeds=True), 1).eval()
    plain = Flux2Transformer2DModel(**TRANSFORMER, guidance_embeds=False).eval()
    sd = guided.state_dict()
    plain.load_state_dict({k: v for k, v in sd.items() if "guidance_embedder" not in k}, strict=True)

    bfl = to_bfl_transformer(sd)
    back = convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl))
    assert set(back) == set(sd), set(back) ^ set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd), "BFL names do not round-trip"
    save_file(
        half({"model.diffusion_model." + k: v for k, v in bfl.items()}),
        os.path.join(OUT, "flux2-guided-bfl.safetensors"),
    )
    plain.save_pretrained(os.path.join(OUT, "transformer"), safe_serialization=True)
    # save_pretrained wrote f32: store the (f16-exact) weights as f16.
    save_file(
        half(plain.state_dict()),
        os.path.join(OUT, "transformer", "diffusion_pytorch_model.safetensors"),
    )

    g = torch.Generator().manual_seed(2)
    grid, txt_len = 4, 6
    img = torch.randn(1, grid * grid, 128, generator=g)
    txt = torch.randn(1, txt_len, TRANSFORMER["joint_attention_dim"], generator=g)
    t = torch.tensor([0.7])
    guidance = torch.tensor([3.5])
    txt_ids = Flux2KleinPipeline._prepare_text_ids(txt)
    img_ids = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, 128, grid, grid))
    with torch.no_grad():
        v_plain = plain(img, txt, t, img_ids, txt_ids, guidance=None, return_dict=False)[0]
        v_guided = guided(img, txt, t, img_ids, txt_ids, guidance=guidance, return_dict=False)[0]
    assert (v_plain - v_guided).abs().max() > 1e-3, "the guidance embedding changed nothing"

    # The autoencoder: seeded convolutions, made-up batch-norm statistics.
    vae = seeded_(AutoencoderKLFlux2(**VAE), 3).eval()
    with torch.no_grad():
        vae.bn.running_mean.copy_((0.5 * torch.randn(128, generator=g)).half().float())
        vae.bn.running_var.copy_((0.5 + 1.5 * torch.rand(128, generator=g)).half().float())
    z_patched = torch.randn(1, 128, 4, 4, generator=g)
    z = Flux2KleinPipeline._unpatchify_latents(z_patched)
    with torch.no_grad():
        # As Flux2KleinPipeline decodes a latent (its __call__, after the loop).
        p = Flux2KleinPipeline._patchify_latents(z)
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        image = vae.decode(Flux2KleinPipeline._unpatchify_latents(p * std + mean), return_dict=False)[0]

    vsd = vae.state_dict()
    decoding = {
        k: v
        for k, v in vsd.items()
        if k.startswith(("decoder.", "post_quant_conv.", "bn.running_"))
    }
    levels = len(VAE["block_out_channels"])
    ae = to_bfl_vae_decoder(decoding, levels)
    # Checked against diffusers' own LDM -> diffusers conversion of the decoder's names.
    ldm = {k: v for k, v in ae.items() if k.startswith("decoder.") and "post_quant" not in k}
    back = convert_ldm_vae_checkpoint(ldm, vae.config)
    for k, v in back.items():
        assert torch.equal(v.reshape(vsd[k].shape), vsd[k]), k
    assert len(back) == len([k for k in decoding if k.startswith("decoder.")]), "names lost"
    save_file(half(ae), os.path.join(OUT, "ae.safetensors"))
    with open(os.path.join(OUT, "vae", "config.json"), "w") as f:
        config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
        config["_class_name"] = "AutoencoderKLFlux2"
        json.dump(config, f, indent=2, sort_keys=True, default=list)
    save_file(half(decoding), os.path.join(OUT, "vae", "diffusion_pytorch_model.safetensors"))

    save_file(
        {
            "img": img,
            "txt": txt,
            "t": t,
            "g": guidance,
            "velocity": v_plain.contiguous(),
            "velocity_guided": v_guided.contiguous(),
            "z": z.contiguous(),
            "image": image.contiguous(),
        },
        os.path.join(OUT, "reference.safetensors"),
    )
    # The whole pipeline, fed the prompts' hidden states and the initial noise (the text encoder
    # is checked on its own by scripts/qwen3-reference.py). FLUX.2's schedule: sigmas from 1 to
    # 1/n, shifted exponentially by the pipeline's empirical mu.
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    prompt = torch.randn(1, txt_len, TRANSFORMER["joint_attention_dim"], generator=g)
    negative = torch.randn(1, txt_len, TRANSFORMER["joint_attention_dim"], generator=g)
    noise = torch.randn(1, 128, 4, 4, generator=g)
    images = {}
    for name, distilled, steps, scale in [("distilled", True, 4, 1.0), ("base", False, 6, 4.0)]:
        pipe = Flux2KleinPipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=None,
            tokenizer=None,
            transformer=plain,
            is_distilled=distilled,
        )
        pipe.set_progress_bar_config(disable=True)
        out = pipe(
            prompt_embeds=prompt,
            negative_prompt_embeds=negative,
            latents=noise,
            height=64,
            width=64,
            num_inference_steps=steps,
            guidance_scale=scale,
            output_type="pt",
        )
        images[name] = out.images
    save_file(
        {
            "prompt": prompt,
            "negative": negative,
            "noise": Flux2KleinPipeline._pack_latents(noise).contiguous(),
            "image_distilled": images["distilled"].contiguous(),
            "image_base": images["base"].contiguous(),
        },
        os.path.join(OUT, "pipeline.safetensors"),
    )
    assert (images["distilled"] - images["base"]).abs().max() > 1e-2, "CFG changed nothing"

    for name in sorted(os.listdir(OUT)):
        print(name)
    print(
        f"velocity |v| mean {v_plain.abs().mean():.4f}, guided differs by "
        f"{(v_plain - v_guided).abs().max():.4f}; image range "
        f"[{image.min():.3f}, {image.max():.3f}]"
    )


if __name__ == "__main__":
    sys.exit(main())
