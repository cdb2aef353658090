//! The engine thread: owns the loaded model and runs jobs one at a time, streaming events.
//! Models stay loaded between jobs; a new [`EngineSpec`] reloads only when the model or device
//! changed (a new layout or worker count needs no reload: the workers are made per image).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use super::events::{EngineSpec, Event, ImageResult, JobId, JobSpec};
use super::gallery::Gallery;
use super::Emitter;
use crate::cli::{load_pipeline, DTypeArg, ModelArgs};
use crate::error::Error;
use crate::parallel::mesh::{Mesh, ParallelLayout};
use crate::pipeline::metrics;
use crate::pipeline::preview::{Latent, PreviewFactors};
use crate::pipeline::{GenerateRequest, Generated, Pipeline, Progress};

pub(crate) enum WorkerMsg {
    Configure(EngineSpec),
    Run {
        job: JobId,
        spec: JobSpec,
        cancel: Arc<AtomicBool>,
    },
}

struct Loaded {
    model: String,
    device: String,
    pipeline: Pipeline,
}

pub(crate) struct Worker {
    spec: EngineSpec,
    loaded: Option<Loaded>,
    gallery: Option<Gallery>,
    emit: Emitter,
}

/// Which layout `spec` runs `req` with on its workers, and why (`None`: one worker).
pub fn layout_for(
    spec: &EngineSpec,
    heads: usize,
    req: &GenerateRequest,
) -> crate::Result<Option<(ParallelLayout, String)>> {
    if spec.workers <= 1 {
        return Ok(None);
    }
    let true_cfg = req.true_cfg.unwrap_or(1.0) > 1.0 && req.negative_prompt.is_some();
    let (layout, why) = match spec.layout {
        Some(l) => (l, "layout set by hand".to_string()),
        None => ParallelLayout::auto(spec.workers, heads, true_cfg),
    };
    Mesh::new(layout, spec.workers, heads)?;
    Ok(Some((layout, why)))
}

impl Worker {
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
        rx: mpsc::Receiver<WorkerMsg>,
        done: tokio::sync::mpsc::UnboundedSender<JobId>,
    ) {
        while let Ok(msg) = rx.recv() {
            match msg {
                WorkerMsg::Configure(spec) => {
                    self.spec = spec;
                    // Load now so the user sees errors at once, not at the next Generate.
                    let _ = self.ensure_loaded();
                }
                WorkerMsg::Run { job, spec, cancel } => {
                    let outcome = catch_unwind(AssertUnwindSafe(|| self.run(job, &spec, &cancel)));
                    match outcome {
                        Ok(Ok(wall_ms)) => self.emit.emit(Event::Finished { job, wall_ms }),
                        Ok(Err(Error::Cancelled)) => self.emit.emit(Event::Cancelled { job }),
                        Ok(Err(e)) => self.emit.emit(Event::Failed {
                            job,
                            error: e.to_string(),
                        }),
                        Err(panic) => {
                            let what = panic
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                                .unwrap_or_else(|| "unknown panic".into());
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

    fn ensure_loaded(&mut self) -> crate::Result<()> {
        let spec = self.spec.clone();
        if let Some(l) = &self.loaded {
            if l.model == spec.model && l.device == spec.device {
                return Ok(());
            }
        }
        // Free the old model before loading the new one (GPU memory).
        self.loaded = None;
        self.emit.emit(Event::ModelLoading { spec: spec.clone() });
        let t0 = Instant::now();
        let args = ModelArgs {
            model: spec.model.clone(),
            text_encoders: None,
            dtype: DTypeArg::Auto,
            device: spec.device.clone(),
        };
        let pipeline = match load_pipeline(&args) {
            Ok(p) => p,
            Err(e) => {
                let error = format!("{e:#}");
                self.emit.emit(Event::ModelFailed {
                    spec,
                    error: error.clone(),
                });
                return Err(Error::Image(error));
            }
        };
        let summary = format!(
            "{} ({}), {} double + {} single blocks, on {}",
            pipeline.label,
            pipeline.variant.name(),
            pipeline.flux.config().depth,
            pipeline.flux.config().depth_single_blocks,
            crate::device::describe(pipeline.device()),
        );
        self.emit.emit(Event::ModelLoaded {
            spec: spec.clone(),
            summary,
            load_ms: t0.elapsed().as_secs_f64() * 1e3,
            heads: pipeline.flux.config().num_heads,
        });
        // The preview map is fitted to this model's own autoencoder (about a second on the demo's
        // CPU autoencoder: three 24x24 latents).
        match PreviewFactors::fit(&pipeline.vae, pipeline.device(), 3, 24, 0x5eed) {
            Ok(f) => {
                tracing::info!("latent preview map fitted: R² {:.3}", f.r2);
                self.emit.emit(Event::PreviewFactors(Arc::new(f)));
            }
            Err(e) => tracing::warn!("no latent preview for this model: {e}"),
        }
        self.loaded = Some(Loaded {
            model: spec.model,
            device: spec.device,
            pipeline,
        });
        Ok(())
    }

    /// Run a job; returns its wall time in ms.
    fn run(&mut self, job: JobId, spec: &JobSpec, cancel: &AtomicBool) -> crate::Result<f64> {
        let t0 = Instant::now();
        if cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        self.ensure_loaded()?;
        let loaded = self
            .loaded
            .as_ref()
            .ok_or_else(|| Error::Image("no model loaded".into()))?;
        let p = &loaded.pipeline;
        let reqs = spec.requests();
        let heads = p.flux.config().num_heads;
        let first = layout_for(&self.spec, heads, &reqs[0])?;
        self.emit.emit(Event::Started {
            job,
            images: reqs.len(),
            layout: match &first {
                None => "one worker".into(),
                Some((l, why)) => format!(
                    "{} workers: dp {} x cfg {} x ring {} x ulysses {} ({why})",
                    self.spec.workers, l.dp, l.cfg, l.ring, l.ulysses
                ),
            },
        });

        // Data parallelism over a compare sweep: all images at once, no per-step previews.
        if let (JobSpec::Compare { .. }, Some((l, _))) = (spec, &first) {
            if l.dp > 1 {
                let results = crate::parallel::engine::generate_many(p, *l, &reqs);
                let mut reference: Option<Generated> = None;
                for (i, r) in results.into_iter().enumerate() {
                    let g = r?;
                    self.finish_image(job, i, g, &mut reference);
                }
                return Ok(t0.elapsed().as_secs_f64() * 1e3);
            }
        }

        let mut reference: Option<Generated> = None;
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
                        let preview = Arc::new(Latent::from_packed(info.latent, w, h)?);
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
            // The requests of a job differ only in their cache threshold: one layout serves all.
            let g = match &first {
                None => p.generate(req, &mut progress)?,
                Some((l, _)) => crate::parallel::engine::generate(p, *l, req, &mut progress)?,
            };
            self.finish_image(job, i, g, &mut reference);
        }
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    }

    /// Save an image to the gallery, measure it against the job's first image, report it.
    fn finish_image(
        &self,
        job: JobId,
        index: usize,
        g: Generated,
        reference: &mut Option<Generated>,
    ) {
        let mut notes = g.notes.clone();
        let saved = match &self.gallery {
            Some(gal) => match gal.save(&g) {
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
                Some(r.timings.total_ms / g.timings.total_ms.max(1e-9)),
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
