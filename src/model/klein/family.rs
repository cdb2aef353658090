//! klein behind the family traits: [`Klein`] as a [`Denoiser`], the registry entry
//! [`KleinFamily`] (told apart by its shared single-block modulation), loading a transformer or
//! an autoencoder from either layout ([`load_transformer`], [`load_vae`]), and the `random:klein-*`
//! models ([`random_model`]); a transformer's pipeline-stage share of either
//! ([`load_transformer_stage`], [`random_stage`]).

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

use super::config::KleinConfig;
use super::keys::{self, KleinVaeDiffusersMap};
use super::model::Klein;
use super::text::{KleinTextEncoder, KLEIN_MAX_LEN};
use super::vae::{tiny_vae_config, vae_config, KleinVae, BATCH_NORM_EPS};
use crate::collective::Communicator;
use crate::model::demo_weights::{DemoWeights, RandomWeights};
use crate::model::family::{Denoiser, Family, TextSpec};
use crate::model::linear::Fp8Groups;
use crate::model::qwen3::Qwen3Config;
use crate::model::step::{BlockCtx, PosEmbed, StepInput, Streams};
use crate::model::text::T5Residency;
use crate::model::vae::{vae_config_from_diffusers_str, VaeConfig};
use crate::model::weights::{Identity, KeyMap, MappedWeights, SafetensorsSet};

/// The family's registry name.
pub const NAME: &str = "klein";

impl Denoiser for Klein {
    fn family(&self) -> &'static str {
        NAME
    }
    fn device(&self) -> &Device {
        Klein::device(self)
    }
    fn dtype(&self) -> DType {
        Klein::dtype(self)
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
        TextSpec {
            txt_dim: self.config().context_in_dim,
            pooled_dim: None,
            guidance_embed: self.config().guidance_embed,
        }
    }
    fn token_channels(&self) -> usize {
        self.config().in_channels
    }
    fn pos_embed(&self, txt_len: usize, h: usize, w: usize) -> Result<PosEmbed> {
        Klein::pos_embed(self, txt_len, h, w)
    }
    fn conditioning(&self, input: &StepInput) -> Result<Tensor> {
        Klein::conditioning(self, input)
    }
    fn embed_streams(&self, input: &StepInput) -> Result<Streams> {
        Klein::embed_streams(self, input)
    }
    fn run_blocks(&self, s: Streams, ctx: &BlockCtx, range: Range<usize>) -> Result<Streams> {
        Klein::run_blocks(self, s, ctx, range)
    }
    fn final_layer(&self, img: &Tensor, ctx: &BlockCtx) -> Result<Tensor> {
        Klein::final_layer(self, img, ctx)
    }
    fn forward(&self, input: &StepInput) -> Result<Tensor> {
        Klein::forward(self, input)
    }
    /// None: a sequence-parallel group is held by the replica wrapping the model.
    fn sp_group(&self) -> Option<&Arc<dyn Communicator>> {
        None
    }
    fn held_blocks(&self) -> Range<usize> {
        Klein::held_blocks(self)
    }
    fn keep_blocks(&self, blocks: Range<usize>) -> Arc<dyn Denoiser> {
        Arc::new(self.clone().only_blocks(blocks))
    }
    fn weight_bytes(&self) -> usize {
        Klein::weight_bytes(self)
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

/// FLUX.2 (klein 4B and 9B, distilled and Base) in the family registry.
#[derive(Debug, Clone, Copy, Default)]
pub struct KleinFamily;

impl Family for KleinFamily {
    fn name(&self) -> &'static str {
        NAME
    }

    /// The shared single-block modulation, in Black Forest Labs' names (any prefix) or
    /// diffusers'.
    fn recognises(&self, tensor_names: &[&str]) -> bool {
        keys::detect_layout(tensor_names.iter().copied()).is_some()
    }

    fn tiny_transformer(
        &self,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Arc<dyn Denoiser>> {
        let vb = DemoWeights::new(seed).var_builder(dtype, device);
        Ok(Arc::new(Klein::new(&KleinConfig::tiny(), vb)?))
    }
}

/// Which of the `random:klein-*` models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RandomKlein {
    /// klein's architecture at a tiny size, weights from fixed seeds (tests, CPU runs).
    Tiny,
    /// klein 4B's sizes, random weights made on the device (timings without weights).
    FourB,
    /// klein 9B's sizes, random weights made on the device.
    NineB,
}

