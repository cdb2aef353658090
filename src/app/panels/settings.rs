//! The left settings panel, top to bottom: the model ([`model`]), the prompts ([`prompts`]), the
//! sampling grid ([`sampling`]), then (drawn by the studio) devices and layout, then what blocks
//! or warns ([`checks`]) and the Generate / Cancel / Compare actions ([`actions`]).

use std::path::PathBuf;

use egui::{Color32, RichText};

use crate::app::action::{Action, Actions};
use crate::app::state::{size_warning, Settings, DEMO_SIZE, PRESETS};
use crate::app::view::{CacheListField, ListField, ListItem, ModelStatus, ThresholdField};
use crate::pipeline::cache::{CacheSpec, PRESET_NAMES};

/// What the panel reads and edits.
pub struct Panel<'a> {
    pub settings: &'a mut Settings,
    pub model: &'a ModelStatus,
    /// FLUX repos found in the Hugging Face cache.
    pub hf_models: &'a [(String, PathBuf)],
    /// FLUX transformers found in ComfyUI installs.
    pub comfy_models: &'a [PathBuf],
    pub busy: bool,
    /// Why Generate is refused (empty: it is not).
    pub blockers: &'a [String],
    /// A problem that does not block (e.g. the gallery folder is not writable).
    pub warning: Option<&'a str>,
    pub thresholds: &'a mut ThresholdField,
    pub caches: &'a mut CacheListField,
    pub cmds: &'a mut Actions,
}

const WARN: Color32 = Color32::from_rgb(230, 180, 60);

/// The model field, its shortcuts and its status.
pub fn model(ui: &mut egui::Ui, p: &mut Panel<'_>) {
    ui.heading("Parallax");
    ui.label(RichText::new("FLUX models over many GPUs").weak());
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
            p.cmds.push(Action::OpenModelDialog);
        }
    });
    ui.horizontal(|ui| {
        for (label, value) in [("Demo", "demo"), ("dev", "dev"), ("schnell", "schnell")] {
            if ui
                .small_button(label)
                .on_hover_text(format!("--model {value}"))
                .clicked()
            {
                p.cmds.push(Action::UseModel(value.into()));
            }
        }
        if ui.small_button("Load").clicked() {
            p.cmds.push(Action::LoadModel);
        }
        if ui
            .small_button("Download…")
            .on_hover_text("fetch a model from the Hugging Face Hub into its cache")
            .clicked()
        {
            p.cmds.push(Action::ToggleDownload);
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
                        p.cmds.push(Action::UseModel(repo.clone()));
                    }
                }
            })
            .response
            .labelled_by(model_label.id);
    }
    if !p.comfy_models.is_empty() {
        egui::ComboBox::from_id_salt("comfyui")
            .selected_text("ComfyUI models…")
            .show_ui(ui, |ui| {
                for path in p.comfy_models {
                    let full = path.display().to_string();
                    let name = path
                        .file_name()
                        .map_or(full.clone(), |n| n.to_string_lossy().to_string());
                    if ui
                        .selectable_label(p.settings.model == full, name)
                        .on_hover_text(&full)
                        .clicked()
                    {
                        p.cmds.push(Action::UseModel(full));
                    }
                }
            })
            .response
            .labelled_by(model_label.id);
    }
    parts(ui, p);
    match p.model {
        ModelStatus::NotLoaded => ui.label(RichText::new("not loaded").weak()),
        ModelStatus::Loading(m) => ui.label(format!("loading {m}…")),
        ModelStatus::Ready(s) => ui.label(s.as_str()),
        ModelStatus::Failed { error, .. } => {
            ui.add(egui::Label::new(RichText::new(error).color(Color32::LIGHT_RED)).wrap())
        }
    };
}

