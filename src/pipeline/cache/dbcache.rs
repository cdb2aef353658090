//! DBCache (dual block cache): the first `f` blocks always run and probe, the last `b` always run
//! and correct, the middle is reused.
//!
//! Each step runs blocks `0..f` and measures the change of their residual on the image stream
//! against the last fully computed step's, as First Block Cache does with one block. Below the
//! threshold (and past the warm-up steps, and under the limit of consecutive reused steps) the
//! middle blocks' residuals on both streams — from that last computed step, or extrapolated to
//! this step's time by TaylorSeer with `taylor = 1 | 2` — are added to the probe's output, and
//! the last `b` blocks run on the result, so they correct what reuse got wrong. A computed step
//! runs the middle and refreshes the probe's reference and the cached residuals.
//!
//! `f = 1, b = 0` with no warm-up, limit or Taylor term is First Block Cache; a threshold of 0
//! never reuses (exact).

use candle_core::Tensor;

use super::{CachePolicy, StepKind, StepPos, TaylorHistory};
use crate::model::family::{Denoiser, StepInput, Streams};
use crate::Result;

/// DBCache's settings (what `dbcache:f=..,b=..,t=..,max=..,warmup=..,taylor=..` names).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DbCacheSettings {
    /// Probe blocks at the front, always computed (at least 1).
    pub front: usize,
    /// Corrector blocks at the back, always computed.
    pub back: usize,
    /// Relative change of the probe's residual below which the middle is reused (0: never).
    pub threshold: f64,
    /// Most consecutive reused steps (0: no limit).
    pub max_cached: usize,
    /// Steps always computed first.
    pub warmup: usize,
    /// Order of the TaylorSeer extrapolation of the cached middle (0: none).
    pub taylor: usize,
}

pub struct DbCache {
    s: DbCacheSettings,
    probe_ref: Option<Tensor>,
    middle: Option<(Tensor, Tensor)>,
    history: (TaylorHistory, TaylorHistory),
    in_a_row: usize,
}

impl DbCache {
    pub fn new(s: DbCacheSettings) -> Self {
        Self {
            s: DbCacheSettings {
                front: s.front.max(1),
                ..s
            },
            probe_ref: None,
            middle: None,
            history: (TaylorHistory::new(s.taylor), TaylorHistory::new(s.taylor)),
            in_a_row: 0,
        }
    }

    /// The middle blocks' residuals (image, text) to add at time `t`.
    fn cached_middle(&self, t: f64) -> Result<Option<(Tensor, Tensor)>> {
        if self.s.taylor > 0 {
            if let (Some(i), Some(x)) = (self.history.0.predict(t)?, self.history.1.predict(t)?) {
                return Ok(Some((i, x)));
            }
        }
        Ok(self.middle.clone())
    }
}

impl CachePolicy for DbCache {
    fn name(&self) -> &str {
        "dbcache"
    }

    fn reset(&mut self) {
        self.probe_ref = None;
        self.middle = None;
        self.history.0.reset();
        self.history.1.reset();
        self.in_a_row = 0;
    }

    fn predict(
        &mut self,
        model: &dyn Denoiser,
        input: &StepInput,
        pos: StepPos,
    ) -> Result<(Tensor, StepKind)> {
        let n = model.num_blocks();
        let f = self.s.front.min(n);
        let b = self.s.back.min(n - f);
        let (s0, ctx) = model.embed(input)?;
        let img_in = s0.img.clone();
        let sf = model.run_blocks(s0, &ctx, 0..f)?;
        let r = (&sf.img - &img_in)?;

        let mut diff = None;
        let may_reuse = self.s.threshold > 0.0
            && pos.index >= self.s.warmup
            && (self.s.max_cached == 0 || self.in_a_row < self.s.max_cached);
        if let (true, Some(r_ref)) = (may_reuse, &self.probe_ref) {
            let d = super::relative_change(model, &ctx, &r, r_ref)?;
            if d < self.s.threshold {
                if let Some((mi, mt)) = self.cached_middle(pos.t)? {
                    let dtype = sf.img.dtype();
                    let s = Streams {
                        img: (&sf.img + mi.to_dtype(dtype)?)?,
                        txt: (&sf.txt + mt.to_dtype(dtype)?)?,
                    };
                    let s = model.run_blocks(s, &ctx, n - b..n)?;
                    self.in_a_row += 1;
                    let v = model.final_layer(&s.img, &ctx)?;
                    return Ok((v, StepKind::Reused { diff: d }));
                }
            }
            diff = Some(d);
        }

        let (img_f, txt_f) = (sf.img.clone(), sf.txt.clone());
        let sm = model.run_blocks(sf, &ctx, f..n - b)?;
        let mi = (&sm.img - &img_f)?;
        let mt = (&sm.txt - &txt_f)?;
        if self.s.taylor > 0 {
            let f32 = candle_core::DType::F32;
            self.history.0.update(pos.t, mi.to_dtype(f32)?)?;
            self.history.1.update(pos.t, mt.to_dtype(f32)?)?;
        }
        self.middle = Some((mi, mt));
        self.probe_ref = Some(r);
        self.in_a_row = 0;
        let s = model.run_blocks(sm, &ctx, n - b..n)?;
        let v = model.final_layer(&s.img, &ctx)?;
        Ok((v, StepKind::Computed { diff }))
    }
}
