//! FLUX.2 klein's prompt encoding: Qwen3 reads the prompt wrapped in its chat template, and the
//! hidden states of three of its layers, joined on the feature axis, are the transformer's text
//! tokens. There is no pooled vector.
//!
//! As diffusers' `Flux2KleinPipeline` does it: the prompt becomes one user turn of Qwen's chat
//! template with the generation prompt and thinking switched off ([`chat_prompt`]); that text is
//! tokenized, cut to and right-padded with `<|endoftext|>` to [`KLEIN_MAX_LEN`] tokens (the
//! template's own tokens count); Qwen3 runs over the whole padded sequence under its causal
//! mask with padding keys left out; and the hidden states after layers 9, 18 and 27
//! ([`KLEIN_TEXT_LAYERS`], transformers' `hidden_states` numbering) are concatenated per token:
//! (1, 512, 3 x hidden), 7680 wide for Qwen3-4B (klein 4B), 12288 for Qwen3-8B (klein 9B).
//! Padding positions are encoded too and handed on, as the reference does.
//!
//! Only the first 27 of Qwen3's 36 layers are loaded: the others never touch the output.
//!
//! Qwen3 is kept on the device, or, under a memory budget ([`T5Residency::OnDemand`], the
//! setting FLUX.1's T5 follows), built for each prompt and freed after it
//! ([`crate::model::on_demand::Slot`]); the tokenizer stays either way.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use tokenizers::Tokenizer;

use crate::error::{Error, Result};
use crate::model::demo_weights::DemoWeights;
use crate::model::family::{PromptEmbedding, TextEncoder, TextSpec};
use crate::model::on_demand::{Builder, Slot};
use crate::model::qwen3::{Qwen3, Qwen3Config};
use crate::model::text::{find_prefix, open_weights, T5Residency};
use crate::model::tokenizer::{PromptTokenizer, Tokens, TOKENIZER_JSON};
use crate::model::weights::{Identity, MappedWeights};

/// The hidden states klein reads (transformers' numbering: `k` is the output of the first `k`
/// decoder layers).
pub const KLEIN_TEXT_LAYERS: [usize; 3] = [9, 18, 27];
/// Tokens per prompt, chat template included (the pipeline's `max_sequence_length`).
pub const KLEIN_MAX_LEN: usize = 512;
/// Qwen's padding token.
pub const QWEN_PAD: &str = "<|endoftext|>";
/// Qwen's end-of-turn token.
pub const QWEN_IM_END: &str = "<|im_end|>";
/// The tokens of Qwen's chat template, padding first.
pub const QWEN_CHAT_TOKENS: [&str; 5] =
    [QWEN_PAD, "<|im_start|>", QWEN_IM_END, "<think>", "</think>"];

/// `prompt` as the single user turn of Qwen3's chat template, with the assistant's turn opened
/// and an empty think block (what `apply_chat_template(.., add_generation_prompt=True,
/// enable_thinking=False)` renders).
pub fn chat_prompt(prompt: &str) -> String {
    format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")
}

/// What a Qwen3 is without its weights: its config, how many layers it holds, its dtype and
/// device (known before an on-demand one is built).
#[derive(Debug, Clone)]
struct QwenShape {
    config: Qwen3Config,
    held: usize,
    dtype: DType,
    device: Device,
}

/// Qwen3 (kept, or built for each prompt) and its tokenizer, producing klein's text tokens.
pub struct KleinTextEncoder {
    qwen: Slot<Qwen3>,
    shape: QwenShape,
    tokenizer: PromptTokenizer,
    layers: Vec<usize>,
}

impl std::fmt::Debug for KleinTextEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KleinTextEncoder")
            .field("config", &self.shape.config)
            .field("layers", &self.layers)
            .field("tokenizer", &self.tokenizer)
            .field("dtype", &self.shape.dtype)
            .field("residency", &self.qwen.residency())
            .finish()
    }
}

impl KleinTextEncoder {
    /// From ready parts. `layers` are the hidden states joined (klein: [`KLEIN_TEXT_LAYERS`]);
    /// the model must hold the layers up to the highest of them.
    pub fn new(model: Qwen3, tokenizer: PromptTokenizer, layers: &[usize]) -> Result<Self> {
        let shape = QwenShape {
            config: model.config().clone(),
            held: model.max_output(),
            dtype: model.dtype(),
            device: model.device().clone(),
        };
        Self::assemble(Slot::Resident(model), shape, tokenizer, layers)
    }

    /// Qwen3 built by `build` (which makes a Qwen3 of `shape`), kept or for each prompt as
    /// `residency` says.
    fn built(
        build: Builder<Qwen3>,
        shape: QwenShape,
        residency: T5Residency,
        tokenizer: PromptTokenizer,
        layers: &[usize],
    ) -> Result<Self> {
        let slot = Slot::with_residency(residency, build)?;
        Self::assemble(slot, shape, tokenizer, layers)
    }

