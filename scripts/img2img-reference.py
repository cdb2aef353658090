#!/usr/bin/env python3
"""Reference outputs of diffusers' FluxImg2ImgPipeline and FluxInpaintPipeline on tiny FLUX.1
components with seeded weights, for tests/img2img.rs (issue 29 part 2).

Writes tests/fixtures/img2img/:
  transformer/{config.json, diffusion_pytorch_model.safetensors}   a tiny FluxTransformer2DModel
  vae/{config.json, diffusion_pytorch_model.safetensors}           a tiny AutoencoderKL (8x down)
  source.png, mask.png                                             the source image and its mask
  reference.safetensors   prompt_embeds, pooled_prompt_embeds, noise (1, 16, H/8, W/8) and the
                          pipelines' images in [0, 1] (output_type "pt"): img2img, inpaint

Both pipelines run in f32 on the CPU. Two things are pinned so that Parallax can reproduce them:
- the initial noise: the pipelines draw it with `randn_tensor`; this script replaces that
  function in both pipeline modules by one that returns the stored noise;
- the source latent: the posterior mean (`retrieve_latents(..., sample_mode="argmax")`) instead
  of a sample, as Parallax encodes (issue 29: "with the posterior mean rather than a sampled
  latent").

Run: OMP_NUM_THREADS=1 nice -n 10 /work/pyref/bin/python scripts/img2img-reference.py
"""

import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxTransformer2DModel,
)
from diffusers.pipelines.flux import pipeline_flux_img2img, pipeline_flux_inpaint

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "img2img")

WIDTH, HEIGHT = 80, 48  # a 10x6 latent, 5x3 patches: not square, rows != columns
TXT_LEN = 7
GUIDANCE = 3.5
# image-to-image: 4 steps at strength 0.6 (diffusers: t_start = int(4 - 2.4) = 1, 3 steps run)
I2I_STEPS, I2I_STRENGTH = 4, 0.6
# inpainting: 6 steps at strength 0.7 (t_start = int(6 - 4.2) = 1, 5 steps run)
INP_STEPS, INP_STRENGTH = 6, 0.7

torch.manual_seed(0)
torch.set_grad_enabled(False)


def tiny_transformer(in_channels=64, seeds=(1, 2)):
    """The tiny transformer; `in_channels` 384 makes it a FLUX.1 Fill one (scripts/fill-reference.py)."""
    torch.manual_seed(seeds[0])
    m = FluxTransformer2DModel(
        patch_size=1,
        in_channels=in_channels,
        out_channels=64,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    # The default initialisation leaves some layers near zero; seeded normal weights make every
    # path matter.
    g = torch.Generator().manual_seed(seeds[1])
    for name, p in m.named_parameters():
        fan_in = p.shape[-1] if p.dim() > 1 else 1
        scale = 1.0 / np.sqrt(fan_in) if p.dim() > 1 else 0.1
        p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if "norm" in name and p.dim() == 1 and "weight" in name else 0.0))
    return m.eval()


def tiny_vae():
    torch.manual_seed(3)
    v = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=4,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )
    return v.eval()


def scheduler():
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def source_image():
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float64)
    r = 127 + 120 * np.sin(x / 9.0)
    g = 127 + 120 * np.cos(y / 7.0)
    b = 127 + 120 * np.sin((x + y) / 13.0)
    img = np.stack([r, g, b], -1)
    img[14:34, 20:44] = [230, 40, 40]  # a red box the mask covers
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")


def mask_image():
    m = np.zeros((HEIGHT, WIDTH), np.uint8)
    m[10:38, 16:50] = 255  # white = repaint
    return Image.fromarray(m, "L")


def main():
    os.makedirs(os.path.join(OUT, "transformer"), exist_ok=True)
    os.makedirs(os.path.join(OUT, "vae"), exist_ok=True)
    transformer = tiny_transformer()
    vae = tiny_vae()
    transformer.save_pretrained(os.path.join(OUT, "transformer"), safe_serialization=True)
    vae.save_pretrained(os.path.join(OUT, "vae"), safe_serialization=True)

    g = torch.Generator().manual_seed(4)
    prompt_embeds = torch.randn((1, TXT_LEN, 32), generator=g)
    pooled = torch.randn((1, 32), generator=g)
    noise = torch.randn((1, 16, HEIGHT // 8, WIDTH // 8), generator=g)

    def fixed_noise(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(noise.shape), (shape, noise.shape)
        return noise.clone().to(dtype=dtype)

    def posterior_mean(encoder_output, generator=None, sample_mode="sample"):
        return encoder_output.latent_dist.mode()

    for mod in (pipeline_flux_img2img, pipeline_flux_inpaint):
        mod.randn_tensor = fixed_noise
        mod.retrieve_latents = posterior_mean

    src, mask = source_image(), mask_image()
    src.save(os.path.join(OUT, "source.png"))
    mask.save(os.path.join(OUT, "mask.png"))

    parts = dict(
        scheduler=scheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    common = dict(
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled,
        guidance_scale=GUIDANCE,
        width=WIDTH,
        height=HEIGHT,
        output_type="pt",
    )
    i2i = FluxImg2ImgPipeline(**parts)
    out_i2i = i2i(image=src, num_inference_steps=I2I_STEPS, strength=I2I_STRENGTH, **common).images
    parts["scheduler"] = scheduler()
    inp = FluxInpaintPipeline(**parts)
    out_inp = inp(
        image=src, mask_image=mask, num_inference_steps=INP_STEPS, strength=INP_STRENGTH, **common
    ).images

    # Also the posterior mean of the source alone, to check the encoder on its own.
    src_t = i2i.image_processor.preprocess(src, height=HEIGHT, width=WIDTH).float()
    mean = vae.encode(src_t).latent_dist.mode()
    scaled = (mean - vae.config.shift_factor) * vae.config.scaling_factor

    tensors = {
        "prompt_embeds": prompt_embeds.contiguous(),
        "pooled_prompt_embeds": pooled.contiguous(),
        "noise": noise.contiguous(),
        "source_latent": scaled.contiguous(),
        "img2img": out_i2i.float().contiguous(),
        "inpaint": out_inp.float().contiguous(),
    }
    meta = {
        "width": str(WIDTH),
        "height": str(HEIGHT),
        "guidance": str(GUIDANCE),
        "img2img": json.dumps({"steps": I2I_STEPS, "strength": I2I_STRENGTH}),
        "inpaint": json.dumps({"steps": INP_STEPS, "strength": INP_STRENGTH}),
    }
    save_file(tensors, os.path.join(OUT, "reference.safetensors"), metadata=meta)
    # How much the outputs depend on what is tested: the images differ from the source and
    # from each other by clearly more than 1/255.
    src01 = src_t / 2 + 0.5
    for k in ("img2img", "inpaint"):
        d = (tensors[k] - src01).abs()
        print(f"{k}: mean |out - source| {d.mean():.4f}, max {d.max():.4f}", file=sys.stderr)
    # Outside the mask the inpainted image keeps the source (up to the autoencoder's round trip).
    print("done", file=sys.stderr)


if __name__ == "__main__":
    main()
