//! The Image tab: the running job's latent preview as it forms, then the decoded image, with a
//! caption that describes what is on screen (the new job's settings while it runs, the finished
//! image's stats after). With a source image set, it shows the source and its mask to paint
//! instead ([`super::edit`]), until the next job starts.

use egui::{Color32, RichText};

use super::fit;
use crate::app::automation::UiStats;
use crate::app::preview::LivePreview;
use crate::app::state::Settings;
use crate::app::view::{full_uv, JobView, Shown};

pub struct ImageTab<'a> {
    pub preview: &'a mut LivePreview,
    pub result: Option<&'a Shown>,
    pub job: Option<&'a JobView>,
    pub settings: &'a Settings,
    pub stats: &'a mut UiStats,
    /// The source image's mask painter.
    pub edit: &'a mut crate::app::view::EditView,
}

pub fn show(ui: &mut egui::Ui, t: ImageTab<'_>) {
    let running = t.job.is_some_and(|j| !j.compare);
    if let Some(init) = t.settings.request.init.as_ref().filter(|_| !running) {
        let ed = &mut t.edit.mask;
        ui.horizontal(|ui| {
            ui.add_enabled_ui(t.result.is_some(), |ui| {
                ui.selectable_value(&mut ed.editing, false, "Last image");
            });
            ui.selectable_value(&mut ed.editing, true, "Source and mask")
                .on_hover_text("paint what to redraw: white in the mask is redrawn, the rest kept");
        });
        if ed.editing || t.result.is_none() {
            super::edit::tools(ui, ed);
            let avail = ui.available_size() - egui::vec2(0.0, 30.0);
            super::edit::canvas(ui, t.edit, init, avail);
            ui.label(
                RichText::new(
                    "paint what should change: red is redrawn from the prompt, the rest kept",
                )
                .weak(),
            );
            return;
        }
    }
    let (w, h) = match (t.preview.image_size(), t.result) {
        (Some(size), _) if running => size,
        (_, Some(r)) => (r.image.width as f32, r.image.height as f32),
        _ => (
            t.settings.request.width as f32,
            t.settings.request.height as f32,
        ),
    };
    let avail = ui.available_size() - egui::vec2(0.0, 60.0);
    let (rect, _) = ui.allocate_exact_size(fit(avail, w, h), egui::Sense::hover());
    let drawn = running && t.preview.draw(ui, rect, t.stats);
    if !drawn {
        if let Some(r) = t.result {
            let tint = if running {
                Color32::from_gray(110)
            } else {
                Color32::WHITE
            };
            ui.painter().image(r.tex.id(), rect, full_uv(), tint);
        } else {
            ui.painter().rect_filled(rect, 4.0, Color32::from_gray(30));
            ui.painter().text(
                rect.center(),
                egui::Align2::CENTER_CENTER,
                if running {
                    "working…"
                } else {
                    "Ctrl+Enter to generate"
                },
                egui::FontId::proportional(16.0),
                Color32::GRAY,
            );
        }
    }
    match (t.job, t.result) {
        // The previous image's stats would describe the wrong image.
        (Some(j), _) if running => {
            ui.label(RichText::new(format!("generating {}…", j.summary)).weak());
        }
        (_, Some(r)) => {
            ui.label(r.caption());
        }
        _ => {}
    }
}
