//! `parallax displaced-error`: how far the stale-activation methods land from the exact result.
//! One image's denoising loop runs on one device, then again as `N` displaced ranks, or as
//! PipeFusion over `N` stages (in-process worker threads sharing the device, their K/V and
//! activations exchanged through memory: one GPU stands in for N, which is enough to check
//! correctness) after `W` exact warm-up steps; reported per cell: the relative error of
//! the final latent `|x - x₁| / |x₁|`, as JSON, with each PipeFusion stage's weight and K/V
//! bytes. On a trained model `parallax score --displaced / --pipefusion` measures the image.

use std::sync::Arc;

use clap::Args;

use super::{request_for, ModelArgs, SampleArgs};
use crate::collective::Communicator;
use crate::parallel::comm::{run_local, LocalComm};
use crate::parallel::displaced::DisplacedAttention;
use crate::parallel::pipefusion::{stage_blocks, PipeFusion, StageBalance};

#[derive(Debug, Clone, Args)]
pub struct DisplacedErrorArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sample: SampleArgs,
    /// Displaced cells as `N:W` (ranks : exact warm-up steps), separated by `,` (`""` for none).
    #[arg(long, value_delimiter = ',', default_value = "2:1,4:1,4:4")]
    pub cells: Vec<String>,
    /// PipeFusion cells as `N:M:W` (stages : patches : warm-up steps), separated by `,`.
    #[arg(long, value_delimiter = ',', value_parser = super::score::parse_pipefusion)]
    pub pipefusion: Vec<(usize, usize, usize)>,
    /// Ulysses ranks inside each PipeFusion stage (N x U ranks in all; U must divide the heads).
    #[arg(long, default_value_t = 1)]
    pub pipefusion_ulysses: usize,
}

/// One cell: displaced patches (ranks, warm-up) or PipeFusion (stages, patches, warm-up).
#[derive(Debug, Clone, Copy)]
enum Cell {
    Displaced(usize, usize),
    PipeFusion(usize, usize, usize),
}

impl Cell {
    fn ranks(&self) -> usize {
        match *self {
            Cell::Displaced(n, _) | Cell::PipeFusion(n, _, _) => n,
        }
    }
}

fn rel(a: &candle_core::Tensor, b: &candle_core::Tensor) -> anyhow::Result<f64> {
    Ok(crate::pipeline::metrics::relative_error(a, b)?)
}
/// The transformer of `p` again on a device handle of its own.
fn flux_replica(
    p: &crate::pipeline::Pipeline,
    model: &ModelArgs,
) -> anyhow::Result<crate::model::flux::Flux> {
    if p.synthetic && p.variant != crate::model::layout::Variant::Demo {
        let dev = crate::device::parse(&model.device)?;
        let flux = p.flux1("the displaced-patch error measure")?.flux;
        return Ok(crate::pipeline::random_transformer(
            flux.config(),
            flux.dtype(),
            &dev,
            Default::default(),
        )?);
    }
    let p = crate::engine::load_pipeline(&model.choice(), &model.device)?;
    Ok(p.flux1("the displaced-patch error measure")?.flux.clone())
}

