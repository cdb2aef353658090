//! Parallax: FLUX.1 on candle, built to run in parallel across the GPUs of one workstation.
//!
//! The modules are floors, bottom up: [`kernels`] (with [`collective`], [`device`], [`error`],
//! [`files`]),
//! [`model`], [`pipeline`], [`scenes`], [`parallel`], `engine` (placement), [`runtime`], then
//! [`cli`] and the studio app. A module uses only its own floor and those below; `scripts/floors.sh` checks it.
//!
//! - [`model`]: the FLUX transformer, autoencoder, text encoders, weight layouts, demo model.
//! - [`pipeline`]: flow-matching schedule, the denoising loop, cache policies, image output.
//! - [`kernels`]: Parallax's own CUDA kernels as candle ops (fused attention).
//! - [`collective`]: the communicator trait the model and pipeline hold (`parallel` implements it).
//! - [`parallel`]: communicators, the mesh, one file per parallel strategy.
//! - [`engine`]: placement (devices, layout) and the one entry point every front end runs jobs through.
//! - [`files`]: files written whole or not at all (temporary file, flush, rename).
//! - [`runtime`]: the job queue and engine thread behind the studio, streaming events.
//! - [`cli`]: the `parallax` command line.

#[cfg(feature = "studio")]
pub mod app;
pub mod cli;
pub mod collective;
pub mod device;
pub mod engine;
pub mod error;
pub mod files;
pub mod kernels;
pub mod model;
pub mod parallel;
pub mod pipeline;
pub mod runtime;
pub mod scenes;

pub use error::{Error, Result};
