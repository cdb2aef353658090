//! `parallax bench-vae`: the autoencoder decode alone, FLUX.1's autoencoder with random weights
//! made on the device: time per decode and peak device memory, as JSON.

use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Tensor};
use clap::Args;

use crate::model::demo_weights::RandomWeights;
use crate::model::vae::{AutoEncoder, VaeConfig};

#[derive(Debug, Clone, Args)]
pub struct BenchVaeArgs {
    /// Device: `cuda`, `cuda:N` or `cpu`.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Image width in pixels (a multiple of 8).
    #[arg(long, default_value_t = 1024)]
    pub width: usize,
    /// Image height in pixels (default: the width).
    #[arg(long)]
    pub height: Option<usize>,
    /// Timed decodes (after the warm-up).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// The demo model's tiny autoencoder instead of FLUX.1's (for a quick run on the CPU).
    #[arg(long)]
    pub tiny: bool,
}

pub fn run(a: &BenchVaeArgs) -> anyhow::Result<()> {
    let height = a.height.unwrap_or(a.width);
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if a.width == 0 || height == 0 || a.width % 8 != 0 || height % 8 != 0 {
        bail!(
            "--width and --height must be positive multiples of 8 (got {}x{height})",
            a.width
        );
    }
    let dev = crate::device::parse(&a.device)?;
    let cfg = if a.tiny {
        VaeConfig::tiny()
    } else {
        VaeConfig::flux()
    };
    let dtype = crate::pipeline::autoencoder_dtype(DType::BF16, &dev);
    // A fixed seed for comparable runs on GPUs (candle's CPU generator cannot be seeded).
    if dev.is_cuda() {
        dev.set_seed(0x5641_4531)?;
    }
    let vae = AutoEncoder::new_decoder_only(&cfg, RandomWeights.var_builder(dtype, &dev))
        .context("building the autoencoder")?;
    let f = cfg.downscale_factor();
    let z = Tensor::randn(
        0f32,
        1.0,
        (1, cfg.z_channels, height / f, a.width / f),
        &dev,
    )?;
    let resident = crate::device::memory_in_use(&dev)?;
    let mut times = Vec::with_capacity(a.runs);
    let mut peak_alloc: Option<u64> = None;
    let mut peak_reserved: Option<u64> = None;
    let mut mean_abs = 0.0;
    for i in 0..a.warmup + a.runs {
        crate::device::reset_memory_peak(&dev)?;
        let t0 = Instant::now();
        let img = vae.decode(&z)?;
        crate::device::synchronize(&dev)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        if let Some(p) = crate::device::memory_peak(&dev)? {
            peak_alloc = Some(peak_alloc.map_or(p.allocated, |m| m.max(p.allocated)));
            peak_reserved = Some(peak_reserved.map_or(p.reserved, |m| m.max(p.reserved)));
        }
        if i >= a.warmup {
            times.push(ms);
        }
        if i + 1 == a.warmup + a.runs {
            mean_abs = img
                .to_dtype(DType::F32)?
                .abs()?
                .mean_all()?
                .to_scalar::<f32>()? as f64;
            if !mean_abs.is_finite() {
                bail!("the decoded image has non-finite values");
            }
        }
        drop(img);
    }
    // One more decode, stage by stage with the device synchronised between stages.
    let mut stages = serde_json::Map::new();
    {
        let d = vae.decoder();
        let sync = || crate::device::synchronize(&dev);
        let z = vae.unscale_latent(&z.to_dtype(dtype)?)?;
        sync()?;
        let t0 = Instant::now();
        let mut h = d.forward_mid(&z)?;
        sync()?;
        stages.insert("mid".into(), (t0.elapsed().as_secs_f64() * 1e3).into());
        for level in (0..d.up.len()).rev() {
            let t0 = Instant::now();
            h = d.forward_level_owned(level, h)?;
            sync()?;
            stages.insert(
                format!("level{level}"),
                (t0.elapsed().as_secs_f64() * 1e3).into(),
            );
        }
        let t0 = Instant::now();
        drop(d.forward_out(&h)?);
        sync()?;
        stages.insert("out".into(), (t0.elapsed().as_secs_f64() * 1e3).into());
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let report = serde_json::json!({
        "device": crate::device::describe(&dev),
        "autoencoder": if a.tiny { "tiny" } else { "flux" },
        "dtype": format!("{dtype:?}"),
        "convolution": crate::kernels::conv::path(&dev, dtype),
        "width": a.width,
        "height": height,
        "warmup": a.warmup,
        "runs": a.runs,
        "decode_ms": {
            "median": super::median(&times),
            "min": times.iter().copied().fold(f64::INFINITY, f64::min),
            "all": times,
        },
        "resident_before_mib": resident.map(mib),
        "peak_allocated_mib": peak_alloc.map(mib),
        "peak_reserved_mib": peak_reserved.map(mib),
        "image_mean_abs": mean_abs,
        "stages_ms": stages,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
