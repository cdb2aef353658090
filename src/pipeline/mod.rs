//! Text to image: the loaded models, settings, and one image's generation from prompt to pixels.
//!
//! - [`schedule`]: flow-matching timesteps (dev's shifted schedule, schnell's linear one).
//! - [`sampler`]: the Euler denoising loop.
//! - [`cache`]: cache policies (First Block Cache).
//! - [`image`]: RGB images and PNG files with their settings.
//! - [`exif`]: settings in JPEG and WebP files (an EXIF block).
//! - [`metadata`]: settings as Automatic1111 and ComfyUI write them, read back from any file.

pub mod ahead;
pub mod cache;
pub mod exif;
pub mod image;
pub mod img2img;
pub mod metadata;
pub mod metrics;
pub mod preview;
pub mod sampler;
pub mod schedule;

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{CandleResultExt, Error, Result};
use crate::model::demo_weights::DemoWeights;
use crate::model::export::DemoSeeds;
use crate::model::family::{BandDecoder, Denoiser, Family, LatentCodec, LatentSpec, TextEncoder};
use crate::model::flux::{Flux, FluxConfig, Fp8Groups};
use crate::model::klein::RandomKlein;
use crate::model::layout::{self, ModelFiles, ModelSpec, Resolved, VaeLayout, Variant};
use crate::model::lora::{LoraChoice, LoraSet};
use crate::model::rng;
use crate::model::text::{T5Residency, TextEncoders};
use crate::model::vae::{self, AutoEncoder, VaeConfig};
use crate::model::weights::{Identity, KeyMap, MappedWeights, SafetensorsSet};

use self::ahead::TextFirst as _;
use self::cache::{CacheSpec, CacheStats, MagCalibration, StepKind};
use self::image::RgbImage;
use self::sampler::{Conditioning, StepInfo};

/// What to generate. `None` fields take the model's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    pub prompt: String,
    /// The negative prompt of true classifier-free guidance (used when `true_cfg` > 1).
    pub negative_prompt: Option<String>,
    /// True CFG scale: `v = v_neg + true_cfg * (v_pos - v_neg)`; 1 (the default) turns it off.
    #[serde(default)]
    pub true_cfg: Option<f64>,
    pub width: usize,
    pub height: usize,
    pub steps: Option<usize>,
    pub seed: u64,
    pub guidance: Option<f64>,
    /// First Block Cache `residual_diff_threshold`; 0 turns caching off.
    pub cache_threshold: f64,
    /// Another cache policy and its settings (DBCache, TaylorSeer, MagCache, or First Block
    /// Cache spelt out); when set it replaces `cache_threshold`.
    #[serde(default)]
    pub cache: Option<CacheSpec>,
    /// LoRAs with their strengths, beside the transformer's layers for this request only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraChoice>,
    /// Image-to-image (and inpainting, with a mask) from a source image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<img2img::InitImage>,
}

impl GenerateRequest {
    /// The cache policy asked for: `cache` when set, else First Block Cache at `cache_threshold`
    /// (0: none).
    pub fn cache_spec(&self) -> CacheSpec {
        self.cache
            .clone()
            .unwrap_or_else(|| CacheSpec::from_threshold(self.cache_threshold))
    }
}

impl Default for GenerateRequest {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: None,
            true_cfg: None,
            width: 1024,
            height: 1024,
            steps: None,
            seed: 0,
            guidance: None,
            cache_threshold: 0.0,
            cache: None,
            loras: Vec::new(),
            init: None,
        }
    }
}

/// Every setting that went into an image, as stored in its PNG.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationSettings {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    /// True CFG scale (1 = off).
    #[serde(default = "one")]
    pub true_cfg: f64,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub seed: u64,
    pub guidance: f64,
    pub cache_threshold: f64,
    /// The cache policy when it is not First Block Cache (whose threshold is `cache_threshold`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheSpec>,
    /// The model as the user named it (path, repo id or `demo`).
    pub model: String,
    /// The LoRAs on, with their strengths (files as the user named them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraChoice>,
    pub variant: Variant,
    /// Made-up weights (demo or random model): the image is not FLUX.1's.
    #[serde(default)]
    pub synthetic: bool,
    pub dtype: String,
    pub sampler: String,
    pub schedule: String,
    pub noise: String,
    pub parallax_version: String,
    /// The source image, strength and mask of image-to-image or inpainting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<img2img::InitImage>,
}

impl GenerationSettings {
    /// PNG text chunks: `parallax` (the JSON to reproduce it) and `parameters` in the layout
    /// Automatic1111 and civitai read ([`metadata::a1111_parameters`]).
    pub fn png_text(&self) -> Result<Vec<(String, String)>> {
        let json = serde_json::to_string(self)
            .map_err(|e| Error::Image(format!("cannot serialise settings: {e}")))?;
        let mut text = vec![
            ("parallax".to_string(), json),
            ("prompt".to_string(), self.prompt.clone()),
            ("parameters".to_string(), metadata::a1111_parameters(self)),
            (
                "Software".to_string(),
                format!("Parallax {}", self.parallax_version),
            ),
        ];
        if self.synthetic {
            text.push((
                "Comment".to_string(),
                "DEMO: made by Parallax's built-in demo model (tiny, trained on coloured shapes), not by FLUX.1"
                    .into(),
            ));
        }
        Ok(text)
    }

    /// Read settings back from a PNG's text chunks.
    pub fn from_png_text(text: &[(String, String)]) -> Result<Self> {
        let json = text
            .iter()
            .find(|(k, _)| k == "parallax")
            .map(|(_, v)| v)
            .ok_or_else(|| Error::Image("no `parallax` settings chunk in this PNG".into()))?;
        serde_json::from_str(json).map_err(|e| Error::Image(format!("bad settings chunk: {e}")))
    }

    /// The request that reproduces this image.
    pub fn to_request(&self) -> GenerateRequest {
        GenerateRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            true_cfg: Some(self.true_cfg),
            width: self.width,
            height: self.height,
            steps: Some(self.steps),
            seed: self.seed,
            guidance: Some(self.guidance),
            cache_threshold: self.cache_threshold,
            cache: self.cache.clone(),
            loras: self.loras.clone(),
            init: self.init.clone(),
        }
    }

    /// The cache policy this image was made with.
    pub fn cache_spec(&self) -> CacheSpec {
        self.cache
            .clone()
            .unwrap_or_else(|| CacheSpec::from_threshold(self.cache_threshold))
    }
}

fn one() -> f64 {
    1.0
}

/// Wall-clock times of one generation, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timings {
    pub text_ms: f64,
    pub steps_ms: Vec<f64>,
    /// Per step, the host's time to queue the step's work (see `StepInfo::queued`).
    #[serde(default)]
    pub steps_queued_ms: Vec<f64>,
    pub vae_ms: f64,
    pub total_ms: f64,
}

/// One finished image.
#[derive(Debug, Clone)]
pub struct Generated {
    pub image: RgbImage,
    pub settings: GenerationSettings,
    pub stats: CacheStats,
    pub timings: Timings,
    /// Things the user should know (prompt truncated, option ignored, ...).
    pub notes: Vec<String>,
}

