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
use super::sp::{real_keys, ShardLayout};
use crate::kernels::flash_attn::attention_with_lse;
#[cfg(test)]
use crate::kernels::flash_attn::online_softmax_reference;
use crate::model::attention::Attention;

pub struct RingAttention {
    comm: Arc<dyn Communicator>,
}

impl RingAttention {
    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        Self { comm }
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
                let (o_b, lse_b) = attention_with_lse(q, &kb, &vb)?;
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
        "ring"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::attention::sdpa_chunked;
    use crate::parallel::comm::{run_local, LocalComm};
    use crate::parallel::ulysses::{UlyssesAttention, UspAttention};
    use candle_core::{DType, Device};

    fn inputs(l: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let dev = Device::Cpu;
        Ok((
            Tensor::randn(0f32, 1.0, (1, 4, l, 16), &dev)?,
            Tensor::randn(0f32, 1.0, (1, 4, l, 16), &dev)?,
            Tensor::randn(0f32, 1.0, (1, 4, l, 16), &dev)?,
        ))
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    }

    /// Shard along the sequence, run `make(comm)` on every rank, gather, compare with one device.
    fn check(
        n: usize,
        make: impl Fn(Arc<dyn Communicator>) -> Box<dyn Attention> + Sync,
    ) -> Result<f32> {
        let l = 24 * n;
        let (q, k, v) = inputs(l)?;
        let want = sdpa_chunked(&q, &k, &v, 1 << 20)?;
        let shard = l / n;
        let outs = run_local(n, |rank, comm| {
            let comm: Arc<dyn Communicator> = Arc::new(comm);
            let attn = make(comm.clone());
            let part = |t: &Tensor| t.narrow(2, rank * shard, shard);
            let o = attn.attend(&part(&q)?, &part(&k)?, &part(&v)?)?;
            comm.all_gather(&o, 2)
        })?;
        let mut worst = 0f32;
        for o in &outs {
            worst = worst.max(max_diff(o, &want)?);
        }
        Ok(worst)
    }

    #[test]
    fn ring_attention_matches_one_device() -> Result<()> {
        for n in [2, 4] {
            let d = check(n, |c| Box::new(RingAttention::new(c)))?;
            assert!(d < 1e-5, "ring {n}: {d}");
        }
        Ok(())
    }

    #[test]
    fn ulysses_attention_matches_one_device() -> Result<()> {
        for n in [2, 4] {
            let d = check(n, |c| Box::new(UlyssesAttention::new(c)))?;
            assert!(d < 1e-5, "ulysses {n}: {d}");
        }
        Ok(())
    }

    /// `real` (B, H, L, D), rows in the order [`ShardLayout::real_runs`] lists them, spread over
    /// the group's padded local sequences end to end, with NaN in every padding row.
    fn with_padding(real: &Tensor, l: &ShardLayout) -> Result<Tensor> {
        let (b, h, _, d) = real.dims4()?;
        let nan = Tensor::full(f32::NAN, (b, h, 1, d), real.device())?;
        let mut rows = Vec::new();
        let mut next = 0;
        let mut at = 0;
        for (start, len) in l.real_runs(0..l.ranks) {
            rows.extend(std::iter::repeat_n(nan.clone(), start - at));
            rows.push(real.narrow(2, next, len)?);
            next += len;
            at = start + len;
        }
        rows.extend(std::iter::repeat_n(nan, l.ranks * l.local_len() - at));
        Tensor::cat(&rows, 2)
    }

    #[test]
    fn padded_keys_take_no_part_in_any_strategy() -> Result<()> {
        // 5 text and 6 image tokens over 4 ranks: shards of 2 + 2, rank 3 all padding. Padding
        // rows are NaN: one that reached a real token would show.
        let (q, k, v) = inputs(11)?;
        let want = sdpa_chunked(&q, &k, &v, 1 << 20)?;
        let layout = ShardLayout::new(5, 6, 4, 0)?;
        let (qp, kp, vp) = (
            with_padding(&q, &layout)?,
            with_padding(&k, &layout)?,
            with_padding(&v, &layout)?,
        );
        let len = layout.local_len();
        let uly: Vec<Vec<LocalComm>> = (0..2).map(|_| LocalComm::group(2)).collect();
        let ring: Vec<Vec<LocalComm>> = (0..2).map(|_| LocalComm::group(2)).collect();
        for strategy in ["ring", "ulysses", "usp"] {
            let outs = run_local(4, |rank, comm| {
                let comm: Arc<dyn Communicator> = Arc::new(comm);
                let attn: Box<dyn Attention> = match strategy {
                    "ring" => Box::new(RingAttention::new(comm.clone())),
                    "usp" => Box::new(UspAttention::new(
                        Arc::new(uly[rank / 2][rank % 2].clone()),
                        Arc::new(ring[rank % 2][rank / 2].clone()),
                    )),
                    _ => Box::new(UlyssesAttention::new(comm.clone())),
                };
                let part = |t: &Tensor| t.narrow(2, rank * len, len);
                let l = ShardLayout { rank, ..layout };
                let o = attn.attend_shards(&part(&qp)?, &part(&kp)?, &part(&vp)?, &l)?;
                comm.all_gather(&o, 2)
            })?;
            for o in &outs {
                let real = layout
                    .real_rows(o, 2, 0..4)?
                    .ok_or_else(|| candle_core::Error::Msg("no real rows".into()))?;
                let d = max_diff(&real, &want)?;
                assert!(d < 1e-5, "{strategy}: {d}");
            }
        }
        // Plain attention cannot skip padding, and says so rather than attending to it.
        let local = crate::model::attention::LocalAttention::default();
        assert!(local.attend_shards(&qp, &kp, &vp, &layout).is_err());
        Ok(())
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
