//! FLUX.1, the built-in model family: its configuration ([`FluxConfig`]), its transformer
//! ([`Flux`]), the FP8 linear layer the transformer's blocks use, and the family traits
//! ([`crate::model::family`]) implemented for the transformer, the T5 + CLIP text encoders and the
//! 16-channel autoencoder.

mod config;
mod family;
mod fp8;
mod model;

pub use config::FluxConfig;
pub use family::{Flux1Family, LATENT};
pub use fp8::Fp8Groups;
pub use model::*;
