//! The Compare tab: one prompt and seed at several cache thresholds and policies against the
//! uncached reference: a table (each step computed or reused, wall time, speed-up with its range
//! over the timing rounds, PSNR and SSIM against the reference, and the prompt score for prompts
//! in the demo model's world; every header says what its number means), a wipe between any two
//! of them (the reference on the left unless another is picked), and their difference heatmap
//! (WGSL, or its CPU twin) with its colour scale. A sweep over LoRA strengths names each cell's
//! strength, and measures it against the uncached cell of its own strength.

use std::collections::HashMap;

use egui::{Color32, TextureHandle, TextureOptions};

use super::fit;
use crate::app::automation::UiStats;
use crate::app::gpu;
use crate::app::heatmap;
use crate::app::preview::LivePreview;
use crate::app::view::{color_image, full_uv, CompareView, JobView, Shown};
use crate::pipeline::cache::StepKind;
use crate::runtime::repeats::METHOD;
use crate::runtime::ImageResult;

/// What each column's number means, shown on its header.
const STEPS_HELP: &str = "Each denoising step as a cell, the first on the left: filled = \
     computed (the whole model ran), hollow = reused from the cache (most of the model skipped). \
     How many of each in the tooltip.";
const WALL_HELP: &str = "Time to make the image (the prompt, every step, the decode): the \
     median over the timing rounds.";
const PSNR_HELP: &str = "Peak signal-to-noise ratio against the uncached image, in dB: higher is \
     closer. Above about 40 dB the difference is invisible to the eye; 30 to 40 dB shows on a \
     close look; below 30 dB it is plain to see. \"identical\": the very same pixels.";
const SSIM_HELP: &str = "Structural similarity to the uncached image, from 0 to 1 (1: \
     identical): how alike the shapes and edges are. Above about 0.98 the eye rarely finds a \
     difference; below about 0.90 it is plain to see.";
const PROMPT_HELP: &str = "The share of the prompt's checks the image passes (colours, shapes, \
     where they are, the background), read by a checker made for the demo model's world. It \
     applies only to the built-in demo model and prompts of its kind: other prompts get none.";

/// CPU heatmaps already made, by (reference id, candidate id, gain bits).
#[derive(Default)]
pub struct HeatmapCache(HashMap<(u64, u64, u32), TextureHandle>);

pub struct CompareTab<'a> {
    pub results: &'a [Shown],
    pub job: Option<&'a JobView>,
    pub view: &'a mut CompareView,
    pub gain: &'a mut f32,
    pub preview: &'a mut LivePreview,
    pub heat: &'a mut HeatmapCache,
    pub stats: &'a mut UiStats,
}

/// The speed-up column: the reference, "no reuse" when every step was computed (a ratio of two
/// equal amounts of work is timing noise), the median with its range over the timing rounds
/// ("1.42x (1.35-1.50)", or "no measurable gain" when the range reaches 1.0), "timing…" while
/// later rounds run, else the one ratio measured.
pub fn speedup_text(s: &Shown, reference: bool, running: bool) -> String {
    let r: &ImageResult = &s.result;
    if reference {
        return "reference".into();
    }
    if r.generated.stats.reused == 0 {
        return "no reuse".into();
    }
    match (s.timing.as_ref().and_then(|t| t.speedup()), r.speedup) {
        (Some(spread), _) => spread.label(),
        (None, _) if running => "timing…".into(),
        (None, Some(x)) => format!("{x:.2}x (one timing)"),
        (None, None) => "not timed".into(),
    }
}

