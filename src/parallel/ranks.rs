//! The ranks' loop (named apart from [`crate::engine`], which places work on devices): one
//! image's denoising spread over a mesh of ranks, each a thread standing in for a GPU on the CPU
//! or driving one over NCCL. Text encoding, noise and decoding happen once, on the calling thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use candle_core::{Device, Tensor};

use super::comm::{Communicator, LocalComm};
use super::mesh::{Axis, Mesh, ParallelLayout, Stale};
use super::usp::UspAttention;
use crate::error::{Error, Result};
use crate::model::family::{BandDecoder, Denoiser};
use crate::pipeline::cache::{CacheStats, StepKind};
use crate::pipeline::sampler::{self, StepInfo};
use crate::pipeline::{GenerateRequest, Generated, Pipeline, Progress};

/// Makes one group's communicators for the members that live here: given the axis name
/// (`world`, `sp`, `ulysses`, `ring`, `cfg`), the group's global ranks and those of them that are
/// local, one communicator per local member, in that order.
pub type MakeGroup<'a> =
    dyn FnMut(&str, &[usize], &[usize]) -> Result<Vec<Arc<dyn Communicator>>> + 'a;

/// The one group builder: the [`RankGroups`] of each rank in `local` (in that order) over
/// `mesh`, each group's communicators made by `make`. In-process ranks pass every rank as local
/// and get whole groups at once; a worker process passes its own rank and joins each of its
/// groups by name.
pub fn rank_groups(mesh: &Mesh, local: &[usize], make: &mut MakeGroup) -> Result<Vec<RankGroups>> {
    let n = mesh.world();
    let mut by_axis =
        |name: &str, groups: Vec<Vec<usize>>| -> Result<Vec<Option<Arc<dyn Communicator>>>> {
            let mut out: Vec<Option<Arc<dyn Communicator>>> = vec![None; n];
            for group in groups {
                let here: Vec<usize> = group
                    .iter()
                    .copied()
                    .filter(|r| local.contains(r))
                    .collect();
                if here.is_empty() {
                    continue;
                }
                for (comm, rank) in make(name, &group, &here)?.into_iter().zip(here) {
                    out[rank] = Some(comm);
                }
            }
            Ok(out)
        };
    let mut sp_groups: Vec<Vec<usize>> = Vec::new();
    for r in 0..n {
        let g = mesh.sp_group(r);
        if !sp_groups.contains(&g) {
            sp_groups.push(g);
        }
    }
    let mut world = by_axis("world", vec![(0..n).collect()])?;
    let mut sp = by_axis("sp", sp_groups.clone())?;
    // Displaced patches gather in the background over a second communicator of the same ranks.
    let mut refresh = if mesh.layout().is_displaced() {
        by_axis("sp-refresh", sp_groups)?
    } else {
        vec![None; n]
    };
    let mut uly = by_axis("ulysses", mesh.groups(Axis::Ulysses))?;
    let mut ring = by_axis("ring", mesh.groups(Axis::Ring))?;
    let mut cfg = by_axis("cfg", mesh.groups(Axis::Cfg))?;
    let mut pipe = by_axis("pipe", mesh.groups(Axis::Pipeline))?;
    local
        .iter()
        .map(|&r| {
            let missing = || Error::rank(r, "while its groups were made", "it is in no group");
            let take = |v: &mut Vec<Option<Arc<dyn Communicator>>>| {
                v.get_mut(r).and_then(Option::take).ok_or_else(missing)
            };
            Ok(RankGroups {
                world: take(&mut world)?,
                refresh: refresh.get_mut(r).and_then(Option::take),
                sp: take(&mut sp)?,
                ulysses: take(&mut uly)?,
                ring: take(&mut ring)?,
                cfg: take(&mut cfg)?,
                pipe: take(&mut pipe)?,
            })
        })
        .collect()
}

/// In-process communicators ([`LocalComm`]) for every rank of `mesh`.
fn local_groups(mesh: &Mesh) -> Result<Vec<RankGroups>> {
    let all: Vec<usize> = (0..mesh.world()).collect();
    rank_groups(mesh, &all, &mut |_, g, _| {
        Ok(LocalComm::group(g.len())
            .into_iter()
            .map(|c| Arc::new(c) as Arc<dyn Communicator>)
            .collect())
    })
}

struct StepMsg {
    index: usize,
    total: usize,
    t: f64,
    t_next: f64,
    kind: StepKind,
    elapsed: Duration,
    queued: Duration,
    latent: Tensor,
}

/// Generate one image with its denoising loop spread over `layout`'s workers, as CPU threads.
/// The image equals [`Pipeline::generate`]'s within floating-point reordering.
pub fn generate(
    p: &Pipeline,
    layout: ParallelLayout,
    req: &GenerateRequest,
    progress: &mut dyn FnMut(Progress) -> Result<()>,
) -> Result<Generated> {
    if !p.device().is_cpu() {
        return Err(Error::setting(
            "devices",
            "cuda",
            "CPU worker threads share the pipeline's model; GPU workers use generate_on_gpus",
        ));
    }
    let mesh = check_layout(p, layout, req)?;
    let models = vec![p.denoiser_for(req)?; mesh.world()];
    let workers = mesh.world();
    generate_ranks(
        p,
        &mesh,
        &models,
        local_groups(&mesh)?,
        req,
        progress,
        &|vae, z| decode_parallel(vae, z, workers),
    )
}

