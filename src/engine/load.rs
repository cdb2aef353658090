//! Loading a model for the engine: which model (by the `--model` grammar), in which dtype, on
//! which device, and the model's transformer config read from the files' headers without
//! loading any weights (so a placement can be checked against the heads before 24 GB load).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::engine::memory;
use crate::error::Result;
use crate::model::flux::FluxConfig;
use crate::model::flux::Fp8Groups;
use crate::model::layout::{self, ModelSpec, Resolved, TransformerLayout, Variant};
use crate::model::weights::SafetensorsSet;
use crate::pipeline::ahead::KleinTextFirst;
use crate::pipeline::{LoadOptions, Pipeline};

/// The dtype the weights run in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DTypeChoice {
    /// f32 for the demo model, bf16 for real weights.
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

/// Which model to load: a `--model` value, where the text encoders are, the dtype.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelChoice {
    /// `demo`, `random:dev`, `dev`/`schnell`/a repo id, a file or a folder.
    pub model: String,
    /// Folder with text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/ (default: the
    /// model's folder).
    pub text_encoders: Option<PathBuf>,
    /// The autoencoder, when not beside the transformer (`ae.safetensors` or a diffusers `vae/`).
    #[serde(default)]
    pub vae: Option<PathBuf>,
    /// The CLIP text model, when not beside the transformer (e.g. ComfyUI's `clip_l.safetensors`).
    #[serde(default)]
    pub clip: Option<PathBuf>,
    /// The T5 encoder, when not beside the transformer (e.g. ComfyUI's `t5xxl_fp16.safetensors`).
    #[serde(default)]
    pub t5: Option<PathBuf>,
    pub dtype: DTypeChoice,
    /// Precision of the transformer blocks' products.
    #[serde(default)]
    pub precision: Precision,
    /// Device memory to fit within, in MiB ([`crate::engine::memory`]); none: load as asked.
    #[serde(default)]
    pub memory_budget_mib: Option<u64>,
    /// Attention's scores from E4M3 queries and keys (`--fp8-attention`; see
    /// [`LoadOptions::fp8_attention`]): approximate, and not faster yet on an H100 (BENCHMARKS.md).
    #[serde(default)]
    pub fp8_attention: bool,
    /// The image size (width, height) a memory budget is planned for: the activations grow with
    /// it. None: [`PLAN_SIZE`] square (256 px for the demo). The CLI passes its request's size;
    /// the studio leaves it out (a new size would otherwise reload the model).
    #[serde(default)]
    pub plan_size: Option<(usize, usize)>,
}

/// How the transformer blocks' matrix products are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Precision {
    /// In the run's dtype.
    #[default]
    Native,
    /// FP8 E4M3 (weights per output channel, activations per token): cuBLASLt's FP8 products
    /// on sm_89+ GPUs in bf16; elsewhere simulated by rounding in the run's dtype (FP8's
    /// quality, not its speed).
    Fp8,
}

impl Precision {
    /// The load options this precision asks for, before any memory budget: under FP8 the
    /// transformer keeps its E4M3 weights alone wherever the GPU multiplies FP8 ([`LoadOptions::lean`],
    /// the default since issue 30), unless [`keep_bf16_copies`] asks otherwise. No feature of a
    /// generation needs the copies: LoRAs (beside or merged) run their low-rank path beside an FP8
    /// product in the run's dtype; a product the FP8 kernels do not take dequantises the E4M3
    /// weight for that call ([`crate::model::flux::Flux`]'s `Lin::weight`); PipeFusion stages and
    /// the sequence-parallel splits run the same products on their share; the CPU and GPUs
    /// without FP8 products simulate FP8 with the rounded weights, which they keep (no GPU copy
    /// stands for them, so nothing is dropped there). `parallax dev fp8-error` converts a bf16
    /// model after loading and keeps its originals to compare against.
    pub fn load_options(self) -> LoadOptions {
        match self {
            Precision::Native => LoadOptions::default(),
            Precision::Fp8 => LoadOptions {
                fp8: Fp8Groups::ALL,
                lean: !keep_bf16_copies(),
                ..Default::default()
            },
        }
    }
}

/// Whether an FP8 run keeps the bf16 copies of its weights beside the E4M3 ones
/// (`PARALLAX_FP8_KEEP_BF16=1`: the behaviour before issue 30, twice the products' memory; for
/// measuring, or where many products fall back to the unrounded path and the per-call
/// dequantisation would cost more than the memory).
pub fn keep_bf16_copies() -> bool {
    std::env::var_os("PARALLAX_FP8_KEEP_BF16").is_some_and(|v| v != "0" && !v.is_empty())
}

