//! Any family's transformer on the CPU-worker layouts, each against one device: one prompt
//! denoised for a few steps on one worker ([`one_device`]), then through the sequence-parallel
//! replica with a strategy's attention ([`sequence_parallel`]), PipeFusion's stage replica
//! ([`pipefusion`]), true CFG split over two workers ([`cfg_split`]) and the engine's rank loop
//! ([`engine`]: data parallel and meshes); and every cache policy on one worker
//! ([`every_cache_policy`]). Test binaries include it by path.
#![allow(dead_code)]

use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use parallax::model::attention::Attention;
use parallax::model::demo_weights::DemoWeights;
use parallax::model::family::Denoiser;
use parallax::parallel::comm::{run_local, Communicator};
use parallax::parallel::mesh::ParallelLayout;
use parallax::parallel::pipefusion::{PipeFusion, StageBalance};
use parallax::parallel::ranks;
use parallax::parallel::replica::SpReplica;
use parallax::pipeline::cache::{CachePolicy, CacheSpec, CacheStats, MagCalibrator};
use parallax::pipeline::sampler::{self, Conditioning, TrueCfg};
use parallax::pipeline::schedule;
use parallax::pipeline::DenoiseJob;

pub const STEPS: usize = 6;
/// A 4 x 4 grid of image tokens.
pub const GRID: usize = 4;
pub const TXT_LEN: usize = 6;

pub fn made(seed: u64, name: &str, shape: impl Into<Shape>) -> Tensor {
    DemoWeights::new(seed)
        .make(name, &shape.into())
        .expect("made-up tensor")
}

/// Seed `seed`'s made-up prompt as `m` takes it (a (1, 0) pooled tensor when it has none).
pub fn conditioning(m: &dyn Denoiser, seed: u64) -> Conditioning {
    let spec = m.text_spec();
    let pooled = spec.pooled_dim.unwrap_or(0);
    Conditioning {
        txt: made(seed, "txt", (1, TXT_LEN, spec.txt_dim)),
        y: if pooled == 0 {
            Tensor::zeros((1, 0), DType::F32, &Device::Cpu).expect("empty pooled")
        } else {
            made(seed, "pooled", (1, pooled))
        },
    }
}

/// Seed `seed`'s denoising job, no cache; true CFG against seed 9's prompt at `true_cfg` > 1.
/// A model with input channels beside the latent's (a FLUX.1 Fill checkpoint) gets made-up
/// conditioning for them, the same every step.
pub fn job(m: &dyn Denoiser, seed: u64, true_cfg: f64) -> DenoiseJob {
    DenoiseJob {
        cond: conditioning(m, seed),
        neg: (true_cfg > 1.0).then(|| conditioning(m, 9)),
        true_cfg,
        pe: m.pos_embed(TXT_LEN, GRID, GRID).expect("rope"),
        x: made(seed, "noise", (1, GRID * GRID, m.token_channels())),
        timesteps: schedule::timesteps(STEPS, GRID * GRID, true),
        guidance: 3.5,
        cache: CacheSpec::None,
        magcache: None,
        blend: None,
        fill: (m.cond_channels() > 0)
            .then(|| made(seed, "fill", (1, GRID * GRID, m.cond_channels()))),
    }
}

/// `job` on `m` (on one device, or whatever replica `m` is), both true-CFG branches here.
pub fn one_device(m: &dyn Denoiser, job: &DenoiseJob) -> Tensor {
    let mut neg_policy = CacheSpec::None.policy(None).unwrap();
    let cfg = job.neg.as_ref().map(|neg| TrueCfg::Local {
        neg,
        policy: neg_policy.as_mut(),
        scale: job.true_cfg,
    });
    let mut policy = CacheSpec::None.policy(None).unwrap();
    let guidance = m.text_spec().guidance_embed.then_some(job.guidance);
    sampler::denoise_blended(
        m,
        &job.cond,
        &job.pe,
        job.x.clone(),
        &job.timesteps,
        guidance,
        policy.as_mut(),
        cfg,
        None,
        job.fill.as_ref(),
        &mut |_| Ok(()),
    )
    .expect("denoise")
    .0
}

