//! The one attention function every FLUX block calls.
//!
//! Blocks hand it Q, K and V for the joint text+image sequence, already QK-normed and rotated,
//! as (batch, heads, tokens, head_dim). A parallel strategy (Ulysses, Ring, ...) replaces the
//! implementation; the model code never changes. Under sequence parallelism with padded shards the
//! blocks call [`Attention::attend_shards`] instead, which leaves padded keys out.

use candle_core::{DType, Result, Tensor, D};

use crate::parallel::sp::ShardLayout;

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
    /// A short name for logs and `info`.
    fn name(&self) -> &str;
}

/// Attention on one device: Parallax's fused kernel where it applies (CUDA, bf16; see
/// [`crate::kernels::flash_attn`]), else plain attention over chunks of `query_chunk` queries, so
/// the score matrix held at once is at most `query_chunk` x L per head, never L x L.
#[derive(Debug, Clone)]
pub struct LocalAttention {
    pub query_chunk: usize,
    /// Use the fused kernel when it applies (on by default; off to compare).
    pub fused: bool,
}

impl Default for LocalAttention {
    fn default() -> Self {
        Self {
            query_chunk: 1024,
            fused: std::env::var_os("PARALLAX_NO_FUSED_ATTENTION").is_none(),
        }
    }
}

impl Attention for LocalAttention {
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        if self.fused && crate::kernels::flash_attn::kernel_supports(q) {
            return crate::kernels::flash_attn::attention(q, k, v);
        }
        sdpa_chunked(q, k, v, self.query_chunk)
    }
    fn attend_merged(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        if self.fused && crate::kernels::flash_attn::kernel_supports(q) {
            return crate::kernels::flash_attn::attention_merged(q, k, v);
        }
        crate::kernels::flash_attn::merge_heads(&sdpa_chunked(q, k, v, self.query_chunk)?)
    }
    fn name(&self) -> &str {
        if self.fused {
            "local (fused kernel on CUDA bf16)"
        } else {
            "local"
        }
    }
}

/// softmax(Q Kᵀ / √d) V, over chunks of `chunk` queries.
pub fn sdpa_chunked(q: &Tensor, k: &Tensor, v: &Tensor, chunk: usize) -> Result<Tensor> {
    let (_, _, lq, d) = q.dims4()?;
    let scale = 1.0 / (d as f64).sqrt();
    let kt = k.transpose(D::Minus2, D::Minus1)?.contiguous()?;
    let v = v.contiguous()?;
    let chunk = chunk.max(1);
    let mut outs = Vec::with_capacity(lq.div_ceil(chunk));
    let mut start = 0;
    while start < lq {
        let n = chunk.min(lq - start);
        let qc = q.narrow(2, start, n)?.contiguous()?;
        let scores = (qc.matmul(&kt)? * scale)?;
        // candle's CPU softmax sums in the input dtype, which loses most of a long bf16/f16 row
        // (relative error ~1 at 4608 keys): take it in f32 there. GPU kernels accumulate in f32.
        let p = if scores.device().is_cpu() && scores.dtype() != DType::F32 {
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
                .to_dtype(scores.dtype())?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        outs.push(p.matmul(&v)?);
        start += n;
    }
    if outs.len() == 1 {
        return Ok(outs.remove(0));
    }
    Tensor::cat(&outs, 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn chunked_equals_unchunked() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 37, 16), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, 2, 37, 16), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, 2, 37, 16), &dev)?;
        let a = sdpa_chunked(&q, &k, &v, 1000)?;
        let b = sdpa_chunked(&q, &k, &v, 5)?;
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        // Against the textbook formula.
        let s = (q.matmul(&k.t()?)? / 4.0)?;
        let p = candle_nn::ops::softmax(&s, D::Minus1)?;
        let c = p.matmul(&v)?;
        let diff = (sdpa_chunked(&q, &k, &v, 8)? - c)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    #[test]
    fn half_precision_on_cpu_stays_accurate_for_long_rows() -> Result<()> {
        // 3000 keys: a softmax summed in bf16 would be off by ~100%.
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 40, 64), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, 2, 3000, 64), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, 2, 3000, 64), &dev)?;
        let bf = |t: &Tensor| t.to_dtype(DType::BF16);
        let out = sdpa_chunked(&bf(&q)?, &bf(&k)?, &bf(&v)?, 16)?.to_dtype(DType::F32)?;
        let reference = sdpa_chunked(
            &bf(&q)?.to_dtype(DType::F32)?,
            &bf(&k)?.to_dtype(DType::F32)?,
            &bf(&v)?.to_dtype(DType::F32)?,
            16,
        )?;
        let num = (&out - &reference)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()?
            .sqrt();
        let den = reference.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
        assert!(num / den < 2e-2, "relative error {}", num / den);
        Ok(())
    }
}
