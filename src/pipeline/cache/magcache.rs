//! MagCache: skip steps while the blocks' output is predicted, from a calibration of this model,
//! to change little.
//!
//! The magnitude of the blocks' residual on the image stream, `mean|R(t)|`, changes between steps
//! in the same way for every prompt of a model, so its rate `g(t) = d ln mean|R| / dt` is measured
//! once ([`MagCalibrator`], `parallax calibrate-magcache`) and kept with the model. Each step after
//! the warm-up multiplies the running ratio by the calibrated step ratio `exp(g · Δt)` and adds
//! `|1 - ratio|` to the accumulated error; while the error stays under the threshold and at most
//! `k` steps in a row, the step reuses the last computed residual (added to its own embedded
//! input; only the embedders and the final layer run). A computed step resets both. The decision
//! reads the calibration and the schedule only, so every rank of a parallel group agrees.
//!
//! The calibration is a function of time, not of the step count: the same file serves 12 steps or
//! 50. A threshold of 0 never skips (exact).

use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::{CachePolicy, StepKind, StepPos};
use crate::model::family::{Denoiser, StepInput};
use crate::{Error, Result};

/// `g(t) = d ln mean|R| / dt` sampled at increasing times in (0, 1).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MagCalibration {
    /// What the calibration was measured on (model, prompts, steps).
    pub source: String,
    /// (t, g) pairs, t increasing.
    pub rate: Vec<(f64, f64)>,
}

impl MagCalibration {
    /// The demo model's calibration, shipped with it (`assets/demo/magcache.json`).
    pub fn demo() -> Result<Self> {
        Self::from_json(include_str!("../../../assets/demo/magcache.json"))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        let c: Self = serde_json::from_str(text).map_err(|e| {
            Error::setting("magcache calibration", "json", format!("unreadable: {e}"))
        })?;
        if c.rate.is_empty()
            || c.rate.windows(2).any(|w| w[1].0 <= w[0].0)
            || c.rate.iter().any(|(t, g)| !t.is_finite() || !g.is_finite())
        {
            return Err(Error::setting(
                "magcache calibration",
                &c.source,
                "needs finite (t, g) pairs with t increasing",
            ));
        }
        Ok(c)
    }

    /// g at `t`, linearly interpolated (held constant past the ends).
    fn rate_at(&self, t: f64) -> f64 {
        let r = &self.rate;
        if t <= r[0].0 {
            return r[0].1;
        }
        for w in r.windows(2) {
            let ((t0, g0), (t1, g1)) = (w[0], w[1]);
            if t <= t1 {
                return g0 + (g1 - g0) * (t - t0) / (t1 - t0);
            }
        }
        r[r.len() - 1].1
    }

    /// The calibrated ratio `mean|R(t)| / mean|R(t_prev)|`.
    pub fn ratio(&self, t_prev: f64, t: f64) -> f64 {
        (self.rate_at(0.5 * (t_prev + t)) * (t - t_prev)).exp()
    }
}

pub struct MagCache {
    threshold: f64,
    max_skip: usize,
    warmup: usize,
    calibration: Arc<MagCalibration>,
    residual: Option<Tensor>,
    ratio: f64,
    error: f64,
    skipped: usize,
}

impl MagCache {
    pub fn new(
        threshold: f64,
        max_skip: usize,
        warmup: usize,
        calibration: Arc<MagCalibration>,
    ) -> Self {
        Self {
            threshold,
            max_skip,
            warmup,
            calibration,
            residual: None,
            ratio: 1.0,
            error: 0.0,
            skipped: 0,
        }
    }
}

impl CachePolicy for MagCache {
    fn name(&self) -> &str {
        "magcache"
    }

    fn reset(&mut self) {
        self.residual = None;
        (self.ratio, self.error, self.skipped) = (1.0, 0.0, 0);
    }

