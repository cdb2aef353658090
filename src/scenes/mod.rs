//! The demo model's world: a procedural, captioned dataset of simple scenes (one to three coloured
//! shapes on plain, sky, sea, striped, checkered or night backgrounds), generated from a seed with
//! nothing downloaded, and the scorer that checks an image against its prompt.
//!
//! - [`spec`]: palette, shapes, backgrounds, positions and sizes (the numbers both renderers use).
//! - [`sample`]: random scenes and their captions in several phrasings; held-out colour-shape pairs.
//! - [`render`]: drawing a scene (for the scorer's references and the tests).
//! - [`parse`]: reading a prompt back into what it asks for.
//! - [`score`]: checking a generated image's colours, shapes, positions, sizes and background.
//! - `preview_fit`: a loaded model's latent preview map, fitted on these scenes where it can
//!   encode them ([`crate::pipeline::Pipeline::preview_factors`]).
//!
//! The trainer (`scripts/train-demo/`) draws its pictures from the scenes `parallax dataset`
//! writes; this module is a floor above the pipeline (it uses the model's random numbers and the
//! pipeline's image type; the pipeline does not use it).

pub mod parse;
mod preview_fit;
pub mod render;
pub mod sample;
pub mod score;
pub mod spec;
