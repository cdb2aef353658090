//! The one attention function every FLUX block calls.
//!
//! Blocks hand it Q, K and V for the joint text+image sequence, already QK-normed and rotated,
//! as (batch, heads, tokens, head_dim). A parallel strategy (Ulysses, Ring, ...) replaces the
//! implementation; the model code never changes. Under sequence parallelism with padded shards the
//! blocks call [`Attention::attend_shards`] instead, which leaves padded keys out.

use candle_core::{Result, Tensor};

pub use crate::kernels::reference::sdpa_chunked;
use crate::model::shard::ShardLayout;

/// Scaled dot-product attention over (B, H, L, D) tensors, non-causal.
pub trait Attention: Send + Sync {
    /// softmax(Q Kᵀ / √d) V, returning (B, H, Lq, D).
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor>;
    /// The same with heads merged, (B, Lq, H·D): what the output projection takes. Strategies
    /// whose kernel can write that layout directly override it to skip the transpose copy.
    fn attend_merged(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        crate::kernels::flash_attn::merge_heads(&self.attend(q, k, v)?)
    }
    /// [`Attention::attend`] for one rank of a sequence-parallel group whose shards are laid
    /// out as `layout` says, padding included: padded keys take no part, and what padded
    /// queries get is unspecified (their rows are dropped later). Sequence-parallel strategies
    /// override it; the default serves layouts without padding only.
    fn attend_shards(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        layout: &ShardLayout,
    ) -> Result<Tensor> {
        if layout.is_padded() {
            candle_core::bail!(
                "{} attention cannot leave out padded keys (sequence-parallel strategies can)",
                self.name()
            );
        }
        self.attend(q, k, v)
    }
    /// Attention for the transformer's block `layer` (0-based, double blocks first), heads
    /// merged, `layout` when the sequence is sharded: what every block calls. Strategies that
    /// keep state per layer across steps (displaced patches) override it; the default forgets
    /// the layer.
    fn attend_layer(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        layout: Option<&ShardLayout>,
    ) -> Result<Tensor> {
        let _ = layer;
        match layout {
            Some(l) if l.is_padded() => {
                crate::kernels::flash_attn::merge_heads(&self.attend_shards(q, k, v, l)?)
            }
            _ => self.attend_merged(q, k, v),
        }
    }
    /// A short name for logs and `info`.
    fn name(&self) -> &str;
    /// Whether the scores come from E4M3 queries and keys (FP8 attention,
    /// [`crate::kernels::flash_attn_fp8`]); exact attention says no.
    fn fp8_scores(&self) -> bool {
        false
    }
}

/// The fused attention kernel over a shard's (B, H, L, D) tensors, with FP8 scores or exact:
/// what the sequence-parallel strategies call on their share (each rank's groups of 64 query
/// rows and 128 keys are taken along the sequence it holds; see `crate::parallel::ulysses`).
pub fn kernel(fp8_scores: bool, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    if fp8_scores {
        crate::kernels::flash_attn_fp8::attention(q, k, v)
    } else {
        crate::kernels::flash_attn::attention(q, k, v)
    }
}

/// [`kernel`] with each query's log-sum-exp, both in f32 (what ring attention merges with).
pub fn kernel_with_lse(
    fp8_scores: bool,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<(Tensor, Tensor)> {
    if fp8_scores {
        crate::kernels::flash_attn_fp8::attention_with_lse(q, k, v)
    } else {
        crate::kernels::flash_attn::attention_with_lse(q, k, v)
    }
}

/// Attention on one device: Parallax's fused kernel where it applies (CUDA, bf16; see
/// [`crate::kernels::flash_attn`]), else plain attention over chunks of `query_chunk` queries, so
/// the score matrix held at once is at most `query_chunk` x L per head, never L x L.
#[derive(Debug, Clone)]
pub struct LocalAttention {
    pub query_chunk: usize,
    /// Use the fused kernel when it applies (on by default; off to compare).
    pub fused: bool,
    /// Scores from E4M3 queries and keys ([`crate::kernels::flash_attn_fp8`]): an approximation,
    /// off by default (the load option `fp8_attention`, `--fp8-attention`, turns it on).
    pub fp8_scores: bool,
}

impl Default for LocalAttention {
    fn default() -> Self {
        Self {
            query_chunk: 1024,
            fused: std::env::var_os("PARALLAX_NO_FUSED_ATTENTION").is_none(),
            fp8_scores: false,
        }
    }
}

impl Attention for LocalAttention {
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        if self.fp8_scores {
            return crate::kernels::flash_attn_fp8::attention(q, k, v);
        }
        if self.fused && crate::kernels::flash_attn::kernel_supports(q) {
            return crate::kernels::flash_attn::attention(q, k, v);
        }
        sdpa_chunked(q, k, v, self.query_chunk)
    }
    fn attend_merged(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        if self.fp8_scores {
            return crate::kernels::flash_attn_fp8::attention_merged(q, k, v);
        }
        if self.fused && crate::kernels::flash_attn::kernel_supports(q) {
            return crate::kernels::flash_attn::attention_merged(q, k, v);
        }
        crate::kernels::flash_attn::merge_heads(&sdpa_chunked(q, k, v, self.query_chunk)?)
    }
    fn name(&self) -> &str {
        if self.fp8_scores {
            "local (FP8 scores)"
        } else if self.fused {
            "local (fused kernel on CUDA bf16)"
        } else {
            "local"
        }
    }
    fn fp8_scores(&self) -> bool {
        self.fp8_scores
    }
}
