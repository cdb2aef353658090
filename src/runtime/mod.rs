//! The runtime behind the studio: a tokio scheduler that owns the job queue, and the engine
//! thread that holds the loaded model and runs jobs (one at a time; a job spreads over the
//! engine's workers itself). Jobs stream [`Event`]s in order; [`Runtime::cancel`] stops a job at
//! its next step (or drops it from the queue); a failed or panicking job reports why and the
//! runtime stays up. The UI never blocks on it: it polls [`Runtime::try_recv`] each frame and is
//! woken by the notify callback when an event arrives.

pub mod advice;
mod engine_thread;
pub mod events;
pub mod gallery;
pub mod repeats;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

pub use events::{EngineSpec, Event, ImageResult, JobId, JobSpec};
pub use gallery::Gallery;

use crate::error::{Error, Result};
use engine_thread::{EngineMsg, EngineThread};

/// Called after every event is queued (the studio passes `ctx.request_repaint`).
pub type Notify = Arc<dyn Fn() + Send + Sync>;

/// Sends events to the UI side and wakes it.
#[derive(Clone)]
pub(crate) struct Emitter {
    tx: mpsc::Sender<Event>,
    notify: Option<Notify>,
}

impl Emitter {
    pub(crate) fn emit(&self, e: Event) {
        if self.tx.send(e).is_ok() {
            if let Some(n) = &self.notify {
                n();
            }
        }
    }
}

/// How to start a runtime.
#[derive(Clone, Default)]
pub struct RuntimeOptions {
    /// The model and workers to load first (loaded at the first job, or at once with
    /// [`Runtime::configure`]).
    pub engine: EngineSpec,
    /// Where finished images are kept (`None`: not kept).
    pub gallery_dir: Option<PathBuf>,
    pub notify: Option<Notify>,
}

/// What a [`Runtime`] handle asks of the scheduler ([`EngineMsg`] is what the scheduler asks of
/// the engine thread).
enum SchedulerMsg {
    /// A job, and the model and workers it runs on (`None`: whatever is configured then).
    Submit(JobId, JobSpec, Option<Box<EngineSpec>>),
    Cancel(JobId),
    Configure(EngineSpec),
    /// Put the waiting jobs in this order (those not named keep theirs, after these).
    Reorder(Vec<JobId>),
}

/// A running runtime. Dropping it cancels the running job and waits for the engine thread.
pub struct Runtime {
    cmds: tokio::sync::mpsc::UnboundedSender<SchedulerMsg>,
    events: mpsc::Receiver<Event>,
    next_id: AtomicU64,
    tokio: Option<tokio::runtime::Runtime>,
    engine: Option<std::thread::JoinHandle<()>>,
    gallery: Option<Gallery>,
}

impl Runtime {
    pub fn start(opts: RuntimeOptions) -> Result<Self> {
        let (ev_tx, events) = mpsc::channel();
        let emit = Emitter {
            tx: ev_tx,
            notify: opts.notify.clone(),
        };
        let gallery = opts.gallery_dir.map(Gallery::open).transpose()?;
        let tokio = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("parallax-scheduler")
            .enable_time()
            .build()
            .map_err(|e| Error::runtime("cannot start the runtime", e))?;
        let (cmds, cmd_rx) = tokio::sync::mpsc::unbounded_channel();
        let (work_tx, work_rx) = mpsc::channel();
        let (done_tx, done_rx) = tokio::sync::mpsc::unbounded_channel();
        let thread = EngineThread::new(opts.engine, gallery.clone(), emit.clone());
        let engine = std::thread::Builder::new()
            .name("parallax-engine".into())
            .spawn(move || thread.serve(work_rx, done_tx))
            .map_err(|e| Error::runtime("cannot start the engine thread", e))?;
        tokio.spawn(schedule(cmd_rx, work_tx, done_rx, emit));
        Ok(Self {
            cmds,
            events,
            next_id: AtomicU64::new(1),
            tokio: Some(tokio),
            engine: Some(engine),
            gallery,
        })
    }

    /// Queue a job; its events follow.
    pub fn submit(&self, spec: JobSpec) -> JobId {
        self.send_job(spec, None)
    }

    /// Queue a job that runs on `engine` (the model and workers it was queued with, whatever
    /// is configured by the time it starts).
    pub fn submit_on(&self, spec: JobSpec, engine: EngineSpec) -> JobId {
        self.send_job(spec, Some(Box::new(engine)))
    }