/// The speed-up cell's tooltip: the method, then this cell's rounds.
fn speedup_help(s: &Shown) -> String {
    let Some(t) = &s.timing else {
        return METHOD.to_string();
    };
    let rounds: Vec<String> = t.speedups.iter().map(|x| format!("{x:.2}x")).collect();
    let mut out = format!(
        "{METHOD}\n\nThis cell: {}; round by round {} (wall time {}).",
        t.speedup().map_or(String::new(), |s| s.describe()),
        rounds.join(", "),
        t.wall_ms
            .iter()
            .map(|ms| format!("{:.2} s", ms / 1e3))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !t.identical {
        out.push_str(" A later round made a different image: the timings may not compare.");
    }
    out
}

pub fn show(ui: &mut egui::Ui, t: CompareTab<'_>) {
    if t.results.is_empty() {
        if t.job.is_some_and(|j| j.compare) {
            let side = ui.available_width().min(512.0);
            let (rect, _) = ui.allocate_exact_size(egui::vec2(side, side), egui::Sense::hover());
            t.preview.draw(ui, rect, t.stats);
        } else {
            ui.label("Run a compare sweep: the same prompt and seed at each cache threshold and policy, against the uncached image.");
        }
        return;
    }
    let sweep = Sweep::of(t.results);
    thumbnails(ui, t.results, t.view, &sweep);
    table(
        ui,
        t.results,
        t.view,
        t.job.is_some_and(|j| j.compare),
        &sweep,
    );
    if let Some(j) = t.job {
        ui.label(format!("running image {} of {}…", j.image + 1, j.images));
    }
    ui.horizontal(|ui| {
        let l = ui.label("wipe");
        ui.add(egui::Slider::new(&mut t.view.wipe, 0.0..=1.0).show_value(false))
            .labelled_by(l.id);
        ui.checkbox(&mut t.view.show_heatmap, "difference heatmap");
        ui.add(egui::Slider::new(&mut *t.gain, 1.0..=16.0).text("gain"));
    });
    let (Some(reference), Some(sel)) = (
        t.results.get(t.view.left).or(t.results.first()),
        t.results.get(t.view.selected),
    ) else {
        return;
    };
    let (w, h) = (reference.image.width as f32, reference.image.height as f32);
    let room = ui.available_size() - egui::vec2(0.0, 64.0);
    let (rect, _) = ui.allocate_exact_size(fit(room, w, h), egui::Sense::hover());
    if t.view.show_heatmap {
        heatmap_view(
            ui,
            rect,
            reference,
            sel,
            *t.gain,
            t.preview.uses_gpu(),
            t.heat,
        );
    } else {
        wipe(ui, rect, reference, sel, t.view.wipe);
    }
    let left = t.view.left.min(t.results.len() - 1);
    ui.label(format!(
        "left: {} · right: {}",
        if sweep.references[left] == left && !sweep.strengths {
            "reference (no cache)".to_string()
        } else {
            sweep.name(reference)
        },
        sweep.name(sel)
    ));
    if t.view.show_heatmap {
        legend(ui, *t.gain);
    }
}

/// The heatmap's colour scale: the ramp from black to white with the difference (out of 255, in
/// the channel that differs most) each colour stands for at this gain.
fn legend(ui: &mut egui::Ui, gain: f32) {
    const W: f32 = 256.0;
    const H: f32 = 12.0;
    let full = 255.0 / gain.max(1e-3);
    ui.vertical(|ui| {
        let (rect, _) = ui.allocate_exact_size(egui::vec2(W, H + 14.0), egui::Sense::hover());
        let bar = egui::Rect::from_min_size(rect.min, egui::vec2(W, H));
        let p = ui.painter();
        let slices = 64;
        for k in 0..slices {
            let t = (k as f32 + 0.5) / slices as f32;
            let [r, g, b] = heatmap::heat_color(t);
            let x0 = bar.left() + W * k as f32 / slices as f32;
            let slice = egui::Rect::from_min_max(
                egui::pos2(x0, bar.top()),
                egui::pos2(x0 + W / slices as f32 + 0.5, bar.bottom()),
            );
            p.rect_filled(slice, 0.0, Color32::from_rgb(r, g, b));
        }
        p.rect_stroke(
            bar,
            0.0,
            egui::Stroke::new(1.0, ui.visuals().weak_text_color()),
            egui::StrokeKind::Outside,
        );
        for (k, v) in [
            (0.0, 0.0),
            (1.0 / 3.0, full / 3.0),
            (2.0 / 3.0, full * 2.0 / 3.0),
            (1.0, full),
        ] {
            let x = bar.left() + W * k;
            let align = if k == 0.0 {
                egui::Align2::LEFT_TOP
            } else if k == 1.0 {
                egui::Align2::RIGHT_TOP
            } else {
                egui::Align2::CENTER_TOP
            };
            p.text(
                egui::pos2(x, bar.bottom() + 1.0),
                align,
                format!("{v:.0}"),
                egui::FontId::proportional(11.0),
                ui.visuals().text_color(),
            );
        }
        ui.label(format!(
            "Difference scale: black = identical, white = {full:.0} or more of 255 (gain {gain:.0})"
        ))
        .on_hover_text(
            "Each pixel's colour is how far it is from the left image: the largest of its \
             red, green and blue differences (0 to 255), times the gain; the numbers on the bar \
             are the difference each colour stands for. Raise the gain to see small \
             differences; at gain 1, white is the largest difference there can be.",
        );
    });
}

/// Every cell as a small picture under its cache: a click shows it on the right of the wipe,
/// a secondary click on the left.
fn thumbnails(ui: &mut egui::Ui, results: &[Shown], view: &mut CompareView, sweep: &Sweep) {
    const SIDE: f32 = 72.0;
    egui::ScrollArea::horizontal()
        .id_salt("compare-cells")
        .show(ui, |ui| {
            ui.horizontal(|ui| {
                for (i, s) in results.iter().enumerate() {
                    ui.vertical(|ui| {
                        let (w, h) = (s.image.width as f32, s.image.height as f32);
                        let size = fit(egui::vec2(SIDE, SIDE), w, h);
                        let r = ui
                            .add(egui::Image::new((s.tex.id(), size)).sense(egui::Sense::click()));
                        let picked = if i == view.selected {
                            Some(Color32::LIGHT_BLUE)
                        } else if i == view.left {
                            Some(Color32::GRAY)
                        } else {
                            None
                        };
                        if let Some(c) = picked {
                            ui.painter().rect_stroke(
                                r.rect,
                                2.0,
                                egui::Stroke::new(2.0, c),
                                egui::StrokeKind::Outside,
                            );
                        }
                        if r.clicked() {
                            view.selected = i;
                        }
                        if r.secondary_clicked() {
                            view.left = i;
                        }
                        ui.set_max_width(SIDE + 68.0);
                        let spec = s.result.generated.settings.cache_spec();
                        ui.add(egui::Label::new(sweep.name(s)).truncate())
                            .on_hover_text(spec.to_string());
                    });
                }
            });
        });
}

fn table(
    ui: &mut egui::Ui,
    results: &[Shown],
    view: &mut CompareView,
    running: bool,
    sweep: &Sweep,
) {
    egui::Grid::new("compare-table")
        .striped(true)
        .num_columns(9 + usize::from(sweep.strengths))
        .show(ui, |ui| {
            if sweep.strengths {
                ui.strong("LoRA").on_hover_text(LORA_HELP);
            }
            for (h, help) in [
                (
                    "cache",
                    "The cache policy and its preset; hover a name for its settings.",
                ),
                ("steps", STEPS_HELP),
                ("wall time", WALL_HELP),
                ("speed-up", METHOD),
                ("PSNR", PSNR_HELP),
                ("SSIM", SSIM_HELP),
                ("prompt", PROMPT_HELP),
                ("left", "show on the left of the wipe"),
                ("right", "show on the right of the wipe"),
            ] {
                ui.strong(h).on_hover_text(help);
            }
            ui.end_row();
            for (i, s) in results.iter().enumerate() {
                let g = &s.result.generated;
                if sweep.strengths {
                    ui.label(strengths(s)).on_hover_text(LORA_HELP);
                }
                let spec = g.settings.cache_spec();
                ui.label(spec.display_name())
                    .on_hover_text(spec.to_string());
                step_strip(ui, &g.stats.steps);
                let wall = s
                    .timing
                    .as_ref()
                    .map_or(g.timings.total_ms, |t| t.median_ms());
                ui.label(format!("{:.2} s", wall / 1e3));
                // A fixed width: the table does not jump as the rounds' verdicts come in.
                ui.allocate_ui_with_layout(
                    egui::vec2(SPEEDUP_W, ui.spacing().interact_size.y),
                    egui::Layout::left_to_right(egui::Align::Center),
                    |ui| {
                        ui.set_min_width(SPEEDUP_W);
                        ui.label(speedup_text(s, sweep.references[i] == i, running))
                            .on_hover_text(speedup_help(s));
                    },
                );
                ui.label(s.result.quality.map_or("—".into(), |q| {
                    if q.psnr_db.is_infinite() {
                        "identical".into()
                    } else {
                        format!("{:.2} dB", q.psnr_db)
                    }
                }))
                .on_hover_text(PSNR_HELP);
                ui.label(
                    s.result
                        .quality
                        .map_or("—".into(), |q| format!("{:.4}", q.ssim)),
                )
                .on_hover_text(SSIM_HELP);
                ui.label(
                    s.prompt_score
                        .map_or("—".into(), |a| format!("{:.0} %", 100.0 * a)),
                )
                .on_hover_text(PROMPT_HELP);
                if ui
                    .radio(view.left == i, "")
                    .on_hover_text("show on the left of the wipe")
                    .clicked()
                {
                    view.left = i;
                }
                if ui
                    .radio(view.selected == i, "")
                    .on_hover_text("show on the right of the wipe")
                    .clicked()
                {
                    view.selected = i;
                }
                ui.end_row();
            }
        });
}

const LORA_HELP: &str = "The LoRA strength of this cell (the sweep's \"Compare at strengths\"): \
     each strength's cells are measured against the uncached image at the same strength, so \
     PSNR, SSIM and the speed-up say what the cache costs with the LoRA at that strength.";

/// How a sweep's cells relate: what each is measured against (the first cell with the same
/// LoRAs: the runtime's rule, [`crate::runtime::events::compare_references`]), and whether it
/// swept LoRA strengths.
struct Sweep {
    references: Vec<usize>,
    strengths: bool,
}

impl Sweep {
    fn of(results: &[Shown]) -> Self {
        let loras: Vec<&[crate::model::lora::LoraChoice]> = results
            .iter()
            .map(|s| s.result.generated.settings.loras.as_slice())
            .collect();
        let references = crate::runtime::events::first_alike(&loras);
        let strengths = references.iter().any(|&r| r != 0);
        Self {
            references,
            strengths,
        }
    }

    /// A cell's name: its policy and preset, after its LoRA strength in a strength sweep.
    fn name(&self, s: &Shown) -> String {
        let cache = s.result.generated.settings.cache_spec().display_name();
        if self.strengths {
            format!("LoRA {} · {cache}", strengths(s))
        } else {
            cache
        }
    }
}

/// A cell's LoRA strengths ("0.5"; "1, -0.5" with two LoRAs on).
fn strengths(s: &Shown) -> String {
    let l = &s.result.generated.settings.loras;
    if l.is_empty() {
        return "none".into();
    }
    l.iter()
        .map(|c| c.strength.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The speed-up column's width in points (its longest label fits).
const SPEEDUP_W: f32 = 140.0;

/// Each step of an image as a small cell: filled if computed, hollow if reused.
fn step_strip(ui: &mut egui::Ui, steps: &[StepKind]) {
    const W: f32 = 5.0;
    const H: f32 = 12.0;
    const GAP: f32 = 1.0;
    let n = steps.len().max(1) as f32;
    let (rect, resp) =
        ui.allocate_exact_size(egui::vec2(n * (W + GAP) - GAP, H), egui::Sense::hover());
    let computed = ui.visuals().strong_text_color();
    let reused = ui.visuals().weak_text_color();
    for (k, step) in steps.iter().enumerate() {
        let x = rect.left() + k as f32 * (W + GAP);
        let cell = egui::Rect::from_min_size(egui::pos2(x, rect.top()), egui::vec2(W, H));
        if step.is_reused() {
            ui.painter().rect_stroke(
                cell.shrink(0.5),
                1.0,
                egui::Stroke::new(1.0, reused),
                egui::StrokeKind::Inside,
            );
        } else {
            ui.painter().rect_filled(cell, 1.0, computed);
        }
    }
    let words: Vec<String> = steps
        .iter()
        .enumerate()
        .map(|(k, s)| {
            format!(
                "{}: {}",
                k + 1,
                if s.is_reused() { "reused" } else { "computed" }
            )
        })
        .collect();
    let reused_n = steps.iter().filter(|s| s.is_reused()).count();
    resp.on_hover_text(format!(
        "{} computed, {reused_n} reused.\n{}\n{STEPS_HELP}",
        steps.len() - reused_n,
        words.join(", ")
    ));
}

/// The left pick left of the line, the right pick right of it.
fn wipe(ui: &mut egui::Ui, rect: egui::Rect, reference: &Shown, sel: &Shown, at: f32) {
    let x = rect.left() + rect.width() * at;
    let left = egui::Rect::from_min_max(rect.min, egui::pos2(x, rect.max.y));
    let right = egui::Rect::from_min_max(egui::pos2(x, rect.min.y), rect.max);
    let uv_l = egui::Rect::from_min_max(egui::pos2(0.0, 0.0), egui::pos2(at, 1.0));
    let uv_r = egui::Rect::from_min_max(egui::pos2(at, 0.0), egui::pos2(1.0, 1.0));
    let p = ui.painter();
    p.image(reference.tex.id(), left, uv_l, Color32::WHITE);
    p.image(sel.tex.id(), right, uv_r, Color32::WHITE);
    p.vline(x, rect.y_range(), egui::Stroke::new(2.0, Color32::WHITE));
}

fn heatmap_view(
    ui: &mut egui::Ui,
    rect: egui::Rect,
    reference: &Shown,
    sel: &Shown,
    gain: f32,
    gpu: bool,
    cache: &mut HeatmapCache,
) {
    if gpu {
        ui.painter().add(egui_wgpu::Callback::new_paint_callback(
            rect,
            gpu::HeatmapCallback {
                reference: (reference.id, reference.image.clone()),
                candidate: (sel.id, sel.image.clone()),
                gain,
            },
        ));
        return;
    }
    let key = (reference.id, sel.id, gain.to_bits());
    if let std::collections::hash_map::Entry::Vacant(slot) = cache.0.entry(key) {
        if let Some(img) = heatmap::diff_heatmap(&reference.image, &sel.image, gain) {
            slot.insert(ui.ctx().load_texture(
                "heatmap",
                color_image(&img),
                TextureOptions::NEAREST,
            ));
        }
    }
    if let Some(t) = cache.0.get(&key) {
        ui.painter().image(t.id(), rect, full_uv(), Color32::WHITE);
    }
}
