//! The left settings panel, top to bottom: the model ([`model`]), the prompts ([`prompts`]), the
//! sampling grid ([`sampling`]), then (drawn by the studio) devices and layout, then what blocks
//! or warns ([`checks`]) and the Generate / Cancel / Compare actions ([`actions`]).

use std::path::PathBuf;

use egui::{Color32, RichText};

use crate::app::command::{Command, Commands};
use crate::app::state::{size_warning, Settings, PRESETS};
use crate::app::view::{CacheListField, ListField, ListItem, ModelStatus, ThresholdField};
use crate::pipeline::cache::{CacheSpec, PRESET_NAMES};

/// What the panel reads and edits.
pub struct Panel<'a> {
    pub settings: &'a mut Settings,
    pub model: &'a ModelStatus,
    /// FLUX repos found in the Hugging Face cache.
    pub hf_models: &'a [(String, PathBuf)],
    pub busy: bool,
    /// Why Generate is refused (empty: it is not).
    pub blockers: &'a [String],
    /// A problem that does not block (e.g. the gallery folder is not writable).
    pub warning: Option<&'a str>,
    pub thresholds: &'a mut ThresholdField,
    pub caches: &'a mut CacheListField,
    pub cmds: &'a mut Commands,
}

const WARN: Color32 = Color32::from_rgb(230, 180, 60);

/// The model field, its shortcuts and its status.
pub fn model(ui: &mut egui::Ui, p: &mut Panel<'_>) {
    ui.heading("Parallax");
    ui.label(RichText::new("FLUX.1 over many GPUs").weak());
    ui.separator();
    let model_label = ui.label("Model");
    ui.horizontal(|ui| {
        ui.add(egui::TextEdit::singleline(&mut p.settings.model).desired_width(150.0))
            .labelled_by(model_label.id);
        if ui
            .button("Open…")
            .on_hover_text("a .safetensors file or a model folder")
            .clicked()
        {
            p.cmds.push(Command::OpenModelDialog);
        }
    });
    ui.horizontal(|ui| {
        for (label, value) in [("Demo", "demo"), ("dev", "dev"), ("schnell", "schnell")] {
            if ui
                .small_button(label)
                .on_hover_text(format!("--model {value}"))
                .clicked()
            {
                p.cmds.push(Command::UseModel(value.into()));
            }
        }
        if ui.small_button("Load").clicked() {
            p.cmds.push(Command::LoadModel);
        }
    });
    if p.hf_models.is_empty() {
        ui.label("no FLUX repos in the Hugging Face cache");
    } else {
        egui::ComboBox::from_id_salt("hf-cache")
            .selected_text("Hugging Face cache…")
            .show_ui(ui, |ui| {
                for (repo, _) in p.hf_models {
                    if ui
                        .selectable_label(p.settings.model == *repo, repo)
                        .clicked()
                    {
                        p.cmds.push(Command::UseModel(repo.clone()));
                    }
                }
            })
            .response
            .labelled_by(model_label.id);
    }
    match p.model {
        ModelStatus::NotLoaded => ui.label(RichText::new("not loaded").weak()),
        ModelStatus::Loading(m) => ui.label(format!("loading {m}…")),
        ModelStatus::Ready(s) => ui.label(RichText::new(s).small()),
        ModelStatus::Failed { error, .. } => {
            ui.add(egui::Label::new(RichText::new(error).color(Color32::LIGHT_RED)).wrap())
        }
    };
}

/// Prompt and negative prompt.
pub fn prompts(ui: &mut egui::Ui, p: &mut Panel<'_>) {
    let r = &mut p.settings.request;
    let l = ui.label("Prompt");
    ui.add(
        egui::TextEdit::multiline(&mut r.prompt)
            .desired_rows(4)
            .desired_width(f32::INFINITY)
            .hint_text("what to draw"),
    )
    .labelled_by(l.id);
    let l = ui.label("Negative prompt (true CFG > 1)");
    ui.add(
        egui::TextEdit::multiline(r.negative_prompt.get_or_insert_with(String::new))
            .desired_rows(2)
            .desired_width(f32::INFINITY),
    )
    .labelled_by(l.id);
}

