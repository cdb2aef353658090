//! FLUX.2 klein against diffusers (issue 28 part 3): tiny FLUX.2 models with seeded weights in
//! the real key layouts, written with their outputs by `scripts/klein-reference.py`
//! (`tests/fixtures/klein/`), loaded through Parallax's loaders. The velocity of one step with
//! and without a guidance embedder (diffusers folder and Black Forest Labs' single file) within
//! 1e-4 of diffusers' (relative to its largest value), the decoded image within 1/255 (both
//! autoencoder layouts); the registry tells klein's files apart. Then klein's transformer on
//! every CPU-worker layout against one device: Ulysses 2, Ring 2, displaced patches 2 (in
//! warm-up), PipeFusion 2 (in warm-up), true CFG split over 2, data parallel 2 and dp 2 x
//! Ulysses 2; Ulysses 3 and 6 (and beside Ring) on a 6-head config; PipeFusion stages that
//! load only their blocks; every cache policy (MagCache calibrated on klein's own runs); the
//! decode in row bands over 2-4 workers against the whole decode. Last,
//! Flux2KleinPipeline end to end (prompt embeddings and initial noise given):
//! FLUX.2's schedule, the sampler, true CFG on the Base pipeline and the decode, the image within
//! 1/255.

#[path = "common/layouts.rs"]
mod layouts;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use parallax::model::family::{self, Denoiser, StepInput};
use parallax::model::klein::{self, Klein};
use parallax::model::weights::SafetensorsSet;
use parallax::parallel::comm::{Communicator, LocalComm};
use parallax::parallel::displaced::DisplacedAttention;
use parallax::parallel::mesh::ParallelLayout;
use parallax::parallel::pipefusion::{split_blocks, StageBalance};
use parallax::parallel::ring::RingAttention;
use parallax::parallel::ulysses::UlyssesAttention;
use parallax::pipeline::cache::CacheSpec;
use parallax::pipeline::sampler::{self, Conditioning, TrueCfg};
use parallax::pipeline::schedule;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/klein")
}

fn reference(name: &str) -> Tensor {
    let path = fixtures().join("reference.safetensors");
    let set = SafetensorsSet::open(&path).expect("reference outputs");
    set.load(name, DType::F32, &Device::Cpu).expect(name)
}

/// `max |t|`.
fn max_abs(t: Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// `max |a - b| / max |b|`.
fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    max_abs((a - b).unwrap()) / max_abs(b.clone())
}

fn velocity(m: &Klein, guidance: Option<&Tensor>) -> Tensor {
    let (img, txt, t) = (reference("img"), reference("txt"), reference("t"));
    let y = Tensor::zeros((1, 0), DType::F32, &Device::Cpu).unwrap();
    let pe = m.pos_embed(txt.dim(1).unwrap(), 4, 4).unwrap();
    m.forward(&StepInput {
        img: &img,
        txt: &txt,
        y: &y,
        timesteps: &t,
        guidance,
        pe: &pe,
    })
    .expect("forward")
}

fn names(path: &Path) -> Vec<String> {
    SafetensorsSet::open(path)
        .expect("weights")
        .names()
        .map(String::from)
        .collect()
}

#[test]
fn the_registry_knows_klein_by_its_tensor_names() {
    for path in [
        fixtures().join("transformer"),
        fixtures().join("flux2-guided-bfl.safetensors"),
    ] {
        let names = names(&path);
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let f = family::detect(&names).map(|f| f.name());
        assert_eq!(f, Some(klein::NAME), "{}", path.display());
    }
    // FLUX.1's names are not klein's.
    let flux = [
        "double_blocks.0.img_attn.qkv.weight",
        "vector_in.in_layer.weight",
    ];
    assert_eq!(family::detect(&flux).map(|f| f.name()), Some("flux1"));
}

