//! Rendezvous for several processes (`parallax worker --rank R --world W --init tcp://HOST:PORT`):
//! rank 0 serves a small key-value store on HOST:PORT ([`super::store_server`]), every rank
//! connects to it, proves it holds the job's token ([`super::store_auth`]) and claims its rank,
//! and they agree on what must be shared before work starts (that everyone is there, the seed,
//! the job itself, and for GPU ranks NCCL's unique id), as PyTorch's TCPStore does for its process
//! groups. Each value is stored under the rank that set it and read by naming that rank.
//!
//! [`StoreComm`] runs the collectives of the [`Communicator`] trait through the store. It exists so
//! that multi-process runs are tested on the CPU backend (CI has no GPU and no NCCL); it moves every
//! tensor through rank 0's store and is not meant to be fast. GPU ranks use NCCL for tensors and the
//! store only for the rendezvous.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use super::comm::Communicator;
use super::store_auth::{self, Outcome, Token, TOKEN_ENV};
use super::store_server::{self, FAILED, GET, MAX_MESSAGE, MAX_VALUE, MAX_WORLD, SET};
use crate::error::{Error, Result};

fn io_err(what: &str, e: std::io::Error) -> Error {
    Error::Rendezvous(format!("rendezvous: {what}: {e}"))
}

/// An error on an established connection to the store: one that says the connection was closed
/// means rank 0, whose process serves the store, is gone (it exited or was killed), and says so.
fn conn_err(what: &str, e: std::io::Error) -> Error {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::UnexpectedEof | K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => {
            Error::Rendezvous(format!(
                "rendezvous: {what}: the store closed the connection ({e}): rank 0, whose \
                 process serves the store, has exited or was killed"
            ))
        }
        _ => io_err(what, e),
    }
}

/// Parse `tcp://HOST:PORT` into `HOST:PORT`.
pub fn parse_init(init: &str) -> Result<String> {
    let addr = init.strip_prefix("tcp://").ok_or_else(|| {
        Error::setting("init", init, "use tcp://HOST:PORT (rank 0 listens there)")
    })?;
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(addr.to_string())
        }
        _ => Err(Error::setting(
            "init",
            init,
            "use tcp://HOST:PORT with a port 0-65535",
        )),
    }
}

/// The port of a `HOST:PORT` that [`parse_init`] accepted.
fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(0)
}

/// Whether every address `addr` names is this machine's loopback.
fn is_loopback(addr: &str) -> bool {
    addr.to_socket_addrs()
        .map(|a| {
            let a: Vec<_> = a.collect();
            !a.is_empty() && a.iter().all(|a| a.ip().is_loopback())
        })
        .unwrap_or(false)
}

/// One process's connection to the store.
pub struct Store {
    conn: Mutex<(BufReader<TcpStream>, BufWriter<TcpStream>)>,
    rank: usize,
    world: usize,
    /// The rendezvous timeout, also the longest [`Store::finish`] waits for the other ranks.
    timeout: Duration,
    /// The longest a read waits for another rank once the ranks have met in a first exchange
    /// (before it, loading and text encoding may keep ranks apart for longer); `None`: for ever.
    stall: Mutex<Option<Duration>>,
    /// A read has been answered since the rendezvous, or [`Store::arm`] was called: the stall
    /// timeout applies.
    armed: std::sync::atomic::AtomicBool,
    /// Why the connection can no longer be used: a read gave up waiting, so its reply may still
    /// come and would be taken for the next request's.
    out_of_step: Mutex<Option<String>>,
    /// The token file rank 0 left for this machine's other ranks (removed when it is done).
    left_token: Option<PathBuf>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store(rank {} of {})", self.rank, self.world)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(p) = &self.left_token {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Where this rank's token comes from.
enum Secret {
    Known(Token),
    /// A rank other than 0 on a loopback rendezvous with no token given: rank 0's token file,
    /// read (again) at each try.
    LocalFile(PathBuf),
}

impl Secret {
    fn token(&self) -> Result<Token> {
        match self {
            Secret::Known(t) => Ok(t.clone()),
            Secret::LocalFile(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    Error::Rendezvous(format!("no worker token at {}: {e}", p.display()))
                })?;
                Token::from_text(&text, "token file")
            }
        }
    }
}

