//! Communicators: how workers exchange tensors.
//!
//! [`Communicator`] (defined in [`crate::collective`], re-exported here) is the small set of
//! collectives the parallel strategies use. [`LocalComm`] implements it for worker threads of one
//! process (the CPU stand-in for GPUs, used by the tests and the demo);
//! [`crate::parallel::nccl::NcclComm`] (`cuda` feature) implements it for GPUs with NCCL. All
//! collectives are called by every rank of the group, in the same order.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Result, Tensor};

pub use crate::collective::Communicator;

/// How long a rank waits in a collective or a receive for the others before it gives up and the
/// group is aborted: `PARALLAX_COLLECTIVE_TIMEOUT_S` seconds, default 30. Ranks of one job reach
/// each collective within a layer's work of each other, so a wait this long means a rank is
/// gone or stuck. A value out of range is warned about and the default used (the command line
/// refuses it first: [`collective_timeout_from_env`]).
pub fn collective_timeout() -> Duration {
    collective_timeout_from_env().unwrap_or_else(|e| {
        tracing::warn!("{e}; waiting {DEFAULT_COLLECTIVE_TIMEOUT_S} s");
        Duration::from_secs_f64(DEFAULT_COLLECTIVE_TIMEOUT_S)
    })
}

/// The collective timeout's default, in seconds.
pub const DEFAULT_COLLECTIVE_TIMEOUT_S: f64 = 30.0;
/// The longest collective timeout accepted, in seconds (a day).
pub const MAX_COLLECTIVE_TIMEOUT_S: f64 = 86_400.0;

/// `PARALLAX_COLLECTIVE_TIMEOUT_S` read and checked (the one place it is parsed): unset is the
/// default; anything but a number of seconds above 0 and at most a day is an error saying so.
pub fn collective_timeout_from_env() -> std::result::Result<Duration, String> {
    let Ok(v) = std::env::var("PARALLAX_COLLECTIVE_TIMEOUT_S") else {
        return Ok(Duration::from_secs_f64(DEFAULT_COLLECTIVE_TIMEOUT_S));
    };
    v.trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s > 0.0 && *s <= MAX_COLLECTIVE_TIMEOUT_S)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| {
            format!(
                "PARALLAX_COLLECTIVE_TIMEOUT_S={v:?}: give the seconds a rank may wait for the others, \
                 above 0 and at most {MAX_COLLECTIVE_TIMEOUT_S} (unset: {DEFAULT_COLLECTIVE_TIMEOUT_S})"
            )
        })
}

/// A barrier that gives up: after the timeout, or as soon as the group is aborted, every waiter
/// returns an error naming the ranks that did not arrive, or the reason for the abort.
struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Default)]
struct GateState {
    /// Which ranks reached the current round.
    arrived: Vec<bool>,
    round: u64,
    /// Why the group was aborted; every later call fails with it.
    aborted: Option<String>,
}

struct Shared {
    size: usize,
    /// Collective exchange slots: `slots[from * size + to]`.
    slots: Mutex<Vec<Option<Tensor>>>,
    gate: Gate,
    timeout: Duration,
    /// Point-to-point mailboxes by (from, to).
    mail: Mutex<HashMap<(usize, usize), VecDeque<Tensor>>>,
    mail_cv: Condvar,
}

impl Shared {
    fn aborted(&self) -> Option<String> {
        self.gate
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .aborted
            .clone()
    }

    fn abort(&self, why: String) {
        {
            let mut g = self.gate.state.lock().unwrap_or_else(|p| p.into_inner());
            if g.aborted.is_none() {
                g.aborted = Some(why);
            }
        }
        self.gate.cv.notify_all();
        // Wake receivers (they check the abort under the mail lock's wait).
        let _m = self.mail.lock().unwrap_or_else(|p| p.into_inner());
        self.mail_cv.notify_all();
    }

