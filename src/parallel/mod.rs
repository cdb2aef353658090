//! Running one image on several devices.
//!
//! - [`comm`]: the communicator trait (all-gather, all-to-all, all-reduce, broadcast, send/recv)
//!   and its in-process implementation, where worker threads stand in for GPUs.
//! - [`nccl`] (`cuda` feature): the communicator over NCCL, one rank per GPU.
//! - [`layout`]: one description of a parallel layout (the degrees and the stale-activation
//!   strategy), for the CLI, the studio and the engine alike.
//! - [`mesh`]: one object that factors the workers into data-parallel x CFG x pipeline x ring x
//!   Ulysses degrees and hands each strategy its group.
//! - [`ulysses`] and [`ring`]: sequence-parallel attention, each an [`crate::model::attention::Attention`].
//! - [`shard`]: one rank's shard of a step's inputs, and the velocity gathered whole again.
//! - [`sp`]: a whole transformer step over a sequence-parallel group (token counts that do not
//!   divide by the group size are padded to equal shards).
//! - [`ranks`]: the denoising loop over a mesh of CPU worker threads (sequence, CFG and data
//!   parallelism).
//! - [`store`]: the multi-process rendezvous (`parallax worker --init tcp://...`) and a
//!   communicator over it for CPU ranks.
//! - [`cost`]: the predicted step time of every layout (compute measured on one device, each
//!   link's per-call latency and bandwidth); `parallax plan` prints it.
//! - [`auto`]: the automatic layout (`--parallel auto`): the cost model's choice, or a rule of
//!   thumb where it has no calibration.
//! - `traffic` (tests only): the bytes each rank sends, counted on a live group and predicted
//!   for FLUX's shapes.
//! - [`displaced`]: displaced patch parallelism (stale K/V from the previous step).
//! - [`pipefusion`]: PipeFusion (blocks split into stages, patches pipelined through them).
//! - [`refusal`]: what a sound layout still refuses for one request (true CFG, cache, blocks).
//! - [`abandoned`]: rank threads given up on (stuck past their group's abort), until they end.
//! - [`fault`]: faults injected on purpose (`PARALLAX_FAULT`), to test the watchdog.
//! - [`vae`]: the autoencoder decode split into row bands (halo exchange, all-reduced GroupNorm;
//!   bands differ by a row where the rows do not divide).

pub mod abandoned;
pub mod auto;
pub mod comm;
pub mod cost;
pub mod displaced;
#[cfg(test)]
mod exactness;
pub mod fault;
pub mod fingerprint;
pub mod layout;
pub mod mesh;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod pipefusion;
pub mod ranks;
pub mod refusal;
pub mod replica;
pub mod ring;
pub mod shard;
pub mod sp;
pub mod store;
pub mod store_auth;
pub mod store_server;
#[cfg(test)]
pub(crate) mod test_steps;
#[cfg(test)]
pub(crate) mod traffic;
pub mod ulysses;
pub mod usp;
pub mod vae;
