//! [`NcclComm`]: the [`Communicator`] for GPUs, on NCCL through cudarc's `nccl` module.
//!
//! One communicator per GPU (rank), each used by one worker thread; every collective is enqueued
//! on the candle device's own stream, so it is ordered with the kernels before and after it and
//! nothing waits on the host except [`NcclComm::recv`]/[`Communicator::exchange`], which read the
//! shapes of what arrives. Tensors of any layout and of the dtypes NCCL has (f32, f64, bf16, f16,
//! u8, u32, i64) are accepted; results are fresh contiguous tensors on the same device.
//!
//! Two ways to build a group:
//! - [`NcclComm::new_group`]: one process, one communicator per device (one worker thread per GPU);
//! - [`NcclComm::from_unique_id`]: one rank of a group spread over processes or machines, with the
//!   [`UniqueId`] that rank 0 made ([`UniqueId::new`]) and handed to the others (its 128 bytes);
//!   [`NcclComm::from_store`] does the handing over through the rendezvous [`Store`] of
//!   `parallax worker` (the group's first member makes the id, the others read it).
//!
//! Point to point: NCCL's send only completes when the peer receives, so a lone
//! [`Communicator::send`] blocks the sender's stream until then, and ranks that all send before
//! they receive (a ring) would wait on each other. [`Communicator::exchange`] sends and receives
//! as one NCCL group and has no such order problem: the strategies use it.
//!
//! Failures: NCCL's collectives wait on the GPU, where no host timeout reaches, so a peer that
//! dies mid-run would leave this rank's stream (and the host, at its next read) waiting for ever.
//! Each communicator has a watchdog thread ([`super::comm::spawn_watchdog`]) that watches an
//! event recorded after every operation and `ncclCommGetAsyncError`: an operation unfinished past
//! `PARALLAX_COLLECTIVE_TIMEOUT_S` (30 s by default), or an error NCCL reports, aborts the group
//! (`ncclCommAbort`, as [`Communicator::abort`] does): the stuck kernels stop, and this and every
//! later call fails with the reason. An aborted group is not reused: the next job needs a new one.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::backend::BackendDevice;
use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaStream, DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::cudarc::nccl::{result, sys};
use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Result, Shape, Storage, Tensor};

use super::comm::Communicator;
use super::store::Store;

/// The 128-byte identifier that ties the ranks of one NCCL group together: made once (on rank 0,
/// [`UniqueId::new`]) and given to every rank.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct UniqueId([u8; 128]);

impl std::fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UniqueId({:02x?}..)", &self.0[..8])
    }
}

impl UniqueId {
    /// A new identifier (NCCL's `ncclGetUniqueId`; on rank 0).
    pub fn new() -> Result<Self> {
        let id = result::get_uniqueid().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
        let mut bytes = [0u8; 128];
        for (b, c) in bytes.iter_mut().zip(id.internal.iter()) {
            *b = *c as u8;
        }
        Ok(Self(bytes))
    }

    /// The identifier's bytes, to send to the other ranks.
    pub fn as_bytes(&self) -> &[u8; 128] {
        &self.0
    }

    /// An identifier received from rank 0 (exactly 128 bytes).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let arr: [u8; 128] = bytes.try_into().map_err(|_| {
            candle_core::Error::Msg(format!(
                "an NCCL unique id has 128 bytes, got {}",
                bytes.len()
            ))
        })?;
        Ok(Self(arr))
    }

    fn raw(&self) -> sys::ncclUniqueId {
        let mut internal = [0 as std::ffi::c_char; 128];
        for (c, b) in internal.iter_mut().zip(self.0.iter()) {
            *c = *b as std::ffi::c_char;
        }
        sys::ncclUniqueId { internal }
    }
}

fn nccl_err(what: &str, e: result::NcclError) -> candle_core::Error {
    candle_core::Error::Msg(format!("NCCL {what} failed: {:?}", e.0))
}