    /// Wait until every rank has arrived, the group is aborted, or the timeout passes (`rank`
    /// waits while `doing` a collective).
    fn wait_all(&self, rank: usize, doing: &str) -> Result<()> {
        let n = self.size;
        let mut g = self.gate.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &g.aborted {
            return Err(aborted_err(rank, doing, why));
        }
        if g.arrived.len() != n {
            g.arrived = vec![false; n];
        }
        let round = g.round;
        g.arrived[rank] = true;
        if g.arrived.iter().all(|a| *a) {
            g.arrived.iter_mut().for_each(|a| *a = false);
            g.round += 1;
            self.gate.cv.notify_all();
            return Ok(());
        }
        let deadline = Instant::now() + self.timeout;
        while g.round == round {
            if let Some(why) = &g.aborted {
                return Err(aborted_err(rank, doing, why));
            }
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<String> = g
                    .arrived
                    .iter()
                    .enumerate()
                    .filter(|(_, a)| !**a)
                    .map(|(r, _)| r.to_string())
                    .collect();
                let why = format!(
                    "rank {} of {n} did not reach a collective within {:.1} s (lost or stuck)",
                    missing.join(", "),
                    self.timeout.as_secs_f64()
                );
                g.aborted = Some(why.clone());
                self.gate.cv.notify_all();
                return Err(aborted_err(rank, doing, &why));
            }
            g = self
                .gate
                .cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }
}

/// Rank `rank`'s `doing` gave up: its group was aborted for `why`.
fn aborted_err(rank: usize, doing: &str, why: &str) -> candle_core::Error {
    crate::Error::Collective {
        rank,
        doing: doing.to_string(),
        why: why.to_string(),
    }
    .into_candle()
}

/// An in-process communicator: one per worker thread, all made by [`LocalComm::group`].
#[derive(Clone)]
pub struct LocalComm {
    rank: usize,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LocalComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalComm(rank {} of {})", self.rank, self.shared.size)
    }
}

/// What to hand other threads for `ts` (all on one device): on the CPU the tensors themselves;
/// on a GPU copies of their own, once the work that writes them is done. candle queues each host
/// thread's work on that thread's own stream, so a shared buffer could be read before it is
/// written, or freed by one thread's stream while another's still reads it.
fn handoff(ts: &[Tensor]) -> Result<Vec<Tensor>> {
    match ts.first().map(Tensor::device) {
        None | Some(candle_core::Device::Cpu) => Ok(ts.to_vec()),
        Some(d) => {
            let own = ts.iter().map(Tensor::copy).collect::<Result<Vec<_>>>()?;
            d.synchronize()?;
            Ok(own)
        }
    }
}

/// A lock of the group poisoned: another worker panicked inside a collective.
fn poisoned(rank: usize, doing: &str) -> candle_core::Error {
    aborted_err(rank, doing, "a worker panicked during a collective")
}

impl LocalComm {
    /// `size` communicators of one group, rank i at index i.
    pub fn group(size: usize) -> Vec<LocalComm> {
        Self::group_with_timeout(size, collective_timeout())
    }

