//! FLUX.2 klein against diffusers (issue 28 part 3): tiny FLUX.2 models with seeded weights in
//! the real key layouts, written with their outputs by `scripts/klein-reference.py`
//! (`tests/fixtures/klein/`), loaded through Parallax's loaders. The velocity of one step with
//! and without a guidance embedder (diffusers folder and Black Forest Labs' single file) within
//! 1e-4 of diffusers' (relative to its largest value), the decoded image within 1/255 (both
//! autoencoder layouts); the registry tells klein's files apart. Then klein's transformer on
//! every CPU-worker layout against one device: Ulysses 2, Ring 2, displaced patches 2 (in
//! warm-up), PipeFusion 2 (in warm-up), true CFG split over 2, data parallel 2 and dp 2 x
//! Ulysses 2; every cache policy (MagCache calibrated on klein's own runs). Last,
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