/// Progress events of one generation.
#[derive(Debug)]
pub enum Progress<'a> {
    TextEncoded { ms: f64 },
    Step(&'a StepInfo<'a>),
    Decoded { ms: f64 },
}

/// Everything the denoising loop of one image needs.
#[derive(Debug, Clone)]
pub struct DenoiseJob {
    pub cond: Conditioning,
    /// The negative prompt's conditioning when true CFG is on.
    pub neg: Option<Conditioning>,
    pub true_cfg: f64,
    pub pe: crate::model::flux::PosEmbed,
    /// Packed initial noise (1, N, 64).
    pub x: Tensor,
    pub timesteps: Vec<f64>,
    pub guidance: f64,
    pub cache: CacheSpec,
    /// The model's MagCache calibration, where it has one.
    pub magcache: Option<Arc<MagCalibration>>,
    /// Inpainting's blend after each step (the source kept outside the mask).
    pub blend: Option<img2img::Blend>,
    /// A FLUX.1 Fill checkpoint's conditioning (1, N, 320), joined after the latent in every
    /// step's input ([`img2img::fill_conditioning`]).
    pub fill: Option<Tensor>,
}

impl DenoiseJob {
    /// This job's denoising loop on `flux` under `policy`, without true CFG (for tools that
    /// watch or measure the loop: calibration, FP8 error).
    pub fn denoise_with(
        &self,
        flux: &dyn Denoiser,
        policy: &mut dyn cache::CachePolicy,
        on_step: &mut dyn FnMut(&sampler::StepInfo) -> Result<()>,
    ) -> Result<(Tensor, CacheStats)> {
        sampler::denoise(
            flux,
            &self.cond,
            &self.pe,
            self.x.clone(),
            &self.timesteps,
            Some(self.guidance),
            policy,
            on_step,
        )
    }
}

/// How the models are loaded besides model, dtype and device: FP8 and what a memory budget
/// chooses ([`crate::engine::memory`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// The transformer's layers in FP8, converted as each block loads.
    pub fp8: Fp8Groups,
    /// Drop the weights in the run's dtype wherever a GPU E4M3 copy stands for them.
    pub lean: bool,
    /// Where T5 stays between prompts.
    pub t5: T5Residency,
    /// Only these blocks of the transformer (`start`, `end` of the unified numbering: a
    /// PipeFusion stage's share); `None`: all of them. Read from files, only they are read;
    /// random and demo models are made whole (the same weights) and the rest dropped.
    pub blocks: Option<(usize, usize)>,
    /// Attention's scores from E4M3 queries and keys ([`crate::kernels::flash_attn_fp8`]; the
    /// kernel on sm_90 GPUs in bf16, simulated on the CPU): on every device and every layout.
    pub fp8_attention: bool,
}

impl LoadOptions {
    /// The blocks to hold, of a transformer with `n`.
    pub fn block_range(&self, n: usize) -> std::ops::Range<usize> {
        self.blocks.map_or(0..n, |(a, b)| a.min(n)..b.min(n))
    }
}

/// Decodes a latent as the transformer denoises it (B, C, H/8, W/8) with the model's
/// autoencoder into an image tensor (B, 3, H, W): on one device, or in row bands over workers.
pub type LatentDecoder<'a> = dyn Fn(&dyn BandDecoder, &Tensor) -> Result<Tensor> + 'a;

/// A model loaded and ready: its transformer, text encoding and autoencoder behind the family
/// traits ([`Pipeline::model`]), whatever its family. FLUX.1's own features (FP8 groups, LoRAs,
/// image-to-image) reach its parts through [`Pipeline::flux1`].
pub struct Pipeline {
    /// The model's parts behind the family traits.
    pub model: FamilyModel,
    pub variant: Variant,
    /// How the user named the model.
    pub label: String,
    /// Random weights (`random:dev`): labelled like the demo model.
    pub synthetic: bool,
    /// The transformer with the last request's LoRAs, reused while they stay the same.
    pub lora_cache: LoraCache,
    /// The first job's prompts, encoded while the model loaded ([`ahead`]).
    pub ahead: ahead::AheadPrompts,
}

/// A model as the generate path runs it, whatever its family: its transformer, text encoder and
/// autoencoder behind the family traits, and the defaults of its sampling.
pub struct FamilyModel {
    pub denoiser: Arc<dyn Denoiser>,
    pub text: Box<dyn TextEncoder>,
    pub codec: Box<dyn LatentCodec>,
    /// Steps when the request names none.
    pub default_steps: usize,
    /// Distilled guidance when the request names none (0 for a family without it).
    pub default_guidance: f64,
    /// The family's timestep schedule.
    pub schedule: Schedule,
}

/// A family's flow-matching timestep schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// FLUX.1's: dev's shifted one (`true`), schnell's linear one (`false`).
    Flux1 { shifted: bool },
    /// FLUX.2's: mu fitted by image tokens and steps.
    Flux2,
}

impl Schedule {
    /// The `steps + 1` times for `tokens` image tokens.
    pub fn timesteps(&self, steps: usize, tokens: usize) -> Vec<f64> {
        match self {
            Self::Flux1 { shifted } => schedule::timesteps(steps, tokens, *shifted),
            Self::Flux2 => schedule::flux2_timesteps(steps, tokens),
        }
    }

    /// What an image's settings record of it.
    pub fn describe(&self) -> &'static str {
        match self {
            Self::Flux1 { shifted: true } => "shifted(mu: 0.5@256 -> 1.15@4096 tokens)",
            Self::Flux1 { shifted: false } => "linear",
            Self::Flux2 => "flux2(empirical mu by tokens and steps)",
        }
    }
}

/// FLUX.1's parts as their own types: what FLUX.1's own features use ([`Pipeline::flux1`]).
#[derive(Debug, Clone, Copy)]
pub struct Flux1<'a> {
    pub flux: &'a Flux,
    pub vae: &'a AutoEncoder,
    pub text: &'a TextEncoders,
}

impl FamilyModel {
    /// FLUX.1's transformer, autoencoder and T5 + CLIP, with `variant`'s defaults (a FLUX.1
    /// Fill transformer's guidance: [`img2img::FILL_GUIDANCE`]).
    pub fn flux1(flux: Flux, vae: AutoEncoder, text: TextEncoders, variant: Variant) -> Self {
        let default_guidance = if flux.config().is_fill() {
            img2img::FILL_GUIDANCE
        } else {
            variant.default_guidance()
        };
        Self {
            denoiser: Arc::new(flux),
            text: Box::new(text),
            codec: Box::new(vae),
            default_steps: variant.default_steps(),
            default_guidance,
            schedule: Schedule::Flux1 {
                shifted: variant.shifted_schedule(),
            },
        }
    }

