//! The studio window: settings panel on the left, the current image / compare view / gallery in
//! the middle, messages at the bottom. UI state lives here; the engine lives behind
//! [`Runtime`], which this only talks to through jobs and events, so the window never waits.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use egui::{Color32, Key, Modifiers, RichText, TextureHandle, TextureOptions};

use super::export::{self, DialogResult, Dialogs};
use super::gpu;
use super::heatmap;
use super::state::{Settings, PRESETS};
use crate::pipeline::image::RgbImage;
use crate::pipeline::preview::{Latent, PreviewFactors};
use crate::runtime::gallery::{self, Entry};
use crate::runtime::{Event, ImageResult, JobId, JobSpec, Runtime, RuntimeOptions};

/// How the studio starts (from `parallax studio`).
#[derive(Debug, Clone, Default)]
pub struct StudioOptions {
    /// Overrides of the persisted settings (model, devices and layout).
    pub model: Option<String>,
    pub placement: Option<crate::engine::Placement>,
    pub gallery_dir: Option<PathBuf>,
    /// Start a generation (or, with `compare`, a compare sweep) as soon as the window opens.
    pub auto_generate: bool,
    pub compare: bool,
    /// After the first job: save a window screenshot here.
    pub screenshot: Option<PathBuf>,
    /// After the first job (and screenshot): close the window.
    pub quit_after_job: bool,
    /// Write frame times and step-to-preview latencies here (JSON) when the window closes.
    pub ui_stats: Option<PathBuf>,
    /// Ignore persisted settings (tests, benchmarks).
    pub fresh_settings: bool,
    pub steps: Option<usize>,
    pub size: Option<(usize, usize)>,
    /// Do not look in the Hugging Face cache for FLUX repos (hermetic tests).
    pub skip_hf_cache: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tab {
    Image,
    Compare,
    Gallery,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ModelStatus {
    NotLoaded,
    Loading(String),
    Ready(String),
    Failed(String),
}

/// The job on screen.
#[derive(Debug, Clone)]
pub struct JobView {
    pub id: JobId,
    pub compare: bool,
    pub images: usize,
    pub image: usize,
    pub step: usize,
    pub total: usize,
    pub step_ms: Vec<f64>,
    pub reused: usize,
    pub layout: String,
    pub started: Instant,
}

impl JobView {
    /// Estimated time left in seconds from the median step time.
    pub fn eta_s(&self) -> Option<f64> {
        if self.step_ms.is_empty() || self.total == 0 {
            return None;
        }
        let mut v = self.step_ms.clone();
        v.sort_by(f64::total_cmp);
        let med = v[v.len() / 2];
        let left_steps = (self.total - self.step) + (self.images - self.image - 1) * self.total;
        Some(med * left_steps as f64 / 1e3)
    }
}

struct Preview {
    latent: Arc<Latent>,
    version: u64,
    emitted: Instant,
    measured: bool,
}

/// One finished image with its texture.
pub struct Shown {
    pub result: Arc<ImageResult>,
    pub image: Arc<RgbImage>,
    pub id: u64,
    tex: TextureHandle,
}

/// Frame times and step-to-preview latency, for the responsiveness benchmark.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct UiStats {
    /// CPU time of each frame drawn while a job ran (eframe's `cpu_usage`).
    pub frame_ms: Vec<f64>,
    /// From the engine emitting a step to the end of the frame that drew its preview.
    pub preview_latency_ms: Vec<f64>,
    pub steps_seen: usize,
}

pub struct Message {
    pub text: String,
    pub error: bool,
}

pub struct StudioApp {
    pub settings: Settings,
    pub tab: Tab,
    pub model: ModelStatus,
    pub heads: usize,
    pub job: Option<JobView>,
    pub result: Option<Shown>,
    pub compare: Vec<Shown>,
    pub compare_selected: usize,
    pub wipe: f32,
    pub show_heatmap: bool,
    pub gallery: Vec<Entry>,
    pub messages: Vec<Message>,
    pub stats: UiStats,
    pub dialogs: Dialogs,
    runtime: Runtime,
    factors: Option<Arc<PreviewFactors>>,
    preview: Option<Preview>,
    preview_tex: Option<(u64, TextureHandle)>,
    heat_tex: HashMap<(u64, u64, u32), TextureHandle>,
    thumbs: HashMap<PathBuf, TextureHandle>,
    gallery_dirty: bool,
    gpu: bool,
    dialog_tx: mpsc::Sender<DialogResult>,
    dialog_rx: mpsc::Receiver<DialogResult>,
    next_id: u64,
    opts: StudioOptions,
    auto_started: bool,
    first_job_done: bool,
    screenshot_pending: Option<PathBuf>,
    auto_shot_due: bool,
    shot_tx: mpsc::Sender<Arc<egui::ColorImage>>,
    shot_rx: mpsc::Receiver<Arc<egui::ColorImage>>,
    quit_requested: bool,
    /// FLUX repos found in the Hugging Face cache at start-up.
    hf_models: Vec<(String, PathBuf)>,
}

const SETTINGS_KEY: &str = "parallax-settings";

impl StudioApp {
    /// Build the app from eframe's creation context (window or test harness).
    pub fn new(cc: &eframe::CreationContext<'_>, opts: StudioOptions) -> anyhow::Result<Self> {
        let mut settings: Settings = if opts.fresh_settings {
            Settings::default()
        } else {
            cc.storage
                .and_then(|s| eframe::get_value(s, SETTINGS_KEY))
                .unwrap_or_default()
        };
        if let Some(m) = &opts.model {
            settings.model = m.clone();
        }
        if let Some(p) = &opts.placement {
            settings.set_placement(p);
        }
        if let Some(n) = opts.steps {
            settings.steps = n;
        }
        if let Some((w, h)) = opts.size {
            settings.width = w;
            settings.height = h;
        }
        let gpu = match &cc.wgpu_render_state {
            Some(rs) => {
                gpu::install(rs);
                true
            }
            None => false,
        };
        let ctx = cc.egui_ctx.clone();
        let runtime = Runtime::start(RuntimeOptions {
            engine: settings.engine_spec(),
            gallery_dir: Some(
                opts.gallery_dir
                    .clone()
                    .unwrap_or_else(gallery::default_dir),
            ),
            notify: Some(Arc::new(move || ctx.request_repaint())),
        })?;
        runtime.configure(settings.engine_spec());
        let (dialog_tx, dialog_rx) = mpsc::channel();
        let (shot_tx, shot_rx) = mpsc::channel();
        let hf_models = if opts.skip_hf_cache {
            Vec::new()
        } else {
            crate::model::layout::list_hf_cache()
        };
        Ok(Self {
            settings,
            tab: Tab::Image,
            model: ModelStatus::NotLoaded,
            heads: 24,
            job: None,
            result: None,
            compare: Vec::new(),
            compare_selected: 1,
            wipe: 0.5,
            show_heatmap: false,
            gallery: Vec::new(),
            messages: Vec::new(),
            stats: UiStats::default(),
            dialogs: Dialogs::Native,
            runtime,
            factors: None,
            preview: None,
            preview_tex: None,
            heat_tex: HashMap::new(),
            thumbs: HashMap::new(),
            gallery_dirty: true,
            gpu,
            dialog_tx,
            dialog_rx,
            next_id: 1,
            opts,
            auto_started: false,
            first_job_done: false,
            screenshot_pending: None,
            auto_shot_due: false,
            shot_tx,
            shot_rx,
            quit_requested: false,
            hf_models,
        })
    }

