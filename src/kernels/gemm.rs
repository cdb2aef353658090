//! Linear layers over token rows, `act(x Wᵀ + b)`, with the bias and GELU inside the product.
//!
//! On CUDA in bf16 each is one cuBLASLt call whose epilogue adds the bias (and applies GELU,
//! tanh form) before the result is rounded and stored, so no separate bias pass reads and writes
//! the output again; [`linear_cat`] also writes its product straight into a wider buffer next to
//! another tensor (the single block's attention output beside its MLP activation, the input of
//! `linear2`). Elsewhere — CPU, other dtypes, shapes the fast path does not take, or
//! `PARALLAX_NO_FUSED_EPILOGUE` set — the candle product followed by
//! [`crate::kernels::elementwise::bias_act`] or [`crate::kernels::elementwise::cat_bias_gelu`]
//! (one element-wise pass each on CUDA; plain candle on the CPU, the composition `parallax
//! selfcheck` compares against).

use crate::kernels::elementwise::{bias_act, cat_bias_gelu};
use candle_core::{DType, Result, Tensor, D};

/// Whether products may carry their bias/GELU epilogue (`PARALLAX_NO_FUSED_EPILOGUE` turns it
/// off).
pub fn epilogue_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("PARALLAX_NO_FUSED_EPILOGUE").is_none())
}

/// Element offsets (bf16) at which cuBLASLt's default heuristics may be handed a matrix: it
/// assumes 256-byte aligned buffers unless told otherwise.
const ALIGN: usize = 128;

/// Whether `x`, `w` and `bias` take the cuBLASLt path: bf16 on CUDA, sizes multiples of 8,
/// every operand starting 256-byte aligned.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn fast(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> bool {
    let (Ok(k), Ok((n, wk))) = (x.dim(D::Minus1), w.dims2()) else {
        return false;
    };
    let aligned = |t: &Tensor| t.layout().start_offset() % ALIGN == 0;
    cfg!(feature = "cuda")
        && epilogue_enabled()
        && x.device().is_cuda()
        && x.rank() >= 2
        && k == wk
        && k % 8 == 0
        && n % 8 == 0
        && x.elem_count() > 0
        && [x, w]
            .iter()
            .all(|t| t.dtype() == DType::BF16 && aligned(t))
        && bias.is_none_or(|b| b.dtype() == DType::BF16 && b.dims() == [n] && aligned(b))
}

/// Reports, once, that a cuBLASLt call failed and the plain product is used instead.
#[cfg(feature = "cuda")]
fn fell_back(e: &candle_core::Error) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| tracing::warn!("cuBLASLt product failed ({e}); using product + bias pass"));
}

/// The plain product `x Wᵀ` over the last axis of `x`.
fn product(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let w = match *x.dims() {
        [b1, b2, _, _] => w.broadcast_left((b1, b2))?.t()?,
        [b, _, _] => w.broadcast_left(b)?.t()?,
        _ => w.t()?,
    };
    x.matmul(&w)
}

/// `x Wᵀ + b` over the last axis of `x` (`w` is (out, in), `bias` (out)), then GELU (tanh form)
/// if `gelu`.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, gelu: bool) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if fast(x, w, bias) {
        match cuda::linear_cat(None, x, w, bias, gelu) {
            Ok(y) => return Ok(y),
            Err(e) => fell_back(&e),
        }
    }
    let y = product(x, w)?;
    match bias {
        Some(b) => bias_act(&y, b, gelu),
        None if gelu => y.gelu(),
        None => Ok(y),
    }
}

