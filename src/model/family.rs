//! Model families behind traits: what the pipeline, the cache policies and the parallel strategies
//! use of a family's transformer ([`Denoiser`]), of its text encoders ([`TextEncoder`]) and of its
//! latent autoencoder ([`LatentCodec`], and [`BandDecoder`] where its decoder can be split into
//! row bands), and the registry that maps a name or a checkpoint's tensor names to a family
//! ([`Family`], [`families`], [`register`]).
//!
//! FLUX.1 ([`crate::model::flux1`]) is the built-in family. What differs between families is the
//! family's own: RoPE axes and theta, the latent's channels and patching, whether the text
//! encoder gives a pooled vector, the blocks' layout and parameter counts. What every family
//! shares is the stage API's data ([`crate::model::step`]): one step's input, the image and text
//! token streams between blocks and the per-step block context.

use std::ops::Range;
use std::sync::{Arc, RwLock};

use candle_core::{DType, Device, Result, Tensor};

use crate::collective::Communicator;
pub use crate::model::step::{BlockCtx, PosEmbed, StepInput, Streams};

/// What conditioning a family's transformer takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextSpec {
    /// Width of the text hidden states each token carries.
    pub txt_dim: usize,
    /// Width of the pooled text vector; `None` for a family without one (its
    /// [`StepInput::y`] is a (B, 0) tensor).
    pub pooled_dim: Option<usize>,
    /// Whether the transformer embeds a guidance strength (distilled guidance).
    pub guidance_embed: bool,
}

/// A family's transformer as the stage API sees it: embed one step's input, run a range of its
/// blocks (numbered from 0, whatever kinds of block the family has), and the final layer back to
/// packed latent tokens. Cache policies run blocks in pieces through it; the sequence-parallel
/// strategies shard inside [`Denoiser::embed`] and gather inside [`Denoiser::final_layer`].
pub trait Denoiser: Send + Sync + std::fmt::Debug {
    /// The family's registry name (`"flux1"`).
    fn family(&self) -> &'static str;
    fn device(&self) -> &Device;
    fn dtype(&self) -> DType;
    /// Blocks in the unified numbering [`Denoiser::run_blocks`] takes.
    fn num_blocks(&self) -> usize;
    /// Attention heads of every block (what Ulysses splits).
    fn num_heads(&self) -> usize;
    /// Width of the token streams.
    fn hidden_size(&self) -> usize;
    /// Parameters of each block, in the unified numbering (what a pipeline balances).
    fn block_params(&self) -> Vec<u64>;
    /// The conditioning the transformer takes.
    fn text_spec(&self) -> TextSpec;
    /// Width of a packed latent token, in and out.
    fn token_channels(&self) -> usize;
    /// Channels of fixed conditioning joined after the latent's in every step's input (a FLUX.1
    /// Fill checkpoint's masked source and mask); 0 for most models.
    fn cond_channels(&self) -> usize {
        0
    }
    /// RoPE tables for `txt_len` text tokens and an `h` x `w` grid of image tokens (the family's
    /// axes and theta).
    fn pos_embed(&self, txt_len: usize, h: usize, w: usize) -> Result<PosEmbed>;
    /// The conditioning vector (B, hidden) every block modulates with: timestep, guidance and
    /// pooled text as the family embeds them.
    fn conditioning(&self, input: &StepInput) -> Result<Tensor>;
    /// The input projections of the token streams.
    fn embed_streams(&self, input: &StepInput) -> Result<Streams>;
    /// Input projections and the block context, for every token of `input` (a
    /// sequence-parallel replica hands in its shard and sets the context's shards and attention).
    fn embed(&self, input: &StepInput) -> Result<(Streams, BlockCtx)> {
        let vec = self.conditioning(input)?;
        let ctx = BlockCtx {
            vec,
            pe: input.pe.clone(),
            shards: None,
            attention: None,
        };
        Ok((self.embed_streams(input)?, ctx))
    }
    /// Run blocks `range` of the unified numbering.
    fn run_blocks(&self, s: Streams, ctx: &BlockCtx, range: Range<usize>) -> Result<Streams>;
    /// The final layer: predicted velocity (B, N, token channels), every rank's tokens.
    fn final_layer(&self, img: &Tensor, ctx: &BlockCtx) -> Result<Tensor>;
    /// The whole transformer on one step's input.
    fn forward(&self, input: &StepInput) -> Result<Tensor>;
    /// The sequence-parallel group this replica is a rank of, if any (cache policies reduce their
    /// measures over it).
    fn sp_group(&self) -> Option<&Arc<dyn Communicator>>;
    /// The blocks this replica holds (a pipeline stage's share), as a range of the numbering.
    fn held_blocks(&self) -> Range<usize>;
    /// This model holding only the blocks `blocks` (a pipeline stage's share; a family may keep
    /// more, [`Denoiser::held_blocks`] says what it holds).
    fn keep_blocks(&self, blocks: Range<usize>) -> Arc<dyn Denoiser>;
    /// Bytes the weights hold on their device.
    fn weight_bytes(&self) -> usize;
    /// The model as its own type, for a family's own features (FLUX.1's FP8 groups and LoRAs);
    /// `None` where the family offers none.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
    /// Whether attention's scores come from E4M3 queries and keys (the load option
    /// `fp8_attention`): the parallel strategies, which call the attention kernels themselves,
    /// ask the model they run.
    fn fp8_attention(&self) -> bool {
        false
    }
    /// This model with FP8 attention on or off (a shallow copy of its weights' handles); `None`
    /// where the family cannot.
    fn with_fp8_attention(&self, on: bool) -> Option<Arc<dyn Denoiser>> {
        let _ = on;
        None
    }
}