fn check_layout(p: &Pipeline, layout: ParallelLayout, req: &GenerateRequest) -> Result<Mesh> {
    if layout.dp != 1 {
        return Err(Error::setting(
            "parallel layout",
            format!("dp {}", layout.dp),
            "one image runs on one data-parallel group; use generate_many for several images",
        ));
    }
    let mesh = Mesh::new(layout, layout.world(), p.denoiser().num_heads())?;
    if let Some(r) = super::refusal::check(layout, req, p.denoiser().num_blocks()) {
        return Err(r.into());
    }
    Ok(mesh)
}

/// One GPU per rank, one worker thread per GPU, NCCL between them. Rank r runs `models[r]` and
/// `vaes[r]` on `devices[r]`; rank 0's are the pipeline's own (on its device). Text encoding
/// stays on rank 0's GPU; an autoencoder with FLUX.1's kind of decoder (a [`BandDecoder`]:
/// FLUX.1's, klein's) decodes in row bands over every GPU (halo rows and GroupNorm statistics
/// through NCCL), the image gathered on rank 0's. `vaes` is empty for an autoencoder that is
/// none: it decodes on rank 0's GPU.
#[cfg(feature = "cuda")]
pub fn generate_on_gpus(
    p: &Pipeline,
    models: &[Arc<dyn Denoiser>],
    vaes: &[&dyn BandDecoder],
    devices: &[Device],
    layout: ParallelLayout,
    req: &GenerateRequest,
    progress: &mut dyn FnMut(Progress) -> Result<()>,
) -> Result<Generated> {
    let mesh = check_layout(p, layout, req)?;
    let banded = p.codec().band_decoder().is_some();
    if devices.len() != mesh.world()
        || models.len() != mesh.world()
        || (banded && vaes.len() != mesh.world())
    {
        return Err(Error::setting(
            "devices",
            format!("{} GPUs", devices.len()),
            format!("the layout needs {} (one per rank)", mesh.world()),
        ));
    }
    let all: Vec<usize> = (0..mesh.world()).collect();
    let groups = rank_groups(&mesh, &all, &mut |_, g, _| {
        let devs: Vec<Device> = g.iter().map(|&r| devices[r].clone()).collect();
        Ok(super::nccl::NcclComm::new_group(&devs)?
            .into_iter()
            .map(|c| Arc::new(c) as Arc<dyn Communicator>)
            .collect())
    })?;
    // The world communicators outlive the denoising loop: the decode uses them.
    let worlds: Vec<Arc<dyn Communicator>> = groups.iter().map(|g| g.world.clone()).collect();
    let decode = |_: &dyn BandDecoder, z: &Tensor| -> Result<Tensor> {
        let comms: Vec<&dyn Communicator> = worlds.iter().map(|c| c.as_ref()).collect();
        Ok(super::vae::decode_across(vaes, &comms, z)?)
    };
    generate_ranks(p, &mesh, models, groups, req, progress, &decode)
}

/// A copy of `job` on `device` (every rank's inputs live on its own GPU).
pub fn job_on(
    job: &crate::pipeline::DenoiseJob,
    device: &Device,
) -> Result<crate::pipeline::DenoiseJob> {
    if job.x.device().same_device(device) {
        return Ok(job.clone());
    }
    let cond = |c: &sampler::Conditioning| -> Result<sampler::Conditioning> {
        Ok(sampler::Conditioning {
            txt: c.txt.to_device(device)?,
            y: c.y.to_device(device)?,
        })
    };
    Ok(crate::pipeline::DenoiseJob {
        cond: cond(&job.cond)?,
        neg: job.neg.as_ref().map(cond).transpose()?,
        pe: crate::model::flux::PosEmbed {
            cos: job.pe.cos.to_device(device)?,
            sin: job.pe.sin.to_device(device)?,
        },
        x: job.x.to_device(device)?,
        blend: job
            .blend
            .as_ref()
            .map(|b| b.to_device(device))
            .transpose()?,
        fill: job.fill.as_ref().map(|f| f.to_device(device)).transpose()?,
        ..job.clone()
    })
}

/// The denoising loop of one image over `mesh`: rank r runs `models[r]` with `groups[r]` on a
/// thread of its own; rank 0 reports progress; the image is decoded by `decode` (in row bands
/// over the workers where the autoencoder is a [`BandDecoder`]).
fn generate_ranks(
    p: &Pipeline,
    mesh: &Mesh,
    models: &[Arc<dyn Denoiser>],
    groups: Vec<RankGroups>,
    req: &GenerateRequest,
    progress: &mut dyn FnMut(Progress) -> Result<()>,
    decode: &crate::pipeline::LatentDecoder,
) -> Result<Generated> {
    let prep = p.prepare(req, progress)?;
    let mut log = crate::pipeline::StepLog::default();
    // candle queues each host thread's GPU work on that thread's own stream: the job's tensors
    // must be written before the rank threads read them.
    prep.job.x.device().synchronize()?;
    let (x, stats) = {
        let mut on_step = |info: &StepInfo| -> Result<()> {
            log.record(info);
            progress(Progress::Step(info))
        };
        run_ranks(mesh, models, groups, &prep.job, &mut on_step)?
    };
    p.finish(prep, x, stats, log, decode, progress)
}

/// What a rank thread tells the calling thread: rank 0's steps, then each rank's result.
enum RankMsg {
    Step(StepMsg),
    Done(usize, Result<(Tensor, CacheStats)>),
}

