//! Image-to-image, inpainting and outpainting from the studio: the source chosen (a file, the
//! image on screen, a gallery image), cleared, and before a job the painted mask written where
//! the request can name it (beside the gallery, in `masks/`).

use super::*;
use crate::pipeline::img2img::{image_size, InitImage};

/// The strength a new source starts at (diffusers' and the CLI's default).
const DEFAULT_STRENGTH: f64 = 0.6;

impl StudioApp {
    /// Where painted masks (and an image on screen that is not in the gallery) are written.
    fn edit_dir(&self) -> PathBuf {
        match self.runtime.gallery() {
            Some(g) => g.side_dir(),
            None => std::env::temp_dir().join("parallax-masks"),
        }
    }

    /// Start from the image file `path`: the strength and outpainting stay as they were, the
    /// mask starts blank; the Image tab shows the source to paint on.
    pub(super) fn set_source(&mut self, path: PathBuf) -> Result<(), String> {
        let (w, h) = image_size(&path, "source image").map_err(|e| e.to_string())?;
        let old = self.settings.request.init.take();
        self.settings.request.init = Some(InitImage {
            image: path.clone(),
            strength: old.as_ref().map_or(DEFAULT_STRENGTH, |i| i.strength),
            mask: None,
            soft_mask: false,
            extend: old.and_then(|i| i.extend),
        });
        self.view
            .edit
            .mask
            .sync(self.settings.request.init.as_ref());
        self.view.edit.mask.editing = true;
        self.view.tab = Tab::Image;
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into(),
        );
        self.say(
            format!(
                "starting from {name} ({w}x{h}): paint over what to redraw in the Image tab, or \
                 generate to change the whole image"
            ),
            false,
        );
        Ok(())
    }

    /// Start from the image on screen: its gallery file, or (not kept there) a copy written
    /// beside the masks.
    pub(super) fn use_current_as_source(&mut self) {
        let Some(r) = self.current_image() else {
            self.say("no image on screen to start from yet", true);
            return;
        };
        let path = match r.saved.clone().filter(|p| p.is_file()) {
            Some(p) => Ok(p),
            None => {
                let dir = self.edit_dir();
                let image = &r.generated.image;
                let name = crate::app::mask::content_name(&image.data);
                let path = dir.join(format!("source-{}-{name}.png", r.generated.settings.seed));
                std::fs::create_dir_all(&dir)
                    .map_err(|e| e.to_string())
                    .and_then(|()| {
                        crate::pipeline::image::save_png(&path, image, &[])
                            .map_err(|e| e.to_string())
                    })
                    .map(|()| path)
            }
        };
        if let Err(e) = path.and_then(|p| self.set_source(p)) {
            self.say(format!("cannot start from the image on screen: {e}"), true);
        }
    }

    /// No source: text-to-image again.
    pub(super) fn clear_source(&mut self) {
        self.settings.request.init = None;
        self.view.edit.mask.sync(None);
    }

    /// Before a job: the painted mask into the request (written as a file once), or none
    /// when nothing is painted.
    pub(super) fn prepare_source(&mut self) -> Result<(), String> {
        if self.settings.request.init.is_none() {
            return Ok(());
        }
        self.view
            .edit
            .mask
            .sync(self.settings.request.init.as_ref());
        self.view.edit.mask.editing = false;
        let dir = self.edit_dir();
        let file = self
            .view
            .edit
            .mask
            .file_for_request(&dir)
            .map_err(|e| format!("the mask: {e}"))?;
        if let Some(init) = &mut self.settings.request.init {
            init.soft_mask = self.view.edit.mask.soft_for(file.as_deref(), init);
            init.mask = file;
        }
        Ok(())
    }
}
