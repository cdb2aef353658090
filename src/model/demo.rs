//! The built-in demo model: FLUX.1's structure at a tiny size ([`FluxConfig::demo`],
//! [`VaeConfig::demo`], the demo T5 and CLIP), with weights trained by Parallax itself on its
//! procedural scenes (`scripts/train-demo/`, the dataset in [`crate::scenes`]: coloured shapes on
//! simple backgrounds). The weights (f16, a few MB) are compiled into the binary from
//! `assets/demo/`, so `--model demo` works in every build, `cargo install` included.
//!
//! The files keep the real checkpoints' tensor names: `transformer.safetensors` and
//! `ae.safetensors` are BFL's, `t5.safetensors` and `clip.safetensors` transformers'.
//! `assets/demo/demo.json` is what the trainer recorded (configurations, training steps).

use candle_core::{DType, Device};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::flux::{Flux, FluxConfig};
use super::text::{self, TextEncoders, CLIP_MAX_LEN, DEMO_T5_MAX_LEN};
use super::tokenizer::PromptTokenizer;
use super::vae::{AutoEncoder, VaeConfig};
use crate::error::{CandleResultExt, Result};

// Statics, not consts: a const's bytes are copied into each place that uses it (the release
// build held the 5.7 MB transformer twice), a static's once.
/// The transformer's weights (BFL names).
pub static TRANSFORMER: &[u8] = include_bytes!("../../assets/demo/transformer.safetensors");
/// The autoencoder's weights (BFL names).
pub static AUTOENCODER: &[u8] = include_bytes!("../../assets/demo/ae.safetensors");
/// The T5 encoder's weights (transformers' names).
pub static T5: &[u8] = include_bytes!("../../assets/demo/t5.safetensors");
/// The CLIP text model's weights (transformers' names, under `text_model.`).
pub static CLIP: &[u8] = include_bytes!("../../assets/demo/clip.safetensors");
/// What the trainer recorded: configurations and steps of each phase.
pub const TRAINING: &str = include_str!("../../assets/demo/demo.json");

/// The weights of one part as a `SimpleBackend` (for recording them into other layouts).
pub fn backend(bytes: &'static [u8]) -> Result<Box<dyn SimpleBackend>> {
    Ok(Box::new(candle_core::safetensors::SliceSafetensors::new(
        bytes,
    )?))
}

fn vb(bytes: &'static [u8], dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    Ok(VarBuilder::from_backend(
        backend(bytes)?,
        dtype,
        device.clone(),
    ))
}

/// The transformer, in `dtype` on `device`.
pub fn transformer(dtype: DType, device: &Device) -> Result<Flux> {
    Flux::new(&FluxConfig::demo(), vb(TRANSFORMER, dtype, device)?).px()
}

/// The autoencoder (encoder and decoder).
pub fn autoencoder(dtype: DType, device: &Device) -> Result<AutoEncoder> {
    AutoEncoder::new(&VaeConfig::demo(), vb(AUTOENCODER, dtype, device)?).px()
}

/// The text encoders with the demo byte tokenizers.
pub fn text_encoders(dtype: DType, device: &Device) -> Result<TextEncoders> {
    TextEncoders::new(
        vb(T5, dtype, device)?,
        &text::t5_demo_config(),
        vb(CLIP, dtype, device)?.pp("text_model"),
        &text::clip_demo_config(),
        PromptTokenizer::demo(DEMO_T5_MAX_LEN, "t5")?,
        PromptTokenizer::demo(CLIP_MAX_LEN, "clip")?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configs_are_the_ones_it_was_trained_with() {
        let rec: serde_json::Value = serde_json::from_str(TRAINING).expect("demo.json");
        let f = &rec["flux"];
        let c = FluxConfig::demo();
        assert_eq!(f["hidden_size"], c.hidden_size);
        assert_eq!(f["num_heads"], c.num_heads);
        assert_eq!(f["depth"], c.depth);
        assert_eq!(f["depth_single_blocks"], c.depth_single_blocks);
        assert_eq!(f["context_in_dim"], c.context_in_dim);
        assert_eq!(f["vec_in_dim"], c.vec_in_dim);
        assert_eq!(f["guidance_embed"], c.guidance_embed);
        assert_eq!(f["axes_dim"], serde_json::json!(c.axes_dim));
        let v = &rec["vae"];
        let vc = VaeConfig::demo();
        assert_eq!(v["ch"], vc.ch);
        assert_eq!(v["ch_mult"], serde_json::json!(vc.ch_mult));
        assert_eq!(v["num_res_blocks"], vc.num_res_blocks);
        assert_eq!(v["norm_groups"], vc.norm_groups);
        assert_eq!(v["scaling_factor"], vc.scaling_factor);
        assert_eq!(v["shift_factor"], vc.shift_factor);
        let t = &rec["t5"];
        let tc = text::t5_demo_config();
        assert_eq!(t["d_model"], tc.d_model);
        assert_eq!(t["num_layers"], tc.num_layers);
        assert_eq!(t["d_ff"], tc.d_ff);
        assert_eq!(t["num_heads"], tc.num_heads);
        assert_eq!(
            rec["clip"]["hidden_size"],
            text::clip_demo_config().embed_dim
        );
    }
}