    /// Whether previews and heatmaps are drawn by the WGSL shaders.
    pub fn uses_gpu_shaders(&self) -> bool {
        self.gpu
    }

    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    pub fn is_busy(&self) -> bool {
        self.job.is_some()
    }

    fn say(&mut self, text: impl Into<String>, error: bool) {
        let text = text.into();
        if error {
            tracing::warn!("{text}");
        }
        self.messages.push(Message { text, error });
        if self.messages.len() > 50 {
            self.messages.remove(0);
        }
    }

    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Start a generation with the current settings (Ctrl+Enter).
    pub fn generate(&mut self) {
        self.start(false);
    }

    /// Start a compare sweep over the chosen thresholds.
    pub fn start_compare(&mut self) {
        self.start(true);
    }

    fn start(&mut self, compare: bool) {
        if self.job.is_some() {
            self.say("a job is running: cancel it (Esc) or wait", true);
            return;
        }
        let problems = self.settings.problems(self.heads);
        if !problems.is_empty() {
            for p in problems {
                self.say(p, true);
            }
            return;
        }
        if self.settings.random_seed {
            // Nine digits at most: easy to read back and type in the seed field.
            self.settings.seed = crate::model::rng::fresh_seed() % 1_000_000_000;
        }
        self.runtime.configure(self.settings.engine_spec());
        let base = self.settings.request();
        let spec = if compare {
            JobSpec::Compare {
                base,
                thresholds: self.settings.compare_thresholds.clone(),
            }
        } else {
            JobSpec::Generate(base)
        };
        let images = spec.requests().len();
        let id = self.runtime.submit(spec);
        if compare {
            self.compare.clear();
            self.tab = Tab::Compare;
        } else {
            self.tab = Tab::Image;
        }
        self.preview = None;
        self.job = Some(JobView {
            id,
            compare,
            images,
            image: 0,
            step: 0,
            total: self.settings.steps,
            step_ms: Vec::new(),
            reused: 0,
            layout: String::new(),
            started: Instant::now(),
        });
    }

    /// Cancel the running job (Esc).
    pub fn cancel(&mut self) {
        if let Some(j) = &self.job {
            self.runtime.cancel(j.id);
        }
    }

    /// Apply every waiting runtime event.
    pub fn poll(&mut self, ctx: &egui::Context) {
        while let Some(ev) = self.runtime.try_recv() {
            self.on_event(ctx, ev);
        }
        while let Ok(r) = self.dialog_rx.try_recv() {
            self.on_dialog(ctx, r);
        }
    }

