//! A loaded model's latent preview map ([`crate::pipeline::preview`]), fitted on the demo's own
//! scenes where the model can encode them (the demo model has an encoder), else on smoothed noise
//! latents (real FLUX checkpoints are loaded without the encoder). It sits with the scenes, above
//! the pipeline, because the scenes are drawn as the pipeline's images.

use crate::error::Result;
use crate::model::layout::Variant;
use crate::pipeline::preview::PreviewFactors;
use crate::pipeline::Pipeline;

impl Pipeline {
    /// The latent preview map for this model's autoencoder. The built-in demo's map is shipped
    /// (fitted as [`Pipeline::fit_preview_factors`] does; a test refits and compares), so its
    /// first preview does not wait a CPU second for the fit.
    pub fn preview_factors(&self) -> Result<PreviewFactors> {
        if self.label == "demo" {
            if let Ok(f) = PreviewFactors::demo() {
                return Ok(f);
            }
        }
        self.fit_preview_factors()
    }

    /// Fit the preview map to this model's autoencoder: on the demo's own scenes where it has
    /// an encoder, else on decoded noise latents.
    pub fn fit_preview_factors(&self) -> Result<PreviewFactors> {
        let vae = self.model.as_flux1().map(|f| f.vae);
        if let Some(vae) = vae.filter(|v| self.variant == Variant::Demo && v.has_encoder()) {
            let images = super::render::scene_tensors(6, 128, 0x5eed)?;
            PreviewFactors::fit_images(vae, self.device(), &images)
        } else {
            PreviewFactors::fit(self.codec(), self.device(), 3, 24, 0x5eed)
        }
    }
}
