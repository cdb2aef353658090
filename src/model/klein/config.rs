//! FLUX.2 klein's transformer hyper-parameters ([`KleinConfig`]): the 4B and 9B checkpoints, the
//! tiny size the tests and `random:klein-tiny` use, and a diffusers `transformer/config.json`
//! read into one; its parameter counts, and which parts outside the blocks a pipeline stage
//! needs ([`StagePart`]).

use std::ops::Range;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::family::ParamCounts;

/// A part of the transformer outside its blocks that only the pipeline stages using it hold
/// ([`KleinConfig::part_users`]); the timestep and guidance embedders are on every stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StagePart {
    /// The image and text input projections (the first stage embeds the tokens).
    Inputs,
    /// The double blocks' shared modulations (image and text streams).
    DoubleModulations,
    /// The single blocks' shared modulation.
    SingleModulation,
    /// The final adaLN and projection (the last stage).
    FinalLayer,
}

impl StagePart {
    pub const ALL: [Self; 4] = [
        Self::Inputs,
        Self::DoubleModulations,
        Self::SingleModulation,
        Self::FinalLayer,
    ];
}

/// Architecture hyper-parameters of a FLUX.2 transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KleinConfig {
    /// Packed latent channels: 32 latent channels x 2x2 patches.
    pub in_channels: usize,
    /// Width of the text hidden states (three Qwen3 layers joined).
    pub context_in_dim: usize,
    pub hidden_size: usize,
    pub num_heads: usize,
    /// SwiGLU hidden width over the model width.
    pub mlp_ratio: f64,
    /// Double-stream blocks.
    pub depth: usize,
    /// Single-stream blocks.
    pub depth_single_blocks: usize,
    /// RoPE dimensions per position axis (time, row, column, text index); they sum to the head
    /// dim.
    pub axes_dim: Vec<usize>,
    pub theta: f64,
    /// Whether the transformer embeds a guidance strength (FLUX.2-dev does; klein does not:
    /// its distilled checkpoints take no guidance at all, its Base ones take true CFG).
    pub guidance_embed: bool,
}

impl KleinConfig {
    /// FLUX.2 klein 4B (distilled and Base share it): 24 heads of 128, 5 double and 20 single
    /// blocks, Qwen3-4B's hidden width 2560 from three layers (7680).
    pub fn klein_4b() -> Self {
        Self {
            in_channels: 128,
            context_in_dim: 3 * 2560,
            hidden_size: 24 * 128,
            num_heads: 24,
            mlp_ratio: 3.0,
            depth: 5,
            depth_single_blocks: 20,
            axes_dim: vec![32, 32, 32, 32],
            theta: 2000.0,
            guidance_embed: false,
        }
    }

    /// FLUX.2 klein 9B: 32 heads of 128, 8 double and 24 single blocks, Qwen3-8B's hidden width
    /// 4096 from three layers (12288).
    pub fn klein_9b() -> Self {
        Self {
            context_in_dim: 3 * 4096,
            hidden_size: 32 * 128,
            num_heads: 32,
            depth: 8,
            depth_single_blocks: 24,
            ..Self::klein_4b()
        }
    }

    /// klein's architecture at a tiny size (`random:klein-tiny`): 2 heads of 32, 2 double and 3
    /// single blocks, text width 72 (three layers of the tiny Qwen3's 24, `Qwen3Config::tiny`).
    pub fn tiny() -> Self {
        Self {
            in_channels: 128,
            context_in_dim: 3 * 24,
            hidden_size: 64,
            num_heads: 2,
            mlp_ratio: 3.0,
            depth: 2,
            depth_single_blocks: 3,
            axes_dim: vec![8, 8, 8, 8],
            theta: 2000.0,
            guidance_embed: false,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads.max(1)
    }

    /// The SwiGLU's hidden width (its input projection is twice this).
    pub fn mlp_hidden(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio) as usize
    }

    /// Total blocks, double then single.
    pub fn num_blocks(&self) -> usize {
        self.depth + self.depth_single_blocks
    }