/// Run `job`'s denoising loop on one detached thread per rank of `mesh`, `on_step` seeing rank
/// 0's steps on the calling thread. The ranks' results are awaited with a deadline, not joined:
/// once a rank fails (a collective timing out on a stalled peer among the ways), every group is
/// aborted and the ranks still out get [`abandon_grace`] to come back; those that do not are left
/// running (recorded in [`super::abandoned`]) and the job fails at once with
/// [`Error::RanksAbandoned`], instead of hanging until they return.
fn run_ranks(
    mesh: &Mesh,
    models: &[Arc<dyn Denoiser>],
    groups: Vec<RankGroups>,
    job: &crate::pipeline::DenoiseJob,
    on_step: &mut dyn FnMut(&StepInfo) -> Result<()>,
) -> Result<(Tensor, CacheStats)> {
    let n = mesh.world();
    if groups.len() != n || models.len() != n {
        return Err(Error::runtime(
            "cannot start the ranks",
            format!(
                "{} ranks, {} communicator sets, {} models",
                n,
                groups.len(),
                models.len()
            ),
        ));
    }
    let cancel = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<RankMsg>();
    // The calling thread keeps a handle on every group, to abort them all when a rank fails.
    let handles: Vec<RankGroups> = groups.to_vec();
    let mut threads = Vec::with_capacity(n);
    for (rank, g) in groups.into_iter().enumerate() {
        let ended = Arc::new(AtomicBool::new(false));
        let spawned = spawn_rank(
            rank,
            models[rank].clone(),
            job.clone(),
            mesh.clone(),
            g,
            cancel.clone(),
            tx.clone(),
            ended.clone(),
        );
        match spawned {
            Ok(h) => threads.push((h, ended)),
            Err(e) => {
                for g in &handles {
                    g.abort("a rank thread could not start");
                }
                return Err(Error::rank(rank, "while its thread was started", e));
            }
        }
    }
    drop(tx);

    let mut done = vec![false; n];
    let mut rank0: Option<(Tensor, CacheStats)> = None;
    let mut progress_err: Option<Error> = None;
    // Each rank's failure; the lowest rank's is reported (as the others see it), a cancellation
    // only when nothing else failed.
    let mut errs: Vec<Option<Error>> = (0..n).map(|_| None).collect();
    // When the group was aborted: from then on the ranks still out have `grace` to return.
    let mut aborted_at: Option<std::time::Instant> = None;
    let grace = abandon_grace();
    while done.iter().any(|d| !d) {
        let msg = match aborted_at {
            None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
            Some(t) => {
                rx.recv_timeout((t + grace).saturating_duration_since(std::time::Instant::now()))
            }
        };
        match msg {
            Ok(RankMsg::Step(m)) => {
                let info = StepInfo {
                    index: m.index,
                    total: m.total,
                    t: m.t,
                    t_next: m.t_next,
                    kind: m.kind,
                    elapsed: m.elapsed,
                    queued: m.queued,
                    latent: &m.latent,
                };
                if progress_err.is_none() {
                    if let Err(e) = on_step(&info) {
                        cancel.store(true, Ordering::SeqCst);
                        progress_err = Some(e);
                    }
                }
            }
            Ok(RankMsg::Done(rank, r)) => {
                done[rank] = true;
                match r {
                    Ok(v) if rank == 0 => rank0 = Some(v),
                    Ok(_) => {}
                    Err(e) => {
                        if aborted_at.is_none() {
                            aborted_at = Some(std::time::Instant::now());
                            let why = format!("rank {rank} failed: {e}");
                            for g in &handles {
                                g.abort(&why);
                            }
                        }
                        errs[rank] = Some(e);
                    }
                }
            }
            // A rank thread that ended without a word (it panicked outside its guard), or the
            // grace ran out: the ranks still out are given up on.
            Err(_) => break,
        }
    }
    let missing: Vec<usize> = (0..n).filter(|&r| !done[r]).collect();
    let first_err = match errs
        .iter()
        .position(|e| matches!(e, Some(e) if !matches!(e, Error::Cancelled)))
    {
        Some(r) => errs.swap_remove(r),
        None => errs.into_iter().flatten().next(),
    };
    for (rank, (h, ended)) in threads.into_iter().enumerate() {
        if missing.contains(&rank) {
            // Detached: the thread runs on until it returns (then finds its groups aborted) or
            // the process ends.
            let device = crate::device::describe(models[rank].device());
            tracing::warn!(
                "rank {rank} (on {device}) did not return {:.1} s after its group was aborted: \
                 its thread is left behind",
                grace.as_secs_f64()
            );
            super::abandoned::record(rank, device, ended);
            drop(h);
        } else if h.join().is_err() {
            tracing::warn!("rank {rank}'s thread panicked after reporting");
        }
    }
    if let Some(e) = progress_err {
        return Err(e);
    }
    if !missing.is_empty() {
        return Err(Error::RanksAbandoned {
            ranks: missing,
            why: first_err.map_or_else(|| "the ranks stopped answering".into(), |e| e.to_string()),
        });
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    rank0.ok_or_else(|| Error::rank(0, "while denoising", "it returned no latent"))
}

/// How long the ranks still out get to return once their group is aborted before they are left
/// behind: the collective timeout (a rank that reaches no collective for that long is stuck),
/// at most 5 s (any rank that is not stuck sees the abort at its next collective).
fn abandon_grace() -> Duration {
    super::comm::collective_timeout().min(Duration::from_secs(5))
}

/// Start rank `rank`'s thread: its share of `job` with `groups`, rank 0 sending its steps, every
/// rank its result, on `tx`. `ended` turns true when the thread ends.
#[allow(clippy::too_many_arguments)]
fn spawn_rank(
    rank: usize,
    model: Arc<dyn Denoiser>,
    job: crate::pipeline::DenoiseJob,
    mesh: Mesh,
    groups: RankGroups,
    cancel: Arc<AtomicBool>,
    tx: mpsc::Sender<RankMsg>,
    ended: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("parallax-rank-{rank}"))
        .spawn(move || {
            let _ended = super::abandoned::Ended(ended);
            // A rank that fails or panics aborts its groups, so the others stop waiting for it
            // and report why.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let local_job = job_on(&job, model.device())
                    .map_err(|e| Error::rank(rank, "while copying the job's inputs", e))?;
                denoise_rank(
                    model.as_ref(),
                    &local_job,
                    &mesh,
                    rank,
                    &groups,
                    &|| cancel.load(Ordering::SeqCst),
                    &mut |info| {
                        let _ = tx.send(RankMsg::Step(StepMsg {
                            index: info.index,
                            total: info.total,
                            t: info.t,
                            t_next: info.t_next,
                            kind: info.kind,
                            elapsed: info.elapsed,
                            queued: info.queued,
                            latent: info.latent.clone(),
                        }));
                        Ok(())
                    },
                )
            }))
            .unwrap_or_else(|p| {
                let what = crate::error::panic_text(p.as_ref());
                Err(Error::rank(
                    rank,
                    "while denoising",
                    format!("it panicked: {what}"),
                ))
            });
            if let Err(e) = &r {
                if !matches!(e, Error::Cancelled) {
                    groups.abort(&format!("rank {rank} failed: {e}"));
                }
            }
            // Likewise the final latent before the calling thread decodes it (and on errors,
            // before the caller frees what this rank may still be reading).
            let synced = model.device().synchronize();
            let r = r.and_then(|out| {
                synced?;
                Ok(out)
            });
            let _ = tx.send(RankMsg::Done(rank, r));
        })
}

