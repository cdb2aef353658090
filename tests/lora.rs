//! LoRA against diffusers: `scripts/lora-reference.py` built a tiny seeded FLUX.1 transformer, one
//! LoRA written three ways (PEFT, kohya, Black Forest Labs/ComfyUI names: fused q/k/v and
//! single-block `linear1` joined, alpha beside) and a second PEFT LoRA, and saved the velocities
//! diffusers computes with them (`load_lora_into_transformer` + `set_adapters`, f32) in
//! `tests/fixtures/lora/` (and the first LoRA once more as diffusers saves one, alpha in the
//! header). Each layout must load to the same effective weights, and the velocity
//! with the LoRAs on must match diffusers'.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use parallax::kernels::fp8::round_rows;
use parallax::model::family::Denoiser;
use parallax::model::flux::{Flux, FluxConfig, FluxInput};
use parallax::model::layout::{self, FluxDiffusersMap};
use parallax::model::lora::{flux_linear_layers, LoraFile, LoraSet, LowRankSource};
use parallax::model::weights::{MappedWeights, Recorder, SafetensorsSet};
use parallax::parallel::layout::{ParallelLayout, Stale};
use parallax::parallel::pipefusion::StageBalance;
use parallax::parallel::ranks;
use parallax::pipeline::cache::CacheSpec;
use parallax::pipeline::sampler::Conditioning;
use parallax::pipeline::{schedule, DenoiseJob};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora")
}

fn io() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join("io.safetensors"), &Device::Cpu).expect("io fixture")
}

fn base() -> Flux {
    let cfg = layout::flux_config_from_diffusers_json(&dir().join("config.json")).expect("config");
    let set = SafetensorsSet::open(&dir().join("transformer.safetensors")).expect("weights");
    let map = FluxDiffusersMap {
        hidden: cfg.hidden_size,
        mlp_hidden: cfg.mlp_hidden(),
    };
    let vb = MappedWeights::new(Arc::new(set), Arc::new(map)).var_builder(DType::F32, &Device::Cpu);
    Flux::new(&cfg, vb).expect("tiny transformer")
}

fn lora(name: &str, cfg: &FluxConfig) -> Arc<LoraFile> {
    Arc::new(LoraFile::open(&dir().join(name), cfg).expect(name))
}

/// `f` on the fixture's input (t = 0.6, guidance 3.5, a 4 x 4 grid, 3 text tokens).
fn on_input<R>(m: &Flux, io: &HashMap<String, Tensor>, f: impl FnOnce(&FluxInput) -> R) -> R {
    let pe = m.pos_embed(3, 4, 4).expect("pe");
    let t = Tensor::new(&[0.6f32], &Device::Cpu).expect("t");
    let g = Tensor::new(&[3.5f32], &Device::Cpu).expect("g");
    f(&FluxInput {
        img: &io["x"],
        txt: &io["txt"],
        y: &io["y"],
        timesteps: &t,
        guidance: Some(&g),
        pe: &pe,
    })
}

fn velocity(m: &Flux, io: &HashMap<String, Tensor>) -> Tensor {
    on_input(m, io, |input| m.forward(input).expect("forward"))
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .and_then(|a| a.max_all())
        .and_then(|m| m.to_scalar::<f32>())
        .expect("max")
}

/// Largest absolute difference over the largest absolute value of `want`.
fn rel(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims());
    max_abs(&(got - want).expect("sub")) / max_abs(want).max(1e-6)
}

#[test]
fn every_layout_loads_to_the_same_effective_weights() {
    let m = base();
    let cfg = m.config().clone();
    let files = ["peft.safetensors", "kohya.safetensors", "bfl.safetensors"].map(|n| lora(n, &cfg));
    let layers = flux_linear_layers(&cfg);
    // The reference LoRA adapts every linear layer of the transformer.
    assert_eq!(files[0].layers().len(), layers.len());
    for f in &files[1..] {
        assert_eq!(f.layers(), files[0].layers(), "{}", f.label());
    }
    let sets = files.map(|f| LoraSet::new(vec![(f, 1.0)]));
    for (layer, out, input) in layers {
        let w: Vec<Tensor> = sets
            .iter()
            .map(|s| {
                s.low_rank(&layer, 0..out, DType::F32, &Device::Cpu)
                    .expect("low rank")
                    .unwrap_or_else(|| panic!("{layer} adapted"))
                    .weight()
                    .expect("B A")
            })
            .collect();
        assert_eq!(w[0].dims(), &[out, input]);
        for (i, x) in w.iter().enumerate().skip(1) {
            let r = rel(x, &w[0]);
            assert!(r < 1e-6, "{layer}: layout {i} differs from PEFT's by {r}");
        }
    }
}

