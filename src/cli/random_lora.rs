//! `parallax dev random-lora`: a LoRA file with random weights for a FLUX.1 size (`dev`, `schnell`,
//! `tiny` or `demo`), in Black Forest Labs' names with `lora_A`/`lora_B`, on the blocks' products
//! (q/k/v, attention output, MLPs, the single blocks' `linear1`/`linear2`) as trained LoRAs are:
//! what the LoRA overhead is timed with when no LoRA file can be downloaded.

use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use clap::Args;

use crate::model::flux::FluxConfig;
use crate::model::lora::flux_linear_layers;

#[derive(Debug, Clone, Args)]
pub struct RandomLoraArgs {
    /// The FLUX.1 size: `dev`, `schnell`, `tiny` or `demo`.
    #[arg(long, default_value = "dev")]
    pub size: String,
    /// The rank of every part.
    #[arg(long, default_value_t = 16)]
    pub rank: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The file to write (`.safetensors`).
    pub out: PathBuf,
}

pub fn run(a: RandomLoraArgs) -> anyhow::Result<()> {
    let cfg = match a.size.as_str() {
        "dev" => FluxConfig::dev(),
        "schnell" => FluxConfig::schnell(),
        "tiny" => FluxConfig::tiny(),
        "demo" => FluxConfig::demo(),
        other => bail!("--size {other}: use dev, schnell, tiny or demo"),
    };
    if a.rank == 0 {
        bail!("--rank: at least 1");
    }
    let mut rng = crate::model::rng::SplitMix64::new(a.seed);
    let mut tensors = Vec::new();
    let blocks = |name: &str| {
        name.starts_with("double_blocks.") && !name.ends_with("_mod.lin")
            || name.starts_with("single_blocks.") && !name.ends_with("modulation.lin")
    };
    for (layer, out_dim, in_dim) in flux_linear_layers(&cfg)
        .into_iter()
        .filter(|(l, _, _)| blocks(l))
    {
        // Kaiming-like A, small B: a LoRA's usual scale after training.
        let a_std = 1.0 / (in_dim as f32).sqrt();
        let down: Vec<f32> = rng
            .normals(a.rank * in_dim)
            .into_iter()
            .map(|v| v * a_std)
            .collect();
        let up: Vec<f32> = rng
            .normals(out_dim * a.rank)
            .into_iter()
            .map(|v| v * 0.01)
            .collect();
        let base = format!("diffusion_model.{layer}");
        tensors.push((
            format!("{base}.lora_A.weight"),
            Tensor::from_vec(down, (a.rank, in_dim), &Device::Cpu)?.to_dtype(DType::BF16)?,
        ));
        tensors.push((
            format!("{base}.lora_B.weight"),
            Tensor::from_vec(up, (out_dim, a.rank), &Device::Cpu)?.to_dtype(DType::BF16)?,
        ));
    }
    crate::model::weights::save_safetensors(&tensors, &a.out)
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "wrote {} ({} layers, rank {})",
        a.out.display(),
        tensors.len() / 2,
        a.rank
    );
    Ok(())
}