    fn assemble(
        qwen: Slot<Qwen3>,
        shape: QwenShape,
        tokenizer: PromptTokenizer,
        layers: &[usize],
    ) -> Result<Self> {
        let highest = layers.iter().copied().max().ok_or_else(|| {
            Error::setting("klein text layers", "none", "at least one layer is read")
        })?;
        if highest > shape.held {
            return Err(Error::setting(
                "klein text layers",
                format!("{layers:?}"),
                format!(
                    "the text encoder holds {} layers, so hidden states up to {} only",
                    shape.held, shape.held
                ),
            ));
        }
        if tokenizer.vocab_size() > shape.config.vocab_size {
            return Err(Error::Tokenizer(format!(
                "the Qwen3 tokenizer has {} tokens but the text encoder only {} (vocab_size)",
                tokenizer.vocab_size(),
                shape.config.vocab_size
            )));
        }
        Ok(Self {
            qwen,
            shape,
            tokenizer,
            layers: layers.to_vec(),
        })
    }

    /// Load the diffusers layout of a klein checkout: `text_encoder/` and `tokenizer/`.
    pub fn load_diffusers(root: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load(
            &root.join("text_encoder"),
            &root.join("tokenizer"),
            &KLEIN_TEXT_LAYERS,
            KLEIN_MAX_LEN,
            dtype,
            device,
        )
    }

    /// [`KleinTextEncoder::load_as`], Qwen3 kept on the device.
    pub fn load(
        weights: &Path,
        tokenizer: &Path,
        layers: &[usize],
        max_len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::load_as(
            weights,
            tokenizer,
            layers,
            max_len,
            (dtype, device),
            T5Residency::Resident,
        )
    }

    /// Load Qwen3 from `weights` (a folder with `config.json` and `model.safetensors` or its
    /// shards, or one `.safetensors` file of Qwen3-4B or Qwen3-8B, told apart by their width)
    /// and the tokenizer from the folder `tokenizer` (its `tokenizer.json`). Only the layers up
    /// to the highest of `layers` are read: once, kept on the device, or for each prompt, as
    /// `residency` says (the file is opened and its config read once either way).
    pub fn load_as(
        weights: &Path,
        tokenizer: &Path,
        layers: &[usize],
        max_len: usize,
        (dtype, device): (DType, &Device),
        residency: T5Residency,
    ) -> Result<Self> {
        if !weights.exists() {
            return Err(Error::UnknownLayout {
                path: weights.to_path_buf(),
                reason: "not found: the Qwen3 text encoder, a diffusers text_encoder/ folder or \
                         one .safetensors file"
                    .into(),
            });
        }
        let set = open_weights(weights)?;
        let prefix = find_prefix(&set, "embed_tokens.weight", "Qwen3 text encoder")?;
        let cfg = if weights.is_dir() {
            Qwen3Config::read(&weights.join("config.json"))?
        } else {
            let embed = format!("{prefix}embed_tokens.weight");
            let width = set
                .meta(&embed)
                .and_then(|m| m.shape.get(1).copied())
                .unwrap_or(0);
            match width {
                2560 => Qwen3Config::qwen3_4b(),
                4096 => Qwen3Config::qwen3_8b(),
                _ => {
                    return Err(Error::UnknownLayout {
                        path: weights.to_path_buf(),
                        reason: format!(
                            "a Qwen3 of width {width}; a single file must be Qwen3-4B (2560) or \
                             Qwen3-8B (4096): use a folder with its config.json for others"
                        ),
                    })
                }
            }
        };
        let highest = layers.iter().copied().max().unwrap_or(0);
        if highest > cfg.num_hidden_layers {
            return Err(Error::setting(
                "klein text layers",
                format!("{layers:?}"),
                format!("the text encoder has {} layers", cfg.num_hidden_layers),
            ));
        }
        let tokenizer = qwen_tokenizer(tokenizer, max_len)?;
        let shape = QwenShape {
            config: cfg.clone(),
            held: highest,
            dtype,
            device: device.clone(),
        };
        let dev = device.clone();
        let build: Builder<Qwen3> = Arc::new(move || {
            let map = Arc::new(Identity {
                prefix: prefix.clone(),
            });
            let vb = MappedWeights::new(set.clone(), map).var_builder(dtype, &dev);
            Ok(Qwen3::new_partial(&cfg, vb, highest)?)
        });
        Self::built(build, shape, residency, tokenizer, layers)
    }

