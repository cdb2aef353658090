//! The live latent preview while a job runs: the newest step's latent, mapped to RGB by the
//! WGSL shader (or, without wgpu, on the CPU into a texture). Steps that arrive between two
//! frames replace each other, so at most one latent is converted or uploaded per frame, and
//! only when a newer one came.

use std::sync::Arc;
use std::time::Instant;

use egui::{Color32, TextureHandle, TextureOptions};

use super::automation::UiStats;
use super::gpu;
use super::view::{color_image, full_uv};
use crate::pipeline::image::RgbImage;
use crate::pipeline::preview::{Latent, PreviewFactors};

struct Latest {
    latent: Arc<Latent>,
    version: u64,
    /// When the engine finished the step.
    emitted: Instant,
    measured: bool,
}

pub struct LivePreview {
    latest: Option<Latest>,
    factors: Option<Arc<PreviewFactors>>,
    /// Drawn by the WGSL shader (else on the CPU).
    gpu: bool,
    /// The CPU path's texture and the version it holds.
    cpu_tex: Option<(u64, TextureHandle)>,
    next_version: u64,
}

impl LivePreview {
    pub fn new(gpu: bool) -> Self {
        Self {
            latest: None,
            factors: None,
            gpu,
            cpu_tex: None,
            next_version: 0,
        }
    }

    pub fn uses_gpu(&self) -> bool {
        self.gpu
    }

    /// The loaded model's latent-to-RGB map.
    pub fn set_factors(&mut self, f: Arc<PreviewFactors>) {
        self.factors = Some(f);
    }

    /// A new step's latent.
    pub fn push(&mut self, latent: Arc<Latent>, emitted: Instant) {
        self.next_version += 1;
        self.latest = Some(Latest {
            latent,
            version: self.next_version,
            emitted,
            measured: false,
        });
    }

    pub fn clear(&mut self) {
        self.latest = None;
    }

    /// The image size the latest latent will decode to.
    pub fn image_size(&self) -> Option<(f32, f32)> {
        self.latest
            .as_ref()
            .map(|p| (p.latent.width as f32 * 8.0, p.latent.height as f32 * 8.0))
    }

    /// Draw the latest latent into `rect`; returns true when something was drawn.
    pub fn draw(&mut self, ui: &mut egui::Ui, rect: egui::Rect, stats: &mut UiStats) -> bool {
        let (Some(p), Some(f)) = (&mut self.latest, &self.factors) else {
            return false;
        };
        if self.gpu {
            ui.painter().add(egui_wgpu::Callback::new_paint_callback(
                rect,
                gpu::PreviewCallback {
                    latent: p.latent.clone(),
                    version: p.version,
                    factors: f.clone(),
                },
            ));
        } else {
            if self.cpu_tex.as_ref().is_none_or(|(v, _)| *v != p.version) {
                let rgb = RgbImage {
                    width: p.latent.width,
                    height: p.latent.height,
                    data: f.apply(&p.latent),
                };
                // Filtered like the shader's, not 8x8-pixel blocks.
                let tex = ui.ctx().load_texture(
                    "latent-preview",
                    color_image(&rgb),
                    TextureOptions::LINEAR,
                );
                self.cpu_tex = Some((p.version, tex));
            }
            if let Some((_, t)) = &self.cpu_tex {
                ui.painter().image(t.id(), rect, full_uv(), Color32::WHITE);
            }
        }
        if !p.measured {
            p.measured = true;
            stats
                .preview_latency_ms
                .push(p.emitted.elapsed().as_secs_f64() * 1e3);
        }
        true
    }
}
