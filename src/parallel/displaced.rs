//! Displaced patch parallelism (DistriFusion; the idea behind piflux): each rank of the group
//! computes only its own patch of the tokens, and its attention reads the other patches' keys and
//! values from the previous forward pass instead of waiting for this pass's.
//!
//! The group shards the sequence as sequence parallelism does ([`crate::model::shard`]): every
//! rank holds a shard of the text and image tokens, and the model gathers the velocity at the end.
//! Attention differs:
//! - **Warm-up** (the first `warmup` forwards, and any layer not seen before): every rank's fresh
//!   K/V are gathered and attended to: exactly the one-device attention.
//! - **After warm-up**: a rank's own rows of K/V are this forward's, the other ranks' rows are the
//!   ones gathered during the previous forward (one step stale). This forward's K/V are handed to
//!   a refresh thread, which gathers them from every rank over a communicator of its own while
//!   the rank goes on with the next layer; the next forward picks them up. The exchange is off
//!   the critical path: on GPUs the refresh thread queues on a stream of its own.
//!
//! **Rotating** ([`DisplacedAttention::rotating`], with [`super::replica::SpReplica::with_patch_rotation`]):
//! piflux's variant. Forward f of rank r computes shard `(r + f) mod n`, and after warm-up no K/V
//! are exchanged at all: each rank keeps its own copy of every shard's K/V and refreshes the rows
//! of the shard it computes, so over n forwards it refreshes all of them itself. The only traffic
//! left is the velocity gathered at the end of each step.
//!
//! The bytes per step equal ring attention's (each rank's K and V reach every other rank once),
//! but nothing waits on them. Quality is approximate: BENCHMARKS.md measures it against the
//! one-device image on the trained demo model.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};

use candle_core::{Result, Tensor};

use super::comm::Communicator;
use super::shard::real_keys;
use crate::model::attention::{Attention, LocalAttention};
use crate::model::shard::ShardLayout;

/// Gathered K/V of one layer.
#[derive(Clone)]
struct Gathered {
    k: Tensor,
    v: Tensor,
}

#[derive(Default)]
struct Refreshed {
    /// The latest gathered K/V by layer.
    layers: HashMap<usize, Gathered>,
    /// Gathers queued and not yet done, by layer.
    pending: HashMap<usize, usize>,
    /// The refresh thread's failure, reported at the next attention call.
    failed: Option<String>,
}

struct Shared {
    refreshed: Mutex<Refreshed>,
    done: Condvar,
}

struct Job {
    layer: usize,
    /// How far the shards are rotated: rank j holds shard (j + shift) mod n.
    shift: usize,
    k: Tensor,
    v: Tensor,
}

