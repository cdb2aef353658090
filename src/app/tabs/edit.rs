//! Drawing the source image and its inpainting mask: the brush row (paint or erase, size,
//! feather, invert, clear, the overlay), the source on its canvas (with the outpainting's added
//! strips) under the mask's red overlay, the brush's outline under the pointer, and the pointer
//! handed to the [`MaskEditor`] (the state and its logic are in [`crate::app::mask`], the
//! textures in [`EditView`]).

use std::path::Path;

use egui::{Color32, RichText, TextureHandle, TextureOptions};

use super::fit;
use crate::app::mask::MaskEditor;
use crate::app::view::{full_uv, EditView};
use crate::pipeline::img2img::InitImage;
use crate::runtime::gallery::OPEN_MAX_PIXELS;

/// The mask's overlay colour (alpha at full repaint).
const OVERLAY: [u8; 4] = [255, 40, 60, 150];

impl EditView {
    /// The source's texture (read once per file; a file too large or unreadable says why).
    pub fn source_texture(&mut self, ctx: &egui::Context) -> Option<Result<&TextureHandle, &str>> {
        let path = self.mask.source.clone()?;
        if self.source.as_ref().is_none_or(|(p, _)| *p != path) {
            let tex = read_rgb(&path).map(|img| {
                ctx.load_texture(
                    format!("source-{}", path.display()),
                    img,
                    TextureOptions::LINEAR,
                )
            });
            self.source = Some((path, tex));
        }
        self.source
            .as_ref()
            .map(|(_, t)| t.as_ref().map_err(String::as_str))
    }

    /// The overlay's texture for the mask as it is now (feathered as it will be written).
    fn overlay_texture(&mut self, ctx: &egui::Context) -> Option<&TextureHandle> {
        let m = self.mask.mask.as_ref()?;
        if self
            .overlay
            .as_ref()
            .is_none_or(|(v, _)| *v != self.mask.version)
        {
            let soft = m.feathered(self.mask.feather);
            let rgba: Vec<u8> = soft
                .iter()
                .flat_map(|&v| {
                    let a = (u32::from(v) * u32::from(OVERLAY[3]) / 255) as u8;
                    [OVERLAY[0], OVERLAY[1], OVERLAY[2], a]
                })
                .collect();
            let img = egui::ColorImage::from_rgba_unmultiplied([m.width(), m.height()], &rgba);
            let tex = ctx.load_texture("mask-overlay", img, TextureOptions::NEAREST);
            self.overlay = Some((self.mask.version, tex));
        }
        self.overlay.as_ref().map(|(_, t)| t)
    }
}

