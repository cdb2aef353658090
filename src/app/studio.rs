//! The studio window and its state: [`StudioApp`] owns the saved [`Settings`], the view state
//! ([`super::view`]), and the handles (the [`Runtime`], textures, channels). Each frame it applies
//! the runtime's events, draws the panels and tabs (which queue [`Command`]s), then applies the
//! commands in one place ([`StudioApp::apply`]). The engine lives behind the runtime, which this
//! only talks to through jobs and events, so the window never waits.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};

use egui::{Key, Modifiers};

use super::automation::{Screenshots, Script, Start, UiStats};
use super::command::{Command, Commands};
use super::dialogs::{Answer, DialogAnswer, Dialogs, PathPrompt, PathRequest};
use super::export;
use super::gpu;
use super::messages::MessageLog;
use super::panels::{self, settings::Panel};
use super::preview::LivePreview;
use super::state::{ModelShape, Settings};
use super::tabs::{self, compare::HeatmapCache, gallery::Thumbs};
use super::view::{CompareView, GalleryView, JobView, ModelStatus, Opened, QueuedJob, Shown, Tab};
use crate::pipeline::GenerateRequest;
use crate::runtime::gallery;
use crate::runtime::{Event, ImageResult, JobId, JobSpec, Runtime, RuntimeOptions};

/// How the studio starts (from `parallax studio`).
#[derive(Debug, Clone, Default)]
pub struct StudioOptions {
    /// Overrides of the persisted settings (model, devices and layout).
    pub model: Option<String>,
    /// One device (`--device`): sets the device list and nothing else.
    pub device: Option<String>,
    /// Devices and layout (`--devices`, degrees, `--parallel auto`).
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
    /// Do not look in the Hugging Face cache or ComfyUI installs for FLUX models (hermetic
    /// tests).
    pub skip_hf_cache: bool,
}

pub struct StudioApp {
    // Saved between runs.
    pub settings: Settings,
    /// Where the settings are saved (atomically; [`super::settings_file`]); `None`: in eframe's
    /// storage, where no home folder is known, or with `--fresh` (then nothing is saved unless a
    /// file is set here).
    pub settings_file: Option<PathBuf>,
    /// Whether the settings are kept at all (not with `--fresh`: the remembered ones stay).
    remember_settings: bool,
    /// The last failed save's message (said once, not at every auto-save).
    settings_save_error: Option<String>,
    // What is on screen.
    pub tab: Tab,
    pub model: ModelStatus,
    /// The loaded model's heads and blocks (what a layout must divide, PipeFusion's most stages).
    pub model_shape: ModelShape,
    pub job: Option<JobView>,
    /// Jobs waiting behind the running one, in the order they will run.
    pub queue: Vec<QueuedJob>,
    pub result: Option<Shown>,
    pub compare: Vec<Shown>,
    pub compare_view: CompareView,
    pub gallery: GalleryView,
    pub messages: MessageLog,
    pub stats: UiStats,
    /// Where paths come from (tests set a fixed folder).
    pub dialogs: Dialogs,
    /// The in-window path field, when the desktop has no file dialog.
    pub path_prompt: Option<PathPrompt>,
    /// Why images will not be kept in the gallery (checked when a job starts).
    gallery_warning: Option<String>,
    /// The saved settings' model, until it loads: if it fails, the studio falls back to the demo.
    remembered_model: Option<String>,
    /// FLUX repos found in the Hugging Face cache at start-up (and after a download).
    hf_models: Vec<(String, PathBuf)>,
    /// The "Download…" widget beside the model picker.
    pub download: super::download::Downloader,
    /// FLUX transformers in the ComfyUI installs found.
    comfy_models: Vec<PathBuf>,
    /// The GPUs found at start-up (name, memory), for the devices panel.
    gpus: Vec<crate::device::GpuInfo>,
    // Handles.
    runtime: Runtime,
    preview: LivePreview,
    heat: HeatmapCache,
    thumbs: Thumbs,
    dialog_tx: mpsc::Sender<DialogAnswer>,
    dialog_rx: mpsc::Receiver<DialogAnswer>,
    screenshots: Screenshots,
    script: Script,
    cmds: Commands,
    next_id: u64,
}

const SETTINGS_KEY: &str = "parallax-settings";

/// How long after a runtime event the window redraws (events within it share one frame).
const EVENT_REPAINT_DELAY: std::time::Duration = std::time::Duration::from_millis(30);

/// A saved model that names a file or folder which is no longer there (names the loader looks
/// up elsewhere, `demo`, `random:…`, `dev`, `schnell`, repo ids, are not judged here).
fn model_file_gone(model: &str) -> bool {
    let m = model.trim();
    let lower = m.to_ascii_lowercase();
    let named = matches!(
        lower.as_str(),
        "demo"
            | "dev"
            | "schnell"
            | "flux.1-dev"
            | "flux1-dev"
            | "flux.1-schnell"
            | "flux1-schnell"
    );
    if m.is_empty() || named || lower.starts_with("random:") {
        return false;
    }
    let looks_like_path = m.starts_with('/')
        || m.starts_with('.')
        || m.starts_with('~')
        || lower.ends_with(".safetensors")
        || m.matches('/').count() != 1
        || m.contains('\\');
    looks_like_path && !Path::new(m).exists()
}

