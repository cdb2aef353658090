//! No caching: every step runs the whole transformer.

use candle_core::Tensor;

use super::{CachePolicy, StepKind, StepPos};
use crate::error::CandleResultExt;
use crate::model::flux::{Flux, FluxInput};
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
        model: &Flux,
        input: &FluxInput,
        _pos: StepPos,
    ) -> Result<(Tensor, StepKind)> {
        let v = model.forward(input).px()?;
        Ok((v, StepKind::Computed { diff: None }))
    }
}
