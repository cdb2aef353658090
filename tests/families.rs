//! A second model family through the family seams (issue 27): the tiny SwiGLU family of
//! `tests/common/family_swiglu/` (no pooled text vector, shared modulation, 4-axis RoPE, a
//! 32-channel latent whose preview map is fitted to its own codec), added
//! to the registry at run time, denoised by the sampler under every cache policy and under true
//! CFG on one worker, with no code outside its folder knowing it.
//!
//! On CPU worker threads it runs the sequence-parallel layouts through the generic replica
//! ([`parallax::parallel::replica::SpReplica`]): Ulysses 2, Ring 2, displaced patches 2 (exact in
//! warm-up, rotating after), and true CFG split over 2 workers, each against its one-device
//! result, and PipeFusion 2 through its generic stage replica
//! ([`parallax::parallel::pipefusion::PipeFusion::replica_in`]). Through the engine's own rank
//! loop ([`parallax::parallel::ranks::denoise_many`]): data parallel 2, and meshes (dp 2 x
//! Ulysses 2, dp 2 x CFG 2 x ring 2 under true CFG). Not yet here: the pipeline that prepares a
//! request (text encoders, VAE) still holds FLUX.1's `Flux`.

#[path = "common/family_swiglu/mod.rs"]
mod family_swiglu;
#[path = "common/layouts.rs"]
mod layouts;

use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use parallax::model::attention::Attention;
use parallax::model::demo_weights::DemoWeights;
use parallax::model::family::{self, Denoiser};
use parallax::parallel::comm::{run_local, Communicator, LocalComm};
use parallax::parallel::displaced::DisplacedAttention;
use parallax::parallel::mesh::ParallelLayout;
use parallax::parallel::pipefusion::{PipeFusion, StageBalance};
use parallax::parallel::ranks;
use parallax::parallel::replica::SpReplica;
use parallax::parallel::ring::RingAttention;
use parallax::parallel::ulysses::UlyssesAttention;
use parallax::pipeline::cache::{CachePolicy, CacheSpec, CacheStats};
use parallax::pipeline::sampler::{self, Conditioning, TrueCfg};
use parallax::pipeline::schedule;
use parallax::pipeline::DenoiseJob;

const STEPS: usize = 10;
/// Latent 16 x 16: an 8 x 8 grid of 2x2 patches.
const GRID: usize = 8;
const TXT_LEN: usize = 12;

fn model() -> Arc<dyn Denoiser> {
    family_swiglu::register();
    family::family(family_swiglu::NAME)
        .expect("registered")
        .tiny_transformer(7, DType::F32, &Device::Cpu)
        .expect("tiny swiglu model")
}

fn made(seed: u64, name: &str, shape: impl Into<Shape>) -> Tensor {
    DemoWeights::new(seed)
        .make(name, &shape.into())
        .expect("made-up tensor")
}

/// A prompt's conditioning as a family without a pooled vector takes it: hidden states and a
/// (1, 0) pooled tensor.
fn conditioning(m: &dyn Denoiser, seed: u64) -> Conditioning {
    let spec = m.text_spec();
    assert_eq!(spec.pooled_dim, None);
    Conditioning {
        txt: made(seed, "txt", (1, TXT_LEN, spec.txt_dim)),
        y: Tensor::zeros((1, 0), DType::F32, &Device::Cpu).expect("empty pooled"),
    }
}

fn denoise(
    m: &dyn Denoiser,
    seed: u64,
    policy: &mut dyn CachePolicy,
    cfg: Option<TrueCfg>,
) -> (Tensor, CacheStats) {
    let cond = conditioning(m, seed);
    let pe = m.pos_embed(TXT_LEN, GRID, GRID).expect("rope");
    let x = made(seed, "noise", (1, GRID * GRID, m.token_channels()));
    let ts = schedule::timesteps(STEPS, GRID * GRID, true);
    sampler::denoise_cfg(m, &cond, &pe, x, &ts, None, policy, cfg, &mut |_| Ok(()))
        .expect("denoise")
}