/// A transformer's parameters by kind: what a memory estimate counts (and FP8 converts). A
/// family writes its formula once (FLUX.1: [`crate::model::flux1::FluxConfig::block_param_counts`]);
/// [`Denoiser::block_params`] is each block's [`ParamCounts::total`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParamCounts {
    /// Weights of the blocks' products (attention projections and MLPs).
    pub products: u64,
    /// Output rows of those products (one FP8 scale each).
    pub product_rows: u64,
    /// Weights of the adaLN modulations.
    pub modulations: u64,
    /// Output rows of the modulations.
    pub modulation_rows: u64,
    /// Everything else: biases, norms, embedders, the final layer.
    pub other: u64,
}

impl ParamCounts {
    /// Every parameter.
    pub fn total(&self) -> u64 {
        self.products + self.modulations + self.other
    }

    /// What a device holding only `held` of the blocks (`blocks[i]`: block i's counts, the
    /// unified numbering) keeps: those blocks and everything `outside` them.
    pub fn held(blocks: &[Self], outside: Self, held: std::ops::Range<usize>) -> Self {
        let start = held.start.min(blocks.len());
        let end = held.end.clamp(start, blocks.len());
        blocks[start..end].iter().copied().sum::<Self>() + outside
    }
}

impl std::ops::Add for ParamCounts {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self {
            products: self.products + o.products,
            product_rows: self.product_rows + o.product_rows,
            modulations: self.modulations + o.modulations,
            modulation_rows: self.modulation_rows + o.modulation_rows,
            other: self.other + o.other,
        }
    }
}

impl std::iter::Sum for ParamCounts {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), |a, b| a + b)
    }
}

/// A strategy that runs whole forward passes over several devices itself (PipeFusion), given
/// the replica whose stage API it calls. Cache policies call the stage API directly and bypass
/// it; the strategies that use one refuse them.
pub trait ForwardPlan: Send + Sync {
    /// The predicted velocity (B, N, token channels) for the whole input, on every rank.
    fn forward(&self, model: &dyn Denoiser, input: &StepInput) -> Result<Tensor>;
}

/// A prompt as a family's transformer takes it.
#[derive(Debug, Clone)]
pub struct PromptEmbedding {
    /// Hidden states (1, L, [`TextSpec::txt_dim`]).
    pub txt: Tensor,
    /// Pooled vector (1, [`TextSpec::pooled_dim`]) where the family has one.
    pub pooled: Option<Tensor>,
    /// What the user should know about the encoding (e.g. that the prompt was cut).
    pub notes: Vec<String>,
}

/// A family's text encoding, prompt to conditioning: FLUX.1's is T5 + CLIP; a family with one
/// decoder LM joins hidden states of some of its layers and has no pooled vector.
pub trait TextEncoder: Send + Sync {
    /// The widths it produces (`guidance_embed` is the transformer's, false here).
    fn text_spec(&self) -> TextSpec;
    /// `prompt` encoded, in `dtype`.
    fn encode_prompt(&self, prompt: &str, dtype: DType) -> crate::Result<PromptEmbedding>;
    fn device(&self) -> &Device;
    /// The encoder as its own type, for a family's own features; `None` where it offers none.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
}

/// How a family's latent looks and packs into tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatentSpec {
    /// Latent channels (FLUX.1: 16).
    pub channels: usize,
    /// Side of the square patch of latent pixels one token holds (FLUX.1: 2).
    pub patch: usize,
    /// Image pixels per latent pixel along a side (FLUX.1: 8).
    pub downscale: usize,
}

impl LatentSpec {
    /// Width of one packed token: channels x patch².
    pub fn token_channels(&self) -> usize {
        self.channels * self.patch * self.patch
    }

    /// (B, C, H, W) latent -> (B, H/p * W/p, C p²) tokens, channel-major within a token.
    pub fn pack(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.patch;
        let (b, c, h, w) = x.dims4()?;
        x.reshape((b, c, h / p, p, w / p, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b, (h / p) * (w / p), c * p * p))
    }

