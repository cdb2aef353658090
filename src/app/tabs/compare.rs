//! The Compare tab: one prompt and seed at several cache thresholds and policies against the
//! uncached reference: a table (wall time, speedup, steps computed / reused, PSNR and SSIM
//! against the reference, and the prompt score for prompts in the demo model's world), a wipe
//! between any two of them (the reference on the left unless another is picked), and their
//! difference heatmap (WGSL, or its CPU twin).

use std::collections::HashMap;

use egui::{Color32, RichText, TextureHandle, TextureOptions};

use super::fit;
use crate::app::automation::UiStats;
use crate::app::gpu;
use crate::app::heatmap;
use crate::app::preview::LivePreview;
use crate::app::view::{color_image, full_uv, CompareView, JobView, Shown};
use crate::runtime::ImageResult;

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

/// The speedup column: the reference, "no reuse" when every step was computed (a ratio of two
/// equal amounts of work is timing noise), else the measured ratio.
pub fn speedup_text(r: &ImageResult) -> String {
    match r.speedup {
        None => "reference".into(),
        Some(_) if r.generated.stats.reused == 0 => "no reuse".into(),
        Some(x) => format!("{x:.2}x"),
    }
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
    thumbnails(ui, t.results, t.view);
    table(ui, t.results, t.view);
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
    let (rect, _) = ui.allocate_exact_size(fit(ui.available_size(), w, h), egui::Sense::hover());
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
    ui.label(
        RichText::new(format!(
            "left: {} · right: {}",
            if t.view.left == 0 {
                "reference (no cache)".to_string()
            } else {
                cache_label(&reference.result.generated.settings)
            },
            cache_label(&sel.result.generated.settings)
        ))
        .small(),
    );
}

/// Every cell as a small picture under its cache: a click shows it on the right of the wipe,
/// a secondary click on the left.
fn thumbnails(ui: &mut egui::Ui, results: &[Shown], view: &mut CompareView) {
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
                        ui.set_max_width(SIDE + 48.0);
                        let label = cache_label(&s.result.generated.settings);
                        ui.add(egui::Label::new(RichText::new(&label).small()).truncate())
                            .on_hover_text(label);
                    });
                }
            });
        });
}

fn table(ui: &mut egui::Ui, results: &[Shown], view: &mut CompareView) {
    egui::Grid::new("compare-table")
        .striped(true)
        .num_columns(9)
        .show(ui, |ui| {
            for h in [
                "cache",
                "wall time",
                "speedup",
                "steps computed / reused",
                "PSNR",
                "SSIM",
                "prompt score",
                "left",
                "right",
            ] {
                ui.strong(h);
            }
            ui.end_row();
            for (i, s) in results.iter().enumerate() {
                let g = &s.result.generated;
                ui.label(cache_label(&g.settings));
                ui.label(format!("{:.2} s", g.timings.total_ms / 1e3));
                ui.label(speedup_text(&s.result));
                ui.label(format!("{} / {}", g.stats.computed, g.stats.reused));
                ui.label(s.result.quality.map_or("—".into(), |q| {
                    if q.psnr_db.is_infinite() {
                        "identical".into()
                    } else {
                        format!("{:.2} dB", q.psnr_db)
                    }
                }));
                ui.label(
                    s.result
                        .quality
                        .map_or("—".into(), |q| format!("{:.4}", q.ssim)),
                );
                ui.label(
                    s.prompt_score
                        .map_or("—".into(), |a| format!("{:.0} %", 100.0 * a)),
                );
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

/// A cell's cache as the table shows it: `none`, `fbcache 0.12`, or the policy's spec.
fn cache_label(s: &crate::pipeline::GenerationSettings) -> String {
    use crate::pipeline::cache::CacheSpec;
    match s.cache_spec() {
        CacheSpec::None => "none".into(),
        CacheSpec::FirstBlock { threshold } => format!("fbcache {threshold}"),
        other => other.to_string(),
    }
}
