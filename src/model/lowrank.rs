//! A low-rank path beside a linear layer (what a LoRA adds): `(x Aᵀ) Bᵀ` next to the layer's own
//! product, [`AdaptedLinear`] for a plain linear layer, and [`LowRankSource`], what a model asks
//! for the paths of its layers (a LoRA set, [`crate::model::lora::LoraSet`], answers it), so a
//! model family takes LoRAs without knowing their files.

use std::ops::Range;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::Linear;

/// The low-rank paths for a model's layers, by layer name (Black Forest Labs' names for FLUX).
pub trait LowRankSource {
    /// The path for rows `rows` of layer `layer`, in `dtype` on `device`; `None` when nothing is
    /// aimed there.
    fn low_rank(
        &self,
        layer: &str,
        rows: Range<usize>,
        dtype: DType,
        device: &Device,
    ) -> crate::Result<Option<LowRank>>;
}

/// A low-rank path beside a linear layer: adds `(x Aᵀ) Bᵀ`.
#[derive(Debug, Clone)]
pub struct LowRank {
    /// (rank, in)
    pub a: Tensor,
    /// (out, rank), strengths folded in.
    pub b: Tensor,
}

impl LowRank {
    /// `(x Aᵀ) Bᵀ` over the last axis of `x`.
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        x.broadcast_matmul(&self.a.t()?)?
            .broadcast_matmul(&self.b.t()?)
    }

    /// The weight it adds, `B A` (out, in).
    pub fn weight(&self) -> Result<Tensor> {
        self.b.matmul(&self.a)
    }

    /// `w + B A`, summed in f32 and returned in `w`'s dtype: the path merged into the weight.
    pub fn merged_into(&self, w: &Tensor) -> Result<Tensor> {
        (w.to_dtype(DType::F32)? + self.weight()?.to_dtype(DType::F32)?)?.to_dtype(w.dtype())
    }

    /// Bytes it holds.
    pub fn bytes(&self) -> usize {
        [&self.a, &self.b]
            .iter()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

/// A `candle_nn::Linear` with an optional low-rank path (the transformer's embedders and final
/// layer; the blocks' layers carry theirs in their own linear type).
#[derive(Debug, Clone)]
pub struct AdaptedLinear {
    pub base: Linear,
    pub lora: Option<LowRank>,
}

impl AdaptedLinear {
    pub fn new(base: Linear) -> Self {
        Self { base, lora: None }
    }
}

impl Module for AdaptedLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.base.forward(x)?;
        match &self.lora {
            Some(l) => y + l.delta(x)?,
            None => Ok(y),
        }
    }
}