/// One rank of an NCCL group, on one GPU.
pub struct NcclComm {
    comm: sys::ncclComm_t,
    device: CudaDevice,
    stream: Arc<CudaStream>,
    rank: usize,
    size: usize,
    /// The communicator's lifetime: its lock, its abort, what is in flight on it; shared with
    /// its watchdog thread.
    guard: Arc<CommGuard>,
}

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not run
// concurrently, which `guard.calls` ensures; the device and stream handles are themselves
// Send + Sync.
unsafe impl Send for NcclComm {}
// SAFETY: as above: every use of `comm` holds `guard.calls` (see `CommGuard` for the abort).
unsafe impl Sync for NcclComm {}

/// How long [`CommGuard::abort`] waits for a call in progress to leave the communicator before it
/// aborts anyway: a call holding the lock that long is stuck on a peer (in NCCL, or on the host
/// waiting for the stream), and aborting is what unsticks it.
const ABORT_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// What an [`NcclComm`] shares with its watchdog ([`super::comm::spawn_watchdog`]): the raw
/// communicator, released exactly once (`ncclCommAbort`, by [`CommGuard::release`]: an abort,
/// or the communicator's drop), the reason it was aborted, and the events recorded after each
/// operation enqueued on the stream.
///
/// Abort and NCCL calls: every call on `comm` holds `calls` and checks first that the group is
/// not aborted; the abort records its reason, then takes `calls` (waiting at most
/// [`ABORT_GRACE`]) before releasing, so it never overlaps a call, except one that is stuck past
/// the grace (inside NCCL, or holding the lock while the host waits on the stream), which is the
/// case `ncclCommAbort` exists for: its kernels are stopped and the call returns, to find the
/// group aborted.
struct CommGuard {
    comm: sys::ncclComm_t,
    rank: usize,
    size: usize,
    calls: Mutex<()>,
    /// `true` once `ncclCommAbort` has run: `comm` is freed and must not be used again.
    released: Mutex<bool>,
    why: Mutex<Option<String>>,
    inflight: super::comm::Inflight<CudaEvent>,
}

// SAFETY: `comm` is only passed to NCCL under the rules above (`calls` for operations,
// `released` for the abort and the error query, which NCCL allows from another thread).
unsafe impl Send for CommGuard {}
// SAFETY: as above.
unsafe impl Sync for CommGuard {}

impl CommGuard {
    /// An error once the group has been aborted.
    fn live(&self) -> Result<()> {
        match &*self.why.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(why) => Err(candle_core::Error::Msg(format!(
                "collective aborted: {why}"
            ))),
            None => Ok(()),
        }
    }

    fn aborted(&self) -> bool {
        self.why.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// `ncclCommAbort`, once: later calls (a second abort, the drop) do nothing.
    fn release(&self) {
        let mut released = self.released.lock().unwrap_or_else(|p| p.into_inner());
        if *released {
            return;
        }
        *released = true;
        // SAFETY: `comm` came from ncclCommInitRank and is released once, here (the flag above,
        // under its lock); nothing passes it to NCCL afterwards (`live` fails first).
        if let Err(e) = unsafe { result::comm_abort(self.comm) } {
            tracing::warn!("releasing NCCL rank {}: {:?}", self.rank, e.0);
        }
    }

    /// Give up on the group: the reason first (so no new call starts), then `ncclCommAbort`,
    /// which stops what is in flight on every stream of this rank.
    fn abort(&self, why: &str) {
        {
            let mut w = self.why.lock().unwrap_or_else(|p| p.into_inner());
            if w.is_some() {
                return;
            }
            *w = Some(why.to_string());
        }
        tracing::warn!("aborting NCCL rank {} of {}: {why}", self.rank, self.size);
        let t0 = std::time::Instant::now();
        let held = loop {
            match self.calls.try_lock() {
                Ok(g) => break Some(g),
                Err(std::sync::TryLockError::Poisoned(p)) => break Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) if t0.elapsed() < ABORT_GRACE => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(std::sync::TryLockError::WouldBlock) => break None,
            }
        };
        self.release();
        drop(held);
    }

    /// The error NCCL reports for this communicator, if any (a peer's failure, a network error);
    /// `None` also once released.
    fn async_error(&self) -> Option<sys::ncclResult_t> {
        let released = self.released.lock().unwrap_or_else(|p| p.into_inner());
        if *released {
            return None;
        }
        let mut err = sys::ncclResult_t::ncclSuccess;
        // SAFETY: `comm` is not released (checked under the lock that guards the release);
        // NCCL allows this query while other calls on the communicator are in progress.
        let r = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut err) };
        match (r, err) {
            (sys::ncclResult_t::ncclSuccess, sys::ncclResult_t::ncclSuccess)
            | (sys::ncclResult_t::ncclSuccess, sys::ncclResult_t::ncclInProgress) => None,
            (sys::ncclResult_t::ncclSuccess, e) => Some(e),
            (e, _) => Some(e),
        }
    }
}