    fn on_event(&mut self, ctx: &egui::Context, ev: Event) {
        let ours = |s: &Self| {
            ev.job()
                .is_some_and(|j| s.job.as_ref().is_some_and(|v| v.id == j))
        };
        match &ev {
            Event::ModelLoading { spec } => self.model = ModelStatus::Loading(spec.model.model.clone()),
            Event::ModelLoaded {
                summary,
                load_ms,
                heads,
                ..
            } => {
                self.model =
                    ModelStatus::Ready(format!("{summary} — loaded in {:.1} s", load_ms / 1e3));
                self.heads = *heads;
            }
            Event::ModelFailed { spec, error } => {
                self.model = ModelStatus::Failed(error.clone());
                self.say(format!("cannot load model `{}`: {error}", spec.model.model), true);
            }
            Event::PreviewFactors(f) => self.factors = Some(f.clone()),
            _ => {}
        }
        if !ours(self) {
            return;
        }
        match ev {
            Event::Started { layout, images, .. } => {
                if let Some(j) = &mut self.job {
                    j.layout = layout;
                    j.images = images;
                }
            }
            Event::Step {
                image,
                step,
                total,
                ms,
                reused,
                preview,
                at,
                ..
            } => {
                if let Some(j) = &mut self.job {
                    j.image = image;
                    j.step = step;
                    j.total = total;
                    j.step_ms.push(ms);
                    j.reused += usize::from(reused);
                }
                let version = self.new_id();
                self.preview = Some(Preview {
                    latent: preview,
                    version,
                    emitted: at,
                    measured: false,
                });
                self.stats.steps_seen += 1;
            }
            Event::ImageDone { result, .. } => {
                let shown = self.show(ctx, result);
                if let Some(n) = shown.result.notes.first() {
                    self.say(n.clone(), false);
                }
                if self.job.as_ref().is_some_and(|j| j.compare) {
                    self.compare.push(shown);
                } else {
                    self.result = Some(shown);
                    self.preview = None;
                }
                self.gallery_dirty = true;
            }
            Event::Finished { wall_ms, .. } => {
                self.say(format!("done in {:.2} s", wall_ms / 1e3), false);
                self.job_over();
            }
            Event::Failed { error, .. } => {
                self.say(format!("generation failed: {error}"), true);
                self.job_over();
            }
            Event::Cancelled { .. } => {
                self.say("cancelled", false);
                self.preview = None;
                self.job_over();
            }
            _ => {}
        }
    }

    fn job_over(&mut self) {
        self.job = None;
        if !self.first_job_done {
            self.first_job_done = true;
            if self.opts.screenshot.is_some() {
                self.auto_shot_due = true;
            } else if self.opts.quit_after_job {
                self.quit_requested = true;
            }
        }
    }

    fn show(&mut self, ctx: &egui::Context, result: Arc<ImageResult>) -> Shown {
        let image = Arc::new(result.generated.image.clone());
        let id = self.new_id();
        let tex = ctx.load_texture(
            format!("image-{id}"),
            color_image(&image),
            TextureOptions::NEAREST,
        );
        Shown {
            result,
            image,
            id,
            tex,
        }
    }

    fn on_dialog(&mut self, ctx: &egui::Context, r: DialogResult) {
        match r {
            DialogResult::SaveImage(Some(path), result) => match export::save_image(&path, &result)
            {
                Ok(()) => self.say(format!("saved {}", path.display()), false),
                Err(e) => self.say(format!("cannot save {}: {e}", path.display()), true),
            },
            DialogResult::Screenshot(Some(path)) => self.request_screenshot(ctx, path),
            DialogResult::OpenModel(Some(path)) => {
                self.settings.model = path.display().to_string();
                self.runtime.configure(self.settings.engine_spec());
            }
            _ => {}
        }
    }

    fn refresh_gallery(&mut self) {
        if !self.gallery_dirty {
            return;
        }
        self.gallery_dirty = false;
        if let Some(g) = self.runtime.gallery() {
            match g.list() {
                Ok(list) => self.gallery = list,
                Err(e) => self.say(format!("cannot read the gallery: {e}"), true),
            }
        }
    }

    /// Restore the settings of gallery entry `i`.
    pub fn restore_from_gallery(&mut self, i: usize) {
        if let Some(e) = self.gallery.get(i) {
            let s = e.settings.clone();
            self.settings.restore(&s);
            self.runtime.configure(self.settings.engine_spec());
            self.say(
                format!("settings restored from {}", e.path.display()),
                false,
            );
        }
    }

    /// Delete gallery entry `i` from disk.
    pub fn delete_from_gallery(&mut self, i: usize) {
        let Some(e) = self.gallery.get(i).cloned() else {
            return;
        };
        let res = self.runtime.gallery().map(|g| g.delete(&e.path));
        match res {
            Some(Ok(())) => {
                self.thumbs.remove(&e.path);
                self.gallery_dirty = true;
                self.say(format!("deleted {}", e.path.display()), false);
            }
            Some(Err(err)) => self.say(format!("cannot delete: {err}"), true),
            None => {}
        }
    }