    /// Qwen3 of `cfg` with weights from `vb` (made-up ones: [`DemoWeights`] on the CPU,
    /// [`crate::model::demo_weights::RandomWeights`] on a GPU) and a byte tokenizer with Qwen's
    /// chat tokens built in code ([`PromptTokenizer::byte_level_chat`]): klein's text encoding at
    /// any size without files, for `random:` models and tests. Reads [`KLEIN_TEXT_LAYERS`].
    pub fn made_up(cfg: &Qwen3Config, vb: VarBuilder<'static>, max_len: usize) -> Result<Self> {
        let vb = vb.clone();
        Self::made_up_as(
            cfg,
            Arc::new(move || Ok(vb.clone())),
            max_len,
            T5Residency::Resident,
        )
    }

    /// [`KleinTextEncoder::made_up`] with Qwen3's weights from `weights` (called for each build:
    /// it must give the same weights each time), kept or built for each prompt as `residency`
    /// says.
    pub fn made_up_as(
        cfg: &Qwen3Config,
        weights: Arc<dyn Fn() -> Result<VarBuilder<'static>> + Send + Sync>,
        max_len: usize,
        residency: T5Residency,
    ) -> Result<Self> {
        let highest = KLEIN_TEXT_LAYERS[KLEIN_TEXT_LAYERS.len() - 1].min(cfg.num_hidden_layers);
        let tokenizer = PromptTokenizer::byte_level_chat(max_len, "qwen3", &QWEN_CHAT_TOKENS, 0)?;
        let first = weights()?;
        let shape = QwenShape {
            config: cfg.clone(),
            held: highest,
            dtype: first.dtype(),
            device: first.device().clone(),
        };
        let c = cfg.clone();
        let build: Builder<Qwen3> =
            Arc::new(move || Ok(Qwen3::new_partial(&c, weights()?, highest)?));
        Self::built(build, shape, residency, tokenizer, &KLEIN_TEXT_LAYERS)
    }

    /// [`KleinTextEncoder::made_up`] at [`Qwen3Config::tiny`]'s size with [`DemoWeights`] from
    /// `seed`, in f32 (the text encoder of a tiny klein for tests and CPU runs).
    pub fn tiny(seed: u64, device: &Device) -> Result<Self> {
        Self::tiny_as(seed, device, T5Residency::Resident)
    }

    /// [`KleinTextEncoder::tiny`], kept or built for each prompt as `residency` says.
    pub fn tiny_as(seed: u64, device: &Device, residency: T5Residency) -> Result<Self> {
        let device = device.clone();
        Self::made_up_as(
            &Qwen3Config::tiny(),
            Arc::new(move || Ok(DemoWeights::new(seed).var_builder(DType::F32, &device))),
            KLEIN_MAX_LEN,
            residency,
        )
    }

    /// The prompt, wrapped in the chat template, as exactly `max_len` ids.
    pub fn tokenize(&self, prompt: &str) -> Result<Tokens> {
        self.tokenizer.encode(&chat_prompt(prompt))
    }

    /// The joined hidden states (1, max_len, layers x hidden) of tokenized text, in the model's
    /// dtype.
    pub fn encode_tokens(&self, tokens: &Tokens) -> Result<Tensor> {
        let device = &self.shape.device;
        let ids = Tensor::new(tokens.ids.as_slice(), device)?.unsqueeze(0)?;
        let mask: Vec<u32> = (0..tokens.ids.len())
            .map(|i| u32::from(i < tokens.used))
            .collect();
        let mask = Tensor::new(mask.as_slice(), device)?.unsqueeze(0)?;
        let states = self.qwen.run("Qwen3", |m| {
            Ok(m.forward(&ids, Some(&mask), &self.layers)?)
        })?;
        Ok(Tensor::cat(&states, D::Minus1)?)
    }

    /// The tokenizer (its `max_len` is the sequence length).
    pub fn tokenizer(&self) -> &PromptTokenizer {
        &self.tokenizer
    }

    /// The hidden states joined.
    pub fn layers(&self) -> &[usize] {
        &self.layers
    }

    /// Qwen3's config.
    pub fn config(&self) -> &Qwen3Config {
        &self.shape.config
    }

    /// The highest hidden-state index the loaded (or on-demand) Qwen3 gives: the layers it holds.
    pub fn max_output(&self) -> usize {
        self.shape.held
    }

    /// Where Qwen3 stays between prompts.
    pub fn residency(&self) -> T5Residency {
        self.qwen.residency()
    }

    /// How many times an on-demand Qwen3 was built (once for each prompt encoded; 0 when kept).
    pub fn builds(&self) -> usize {
        self.qwen.builds()
    }
}

impl TextEncoder for KleinTextEncoder {
    fn text_spec(&self) -> TextSpec {
        TextSpec {
            txt_dim: self.layers.len() * self.shape.config.hidden_size,
            pooled_dim: None,
            guidance_embed: false,
        }
    }