fn run(
    m: &dyn Denoiser,
    spec: &str,
    cal: Option<&Arc<parallax::pipeline::cache::MagCalibration>>,
) -> (Tensor, CacheStats) {
    let spec: CacheSpec = spec.parse().expect("spec");
    let mut policy = spec.policy(cal).expect("policy");
    denoise(m, 1, policy.as_mut(), None)
}

/// `sum|a - b| / sum|b|`.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let num = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let den = b
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    (num / den) as f64
}

/// Which steps were reused ('R') and computed ('C').
fn pattern(s: &CacheStats) -> String {
    s.steps
        .iter()
        .map(|k| if k.is_reused() { 'R' } else { 'C' })
        .collect()
}

/// Seed 1's image under true CFG against `neg` at `scale`, both branches on this worker.
fn true_cfg_local(m: &dyn Denoiser, neg: &Conditioning, scale: f64) -> Tensor {
    let mut neg_policy = CacheSpec::None.policy(None).unwrap();
    let cfg = TrueCfg::Local {
        neg,
        policy: neg_policy.as_mut(),
        scale,
    };
    let mut policy = CacheSpec::None.policy(None).unwrap();
    denoise(m, 1, policy.as_mut(), Some(cfg)).0
}

#[test]
fn the_registry_tells_the_families_apart() {
    family_swiglu::register();
    let names: Vec<&str> = family::families().iter().map(|f| f.name()).collect();
    assert_eq!(names.first(), Some(&"flux1"), "FLUX.1 is built in, first");
    assert!(names.contains(&family_swiglu::NAME), "{names:?}");
    let flux = [
        "double_blocks.0.img_attn.qkv.weight",
        "vector_in.in_layer.weight",
        "img_in.weight",
    ];
    assert_eq!(family::detect(&flux).map(|f| f.name()), Some("flux1"));
    let swiglu = [
        "double_blocks.0.img_attn.qkv.weight",
        "double_stream_modulation_img.weight",
    ];
    assert_eq!(
        family::detect(&swiglu).map(|f| f.name()),
        Some(family_swiglu::NAME)
    );
    assert!(family::detect(&["encoder.conv_in.weight"]).is_none());
    // FLUX.1's tiny transformer through the same entry point.
    let f = family::family("flux1")
        .unwrap()
        .tiny_transformer(5, DType::F32, &Device::Cpu)
        .unwrap();
    assert_eq!((f.family(), f.token_channels()), ("flux1", 64));
    assert_eq!(
        f.text_spec().pooled_dim,
        Some(parallax::model::text::DEMO_CLIP_DIM)
    );
}

#[test]
fn the_second_family_runs_every_cache_policy() {
    let m = model();
    assert_eq!(m.block_params().len(), m.num_blocks());
    layouts::every_cache_policy(m.as_ref(), family_swiglu::NAME);
}

#[test]
fn the_second_family_takes_true_cfg_on_one_worker() {
    let m = model();
    let m = m.as_ref();
    let (plain, _) = run(m, "none", None);
    // Scale 1 with any negative prompt is the positive branch alone (to rounding).
    let neg = conditioning(m, 9);
    let r = rel(&true_cfg_local(m, &neg, 1.0), &plain);
    assert!(r < 1e-5, "true CFG at scale 1: relative change {r}");
    // Scale 3 moves the image.
    let x3 = true_cfg_local(m, &neg, 3.0);
    assert!(rel(&x3, &plain) > 1e-3);
}