#[test]
fn the_velocity_with_loras_matches_diffusers() {
    let io = io();
    let m = base();
    let cfg = m.config().clone();
    let r = rel(&velocity(&m, &io), &io["base"]);
    assert!(r < 1e-4, "base model differs from diffusers: {r}");
    let second = lora("second.safetensors", &cfg);
    for name in [
        "peft.safetensors",
        "kohya.safetensors",
        "bfl.safetensors",
        "peft-metadata.safetensors",
    ] {
        let first = lora(name, &cfg);
        for (key, set) in [
            ("first", vec![(first.clone(), 1.0)]),
            ("first_neg", vec![(first.clone(), -0.7)]),
            ("both", vec![(first.clone(), 0.8), (second.clone(), -0.5)]),
        ] {
            let set = LoraSet::new(set);
            let with = m.with_loras(&set).expect("with loras");
            let r = rel(&velocity(&with, &io), &io[key]);
            assert!(r < 1e-4, "{name}, {key}: differs from diffusers by {r}");
            // Merged into the weights (W + B A): the same velocity up to f32 rounding.
            let merged = m.with_loras_merged(&set).expect("merged");
            let r = rel(&velocity(&merged, &io), &io[key]);
            assert!(r < 1e-4, "{name}, {key} merged: differs from diffusers by {r}");
        }
    }
    // The base model is untouched, and an empty set gives it back.
    let r = rel(&velocity(&m, &io), &io["base"]);
    assert!(r < 1e-4, "{r}");
    let off = m
        .with_loras(&LoraSet::new(vec![(second, 0.0)]))
        .expect("off");
    assert_eq!(
        max_abs(&(velocity(&off, &io) - velocity(&m, &io)).expect("sub")),
        0.0
    );
}

const STEPS: usize = 4;
/// An 8 x 8 grid of patches.
const GRID: usize = 8;

/// A prompt-like conditioning and noise for the fixture's model (fixed values by `seed`).
fn job(m: &Flux, seed: u64) -> DenoiseJob {
    let cfg = m.config();
    let fixed = |shape: (usize, usize, usize), k: f32| {
        let n = shape.0 * shape.1 * shape.2;
        let v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + k).sin()).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("fixed")
    };
    let s = seed as f32;
    let cond = Conditioning {
        txt: fixed((1, 5, cfg.context_in_dim), 0.2 + s),
        y: fixed((1, 1, cfg.vec_in_dim), 0.3 + s)
            .squeeze(1)
            .expect("y"),
    };
    DenoiseJob {
        cond,
        neg: None,
        true_cfg: 1.0,
        pe: m.pos_embed(5, GRID, GRID).expect("pe"),
        x: fixed((1, GRID * GRID, cfg.in_channels), 0.1 + s),
        timesteps: schedule::timesteps(STEPS, GRID * GRID, true),
        guidance: 3.5,
        cache: CacheSpec::None,
        magcache: None,
        blend: None,
        fill: None,
    }
}

/// `job` on one device, both branches of true CFG here.
fn one_device(m: &Flux, job: &DenoiseJob) -> Tensor {
    parallax::pipeline::denoise(m, job, None, &mut |_| Ok(()))
        .expect("one device")
        .0
}

/// The fixture's model with both LoRAs on (0.8 and -0.5).
fn with_both(m: &Flux) -> Flux {
    let cfg = m.config().clone();
    m.with_loras(&LoraSet::new(vec![
        (lora("peft.safetensors", &cfg), 0.8),
        (lora("second.safetensors", &cfg), -0.5),
    ]))
    .expect("with loras")
}