/// The autoencoder and text encoders named apart from the transformer (ComfyUI keeps them in
/// `models/vae/` and `models/clip/`): shown for models read from files, not the built-in ones.
fn parts(ui: &mut egui::Ui, p: &mut Panel<'_>) {
    let model = p.settings.model.trim();
    if model.eq_ignore_ascii_case("demo") || model.starts_with("random:") {
        return;
    }
    let parts = &mut p.settings.parts;
    let named = [&parts.vae, &parts.clip, &parts.t5]
        .iter()
        .filter(|s| !s.trim().is_empty())
        .count();
    egui::CollapsingHeader::new(format!("Separate files ({named} named)"))
        .id_salt("model-parts")
        .show(ui, |ui| {
            egui::Grid::new("model-parts-grid")
                .num_columns(2)
                .show(ui, |ui| {
                    for (label, field, hover) in [
                        (
                            "VAE",
                            &mut parts.vae,
                            "ae.safetensors or a diffusers vae/ folder (--vae)",
                        ),
                        (
                            "CLIP",
                            &mut parts.clip,
                            "clip_l.safetensors or a diffusers text_encoder/ folder (--clip)",
                        ),
                        (
                            "T5",
                            &mut parts.t5,
                            "t5xxl_fp16.safetensors, t5xxl_fp8_e4m3fn.safetensors or a diffusers \
                             text_encoder_2/ folder (--t5)",
                        ),
                    ] {
                        let l = ui.label(label);
                        ui.add(
                            egui::TextEdit::singleline(field)
                                .desired_width(150.0)
                                .hint_text("found beside the model"),
                        )
                        .labelled_by(l.id)
                        .on_hover_text(hover);
                        ui.end_row();
                    }
                });
        });
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
    // The demo model was trained at 256 x 256 alone: no other size is offered for it.
    let demo = p.settings.is_demo();
    let random_seed = &mut p.settings.random_seed;
    let fp8 = &mut p.settings.fp8;
    let fp8_attention = &mut p.settings.fp8_attention;
    let budget = &mut p.settings.memory_budget_gib;
    let model = p.settings.model.trim();
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
                for &(name, w, h) in PRESETS.iter().filter(|s| !demo || s.1 == DEMO_SIZE) {
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
        ui.add_enabled_ui(!demo, |ui| {
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
            })
            .response
            .on_disabled_hover_text(
                "the demo model draws at 256 x 256, the size it was trained at",
            );
        });
        ui.end_row();
        let l = ui.label("Steps");
        ui.add(egui::DragValue::new(r.steps.get_or_insert(4)).range(1..=100))
            .labelled_by(l.id);
        ui.end_row();
        let l = ui.label("Seed");
        ui.horizontal(|ui| {
            seed_field(ui, &mut r.seed, !*random_seed).labelled_by(l.id);
            ui.checkbox(random_seed, "random");
            if ui.small_button("Copy").clicked() {
                ui.ctx().copy_text(r.seed.to_string());
            }
        });
        ui.end_row();
        let l = ui.label("Guidance");
        ui.add(
            // Up to 100: FLUX.1 Fill runs at 30 (a narrower range would clamp it on display).
            egui::DragValue::new(r.guidance.get_or_insert(3.5))
                .range(0.0..=100.0)
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
        // Always drawn (greyed unless First Block Cache is on), so the grid keeps its width.
        // A copy is drawn, so the slider's clamping never turns an Off cache on.
        let fb = r.cache.is_none() && r.cache_threshold > 0.0;
        let mut threshold = if fb { r.cache_threshold } else { 0.01 };
        let l = ui.label("Threshold");
        let slider = ui.add_enabled(
            fb,
            egui::Slider::new(&mut threshold, 0.01..=0.3).step_by(0.01),
        );
        if fb {
            r.cache_threshold = threshold;
        }
        slider.labelled_by(l.id).on_hover_text(
            "How much the first block's output may change before a step is computed \
             again: higher reuses more steps (faster, less like the uncached image). \
             First Block Cache's residual-difference threshold.",
        );
        ui.end_row();
        let l = ui.label("Precision");
        ui.horizontal(|ui| {
            ui.checkbox(fp8, "FP8").labelled_by(l.id).on_hover_text(
                "FP8 products (faster, slightly different): the transformer multiplies in \
                     8-bit floating point: faster and half the weights' memory on newer NVIDIA \
                     GPUs (sm_89 and later, in bf16), with small differences in the image. \
                     Elsewhere it is only simulated (FP8's look, not its speed). E4M3 weights \
                     and activations; the model reloads.",
            );
            ui.checkbox(fp8_attention, "FP8 attention").on_hover_text(
                "FP8 attention (experimental, approximate): attention compares queries and \
                 keys in 8-bit floating point (a scale for each 64 queries and 128 keys of \
                 every head), with small differences in the image. Not faster yet: on an H100 \
                 a step takes as long as without it. Runs on H100/H200 in bf16; elsewhere it \
                 is only simulated (its look, not its speed). Any layout; the model reloads.",
            );
            let name = |b: Option<u32>| {
                b.map_or("no memory budget".to_string(), |g| {
                    format!("{g} GiB budget")
                })
            };
            let custom = budget.filter(|g| !BUDGETS_GIB.contains(g));
            egui::ComboBox::from_id_salt("memory_budget")
                .selected_text(name(*budget))
                .show_ui(ui, |ui| {
                    ui.selectable_value(budget, None, name(None));
                    for g in BUDGETS_GIB {
                        ui.selectable_value(budget, Some(g), name(Some(g)));
                    }
                    if ui.selectable_label(custom.is_some(), "custom…").clicked() {
                        *budget = Some(custom.unwrap_or(20));
                    }
                })
                .response
                .on_hover_text(
                    "Fit the model within this much GPU memory (planned for 1024 px): T5 loaded \
                     for each prompt, then FP8 without bf16 copies, then the modulations in FP8, \
                     as far as needed; the model reloads. `parallax memory` shows what each \
                     budget takes.",
                );
            if let Some(g) = budget.as_mut().filter(|g| !BUDGETS_GIB.contains(g)) {
                ui.add(egui::DragValue::new(g).range(1..=1024).suffix(" GiB"));
            }
        });
        ui.end_row();
    });
    if let Some(g) = *budget {
        let answer = budget_answer(ui.ctx(), model, g, *fp8);
        ui.add(egui::Label::new(answer.as_str()).wrap());
    }
}