impl RandomKlein {
    /// `klein-tiny`, `klein-4b`, `klein-9b` (what follows `random:`).
    pub fn parse(kind: &str) -> Option<Self> {
        match kind.to_ascii_lowercase().as_str() {
            "klein-tiny" => Some(Self::Tiny),
            "klein-4b" => Some(Self::FourB),
            "klein-9b" => Some(Self::NineB),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Tiny => "klein-tiny",
            Self::FourB => "klein-4b",
            Self::NineB => "klein-9b",
        }
    }

    /// What it is, for `parallax info` and the reasons a name resolved as it did.
    pub fn describe(&self) -> &'static str {
        match self {
            Self::Tiny => {
                "FLUX.2 klein's structure at a tiny size, made-up weights from fixed seeds (for \
                 tests and CPU runs; its images are noise)"
            }
            Self::FourB => {
                "FLUX.2 klein 4B's sizes (transformer and autoencoder) with random weights made \
                 on the device; not klein"
            }
            Self::NineB => {
                "FLUX.2 klein 9B's sizes (transformer and autoencoder) with random weights made \
                 on the device; not klein"
            }
        }
    }

    /// The error for a part of Parallax that runs FLUX.1 only (`what` it is) asked to run it.
    pub fn unsupported(&self, what: &str) -> crate::Error {
        crate::Error::InvalidSetting {
            name: "model".into(),
            value: format!("random:{}", self.name()),
            reason: format!(
                "{what} runs FLUX.1 models only so far; FLUX.2 klein runs through \
                 `parallax generate` without it. Use a FLUX.1 model here"
            ),
        }
    }

    pub fn config(&self) -> KleinConfig {
        match self {
            Self::Tiny => KleinConfig::tiny(),
            Self::FourB => KleinConfig::klein_4b(),
            Self::NineB => KleinConfig::klein_9b(),
        }
    }
}

/// Seeds of `random:klein-tiny`'s transformer and autoencoder.
pub const TINY_SEEDS: (u64, u64) = (0x6b6c_6e01, 0x6b6c_6e02);

/// A `random:klein-*` transformer and autoencoder. The tiny one is the same on every device
/// (weights from fixed seeds, made on the CPU); the real sizes are drawn on `device` by its own
/// generator. The autoencoder's statistics are mean 0, deviation 1.
pub fn random_model(kind: RandomKlein, dtype: DType, device: &Device) -> Result<(Klein, KleinVae)> {
    random_stage(
        kind,
        dtype,
        device,
        0..kind.config().num_blocks(),
        Fp8Groups::NONE,
        false,
    )
}

/// [`random_model`] holding only the blocks `blocks` (a pipeline stage's share,
/// [`Klein::new_stage`]); the rest is never made. The tiny one's weights are those of the whole
/// model (each tensor is drawn from its name). FP8 in the groups `g`, each block converted as it
/// is made, as klein's files load ([`Klein::new_stage_fp8`]; `lean` as [`Klein::with_fp8`]).
pub fn random_stage(
    kind: RandomKlein,
    dtype: DType,
    device: &Device,
    blocks: Range<usize>,
    g: Fp8Groups,
    lean: bool,
) -> Result<(Klein, KleinVae)> {
    let cfg = kind.config();
    match kind {
        RandomKlein::Tiny => {
            let vb = DemoWeights::new(TINY_SEEDS.0).var_builder(dtype, device);
            let t = Klein::new_stage_fp8(&cfg, vb, blocks, g, lean)?;
            let vb = DemoWeights::new(TINY_SEEDS.1).var_builder(dtype, device);
            Ok((t, KleinVae::new_unnormalised(&tiny_vae_config(), vb)?))
        }
        RandomKlein::FourB | RandomKlein::NineB => {
            let vb = RandomWeights.var_builder(dtype, device);
            let t = Klein::new_stage_fp8(&cfg, vb, blocks, g, lean)?;
            let vb = RandomWeights.var_builder(dtype, device);
            Ok((t, KleinVae::new_unnormalised(&vae_config(), vb)?))
        }
    }
}