/// `sum|a - b| / sum|b|`.
pub fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let sum = |t: Tensor| {
        t.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    (sum((a - b).unwrap()) / sum(b.clone())) as f64
}

/// The largest relative difference of each rank's latent from `want`.
fn worst(outs: &[Tensor], want: &Tensor) -> f64 {
    outs.iter().map(|x| rel(x, want)).fold(0f64, f64::max)
}

/// The largest relative difference between seed 1's one-device latent and every rank's, each
/// of 2 ranks running `m` through [`SpReplica`] with the attention `strategy` makes.
pub fn sequence_parallel(
    m: &Arc<dyn Denoiser>,
    strategy: &(dyn Fn(usize, Arc<dyn Communicator>) -> Arc<dyn Attention> + Sync),
) -> f64 {
    let j = job(m.as_ref(), 1, 1.0);
    let want = one_device(m.as_ref(), &j);
    let outs = run_local(2, |rank, comm| {
        let comm: Arc<dyn Communicator> = Arc::new(comm);
        let attn = strategy(rank, comm.clone());
        let r = SpReplica::new(m.clone(), comm, attn);
        Ok(one_device(&r, &j))
    })
    .expect("ranks");
    worst(&outs, &want)
}

/// PipeFusion over 2 stages (blocks split by work) with `warmup` exact steps: each stage's
/// relative difference from one device.
pub fn pipefusion(m: &Arc<dyn Denoiser>, warmup: usize) -> Vec<f64> {
    let j = job(m.as_ref(), 1, 1.0);
    let want = one_device(m.as_ref(), &j);
    pipefusion_latents(&|_| m.clone(), &j, warmup)
        .iter()
        .map(|x| rel(x, &want))
        .collect()
}

/// `j` through PipeFusion over 2 stages (blocks split by work) with `warmup` exact steps, stage
/// s running `model(s)` (a whole model it cuts its share from, or its share alone): each stage's
/// final latent.
pub fn pipefusion_latents(
    model: &(dyn Fn(usize) -> Arc<dyn Denoiser> + Sync),
    j: &DenoiseJob,
    warmup: usize,
) -> Vec<Tensor> {
    run_local(2, |rank, comm| {
        let m = model(rank);
        let stage = PipeFusion::replica_in(
            m.as_ref(),
            Arc::new(comm),
            None,
            2,
            warmup,
            StageBalance::Work,
        )?;
        Ok(one_device(&stage, j))
    })
    .expect("stages")
}

/// Seed 1's true CFG at scale 3, the two branches split over 2 workers, against both on one.
pub fn cfg_split(m: &Arc<dyn Denoiser>) -> f64 {
    let j = job(m.as_ref(), 1, 3.0);
    let want = one_device(m.as_ref(), &j);
    let outs = run_local(2, |rank, comm| {
        let cond = if rank == 0 {
            j.cond.clone()
        } else {
            j.neg.clone().expect("negative prompt")
        };
        let mut policy = CacheSpec::None.policy(None).unwrap();
        let cfg = TrueCfg::Split {
            group: &comm,
            scale: 3.0,
        };
        let guidance = m.text_spec().guidance_embed.then_some(j.guidance);
        let (x, _) = sampler::denoise_cfg(
            m.as_ref(),
            &cond,
            &j.pe,
            j.x.clone(),
            &j.timesteps,
            guidance,
            policy.as_mut(),
            Some(cfg),
            &mut |_| Ok(()),
        )
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok(x)
    })
    .expect("ranks");
    worst(&outs, &want)
}

