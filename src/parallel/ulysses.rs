//! Ulysses sequence parallelism for attention.
//!
//! Each rank holds a contiguous shard of the joint sequence for all heads: (B, H, L/N, D). An
//! all-to-all trades sequence shards for head shards, (B, H/N, L, D); each rank runs ordinary
//! attention on its heads over the whole sequence; a second all-to-all trades back. Exact: the
//! same arithmetic as one device, only the heads are spread. The degree must divide the heads
//! and the (padded) sequence.

use std::sync::Arc;

use candle_core::{Result, Tensor};

use super::comm::Communicator;
use crate::model::attention::Attention;

pub struct UlyssesAttention {
    comm: Arc<dyn Communicator>,
}

impl UlyssesAttention {
    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        Self { comm }
    }
}

impl Attention for UlyssesAttention {
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let n = self.comm.size();
        if n == 1 {
            return crate::kernels::flash_attn::attention(q, k, v);
        }
        let heads = q.dim(1)?;
        if heads % n != 0 {
            candle_core::bail!("Ulysses degree {n} does not divide {heads} heads");
        }
        // (B, H, L/N, D) -> (B, H/N, L, D): scatter heads, gather sequence.
        let q = self.comm.all_to_all(q, 1, 2)?;
        let k = self.comm.all_to_all(k, 1, 2)?;
        let v = self.comm.all_to_all(v, 1, 2)?;
        let out = crate::kernels::flash_attn::attention(&q, &k, &v)?;
        // Back: scatter sequence, gather heads.
        self.comm.all_to_all(&out, 2, 1)
    }

    fn name(&self) -> &str {
        "ulysses"
    }
}

/// USP: Ulysses inside a group, Ring across groups (ulysses x ring = sequence-parallel degree).
/// Queries, keys and values are traded for head shards within the Ulysses group, the Ring passes
/// key/value blocks between groups, and a last all-to-all trades back.
pub struct UspAttention {
    ulysses: Arc<dyn Communicator>,
    ring: super::ring::RingAttention,
}

impl UspAttention {
    pub fn new(ulysses: Arc<dyn Communicator>, ring: Arc<dyn Communicator>) -> Self {
        Self {
            ulysses,
            ring: super::ring::RingAttention::new(ring),
        }
    }
}

impl Attention for UspAttention {
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let n = self.ulysses.size();
        if n == 1 {
            return self.ring.attend(q, k, v);
        }
        let q = self.ulysses.all_to_all(q, 1, 2)?;
        let k = self.ulysses.all_to_all(k, 1, 2)?;
        let v = self.ulysses.all_to_all(v, 1, 2)?;
        let out = self.ring.attend(&q, &k, &v)?;
        self.ulysses.all_to_all(&out, 2, 1)
    }

    fn name(&self) -> &str {
        "usp"
    }
}
