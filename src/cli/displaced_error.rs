//! `parallax displaced-error`: how far displaced patch parallelism lands from the exact result.
//! One image's denoising loop runs on one device, then again as `N` displaced ranks (in-process
//! worker threads sharing the device and the model's weights, their K/V exchanged through memory:
//! one GPU stands in for N, as the issue allows for checking correctness) after `W` exact
//! warm-up steps; reported per (N, W): the relative error of the final latent `|x - x₁| / |x₁|`,
//! as JSON. On a trained model `parallax score --displaced` measures the image instead.

use std::sync::Arc;

use clap::Args;

use super::{request_for, ModelArgs, SampleArgs};
use crate::collective::Communicator;
use crate::parallel::comm::{run_local, LocalComm};
use crate::parallel::displaced::DisplacedAttention;

#[derive(Debug, Clone, Args)]
pub struct DisplacedErrorArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sample: SampleArgs,
    /// Cells as `N:W` (ranks : exact warm-up steps), separated by `,`.
    #[arg(long, value_delimiter = ',', default_value = "2:1,4:1,4:4")]
    pub cells: Vec<String>,
}

fn rel(a: &candle_core::Tensor, b: &candle_core::Tensor) -> anyhow::Result<f64> {
    Ok(crate::pipeline::metrics::relative_error(a, b)?)
}
pub fn run(a: DisplacedErrorArgs) -> anyhow::Result<()> {
    let cells = a
        .cells
        .iter()
        .map(|c| {
            let (n, w) = c
                .split_once(':')
                .ok_or_else(|| anyhow::anyhow!("--cells: `{c}` is not N:W"))?;
            let n: usize = n.trim().parse()?;
            let w: usize = w.trim().parse()?;
            if n < 2 {
                anyhow::bail!("--cells: `{c}`: displaced patches need 2 ranks or more");
            }
            Ok((n, w))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let p = crate::engine::load_pipeline(&a.model.choice(), &a.model.device)?;
    let req = request_for(p.is_demo(), &a.sample);
    let prep = p.prepare(&req, &mut |_| Ok(()))?;
    let job = &prep.job;
    let t0 = std::time::Instant::now();
    let (reference, _) = crate::pipeline::denoise(&p.flux, job, None, &mut |_| Ok(()))?;
    let one_ms = t0.elapsed().as_secs_f64() * 1e3;
    // The ranks' threads queue on streams of their own: the job must be written first.
    crate::device::synchronize(p.device())?;
    // On a GPU every rank needs a device handle of its own (candle's handles carry cuBLAS
    // workspaces two threads must not share) and a replica of the transformer on it, loaded the
    // same way (random weights are drawn again from the same seed); on the CPU they share.
    let most = cells.iter().map(|c| c.0).max().unwrap_or(1);
    let replicas: Vec<(crate::model::flux::Flux, crate::pipeline::DenoiseJob)> =
        if p.device().is_cpu() {
            Vec::new()
        } else {
            (0..most)
                .map(|_| {
                    let r = crate::engine::load_pipeline(&a.model.choice(), &a.model.device)?;
                    let rjob = crate::parallel::engine::job_on(job, r.device())?;
                    crate::device::synchronize(r.device())?;
                    Ok((r.flux, rjob))
                })
                .collect::<anyhow::Result<_>>()?
        };
    let mut rows = Vec::new();
    for (n, w) in cells {
        let t0 = std::time::Instant::now();
        let refresh = LocalComm::group(n);
        let outs = run_local(n, |rank, comm| {
            let (flux, job) = replicas.get(rank).map_or((&p.flux, job), |(f, j)| (f, j));
            crate::device::bind_thread(flux.device())
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            let comm: Arc<dyn Communicator> = Arc::new(comm);
            let attn = Arc::new(DisplacedAttention::new(
                comm.clone(),
                Arc::new(refresh[rank].clone()),
                w,
            )?);
            let model = crate::parallel::sp::replica(flux, comm, attn.clone());
            let (x, _) = crate::pipeline::denoise(&model, job, None, &mut |_| Ok(()))
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            attn.flush()?;
            let x = x.copy()?;
            x.device().synchronize()?;
            Ok(x)
        })?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let errs = outs
            .iter()
            .map(|x| rel(&x.to_device(reference.device())?, &reference))
            .collect::<anyhow::Result<Vec<_>>>()?;
        rows.push(serde_json::json!({
            "ranks": n,
            "warmup_steps": w,
            "relative_error": errs.iter().copied().fold(0.0, f64::max),
            "ms": ms,
        }));
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "model": p.label,
            "device": crate::device::describe(p.device()),
            "dtype": format!("{:?}", p.flux.dtype()),
            "width": prep.settings.width,
            "height": prep.settings.height,
            "steps": prep.settings.steps,
            "one_device_ms": one_ms,
            "cells": rows,
        }))?
    );
    Ok(())
}
