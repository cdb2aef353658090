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
use parallax::model::flux::{Flux, FluxConfig, FluxInput};
use parallax::model::layout::{self, FluxDiffusersMap};
use parallax::model::lora::{flux_linear_layers, LoraFile, LoraSet};
use parallax::model::weights::{MappedWeights, SafetensorsSet};

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