    /// [`LocalComm::group`] with waits bounded by `timeout`.
    pub fn group_with_timeout(size: usize, timeout: Duration) -> Vec<LocalComm> {
        let shared = Arc::new(Shared {
            size,
            slots: Mutex::new(vec![None; size * size]),
            gate: Gate {
                state: Mutex::new(GateState::default()),
                cv: Condvar::new(),
            },
            timeout,
            mail: Mutex::new(HashMap::new()),
            mail_cv: Condvar::new(),
        });
        (0..size)
            .map(|rank| LocalComm {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Post `outgoing[j]` for every rank j, wait for everyone, take what was posted to us
    /// (`doing`: the collective, for errors).
    fn swap_all(&self, outgoing: Vec<Tensor>, doing: &str) -> Result<Vec<Tensor>> {
        let n = self.shared.size;
        let mine = outgoing.first().map(|t| t.device().clone());
        let outgoing = handoff(&outgoing)?;
        {
            let mut slots = self
                .shared
                .slots
                .lock()
                .map_err(|_| poisoned(self.rank, doing))?;
            for (to, t) in outgoing.into_iter().enumerate() {
                slots[self.rank * n + to] = Some(t);
            }
        }
        self.shared.wait_all(self.rank, doing)?;
        let incoming = {
            let mut slots = self
                .shared
                .slots
                .lock()
                .map_err(|_| poisoned(self.rank, doing))?;
            (0..n)
                .map(|from| slots[from * n + self.rank].take())
                .collect::<Option<Vec<_>>>()
        };
        // Nobody posts again until everyone has taken their share.
        self.shared.wait_all(self.rank, doing)?;
        let incoming =
            incoming.ok_or_else(|| aborted_err(self.rank, doing, "called by only some ranks"))?;
        // Ranks sharing one GPU through handles of their own: each takes its parts onto its
        // own handle (a no-op on the CPU and when the handles are the same).
        match mine {
            Some(d) => incoming.into_iter().map(|t| t.to_device(&d)).collect(),
            None => Ok(incoming),
        }
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        let parts = self.swap_all(vec![t.clone(); self.size()], "all_gather")?;
        Tensor::cat(&parts, dim)
    }

    fn all_to_all(&self, t: &Tensor, scatter_dim: usize, gather_dim: usize) -> Result<Tensor> {
        let n = self.size();
        let len = t.dim(scatter_dim)?;
        if len % n != 0 {
            candle_core::bail!(
                "all_to_all: dim {scatter_dim} of {:?} does not split {n} ways",
                t.dims()
            );
        }
        let chunk = len / n;
        let outgoing = (0..n)
            .map(|j| t.narrow(scatter_dim, j * chunk, chunk)?.contiguous())
            .collect::<Result<Vec<_>>>()?;
        let parts = self.swap_all(outgoing, "all_to_all")?;
        Tensor::cat(&parts, gather_dim)
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let parts = self.swap_all(vec![t.clone(); self.size()], "all_reduce")?;
        // Sum in rank order so every rank gets bit-identical results.
        let mut acc = parts[0].clone();
        for p in &parts[1..] {
            acc = (acc + p)?;
        }
        Ok(acc)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let parts = self.swap_all(vec![t.clone(); self.size()], "broadcast")?;
        parts
            .into_iter()
            .nth(root)
            .ok_or_else(|| candle_core::Error::Msg(format!("broadcast root {root} out of range")))
    }

    fn send(&self, t: &Tensor, to: usize) -> Result<()> {
        let t = handoff(std::slice::from_ref(t))?.swap_remove(0);
        let doing = || format!("sending to rank {to}");
        let mut mail = self
            .shared
            .mail
            .lock()
            .map_err(|_| poisoned(self.rank, &doing()))?;
        mail.entry((self.rank, to)).or_default().push_back(t);
        self.shared.mail_cv.notify_all();
        Ok(())
    }

    fn recv(&self, from: usize) -> Result<Tensor> {
        let deadline = Instant::now() + self.shared.timeout;
        let doing = || format!("receiving from rank {from}");
        let mut mail = self
            .shared
            .mail
            .lock()
            .map_err(|_| poisoned(self.rank, &doing()))?;
        loop {
            if let Some(t) = mail.get_mut(&(from, self.rank)).and_then(|q| q.pop_front()) {
                return Ok(t);
            }
            if let Some(why) = self.shared.aborted() {
                return Err(aborted_err(self.rank, &doing(), &why));
            }
            let now = Instant::now();
            if now >= deadline {
                let why = format!(
                    "rank {from} sent nothing to rank {} within {:.1} s (lost or stuck)",
                    self.rank,
                    self.shared.timeout.as_secs_f64()
                );
                drop(mail);
                self.shared.abort(why.clone());
                return Err(aborted_err(self.rank, &doing(), &why));
            }
            mail = self
                .shared
                .mail_cv
                .wait_timeout(mail, deadline - now)
                .map_err(|_| poisoned(self.rank, &doing()))?
                .0;
        }
    }

    fn abort(&self, why: &str) {
        self.shared.abort(format!("rank {}: {why}", self.rank));
    }
}

/// Work handed to a device or a peer and not yet known to be finished, oldest first (for
/// NCCL: an event recorded on the stream after each collective). What a watchdog reads to tell
/// a slow group from a stuck one.
pub struct Inflight<T> {
    queue: Mutex<VecDeque<(Instant, T)>>,
}

impl<T> Default for Inflight<T> {
    fn default() -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
        }
    }
}

impl<T> Inflight<T> {
    /// `item` was handed over now.
    pub fn push(&self, item: T) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back((Instant::now(), item));
    }

    /// Forget the finished items and say how long the oldest unfinished one has waited at `now`
    /// (`None`: nothing is waiting). Items finish in the order they were pushed (as work on one
    /// stream does): once the newest is done, all are.
    pub fn oldest_wait(&self, now: Instant, done: impl Fn(&T) -> bool) -> Option<Duration> {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.back().is_some_and(|(_, t)| done(t)) {
            q.clear();
        }
        while q.front().is_some_and(|(_, t)| done(t)) {
            q.pop_front();
        }
        q.front().map(|(t, _)| now.saturating_duration_since(*t))
    }

