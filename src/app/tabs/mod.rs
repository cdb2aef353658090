//! The three views in the middle of the window: [`image`] (the live preview, then the finished
//! image), [`compare`] (a cache-threshold sweep: table, wipe, heatmap) and [`gallery`] (every
//! image kept on disk).

pub mod compare;
pub mod edit;
pub mod gallery;
pub mod image;

/// The largest rect of `w` x `h` proportions that fits `avail` (scaled 0.05x to 4x).
pub(crate) fn fit(avail: egui::Vec2, w: f32, h: f32) -> egui::Vec2 {
    let scale = (avail.x / w).min(avail.y / h).clamp(0.05, 4.0);
    egui::vec2(w * scale, h * scale)
}