/// The settings saved last time, and why they could not be used if they were there but
/// damaged: from the settings `file` ([`super::settings_file`]); where it does not exist yet, from
/// eframe's `storage`, where earlier versions kept them (in RON, which cannot read back today's
/// [`Settings`]: such settings give the defaults, with the reason).
pub fn saved_settings(
    file: Option<&Path>,
    storage: Option<&dyn eframe::Storage>,
) -> (Option<Settings>, Option<String>) {
    use super::settings_file::{load, Loaded};
    match file.map_or(Loaded::Missing, load) {
        Loaded::Read(s) => (Some(*s), None),
        Loaded::Damaged(why) => (None, Some(why)),
        Loaded::Missing => {
            let Some((st, text)) = storage.and_then(|st| Some((st, st.get_string(SETTINGS_KEY)?)))
            else {
                return (None, None);
            };
            match eframe::get_value::<Settings>(st, SETTINGS_KEY) {
                Some(s) => (Some(s), None),
                None => (
                    None,
                    Some(format!(
                        "eframe's storage holds settings that do not parse ({} bytes)",
                        text.len()
                    )),
                ),
            }
        }
    }
}

/// The settings the studio starts with: the saved ones (unless `fresh_settings`), then the
/// command line's overrides. A saved model file that has gone falls back to the demo; the note
/// says so.
pub fn startup_settings(
    saved: Option<Settings>,
    opts: &StudioOptions,
) -> (Settings, Option<String>) {
    let mut settings = if opts.fresh_settings {
        Settings::default()
    } else {
        saved.unwrap_or_default()
    };
    let mut note = None;
    if opts.model.is_none() && model_file_gone(&settings.model) {
        note = Some(format!(
            "the model used last time, {}, is not there any more: using the demo model",
            settings.model.trim()
        ));
        settings.model = "demo".into();
    }
    if let Some(m) = &opts.model {
        settings.model = m.clone();
    }
    if let Some(d) = &opts.device {
        settings.device = d.clone();
    }
    if let Some(p) = &opts.placement {
        settings.set_placement(p);
    }
    if let Some(n) = opts.steps {
        settings.request.steps = Some(n);
    }
    if let Some((w, h)) = opts.size {
        settings.request.width = w;
        settings.request.height = h;
    }
    (settings, note)
}

