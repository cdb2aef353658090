//! FLUX.1's architecture hyper-parameters ([`FluxConfig`]): dev, schnell, and the tiny and demo
//! sizes the tests and the built-in model use.

use serde::{Deserialize, Serialize};

use crate::model::family::ParamCounts;

/// Channels of a packed FLUX.1 latent token (16 latent channels x 2x2), what the transformer
/// predicts.
pub const LATENT_CHANNELS: usize = 64;

/// A FLUX.1 Fill transformer's input channels: the packed noisy latent (64), the packed latent
/// of the source with the masked area zeroed (64) and the mask, each 8x8 pixel block made 64
/// channels, packed 2x2 (256).
pub const FILL_IN_CHANNELS: usize = 384;

/// Architecture hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FluxConfig {
    /// Input channels of a packed token: the latent's 16 channels x 2x2 patches (64), and for a
    /// FLUX.1 Fill checkpoint the conditioning after them ([`FILL_IN_CHANNELS`]).
    pub in_channels: usize,
    /// Pooled CLIP embedding width.
    pub vec_in_dim: usize,
    /// T5 embedding width.
    pub context_in_dim: usize,
    pub hidden_size: usize,
    pub mlp_ratio: f64,
    pub num_heads: usize,
    /// Double-stream blocks.
    pub depth: usize,
    /// Single-stream blocks.
    pub depth_single_blocks: usize,
    /// RoPE dimensions per position axis (text index, row, column); they sum to the head dim.
    pub axes_dim: Vec<usize>,
    pub theta: f64,
    pub qkv_bias: bool,
    /// FLUX.1-dev distils guidance into an embedding; schnell does not.
    pub guidance_embed: bool,
}

impl FluxConfig {
    pub fn dev() -> Self {
        Self {
            in_channels: 64,
            vec_in_dim: 768,
            context_in_dim: 4096,
            hidden_size: 3072,
            mlp_ratio: 4.0,
            num_heads: 24,
            depth: 19,
            depth_single_blocks: 38,
            axes_dim: vec![16, 56, 56],
            theta: 10_000.0,
            qkv_bias: true,
            guidance_embed: true,
        }
    }

    pub fn schnell() -> Self {
        Self {
            guidance_embed: false,
            ..Self::dev()
        }
    }

    /// A small model with FLUX's structure and made-up weights, for tests (`random:tiny`): 2 heads
    /// of 64, 2 double and 4 single blocks, text widths matching the demo text encoders.
    pub fn tiny() -> Self {
        Self {
            in_channels: 64,
            vec_in_dim: crate::model::text::DEMO_CLIP_DIM,
            context_in_dim: crate::model::text::DEMO_T5_DIM,
            hidden_size: 128,
            mlp_ratio: 4.0,
            num_heads: 2,
            depth: 2,
            depth_single_blocks: 4,
            axes_dim: vec![8, 28, 28],
            theta: 10_000.0,
            qkv_bias: true,
            guidance_embed: true,
        }
    }