#[test]
fn loras_are_exact_on_every_parallel_layout() {
    let base = base();
    let m = with_both(&base);
    let shared: Arc<dyn Denoiser> = Arc::new(m.clone());
    let neg = job(&m, 9).cond;
    let plain: Vec<DenoiseJob> = (1..=2).map(|s| job(&m, s)).collect();
    let cfg_jobs: Vec<DenoiseJob> = plain
        .iter()
        .map(|j| DenoiseJob {
            neg: Some(neg.clone()),
            true_cfg: 3.0,
            ..j.clone()
        })
        .collect();
    let l = ParallelLayout::default;
    let cases: Vec<(&str, ParallelLayout, &[DenoiseJob])> = vec![
        ("ulysses 2", ParallelLayout { ulysses: 2, ..l() }, &plain),
        ("ring 2", ParallelLayout { ring: 2, ..l() }, &plain),
        ("cfg 2", ParallelLayout { cfg: 2, ..l() }, &cfg_jobs),
        ("dp 2", ParallelLayout { dp: 2, ..l() }, &plain),
        (
            "pipefusion 2 (warm-up)",
            ParallelLayout {
                stale: Stale::PipeFusion {
                    stages: 2,
                    patches: 2,
                    warmup: STEPS,
                    balance: StageBalance::Work,
                },
                ..l()
            },
            &plain,
        ),
        (
            "displaced 2 (warm-up)",
            ParallelLayout {
                ring: 2,
                stale: Stale::Displaced {
                    warmup: STEPS,
                    rotate: false,
                },
                ..l()
            },
            &plain,
        ),
        (
            "dp 2 x cfg 2 x ulysses 2",
            ParallelLayout {
                dp: 2,
                cfg: 2,
                ulysses: 2,
                ..l()
            },
            &cfg_jobs,
        ),
    ];
    for (name, layout, jobs) in cases {
        let outs = ranks::denoise_many(&shared, layout, jobs);
        for (out, j) in outs.into_iter().zip(jobs) {
            let (x, _) = out.unwrap_or_else(|e| panic!("{name}: {e}"));
            let r = rel(&x, &one_device(&m, j));
            eprintln!("{name}: relative difference {r:e}");
            assert!(r < 1e-5, "{name}: {r}");
        }
    }
    // The LoRAs change the image: the comparison is not of the base model with itself.
    let r = rel(&one_device(&base, &plain[0]), &one_device(&m, &plain[0]));
    assert!(r > 1e-2, "{r}");
}

#[test]
fn a_pipeline_stage_takes_its_blocks_share_of_the_loras() {
    let base = base();
    let full = with_both(&base);
    let n = base.config().num_blocks();
    let (s, ctx) = on_input(&base, &io(), |input| full.embed(input).expect("embed"));
    let mut want = s.clone();
    let mut got = s;
    for blocks in [0..1, 1..n] {
        // A stage holding only these blocks, the LoRAs put on after (as a stage loads).
        let stage = with_both(&base.clone().only_blocks(blocks.clone()));
        assert_eq!(stage.held_blocks(), blocks);
        want = full.run_blocks(want, &ctx, blocks.clone()).expect("full");
        got = stage.run_blocks(got, &ctx, blocks).expect("stage");
    }
    assert_eq!(max_abs(&(&got.img - &want.img).expect("sub")), 0.0);
    assert_eq!(max_abs(&(&got.txt - &want.txt).expect("sub")), 0.0);
}

/// The fixture's base model and its tensors under Parallax's (BFL) names.
fn base_and_tensors() -> (Flux, Vec<(String, Tensor)>) {
    let cfg = layout::flux_config_from_diffusers_json(&dir().join("config.json")).expect("config");
    let set = SafetensorsSet::open(&dir().join("transformer.safetensors")).expect("weights");
    let map = FluxDiffusersMap {
        hidden: cfg.hidden_size,
        mlp_hidden: cfg.mlp_hidden(),
    };
    let (rec, seen) = Recorder::new(MappedWeights::new(Arc::new(set), Arc::new(map)));
    let vb = candle_nn::VarBuilder::from_backend(Box::new(rec), DType::F32, Device::Cpu);
    let m = Flux::new(&cfg, vb).expect("tiny transformer");
    let tensors = seen.lock().expect("lock").clone();
    (m, tensors)
}