    fn send_job(&self, spec: JobSpec, engine: Option<Box<EngineSpec>>) -> JobId {
        let id = JobId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let _ = self.cmds.send(SchedulerMsg::Submit(id, spec, engine));
        id
    }

    /// Reorder the jobs waiting in the queue: those in `order` first, in that order; the others
    /// after them as they were. Jobs already running or over are ignored.
    pub fn reorder(&self, order: Vec<JobId>) {
        let _ = self.cmds.send(SchedulerMsg::Reorder(order));
    }

    /// Stop a job at its next step, or drop it from the queue.
    pub fn cancel(&self, job: JobId) {
        let _ = self.cmds.send(SchedulerMsg::Cancel(job));
    }

    /// Use this model and these workers for the jobs queued after this call; loads now if the
    /// model or device changed.
    pub fn configure(&self, spec: EngineSpec) {
        let _ = self.cmds.send(SchedulerMsg::Configure(spec));
    }

    /// The next event, if one is waiting.
    pub fn try_recv(&self) -> Option<Event> {
        self.events.try_recv().ok()
    }

    /// The next event, waiting at most `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Event> {
        self.events.recv_timeout(timeout).ok()
    }

    /// The scheduler's tokio handle, for the UI's own background tasks (file dialogs).
    pub fn handle(&self) -> Option<tokio::runtime::Handle> {
        self.tokio.as_ref().map(|t| t.handle().clone())
    }

    pub fn gallery(&self) -> Option<&Gallery> {
        self.gallery.as_ref()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        // Closing the command channel ends the scheduler, which cancels the running job and
        // closes the engine's queue; the engine thread then returns.
        let (tx, _) = tokio::sync::mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.cmds, tx));
        if let Some(rt) = self.tokio.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
        if let Some(h) = self.engine.take() {
            let _ = h.join();
        }
    }
}

/// The scheduler: queue, cancel, hand jobs to the engine one at a time.
async fn schedule(
    mut cmds: tokio::sync::mpsc::UnboundedReceiver<SchedulerMsg>,
    engine: mpsc::Sender<EngineMsg>,
    mut done: tokio::sync::mpsc::UnboundedReceiver<JobId>,
    emit: Emitter,
) {
    let mut queue: VecDeque<(JobId, JobSpec, Option<Box<EngineSpec>>)> = VecDeque::new();
    let mut running: Option<(JobId, Arc<AtomicBool>)> = None;
    loop {
        if running.is_none() {
            if let Some((job, spec, on)) = queue.pop_front() {
                let cancel = Arc::new(AtomicBool::new(false));
                if engine
                    .send(EngineMsg::Run {
                        job,
                        spec,
                        cancel: cancel.clone(),
                        engine: on,
                    })
                    .is_err()
                {
                    emit.emit(Event::Failed {
                        job,
                        error: "the engine thread has stopped".into(),
                    });
                    continue;
                }
                running = Some((job, cancel));
            }
        }
        tokio::select! {
            cmd = cmds.recv() => match cmd {
                Some(SchedulerMsg::Submit(job, spec, on)) => {
                    queue.push_back((job, spec, on));
                    emit.emit(Event::Queued { job, position: queue.len() + usize::from(running.is_some()) - 1 });
                }
                Some(SchedulerMsg::Cancel(job)) => {
                    if let Some((id, flag)) = &running {
                        if *id == job {
                            flag.store(true, Ordering::Relaxed);
                            continue;
                        }
                    }
                    if let Some(pos) = queue.iter().position(|(id, ..)| *id == job) {
                        queue.remove(pos);
                        emit.emit(Event::Cancelled { job });
                    }
                }
                Some(SchedulerMsg::Configure(spec)) => {
                    let _ = engine.send(EngineMsg::Configure(spec));
                }
                Some(SchedulerMsg::Reorder(order)) => {
                    let rank = |id: &JobId| order.iter().position(|o| o == id).unwrap_or(order.len());
                    // Stable: jobs not named keep their order, after the named ones.
                    queue.make_contiguous().sort_by_key(|(id, ..)| rank(id));
                }
                None => {
                    if let Some((_, flag)) = &running {
                        flag.store(true, Ordering::Relaxed);
                    }
                    for (job, ..) in queue.drain(..) {
                        emit.emit(Event::Cancelled { job });
                    }
                    break;
                }
            },
            Some(job) = done.recv() => {
                if running.as_ref().is_some_and(|(id, _)| *id == job) {
                    running = None;
                }
            }
        }
    }
}