#[test]
fn velocity_matches_diffusers_in_both_layouts() {
    let dev = Device::Cpu;
    // Klein's own layout: diffusers folder, no guidance embedder.
    let plain = klein::load_transformer(&fixtures(), DType::F32, &dev).expect("diffusers folder");
    assert!(!plain.config().guidance_embed);
    let r = max_rel(&velocity(&plain, None), &reference("velocity"));
    eprintln!("velocity, diffusers folder: max relative difference {r:e}");
    assert!(r < 1e-4, "velocity: {r}");

    // Black Forest Labs' single file (ComfyUI prefix), with a guidance embedder.
    let path = fixtures().join("flux2-guided-bfl.safetensors");
    let guided = klein::load_transformer(&path, DType::F32, &dev).expect("BFL file");
    let cfg = guided.config();
    assert!(cfg.guidance_embed);
    assert_eq!(
        (
            cfg.hidden_size,
            cfg.num_heads,
            cfg.depth,
            cfg.depth_single_blocks
        ),
        (64, 2, 2, 2)
    );
    let g = reference("g");
    let r = max_rel(&velocity(&guided, Some(&g)), &reference("velocity_guided"));
    eprintln!("velocity with guidance, BFL single file: max relative difference {r:e}");
    assert!(r < 1e-4, "guided velocity: {r}");
    // The guidance embedder is required once the model has one.
    let y = Tensor::zeros((1, 0), DType::F32, &dev).unwrap();
    let (img, txt, t) = (reference("img"), reference("txt"), reference("t"));
    let pe = guided.pos_embed(6, 4, 4).unwrap();
    let input = StepInput {
        img: &img,
        txt: &txt,
        y: &y,
        timesteps: &t,
        guidance: None,
        pe: &pe,
    };
    assert!(guided.forward(&input).is_err());
}

#[test]
fn decoded_image_matches_diffusers_in_both_layouts() {
    let want = reference("image");
    let z = reference("z");
    for path in [fixtures(), fixtures().join("ae.safetensors")] {
        let vae = klein::load_vae(&path, DType::F32, &Device::Cpu).expect("autoencoder");
        let image = vae.decode(&z).expect("decode");
        assert_eq!(image.dims(), want.dims());
        // Pixels are (x + 1) / 2: 1/255 of a pixel is 2/255 here.
        let d = max_abs((image - &want).unwrap());
        eprintln!(
            "decode, {}: largest difference {:.2e} of a pixel",
            path.display(),
            d / 2.0
        );
        assert!(d / 2.0 < 1.0 / 255.0, "{}: {d}", path.display());
    }
}

/// klein's decode split into row bands over 2, 3 and 4 CPU workers (halo rows, GroupNorm
/// statistics summed over the bands), with the fixture's autoencoder and diffusers' batch-norm
/// statistics: within 1e-4 of its whole decode (largest difference, as FLUX.1's split decode is
/// held to), so within diffusers' image as the whole decode is.
#[test]
fn klein_decodes_in_row_bands_over_cpu_workers() {
    use parallax::model::family::LatentCodec;
    let vae = klein::load_vae(&fixtures(), DType::F32, &Device::Cpu).expect("autoencoder");
    // What the pipeline asks of an autoencoder before it splits the decode.
    assert!(vae.band_decoder().is_some());
    let z = reference("z");
    let whole = vae.decode(&z).expect("decode");
    for workers in [2, 3, 4] {
        let bands = parallax::parallel::comm::run_local(workers, |_, comm| {
            parallax::parallel::vae::decode(&vae, &z, &comm)
        })
        .expect("band decode");
        for image in bands {
            let d = max_abs((image - &whole).unwrap());
            eprintln!("klein decode in {workers} bands: largest difference {d:.2e}");
            assert!(d < 1e-4, "{workers} workers: {d}");
        }
    }
}

fn model() -> Arc<dyn Denoiser> {
    Arc::new(klein::load_transformer(&fixtures(), DType::F32, &Device::Cpu).expect("klein"))
}

#[test]
fn klein_runs_sequence_parallel_layouts_on_cpu_workers() {
    let m = model();
    let d = layouts::sequence_parallel(&m, &|_, c| Arc::new(UlyssesAttention::new(c)));
    eprintln!("ulysses 2: relative difference {d:e}");
    assert!(d < 1e-5, "ulysses 2: {d}");
    let d = layouts::sequence_parallel(&m, &|_, c| Arc::new(RingAttention::new(c)));
    eprintln!("ring 2: relative difference {d:e}");
    assert!(d < 1e-5, "ring 2: {d}");
    // Displaced patches exact through their warm-up (every step here).
    let refresh = LocalComm::group(2);
    let displaced =
        |rank: usize, c: Arc<dyn Communicator>| -> Arc<dyn parallax::model::attention::Attention> {
            let r: Arc<dyn Communicator> = Arc::new(refresh[rank].clone());
            Arc::new(DisplacedAttention::new(c, r, layouts::STEPS * 4).expect("displaced"))
        };
    let d = layouts::sequence_parallel(&m, &displaced);
    eprintln!("displaced 2 in warm-up: relative difference {d:e}");
    assert!(d < 1e-5, "displaced 2: {d}");
}