impl ModelChoice {
    pub fn named(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            text_encoders: None,
            vae: None,
            clip: None,
            t5: None,
            dtype: DTypeChoice::Auto,
            precision: Precision::Native,
            memory_budget_mib: None,
            fp8_attention: false,
            plan_size: None,
        }
    }

    pub fn resolve(&self) -> Result<Resolved> {
        layout::resolve_parts(
            &self.model,
            &layout::PartPaths {
                text_encoders: self.text_encoders.clone(),
                vae: self.vae.clone(),
                clip: self.clip.clone(),
                t5: self.t5.clone(),
            },
        )
    }
}

impl ModelChoice {
    /// [`ModelChoice::resolve`] for a memory estimate: `dev`/`schnell` (or their repo ids) that
    /// are not downloaded stand in as FLUX.1's built-in configs ([`ModelSpec::Random`]; no
    /// weights are read to plan), `klein-4b`/`klein-9b` (or theirs) as klein's
    /// ([`ModelSpec::RandomKlein`]), the reason saying so.
    pub fn resolve_for_planning(&self) -> Result<Resolved> {
        match self.resolve() {
            Ok(r) => Ok(r),
            Err(e) => match layout::published_variant(&self.model) {
                Some(v) => Ok(Resolved {
                    spec: ModelSpec::Random(v),
                    reasons: vec![format!(
                        "{} is not here ({e}): planned from FLUX.1-{}'s built-in configs (12B \
                         transformer, T5-XXL, CLIP-L, autoencoder)",
                        self.model,
                        v.name()
                    )],
                }),
                None => match planned_klein(&self.model) {
                    Some(k) => Ok(Resolved {
                        spec: ModelSpec::RandomKlein(k),
                        reasons: vec![format!(
                            "{} is not here ({e}): planned from FLUX.2 {}'s built-in configs \
                             (transformer, Qwen3 text encoder, autoencoder)",
                            self.model,
                            k.name()
                        )],
                    }),
                    None => Err(e),
                },
            },
        }
    }
}

/// The klein size a name stands for when planning: `klein-4b`/`klein-9b`, or Black Forest Labs'
/// repo ids (`black-forest-labs/FLUX.2-klein-4B`, its `-base-` twin).
fn planned_klein(name: &str) -> Option<crate::model::klein::RandomKlein> {
    use crate::model::klein::RandomKlein;
    let lower = name.to_ascii_lowercase();
    let short = lower
        .strip_prefix("black-forest-labs/flux.2-")
        .unwrap_or(&lower)
        .replace("klein-base-", "klein-");
    RandomKlein::parse(&short).filter(|k| *k != RandomKlein::Tiny)
}

impl From<&str> for ModelChoice {
    fn from(model: &str) -> Self {
        Self::named(model)
    }
}

impl From<String> for ModelChoice {
    fn from(model: String) -> Self {
        Self::named(model)
    }
}

impl Default for ModelChoice {
    fn default() -> Self {
        Self::named("demo")
    }
}

fn dtype_for(choice: DTypeChoice, spec: &ModelSpec) -> DType {
    match (choice, spec) {
        (DTypeChoice::Auto, ModelSpec::Demo | ModelSpec::Random(Variant::Demo)) => DType::F32,
        (DTypeChoice::Auto, ModelSpec::Files(f)) if f.demo => DType::F32,
        (DTypeChoice::Auto, ModelSpec::Klein(f)) if f.demo => DType::F32,
        (DTypeChoice::Auto, ModelSpec::RandomKlein(crate::model::klein::RandomKlein::Tiny)) => {
            DType::F32
        }
        (DTypeChoice::Auto, _) => DType::BF16,
        (DTypeChoice::F32, _) => DType::F32,
        (DTypeChoice::Bf16, _) => DType::BF16,
        (DTypeChoice::F16, _) => DType::F16,
    }
}

/// Resolve and load `choice` on `device` (`cpu`, `cuda`, `cuda:N`).
pub fn load_pipeline(choice: &ModelChoice, device: &str) -> Result<Pipeline> {
    load_pipeline_blocks(choice, device, None)
}

/// [`load_pipeline`] holding only the transformer blocks `blocks` (`start`, `end`; a PipeFusion
/// stage's), or all of them.
pub fn load_pipeline_blocks(
    choice: &ModelChoice,
    device: &str,
    blocks: Option<(usize, usize)>,
) -> Result<Pipeline> {
    load_pipeline_ahead(choice, device, blocks, &[])
}