/// One rank's attention under displaced patch parallelism (see the module's notes).
pub struct DisplacedAttention {
    group: Arc<dyn Communicator>,
    warmup: usize,
    /// piflux's rotation: no K/V exchange after warm-up (see the module's notes).
    rotate: bool,
    local: LocalAttention,
    /// Forward passes begun (counted at layer 0).
    forwards: Mutex<usize>,
    shared: Arc<Shared>,
    refresh: Mutex<Option<mpsc::Sender<Job>>>,
    /// The refresh thread, joined on drop: the K/V it shares must be freed by a thread with the
    /// device's context current (the rank's), never by the refresh thread on its way out (on a
    /// GPU, a free from a thread that never bound the context fails, and cudarc keeps the error
    /// for the context's next call, wherever that is).
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl DisplacedAttention {
    /// Rank `group.rank()` of a displaced group. `refresh` is a second communicator over the
    /// same ranks, used only by the refresh thread (its collectives must not interleave with the
    /// rank's own). The first `warmup` forwards are exact.
    pub fn new(
        group: Arc<dyn Communicator>,
        refresh: Arc<dyn Communicator>,
        warmup: usize,
    ) -> Result<Self> {
        if refresh.size() != group.size() || refresh.rank() != group.rank() {
            candle_core::bail!(
                "displaced patches: the refresh communicator (rank {} of {}) is not the group's (rank {} of {})",
                refresh.rank(),
                refresh.size(),
                group.rank(),
                group.size()
            );
        }
        let shared = Arc::new(Shared {
            refreshed: Mutex::new(Refreshed::default()),
            done: Condvar::new(),
        });
        let (tx, rx) = mpsc::channel::<Job>();
        let worker = shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("displaced-refresh-{}", group.rank()))
            .spawn(move || {
                let mut bound = false;
                for job in rx {
                    // Kernel launches from this thread need the device's context current.
                    if !bound {
                        if let Err(e) = crate::device::bind_thread(job.k.device()) {
                            let mut r = worker.refreshed.lock().unwrap_or_else(|p| p.into_inner());
                            r.failed = Some(e.to_string());
                            worker.done.notify_all();
                        }
                        bound = true;
                    }
                    let n = refresh.size();
                    let gathered = refresh
                        .all_gather(&job.k, 2)
                        .and_then(|k| shard_order(&k, n, job.shift))
                        .and_then(|k| {
                            let v = refresh.all_gather(&job.v, 2)?;
                            Ok((k, shard_order(&v, n, job.shift)?))
                        });
                    let mut r = worker.refreshed.lock().unwrap_or_else(|p| p.into_inner());
                    match gathered {
                        Ok((k, v)) => {
                            r.layers.insert(job.layer, Gathered { k, v });
                        }
                        Err(e) => r.failed = Some(crate::error::shown(&e)),
                    }
                    if let Some(p) = r.pending.get_mut(&job.layer) {
                        *p = p.saturating_sub(1);
                    }
                    worker.done.notify_all();
                }
            })
            .map_err(|e| candle_core::Error::Msg(format!("refresh thread: {e}")))?;
        Ok(Self {
            group,
            warmup,
            rotate: false,
            local: LocalAttention::default(),
            forwards: Mutex::new(0),
            shared,
            refresh: Mutex::new(Some(tx)),
            worker: Mutex::new(Some(handle)),
        })
    }

    /// piflux's variant: after warm-up, keep refreshing only the shard this rank computes (the
    /// model must rotate the shards: [`super::replica::SpReplica::with_patch_rotation`]).
    pub fn rotating(mut self) -> Self {
        self.rotate = true;
        self
    }

    /// With FP8 attention's scores (the model's load option) or exact: each rank's queries
    /// against the gathered keys, rounded in groups along them as one device rounds.
    pub fn with_fp8_scores(mut self, on: bool) -> Self {
        self.local.fp8_scores = on;
        self
    }

