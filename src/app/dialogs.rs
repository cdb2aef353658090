//! Where paths come from: the desktop's file dialogs (rfd through xdg-desktop-portal, run on the
//! runtime's tokio threads so the window never waits), a fixed folder (tests, scripted runs), or,
//! when the desktop has no dialog to offer (a bare X server has no portal), a path field in the
//! window that says why it is there.

use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::runtime::{ImageResult, Runtime};

/// What a path is wanted for.
#[derive(Clone)]
pub enum PathRequest {
    /// Save this image (suggested file name).
    ExportImage {
        name: String,
        result: Arc<ImageResult>,
    },
    /// Save a screenshot of the window.
    Screenshot,
    /// Open a model file or folder.
    OpenModel,
    /// Add a LoRA file, or every LoRA file in a folder.
    AddLora,
    AddLoraFolder,
    /// Open a source image (image-to-image, inpainting).
    OpenSource,
}

impl PathRequest {
    pub fn title(&self) -> &'static str {
        match self {
            PathRequest::ExportImage { .. } => "Export image",
            PathRequest::Screenshot => "Save screenshot",
            PathRequest::OpenModel => "Open a model (.safetensors file or folder)",
            PathRequest::AddLora => "Add a LoRA (.safetensors file)",
            PathRequest::AddLoraFolder => "Add every LoRA (.safetensors) in a folder",
            PathRequest::OpenSource => "Start from an image (PNG, JPEG or WebP)",
        }
    }

    /// Saving (the folder must be writable) rather than opening.
    pub fn saves(&self) -> bool {
        !matches!(
            self,
            PathRequest::OpenModel
                | PathRequest::AddLora
                | PathRequest::AddLoraFolder
                | PathRequest::OpenSource
        )
    }

    fn suggested_name(&self) -> Option<&str> {
        match self {
            PathRequest::ExportImage { name, .. } => Some(name),
            PathRequest::Screenshot => Some("parallax-screenshot.png"),
            PathRequest::OpenModel
            | PathRequest::AddLora
            | PathRequest::AddLoraFolder
            | PathRequest::OpenSource => None,
        }
    }
}

/// What came back.
pub enum Answer {
    Path(PathBuf),
    Cancelled,
    /// No dialog could be shown; the reason.
    Unavailable(String),
}

pub struct DialogAnswer {
    pub request: PathRequest,
    pub answer: Answer,
}

/// How paths are asked for.
#[derive(Debug, Clone)]
pub enum Dialogs {
    /// The desktop's dialogs.
    Native,
    /// Save dialogs answer `folder/<suggested name>`; open dialogs answer "cancelled".
    Fixed(PathBuf),
    /// A path field in the window; the reason there is no desktop dialog.
    InWindow(String),
}

/// A native dialog that answers "cancelled" faster than this never reached the screen: rfd
/// returns at once when no xdg-desktop-portal answers (it only logs the failure).
const TOO_FAST: Duration = Duration::from_millis(300);

impl Dialogs {
    /// The desktop's dialogs where there is a session bus for the portal to be on, else the
    /// in-window field.
    pub fn detect() -> Self {
        if cfg!(target_os = "linux") && std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_none() {
            let bus = std::env::var_os("XDG_RUNTIME_DIR")
                .map(|d| PathBuf::from(d).join("bus"))
                .is_some_and(|p| p.exists());
            if !bus {
                return Dialogs::InWindow(
                    "no desktop file dialog: there is no D-Bus session bus, so no \
                     xdg-desktop-portal to show one. Type a path instead."
                        .into(),
                );
            }
        }
        Dialogs::Native
    }

    /// Ask for a path; the answer arrives on `tx`.
    pub fn ask(&self, rt: &Runtime, request: PathRequest, tx: mpsc::Sender<DialogAnswer>) {
        match self {
            Dialogs::Fixed(dir) => {
                let answer = match request.suggested_name() {
                    Some(name) => Answer::Path(dir.join(name)),
                    None => Answer::Cancelled,
                };
                let _ = tx.send(DialogAnswer { request, answer });
            }
            Dialogs::InWindow(why) => {
                let _ = tx.send(DialogAnswer {
                    request,
                    answer: Answer::Unavailable(why.clone()),
                });
            }
            Dialogs::Native => {
                let Some(h) = rt.handle() else {
                    let _ = tx.send(DialogAnswer {
                        request,
                        answer: Answer::Unavailable("no runtime to run the file dialog on".into()),
                    });
                    return;
                };
                h.spawn(async move {
                    let t0 = Instant::now();
                    let path = native(&request).await;
                    let answer = match path {
                        Some(p) => Answer::Path(p),
                        None if t0.elapsed() < TOO_FAST => Answer::Unavailable(
                            "the desktop's file dialog did not open (no xdg-desktop-portal \
                             answered). Type a path instead."
                                .into(),
                        ),
                        None => Answer::Cancelled,
                    };
                    let _ = tx.send(DialogAnswer { request, answer });
                });
            }
        }
    }
}

