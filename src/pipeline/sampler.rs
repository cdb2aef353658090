//! The denoising loop: flow-matching Euler steps over a timestep schedule, asking a cache policy
//! for each step's velocity. This is the one place a cache policy hooks into sampling.

use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

use super::cache::{CachePolicy, CacheStats, StepKind, StepPos};
use crate::model::family::{Denoiser, PosEmbed, StepInput};
use crate::Result;

/// Text conditioning for one image.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// T5 tokens (1, L, context_in_dim).
    pub txt: Tensor,
    /// Pooled CLIP vector (1, vec_in_dim).
    pub y: Tensor,
}

/// What the loop reports after each step.
#[derive(Debug)]
pub struct StepInfo<'a> {
    /// 0-based step index.
    pub index: usize,
    pub total: usize,
    /// Time before and after this step.
    pub t: f64,
    pub t_next: f64,
    pub kind: StepKind,
    pub elapsed: Duration,
    /// The part of `elapsed` the host spent queueing the step's work before it waited for the
    /// device at the step's end: close to `elapsed` means the host, not the GPU, sets the pace.
    /// (With First Block Cache on, the host also waits mid-step for the cache decision, so
    /// `queued` then includes device time.)
    pub queued: Duration,
    /// The packed latent after this step (1, N, 64), f32.
    pub latent: &'a Tensor,
}

/// Run Euler steps from `x` (packed noise, (1, N, 64)) along `timesteps`.
///
/// `on_step` sees every step and may stop the loop by returning an error (e.g.
/// [`crate::Error::Cancelled`]). The latent is kept in f32 between steps whatever the model's dtype.
#[allow(clippy::too_many_arguments)]
pub fn denoise(
    model: &dyn Denoiser,
    cond: &Conditioning,
    pe: &PosEmbed,
    x: Tensor,
    timesteps: &[f64],
    guidance: Option<f64>,
    policy: &mut dyn CachePolicy,
    on_step: &mut dyn FnMut(&StepInfo) -> Result<()>,
) -> Result<(Tensor, CacheStats)> {
    denoise_cfg(
        model, cond, pe, x, timesteps, guidance, policy, None, on_step,
    )
}

/// True classifier-free guidance: `v = v_neg + scale * (v_pos - v_neg)` each step, with the
/// negative prompt's branch computed here or on another group of workers.
pub enum TrueCfg<'a> {
    /// Both branches on this worker, one after the other (each with its own cache policy).
    Local {
        neg: &'a Conditioning,
        policy: &'a mut dyn CachePolicy,
        scale: f64,
    },
    /// This worker computes one branch (the `cond` given to [`denoise_cfg`]); `group` holds the
    /// two branches' workers (rank 0 positive, rank 1 negative) and exchanges the velocities.
    Split {
        group: &'a dyn crate::collective::Communicator,
        scale: f64,
    },
}

/// `v_neg + scale * (v_pos - v_neg)`, in f32.
fn combine(pos: &Tensor, neg: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let (pos, neg) = (pos.to_dtype(DType::F32)?, neg.to_dtype(DType::F32)?);
    &neg + ((&pos - &neg)? * scale)?
}

/// Fail with [`crate::Error::NonFinite`] when the latent after step `index` holds a NaN or an
/// infinity (`x - x` sums to exactly 0 over finite numbers only): such a latent decodes to a
/// black image, and every later step stays non-finite.
/// Whether each step is waited for and checked before the next is queued (the default).
/// `PARALLAX_BENCH_NO_STEP_SYNC=1` is a measurement switch for `bench` (issue 30: what the GPU
/// loses between steps, which a CUDA graph could not win back either): steps are queued back to
/// back and only the last is waited for and checked, so previews and per-step times are not
/// meaningful (a step's time is then its queueing time; the steps' sum is the loop's time).
fn step_sync() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("PARALLAX_BENCH_NO_STEP_SYNC").is_none())
}

fn check_finite(x: &Tensor, index: usize, total: usize) -> Result<()> {
    #[allow(clippy::eq_op)] // `x - x` is the point: exactly 0 over finite numbers only
    let zero = (x - x)?.sum_all()?.to_scalar::<f32>()?;
    if zero == 0.0 {
        Ok(())
    } else {
        Err(crate::Error::NonFinite {
            step: index + 1,
            total,
        })
    }
}

