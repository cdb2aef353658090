//! LoRA against diffusers: `scripts/lora-reference.py` built a tiny seeded FLUX.1 transformer, one
//! LoRA written three ways (PEFT, kohya, Black Forest Labs/ComfyUI names: fused q/k/v and
//! single-block `linear1` joined, alpha beside) and a second PEFT LoRA, and saved the velocities
//! diffusers computes with them (`load_lora_into_transformer` + `set_adapters`, f32) in
//! `tests/fixtures/lora/`. Each layout must load to the same effective weights, and the velocity
//! with the LoRAs on must match diffusers'.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use parallax::model::family::Denoiser;
use parallax::model::flux::{Flux, FluxConfig, FluxInput};
use parallax::model::layout::{self, FluxDiffusersMap};
use parallax::model::lora::{flux_linear_layers, LoraFile, LoraSet};
use parallax::model::weights::{MappedWeights, SafetensorsSet};
use parallax::parallel::mesh::ParallelLayout;
use parallax::parallel::ranks;
use parallax::pipeline::cache::CacheSpec;
use parallax::pipeline::sampler::{self, Conditioning, TrueCfg};
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

fn velocity(m: &Flux, io: &HashMap<String, Tensor>) -> Tensor {
    let pe = m.pos_embed(3, 4, 4).expect("pe");
    let t = Tensor::new(&[0.6f32], &Device::Cpu).expect("t");
    let g = Tensor::new(&[3.5f32], &Device::Cpu).expect("g");
    m.forward(&FluxInput {
        img: &io["x"],
        txt: &io["txt"],
        y: &io["y"],
        timesteps: &t,
        guidance: Some(&g),
        pe: &pe,
    })
    .expect("forward")
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
    for name in ["peft.safetensors", "kohya.safetensors", "bfl.safetensors"] {
        let first = lora(name, &cfg);
        for (key, set) in [
            ("first", vec![(first.clone(), 1.0)]),
            ("first_neg", vec![(first.clone(), -0.7)]),
            ("both", vec![(first.clone(), 0.8), (second.clone(), -0.5)]),
        ] {
            let with = m.with_loras(&LoraSet::new(set)).expect("with loras");
            let r = rel(&velocity(&with, &io), &io[key]);
            assert!(r < 1e-4, "{name}, {key}: differs from diffusers by {r}");
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
    }
}

/// `job` on one device, both branches of true CFG here.
fn one_device(m: &Flux, job: &DenoiseJob) -> Tensor {
    let mut neg_policy = CacheSpec::None.policy(None).expect("policy");
    let cfg = job.neg.as_ref().map(|neg| TrueCfg::Local {
        neg,
        policy: neg_policy.as_mut(),
        scale: job.true_cfg,
    });
    let mut policy = CacheSpec::None.policy(None).expect("policy");
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
                pipeline: 2,
                pipeline_warmup: Some(STEPS),
                ..l()
            },
            &plain,
        ),
        (
            "displaced 2 (warm-up)",
            ParallelLayout {
                ring: 2,
                displaced_warmup: Some(STEPS),
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
    let io = io();
    let pe = base.pos_embed(3, 4, 4).expect("pe");
    let t = Tensor::new(&[0.6f32], &Device::Cpu).expect("t");
    let g = Tensor::new(&[3.5f32], &Device::Cpu).expect("g");
    let input = FluxInput {
        img: &io["x"],
        txt: &io["txt"],
        y: &io["y"],
        timesteps: &t,
        guidance: Some(&g),
        pe: &pe,
    };
    let (s, ctx) = full.embed(&input).expect("embed");
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