    /// Export the image on screen through the save dialog.
    pub fn export_current(&mut self) {
        let res = match self.tab {
            Tab::Compare => self
                .compare
                .get(self.compare_selected)
                .map(|s| s.result.clone()),
            _ => self.result.as_ref().map(|s| s.result.clone()),
        };
        match res {
            Some(r) => {
                let name = format!("parallax-{}.png", r.generated.settings.seed);
                self.dialogs
                    .save_png(&self.runtime, name, r, self.dialog_tx.clone());
            }
            None => self.say("nothing to export yet", true),
        }
    }

    /// Save a screenshot of the window through the save dialog.
    pub fn screenshot(&mut self) {
        self.dialogs
            .screenshot(&self.runtime, self.dialog_tx.clone());
    }

    // ----- drawing -------------------------------------------------------------------------

    fn keys(&mut self, ctx: &egui::Context) {
        if ctx.input_mut(|i| i.consume_key(Modifiers::COMMAND, Key::Enter)) {
            self.generate();
        }
        if ctx.input_mut(|i| i.consume_key(Modifiers::NONE, Key::Escape)) {
            self.cancel();
        }
    }

    fn settings_panel(&mut self, ui: &mut egui::Ui) {
        ui.heading("Parallax");
        ui.label(RichText::new("FLUX.1 over many GPUs").weak());
        ui.separator();
        let model_label = ui.label("Model");
        ui.horizontal(|ui| {
            ui.add(egui::TextEdit::singleline(&mut self.settings.model).desired_width(150.0))
                .labelled_by(model_label.id);
            if ui
                .button("Open…")
                .on_hover_text("a .safetensors file or a model folder")
                .clicked()
            {
                self.dialogs
                    .open_model(&self.runtime, self.dialog_tx.clone());
            }
        });
        ui.horizontal(|ui| {
            for (label, value) in [("Demo", "demo"), ("dev", "dev"), ("schnell", "schnell")] {
                if ui
                    .small_button(label)
                    .on_hover_text(format!("--model {value}"))
                    .clicked()
                {
                    self.settings.model = value.into();
                    self.runtime.configure(self.settings.engine_spec());
                }
            }
            if ui.small_button("Load").clicked() {
                self.runtime.configure(self.settings.engine_spec());
            }
        });
        if self.hf_models.is_empty() {
            ui.label(
                RichText::new("no FLUX repos in the Hugging Face cache")
                    .small()
                    .weak(),
            );
        } else {
            let mut pick = None;
            egui::ComboBox::from_id_salt("hf-cache")
                .selected_text("Hugging Face cache…")
                .show_ui(ui, |ui| {
                    for (repo, _) in &self.hf_models {
                        if ui
                            .selectable_label(self.settings.model == *repo, repo)
                            .clicked()
                        {
                            pick = Some(repo.clone());
                        }
                    }
                })
                .response
                .labelled_by(model_label.id);
            if let Some(repo) = pick {
                self.settings.model = repo;
                self.runtime.configure(self.settings.engine_spec());
            }
        }
        match &self.model {
            ModelStatus::NotLoaded => ui.label(RichText::new("not loaded").weak()),
            ModelStatus::Loading(m) => ui.label(format!("loading {m}…")),
            ModelStatus::Ready(s) => ui.label(RichText::new(s).small()),
            ModelStatus::Failed(e) => ui.colored_label(Color32::LIGHT_RED, e),
        };
        ui.separator();
        let l = ui.label("Prompt");
        ui.add(
            egui::TextEdit::multiline(&mut self.settings.prompt)
                .desired_rows(4)
                .desired_width(f32::INFINITY)
                .hint_text("what to draw"),
        )
        .labelled_by(l.id);
        let l = ui.label("Negative prompt (true CFG > 1)");
        ui.add(
            egui::TextEdit::multiline(&mut self.settings.negative_prompt)
                .desired_rows(2)
                .desired_width(f32::INFINITY),
        )
        .labelled_by(l.id);
        egui::Grid::new("sampling").num_columns(2).show(ui, |ui| {
            let size_label = ui.label("Size");
            let current = PRESETS
                .iter()
                .find(|p| p.1 == self.settings.width && p.2 == self.settings.height)
                .map_or("custom", |p| p.0);
            egui::ComboBox::from_id_salt("size")
                .selected_text(current)
                .show_ui(ui, |ui| {
                    for &(name, w, h) in PRESETS {
                        if ui.selectable_label(current == name, name).clicked() {
                            self.settings.width = w;
                            self.settings.height = h;
                        }
                    }
                })
                .response
                .labelled_by(size_label.id);
            ui.end_row();
            ui.label("W x H");
            ui.horizontal(|ui| {
                let l = ui.label("width");
                ui.add(
                    egui::DragValue::new(&mut self.settings.width)
                        .range(16..=8192)
                        .speed(16),
                )
                .labelled_by(l.id);
                let l = ui.label("height");
                ui.add(
                    egui::DragValue::new(&mut self.settings.height)
                        .range(16..=8192)
                        .speed(16),
                )
                .labelled_by(l.id);
            });
            ui.end_row();
            let l = ui.label("Steps");
            ui.add(egui::DragValue::new(&mut self.settings.steps).range(1..=100))
                .labelled_by(l.id);
            ui.end_row();
            let l = ui.label("Seed");
            ui.horizontal(|ui| {
                ui.add_enabled(
                    !self.settings.random_seed,
                    egui::DragValue::new(&mut self.settings.seed),
                )
                .labelled_by(l.id);
                ui.checkbox(&mut self.settings.random_seed, "random");
                if ui.small_button("Copy").clicked() {
                    ui.ctx().copy_text(self.settings.seed.to_string());
                }
            });
            ui.end_row();
            let l = ui.label("Guidance");
            ui.add(
                egui::DragValue::new(&mut self.settings.guidance)
                    .range(0.0..=20.0)
                    .speed(0.1),
            )
            .labelled_by(l.id);
            ui.end_row();
            let l = ui.label("True CFG");
            ui.add(
                egui::DragValue::new(&mut self.settings.true_cfg)
                    .range(1.0..=20.0)
                    .speed(0.1),
            )
            .labelled_by(l.id);
            ui.end_row();
            let l = ui.label("Cache threshold");
            ui.add(egui::Slider::new(&mut self.settings.cache_threshold, 0.0..=0.3).step_by(0.01))
                .labelled_by(l.id)
                .on_hover_text("First Block Cache residual_diff_threshold; 0 = off");
            ui.end_row();
        });
        ui.separator();
        self.layout_editor(ui);
        ui.separator();
        let problems = self.settings.problems(self.heads);
        for p in &problems {
            ui.colored_label(Color32::LIGHT_RED, p);
        }
        ui.horizontal(|ui| {
            let busy = self.job.is_some();
            if ui
                .add_enabled(!busy && problems.is_empty(), egui::Button::new("Generate"))
                .on_hover_text("Ctrl+Enter")
                .clicked()
            {
                self.generate();
            }
            if ui
                .add_enabled(busy, egui::Button::new("Cancel"))
                .on_hover_text("Esc")
                .clicked()
            {
                self.cancel();
            }
        });
        ui.horizontal(|ui| {
            let l = ui.label("Compare");
            let mut text = self
                .settings
                .compare_thresholds
                .iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            if ui
                .add(egui::TextEdit::singleline(&mut text).desired_width(110.0))
                .labelled_by(l.id)
                .changed()
            {
                self.settings.compare_thresholds = text
                    .split(',')
                    .filter_map(|s| s.trim().parse::<f64>().ok())
                    .collect();
            }
            if ui
                .add_enabled(
                    self.job.is_none() && problems.is_empty(),
                    egui::Button::new("Run compare"),
                )
                .clicked()
            {
                self.start_compare();
            }
        });
    }