/// The communicators one rank uses: everyone (to agree on cancelling), its sequence-parallel
/// group, its Ulysses and ring groups, and its CFG pair. In-process ranks get [`LocalComm`]s,
/// ranks in separate processes [`super::store::StoreComm`]s (CPU) or NCCL communicators (GPU).
#[derive(Clone)]
pub struct RankGroups {
    pub world: Arc<dyn Communicator>,
    pub sp: Arc<dyn Communicator>,
    /// The sequence-parallel group again, for displaced patches' background gathers (only
    /// under a displaced layout).
    pub refresh: Option<Arc<dyn Communicator>>,
    pub ulysses: Arc<dyn Communicator>,
    pub ring: Arc<dyn Communicator>,
    pub cfg: Arc<dyn Communicator>,
    /// Its PipeFusion stages (itself alone without PipeFusion).
    pub pipe: Arc<dyn Communicator>,
}

impl RankGroups {
    /// Abort every group of this rank (see [`Communicator::abort`]).
    pub fn abort(&self, why: &str) {
        for c in [
            &self.world,
            &self.sp,
            &self.ulysses,
            &self.ring,
            &self.cfg,
            &self.pipe,
        ] {
            c.abort(why);
        }
        if let Some(r) = &self.refresh {
            r.abort(why);
        }
    }
}

/// One rank's share of the denoising loop of `job` over `mesh`: its sequence shard of every
/// step (Ulysses / ring attention through `groups`), its CFG branch when the mesh has a CFG pair.
/// Every rank returns the full final latent. `report` sees each step on rank 0 only; every step
/// all ranks agree (one all-reduce) on whether any of them was asked to `stop`.
#[allow(clippy::too_many_arguments)]
pub fn denoise_rank(
    model: &dyn Denoiser,
    job: &crate::pipeline::DenoiseJob,
    mesh: &Mesh,
    rank: usize,
    groups: &RankGroups,
    stop: &(dyn Fn() -> bool + Sync),
    report: &mut dyn FnMut(&StepInfo) -> Result<()>,
) -> Result<(Tensor, CacheStats)> {
    let layout = mesh.layout();
    let device = model.device().clone();
    let model: Box<dyn Denoiser> = match layout.stale {
        Stale::PipeFusion {
            patches,
            warmup,
            balance,
            ..
        } => Box::new(super::pipefusion::PipeFusion::replica_in(
            model,
            groups.pipe.clone(),
            (layout.ulysses > 1).then(|| groups.ulysses.clone()),
            patches,
            warmup,
            balance,
        )?),
        Stale::Exact | Stale::Displaced { .. } => {
            // The replica's own handle on the whole model (a shallow copy of its weights'
            // handles).
            let whole = model.keep_blocks(model.held_blocks());
            Box::new(sequence_replica(whole, mesh, groups)?)
        }
    };
    // With a CFG pair, this rank runs one branch and trades velocities with its twin.
    let cfg_pair =
        (mesh.layout().cfg == 2).then(|| (groups.cfg.as_ref(), mesh.coords(rank).cfg == 1));
    let fault = super::fault::Fault::from_env();
    crate::pipeline::denoise(model.as_ref(), job, cfg_pair, &mut |info| {
        if let Some(f) = &fault {
            f.strike(rank, info.index)?;
        }
        if rank == 0 {
            report(info)?;
        }
        // Every rank stops at the same step: agree on the stop flag.
        let flag = f32::from(stop());
        let any = groups
            .world
            .all_reduce_sum(&Tensor::new(&[flag], &device)?)?
            .to_vec1::<f32>()?;
        if any[0] > 0.0 {
            return Err(Error::Cancelled);
        }
        Ok(())
    })
}