/// `jobs` through the engine's rank loop under `layout`, against each on one device: the
/// largest relative difference.
pub fn engine(m: &Arc<dyn Denoiser>, layout: ParallelLayout, jobs: &[DenoiseJob]) -> f64 {
    let outs = ranks::denoise_many(m, layout, jobs);
    assert_eq!(outs.len(), jobs.len());
    outs.into_iter()
        .zip(jobs)
        .map(|(out, j)| {
            let (x, stats) = out.expect("engine job");
            assert_eq!(stats.computed, STEPS);
            rel(&x, &one_device(m.as_ref(), j))
        })
        .fold(0f64, f64::max)
}

/// Seed `seed`'s job on one worker under `policy` (no true CFG): the latent and what the cache
/// did.
pub fn denoise_cached(
    m: &dyn Denoiser,
    seed: u64,
    policy: &mut dyn CachePolicy,
) -> (Tensor, CacheStats) {
    let j = job(m, seed, 1.0);
    let guidance = m.text_spec().guidance_embed.then_some(j.guidance);
    sampler::denoise_blended(
        m,
        &j.cond,
        &j.pe,
        j.x,
        &j.timesteps,
        guidance,
        policy,
        None,
        None,
        j.fill.as_ref(),
        &mut |_| Ok(()),
    )
    .expect("denoise")
}

/// Every cache policy on `m`, whose family is named `family`: each exact (bit for bit) at its
/// "off" setting, and each reusing steps, finitely, when let. MagCache is refused without a
/// calibration and then calibrated on `m`'s own runs (seeds 2 and 3). The thresholds that let
/// the policies reuse are far above what a made-up model's changes measure: random weights move
/// the velocity too much from step to step for the presets to reuse, and how close a reused
/// image stays says nothing about a trained model (the demo model's figures do).
pub fn every_cache_policy(m: &dyn Denoiser, family: &str) {
    let run = |spec: &str, cal: Option<&Arc<parallax::pipeline::cache::MagCalibration>>| {
        let spec: CacheSpec = spec.parse().expect("spec");
        let mut policy = spec.policy(cal).expect("policy");
        denoise_cached(m, 1, policy.as_mut())
    };
    let values = |t: &Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
    let (reference, stats) = run("none", None);
    assert_eq!(stats.computed, STEPS);
    assert!(values(&reference).iter().all(|x| x.is_finite()));

    let magcache: CacheSpec = "magcache:t=0.3,k=3,warmup=2".parse().unwrap();
    assert!(
        magcache.policy(None).is_err(),
        "MagCache without a calibration is refused"
    );
    let mut calibrator = MagCalibrator::new();
    for seed in [2, 3] {
        denoise_cached(m, seed, &mut calibrator);
    }
    let cal = Arc::new(calibrator.finish(family).expect("calibration"));

    for off in [
        "fbcache:t=0",
        "dbcache:f=2,b=1,t=0,taylor=2",
        "taylorseer:n=1,order=2",
        "magcache:t=0",
    ] {
        let (x, s) = run(off, Some(&cal));
        assert_eq!(s.reused, 0, "{off}");
        assert!(
            values(&x) == values(&reference),
            "{off}: differs from no cache"
        );
    }
    for spec in [
        "fbcache:t=100",
        "dbcache:f=1,b=1,t=100,max=3,warmup=2",
        "taylorseer:n=3,order=1,warmup=2",
        "magcache:t=100,k=3,warmup=2",
    ] {
        let (x, s) = run(spec, Some(&cal));
        eprintln!(
            "{family} {spec}: {} reused of {STEPS}, relative change {:.4}",
            s.reused,
            rel(&x, &reference)
        );
        assert_eq!(s.computed + s.reused, STEPS, "{spec}");
        assert!(s.reused > 0 && s.computed > 0, "{spec}: {s:?}");
        assert!(values(&x).iter().all(|v| v.is_finite()), "{spec}");
        assert!(
            values(&x) != values(&reference),
            "{spec}: reused steps left the latent unchanged"
        );
    }
}