/// [`load_pipeline_blocks`] for a first job whose prompts are `ahead`
/// ([`super::overlap::prompts_for`]): a FLUX.1 or FLUX.2 klein model from files encodes them
/// while its transformer loads ([`super::overlap`]), the job then finds them encoded. Other
/// models (the built-in ones, random ones) load as without them.
pub fn load_pipeline_ahead(
    choice: &ModelChoice,
    device: &str,
    blocks: Option<(usize, usize)>,
    ahead: &[String],
) -> Result<Pipeline> {
    let dev = crate::device::parse(device)?;
    let resolved = choice.resolve()?;
    for r in &resolved.reasons {
        tracing::info!("{r}");
    }
    let dtype = dtype_for(choice.dtype, &resolved.spec);
    if matches!(resolved.spec, ModelSpec::Demo)
        && choice.dtype != DTypeChoice::Auto
        && dtype != DType::F32
    {
        tracing::warn!("the demo model always runs in f32");
    }
    let asked = LoadOptions {
        blocks,
        fp8_attention: choice.fp8_attention,
        ..choice.precision.load_options()
    };
    let opts = match choice.memory_budget_mib {
        None => asked,
        Some(mib) => {
            let w = workload(&resolved, dtype, choice.plan_size, !dev.is_cpu())?;
            let plan = memory::plan(
                &w,
                (mib as f64) * (1u64 << 20) as f64,
                asked,
                fp8_products_run(&dev, dtype),
            )?;
            tracing::info!("memory plan for {} px: {plan}", w.width);
            if !plan.unbuilt.is_empty() {
                return Err(crate::Error::setting(
                    "memory budget",
                    format!("{mib} MiB"),
                    format!(
                        "{} fits it only with {}, not built for {} yet: give a larger budget",
                        choice.model,
                        plan.unbuilt.join(", "),
                        w.family
                    ),
                ));
            }
            if asked.fp8 == Fp8Groups::NONE && plan.options.fp8 != Fp8Groups::NONE {
                tracing::warn!(
                    "--memory-budget: FP8 products chosen to fit (FP8's error applies: see BENCHMARKS.md)"
                );
            }
            LoadOptions {
                blocks,
                fp8_attention: choice.fp8_attention,
                ..plan.options
            }
        }
    };
    let t0 = Instant::now();
    let p = match &resolved.spec {
        ModelSpec::Files(files) => {
            super::overlap::load_files(files, &choice.model, dtype, &dev, opts, ahead).and_then(
                |mut p| {
                    p.apply_load_options(opts)?;
                    Ok(p)
                },
            )
        }
        ModelSpec::Klein(files) => KleinTextFirst::load(files, &choice.model, dtype, &dev, opts)
            .and_then(|first| super::overlap::load_text_first(first, ahead)),
        _ => Pipeline::load_with(&resolved, &choice.model, dtype, &dev, opts),
    }
    .and_then(|mut p| {
        // Every family's loading path (files, text first, built-in) ends here.
        p.set_fp8_attention(opts.fp8_attention)?;
        Ok(p)
    })
    .map_err(|e| e.loading(format!("model `{}` on {device}", choice.model)))?;
    let fp8 = p.model.as_flux1().map(|f| f.flux);
    if fp8.is_some_and(|f| f.fp8_products() && !dev.is_cpu() && !f.fp8_kernels()) {
        tracing::warn!(
            "--precision fp8: FP8 products need bf16 on an sm_89 or newer GPU; here they are \
             simulated (rounding in {dtype:?}): FP8's quality, not its speed"
        );
    }
    // The weights are written by this thread's stream; other threads (GPU ranks, data-parallel
    // groups) queue on streams of their own.
    crate::device::synchronize(p.device())?;
    tracing::info!(
        "model loaded on {device} in {:.2}s",
        t0.elapsed().as_secs_f64()
    );
    Ok(p)
}

/// The image size a memory budget is planned for (the demo model's default, 256 px, for it).
pub const PLAN_SIZE: usize = 1024;

/// Whether `dev` runs real FP8 products for weights in `dtype` (bf16 on an sm_89+ GPU).
pub fn fp8_products_run(dev: &candle_core::Device, dtype: DType) -> bool {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(c) = dev {
        return dtype == DType::BF16
            && crate::kernels::fp8_gemm::enabled()
            && crate::kernels::fp8_gemm::supported(c);
    }
    let _ = (dev, dtype);
    false
}