    /// Check internal consistency (used on configs read from files).
    pub fn validate(&self) -> std::result::Result<(), String> {
        crate::model::step::check_heads_and_rope(self.hidden_size, self.num_heads, &self.axes_dim)?;
        if self.in_channels == 0 || self.num_blocks() == 0 || self.mlp_hidden() == 0 {
            return Err("model has no input channels, no blocks or no MLP".into());
        }
        Ok(())
    }

    /// Parameters of each block in the unified numbering (double blocks first): products and
    /// QK-norm scales (no biases; the shared modulations are outside the blocks).
    pub fn block_params(&self) -> Vec<u64> {
        self.block_param_counts()
            .iter()
            .map(ParamCounts::total)
            .collect()
    }

    /// klein's parameter formula, by kind, for each block in the unified numbering (double
    /// blocks first): products and their rows, QK-norm scales as the rest (no biases, no
    /// modulations: those are shared, outside the blocks).
    pub fn block_param_counts(&self) -> Vec<ParamCounts> {
        let h = self.hidden_size as u64;
        let m = self.mlp_hidden() as u64;
        let d = self.head_dim() as u64;
        // Per stream: qkv, proj, the SwiGLU's input (2m rows) and output; two QK norms.
        let stream_rows = 3 * h + h + 2 * m + h;
        let double = ParamCounts {
            products: 2 * (3 * h * h + h * h + h * 2 * m + m * h),
            product_rows: 2 * stream_rows,
            other: 2 * 2 * d,
            ..Default::default()
        };
        // A single block: linear1 (qkv and the SwiGLU's input), linear2 (attention and MLP out).
        let single = ParamCounts {
            products: h * (3 * h + 2 * m) + (h + m) * h,
            product_rows: 3 * h + 2 * m + h,
            other: 2 * d,
            ..Default::default()
        };
        std::iter::repeat_n(double, self.depth)
            .chain(std::iter::repeat_n(single, self.depth_single_blocks))
            .collect()
    }

    /// Parameters outside the blocks that every pipeline stage holds: the timestep (and
    /// guidance) embedders, since every stage computes the conditioning vector. The other parts
    /// outside the blocks ([`StagePart`]) are held only by the stages that need them.
    pub fn outside_param_counts(&self) -> ParamCounts {
        let h = self.hidden_size as u64;
        // Timestep and guidance embedders: 256 sinusoid channels in, two products, no biases.
        let embed = 256 * h + h * h;
        ParamCounts {
            other: embed + if self.guidance_embed { embed } else { 0 },
            ..Default::default()
        }
    }

    /// Parameters of `part` (its modulations counted as modulations, the rest as other; the
    /// final layer's adaLN as the rest, as FLUX.1's is).
    pub fn part_param_counts(&self, part: StagePart) -> ParamCounts {
        let h = self.hidden_size as u64;
        let channels = self.in_channels as u64;
        let shared_mod = |sets: u64| ParamCounts {
            modulations: 3 * sets * h * h,
            modulation_rows: 3 * sets * h,
            ..Default::default()
        };
        match part {
            StagePart::Inputs => ParamCounts {
                other: channels * h + self.context_in_dim as u64 * h,
                ..Default::default()
            },
            // Two (shift, scale, gate) sets for each of the image and text streams.
            StagePart::DoubleModulations => shared_mod(4),
            StagePart::SingleModulation => shared_mod(1),
            StagePart::FinalLayer => ParamCounts {
                other: h * 2 * h + h * channels,
                ..Default::default()
            },
        }
    }

    /// The blocks of the unified numbering that use `part` (the first block embeds the
    /// tokens, the last one's stream goes through the final layer).
    pub fn part_users(&self, part: StagePart) -> Range<usize> {
        let n = self.num_blocks();
        match part {
            StagePart::Inputs => 0..n.min(1),
            StagePart::DoubleModulations => 0..self.depth,
            StagePart::SingleModulation => self.depth..n,
            StagePart::FinalLayer => n.saturating_sub(1)..n,
        }
    }

