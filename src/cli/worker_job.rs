//! The job a `parallax worker` process was started for, as the fingerprint every rank compares
//! with every other's at the rendezvous ([`crate::parallel::fingerprint`]).

use super::WorkerArgs;
use crate::model::layout::ModelSpec;
use crate::parallel::fingerprint::{model_identity, Fingerprint, ANY_SEED};

/// The fingerprint of the rank `a` was started as (its rank and world resolved): `seed` is its own or, for rank 0, the one it picked (`None`:
/// it takes rank 0's).
pub fn fingerprint(a: &WorkerArgs, spec: &ModelSpec, seed: Option<u64>) -> Fingerprint {
    let s = &a.sample;
    let opt = |v: Option<String>| v.unwrap_or_else(|| "(default)".into());
    let backend = if a.model.device.starts_with("cuda") {
        "cuda"
    } else {
        "cpu"
    };
    Fingerprint::new()
        .with("Parallax version", env!("CARGO_PKG_VERSION"))
        .with("world", a.world.unwrap_or(0))
        .with("model", model_identity(spec))
        .with("dtype", format!("{:?}", a.model.dtype))
        .with("precision", format!("{:?}", a.model.precision))
        .with("FP8 attention", a.model.fp8_attention)
        .with(
            "memory budget",
            opt(a.model.memory_budget.map(|b| b.to_string())),
        )
        .with("device kind", backend)
        .with("prompt", &s.prompt)
        .with("negative prompt", opt(s.negative_prompt.clone()))
        .with("true CFG", opt(s.true_cfg.map(|v| v.to_string())))
        .with("width", opt(s.width.map(|v| v.to_string())))
        .with("height", opt(s.height.map(|v| v.to_string())))
        .with("steps", opt(s.steps.map(|v| v.to_string())))
        .with("seed", seed.map_or(ANY_SEED.to_string(), |v| v.to_string()))
        .with("guidance", opt(s.guidance.map(|v| v.to_string())))
        .with("cache threshold", s.cache_threshold)
        .with("cache", opt(s.cache.as_ref().map(|c| format!("{c:?}"))))
        .with("layout", format!("{:?}", a.degrees))
        .with("LoRAs", format!("{:?}", s.lora))
}
