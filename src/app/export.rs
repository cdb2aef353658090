//! Export: an image as PNG with its settings in text chunks, a window screenshot as PNG, and the
//! file dialogs (rfd, run on the runtime's tokio threads so the window never waits on them).

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};

use crate::pipeline::image::{save_png, RgbImage};
use crate::runtime::{ImageResult, Runtime};

/// What a dialog answered (`None`: the user cancelled).
pub enum DialogResult {
    SaveImage(Option<PathBuf>, Arc<ImageResult>),
    Screenshot(Option<PathBuf>),
    OpenModel(Option<PathBuf>),
}

/// Where paths come from: the desktop's dialogs, or a fixed folder (tests and scripted runs).
#[derive(Debug, Clone)]
pub enum Dialogs {
    Native,
    /// Save dialogs answer `folder/<suggested name>`; open dialogs answer "cancelled".
    Fixed(PathBuf),
}

impl Dialogs {
    pub fn save_png(
        &self,
        rt: &Runtime,
        name: String,
        result: Arc<ImageResult>,
        tx: mpsc::Sender<DialogResult>,
    ) {
        match self {
            Dialogs::Fixed(dir) => {
                let _ = tx.send(DialogResult::SaveImage(Some(dir.join(name)), result));
            }
            Dialogs::Native => spawn(rt, async move {
                let f = rfd::AsyncFileDialog::new()
                    .set_title("Export image")
                    .add_filter("PNG image", &["png"])
                    .set_file_name(name)
                    .save_file()
                    .await;
                let _ = tx.send(DialogResult::SaveImage(
                    f.map(|h| h.path().to_path_buf()),
                    result,
                ));
            }),
        }
    }

    pub fn screenshot(&self, rt: &Runtime, tx: mpsc::Sender<DialogResult>) {
        let name = "parallax-screenshot.png".to_string();
        match self {
            Dialogs::Fixed(dir) => {
                let _ = tx.send(DialogResult::Screenshot(Some(dir.join(name))));
            }
            Dialogs::Native => spawn(rt, async move {
                let f = rfd::AsyncFileDialog::new()
                    .set_title("Save screenshot")
                    .add_filter("PNG image", &["png"])
                    .set_file_name(name)
                    .save_file()
                    .await;
                let _ = tx.send(DialogResult::Screenshot(f.map(|h| h.path().to_path_buf())));
            }),
        }
    }

    pub fn open_model(&self, rt: &Runtime, tx: mpsc::Sender<DialogResult>) {
        match self {
            Dialogs::Fixed(_) => {
                let _ = tx.send(DialogResult::OpenModel(None));
            }
            Dialogs::Native => spawn(rt, async move {
                let f = rfd::AsyncFileDialog::new()
                    .set_title("Open a FLUX.1 model (.safetensors file; cancel to pick a folder)")
                    .add_filter("safetensors", &["safetensors"])
                    .pick_file()
                    .await;
                let f = match f {
                    Some(f) => Some(f),
                    None => {
                        rfd::AsyncFileDialog::new()
                            .set_title("Open a model folder")
                            .pick_folder()
                            .await
                    }
                };
                let _ = tx.send(DialogResult::OpenModel(f.map(|h| h.path().to_path_buf())));
            }),
        }
    }
}

fn spawn(rt: &Runtime, fut: impl std::future::Future<Output = ()> + Send + 'static) {
    match rt.handle() {
        Some(h) => {
            h.spawn(fut);
        }
        None => tracing::warn!("no runtime for the file dialog"),
    }
}

/// Write a finished image with its settings (and run record) in PNG text chunks.
pub fn save_image(path: &Path, result: &ImageResult) -> anyhow::Result<()> {
    let g = &result.generated;
    let mut text = g.settings.png_text()?;
    if let Some(q) = result.quality {
        text.push(("parallax-quality".into(), serde_json::to_string(&q)?));
    }
    save_png(path, &g.image, &text)?;
    Ok(())
}

/// Write a screenshot (RGBA from egui) as an RGB PNG.
pub fn save_screenshot(path: &Path, img: &egui::ColorImage) -> anyhow::Result<()> {
    let [w, h] = img.size;
    let data = img
        .pixels
        .iter()
        .flat_map(|c| [c.r(), c.g(), c.b()])
        .collect();
    let rgb = RgbImage {
        width: w,
        height: h,
        data,
    };
    save_png(
        path,
        &rgb,
        &[(
            "Software".into(),
            format!("Parallax {} studio", env!("CARGO_PKG_VERSION")),
        )],
    )?;
    Ok(())
}
