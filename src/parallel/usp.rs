//! USP, unified sequence parallelism for attention: Ulysses inside a group of ranks, Ring across
//! the groups, for degrees past the head count or links too slow for one all-to-all over all
//! ranks. Exact, as both of its parts are.

use std::sync::Arc;

use candle_core::{Result, Tensor};

use super::comm::Communicator;
use super::ring::RingAttention;
use super::shard::ShardLayout;
use super::ulysses::all_to_all_qkv;
use crate::model::attention::Attention;

/// USP: Ulysses inside a group, Ring across groups (ulysses x ring = sequence-parallel degree).
/// Queries, keys and values are traded for head shards within the Ulysses group, the Ring passes
/// key/value blocks between groups, and a last all-to-all trades back. Sequence-parallel rank
/// `ring_rank * ulysses + ulysses_rank` (the mesh numbers Ulysses innermost), so ring member j's
/// block is the local sequences of sequence-parallel ranks `j * ulysses ..`.
pub struct UspAttention {
    ulysses: Arc<dyn Communicator>,
    ring: RingAttention,
}

impl UspAttention {
    pub fn new(ulysses: Arc<dyn Communicator>, ring: Arc<dyn Communicator>) -> Self {
        Self {
            ulysses,
            ring: RingAttention::new(ring),
        }
    }

    /// With FP8 attention's scores (the model's load option) or exact: the ring's blocks are
    /// what each call rounds (the Ulysses group's sequences end to end, see
    /// [`super::ring::RingAttention::with_fp8_scores`]).
    pub fn with_fp8_scores(mut self, on: bool) -> Self {
        self.ring = self.ring.with_fp8_scores(on);
        self
    }

    fn run(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        layout: Option<&ShardLayout>,
    ) -> Result<Tensor> {
        let n = self.ulysses.size();
        if n == 1 {
            return self.ring.run(q, k, v, layout, 1);
        }
        let (q, k, v) = all_to_all_qkv(self.ulysses.as_ref(), q, k, v)?;
        let out = self.ring.run(&q, &k, &v, layout, n)?;
        self.ulysses.all_to_all(&out, 2, 1)
    }
}

impl Attention for UspAttention {
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
        if self.ring.fp8_scores() {
            "usp (FP8 scores)"
        } else {
            "usp"
        }
    }
    fn fp8_scores(&self) -> bool {
        self.ring.fp8_scores()
    }
}
