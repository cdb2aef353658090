//! Parallax: FLUX.1 on candle, built to run in parallel across the GPUs of one workstation.
//!
//! - [`model`]: the FLUX transformer, autoencoder, text encoders, weight layouts, demo model.

pub mod error;
pub mod model;

pub use error::{Error, Result};
