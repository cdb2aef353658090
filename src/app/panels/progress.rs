//! The progress bar of the running job: step, step time, time left, steps reused, then
//! "decoding…" once the steps are done; the layout the job runs with; and under it the jobs
//! waiting their turn, each with its prompt and seed, to move up or down or take out.

use egui::RichText;

use crate::app::action::{Action, Actions};
use crate::app::view::{JobView, QueuedJob};

/// What the progress panel draws from, and where its buttons' actions go.
pub struct ProgressPanel<'a> {
    pub job: Option<&'a JobView>,
    pub queue: &'a [QueuedJob],
    pub cmds: &'a mut Actions,
}

pub fn show(ui: &mut egui::Ui, p: ProgressPanel<'_>) {
    let ProgressPanel { job, queue, cmds } = p;
    let Some(j) = job else {
        return;
    };
    ui.add(egui::ProgressBar::new(j.fraction()).text(j.progress_text()));
    if !j.layout.is_empty() {
        ui.label(RichText::new(&j.layout).weak());
    }
    if queue.is_empty() {
        return;
    }
    ui.label(format!("{} waiting", queue.len()));
    for (i, q) in queue.iter().enumerate() {
        ui.horizontal(|ui| {
            let up = ui
                .add_enabled(i > 0, egui::Button::new("up").small())
                .on_hover_text("earlier");
            if up.clicked() {
                cmds.push(Action::MoveQueued(q.id, true));
            }
            let down = ui
                .add_enabled(i + 1 < queue.len(), egui::Button::new("down").small())
                .on_hover_text("later");
            if down.clicked() {
                cmds.push(Action::MoveQueued(q.id, false));
            }
            if ui
                .small_button("remove")
                .on_hover_text("take it out of the queue")
                .clicked()
            {
                cmds.push(Action::CancelQueued(q.id));
            }
            let what = if q.compare { "compare: " } else { "" };
            ui.label(RichText::new(format!(
                "{}. {what}{} — {}",
                i + 1,
                q.prompt,
                q.summary
            )));
        });
    }
}