impl super::comm::Watched for CommGuard {
    fn check(&self, timeout: std::time::Duration) -> Option<String> {
        if let Some(e) = self.async_error() {
            return Some(format!(
                "NCCL reported {e:?} on rank {} of {} (a peer failed or the link is down)",
                self.rank, self.size
            ));
        }
        // An event that errs (a sticky CUDA error) will not complete either: counted as done
        // here, the error surfaces on the stream's next use.
        let wait = self.inflight.oldest_wait(std::time::Instant::now(), |ev| {
            !matches!(ev.try_is_complete(), Ok(false))
        })?;
        (wait >= timeout).then(|| {
            format!(
                "rank {} of {}: an NCCL operation did not complete within {:.1} s (a peer is \
                 lost or stuck)",
                self.rank,
                self.size,
                wait.as_secs_f64()
            )
        })
    }

    fn give_up(&self, why: &str) {
        self.abort(why);
    }

    fn given_up(&self) -> bool {
        self.aborted()
    }
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NcclComm(rank {} of {}, cuda:{})",
            self.rank,
            self.size,
            self.stream.context().ordinal()
        )
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // Let the work this thread queued finish (its own per-thread stream; rank threads sync
        // their own before returning; the watchdog still runs meanwhile, so a stuck collective
        // is aborted rather than waited for), then release the communicator (abort does not wait
        // on peers that may already be gone). Nothing to wait for once aborted.
        if !self.guard.aborted() {
            let _ = self.stream.synchronize();
        }
        self.guard.release();
    }
}

/// The NCCL element type of a candle dtype, if NCCL has one.
pub fn nccl_dtype(dtype: DType) -> Result<sys::ncclDataType_t> {
    use sys::ncclDataType_t as T;
    Ok(match dtype {
        DType::F32 => T::ncclFloat32,
        DType::F64 => T::ncclFloat64,
        DType::BF16 => T::ncclBfloat16,
        DType::F16 => T::ncclFloat16,
        DType::U8 => T::ncclUint8,
        DType::U32 => T::ncclUint32,
        DType::I64 => T::ncclInt64,
        DType::I32 => T::ncclInt32,
        other => candle_core::bail!("NCCL cannot move {other:?} tensors"),
    })
}

/// The device address of element `offset` of a storage slice, for a read on `stream`.
fn read_ptr(slice: &CudaStorageSlice, offset: usize, stream: &CudaStream) -> Result<u64> {
    macro_rules! ptr {
        ($s:expr, $t:ty) => {{
            let (p, _record) = $s.device_ptr(stream);
            p + (offset * std::mem::size_of::<$t>()) as u64
        }};
    }
    Ok(match slice {
        CudaStorageSlice::F32(s) => ptr!(s, f32),
        CudaStorageSlice::F64(s) => ptr!(s, f64),
        CudaStorageSlice::BF16(s) => ptr!(s, half::bf16),
        CudaStorageSlice::F16(s) => ptr!(s, half::f16),
        CudaStorageSlice::U8(s) => ptr!(s, u8),
        CudaStorageSlice::U32(s) => ptr!(s, u32),
        CudaStorageSlice::I64(s) => ptr!(s, i64),
        CudaStorageSlice::I32(s) => ptr!(s, i32),
        _ => candle_core::bail!("NCCL cannot move this dtype"),
    })
}