    /// The latest K/V of `layer` gathered from every rank (waiting for the refresh thread if it
    /// is still at this layer): those of the last forward that computed the layer (a cache
    /// policy may have skipped it since). `None` before the layer's first forward.
    fn gathered(&self, layer: usize) -> Result<Option<Gathered>> {
        let mut r = self
            .shared
            .refreshed
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(e) = &r.failed {
                candle_core::bail!("displaced patches: refreshing K/V failed: {e}");
            }
            if r.pending.get(&layer).copied().unwrap_or(0) == 0 {
                return Ok(r.layers.get(&layer).cloned());
            }
            r = self.shared.done.wait(r).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Keep `k` and `v` as `layer`'s K/V of every shard, for the next forward.
    fn keep(&self, layer: usize, k: &Tensor, v: &Tensor) {
        let mut r = self
            .shared
            .refreshed
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        r.layers.insert(
            layer,
            Gathered {
                k: k.clone(),
                v: v.clone(),
            },
        );
    }

    /// Wait until every queued background gather is done (or has failed).
    pub fn flush(&self) -> Result<()> {
        let mut r = self
            .shared
            .refreshed
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        while r.pending.values().any(|&p| p > 0) && r.failed.is_none() {
            r = self.shared.done.wait(r).unwrap_or_else(|p| p.into_inner());
        }
        match &r.failed {
            Some(e) => candle_core::bail!("displaced patches: refreshing K/V failed: {e}"),
            None => Ok(()),
        }
    }

    /// Hand this forward's K/V of `layer` to the refresh thread.
    fn queue_refresh(&self, layer: usize, shift: usize, k: &Tensor, v: &Tensor) -> Result<()> {
        // On a GPU the refresh thread queues on a stream of its own: it gets copies that this
        // thread's stream has finished writing (as the in-process communicator does).
        let (k, v) = if k.device().is_cpu() {
            (k.clone(), v.clone())
        } else {
            let (k, v) = (k.copy()?, v.copy()?);
            k.device().synchronize()?;
            (k, v)
        };
        {
            let mut r = self
                .shared
                .refreshed
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            *r.pending.entry(layer).or_default() += 1;
        }
        let tx = self.refresh.lock().unwrap_or_else(|p| p.into_inner());
        let sent = tx.as_ref().map(|tx| tx.send(Job { layer, shift, k, v }));
        if !matches!(sent, Some(Ok(()))) {
            candle_core::bail!("displaced patches: the refresh thread has stopped");
        }
        Ok(())
    }
}

impl Drop for DisplacedAttention {
    fn drop(&mut self) {
        // Closing the channel ends the refresh thread once its queued gathers are done (every
        // rank queued the same ones); waiting for it leaves this thread the last owner of the
        // shared K/V.
        if let Ok(mut tx) = self.refresh.lock() {
            tx.take();
        }
        let handle = self.worker.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// `t` (dim 2 holding n equal chunks in rank order, rank j with shard (j + shift) mod n) with
/// its chunks in shard order.
fn shard_order(t: &Tensor, n: usize, shift: usize) -> Result<Tensor> {
    if shift % n.max(1) == 0 {
        return Ok(t.clone());
    }
    let chunk = t.dim(2)? / n;
    let parts = (0..n)
        .map(|q| t.narrow(2, ((q + n - shift) % n) * chunk, chunk))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 2)
}

/// `base` with rows `start..start + part.dim(2)` along dim 2 replaced by `part`.
fn splice(base: &Tensor, part: &Tensor, start: usize) -> Result<Tensor> {
    let (len, rows) = (part.dim(2)?, base.dim(2)?);
    let mut pieces = Vec::with_capacity(3);
    if start > 0 {
        pieces.push(base.narrow(2, 0, start)?);
    }
    pieces.push(part.clone());
    if start + len < rows {
        pieces.push(base.narrow(2, start + len, rows - start - len)?);
    }
    Tensor::cat(&pieces, 2)
}

impl Attention for DisplacedAttention {
    fn attend(&self, _q: &Tensor, _k: &Tensor, _v: &Tensor) -> Result<Tensor> {
        candle_core::bail!("displaced patches attend per layer (attend_layer)")
    }

    fn attend_layer(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        layout: Option<&ShardLayout>,
    ) -> Result<Tensor> {
        let forward = {
            let mut f = self.forwards.lock().unwrap_or_else(|p| p.into_inner());
            if layer == 0 {
                *f += 1;
            }
            f.saturating_sub(1)
        };
        let (n, rank) = (self.group.size(), self.group.rank());
        // The shard this rank computes now (its rank, unless the shards rotate).
        let shard = layout.map_or(rank, |l| l.rank);
        let shift = (shard + n - rank) % n;
        let stale = if forward >= self.warmup {
            self.gathered(layer)?
        } else {
            None
        };
        let (k_all, v_all) = match stale {
            Some(g) => {
                let start = shard * k.dim(2)?;
                let mine = (splice(&g.k, k, start)?, splice(&g.v, v, start)?);
                if self.rotate {
                    // This rank's own copy, its shard refreshed; nothing sent.
                    self.keep(layer, &mine.0, &mine.1);
                } else {
                    self.queue_refresh(layer, shift, k, v)?;
                }
                mine
            }
            // Exact: every rank's K/V of this forward, in shard order. Kept for the next forward.
            None => {
                let ka = shard_order(&self.group.all_gather(k, 2)?, n, shift)?;
                let va = shard_order(&self.group.all_gather(v, 2)?, n, shift)?;
                self.keep(layer, &ka, &va);
                (ka, va)
            }
        };
        let (k_real, v_real) = real_keys(&k_all, &v_all, layout, 0..n)?
            .ok_or_else(|| candle_core::Error::Msg("displaced patches: no real keys".into()))?;
        self.local.attend_merged(q, &k_real, &v_real)
    }