/// The replica a rank of a sequence-parallel group runs: its shard through Ulysses x ring
/// attention, or displaced patches.
fn sequence_replica(
    model: Arc<dyn Denoiser>,
    mesh: &Mesh,
    groups: &RankGroups,
) -> Result<super::replica::SpReplica> {
    let rotate = matches!(mesh.layout().stale, Stale::Displaced { rotate: true, .. });
    // FP8 attention as the model was loaded: the strategies call the kernels themselves.
    let fp8 = model.fp8_attention();
    let attn: Arc<dyn crate::model::attention::Attention> = match mesh.layout().stale {
        Stale::Displaced { warmup, .. } => {
            let refresh = groups.refresh.clone().ok_or_else(|| {
                Error::runtime(
                    "cannot run displaced patches",
                    "no refresh communicator was made",
                )
            })?;
            let d = super::displaced::DisplacedAttention::new(groups.sp.clone(), refresh, warmup)?
                .with_fp8_scores(fp8);
            Arc::new(if rotate { d.rotating() } else { d })
        }
        Stale::Exact | Stale::PipeFusion { .. } => Arc::new(
            UspAttention::new(groups.ulysses.clone(), groups.ring.clone()).with_fp8_scores(fp8),
        ),
    };
    let mut replica = super::replica::SpReplica::new(model, groups.sp.clone(), attn);
    if rotate {
        replica = replica.with_patch_rotation();
    }
    Ok(replica)
}

/// Decode on `workers` CPU workers in row bands (unequal when the latent's rows do not divide),
/// or on one when there are fewer rows than workers.
fn decode_parallel(vae: &dyn BandDecoder, z: &Tensor, workers: usize) -> Result<Tensor> {
    let comms = LocalComm::group(workers);
    let comms: Vec<&dyn Communicator> = comms.iter().map(|c| c as &dyn Communicator).collect();
    Ok(super::vae::decode_across(&vec![vae; workers], &comms, z)?)
}

/// Data parallelism: generate every request of `reqs`, spreading them over `layout.dp` groups
/// of workers that run at the same time (each group with `layout`'s other degrees, or one worker).
/// Group g takes requests g, g + dp, ... in turn; results come back in request order. A cache
/// threshold sweep for the compare view is `reqs` differing only in `cache_threshold`.
pub fn generate_many(
    p: &Pipeline,
    layout: ParallelLayout,
    reqs: &[GenerateRequest],
) -> Vec<Result<Generated>> {
    if !p.device().is_cpu() {
        // Groups would share the one GPU pipeline's handles from several threads at once.
        return reqs
            .iter()
            .map(|_| {
                Err(Error::setting(
                    "devices",
                    "cpu:N",
                    "CPU worker threads share the pipeline's model, which is on a GPU: use --devices cuda:... for data parallelism on GPUs",
                ))
            })
            .collect();
    }
    let inner = ParallelLayout { dp: 1, ..layout };
    over_groups(layout.dp, reqs, |_, req| {
        if inner.world() == 1 {
            p.generate(req, &mut |_| Ok(()))
        } else {
            generate(p, inner, req, &mut |_| Ok(()))
        }
    })
}

/// The denoising loops of `jobs`, prepared already (text encoded, noise drawn), for a model of
/// any family on CPU worker threads sharing `model`: `layout.dp` groups at once, each running its
/// jobs in turn over `layout`'s other degrees (the mesh, dp x cfg x sequence or pipeline
/// parallel). Results (every rank's final latent, rank 0's cache statistics) in job order.
/// The checks that need a request ([`super::refusal::check`]) are the caller's.
pub fn denoise_many(
    model: &Arc<dyn Denoiser>,
    layout: ParallelLayout,
    jobs: &[crate::pipeline::DenoiseJob],
) -> Vec<Result<(Tensor, CacheStats)>> {
    let inner = ParallelLayout { dp: 1, ..layout };
    let mesh = match Mesh::new(inner, inner.world(), model.num_heads()) {
        Ok(m) => m,
        Err(e) => {
            let why = e.to_string();
            return jobs
                .iter()
                .map(|_| {
                    Err(Error::setting(
                        "parallel layout",
                        format!("{} workers", layout.world()),
                        &why,
                    ))
                })
                .collect();
        }
    };
    over_groups(layout.dp, jobs, |_, job| {
        denoise_on_workers(model, &mesh, job, &mut |_| Ok(()))
    })
}

/// One job's denoising loop over `mesh` (one data-parallel group), one CPU worker thread per
/// rank, every rank running `model`; `on_step` sees rank 0's steps.
pub fn denoise_on_workers(
    model: &Arc<dyn Denoiser>,
    mesh: &Mesh,
    job: &crate::pipeline::DenoiseJob,
    on_step: &mut dyn FnMut(&StepInfo) -> Result<()>,
) -> Result<(Tensor, CacheStats)> {
    let models = vec![model.clone(); mesh.world()];
    run_ranks(mesh, &models, local_groups(mesh)?, job, on_step)
}