/// `[a, act(x Wᵀ + b)]` joined along the last axis: `a` (…, Na) and the product (…, N) share
/// every leading axis. On the fast path the product is written straight into the joined buffer.
pub fn linear_cat(
    a: &Tensor,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    gelu: bool,
) -> Result<Tensor> {
    let na = a.dim(D::Minus1)?;
    #[cfg(feature = "cuda")]
    if fast(x, w, bias)
        && na % ALIGN == 0
        && a.dtype() == DType::BF16
        && a.dims()[..a.rank() - 1] == x.dims()[..x.rank() - 1]
    {
        match cuda::linear_cat(Some(a), x, w, bias, gelu) {
            Ok(y) => return Ok(y),
            Err(e) => fell_back(&e),
        }
    }
    let _ = na;
    match bias {
        // One pass joining, biasing and activating (the fused element-wise kernel on CUDA).
        Some(b) if gelu => cat_bias_gelu(a, &product(x, w)?, b),
        _ => Tensor::cat(&[a, &linear(x, w, bias, gelu)?], D::Minus1),
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::kernels::cuda_util::{device, view, wrap};
    use candle_core::cuda_backend::cudarc::cublaslt::{result, sys};
    use candle_core::cuda_backend::cudarc::driver::{
        sys::CUevent_flags, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    };
    use candle_core::cuda_backend::DeviceId;
    use candle_core::CudaDevice;
    use half::bf16;
    use std::collections::HashMap;
    use std::ffi::c_void;
    use std::sync::{Arc, Mutex};

    fn lt_err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Cuda(format!("cuBLASLt {what}: {e:?}").into())
    }

    /// Bytes of cuBLASLt workspace per device (NVIDIA's recommendation for Hopper).
    const WORKSPACE: usize = 32 << 20;

    /// A cuBLASLt handle and its workspace, bound to one device's stream.
    struct Lt {
        handle: sys::cublasLtHandle_t,
        workspace: CudaSlice<u8>,
        stream: Arc<CudaStream>,
    }

    // SAFETY: the handle is used under `LT`'s lock or by one call at a time on its stream;
    // cuBLASLt handles may be shared between threads.
    unsafe impl Send for Lt {}
    unsafe impl Sync for Lt {}

    impl Drop for Lt {
        fn drop(&mut self) {
            // SAFETY: created by `create_handle`, destroyed once.
            let _ = unsafe { result::destroy_handle(self.handle) };
        }
    }

    /// One handle per device.
    fn handle(dev: &CudaDevice) -> Result<Arc<Lt>> {
        static LT: Mutex<Option<HashMap<DeviceId, Arc<Lt>>>> = Mutex::new(None);
        let mut map = LT.lock().unwrap_or_else(|p| p.into_inner());
        let map = map.get_or_insert_with(HashMap::new);
        if let Some(h) = map.get(&dev.id()) {
            return Ok(h.clone());
        }
        let stream = dev.cuda_stream();
        // SAFETY: a raw byte buffer cuBLASLt uses as scratch.
        let workspace =
            unsafe { stream.alloc::<u8>(WORKSPACE) }.map_err(|e| lt_err("workspace", e))?;
        let h = Arc::new(Lt {
            handle: result::create_handle().map_err(|e| lt_err("handle", e))?,
            workspace,
            stream,
        });
        map.insert(dev.id(), h.clone());
        Ok(h)
    }

    /// Owned cuBLASLt descriptor objects, destroyed on drop.
    struct Layout(sys::cublasLtMatrixLayout_t);
    struct Desc(sys::cublasLtMatmulDesc_t);
    struct Pref(sys::cublasLtMatmulPreference_t);
    impl Drop for Layout {
        fn drop(&mut self) {
            // SAFETY: created once by `create_matrix_layout`.
            let _ = unsafe { result::destroy_matrix_layout(self.0) };
        }
    }
    impl Drop for Desc {
        fn drop(&mut self) {
            // SAFETY: created once by `create_matmul_desc`.
            let _ = unsafe { result::destroy_matmul_desc(self.0) };
        }
    }
    impl Drop for Pref {
        fn drop(&mut self) {
            // SAFETY: created once by `create_matmul_pref`.
            let _ = unsafe { result::destroy_matmul_pref(self.0) };
        }
    }

    /// Sets one attribute of a matmul descriptor from a plain value.
    fn set_desc<T>(d: &Desc, attr: sys::cublasLtMatmulDescAttributes_t, v: &T) -> Result<()> {
        // SAFETY: `v` is a live value of the size passed.
        unsafe {
            result::set_matmul_desc_attribute(
                d.0,
                attr,
                v as *const T as *const c_void,
                std::mem::size_of::<T>(),
            )
        }
        .map_err(|e| lt_err("descriptor", e))
    }

    /// What identifies a product for algorithm choice: device, sizes, output stride, epilogue.
    #[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
    struct Key {
        dev: DeviceId,
        m: u64,
        n: u64,
        k: u64,
        ldc: i64,
        bias: bool,
        gelu: bool,
    }

    /// How many of cuBLASLt's suggested algorithms a new shape tries (`PARALLAX_GEMM_TUNE`: 0 or
    /// 1 keeps the heuristic's first choice; default 8).
    fn candidates() -> i32 {
        static N: std::sync::OnceLock<i32> = std::sync::OnceLock::new();
        *N.get_or_init(|| {
            std::env::var("PARALLAX_GEMM_TUNE")
                .ok()
                .and_then(|v| v.trim().parse::<i32>().ok())
                .map_or(8, |n| n.clamp(1, 32))
        })
    }

    /// The algorithm chosen for each product shape, kept for the process's life.
    static CHOSEN: Mutex<Option<HashMap<Key, sys::cublasLtMatmulAlgo_t>>> = Mutex::new(None);

    /// The descriptors of one product `C (m, n; ldc) = op(A) · B (+ bias, GELU)`, column-major.
    struct Problem {
        desc: Desc,
        a: Layout,
        b: Layout,
        c: Layout,
    }

    impl Problem {
        fn new(key: &Key, bias: Option<u64>) -> Result<Self> {
            let bf = sys::cudaDataType_t::CUDA_R_16BF;
            let layout = |rows: u64, cols: u64, ld: i64| {
                result::create_matrix_layout(bf, rows, cols, ld)
                    .map(Layout)
                    .map_err(|e| lt_err("layout", e))
            };
            // A = Wᵀ: W stored (k, m) column-major, read transposed; B = x as (k, n).
            let a = layout(key.k, key.m, key.k as i64)?;
            let b = layout(key.k, key.n, key.k as i64)?;
            let c = layout(key.m, key.n, key.ldc)?;
            let desc = Desc(
                result::create_matmul_desc(
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cudaDataType_t::CUDA_R_32F,
                )
                .map_err(|e| lt_err("descriptor", e))?,
            );
            use sys::cublasLtMatmulDescAttributes_t as A;
            set_desc(&desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &1i32)?;
            set_desc(&desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &0i32)?;
            use sys::cublasLtEpilogue_t as E;
            let epi = match (bias.is_some(), key.gelu) {
                (true, true) => E::CUBLASLT_EPILOGUE_GELU_BIAS,
                (true, false) => E::CUBLASLT_EPILOGUE_BIAS,
                (false, true) => E::CUBLASLT_EPILOGUE_GELU,
                (false, false) => E::CUBLASLT_EPILOGUE_DEFAULT,
            };
            if let Some(ptr) = bias {
                set_desc(&desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &ptr)?;
            }
            set_desc(&desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE, &epi)?;
            Ok(Self { desc, a, b, c })
        }

        /// Up to `count` algorithms cuBLASLt's heuristics suggest, best first.
        fn heuristics(&self, lt: &Lt, count: i32) -> Result<Vec<sys::cublasLtMatmulAlgo_t>> {
            let pref = Pref(result::create_matmul_pref().map_err(|e| lt_err("preference", e))?);
            let ws = WORKSPACE;
            // SAFETY: `ws` is a live usize, the attribute's type.
            unsafe {
                result::set_matmul_pref_attribute(
                    pref.0,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws as *const usize as *const c_void,
                    std::mem::size_of::<usize>(),
                )
            }
            .map_err(|e| lt_err("preference", e))?;
            let mut found = vec![
                // SAFETY: a plain C struct of integers; cuBLASLt fills the first `got`.
                unsafe { std::mem::zeroed::<sys::cublasLtMatmulHeuristicResult_t>() };
                count as usize
            ];
            let mut got = 0;
            // SAFETY: every descriptor is live; `found` holds `count` results.
            unsafe {
                sys::cublasLtMatmulAlgoGetHeuristic(
                    lt.handle,
                    self.desc.0,
                    self.a.0,
                    self.b.0,
                    self.c.0,
                    self.c.0,
                    pref.0,
                    count,
                    found.as_mut_ptr(),
                    &mut got,
                )
            }
            .result()
            .map_err(|e| lt_err("heuristic", e))?;
            let algos: Vec<_> = found
                .iter()
                .take(got.max(0) as usize)
                .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
                .filter(|r| r.workspaceSize <= WORKSPACE)
                .map(|r| r.algo)
                .collect();
            if algos.is_empty() {
                candle_core::bail!("cuBLASLt suggested no algorithm");
            }
            Ok(algos)
        }

        /// Queues the product on the handle's stream with `algo`.
        ///
        /// # Safety
        /// `w`, `x` and `out` must hold the values the layouts describe.
        unsafe fn run(
            &self,
            lt: &Lt,
            algo: &sys::cublasLtMatmulAlgo_t,
            w: u64,
            x: u64,
            out: u64,
        ) -> Result<()> {
            let (alpha, beta) = (1f32, 0f32);
            let (ws, _guard) = lt.workspace.device_ptr(&lt.stream);
            result::matmul(
                lt.handle,
                self.desc.0,
                &alpha as *const f32 as *const c_void,
                &beta as *const f32 as *const c_void,
                w as *const c_void,
                self.a.0,
                x as *const c_void,
                self.b.0,
                out as *const c_void,
                self.c.0,
                out as *mut c_void,
                self.c.0,
                algo,
                ws as *mut c_void,
                WORKSPACE,
                lt.stream.cu_stream() as *mut _,
            )
            .map_err(|e| lt_err("matmul", e))
        }
    }

    /// The fastest of `algos` on this very product: each runs twice to warm up and then five
    /// times between two events; ties go to the heuristic's earlier choice.
    ///
    /// # Safety
    /// As for [`Problem::run`]; `out` is overwritten by every trial.
    unsafe fn fastest(
        lt: &Lt,
        p: &Problem,
        key: &Key,
        algos: &[sys::cublasLtMatmulAlgo_t],
        (w, x, out): (u64, u64, u64),
    ) -> Result<sys::cublasLtMatmulAlgo_t> {
        let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let mut best: Option<(f32, usize)> = None;
        let mut times = Vec::new();
        for (i, algo) in algos.iter().enumerate() {
            // An algorithm that fails to launch is skipped, not fatal.
            if p.run(lt, algo, w, x, out).is_err() || p.run(lt, algo, w, x, out).is_err() {
                times.push(f32::INFINITY);
                continue;
            }
            let start = lt
                .stream
                .record_event(timing)
                .map_err(|e| lt_err("event", e))?;
            let mut ok = true;
            for _ in 0..5 {
                ok &= p.run(lt, algo, w, x, out).is_ok();
            }
            let end = lt
                .stream
                .record_event(timing)
                .map_err(|e| lt_err("event", e))?;
            let ms = start.elapsed_ms(&end).map_err(|e| lt_err("event", e))? / 5.0;
            let ms = if ok { ms } else { f32::INFINITY };
            times.push(ms);
            // Another algorithm must be at least 1% faster to replace an earlier one.
            if best.is_none_or(|(b, _)| ms < 0.99 * b) {
                best = Some((ms, i));
            }
        }
        let Some((ms, i)) = best.filter(|(ms, _)| ms.is_finite()) else {
            candle_core::bail!("cuBLASLt: no algorithm ran for {key:?}");
        };
        tracing::debug!(
            "cuBLASLt m={} n={} k={} ldc={} bias={} gelu={}: algorithm {i} of {} ({ms:.3} ms; tried {times:.3?})",
            key.m, key.n, key.k, key.ldc, key.bias, key.gelu, algos.len()
        );
        Ok(algos[i])
    }

    /// A new bf16 tensor shaped like `x` whose last axis holds `a` (if any) and then
    /// `act(x Wᵀ + b)`, the product written by one cuBLASLt call with the output's row stride.
    pub(super) fn linear_cat(
        a: Option<&Tensor>,
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        gelu: bool,
    ) -> Result<Tensor> {
        let dev = device(x)?;
        let (n, k) = w.dims2()?;
        // x's shape with the last axis holding a's columns (if any) and then the product's.
        let col0 = a.map_or(Ok(0), |a| a.dim(D::Minus1))?;
        let ld = col0 + n;
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = ld;
        }
        let x = x.contiguous()?;
        let w = if w.stride() == [k, 1] {
            w.clone()
        } else {
            w.contiguous()?
        };
        let bias = bias.map(|b| b.contiguous()).transpose()?;
        let rows = x.elem_count() / k;
        // SAFETY: the product writes columns col0.. of every row; `a` fills the others below.
        let mut out = unsafe { dev.alloc::<bf16>(rows * ld)? };
        {
            let lt = handle(&dev)?;
            let s = &lt.stream;
            let (xs, xl) = x.storage_and_layout();
            let (ws, wl) = w.storage_and_layout();
            let xv = view::<bf16>(&xs, xl)?;
            let wv = view::<bf16>(&ws, wl)?;
            let bs = bias.as_ref().map(|b| b.storage_and_layout());
            let bv = match &bs {
                Some((st, l)) => Some(view::<bf16>(st, l)?),
                None => None,
            };
            let (xp, _gx) = xv.device_ptr(s);
            let (wp, _gw) = wv.device_ptr(s);
            let bp = bv.as_ref().map(|b| b.device_ptr(s));
            let mut ov = out.slice_mut(col0..);
            let (op, _go) = ov.device_ptr_mut(s);
            // Row-major out (rows, ld) = column-major (n, rows) with leading dimension ld:
            // W (n, k) row-major read transposed, x (rows, k) row-major as (k, rows).
            let key = Key {
                dev: dev.id(),
                m: n as u64,
                n: rows as u64,
                k: k as u64,
                ldc: ld as i64,
                bias: bias.is_some(),
                gelu,
            };
            let p = Problem::new(&key, bp.as_ref().map(|b| b.0))?;
            let known = CHOSEN
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .and_then(|m| m.get(&key).copied());
            let algo = match known {
                Some(a) => a,
                None => {
                    let algos = p.heuristics(&lt, candidates())?;
                    let algo = if algos.len() > 1 {
                        // SAFETY: the pointers hold what the layouts describe (see below).
                        unsafe { fastest(&lt, &p, &key, &algos, (wp, xp, op))? }
                    } else {
                        algos[0]
                    };
                    CHOSEN
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .get_or_insert_with(HashMap::new)
                        .insert(key, algo);
                    algo
                }
            };
            // SAFETY: the views hold n·k, rows·k and n values from their offsets; the output
            // holds rows·ld values, written at rows·ld − col0 positions from col0.
            unsafe { p.run(&lt, &algo, wp, xp, op)? };
        }
        let out = wrap(out, &dev, &dims);
        if let Some(a) = a {
            out.slice_set(&a.contiguous()?, dims.len() - 1, 0)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cpu_linear_and_join_compute_the_documented_functions() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 8), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (16, 8), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 16, &dev)?;
        let a = Tensor::randn(0f32, 1.0, (2, 3, 5), &dev)?;
        let plain = x.broadcast_matmul(&w.t()?)?.broadcast_add(&b)?;
        let d = (linear(&x, &w, Some(&b), false)? - &plain)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-5);
        let joined = linear_cat(&a, &x, &w, Some(&b), true)?;
        assert_eq!(joined.dims(), [2, 3, 21]);
        let d = (joined.narrow(2, 0, 5)? - &a)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d == 0.0);
        let d = (joined.narrow(2, 5, 16)? - plain.gelu()?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-4, "{d}");
        Ok(())
    }
}
