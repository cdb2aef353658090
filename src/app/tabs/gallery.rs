//! The Gallery tab: every image in the gallery folder as a grid of thumbnails that wraps to the
//! window's width and scrolls; a compare sweep's images stay together in one framed group. Clicking a thumbnail opens the image large; Restore puts its
//! settings back; Use as source starts image-to-image from it; Delete asks first ("Delete this image?"), and only the confirmation removes
//! the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use egui::{Color32, RichText, TextureHandle, TextureOptions};

use super::fit;
use crate::app::action::{Action, Actions};
use crate::app::view::{color_image, full_uv, GalleryView};
use crate::runtime::gallery::{self, Entry};

/// Thumbnail side in points, and a cell's width.
const THUMB: usize = 128;
const CELL_W: f32 = 148.0;
/// Thumbnails read from disk per frame at most (the rest come in the next frames).
const LOADS_PER_FRAME: usize = 6;

/// Thumbnail textures by file, or why a file has none (too large, unreadable pixels).
#[derive(Default)]
pub struct Thumbs(HashMap<PathBuf, Result<TextureHandle, String>>);

impl Thumbs {
    pub fn forget(&mut self, path: &Path) {
        self.0.remove(path);
    }
}

pub struct GalleryTab<'a> {
    pub view: &'a GalleryView,
    pub dir: Option<&'a Path>,
    pub thumbs: &'a mut Thumbs,
    pub cmds: &'a mut Actions,
}

pub fn show(ui: &mut egui::Ui, t: GalleryTab<'_>) {
    if let Some(dir) = t.dir {
        ui.label(
            RichText::new(format!(
                "{} images in {}",
                t.view.entries.len(),
                dir.display()
            ))
            .small(),
        );
    }
    if let Some(o) = &t.view.opened {
        opened(ui, &o.entry, &o.tex, t.view, t.cmds);
        return;
    }
    let spacing = ui.spacing().item_spacing.x;
    let cols = (((ui.available_width() + spacing) / (CELL_W + spacing)).floor() as usize).max(1);
    let mut loads = 0;
    let groups = gallery::grouped(&t.view.entries);
    egui::ScrollArea::vertical()
        .auto_shrink([false, false])
        .show(ui, |ui| {
            let mut grid = |ui: &mut egui::Ui, entries: &[&Entry], loads: &mut usize| {
                for row in entries.chunks(cols) {
                    ui.horizontal_top(|ui| {
                        for e in row {
                            ui.allocate_ui(egui::vec2(CELL_W, 0.0), |ui| {
                                ui.set_width(CELL_W);
                                ui.vertical(|ui| cell(ui, e, t.view, t.thumbs, loads, t.cmds));
                            });
                        }
                    });
                    ui.add_space(6.0);
                }
            };
            // Images made alone fill the grid; a sweep's images sit together in a frame.
            let mut alone: Vec<&Entry> = Vec::new();
            for g in &groups {
                if g.len() == 1 && g[0].run.group.is_none() {
                    alone.push(g[0]);
                    continue;
                }
                grid(ui, &alone, &mut loads);
                alone.clear();
                egui::Frame::group(ui.style()).show(ui, |ui| {
                    ui.set_width(ui.available_width());
                    let first = &g[0].settings;
                    let prompt: String = first.prompt.chars().take(60).collect();
                    ui.strong(format!(
                        "Compare sweep · {} images · seed {} · {prompt}",
                        g.len(),
                        first.seed
                    ));
                    grid(ui, g, &mut loads);
                });
                ui.add_space(6.0);
            }
            grid(ui, &alone, &mut loads);
        });
    if loads >= LOADS_PER_FRAME {
        ui.ctx().request_repaint();
    }
}

fn thumbnail(ui: &egui::Ui, thumbs: &mut Thumbs, e: &Entry, loads: &mut usize) {
    if thumbs.0.contains_key(&e.path) || *loads >= LOADS_PER_FRAME {
        return;
    }
    *loads += 1;
    // Row by row, bounded: a huge image is refused from its header.
    let thumb = gallery::read_thumbnail(&e.path, THUMB, gallery::THUMBNAIL_MAX_PIXELS)
        .map(|t| {
            ui.ctx().load_texture(
                e.path.display().to_string(),
                color_image(&t),
                TextureOptions::LINEAR,
            )
        })
        .map_err(|err| {
            tracing::warn!("gallery: no thumbnail for {}: {err}", e.path.display());
            err.to_string()
        });
    thumbs.0.insert(e.path.clone(), thumb);
}

