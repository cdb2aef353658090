//! Parallax: FLUX.1 on candle, built to run in parallel across the GPUs of one workstation.
//!
//! - [`model`]: the FLUX transformer, autoencoder, text encoders, weight layouts, demo model.
//! - [`pipeline`]: flow-matching schedule, the denoising loop, cache policies, image output.
//! - [`kernels`]: Parallax's own CUDA kernels as candle ops (fused attention).
//! - [`cli`]: the `parallax` command line.

pub mod cli;
pub mod device;
pub mod error;
pub mod kernels;
pub mod model;
pub mod parallel;
pub mod pipeline;

pub use error::{Error, Result};
