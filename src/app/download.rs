//! What the settings panel's "Download…" button opens: fetch a model from the Hugging Face Hub
//! into its cache ([`crate::model::hub`]) on a thread of its own, never blocking the window, with
//! a progress bar of the bytes and the file arriving. Stopping takes effect between files (the client finishes
//! the file it is fetching); what arrived stays in the cache and a new download resumes it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use egui::RichText;

use crate::model::hub::{self, DownloadError, DownloadProgress, Downloaded, HubOptions};

enum Msg {
    Progress(DownloadProgress),
    Done(Result<Downloaded, DownloadError>),
}

struct Job {
    /// What was typed (`dev`, `schnell` or a repo id): the model to select afterwards.
    model: String,
    rx: mpsc::Receiver<Msg>,
    cancel: Arc<AtomicBool>,
    progress: DownloadProgress,
}

/// What a finished (or stopped, or failed) download tells the studio.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub text: String,
    pub error: bool,
    /// The `--model` value to select: set when the model is now in the cache.
    pub model: Option<String>,
}

/// The widget's state.
#[derive(Default)]
pub struct Downloader {
    /// The model field: `schnell`, `dev` or a repo id.
    pub repo: String,
    /// Where from and into; `None`: from the environment when a download starts (tests set it).
    pub options: Option<HubOptions>,
    open: bool,
    job: Option<Job>,
}

impl Downloader {
    /// Show or hide the model field and Start (the panel's "Download…" button).
    pub fn toggle(&mut self) {
        self.open = !self.open;
    }

    /// Whether a download is running.
    pub fn busy(&self) -> bool {
        self.job.is_some()
    }

    /// Start downloading `self.repo` on a thread; progress wakes the window.
    pub fn start(&mut self, ctx: &egui::Context) -> Result<(), String> {
        let typed = self.repo.trim().to_string();
        let repo = crate::model::layout::repo_id_for(&typed).ok_or_else(|| {
            format!("`{typed}` is not a model on the Hub: type schnell, dev or owner/name")
        })?;
        let options = match &self.options {
            Some(o) => o.clone(),
            None => HubOptions::from_env(None).map_err(|e| e.to_string())?,
        };
        let (tx, rx) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let stop = cancel.clone();
        let ctx = ctx.clone();
        std::thread::Builder::new()
            .name("hub-download".into())
            .spawn(move || {
                let wake = ctx.clone();
                let mut report = |p: &DownloadProgress| {
                    // The window may have closed; nothing is left to tell then.
                    let _ = tx.send(Msg::Progress(p.clone()));
                    wake.request_repaint();
                };
                let result = hub::download(&repo, &options, &mut report, &stop);
                let _ = tx.send(Msg::Done(result));
                ctx.request_repaint();
            })
            .map_err(|e| format!("cannot start the download: {e}"))?;
        self.job = Some(Job {
            model: typed,
            rx,
            cancel,
            progress: DownloadProgress::default(),
        });
        Ok(())
    }

    /// Take what the thread sent; the outcome once it has finished.
    pub fn poll(&mut self) -> Option<Outcome> {
        let job = self.job.as_mut()?;
        let mut done = None;
        while let Ok(msg) = job.rx.try_recv() {
            match msg {
                Msg::Progress(p) => job.progress = p,
                Msg::Done(r) => done = Some(r),
            }
        }
        let finished = match done {
            Some(r) => r,
            // A thread that ended without a word (it panicked).
            None if matches!(job.rx.try_recv(), Err(mpsc::TryRecvError::Disconnected)) => {
                Err(DownloadError::Interrupted {
                    file: job.progress.file.clone(),
                    reason: "the download thread stopped unexpectedly".into(),
                })
            }
            None => return None,
        };
        let model = job.model.clone();
        self.job = None;
        Some(match finished {
            Ok(got) => {
                self.open = false;
                Outcome {
                    text: format!(
                        "downloaded {}: {} files ({} fetched, {} already there) in {}",
                        got.repo,
                        got.files.len(),
                        indicatif::HumanBytes(got.fetched_bytes),
                        got.already_cached,
                        got.snapshot.display()
                    ),
                    error: false,
                    model: Some(model),
                }
            }
            Err(e) => Outcome {
                error: !matches!(e, DownloadError::Cancelled { .. }),
                text: format!("download of {model}: {e}"),
                model: None,
            },
        })
    }

    /// When open, the model field and Start; while a download runs, its progress bar and Stop
    /// (nothing otherwise). Returns the outcome of a download that has just finished.
    pub fn ui(&mut self, ui: &mut egui::Ui) -> Option<Outcome> {
        let outcome = self.poll();
        let mut failed_start = None;
        if let Some(job) = &self.job {
            let p = &job.progress;
            let (done, total) = match p.total {
                Some(t) => (p.done, t),
                None => (p.file_done, p.file_size),
            };
            let fraction = if total > 0 {
                done as f32 / total as f32
            } else {
                0.0
            };
            let file = if p.file.is_empty() {
                "listing the repo…".to_string()
            } else {
                format!("file {}/{}: {}", p.index + 1, p.count, p.file)
            };
            ui.label(format!("Downloading {}", job.model));
            ui.add(egui::ProgressBar::new(fraction).text(format!(
                "{} / {}",
                indicatif::HumanBytes(done),
                indicatif::HumanBytes(total)
            )));
            ui.label(file.as_str());
            if job.cancel.load(Ordering::Relaxed) {
                ui.label(
                    RichText::new("stopping once this file is in (what arrived is kept)")
                        .small()
                        .weak(),
                );
            } else if ui
                .small_button("Stop")
                .on_hover_text(
                    "stop after the file arriving now; downloading again resumes from there",
                )
                .clicked()
            {
                job.cancel.store(true, Ordering::Relaxed);
            }
        } else if self.open {
            ui.horizontal(|ui| {
                let label = ui.label("Hub model");
                ui.add(
                    egui::TextEdit::singleline(&mut self.repo)
                        .hint_text("schnell, dev or owner/name")
                        .desired_width(150.0),
                )
                .labelled_by(label.id);
                if ui.button("Start").clicked() {
                    if let Err(e) = self.start(ui.ctx()) {
                        failed_start = Some(Outcome {
                            text: e,
                            error: true,
                            model: None,
                        });
                    }
                }
            });
        }
        outcome.or(failed_start)
    }
}