    fn layout_editor(&mut self, ui: &mut egui::Ui) {
        ui.label("Devices and layout");
        let gpus = crate::device::cuda_device_count();
        if gpus == 0 {
            ui.label(
                RichText::new(
                    "No GPUs found (CPU build or no CUDA device): CPU worker threads stand in.",
                )
                .small()
                .weak(),
            );
        } else {
            ui.label(RichText::new(format!("{gpus} CUDA GPU(s) found")).small());
        }
        egui::Grid::new("layout").num_columns(2).show(ui, |ui| {
            let l = ui.label("Device");
            ui.add(egui::TextEdit::singleline(&mut self.settings.device).desired_width(80.0))
                .labelled_by(l.id);
            ui.end_row();
            let l = ui.label("Workers");
            ui.add(egui::DragValue::new(&mut self.settings.workers).range(1..=64))
                .labelled_by(l.id);
            ui.end_row();
        });
        ui.checkbox(&mut self.settings.layout_auto, "auto layout");
        if !self.settings.layout_auto {
            ui.horizontal(|ui| {
                for (label, v) in [
                    ("ulysses", &mut self.settings.ulysses),
                    ("ring", &mut self.settings.ring),
                    ("cfg", &mut self.settings.cfg),
                    ("dp", &mut self.settings.dp),
                ] {
                    let l = ui.label(label);
                    ui.add(egui::DragValue::new(v).range(1..=64))
                        .labelled_by(l.id);
                }
            });
        }
        match self.settings.layout_check(self.heads) {
            Ok(s) => ui.label(RichText::new(s).small()),
            Err(e) => ui.colored_label(Color32::LIGHT_RED, e),
        };
    }

    fn progress(&mut self, ui: &mut egui::Ui) {
        if let Some(j) = &self.job {
            let done = (j.image * j.total + j.step) as f32 / (j.images * j.total).max(1) as f32;
            let last = j.step_ms.last().copied().unwrap_or(0.0);
            let eta = j
                .eta_s()
                .map_or(String::new(), |s| format!(", about {s:.1} s left"));
            let text = if j.step == 0 {
                format!(
                    "starting {} (encoding the prompt)…",
                    if j.compare { "compare" } else { "generation" }
                )
            } else {
                format!(
                    "image {}/{} step {}/{} — {:.0} ms/step{}{}",
                    j.image + 1,
                    j.images,
                    j.step,
                    j.total,
                    last,
                    eta,
                    if j.reused > 0 {
                        format!(", {} reused", j.reused)
                    } else {
                        String::new()
                    }
                )
            };
            ui.add(egui::ProgressBar::new(done).text(text));
            if !j.layout.is_empty() {
                ui.label(RichText::new(&j.layout).small().weak());
            }
        }
    }

