//! Scripted runs and measurements: `--auto-generate` (start a job once the model is ready),
//! `--screenshot FILE` (save the window after the first job), `--quit-after-job`, and
//! `--ui-stats FILE` (frame times, step-to-preview latencies and job times, written as JSON when
//! the window closes). CI and `scripts/ui-bench.sh` drive the studio through these.

use std::path::PathBuf;
use std::sync::{mpsc, Arc};

use super::StudioOptions;

/// Frame times and step-to-preview latency, for the responsiveness benchmark.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct UiStats {
    /// CPU time of each frame drawn while a job ran (eframe's `cpu_usage`).
    pub frame_ms: Vec<f64>,
    /// From the engine emitting a step to the end of the frame that drew its preview.
    pub preview_latency_ms: Vec<f64>,
    pub steps_seen: usize,
    /// From a job's start on screen (Generate, or its turn in the queue) to its first step's
    /// preview leaving the engine.
    pub first_preview_ms: Vec<f64>,
    /// Each job's wall time as the engine measured it (queue to last image).
    pub job_wall_ms: Vec<f64>,
    /// Each image's generation time (text encoding, steps, decode).
    pub image_ms: Vec<f64>,
}

/// What a scripted run still has to do.
#[derive(Debug, Default)]
pub struct Script {
    auto_generate: bool,
    compare: bool,
    screenshot: Option<PathBuf>,
    quit_after_job: bool,
    stats_file: Option<PathBuf>,
    started: bool,
    first_job_done: bool,
    shot_due: bool,
    quit: bool,
}

/// What the script wants started now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Generate,
    Compare,
}

impl Script {
    pub fn new(opts: &StudioOptions) -> Self {
        Self {
            auto_generate: opts.auto_generate,
            compare: opts.compare,
            screenshot: opts.screenshot.clone(),
            quit_after_job: opts.quit_after_job,
            stats_file: opts.ui_stats.clone(),
            ..Self::default()
        }
    }

    /// The job to start now, once, when the model is ready.
    pub fn start(&mut self, model_ready: bool) -> Option<Start> {
        if !self.auto_generate || self.started || !model_ready {
            return None;
        }
        self.started = true;
        Some(if self.compare {
            Start::Compare
        } else {
            Start::Generate
        })
    }

    /// A scripted start could not run (the model failed): stop waiting.
    pub fn give_up(&mut self) {
        if self.auto_generate && !self.started {
            self.started = true;
            self.job_over();
        }
    }

    /// A job ended (any way).
    pub fn job_over(&mut self) {
        if self.first_job_done {
            return;
        }
        self.first_job_done = true;
        if self.screenshot.is_some() {
            self.shot_due = true;
        } else if self.quit_after_job {
            self.quit = true;
        }
    }

    /// The screenshot to take now (one frame after the job ended, so its image is on screen).
    pub fn take_due_shot(&mut self) -> Option<PathBuf> {
        if !std::mem::take(&mut self.shot_due) {
            return None;
        }
        self.screenshot.clone()
    }

    /// A screenshot was saved.
    pub fn shot_saved(&mut self) {
        if self.quit_after_job {
            self.quit = true;
        }
    }

    pub fn wants_quit(&self) -> bool {
        self.quit
    }

    /// Write the stats file, if one was asked for.
    pub fn write_stats(&self, stats: &UiStats) {
        let Some(p) = &self.stats_file else {
            return;
        };
        match serde_json::to_string_pretty(stats) {
            Ok(s) => {
                if let Err(e) = std::fs::write(p, s) {
                    tracing::warn!("cannot write {}: {e}", p.display());
                }
            }
            Err(e) => tracing::warn!("cannot serialise ui stats: {e}"),
        }
    }
}

/// Window screenshots: asked of the viewport, delivered a frame or two later.
pub struct Screenshots {
    pending: Option<PathBuf>,
    tx: mpsc::Sender<Arc<egui::ColorImage>>,
    rx: mpsc::Receiver<Arc<egui::ColorImage>>,
}

impl Default for Screenshots {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel();
        Self {
            pending: None,
            tx,
            rx,
        }
    }
}

impl Screenshots {
    /// Ask the window for a screenshot to be saved to `path`.
    pub fn request(&mut self, ctx: &egui::Context, path: PathBuf) {
        self.pending = Some(path);
        let tx = self.tx.clone();
        let waker = ctx.clone();
        ctx.send_viewport_cmd(egui::ViewportCommand::Screenshot(
            egui::ScreenshotCallback::new(move |img| {
                let _ = tx.send(img);
                waker.request_repaint();
            }),
        ));
    }

    /// The screenshots that arrived, with where they go.
    pub fn arrived(&mut self) -> Vec<(PathBuf, Arc<egui::ColorImage>)> {
        let shots: Vec<_> = self.rx.try_iter().collect();
        shots
            .into_iter()
            .filter_map(|img| self.pending.take().map(|p| (p, img)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scripted_run_starts_once_then_shoots_then_quits() {
        let mut s = Script::new(&StudioOptions {
            auto_generate: true,
            screenshot: Some("/tmp/s.png".into()),
            quit_after_job: true,
            ..StudioOptions::default()
        });
        assert_eq!(s.start(false), None, "waits for the model");
        assert_eq!(s.start(true), Some(Start::Generate));
        assert_eq!(s.start(true), None);
        s.job_over();
        assert!(!s.wants_quit());
        assert_eq!(s.take_due_shot(), Some(PathBuf::from("/tmp/s.png")));
        assert_eq!(s.take_due_shot(), None);
        s.shot_saved();
        assert!(s.wants_quit());
    }

    #[test]
    fn a_failed_model_ends_a_scripted_run() {
        let mut s = Script::new(&StudioOptions {
            auto_generate: true,
            quit_after_job: true,
            ..StudioOptions::default()
        });
        s.give_up();
        assert!(s.wants_quit());
        assert_eq!(s.start(true), None);
    }
}