/// The scheduling of data parallelism, whatever a group runs on: `dp` groups at once, group g
/// making requests g, g + dp, ... with `make(g, request)`; results in request order. A group
/// that panics reports each of its requests as failed.
pub fn over_groups<R, T, F>(dp: usize, reqs: &[R], make: F) -> Vec<Result<T>>
where
    R: Sync,
    T: Send,
    F: Fn(usize, &R) -> Result<T> + Sync,
{
    let dp = dp.max(1);
    let make = &make;
    let mut slots: Vec<Option<Result<T>>> = (0..reqs.len()).map(|_| None).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..dp)
            .map(|g| {
                s.spawn(move || {
                    (g..reqs.len())
                        .step_by(dp)
                        .map(|i| (i, make(g, &reqs[i])))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        // A group that panicked leaves its slots empty; they are reported below.
        for done in handles.into_iter().filter_map(|h| h.join().ok()) {
            for (i, r) in done {
                slots[i] = Some(r);
            }
        }
    });
    slots
        .into_iter()
        .map(|s| {
            s.unwrap_or_else(|| {
                Err(Error::runtime(
                    "a data-parallel group",
                    "its thread panicked",
                ))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(threshold: f64) -> GenerateRequest {
        GenerateRequest {
            prompt: "a lighthouse at dawn".into(),
            width: 64,
            height: 64,
            steps: Some(4),
            seed: 21,
            cache_threshold: threshold,
            ..Default::default()
        }
    }

    fn layout(ring: usize, ulysses: usize) -> ParallelLayout {
        ParallelLayout {
            ring,
            ulysses,
            ..ParallelLayout::default()
        }
    }

    fn max_pixel_diff(a: &Generated, b: &Generated) -> u8 {
        a.image
            .data
            .iter()
            .zip(&b.image.data)
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap_or(255)
    }

    #[test]
    fn every_sequence_parallel_layout_matches_one_worker() -> Result<()> {
        let p = Pipeline::demo(&Device::Cpu)?;
        let one = p.generate(&req(0.0), &mut |_| Ok(()))?;
        // The demo model has 2 heads: Ulysses up to 2, Ring and USP for 4.
        for (ring, ulysses) in [(1, 2), (2, 1), (4, 1), (2, 2)] {
            let mut steps = 0;
            let g = generate(&p, layout(ring, ulysses), &req(0.0), &mut |ev| {
                if let Progress::Step(_) = ev {
                    steps += 1;
                }
                Ok(())
            })?;
            assert_eq!(
                steps, 4,
                "progress reported for ring {ring} ulysses {ulysses}"
            );
            let d = max_pixel_diff(&g, &one);
            assert!(
                d <= 1,
                "ring {ring} x ulysses {ulysses}: pixels differ by {d}"
            );
        }
        Ok(())
    }

    #[test]
    fn displaced_patches_are_exact_through_warm_up_and_close_after() -> Result<()> {
        let p = Pipeline::demo(&Device::Cpu)?;
        let r = GenerateRequest {
            prompt: "two small yellow stars above a green square, night sky".into(),
            width: 128,
            height: 128,
            steps: Some(8),
            ..req(0.0)
        };
        let one = p.generate(&r, &mut |_| Ok(()))?;
        for n in [2, 4] {
            let displaced = |warmup| ParallelLayout {
                ring: n,
                stale: Stale::Displaced {
                    warmup,
                    rotate: false,
                },
                ..ParallelLayout::default()
            };
            // Warm-up through every step: every forward gathers fresh K/V, the exact image.
            let g = generate(&p, displaced(8), &r, &mut |_| Ok(()))?;
            let d = max_pixel_diff(&g, &one);
            assert!(d <= 1, "displaced {n}, warm-up 8: pixels differ by {d}");
            // Two exact steps, then stale K/V: close to the exact image, not equal to it.
            let g = generate(&p, displaced(2), &r, &mut |_| Ok(()))?;
            let psnr = crate::pipeline::metrics::psnr(&g.image, &one.image)?;
            assert!(
                max_pixel_diff(&g, &one) > 1,
                "displaced {n}: stale K/V changed nothing"
            );
            assert!(psnr > 25.0, "displaced {n}, warm-up 2: {psnr:.1} dB");
        }
        // True CFG on one branch per rank would mix the branches' K/V: refused.
        let cfg = GenerateRequest {
            negative_prompt: Some("blurry".into()),
            true_cfg: Some(3.0),
            ..r
        };
        let l = ParallelLayout {
            ring: 2,
            stale: Stale::displaced(),
            ..ParallelLayout::default()
        };
        assert!(matches!(
            generate(&p, l, &cfg, &mut |_| Ok(())),
            Err(Error::InvalidSetting { .. })
        ));
        Ok(())
    }

    #[test]
    fn pipefusion_is_exact_through_warm_up_and_close_after() -> Result<()> {
        let p = Pipeline::demo(&Device::Cpu)?;
        let r = GenerateRequest {
            prompt: "two small yellow stars above a green square, night sky".into(),
            width: 128,
            height: 96,
            steps: Some(6),
            ..req(0.0)
        };
        let one = p.generate(&r, &mut |_| Ok(()))?;
        let pipe = |stages, patches, warmup| ParallelLayout {
            stale: Stale::PipeFusion {
                stages,
                patches,
                warmup,
                balance: super::super::pipefusion::StageBalance::Work,
            },
            ..ParallelLayout::default()
        };
        for (stages, patches) in [(2, 2), (2, 3), (4, 4)] {
            // Warm-up through every step: the stages take turns on the whole sequence.
            let mut steps = 0;
            let g = generate(&p, pipe(stages, patches, 6), &r, &mut |ev| {
                if let Progress::Step(_) = ev {
                    steps += 1;
                }
                Ok(())
            })?;
            assert_eq!(steps, 6);
            let d = max_pixel_diff(&g, &one);
            assert!(d <= 1, "pipefusion {stages}x{patches}, full warm-up: {d}");
            let g = generate(&p, pipe(stages, patches, 1), &r, &mut |_| Ok(()))?;
            let psnr = crate::pipeline::metrics::psnr(&g.image, &one.image)?;
            assert!(
                max_pixel_diff(&g, &one) > 1,
                "{stages}x{patches}: nothing stale"
            );
            assert!(
                psnr > 25.0,
                "pipefusion {stages}x{patches}, warm-up 1: {psnr:.1} dB"
            );
        }
        // Ulysses inside each stage (2 x 2 workers): exact through warm-up, and after it the
        // image of the same stages without Ulysses.
        let hybrid = |warmup| ParallelLayout {
            ulysses: 2,
            ..pipe(2, 2, warmup)
        };
        let g = generate(&p, hybrid(6), &r, &mut |_| Ok(()))?;
        assert!(max_pixel_diff(&g, &one) <= 1, "pipefusion 2 x ulysses 2");
        let plain = generate(&p, pipe(2, 2, 1), &r, &mut |_| Ok(()))?;
        let g = generate(&p, hybrid(1), &r, &mut |_| Ok(()))?;
        assert!(
            max_pixel_diff(&g, &plain) <= 1,
            "pipefusion 2 x ulysses 2, warm-up 1"
        );
        // Composed with CFG parallelism: each branch its own pipeline.
        let cfg = GenerateRequest {
            negative_prompt: Some("blurry".into()),
            true_cfg: Some(3.0),
            ..r.clone()
        };
        let one_cfg = p.generate(&cfg, &mut |_| Ok(()))?;
        let l = ParallelLayout {
            cfg: 2,
            ..pipe(2, 2, 6)
        };
        let g = generate(&p, l, &cfg, &mut |_| Ok(()))?;
        assert!(max_pixel_diff(&g, &one_cfg) <= 1);
        // Refused: true CFG on one pipeline (the branches would share K/V), a cache policy,
        // more stages than blocks.
        for (layout, request) in [
            (pipe(2, 2, 1), cfg.clone()),
            (pipe(2, 2, 1), GenerateRequest { ..req(0.1) }),
            (pipe(200, 2, 1), r.clone()),
        ] {
            let e = generate(&p, layout, &request, &mut |_| Ok(()));
            assert!(matches!(e, Err(Error::InvalidSetting { .. })), "{e:?}");
        }
        Ok(())
    }

    #[test]
    fn token_counts_that_do_not_divide_match_one_worker() -> Result<()> {
        let p = Pipeline::demo(&Device::Cpu)?;
        // 48 x 80 px: 3 x 5 = 15 image tokens (odd) beside the demo's 64 text tokens (not a
        // multiple of 3), and 10 latent rows for the decode (unequal bands on 3 and 4 workers).
        let r = GenerateRequest {
            width: 48,
            height: 80,
            ..req(0.0)
        };
        let one = p.generate(&r, &mut |_| Ok(()))?;
        for (ring, ulysses) in [(1, 2), (2, 1), (3, 1), (4, 1), (2, 2)] {
            let g = generate(&p, layout(ring, ulysses), &r, &mut |_| Ok(()))?;
            assert_eq!((g.image.width, g.image.height), (48, 80));
            let d = max_pixel_diff(&g, &one);
            assert!(
                d <= 1,
                "ring {ring} x ulysses {ulysses}: pixels differ by {d}"
            );
        }
        Ok(())
    }

    #[test]
    fn first_block_cache_leaves_padding_out_of_its_decision() -> Result<()> {
        let p = Pipeline::demo(&Device::Cpu)?;
        let diffs = |g: &Generated| -> Vec<f64> {
            g.stats
                .steps
                .iter()
                .filter_map(|k| match k {
                    StepKind::Computed { diff } => *diff,
                    StepKind::Reused { diff } => Some(*diff),
                })
                .collect()
        };
        // 48 x 16 px: 3 image tokens over 4 ranks, the last holding only padding; 2 latent rows
        // (fewer than the workers: decoded on one). A tiny threshold measures every step's
        // residual change without reusing any; a huge one reuses every step it can.
        for threshold in [1e-12, 1e9] {
            let r = GenerateRequest {
                width: 48,
                height: 16,
                ..req(threshold)
            };
            let one = p.generate(&r, &mut |_| Ok(()))?;
            let g = generate(&p, layout(4, 1), &r, &mut |_| Ok(()))?;
            assert_eq!(g.stats.reused, one.stats.reused, "threshold {threshold}");
            let (a, b) = (diffs(&g), diffs(&one));
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(&b) {
                assert!(
                    (x - y).abs() <= 1e-4 * y.abs(),
                    "threshold {threshold}: {x} vs {y}"
                );
            }
            assert!(max_pixel_diff(&g, &one) <= 1);
        }
        Ok(())
    }

    /// Every cache policy takes the same decisions on every rank of a sequence-parallel group
    /// as on one worker (its measures all-reduced, or read from the schedule), so the images
    /// and the steps reused are the same.
    #[test]
    fn every_cache_policy_under_sequence_parallelism_matches_one_worker() -> Result<()> {
        let p = Pipeline::demo(&Device::Cpu)?;
        for spec in [
            "dbcache:f=1,b=1,t=0.3,max=2,taylor=1",
            "taylorseer:n=2,order=2,warmup=1",
            "magcache:t=1,k=2,warmup=1",
        ] {
            let r = GenerateRequest {
                steps: Some(8),
                cache: Some(spec.parse()?),
                ..req(0.0)
            };
            let one = p.generate(&r, &mut |_| Ok(()))?;
            assert!(one.stats.reused > 0, "{spec} reuses steps on the demo");
            for (ring, ulysses) in [(1, 2), (2, 1), (2, 2)] {
                let g = generate(&p, layout(ring, ulysses), &r, &mut |_| Ok(()))?;
                assert_eq!(
                    g.stats
                        .steps
                        .iter()
                        .map(|k| k.is_reused())
                        .collect::<Vec<_>>(),
                    one.stats
                        .steps
                        .iter()
                        .map(|k| k.is_reused())
                        .collect::<Vec<_>>(),
                    "{spec}, ring {ring} x ulysses {ulysses}: the same steps reused"
                );
                let d = max_pixel_diff(&g, &one);
                assert!(
                    d <= 1,
                    "{spec}, ring {ring} x ulysses {ulysses}: pixels differ by {d}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn cfg_parallel_matches_true_cfg_on_one_worker() -> Result<()> {
        let p = Pipeline::demo(&Device::Cpu)?;
        let r = GenerateRequest {
            negative_prompt: Some("blurry, dull".into()),
            true_cfg: Some(3.0),
            ..req(0.0)
        };
        let one = p.generate(&r, &mut |_| Ok(()))?;
        for (cfg, ring, ulysses) in [(2, 1, 1), (2, 1, 2), (1, 2, 1)] {
            let l = ParallelLayout {
                cfg,
                ring,
                ulysses,
                ..ParallelLayout::default()
            };
            let g = generate(&p, l, &r, &mut |_| Ok(()))?;
            let d = max_pixel_diff(&g, &one);
            assert!(
                d <= 1,
                "cfg {cfg} ring {ring} ulysses {ulysses}: pixels differ by {d}"
            );
        }
        // CFG parallelism without a negative branch is refused up front.
        let l = ParallelLayout {
            cfg: 2,
            ..ParallelLayout::default()
        };
        assert!(matches!(
            generate(&p, l, &req(0.0), &mut |_| Ok(())),
            Err(Error::InvalidSetting { .. })
        ));
        Ok(())
    }

    #[test]
    fn data_parallel_threshold_sweep_matches_one_by_one() -> Result<()> {
        let p = Pipeline::demo(&Device::Cpu)?;
        let reqs: Vec<GenerateRequest> = [0.0, 0.05, 1e9]
            .iter()
            .flat_map(|&t| [21u64, 22].map(|seed| GenerateRequest { seed, ..req(t) }))
            .collect();
        for layout in [
            ParallelLayout {
                dp: 2,
                ..ParallelLayout::default()
            },
            ParallelLayout {
                dp: 2,
                ulysses: 2,
                ..ParallelLayout::default()
            },
        ] {
            let out = generate_many(&p, layout, &reqs);
            assert_eq!(out.len(), reqs.len());
            for (r, g) in reqs.iter().zip(out) {
                let g = g?;
                let one = p.generate(r, &mut |_| Ok(()))?;
                assert_eq!(g.settings.seed, r.seed);
                assert_eq!(
                    g.stats.reused, one.stats.reused,
                    "threshold {}",
                    r.cache_threshold
                );
                assert!(max_pixel_diff(&g, &one) <= 1);
            }
        }
        Ok(())
    }

    #[test]
    fn first_block_cache_decides_alike_on_every_rank() -> Result<()> {
        let p = Pipeline::demo(&Device::Cpu)?;
        let one = p.generate(&req(1e9), &mut |_| Ok(()))?;
        let g = generate(&p, layout(1, 2), &req(1e9), &mut |_| Ok(()))?;
        assert_eq!(g.stats.reused, one.stats.reused);
        assert_eq!(g.stats.reused, 3);
        assert!(max_pixel_diff(&g, &one) <= 1);
        Ok(())
    }

    #[test]
    fn cancel_stops_every_worker() -> Result<()> {
        let p = Pipeline::demo(&Device::Cpu)?;
        let mut seen = 0;
        let r = generate(&p, layout(2, 1), &req(0.0), &mut |ev| {
            if let Progress::Step(_) = ev {
                seen += 1;
                return Err(Error::Cancelled);
            }
            Ok(())
        });
        assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
        assert!(seen <= 2);
        Ok(())
    }

    #[test]
    fn bad_layouts_fail_before_work() -> Result<()> {
        let p = Pipeline::demo(&Device::Cpu)?;
        // 3 does not divide the demo model's 2 heads.
        let r = generate(&p, layout(1, 3), &req(0.0), &mut |_| Ok(()));
        assert!(matches!(r, Err(Error::InvalidSetting { .. })), "{r:?}");
        Ok(())
    }
}