    /// Draw the latest latent preview into `rect`; returns true when something was drawn.
    fn draw_preview(&mut self, ui: &mut egui::Ui, rect: egui::Rect) -> bool {
        let (Some(p), Some(f)) = (&mut self.preview, &self.factors) else {
            return false;
        };
        if self.gpu {
            ui.painter().add(egui_wgpu::Callback::new_paint_callback(
                rect,
                gpu::PreviewCallback {
                    latent: p.latent.clone(),
                    version: p.version,
                    factors: f.clone(),
                },
            ));
        } else {
            if self
                .preview_tex
                .as_ref()
                .is_none_or(|(v, _)| *v != p.version)
            {
                let rgb = RgbImage {
                    width: p.latent.width,
                    height: p.latent.height,
                    data: f.apply(&p.latent),
                };
                let tex = ui.ctx().load_texture(
                    "latent-preview",
                    color_image(&rgb),
                    TextureOptions::NEAREST,
                );
                self.preview_tex = Some((p.version, tex));
            }
            if let Some((_, t)) = &self.preview_tex {
                ui.painter().image(t.id(), rect, full_uv(), Color32::WHITE);
            }
        }
        if !p.measured {
            p.measured = true;
            self.stats
                .preview_latency_ms
                .push(p.emitted.elapsed().as_secs_f64() * 1e3);
        }
        true
    }

    fn image_tab(&mut self, ui: &mut egui::Ui) {
        let avail = ui.available_size();
        let (w, h) = match (&self.preview, &self.result) {
            (Some(p), _) => (p.latent.width as f32 * 8.0, p.latent.height as f32 * 8.0),
            (None, Some(r)) => (r.image.width as f32, r.image.height as f32),
            _ => (self.settings.width as f32, self.settings.height as f32),
        };
        let scale = (avail.x / w).min((avail.y - 60.0) / h).clamp(0.05, 4.0);
        let (rect, _) =
            ui.allocate_exact_size(egui::vec2(w * scale, h * scale), egui::Sense::hover());
        let drawn = self.job.is_some() && self.draw_preview(ui, rect);
        if !drawn {
            if let Some(r) = &self.result {
                ui.painter()
                    .image(r.tex.id(), rect, full_uv(), Color32::WHITE);
            } else {
                ui.painter().rect_filled(rect, 4.0, Color32::from_gray(30));
                ui.painter().text(
                    rect.center(),
                    egui::Align2::CENTER_CENTER,
                    if self.job.is_some() {
                        "working…"
                    } else {
                        "Ctrl+Enter to generate"
                    },
                    egui::FontId::proportional(16.0),
                    Color32::GRAY,
                );
            }
        }
        if let Some(r) = &self.result {
            let g = &r.result.generated;
            ui.label(format!(
                "{}x{}, {} steps ({} computed, {} reused), seed {}, {:.2} s",
                g.settings.width,
                g.settings.height,
                g.settings.steps,
                g.stats.computed,
                g.stats.reused,
                g.settings.seed,
                g.timings.total_ms / 1e3
            ));
        }
    }

