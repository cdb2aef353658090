//! The [`Communicator`] trait: the collectives (all-gather, all-to-all, all-reduce, broadcast,
//! send/recv) by which workers exchange tensors. It sits on the bottom floor, beside
//! [`crate::device`] and [`crate::error`], so that the model and the pipeline can hold a group
//! without depending on [`crate::parallel`], where its implementations live (worker threads, NCCL,
//! the TCP store; re-exported as `parallel::comm::Communicator`). All collectives are called by
//! every rank of the group, in the same order.

use candle_core::{Result, Tensor};

/// Collectives over a group of `size` ranks.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Every rank's `t`, concatenated along `dim` in rank order.
    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor>;
    /// Split `t` into `size` equal chunks along `scatter_dim`, send chunk j to rank j, and
    /// concatenate what arrives along `gather_dim` in rank order.
    fn all_to_all(&self, t: &Tensor, scatter_dim: usize, gather_dim: usize) -> Result<Tensor>;
    /// The sum of every rank's `t`.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Rank `root`'s `t`, on every rank (other ranks' `t` only gives the shape).
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;
    /// Send `t` to rank `to` (does not wait for the receiver).
    fn send(&self, t: &Tensor, to: usize) -> Result<()>;
    /// The next tensor rank `from` sent to this rank.
    fn recv(&self, from: usize) -> Result<Tensor>;
    /// Point to point as one step: send each `(to, t)` of `sends`, and receive one tensor from
    /// each rank in `recv_from`, returned in that order (several from one rank arrive in the
    /// order it sent them). Where a send waits for its receiver (NCCL), separate
    /// [`Communicator::send`]s and [`Communicator::recv`]s deadlock when ranks send to each other
    /// in a cycle; this does not, on any implementation.
    fn exchange(&self, sends: &[(usize, &Tensor)], recv_from: &[usize]) -> Result<Vec<Tensor>> {
        for (to, t) in sends {
            self.send(t, *to)?;
        }
        recv_from.iter().map(|&from| self.recv(from)).collect()
    }
    /// Give up on this group: every rank's pending and later collectives fail with `why`
    /// (a rank that failed calls it so the others do not wait for it). Implementations that
    /// cannot abort leave it a no-op; their waits end by their own timeouts, if any.
    fn abort(&self, why: &str) {
        let _ = why;
    }
}