#[test]
fn klein_runs_pipefusion_and_cfg_on_cpu_workers() {
    let m = model();
    for d in layouts::pipefusion(&m, layouts::STEPS * 2) {
        eprintln!("pipefusion 2 in warm-up: relative difference {d:e}");
        assert!(d < 1e-5, "pipefusion 2: {d}");
    }
    // Patched after one exact step: stale keys and values move the latent, finitely.
    for d in layouts::pipefusion(&m, 1) {
        eprintln!("pipefusion 2, 2 patches after 1 warm-up step: relative difference {d:.4}");
        assert!(d.is_finite() && d > 0.0, "pipefusion 2 patched: {d}");
    }
    let d = layouts::cfg_split(&m);
    eprintln!("true CFG split over 2: relative difference {d:e}");
    assert!(d < 1e-5, "cfg 2: {d}");
}

#[test]
fn klein_runs_every_cache_policy() {
    let m = model();
    layouts::every_cache_policy(m.as_ref(), "klein");
}

#[test]
fn klein_runs_data_parallel_and_a_mesh_through_the_engine() {
    let m = model();
    let jobs: Vec<_> = (1..=3).map(|s| layouts::job(m.as_ref(), s, 1.0)).collect();
    let dp = ParallelLayout {
        dp: 2,
        ..ParallelLayout::default()
    };
    let d = layouts::engine(&m, dp, &jobs);
    eprintln!("dp 2: relative difference {d:e}");
    assert!(d < 1e-5, "dp 2: {d}");
    let mesh = ParallelLayout {
        dp: 2,
        ulysses: 2,
        ..ParallelLayout::default()
    };
    let d = layouts::engine(&m, mesh, &jobs[..2]);
    eprintln!("dp 2 x ulysses 2: relative difference {d:e}");
    assert!(d < 1e-5, "dp 2 x ulysses 2: {d}");
    // The seeds differ: the comparison is not of one image with itself.
    let a = layouts::one_device(m.as_ref(), &jobs[0]);
    let b = layouts::one_device(m.as_ref(), &jobs[1]);
    assert!(layouts::rel(&a, &b) > 1e-2);
}

/// The transformer's PipeFusion stage `stage` of 2 (blocks split by work over `whole`'s, the
/// same model whole) as a GPU rank loads it: from the fixture's diffusers folder, or
/// `random:klein-tiny` through the engine's loader.
fn klein_stage(random: bool, stage: usize, whole: &dyn Denoiser) -> Arc<dyn Denoiser> {
    let b = split_blocks(&whole.block_params(), 2, stage, StageBalance::Work);
    if !random {
        let m = klein::load_transformer_stage(
            &fixtures(),
            DType::F32,
            &Device::Cpu,
            Some(b),
            parallax::model::linear::Fp8Groups::NONE,
            false,
        )
        .expect("a stage of the fixture");
        return Arc::new(m);
    }
    let choice = parallax::engine::ModelChoice::named("random:klein-tiny");
    let p = parallax::engine::load_pipeline_blocks(&choice, "cpu", Some((b.start, b.end)))
        .expect("a stage of random:klein-tiny");
    p.model.denoiser.clone()
}

