//! `parallax fp8-error`: what FP8 costs each group of the transformer's layers. One image is
//! denoised in the model's own precision; at three of its steps (first, middle, last) the velocity
//! is computed again with FP8 products in one group of layers at a time (the double blocks'
//! attention projections, their MLPs, the single blocks' linear1, their linear2) and in all of
//! them, then with FP8 attention (scores from E4M3 queries and keys, `--fp8-attention`) alone and
//! beside all the products, and the relative error `|v_fp8 - v| / |v|` is reported per group,
//! as JSON.

use clap::Args;

use super::{request_for, ModelArgs, SampleArgs};
use crate::model::flux::{Flux, FluxInput, Fp8Groups};

#[derive(Debug, Clone, Args)]
pub struct Fp8ErrorArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sample: SampleArgs,
}

fn rel(a: &candle_core::Tensor, b: &candle_core::Tensor) -> anyhow::Result<f64> {
    Ok(crate::pipeline::metrics::relative_error(a, b)?)
}
/// The velocity `f` predicts at time `t` for the latent `x`, with `job`'s conditioning.
pub(crate) fn velocity_at(
    f: &Flux,
    job: &crate::pipeline::DenoiseJob,
    t: f64,
    x: &candle_core::Tensor,
) -> anyhow::Result<candle_core::Tensor> {
    let dev = f.device();
    let dtype = f.dtype();
    let (txt, y) = (job.cond.txt.to_dtype(dtype)?, job.cond.y.to_dtype(dtype)?);
    let g = candle_core::Tensor::full(job.guidance as f32, 1, dev)?;
    let xin = x.to_dtype(dtype)?;
    let tt = candle_core::Tensor::full(t as f32, 1, dev)?;
    let input = FluxInput {
        img: &xin,
        txt: &txt,
        y: &y,
        timesteps: &tt,
        guidance: f.config().guidance_embed.then_some(&g),
        pe: &job.pe,
    };
    Ok(f.forward(&input)?)
}

/// The latents entering the first, middle and last steps of `job` denoised by `f` in its own
/// precision, with their times.
pub(crate) fn three_step_inputs(
    f: &Flux,
    job: &crate::pipeline::DenoiseJob,
) -> anyhow::Result<Vec<(f64, candle_core::Tensor)>> {
    let total = job.timesteps.len().saturating_sub(1);
    if total == 0 {
        anyhow::bail!("needs at least one step");
    }
    let picks = [0, total / 2, total - 1];
    let mut inputs = vec![(job.timesteps[0], job.x.clone())];
    job.denoise_with(f, &mut crate::pipeline::cache::NoCache, &mut |s| {
        if picks.contains(&(s.index + 1)) {
            inputs.push((s.t_next, s.latent.clone()));
        }
        Ok(())
    })?;
    Ok(inputs)
}

pub fn run(a: Fp8ErrorArgs) -> anyhow::Result<()> {
    use crate::engine::Precision;
    let mut choice = a.model.choice();
    if choice.precision != Precision::Native || choice.fp8_attention {
        anyhow::bail!(
            "fp8-error compares FP8 against the native precision: leave out --precision and \
             --fp8-attention"
        );
    }
    choice.precision = Precision::Native;
    let p = crate::engine::load_pipeline(&choice, &a.model.device)?;
    let flux = p.flux1("the FP8 error measure")?.flux;
    let req = request_for(p.is_demo(), &a.sample);
    let prep = p.prepare(&req, &mut |_| Ok(()))?;
    let job = &prep.job;
    let inputs = three_step_inputs(flux, job)?;
    let dtype = flux.dtype();
    let velocity = |f: &Flux, t: f64, x: &candle_core::Tensor| velocity_at(f, job, t, x);
    let reference: Vec<_> = inputs
        .iter()
        .map(|(t, x)| velocity(flux, *t, x))
        .collect::<anyhow::Result<_>>()?;
    let mut rows = Vec::new();
    let attention = [
        ("attention scores (--fp8-attention)", Fp8Groups::NONE, true),
        (
            "all products + attention scores (--precision fp8 --fp8-attention)",
            Fp8Groups::ALL,
            true,
        ),
    ];
    let each = Fp8Groups::each().into_iter().map(|(n, g)| (n, g, false));
    for (name, groups, fp8_attention) in each.chain(attention) {
        let f = flux
            .clone()
            .with_fp8_in(groups)?
            .with_fp8_attention(fp8_attention);
        let errs = inputs
            .iter()
            .zip(&reference)
            .map(|((t, x), v)| rel(&velocity(&f, *t, x)?, v))
            .collect::<anyhow::Result<Vec<f64>>>()?;
        rows.push(serde_json::json!({
            "group": name,
            "relative_error": errs.iter().sum::<f64>() / errs.len() as f64,
            "per_step": inputs.iter().map(|(t, _)| t).zip(&errs)
                .map(|(t, e)| serde_json::json!({"t": t, "relative_error": e})).collect::<Vec<_>>(),
            "fp8_kernels": f.fp8_kernels(),
            "fp8_attention": fp8_attention,
        }));
    }
    let report = serde_json::json!({
        "model": a.model.model,
        "device": a.model.device,
        "dtype": format!("{dtype:?}").to_lowercase(),
        "width": prep.settings.width,
        "height": prep.settings.height,
        "steps": job.timesteps.len().saturating_sub(1),
        "prompt": prep.settings.prompt,
        "seed": prep.settings.seed,
        "groups": rows,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