/// Seed of `random:klein-tiny`'s text encoder.
pub const TINY_TEXT_SEED: u64 = 0x6b6c_6e03;

/// A `random:klein-*` model's text encoder: Qwen3 at the size the model takes (tiny: from a
/// fixed seed in f32; 4B: Qwen3-4B's; 9B: Qwen3-8B's, random weights drawn on `device`) and a
/// byte tokenizer with Qwen's chat tokens ([`KleinTextEncoder::made_up`]).
pub fn random_text(
    kind: RandomKlein,
    dtype: DType,
    device: &Device,
) -> crate::Result<KleinTextEncoder> {
    random_text_as(kind, dtype, device, T5Residency::Resident)
}

/// Seed of the real sizes' Qwen3, drawn on a GPU.
const RANDOM_TEXT_SEED: u64 = 0x5157_454e;

/// [`random_text`], Qwen3 kept or built for each prompt as `residency` says. Each build draws
/// the same weights: the tiny one from its fixed seed, the real sizes from the device's generator
/// seeded again before each draw (on a GPU; candle cannot seed the CPU's, so there each build of
/// a real-size random Qwen3 draws new weights).
pub fn random_text_as(
    kind: RandomKlein,
    dtype: DType,
    device: &Device,
    residency: T5Residency,
) -> crate::Result<KleinTextEncoder> {
    let cfg = match kind {
        RandomKlein::Tiny => return KleinTextEncoder::tiny_as(TINY_TEXT_SEED, device, residency),
        RandomKlein::FourB => Qwen3Config::qwen3_4b(),
        RandomKlein::NineB => Qwen3Config::qwen3_8b(),
    };
    let dev = device.clone();
    KleinTextEncoder::made_up_as(
        &cfg,
        Arc::new(move || {
            if !dev.is_cpu() {
                dev.set_seed(RANDOM_TEXT_SEED)?;
            }
            Ok(RandomWeights.var_builder(dtype, &dev))
        }),
        KLEIN_MAX_LEN,
        residency,
    )
}

/// `path`, or its `sub` folder when it has one (a model folder holding `transformer/`, `vae/`).
fn part_dir(path: &Path, sub: &str) -> PathBuf {
    let p = path.join(sub);
    if path.is_dir() && p.is_dir() {
        p
    } else {
        path.to_path_buf()
    }
}

/// Load a FLUX.2 transformer: a Black Forest Labs single file (config read from its shapes), a
/// diffusers `transformer/` folder (its `config.json`), or a model folder holding one. FP8
/// files (E4M3 or E5M2 weights, with or without their scales) load dequantised
/// ([`crate::model::weights::SafetensorsSet::load`]).
pub fn load_transformer(path: &Path, dtype: DType, device: &Device) -> crate::Result<Klein> {
    load_transformer_stage(path, dtype, device, None, Fp8Groups::NONE, false)
}