    pub fn len(&self) -> usize {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a watchdog thread ([`spawn_watchdog`]) looks after: a communicator whose waits happen
/// where its own code cannot time them (on a GPU stream, inside a library).
pub trait Watched: Send + Sync + 'static {
    /// Why the group must be given up now, if it must: an operation overdue past `timeout`, or
    /// an error a peer reported.
    fn check(&self, timeout: Duration) -> Option<String>;
    /// Give up on the group (abort it): every pending and later operation fails with `why`.
    fn give_up(&self, why: &str);
    /// Whether it has been given up already (the watchdog then has nothing left to do).
    fn given_up(&self) -> bool;
}

/// Start a thread that asks `target` every `poll` whether to give up (see [`Watched`]), gives up
/// at most once, and ends then, or once `target` is dropped. The thread holds `target` only
/// while checking.
pub fn spawn_watchdog<W: Watched>(
    name: &str,
    target: std::sync::Weak<W>,
    timeout: Duration,
    poll: Duration,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || loop {
            std::thread::sleep(poll);
            let Some(t) = target.upgrade() else { return };
            if t.given_up() {
                return;
            }
            if let Some(why) = t.check(timeout) {
                tracing::warn!("watchdog: giving up on the group: {why}");
                t.give_up(&why);
                return;
            }
        })
}

