//! The engine thread: owns the [`Engine`] (the loaded model and its replicas) and runs jobs one
//! at a time, streaming events. Models stay loaded between jobs; a new [`EngineSpec`] reloads
//! only when the model changed. A new placement needs no reload: each job's plan loads what it
//! lacks on the devices it names (GPU replicas stay loaded for later jobs), and CPU worker threads
//! share the one CPU model.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use super::events::{EngineSpec, Event, ImageResult, JobId, JobSpec};
use super::gallery::Gallery;
use super::repeats::{round_order, Recorder};
use super::Emitter;
use crate::engine::{gpus_present, Engine, ModelChoice};
use crate::error::Error;
use crate::pipeline::metrics;
use crate::pipeline::preview::Latent;
use crate::pipeline::{GenerateRequest, Generated, Progress};

pub(crate) enum EngineMsg {
    Configure(EngineSpec),
    Run {
        job: JobId,
        spec: JobSpec,
        cancel: Arc<AtomicBool>,
        /// The model and workers it runs on, configured as it starts (so that a model it
        /// loads encodes its prompt while the transformer loads); `None`: whatever is then.
        engine: Option<Box<EngineSpec>>,
    },
}

struct Loaded {
    model: ModelChoice,
    /// Where rank 0 runs (the engine's first pipeline).
    first_device: String,
    /// The model's MagCache calibration, when it has one.
    magcache: Option<Arc<crate::pipeline::cache::MagCalibration>>,
    engine: Engine,
}

pub(crate) struct EngineThread {
    spec: EngineSpec,
    loaded: Option<Loaded>,
    gallery: Option<Gallery>,
    emit: Emitter,
}

/// Say in the log which rank threads are left behind after `job` and what becomes of what they
/// held: the next job builds its own groups (and, on GPUs, fresh replicas: see
/// [`crate::engine::Engine::prepare`]); each thread's memory is freed when it ends.
fn log_left_behind(job: JobId) {
    for a in crate::parallel::abandoned::still_running() {
        tracing::warn!(
            "{job}: rank {} on {} left behind {:.1} s ago, still running; the next job runs \
             without it (its communicators aborted, its GPU replica reloaded)",
            a.rank,
            a.device,
            a.since.as_secs_f64()
        );
    }
}

impl EngineThread {
    pub(crate) fn new(spec: EngineSpec, gallery: Option<Gallery>, emit: Emitter) -> Self {
        Self {
            spec,
            loaded: None,
            gallery,
            emit,
        }
    }

    /// Handle messages until the channel closes.
    pub(crate) fn serve(
        mut self,
        rx: mpsc::Receiver<EngineMsg>,
        done: tokio::sync::mpsc::UnboundedSender<JobId>,
    ) {
        while let Ok(msg) = rx.recv() {
            match msg {
                EngineMsg::Configure(spec) => {
                    self.spec = spec;
                    // Load now so the user sees errors at once, not at the next Generate.
                    let _ = self.ensure_loaded(None);
                }
                EngineMsg::Run {
                    job,
                    spec,
                    cancel,
                    engine,
                } => {
                    if let Some(on) = engine {
                        self.spec = *on;
                    }
                    let outcome = catch_unwind(AssertUnwindSafe(|| self.run(job, &spec, &cancel)));
                    match outcome {
                        Ok(Ok(wall_ms)) => self.emit.emit(Event::Finished { job, wall_ms }),
                        Ok(Err(Error::Cancelled)) => self.emit.emit(Event::Cancelled { job }),
                        Ok(Err(e)) => {
                            if let Error::RanksAbandoned { .. } = &e {
                                log_left_behind(job);
                            }
                            self.emit.emit(Event::Failed {
                                job,
                                error: e.to_string(),
                            })
                        }
                        Err(panic) => {
                            let what = crate::error::panic_text(panic.as_ref());
                            tracing::error!("{job} panicked: {what}");
                            self.emit.emit(Event::Failed {
                                job,
                                error: format!("internal error (the engine stays up): {what}"),
                            });
                        }
                    }
                    let _ = done.send(job);
                }
            }
        }
    }