/// The device address of a fresh storage, for a write on `stream`.
fn write_ptr(slice: &mut CudaStorageSlice, stream: &CudaStream) -> Result<u64> {
    macro_rules! ptr {
        ($s:expr) => {{
            let (p, _record) = $s.device_ptr_mut(stream);
            p
        }};
    }
    Ok(match slice {
        CudaStorageSlice::F32(s) => ptr!(s),
        CudaStorageSlice::F64(s) => ptr!(s),
        CudaStorageSlice::BF16(s) => ptr!(s),
        CudaStorageSlice::F16(s) => ptr!(s),
        CudaStorageSlice::U8(s) => ptr!(s),
        CudaStorageSlice::U32(s) => ptr!(s),
        CudaStorageSlice::I64(s) => ptr!(s),
        CudaStorageSlice::I32(s) => ptr!(s),
        _ => candle_core::bail!("NCCL cannot move this dtype"),
    })
}

/// A contiguous tensor on `dev`, its storage not yet written (NCCL writes it).
struct Fresh {
    storage: CudaStorage,
    shape: Shape,
}

impl Fresh {
    fn new(dev: &CudaDevice, shape: impl Into<Shape>, dtype: DType) -> Result<Self> {
        let shape = shape.into();
        nccl_dtype(dtype)?;
        // SAFETY: every element is written by the NCCL call this buffer is made for, before the
        // tensor is read (both on the device's stream).
        let storage = unsafe { dev.alloc_uninit(&shape, dtype)? };
        Ok(Self { storage, shape })
    }

    fn ptr(&mut self, stream: &CudaStream) -> Result<u64> {
        write_ptr(&mut self.storage.slice, stream)
    }

    fn into_tensor(self) -> Tensor {
        Tensor::from_storage(
            Storage::Cuda(self.storage),
            self.shape,
            BackpropOp::none(),
            false,
        )
    }
}

/// Dtype codes for the shape headers [`NcclComm`] sends ahead of point-to-point payloads.
const HEADER_DTYPES: [DType; 8] = [
    DType::F32,
    DType::F64,
    DType::BF16,
    DType::F16,
    DType::U8,
    DType::U32,
    DType::I64,
    DType::I32,
];
/// Header: dtype code, rank, then up to 8 dims.
const HEADER_LEN: usize = 10;

fn header(t: &Tensor) -> Result<[i64; HEADER_LEN]> {
    let code = HEADER_DTYPES
        .iter()
        .position(|&d| d == t.dtype())
        .ok_or_else(|| {
            candle_core::Error::Msg(format!("NCCL cannot move {:?} tensors", t.dtype()))
        })?;
    if t.rank() > HEADER_LEN - 2 {
        candle_core::bail!(
            "NCCL send takes tensors of rank 8 at most, got {:?}",
            t.dims()
        );
    }
    let mut h = [0i64; HEADER_LEN];
    h[0] = code as i64;
    h[1] = t.rank() as i64;
    for (i, &d) in t.dims().iter().enumerate() {
        h[2 + i] = d as i64;
    }
    Ok(h)
}

fn parse_header(h: &[i64]) -> Result<(DType, Vec<usize>)> {
    let bad = || candle_core::Error::Msg(format!("bad NCCL message header {h:?}"));
    let code = usize::try_from(*h.first().ok_or_else(bad)?).map_err(|_| bad())?;
    let dtype = *HEADER_DTYPES.get(code).ok_or_else(bad)?;
    let rank = usize::try_from(*h.get(1).ok_or_else(bad)?).map_err(|_| bad())?;
    if rank > HEADER_LEN - 2 || h.len() < 2 + rank {
        return Err(bad());
    }
    let dims = h[2..2 + rank]
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| bad()))
        .collect::<Result<Vec<_>>>()?;
    Ok((dtype, dims))
}

