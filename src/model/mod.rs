//! Models and their weights: the FLUX.1 transformer, the 16-channel autoencoder, the T5 and CLIP
//! text encoders, the two on-disk layouts (Black Forest Labs single files and diffusers folders),
//! the built-in demo model, and how a sequence-parallel group shards a step's tokens.

pub mod attention;
pub mod checkpoint;
pub mod comfyui;
pub mod demo;
pub mod demo_weights;
pub mod export;
pub mod family;
pub mod flux1;
pub mod gguf;
pub mod hub;
pub mod klein;
pub mod klein_export;
pub mod layout;
pub mod linear;
pub mod load_clock;
pub mod lora;
pub mod lowrank;
pub mod on_demand;
pub mod qwen3;
pub mod rng;
pub mod shard;
pub mod step;
pub mod text;
pub mod tokenizer;
pub mod vae;
pub mod weights;

/// FLUX.1's modules under their old path (the transformer, its config and its input).
pub use flux1 as flux;

/// The model families built in, first in the registry ([`family::families`]). A new family is its
/// folder beside `flux1` and one line here (or a [`family::register`] call at run time).
pub fn builtin_families() -> Vec<std::sync::Arc<dyn family::Family>> {
    vec![
        std::sync::Arc::new(flux1::Flux1Family),
        std::sync::Arc::new(klein::KleinFamily),
    ]
}