/// PipeFusion stages that load only their blocks (what each GPU of a PipeFusion layout loads):
/// each holds its blocks and, outside them, only what it uses (the first stage the input
/// projections and the double blocks' modulations, the last one the single blocks' modulation
/// and the final layer; both the timestep embedder), so the two stages' bytes add up to the
/// whole model's plus one timestep embedder. Run as PipeFusion over 2 CPU workers they give
/// what stages cut from whole models give, within 1e-6 (relative, summed over the latent), in
/// warm-up (equal to one device within 1e-5, as the whole models' stages are) and patched.
#[test]
fn klein_pipefusion_stages_load_only_their_blocks() {
    let whole = model();
    let cfg = klein::load_transformer(&fixtures(), DType::F32, &Device::Cpu)
        .expect("klein")
        .config()
        .clone();
    let (s0, s1) = (
        klein_stage(false, 0, whole.as_ref()),
        klein_stage(false, 1, whole.as_ref()),
    );
    assert_eq!((s0.held_blocks(), s1.held_blocks()), (0..2, 2..4));
    let time_embedder = cfg.outside_param_counts().total() as usize * 4;
    assert_eq!(
        s0.weight_bytes() + s1.weight_bytes(),
        whole.weight_bytes() + time_embedder
    );
    for s in [&s0, &s1] {
        assert!(s.weight_bytes() < whole.weight_bytes());
        // What a stage cut from the whole model keeps (on the CPU, where the workers share it).
        let cut = whole.keep_blocks(s.held_blocks());
        assert_eq!(s.weight_bytes(), cut.weight_bytes());
    }
    let tiny_whole = klein::random_model(klein::RandomKlein::Tiny, DType::F32, &Device::Cpu)
        .expect("tiny")
        .0;
    for random in [false, true] {
        let whole: Arc<dyn Denoiser> = if random {
            Arc::new(tiny_whole.clone())
        } else {
            whole.clone()
        };
        let j = layouts::job(whole.as_ref(), 1, 1.0);
        let want = layouts::one_device(whole.as_ref(), &j);
        for warmup in [layouts::STEPS * 2, 1] {
            let cut = layouts::pipefusion_latents(&|_| whole.clone(), &j, warmup);
            let loaded = layouts::pipefusion_latents(
                &|rank| klein_stage(random, rank, whole.as_ref()),
                &j,
                warmup,
            );
            for (a, b) in loaded.iter().zip(&cut) {
                let d = layouts::rel(a, b);
                eprintln!(
                    "stage-only against cut stages (random {random}, warm-up {warmup}): {d:e}"
                );
                assert!(d < 1e-6, "random {random}, warm-up {warmup}: {d}");
                if warmup > 1 {
                    assert!(layouts::rel(a, &want) < 1e-5);
                }
            }
        }
    }
}

/// klein's architecture with 6 heads (klein 4B has 24: Ulysses degrees 2, 3, 4, 6 and 8 divide
/// them; `random:klein-tiny` has 2): heads of 16 (RoPE axes 4 x 4), one double and two single
/// blocks, made-up weights. A test config only; the public tiny model is unchanged.
fn six_heads() -> Arc<dyn Denoiser> {
    let cfg = klein::KleinConfig {
        context_in_dim: 24,
        hidden_size: 6 * 16,
        num_heads: 6,
        depth: 1,
        depth_single_blocks: 2,
        axes_dim: vec![4, 4, 4, 4],
        ..klein::KleinConfig::tiny()
    };
    let vb = parallax::model::demo_weights::DemoWeights::new(0x6b36)
        .var_builder(DType::F32, &Device::Cpu);
    Arc::new(Klein::new(&cfg, vb).expect("six-head klein"))
}

/// Ulysses degrees that divide 24 heads but not 2 or 4 (3 and 6), alone and beside ring
/// attention (Ulysses 3 x Ring 2, Ulysses 2 x Ring 3: 6 workers), through the engine's rank
/// loop on CPU workers: each within 1e-5 of one worker (relative, summed over the latent), as
/// the other klein layouts are held; 6 text and 16 image tokens, which 3 and 6 workers shard
/// with padding.
#[test]
fn klein_runs_ulysses_three_and_six_on_cpu_workers() {
    let m = six_heads();
    let jobs = [layouts::job(m.as_ref(), 1, 1.0)];
    for (ulysses, ring) in [(3, 1), (6, 1), (3, 2), (2, 3)] {
        let layout = ParallelLayout {
            ulysses,
            ring,
            ..ParallelLayout::default()
        };
        let d = layouts::engine(&m, layout, &jobs);
        eprintln!("6 heads, ulysses {ulysses} x ring {ring}: relative difference {d:e}");
        assert!(d < 1e-5, "ulysses {ulysses} x ring {ring}: {d}");
    }
    // A degree that does not divide the heads is refused, not run.
    let four = ParallelLayout {
        ulysses: 4,
        ..ParallelLayout::default()
    };
    let refused = parallax::parallel::ranks::denoise_many(&m, four, &jobs);
    assert!(
        refused.iter().all(|r| r.is_err()),
        "ulysses 4 of 6 heads ran"
    );
}