    fn compare_tab(&mut self, ui: &mut egui::Ui) {
        if self.compare.is_empty() {
            if self.job.as_ref().is_some_and(|j| j.compare) {
                let avail = ui.available_width().min(512.0);
                let (rect, _) =
                    ui.allocate_exact_size(egui::vec2(avail, avail), egui::Sense::hover());
                self.draw_preview(ui, rect);
            } else {
                ui.label("Run a compare sweep: the same prompt and seed at each cache threshold, against the uncached image.");
            }
            return;
        }
        // Table of results.
        egui::Grid::new("compare-table")
            .striped(true)
            .num_columns(7)
            .show(ui, |ui| {
                for h in [
                    "threshold",
                    "wall time",
                    "speedup",
                    "steps computed / reused",
                    "PSNR",
                    "SSIM",
                    "",
                ] {
                    ui.strong(h);
                }
                ui.end_row();
                for (i, s) in self.compare.iter().enumerate() {
                    let g = &s.result.generated;
                    ui.label(format!("{}", g.settings.cache_threshold));
                    ui.label(format!("{:.2} s", g.timings.total_ms / 1e3));
                    ui.label(
                        s.result
                            .speedup
                            .map_or("reference".into(), |x| format!("{x:.2}x")),
                    );
                    ui.label(format!("{} / {}", g.stats.computed, g.stats.reused));
                    ui.label(s.result.quality.map_or("—".into(), |q| {
                        if q.psnr_db.is_infinite() {
                            "identical".into()
                        } else {
                            format!("{:.2} dB", q.psnr_db)
                        }
                    }));
                    ui.label(
                        s.result
                            .quality
                            .map_or("—".into(), |q| format!("{:.4}", q.ssim)),
                    );
                    if i > 0 && ui.radio(self.compare_selected == i, "show").clicked() {
                        self.compare_selected = i;
                    }
                    ui.end_row();
                }
            });
        if let Some(j) = &self.job {
            ui.label(format!("running image {} of {}…", j.image + 1, j.images));
        }
        ui.horizontal(|ui| {
            let l = ui.label("wipe");
            ui.add(egui::Slider::new(&mut self.wipe, 0.0..=1.0).show_value(false))
                .labelled_by(l.id);
            ui.checkbox(&mut self.show_heatmap, "difference heatmap");
            ui.add(egui::Slider::new(&mut self.settings.heatmap_gain, 1.0..=16.0).text("gain"));
        });
        let (Some(reference), Some(sel)) = (
            self.compare.first(),
            self.compare.get(self.compare_selected),
        ) else {
            return;
        };
        let avail = ui.available_size();
        let (w, h) = (reference.image.width as f32, reference.image.height as f32);
        let scale = (avail.x / w).min(avail.y / h).clamp(0.05, 4.0);
        let (rect, _) =
            ui.allocate_exact_size(egui::vec2(w * scale, h * scale), egui::Sense::hover());
        if self.show_heatmap {
            let gain = self.settings.heatmap_gain;
            if self.gpu {
                ui.painter().add(egui_wgpu::Callback::new_paint_callback(
                    rect,
                    gpu::HeatmapCallback {
                        reference: (reference.id, reference.image.clone()),
                        candidate: (sel.id, sel.image.clone()),
                        gain,
                    },
                ));
            } else {
                let key = (reference.id, sel.id, gain.to_bits());
                if let std::collections::hash_map::Entry::Vacant(slot) = self.heat_tex.entry(key) {
                    if let Some(img) = heatmap::diff_heatmap(&reference.image, &sel.image, gain) {
                        slot.insert(ui.ctx().load_texture(
                            "heatmap",
                            color_image(&img),
                            TextureOptions::NEAREST,
                        ));
                    }
                }
                if let Some(t) = self.heat_tex.get(&key) {
                    ui.painter().image(t.id(), rect, full_uv(), Color32::WHITE);
                }
            }
        } else {
            // Wipe: the reference left of the line, the selected threshold right of it.
            let x = rect.left() + rect.width() * self.wipe;
            let left = egui::Rect::from_min_max(rect.min, egui::pos2(x, rect.max.y));
            let right = egui::Rect::from_min_max(egui::pos2(x, rect.min.y), rect.max);
            let uv_l = egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(self.wipe, 1.0));
            let uv_r = egui::Rect::from_min_max(egui::pos2(self.wipe, 0.0), egui::pos2(1.0, 1.0));
            ui.painter()
                .image(reference.tex.id(), left, uv_l, Color32::WHITE);
            ui.painter()
                .image(sel.tex.id(), right, uv_r, Color32::WHITE);
            ui.painter()
                .vline(x, rect.y_range(), egui::Stroke::new(2.0, Color32::WHITE));
        }
        ui.label(
            RichText::new(format!(
                "left: reference (threshold 0) · right: threshold {}",
                sel.result.generated.settings.cache_threshold
            ))
            .small(),
        );
    }

    fn gallery_tab(&mut self, ui: &mut egui::Ui) {
        self.refresh_gallery();
        if let Some(g) = self.runtime.gallery() {
            ui.label(
                RichText::new(format!(
                    "{} images in {}",
                    self.gallery.len(),
                    g.dir().display()
                ))
                .small(),
            );
        }
        let mut restore = None;
        let mut delete = None;
        egui::ScrollArea::vertical().show(ui, |ui| {
            ui.horizontal_wrapped(|ui| {
                for (i, e) in self.gallery.iter().enumerate() {
                    ui.vertical(|ui| {
                        ui.set_width(140.0);
                        if !self.thumbs.contains_key(&e.path) {
                            if let Ok((img, _)) = crate::pipeline::image::read_png(&e.path) {
                                let t = gallery::thumbnail(&img, 128);
                                let tex = ui.ctx().load_texture(
                                    e.path.display().to_string(),
                                    color_image(&t),
                                    TextureOptions::LINEAR,
                                );
                                self.thumbs.insert(e.path.clone(), tex);
                            }
                        }
                        if let Some(t) = self.thumbs.get(&e.path) {
                            ui.image((t.id(), t.size_vec2()));
                        }
                        let prompt: String = e.settings.prompt.chars().take(40).collect();
                        ui.label(RichText::new(prompt).small());
                        ui.label(
                            RichText::new(format!(
                                "seed {} · t {}",
                                e.settings.seed, e.settings.cache_threshold
                            ))
                            .small()
                            .weak(),
                        );
                        ui.horizontal(|ui| {
                            if ui
                                .small_button("Restore")
                                .on_hover_text("use these settings")
                                .clicked()
                            {
                                restore = Some(i);
                            }
                            if ui.small_button("Delete").clicked() {
                                delete = Some(i);
                            }
                        });
                    });
                }
            });
        });
        if let Some(i) = restore {
            self.restore_from_gallery(i);
        }
        if let Some(i) = delete {
            self.delete_from_gallery(i);
        }
    }

