//! FLUX.2 klein (4B and 9B), a model family behind [`crate::model::family`]'s traits: its
//! transformer ([`Klein`], configured by [`KleinConfig`]), its autoencoder's decoding half
//! ([`KleinVae`], 32 latent channels normalised by batch-norm statistics), the two layouts its
//! files come in ([`keys`]), the registry entry ([`KleinFamily`]), its Qwen3 text encoder
//! ([`text`]) and a model's files on disk ([`files`]). `random:klein-tiny` is written to disk by
//! [`crate::model::klein_export`].

mod config;
mod family;
pub mod files;
pub mod keys;
mod model;
pub mod text;
mod vae;

pub use config::{KleinConfig, StagePart};
pub use family::{
    load_transformer, load_transformer_stage, load_vae, random_model, random_stage, random_text,
    random_text_as, KleinFamily, RandomKlein, NAME, TINY_SEEDS, TINY_TEXT_SEED,
};
pub use model::Klein;
pub use vae::{tiny_vae_config, vae_config, KleinVae, BATCH_NORM_EPS, LATENT};