    /// Load the configured model unless it is loaded; `first`: the job it loads for, whose
    /// prompt is encoded while the transformer loads ([`crate::engine::overlap`]).
    fn ensure_loaded(&mut self, first_job: Option<&GenerateRequest>) -> crate::Result<()> {
        let spec = self.spec.clone();
        // The model loads where rank 0 of this placement runs; a new model or a new rank-0
        // device reloads (freeing the old copies), other placement changes reuse what is loaded.
        let first = spec
            .placement
            .devices
            .rank_names(gpus_present())
            .map(|ranks| ranks[0].clone());
        if let (Some(l), Ok(first)) = (&self.loaded, &first) {
            if l.model == spec.model && l.first_device == *first {
                return Ok(());
            }
        }
        // Free the old model before loading the new one (GPU memory).
        self.loaded = None;
        self.emit.emit(Event::ModelLoading { spec: spec.clone() });
        let t0 = Instant::now();
        let engine = first.and_then(|first| {
            // Under PipeFusion on GPUs the first copy holds only rank 0's stage (a later plan
            // that needs more reloads it): plan with the model's config before loading.
            let planned = spec.model.resolve().and_then(|r| {
                let (heads, hints) = crate::engine::layout_facts(&r, &spec.placement)?;
                spec.placement
                    .plan_with(heads, false, gpus_present(), hints)
            });
            match planned {
                Ok(plan) if plan.ranks.first() == Some(&first) => {
                    let ahead = first_job
                        .map(crate::engine::overlap::prompts_for)
                        .unwrap_or_default();
                    Engine::load_for_ahead(spec.model.clone(), &plan, &ahead)
                }
                _ => Engine::load(spec.model.clone(), &first),
            }
        });
        let engine = match engine {
            Ok(e) => e,
            Err(e) => {
                let error = e.to_string();
                self.emit.emit(Event::ModelFailed {
                    spec,
                    error: error.clone(),
                });
                return Err(e);
            }
        };
        let pipeline = engine.primary();
        let d = pipeline.denoiser();
        let summary = match pipeline.model.as_flux1() {
            Some(f) => format!(
                "{} ({}), {} double + {} single blocks, on {}",
                pipeline.label,
                pipeline.variant.name(),
                f.flux.config().depth,
                f.flux.config().depth_single_blocks,
                crate::device::describe(pipeline.device()),
            ),
            None => format!(
                "{} ({}), {} blocks, on {}",
                pipeline.label,
                d.family(),
                d.num_blocks(),
                crate::device::describe(pipeline.device()),
            ),
        };
        self.emit.emit(Event::ModelLoaded {
            spec: spec.clone(),
            summary,
            load_ms: t0.elapsed().as_secs_f64() * 1e3,
            heads: d.num_heads(),
            blocks: d.num_blocks(),
            magcache: pipeline.magcache_calibration().is_some(),
            lora_config: pipeline
                .flux1("LoRAs")
                .ok()
                .map(|f| f.flux.config().clone()),
        });
        let magcache = pipeline.magcache_calibration();
        // The preview map is fitted to this model's own autoencoder (on the demo, its own scenes;
        // well under a second on the CPU).
        match pipeline.preview_factors() {
            Ok(f) => {
                tracing::info!("latent preview map fitted: R² {:.3}", f.r2);
                self.emit.emit(Event::PreviewFactors(Arc::new(f)));
            }
            Err(e) => tracing::warn!("no latent preview for this model: {e}"),
        }
        self.loaded = Some(Loaded {
            model: spec.model,
            first_device: engine.primary_device().to_string(),
            magcache,
            engine,
        });
        Ok(())
    }

