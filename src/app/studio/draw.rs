//! Drawing the window: the settings panel on the left, the tab bar, the progress strip and the
//! tab in the middle. Drawing only reads state and queues [`Action`]s; it never acts.

use super::*;

impl StudioApp {
    pub(super) fn panel<'a>(&'a mut self, blockers: &'a [String]) -> Panel<'a> {
        Panel {
            settings: &mut self.settings,
            model: &self.view.model,
            hf_models: &self.view.hf_models,
            comfy_models: &self.view.comfy_models,
            busy: self.view.job.is_some(),
            blockers,
            warning: self.view.gallery_warning.as_deref(),
            thresholds: &mut self.view.compare_view.thresholds,
            caches: &mut self.view.compare_view.caches,
            cmds: &mut self.cmds,
        }
    }

    /// What a suggestion after a failure may refer to.
    pub(super) fn advice_context(&self) -> crate::runtime::advice::Context {
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

    pub(super) fn settings_panel(&mut self, ui: &mut egui::Ui) {
        let none: Vec<String> = Vec::new();
        panels::settings::model(ui, &mut self.panel(&none));
        if let Some(done) = self.download.ui(ui) {
            self.say(done.text, done.error);
            if let Some(m) = done.model {
                self.view.hf_models = crate::model::layout::list_hf_cache();
                self.cmds.push(Action::UseModel(m));
            }
        }
        let mut p = self.panel(&none);
        ui.separator();
        panels::settings::prompts(ui, &mut p);
        panels::settings::sampling(ui, &mut p);
        panels::loras::show(
            ui,
            panels::loras::LorasPanel {
                settings: &mut self.settings,
                checks: &self.lora_checks,
                strengths: &mut self.view.compare_view.lora_strengths,
                cmds: &mut self.cmds,
            },
        );
        ui.separator();
        panels::source::show(
            ui,
            panels::source::SourcePanel {
                settings: &mut self.settings,
                edit: &mut self.view.edit,
                has_current: self.view.result.is_some(),
                cmds: &mut self.cmds,
            },
        );
        ui.separator();
        panels::devices::show(
            ui,
            panels::devices::DevicesPanel {
                settings: &mut self.settings,
                gpus: &self.view.gpus,
                model: self.view.model_shape,
            },
        );
        ui.separator();
        let blockers = self.blockers();
        let mut p = self.panel(&blockers);
        panels::settings::checks(ui, &mut p);
        panels::settings::actions(ui, &mut p);
    }

    pub(super) fn tab_bar(&mut self, ui: &mut egui::Ui) {
        ui.horizontal(|ui| {
            for (t, label) in [
                (Tab::Image, "Image"),
                (Tab::Compare, "Compare"),
                (Tab::Gallery, "Gallery"),
            ] {
                if ui.selectable_label(self.view.tab == t, label).clicked() {
                    self.cmds.push(Action::SelectTab(t));
                }
            }
            ui.separator();
            if ui.button("Export PNG…").clicked() {
                self.cmds.push(Action::Export);
            }
            if ui.button("Screenshot…").clicked() {
                self.cmds.push(Action::Screenshot);
            }
        });
    }

    pub(super) fn central(&mut self, ui: &mut egui::Ui) {
        self.tab_bar(ui);
        panels::progress::show(
            ui,
            panels::progress::ProgressPanel {
                job: self.view.job.as_ref(),
                queue: &self.view.queue,
                cmds: &mut self.cmds,
            },
        );
        match self.view.tab {
            Tab::Image => tabs::image::show(
                ui,
                tabs::image::ImageTab {
                    preview: &mut self.preview,
                    result: self.view.result.as_ref(),
                    job: self.view.job.as_ref(),
                    settings: &self.settings,
                    stats: &mut self.stats,
                    edit: &mut self.view.edit,
                },
            ),
            Tab::Compare => tabs::compare::show(
                ui,
                tabs::compare::CompareTab {
                    results: &self.view.compare,
                    job: self.view.job.as_ref(),
                    view: &mut self.view.compare_view,
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
                        view: &self.view.gallery,
                        dir: self.runtime.gallery().map(|g| g.dir()),
                        thumbs: &mut self.thumbs,
                        cmds: &mut self.cmds,
                    },
                )
            }
        }
    }
}