pub fn run(a: DisplacedErrorArgs) -> anyhow::Result<()> {
    let cells = a
        .cells
        .iter()
        .filter(|c| !c.trim().is_empty())
        .map(|c| {
            let (n, w) = c
                .split_once(':')
                .ok_or_else(|| anyhow::anyhow!("--cells: `{c}` is not N:W"))?;
            let n: usize = n.trim().parse()?;
            let w: usize = w.trim().parse()?;
            if n < 2 {
                anyhow::bail!("--cells: `{c}`: displaced patches need 2 ranks or more");
            }
            Ok(Cell::Displaced(n, w))
        })
        .chain(
            a.pipefusion
                .iter()
                .map(|&(n, m, w)| Ok(Cell::PipeFusion(n, m, w))),
        )
        .collect::<anyhow::Result<Vec<_>>>()?;
    let p = crate::engine::load_pipeline(&a.model.choice(), &a.model.device)?;
    let flux = p.flux1("the displaced-patch error measure")?.flux;
    let req = request_for(p.is_demo(), &a.sample);
    let prep = p.prepare(&req, &mut |_| Ok(()))?;
    let job = &prep.job;
    let t0 = std::time::Instant::now();
    let (reference, _) = crate::pipeline::denoise(flux, job, None, &mut |_| Ok(()))?;
    let one_ms = t0.elapsed().as_secs_f64() * 1e3;
    // The ranks' threads queue on streams of their own: the job must be written first.
    crate::device::synchronize(p.device())?;
    // On a GPU every rank needs a device handle of its own (candle's handles carry cuBLAS
    // workspaces two threads must not share) and a transformer on it with the same weights: for
    // random models drawn again from the same seed (only the transformer, so four ranks fit one
    // GPU), else the whole pipeline loaded again. On the CPU they share the model.
    // (PipeFusion's stages load theirs per cell below, each keeping only its blocks.)
    let most = cells
        .iter()
        .filter(|c| matches!(c, Cell::Displaced(..)))
        .map(Cell::ranks)
        .max()
        .unwrap_or(0);
    let replicas: Vec<(crate::model::flux::Flux, crate::pipeline::DenoiseJob)> =
        if p.device().is_cpu() {
            Vec::new()
        } else {
            (0..most)
                .map(|r| {
                    let flux = flux_replica(&p, &a.model)?;
                    let rjob = crate::parallel::ranks::job_on(job, flux.device())?;
                    crate::device::synchronize(flux.device())?;
                    tracing::info!(rank = r, "replica loaded");
                    Ok((flux, rjob))
                })
                .collect::<anyhow::Result<_>>()?
        };
    let mut rows = Vec::new();
    for cell in cells {
        let t0 = std::time::Instant::now();
        let n = cell.ranks();
        let uly = a.pipefusion_ulysses.max(1);
        let world = match cell {
            Cell::PipeFusion(..) => n * uly,
            Cell::Displaced(..) => n,
        };
        let refresh = LocalComm::group(n);
        // PipeFusion's groups: rank s * U + u is stage s's Ulysses rank u.
        let pipes: Vec<Vec<LocalComm>> = (0..uly).map(|_| LocalComm::group(n)).collect();
        let ulys: Vec<Vec<LocalComm>> = (0..n).map(|_| LocalComm::group(uly)).collect();
        tracing::info!(?cell, "cell");
        let stages: Vec<(crate::model::flux::Flux, crate::pipeline::DenoiseJob)> = match cell {
            Cell::PipeFusion(..) if !p.device().is_cpu() => (0..world)
                .map(|r| {
                    let blocks = stage_blocks(flux.config().num_blocks(), n, r / uly);
                    let flux = flux_replica(&p, &a.model)?.only_blocks(blocks);
                    let sjob = crate::parallel::ranks::job_on(job, flux.device())?;
                    crate::device::synchronize(flux.device())?;
                    Ok((flux, sjob))
                })
                .collect::<anyhow::Result<_>>()?,
            _ => Vec::new(),
        };
        let outs = run_local(world, |rank, comm| {
            let own = match cell {
                Cell::PipeFusion(..) => stages.get(rank),
                Cell::Displaced(..) => replicas.get(rank),
            };
            let (flux, job) = own.map_or((flux, job), |(f, j)| (f, j));
            crate::device::bind_thread(flux.device())
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            tracing::debug!(rank, "rank bound to its device");
            let comm: Arc<dyn Communicator> = Arc::new(comm);
            let mut displaced = None;
            let model: Box<dyn crate::model::family::Denoiser> = match cell {
                Cell::Displaced(_, w) => {
                    let attn = Arc::new(
                        DisplacedAttention::new(comm.clone(), Arc::new(refresh[rank].clone()), w)?
                            .with_fp8_scores(flux.attention().fp8_scores()),
                    );
                    displaced = Some(attn.clone());
                    Box::new(crate::parallel::sp::replica(flux, comm, attn))
                }
                Cell::PipeFusion(_, m, w) => {
                    let (s, u) = (rank / uly, rank % uly);
                    Box::new(PipeFusion::replica_in(
                        flux,
                        Arc::new(pipes[u][s].clone()),
                        (uly > 1).then(|| Arc::new(ulys[s][u].clone()) as Arc<dyn Communicator>),
                        m,
                        w,
                        StageBalance::Work,
                    )?)
                }
            };
            let (x, _) = crate::pipeline::denoise(model.as_ref(), job, None, &mut |info| {
                tracing::debug!(rank, step = info.index, "step done");
                Ok(())
            })
            .map_err(|e| candle_core::Error::Msg(format!("rank {rank}: {e}")))?;
            if let Some(attn) = displaced {
                attn.flush()?;
            }
            let x = x.copy()?;
            x.device().synchronize()?;
            Ok((x, model.weight_bytes(), model.held_blocks()))
        })?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let errs = outs
            .iter()
            .map(|(x, _, _)| rel(&x.to_device(reference.device())?, &reference))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let worst = errs.iter().copied().fold(0.0, f64::max);
        rows.push(match cell {
            Cell::Displaced(n, w) => serde_json::json!({
                "method": "displaced",
                "ranks": n,
                "warmup_steps": w,
                "relative_error": worst,
                "ms": ms,
            }),
            Cell::PipeFusion(n, m, w) => serde_json::json!({
                "method": "pipefusion",
                "stages": n,
                "ulysses": uly,
                "patches": m,
                "warmup_steps": w,
                "relative_error": worst,
                "ms": ms,
                "stage_blocks": outs.iter().map(|(_, _, b)| format!("{}..{}", b.start, b.end)).collect::<Vec<_>>(),
                "stage_weight_bytes": outs.iter().map(|(_, b, _)| *b).collect::<Vec<_>>(),
                "one_device_weight_bytes": flux.weight_bytes(),
            }),
        });
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "model": p.label,
            "device": crate::device::describe(p.device()),
            "dtype": format!("{:?}", flux.dtype()),
            "width": prep.settings.width,
            "height": prep.settings.height,
            "steps": prep.settings.steps,
            "one_device_ms": one_ms,
            "cells": rows,
        }))?
    );
    Ok(())
}