    /// Whether a replica holding the blocks `held` needs `part` (holds one of its users).
    pub fn needs(&self, held: &Range<usize>, part: StagePart) -> bool {
        crate::model::step::shares_blocks(held, &self.part_users(part))
    }

    /// Read a diffusers `transformer/config.json` (a `Flux2Transformer2DModel` config).
    pub fn from_diffusers_json(path: &Path) -> Result<Self> {
        let text = crate::files::read_regular_text(path)?;
        Self::from_diffusers_str(&text, path)
    }

    /// [`KleinConfig::from_diffusers_json`] on the file's text (`path` is used in messages only).
    pub fn from_diffusers_str(text: &str, path: &Path) -> Result<Self> {
        #[derive(Deserialize)]
        struct Raw {
            attention_head_dim: usize,
            num_attention_heads: usize,
            num_layers: usize,
            num_single_layers: usize,
            #[serde(default = "in_channels")]
            in_channels: usize,
            joint_attention_dim: usize,
            #[serde(default = "mlp_ratio")]
            mlp_ratio: f64,
            #[serde(default)]
            guidance_embeds: Option<bool>,
            #[serde(default)]
            axes_dims_rope: Option<Vec<usize>>,
            #[serde(default)]
            rope_theta: Option<f64>,
        }
        fn in_channels() -> usize {
            128
        }
        fn mlp_ratio() -> f64 {
            3.0
        }
        let bad = |reason: String| Error::BadConfig {
            path: path.to_path_buf(),
            reason,
        };
        let raw: Raw = serde_json::from_str(text).map_err(|e| {
            bad(format!(
                "not a diffusers Flux2Transformer2DModel config: {e}"
            ))
        })?;
        let cfg = Self {
            in_channels: raw.in_channels,
            context_in_dim: raw.joint_attention_dim,
            hidden_size: raw.attention_head_dim * raw.num_attention_heads,
            num_heads: raw.num_attention_heads,
            mlp_ratio: raw.mlp_ratio,
            depth: raw.num_layers,
            depth_single_blocks: raw.num_single_layers,
            axes_dim: raw.axes_dims_rope.unwrap_or_else(|| vec![32, 32, 32, 32]),
            theta: raw.rope_theta.unwrap_or(2000.0),
            // diffusers' default is true (FLUX.2-dev); klein's configs say false.
            guidance_embed: raw.guidance_embeds.unwrap_or(true),
        };
        cfg.validate().map_err(bad)?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_sizes() {
        // The blocks hold nearly all of the parameters (the checkpoints' 4B and 9B count the
        // embedders and the shared modulations too: 0.2 and 0.3 billion more).
        for (cfg, range) in [
            (KleinConfig::klein_4b(), 3.5..4.0),
            (KleinConfig::klein_9b(), 8.5..9.0),
        ] {
            cfg.validate().unwrap();
            assert_eq!(cfg.head_dim(), 128);
            let b: u64 = cfg.block_params().iter().sum();
            let g = b as f64 / 1e9;
            assert!(range.contains(&g), "{g}");
        }
        KleinConfig::tiny().validate().unwrap();
    }

    #[test]
    fn diffusers_config() {
        let p = Path::new("transformer/config.json");
        let text = r#"{"_class_name": "Flux2Transformer2DModel", "attention_head_dim": 128,
            "axes_dims_rope": [32, 32, 32, 32], "eps": 1e-06, "guidance_embeds": false,
            "in_channels": 128, "joint_attention_dim": 7680, "mlp_ratio": 3.0,
            "num_attention_heads": 24, "num_layers": 5, "num_single_layers": 20,
            "out_channels": null, "patch_size": 1, "rope_theta": 2000,
            "timestep_guidance_channels": 256}"#;
        assert_eq!(
            KleinConfig::from_diffusers_str(text, p).unwrap(),
            KleinConfig::klein_4b()
        );
        assert!(KleinConfig::from_diffusers_str("{}", p).is_err());
        let odd = text.replace("[32, 32, 32, 32]", "[32, 32, 32, 30]");
        assert!(KleinConfig::from_diffusers_str(&odd, p).is_err());
    }
}
