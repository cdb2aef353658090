//! A Qwen3 decoder's sizes: read from a transformers `config.json`, or built in for the sizes
//! FLUX.2 klein uses (Qwen3-4B for klein 4B, Qwen3-8B for klein 9B) and a tiny one for tests.

use std::path::Path;

use crate::error::{Error, Result};

/// The sizes of a Qwen3 decoder (what its forward pass needs; generation settings are left out).
#[derive(Debug, Clone, PartialEq)]
pub struct Qwen3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP's inner layer.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key and value heads (grouped-query attention: each serves
    /// `num_attention_heads / num_key_value_heads` query heads).
    pub num_key_value_heads: usize,
    /// Width of one head (Qwen3 sets it apart from `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    /// Whether the LM head shares the token embedding (4B: yes, 8B: no; the encoder never reads
    /// the head).
    pub tie_word_embeddings: bool,
}

impl Qwen3Config {
    /// Qwen3-4B, FLUX.2 klein 4B's text encoder.
    pub fn qwen3_4b() -> Self {
        Self {
            vocab_size: 151_936,
            hidden_size: 2560,
            intermediate_size: 9728,
            num_hidden_layers: 36,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            head_dim: 128,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            max_position_embeddings: 40_960,
            tie_word_embeddings: true,
        }
    }

    /// Qwen3-8B, FLUX.2 klein 9B's text encoder: Qwen3-4B's depth and heads, wider, with its own
    /// LM head.
    pub fn qwen3_8b() -> Self {
        Self {
            hidden_size: 4096,
            intermediate_size: 12_288,
            tie_word_embeddings: false,
            ..Self::qwen3_4b()
        }
    }

    /// A tiny Qwen3 with the real one's shape of things (grouped heads, a head width apart from
    /// hidden / heads, enough layers for klein's layer choice 9, 18, 27): tests and `random:` use.
    pub fn tiny() -> Self {
        Self {
            vocab_size: 512,
            hidden_size: 24,
            intermediate_size: 48,
            num_hidden_layers: 28,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 8,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            max_position_embeddings: 1024,
            tie_word_embeddings: true,
        }
    }

    /// Query heads per key/value head.
    pub fn group_size(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Parameters of the decoder layers and the embedding (the LM head left out).
    pub fn params(&self) -> u64 {
        self.params_through(self.num_hidden_layers)
    }

    /// Parameters of a model holding the embedding and the first `layers` layers (and the final
    /// norm when that is all of them): what [`crate::model::qwen3::Qwen3::new_partial`] loads.
    pub fn params_through(&self, layers: usize) -> u64 {
        let layers = layers.min(self.num_hidden_layers);
        let h = self.hidden_size as u64;
        let d = self.head_dim as u64;
        let q = self.num_attention_heads as u64 * d;
        let kv = self.num_key_value_heads as u64 * d;
        let attn = h * q + 2 * h * kv + q * h + 2 * d;
        let mlp = 3 * h * self.intermediate_size as u64;
        let layer = attn + mlp + 2 * h;
        let norm = if layers == self.num_hidden_layers {
            h
        } else {
            0
        };
        self.vocab_size as u64 * h + layers as u64 * layer + norm
    }

    /// Read a transformers Qwen3 `config.json` (both the `rope_theta` of Qwen's own files and
    /// the `rope_parameters` newer transformers writes).
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|reason| Error::BadConfig {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Parse a `config.json`'s text; the error says what is wrong with it.
    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| format!("not a Qwen3 config: {e}"))?;
        if let Some(t) = raw.model_type.as_deref() {
            if t != "qwen3" {
                return Err(format!(
                    "model_type is `{t}`; this is Qwen3's reader (model_type `qwen3`)"
                ));
            }
        }
        if let Some(act) = raw.hidden_act.as_deref() {
            if act != "silu" {
                return Err(format!(
                    "hidden_act is `{act}`; Qwen3's MLP uses `silu` and no other is supported"
                ));
            }
        }
        if raw.attention_bias == Some(true) {
            return Err("attention_bias is true; Qwen3's projections have no biases".into());
        }
        if raw.use_sliding_window == Some(true) {
            return Err("use_sliding_window is true; only full attention is supported".into());
        }
        let rope_type = raw
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_type.clone())
            .or_else(|| raw.rope_scaling.as_ref().and_then(|p| p.rope_type.clone()));
        if let Some(t) = rope_type {
            if t != "default" {
                return Err(format!(
                    "RoPE type `{t}` (a context-extension scaling) is not supported; only plain \
                     RoPE is"
                ));
            }
        }
        let rope_theta = raw
            .rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(raw.rope_theta)
            .unwrap_or(1_000_000.0);
        if raw.num_attention_heads == 0
            || raw.num_key_value_heads.unwrap_or(raw.num_attention_heads) == 0
        {
            return Err("num_attention_heads and num_key_value_heads must be positive".into());
        }
        let cfg = Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
            head_dim: raw
                .head_dim
                .unwrap_or(raw.hidden_size / raw.num_attention_heads),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(40_960),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// Whether the sizes make a model.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.hidden_size == 0
            || self.intermediate_size == 0
            || self.num_hidden_layers == 0
            || self.vocab_size == 0
        {
            return Err(
                "hidden_size, intermediate_size, num_hidden_layers and vocab_size must \
                        all be positive"
                    .into(),
            );
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == 0 || self.head_dim % 2 != 0 {
            return Err(format!(
                "head_dim {} must be even and positive (RoPE rotates pairs)",
                self.head_dim
            ));
        }
        if self.rope_theta.is_nan() || self.rope_theta <= 0.0 {
            return Err(format!("rope_theta {} must be positive", self.rope_theta));
        }
        Ok(())
    }
}