/// What one image of `size` (width, height; `None`: the size a budget is planned for) on
/// `resolved` is, for a memory estimate, on a GPU (`gpu`: its context counts) or the CPU.
pub fn workload(
    resolved: &Resolved,
    dtype: DType,
    size: Option<(usize, usize)>,
    gpu: bool,
) -> Result<memory::Workload> {
    use crate::model::text;
    if let ModelSpec::RandomKlein(k) = &resolved.spec {
        return Ok(klein_workload(
            *k,
            dtype,
            size.unwrap_or((PLAN_SIZE, PLAN_SIZE)),
            gpu,
        ));
    }
    let flux = model_config(resolved)?;
    let demo = flux.context_in_dim == text::DEMO_T5_DIM;
    let size = size.unwrap_or(if demo {
        (256, 256)
    } else {
        (PLAN_SIZE, PLAN_SIZE)
    });
    let variant = if flux.guidance_embed {
        Variant::Dev
    } else {
        Variant::Schnell
    };
    let (t5, clip, t5_tokens) = if demo {
        (
            text::t5_demo_config(),
            text::clip_demo_config(),
            text::DEMO_T5_MAX_LEN,
        )
    } else {
        (
            text::t5_xxl_config(),
            text::clip_l_config(),
            variant.t5_max_len(),
        )
    };
    Ok(memory::Workload::flux1(
        &flux,
        &t5,
        &clip,
        t5_tokens,
        size,
        dtype.size_in_bytes() as u64,
        !demo,
        gpu,
    ))
}

/// A `random:klein-*` model's workload from its built-in configs (4B: Qwen3-4B, 9B: Qwen3-8B,
/// each read through the last layer klein joins; the tiny one's own small parts).
fn klein_workload(
    k: crate::model::klein::RandomKlein,
    dtype: DType,
    size: (usize, usize),
    gpu: bool,
) -> memory::Workload {
    use crate::model::klein::{self, text::KLEIN_MAX_LEN, text::KLEIN_TEXT_LAYERS, RandomKlein};
    use crate::model::qwen3::Qwen3Config;
    let (text, vae) = match k {
        RandomKlein::Tiny => (Qwen3Config::tiny(), klein::tiny_vae_config()),
        RandomKlein::FourB => (Qwen3Config::qwen3_4b(), klein::vae_config()),
        RandomKlein::NineB => (Qwen3Config::qwen3_8b(), klein::vae_config()),
    };
    let layers = KLEIN_TEXT_LAYERS[KLEIN_TEXT_LAYERS.len() - 1];
    memory::Workload::klein(
        &k.config(),
        &text,
        layers,
        KLEIN_MAX_LEN,
        &vae,
        size,
        dtype.size_in_bytes() as u64,
        gpu,
    )
}

/// The transformer config of a resolved model, from the files' headers alone (no weights read).
pub fn model_config(resolved: &Resolved) -> Result<FluxConfig> {
    match &resolved.spec {
        ModelSpec::Demo => Ok(FluxConfig::demo()),
        ModelSpec::Random(Variant::Demo) => Ok(FluxConfig::tiny()),
        ModelSpec::Random(Variant::Schnell) => Ok(FluxConfig::schnell()),
        ModelSpec::Random(_) => Ok(FluxConfig::dev()),
        ModelSpec::RandomKlein(k) => Err(k.unsupported("memory planning")),
        ModelSpec::Klein(f) => Err(crate::Error::setting(
            "model",
            f.transformer.display(),
            "memory planning runs FLUX.1 models only so far; FLUX.2 klein runs through \
             `parallax generate` without it",
        )),
        ModelSpec::Files(f) => match &f.transformer_layout {
            TransformerLayout::Diffusers if f.transformer.join("config.json").is_file() => {
                layout::flux_config_from_diffusers_json(&f.transformer.join("config.json"))
            }
            l => layout::infer_flux_config(&SafetensorsSet::open(&f.transformer)?, l),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layout::Variant;

    /// `--precision fp8` drops the bf16 copies by default: a budget never needs to, and the
    /// transformer is under half the size of one that keeps them.
    #[test]
    fn fp8_asks_for_the_lean_transformer() {
        let resolved = Resolved {
            spec: ModelSpec::Random(Variant::Dev),
            reasons: vec![],
        };
        let w = workload(&resolved, DType::BF16, None, true).expect("workload");
        let gib = (1u64 << 30) as f64;
        let asked = Precision::Fp8.load_options();
        if keep_bf16_copies() {
            assert!(!asked.lean);
            return;
        }
        assert!(asked.lean && asked.fp8 == Fp8Groups::ALL);
        let p = memory::plan(&w, 36.0 * gib, asked, true).expect("36 GiB");
        assert!(
            !p.measures
                .contains(&"FP8 weights without their bf16 copies"),
            "{p}"
        );
        let kept = LoadOptions {
            lean: false,
            ..asked
        };
        let (lean, kept) = (memory::estimate(&w, &asked), memory::estimate(&w, &kept));
        assert!(
            lean.transformer < kept.transformer / 2.0,
            "{lean:?} {kept:?}"
        );
        assert_eq!(Precision::Native.load_options(), LoadOptions::default());
    }
}