    /// Run a job; returns its wall time in ms.
    fn run(&mut self, job: JobId, spec: &JobSpec, cancel: &AtomicBool) -> crate::Result<f64> {
        let t0 = Instant::now();
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        let reqs = spec.requests();
        self.ensure_loaded(reqs.first())?;
        let placement = self.spec.placement.clone();
        let loaded = self
            .loaded
            .as_mut()
            .ok_or_else(|| Error::runtime("cannot run the job", "no model is loaded"))?;
        // Every image's cache policy is checked before the first is made: a sweep that cannot
        // make its MagCache cell (no calibration for this model) is refused whole, not after
        // its other cells ran.
        for r in &reqs {
            r.cache_spec().policy(loaded.magcache.as_ref())?;
        }
        // The requests of a job differ only in their cache threshold: one plan serves all.
        let plan = loaded.engine.plan(&placement, &reqs[0])?;
        let emit = self.emit.clone();
        loaded.engine.prepare(&plan, reqs.len(), &mut |device| {
            emit.emit(Event::Preparing {
                job,
                what: format!("loading the model on {device}"),
            })
        })?;
        let engine = &self
            .loaded
            .as_ref()
            .ok_or_else(|| Error::runtime("cannot run the job", "no model is loaded"))?
            .engine;
        // How the sampler's packed latents unpack, for the previews.
        let latent_spec = engine.primary().latent_spec();

        if let JobSpec::Compare { .. } = spec {
            // Every speed-up is measured against the sweep's first image: warm each group up
            // first (kernel compilation, cuBLAS and allocator set-up land on the first image a
            // pipeline makes at a size), so the reference is not slower for reasons that are
            // not the cache's.
            self.emit.emit(Event::Preparing {
                job,
                what: "warming up: one step on each group".into(),
            });
            let warm = GenerateRequest {
                steps: Some(1),
                ..reqs[0].clone()
            };
            let groups = plan.layout.dp.clamp(1, reqs.len());
            for r in engine.generate_many(&plan, &vec![warm; groups]) {
                r?;
            }
            if cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
        }
        self.emit.emit(Event::Started {
            job,
            images: reqs.len(),
            layout: plan.describe(),
        });
        // A compare sweep times every cell in `rounds` rounds (see `super::repeats`); its images
        // are measured against its first. A batch's images are neither.
        let rounds = match spec {
            JobSpec::Compare { repeats, .. } => Some((*repeats).max(1)),
            JobSpec::Generate(_) | JobSpec::Images(_) => None,
        };
        let compare = rounds.is_some();
        let mut record = Recorder::new(reqs.len());
        // What each cell is measured against (a LoRA strength sweep: its strength's uncached
        // cell; otherwise the first cell).
        let refs = super::events::compare_references(&reqs);
        let mut references: Vec<Option<Generated>> = vec![None; reqs.len()];
        // A sweep's images stay together in the gallery.
        let group = rounds.map(|_| format!("sweep-{}-{}", super::gallery::now_ms(), job.0));
        if plan.layout.dp > 1 && reqs.len() > 1 {
            // Data parallelism: all images at once, no per-step previews. A sweep's rounds hand
            // the cells to the groups each in its own order.
            let timed = !compare || !plan.groups_share_hardware();
            let rounds = if compare && timed {
                rounds.unwrap_or(1)
            } else {
                1
            };
            for round in 0..rounds {
                let order = round_order(reqs.len(), round);
                if round > 0 {
                    self.emit_round(job, round, rounds, order[0], 0);
                }
                let batch: Vec<GenerateRequest> = order.iter().map(|&i| reqs[i].clone()).collect();
                for (&i, r) in order.iter().zip(engine.generate_many(&plan, &batch)) {
                    let g = r?;
                    if compare {
                        record.record(i, &g.image, g.timings.total_ms);
                    }
                    if round == 0 {
                        let reference = if compare {
                            &mut references[refs[i]]
                        } else {
                            &mut None
                        };
                        self.finish_image(job, i, g, reference, timed, group.as_deref());
                    }
                }
                if cancel.load(Ordering::Relaxed) {
                    return Err(Error::Cancelled);
                }
            }
            if compare && timed {
                self.emit_timings(job, &record, &refs);
            }
            return Ok(t0.elapsed().as_secs_f64() * 1e3);
        }

        for (i, req) in reqs.iter().enumerate() {
            let (w, h) = (req.width, req.height);
            let emit = self.emit.clone();
            let mut progress = |ev: Progress| -> crate::Result<()> {
                if cancel.load(Ordering::Relaxed) {
                    return Err(Error::Cancelled);
                }
                match ev {
                    Progress::TextEncoded { ms } => {
                        emit.emit(Event::TextEncoded { job, image: i, ms })
                    }
                    Progress::Step(info) => {
                        let at = std::time::Instant::now();
                        let preview =
                            Arc::new(Latent::from_packed(info.latent, &latent_spec, w, h)?);
                        emit.emit(Event::Step {
                            job,
                            image: i,
                            step: info.index + 1,
                            total: info.total,
                            ms: info.elapsed.as_secs_f64() * 1e3,
                            reused: info.kind.is_reused(),
                            preview,
                            at,
                        });
                    }
                    Progress::Decoded { .. } => {}
                }
                Ok(())
            };
            let g = engine.generate(&plan, req, &mut progress)?;
            if compare {
                record.record(i, &g.image, g.timings.total_ms);
                let reference = &mut references[refs[i]];
                self.finish_image(job, i, g, reference, true, group.as_deref());
            } else {
                self.finish_image(job, i, g, &mut None, true, group.as_deref());
            }
        }
        if let Some(rounds) = rounds {
            // The later rounds: no previews, each starting one cell further on.
            let mut stop = |_: Progress| -> crate::Result<()> {
                if cancel.load(Ordering::Relaxed) {
                    return Err(Error::Cancelled);
                }
                Ok(())
            };
            for round in 1..rounds {
                for (position, i) in round_order(reqs.len(), round).into_iter().enumerate() {
                    self.emit_round(job, round, rounds, i, position);
                    let g = engine.generate(&plan, &reqs[i], &mut stop)?;
                    record.record(i, &g.image, g.timings.total_ms);
                }
            }
            self.emit_timings(job, &record, &refs);
        }
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    }

