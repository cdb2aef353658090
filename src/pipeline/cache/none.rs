//! No caching: every step runs the whole transformer.

use candle_core::Tensor;

use super::{CachePolicy, StepKind, StepPos};
use crate::model::family::{Denoiser, StepInput};
use crate::Result;

#[derive(Debug, Default, Clone, Copy)]
pub struct NoCache;

impl CachePolicy for NoCache {
    fn name(&self) -> &str {
        "none"
    }
    fn reset(&mut self) {}
    fn predict(
        &mut self,
        model: &dyn Denoiser,
        input: &StepInput,
        _pos: StepPos,
    ) -> Result<(Tensor, StepKind)> {
        let v = model.forward(input)?;
        Ok((v, StepKind::Computed { diff: None }))
    }
}