/// An image file's pixels for a texture, refused from its header when too large to show.
fn read_rgb(path: &Path) -> Result<egui::ColorImage, String> {
    let (w, h) =
        crate::pipeline::img2img::image_size(path, "source image").map_err(|e| e.to_string())?;
    if w.saturating_mul(h) > OPEN_MAX_PIXELS {
        return Err(format!("{w}x{h} is too large to show here"));
    }
    let img = image::open(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .to_rgb8();
    Ok(egui::ColorImage::from_rgb(
        [img.width() as usize, img.height() as usize],
        img.as_raw(),
    ))
}

/// The brush row: paint or erase, size, feather, invert, clear, overlay.
pub fn tools(ui: &mut egui::Ui, ed: &mut MaskEditor) {
    ui.horizontal_wrapped(|ui| {
        ui.selectable_value(&mut ed.erase, false, "Paint")
            .on_hover_text("paint what should be redrawn (white in the mask)");
        ui.selectable_value(&mut ed.erase, true, "Erase")
            .on_hover_text("take the brush back: what is erased stays as in the source");
        let l = ui.label("brush");
        ui.add(
            egui::Slider::new(&mut ed.brush, 1.0..=128.0)
                .logarithmic(true)
                .suffix(" px"),
        )
        .labelled_by(l.id)
        .on_hover_text("the brush's radius, in the source's pixels");
        let l = ui.label("feather");
        let f = ui
            .add(egui::Slider::new(&mut ed.feather, 0..=64).suffix(" px"))
            .labelled_by(l.id)
            .on_hover_text(
                "A soft edge this many pixels wide on each side of the painted outline. With a \
                 feather the engine blends redrawn and kept by the mask's grey (a soft mask), on \
                 the model's 8-pixel grid; at 0 it redraws where the mask is at least half white \
                 (as diffusers does). FLUX.1 Fill models always take the mask at half white.",
            );
        if f.changed() {
            ed.changed();
        }
        if ui
            .button("Invert")
            .on_hover_text("redraw what was kept, keep what was painted")
            .clicked()
        {
            ed.invert();
        }
        if ui
            .button("Clear mask")
            .on_hover_text("nothing painted: the whole image is changed (image-to-image)")
            .clicked()
        {
            ed.clear();
        }
        ui.checkbox(&mut ed.overlay, "show mask");
    });
}

/// The source on its canvas (the outpainting's strips shown as redrawn), the mask over it, and
/// the brush under the pointer, in the space `avail` leaves.
pub fn canvas(ui: &mut egui::Ui, edit: &mut EditView, init: &InitImage, avail: egui::Vec2) {
    let ctx = ui.ctx().clone();
    let (w, h) = match &edit.mask.mask {
        Some(m) => (m.width() as f32, m.height() as f32),
        None => {
            let e = edit
                .mask
                .error
                .clone()
                .unwrap_or_else(|| "no source image".into());
            ui.label(RichText::new(e).color(Color32::LIGHT_RED));
            return;
        }
    };
    let [l, t, r, b] = init.extend.unwrap_or_default().map(|v| v as f32);
    let (cw, ch) = (w + l + r, h + t + b);
    let size = fit(avail, cw, ch);
    let (outer, _) = ui.allocate_exact_size(size, egui::Sense::hover());
    let scale = size.x / cw;
    let rect = egui::Rect::from_min_size(
        outer.min + egui::vec2(l, t) * scale,
        egui::vec2(w, h) * scale,
    );
    let painter = ui.painter_at(outer);
    // The added canvas is redrawn from the prompt: shown as masked.
    painter.rect_filled(outer, 0.0, Color32::from_gray(25));
    if outer != rect {
        let c = OVERLAY;
        painter.rect_filled(
            outer,
            0.0,
            Color32::from_rgba_unmultiplied(c[0], c[1], c[2], c[3] / 2),
        );
    }
    match edit.source_texture(&ctx) {
        Some(Ok(tex)) => {
            painter.image(tex.id(), rect, full_uv(), Color32::WHITE);
        }
        Some(Err(e)) => {
            painter.text(
                rect.center(),
                egui::Align2::CENTER_CENTER,
                e,
                egui::FontId::proportional(14.0),
                Color32::LIGHT_RED,
            );
        }
        None => {}
    }
    if edit.mask.overlay {
        if let Some(tex) = edit.overlay_texture(&ctx) {
            painter.image(tex.id(), rect, full_uv(), Color32::WHITE);
        }
    }
    let resp = ui
        .interact(rect, ui.scope_id().with("mask-canvas"), egui::Sense::drag())
        .on_hover_cursor(egui::CursorIcon::Crosshair);
    resp.widget_info(|| {
        egui::WidgetInfo::labeled(egui::accesskit::Role::Canvas, true, "mask canvas")
    });
    let to_px = |p: egui::Pos2| {
        let v = (p - rect.min) / scale;
        [v.x, v.y]
    };
    let held = resp.is_pointer_button_down_on() || resp.dragged();
    edit.mask.pointer(
        held.then(|| resp.interact_pointer_pos())
            .flatten()
            .map(to_px),
    );
    if let Some(p) = resp.hover_pos() {
        let colour = if edit.mask.erase {
            Color32::from_gray(220)
        } else {
            Color32::from_rgb(255, 90, 90)
        };
        painter.circle_stroke(p, edit.mask.brush * scale, egui::Stroke::new(1.5, colour));
    }
}