/// FP8 products with a LoRA: the low-rank path runs unrounded beside the FP8 product (what
/// `with_loras` does, in either order with the conversion), which keeps the LoRA's change to each
/// weight whole; merging the LoRA into the weights before they are rounded to E4M3 (the other
/// way) loses a small LoRA's change in the rounding (measured here at strength 0.05, a LoRA's
/// change usually being small beside the weight). The velocities are printed too: on this tiny
/// random model FP8's own error is larger than the LoRA's effect, so they decide nothing.
#[test]
fn with_fp8_products_the_lora_runs_beside_them_unrounded() {
    let io = io();
    let (base, tensors) = base_and_tensors();
    let cfg = base.config().clone();
    let set = LoraSet::new(vec![(lora("peft.safetensors", &cfg), 0.05)]);
    // The order of FP8 conversion and LoRA does not matter: the path is kept through conversion.
    let fp8 = base.clone().with_fp8_products().expect("fp8");
    let beside = fp8.with_loras(&set).expect("loras");
    let other_order = base
        .with_loras(&set)
        .expect("loras")
        .with_fp8_products()
        .expect("fp8");
    let v_beside = velocity(&beside, &io);
    assert_eq!(
        max_abs(&(&v_beside - velocity(&other_order, &io)).expect("sub")),
        0.0
    );
    // The same LoRA merged into the weights, then rounded; how much of its change to the
    // weights survives the rounding (beside, all of it: the path is not rounded).
    let mut merged = HashMap::new();
    let (mut lost, mut total) = (0f64, 0f64);
    for (name, t) in tensors {
        let delta = match name.strip_suffix(".weight") {
            Some(layer) if t.rank() == 2 => set
                .low_rank(layer, 0..t.dim(0).expect("rows"), DType::F32, &Device::Cpu)
                .expect("low rank")
                .map(|l| l.weight().expect("B A")),
            _ => None,
        };
        let t = match delta {
            Some(d) => {
                let m = (&t + &d).expect("add");
                let kept =
                    (round_rows(&m).expect("round") - round_rows(&t).expect("round")).expect("sub");
                let sq = |x: &Tensor| {
                    x.sqr()
                        .and_then(|x| x.sum_all())
                        .and_then(|x| x.to_scalar::<f32>())
                        .expect("sum") as f64
                };
                lost += sq(&(kept - &d).expect("sub"));
                total += sq(&d);
                m
            }
            None => t,
        };
        merged.insert(name, t);
    }
    let weight_loss = (lost / total).sqrt();
    let vb = candle_nn::VarBuilder::from_tensors(merged, DType::F32, &Device::Cpu);
    let merged = Flux::new(&cfg, vb)
        .expect("merged")
        .with_fp8_products()
        .expect("fp8");
    let exact = velocity(&base.with_loras(&set).expect("loras"), &io);
    let exact_effect = (&exact - velocity(&base, &io)).expect("sub");
    let v_fp8 = velocity(&fp8, &io);
    let v_merged = velocity(&merged, &io);
    let beside_err = rel(&(&v_beside - &v_fp8).expect("sub"), &exact_effect);
    let merged_err = rel(&(&v_merged - &v_fp8).expect("sub"), &exact_effect);
    eprintln!(
        "strength 0.05 under FP8 products: merged before rounding keeps the LoRA's weight change \
         with relative error {weight_loss:.3} (beside: 0); velocity vs f32 with the LoRA: beside \
         {:.4}, merged {:.4} (FP8 base alone vs f32 base {:.4}); the LoRA's effect on the \
         velocity vs f32: beside {beside_err:.3}, merged {merged_err:.3}",
        rel(&v_beside, &exact),
        rel(&v_merged, &exact),
        rel(&v_fp8, &velocity(&base, &io)),
    );
    assert!(weight_loss > 0.1, "{weight_loss}");
    assert!(beside_err < merged_err, "{beside_err} vs {merged_err}");
}

/// A LoRA for the built-in demo model (PEFT names, no prefix), written to `path`: two attention
/// projections and a single block's MLP rows, made-up values.
fn demo_lora(path: &Path, extra: &[&str]) {
    let cfg = FluxConfig::demo();
    let h = cfg.hidden_size;
    let made = |rows: usize, cols: usize, k: f32| {
        let v: Vec<f32> = (0..rows * cols)
            .map(|i| (i as f32 * 0.13 + k).sin() * 0.5)
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).expect("made")
    };
    let mut t: HashMap<String, Tensor> = HashMap::new();
    for (m, out, k) in [
        ("transformer_blocks.0.attn.to_q", h, 0.1),
        ("transformer_blocks.1.attn.to_out.0", h, 0.2),
        (
            "single_transformer_blocks.0.proj_mlp",
            cfg.mlp_hidden(),
            0.3,
        ),
    ] {
        t.insert(format!("{m}.lora_A.weight"), made(4, h, k));
        t.insert(format!("{m}.lora_B.weight"), made(out, 4, k + 1.0));
    }
    for name in extra {
        t.insert(name.to_string(), made(4, h, 0.5));
    }
    candle_core::safetensors::save(&t, path).expect("write lora");
}

fn parallax(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_parallax"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run parallax")
}

/// One small demo image's settings on the command line.
const DEMO_JOB: [&str; 12] = [
    "--model",
    "demo",
    "--prompt",
    "a red circle",
    "--seed",
    "5",
    "--steps",
    "3",
    "--width",
    "64",
    "--height",
    "64",
];

