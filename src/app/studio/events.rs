//! What the studio does when told: the runtime's events (model loading, each step's preview, each
//! finished image and job) and the gallery's refresh, applied at the start of a frame.

use super::*;

impl StudioApp {
    /// Apply every waiting runtime event and dialog answer.
    pub fn poll(&mut self, ctx: &egui::Context) {
        while let Some(ev) = self.runtime.try_recv() {
            self.on_event(ctx, ev);
        }
        while let Ok(a) = self.dialog_rx.try_recv() {
            self.on_dialog(ctx, a);
        }
        // Said for the LoRAs that are on (an unused one's row says it too).
        for (path, why) in self.lora_checks.poll(&self.settings.loras) {
            if self.settings.loras.iter().any(|e| e.on && e.path == path) {
                self.say(why, true);
            }
        }
    }

    pub(super) fn on_model_event(&mut self, ev: &Event) {
        match ev {
            Event::ModelLoading { spec } => {
                self.view.model = ModelStatus::Loading(spec.model.model.clone())
            }
            Event::ModelLoaded {
                spec,
                summary,
                load_ms,
                heads,
                blocks,
                magcache,
                lora_config,
            } => {
                self.lora_checks
                    .model_loaded(&spec.model.model, lora_config.clone());
                self.view.model =
                    ModelStatus::Ready(format!("{summary} — loaded in {:.1} s", load_ms / 1e3));
                self.view.model_shape = ModelShape {
                    heads: *heads,
                    blocks: *blocks,
                    magcache: *magcache,
                };
                self.remembered_model = None;
                let fill = lora_config.as_ref().is_some_and(|c| c.is_fill());
                let g = &mut self.settings.request.guidance;
                if let Some(said) = model_guidance(g, fill, &mut self.fill_guidance) {
                    self.say(said, false);
                }
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
                self.view.model = ModelStatus::Failed {
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
                if self.view.job.is_none() {
                    self.script.give_up();
                }
            }
            Event::PreviewFactors(f) => self.preview.set_factors(f.clone()),
            _ => {}
        }
    }

    pub(super) fn on_event(&mut self, ctx: &egui::Context, ev: Event) {
        self.on_model_event(&ev);
        let Some(id) = ev.job() else {
            return;
        };
        if self.view.job.as_ref().is_none_or(|v| v.id != id) {
            let Some(i) = self.view.queue.iter().position(|q| q.id == id) else {
                return;
            };
            if ev.is_terminal() {
                self.view.queue.remove(i);
                return;
            }
            if matches!(ev, Event::Queued { .. }) {
                return;
            }
            // The runtime started a waiting job before the one shown as next (a reorder that
            // came as the last job ended): show it, and put the other back at the front.
            let q = self.view.queue.remove(i);
            if let Some(shown) = self.view.job.take() {
                self.view.queue.insert(0, shown.waiting());
            }
            self.begin(q);
        }
        match ev {
            Event::Started { layout, images, .. } => {
                if !layout.starts_with("one worker") {
                    self.say(format!("running on {layout}"), false);
                }
                if let Some(j) = &mut self.view.job {
                    j.layout = layout;
                    j.images = images;
                }
            }
            Event::Preparing { what, .. } => {
                if let Some(j) = &mut self.view.job {
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
                if let Some(j) = &mut self.view.job {
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
                if let Some(j) = &mut self.view.job {
                    (j.round, j.rounds, j.image, j.step) = (round, rounds, position, 0);
                }
            }
            Event::Timed { image, timing, .. } => {
                if let Some(s) = self.view.compare.get_mut(image) {
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

    pub(super) fn image_done(
        &mut self,
        ctx: &egui::Context,
        index: usize,
        result: Arc<ImageResult>,
    ) {
        let id = self.new_id();
        let shown = Shown::new(ctx, id, result);
        self.stats
            .image_ms
            .push(shown.result.generated.timings.total_ms);
        for n in shown.result.notes.clone() {
            let error = n.starts_with("not saved");
            self.say(n, error);
        }
        let compare = match &mut self.view.job {
            Some(j) => {
                j.image_done(index);
                j.compare
            }
            None => false,
        };
        if compare {
            self.view.compare.push(shown);
        } else {
            self.view.result = Some(shown);
            self.preview.clear();
        }
        self.view.gallery.dirty = true;
    }

    pub(super) fn job_over(&mut self) {
        self.view.job = None;
        // The runtime starts the next waiting job itself. A scripted run ends with the last job
        // its Generate queued (a batch of N is N jobs).
        if self.view.queue.is_empty() {
            self.script.job_over();
        } else {
            let q = self.view.queue.remove(0);
            self.begin(q);
        }
    }

    pub(super) fn refresh_gallery(&mut self) {
        if !self.view.gallery.dirty {
            return;
        }
        self.view.gallery.dirty = false;
        let listed = self.runtime.gallery().map(|g| g.list_and_skipped());
        match listed {
            Some(Ok((list, skipped))) => {
                self.view.gallery.entries = list;
                // Each unreadable file is mentioned once, not at every refresh.
                let new: Vec<_> = skipped
                    .into_iter()
                    .filter(|(p, _)| self.view.gallery.skipped.insert(p.clone()))
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

    pub(super) fn gallery_entry(&self, path: &Path) -> Option<&gallery::Entry> {
        self.view.gallery.entries.iter().find(|e| e.path == path)
    }

    /// The image on screen and a file name for it.
    pub(super) fn current_image(&self) -> Option<Arc<ImageResult>> {
        match self.view.tab {
            Tab::Compare => self
                .view
                .compare
                .get(self.view.compare_view.selected)
                .map(|s| s.result.clone()),
            _ => self.view.result.as_ref().map(|s| s.result.clone()),
        }
    }

    pub(super) fn take_screenshots(&mut self) {
        for (path, img) in self.screenshots.arrived() {
            match export::save_screenshot(&path, &img) {
                Ok(()) => self.say(format!("screenshot saved to {}", path.display()), false),
                Err(e) => self.say(format!("cannot save the screenshot: {e}"), true),
            }
            self.script.shot_saved();
        }
    }
}

/// The guidance as a model loads: a FLUX.1 Fill model (`fill`) gets
/// [`crate::pipeline::img2img::FILL_GUIDANCE`] when the guidance is still the studio's default
/// (the user set none), `replaced` remembering what it replaced; a model of another kind gets
/// that back while the guidance is still Fill's. Returns what to tell the user.
fn model_guidance(
    guidance: &mut Option<f64>,
    fill: bool,
    replaced: &mut Option<Option<f64>>,
) -> Option<String> {
    use crate::pipeline::img2img::FILL_GUIDANCE;
    let unset = guidance.is_none() || *guidance == Settings::default().request.guidance;
    if fill && unset && replaced.is_none() {
        *replaced = Some(*guidance);
        *guidance = Some(FILL_GUIDANCE);
        return Some(format!(
            "FLUX.1 Fill model: guidance set to {FILL_GUIDANCE}, the value it is made for (change it under Guidance)"
        ));
    }
    if fill {
        return None;
    }
    let old = replaced.take()?;
    if *guidance != Some(FILL_GUIDANCE) {
        return None;
    }
    *guidance = old;
    Some(format!(
        "guidance back to {} for this model (30 was for FLUX.1 Fill)",
        old.map_or_else(|| "its default".to_string(), |g| g.to_string())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::img2img::FILL_GUIDANCE;

    #[test]
    fn a_fill_model_takes_guidance_30_unless_the_user_set_one() {
        let default = Settings::default().request.guidance;
        let mut replaced = None;
        // The studio's default guidance: Fill takes 30, said; another model gets it back.
        let mut g = default;
        assert!(model_guidance(&mut g, true, &mut replaced).is_some());
        assert_eq!(g, Some(FILL_GUIDANCE));
        assert!(
            model_guidance(&mut g, true, &mut replaced).is_none(),
            "once"
        );
        assert!(model_guidance(&mut g, false, &mut replaced).is_some());
        assert_eq!((g, replaced), (default, None));
        // A guidance the user chose stays, for Fill and after it.
        let mut g = Some(4.0);
        assert!(model_guidance(&mut g, true, &mut replaced).is_none());
        assert!(model_guidance(&mut g, false, &mut replaced).is_none());
        assert_eq!(g, Some(4.0));
        // Changed while Fill was loaded: kept when another model comes.
        let mut g = None;
        model_guidance(&mut g, true, &mut replaced);
        g = Some(25.0);
        assert!(model_guidance(&mut g, false, &mut replaced).is_none());
        assert_eq!((g, replaced), (Some(25.0), None));
        // Other models leave the guidance alone.
        let mut g = default;
        assert!(model_guidance(&mut g, false, &mut replaced).is_none());
        assert_eq!(g, default);
    }
}
