//! Text to image: the loaded models, settings, and one image's generation from prompt to pixels.
//!
//! - [`schedule`]: flow-matching timesteps (dev's shifted schedule, schnell's linear one).
//! - [`sampler`]: the Euler denoising loop.
//! - [`cache`]: cache policies (First Block Cache).
//! - [`image`]: RGB images and PNG files with their settings.

pub mod cache;
pub mod image;
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
use crate::model::flux::{pack_latent, unpack_latent, Flux, FluxConfig, Fp8Groups};
use crate::model::layout::{self, ModelFiles, ModelSpec, Resolved, VaeLayout, Variant};
use crate::model::lora::{LoraChoice, LoraSet};
use crate::model::rng;
use crate::model::text::{T5Residency, TextEncoders};
use crate::model::vae::{self, AutoEncoder, VaeConfig};
use crate::model::weights::{Identity, KeyMap, MappedWeights, SafetensorsSet};

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
}

impl DenoiseJob {
    /// This job's denoising loop on `flux` under `policy`, without true CFG (for tools that
    /// watch or measure the loop: calibration, FP8 error).
    pub fn denoise_with(
        &self,
        flux: &Flux,
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
}

impl LoadOptions {
    /// The blocks to hold, of a transformer with `n`.
    pub fn block_range(&self, n: usize) -> std::ops::Range<usize> {
        self.blocks.map_or(0..n, |(a, b)| a.min(n)..b.min(n))
    }
}

/// Decodes a scaled latent (B, 16, H/8, W/8) into an image tensor (B, 3, H, W).
pub type LatentDecoder<'a> = dyn Fn(&AutoEncoder, &Tensor) -> Result<Tensor> + 'a;

/// The three models of FLUX.1, loaded and ready.
pub struct Pipeline {
    pub flux: Flux,
    pub vae: AutoEncoder,
    pub text: TextEncoders,
    pub variant: Variant,
    /// How the user named the model.
    pub label: String,
    /// Random weights (`random:dev`): labelled like the demo model.
    pub synthetic: bool,
    /// The transformer with the last request's LoRAs, reused while they stay the same.
    pub lora_cache: LoraCache,
}

/// A transformer with LoRAs on, by the LoRAs (files with their size and time, strengths).
#[derive(Default)]
pub struct LoraCache(std::sync::Mutex<Option<(String, Flux)>>);

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("label", &self.label)
            .field("variant", &self.variant)
            .field("flux", &self.flux)
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
        Ok(Self {
            flux: demo::transformer(dtype, device)?,
            vae: demo::autoencoder(dtype, device)?,
            text: demo::text_encoders(dtype, device)?,
            variant: Variant::Demo,
            label: "demo".into(),
            synthetic: true,
            lora_cache: LoraCache::default(),
        })
    }

    /// A tiny model with FLUX's structure and made-up weights generated from fixed seeds
    /// (`random:tiny`): for tests that need a small model whose output is noise. Its images are
    /// labelled DEMO.
    pub fn tiny_random(device: &Device) -> Result<Self> {
        let dtype = DType::F32;
        let seeds = DemoSeeds::BUILTIN;
        let flux = Flux::new(
            &FluxConfig::tiny(),
            DemoWeights::new(seeds.flux).var_builder(dtype, device),
        )?;
        let vae = AutoEncoder::new(
            &VaeConfig::tiny(),
            DemoWeights::new(seeds.vae).var_builder(dtype, device),
        )?;
        let text = TextEncoders::demo(seeds.text, device)?;
        Ok(Self {
            flux,
            vae,
            text,
            variant: Variant::Demo,
            label: "random:tiny".into(),
            synthetic: true,
            lora_cache: LoraCache::default(),
        })
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
        use crate::model::demo_weights::RandomWeights;
        use crate::model::text;
        use crate::model::tokenizer::PromptTokenizer;
        if variant == Variant::Demo {
            return Self::tiny_random(device);
        }
        let cfg = match variant {
            Variant::Schnell => FluxConfig::schnell(),
            _ => FluxConfig::dev(),
        };
        let flux = random_transformer(&cfg, dtype, device, opts)?;
        let vae_dtype = autoencoder_dtype(dtype, device);
        let vae = AutoEncoder::new(
            &VaeConfig::flux(),
            RandomWeights.var_builder(vae_dtype, device),
        )?;
        let vb = RandomWeights.var_builder(dtype, device);
        let t5_tokenizer = PromptTokenizer::demo(variant.t5_max_len(), "t5")?;
        let clip_tokenizer = PromptTokenizer::demo(text::CLIP_MAX_LEN, "clip")?;
        let text = match opts.t5 {
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
        };
        Ok(Self {
            flux,
            vae,
            text,
            variant,
            label: format!("random:{}", variant.name()),
            synthetic: true,
            lora_cache: LoraCache::default(),
        })
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
            ModelSpec::Files(files) => Self::load_files_with(files, label, dtype, device, opts)?,
        };
        if opts.fp8 != Fp8Groups::NONE && !p.flux.fp8_products() {
            p.flux = p.flux.with_fp8_in(opts.fp8)?;
        }
        let blocks = opts.block_range(p.flux.config().num_blocks());
        if p.flux.held_blocks() != blocks {
            p.flux = p.flux.only_blocks(blocks);
        }
        Ok(p)
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
        let (flux, mut variant) = load_transformer_with(files, dtype, device, opts)?;
        if files.demo {
            variant = Variant::Demo;
        }
        let vae = load_vae(files, dtype, device)?;
        let text = TextEncoders::load_parts_with(
            &files.text,
            variant.t5_max_len(),
            dtype,
            device,
            opts.t5,
        )?;
        if text.t5_dim() != flux.config().context_in_dim
            || text.clip_dim() != flux.config().vec_in_dim
        {
            return Err(Error::UnknownLayout {
                path: files.text.t5.clone(),
                reason: format!(
                    "text encoders give {} (T5) and {} (CLIP) wide embeddings; the transformer takes {} and {}",
                    text.t5_dim(),
                    text.clip_dim(),
                    flux.config().context_in_dim,
                    flux.config().vec_in_dim
                ),
            });
        }
        Ok(Self {
            flux,
            vae,
            text,
            variant,
            label: label.to_string(),
            synthetic: files.demo,
            lora_cache: LoraCache::default(),
        })
    }

    /// The latent preview map for this model's autoencoder: fitted on the demo's own scenes
    /// (encoded, then decoded) when this is a demo model with an encoder, else on smoothed noise
    /// latents (real FLUX checkpoints are loaded without the encoder).
    pub fn preview_factors(&self) -> Result<preview::PreviewFactors> {
        // The built-in demo's map is shipped (fitted as below; a test refits and compares), so
        // its first preview does not wait a CPU second for the fit.
        if self.label == "demo" {
            if let Ok(f) = preview::PreviewFactors::demo() {
                return Ok(f);
            }
        }
        self.fit_preview_factors()
    }

    /// Fit the preview map to this model's autoencoder: on the demo's own scenes where it has
    /// an encoder, else on decoded noise latents.
    pub fn fit_preview_factors(&self) -> Result<preview::PreviewFactors> {
        if self.variant == Variant::Demo && self.vae.has_encoder() {
            let images = crate::scenes::render::scene_tensors(6, 128, 0x5eed)?;
            preview::PreviewFactors::fit_images(&self.vae, self.device(), &images)
        } else {
            preview::PreviewFactors::fit(&self.vae, self.device(), 3, 24, 0x5eed)
        }
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
        self.flux.device()
    }

    /// Check a request against this model and fill in defaults.
    pub fn settings_for(&self, req: &GenerateRequest) -> Result<GenerationSettings> {
        check_request(req)?;
        let steps = req.steps.unwrap_or(self.variant.default_steps());
        let guidance = req.guidance.unwrap_or(self.variant.default_guidance());
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
                "{:?}{}",
                self.flux.dtype(),
                if self.flux.fp8_kernels() {
                    " + fp8 products"
                } else if self.flux.fp8_products() {
                    " + fp8 products (simulated)"
                } else {
                    ""
                }
            )
            .to_lowercase(),
            sampler: "flow-match-euler".into(),
            schedule: if self.variant.shifted_schedule() {
                "shifted(mu: 0.5@256 -> 1.15@4096 tokens)".into()
            } else {
                "linear".into()
            },
            noise: "splitmix64+box-muller f32, (16, H/8, W/8) order".into(),
            parallax_version: env!("CARGO_PKG_VERSION").into(),
        })
    }

    /// Initial noise for `seed`: (1, 16, H/8, W/8), identical on every device.
    pub fn noise(&self, seed: u64, width: usize, height: usize) -> Result<Tensor> {
        let (h, w) = (height / 8, width / 8);
        let values = rng::SplitMix64::new(seed).normals(16 * h * w);
        Ok(Tensor::from_vec(values, (1, 16, h, w), &Device::Cpu)?.to_device(self.device())?)
    }

    /// Generate one image. `progress` sees each stage and step; an error from it (such as
    /// [`Error::Cancelled`]) stops the generation.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        progress: &mut dyn FnMut(Progress) -> Result<()>,
    ) -> Result<Generated> {
        let prep = self.prepare(req, progress)?;
        let flux = self.flux_for(req)?;
        let mut log = StepLog::default();
        let (x, stats) = denoise(flux.as_ref(), &prep.job, None, &mut |info| {
            log.record(info);
            progress(Progress::Step(info))
        })?;
        self.finish(prep, x, stats, log, &|vae, z| Ok(vae.decode(z)?), progress)
    }

    /// The transformer `req` runs: this pipeline's, with the request's LoRAs beside its layers
    /// when it names any (the base weights shared, the files read once while unchanged).
    pub fn flux_for(&self, req: &GenerateRequest) -> Result<std::borrow::Cow<'_, Flux>> {
        if req.loras.iter().all(|l| l.strength == 0.0) {
            return Ok(std::borrow::Cow::Borrowed(&self.flux));
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
        let f = &self.flux;
        let key = format!(
            "{key}\n{:?} {:?} {} {}",
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
        let set = LoraSet::load(&req.loras, self.flux.config())?;
        let flux = self.flux.with_loras(&set)?;
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

        let t0 = Instant::now();
        let enc = self.text.encode(&settings.prompt)?;
        notes.extend(enc.notes.iter().cloned());
        let text_ms = t0.elapsed().as_secs_f64() * 1e3;
        progress(Progress::TextEncoded { ms: text_ms })?;

        let (lh, lw) = (settings.height / 8, settings.width / 8);
        let noise = self.noise(settings.seed, settings.width, settings.height)?;
        let x = pack_latent(&noise)?;
        let seq_len = (lh / 2) * (lw / 2);
        let ts = schedule::timesteps(settings.steps, seq_len, self.variant.shifted_schedule());
        let pe = self.flux.pos_embed(enc.txt.dim(1)?, lh / 2, lw / 2)?;
        let cond = Conditioning {
            txt: enc.txt,
            y: enc.vec,
        };
        let neg = if use_cfg {
            let n = self
                .text
                .encode(settings.negative_prompt.as_deref().unwrap_or(""))?;
            Some(Conditioning {
                txt: n.txt,
                y: n.vec,
            })
        } else {
            None
        };
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
        let latent = unpack_latent(&x, lh, lw)?;
        let decoded = decode(&self.vae, &latent.to_dtype(self.vae.dtype())?)?;
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
    /// Latent rows and columns (H/8, W/8).
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
/// model (a value left out takes the model's default, always valid).
pub fn check_request(req: &GenerateRequest) -> Result<()> {
    for (name, v) in [("width", req.width), ("height", req.height)] {
        if v == 0 || v % 16 != 0 {
            return Err(Error::setting(name, v, "must be a positive multiple of 16"));
        }
        if v > 16384 {
            return Err(Error::setting(name, v, "must be at most 16384"));
        }
    }
    if let Some(steps) = req.steps {
        if steps == 0 {
            return Err(Error::setting("steps", steps, "must be at least 1"));
        }
        if steps > 1000 {
            return Err(Error::setting("steps", steps, "must be at most 1000"));
        }
    }
    if let Some(guidance) = req.guidance {
        if !guidance.is_finite() || guidance < 0.0 {
            return Err(Error::setting(
                "guidance",
                guidance,
                "must be a finite number >= 0",
            ));
        }
    }
    let true_cfg = req.true_cfg.unwrap_or(1.0);
    if !true_cfg.is_finite() || true_cfg < 1.0 {
        return Err(Error::setting(
            "true-cfg",
            true_cfg,
            "must be a finite number >= 1 (1 turns true CFG off)",
        ));
    }
    if !req.cache_threshold.is_finite() || req.cache_threshold < 0.0 {
        return Err(Error::setting(
            "cache-threshold",
            req.cache_threshold,
            "must be a finite number >= 0 (0 turns the cache off)",
        ));
    }
    if let Some(spec) = &req.cache {
        spec.validate()?;
    }
    Ok(())
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
    sampler::denoise_cfg(
        flux,
        cond,
        &job.pe,
        job.x.clone(),
        &job.timesteps,
        Some(job.guidance),
        policy.as_mut(),
        cfg,
        on_step,
    )
}

/// Count of steps a cache skipped, as a short human string.
pub fn describe_cache(stats: &CacheStats) -> String {
    format!(
        "{} steps computed, {} reused from the cache",
        stats.computed, stats.reused
    )
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
    let set = Arc::new(SafetensorsSet::open(&files.transformer)?);
    let cfg = match &files.transformer_layout {
        layout::TransformerLayout::Diffusers if files.transformer.join("config.json").is_file() => {
            layout::flux_config_from_diffusers_json(&files.transformer.join("config.json"))?
        }
        other => layout::infer_flux_config(&set, other)?,
    };
    let variant = if cfg.guidance_embed {
        Variant::Dev
    } else {
        Variant::Schnell
    };
    let map: Arc<dyn KeyMap> =
        Arc::from(layout::transformer_key_map(&files.transformer_layout, &cfg));
    let vb = MappedWeights::new(set, map).var_builder(dtype, device);
    let blocks = opts.block_range(cfg.num_blocks());
    let flux = Flux::new_stage(&cfg, vb, opts.fp8, opts.lean, blocks)?;
    Ok((flux, variant))
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