    /// A `random:klein-*` model ([`crate::model::klein::random_stage`] and
    /// [`crate::model::klein::random_text_as`]), the transformer holding the blocks
    /// `opts.blocks` (a pipeline stage's share; all of them for a whole model), its `opts.fp8`
    /// product groups in E4M3 (none: as drawn; lean as `opts.lean` says) and Qwen3 kept or built
    /// for each prompt as `opts.t5` says: 4 steps by default, as the distilled klein runs.
    pub fn random_klein(
        kind: RandomKlein,
        dtype: DType,
        device: &Device,
        opts: LoadOptions,
    ) -> Result<Self> {
        let blocks = opts.block_range(kind.config().num_blocks());
        let (t, vae) =
            crate::model::klein::random_stage(kind, dtype, device, blocks, opts.fp8, opts.lean)?;
        let text = crate::model::klein::random_text_as(kind, dtype, device, opts.t5)?;
        Ok(Self::klein(Arc::new(t), Box::new(text), Box::new(vae)))
    }

    /// A FLUX.2 klein model from its parts: the distilled klein's defaults (4 steps, no
    /// guidance embedding), FLUX.2's schedule.
    pub fn klein(
        denoiser: Arc<dyn Denoiser>,
        text: Box<dyn TextEncoder>,
        codec: Box<dyn LatentCodec>,
    ) -> Self {
        Self {
            denoiser,
            text,
            codec,
            default_steps: 4,
            default_guidance: 0.0,
            schedule: Schedule::Flux2,
        }
    }

    /// FLUX.1's parts as their own types, when this model is FLUX.1's.
    pub fn as_flux1(&self) -> Option<Flux1<'_>> {
        Some(Flux1 {
            flux: self.denoiser.as_any()?.downcast_ref()?,
            vae: self.codec.as_any()?.downcast_ref()?,
            text: self.text.as_any()?.downcast_ref()?,
        })
    }
}

/// A transformer with LoRAs on, by the LoRAs (files with their size and time, strengths).
#[derive(Default)]
pub struct LoraCache(
    std::sync::Mutex<Option<(String, Flux)>>,
    /// Merge the LoRAs into the weights ([`Pipeline::set_lora_merge`]).
    std::sync::atomic::AtomicBool,
);

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("label", &self.label)
            .field("variant", &self.variant)
            .field("family", &self.model.denoiser.family())
            .field("denoiser", &self.model.denoiser)
            .finish()
    }
}

impl Pipeline {
    /// The built-in demo model: FLUX's structure at a tiny size, trained by Parallax on its own
    /// procedural scenes (see [`crate::model::demo`]), a byte-level tokenizer. Needs no files.
    /// Its images are labelled DEMO: they are not FLUX.1's.
    pub fn demo(device: &Device) -> Result<Self> {
        use crate::model::demo;
        let dtype = DType::F32;
        Ok(Self::of_flux1(
            demo::transformer(dtype, device)?,
            demo::autoencoder(dtype, device)?,
            demo::text_encoders(dtype, device)?,
            Variant::Demo,
            "demo",
            true,
        ))
    }

    /// A tiny model with FLUX's structure and made-up weights generated from fixed seeds
    /// (`random:tiny`): for tests that need a small model whose output is noise. Its images are
    /// labelled DEMO.
    pub fn tiny_random(device: &Device) -> Result<Self> {
        Self::tiny_random_as(&FluxConfig::tiny(), device)
    }

    /// [`Pipeline::tiny_random`] with the transformer of `cfg` (say a FLUX.1 Fill checkpoint's
    /// input channels on [`FluxConfig::tiny`]).
    pub fn tiny_random_as(cfg: &FluxConfig, device: &Device) -> Result<Self> {
        let dtype = DType::F32;
        let seeds = DemoSeeds::BUILTIN;
        let flux = Flux::new(cfg, DemoWeights::new(seeds.flux).var_builder(dtype, device))?;
        let vae = AutoEncoder::new(
            &VaeConfig::tiny(),
            DemoWeights::new(seeds.vae).var_builder(dtype, device),
        )?;
        let text = TextEncoders::demo(seeds.text, device)?;
        Ok(Self::of_flux1(
            flux,
            vae,
            text,
            Variant::Demo,
            "random:tiny",
            true,
        ))
    }

    /// FLUX.1's real architecture and sizes (transformer, autoencoder, T5-XXL, CLIP-L) with random
    /// weights generated on `device`, and the demo byte tokenizers: for speed and memory
    /// measurements without weights. Its images are noise and are labelled DEMO.
    pub fn random(variant: Variant, dtype: DType, device: &Device) -> Result<Self> {
        Self::random_with(variant, dtype, device, LoadOptions::default())
    }

    /// [`Pipeline::random`] loaded as `opts` says.
    pub fn random_with(
        variant: Variant,
        dtype: DType,
        device: &Device,
        opts: LoadOptions,
    ) -> Result<Self> {
        if variant == Variant::Demo {
            return Self::tiny_random(device);
        }
        let cfg = match variant {
            Variant::Schnell => FluxConfig::schnell(),
            _ => FluxConfig::dev(),
        };
        let flux = random_transformer(&cfg, dtype, device, opts)?;
        let (vae, text) = random_parts(&cfg, variant, dtype, device, opts)?;
        Ok(Self::of_flux1(
            flux,
            vae,
            text,
            variant,
            &format!("random:{}", variant.name()),
            true,
        ))
    }

    /// A pipeline of FLUX.1's parts.
    fn of_flux1(
        flux: Flux,
        vae: AutoEncoder,
        text: TextEncoders,
        variant: Variant,
        label: &str,
        synthetic: bool,
    ) -> Self {
        Self {
            model: FamilyModel::flux1(flux, vae, text, variant),
            variant,
            label: label.to_string(),
            synthetic,
            lora_cache: LoraCache::default(),
            ahead: Default::default(),
        }
    }

    /// Load a resolved model.
    pub fn load(resolved: &Resolved, label: &str, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with(resolved, label, dtype, device, LoadOptions::default())
    }

    /// Load a resolved model as `opts` says (FP8 groups converted at load; the demo model, built
    /// whole, is converted after).
    pub fn load_with(
        resolved: &Resolved,
        label: &str,
        dtype: DType,
        device: &Device,
        opts: LoadOptions,
    ) -> Result<Self> {
        let mut p = match &resolved.spec {
            ModelSpec::Demo => Self::demo(device)?,
            ModelSpec::Random(variant) => Self::random_with(*variant, dtype, device, opts)?,
            ModelSpec::RandomKlein(k) => Self::random_klein(*k, dtype, device, opts)?,
            ModelSpec::Klein(files) => Self::load_klein(files, label, dtype, device, opts)?,
            ModelSpec::Files(files) => Self::load_files_with(files, label, dtype, device, opts)?,
        };
        if !matches!(
            resolved.spec,
            ModelSpec::RandomKlein(_) | ModelSpec::Klein(_)
        ) {
            p.apply_load_options(opts)?;
        }
        p.set_fp8_attention(opts.fp8_attention)?;
        Ok(p)
    }

