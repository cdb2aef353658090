//! The progress bar of the running job: step, step time, time left, steps reused, then
//! "decoding…" once the steps are done; and the layout the job runs with.

use egui::RichText;

use crate::app::view::JobView;

pub fn show(ui: &mut egui::Ui, job: Option<&JobView>) {
    let Some(j) = job else {
        return;
    };
    ui.add(egui::ProgressBar::new(j.fraction()).text(j.progress_text()));
    if !j.layout.is_empty() {
        ui.label(RichText::new(&j.layout).small().weak());
    }
}