async fn native(request: &PathRequest) -> Option<PathBuf> {
    let dialog = rfd::AsyncFileDialog::new().set_title(request.title());
    let picked = match request {
        PathRequest::OpenModel => {
            let f = dialog
                .set_title("Open a FLUX.1 model (.safetensors file; cancel to pick a folder)")
                .add_filter("safetensors", &["safetensors"])
                .pick_file()
                .await;
            match f {
                Some(f) => Some(f),
                None => {
                    rfd::AsyncFileDialog::new()
                        .set_title("Open a model folder")
                        .pick_folder()
                        .await
                }
            }
        }
        PathRequest::AddLora => {
            dialog
                .add_filter("safetensors", &["safetensors"])
                .pick_file()
                .await
        }
        PathRequest::AddLoraFolder => dialog.pick_folder().await,
        PathRequest::OpenSource => {
            dialog
                .add_filter("Image", &["png", "jpg", "jpeg", "webp"])
                .pick_file()
                .await
        }
        _ => {
            let dialog = dialog.add_filter("PNG image", &["png"]);
            let dialog = match request {
                PathRequest::Screenshot => dialog,
                _ => dialog
                    .add_filter("JPEG image", &["jpg", "jpeg"])
                    .add_filter("WebP image (lossless)", &["webp"]),
            };
            dialog
                .set_file_name(request.suggested_name().unwrap_or("parallax.png"))
                .save_file()
                .await
        }
    };
    picked.map(|h| h.path().to_path_buf())
}

/// The in-window path field, open while it waits for a path.
pub struct PathPrompt {
    pub request: PathRequest,
    pub text: String,
    /// Why the desktop's dialog is not used.
    pub why: String,
    /// What was wrong with the last path submitted.
    pub error: Option<String>,
}

impl PathPrompt {
    pub fn new(request: PathRequest, why: String) -> Self {
        let text = request
            .suggested_name()
            .map(|n| {
                std::env::current_dir()
                    .map(|d| d.join(n))
                    .unwrap_or_else(|_| PathBuf::from(n))
                    .display()
                    .to_string()
            })
            .unwrap_or_default();
        Self {
            request,
            text,
            why,
            error: None,
        }
    }

    /// The path typed (a leading `~/` is the home folder).
    pub fn path(&self) -> Option<PathBuf> {
        let t = self.text.trim();
        if t.is_empty() {
            return None;
        }
        if let (Some(rest), Some(home)) = (t.strip_prefix("~/"), std::env::var_os("HOME")) {
            return Some(PathBuf::from(home).join(rest));
        }
        Some(PathBuf::from(t))
    }

    /// Draw it as a small window; returns `Some(true)` when submitted, `Some(false)` when
    /// cancelled.
    pub fn show(&mut self, ctx: &egui::Context) -> Option<bool> {
        let mut out = None;
        egui::Window::new(self.request.title())
            .collapsible(false)
            .resizable(false)
            .anchor(egui::Align2::CENTER_CENTER, egui::vec2(0.0, 0.0))
            .show(ctx, |ui| {
                ui.set_max_width(460.0);
                ui.add(egui::Label::new(egui::RichText::new(&self.why).small()).wrap());
                let l = ui.label("Path");
                let r = ui
                    .add(egui::TextEdit::singleline(&mut self.text).desired_width(440.0))
                    .labelled_by(l.id);
                if let Some(e) = &self.error {
                    ui.add(
                        egui::Label::new(egui::RichText::new(e).color(egui::Color32::LIGHT_RED))
                            .wrap(),
                    );
                }
                let enter = r.lost_focus() && ui.input(|i| i.key_pressed(egui::Key::Enter));
                ui.horizontal(|ui| {
                    let ok = if self.request.saves() { "Save" } else { "Open" };
                    if ui.button(ok).clicked() || enter {
                        out = Some(true);
                    }
                    if ui.button("Cancel").clicked() {
                        out = Some(false);
                    }
                });
            });
        out
    }
}