/// Ends an NCCL group when dropped (also on an early error return inside the group).
struct Group;

impl Group {
    fn start() -> Result<Self> {
        result::group_start().map_err(|e| nccl_err("ncclGroupStart", e))?;
        Ok(Group)
    }

    fn end(self) -> Result<()> {
        std::mem::forget(self);
        result::group_end().map_err(|e| nccl_err("ncclGroupEnd", e))?;
        Ok(())
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let _ = result::group_end();
    }
}

impl NcclComm {
    /// One communicator per device of `devices` (one process; give each to its own worker
    /// thread): rank i is `devices[i]`. Every device must be a different GPU (NCCL refuses two
    /// ranks on one GPU).
    pub fn new_group(devices: &[Device]) -> Result<Vec<NcclComm>> {
        if devices.is_empty() {
            candle_core::bail!("an NCCL group needs at least one device");
        }
        let id = UniqueId::new()?;
        let n = devices.len();
        // ncclCommInitRank waits for every rank of the group: one thread per rank.
        std::thread::scope(|s| {
            let handles: Vec<_> = devices
                .iter()
                .enumerate()
                .map(|(rank, dev)| s.spawn(move || NcclComm::from_unique_id(&id, rank, n, dev)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().map_err(|_| {
                        candle_core::Error::Msg("an NCCL set-up thread panicked".into())
                    })?
                })
                .collect()
        })
    }

    /// This process's communicator in the group of global ranks `members` (spread over
    /// processes, one GPU each), on `device`: the first member makes the group's [`UniqueId`] and
    /// puts it in `store` under a key made of `name` and the members, the others read it there;
    /// then every member joins (waiting for all of them). Every member must call this with the
    /// same `name` and `members`, and groups must be made in the same order on every process.
    pub fn from_store(
        store: &Store,
        name: &str,
        members: &[usize],
        device: &Device,
    ) -> Result<NcclComm> {
        let me = store.rank();
        let index = members.iter().position(|&m| m == me).ok_or_else(|| {
            candle_core::Error::Msg(format!("rank {me} is not in group {name} {members:?}"))
        })?;
        let key = format!("nccl-id/{name}/{members:?}");
        let store_err =
            |e: crate::Error| candle_core::Error::Msg(format!("NCCL id for {key}: {e}"));
        let id = if index == 0 {
            let id = UniqueId::new()?;
            let readers = u32::try_from(members.len() - 1)
                .map_err(|_| candle_core::Error::Msg("group too large".into()))?;
            if readers > 0 {
                store.set(&key, readers, id.as_bytes()).map_err(store_err)?;
            }
            id
        } else {
            UniqueId::from_bytes(&store.get(&key, members[0]).map_err(store_err)?)?
        };
        Self::from_unique_id(&id, index, members.len(), device)
    }