    fn name(&self) -> &str {
        if self.rotate {
            "displaced patches, rotating (stale K/V, no exchange after warm-up)"
        } else {
            "displaced patches (stale K/V from the previous step)"
        }
    }
    fn fp8_scores(&self) -> bool {
        self.local.fp8_scores
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rng::SplitMix64;
    use crate::parallel::comm::{run_local, LocalComm};
    use candle_core::Device;

    /// Three forwards of a tiny model (inputs nudged each time, as denoising does) on `n` ranks
    /// with `warmup` exact forwards: the largest difference from one device relative to the
    /// largest one-device value, per forward.
    fn forwards(n: usize, warmup: usize, (txt, h, w): (usize, usize, usize)) -> Result<Vec<f32>> {
        forwards_moving(n, warmup, (txt, h, w), 1.0)
    }

    /// [`forwards`] with the inputs' change between forwards scaled by `moving` (0: the same
    /// input every time).
    fn forwards_moving(
        n: usize,
        warmup: usize,
        (txt, h, w): (usize, usize, usize),
        moving: f64,
    ) -> Result<Vec<f32>> {
        let s = crate::parallel::test_steps::Steps::new((txt, h, w), moving)?;
        let refresh = LocalComm::group(n);
        let outs = run_local(n, |rank, comm| {
            let comm: Arc<dyn Communicator> = Arc::new(comm);
            let attn = Arc::new(DisplacedAttention::new(
                comm.clone(),
                Arc::new(refresh[rank].clone()),
                warmup,
            )?);
            s.run(&super::super::sp::replica(&s.model, comm, attn))
        })?;
        s.worst(&outs)
    }

    #[test]
    fn rotating_sends_no_keys_or_values_after_warm_up() -> Result<()> {
        let mut rng = SplitMix64::new(5);
        use crate::parallel::traffic::Counting;
        let q = rng.normal_tensor((1, 2, 16, 8), &Device::Cpu)?;
        let refresh = LocalComm::group(2);
        let sent = run_local(2, |rank, comm| {
            let main = Arc::new(Counting::new(Arc::new(comm)));
            let bg = Arc::new(Counting::new(Arc::new(refresh[rank].clone())));
            let d = DisplacedAttention::new(main.clone(), bg.clone(), 1)?.rotating();
            let part = q.narrow(2, rank * 8, 8)?;
            d.attend_layer(0, &part, &part, &part, None)?;
            let warm = main.sent() + bg.sent();
            for _ in 0..3 {
                d.attend_layer(0, &part, &part, &part, None)?;
            }
            d.flush()?;
            Ok((warm, main.sent() + bg.sent()))
        })?;
        for (warm, after) in sent {
            assert!(warm > 0);
            assert_eq!(after, warm, "rotating patches sent K/V after the warm-up");
        }
        Ok(())
    }

    #[test]
    fn warm_up_forwards_are_exact_and_later_ones_are_close() -> Result<()> {
        for n in [2, 4] {
            // Warm-up covering every forward: the one-device result.
            let exact = forwards(n, 3, (8, 8, 8))?;
            assert!(exact.iter().all(|d| *d < 1e-4), "{n} ranks: {exact:?}");
            // One warm-up forward: the later ones use stale K/V, so they differ (on random
            // weights, which react strongly to the timestep, by up to about 15 %).
            let stale = forwards(n, 1, (8, 8, 8))?;
            assert!(stale[0] < 1e-4, "{n}: {stale:?}");
            assert!(
                stale[1] > 1e-5 && stale[2] > 1e-5,
                "{n}: stale K/V changed nothing: {stale:?}"
            );
            assert!(stale[1] < 0.3 && stale[2] < 0.3, "{n}: {stale:?}");
            // The error follows how far the input moved between forwards.
            let small = forwards_moving(n, 1, (8, 8, 8), 0.01)?;
            assert!(
                small[1] < stale[1] / 3.0 && small[1] > 1e-6,
                "{n}: {small:?} vs {stale:?}"
            );
        }
        // When the input does not move, the stale K/V are this forward's: exact again (every
        // rank's rows land where they belong).
        let still = forwards_moving(4, 1, (7, 5, 7), 0.0)?;
        assert!(still.iter().all(|d| *d < 1e-4), "{still:?}");
        // Uneven token counts (padded shards) stay exact in warm-up.
        let uneven = forwards(3, 3, (7, 5, 7))?;
        assert!(uneven.iter().all(|d| *d < 1e-4), "{uneven:?}");
        Ok(())
    }
}
