//! FLUX.1 behind the family traits: [`Flux`] as a [`Denoiser`], [`TextEncoders`] (T5 + CLIP) as
//! a [`TextEncoder`], [`AutoEncoder`] (16 channels, 2x2 patches) as a [`LatentCodec`] and a
//! [`BandDecoder`], and the registry entry [`Flux1Family`].

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

use super::{Flux, FluxConfig};
use crate::collective::Communicator;
use crate::model::demo_weights::DemoWeights;
use crate::model::family::{
    BandDecoder, Denoiser, Family, LatentCodec, LatentSpec, PromptEmbedding, TextEncoder, TextSpec,
};
use crate::model::step::{BlockCtx, PosEmbed, StepInput, Streams};
use crate::model::text::TextEncoders;
use crate::model::vae::{AutoEncoder, Decoder};

/// FLUX.1's latent: 16 channels, 2x2 patches into 64-channel tokens, 8 pixels a latent pixel.
pub const LATENT: LatentSpec = LatentSpec {
    channels: 16,
    patch: 2,
    downscale: 8,
};

impl Denoiser for Flux {
    fn family(&self) -> &'static str {
        "flux1"
    }
    fn device(&self) -> &Device {
        Flux::device(self)
    }
    fn dtype(&self) -> DType {
        Flux::dtype(self)
    }
    fn num_blocks(&self) -> usize {
        self.config().num_blocks()
    }
    fn num_heads(&self) -> usize {
        self.config().num_heads
    }
    fn hidden_size(&self) -> usize {
        self.config().hidden_size
    }
    fn block_params(&self) -> Vec<u64> {
        self.config().block_params()
    }
    fn text_spec(&self) -> TextSpec {
        let c = self.config();
        TextSpec {
            txt_dim: c.context_in_dim,
            pooled_dim: Some(c.vec_in_dim),
            guidance_embed: c.guidance_embed,
        }
    }
    fn token_channels(&self) -> usize {
        self.config().out_channels()
    }
    fn cond_channels(&self) -> usize {
        self.config().cond_channels()
    }
    fn pos_embed(&self, txt_len: usize, h: usize, w: usize) -> Result<PosEmbed> {
        Flux::pos_embed(self, txt_len, h, w)
    }
    fn conditioning(&self, input: &StepInput) -> Result<Tensor> {
        Flux::conditioning(self, input)
    }
    fn embed_streams(&self, input: &StepInput) -> Result<Streams> {
        Flux::embed_streams(self, input)
    }
    fn embed(&self, input: &StepInput) -> Result<(Streams, BlockCtx)> {
        Flux::embed(self, input)
    }
    fn run_blocks(&self, s: Streams, ctx: &BlockCtx, range: Range<usize>) -> Result<Streams> {
        Flux::run_blocks(self, s, ctx, range)
    }
    fn final_layer(&self, img: &Tensor, ctx: &BlockCtx) -> Result<Tensor> {
        Flux::final_layer(self, img, ctx)
    }
    fn forward(&self, input: &StepInput) -> Result<Tensor> {
        Flux::forward(self, input)
    }
    /// None: a sequence-parallel group is held by the replica wrapping the model
    /// ([`crate::parallel::replica::SpReplica`]).
    fn sp_group(&self) -> Option<&Arc<dyn Communicator>> {
        None
    }
    fn held_blocks(&self) -> Range<usize> {
        Flux::held_blocks(self)
    }
    fn keep_blocks(&self, blocks: Range<usize>) -> Arc<dyn Denoiser> {
        Arc::new(self.clone().only_blocks(blocks))
    }
    fn weight_bytes(&self) -> usize {
        Flux::weight_bytes(self)
    }
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn fp8_attention(&self) -> bool {
        self.attention().fp8_scores()
    }
    fn with_fp8_attention(&self, on: bool) -> Option<Arc<dyn Denoiser>> {
        Some(Arc::new(self.clone().with_fp8_attention(on)))
    }
}

impl TextEncoder for TextEncoders {
    fn text_spec(&self) -> TextSpec {
        TextSpec {
            txt_dim: self.t5_dim(),
            pooled_dim: Some(self.clip_dim()),
            guidance_embed: false,
        }
    }
    fn encode_prompt(&self, prompt: &str, dtype: DType) -> crate::Result<PromptEmbedding> {
        let e = self.encode_as(prompt, dtype)?;
        Ok(PromptEmbedding {
            txt: e.txt,
            pooled: Some(e.vec),
            notes: e.notes,
        })
    }
    fn device(&self) -> &Device {
        TextEncoders::device(self)
    }
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

impl LatentCodec for AutoEncoder {
    fn latent_spec(&self) -> LatentSpec {
        LatentSpec {
            channels: self.config().z_channels,
            ..LATENT
        }
    }
    fn decode_latent(&self, z: &Tensor) -> Result<Tensor> {
        self.decode(z)
    }
    fn device(&self) -> &Device {
        AutoEncoder::device(self)
    }
    fn dtype(&self) -> DType {
        AutoEncoder::dtype(self)
    }
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
    fn band_decoder(&self) -> Option<&dyn BandDecoder> {
        Some(self)
    }
}

/// FLUX.1's autoencoder: its shift and scale undone, then the decoder.
impl BandDecoder for AutoEncoder {
    fn decoder_input(&self, z: &Tensor) -> Result<Tensor> {
        self.check_latent(z)?;
        self.unscale_latent(&z.to_dtype(self.dtype())?)
    }
    fn decoder(&self) -> &Decoder {
        AutoEncoder::decoder(self)
    }
}

/// FLUX.1 (dev, schnell and their fine-tunes) in the family registry.
#[derive(Debug, Clone, Copy, Default)]
pub struct Flux1Family;

impl Family for Flux1Family {
    fn name(&self) -> &'static str {
        "flux1"
    }

    /// Black Forest Labs' names (any of ComfyUI's prefixes) or diffusers', with FLUX.1's pooled
    /// text embedder (`vector_in`, diffusers' `time_text_embed.text_embedder`).
    fn recognises(&self, tensor_names: &[&str]) -> bool {
        let has = |suffix: &str| tensor_names.iter().any(|n| n.ends_with(suffix));
        (has("double_blocks.0.img_attn.qkv.weight") && has("vector_in.in_layer.weight"))
            || (has("transformer_blocks.0.attn.to_q.weight")
                && has("time_text_embed.text_embedder.linear_1.weight"))
    }

    fn tiny_transformer(
        &self,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Arc<dyn Denoiser>> {
        let vb = DemoWeights::new(seed).var_builder(dtype, device);
        Ok(Arc::new(Flux::new(&FluxConfig::tiny(), vb)?))
    }
}
