//! Ulysses sequence parallelism for attention.
//!
//! Each rank holds a contiguous shard of the joint sequence for all heads: (B, H, L/N, D). One
//! all-to-all (q, k and v stacked) trades sequence shards for head shards, (B, H/N, L, D); each rank runs ordinary
//! attention on its heads over the whole sequence; a second all-to-all trades back. Exact: the
//! same arithmetic as one device, only the heads are spread. The degree must divide the heads;
//! the sequence shards are equal (padded when the token counts do not divide, see
//! [`super::sp`]), and with padding the gathered keys and values keep only their real rows.

use std::sync::Arc;

use candle_core::{Result, Tensor};

use super::comm::Communicator;
use super::shard::ShardLayout;
use crate::model::attention::Attention;

pub struct UlyssesAttention {
    comm: Arc<dyn Communicator>,
    /// FP8 scores ([`crate::kernels::flash_attn_fp8`]), as the model was loaded.
    fp8_scores: bool,
}

impl UlyssesAttention {
    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        Self {
            comm,
            fp8_scores: false,
        }
    }

    /// With FP8 attention's scores (the model's load option) or exact.
    pub fn with_fp8_scores(self, on: bool) -> Self {
        Self {
            fp8_scores: on,
            ..self
        }
    }
}

/// q, k and v traded from sequence shards to head shards in one all-to-all (not three: at 4-8
/// GPUs a collective's per-call latency, not its bytes, sets its cost): stacked along the batch
/// dimension, which the exchange leaves alone, then split again. The same values move.
pub(crate) fn all_to_all_qkv(
    comm: &dyn Communicator,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let b = q.dim(0)?;
    let qkv = Tensor::cat(&[q, k, v], 0)?;
    let qkv = comm.all_to_all(&qkv, 1, 2)?;
    Ok((
        qkv.narrow(0, 0, b)?,
        qkv.narrow(0, b, b)?,
        qkv.narrow(0, 2 * b, b)?,
    ))
}

/// Attention of `q` to the real keys of the local sequences of `ranks` (all of `k` without a
/// padded layout), with FP8 scores when `fp8` says.
///
/// FP8 scores round Q and K in groups of 64 query rows and 128 keys along the sequence each
/// call holds (per batch and head). Here that sequence is the group's local sequences end to
/// end, `[text shard; image shard]` of rank 0, then rank 1's, ..., padding left out of the keys:
/// where each shard's text and image rows are whole multiples of 128 (FLUX.1 at 1024 px over 2
/// or 4 ranks) the groups hold the same rows as one device's and only the summation order
/// differs; elsewhere some groups mix other rows, so their scales and roundings differ from one
/// device's by FP8's own rounding (`crate::parallel::exactness` measures both).
fn attend_real(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    layout: Option<&ShardLayout>,
    ranks: std::ops::Range<usize>,
    fp8: bool,
) -> Result<Tensor> {
    match super::shard::real_keys(k, v, layout, ranks)? {
        Some((k, v)) => crate::model::attention::kernel(fp8, q, &k, &v),
        None => candle_core::bail!("sequence parallelism: every key is padding"),
    }
}

impl UlyssesAttention {
    fn run(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        layout: Option<&ShardLayout>,
    ) -> Result<Tensor> {
        let n = self.comm.size();
        if n == 1 {
            return attend_real(q, k, v, layout, 0..1, self.fp8_scores);
        }
        let heads = q.dim(1)?;
        if heads % n != 0 {
            candle_core::bail!("Ulysses degree {n} does not divide {heads} heads");
        }
        // (B, H, L/N, D) -> (B, H/N, L, D): scatter heads, gather sequence.
        let (q, k, v) = all_to_all_qkv(self.comm.as_ref(), q, k, v)?;
        // The whole group's sequence: its real keys only.
        let out = attend_real(&q, &k, &v, layout, 0..n, self.fp8_scores)?;
        // Back: scatter sequence, gather heads.
        self.comm.all_to_all(&out, 2, 1)
    }
}

impl Attention for UlyssesAttention {
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        self.run(q, k, v, None)
    }

    fn attend_shards(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        layout: &ShardLayout,
    ) -> Result<Tensor> {
        self.run(q, k, v, Some(layout))
    }

    fn name(&self) -> &str {
        if self.fp8_scores {
            "ulysses (FP8 scores)"
        } else {
            "ulysses"
        }
    }
    fn fp8_scores(&self) -> bool {
        self.fp8_scores
    }
}
