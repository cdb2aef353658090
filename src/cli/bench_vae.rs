//! `parallax bench-vae`: the autoencoder decode alone, FLUX.1's autoencoder with random weights
//! made on the device: time per decode and peak device memory, as JSON. With `--devices` the
//! decode is split in row bands across CPU worker threads or GPUs (one replica each, NCCL between
//! them), and `--compare` checks the result against one device's decode.

use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use clap::Args;

use crate::model::demo_weights::RandomWeights;
use crate::model::vae::{AutoEncoder, VaeConfig};
use crate::parallel::comm::LocalComm;

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
    /// Split the decode in row bands across workers: `cpu:N` (N CPU worker threads), `cuda` (every
    /// GPU) or `cuda:0,1` (those GPUs, an autoencoder replica on each, NCCL between them).
    /// Replaces --device.
    #[arg(long)]
    pub devices: Option<String>,
    /// Also decode on the first device alone and report the largest difference from it.
    #[arg(long)]
    pub compare: bool,
}

/// The seed of the random weights and latent (the same on every GPU, so replicas are equal).
const SEED: u64 = 0x5641_4531;

/// The workers' devices: `--devices` (CPU threads or GPUs), else the one `--device`; and whether
/// they all share one device.
fn worker_devices(a: &BenchVaeArgs) -> anyhow::Result<(Vec<Device>, bool)> {
    let Some(d) = a.devices.as_deref() else {
        return Ok((vec![crate::device::parse(&a.device)?], true));
    };
    let devices = crate::engine::Devices::parse(d)?;
    let gpus = devices.rank_names(crate::engine::gpus_present())?;
    if !devices.is_gpu() {
        return Ok((vec![Device::Cpu; gpus.len()], true));
    }
    // Naming one GPU several times (`cuda:0,0`) runs that many workers on it, exchanging
    // through memory instead of NCCL: the split decode's GPU path on a one-GPU machine.
    let distinct: std::collections::HashSet<&String> = gpus.iter().collect();
    if distinct.len() > 1 && distinct.len() < gpus.len() {
        bail!("--devices {d}: name each GPU once, or one GPU several times");
    }
    let one_gpu = distinct.len() == 1;
    // A device handle of its own for every worker, even on a shared GPU: candle's handles carry
    // cuBLAS workspaces that two threads must not use at once.
    let devs = gpus
        .iter()
        .map(|g| Ok(crate::device::parse(g)?))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((devs, one_gpu))
}

/// How the workers exchange bands: in-process mail for CPU threads (or workers sharing one GPU,
/// or a single worker), NCCL between GPUs.
enum Comms {
    Local(Vec<LocalComm>),
    #[cfg(feature = "cuda")]
    Nccl(Vec<crate::parallel::nccl::NcclComm>),
}

impl Comms {
    fn new(devs: &[Device], one_device: bool) -> anyhow::Result<Self> {
        if one_device {
            return Ok(Self::Local(LocalComm::group(devs.len())));
        }
        #[cfg(feature = "cuda")]
        return Ok(Self::Nccl(
            crate::parallel::nccl::NcclComm::new_group(devs).context("NCCL set-up")?,
        ));
        #[cfg(not(feature = "cuda"))]
        bail!("GPU workers need the `cuda` feature")
    }

    fn decode(&self, replicas: &[&AutoEncoder], z: &Tensor) -> candle_core::Result<Tensor> {
        use crate::parallel::comm::Communicator;
        use crate::parallel::vae::decode_across;
        let comms: Vec<&dyn Communicator> = match self {
            Self::Local(c) => c.iter().map(|c| c as &dyn Communicator).collect(),
            #[cfg(feature = "cuda")]
            Self::Nccl(c) => c.iter().map(|c| c as &dyn Communicator).collect(),
        };
        decode_across(replicas, &comms, z)
    }
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
    let (devs, one_device) = worker_devices(a)?;
    let dev = devs[0].clone();
    let cfg = if a.tiny {
        VaeConfig::tiny()
    } else {
        VaeConfig::flux()
    };
    let dtype = crate::pipeline::autoencoder_dtype(DType::BF16, &dev);
    // A fixed seed for comparable runs on GPUs (candle's CPU generator cannot be seeded), the
    // same on every GPU so that the replicas are equal (`--compare` checks the result).
    let build = |d: &Device| -> anyhow::Result<AutoEncoder> {
        if d.is_cuda() {
            d.set_seed(SEED)?;
        }
        AutoEncoder::new_decoder_only(&cfg, RandomWeights.var_builder(dtype, d))
            .with_context(|| format!("building the autoencoder on {}", crate::device::describe(d)))
    };
    // The device handles: every GPU worker has its own; CPU workers share the one CPU.
    let handles = if dev.is_cuda() {
        devs.clone()
    } else {
        vec![dev.clone()]
    };
    // An autoencoder per handle, worker i on handle i (or the CPU's).
    let owned = handles
        .iter()
        .map(&build)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let replicas: Vec<&AutoEncoder> = (0..devs.len())
        .map(|i| &owned[i.min(owned.len() - 1)])
        .collect();
    // The weights were written on this thread's stream; the workers read them on theirs.
    for d in &handles {
        crate::device::synchronize(d)?;
    }
    let vae = replicas[0];
    let comms = Comms::new(&devs, one_device)?;
    let f = cfg.downscale_factor();
    let z = Tensor::randn(
        0f32,
        1.0,
        (1, cfg.z_channels, height / f, a.width / f),
        &dev,
    )?;
    let resident = crate::device::memory_in_use(&dev)?;
    let sync_all = || -> anyhow::Result<()> {
        for d in &handles {
            crate::device::synchronize(d)?;
        }
        Ok(())
    };
    let mut times = Vec::with_capacity(a.runs);
    let mut peak_alloc: Option<u64> = None;
    let mut peak_reserved: Option<u64> = None;
    let mut mean_abs = 0.0;
    let mut last = None;
    for i in 0..a.warmup + a.runs {
        for d in &handles {
            crate::device::reset_memory_peak(d)?;
        }
        let t0 = Instant::now();
        let img = comms.decode(&replicas, &z)?;
        sync_all()?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        // The largest peak of any one device.
        for d in &handles {
            if let Some(p) = crate::device::memory_peak(d)? {
                peak_alloc = Some(peak_alloc.map_or(p.allocated, |m| m.max(p.allocated)));
                peak_reserved = Some(peak_reserved.map_or(p.reserved, |m| m.max(p.reserved)));
            }
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
            if a.compare {
                last = Some(img);
            }
        }
    }
    // The same latent decoded on the first device alone, against the split decode.
    let max_diff = match last {
        Some(split) if devs.len() > 1 => {
            let one = vae
                .decode(&z)
                .context("the one-device decode for --compare")?;
            let one = one.to_dtype(DType::F32)?;
            let d = (&one - split.to_device(&dev)?.to_dtype(DType::F32)?)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            let scale = one.abs()?.max_all()?.to_scalar::<f32>()?;
            Some((d as f64, scale as f64))
        }
        _ => None,
    };
    // One more decode, stage by stage with the device synchronised between stages (one device).
    let mut stages = serde_json::Map::new();
    if devs.len() == 1 {
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
        "workers": devs.len(),
        // Workers sharing one GPU: the memory figures count every worker's replica and bands.
        "workers_share_one_gpu": dev.is_cuda() && one_device && devs.len() > 1,
        "max_diff_vs_one_device": max_diff.map(|d| d.0),
        "max_abs_one_device": max_diff.map(|d| d.1),
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
