#!/usr/bin/env python3
"""Reference output of diffusers' FluxFillPipeline on a tiny FLUX.1 Fill transformer with seeded
weights, for tests/img2img.rs (issue 29 part 2: FLUX.1 Fill checkpoints).

A Fill transformer's input projection takes 384 channels: the packed noisy latent (64), the
packed latent of the source with the masked area zeroed (64) and the mask at image resolution,
each 8x8 pixel block made 64 channels, packed 2x2 (256).

Uses the tiny autoencoder, source, mask, prompt embeddings and noise of
scripts/img2img-reference.py (run that first) and writes tests/fixtures/img2img/fill/:
  transformer/{config.json, diffusion_pytorch_model.safetensors}   the tiny Fill transformer
  reference.safetensors   fill: the pipeline's image in [0, 1] (output_type "pt");
                          masked_image_latents: the (1, N, 320) conditioning it built

Runs in f32 on the CPU, the noise and the posterior mean pinned as in img2img-reference.py.

Run: OMP_NUM_THREADS=1 nice -n 10 /work/pyref/bin/python scripts/fill-reference.py
"""

import importlib.util
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from diffusers import AutoencoderKL, FluxFillPipeline
from diffusers.pipelines.flux import pipeline_flux_fill

HERE = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("img2img_reference", os.path.join(HERE, "img2img-reference.py"))
ref = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ref)

OUT = os.path.join(ref.OUT, "fill")
STEPS, STRENGTH = 4, 1.0
GUIDANCE = 30.0

torch.set_grad_enabled(False)


def main():
    os.makedirs(os.path.join(OUT, "transformer"), exist_ok=True)
    transformer = ref.tiny_transformer(in_channels=384, seeds=(5, 6))
    transformer.save_pretrained(os.path.join(OUT, "transformer"), safe_serialization=True)
    vae = AutoencoderKL.from_pretrained(os.path.join(ref.OUT, "vae")).eval()
    f = load_file(os.path.join(ref.OUT, "reference.safetensors"))
    noise = f["noise"]

    def fixed_noise(shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(noise.shape), (shape, noise.shape)
        return noise.clone().to(dtype=dtype)

    def posterior_mean(encoder_output, generator=None, sample_mode="sample"):
        return encoder_output.latent_dist.mode()

    pipeline_flux_fill.randn_tensor = fixed_noise
    pipeline_flux_fill.retrieve_latents = posterior_mean

    src = Image.open(os.path.join(ref.OUT, "source.png")).convert("RGB")
    mask = Image.open(os.path.join(ref.OUT, "mask.png"))
    pipe = FluxFillPipeline(
        scheduler=ref.scheduler(),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    seen = {}
    forward = transformer.forward

    def watch(hidden_states=None, **kw):
        seen.setdefault("cond", hidden_states[..., 64:].clone())
        return forward(hidden_states=hidden_states, **kw)

    transformer.forward = watch
    out = pipe(
        image=src,
        mask_image=mask,
        prompt_embeds=f["prompt_embeds"],
        pooled_prompt_embeds=f["pooled_prompt_embeds"],
        guidance_scale=GUIDANCE,
        width=ref.WIDTH,
        height=ref.HEIGHT,
        num_inference_steps=STEPS,
        strength=STRENGTH,
        output_type="pt",
    ).images
    tensors = {
        "fill": out.float().contiguous(),
        "masked_image_latents": seen["cond"].float().contiguous(),
    }
    meta = {"fill": json.dumps({"steps": STEPS, "strength": STRENGTH, "guidance": GUIDANCE})}
    save_file(tensors, os.path.join(OUT, "reference.safetensors"), metadata=meta)
    src01 = torch.from_numpy(np.asarray(src, np.float32) / 255.0).permute(2, 0, 1)[None]
    d = (tensors["fill"] - src01).abs()
    print(f"fill: mean |out - source| {d.mean():.4f}, max {d.max():.4f}", file=sys.stderr)
    print("done", file=sys.stderr)


if __name__ == "__main__":
    main()
