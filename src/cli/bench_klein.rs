//! `parallax dev bench-klein`: FLUX.2 klein's whole image with random weights on one device,
//! timed by phase: the prompt through Qwen3 (chat template, 512 tokens, three layers joined),
//! the denoising steps (FLUX.2's schedule; true CFG when `--cfg` is above 1, as the Base models
//! run), and the autoencoder's decode, with the device's peak memory, as JSON lines. Random
//! weights are drawn on the device at klein 4B's or 9B's sizes (`random:klein-4b`, `-9b`), or
//! made from fixed seeds at the tiny size (`random:klein-tiny`, for a CPU run). Until klein runs
//! through the image pipeline this is how its speed is measured. `--precision fp8` runs the
//! blocks' products in FP8; `--swiglu plain` times the MLPs' SwiGLU as separate candle ops
//! instead of the fused kernel (before/after in one lease).

use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Tensor};
use clap::Args;

use super::PrecisionArg;
use crate::model::klein::{random_stage, random_text, RandomKlein, LATENT};
use crate::pipeline::cache::CacheSpec;
use crate::pipeline::sampler::{self, Conditioning, TrueCfg};
use crate::pipeline::schedule;

#[derive(Debug, Clone, Args)]
pub struct BenchKleinArgs {
    /// `random:klein-4b`, `random:klein-9b` or `random:klein-tiny`.
    #[arg(long, default_value = "random:klein-4b")]
    pub model: String,
    /// Device: `cuda`, `cuda:N` or `cpu`.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Image side in pixels (a multiple of 16).
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Denoising steps (the distilled models take 4).
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
    /// True CFG scale (the Base models' way; 1 is off, as the distilled models run).
    #[arg(long, default_value_t = 1.0)]
    pub cfg: f64,
    /// Timed images after one warm-up image.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// The transformer blocks' products: `native` (bf16 on a GPU) or `fp8` (E4M3 products,
    /// cuBLASLt on sm_89+ GPUs, simulated elsewhere), as `--precision` runs them elsewhere.
    #[arg(long, value_enum, default_value_t = PrecisionArg::Native)]
    pub precision: PrecisionArg,
    /// The MLPs' SwiGLU (transformer and Qwen3): `fused` (one kernel on CUDA in bf16) or `plain`
    /// (candle's silu, multiply and copies: the speed before the kernel).
    #[arg(long, value_enum, default_value_t = SwigluArg::Fused)]
    pub swiglu: SwigluArg,
    /// FP8 attention (E4M3 queries and keys for the scores), as `--fp8-attention` runs it
    /// elsewhere.
    #[arg(long)]
    pub fp8_attention: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SwigluArg {
    Fused,
    Plain,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

pub fn run(a: BenchKleinArgs) -> anyhow::Result<()> {
    let kind = a
        .model
        .strip_prefix("random:")
        .and_then(RandomKlein::parse)
        .with_context(|| {
            format!(
                "--model {}: use random:klein-4b, random:klein-9b or random:klein-tiny",
                a.model
            )
        })?;
    if a.size == 0 || a.size % 16 != 0 {
        bail!("--size {}: give a multiple of 16", a.size);
    }
    if a.steps == 0 {
        bail!("--steps: at least one");
    }
    let dev = crate::device::parse(&a.device)?;
    let dtype = if dev.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    crate::kernels::elementwise::set_swiglu_fused(a.swiglu == SwigluArg::Fused);
    let started = Instant::now();
    // As `--precision` loads: FP8 without the bf16 copies unless PARALLAX_FP8_KEEP_BF16.
    let o = crate::engine::Precision::from(a.precision).load_options();
    let blocks = 0..kind.config().num_blocks();
    let (model, vae) = random_stage(kind, dtype, &dev, blocks, o.fp8, o.lean)?;
    let model = model.with_fp8_attention(a.fp8_attention);
    let text = random_text(kind, dtype, &dev)?;
    crate::device::synchronize(&dev)?;
    let build_ms = ms(started);
    let side = a.size / 16;
    let tokens = side * side;
    let empty = Tensor::zeros((1, 0), dtype, &dev)?;
    let mut rows = Vec::new();
    for run in 0..=a.runs {
        crate::device::reset_memory_peak(&dev)?;
        let t0 = Instant::now();
        let ids = text.tokenize("a red fox in fresh snow, soft winter light")?;
        let txt = text.encode_tokens(&ids)?;
        let neg_txt = if a.cfg > 1.0 {
            Some(text.encode_tokens(&text.tokenize("")?)?)
        } else {
            None
        };
        crate::device::synchronize(&dev)?;
        let text_ms = ms(t0);
        let t1 = Instant::now();
        let cond = Conditioning {
            txt,
            y: empty.clone(),
        };
        let neg = neg_txt.map(|txt| Conditioning {
            txt,
            y: empty.clone(),
        });
        let pe = model.pos_embed(cond.txt.dim(1)?, side, side)?;
        let noise = Tensor::randn(0f32, 1.0, (1, tokens, LATENT.token_channels()), &dev)?;
        let ts = schedule::flux2_timesteps(a.steps, tokens);
        let mut policy = CacheSpec::None.policy(None)?;
        let mut neg_policy = CacheSpec::None.policy(None)?;
        let cfg = neg.as_ref().map(|neg| TrueCfg::Local {
            neg,
            policy: neg_policy.as_mut(),
            scale: a.cfg,
        });
        let (x, _) = sampler::denoise_cfg(
            &model,
            &cond,
            &pe,
            noise,
            &ts,
            None,
            policy.as_mut(),
            cfg,
            &mut |_| Ok(()),
        )?;
        crate::device::synchronize(&dev)?;
        let denoise_ms = ms(t1);
        let t2 = Instant::now();
        let z = LATENT.unpack(&x, side * LATENT.patch, side * LATENT.patch)?;
        let image = vae.decode(&z)?;
        crate::device::synchronize(&dev)?;
        let decode_ms = ms(t2);
        let total_ms = ms(t0);
        let peak = crate::device::memory_peak(&dev)?;
        let finite = image
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|v| v.is_finite());
        let row = serde_json::json!({
            "model": a.model, "device": a.device, "dtype": format!("{dtype:?}").to_lowercase(),
            "size": a.size, "image_tokens": tokens, "text_tokens": cond.txt.dim(1)?,
            "steps": a.steps, "cfg": a.cfg, "run": run, "warmup": run == 0,
            "precision": format!("{:?}", a.precision).to_lowercase(),
            "swiglu": format!("{:?}", a.swiglu).to_lowercase(),
            "fp8_attention": a.fp8_attention,
            "text_ms": text_ms, "denoise_ms": denoise_ms,
            "step_ms": denoise_ms / a.steps as f64, "decode_ms": decode_ms, "total_ms": total_ms,
            "peak_allocated_gib": peak.map(|p| p.allocated as f64 / (1u64 << 30) as f64),
            "transformer_gib": model.weight_bytes() as f64 / (1u64 << 30) as f64,
            "build_ms": build_ms, "image_finite": finite,
        });
        println!("{row}");
        if run > 0 {
            rows.push([total_ms, text_ms, denoise_ms / a.steps as f64, decode_ms]);
        }
    }
    if !rows.is_empty() {
        let median = |i: usize| super::median(&rows.iter().map(|r| r[i]).collect::<Vec<_>>());
        println!(
            "{}",
            serde_json::json!({
                "model": a.model, "size": a.size, "steps": a.steps, "cfg": a.cfg,
                "precision": format!("{:?}", a.precision).to_lowercase(),
                "swiglu": format!("{:?}", a.swiglu).to_lowercase(),
                "fp8_attention": a.fp8_attention,
                "runs": rows.len(),
                "total_ms_median": median(0), "text_ms_median": median(1),
                "step_ms_median": median(2), "decode_ms_median": median(3),
            })
        );
    }
    Ok(())
}
