//! What the studio does when asked: every [`Action`] a panel, a key or a script queued is applied
//! here, in one place after drawing (start a job or queue it, reorder and cancel, open, delete and
//! export images, the dialogs' answers).

use super::*;

impl StudioApp {
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
    pub(super) fn start(&mut self, compare: bool) {
        let mut blockers = self.blockers();
        if compare {
            if let Some(e) = &self.view.compare_view.thresholds.error {
                blockers.push(format!("compare thresholds: {e}"));
            }
            if let Some(e) = &self.view.compare_view.caches.error {
                blockers.push(format!("compare policies: {e}"));
            }
            if let Some(e) = &self.view.compare_view.lora_strengths.error {
                if !self.settings.lora_sweep().is_empty() {
                    blockers.push(format!("compare LoRA strengths: {e}"));
                }
            }
            if blockers.is_empty() {
                blockers.extend(self.settings.compare_check(self.view.model_shape).err());
            }
        }
        if blockers.is_empty() {
            // The painted mask into the request (image-to-image and inpainting).
            blockers.extend(self.prepare_source().err());
        }
        if !blockers.is_empty() {
            for b in blockers {
                self.say(b, true);
            }
            return;
        }
        // Before the generation, not after it: a read-only gallery is reported now.
        self.check_gallery();
        if let Some(w) = self.view.gallery_warning.clone() {
            self.say(w, true);
        }
        // dp > 1 makes that many images at once, seeds s, s + 1, ...
        let dp = if compare {
            1
        } else {
            self.settings
                .plan(self.view.model_shape.heads)
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
        let steps = self.settings.steps_run();
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
                    lora_strengths: self.settings.lora_sweep(),
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
            if self.view.job.is_some() {
                self.view.queue.push(q);
            } else {
                self.view.tab = if compare { Tab::Compare } else { Tab::Image };
                self.begin(q);
            }
        }
    }

    /// Show `q` as the running job.
    pub(super) fn begin(&mut self, q: QueuedJob) {
        if q.compare {
            self.view.compare.clear();
        }
        self.preview.clear();
        let mut job = q.view();
        if q.compare {
            job.rounds = self.settings.compare_repeats.max(1);
        }
        self.view.job = Some(job);
    }

    /// Move a waiting job one place earlier or later; the runtime takes the new order.
    pub(super) fn move_queued(&mut self, id: JobId, earlier: bool) {
        let Some(i) = self.view.queue.iter().position(|q| q.id == id) else {
            return;
        };
        let j = if earlier {
            i.checked_sub(1)
        } else {
            Some(i + 1).filter(|&j| j < self.view.queue.len())
        };
        if let Some(j) = j {
            self.view.queue.swap(i, j);
            self.runtime
                .reorder(self.view.queue.iter().map(|q| q.id).collect());
        }
    }

    /// Take a waiting job out of the queue.
    pub(super) fn cancel_queued(&mut self, id: JobId) {
        if let Some(i) = self.view.queue.iter().position(|q| q.id == id) {
            let q = self.view.queue.remove(i);
            self.runtime.cancel(id);
            self.say(format!("taken out of the queue: {}", q.summary), false);
        }
    }

    /// Cancel the running job (Esc).
    pub fn cancel(&mut self) {
        if let Some(j) = &self.view.job {
            self.runtime.cancel(j.id);
        }
    }

    pub(super) fn on_dialog(&mut self, ctx: &egui::Context, a: DialogAnswer) {
        match a.answer {
            Answer::Path(p) => {
                if let Err(e) = self.use_path(ctx, &a.request, p) {
                    self.say(e, true);
                }
            }
            Answer::Cancelled => {}
            Answer::Unavailable(why) => {
                self.say(why.clone(), false);
                self.view.path_prompt = Some(PathPrompt::new(a.request, why));
            }
        }
    }

