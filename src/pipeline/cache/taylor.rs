//! TaylorSeer: between fully computed steps, extrapolate the transformer blocks' output instead
//! of reusing it as it was.
//!
//! The blocks' residual on the image stream, `R(t) = blocks(h)(t) - h(t)`, is recorded at every
//! computed step; finite differences over the steps' times give its first (and second)
//! derivative, and a skipped step at time `t` adds `R + R'·Δt (+ R''·Δt²/2)` to its own embedded
//! input and runs only the final layer. Every `n`-th step after `warmup` computed steps runs every
//! block, as does the last step; `n = 1` computes every step (exact).
//!
//! [`TaylorHistory`] is the extrapolation alone, which DBCache uses for its cached middle blocks.

use candle_core::Tensor;

use super::{CachePolicy, StepKind, StepPos};
use crate::model::family::{Denoiser, StepInput};
use crate::Result;

/// One feature's value and finite-difference derivatives at the last step it was computed.
#[derive(Debug, Default)]
pub struct TaylorHistory {
    order: usize,
    /// (time, value, first derivative, second derivative).
    last: Option<(f64, Tensor, Option<Tensor>, Option<Tensor>)>,
}

impl TaylorHistory {
    pub fn new(order: usize) -> Self {
        Self {
            order: order.min(2),
            last: None,
        }
    }

    pub fn reset(&mut self) {
        self.last = None;
    }

    /// Record the feature's value `f` computed at time `t`.
    pub fn update(&mut self, t: f64, f: Tensor) -> Result<()> {
        let (d1, d2) = match self.last.take() {
            Some((t0, f0, d1_0, _)) if t != t0 && self.order >= 1 => {
                let dt = t - t0;
                let d1 = ((&f - &f0)? / dt)?;
                let d2 = match d1_0 {
                    Some(d1_0) if self.order >= 2 => Some(((&d1 - &d1_0)? / dt)?),
                    _ => None,
                };
                (Some(d1), d2)
            }
            _ => (None, None),
        };
        self.last = Some((t, f, d1, d2));
        Ok(())
    }

    /// Whether a derivative is known (the extrapolation is more than the last value).
    pub fn has_derivative(&self) -> bool {
        matches!(self.last, Some((_, _, Some(_), _)))
    }

    /// The feature extrapolated to time `t`, if anything was recorded.
    pub fn predict(&self, t: f64) -> Result<Option<Tensor>> {
        let Some((t0, f, d1, d2)) = &self.last else {
            return Ok(None);
        };
        let dt = t - t0;
        let mut y = f.clone();
        if let Some(d1) = d1 {
            y = (&y + (d1 * dt)?)?;
        }
        if let Some(d2) = d2 {
            y = (&y + (d2 * (0.5 * dt * dt))?)?;
        }
        Ok(Some(y))
    }
}

pub struct TaylorSeer {
    interval: usize,
    warmup: usize,
    history: TaylorHistory,
}

impl TaylorSeer {
    pub fn new(interval: usize, order: usize, warmup: usize) -> Self {
        Self {
            interval: interval.max(1),
            warmup,
            history: TaylorHistory::new(order.clamp(1, 2)),
        }
    }

    /// Whether step `pos` runs every block (decided from the schedule alone, so every rank of a
    /// parallel group agrees without exchanging anything).
    fn computes(&self, pos: StepPos) -> bool {
        self.interval <= 1
            || pos.index < self.warmup
            || pos.index + 1 >= pos.total
            || (pos.index - self.warmup) % self.interval == 0
            || !self.history.has_derivative()
    }
}

impl CachePolicy for TaylorSeer {
    fn name(&self) -> &str {
        "taylorseer"
    }

    fn reset(&mut self) {
        self.history.reset();
    }

    fn predict(
        &mut self,
        model: &dyn Denoiser,
        input: &StepInput,
        pos: StepPos,
    ) -> Result<(Tensor, StepKind)> {
        let (s0, ctx) = model.embed(input)?;
        let img_in = s0.img.clone();
        if !self.computes(pos) {
            if let Some(r) = self.history.predict(pos.t)? {
                let img = (&img_in + r.to_dtype(img_in.dtype())?)?;
                let v = model.final_layer(&img, &ctx)?;
                return Ok((v, StepKind::Reused { diff: 0.0 }));
            }
        }
        let (v, r) = super::full_step(model, s0, &ctx)?;
        // The history is kept in f32: differences of bf16 residuals lose most of their bits.
        self.history
            .update(pos.t, r.to_dtype(candle_core::DType::F32)?)?;
        Ok((v, StepKind::Computed { diff: None }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::CandleResultExt;
    use candle_core::Device;

    #[test]
    fn the_history_extrapolates_lines_and_parabolas_exactly() -> Result<()> {
        let dev = Device::Cpu;
        let f = |t: f64| Tensor::new(&[2.0 * t + 1.0, -t], &dev).px();
        let mut h = TaylorHistory::new(1);
        h.update(1.0, f(1.0)?)?;
        assert!(!h.has_derivative());
        h.update(0.8, f(0.8)?)?;
        let y: Vec<f64> = h.predict(0.5)?.expect("value").to_vec1()?;
        assert!(
            (y[0] - 2.0).abs() < 1e-12 && (y[1] + 0.5).abs() < 1e-12,
            "{y:?}"
        );

        // Second order on t²: the derivative estimates are backward differences, so the
        // extrapolation of an exact parabola is close, not exact; check it beats order 1.
        let g = |t: f64| Tensor::new(&[t * t], &dev).px();
        let (mut h1, mut h2) = (TaylorHistory::new(1), TaylorHistory::new(2));
        for t in [1.0, 0.9, 0.8] {
            h1.update(t, g(t)?)?;
            h2.update(t, g(t)?)?;
        }
        let want = 0.7 * 0.7;
        let e1 = (h1.predict(0.7)?.expect("1").to_vec1::<f64>()?[0] - want).abs();
        let e2 = (h2.predict(0.7)?.expect("2").to_vec1::<f64>()?[0] - want).abs();
        assert!(e2 < e1, "order 2 {e2} vs order 1 {e1}");
        Ok(())
    }

    #[test]
    fn taylorseer_computes_on_its_schedule() {
        let mut p = TaylorSeer::new(3, 1, 2);
        // With a derivative known, 12 steps: warm-up 0, 1; then every third from 2; the last.
        p.history.last = Some((
            1.0,
            Tensor::new(&[0f32], &Device::Cpu).expect("t"),
            Some(Tensor::new(&[0f32], &Device::Cpu).expect("t")),
            None,
        ));
        let computed: Vec<usize> = (0..12)
            .filter(|&i| p.computes(StepPos::uniform(i, 12)))
            .collect();
        assert_eq!(computed, vec![0, 1, 2, 5, 8, 11]);
    }
}