/// The watchdog's polling interval for a given timeout: a tenth of it, between 10 ms and 1 s.
pub fn watchdog_poll(timeout: Duration) -> Duration {
    (timeout / 10).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Run `f(rank, comm)` on `size` threads with one in-process group; results in rank order.
pub fn run_local<T: Send>(
    size: usize,
    f: impl Fn(usize, LocalComm) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    // A rank that fails aborts the group, so the others' collectives fail at once instead of
    // waiting for it.
    run_each(LocalComm::group(size), |rank, comm| {
        let handle = comm.clone();
        let r = f(rank, comm);
        if let Err(e) = &r {
            handle.abort(&format!("failed: {}", crate::error::shown(e)));
        }
        r
    })
}

/// Run `f(rank, comm)` on one thread per communicator of one group (in-process or NCCL, given in
/// rank order); results in rank order.
pub fn run_each<C: Send, T: Send>(
    comms: Vec<C>,
    f: impl Fn(usize, C) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .enumerate()
            .map(|(rank, comm)| {
                let f = &f;
                s.spawn(move || f(rank, comm))
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join().map_err(|_| {
                    crate::Error::rank(rank, "in its worker thread", "it panicked").into_candle()
                })?
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::time::{Duration, Instant};

    fn rank_tensor(rank: usize) -> Result<Tensor> {
        Tensor::arange(0f32, 8.0, &Device::Cpu)?
            .affine(1.0, 100.0 * rank as f64)?
            .reshape((2, 4))
    }

    #[test]
    fn collectives_on_four_threads() -> Result<()> {
        let out = run_local(4, |rank, comm| {
            let t = rank_tensor(rank)?;
            let gathered = comm.all_gather(&t, 0)?;
            let summed = comm.all_reduce_sum(&t)?;
            let b = comm.broadcast(&t, 2)?;
            // all_to_all: split the 4 columns, one to each rank; gather along rows.
            let a2a = comm.all_to_all(&t, 1, 0)?;
            // Ring pass: send to the next rank, receive from the previous.
            comm.send(&t, (rank + 1) % 4)?;
            let from_prev = comm.recv((rank + 3) % 4)?;
            // The same as one exchange, twice to one peer (order kept).
            let t2 = (&t * 2.0)?;
            let got = comm.exchange(
                &[((rank + 1) % 4, &t), ((rank + 1) % 4, &t2)],
                &[(rank + 3) % 4, (rank + 3) % 4],
            )?;
            assert_eq!(got[0].to_vec2::<f32>()?, from_prev.to_vec2::<f32>()?);
            assert_eq!(
                got[1].to_vec2::<f32>()?,
                (&from_prev * 2.0)?.to_vec2::<f32>()?
            );
            Ok((gathered, summed, b, a2a, from_prev))
        })?;
        for (rank, (g, s, b, a2a, prev)) in out.iter().enumerate() {
            assert_eq!(g.dims(), &[8, 4]);
            let want_g = Tensor::cat(&(0..4).map(rank_tensor).collect::<Result<Vec<_>>>()?, 0)?;
            assert_eq!(g.to_vec2::<f32>()?, want_g.to_vec2::<f32>()?);
            let want_s = (0..4).map(rank_tensor).try_fold(
                Tensor::zeros((2, 4), candle_core::DType::F32, &Device::Cpu)?,
                |a, t| a + t?,
            )?;
            assert_eq!(s.to_vec2::<f32>()?, want_s.to_vec2::<f32>()?);
            assert_eq!(b.to_vec2::<f32>()?, rank_tensor(2)?.to_vec2::<f32>()?);
            // Rank r receives column r of every rank, stacked in rank order: (8, 1).
            let want_a2a = Tensor::cat(
                &(0..4)
                    .map(|j| rank_tensor(j)?.narrow(1, rank, 1))
                    .collect::<Result<Vec<_>>>()?,
                0,
            )?;
            assert_eq!(a2a.to_vec2::<f32>()?, want_a2a.to_vec2::<f32>()?);
            assert_eq!(
                prev.to_vec2::<f32>()?,
                rank_tensor((rank + 3) % 4)?.to_vec2::<f32>()?
            );
        }
        Ok(())
    }

    #[test]
    fn a_rank_that_fails_or_stalls_is_an_error_naming_it_not_a_hang() {
        // Rank 1 fails before the collective: the others learn it at once.
        let t0 = Instant::now();
        let r = run_local(3, |rank, comm| {
            if rank == 1 {
                candle_core::bail!("injected");
            }
            comm.all_reduce_sum(&Tensor::ones(2, candle_core::DType::F32, &Device::Cpu)?)
        });
        let e = r.expect_err("a failed rank");
        assert!(e.to_string().contains("injected"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        // Rank 2 stalls past the timeout: the others give up naming it; it then finds the
        // group aborted.
        let comms = LocalComm::group_with_timeout(3, Duration::from_millis(300));
        let t0 = Instant::now();
        let out = run_each(comms, |rank, comm| {
            if rank == 2 {
                std::thread::sleep(Duration::from_millis(900));
            }
            comm.all_gather(&Tensor::ones(2, candle_core::DType::F32, &Device::Cpu)?, 0)
        });
        // Rank 0's error comes first: its all-gather gave up, naming the rank that stalled.
        let e = crate::Error::from_candle(out.expect_err("a stalled rank"));
        assert!(e.to_string().contains("rank 2 of 3 did not reach"), "{e}");
        assert!(
            matches!(&e, crate::Error::Collective { rank: 0, doing, .. } if doing == "all_gather"),
            "{e:?}"
        );
        // Rank 2's 0.9 s sleep, then it finds the group aborted: a hang bound, generous for a
        // busy machine.
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        // A receive from a rank that never sends gives up too.
        let comms = LocalComm::group_with_timeout(2, Duration::from_millis(200));
        let e = crate::Error::from_candle(comms[0].recv(1).expect_err("nothing sent"));
        assert!(e.to_string().contains("rank 1 sent nothing"), "{e}");
        assert!(
            matches!(&e, crate::Error::Collective { rank: 0, doing, .. } if doing == "receiving from rank 1"),
            "{e:?}"
        );
        // While still a candle error, it is said in its own words.
        let e = comms[1].all_gather(
            &Tensor::ones(2, candle_core::DType::F32, &Device::Cpu).expect("t"),
            0,
        );
        let said = crate::error::shown(&e.expect_err("aborted"));
        assert!(
            said.starts_with("collective aborted: rank 1 sent nothing"),
            "{said}"
        );
    }

    /// A stand-in for a GPU communicator: operations that finish when their flag is set.
    #[derive(Default)]
    struct FakeGpu {
        ops: Inflight<Arc<std::sync::atomic::AtomicBool>>,
        peer_error: Mutex<Option<String>>,
        aborted: Mutex<Vec<String>>,
    }

    impl Watched for FakeGpu {
        fn check(&self, timeout: Duration) -> Option<String> {
            if let Some(e) = self.peer_error.lock().expect("lock").clone() {
                return Some(e);
            }
            let wait = self.ops.oldest_wait(Instant::now(), |f| {
                f.load(std::sync::atomic::Ordering::SeqCst)
            })?;
            (wait >= timeout).then(|| format!("an operation waited {:.1} s", wait.as_secs_f64()))
        }
        fn give_up(&self, why: &str) {
            self.aborted.lock().expect("lock").push(why.to_string());
        }
        fn given_up(&self) -> bool {
            !self.aborted.lock().expect("lock").is_empty()
        }
    }

    fn op(done: bool) -> Arc<std::sync::atomic::AtomicBool> {
        Arc::new(std::sync::atomic::AtomicBool::new(done))
    }

    #[test]
    fn inflight_forgets_finished_work_in_order() {
        let q = Inflight::default();
        let now = Instant::now();
        assert_eq!(q.oldest_wait(now, |_: &bool| true), None);
        q.push(true);
        q.push(false);
        q.push(false);
        // The first is done, the second not: it is the oldest open one.
        let w = q.oldest_wait(Instant::now(), |d| *d);
        assert!(w.is_some());
        assert_eq!(q.len(), 2);
        // Newest done (stream order): everything is.
        let (a, b) = (op(false), op(false));
        let q = Inflight::default();
        q.push(a.clone());
        q.push(b.clone());
        b.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            q.oldest_wait(Instant::now(), |f| f
                .load(std::sync::atomic::Ordering::SeqCst)),
            None
        );
        assert!(q.is_empty());
    }

    /// The watchdog gives up on an operation overdue past the timeout (not before), once; leaves
    /// alone a group whose operations finish; reports a peer's error at once; and ends when the
    /// communicator is dropped.
    #[test]
    fn the_watchdog_aborts_stuck_groups_only() {
        let timeout = Duration::from_millis(300);
        let poll = watchdog_poll(timeout);
        assert_eq!(poll, Duration::from_millis(30));
        // Stuck: one operation never finishes.
        let gpu = Arc::new(FakeGpu::default());
        let t0 = Instant::now();
        gpu.ops.push(op(false));
        let h =
            spawn_watchdog("test-watchdog", Arc::downgrade(&gpu), timeout, poll).expect("thread");
        h.join().expect("the watchdog ends after giving up");
        let took = t0.elapsed();
        let aborted = gpu.aborted.lock().expect("lock").clone();
        assert_eq!(aborted.len(), 1, "{aborted:?}");
        assert!(aborted[0].contains("an operation waited"), "{aborted:?}");
        assert!(took >= timeout, "gave up early: {took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");

        // Busy but moving: operations that each finish within the timeout are left alone,
        // however long the group runs (12 operations of a tenth of the timeout each). A timeout
        // of 2 s here (still polled every 30 ms): with 300 ms, an operation's 100 ms sleep
        // overrunning by 200 ms on a busy machine (CI's 2 cores under the whole suite) read as
        // a stall; now an overrun must pass 1.8 s.
        let timeout = Duration::from_secs(2);
        let gpu = Arc::new(FakeGpu::default());
        let h =
            spawn_watchdog("test-watchdog", Arc::downgrade(&gpu), timeout, poll).expect("thread");
        for _ in 0..12 {
            let f = op(false);
            gpu.ops.push(f.clone());
            std::thread::sleep(timeout / 10);
            f.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        assert!(gpu.aborted.lock().expect("lock").is_empty());
        // A peer's error: given up at once (the next poll), without waiting for the timeout.
        let t0 = Instant::now();
        *gpu.peer_error.lock().expect("lock") = Some("remote error on a peer".into());
        h.join().expect("ends");
        assert!(t0.elapsed() < timeout, "{:?}", t0.elapsed());
        assert_eq!(
            gpu.aborted.lock().expect("lock").as_slice(),
            ["remote error on a peer".to_string()]
        );

        // Dropped: the thread ends.
        let gpu = Arc::new(FakeGpu::default());
        let h =
            spawn_watchdog("test-watchdog", Arc::downgrade(&gpu), timeout, poll).expect("thread");
        drop(gpu);
        h.join().expect("ends once the communicator is gone");
    }

    #[test]
    fn uneven_all_to_all_is_an_error_not_a_hang() {
        let r = run_local(2, |_, comm| {
            let t = Tensor::zeros((3, 2), candle_core::DType::F32, &Device::Cpu)?;
            comm.all_to_all(&t, 0, 0)
        });
        assert!(r.is_err());
    }
}
