//! What the user asked for this frame. Panels and tabs do not act: they queue a [`Action`], and
//! [`super::StudioApp`] applies the queue in one place after drawing (so a panel never needs the
//! runtime, and every action has one code path whether it came from a button, a key or a script).

use std::path::PathBuf;

use super::view::Tab;
use crate::runtime::JobId;

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Generate with the current settings (queued behind the running job, if any).
    Generate,
    Compare,
    /// Cancel the running job.
    Cancel,
    /// Move a waiting job one place earlier (`true`) or later in the queue.
    MoveQueued(JobId, bool),
    /// Take a waiting job out of the queue.
    CancelQueued(JobId),
    /// (Re)load the model named in the settings.
    LoadModel,
    /// Put this model in the settings and load it.
    UseModel(String),
    OpenModelDialog,
    /// Show or hide the Hugging Face Hub download field ([`super::download`]).
    ToggleDownload,
    Export,
    Screenshot,
    SelectTab(Tab),
    /// Put back the settings of this gallery image.
    Restore(PathBuf),
    /// Take the settings stored in this image file (dropped on the window): Parallax's own, or
    /// what Automatic1111's or ComfyUI's metadata state.
    RecallFrom(PathBuf),
    /// Show this gallery image large.
    OpenImage(PathBuf),
    CloseImage,
    /// Ask before deleting this gallery image.
    AskDelete(PathBuf),
    /// The user confirmed: delete it.
    Delete(PathBuf),
    KeepImage,
    /// Add a LoRA file (the file dialog), or every `.safetensors` file of a folder.
    AddLoraFile,
    AddLoraFolder,
    /// Add these LoRA files to the list (the demo's, a script's).
    AddLoras(Vec<PathBuf>),
    /// Add the demo model's built-in LoRA.
    AddDemoLora,
    /// The in-window path field was submitted.
    SubmitPath,
    ClosePathPrompt,
    /// Ask for a source image file (image-to-image, inpainting).
    PickSource,
    /// Start from this gallery image.
    UseAsSource(PathBuf),
    /// Start from the image on screen.
    UseCurrentAsSource,
    /// No source image: text-to-image again.
    ClearSource,
    /// Show the source in the Image tab to paint its mask.
    EditMask,
}

/// The queue of one frame.
#[derive(Debug, Default)]
pub struct Actions(Vec<Action>);

impl Actions {
    pub fn push(&mut self, c: Action) {
        self.0.push(c);
    }

    /// Everything queued, in order, leaving the queue empty.
    pub fn take(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.0)
    }
}