impl StudioApp {
    /// Build the app from eframe's creation context (window or test harness).
    pub fn new(cc: &eframe::CreationContext<'_>, opts: StudioOptions) -> anyhow::Result<Self> {
        // `--fresh` starts from the defaults and leaves the remembered settings as they are.
        let settings_file = if opts.fresh_settings {
            None
        } else {
            super::settings_file::default_path()
        };
        // Saved settings that no longer parse (a damaged file, or one from another program):
        // defaults, and say so.
        let (saved, damaged) = if opts.fresh_settings {
            (None, None)
        } else {
            saved_settings(settings_file.as_deref(), cc.storage)
        };
        let (settings, note) = startup_settings(saved, &opts);
        let remembered_model = (opts.model.is_none()
            && !opts.fresh_settings
            && !settings.model.trim().eq_ignore_ascii_case("demo"))
        .then(|| settings.model.trim().to_string());
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
            // One frame per burst of events: `request_repaint()` would draw two frames for each
            // (egui repaints twice after an immediate request), a small delay coalesces them.
            notify: Some(Arc::new(move || {
                ctx.request_repaint_after(EVENT_REPAINT_DELAY)
            })),
        })?;
        runtime.configure(settings.engine_spec());
        let (dialog_tx, dialog_rx) = mpsc::channel();
        let hf_models = if opts.skip_hf_cache {
            Vec::new()
        } else {
            crate::model::layout::list_hf_cache()
        };
        let comfy_models = if opts.skip_hf_cache {
            Vec::new()
        } else {
            crate::model::comfyui::installed_flux_models()
        };
        let mut app = Self {
            settings,
            settings_file,
            remember_settings: !opts.fresh_settings,
            settings_save_error: None,
            tab: Tab::Image,
            model: ModelStatus::NotLoaded,
            model_shape: ModelShape::default(),
            job: None,
            queue: Vec::new(),
            result: None,
            compare: Vec::new(),
            compare_view: CompareView::default(),
            gallery: GalleryView {
                dirty: true,
                ..GalleryView::default()
            },
            messages: MessageLog::default(),
            stats: UiStats::default(),
            dialogs: Dialogs::detect(),
            path_prompt: None,
            gallery_warning: None,
            remembered_model,
            hf_models,
            download: Default::default(),
            comfy_models,
            gpus: crate::device::gpus(),
            runtime,
            preview: LivePreview::new(gpu),
            heat: HeatmapCache::default(),
            thumbs: Thumbs::default(),
            dialog_tx,
            dialog_rx,
            screenshots: Screenshots::default(),
            script: Script::new(&opts),
            cmds: Commands::default(),
            next_id: 1,
        };
        if let Some(why) = damaged {
            tracing::warn!("saved settings unusable: {why}");
            app.say(
                format!(
                    "the saved settings could not be read (damaged?): starting from the defaults \
                     ({why})"
                ),
                true,
            );
        }
        if let Some(n) = note {
            app.say(n, true);
        }
        app.check_gallery();
        Ok(app)
    }

    /// Whether previews and heatmaps are drawn by the WGSL shaders.
    pub fn uses_gpu_shaders(&self) -> bool {
        self.preview.uses_gpu()
    }

    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    pub fn is_busy(&self) -> bool {
        self.job.is_some()
    }

    fn say(&mut self, text: impl Into<String>, error: bool) {
        self.messages.push(text, error);
    }

    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Why Generate is refused now (empty: it is not).
    pub fn blockers(&self) -> Vec<String> {
        let mut out = self.settings.problems(self.model_shape);
        out.extend(self.model.refusal(&self.settings.model));
        out
    }

    /// Whether the gallery folder takes files; the warning shown in the panel if not.
    fn check_gallery(&mut self) {
        let res = self.runtime.gallery().map(|g| g.check_writable());
        self.gallery_warning = match res {
            Some(Err(e)) => Some(format!("images will not be kept in the gallery: {e}")),
            _ => None,
        };
    }

    /// Start a generation with the current settings (Ctrl+Enter).
    pub fn generate(&mut self) {
        self.start(false);
    }

    /// Start a compare sweep over the chosen thresholds.
    pub fn start_compare(&mut self) {
        self.start(true);
    }

    /// Queue the job(s) of one Generate (the batch count's, each of the layout's data-parallel
    /// degree of images) or one compare sweep; the first starts now if nothing runs.
    fn start(&mut self, compare: bool) {
        let mut blockers = self.blockers();
        if compare {
            if let Some(e) = &self.compare_view.thresholds.error {
                blockers.push(format!("compare thresholds: {e}"));
            }
            if let Some(e) = &self.compare_view.caches.error {
                blockers.push(format!("compare policies: {e}"));
            }
            if blockers.is_empty() {
                blockers.extend(self.settings.compare_check(self.model_shape).err());
            }
        }
        if !blockers.is_empty() {
            for b in blockers {
                self.say(b, true);
            }
            return;
        }
        // Before the generation, not after it: a read-only gallery is reported now.
        self.check_gallery();
        if let Some(w) = self.gallery_warning.clone() {
            self.say(w, true);
        }
        // dp > 1 makes that many images at once, seeds s, s + 1, ...
        let dp = if compare {
            1
        } else {
            self.settings
                .plan(self.model_shape.heads)
                .map_or(1, |p| p.layout.dp.max(1))
        };
        let jobs = if compare {
            1
        } else {
            self.settings.batch.max(1)
        };
        // Nine digits at most: easy to read back and type in the seed field.
        let fresh = || crate::model::rng::fresh_seed() % 1_000_000_000;
        if self.settings.random_seed {
            self.settings.request.seed = fresh();
        }
        let engine = self.settings.engine_spec();
        let base = self.settings.request();
        let steps = self.settings.steps();
        let mut seed = base.seed;
        for k in 0..jobs {
            if k > 0 {
                seed = if self.settings.random_seed {
                    fresh()
                } else {
                    seed.wrapping_add(dp as u64)
                };
            }
            let reqs: Vec<GenerateRequest> = (0..dp as u64)
                .map(|i| GenerateRequest {
                    seed: seed.wrapping_add(i),
                    ..base.clone()
                })
                .collect();
            let seeds = match dp {
                1 => format!("seed {seed}"),
                n => format!(
                    "seeds {seed} to {} ({n} images at once)",
                    seed.wrapping_add(n as u64 - 1)
                ),
            };
            let summary = format!("{}x{}, {steps} steps, {seeds}", base.width, base.height);
            let spec = match (compare, reqs.len()) {
                (true, _) => JobSpec::Compare {
                    base: reqs[0].clone(),
                    thresholds: self.settings.compare_thresholds.clone(),
                    caches: self.settings.compare_caches.clone(),
                    repeats: self.settings.compare_repeats,
                },
                (false, 1) => JobSpec::Generate(reqs[0].clone()),
                (false, _) => JobSpec::Images(reqs),
            };
            let images = spec.requests().len();
            let id = self.runtime.submit_on(spec, engine.clone());
            let q = QueuedJob {
                id,
                compare,
                images,
                steps,
                summary,
                prompt: base.prompt.chars().take(40).collect(),
            };
            if self.job.is_some() {
                self.queue.push(q);
            } else {
                self.tab = if compare { Tab::Compare } else { Tab::Image };
                self.begin(q);
            }
        }
    }

    /// Show `q` as the running job.
    fn begin(&mut self, q: QueuedJob) {
        if q.compare {
            self.compare.clear();
        }
        self.preview.clear();
        let mut job = q.view();
        if q.compare {
            job.rounds = self.settings.compare_repeats.max(1);
        }
        self.job = Some(job);
    }

    /// Move a waiting job one place earlier or later; the runtime takes the new order.
    fn move_queued(&mut self, id: JobId, earlier: bool) {
        let Some(i) = self.queue.iter().position(|q| q.id == id) else {
            return;
        };
        let j = if earlier {
            i.checked_sub(1)
        } else {
            Some(i + 1).filter(|&j| j < self.queue.len())
        };
        if let Some(j) = j {
            self.queue.swap(i, j);
            self.runtime
                .reorder(self.queue.iter().map(|q| q.id).collect());
        }
    }

    /// Take a waiting job out of the queue.
    fn cancel_queued(&mut self, id: JobId) {
        if let Some(i) = self.queue.iter().position(|q| q.id == id) {
            let q = self.queue.remove(i);
            self.runtime.cancel(id);
            self.say(format!("taken out of the queue: {}", q.summary), false);
        }
    }

    /// Cancel the running job (Esc).
    pub fn cancel(&mut self) {
        if let Some(j) = &self.job {
            self.runtime.cancel(j.id);
        }
    }

    /// Apply every waiting runtime event and dialog answer.
    pub fn poll(&mut self, ctx: &egui::Context) {
        while let Some(ev) = self.runtime.try_recv() {
            self.on_event(ctx, ev);
        }
        while let Ok(a) = self.dialog_rx.try_recv() {
            self.on_dialog(ctx, a);
        }
    }

    fn on_model_event(&mut self, ev: &Event) {
        match ev {
            Event::ModelLoading { spec } => {
                self.model = ModelStatus::Loading(spec.model.model.clone())
            }
            Event::ModelLoaded {
                summary,
                load_ms,
                heads,
                blocks,
                magcache,
                ..
            } => {
                self.model =
                    ModelStatus::Ready(format!("{summary} — loaded in {:.1} s", load_ms / 1e3));
                self.model_shape = ModelShape {
                    heads: *heads,
                    blocks: *blocks,
                    magcache: *magcache,
                };
                self.remembered_model = None;
            }
            Event::ModelFailed { spec, error } => {
                if self.remembered_model.as_deref() == Some(spec.model.model.trim()) {
                    // The model saved last time: start on the demo instead of a dead end.
                    self.remembered_model = None;
                    self.say(
                        format!(
                            "the model used last time, `{}`, did not load ({error}): using the demo model",
                            spec.model.model
                        ),
                        true,
                    );
                    self.settings.model = "demo".into();
                    self.runtime.configure(self.settings.engine_spec());
                    return;
                }
                self.model = ModelStatus::Failed {
                    model: spec.model.model.trim().to_string(),
                    error: error.clone(),
                };
                self.say(
                    format!("cannot load model `{}`: {error}", spec.model.model),
                    true,
                );
                if let Some(next) = crate::runtime::advice::next_step(error, &self.advice_context())
                {
                    self.say(next, false);
                }
                if self.job.is_none() {
                    self.script.give_up();
                }
            }
            Event::PreviewFactors(f) => self.preview.set_factors(f.clone()),
            _ => {}
        }
    }

    fn on_event(&mut self, ctx: &egui::Context, ev: Event) {
        self.on_model_event(&ev);
        let Some(id) = ev.job() else {
            return;
        };
        if self.job.as_ref().is_none_or(|v| v.id != id) {
            let Some(i) = self.queue.iter().position(|q| q.id == id) else {
                return;
            };
            if ev.is_terminal() {
                self.queue.remove(i);
                return;
            }
            if matches!(ev, Event::Queued { .. }) {
                return;
            }
            // The runtime started a waiting job before the one shown as next (a reorder that
            // came as the last job ended): show it, and put the other back at the front.
            let q = self.queue.remove(i);
            if let Some(shown) = self.job.take() {
                self.queue.insert(0, shown.waiting());
            }
            self.begin(q);
        }
        match ev {
            Event::Started { layout, images, .. } => {
                if !layout.starts_with("one worker") {
                    self.say(format!("running on {layout}"), false);
                }
                if let Some(j) = &mut self.job {
                    j.layout = layout;
                    j.images = images;
                }
            }
            Event::Preparing { what, .. } => {
                if let Some(j) = &mut self.job {
                    j.layout = what;
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
                    if image == 0 && j.step == 0 && step >= 1 {
                        self.stats
                            .first_preview_ms
                            .push(at.saturating_duration_since(j.started).as_secs_f64() * 1e3);
                    }
                    j.image = image;
                    j.step = step;
                    j.total = total;
                    j.step_ms.push(ms);
                    j.reused += usize::from(reused);
                }
                self.preview.push(preview, at);
                self.stats.steps_seen += 1;
            }
            Event::ImageDone { image, result, .. } => self.image_done(ctx, image, result),
            Event::Timing {
                round,
                rounds,
                position,
                ..
            } => {
                if let Some(j) = &mut self.job {
                    (j.round, j.rounds, j.image, j.step) = (round, rounds, position, 0);
                }
            }
            Event::Timed { image, timing, .. } => {
                if let Some(s) = self.compare.get_mut(image) {
                    s.timing = Some(timing);
                }
            }
            Event::Finished { wall_ms, .. } => {
                self.stats.job_wall_ms.push(wall_ms);
                self.say(format!("done in {:.2} s", wall_ms / 1e3), false);
                self.job_over();
            }
            Event::Failed { error, .. } => {
                self.say(format!("generation failed: {error}"), true);
                if let Some(next) =
                    crate::runtime::advice::next_step(&error, &self.advice_context())
                {
                    self.say(next, false);
                }
                self.job_over();
            }
            Event::Cancelled { .. } => {
                self.say("cancelled", false);
                self.preview.clear();
                self.job_over();
            }
            _ => {}
        }
    }

    fn image_done(&mut self, ctx: &egui::Context, index: usize, result: Arc<ImageResult>) {
        let id = self.new_id();
        let shown = Shown::new(ctx, id, result);
        self.stats
            .image_ms
            .push(shown.result.generated.timings.total_ms);
        for n in shown.result.notes.clone() {
            let error = n.starts_with("not saved");
            self.say(n, error);
        }
        let compare = match &mut self.job {
            Some(j) => {
                j.image_done(index);
                j.compare
            }
            None => false,
        };
        if compare {
            self.compare.push(shown);
        } else {
            self.result = Some(shown);
            self.preview.clear();
        }
        self.gallery.dirty = true;
    }

    fn job_over(&mut self) {
        self.job = None;
        // The runtime starts the next waiting job itself. A scripted run ends with the last job
        // its Generate queued (a batch of N is N jobs).
        if self.queue.is_empty() {
            self.script.job_over();
        } else {
            let q = self.queue.remove(0);
            self.begin(q);
        }
    }

    fn on_dialog(&mut self, ctx: &egui::Context, a: DialogAnswer) {
        match a.answer {
            Answer::Path(p) => {
                if let Err(e) = self.use_path(ctx, &a.request, p) {
                    self.say(e, true);
                }
            }
            Answer::Cancelled => {}
            Answer::Unavailable(why) => {
                self.say(why.clone(), false);
                self.path_prompt = Some(PathPrompt::new(a.request, why));
            }
        }
    }

    /// Act on a chosen path; a save path is checked first (its folder must exist and be
    /// writable). The error says what is wrong with it.
    fn use_path(
        &mut self,
        ctx: &egui::Context,
        request: &PathRequest,
        path: PathBuf,
    ) -> Result<(), String> {
        if request.saves() {
            export::check_save_path(&path).map_err(|e| e.to_string())?;
        }
        match request {
            PathRequest::ExportImage { result, .. } => {
                export::save_image(&path, result).map_err(|e| e.to_string())?;
                self.say(format!("saved {}", path.display()), false);
            }
            PathRequest::Screenshot => self.screenshots.request(ctx, path),
            PathRequest::OpenModel => {
                if !path.exists() {
                    return Err(format!(
                        "cannot open {}: no such file or folder",
                        path.display()
                    ));
                }
                self.settings.model = path.display().to_string();
                self.runtime.configure(self.settings.engine_spec());
            }
        }
        Ok(())
    }

    fn refresh_gallery(&mut self) {
        if !self.gallery.dirty {
            return;
        }
        self.gallery.dirty = false;
        let listed = self.runtime.gallery().map(|g| g.list_and_skipped());
        match listed {
            Some(Ok((list, skipped))) => {
                self.gallery.entries = list;
                // Each unreadable file is mentioned once, not at every refresh.
                let new: Vec<_> = skipped
                    .into_iter()
                    .filter(|(p, _)| self.gallery.skipped.insert(p.clone()))
                    .collect();
                if let Some((first, why)) = new.first() {
                    let name = first.file_name().map_or_else(
                        || first.display().to_string(),
                        |n| n.to_string_lossy().into_owned(),
                    );
                    let more = match new.len() {
                        1 => String::new(),
                        n => format!(" and {} more", n - 1),
                    };
                    self.say(
                        format!(
                            "gallery: skipped {name}{more}, not a readable Parallax image ({why})"
                        ),
                        false,
                    );
                }
            }
            Some(Err(e)) => self.say(format!("cannot read the gallery: {e}"), true),
            None => {}
        }
    }

    fn gallery_entry(&self, path: &Path) -> Option<&gallery::Entry> {
        self.gallery.entries.iter().find(|e| e.path == path)
    }

    /// The image on screen and a file name for it.
    fn current_image(&self) -> Option<Arc<ImageResult>> {
        match self.tab {
            Tab::Compare => self
                .compare
                .get(self.compare_view.selected)
                .map(|s| s.result.clone()),
            _ => self.result.as_ref().map(|s| s.result.clone()),
        }
    }

    /// Queue an action; it is applied after this frame's drawing.
    pub fn queue(&mut self, c: Command) {
        self.cmds.push(c);
    }

    /// Apply one command: every user action goes through here.
    pub fn apply(&mut self, ctx: &egui::Context, c: Command) {
        match c {
            Command::Generate => self.generate(),
            Command::Compare => self.start_compare(),
            Command::Cancel => self.cancel(),
            Command::MoveQueued(id, earlier) => self.move_queued(id, earlier),
            Command::CancelQueued(id) => self.cancel_queued(id),
            Command::LoadModel => self.runtime.configure(self.settings.engine_spec()),
            Command::UseModel(m) => {
                self.settings.model = m;
                self.runtime.configure(self.settings.engine_spec());
            }
            Command::OpenModelDialog => {
                self.dialogs.ask(
                    &self.runtime,
                    PathRequest::OpenModel,
                    self.dialog_tx.clone(),
                );
            }
            Command::Export => match self.current_image() {
                Some(r) => {
                    let name = format!("parallax-{}.png", r.generated.settings.seed);
                    let req = PathRequest::ExportImage { name, result: r };
                    self.dialogs.ask(&self.runtime, req, self.dialog_tx.clone());
                }
                None => self.say("nothing to export yet", true),
            },
            Command::Screenshot => {
                self.dialogs.ask(
                    &self.runtime,
                    PathRequest::Screenshot,
                    self.dialog_tx.clone(),
                );
            }
            Command::SelectTab(t) => {
                if t == Tab::Gallery {
                    self.gallery.dirty = true;
                }
                self.tab = t;
            }
            Command::Restore(path) => {
                if let Some(s) = self.gallery_entry(&path).map(|e| e.settings.clone()) {
                    self.settings.restore(&s);
                    self.runtime.configure(self.settings.engine_spec());
                    self.say(format!("settings restored from {}", path.display()), false);
                }
            }
            Command::OpenImage(path) => self.open_image(ctx, &path),
            Command::CloseImage => self.gallery.opened = None,
            Command::AskDelete(path) => self.gallery.confirm_delete = Some(path),
            Command::KeepImage => self.gallery.confirm_delete = None,
            Command::Delete(path) => self.delete_image(&path),
            Command::SubmitPath => self.submit_path(ctx),
            Command::ClosePathPrompt => self.path_prompt = None,
            Command::ToggleDownload => self.download.toggle(),
        }
    }

    fn open_image(&mut self, ctx: &egui::Context, path: &Path) {
        let Some(entry) = self.gallery_entry(path).cloned() else {
            return;
        };
        // Bounded: a huge image is refused from its header, a large one shown scaled down.
        match gallery::read_thumbnail(path, gallery::OPEN_MAX_SIDE, gallery::OPEN_MAX_PIXELS) {
            Ok(img) => {
                let tex = ctx.load_texture(
                    format!("gallery-{}", path.display()),
                    super::view::color_image(&img),
                    egui::TextureOptions::LINEAR,
                );
                self.gallery.opened = Some(Opened { entry, tex });
            }
            Err(e) => self.say(format!("cannot open {}: {e}", path.display()), true),
        }
    }

    fn delete_image(&mut self, path: &Path) {
        self.gallery.confirm_delete = None;
        let res = self.runtime.gallery().map(|g| g.delete(path));
        match res {
            Some(Ok(())) => {
                self.thumbs.forget(path);
                if self
                    .gallery
                    .opened
                    .as_ref()
                    .is_some_and(|o| o.entry.path == path)
                {
                    self.gallery.opened = None;
                }
                self.gallery.dirty = true;
                self.say(format!("deleted {}", path.display()), false);
            }
            Some(Err(err)) => self.say(format!("cannot delete: {err}"), true),
            None => {}
        }
    }

    fn submit_path(&mut self, ctx: &egui::Context) {
        let Some(mut prompt) = self.path_prompt.take() else {
            return;
        };
        let Some(path) = prompt.path() else {
            prompt.error = Some("type a path".into());
            self.path_prompt = Some(prompt);
            return;
        };
        let request = prompt.request.clone();
        if let Err(e) = self.use_path(ctx, &request, path) {
            // Stay open so the path can be corrected.
            prompt.error = Some(e);
            self.path_prompt = Some(prompt);
        }
    }

    /// Export the image on screen through the save dialog.
    pub fn export_current(&mut self) {
        self.queue(Command::Export);
    }

    /// Save a screenshot of the window through the save dialog.
    pub fn screenshot(&mut self) {
        self.queue(Command::Screenshot);
    }

    // ----- drawing -------------------------------------------------------------------------

    fn keys(&mut self, ctx: &egui::Context) {
        if ctx.input_mut(|i| i.consume_key(Modifiers::COMMAND, Key::Enter)) {
            self.cmds.push(Command::Generate);
        }
        if ctx.input_mut(|i| i.consume_key(Modifiers::NONE, Key::Escape)) {
            if self.path_prompt.is_some() {
                self.cmds.push(Command::ClosePathPrompt);
            } else {
                self.cmds.push(Command::Cancel);
            }
        }
    }

    fn panel<'a>(&'a mut self, blockers: &'a [String]) -> Panel<'a> {
        Panel {
            settings: &mut self.settings,
            model: &self.model,
            hf_models: &self.hf_models,
            comfy_models: &self.comfy_models,
            busy: self.job.is_some(),
            blockers,
            warning: self.gallery_warning.as_deref(),
            thresholds: &mut self.compare_view.thresholds,
            caches: &mut self.compare_view.caches,
            cmds: &mut self.cmds,
        }
    }

    /// What a suggestion after a failure may refer to.
    fn advice_context(&self) -> crate::runtime::advice::Context {
        crate::runtime::advice::Context {
            width: self.settings.request.width,
            height: self.settings.request.height,
            workers: self
                .settings
                .placement()
                .ok()
                .and_then(|p| p.devices.named_count())
                .unwrap_or(1),
            fp8: self.settings.fp8,
            memory_budget_gib: self.settings.memory_budget_gib,
        }
    }

    fn settings_panel(&mut self, ui: &mut egui::Ui) {
        let none: Vec<String> = Vec::new();
        panels::settings::model(ui, &mut self.panel(&none));
        if let Some(done) = self.download.ui(ui) {
            self.say(done.text, done.error);
            if let Some(m) = done.model {
                self.hf_models = crate::model::layout::list_hf_cache();
                self.cmds.push(Command::UseModel(m));
            }
        }
        let mut p = self.panel(&none);
        ui.separator();
        panels::settings::prompts(ui, &mut p);
        panels::settings::sampling(ui, &mut p);
        ui.separator();
        panels::devices::devices_panel(ui, &mut self.settings, &self.gpus, self.model_shape);
        ui.separator();
        let blockers = self.blockers();
        let mut p = self.panel(&blockers);
        panels::settings::checks(ui, &mut p);
        panels::settings::actions(ui, &mut p);
    }

    fn tab_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            for (t, label) in [
                (Tab::Image, "Image"),
                (Tab::Compare, "Compare"),
                (Tab::Gallery, "Gallery"),
            ] {
                if ui.selectable_label(self.tab == t, label).clicked() {
                    self.cmds.push(Command::SelectTab(t));
                }
            }
            ui.separator();
            if ui.button("Export PNG…").clicked() {
                self.cmds.push(Command::Export);
            }
            if ui.button("Screenshot…").clicked() {
                self.cmds.push(Command::Screenshot);
            }
        });
    }

    fn central(&mut self, ui: &mut egui::Ui) {
        self.tab_bar(ui);
        panels::progress::show(ui, self.job.as_ref(), &self.queue, &mut self.cmds);
        match self.tab {
            Tab::Image => tabs::image::show(
                ui,
                tabs::image::ImageTab {
                    preview: &mut self.preview,
                    result: self.result.as_ref(),
                    job: self.job.as_ref(),
                    settings: &self.settings,
                    stats: &mut self.stats,
                },
            ),
            Tab::Compare => tabs::compare::show(
                ui,
                tabs::compare::CompareTab {
                    results: &self.compare,
                    job: self.job.as_ref(),
                    view: &mut self.compare_view,
                    gain: &mut self.settings.heatmap_gain,
                    preview: &mut self.preview,
                    heat: &mut self.heat,
                    stats: &mut self.stats,
                },
            ),
            Tab::Gallery => {
                self.refresh_gallery();
                tabs::gallery::show(
                    ui,
                    tabs::gallery::GalleryTab {
                        view: &self.gallery,
                        dir: self.runtime.gallery().map(|g| g.dir()),
                        thumbs: &mut self.thumbs,
                        cmds: &mut self.cmds,
                    },
                )
            }
        }
    }

    fn take_screenshots(&mut self) {
        for (path, img) in self.screenshots.arrived() {
            match export::save_screenshot(&path, &img) {
                Ok(()) => self.say(format!("screenshot saved to {}", path.display()), false),
                Err(e) => self.say(format!("cannot save the screenshot: {e}"), true),
            }
            self.script.shot_saved();
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
        self.take_screenshots();
        match self
            .script
            .start(matches!(self.model, ModelStatus::Ready(_)))
        {
            Some(Start::Generate) => self.cmds.push(Command::Generate),
            Some(Start::Compare) => self.cmds.push(Command::Compare),
            None => {}
        }

        egui::Panel::left("settings")
            .default_size(320.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| self.settings_panel(ui));
            });
        egui::Panel::bottom("messages").show(ui, |ui| self.messages.show(ui));
        egui::CentralPanel::default().show(ui, |ui| self.central(ui));
        if let Some(prompt) = &mut self.path_prompt {
            match prompt.show(&ctx) {
                Some(true) => self.cmds.push(Command::SubmitPath),
                Some(false) => self.cmds.push(Command::ClosePathPrompt),
                None => {}
            }
        }

        for c in self.cmds.take() {
            self.apply(&ctx, c);
        }

        if let Some(p) = self.script.take_due_shot() {
            self.screenshots.request(&ctx, p);
        }
        if self.script.wants_quit() {
            self.script.write_stats(&self.stats);
            ctx.send_viewport_cmd(egui::ViewportCommand::Close);
        }
        // No timer while a job runs: frames come with the engine's events (the runtime wakes the
        // window once per step), and nothing on screen changes between them. A 250 ms tick used to
        // redraw the whole window four times a second, which on a CPU-only machine (software
        // Vulkan under Xvfb) took cores from the engine: see `automation::UiStats`.
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        let Some(path) = self.settings_file.clone() else {
            // No home folder to keep a file in: eframe's storage is all there is (and with
            // `--fresh`, nothing: the remembered settings stay as they were).
            if self.remember_settings {
                eframe::set_value(storage, SETTINGS_KEY, &self.settings);
            }
            return;
        };
        match super::settings_file::save(&path, &self.settings) {
            Ok(()) => {
                // Moved out of eframe's file (rewritten in place, so a crash can damage it).
                if storage.get_string(SETTINGS_KEY).is_some() {
                    storage.remove_string(SETTINGS_KEY);
                }
                self.settings_save_error = None;
            }
            Err(e) => {
                let msg = format!("the settings were not saved: {e}");
                tracing::warn!("{msg}");
                // Said once, not at every auto-save.
                if self.settings_save_error.as_deref() != Some(msg.as_str()) {
                    self.say(msg.clone(), true);
                    self.settings_save_error = Some(msg);
                }
            }
        }
    }

    fn on_exit(&mut self) {
        self.script.write_stats(&self.stats);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::app::settings_file::MemoryStorage as Kv;

    /// The settings file wins over eframe's storage; with no file, what an earlier version
    /// left in eframe's storage is tried, and when it does not parse the studio starts from the
    /// defaults with a reason; a damaged file likewise. (Settings written to eframe's RON do not
    /// read back since `SettingsFile` flattens the old fields: RON cannot carry `flatten`, so
    /// every start said "damaged"; JSON can, hence the file.)
    #[test]
    fn saved_settings_come_from_the_file_then_from_eframe_storage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("studio-settings.json");
        let mut old = Settings::default();
        old.request.prompt = "kept by an earlier version".into();
        let mut kv = Kv::default();
        eframe::set_value(&mut kv, SETTINGS_KEY, &old);
        let st = Some(&kv as &dyn eframe::Storage);
        assert_eq!(saved_settings(Some(&file), None), (None, None));
        assert_eq!(
            saved_settings(Some(&file), Some(&Kv::default())),
            (None, None)
        );
        let (s, why) = saved_settings(Some(&file), st);
        assert_eq!(
            s, None,
            "RON round trip of Settings works again: test it here"
        );
        assert!(why.is_some_and(|w| w.contains("eframe's storage")));

        let mut new = old.clone();
        new.request.prompt = "from the file".into();
        crate::app::settings_file::save_with(&file, &new, false).expect("save");
        assert_eq!(saved_settings(Some(&file), st), (Some(new), None));

        std::fs::write(&file, b"{\"model\": ").expect("tear");
        let (s, why) = saved_settings(Some(&file), st);
        assert_eq!(s, None);
        assert!(why.is_some_and(|w| w.contains("studio-settings.json")));
    }

    #[test]
    fn a_saved_model_file_that_has_gone_falls_back_to_the_demo() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let gone = tmp.path().join("flux1-dev.safetensors");
        let saved = Settings {
            model: gone.display().to_string(),
            ..Settings::default()
        };
        let (s, note) = startup_settings(Some(saved.clone()), &StudioOptions::default());
        assert_eq!(s.model, "demo");
        let note = note.expect("a note");
        assert!(note.contains("not there any more"), "{note}");
        // The file is back: it is used.
        std::fs::write(&gone, b"x").expect("write");
        let (s, note) = startup_settings(Some(saved.clone()), &StudioOptions::default());
        assert_eq!(
            (s.model.as_str(), note),
            (gone.to_str().expect("utf-8"), None)
        );
        // Names the loader resolves elsewhere are left alone.
        for m in [
            "demo",
            "dev",
            "schnell",
            "random:dev",
            "black-forest-labs/FLUX.1-dev",
        ] {
            assert!(!model_file_gone(m), "{m}");
        }
        assert!(model_file_gone("./gone-folder"));
        assert!(model_file_gone("/nope/flux"));
        // A model given on the command line is not second-guessed.
        let opts = StudioOptions {
            model: Some("/nope.safetensors".into()),
            ..StudioOptions::default()
        };
        let (s, note) = startup_settings(Some(saved), &opts);
        assert_eq!((s.model.as_str(), note), ("/nope.safetensors", None));
    }
}