    /// Convert FLUX.1's transformer to `opts`' FP8 groups and cut it to its share of blocks,
    /// where loading did not already (the demo model, built whole).
    pub fn apply_load_options(&mut self, opts: LoadOptions) -> Result<()> {
        let p = self;
        let flux = p.flux1("FP8 and a share of the transformer's blocks")?.flux;
        let mut changed = None;
        if opts.fp8 != Fp8Groups::NONE && !flux.fp8_products() {
            changed = Some(flux.clone().with_fp8_in(opts.fp8)?);
        }
        let flux = changed.as_ref().unwrap_or(flux);
        let blocks = opts.block_range(flux.config().num_blocks());
        if flux.held_blocks() != blocks {
            changed = Some(flux.clone().only_blocks(blocks));
        }
        if let Some(f) = changed {
            p.set_flux1(f)?;
        }
        Ok(())
    }

    /// What an image's settings say of FP8 attention: nothing when off; the kernel's, the CPU's
    /// simulation, or exact attention where neither runs (a GPU other than sm_90, or not bf16:
    /// [`crate::kernels::flash_attn_fp8::attention`] falls back, and says so once).
    fn fp8_attention_label(&self) -> &'static str {
        let d = self.denoiser();
        if !d.fp8_attention() {
            return "";
        }
        if d.device().is_cpu() {
            return " + fp8 attention (simulated)";
        }
        let head_dim = d.hidden_size() / d.num_heads().max(1);
        if crate::kernels::flash_attn_fp8::kernel_runs_on(d.device(), d.dtype(), head_dim) {
            " + fp8 attention"
        } else {
            " (fp8 attention asked, exact on this gpu)"
        }
    }

    /// Turn FP8 attention on or off in the transformer, whatever its family (refused for a
    /// family whose model cannot).
    pub fn set_fp8_attention(&mut self, on: bool) -> Result<()> {
        let d = &self.model.denoiser;
        if d.fp8_attention() == on {
            return Ok(());
        }
        self.model.denoiser = d.with_fp8_attention(on).ok_or_else(|| {
            crate::Error::setting(
                "FP8 attention",
                "on",
                format!(
                    "the {} family's transformer has no FP8 attention: turn it off",
                    d.family()
                ),
            )
        })?;
        Ok(())
    }

    /// A `random:klein-*` model (FLUX.2 klein's structure, made-up weights: labelled DEMO), its
    /// block products in FP8 when asked, holding only `opts.blocks` of the transformer when
    /// asked (a PipeFusion stage on a GPU; the other blocks are never made).
    pub fn random_klein(
        kind: RandomKlein,
        dtype: DType,
        device: &Device,
        opts: LoadOptions,
    ) -> Result<Self> {
        Ok(Self {
            model: FamilyModel::random_klein(kind, dtype, device, opts)?,
            variant: Variant::Demo,
            label: format!("random:{}", kind.name()),
            synthetic: true,
            lora_cache: LoraCache::default(),
            ahead: Default::default(),
        })
    }

    /// FLUX.2 klein from its files ([`crate::model::klein::files`]): the transformer and Qwen3
    /// in `dtype` (the transformer's block products in FP8 when asked, converted as each block
    /// loads and lean as `opts.lean` says; only `opts.blocks` of it read when asked, a PipeFusion
    /// stage on a GPU; Qwen3 built for each prompt under `opts.t5`), the autoencoder in
    /// [`autoencoder_dtype`].
    pub fn load_klein(
        files: &crate::model::klein::files::KleinFiles,
        label: &str,
        dtype: DType,
        device: &Device,
        opts: LoadOptions,
    ) -> Result<Self> {
        // Qwen3 first, then the transformer and the autoencoder: the order the engine keeps
        // when it encodes the first prompt while the transformer loads.
        ahead::KleinTextFirst::load(files, label, dtype, device, opts)?.finish()
    }

    /// A pipeline of klein's parts read from `files`.
    fn of_klein(
        files: &crate::model::klein::files::KleinFiles,
        transformer: crate::model::klein::Klein,
        vae: crate::model::klein::KleinVae,
        text: crate::model::klein::text::KleinTextEncoder,
        label: &str,
    ) -> Self {
        let model = FamilyModel {
            default_steps: files.default_steps(),
            ..FamilyModel::klein(Arc::new(transformer), Box::new(text), Box::new(vae))
        };
        Self {
            model,
            // What an image's settings record: FLUX.1's kind nearest to it (the distilled klein
            // runs few steps without guidance, as schnell does); made-up weights say demo.
            variant: if files.demo {
                Variant::Demo
            } else if files.distilled {
                Variant::Schnell
            } else {
                Variant::Dev
            },
            label: label.to_string(),
            synthetic: files.demo,
            lora_cache: LoraCache::default(),
            ahead: Default::default(),
        }
    }

    /// Load the transformer, autoencoder and text encoders from files.
    pub fn load_files(
        files: &ModelFiles,
        label: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::load_files_with(files, label, dtype, device, LoadOptions::default())
    }

    /// [`Pipeline::load_files`] as `opts` says.
    pub fn load_files_with(
        files: &ModelFiles,
        label: &str,
        dtype: DType,
        device: &Device,
        opts: LoadOptions,
    ) -> Result<Self> {
        // The text encoders first, then the transformer and the autoencoder: the order the
        // engine keeps when it encodes the first prompt while the transformer loads.
        ahead::Flux1TextFirst::load(files, label, dtype, device, opts)?.finish()
    }

    /// Made-up weights (the demo model, a demo folder, or `random:*`): outputs are labelled.
    pub fn is_demo(&self) -> bool {
        self.synthetic || self.variant == Variant::Demo
    }

    /// The MagCache calibration for this model: the demo's shipped one, else the file
    /// `parallax calibrate-magcache` wrote for this model's name, if any.
    pub fn magcache_calibration(&self) -> Option<Arc<MagCalibration>> {
        if self.label == "demo" {
            return MagCalibration::demo().ok().map(Arc::new);
        }
        let path = cache::calibration_file(&self.label);
        let text = std::fs::read_to_string(&path).ok()?;
        match MagCalibration::from_json(&text) {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => {
                tracing::warn!("ignoring {}: {e}", path.display());
                None
            }
        }
    }

    pub fn device(&self) -> &Device {
        self.denoiser().device()
    }

    /// How this model's latent looks and packs into tokens (its autoencoder's).
    pub fn latent_spec(&self) -> LatentSpec {
        self.codec().latent_spec()
    }

    /// Check a request against this model and fill in defaults.
    pub fn settings_for(&self, req: &GenerateRequest) -> Result<GenerationSettings> {
        check_request(req)?;
        // A family without a guidance embedding: 0 records that none was used.
        let (steps, guidance) = (
            req.steps.unwrap_or(self.model.default_steps),
            req.guidance.unwrap_or(self.model.default_guidance),
        );
        let true_cfg = req.true_cfg.unwrap_or(1.0);
        // First Block Cache travels as its threshold (what older settings hold); other policies
        // as their spec.
        let (cache_threshold, cache) = match &req.cache {
            Some(spec) => match spec.fb_threshold() {
                Some(t) => (t, None),
                None => (0.0, Some(spec.clone())),
            },
            None => (req.cache_threshold, None),
        };
        Ok(GenerationSettings {
            prompt: req.prompt.clone(),
            negative_prompt: req.negative_prompt.clone(),
            true_cfg,
            width: req.width,
            height: req.height,
            steps,
            seed: req.seed,
            guidance,
            cache_threshold,
            cache,
            model: self.label.clone(),
            loras: req.loras.clone(),
            variant: self.variant,
            synthetic: self.is_demo(),
            dtype: format!(
                "{:?}{}{}",
                self.denoiser().dtype(),
                match self.model.as_flux1() {
                    Some(f) if f.flux.fp8_kernels() => " + fp8 products",
                    Some(f) if f.flux.fp8_products() => " + fp8 products (simulated)",
                    _ => "",
                },
                self.fp8_attention_label()
            )
            .to_lowercase(),
            sampler: "flow-match-euler".into(),
            schedule: self.model.schedule.describe().into(),
            noise: {
                let s = self.latent_spec();
                format!(
                    "splitmix64+box-muller f32, ({}, H/{f}, W/{f}) order",
                    s.channels,
                    f = s.downscale
                )
            },
            parallax_version: env!("CARGO_PKG_VERSION").into(),
            init: req.init.clone(),
        })
    }

    /// Initial noise for `seed`: (1, C, H/f, W/f) for the family's latent (FLUX.1: 16 channels,
    /// f = 8), identical on every device.
    pub fn noise(&self, seed: u64, width: usize, height: usize) -> Result<Tensor> {
        let spec = self.latent_spec();
        let (h, w) = (height / spec.downscale, width / spec.downscale);
        let c = spec.channels;
        let values = rng::SplitMix64::new(seed).normals(c * h * w);
        Ok(Tensor::from_vec(values, (1, c, h, w), &Device::Cpu)?.to_device(self.device())?)
    }

    /// The transformer as the generate path runs it (the family's [`Denoiser`]).
    pub fn denoiser(&self) -> &dyn Denoiser {
        self.model.denoiser.as_ref()
    }

    /// The text encoding as the generate path runs it (the family's [`TextEncoder`]).
    pub fn text_encoder(&self) -> &dyn TextEncoder {
        self.model.text.as_ref()
    }

    /// The autoencoder as the generate path decodes with it (the family's [`LatentCodec`]).
    pub fn codec(&self) -> &dyn LatentCodec {
        self.model.codec.as_ref()
    }

    /// The error for a FLUX.1-only feature (`what`) asked of a model of another family.
    fn flux1_only(&self, what: &str) -> Error {
        Error::InvalidSetting {
            name: "model".into(),
            value: self.label.clone(),
            reason: format!(
                "{what} works with FLUX.1 models only so far; {} is a {} model. Leave it out, \
                 or use a FLUX.1 model",
                self.label,
                self.denoiser().family()
            ),
        }
    }

    /// FLUX.1's parts (transformer, autoencoder, T5 + CLIP), for a feature that only FLUX.1
    /// has (`what` it is: FP8 groups, LoRAs, image-to-image, the tools that measure FLUX.1); a
    /// model of another family is refused, saying so.
    pub fn flux1(&self, what: &str) -> Result<Flux1<'_>> {
        self.model.as_flux1().ok_or_else(|| self.flux1_only(what))
    }

    /// Put `flux` in place of FLUX.1's transformer (converted to FP8, cut to a stage's blocks);
    /// a model of another family is refused.
    pub fn set_flux1(&mut self, flux: Flux) -> Result<()> {
        self.flux1("replacing FLUX.1's transformer")?;
        self.model.denoiser = Arc::new(flux);
        Ok(())
    }

    /// The transformer `req` runs, as the parallel workers share it: the model's, or FLUX.1's
    /// with the request's LoRAs ([`Pipeline::flux_for`]).
    pub fn denoiser_for(&self, req: &GenerateRequest) -> Result<Arc<dyn Denoiser>> {
        if !has_loras(req) {
            return Ok(self.model.denoiser.clone());
        }
        Ok(Arc::new(self.flux_for(req)?.into_owned()))
    }

    /// Refuse LoRAs for a model of another family than FLUX.1.
    fn no_loras(&self, req: &GenerateRequest) -> Result<()> {
        if has_loras(req) {
            self.flux1("LoRA")?;
        }
        Ok(())
    }

    /// `prompt` as the transformer takes it: hidden states and the pooled vector, or a (1, 0)
    /// tensor for a family without one.
    /// Taken from [`Pipeline::ahead`] when it was encoded while the model loaded.
    fn encode(&self, prompt: &str) -> Result<(Conditioning, Vec<String>)> {
        let model = self.denoiser();
        let e = match self.ahead.take(prompt, model.dtype()) {
            Some(e) => e,
            None => {
                ahead::encode_prompt(self.text_encoder(), prompt, model.dtype(), model.device())?
            }
        };
        Ok((e.cond, e.notes))
    }

    /// Generate one image. `progress` sees each stage and step; an error from it (such as
    /// [`Error::Cancelled`]) stops the generation.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        progress: &mut dyn FnMut(Progress) -> Result<()>,
    ) -> Result<Generated> {
        let prep = self.prepare(req, progress)?;
        let model = self.denoiser_for(req)?;
        let mut log = StepLog::default();
        let (x, stats) = denoise(model.as_ref(), &prep.job, None, &mut |info| {
            log.record(info);
            progress(Progress::Step(info))
        })?;
        self.finish(
            prep,
            x,
            stats,
            log,
            &|vae, z| Ok(vae.decode_latent(z)?),
            progress,
        )
    }

    /// Merge LoRAs into the weights of the layers that run in the model's dtype (`W + B A`, a copy
    /// of each adapted weight; no cost a step) instead of running their low-rank paths beside the
    /// products (no copy; two more products a layer). Off by default.
    pub fn set_lora_merge(&self, on: bool) {
        self.lora_cache
            .1
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether LoRAs are merged into the weights ([`Pipeline::set_lora_merge`]).
    pub fn lora_merge(&self) -> bool {
        self.lora_cache.1.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The transformer `req` runs: this pipeline's, with the request's LoRAs beside its layers
    /// (or merged into them: [`Pipeline::set_lora_merge`]) when it names any (the base weights
    /// shared, the files read once while unchanged).
    pub fn flux_for(&self, req: &GenerateRequest) -> Result<std::borrow::Cow<'_, Flux>> {
        let base = self.flux1("LoRA")?.flux;
        if !has_loras(req) {
            return Ok(std::borrow::Cow::Borrowed(base));
        }
        let key = req
            .loras
            .iter()
            .map(|l| {
                let meta = std::fs::metadata(&l.path).ok();
                let stamp = meta.map(|m| (m.len(), m.modified().ok()));
                format!("{l} {stamp:?}")
            })
            .collect::<Vec<_>>()
            .join("\n");
        // The base as it is now (a pipeline's transformer may be converted or cut after load).
        let f = base;
        let merge = self.lora_merge();
        let key = format!(
            "{key}\n{merge} {:?} {:?} {} {}",
            f.held_blocks(),
            f.dtype(),
            f.fp8_products(),
            f.attention().name()
        );
        let mut cache = self.lora_cache.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((k, flux)) = cache.as_ref() {
            if *k == key {
                return Ok(std::borrow::Cow::Owned(flux.clone()));
            }
        }
        let set = LoraSet::load(&req.loras, base.config())?;
        let flux = if merge {
            base.with_loras_merged(&set)?
        } else {
            base.with_loras(&set)?
        };
        *cache = Some((key, flux.clone()));
        Ok(std::borrow::Cow::Owned(flux))
    }

    /// The first stage of a generation: settings checked, text encoded, noise and schedule made.
    /// The caller runs the denoising loop on [`Prepared::job`] (one device: [`denoise`]; ranks:
    /// the parallel engine), then hands the latent to [`Pipeline::finish`].
    pub fn prepare(
        &self,
        req: &GenerateRequest,
        progress: &mut dyn FnMut(Progress) -> Result<()>,
    ) -> Result<Prepared> {
        let started = Instant::now();
        self.no_loras(req)?;
        let settings = self.settings_for(req)?;
        let mut notes = Vec::new();
        let use_cfg = settings.true_cfg > 1.0;
        if settings
            .negative_prompt
            .as_deref()
            .is_some_and(|s| !s.is_empty())
            && !use_cfg
        {
            notes.push(
                "negative prompt stored but not used: set --true-cfg above 1 to use it".into(),
            );
        }
        if use_cfg {
            notes.push(format!(
                "true CFG {}: two transformer passes a step",
                settings.true_cfg
            ));
        }
        if self.is_demo() {
            notes.push(format!(
                "DEMO model ({}): not FLUX.1; the image is labelled DEMO",
                self.label
            ));
        }

        if settings.init.is_none() && self.denoiser().cond_channels() > 0 {
            return Err(Error::Image(img2img::FILL_NEEDS_MASK.to_string()));
        }
        let t0 = Instant::now();
        let (cond, enc_notes) = self.encode(&settings.prompt)?;
        notes.extend(enc_notes);
        let text_ms = t0.elapsed().as_secs_f64() * 1e3;
        progress(Progress::TextEncoded { ms: text_ms })?;

        let spec = self.latent_spec();
        let (lh, lw) = (
            settings.height / spec.downscale,
            settings.width / spec.downscale,
        );
        let noise = self.noise(settings.seed, settings.width, settings.height)?;
        let (gh, gw) = (lh / spec.patch, lw / spec.patch);
        let ts = self.model.schedule.timesteps(settings.steps, gh * gw);
        let (x, ts, blend, fill) = match &settings.init {
            None => (spec.pack(&noise)?, ts, None, None),
            Some(init) => {
                let e = self.enter_source(init, &noise, &ts, &settings, &mut notes)?;
                (e.x, e.timesteps, e.blend, e.fill)
            }
        };
        let pe = self.denoiser().pos_embed(cond.txt.dim(1)?, gh, gw)?;
        let neg = if use_cfg {
            let neg = settings.negative_prompt.as_deref().unwrap_or("");
            Some(self.encode(neg)?.0)
        } else {
            None
        };
        // Encodings made ahead serve the first job only.
        self.ahead.clear();
        let cache = settings.cache_spec();
        // Read only for the policy that uses it (a file read for models other than the demo).
        let magcache = match cache {
            CacheSpec::MagCache { .. } => self.magcache_calibration(),
            _ => None,
        };
        let job = DenoiseJob {
            cond,
            neg,
            true_cfg: settings.true_cfg,
            pe,
            x,
            timesteps: ts,
            guidance: settings.guidance,
            cache,
            magcache,
            blend,
            fill,
        };
        Ok(Prepared {
            job,
            settings,
            notes,
            text_ms,
            latent_hw: (lh, lw),
            started,
        })
    }

    /// Image-to-image's start: `init`'s source (and mask) read at the settings' size, encoded
    /// to its posterior mean, and the schedule `ts` entered at the strength from `noise`.
    fn enter_source(
        &self,
        init: &img2img::InitImage,
        noise: &Tensor,
        ts: &[f64],
        settings: &GenerationSettings,
        notes: &mut Vec<String>,
    ) -> Result<img2img::Entered> {
        let vae = self.flux1("image-to-image and inpainting")?.vae;
        if !vae.has_encoder() {
            return Err(Error::Image(format!(
                "image-to-image needs the autoencoder's encoder, and {}'s autoencoder file holds only the decoder: use an autoencoder file with both (FLUX.1's ae.safetensors has them)",
                self.label
            )));
        }
        let fill = match self.denoiser().cond_channels() {
            0 => false,
            c if c + crate::model::flux::LATENT_CHANNELS == crate::model::flux::FILL_IN_CHANNELS => {
                if init.mask.is_none() && init.extend.is_none() {
                    return Err(Error::Image(img2img::FILL_NEEDS_MASK.to_string()));
                }
                if settings.guidance < 10.0 {
                    notes.push(format!(
                        "guidance {}: FLUX.1 Fill is made for guidance about 30",
                        settings.guidance
                    ));
                }
                true
            }
            c => {
                return Err(Error::Image(format!(
                    "{} takes {c} input channels beside the latent's: only FLUX.1 Fill checkpoints (320) are supported, not control (Depth, Canny) checkpoints",
                    self.label
                )))
            }
        };
        let e = img2img::start_with(
            vae,
            self.device(),
            init,
            (settings.width, settings.height),
            noise,
            ts,
            notes,
            fill,
        )?;
        notes.push(format!(
            "{} from {} at strength {}: {} of {} steps run",
            if e.fill.is_some() {
                "FLUX.1 Fill inpainting"
            } else if init.mask.is_some() {
                "inpainting"
            } else {
                "image-to-image"
            },
            init.image.display(),
            init.strength,
            e.timesteps.len() - 1,
            settings.steps
        ));
        Ok(e)
    }

    /// The last stage: the denoised packed latent `x` decoded by `decode` (one device, or row
    /// bands over workers) into the image, with the run's statistics and timings.
    pub fn finish(
        &self,
        prep: Prepared,
        x: Tensor,
        stats: CacheStats,
        log: StepLog,
        decode: &LatentDecoder,
        progress: &mut dyn FnMut(Progress) -> Result<()>,
    ) -> Result<Generated> {
        let t0 = Instant::now();
        let (lh, lw) = prep.latent_hw;
        let latent = self.latent_spec().unpack(&x, lh, lw)?;
        let codec = self.codec();
        let decoded = match codec.band_decoder() {
            Some(d) => decode(d, &latent.to_dtype(d.dtype())?)?,
            // An autoencoder without FLUX.1's kind of decoder decodes on one worker.
            None => codec.decode_latent(&latent.to_dtype(codec.dtype())?)?,
        };
        let mut image = RgbImage::from_tensor(&decoded)?;
        if self.is_demo() {
            image.stamp_demo_label();
        }
        let vae_ms = t0.elapsed().as_secs_f64() * 1e3;
        progress(Progress::Decoded { ms: vae_ms })?;

        Ok(Generated {
            image,
            settings: prep.settings,
            stats,
            timings: Timings {
                text_ms: prep.text_ms,
                steps_ms: log.steps_ms,
                steps_queued_ms: log.steps_queued_ms,
                vae_ms,
                total_ms: prep.started.elapsed().as_secs_f64() * 1e3,
            },
            notes: prep.notes,
        })
    }
}