/// Size, steps, seed, guidance, true CFG, cache threshold and precision.
pub fn sampling(ui: &mut egui::Ui, p: &mut Panel<'_>) {
    let random_seed = &mut p.settings.random_seed;
    let fp8 = &mut p.settings.fp8;
    let budget = &mut p.settings.memory_budget_gib;
    let r = &mut p.settings.request;
    egui::Grid::new("sampling").num_columns(2).show(ui, |ui| {
        let size_label = ui.label("Size");
        let current = PRESETS
            .iter()
            .find(|s| s.1 == r.width && s.2 == r.height)
            .map_or("custom", |s| s.0);
        egui::ComboBox::from_id_salt("size")
            .selected_text(current)
            .show_ui(ui, |ui| {
                for &(name, w, h) in PRESETS {
                    if ui.selectable_label(current == name, name).clicked() {
                        r.width = w;
                        r.height = h;
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
                egui::DragValue::new(&mut r.width)
                    .range(16..=8192)
                    .speed(16),
            )
            .labelled_by(l.id);
            let l = ui.label("height");
            ui.add(
                egui::DragValue::new(&mut r.height)
                    .range(16..=8192)
                    .speed(16),
            )
            .labelled_by(l.id);
        });
        ui.end_row();
        let l = ui.label("Steps");
        ui.add(egui::DragValue::new(r.steps.get_or_insert(4)).range(1..=100))
            .labelled_by(l.id);
        ui.end_row();
        let l = ui.label("Seed");
        ui.horizontal(|ui| {
            ui.add_enabled(!*random_seed, egui::DragValue::new(&mut r.seed))
                .labelled_by(l.id);
            ui.checkbox(random_seed, "random");
            if ui.small_button("Copy").clicked() {
                ui.ctx().copy_text(r.seed.to_string());
            }
        });
        ui.end_row();
        let l = ui.label("Guidance");
        ui.add(
            egui::DragValue::new(r.guidance.get_or_insert(3.5))
                .range(0.0..=20.0)
                .speed(0.1),
        )
        .labelled_by(l.id);
        ui.end_row();
        let l = ui.label("True CFG");
        ui.add(
            egui::DragValue::new(r.true_cfg.get_or_insert(1.0))
                .range(1.0..=20.0)
                .speed(0.1),
        )
        .labelled_by(l.id);
        ui.end_row();
        let l = ui.label("Cache");
        cache_picker(ui, r).labelled_by(l.id);
        ui.end_row();
        if r.cache.is_none() && r.cache_threshold > 0.0 {
            let l = ui.label("Cache threshold");
            ui.add(egui::Slider::new(&mut r.cache_threshold, 0.01..=0.3).step_by(0.01))
                .labelled_by(l.id)
                .on_hover_text(
                    "How much the first block's output may change before a step is computed \
                     again: higher reuses more steps (faster, less like the uncached image). \
                     First Block Cache's residual-difference threshold.",
                );
            ui.end_row();
        }
        let l = ui.label("Precision");
        ui.horizontal(|ui| {
            ui.checkbox(fp8, "FP8 (faster, slightly different)")
                .labelled_by(l.id)
                .on_hover_text(
                    "The transformer multiplies in 8-bit floating point: faster and half the \
                     weights' memory on newer NVIDIA GPUs (sm_89 and later, in bf16), with \
                     small differences in the image. Elsewhere it is only simulated (FP8's \
                     look, not its speed). E4M3 weights and activations; the model reloads.",
                );
            let name = |b: Option<u32>| {
                b.map_or("no memory budget".to_string(), |g| {
                    format!("{g} GiB budget")
                })
            };
            egui::ComboBox::from_id_salt("memory_budget")
                .selected_text(name(*budget))
                .show_ui(ui, |ui| {
                    for b in [None, Some(16), Some(24), Some(48), Some(80)] {
                        ui.selectable_value(budget, b, name(b));
                    }
                })
                .response
                .on_hover_text(
                    "Fit the model within this much GPU memory (planned for 1024 px): T5 loaded \
                     for each prompt, then FP8 without bf16 copies, then the modulations in FP8, \
                     as far as needed; the model reloads. `parallax memory` shows what each \
                     budget takes.",
                );
        });
        ui.end_row();
    });
}

/// What blocks Generate (red) and what only warns (amber: a large size, an unwritable gallery).
pub fn checks(ui: &mut egui::Ui, p: &mut Panel<'_>) {
    for b in p.blockers {
        ui.add(egui::Label::new(RichText::new(b).color(Color32::LIGHT_RED)).wrap());
    }
    let r = &p.settings.request;
    if let Some(w) = size_warning(r.width, r.height, p.settings.steps()) {
        ui.add(egui::Label::new(RichText::new(w).color(WARN)).wrap());
    }
    if let Some(w) = p.warning {
        ui.add(egui::Label::new(RichText::new(w).color(WARN)).wrap());
    }
}

/// Generate and Cancel; the compare thresholds and Run compare.
pub fn actions(ui: &mut egui::Ui, p: &mut Panel<'_>) {
    let ready = !p.busy && p.blockers.is_empty();
    ui.horizontal(|ui| {
        let hover = p.blockers.first().map_or("Ctrl+Enter", |b| b.as_str());
        if ui
            .add_enabled(ready, egui::Button::new("Generate"))
            .on_hover_text("Ctrl+Enter")
            .on_disabled_hover_text(hover)
            .clicked()
        {
            p.cmds.push(Command::Generate);
        }
        if ui
            .add_enabled(p.busy, egui::Button::new("Cancel"))
            .on_hover_text("Esc")
            .clicked()
        {
            p.cmds.push(Command::Cancel);
        }
    });
    // Wide enough for the default lists; the text is kept as typed and parsed as it changes.
    list_edit(
        ui,
        "Compare thresholds (0 to 1)",
        "0, 0.06, 0.08, 0.12",
        None,
        "thresholds",
        p.thresholds,
        &mut p.settings.compare_thresholds,
    );
    list_edit(
        ui,
        "Compare policies (; between)",
        "dbcache:t=0.2,taylor=1; magcache:t=0.3",
        Some(
            "fbcache:t=T · dbcache:f=,b=,t=,max=,warmup=,taylor= · taylorseer:n=,order=,warmup= \
             · magcache:t=,k=,warmup=",
        ),
        "policies",
        p.caches,
        &mut p.settings.compare_caches,
    );
    ui.horizontal(|ui| {
        let l = ui.label("Repeats");
        ui.add(egui::DragValue::new(&mut p.settings.compare_repeats).range(1..=20))
            .labelled_by(l.id)
            .on_hover_text(crate::runtime::repeats::METHOD);
        ui.label("timings per cell (the speed-up's range)");
    });
    let ok = ready && p.thresholds.error.is_none() && p.caches.error.is_none();
    if ui
        .add_enabled(ok, egui::Button::new("Run compare"))
        .on_disabled_hover_text("fix the thresholds, the policies or the settings above first")
        .clicked()
    {
        p.cmds.push(Command::Compare);
    }
}

/// The cache policy: off, First Block Cache at the threshold below, or another policy at one of
/// its presets (chosen from the measurements in BENCHMARKS.md), shown by the preset's name.
fn cache_picker(ui: &mut egui::Ui, r: &mut crate::pipeline::GenerateRequest) -> egui::Response {
    let (off, current) = cache_choice(r);
    let spec = r
        .cache
        .clone()
        .unwrap_or_else(|| CacheSpec::from_threshold(r.cache_threshold));
    egui::ComboBox::from_id_salt("cache-policy")
        .selected_text(current)
        .width(220.0)
        .show_ui(ui, |ui| {
            if ui
                .selectable_label(off, "Off")
                .on_hover_text("every step computed: the reference image")
                .clicked()
            {
                r.cache = None;
                r.cache_threshold = 0.0;
            }
            let fb = r.cache.is_none() && !off;
            if ui
                .selectable_label(fb, "First Block Cache")
                .on_hover_text("reuses a step while the first block's output barely changes; its threshold below")
                .clicked()
                && !fb
            {
                r.cache = None;
                r.cache_threshold = CacheSpec::preset("fbcache", "balanced")
                    .and_then(|c| c.fb_threshold())
                    .unwrap_or(0.2);
            }
            for policy in ["dbcache", "taylorseer", "magcache"] {
                for preset in PRESET_NAMES {
                    if let Some(spec) = CacheSpec::preset(policy, preset) {
                        let on = r.cache.as_ref() == Some(&spec);
                        if ui
                            .selectable_label(on, spec.display_name())
                            .on_hover_text(spec.to_string())
                            .clicked()
                        {
                            r.cache = Some(spec);
                        }
                    }
                }
            }
        })
        .response
        .on_hover_text(spec.to_string())
}

/// Whether the request's cache is off, and the picker's text for it: "Off", "First Block Cache",
/// or the preset's name ("TaylorSeer · balanced").
fn cache_choice(r: &crate::pipeline::GenerateRequest) -> (bool, String) {
    let off = match &r.cache {
        Some(c) => c.is_off(),
        None => r.cache_threshold <= 0.0,
    };
    let text = match &r.cache {
        _ if off => "Off".to_string(),
        None => CacheSpec::from_threshold(r.cache_threshold)
            .policy_label()
            .to_string(),
        Some(c) => c.display_name(),
    };
    (off, text)
}

/// A labelled one-line field for a list (`field` keeps the text; `list` gets what parses), with
/// what is wrong with the text, prefixed by `what`, under it.
fn list_edit<T: ListItem>(
    ui: &mut egui::Ui,
    label: &str,
    hint: &str,
    hover: Option<&str>,
    what: &str,
    field: &mut ListField<T>,
    list: &mut Vec<T>,
) {
    let l = ui.label(label);
    field.sync(list);
    let mut edit = ui
        .add(
            egui::TextEdit::singleline(&mut field.text)
                .desired_width(f32::INFINITY)
                .hint_text(hint),
        )
        .labelled_by(l.id);
    if let Some(h) = hover {
        edit = edit.on_hover_text(h);
    }
    if edit.changed() {
        field.edited(list);
    }
    if let Some(e) = &field.error {
        ui.add(
            egui::Label::new(RichText::new(format!("{what}: {e}")).color(Color32::LIGHT_RED))
                .wrap(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_picker_says_off_or_the_presets_name() {
        let mut r = crate::pipeline::GenerateRequest::default();
        assert_eq!(cache_choice(&r), (true, "Off".to_string()));
        r.cache_threshold = 0.12;
        assert_eq!(cache_choice(&r), (false, "First Block Cache".to_string()));
        r.cache = CacheSpec::preset("taylorseer", "balanced");
        assert_eq!(
            cache_choice(&r),
            (false, "TaylorSeer · balanced".to_string())
        );
        r.cache = Some(CacheSpec::None);
        assert_eq!(cache_choice(&r).1, "Off");
    }
}