    /// Inverse of [`LatentSpec::pack`] for a latent of `h` x `w` latent pixels.
    pub fn unpack(&self, x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let p = self.patch;
        let (b, _n, cp) = x.dims3()?;
        let c = cp / (p * p);
        x.reshape((b, h / p, w / p, c, p, p))?
            .permute((0, 3, 1, 4, 2, 5))?
            .reshape((b, c, h, w))
    }
}

/// A family's latent autoencoder: the latent's shape and packing, and decoding (what the
/// pipeline and the preview fit use). Normalisation of the latent (FLUX.1's shift and scale, a
/// family's batch-norm statistics) is the codec's own, inside [`LatentCodec::decode`].
pub trait LatentCodec: Send + Sync {
    fn latent_spec(&self) -> LatentSpec;
    /// A sampled latent (B, C, H, W), as the transformer denoises it, to pixels (B, 3, 8H, 8W)
    /// in [-1, 1].
    fn decode_latent(&self, z: &Tensor) -> Result<Tensor>;
    fn device(&self) -> &Device;
    /// The dtype its weights hold.
    fn dtype(&self) -> DType;
    /// The autoencoder as its own type, for a family's own features (FLUX.1's image-to-image
    /// encoder); `None` where it offers none.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
    /// The autoencoder as a [`BandDecoder`], where its decoder is FLUX.1's kind (the parallel
    /// layouts then decode it in row bands over their workers); `None`: it decodes on one.
    fn band_decoder(&self) -> Option<&dyn BandDecoder> {
        None
    }
}

/// A latent autoencoder whose decoder is FLUX.1's convolutional decoder
/// ([`crate::model::vae::Decoder`]: 3x3 convolutions, GroupNorm, one middle attention,
/// nearest-neighbour upsampling), whatever comes before it. The parallel layouts split such a
/// decode into row bands over their workers ([`crate::parallel::vae`]); a family whose
/// autoencoder has this decoder implements the trait (and returns itself from
/// [`LatentCodec::band_decoder`]) and gets the split decode on every layout.
pub trait BandDecoder: LatentCodec {
    /// The latent as the transformer denoises it (B, C, H, W), whole, to the decoder's input
    /// (B, z, H, W) in the weights' dtype: the family's de-normalisation (FLUX.1's shift and
    /// scale, FLUX.2's batch-norm statistics over 2x2 patches) and any per-pixel layer before the
    /// decoder (FLUX.2's post-quant convolution). Every worker of a split decode runs it on the
    /// whole latent (work at the latent's resolution, small beside the decoder's) and takes its
    /// band of the result. [`LatentCodec::decode_latent`] must equal
    /// `decoder().forward(decoder_input(z))`.
    fn decoder_input(&self, z: &Tensor) -> Result<Tensor>;
    /// The decoder the bands run through.
    fn decoder(&self) -> &crate::model::vae::Decoder;
}

/// A model family in the registry: its name, how its checkpoints are told apart, and its tiny
/// transformer for tests and `random:` models.
pub trait Family: Send + Sync {
    /// The registry name (`"flux1"`).
    fn name(&self) -> &'static str;
    /// Whether a transformer checkpoint with these tensor names is this family's.
    fn recognises(&self, tensor_names: &[&str]) -> bool;
    /// A small transformer of this family with weights made from `seed` (tests, `random:`).
    fn tiny_transformer(
        &self,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Arc<dyn Denoiser>>;
}

/// The registry: the families built in (listed beside the model floor's modules,
/// [`crate::model::builtin_families`], so this file names no family), then those registered.
fn registry() -> &'static RwLock<Vec<Arc<dyn Family>>> {
    static REGISTRY: std::sync::OnceLock<RwLock<Vec<Arc<dyn Family>>>> = std::sync::OnceLock::new();
    REGISTRY.get_or_init(|| RwLock::new(crate::model::builtin_families()))
}

/// Add a family at run time (a plug-in, or a test's own family). A family of the same name is
/// replaced.
pub fn register(family: Arc<dyn Family>) {
    let mut all = registry().write().unwrap_or_else(|e| e.into_inner());
    all.retain(|f| f.name() != family.name());
    all.push(family);
}

/// Every registered family, built-in first.
pub fn families() -> Vec<Arc<dyn Family>> {
    registry().read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The family registered under `name`.
pub fn family(name: &str) -> Option<Arc<dyn Family>> {
    families().into_iter().find(|f| f.name() == name)
}

/// The family whose checkpoints have these tensor names, if one recognises them.
pub fn detect(tensor_names: &[&str]) -> Option<Arc<dyn Family>> {
    families().into_iter().find(|f| f.recognises(tensor_names))
}