    fn messages_panel(&mut self, ui: &mut egui::Ui) {
        let mut dismiss = None;
        for (i, m) in self.messages.iter().enumerate().rev().take(3) {
            ui.horizontal(|ui| {
                if m.error {
                    ui.colored_label(Color32::LIGHT_RED, &m.text);
                } else {
                    ui.label(&m.text);
                }
                if ui.small_button("×").clicked() {
                    dismiss = Some(i);
                }
            });
        }
        if let Some(i) = dismiss {
            self.messages.remove(i);
        }
    }

    /// Ask the window for a screenshot; it is saved to `path` when it arrives.
    fn request_screenshot(&mut self, ctx: &egui::Context, path: PathBuf) {
        self.screenshot_pending = Some(path);
        let tx = self.shot_tx.clone();
        let waker = ctx.clone();
        ctx.send_viewport_cmd(egui::ViewportCommand::Screenshot(
            egui::ScreenshotCallback::new(move |img| {
                let _ = tx.send(img);
                waker.request_repaint();
            }),
        ));
    }

    fn take_screenshot_events(&mut self) {
        let shots: Vec<Arc<egui::ColorImage>> = self.shot_rx.try_iter().collect();
        for img in shots {
            if let Some(path) = self.screenshot_pending.take() {
                match export::save_screenshot(&path, &img) {
                    Ok(()) => self.say(format!("screenshot saved to {}", path.display()), false),
                    Err(e) => self.say(format!("cannot save the screenshot: {e}"), true),
                }
                if self.opts.quit_after_job {
                    self.quit_requested = true;
                }
            }
        }
    }

    fn write_stats(&self) {
        if let Some(p) = &self.opts.ui_stats {
            match serde_json::to_string_pretty(&self.stats) {
                Ok(s) => {
                    if let Err(e) = std::fs::write(p, s) {
                        tracing::warn!("cannot write {}: {e}", p.display());
                    }
                }
                Err(e) => tracing::warn!("cannot serialise ui stats: {e}"),
            }
        }
    }
}

impl eframe::App for StudioApp {
    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut eframe::Frame) {
        // CPU time eframe spent on the previous frame (ui, layout, tessellation, paint submit).
        if self.job.is_some() {
            if let Some(cpu) = frame.info().cpu_usage {
                self.stats.frame_ms.push(cpu as f64 * 1e3);
            }
        }
        let ctx = ui.ctx().clone();
        self.poll(&ctx);
        self.keys(&ctx);
        self.take_screenshot_events();
        if self.opts.auto_generate
            && !self.auto_started
            && matches!(self.model, ModelStatus::Ready(_))
        {
            self.auto_started = true;
            if self.opts.compare {
                self.start_compare()
            } else {
                self.generate()
            }
        }

        egui::Panel::left("settings")
            .default_size(320.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| self.settings_panel(ui));
            });
        egui::Panel::bottom("messages").show(ui, |ui| self.messages_panel(ui));
        egui::CentralPanel::default().show(ui, |ui| {
            ui.horizontal(|ui| {
                ui.selectable_value(&mut self.tab, Tab::Image, "Image");
                ui.selectable_value(&mut self.tab, Tab::Compare, "Compare");
                if ui
                    .selectable_value(&mut self.tab, Tab::Gallery, "Gallery")
                    .clicked()
                {
                    self.gallery_dirty = true;
                }
                ui.separator();
                if ui.button("Export PNG…").clicked() {
                    self.export_current();
                }
                if ui.button("Screenshot…").clicked() {
                    self.screenshot();
                }
            });
            self.progress(ui);
            match self.tab {
                Tab::Image => self.image_tab(ui),
                Tab::Compare => self.compare_tab(ui),
                Tab::Gallery => self.gallery_tab(ui),
            }
        });

        if self.auto_shot_due {
            // One frame after the job ends, so the final image is on screen.
            self.auto_shot_due = false;
            if let Some(p) = self.opts.screenshot.clone() {
                self.request_screenshot(&ctx, p);
            }
        }
        if self.quit_requested {
            self.write_stats();
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
        }
        if self.job.is_some() {
            // Frames come with every engine event (the runtime wakes the window); this tick only
            // keeps the elapsed time and ETA fresh. No busy repainting: on a CPU-only machine the
            // renderer would take cores from the engine.
            ctx.request_repaint_after(std::time::Duration::from_millis(250));
        }
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, SETTINGS_KEY, &self.settings);
    }

    fn on_exit(&mut self) {
        self.write_stats();
    }
}

fn color_image(img: &RgbImage) -> egui::ColorImage {
    egui::ColorImage::from_rgb([img.width, img.height], &img.data)
}

fn full_uv() -> egui::Rect {
    egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(1.0, 1.0))
}