/// Flux2KleinPipeline's image for the stored prompt, noise and `steps`, through Parallax's
/// sampler on FLUX.2's schedule and klein's autoencoder; true CFG against the stored negative
/// prompt at `scale` > 1.
fn pipeline_image(steps: usize, scale: f64) -> Tensor {
    let dev = Device::Cpu;
    let set = SafetensorsSet::open(&fixtures().join("pipeline.safetensors")).expect("fixture");
    let get = |n: &str| set.load(n, DType::F32, &dev).expect(n);
    let m = klein::load_transformer(&fixtures(), DType::F32, &dev).expect("transformer");
    let vae = klein::load_vae(&fixtures(), DType::F32, &dev).expect("autoencoder");
    let empty = Tensor::zeros((1, 0), DType::F32, &dev).unwrap();
    let cond = |name: &str| Conditioning {
        txt: get(name),
        y: empty.clone(),
    };
    let (pos, neg) = (cond("prompt"), cond("negative"));
    let noise = get("noise");
    let pe = m.pos_embed(pos.txt.dim(1).unwrap(), 4, 4).unwrap();
    let ts = schedule::flux2_timesteps(steps, noise.dim(1).unwrap());
    let mut policy = CacheSpec::None.policy(None).unwrap();
    let mut neg_policy = CacheSpec::None.policy(None).unwrap();
    let cfg = (scale > 1.0).then(|| TrueCfg::Local {
        neg: &neg,
        policy: neg_policy.as_mut(),
        scale,
    });
    let (x, _) = sampler::denoise_cfg(
        &m,
        &pos,
        &pe,
        noise,
        &ts,
        None,
        policy.as_mut(),
        cfg,
        &mut |_| Ok(()),
    )
    .expect("denoise");
    let z = klein::LATENT.unpack(&x, 8, 8).unwrap();
    let image = vae.decode(&z).expect("decode");
    ((image / 2.0).unwrap() + 0.5)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap()
}

#[test]
fn the_pipeline_matches_flux2_klein_pipeline() {
    let set = SafetensorsSet::open(&fixtures().join("pipeline.safetensors")).expect("fixture");
    for (name, steps, scale) in [("image_distilled", 4, 1.0), ("image_base", 6, 4.0)] {
        let want = set.load(name, DType::F32, &Device::Cpu).expect(name);
        let got = pipeline_image(steps, scale);
        let d = max_abs((got - &want).unwrap());
        eprintln!("{name} ({steps} steps, CFG {scale}): largest difference {d:.2e} of a pixel");
        assert!(d < 1.0 / 255.0, "{name}: {d}");
    }
}