    /// Act on a chosen path; a save path is checked first (its folder must exist and be
    /// writable). The error says what is wrong with it.
    pub(super) fn use_path(
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
            PathRequest::AddLora => self.add_loras(vec![path])?,
            PathRequest::AddLoraFolder => {
                let files = crate::app::lora::in_folder(&path)?;
                if files.is_empty() {
                    return Err(format!("no .safetensors files in {}", path.display()));
                }
                self.add_loras(files)?;
            }
            PathRequest::OpenSource => self.set_source(path)?,
        }
        Ok(())
    }

    /// Add LoRA files to the list (on, at strength 1), and say how many; a file that is not there
    /// is refused here, the rest is checked against the model as it is listed.
    pub(super) fn add_loras(&mut self, files: Vec<PathBuf>) -> Result<(), String> {
        if let Some(gone) = files.iter().find(|p| !p.is_file()) {
            return Err(format!(
                "cannot add the LoRA {}: no such file",
                gone.display()
            ));
        }
        let n = files.len();
        let new = crate::app::lora::add(&mut self.settings.loras, files);
        let listed = if new < n {
            format!(" ({} listed already)", n - new)
        } else {
            String::new()
        };
        self.say(format!("added {new} LoRA file(s){listed}"), false);
        Ok(())
    }

    /// Queue an action; it is applied after this frame's drawing.
    pub fn queue(&mut self, c: Action) {
        self.cmds.push(c);
    }

    /// Apply one action: every user action goes through here.
    pub fn apply(&mut self, ctx: &egui::Context, c: Action) {
        match c {
            Action::Generate => self.generate(),
            Action::Compare => self.start_compare(),
            Action::Cancel => self.cancel(),
            Action::MoveQueued(id, earlier) => self.move_queued(id, earlier),
            Action::CancelQueued(id) => self.cancel_queued(id),
            Action::LoadModel => self.runtime.configure(self.settings.engine_spec()),
            Action::UseModel(m) => {
                self.settings.model = m;
                self.runtime.configure(self.settings.engine_spec());
            }
            Action::OpenModelDialog => {
                self.dialogs.ask(
                    &self.runtime,
                    PathRequest::OpenModel,
                    self.dialog_tx.clone(),
                );
            }
            Action::Export => match self.current_image() {
                Some(r) => {
                    let name = format!("parallax-{}.png", r.generated.settings.seed);
                    let req = PathRequest::ExportImage { name, result: r };
                    self.dialogs.ask(&self.runtime, req, self.dialog_tx.clone());
                }
                None => self.say("nothing to export yet", true),
            },
            Action::Screenshot => {
                self.dialogs.ask(
                    &self.runtime,
                    PathRequest::Screenshot,
                    self.dialog_tx.clone(),
                );
            }
            Action::SelectTab(t) => {
                if t == Tab::Gallery {
                    self.view.gallery.dirty = true;
                }
                self.view.tab = t;
            }
            Action::Restore(path) => {
                if let Some(s) = self.gallery_entry(&path).map(|e| e.settings.clone()) {
                    self.settings.restore(&s);
                    self.runtime.configure(self.settings.engine_spec());
                    self.say(format!("settings restored from {}", path.display()), false);
                }
            }
            Action::RecallFrom(path) => self.recall_from(&path),
            Action::OpenImage(path) => self.open_image(ctx, &path),
            Action::CloseImage => self.view.gallery.opened = None,
            Action::AskDelete(path) => self.view.gallery.confirm_delete = Some(path),
            Action::KeepImage => self.view.gallery.confirm_delete = None,
            Action::Delete(path) => self.delete_image(&path),
            Action::SubmitPath => self.submit_path(ctx),
            Action::ClosePathPrompt => self.view.path_prompt = None,
            Action::ToggleDownload => self.download.toggle(),
            Action::AddLoraFile => {
                self.dialogs
                    .ask(&self.runtime, PathRequest::AddLora, self.dialog_tx.clone());
            }
            Action::AddLoraFolder => {
                let req = PathRequest::AddLoraFolder;
                self.dialogs.ask(&self.runtime, req, self.dialog_tx.clone());
            }
            Action::AddLoras(files) => {
                if let Err(e) = self.add_loras(files) {
                    self.say(e, true);
                }
            }
            Action::AddDemoLora => {
                match crate::app::lora::demo_lora_path().and_then(|p| self.add_loras(vec![p])) {
                    Ok(()) => {}
                    Err(e) => self.say(e, true),
                }
            }
            Action::PickSource => {
                self.dialogs.ask(
                    &self.runtime,
                    PathRequest::OpenSource,
                    self.dialog_tx.clone(),
                );
            }
            Action::UseAsSource(path) => {
                if let Err(e) = self.set_source(path) {
                    self.say(format!("cannot start from it: {e}"), true);
                }
            }
            Action::UseCurrentAsSource => self.use_current_as_source(),
            Action::ClearSource => self.clear_source(),
            Action::EditMask => {
                self.view.edit.mask.editing = true;
                self.view.tab = Tab::Image;
            }
        }
    }

    /// A dropped image's settings: all of them (model too) when Parallax made it (PNG, JPEG or
    /// WebP), else what its metadata states, the model left as it is.
    pub(super) fn recall_from(&mut self, path: &Path) {
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into(),
        );
        match crate::pipeline::metadata::recall_file(path) {
            Ok(r) => {
                if let Some(s) = &r.settings {
                    self.settings.restore(s);
                    self.runtime.configure(self.settings.engine_spec());
                    self.say(format!("settings restored from {name}"), false);
                    return;
                }
                let took = self.settings.recall(&r);
                let model = match &r.model {
                    Some(m) => format!("; it was made with {m} (the model is left as it is)"),
                    None => String::new(),
                };
                self.say(
                    format!("from {name} ({}): {}{model}", r.source, took.join(", ")),
                    false,
                );
            }
            Err(e) => self.say(format!("cannot take settings from {name}: {e}"), true),
        }
    }

    pub(super) fn open_image(&mut self, ctx: &egui::Context, path: &Path) {
        let Some(entry) = self.gallery_entry(path).cloned() else {
            return;
        };
        // Bounded: a huge image is refused from its header, a large one shown scaled down.
        match gallery::read_thumbnail(path, gallery::OPEN_MAX_SIDE, gallery::OPEN_MAX_PIXELS) {
            Ok(img) => {
                let tex = ctx.load_texture(
                    format!("gallery-{}", path.display()),
                    crate::app::view::color_image(&img),
                    egui::TextureOptions::LINEAR,
                );
                self.view.gallery.opened = Some(Opened { entry, tex });
            }
            Err(e) => self.say(format!("cannot open {}: {e}", path.display()), true),
        }
    }

    pub(super) fn delete_image(&mut self, path: &Path) {
        self.view.gallery.confirm_delete = None;
        // The request being edited may name the image's mask or source copy: those stay.
        let init = self.settings.request.init.as_ref();
        let keep: Vec<PathBuf> = init
            .into_iter()
            .flat_map(|i| [Some(i.image.clone()), i.mask.clone()])
            .flatten()
            .collect();
        let res = self
            .runtime
            .gallery()
            .map(|g| g.delete_keeping(path, &keep));
        match res {
            Some(Ok(side)) => {
                self.thumbs.forget(path);
                if self
                    .view
                    .gallery
                    .opened
                    .as_ref()
                    .is_some_and(|o| o.entry.path == path)
                {
                    self.view.gallery.opened = None;
                }
                self.view.gallery.dirty = true;
                let names: Vec<String> = side
                    .iter()
                    .filter_map(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
                    .collect();
                let also = match names.len() {
                    0 => String::new(),
                    _ => format!(", and {} (no other image uses it)", names.join(", ")),
                };
                self.say(format!("deleted {}{also}", path.display()), false);
            }
            Some(Err(err)) => self.say(format!("cannot delete: {err}"), true),
            None => {}
        }
    }

    pub(super) fn submit_path(&mut self, ctx: &egui::Context) {
        let Some(mut prompt) = self.view.path_prompt.take() else {
            return;
        };
        let Some(path) = prompt.path() else {
            prompt.error = Some("type a path".into());
            self.view.path_prompt = Some(prompt);
            return;
        };
        let request = prompt.request.clone();
        if let Err(e) = self.use_path(ctx, &request, path) {
            // Stay open so the path can be corrected.
            prompt.error = Some(e);
            self.view.path_prompt = Some(prompt);
        }
    }

    // ----- drawing -------------------------------------------------------------------------

    pub(super) fn keys(&mut self, ctx: &egui::Context) {
        if ctx.input_mut(|i| i.consume_key(Modifiers::COMMAND, Key::Enter)) {
            self.cmds.push(Action::Generate);
        }
        if ctx.input_mut(|i| i.consume_key(Modifiers::NONE, Key::Escape)) {
            if self.view.path_prompt.is_some() {
                self.cmds.push(Action::ClosePathPrompt);
            } else {
                self.cmds.push(Action::Cancel);
            }
        }
    }
}