/// The fields of transformers' `Qwen3Config` read here.
#[derive(serde::Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<RopeParameters>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    hidden_act: Option<String>,
    attention_bias: Option<bool>,
    use_sliding_window: Option<bool>,
}

#[derive(serde::Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    rope_type: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_qwen_and_transformers_configs() {
        // Qwen3-4B's own config.json (its fields as Qwen ships them).
        let qwen = r#"{"architectures":["Qwen3ForCausalLM"],"attention_bias":false,
            "attention_dropout":0.0,"bos_token_id":151643,"eos_token_id":151645,"head_dim":128,
            "hidden_act":"silu","hidden_size":2560,"initializer_range":0.02,
            "intermediate_size":9728,"max_position_embeddings":40960,"max_window_layers":36,
            "model_type":"qwen3","num_attention_heads":32,"num_hidden_layers":36,
            "num_key_value_heads":8,"rms_norm_eps":1e-06,"rope_scaling":null,
            "rope_theta":1000000,"sliding_window":null,"tie_word_embeddings":true,
            "torch_dtype":"bfloat16","use_cache":true,"use_sliding_window":false,
            "vocab_size":151936}"#;
        assert_eq!(Qwen3Config::from_json(qwen), Ok(Qwen3Config::qwen3_4b()));
        // transformers 5 writes rope_parameters instead of rope_theta.
        let v5 = r#"{"model_type":"qwen3","vocab_size":512,"hidden_size":24,
            "intermediate_size":48,"num_hidden_layers":28,"num_attention_heads":4,
            "num_key_value_heads":2,"head_dim":8,"rms_norm_eps":1e-06,
            "max_position_embeddings":1024,"tie_word_embeddings":true,
            "rope_parameters":{"rope_theta":1000000.0,"rope_type":"default"}}"#;
        assert_eq!(Qwen3Config::from_json(v5), Ok(Qwen3Config::tiny()));
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        let base = |extra: &str| {
            format!(
                r#"{{"vocab_size":8,"hidden_size":8,"intermediate_size":8,"num_hidden_layers":1,
                "num_attention_heads":4,"num_key_value_heads":3{extra}}}"#
            )
        };
        let e = Qwen3Config::from_json(&base("")).unwrap_err();
        assert!(e.contains("multiple"), "{e}");
        let e = Qwen3Config::from_json(&base(r#","model_type":"llama""#)).unwrap_err();
        assert!(e.contains("llama"), "{e}");
        let e = Qwen3Config::from_json(
            &base(r#","rope_scaling":{"rope_type":"yarn"}"#)
                .replace("\"num_key_value_heads\":3", "\"num_key_value_heads\":2"),
        )
        .unwrap_err();
        assert!(e.contains("yarn"), "{e}");
    }

    #[test]
    fn parameter_counts_match_the_published_sizes() {
        // Qwen3-4B: 4.0B with the tied head; Qwen3-8B: 8.2B of which 0.62B the untied head.
        let b4 = Qwen3Config::qwen3_4b().params() as f64 / 1e9;
        assert!((b4 - 4.02).abs() < 0.03, "{b4}");
        let c = Qwen3Config::qwen3_8b();
        let b8 = (c.params() + (c.vocab_size * c.hidden_size) as u64) as f64 / 1e9;
        assert!((b8 - 8.19).abs() < 0.03, "{b8}");
        // klein reads 27 of the 36 layers: 3.11B of Qwen3-4B's parameters, 6.2 GB in bf16.
        let k4 = Qwen3Config::qwen3_4b().params_through(27) as f64 / 1e9;
        assert!((k4 - 3.11).abs() < 0.01, "{k4}");
    }
}
