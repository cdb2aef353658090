//! Ring sequence parallelism for attention.
//!
//! Each rank keeps its query shard and passes key/value shards around the ring: N - 1 times it
//! sends the block it holds to the next rank and computes attention of its queries against that
//! block while the next one arrives. Partial results merge exactly through their log-sum-exp:
//! `lse' = lse + ln(1 + e^(lse_b - lse))`, `out' = out - sigmoid(lse_b - lse) (out - out_b)`.
//! DiT attention is not causal, so no load balancing is needed. On CUDA in bf16 each block runs
//! through the fused attention kernel, which also writes the log-sum-exp the merge needs.
//!
//! With padded shards (token counts that do not divide, see [`super::sp`]) the blocks still travel
//! whole; each rank attends only to a block's real rows, and skips a block that is all padding.

use std::sync::Arc;

use candle_core::{Result, Tensor};

use super::comm::Communicator;
use super::shard::{real_keys, ShardLayout};
#[cfg(test)]
use crate::kernels::flash_attn::online_softmax_reference;
use crate::model::attention::{kernel_with_lse, Attention};

pub struct RingAttention {
    comm: Arc<dyn Communicator>,
    /// FP8 scores ([`crate::kernels::flash_attn_fp8`]), as the model was loaded: each rank's
    /// query shard and each key block are rounded in their own groups of 64 rows / 128 keys.
    fp8_scores: bool,
}

impl RingAttention {
    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        Self {
            comm,
            fp8_scores: false,
        }
    }

    /// With FP8 attention's scores (the model's load option) or exact.
    pub fn with_fp8_scores(mut self, on: bool) -> Self {
        self.fp8_scores = on;
        self
    }
}

/// Merge a partial result (`out_b`, `lse_b`) into (`out`, `lse`); all f32, lse (B, H, L).
pub fn merge(
    out: &Tensor,
    lse: &Tensor,
    out_b: &Tensor,
    lse_b: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let d = (lse_b - lse)?;
    // sigmoid(d) and softplus(d) = ln(1 + e^d), written to stay finite for large |d|.
    let w = candle_nn::ops::sigmoid(&d)?;
    let softplus = (d.relu()? + ((d.abs()?.neg()?.exp()? + 1.0)?.log()?))?;
    let lse_new = (lse + softplus)?;
    let out_new = (out - (out - out_b)?.broadcast_mul(&w.unsqueeze(3)?)?)?;
    Ok((out_new, lse_new))
}

impl RingAttention {
    /// Ring attention where each member's block holds the local sequences of `span`
    /// sequence-parallel ranks (member j: ranks `j * span ..`), laid out as `layout` says.
    pub(crate) fn run(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        layout: Option<&ShardLayout>,
        span: usize,
    ) -> Result<Tensor> {
        let n = self.comm.size();
        let rank = self.comm.rank();
        let dtype = q.dtype();
        let (next, prev) = ((rank + 1) % n, (rank + n - 1) % n);
        let (mut k, mut v) = (k.clone(), v.clone());
        let mut acc: Option<(Tensor, Tensor)> = None;
        for step in 0..n {
            // Pass the block on and take the previous rank's in one exchange (no send/recv
            // ordering deadlock where sends wait for their receivers, as with NCCL).
            let incoming = if step + 1 < n {
                Some(
                    self.comm
                        .exchange(&[(next, &k), (next, &v)], &[prev, prev])?,
                )
            } else {
                None
            };
            // The block held now started at member `rank - step`.
            let from = (rank + n - step) % n;
            // A block of nothing but padding adds nothing (and would merge as -inf): skip it.
            let block = real_keys(&k, &v, layout, from * span..(from + 1) * span)?;
            if let Some((kb, vb)) = block {
                // The fused kernel (with its log-sum-exp) on CUDA in bf16, else the f32 reference.
                let (o_b, lse_b) = kernel_with_lse(self.fp8_scores, q, &kb, &vb)?;
                acc = Some(match acc {
                    None => (o_b, lse_b),
                    Some((o, lse)) => merge(&o, &lse, &o_b, &lse_b)?,
                });
            }
            if let Some(mut kv) = incoming {
                match (kv.pop(), kv.pop()) {
                    (Some(nv), Some(nk)) => (k, v) = (nk, nv),
                    _ => candle_core::bail!("ring attention: the exchange lost a block"),
                }
            }
        }
        match acc {
            Some((o, _)) => o.to_dtype(dtype),
            None => candle_core::bail!("ring attention over an empty group (or only padding)"),
        }
    }
}

impl Attention for RingAttention {
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        self.run(q, k, v, None, 1)
    }

    fn attend_shards(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        layout: &ShardLayout,
    ) -> Result<Tensor> {
        self.run(q, k, v, Some(layout), 1)
    }

    fn name(&self) -> &str {
        if self.fp8_scores {
            "ring (FP8 scores)"
        } else {
            "ring"
        }
    }
    fn fp8_scores(&self) -> bool {
        self.fp8_scores
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rng::SplitMix64;
    use candle_core::{DType, Device};

    fn inputs(l: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let mut rng = SplitMix64::new(1);
        let dev = Device::Cpu;
        Ok((
            rng.normal_tensor((1, 4, l, 16), &dev)?,
            rng.normal_tensor((1, 4, l, 16), &dev)?,
            rng.normal_tensor((1, 4, l, 16), &dev)?,
        ))
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    }

    #[test]
    fn merge_is_exact_for_a_split_key_set() -> Result<()> {
        let (q, k, v) = inputs(40)?;
        let (o1, l1) =
            online_softmax_reference(&q, &k.narrow(2, 0, 15)?, &v.narrow(2, 0, 15)?, 64)?;
        let (o2, l2) =
            online_softmax_reference(&q, &k.narrow(2, 15, 25)?, &v.narrow(2, 15, 25)?, 64)?;
        let (o, l) = merge(&o1, &l1, &o2, &l2)?;
        let (ow, lw) = online_softmax_reference(&q, &k, &v, 64)?;
        assert!(max_diff(&o, &ow)? < 1e-5);
        assert!(max_diff(&l, &lw)? < 1e-4);
        assert_eq!(o.dtype(), DType::F32);
        Ok(())
    }
}