/// The budgets the picker offers, in GiB (a custom value besides).
const BUDGETS_GIB: [u32; 7] = [8, 10, 12, 16, 24, 48, 80];

/// What a budget means for `model` at the size a budget is planned for (as the engine plans it
/// when the model loads: [`crate::engine::memory::budget_answer`]; from the built-in configs for
/// `dev`/`schnell` when nothing is downloaded), kept per input so the files' headers are read
/// once.
fn budget_answer(ctx: &egui::Context, model: &str, gib: u32, fp8: bool) -> String {
    use crate::engine::{load, memory, ModelChoice, Precision};
    let key = egui::Id::NULL.with(("budget-answer", model, gib, fp8));
    if let Some(s) = ctx.data(|d| d.get_temp::<String>(key)) {
        return s;
    }
    let choice = ModelChoice {
        precision: if fp8 {
            Precision::Fp8
        } else {
            Precision::Native
        },
        ..ModelChoice::named(model)
    };
    let asked = choice.precision.load_options();
    let answer = choice
        .resolve_for_planning()
        .and_then(|r| load::workload(&r, candle_core::DType::BF16, None, true))
        .map(|w| {
            format!(
                "{model} at {}x{} px: {}",
                w.width,
                w.height,
                memory::budget_answer(&w, f64::from(gib) * (1u64 << 30) as f64, asked, true)
            )
        })
        .unwrap_or_else(|e| format!("cannot estimate {model}: {e}"));
    ctx.data_mut(|d| d.insert_temp(key, answer.clone()));
    answer
}

/// The seed as typed: every u64 (a drag value goes through f64 and loses seeds above 2^53).
/// The text is kept while it is edited; a seed changed elsewhere (random, restore) replaces it.
fn seed_field(ui: &mut egui::Ui, seed: &mut u64, enabled: bool) -> egui::Response {
    let id = ui.make_persistent_id("seed-text");
    let (mut text, shown) = ui
        .data(|d| d.get_temp::<(String, u64)>(id))
        .filter(|(_, shown)| shown == seed)
        .unwrap_or_else(|| (seed.to_string(), *seed));
    let r = ui.add_enabled(
        enabled,
        egui::TextEdit::singleline(&mut text).desired_width(90.0),
    );
    let parsed = text.trim().parse::<u64>();
    if let Ok(v) = parsed {
        *seed = v;
    }
    let r = if parsed.is_err() {
        r.on_hover_text("a whole number from 0 to 18446744073709551615")
    } else {
        r
    };
    ui.data_mut(|d| d.insert_temp(id, (text, if parsed.is_ok() { *seed } else { shown })));
    r
}

/// What blocks Generate (red) and what only warns (amber: a large size, an unwritable gallery).
pub fn checks(ui: &mut egui::Ui, p: &mut Panel<'_>) {
    for b in p.blockers {
        ui.add(egui::Label::new(RichText::new(b).color(Color32::LIGHT_RED)).wrap());
    }
    let r = &p.settings.request;
    if let Some(w) = p.settings.demo_size_note() {
        ui.add(egui::Label::new(RichText::new(w).color(WARN)).wrap());
    }
    if let Some(w) = size_warning(r.width, r.height, p.settings.steps()) {
        ui.add(egui::Label::new(RichText::new(w).color(WARN)).wrap());
    }
    if let Some(w) = p.warning {
        ui.add(egui::Label::new(RichText::new(w).color(WARN)).wrap());
    }
}

/// Generate (queued behind a running job), the batch count and Cancel; the compare thresholds
/// and Run compare.
pub fn actions(ui: &mut egui::Ui, p: &mut Panel<'_>) {
    let ready = p.blockers.is_empty();
    ui.horizontal(|ui| {
        let hover = p.blockers.first().map_or("Ctrl+Enter", |b| b.as_str());
        let what = if p.busy {
            "Ctrl+Enter: queued behind the running job"
        } else {
            "Ctrl+Enter"
        };
        if ui
            .add_enabled(ready, egui::Button::new("Generate"))
            .on_hover_text(what)
            .on_disabled_hover_text(hover)
            .clicked()
        {
            p.cmds.push(Action::Generate);
        }
        let l = ui.label("batch");
        ui.add(egui::DragValue::new(&mut p.settings.batch).range(1..=100))
            .labelled_by(l.id)
            .on_hover_text(
                "batch: jobs one Generate queues, seeds s, s + 1, ... (fresh seeds with random)",
            );
        if ui
            .add_enabled(p.busy, egui::Button::new("Cancel"))
            .on_hover_text("Esc")
            .clicked()
        {
            p.cmds.push(Action::Cancel);
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
        p.cmds.push(Action::Compare);
    }
}

/// The cache policy: off, First Block Cache at the threshold below, or another policy at one of
/// its presets (chosen from the measurements in BENCHMARKS.md), shown by the preset's name.
fn cache_picker(ui: &mut egui::Ui, r: &mut crate::pipeline::GenerateRequest) -> egui::Response {
    let (off, current) = cache_choice(r);
    let spec = r.cache_spec();
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
pub(super) fn list_edit<T: ListItem>(
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