#[test]
fn random_klein_models_resolve_and_the_tiny_one_runs() {
    use parallax::model::klein::RandomKlein;
    use parallax::model::layout::{resolve, ModelSpec};
    for (name, kind, heads) in [
        ("random:klein-tiny", RandomKlein::Tiny, 2),
        ("random:klein-4b", RandomKlein::FourB, 24),
        ("random:klein-9b", RandomKlein::NineB, 32),
    ] {
        let r = resolve(name, None).expect(name);
        assert!(
            matches!(r.spec, ModelSpec::RandomKlein(k) if k == kind),
            "{name}"
        );
        assert_eq!(kind.config().num_heads, heads);
    }
    assert!(resolve("random:klein-2b", None).is_err());
    // The image pipeline loads klein now (it refused it before klein ran through the family
    // traits): its denoiser, text encoder and codec are klein's; FP8 products load too.
    use parallax::pipeline::{LoadOptions, Pipeline};
    let r = resolve("random:klein-tiny", None).unwrap();
    let p = Pipeline::load(&r, "random:klein-tiny", DType::F32, &Device::Cpu).expect("klein");
    assert_eq!(p.denoiser().family(), klein::NAME);
    assert_eq!(p.latent_spec(), klein::LATENT);
    assert_eq!(p.text_encoder().text_spec().pooled_dim, None);
    let fp8 = LoadOptions {
        fp8: parallax::model::flux::Fp8Groups::ALL,
        ..Default::default()
    };
    let q = Pipeline::load_with(&r, "random:klein-tiny", DType::F32, &Device::Cpu, fp8)
        .expect("klein in FP8");
    // Simulated FP8 on the CPU (rounded weights and inputs) changes the latent, finitely. Over six
    // steps of this random tiny model the change compounds (about 26 %); one velocity's error,
    // 1.9 %, is bounded by the model's own test (`fp8_products_move_the_velocity_a_little`).
    let j = layouts::job(p.denoiser(), 1, 1.0);
    let (a, b) = (
        layouts::one_device(p.denoiser(), &j),
        layouts::one_device(q.denoiser(), &j),
    );
    let d = layouts::rel(&b, &a);
    assert!(d > 0.0 && d < 1.0, "FP8 against bf16: {d}");
    // FP8 attention (`--fp8-attention`) reaches klein's attention as well: the latent moves.
    let attention = LoadOptions {
        fp8_attention: true,
        ..Default::default()
    };
    let fa = Pipeline::load_with(&r, "random:klein-tiny", DType::F32, &Device::Cpu, attention)
        .expect("klein with FP8 attention");
    assert!(fa.denoiser().fp8_attention() && !p.denoiser().fp8_attention());
    let d = layouts::rel(&layouts::one_device(fa.denoiser(), &j), &a);
    assert!(d > 0.0 && d < 1.0, "FP8 attention against exact: {d}");

    // The tiny one: the same weights every time, a finite velocity and image.
    let dev = Device::Cpu;
    let (t, vae) = klein::random_model(RandomKlein::Tiny, DType::F32, &dev).expect("tiny");
    let (t2, _) = klein::random_model(RandomKlein::Tiny, DType::F32, &dev).expect("tiny");
    let j = layouts::job(&t, 1, 1.0);
    let a = layouts::one_device(&t, &j);
    let b = layouts::one_device(&t2, &j);
    assert_eq!(layouts::rel(&a, &b), 0.0);
    let z = klein::LATENT.unpack(&a, 8, 8).unwrap();
    let image = vae.decode(&z).expect("decode");
    assert_eq!(image.dims(), &[1, 3, 64, 64]);
    let v: Vec<f32> = image.flatten_all().unwrap().to_vec1().unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
}

/// klein in the image pipeline: what only FLUX.1 has (LoRAs, image-to-image, FLUX.1's
/// transformer for its measuring tools) is refused by name rather than run on something else,
/// and the API's generate makes the same image twice for a seed.
#[test]
fn klein_in_the_pipeline_refuses_what_only_flux1_has() {
    use parallax::model::layout::resolve;
    use parallax::model::lora::LoraChoice;
    use parallax::pipeline::img2img::InitImage;
    use parallax::pipeline::{GenerateRequest, Pipeline};
    let r = resolve("random:klein-tiny", None).unwrap();
    let p = Pipeline::load(&r, "random:klein-tiny", DType::F32, &Device::Cpu).expect("klein");
    let base = GenerateRequest {
        prompt: "a fox".into(),
        width: 32,
        height: 32,
        steps: Some(1),
        seed: 3,
        ..Default::default()
    };
    let a = p.generate(&base, &mut |_| Ok(())).expect("generate");
    let b = p.generate(&base, &mut |_| Ok(())).expect("generate");
    assert_eq!((a.image.width, a.image.height), (32, 32));
    assert_eq!(a.image.data, b.image.data);
    let lora = GenerateRequest {
        loras: vec![LoraChoice {
            path: "absent.safetensors".into(),
            strength: 1.0,
        }],
        ..base.clone()
    };
    let e = p.generate(&lora, &mut |_| Ok(())).expect_err("LoRA");
    assert!(
        e.to_string().contains("LoRA works with FLUX.1 models only"),
        "{e}"
    );
    let img2img = GenerateRequest {
        init: Some(InitImage {
            image: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/img2img/source.png"),
            strength: 0.5,
            mask: None,
            soft_mask: false,
            extend: None,
        }),
        ..base
    };
    let e = p.generate(&img2img, &mut |_| Ok(())).expect_err("img2img");
    assert!(e.to_string().contains("image-to-image"), "{e}");
    let e = p
        .flux1("MagCache calibration")
        .expect_err("FLUX.1's transformer");
    assert!(e.to_string().contains("klein model"), "{e}");
}
