//! Cache policies: how much of the transformer a denoising step really runs.
//!
//! The denoising loop asks its policy for each step's velocity; the policy decides which blocks to
//! run through the transformer's stage API ([`Denoiser::embed`], [`Denoiser::run_blocks`],
//! [`Denoiser::final_layer`]). A new policy is one new file implementing [`CachePolicy`], plus its
//! line in [`CacheSpec`] (how it is named on the command line, in settings and in PNGs).

mod dbcache;
mod first_block;
mod magcache;
mod none;
mod spec;
mod taylor;

pub use dbcache::{DbCache, DbCacheSettings};
pub use first_block::FirstBlockCache;
pub use magcache::{MagCache, MagCalibration, MagCalibrator};
pub use none::NoCache;
pub use spec::{CacheSpec, PRESET_NAMES};
pub use taylor::{TaylorHistory, TaylorSeer};

use candle_core::Tensor;

use crate::model::family::{Denoiser, StepInput};
use crate::Result;

/// What a step did.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StepKind {
    /// Every block ran. `diff` is the measure that decided it (a residual change, an
    /// accumulated error), if one was taken.
    Computed { diff: Option<f64> },
    /// Part of the transformer (or none of it) ran; the rest came from the cache. `diff` is the
    /// measure that allowed it.
    Reused { diff: f64 },
}

impl StepKind {
    pub fn is_reused(&self) -> bool {
        matches!(self, StepKind::Reused { .. })
    }
}

/// Where a step sits in its schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepPos {
    /// 0-based step index.
    pub index: usize,
    /// Steps in the schedule.
    pub total: usize,
    /// The step's time (1 = noise, 0 = image) and the previous step's, if any.
    pub t: f64,
    pub t_prev: Option<f64>,
}

impl StepPos {
    /// A position for tests and one-off calls: step `index` of `total` on a uniform schedule.
    pub fn uniform(index: usize, total: usize) -> Self {
        let t = |i: usize| 1.0 - i as f64 / total.max(1) as f64;
        Self {
            index,
            total,
            t: t(index),
            t_prev: index.checked_sub(1).map(t),
        }
    }
}

/// Decides, each step, what of the transformer to run. Every policy is exact at its "off"
/// setting, and takes its decisions identically on every rank of a parallel group (measures
/// all-reduced over the group, or decided from the schedule alone).
pub trait CachePolicy: Send {
    fn name(&self) -> &str;
    /// Forget everything cached (called before each image).
    fn reset(&mut self);
    /// The velocity for this step, and what was computed to get it.
    fn predict(
        &mut self,
        model: &dyn Denoiser,
        input: &StepInput,
        pos: StepPos,
    ) -> Result<(Tensor, StepKind)>;
}

/// Where `parallax calibrate-magcache` keeps a model's calibration: `$PARALLAX_HOME/magcache/`,
/// else `$XDG_DATA_HOME/parallax/magcache/`, else `~/.local/share/parallax/magcache/`, under the
/// model's name with every character but letters, digits, `-` and `.` replaced by `_`.
pub fn calibration_file(label: &str) -> std::path::PathBuf {
    use std::path::PathBuf;
    let base = if let Some(h) = std::env::var_os("PARALLAX_HOME") {
        PathBuf::from(h)
    } else if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        PathBuf::from(x).join("parallax")
    } else if let Some(home) = std::env::var_os("HOME") {
        PathBuf::from(home).join(".local/share/parallax")
    } else {
        PathBuf::from(".")
    };
    let name: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    base.join("magcache").join(format!("{name}.json"))
}

/// Every block on the embedded streams `s0`: the step's velocity, and the blocks' residual on the
/// image stream (what TaylorSeer and MagCache keep).
pub(crate) fn full_step(
    model: &dyn Denoiser,
    s0: crate::model::family::Streams,
    ctx: &crate::model::family::BlockCtx,
) -> Result<(Tensor, Tensor)> {
    let img_in = s0.img.clone();
    let n = model.num_blocks();
    let s = model.run_blocks(s0, ctx, 0..n)?;
    let residual = (&s.img - &img_in)?;
    Ok((model.final_layer(&s.img, ctx)?, residual))
}

/// Relative change `sum|a - b| / sum|b|` of two residuals on the image stream, summed over the
/// sequence-parallel group (padding rows left out) so that every rank decides alike.
pub(crate) fn relative_change(
    model: &dyn Denoiser,
    ctx: &crate::model::family::BlockCtx,
    r: &Tensor,
    r_ref: &Tensor,
) -> Result<f64> {
    let (mut num, mut den) =
        first_block::residual_sums(&ctx.real_image(r)?, &ctx.real_image(r_ref)?)?;
    if let Some(group) = model.sp_group() {
        let t = Tensor::new(&[num, den], model.device())?;
        let total: Vec<f64> = group.all_reduce_sum(&t)?.to_vec1()?;
        (num, den) = (total[0], total[1]);
    }
    Ok(if den > 0.0 { num / den } else { f64::INFINITY })
}

/// Per-image counts of computed and reused steps.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CacheStats {
    pub computed: usize,
    pub reused: usize,
    /// Each step's kind, in order.
    pub steps: Vec<StepKind>,
}

impl CacheStats {
    pub fn record(&mut self, kind: StepKind) {
        if kind.is_reused() {
            self.reused += 1;
        } else {
            self.computed += 1;
        }
        self.steps.push(kind);
    }
}