impl Store {
    /// Join the group: rank 0 starts the store on `init` (`tcp://HOST:PORT`), the others connect
    /// to it (retrying for `timeout`); returns once all `world` ranks have arrived. `token` is
    /// the job's shared secret; without one rank 0 makes one (left for this machine's ranks on a
    /// loopback rendezvous, printed otherwise) and the other ranks read rank 0's on loopback.
    pub fn connect(
        init: &str,
        rank: usize,
        world: usize,
        timeout: Duration,
        token: Option<Token>,
    ) -> Result<Arc<Self>> {
        if world == 0 || world > MAX_WORLD || rank >= world {
            return Err(Error::setting(
                "rank",
                rank.to_string(),
                format!("must be below --world {world} (which is 1 to {MAX_WORLD})"),
            ));
        }
        let addr = parse_init(init)?;
        let local = is_loopback(&addr);
        let mut left_token = None;
        let secret = match token {
            Some(t) => Secret::Known(t),
            None if rank == 0 => {
                let t = Token::generate()?;
                if local {
                    let p = store_auth::local_token_path(port_of(&addr))?;
                    store_auth::write_local_token(&p, &t)?;
                    tracing::info!(
                        "rank 0: no worker token given; made one for this machine's ranks in {}",
                        p.display()
                    );
                    left_token = Some(p);
                } else {
                    eprintln!(
                        "rank 0: no worker token given; start the other ranks with \
                         {TOKEN_ENV}={}",
                        t.text()
                    );
                }
                Secret::Known(t)
            }
            None if local => Secret::LocalFile(store_auth::local_token_path(port_of(&addr))?),
            None => {
                return Err(Error::setting(
                    "init",
                    init,
                    format!(
                        "rank {rank} needs the job's worker token: set {TOKEN_ENV} (rank 0 prints \
                         one when none is given) or pass --token-file"
                    ),
                ))
            }
        };
        if rank == 0 {
            let listener = TcpListener::bind(&addr)
                .map_err(|e| io_err(&format!("cannot listen on {addr}"), e))?;
            if listener.local_addr().is_ok_and(|a| a.ip().is_unspecified()) {
                tracing::warn!(
                    "rank 0: the store listens on every interface of this machine ({addr}); \
                     only holders of the worker token may join"
                );
            }
            store_server::start(listener, world, secret.token()?)
                .map_err(|e| io_err("cannot start the store thread", e))?;
        }
        let stream = join(&addr, rank, world, timeout, &secret)?;
        let _ = stream.set_nodelay(true);
        let w = stream.try_clone().map_err(|e| io_err("socket", e))?;
        let store = Arc::new(Self {
            conn: Mutex::new((BufReader::new(stream), BufWriter::new(w))),
            rank,
            world,
            timeout,
            stall: Mutex::new(Some(crate::parallel::comm::collective_timeout())),
            armed: std::sync::atomic::AtomicBool::new(false),
            out_of_step: Mutex::new(None),
            left_token,
        });
        // Barrier: everyone says hello and waits for everyone, at most `timeout` for the
        // others to start.
        store.exchange("hello", b"1", timeout).map_err(|e| {
            Error::Rendezvous(format!(
                "rendezvous at {addr}: waiting for all {world} ranks to join (at \
                     most {:.0} s; start every rank with the same --init and --world): {e}",
                timeout.as_secs_f64()
            ))
        })?;
        tracing::info!("rank {rank} of {world}: all ranks present");
        Ok(store)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// The rendezvous timeout this store was made with.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// An error once a read has timed out on this connection (see `out_of_step`).
    fn in_step(&self) -> Result<()> {
        match self.out_of_step.lock().ok().and_then(|o| o.clone()) {
            Some(why) => Err(Error::Rendezvous(format!(
                "rank {}: the store connection is unusable after an earlier timeout ({why})",
                self.rank
            ))),
            None => Ok(()),
        }
    }

    /// Every rank puts `val` under `key` and reads every other rank's, waiting at most `within`
    /// in all: the values in rank order (this rank's own included).
    pub fn exchange(&self, key: &str, val: &[u8], within: Duration) -> Result<Vec<Vec<u8>>> {
        let deadline = Instant::now() + within;
        if self.world > 1 {
            self.set(key, (self.world - 1) as u32, val)?;
        }
        (0..self.world)
            .map(|r| {
                if r == self.rank {
                    return Ok(val.to_vec());
                }
                let left = deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1));
                self.get_within(key, Some(left), r)
            })
            .collect()
    }

    /// From now on the stall timeout bounds every read (the ranks are ready to exchange).
    pub fn arm(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// The closing barrier: every rank reports it is done and rank 0, whose process serves the
    /// store, waits for all of them before it may exit (a rank still reading its last
    /// collective's result would otherwise find the store gone).
    pub fn finish(&self) -> Result<()> {
        if self.rank == 0 {
            // A rank that died never reports: the store says so when its connection drops, and
            // rank 0 waits for the others at most the rendezvous timeout in any case.
            for r in 1..self.world {
                self.get_within("done", Some(self.timeout), r)
                    .map_err(|e| {
                        Error::Rendezvous(format!(
                            "waiting for rank {r} to report it was done (at most {:?}): {e}",
                            self.timeout
                        ))
                    })?;
            }
            Ok(())
        } else {
            self.set("done", 1, b"1")
        }
    }

    /// Put `val` under `key` (this rank's) for `readers` reads (it is dropped after the last).
    pub fn set(&self, key: &str, readers: u32, val: &[u8]) -> Result<()> {
        self.in_step()?;
        let mut c = self
            .conn
            .lock()
            .map_err(|_| Error::Rendezvous("store connection poisoned".into()))?;
        let w = &mut c.1;
        w.write_all(&[SET])
            .and_then(|_| w.write_all(&(key.len() as u32).to_le_bytes()))
            .and_then(|_| w.write_all(key.as_bytes()))
            .and_then(|_| w.write_all(&readers.to_le_bytes()))
            .and_then(|_| w.write_all(&(val.len() as u64).to_le_bytes()))
            .and_then(|_| w.write_all(val))
            .and_then(|_| w.flush())
            .map_err(|e| conn_err("set", e))?;
        read_reply(&mut c.0).map(|_| ())
    }

    /// How long a read may wait for another rank once the ranks have exchanged anything
    /// (default `PARALLAX_COLLECTIVE_TIMEOUT_S`, 30 s; `None`: for ever). Tests shorten it.
    #[cfg(test)]
    pub(crate) fn set_stall_timeout(&self, t: Option<Duration>) {
        if let Ok(mut s) = self.stall.lock() {
            *s = t;
        }
    }

    /// The value rank `from` put under `key`, waiting until it does; an error once any rank has
    /// disconnected before saying it was done, since the value may never come, and once the
    /// stall timeout has passed (after the first exchange), since a rank is then stuck.
    pub fn get(&self, key: &str, from: usize) -> Result<Vec<u8>> {
        let stall = if self.armed.load(Ordering::SeqCst) {
            self.stall.lock().ok().and_then(|s| *s)
        } else {
            None
        };
        let v = self.get_within(key, stall, from)?;
        self.armed.store(true, Ordering::SeqCst);
        Ok(v)
    }

    /// [`Store::get`] waiting at most `stall` (`None`: for ever).
    fn get_within(&self, key: &str, stall: Option<Duration>, from: usize) -> Result<Vec<u8>> {
        self.in_step()?;
        let mut c = self
            .conn
            .lock()
            .map_err(|_| Error::Rendezvous("store connection poisoned".into()))?;
        let w = &mut c.1;
        w.write_all(&[GET])
            .and_then(|_| w.write_all(&(from as u32).to_le_bytes()))
            .and_then(|_| w.write_all(&(key.len() as u32).to_le_bytes()))
            .and_then(|_| w.write_all(key.as_bytes()))
            .and_then(|_| w.flush())
            .map_err(|e| conn_err("get", e))?;
        let _ = c.0.get_ref().set_read_timeout(stall);
        let t0 = std::time::Instant::now();
        let r = read_reply(&mut c.0);
        if stall.is_some() {
            let _ = c.0.get_ref().set_read_timeout(None);
        }
        match (r, stall) {
            (Ok(v), _) => Ok(v),
            (Err(_), Some(t)) if t0.elapsed() >= t => {
                let msg = format!(
                    "rank {}: nothing came from rank {from} for `{key}` within {:.1} s: rank \
                     {from} is lost or stuck",
                    self.rank,
                    t.as_secs_f64()
                );
                // The reply may still come: this connection is out of step for good.
                if let Ok(mut o) = self.out_of_step.lock() {
                    o.get_or_insert_with(|| msg.clone());
                }
                Err(Error::Rendezvous(msg))
            }
            (Err(e), _) => Err(e),
        }
    }
}