/// A generation between [`Pipeline::prepare`] and [`Pipeline::finish`]: the denoising loop's
/// inputs and what the image's record needs afterwards.
pub struct Prepared {
    pub job: DenoiseJob,
    pub settings: GenerationSettings,
    notes: Vec<String>,
    text_ms: f64,
    /// Latent rows and columns (H/f, W/f for the family's downscale f).
    latent_hw: (usize, usize),
    started: Instant,
}

/// Each step's time, as the denoising loop reports them.
#[derive(Debug, Default)]
pub struct StepLog {
    steps_ms: Vec<f64>,
    steps_queued_ms: Vec<f64>,
}

impl StepLog {
    pub fn record(&mut self, info: &StepInfo) {
        self.steps_ms.push(info.elapsed.as_secs_f64() * 1e3);
        self.steps_queued_ms.push(info.queued.as_secs_f64() * 1e3);
    }
}

/// Check the values of `req` that do not depend on the model (sizes, steps, guidance, true CFG,
/// the cache), before anything loads: what [`Pipeline::settings_for`] refuses, whatever the
/// model (a value left out takes the model's default, always valid). The first of
/// [`request_problems`].
pub fn check_request(req: &GenerateRequest) -> Result<()> {
    match request_problems(req).into_iter().next() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Every value of `req` [`check_request`] refuses, in the order it checks them (the studio shows
/// them all beside its fields, in the CLI's words).
pub fn request_problems(req: &GenerateRequest) -> Vec<Error> {
    let mut out = Vec::new();
    for (name, v) in [("width", req.width), ("height", req.height)] {
        if v == 0 || v % 16 != 0 {
            out.push(Error::setting(name, v, "must be a positive multiple of 16"));
        } else if v > 16384 {
            out.push(Error::setting(name, v, "must be at most 16384"));
        }
    }
    if let Some(steps) = req.steps {
        if steps == 0 {
            out.push(Error::setting("steps", steps, "must be at least 1"));
        } else if steps > 1000 {
            out.push(Error::setting("steps", steps, "must be at most 1000"));
        }
    }
    if let Some(guidance) = req.guidance {
        if !guidance.is_finite() || guidance < 0.0 {
            out.push(Error::setting(
                "guidance",
                guidance,
                "must be a finite number >= 0",
            ));
        }
    }
    let true_cfg = req.true_cfg.unwrap_or(1.0);
    if !true_cfg.is_finite() || true_cfg < 1.0 {
        out.push(Error::setting(
            "true-cfg",
            true_cfg,
            "must be a finite number >= 1 (1 turns true CFG off)",
        ));
    }
    if !req.cache_threshold.is_finite() || req.cache_threshold < 0.0 {
        out.push(Error::setting(
            "cache-threshold",
            req.cache_threshold,
            "must be a finite number >= 0 (0 turns the cache off)",
        ));
    }
    if let Some(Err(e)) = req.cache.as_ref().map(|spec| spec.validate()) {
        out.push(e);
    }
    if let Some(Err(e)) = req.init.as_ref().map(|init| init.check()) {
        out.push(e);
    }
    out
}

/// The denoising loop of `job` on `flux`, with its cache policies and true CFG set up once for
/// every caller. `cfg_pair`: with CFG parallelism, this worker's twin (the other branch's
/// worker) and whether this worker runs the negative branch; without it, a worker runs both
/// branches itself when true CFG is on. Returns the final packed latent and the cache counts.
pub fn denoise(
    flux: &dyn crate::model::family::Denoiser,
    job: &DenoiseJob,
    cfg_pair: Option<(&dyn crate::collective::Communicator, bool)>,
    on_step: &mut dyn FnMut(&StepInfo) -> Result<()>,
) -> Result<(Tensor, CacheStats)> {
    let mut policy = job.cache.policy(job.magcache.as_ref())?;
    let mut neg_policy = job.cache.policy(job.magcache.as_ref())?;
    let (cond, cfg) = match (&job.neg, cfg_pair) {
        (Some(neg), Some((group, negative_branch))) => (
            if negative_branch { neg } else { &job.cond },
            Some(sampler::TrueCfg::Split {
                group,
                scale: job.true_cfg,
            }),
        ),
        (Some(neg), None) => (
            &job.cond,
            Some(sampler::TrueCfg::Local {
                neg,
                policy: neg_policy.as_mut(),
                scale: job.true_cfg,
            }),
        ),
        (None, _) => (&job.cond, None),
    };
    sampler::denoise_blended(
        flux,
        cond,
        &job.pe,
        job.x.clone(),
        &job.timesteps,
        Some(job.guidance),
        policy.as_mut(),
        cfg,
        job.blend.as_ref(),
        job.fill.as_ref(),
        on_step,
    )
}

/// Whether `req` turns any LoRA on.
fn has_loras(req: &GenerateRequest) -> bool {
    req.loras.iter().any(|l| l.strength != 0.0)
}

/// Count of steps a cache skipped, as a short human string.
pub fn describe_cache(stats: &CacheStats) -> String {
    format!(
        "{} steps computed, {} reused from the cache",
        stats.computed, stats.reused
    )
}

/// The autoencoder and text encoders of [`Pipeline::random_with`] for `variant` (FLUX.1's sizes,
/// random weights drawn on `device`, the demo byte tokenizers), drawn in that order; a
/// transformer file loaded with `--text-encoders random` ([`ModelFiles::random_parts`]) gets
/// the same parts from [`random_text`] and [`random_vae`], text encoders first. A transformer
/// `cfg` that takes the demo's embedding widths gets the small made-up parts of `random:tiny`.
fn random_parts(
    cfg: &FluxConfig,
    variant: Variant,
    dtype: DType,
    device: &Device,
    opts: LoadOptions,
) -> Result<(AutoEncoder, TextEncoders)> {
    let vae = random_vae(cfg, dtype, device)?;
    let text = random_text(cfg, variant, dtype, device, opts)?;
    Ok((vae, text))
}

/// The autoencoder of [`random_parts`].
fn random_vae(cfg: &FluxConfig, dtype: DType, device: &Device) -> Result<AutoEncoder> {
    use crate::model::demo_weights::RandomWeights;
    use crate::model::load_clock::{time, LoadPhase};
    let vae_dtype = autoencoder_dtype(dtype, device);
    time(LoadPhase::Autoencoder, || {
        if cfg.context_in_dim == crate::model::text::DEMO_T5_DIM {
            AutoEncoder::new(
                &VaeConfig::tiny(),
                DemoWeights::new(DemoSeeds::BUILTIN.vae).var_builder(vae_dtype, device),
            )
        } else {
            AutoEncoder::new(
                &VaeConfig::flux(),
                RandomWeights.var_builder(vae_dtype, device),
            )
        }
    })
    .px()
}

/// The text encoders of [`random_parts`].
fn random_text(
    cfg: &FluxConfig,
    variant: Variant,
    dtype: DType,
    device: &Device,
    opts: LoadOptions,
) -> Result<TextEncoders> {
    use crate::model::demo_weights::RandomWeights;
    use crate::model::load_clock::{time, LoadPhase};
    use crate::model::text;
    use crate::model::tokenizer::PromptTokenizer;
    if cfg.context_in_dim == text::DEMO_T5_DIM {
        return time(LoadPhase::TextEncoders, || {
            TextEncoders::demo(DemoSeeds::BUILTIN.text, device)
        });
    }
    let vb = RandomWeights.var_builder(dtype, device);
    let t5_tokenizer = PromptTokenizer::demo(variant.t5_max_len(), "t5")?;
    let clip_tokenizer = PromptTokenizer::demo(text::CLIP_MAX_LEN, "clip")?;
    time(LoadPhase::TextEncoders, || -> Result<TextEncoders> {
        Ok(match opts.t5 {
            T5Residency::Resident => TextEncoders::new(
                vb.clone(),
                &text::t5_xxl_config(),
                vb.pp("text_model"),
                &text::clip_l_config(),
                t5_tokenizer,
                clip_tokenizer,
            )?,
            T5Residency::OnDemand => {
                // Drawn again for each prompt from the same seed: the same T5 every time.
                let dev = device.clone();
                let build: crate::model::text::T5Builder = Arc::new(move || {
                    dev.set_seed(0x5435_5435)?;
                    candle_transformers::models::t5::T5EncoderModel::load(
                        RandomWeights.var_builder(dtype, &dev),
                        &text::t5_xxl_config(),
                    )
                    .px()
                });
                TextEncoders::with_t5_builder(
                    build,
                    (&text::t5_xxl_config(), dtype, device),
                    vb.pp("text_model"),
                    &text::clip_l_config(),
                    t5_tokenizer,
                    clip_tokenizer,
                )?
            }
        })
    })
}

/// A random model's transformer ([`Pipeline::random`]): drawn on `device` from a fixed seed, so
/// a replica drawn again (on another device handle, say) has the same weights.
pub fn random_transformer(
    cfg: &FluxConfig,
    dtype: DType,
    device: &Device,
    opts: LoadOptions,
) -> Result<Flux> {
    device.set_seed(0x5241_4E44)?;
    Flux::new_fp8(
        cfg,
        crate::model::demo_weights::RandomWeights.var_builder(dtype, device),
        opts.fp8,
        opts.lean,
    )
    .px()
}

/// Load the transformer and tell which variant it is.
pub fn load_transformer(
    files: &ModelFiles,
    dtype: DType,
    device: &Device,
) -> Result<(Flux, Variant)> {
    load_transformer_with(files, dtype, device, LoadOptions::default())
}

/// [`load_transformer`] with the FP8 groups of `opts` converted block by block as they load.
pub fn load_transformer_with(
    files: &ModelFiles,
    dtype: DType,
    device: &Device,
    opts: LoadOptions,
) -> Result<(Flux, Variant)> {
    let (set, cfg) = transformer_header(files)?;
    let variant = if cfg.guidance_embed {
        Variant::Dev
    } else {
        Variant::Schnell
    };
    let flux = build_transformer(files, set, &cfg, dtype, device, opts)?;
    Ok((flux, variant))
}

/// A FLUX.1 transformer's file opened (its header and index read, its family checked) and its
/// config, from the header or a diffusers `config.json`: no weights read.
fn transformer_header(files: &ModelFiles) -> Result<(Arc<SafetensorsSet>, FluxConfig)> {
    let set = Arc::new(SafetensorsSet::open(&files.transformer)?);
    check_family(&set, &files.transformer)?;
    let cfg = match &files.transformer_layout {
        layout::TransformerLayout::Diffusers if files.transformer.join("config.json").is_file() => {
            layout::flux_config_from_diffusers_json(&files.transformer.join("config.json"))?
        }
        other => layout::infer_flux_config(&set, other)?,
    };
    Ok((set, cfg))
}

/// The transformer of `cfg` read from `set` (the blocks and FP8 groups `opts` asks for).
fn build_transformer(
    files: &ModelFiles,
    set: Arc<SafetensorsSet>,
    cfg: &FluxConfig,
    dtype: DType,
    device: &Device,
    opts: LoadOptions,
) -> Result<Flux> {
    let map: Arc<dyn KeyMap> =
        Arc::from(layout::transformer_key_map(&files.transformer_layout, cfg));
    let vb = MappedWeights::new(set, map).var_builder(dtype, device);
    let blocks = opts.block_range(cfg.num_blocks());
    Ok(Flux::new_stage(cfg, vb, opts.fp8, opts.lean, blocks)?)
}

/// The family the registry recognises in a transformer checkpoint's tensor names
/// ([`crate::model::family::detect`]): FLUX.1's loads here; another family's (reached through a
/// path FLUX.1's resolution took, such as a ComfyUI folder) is refused by name rather than read
/// as a broken FLUX.1 file. Names no family recognises go on to FLUX.1's layout inference, which
/// says what it misses.
fn check_family(set: &SafetensorsSet, path: &std::path::Path) -> Result<()> {
    let names: Vec<&str> = set.names().collect();
    match crate::model::family::detect(&names) {
        Some(f) if f.name() != crate::model::flux1::Flux1Family.name() => {
            Err(Error::UnknownLayout {
                path: path.to_path_buf(),
                reason: format!(
                    "a {} transformer, read here as FLUX.1's: name its file or folder itself \
                 with --model (its autoencoder and text encoder with --vae and \
                 --text-encoders)",
                    f.name()
                ),
            })
        }
        _ => Ok(()),
    }
}

/// The dtype the autoencoder runs in: `dtype`, except f32 on the CPU (candle's CPU convolutions
/// take no bf16/f16, and the autoencoder is small next to the transformer).
pub fn autoencoder_dtype(dtype: DType, device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        dtype
    }
}

/// Load the autoencoder in either layout, in [`autoencoder_dtype`].
pub fn load_vae(files: &ModelFiles, dtype: DType, device: &Device) -> Result<AutoEncoder> {
    let dtype = autoencoder_dtype(dtype, device);
    let set = Arc::new(SafetensorsSet::open(&files.vae)?);
    let (cfg, map): (VaeConfig, Arc<dyn KeyMap>) = match files.vae_layout {
        VaeLayout::Bfl => (
            layout::infer_vae_config(&set)?,
            Arc::new(Identity {
                prefix: String::new(),
            }),
        ),
        VaeLayout::Diffusers => {
            let cfg_path = files.vae.join("config.json");
            let cfg = if cfg_path.is_file() {
                vae::vae_config_from_diffusers_json(&cfg_path)?
            } else {
                VaeConfig::flux()
            };
            (cfg.clone(), Arc::new(vae::VaeDiffusersMap { cfg }))
        }
    };
    let vb = MappedWeights::new(set, map).var_builder(dtype, device);
    AutoEncoder::new_with_optional_encoder(&cfg, vb).px()
}

/// The kinds of step as a compact string like "CCRRC" (C computed, R reused).
pub fn step_pattern(steps: &[StepKind]) -> String {
    steps
        .iter()
        .map(|k| if k.is_reused() { 'R' } else { 'C' })
        .collect()
}
