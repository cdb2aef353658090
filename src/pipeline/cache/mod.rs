//! Cache policies: how much of the transformer a denoising step really runs.
//!
//! The denoising loop asks its policy for each step's velocity; the policy decides which blocks to
//! run through the transformer's stage API ([`Flux::embed`], [`Flux::run_blocks`],
//! [`Flux::final_layer`]). A new policy is one new file implementing [`CachePolicy`].

mod first_block;
mod none;

pub use first_block::FirstBlockCache;
pub use none::NoCache;

use candle_core::Tensor;

use crate::model::flux::{Flux, FluxInput};
use crate::Result;

/// What a step did.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StepKind {
    /// Every block ran. `diff` is the first-block residual change that decided it, if measured.
    Computed { diff: Option<f64> },
    /// Only the first block ran; the rest was reused from the last computed step.
    Reused { diff: f64 },
}

impl StepKind {
    pub fn is_reused(&self) -> bool {
        matches!(self, StepKind::Reused { .. })
    }
}

/// Decides, each step, what of the transformer to run.
pub trait CachePolicy: Send {
    fn name(&self) -> &str;
    /// Forget everything cached (called before each image).
    fn reset(&mut self);
    /// The velocity for this step, and what was computed to get it.
    fn predict(&mut self, model: &Flux, input: &FluxInput) -> Result<(Tensor, StepKind)>;
}

/// The policy for a `residual_diff_threshold`: none when it is 0, First Block Cache otherwise.
pub fn policy_for(threshold: f64) -> Box<dyn CachePolicy> {
    if threshold > 0.0 {
        Box::new(FirstBlockCache::new(threshold))
    } else {
        Box::new(NoCache)
    }
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