    /// Round `round` (0-based) of `rounds` times cell `image` at `position` in the round.
    fn emit_round(&self, job: JobId, round: usize, rounds: usize, image: usize, position: usize) {
        self.emit.emit(Event::Timing {
            job,
            round: round + 1,
            rounds,
            image,
            position,
        });
    }

    /// Every cell's timing over the rounds, after the last one.
    fn emit_timings(&self, job: JobId, record: &Recorder, references: &[usize]) {
        for (image, timing) in record.finish(references).into_iter().enumerate() {
            if !timing.identical {
                tracing::warn!("{job}: cell {image} made a different image in a later round");
            }
            self.emit.emit(Event::Timed { job, image, timing });
        }
    }

    /// Save an image to the gallery, measure it against the job's first image, report it.
    fn finish_image(
        &self,
        job: JobId,
        index: usize,
        g: Generated,
        reference: &mut Option<Generated>,
        timed: bool,
        group: Option<&str>,
    ) {
        let mut notes = g.notes.clone();
        if !timed {
            notes.push(
                "made at the same time as other images on shared hardware: its wall time says \
                 nothing of the cache's speed-up (sweep on one group for that)"
                    .into(),
            );
        }
        let saved = match &self.gallery {
            Some(gal) => match gal.save_in_group(&g, group) {
                Ok(p) => Some(p),
                Err(e) => {
                    notes.push(format!("not saved to the gallery: {e}"));
                    None
                }
            },
            None => None,
        };
        let (quality, speedup) = match reference.as_ref() {
            Some(r) => (
                metrics::quality(&g.image, &r.image).ok(),
                timed.then(|| r.timings.total_ms / g.timings.total_ms.max(1e-9)),
            ),
            None => (None, None),
        };
        let result = Arc::new(ImageResult {
            generated: g.clone(),
            saved,
            quality,
            speedup,
            notes,
        });
        if reference.is_none() {
            *reference = Some(g);
        }
        self.emit.emit(Event::ImageDone {
            job,
            image: index,
            result,
        });
    }
}