/// The largest difference between the one-device latent under `spec` and every rank's, each of
/// 2 ranks running the family through [`SpReplica`] with the attention `strategy` makes.
fn sequence_parallel(
    spec: &str,
    strategy: &(dyn Fn(usize, Arc<dyn Communicator>) -> Arc<dyn Attention> + Sync),
    rotate: bool,
) -> f32 {
    let m = model();
    let (want, want_stats) = run(m.as_ref(), spec, None);
    let outs = run_local(2, |rank, comm| {
        let comm: Arc<dyn Communicator> = Arc::new(comm);
        let attn = strategy(rank, comm.clone());
        let mut r = SpReplica::new(m.clone(), comm, attn);
        if rotate {
            r = r.with_patch_rotation();
        }
        let (x, stats) = run(&r, spec, None);
        assert_eq!(
            pattern(&stats),
            pattern(&want_stats),
            "{spec}: rank {rank} decided otherwise"
        );
        Ok(x)
    })
    .expect("ranks");
    outs.iter()
        .map(|x| {
            (x - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0f32, f32::max)
}

#[test]
fn the_second_family_runs_ulysses_and_ring() {
    for spec in ["none", "fbcache:t=100", "taylorseer:n=3,order=1,warmup=2"] {
        let d = sequence_parallel(spec, &|_, c| Arc::new(UlyssesAttention::new(c)), false);
        eprintln!("ulysses 2, {spec}: largest difference {d:e}");
        assert!(d < 1e-3, "ulysses 2, {spec}: {d}");
        let d = sequence_parallel(spec, &|_, c| Arc::new(RingAttention::new(c)), false);
        eprintln!("ring 2, {spec}: largest difference {d:e}");
        assert!(d < 1e-3, "ring 2, {spec}: {d}");
    }
}

#[test]
fn the_second_family_runs_displaced_patches() {
    // Warm-up through every step: exact.
    let refresh = LocalComm::group(2);
    let exact = |rank: usize, c: Arc<dyn Communicator>| -> Arc<dyn Attention> {
        let r: Arc<dyn Communicator> = Arc::new(refresh[rank].clone());
        Arc::new(DisplacedAttention::new(c, r, STEPS * 4).expect("displaced"))
    };
    let d = sequence_parallel("none", &exact, false);
    eprintln!("displaced 2 in warm-up: largest difference {d:e}");
    assert!(d < 1e-3, "displaced 2 in warm-up: {d}");
    // Rotating after 2 exact forwards: stale keys and values, the latent finite and moved.
    let refresh = LocalComm::group(2);
    let rotating = |rank: usize, c: Arc<dyn Communicator>| -> Arc<dyn Attention> {
        let r: Arc<dyn Communicator> = Arc::new(refresh[rank].clone());
        Arc::new(
            DisplacedAttention::new(c, r, 2)
                .expect("displaced")
                .rotating(),
        )
    };
    let d = sequence_parallel("none", &rotating, true);
    eprintln!("displaced 2 rotating after warm-up: largest difference {d:e}");
    assert!(d.is_finite() && d > 0.0, "displaced 2 rotating: {d}");
}

#[test]
fn the_second_family_splits_true_cfg_over_two_workers() {
    let m = model();
    let neg = conditioning(m.as_ref(), 9);
    let local = true_cfg_local(m.as_ref(), &neg, 3.0);
    let outs = run_local(2, |rank, comm| {
        let cond = if rank == 0 {
            conditioning(m.as_ref(), 1)
        } else {
            neg.clone()
        };
        let pe = m.pos_embed(TXT_LEN, GRID, GRID)?;
        let x = made(1, "noise", (1, GRID * GRID, m.token_channels()));
        let ts = schedule::timesteps(STEPS, GRID * GRID, true);
        let mut policy = CacheSpec::None.policy(None).unwrap();
        let cfg = TrueCfg::Split {
            group: &comm,
            scale: 3.0,
        };
        let (x, _) = sampler::denoise_cfg(
            m.as_ref(),
            &cond,
            &pe,
            x,
            &ts,
            None,
            policy.as_mut(),
            Some(cfg),
            &mut |_| Ok(()),
        )
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok(x)
    })
    .expect("ranks");
    for (rank, x) in outs.iter().enumerate() {
        let r = rel(x, &local);
        assert!(r < 1e-5, "CFG 2, rank {rank}: relative change {r}");
    }
}

#[test]
fn the_second_family_runs_pipefusion() {
    let m = model();
    let (want, _) = run(m.as_ref(), "none", None);
    let stages = |warmup: usize| -> Vec<Tensor> {
        run_local(2, |_, comm| {
            let stage = PipeFusion::replica_in(
                m.as_ref(),
                Arc::new(comm),
                None,
                2,
                warmup,
                StageBalance::Work,
            )?;
            Ok(run(&stage, "none", None).0)
        })
        .expect("stages")
    };
    // Warm-up through every step: each stage runs the whole sequence, exact.
    for x in stages(STEPS * 2) {
        let d = rel(&x, &want);
        eprintln!("pipefusion 2 in warm-up: relative change {d:e}");
        assert!(d < 1e-5, "pipefusion 2 in warm-up: {d}");
    }
    // Two patches after one exact step: stale keys and values, the latent finite and moved.
    for x in stages(1) {
        let d = rel(&x, &want);
        eprintln!("pipefusion 2, 2 patches after 1 warm-up step: relative change {d:.4}");
        assert!(d.is_finite() && d > 0.0, "pipefusion 2 patched: {d}");
    }
}

/// Seed `seed`'s denoising job as the engine takes it (text encoded, noise drawn), no cache.
fn job(m: &dyn Denoiser, seed: u64) -> DenoiseJob {
    DenoiseJob {
        cond: conditioning(m, seed),
        neg: None,
        true_cfg: 1.0,
        pe: m.pos_embed(TXT_LEN, GRID, GRID).expect("rope"),
        x: made(seed, "noise", (1, GRID * GRID, m.token_channels())),
        timesteps: schedule::timesteps(STEPS, GRID * GRID, true),
        guidance: 3.5,
        cache: CacheSpec::None,
        magcache: None,
        blend: None,
        fill: None,
    }
}

/// Each of `jobs` through the engine's data-parallel entry point under `layout`, against the
/// same job on one device: the largest relative difference.
fn engine_against_local(m: &Arc<dyn Denoiser>, layout: ParallelLayout, jobs: &[DenoiseJob]) -> f64 {
    let outs = ranks::denoise_many(m, layout, jobs);
    assert_eq!(outs.len(), jobs.len());
    outs.into_iter()
        .zip(jobs)
        .map(|(out, job)| {
            let (x, stats) = out.expect("engine job");
            assert_eq!(stats.computed, STEPS);
            rel(&x, &one_device(m.as_ref(), job))
        })
        .fold(0f64, f64::max)
}

/// `job` on one device, both branches of true CFG here when it has a negative prompt.
fn one_device(m: &dyn Denoiser, job: &DenoiseJob) -> Tensor {
    let mut neg_policy = CacheSpec::None.policy(None).unwrap();
    let cfg = job.neg.as_ref().map(|neg| TrueCfg::Local {
        neg,
        policy: neg_policy.as_mut(),
        scale: job.true_cfg,
    });
    let mut policy = CacheSpec::None.policy(None).unwrap();
    sampler::denoise_cfg(
        m,
        &job.cond,
        &job.pe,
        job.x.clone(),
        &job.timesteps,
        None,
        policy.as_mut(),
        cfg,
        &mut |_| Ok(()),
    )
    .expect("one device")
    .0
}

#[test]
fn the_second_family_runs_data_parallel_through_the_engine() {
    let m = model();
    // Three jobs over two groups of one worker each: group 0 makes jobs 0 and 2.
    let jobs: Vec<DenoiseJob> = (1..=3).map(|s| job(m.as_ref(), s)).collect();
    let layout = ParallelLayout {
        dp: 2,
        ..ParallelLayout::default()
    };
    let d = engine_against_local(&m, layout, &jobs);
    eprintln!("dp 2: largest relative difference {d:e}");
    // Each group's worker threads sum in their own order: f32 rounding (1.1e-6 measured with
    // the 32-channel latent).
    assert!(d < 1e-5, "dp 2: {d}");
    // The seeds differ: the comparison is not of one image with itself.
    assert!(
        rel(
            &one_device(m.as_ref(), &jobs[0]),
            &one_device(m.as_ref(), &jobs[1])
        ) > 1e-2
    );
}

#[test]
fn the_second_family_runs_a_mesh_through_the_engine() {
    let m = model();
    // dp 2 x ulysses 2 on 4 CPU workers, two jobs at once.
    let jobs: Vec<DenoiseJob> = (1..=2).map(|s| job(m.as_ref(), s)).collect();
    let layout = ParallelLayout {
        dp: 2,
        ulysses: 2,
        ..ParallelLayout::default()
    };
    let d = engine_against_local(&m, layout, &jobs);
    eprintln!("dp 2 x ulysses 2: largest relative difference {d:e}");
    assert!(d < 1e-5, "dp 2 x ulysses 2: {d}");

    // dp 2 x cfg 2 x ring 2 on 8 CPU workers under true CFG: each group's CFG pair splits the
    // branches, against both branches on one device.
    let neg = conditioning(m.as_ref(), 9);
    let jobs: Vec<DenoiseJob> = (1..=2)
        .map(|s| DenoiseJob {
            neg: Some(neg.clone()),
            true_cfg: 3.0,
            ..job(m.as_ref(), s)
        })
        .collect();
    let layout = ParallelLayout {
        dp: 2,
        cfg: 2,
        ring: 2,
        ..ParallelLayout::default()
    };
    let d = engine_against_local(&m, layout, &jobs);
    eprintln!("dp 2 x cfg 2 x ring 2: largest relative difference {d:e}");
    assert!(d < 1e-5, "dp 2 x cfg 2 x ring 2: {d}");
}

/// The preview path takes the family's 32-channel latent: the map is fitted to its own codec
/// (one weight per channel), and a latent the sampler made unpacks by the family's LatentSpec.
#[test]
fn the_second_family_previews_its_32_channel_latent() {
    use parallax::model::family::LatentCodec;
    use parallax::pipeline::preview::{Latent, PreviewFactors};
    let codec = family_swiglu::SwigluCodec::new(3, &Device::Cpu).expect("codec");
    let spec = codec.latent_spec();
    assert_eq!(spec.channels, 32);
    let f = PreviewFactors::fit(&codec, &Device::Cpu, 3, 16, 0x5eed).expect("fit");
    assert_eq!(f.channels(), 32);
    eprintln!("preview map of the 32-channel codec: R² {:.3}", f.r2);
    // A linear map through tanh: the affine fit explains most of it on a held-out latent.
    assert!(f.r2 > 0.5, "R² {}", f.r2);
    let m = model();
    assert_eq!(m.token_channels(), spec.token_channels());
    let (x, _) = run(m.as_ref(), "none", None);
    let px = GRID * spec.patch * spec.downscale;
    let latent = Latent::from_packed(&x, &spec, px, px).expect("unpack");
    assert_eq!(
        (latent.channels(), latent.width, latent.height),
        (32, 16, 16)
    );
    let rgb = f.apply(&latent);
    assert_eq!(rgb.len(), 16 * 16 * 3);
    assert!(rgb.iter().any(|&b| b != rgb[0]), "a flat preview");
}

/// The engine's loader asks the registry which family a checkpoint is: a file of this family's
/// tensor names is refused by the family's name, not read as a broken FLUX.1 file.
#[test]
fn the_loader_names_the_family_it_recognises() {
    use parallax::model::layout::{ModelFiles, TransformerLayout, VaeLayout};
    use parallax::model::weights::save_safetensors;
    family_swiglu::register();
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("swiglu.safetensors");
    let t = |name: &str| (name.to_string(), made(1, name, (4, 4)));
    save_safetensors(
        &[
            t("double_blocks.0.img_attn.qkv.weight"),
            t("double_stream_modulation_img.weight"),
            t("img_in.weight"),
        ],
        &path,
    )
    .expect("save");
    let files = ModelFiles {
        transformer: path.clone(),
        transformer_layout: TransformerLayout::Bfl {
            prefix: String::new(),
        },
        vae: path.clone(),
        vae_layout: VaeLayout::Bfl,
        text: parallax::model::text::TextEncoderPaths::diffusers(&path),
        demo: false,
    };
    let err = parallax::pipeline::load_transformer(&files, DType::F32, &Device::Cpu)
        .expect_err("not FLUX.1");
    let text = err.to_string();
    assert!(text.contains(family_swiglu::NAME), "{text}");
}