    fn predict(
        &mut self,
        model: &dyn Denoiser,
        input: &StepInput,
        pos: StepPos,
    ) -> Result<(Tensor, StepKind)> {
        let (s0, ctx) = model.embed(input)?;
        let img_in = s0.img.clone();
        let mut diff = None;
        if let (Some(r), Some(t_prev), true) = (
            &self.residual,
            pos.t_prev,
            self.threshold > 0.0 && pos.index >= self.warmup && pos.index + 1 < pos.total,
        ) {
            let ratio = self.ratio * self.calibration.ratio(t_prev, pos.t);
            let error = self.error + (1.0 - ratio).abs();
            if error < self.threshold && self.skipped < self.max_skip {
                (self.ratio, self.error) = (ratio, error);
                self.skipped += 1;
                let img = (&img_in + r)?;
                let v = model.final_layer(&img, &ctx)?;
                return Ok((v, StepKind::Reused { diff: error }));
            }
            diff = Some(error);
        }
        let (v, residual) = super::full_step(model, s0, &ctx)?;
        self.residual = Some(residual);
        (self.ratio, self.error, self.skipped) = (1.0, 0.0, 0);
        Ok((v, StepKind::Computed { diff }))
    }
}

/// Runs every step in full and records `mean|R|` at each step's time: many images through it,
/// then [`MagCalibrator::finish`] gives the calibration (the mean log-ratio per unit time between
/// consecutive steps, at their midpoints).
#[derive(Debug, Default)]
pub struct MagCalibrator {
    /// Per image: (t, mean|R|) at each step.
    images: Vec<Vec<(f64, f64)>>,
}

impl MagCalibrator {
    pub fn new() -> Self {
        Self::default()
    }

    /// The calibration from every image recorded so far.
    pub fn finish(&self, source: impl Into<String>) -> Result<MagCalibration> {
        let mut sums: Vec<(f64, f64, usize)> = Vec::new();
        for img in self.images.iter().filter(|v| v.len() >= 2) {
            for (i, w) in img.windows(2).enumerate() {
                let ((t0, m0), (t1, m1)) = (w[0], w[1]);
                if m0 <= 0.0 || m1 <= 0.0 || t1 == t0 {
                    continue;
                }
                if sums.len() <= i {
                    sums.push((0.0, 0.0, 0));
                }
                sums[i].0 += 0.5 * (t0 + t1);
                sums[i].1 += (m1 / m0).ln() / (t1 - t0);
                sums[i].2 += 1;
            }
        }
        let mut rate: Vec<(f64, f64)> = sums
            .into_iter()
            .filter(|s| s.2 > 0)
            .map(|(t, g, k)| (t / k as f64, g / k as f64))
            .collect();
        rate.sort_by(|a, b| a.0.total_cmp(&b.0));
        rate.dedup_by(|a, b| a.0 == b.0);
        let c = MagCalibration {
            source: source.into(),
            rate,
        };
        MagCalibration::from_json(
            &serde_json::to_string(&c)
                .map_err(|e| Error::setting("magcache calibration", "json", e.to_string()))?,
        )
    }
}

impl CachePolicy for MagCalibrator {
    fn name(&self) -> &str {
        "magcache-calibration"
    }

    fn reset(&mut self) {
        self.images.push(Vec::new());
    }

    fn predict(
        &mut self,
        model: &dyn Denoiser,
        input: &StepInput,
        pos: StepPos,
    ) -> Result<(Tensor, StepKind)> {
        let (s0, ctx) = model.embed(input)?;
        let (v, residual) = super::full_step(model, s0, &ctx)?;
        let m = ctx
            .real_image(&residual)?
            .abs()?
            .to_dtype(DType::F32)?
            .mean_all()?
            .to_scalar::<f32>()? as f64;
        if self.images.is_empty() {
            self.images.push(Vec::new());
        }
        if let Some(img) = self.images.last_mut() {
            img.push((pos.t, m));
        }
        Ok((v, StepKind::Computed { diff: None }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_integrates_the_rate() {
        let c = MagCalibration {
            source: "test".into(),
            rate: vec![(0.2, 1.0), (0.8, 1.0)],
        };
        // Constant rate 1: the magnitude goes as e^t.
        assert!((c.ratio(0.9, 0.6) - (-0.3f64).exp()).abs() < 1e-12);
        assert!(MagCalibration::from_json(r#"{"source":"x","rate":[[0.5,1],[0.4,1]]}"#).is_err());
        assert!(MagCalibration::demo().is_ok());
    }
}