/// [`denoise`] with optional true CFG.
#[allow(clippy::too_many_arguments)]
pub fn denoise_cfg(
    model: &dyn Denoiser,
    cond: &Conditioning,
    pe: &PosEmbed,
    x: Tensor,
    timesteps: &[f64],
    guidance: Option<f64>,
    policy: &mut dyn CachePolicy,
    cfg: Option<TrueCfg>,
    on_step: &mut dyn FnMut(&StepInfo) -> Result<()>,
) -> Result<(Tensor, CacheStats)> {
    denoise_blended(
        model, cond, pe, x, timesteps, guidance, policy, cfg, None, None, on_step,
    )
}

/// [`denoise_cfg`] with inpainting's blend after every step (see [`super::img2img::Blend`]),
/// and a FLUX.1 Fill checkpoint's conditioning `fill` ((B, N, C), the same every step) joined
/// after the latent's channels in every step's input.
#[allow(clippy::too_many_arguments)]
pub fn denoise_blended(
    model: &dyn Denoiser,
    cond: &Conditioning,
    pe: &PosEmbed,
    mut x: Tensor,
    timesteps: &[f64],
    guidance: Option<f64>,
    policy: &mut dyn CachePolicy,
    mut cfg: Option<TrueCfg>,
    blend: Option<&super::img2img::Blend>,
    fill: Option<&Tensor>,
    on_step: &mut dyn FnMut(&StepInfo) -> Result<()>,
) -> Result<(Tensor, CacheStats)> {
    let dev = model.device();
    let dtype = model.dtype();
    let b = x.dim(0)?;
    policy.reset();
    let mut stats = CacheStats::default();
    let g = match (model.text_spec().guidance_embed, guidance) {
        (true, Some(g)) => Some(Tensor::full(g as f32, b, dev)?),
        (true, None) => Some(Tensor::full(3.5f32, b, dev)?),
        (false, _) => None,
    };
    let txt = cond.txt.to_dtype(dtype)?;
    let y = cond.y.to_dtype(dtype)?;
    let neg = match &mut cfg {
        Some(TrueCfg::Local { neg, policy, .. }) => {
            policy.reset();
            Some((neg.txt.to_dtype(dtype)?, neg.y.to_dtype(dtype)?))
        }
        _ => None,
    };
    let fill = match fill {
        Some(f) => Some(f.to_device(dev)?.to_dtype(dtype)?),
        None => None,
    };
    let total = timesteps.len().saturating_sub(1);
    x = x.to_dtype(DType::F32)?;
    for i in 0..total {
        let start = Instant::now();
        let (t, t_next) = (timesteps[i], timesteps[i + 1]);
        let tt = Tensor::full(t as f32, b, dev)?;
        let xin = match &fill {
            Some(f) => Tensor::cat(&[&x.to_dtype(dtype)?, f], 2)?,
            None => x.to_dtype(dtype)?,
        };
        let input = StepInput {
            img: &xin,
            txt: &txt,
            y: &y,
            timesteps: &tt,
            guidance: g.as_ref(),
            pe,
        };
        let pos = StepPos {
            index: i,
            total,
            t,
            t_prev: i.checked_sub(1).map(|j| timesteps[j]),
        };
        let (v, kind) = policy.predict(model, &input, pos)?;
        let v = match (&mut cfg, &neg) {
            (Some(TrueCfg::Local { policy, scale, .. }), Some((ntxt, ny))) => {
                let input = StepInput {
                    txt: ntxt,
                    y: ny,
                    ..input.clone()
                };
                let (vn, _) = policy.predict(model, &input, pos)?;
                combine(&v, &vn, *scale)?
            }
            (Some(TrueCfg::Split { group, scale }), _) => {
                let both = group.all_gather(&v.contiguous()?, 0)?;
                combine(&both.narrow(0, 0, b)?, &both.narrow(0, b, b)?, *scale)?
            }
            _ => v,
        };
        x = (&x + (v.to_dtype(DType::F32)? * (t_next - t))?)?;
        if let Some(b) = blend {
            x = b.apply(&x, t_next)?;
        }
        let queued = start.elapsed();
        // Between steps, not inside one: so the reported step time is the device's, and the
        // latent handed to `on_step` is ready. `bench` can leave all but the last step unwaited
        // (see [`step_sync`]) to measure what the wait costs.
        if step_sync() || i + 1 == total {
            crate::device::synchronize(dev)?;
            check_finite(&x, i, total)?;
        }
        stats.record(kind);
        on_step(&StepInfo {
            index: i,
            total,
            t,
            t_next,
            kind,
            elapsed: start.elapsed(),
            queued,
            latent: &x,
        })?;
    }
    Ok((x, stats))
}
