//! The LoRA list in the settings panel: a row per file (its name, on/off, a strength from -2 to 2,
//! remove) with what the check against the loaded model found under it (the engine's words when
//! it does not fit), *Add file…*, *Add folder…*, the demo's polka LoRA in one click when the
//! model is the demo, and the strengths the compare sweep crosses with its cache cells.

use egui::{Color32, RichText};

use super::settings::list_edit;
use crate::app::action::{Action, Actions};
use crate::app::lora::{Fit, LoraChecks, STRENGTHS};
use crate::app::state::{Settings, Strength};
use crate::app::view::ListField;

/// What the section reads and edits.
pub struct LorasPanel<'a> {
    pub settings: &'a mut Settings,
    pub checks: &'a LoraChecks,
    /// The compare sweep's strengths as typed.
    pub strengths: &'a mut ListField<Strength>,
    pub cmds: &'a mut Actions,
}

/// The demo LoRA's file name (offered when the model is the demo and it is not listed).
const DEMO_FILE: &str = "lora-polka.safetensors";

pub fn show(ui: &mut egui::Ui, p: LorasPanel<'_>) {
    let on = p.settings.loras.iter().filter(|e| e.on).count();
    let title = match p.settings.loras.len() {
        0 => "LoRAs (none)".to_string(),
        n => format!("LoRAs ({on} of {n} on)"),
    };
    egui::CollapsingHeader::new(title)
        .id_salt("loras")
        .default_open(true)
        .show(ui, |ui| {
            rows(ui, p.settings, p.checks);
            ui.horizontal(|ui| {
                if ui
                    .small_button("Add file…")
                    .on_hover_text("a LoRA .safetensors file (kohya, diffusers/PEFT or BFL names)")
                    .clicked()
                {
                    p.cmds.push(Action::AddLoraFile);
                }
                if ui
                    .small_button("Add folder…")
                    .on_hover_text("every .safetensors file in a folder")
                    .clicked()
                {
                    p.cmds.push(Action::AddLoraFolder);
                }
                let listed = p
                    .settings
                    .loras
                    .iter()
                    .any(|e| e.path.file_name().is_some_and(|n| n == DEMO_FILE));
                if p.settings.is_demo()
                    && !listed
                    && ui
                        .small_button("Polka dots (demo)")
                        .on_hover_text(
                            "the demo model's LoRA: it teaches the background \"red and blue \
                             polka dots\" (assets/demo/lora-polka.safetensors)",
                        )
                        .clicked()
                {
                    p.cmds.push(Action::AddDemoLora);
                }
            });
            if on > 0 {
                list_edit(
                    ui,
                    "Compare at strengths (-2 to 2)",
                    "0, 0.5, 1",
                    Some(
                        "Run compare makes every cache cell at each of these strengths (each LoRA \
                         that is on set to it); a strength's cells are measured against its own \
                         uncached image",
                    ),
                    "strengths",
                    p.strengths,
                    &mut p.settings.compare_lora_strengths,
                );
            }
        });
}

/// One row per file, and what its check found under it.
fn rows(ui: &mut egui::Ui, settings: &mut Settings, checks: &LoraChecks) {
    let mut remove = None;
    for (i, e) in settings.loras.iter_mut().enumerate() {
        let name = e.name();
        ui.horizontal(|ui| {
            let check = ui
                .checkbox(&mut e.on, &name)
                .on_hover_text(e.path.display().to_string());
            ui.add_enabled(
                e.on,
                egui::Slider::new(&mut e.strength, STRENGTHS)
                    .step_by(0.05)
                    .fixed_decimals(2),
            )
            .labelled_by(check.id)
            .on_hover_text(
                "strength: 1 as trained, 0 off, negative pushes away from what it learnt",
            );
            if ui
                .small_button("Remove")
                .on_hover_text(format!("remove {name} from the list"))
                .clicked()
            {
                remove = Some(i);
            }
        });
        let (text, colour) = match checks.fit(&e.path) {
            None => continue,
            Some(Fit::Checking) => ("checking against the model…".to_string(), None),
            Some(Fit::Fits(n)) => (format!("fits the model: adapts {n} layers"), None),
            Some(Fit::DoesNotFit(why)) => (why.clone(), Some(Color32::LIGHT_RED)),
        };
        let text = match colour {
            Some(c) => RichText::new(text).color(c),
            None => RichText::new(text).weak().small(),
        };
        ui.add(egui::Label::new(text).wrap());
    }
    if let Some(i) = remove {
        settings.loras.remove(i);
    }
}
