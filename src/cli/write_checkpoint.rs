//! `parallax dev write-checkpoint`: a FLUX.1 transformer of real size with random weights written
//! to a file in Black Forest Labs' single-file layout, bf16 or FP8 (E4M3 matrices with a scale
//! each), tensor by tensor ([`crate::model::checkpoint`]): what a cold start from disk is timed
//! with when no weights can be downloaded (`scripts/device-cold.sh`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};

use crate::model::checkpoint::{write_random, CheckpointDtype};
use crate::model::flux::FluxConfig;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    Bf16,
    Fp8,
}

#[derive(Debug, Clone, Args)]
pub struct WriteCheckpointArgs {
    /// The FLUX.1 size: `random:dev`, `random:schnell` or `random:tiny`.
    #[arg(long, default_value = "random:dev")]
    pub model: String,
    /// How the matrices are stored.
    #[arg(long, value_enum, default_value_t = DtypeArg::Bf16)]
    pub dtype: DtypeArg,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The file to write (`.safetensors`).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: WriteCheckpointArgs) -> anyhow::Result<()> {
    let (cfg, variant) = match a.model.as_str() {
        "random:dev" => (FluxConfig::dev(), "dev"),
        "random:schnell" => (FluxConfig::schnell(), "schnell"),
        "random:tiny" => (FluxConfig::tiny(), "tiny"),
        other => bail!("--model {other}: use random:dev, random:schnell or random:tiny"),
    };
    let dtype = match a.dtype {
        DtypeArg::Bf16 => CheckpointDtype::Bf16,
        DtypeArg::Fp8 => CheckpointDtype::Fp8,
    };
    let start = Instant::now();
    let bar = indicatif::ProgressBar::new_spinner();
    let bytes = write_random(&cfg, variant, dtype, a.seed, &a.out, &mut |name, b| {
        bar.set_message(format!("{:.2} GB, {name}", b as f64 / 1e9));
        bar.tick();
    })
    .with_context(|| format!("writing {}", a.out.display()))?;
    bar.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "out": a.out.display().to_string(),
            "model": a.model,
            "dtype": format!("{:?}", a.dtype).to_lowercase(),
            "bytes": bytes,
            "seconds": secs,
            "write_gb_per_s": bytes as f64 / 1e9 / secs.max(1e-9),
        })
    );
    Ok(())
}
