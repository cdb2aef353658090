//! The studio window and its state: [`StudioApp`] owns the saved [`Settings`], the view state
//! ([`super::view`]), and the handles (the [`Runtime`], textures, channels). Each frame it applies
//! the runtime's events ([`events`]), draws the panels and tabs ([`draw`]; they queue
//! [`Action`]s), then applies the actions in one place ([`handlers`], [`StudioApp::apply`]).
//! The engine lives behind the runtime, which this only talks to through jobs and events, so the
//! window never waits.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};

use egui::{Key, Modifiers};

use super::action::{Action, Actions};
use super::automation::{Screenshots, Script, Start, UiStats};
use super::dialogs::{Answer, DialogAnswer, Dialogs, PathPrompt, PathRequest};
use super::export;
use super::gpu;
use super::messages::MessageLog;
use super::panels::{self, settings::Panel};
use super::preview::LivePreview;
use super::state::{ModelShape, Settings};
use super::tabs::{self, compare::HeatmapCache, gallery::Thumbs};
use super::view::{CompareView, GalleryView, ModelStatus, Opened, QueuedJob, Shown, Tab, View};
use crate::pipeline::GenerateRequest;
use crate::runtime::gallery;
use crate::runtime::{Event, ImageResult, JobId, JobSpec, Runtime, RuntimeOptions};

mod draw;
mod edit;
mod events;
mod handlers;

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
    /// What is on screen.
    pub view: View,
    pub stats: UiStats,
    /// Where paths come from (tests set a fixed folder).
    pub dialogs: Dialogs,
    /// The saved settings' model, until it loads: if it fails, the studio falls back to the demo.
    remembered_model: Option<String>,
    /// The guidance a FLUX.1 Fill model's 30 replaced (`model_guidance` in `studio/events.rs`),
    /// until a model of another kind loads.
    fill_guidance: Option<Option<f64>>,
    /// The "Download…" widget beside the model picker.
    pub download: super::download::Downloader,
    // Handles.
    runtime: Runtime,
    preview: LivePreview,
    heat: HeatmapCache,
    thumbs: Thumbs,
    dialog_tx: mpsc::Sender<DialogAnswer>,
    dialog_rx: mpsc::Receiver<DialogAnswer>,
    screenshots: Screenshots,
    script: Script,
    cmds: Actions,
    next_id: u64,
    /// Each listed LoRA file checked against the loaded model.
    pub lora_checks: super::lora::LoraChecks,
}

const SETTINGS_KEY: &str = "parallax-settings";

/// How long after a runtime event the window redraws (events within it share one frame).
const EVENT_REPAINT_DELAY: std::time::Duration = std::time::Duration::from_millis(30);

/// A saved model that names a file or folder which is no longer there (names the loader looks
/// up elsewhere, `demo`, `random:…`, `dev`, `schnell`, repo ids, are not judged here).
fn model_file_gone(model: &str) -> bool {
    let m = model.trim();
    let lower = m.to_ascii_lowercase();
    // `demo`, or a name that stands for a Hub repo (`dev`, `flux1-schnell`, ...).
    let named = lower == "demo"
        || (!m.contains('/') && crate::model::layout::repo_id_for(&lower).is_some());
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
        let gpu = cc.wgpu_render_state.as_ref().is_some_and(gpu::install);
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
            view: View {
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
                path_prompt: None,
                gallery_warning: None,
                hf_models,
                comfy_models,
                gpus: crate::device::gpus(),
                edit: Default::default(),
            },
            stats: UiStats::default(),
            dialogs: Dialogs::detect(),
            remembered_model,
            fill_guidance: None,
            download: Default::default(),
            runtime,
            preview: LivePreview::new(gpu),
            heat: HeatmapCache::default(),
            thumbs: Thumbs::default(),
            dialog_tx,
            dialog_rx,
            screenshots: Screenshots::default(),
            script: Script::new(&opts),
            cmds: Actions::default(),
            next_id: 1,
            lora_checks: Default::default(),
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
        self.view.job.is_some()
    }

    fn say(&mut self, text: impl Into<String>, error: bool) {
        self.view.messages.push(text, error);
    }

    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Why Generate is refused now (empty: it is not).
    pub fn blockers(&self) -> Vec<String> {
        let mut out = self.settings.problems(self.view.model_shape);
        out.extend(self.view.model.refusal(&self.settings.model));
        out.extend(self.lora_checks.blockers(&self.settings.loras));
        out
    }

    /// Whether the gallery folder takes files; the warning shown in the panel if not.
    fn check_gallery(&mut self) {
        let res = self.runtime.gallery().map(|g| g.check_writable());
        self.view.gallery_warning = match res {
            Some(Err(e)) => Some(format!("images will not be kept in the gallery: {e}")),
            _ => None,
        };
    }
}

impl eframe::App for StudioApp {
    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut eframe::Frame) {
        // CPU time eframe spent on the previous frame (ui, layout, tessellation, paint submit).
        if self.view.job.is_some() {
            if let Some(cpu) = frame.info().cpu_usage {
                self.stats.frame_ms.push(cpu as f64 * 1e3);
            }
        }
        let ctx = ui.ctx().clone();
        self.poll(&ctx);
        self.keys(&ctx);
        // An image dropped on the window gives its settings.
        for path in ctx.input(|i| {
            i.raw
                .dropped_files
                .iter()
                .map(|f| f.path().to_path_buf())
                .collect::<Vec<_>>()
        }) {
            self.cmds.push(Action::RecallFrom(path));
        }
        self.take_screenshots();
        match self
            .script
            .start(matches!(self.view.model, ModelStatus::Ready(_)))
        {
            Some(Start::Generate) => self.cmds.push(Action::Generate),
            Some(Start::Compare) => self.cmds.push(Action::Compare),
            None => {}
        }

        egui::Panel::left("settings")
            .default_size(320.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| self.settings_panel(ui));
            });
        egui::Panel::bottom("messages").show(ui, |ui| self.view.messages.show(ui));
        egui::CentralPanel::default().show(ui, |ui| self.central(ui));
        if let Some(prompt) = &mut self.view.path_prompt {
            match prompt.show(&ctx) {
                Some(true) => self.cmds.push(Action::SubmitPath),
                Some(false) => self.cmds.push(Action::ClosePathPrompt),
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
