//! FLUX.2 klein: its text encoder (Qwen3, [`text`]).

pub mod text;