    /// Rank `rank` of a group of `size` (over processes or machines) that `id` names, on `device`.
    /// Waits until every rank has joined.
    pub fn from_unique_id(
        id: &UniqueId,
        rank: usize,
        size: usize,
        device: &Device,
    ) -> Result<NcclComm> {
        let Device::Cuda(device) = device else {
            candle_core::bail!("NCCL needs a CUDA device, got {device:?}");
        };
        if rank >= size {
            candle_core::bail!("NCCL rank {rank} is outside a group of {size}");
        }
        let (rank_i, size_i) = (
            i32::try_from(rank).map_err(|_| candle_core::Error::Msg("rank too large".into()))?,
            i32::try_from(size).map_err(|_| candle_core::Error::Msg("group too large".into()))?,
        );
        let stream = device.cuda_stream();
        // NCCL takes the device from the calling thread's current context.
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` receives the new communicator; the id is 128 valid bytes.
        unsafe { result::comm_init_rank(&mut comm, size_i, id.raw(), rank_i) }
            .map_err(|e| nccl_err("ncclCommInitRank", e))?;
        tracing::info!(
            "NCCL rank {rank} of {size} on cuda:{}",
            stream.context().ordinal()
        );
        let guard = Arc::new(CommGuard {
            comm,
            rank,
            size,
            calls: Mutex::new(()),
            released: Mutex::new(false),
            why: Mutex::new(None),
            inflight: super::comm::Inflight::default(),
        });
        // The watchdog: aborts the group when an operation is overdue past
        // PARALLAX_COLLECTIVE_TIMEOUT_S or NCCL reports a peer's error; ends with the group.
        let timeout = super::comm::collective_timeout();
        if let Err(e) = super::comm::spawn_watchdog(
            &format!("nccl-watchdog-{rank}"),
            Arc::downgrade(&guard),
            timeout,
            super::comm::watchdog_poll(timeout),
        ) {
            tracing::warn!("NCCL rank {rank}: no watchdog ({e}): a lost peer may hang it");
        }
        Ok(NcclComm {
            comm,
            device: device.clone(),
            stream,
            rank,
            size,
            guard,
        })
    }

    /// The device this rank runs on.
    pub fn device(&self) -> Device {
        Device::Cuda(self.device.clone())
    }

    /// Hold the communicator for a call: an error once the group is aborted.
    fn enter(&self) -> Result<MutexGuard<'_, ()>> {
        let guard = self
            .guard
            .calls
            .lock()
            .map_err(|_| candle_core::Error::Msg("a thread panicked inside NCCL".into()))?;
        self.guard.live()?;
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
        Ok(guard)
    }

    fn raw_stream(&self) -> sys::cudaStream_t {
        self.stream.cu_stream() as _
    }

    /// After enqueueing an operation: mark the stream there, for the watchdog to see it finish.
    fn track(&self) {
        match self.stream.record_event(None) {
            Ok(ev) => self.guard.inflight.push(ev),
            Err(e) => tracing::debug!("NCCL rank {}: no event to watch: {e:?}", self.rank),
        }
    }

    /// `t` as a contiguous CUDA tensor on this rank's device.
    fn local(&self, t: &Tensor) -> Result<Tensor> {
        match t.device() {
            Device::Cuda(d) if d.same_device(&self.device) => t.contiguous(),
            other => candle_core::bail!(
                "NCCL rank {} got a tensor on {other:?}, not on its GPU",
                self.rank
            ),
        }
    }

    /// Device address of a contiguous tensor's first element.
    fn tensor_ptr(&self, t: &Tensor) -> Result<u64> {
        let (storage, layout) = t.storage_and_layout();
        match &*storage {
            Storage::Cuda(c) => read_ptr(&c.slice, layout.start_offset(), &self.stream),
            _ => candle_core::bail!("expected a CUDA tensor"),
        }
    }

    fn peer(&self, r: usize) -> Result<i32> {
        if r >= self.size {
            candle_core::bail!("NCCL peer {r} is outside a group of {}", self.size);
        }
        Ok(r as i32)
    }

    /// Enqueue a send of contiguous `t` (inside a group or alone).
    fn send_raw(&self, t: &Tensor, to: usize) -> Result<()> {
        let ptr = self.tensor_ptr(t)?;
        // SAFETY: `ptr` addresses `t`'s elem_count() elements, alive until the stream passes
        // this call (candle frees on the same stream).
        unsafe {
            result::send(
                ptr as *const _,
                t.elem_count(),
                nccl_dtype(t.dtype())?,
                self.peer(to)?,
                self.comm,
                self.raw_stream(),
            )
        }
        .map_err(|e| nccl_err("ncclSend", e))?;
        Ok(())
    }

    fn recv_raw(&self, buf: &mut Fresh, dtype: DType, from: usize) -> Result<()> {
        let ptr = buf.ptr(&self.stream)?;
        // SAFETY: `buf` holds shape.elem_count() elements of `dtype`.
        unsafe {
            result::recv(
                ptr as *mut _,
                buf.shape.elem_count(),
                nccl_dtype(dtype)?,
                self.peer(from)?,
                self.comm,
                self.raw_stream(),
            )
        }
        .map_err(|e| nccl_err("ncclRecv", e))?;
        Ok(())
    }

    /// Grouped send/recv of payloads whose shapes both sides know: `sends[i]` goes to its rank,
    /// `recvs[j]` (rank, shape, dtype) arrives. Must be called with the lock held.
    fn grouped(
        &self,
        sends: &[(usize, Tensor)],
        recvs: &[(usize, Vec<usize>, DType)],
    ) -> Result<Vec<Tensor>> {
        let mut bufs = recvs
            .iter()
            .map(|(_, shape, dtype)| Fresh::new(&self.device, shape.clone(), *dtype))
            .collect::<Result<Vec<_>>>()?;
        let group = Group::start()?;
        for (to, t) in sends {
            self.send_raw(t, *to)?;
        }
        for (buf, (from, _, dtype)) in bufs.iter_mut().zip(recvs) {
            self.recv_raw(buf, *dtype, *from)?;
        }
        group.end()?;
        self.track();
        Ok(bufs.into_iter().map(Fresh::into_tensor).collect())
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        let t = self.local(t)?;
        let _g = self.enter()?;
        let mut shape = vec![self.size];
        shape.extend_from_slice(t.dims());
        let mut out = Fresh::new(&self.device, shape, t.dtype())?;
        let (src, dst) = (self.tensor_ptr(&t)?, out.ptr(&self.stream)?);
        // SAFETY: `out` holds size x elem_count elements of t's dtype.
        unsafe {
            result::all_gather(
                src as *const _,
                dst as *mut _,
                t.elem_count(),
                nccl_dtype(t.dtype())?,
                self.comm,
                self.raw_stream(),
            )
        }
        .map_err(|e| nccl_err("ncclAllGather", e))?;
        self.track();
        let out = out.into_tensor(); // (size, ...t.dims)
        if dim == 0 {
            let mut dims = t.dims().to_vec();
            if let Some(d0) = dims.first_mut() {
                *d0 *= self.size;
            }
            return out.reshape(dims);
        }
        let parts = (0..self.size)
            .map(|r| out.get(r))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, dim)
    }

    fn all_to_all(&self, t: &Tensor, scatter_dim: usize, gather_dim: usize) -> Result<Tensor> {
        let n = self.size;
        let len = t.dim(scatter_dim)?;
        if len % n != 0 {
            candle_core::bail!(
                "all_to_all: dim {scatter_dim} of {:?} does not split {n} ways",
                t.dims()
            );
        }
        let t = self.local(t)?;
        let chunk = len / n;
        let sends = (0..n)
            .map(|j| Ok((j, t.narrow(scatter_dim, j * chunk, chunk)?.contiguous()?)))
            .collect::<Result<Vec<_>>>()?;
        // Every rank's chunk has the shape of ours.
        let shape = sends
            .first()
            .map(|(_, c)| c.dims().to_vec())
            .unwrap_or_default();
        let recvs: Vec<_> = (0..n).map(|j| (j, shape.clone(), t.dtype())).collect();
        let parts = {
            let _g = self.enter()?;
            self.grouped(&sends, &recvs)?
        };
        Tensor::cat(&parts, gather_dim)
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let t = self.local(t)?;
        let _g = self.enter()?;
        let mut out = Fresh::new(&self.device, t.dims(), t.dtype())?;
        let (src, dst) = (self.tensor_ptr(&t)?, out.ptr(&self.stream)?);
        // SAFETY: `out` has t's size and dtype.
        unsafe {
            result::all_reduce(
                src as *const _,
                dst as *mut _,
                t.elem_count(),
                nccl_dtype(t.dtype())?,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                self.raw_stream(),
            )
        }
        .map_err(|e| nccl_err("ncclAllReduce", e))?;
        self.track();
        Ok(out.into_tensor())
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let t = self.local(t)?;
        let root = self.peer(root)?;
        let _g = self.enter()?;
        let mut out = Fresh::new(&self.device, t.dims(), t.dtype())?;
        let (src, dst) = (self.tensor_ptr(&t)?, out.ptr(&self.stream)?);
        // SAFETY: `out` has t's size and dtype; every rank passes the same shape.
        unsafe {
            result::broadcast(
                src as *const _,
                dst as *mut _,
                t.elem_count(),
                nccl_dtype(t.dtype())?,
                root,
                self.comm,
                self.raw_stream(),
            )
        }
        .map_err(|e| nccl_err("ncclBroadcast", e))?;
        self.track();
        Ok(out.into_tensor())
    }

    /// Sends a shape header, then the payload (two NCCL sends, in order). The sender's stream
    /// waits until `to` receives.
    fn send(&self, t: &Tensor, to: usize) -> Result<()> {
        let t = self.local(t)?;
        let h = Tensor::from_vec(header(&t)?.to_vec(), HEADER_LEN, &self.device())?;
        let _g = self.enter()?;
        self.send_raw(&h, to)?;
        self.send_raw(&t, to)?;
        self.track();
        Ok(())
    }

    /// Receives a header (waits for it on the host), then the payload.
    fn recv(&self, from: usize) -> Result<Tensor> {
        let mut got = self.exchange(&[], &[from])?;
        got.pop()
            .ok_or_else(|| candle_core::Error::Msg("NCCL recv got nothing".into()))
    }

    /// Abort the group (`ncclCommAbort`): what is in flight on this rank stops, and every later
    /// call fails with `why`. Safe to call more than once and from any thread; the communicator
    /// is released once. A new group is needed for the next job.
    fn abort(&self, why: &str) {
        self.guard.abort(&format!("rank {}: {why}", self.rank));
    }

    fn exchange(&self, sends: &[(usize, &Tensor)], recv_from: &[usize]) -> Result<Vec<Tensor>> {
        let sends = sends
            .iter()
            .map(|(to, t)| Ok((*to, self.local(t)?)))
            .collect::<Result<Vec<_>>>()?;
        let headers = sends
            .iter()
            .map(|(to, t)| {
                let h = header(t)?;
                Ok((
                    *to,
                    Tensor::from_vec(h.to_vec(), HEADER_LEN, &self.device())?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let _g = self.enter()?;
        // Step 1: the headers (so receivers can size their buffers), read back on the host.
        let header_recvs: Vec<_> = recv_from
            .iter()
            .map(|&f| (f, vec![HEADER_LEN], DType::I64))
            .collect();
        let got = self.grouped(&headers, &header_recvs)?;
        let mut recvs = Vec::with_capacity(recv_from.len());
        for (&from, h) in recv_from.iter().zip(&got) {
            // The host waits here for the peer's header; if the watchdog aborted the group
            // meanwhile, that (not what the aborted copy left) is the error.
            let h = h.to_vec1::<i64>();
            self.guard.live()?;
            let (dtype, dims) = parse_header(&h?)?;
            recvs.push((from, dims, dtype));
        }
        // Step 2: the payloads.
        self.grouped(&sends, &recvs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_reject_garbage() -> Result<()> {
        let t = Tensor::zeros((2, 3, 5), DType::BF16, &Device::Cpu)?;
        let h = header(&t)?;
        assert_eq!(parse_header(&h)?, (DType::BF16, vec![2, 3, 5]));
        assert!(parse_header(&[99, 1, 4, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(parse_header(&[0, 9, 1, 1, 1, 1, 1, 1, 1, 1]).is_err());
        assert!(parse_header(&[0, 1, -4, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(UniqueId::from_bytes(&[0u8; 12]).is_err());
        Ok(())
    }
}