#[test]
fn generate_takes_loras_and_the_png_restores_them() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("shapes.safetensors");
    demo_lora(&file, &[]);
    let run = |name: &str,
               loras: &[String]|
     -> (parallax::pipeline::image::RgbImage, Vec<(String, String)>) {
        let out = dir.path().join(name);
        let mut args = vec!["generate", "--quiet"];
        args.extend(DEMO_JOB);
        let out_s = out.to_str().expect("utf-8 path").to_string();
        args.extend(["--out", &out_s]);
        for l in loras {
            args.extend(["--lora", l]);
        }
        let o = parallax(&args);
        let msg = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success(), "{loras:?}: {msg}");
        parallax::pipeline::image::read_png(&out).expect("png")
    };
    let f = file.to_str().expect("utf-8").to_string();
    let (plain, _) = run("plain.png", &[]);
    let (with, text) = run("with.png", &[format!("{f}:0.8"), format!("{f}:-0.3")]);
    let (off, _) = run("off.png", &[format!("{f}:0")]);
    assert_ne!(plain.data, with.data, "the LoRA changes the image");
    assert_eq!(
        plain.data, off.data,
        "strength 0 leaves the model as it was"
    );
    // The PNG records the LoRAs; its settings reproduce the image.
    let settings = parallax::pipeline::GenerationSettings::from_png_text(&text).expect("settings");
    let strengths: Vec<f64> = settings.loras.iter().map(|l| l.strength).collect();
    assert_eq!(strengths, vec![0.8, -0.3]);
    assert!(settings.loras.iter().all(|l| l.path == file));
    let params = &text
        .iter()
        .find(|(k, _)| k == "parameters")
        .expect("parameters")
        .1;
    assert!(params.contains("Parallax LoRAs"), "{params}");
    let p = parallax::pipeline::Pipeline::demo(&Device::Cpu).expect("demo");
    let again = p
        .generate(&settings.to_request(), &mut |_| Ok(()))
        .expect("restored");
    assert_eq!(
        again.image.data, with.data,
        "the restored settings give the same image"
    );

    // `compare` takes the same flag: every row runs with the LoRAs and records them.
    let saved = dir.path().join("compare");
    let lora = format!("{f}:0.8");
    let mut args = vec!["compare", "--thresholds", "0.1", "--lora", &lora];
    args.extend(DEMO_JOB);
    args.extend(["--save", saved.to_str().expect("utf-8")]);
    let o = parallax(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pngs: Vec<_> = std::fs::read_dir(&saved)
        .expect("saved")
        .flatten()
        .collect();
    assert!(pngs.len() >= 2, "{pngs:?}");
    for e in pngs {
        let (_, text) = parallax::pipeline::image::read_png(&e.path()).expect("png");
        let s = parallax::pipeline::GenerationSettings::from_png_text(&text).expect("settings");
        assert_eq!(
            s.loras,
            vec![lora.parse().expect("choice")],
            "{:?}",
            e.path()
        );
    }
}

#[test]
fn a_lora_with_parts_parallax_cannot_apply_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("with-te.safetensors");
    demo_lora(
        &file,
        &["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"],
    );
    let out = dir.path().join("refused.png");
    let lora = format!("{}:0.7", file.display());
    let o = parallax(&[
        "generate",
        "--model",
        "demo",
        "--prompt",
        "x",
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--quiet",
        "--lora",
        &lora,
        "--out",
        out.to_str().expect("utf-8"),
    ]);
    let msg = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "{msg}");
    assert!(
        msg.contains("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"),
        "{msg}"
    );
    assert!(!msg.contains("panicked"), "{msg}");
    assert!(!out.exists());
}

/// One loaded pipeline, LoRA strengths changed between requests: each request gets its own
/// strengths (the base model is not reloaded, and a LoRA'd transformer kept for the last set is
/// not reused for another).
#[test]
fn strengths_change_between_requests_on_one_pipeline() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("shapes.safetensors");
    demo_lora(&file, &[]);
    let p = parallax::pipeline::Pipeline::demo(&Device::Cpu).expect("demo");
    let image = |loras: &[(f64, &Path)]| {
        let req = parallax::pipeline::GenerateRequest {
            prompt: "a red circle".into(),
            width: 64,
            height: 64,
            steps: Some(2),
            seed: 5,
            loras: loras
                .iter()
                .map(|(s, f)| parallax::model::lora::LoraChoice {
                    path: f.to_path_buf(),
                    strength: *s,
                })
                .collect(),
            ..Default::default()
        };
        p.generate(&req, &mut |_| Ok(()))
            .expect("generate")
            .image
            .data
    };
    let plain = image(&[]);
    let a = image(&[(0.8, &file)]);
    let b = image(&[(-0.4, &file)]);
    let a_again = image(&[(0.8, &file)]);
    let off = image(&[]);
    assert_ne!(a, plain);
    assert_ne!(b, a);
    assert_eq!(a_again, a);
    assert_eq!(off, plain);
}
