//! The studio: an eframe (wgpu) desktop app over the [`crate::runtime`].
//!
//! - [`studio`]: [`StudioApp`], the window's state, event handling, actions and frame loop.
//! - [`state`]: the settings the panels edit (persisted) and how they become requests;
//!   [`settings_file`]: where they are saved, atomically.
//! - [`view`]: what is on screen apart from the settings (tab, job progress, shown images,
//!   compare and gallery view state). [`action`]: the UI actions panels queue.
//! - [`panels`]: the settings panel and the progress bar; [`messages`]: the message log.
//! - [`tabs`]: the Image, Compare and Gallery views.
//! - [`lora`]: the LoRA list and each file's check against the loaded model.
//! - [`mask`]: the inpainting mask painted over a source image (its buffer, strokes, feather).
//! - [`preview`]: the live latent preview; [`gpu`]: the WGSL latent preview and difference
//!   heatmap as egui paint callbacks; [`heatmap`]: the heatmap's CPU twin.
//! - [`dialogs`]: where paths come from (desktop dialog, fixed folder, in-window field);
//!   [`export`]: PNG / screenshot export; [`download`]: fetching a model from the Hugging Face Hub.
//! - [`automation`]: scripted runs (`--auto-generate`, `--screenshot`, `--quit-after-job`) and
//!   UI stats (`--ui-stats`).

pub mod action;
pub mod automation;
pub mod dialogs;
pub mod download;
pub mod export;
pub mod gpu;
pub mod heatmap;
pub mod lora;
pub mod mask;
pub mod messages;
pub mod panels;
pub mod preview;
pub mod settings_file;
pub mod state;
pub mod studio;
pub mod tabs;
pub mod view;

pub use action::Action;
pub use state::Settings;
pub use studio::{StudioApp, StudioOptions};
pub use view::Tab;

/// Open the studio window and run until it closes.
pub fn run(opts: StudioOptions) -> anyhow::Result<()> {
    let native = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("Parallax studio")
            .with_inner_size([1280.0, 820.0])
            .with_min_inner_size([800.0, 520.0]),
        renderer: eframe::Renderer::Wgpu,
        persist_window: true,
        ..Default::default()
    };
    eframe::run_native(
        "Parallax",
        native,
        Box::new(move |cc| {
            let app = StudioApp::new(cc, opts)?;
            Ok(Box::new(app))
        }),
    )
    .map_err(|e| anyhow::anyhow!("the studio window failed: {e}"))
}