    /// The trained demo model (`--model demo`, weights in `assets/demo/`): 2 heads of 64, 2 double
    /// and 6 single blocks, guidance embedded like FLUX.1-dev.
    pub fn demo() -> Self {
        Self {
            depth_single_blocks: 6,
            ..Self::tiny()
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    pub fn mlp_hidden(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio) as usize
    }

    /// Channels the transformer predicts per token: the latent's (a Fill checkpoint's extra
    /// input channels are conditioning only).
    pub fn out_channels(&self) -> usize {
        self.in_channels.min(LATENT_CHANNELS)
    }

    /// Input channels after the latent's: the conditioning a Fill checkpoint takes (0 for a
    /// plain text-to-image checkpoint).
    pub fn cond_channels(&self) -> usize {
        self.in_channels - self.out_channels()
    }

    /// Whether this is a FLUX.1 Fill checkpoint (inpainting with the mask as an input).
    pub fn is_fill(&self) -> bool {
        self.in_channels == FILL_IN_CHANNELS
    }

    /// Total blocks, double then single, as indexed by [`super::Flux::run_blocks`].
    pub fn num_blocks(&self) -> usize {
        self.depth + self.depth_single_blocks
    }

    /// Check internal consistency (used on configs read from files).
    pub fn validate(&self) -> std::result::Result<(), String> {
        crate::model::step::check_heads_and_rope(self.hidden_size, self.num_heads, &self.axes_dim)?;
        if self.in_channels == 0 || self.depth + self.depth_single_blocks == 0 {
            return Err("model has no input channels or no blocks".into());
        }
        Ok(())
    }
}

impl FluxConfig {
    /// Floating-point operations of one transformer pass over `txt_len` text and `img_len` image
    /// tokens (batch 1): every linear layer (2 FLOP per multiply-add) plus the attention products
    /// (Q Kᵀ and P V). Modulation and embedding layers (per image, not per token) are left out.
    pub fn flops_per_step(&self, txt_len: usize, img_len: usize) -> f64 {
        let h = self.hidden_size as f64;
        let mlp = self.mlp_hidden() as f64;
        let l = (txt_len + img_len) as f64;
        // Double block, per token of either stream: qkv 3h², proj h², MLP 2·h·mlp.
        let double = 2.0 * (4.0 * h * h + 2.0 * h * mlp);
        // Single block: linear1 h·(3h + mlp), linear2 (h + mlp)·h.
        let single = 2.0 * (h * (3.0 * h + mlp) + (h + mlp) * h);
        let linear = l * (self.depth as f64 * double + self.depth_single_blocks as f64 * single);
        let attention = self.num_blocks() as f64 * 4.0 * l * l * h;
        let io = 2.0 * img_len as f64 * self.in_channels as f64 * h * 2.0
            + 2.0 * txt_len as f64 * self.context_in_dim as f64 * h;
        linear + attention + io
    }

    /// Parameters of each block in the unified numbering (double blocks first): products,
    /// modulations, biases and norms ([`FluxConfig::block_param_counts`] totalled).
    pub fn block_params(&self) -> Vec<u64> {
        self.block_param_counts()
            .iter()
            .map(ParamCounts::total)
            .collect()
    }

    /// FLUX.1's parameter formula, by kind, for each block in the unified numbering (double
    /// blocks first).
    pub fn block_param_counts(&self) -> Vec<ParamCounts> {
        let h = self.hidden_size as u64;
        let mlp = self.mlp_hidden() as u64;
        let head = (self.hidden_size / self.num_heads.max(1)) as u64;
        // A double block, per stream: qkv, proj, fc1, fc2 (with biases), a 6-way modulation,
        // two QK norms.
        let double_rows = 2 * (3 * h + h + mlp + h);
        let double = ParamCounts {
            products: 2 * (h * 3 * h + h * h + h * mlp + mlp * h),
            product_rows: double_rows,
            modulations: 2 * h * 6 * h,
            modulation_rows: 2 * 6 * h,
            other: double_rows + 4 * head + 2 * 6 * h,
        };
        // A single block: linear1 (qkv and MLP in), linear2, a 3-way modulation, QK norms.
        let single_rows = 3 * h + mlp + h;
        let single = ParamCounts {
            products: h * (3 * h + mlp) + (h + mlp) * h,
            product_rows: single_rows,
            modulations: h * 3 * h,
            modulation_rows: 3 * h,
            other: single_rows + 2 * head + 3 * h,
        };
        std::iter::repeat_n(double, self.depth)
            .chain(std::iter::repeat_n(single, self.depth_single_blocks))
            .collect()
    }

    /// Parameters outside the blocks (input, timestep, guidance and text embedders, the final
    /// layer): every pipeline stage holds them.
    pub fn outside_param_counts(&self) -> ParamCounts {
        let h = self.hidden_size as u64;
        let embed = |i: u64| i * h + h + h * h + h;
        let channels = self.in_channels as u64;
        ParamCounts {
            other: (channels * h + h)
                + (self.context_in_dim as u64 * h + h)
                + embed(256)
                + embed(self.vec_in_dim as u64)
                + if self.guidance_embed { embed(256) } else { 0 }
                + (h * channels + channels)
                + (h * 2 * h + 2 * h),
            ..Default::default()
        }
    }

    /// The parameters a device holding only `blocks` (of the unified numbering) keeps: those
    /// blocks and everything outside the blocks.
    pub fn param_counts_of(&self, blocks: std::ops::Range<usize>) -> ParamCounts {
        ParamCounts::held(
            &self.block_param_counts(),
            self.outside_param_counts(),
            blocks,
        )
    }
}