    fn encode_prompt(&self, prompt: &str, dtype: DType) -> Result<PromptEmbedding> {
        let tokens = self.tokenize(prompt)?;
        let mut notes = Vec::new();
        if let Some(n) = tokens.truncated_from {
            let note = format!(
                "prompt is {n} Qwen3 tokens with its chat template; the encoder takes {}, so \
                 it was truncated",
                self.tokenizer.max_len()
            );
            tracing::warn!("{note}");
            notes.push(note);
        }
        let txt = self.encode_tokens(&tokens)?.to_dtype(dtype)?;
        Ok(PromptEmbedding {
            txt,
            pooled: None,
            notes,
        })
    }

    fn device(&self) -> &Device {
        &self.shape.device
    }
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

/// Qwen's byte-level BPE tokenizer from `dir`'s `tokenizer.json`, padding with the pad token
/// `tokenizer_config.json` names (Qwen: `<|endoftext|>`, also the default) on the right.
pub fn qwen_tokenizer(dir: &Path, max_len: usize) -> Result<PromptTokenizer> {
    let json = dir.join(TOKENIZER_JSON);
    if !json.is_file() {
        return Err(Error::MissingTokenizer {
            which: "qwen3".into(),
            reason: format!(
                "{} has no {TOKENIZER_JSON}: put the klein repo's tokenizer/ folder there",
                dir.display()
            ),
        });
    }
    let bad = |path: PathBuf, reason: String| Error::BadConfig { path, reason };
    let tokenizer = Tokenizer::from_file(&json).map_err(|e| {
        bad(
            json.clone(),
            format!("not a tokenizers `tokenizer.json`: {e}"),
        )
    })?;
    let settings = TokenizerSettings::read(&dir.join("tokenizer_config.json"))?;
    if settings.padding_side.as_deref() == Some("left") {
        return Err(bad(
            dir.join("tokenizer_config.json"),
            "padding_side is `left`; klein's prompts are padded on the right".into(),
        ));
    }
    let pad = settings.pad_token.unwrap_or_else(|| QWEN_PAD.to_string());
    let pad_id = tokenizer.token_to_id(&pad).ok_or_else(|| {
        bad(
            json.clone(),
            format!("the tokenizer has no padding token `{pad}`"),
        )
    })?;
    let eos_id = tokenizer.token_to_id(QWEN_IM_END);
    PromptTokenizer::new(tokenizer, max_len, pad_id, eos_id, "qwen3")
}

/// What `tokenizer_config.json` says about padding.
#[derive(Default)]
struct TokenizerSettings {
    pad_token: Option<String>,
    padding_side: Option<String>,
}

impl TokenizerSettings {
    /// The file's settings; none when there is no file.
    fn read(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::BadConfig {
            path: path.to_path_buf(),
            reason: format!("not JSON: {e}"),
        })?;
        // A token is written as its text or as an object with its `content`.
        let token = |key: &str| match v.get(key) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Object(o)) => o
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            _ => None,
        };
        Ok(Self {
            pad_token: token("pad_token"),
            padding_side: v
                .get("padding_side")
                .and_then(|s| s.as_str())
                .map(str::to_string),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_is_one_user_turn_without_thinking() {
        assert_eq!(
            chat_prompt("a fox"),
            "<|im_start|>user\na fox<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        );
    }

    #[test]
    fn the_tiny_encoder_runs_without_files() -> Result<()> {
        let enc = KleinTextEncoder::tiny(7, &Device::Cpu)?;
        let tokens = enc.tokenize("a fox")?;
        // The template's 5 specials are one token each; the other 25 bytes, one token each.
        assert_eq!(
            tokens.used,
            5 + ("user\n".len() + "a fox\n".len() + "assistant\n".len() + 4)
        );
        assert_eq!(tokens.ids[0], 257);
        assert_eq!(tokens.ids[tokens.used], 256);
        let a = enc.encode_prompt("a fox", DType::F32)?;
        assert_eq!(a.txt.dims(), &[1, KLEIN_MAX_LEN, 3 * 24]);
        assert_eq!(enc.text_spec().pooled_dim, None);
        let again = KleinTextEncoder::tiny(7, &Device::Cpu)?.encode_prompt("a fox", DType::F32)?;
        let b = enc.encode_prompt("a hare", DType::F32)?;
        let diff = |x: &Tensor, y: &Tensor| -> Result<f32> {
            Ok((x - y)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
        };
        assert_eq!(diff(&a.txt, &again.txt)?, 0.0);
        assert!(diff(&a.txt, &b.txt)? > 1e-3);
        assert!(a.txt.sum_all()?.to_scalar::<f32>()?.is_finite());
        Ok(())
    }
}