/// Connect to the store at `addr` and pass its handshake as `rank` of `world`, retrying (rank 0
/// not up yet, its token file not there yet or an older job's) for `timeout`.
fn join(
    addr: &str,
    rank: usize,
    world: usize,
    timeout: Duration,
    secret: &Secret,
) -> Result<TcpStream> {
    let t0 = Instant::now();
    loop {
        let attempt = secret.token().and_then(|token| {
            let mut s = TcpStream::connect(addr).map_err(|e| io_err("connect", e))?;
            let left = timeout
                .saturating_sub(t0.elapsed())
                .max(Duration::from_secs(1));
            let _ = s.set_read_timeout(Some(left));
            let out = store_auth::join(&mut s, &token, rank, world)
                .map_err(|e| conn_err("handshake", e))?;
            let _ = s.set_read_timeout(None);
            Ok((s, out))
        });
        let why = match attempt {
            Ok((s, Outcome::Accepted)) => return Ok(s),
            Ok((_, Outcome::Refused(m)))
                if !(matches!(secret, Secret::LocalFile(_)) && m.contains("authentication")) =>
            {
                return Err(Error::Rendezvous(format!(
                    "rendezvous at {addr}: rank 0's store refused rank {rank}: {m}"
                )))
            }
            Ok((_, Outcome::NotTheStore(m))) => {
                return Err(Error::Rendezvous(format!("rendezvous at {addr}: {m}")))
            }
            Ok((_, Outcome::Refused(m))) => m,
            Err(e) => e.to_string(),
        };
        if t0.elapsed() >= timeout {
            return Err(Error::Rendezvous(format!(
                "rendezvous: rank 0 never answered rank {rank} at {addr} within {:.0} s ({why})",
                timeout.as_secs_f64()
            )));
        }
        tracing::debug!("rank {rank}: waiting for rank 0 at {addr}: {why}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn read_reply(r: &mut impl Read) -> Result<Vec<u8>> {
    let mut n = [0u8; 8];
    r.read_exact(&mut n).map_err(|e| conn_err("reply", e))?;
    let len = u64::from_le_bytes(n);
    let bad =
        |e: String| Error::Rendezvous(format!("rendezvous: a malformed reply from the store: {e}"));
    if len != FAILED {
        return store_server::read_bounded(r, len, MAX_VALUE, "value").map_err(bad);
    }
    r.read_exact(&mut n)
        .map_err(|e| conn_err("error reply", e))?;
    let msg = store_server::read_bounded(r, u64::from_le_bytes(n), MAX_MESSAGE, "message")
        .map_err(bad)?;
    Err(Error::Rendezvous(format!(
        "rendezvous: {}",
        String::from_utf8_lossy(&msg)
    )))
}

fn encode(t: &Tensor) -> candle_core::Result<Vec<u8>> {
    let tag = match t.dtype() {
        DType::F32 => 0u8,
        DType::BF16 => 1,
        DType::F16 => 2,
        other => candle_core::bail!("the store communicator carries float tensors, not {other:?}"),
    };
    let dims = t.dims();
    let mut out = vec![tag, dims.len() as u8];
    for d in dims {
        out.extend((*d as u64).to_le_bytes());
    }
    // bf16 and f16 widen to f32 exactly and narrow back exactly.
    for v in t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()? {
        out.extend(v.to_le_bytes());
    }
    Ok(out)
}

fn decode(b: &[u8], device: &Device) -> candle_core::Result<Tensor> {
    let bad = || candle_core::Error::Msg("store communicator: malformed tensor".into());
    let (&tag, rest) = b.split_first().ok_or_else(bad)?;
    let (&rank, mut rest) = rest.split_first().ok_or_else(bad)?;
    let mut dims = Vec::with_capacity(rank as usize);
    for _ in 0..rank {
        let (d, r) = rest.split_at_checked(8).ok_or_else(bad)?;
        dims.push(u64::from_le_bytes(d.try_into().map_err(|_| bad())?) as usize);
        rest = r;
    }
    let len = dims
        .iter()
        .try_fold(4usize, |n, &d| n.checked_mul(d))
        .ok_or_else(bad)?;
    if rest.len() != len {
        return Err(bad());
    }
    let vals: Vec<f32> = rest
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let dtype = match tag {
        0 => DType::F32,
        1 => DType::BF16,
        2 => DType::F16,
        _ => return Err(bad()),
    };
    Tensor::from_vec(vals, dims, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)
}

/// A communicator over the store for one group of ranks (global ranks `members`, this process at
/// `members[rank]`). Reductions add in rank order, as [`super::comm::LocalComm`] does, so a
/// multi-process run equals the same layout on in-process worker threads bit for bit.
pub struct StoreComm {
    store: Arc<Store>,
    members: Vec<usize>,
    rank: usize,
    tag: String,
    seq: AtomicU64,
    p2p: Mutex<HashMap<(usize, usize), u64>>,
    device: Device,
}

impl StoreComm {
    /// `name` must be the same on every member and unique among the process's groups.
    pub fn new(store: Arc<Store>, name: &str, members: Vec<usize>) -> Result<Self> {
        let rank = members
            .iter()
            .position(|&m| m == store.rank())
            .ok_or_else(|| {
                Error::Rendezvous(format!(
                    "rank {} is not in group {name} {members:?}",
                    store.rank()
                ))
            })?;
        Ok(Self {
            tag: format!("{name}{members:?}"),
            store,
            members,
            rank,
            seq: AtomicU64::new(0),
            p2p: Mutex::new(HashMap::new()),
            device: Device::Cpu,
        })
    }

    fn next(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    fn put(&self, key: &str, readers: usize, t: &Tensor) -> candle_core::Result<()> {
        self.store
            .set(key, readers as u32, &encode(t)?)
            .map_err(crate::Error::into_candle)
    }

    /// The tensor under `key`, which group member `from` puts there.
    fn take(&self, key: &str, from: usize) -> candle_core::Result<Tensor> {
        let rank = self.members.get(from).copied().ok_or_else(|| {
            candle_core::Error::Msg(format!("no member {from} in group {}", self.tag))
        })?;
        let b = self
            .store
            .get(key, rank)
            .map_err(crate::Error::into_candle)?;
        decode(&b, &self.device)
    }

    fn gather_all(&self, t: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        let n = self.size();
        let s = self.next();
        self.put(&format!("{}/c{s}/{}", self.tag, self.rank), n - 1, t)?;
        (0..n)
            .map(|j| {
                if j == self.rank {
                    Ok(t.clone())
                } else {
                    self.take(&format!("{}/c{s}/{j}", self.tag), j)
                }
            })
            .collect()
    }
}

impl Communicator for StoreComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    fn all_gather(&self, t: &Tensor, dim: usize) -> candle_core::Result<Tensor> {
        Tensor::cat(&self.gather_all(t)?, dim)
    }

    fn all_to_all(
        &self,
        t: &Tensor,
        scatter_dim: usize,
        gather_dim: usize,
    ) -> candle_core::Result<Tensor> {
        let n = self.size();
        let len = t.dim(scatter_dim)?;
        if len % n != 0 {
            candle_core::bail!(
                "all_to_all: dim {scatter_dim} of size {len} does not split into {n}"
            );
        }
        let chunk = len / n;
        let s = self.next();
        for j in 0..n {
            if j != self.rank {
                let part = t.narrow(scatter_dim, j * chunk, chunk)?.contiguous()?;
                self.put(&format!("{}/c{s}/{}->{j}", self.tag, self.rank), 1, &part)?;
            }
        }
        let parts = (0..n)
            .map(|j| {
                if j == self.rank {
                    t.narrow(scatter_dim, j * chunk, chunk)?.contiguous()
                } else {
                    self.take(&format!("{}/c{s}/{j}->{}", self.tag, self.rank), j)
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, gather_dim)
    }

    fn all_reduce_sum(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        let parts = self.gather_all(t)?;
        let mut acc = parts[0].clone();
        for p in &parts[1..] {
            acc = (acc + p)?;
        }
        Ok(acc)
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> candle_core::Result<Tensor> {
        let s = self.next();
        let key = format!("{}/c{s}/b", self.tag);
        if self.rank == root {
            if self.size() > 1 {
                self.put(&key, self.size() - 1, t)?;
            }
            Ok(t.clone())
        } else {
            self.take(&key, root)
        }
    }

    fn send(&self, t: &Tensor, to: usize) -> candle_core::Result<()> {
        let k = {
            let mut m = self
                .p2p
                .lock()
                .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
            let c = m.entry((self.rank, to)).or_insert(0);
            *c += 1;
            *c
        };
        self.put(&format!("{}/p{}->{to}/{k}", self.tag, self.rank), 1, t)
    }

    fn recv(&self, from: usize) -> candle_core::Result<Tensor> {
        let k = {
            let mut m = self
                .p2p
                .lock()
                .map_err(|_| candle_core::Error::Msg("poisoned".into()))?;
            let c = m.entry((from, self.rank)).or_insert(0);
            *c += 1;
            *c
        };
        self.take(&format!("{}/p{from}->{}/{k}", self.tag, self.rank), from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::comm::LocalComm;

    /// Three "processes" (threads with their own connections) against one store: every
    /// collective equals the in-process communicator's result.
    #[test]
    fn store_collectives_equal_the_local_ones() {
        let init = free_init();
        let world = 3;
        let local = LocalComm::group(world);
        let results: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..world)
                .zip(local)
                .map(|(rank, lc)| {
                    let init = init.clone();
                    s.spawn(move || -> candle_core::Result<Vec<Tensor>> {
                        let store =
                            Store::connect(&init, rank, world, Duration::from_secs(20), None)
                                .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                        let sc = StoreComm::new(store.clone(), "world", vec![0, 1, 2])
                            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                        let t = Tensor::arange(0f32, 12.0, &Device::Cpu)?
                            .reshape((2, 6))?
                            .affine(1.0, rank as f64 * 100.0)?
                            .to_dtype(DType::BF16)?;
                        let mut out = Vec::new();
                        for c in [&sc as &dyn Communicator, &lc as &dyn Communicator] {
                            out.push(c.all_gather(&t, 0)?);
                            out.push(c.all_to_all(&t, 1, 0)?);
                            out.push(c.all_reduce_sum(&t)?);
                            out.push(c.broadcast(&t, 2)?);
                            c.send(&t, (rank + 1) % world)?;
                            out.push(c.recv((rank + world - 1) % world)?);
                        }
                        store
                            .finish()
                            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                        Ok(out)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("thread")).collect()
        });
        for r in results {
            let r = r.expect("collectives");
            let (store, local) = r.split_at(5);
            for (a, b) in store.iter().zip(local) {
                assert_eq!(a.dtype(), DType::BF16);
                assert_eq!(a.dims(), b.dims());
                let d = (a.to_dtype(DType::F32).expect("f32")
                    - b.to_dtype(DType::F32).expect("f32"))
                .expect("sub")
                .abs()
                .expect("abs")
                .max_all()
                .expect("max")
                .to_scalar::<f32>()
                .expect("scalar");
                assert_eq!(d, 0.0);
            }
        }
    }

    fn free_init() -> String {
        let l = TcpListener::bind("127.0.0.1:0").expect("free port");
        format!("tcp://127.0.0.1:{}", l.local_addr().expect("addr").port())
    }

    #[test]
    fn a_rank_that_never_joins_is_named_after_the_timeout() {
        let err = Store::connect(&free_init(), 0, 2, Duration::from_millis(300), None)
            .expect_err("rank 1 never starts");
        let msg = err.to_string();
        assert!(
            msg.contains("waiting for all 2 ranks to join") && msg.contains("rank 1 is lost"),
            "{msg}"
        );
    }

    /// Ranks 0 and 1 of a world of two, connected.
    fn two_ranks() -> (Arc<Store>, Arc<Store>) {
        let init = free_init();
        let t = Duration::from_secs(20);
        std::thread::scope(|s| {
            let one = s.spawn(|| Store::connect(&init, 1, 2, t, None));
            let zero = Store::connect(&init, 0, 2, t, None).expect("rank 0");
            (zero, one.join().expect("thread").expect("rank 1"))
        })
    }

    #[test]
    fn a_rank_that_leaves_early_fails_the_reads_waiting_on_it() {
        let (zero, one) = two_ranks();
        let waiting = std::thread::spawn(move || zero.get("never-set", 1));
        // Rank 1 goes away without `finish`: rank 0's read must fail, not hang.
        drop(one);
        let msg = waiting
            .join()
            .expect("thread")
            .expect_err("the value can never come")
            .to_string();
        assert!(
            msg.contains("rank 1 disconnected before it was done"),
            "{msg}"
        );
    }

    /// Ranks that finish properly at different times are not mistaken for lost ones (the server
    /// tells ranks apart by what they set, not by what they read): world 3, many rounds.
    #[test]
    fn ranks_finishing_early_are_not_reported_lost() {
        for _ in 0..20 {
            let init = free_init();
            let world = 3;
            let results: Vec<Result<()>> = std::thread::scope(|s| {
                let hs: Vec<_> = (0..world)
                    .map(|rank| {
                        let init = init.clone();
                        s.spawn(move || -> Result<()> {
                            let store =
                                Store::connect(&init, rank, world, Duration::from_secs(20), None)?;
                            // A ring exchange, then done; rank 1 leaves first.
                            store.set("x", 1, &[rank as u8])?;
                            store.get("x", (rank + world - 1) % world)?;
                            if rank != 1 {
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            store.finish()
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().expect("thread")).collect()
            });
            for r in results {
                r.expect("every rank finishes");
            }
        }
    }

    #[test]
    fn a_stalled_rank_fails_the_reads_waiting_on_it_after_the_stall_timeout() {
        let (zero, one) = two_ranks();
        zero.set_stall_timeout(Some(Duration::from_millis(300)));
        // A first exchange (the ranks have met), then rank 1 stays connected but silent.
        one.set("x/1", 1, b"1").expect("set");
        zero.get("x/1", 1).expect("get");
        let t0 = std::time::Instant::now();
        let msg = zero
            .get("from-rank-1", 1)
            .expect_err("rank 1 is stuck")
            .to_string();
        assert!(msg.contains("rank 1 is lost or stuck"), "{msg}");
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        drop(one);
    }

    /// A communicator's read names the member it waits for; after the timeout the connection is
    /// refused rather than read out of step (the late reply would be taken for the next one's).
    #[test]
    fn a_stalled_member_is_named_and_the_connection_is_then_refused() {
        let (zero, one) = two_ranks();
        zero.set_stall_timeout(Some(Duration::from_millis(300)));
        one.set("x/1", 1, b"1").expect("set");
        zero.get("x/1", 1).expect("get");
        let comm = StoreComm::new(zero.clone(), "g", vec![0, 1]).expect("group");
        let msg = comm.recv(1).expect_err("rank 1 sends nothing").to_string();
        assert!(
            msg.contains("from rank 1") && msg.contains("rank 1 is lost or stuck"),
            "{msg}"
        );
        // Rank 1 wakes and sends after all: rank 0 does not take it for a later reply.
        one.set("late", 1, b"late").expect("set");
        let msg = zero.get("late", 1).expect_err("out of step").to_string();
        assert!(msg.contains("unusable after an earlier timeout"), "{msg}");
        drop(one);
    }

    /// Ranks 0 and 1 of a world of two on `init` with `token`.
    fn two_ranks_with(init: &str, token: &Token) -> (Arc<Store>, Arc<Store>) {
        let t = Duration::from_secs(20);
        std::thread::scope(|s| {
            let one = s.spawn(|| Store::connect(init, 1, 2, t, Some(token.clone())));
            let zero = Store::connect(init, 0, 2, t, Some(token.clone())).expect("rank 0");
            (zero, one.join().expect("thread").expect("rank 1"))
        })
    }

    /// A stranger without the token, and a second process claiming a rank already taken, are
    /// refused with a message saying why; the job's own ranks go on.
    #[test]
    fn strangers_and_second_claims_are_refused() {
        let init = free_init();
        let token = Token::generate().expect("token");
        let (zero, one) = two_ranks_with(&init, &token);
        let t = Duration::from_secs(2);
        let stranger = Token::generate().expect("token");
        let msg = Store::connect(&init, 1, 2, t, Some(stranger))
            .expect_err("wrong token")
            .to_string();
        assert!(msg.contains("failed authentication"), "{msg}");
        let msg = Store::connect(&init, 1, 2, t, Some(token.clone()))
            .expect_err("rank 1 is taken")
            .to_string();
        assert!(msg.contains("rank 1 has already joined this job"), "{msg}");
        // The job's ranks still exchange.
        one.set("x", 1, b"from 1").expect("set");
        assert_eq!(zero.get("x", 1).expect("get"), b"from 1");
    }

    /// What a rank sets is its own: rank 1 setting `seed` does not change the seed rank 0 set,
    /// and a read names the rank whose value it wants.
    #[test]
    fn a_rank_cannot_overwrite_another_ranks_values() {
        let (zero, one) = two_ranks();
        zero.set("seed", 2, &5u64.to_le_bytes()).expect("set");
        one.set("seed", 1, &6u64.to_le_bytes()).expect("set");
        assert_eq!(one.get("seed", 0).expect("get"), 5u64.to_le_bytes());
        assert_eq!(zero.get("seed", 0).expect("get"), 5u64.to_le_bytes());
        assert_eq!(zero.get("seed", 1).expect("get"), 6u64.to_le_bytes());
    }

    /// A rank started with another --world is refused, and rank 0, waiting for the ranks to
    /// join, fails at once saying so (not at its timeout).
    #[test]
    fn a_world_mismatch_fails_the_rendezvous_at_once() {
        let init = free_init();
        let token = Token::generate().expect("token");
        let t0 = Instant::now();
        let (zero, one) = std::thread::scope(|s| {
            let one = s.spawn(|| {
                Store::connect(&init, 1, 3, Duration::from_secs(20), Some(token.clone()))
            });
            let zero = Store::connect(&init, 0, 2, Duration::from_secs(20), Some(token.clone()));
            (zero, one.join().expect("thread"))
        });
        for e in [zero.expect_err("rank 0"), one.expect_err("rank 1")] {
            let msg = e.to_string();
            assert!(
                msg.contains("rank 1 was started with --world 3, rank 0 with --world 2"),
                "{msg}"
            );
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "{:?}", t0.elapsed());
    }

    #[test]
    fn bad_init_and_rank_are_refused() {
        assert!(parse_init("127.0.0.1:1").is_err());
        assert!(parse_init("tcp://127.0.0.1:port").is_err());
        assert!(
            Store::connect("tcp://127.0.0.1:1", 3, 2, Duration::from_millis(10), None).is_err()
        );
    }
}
