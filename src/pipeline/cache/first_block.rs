//! First Block Cache: skip the transformer when its first block barely changed.
//!
//! Each step runs block 0 and measures its residual on the image stream, `r = block0(h) - h`.
//! Against `r_ref`, the residual of the last step that ran every block, the relative change is
//! `mean|r - r_ref| / mean|r_ref|`. Below the threshold, the step adds the cached residual of the
//! remaining blocks (from that last full step) to block 0's output instead of running them. A miss
//! runs every block and refreshes both `r_ref` and the cached residual.
//!
//! Only the image stream's residual is cached: once no later block runs, the text stream no longer
//! affects the output. The two means are computed as separate sums so that, under sequence
//! parallelism, they can be all-reduced before dividing and every rank decides alike.

use candle_core::{DType, Tensor};

use super::{CachePolicy, StepKind, StepPos};
use crate::model::family::{Denoiser, StepInput};
use crate::Result;

pub struct FirstBlockCache {
    threshold: f64,
    ref_residual: Option<Tensor>,
    rest_residual: Option<Tensor>,
}

impl FirstBlockCache {
    pub fn new(threshold: f64) -> Self {
        Self {
            threshold,
            ref_residual: None,
            rest_residual: None,
        }
    }

    pub fn threshold(&self) -> f64 {
        self.threshold
    }
}

/// sum|a - b| and sum|b|, in f64 (numerator and denominator of the relative change).
pub fn residual_sums(r: &Tensor, r_ref: &Tensor) -> candle_core::Result<(f64, f64)> {
    let num = (r - r_ref)?
        .abs()?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()? as f64;
    let den = r_ref
        .abs()?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()? as f64;
    Ok((num, den))
}

impl CachePolicy for FirstBlockCache {
    fn name(&self) -> &str {
        "first-block"
    }

    fn reset(&mut self) {
        self.ref_residual = None;
        self.rest_residual = None;
    }

    fn predict(
        &mut self,
        model: &dyn Denoiser,
        input: &StepInput,
        _pos: StepPos,
    ) -> Result<(Tensor, StepKind)> {
        let n = model.num_blocks();
        let (s0, ctx) = model.embed(input)?;
        let img_in = s0.img.clone();
        let s1 = model.run_blocks(s0, &ctx, 0..1)?;
        let r = (&s1.img - &img_in)?;

        let mut diff = None;
        if let (Some(r_ref), Some(rest)) = (&self.ref_residual, &self.rest_residual) {
            let d = super::relative_change(model, &ctx, &r, r_ref)?;
            if d < self.threshold {
                let img = (&s1.img + rest)?;
                let v = model.final_layer(&img, &ctx)?;
                return Ok((v, StepKind::Reused { diff: d }));
            }
            diff = Some(d);
        }

        let after_first = s1.img.clone();
        let s = model.run_blocks(s1, &ctx, 1..n)?;
        self.rest_residual = Some((&s.img - &after_first)?);
        self.ref_residual = Some(r);
        let v = model.final_layer(&s.img, &ctx)?;
        Ok((v, StepKind::Computed { diff }))
    }
}
