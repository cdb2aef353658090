//! Qwen3, the decoder LM FLUX.2 klein encodes prompts with (Qwen3-4B for klein 4B, Qwen3-8B for
//! klein 9B): its config ([`Qwen3Config`]) and its forward pass to the hidden states of chosen
//! layers ([`Qwen3`]). The LM head is never read: klein uses the layers' hidden states.

pub mod config;
pub mod model;

pub use config::Qwen3Config;
pub use model::Qwen3;
