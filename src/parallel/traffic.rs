//! What a parallel strategy sends: bytes counted on a live group ([`Counting`], a communicator
//! that tallies what its rank sends and hands everything on) and predicted for FLUX's shapes
//! ([`attention_bytes_per_step`]), the two checked against each other in the tests. Counted
//! as data leaving a rank, not timed: what a link must carry, whatever its speed.
//!
//! Per collective, one rank sends: all-gather `(n-1)·|t|`; all-to-all `(n-1)/n·|t|`; all-reduce
//! `2(n-1)/n·|t|` (the ring algorithm's share); broadcast `(n-1)·|t|` from the root; send and
//! exchange `|t|` per tensor.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{Result, Tensor};

use crate::collective::Communicator;

/// A communicator that counts the bytes its rank sends.
pub struct Counting {
    inner: Arc<dyn Communicator>,
    sent: AtomicU64,
}

impl Counting {
    pub fn new(inner: Arc<dyn Communicator>) -> Self {
        Self {
            inner,
            sent: AtomicU64::new(0),
        }
    }

    /// Bytes this rank has sent so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn add(&self, t: &Tensor, num: usize, den: usize) {
        let bytes = (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        self.sent
            .fetch_add(bytes * num as u64 / den.max(1) as u64, Ordering::Relaxed);
    }
}

impl Communicator for Counting {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        self.add(t, self.size() - 1, 1);
        self.inner.all_gather(t, dim)
    }
    fn all_to_all(&self, t: &Tensor, scatter_dim: usize, gather_dim: usize) -> Result<Tensor> {
        let n = self.size();
        self.add(t, n - 1, n);
        self.inner.all_to_all(t, scatter_dim, gather_dim)
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let n = self.size();
        self.add(t, 2 * (n - 1), n);
        self.inner.all_reduce_sum(t)
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        if self.rank() == root {
            self.add(t, self.size() - 1, 1);
        }
        self.inner.broadcast(t, root)
    }
    fn send(&self, t: &Tensor, to: usize) -> Result<()> {
        self.add(t, 1, 1);
        self.inner.send(t, to)
    }
    fn recv(&self, from: usize) -> Result<Tensor> {
        self.inner.recv(from)
    }
    fn exchange(&self, sends: &[(usize, &Tensor)], recv_from: &[usize]) -> Result<Vec<Tensor>> {
        for (_, t) in sends {
            self.add(t, 1, 1);
        }
        self.inner.exchange(sends, recv_from)
    }
    fn abort(&self, why: &str) {
        self.inner.abort(why)
    }
}

/// Sequence-parallel attention strategies whose traffic [`attention_bytes_per_step`] predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpStrategy {
    /// All-to-all of q, k, v to head shards, and of the output back.
    Ulysses,
    /// Each rank's k and v passed around the ring, n - 1 hops.
    Ring,
    /// Displaced patches after warm-up: each rank's k and v gathered by every other rank, in the
    /// background (the step does not wait for them).
    Displaced,
}

/// Bytes one rank sends for attention in one denoising step: `layers` attention calls over a
/// joint sequence of `tokens` (text + image), `hidden` wide, `elem` bytes a value, on `n` ranks.
/// (The per-step extras — gathering the output latent, a cache decision's two sums — are small
/// beside it and left out.)
pub fn attention_bytes_per_step(
    strategy: SpStrategy,
    n: usize,
    layers: usize,
    tokens: usize,
    hidden: usize,
    elem: usize,
) -> u64 {
    if n <= 1 {
        return 0;
    }
    // One rank's share of one of q, k, v (or the output): tokens / n rows of `hidden`.
    let shard = (tokens / n * hidden * elem) as u64;
    let per_layer = match strategy {
        SpStrategy::Ulysses => 4 * shard * (n as u64 - 1) / n as u64,
        SpStrategy::Ring | SpStrategy::Displaced => 2 * shard * (n as u64 - 1),
    };
    per_layer * layers as u64
}

/// Bytes PipeFusion's stage `stage` of `stages` sends in one step: every stage but the last
/// passes each patch's two token streams (`tokens` rows in all, padding included, `hidden` wide,
/// `elem` bytes a value) to the next stage once; the last broadcasts the velocity (`img_tokens`
/// x `out_channels` values of `out_elem` bytes) to the others. Nothing depends on the layer
/// count: the K/V a patch reads stay on its stage.
pub fn pipefusion_bytes_per_step(
    stages: usize,
    stage: usize,
    tokens: usize,
    hidden: usize,
    elem: usize,
    (img_tokens, out_channels, out_elem): (usize, usize, usize),
) -> u64 {
    if stages <= 1 {
        0
    } else if stage + 1 < stages {
        (tokens * hidden * elem) as u64
    } else {
        ((stages - 1) * img_tokens * out_channels * out_elem) as u64
    }
}
