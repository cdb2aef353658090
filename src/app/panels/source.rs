//! "Start from an image" in the settings panel: the source (a file, the current image, or a
//! gallery image's "Use as source"), shown as a thumbnail with Clear; the strength and how many
//! steps it leaves; whether the source is kept at its size or resized to the size chosen; the
//! mask's state (painted in the Image tab); and outpainting's added pixels on each side.

use egui::{Color32, RichText};

use crate::app::action::{Action, Actions};
use crate::app::state::Settings;
use crate::app::view::EditView;
use crate::pipeline::img2img::{default_size, start_step};

pub struct SourcePanel<'a> {
    pub settings: &'a mut Settings,
    pub edit: &'a mut EditView,
    /// An image is on screen to start from.
    pub has_current: bool,
    pub cmds: &'a mut Actions,
}

/// What the strength slider means, in an artist's words.
pub const STRENGTH_HELP: &str = "How much of the picture is redrawn. Lower keeps more of the \
     source (its shapes, colours and layout) and runs fewer steps: at 0.3 only the last third \
     of the steps run, changing details; at 1 the picture is redrawn from noise, and only what \
     the mask leaves black is kept.";

pub fn show(ui: &mut egui::Ui, p: SourcePanel<'_>) {
    let SourcePanel {
        settings,
        edit,
        has_current,
        cmds,
    } = p;
    edit.mask.sync(settings.request.init.as_ref());
    ui.horizontal(|ui| {
        ui.label("Start from an image");
        if ui
            .small_button("Open image…")
            .on_hover_text("a PNG, JPEG or WebP file to change (image-to-image, inpainting)")
            .clicked()
        {
            cmds.push(Action::PickSource);
        }
        if ui
            .add_enabled(has_current, egui::Button::new("Current image").small())
            .on_hover_text("start from the image on screen")
            .on_disabled_hover_text("no image yet: generate one, or open a file")
            .clicked()
        {
            cmds.push(Action::UseCurrentAsSource);
        }
    });
    let steps = settings.steps();
    let (width, height) = (settings.request.width, settings.request.height);
    let Some(init) = settings.request.init.as_mut() else {
        return;
    };
    let name = init.image.file_name().map_or_else(
        || init.image.display().to_string(),
        |n| n.to_string_lossy().into(),
    );
    let source_size = edit.mask.mask.as_ref().map(|m| (m.width(), m.height()));
    ui.horizontal(|ui| {
        let ctx = ui.ctx().clone();
        match edit.source_texture(&ctx) {
            Some(Ok(tex)) => {
                let [w, h] = tex.size();
                let size = crate::app::tabs::fit(egui::vec2(64.0, 64.0), w as f32, h as f32);
                ui.add(egui::Image::new((tex.id(), size)).alt_text(format!("source image {name}")))
                    .on_hover_text(init.image.display().to_string());
            }
            _ => {
                ui.allocate_exact_size(egui::vec2(64.0, 64.0), egui::Sense::hover());
            }
        }
        ui.vertical(|ui| {
            ui.label(RichText::new(&name).strong())
                .on_hover_text(init.image.display().to_string());
            if let Some((w, h)) = source_size {
                ui.label(format!("{w}x{h}"));
            }
            ui.horizontal(|ui| {
                if ui
                    .small_button("Paint mask")
                    .on_hover_text("paint what to redraw over the source, in the Image tab")
                    .clicked()
                {
                    cmds.push(Action::EditMask);
                }
                if ui
                    .small_button("Clear")
                    .on_hover_text("no source: text-to-image again")
                    .clicked()
                {
                    cmds.push(Action::ClearSource);
                }
            });
        });
    });
    if let Some(e) = &edit.mask.error {
        ui.add(egui::Label::new(RichText::new(e).color(Color32::LIGHT_RED)).wrap());
    }
    ui.horizontal(|ui| {
        let l = ui.label("Strength");
        // A copy, taken back only when moved and rounded to the slider's steps: the slider's
        // stepping would turn 0.6 into 0.6000000000000001 in the image's settings.
        let mut strength = init.strength;
        let moved = ui
            .add(egui::Slider::new(&mut strength, 0.05..=1.0).step_by(0.05))
            .labelled_by(l.id)
            .on_hover_text(STRENGTH_HELP)
            .changed();
        if moved {
            init.strength = (strength * 100.0).round() / 100.0;
        }
    });
    let run = steps - start_step(steps, init.strength).min(steps);
    let text = format!("{run} of {steps} steps run");
    let colour = if run == 0 {
        Color32::LIGHT_RED
    } else {
        ui.visuals().weak_text_color()
    };
    ui.label(RichText::new(text).color(colour));
    // Outpainting: pixels added on each side.
    let mut sides = init.extend.unwrap_or_default();
    ui.horizontal(|ui| {
        ui.label("Extend").on_hover_text(
            "Outpainting: pixels added on each side of the source. The new strips are drawn \
             from the prompt, starting from the source's edge pixels stretched outwards.",
        );
        for (v, side) in sides.iter_mut().zip(["left", "top", "right", "bottom"]) {
            let l = ui.label(RichText::new(side).small());
            ui.add(egui::DragValue::new(v).range(0..=2048).speed(16))
                .labelled_by(l.id);
        }
    });
    init.extend = sides.iter().any(|&v| v > 0).then_some(sides);
    // Kept at its size or resized to the size chosen: said, with the way to the other.
    let mut resize_to = None;
    if let Some((w, h)) = source_size {
        let [l, t, r, b] = sides;
        let (cw, ch) = (w + l + r, h + t + b);
        let canvas = if init.extend.is_some() {
            format!("the extended canvas ({cw}x{ch})")
        } else {
            "the source".to_string()
        };
        let fits = default_size(cw, ch);
        if (cw, ch) == (width, height) {
            ui.label(format!("{canvas} is kept at its size"));
        } else {
            ui.horizontal_wrapped(|ui| {
                ui.label(
                    RichText::new(format!("{canvas} is resized to {width}x{height}"))
                        .color(Color32::from_rgb(230, 180, 60)),
                );
                if fits != (width, height)
                    && ui
                        .small_button(format!("Use {}x{}", fits.0, fits.1))
                        .on_hover_text("the source's size, rounded down to multiples of 16")
                        .clicked()
                {
                    resize_to = Some(fits);
                }
            });
        }
    }
    let mask = match edit.mask.mask.as_ref().filter(|m| m.painted() > 0) {
        Some(m) => format!(
            "inpainting: {:.0}% of the image redrawn (white in the mask)",
            100.0 * m.coverage()
        ),
        None => "no mask: the whole image is changed (Paint mask to redraw a part)".into(),
    };
    ui.add(egui::Label::new(RichText::new(mask).small()).wrap());
    if let Some((w, h)) = resize_to {
        settings.request.width = w;
        settings.request.height = h;
    }
}
