//! The studio: an eframe (wgpu) desktop app over the [`crate::runtime`].
//!
//! - [`state`]: the settings the panels edit (persisted) and how they become requests.
//! - [`studio`]: the window (panels, image / compare / gallery tabs, progress, messages).
//! - [`gpu`]: the WGSL latent preview and difference heatmap as egui paint callbacks.
//! - [`heatmap`]: the heatmap's CPU twin. [`export`]: PNG / screenshot export and file dialogs.

pub mod export;
pub mod gpu;
pub mod heatmap;
pub mod state;
pub mod studio;

pub use state::Settings;
pub use studio::{StudioApp, StudioOptions, Tab};

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