/// [`load_transformer`] reading only the blocks `blocks` of the unified numbering and the parts
/// outside them that they use (a pipeline stage's share, [`Klein::new_stage`]; `None`: all),
/// with FP8 in the groups `g`, each block converted as it loads ([`Klein::new_stage_fp8`];
/// `lean` as [`Klein::with_fp8`]).
pub fn load_transformer_stage(
    path: &Path,
    dtype: DType,
    device: &Device,
    blocks: Option<Range<usize>>,
    g: Fp8Groups,
    lean: bool,
) -> crate::Result<Klein> {
    let dir = part_dir(path, "transformer");
    let set = SafetensorsSet::open(&dir)?;
    let layout = keys::detect_layout(set.names()).ok_or_else(|| crate::Error::UnknownLayout {
        path: dir.clone(),
        reason: format!(
            "not a FLUX.2 transformer: no `{}` or `{}` tensor",
            keys::BFL_MARKER,
            keys::DIFFUSERS_MARKER
        ),
    })?;
    let config_json = dir.join("config.json");
    let cfg = if dir.is_dir() && config_json.is_file() {
        KleinConfig::from_diffusers_json(&config_json)?
    } else {
        keys::infer_config(&set, &layout)?
    };
    let map: Arc<dyn KeyMap> = Arc::from(keys::key_map(&layout, &cfg));
    let vb = MappedWeights::new(Arc::new(set), map).var_builder(dtype, device);
    let blocks = blocks.unwrap_or(0..cfg.num_blocks());
    Ok(Klein::new_stage_fp8(&cfg, vb, blocks, g, lean)?)
}

/// FLUX.2's autoencoder config from a diffusers `vae/config.json` (an `AutoencoderKLFlux2`
/// config): FLUX.1's fields read as FLUX.1's are (its quant convolutions are FLUX.2's own and
/// loaded here), and the batch norm's epsilon.
fn vae_config_from_json(path: &Path) -> crate::Result<(VaeConfig, f64)> {
    let text = crate::files::read_regular_text(path)?;
    let bad = |reason: String| crate::Error::BadConfig {
        path: path.to_path_buf(),
        reason,
    };
    let mut raw: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| bad(format!("not a diffusers AutoencoderKLFlux2 config: {e}")))?;
    let obj = raw
        .as_object_mut()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    let eps = obj
        .get("batch_norm_eps")
        .and_then(serde_json::Value::as_f64)
        .unwrap_or(BATCH_NORM_EPS);
    obj.remove("use_quant_conv");
    obj.remove("use_post_quant_conv");
    let cfg = vae_config_from_diffusers_str(&raw.to_string(), path)?;
    Ok((
        VaeConfig {
            scaling_factor: 1.0,
            shift_factor: 0.0,
            ..cfg
        },
        eps,
    ))
}

/// Load FLUX.2's autoencoder (its decoding half): Black Forest Labs' `ae.safetensors` (config
/// read from its shapes), a diffusers `vae/` folder (its `config.json`), or a model folder
/// holding one.
pub fn load_vae(path: &Path, dtype: DType, device: &Device) -> crate::Result<KleinVae> {
    let dir = part_dir(path, "vae");
    let set = SafetensorsSet::open(&dir)?;
    if !set.contains("bn.running_mean") {
        return Err(crate::Error::UnknownLayout {
            path: dir,
            reason: "not a FLUX.2 autoencoder: no batch-norm statistics (`bn.running_mean`)".into(),
        });
    }
    let config_json = dir.join("config.json");
    let (map, cfg, eps): (Arc<dyn KeyMap>, VaeConfig, f64) =
        if set.contains("decoder.conv_norm_out.weight") {
            let (cfg, eps) = if dir.is_dir() && config_json.is_file() {
                vae_config_from_json(&config_json)?
            } else {
                (vae_config(), BATCH_NORM_EPS)
            };
            (Arc::new(KleinVaeDiffusersMap::new(cfg.clone())), cfg, eps)
        } else {
            let cfg = VaeConfig {
                scaling_factor: 1.0,
                shift_factor: 0.0,
                ..crate::model::vae::infer_vae_config(&set)?
            };
            let map = Identity {
                prefix: String::new(),
            };
            (Arc::new(map), cfg, BATCH_NORM_EPS)
        };
    let vb = MappedWeights::new(Arc::new(set), map).var_builder(dtype, device);
    Ok(KleinVae::new(&cfg, vb, eps)?)
}