fn name(e: &Entry) -> String {
    e.path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

fn cell(
    ui: &mut egui::Ui,
    e: &Entry,
    view: &GalleryView,
    thumbs: &mut Thumbs,
    loads: &mut usize,
    cmds: &mut Actions,
) {
    thumbnail(ui, thumbs, e, loads);
    let size = egui::vec2(THUMB as f32, THUMB as f32);
    let r = match thumbs.0.get(&e.path) {
        Some(Ok(t)) => ui.add(
            egui::Image::new((t.id(), t.size_vec2()))
                .alt_text(format!("open {}", name(e)))
                .sense(egui::Sense::click()),
        ),
        other => {
            let (rect, r) = ui.allocate_exact_size(size, egui::Sense::click());
            ui.painter().rect_filled(rect, 4.0, Color32::from_gray(40));
            if let Some(Err(why)) = other {
                ui.put(
                    rect.shrink(6.0),
                    egui::Label::new(RichText::new(format!("no preview: {why}")).small().weak())
                        .wrap(),
                );
            }
            r
        }
    };
    if r.on_hover_text("open large").clicked() {
        cmds.push(Action::OpenImage(e.path.clone()));
    }
    let prompt: String = e.settings.prompt.chars().take(40).collect();
    ui.label(RichText::new(prompt).small());
    let spec = e.settings.cache_spec();
    ui.label(format!(
        "seed {} · {}",
        e.settings.seed,
        spec.display_name()
    ))
    .on_hover_text(spec.to_string());
    buttons(ui, e, view, cmds);
}

/// Restore and Delete, or the delete confirmation for this image.
fn buttons(ui: &mut egui::Ui, e: &Entry, view: &GalleryView, cmds: &mut Actions) {
    if view.confirm_delete.as_deref() == Some(e.path.as_path()) {
        ui.label(RichText::new("Delete this image?").color(Color32::LIGHT_RED));
        ui.horizontal(|ui| {
            if ui.small_button("Yes, delete").clicked() {
                cmds.push(Action::Delete(e.path.clone()));
            }
            if ui.small_button("Keep").clicked() {
                cmds.push(Action::KeepImage);
            }
        });
        return;
    }
    ui.horizontal(|ui| {
        if ui
            .small_button("Restore")
            .on_hover_text("use these settings")
            .clicked()
        {
            cmds.push(Action::Restore(e.path.clone()));
        }
        if ui
            .small_button("Delete")
            .on_hover_text("remove the file (asks first)")
            .clicked()
        {
            cmds.push(Action::AskDelete(e.path.clone()));
        }
    });
    if ui
        .small_button("Use as source")
        .on_hover_text("start from this image: image-to-image, or paint a mask to redraw a part")
        .clicked()
    {
        cmds.push(Action::UseAsSource(e.path.clone()));
    }
}

/// One image large, with its settings and the same actions.
fn opened(
    ui: &mut egui::Ui,
    e: &Entry,
    tex: &TextureHandle,
    view: &GalleryView,
    cmds: &mut Actions,
) {
    ui.horizontal(|ui| {
        if ui.button("Back to the gallery").clicked() {
            cmds.push(Action::CloseImage);
        }
        ui.label(name(e));
    });
    let s = &e.settings;
    ui.add(
        egui::Label::new(format!(
            "{} — {}x{}, {} steps ({} computed, {} reused), seed {}, cache {} ({}), {:.2} s",
            s.prompt,
            s.width,
            s.height,
            s.steps,
            e.run.steps_computed,
            e.run.steps_reused,
            s.seed,
            s.cache_spec().display_name(),
            s.cache_spec(),
            e.run.total_ms / 1e3
        ))
        .wrap(),
    );
    buttons(ui, e, view, cmds);
    let [w, h] = tex.size();
    let (rect, _) = ui.allocate_exact_size(
        fit(ui.available_size(), w as f32, h as f32),
        egui::Sense::hover(),
    );
    ui.painter()
        .image(tex.id(), rect, full_uv(), Color32::WHITE);
}
