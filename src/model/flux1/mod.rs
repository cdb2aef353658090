//! FLUX.1, the built-in model family: its configuration ([`FluxConfig`]), its transformer
//! ([`Flux`], its blocks' linear layers [`crate::model::linear`]'s), and the family traits
//! ([`crate::model::family`]) implemented for the transformer, the T5 + CLIP text encoders and the
//! 16-channel autoencoder.

mod config;
mod family;
mod model;

pub use crate::model::linear::Fp8Groups;
pub use config::{FluxConfig, FILL_IN_CHANNELS, LATENT_CHANNELS};
pub use family::{Flux1Family, LATENT};
pub use model::*;
