//! FP8 (E4M3) products on GPUs that have them (sm_89 and newer: Ada, Hopper, Blackwell).
//!
//! A weight (out, in) is quantised once, on the GPU, with one scale per output channel (or one
//! for the whole tensor: `PARALLAX_FP8_WEIGHT_SCALE=tensor`). At each product one kernel
//! ([`fp8_quant.cu`]) reads the bf16 activations once per token row, finds the row's largest
//! magnitude and writes the row in E4M3 with its scale (dynamic per-token quantisation); one
//! cuBLASLt call then multiplies the two FP8 operands with f32 accumulation, applies both scale
//! vectors (cuBLASLt's outer-vector scaling), adds the bias and applies GELU in its epilogue, and
//! writes bf16, straight into a wider buffer when the product is joined to another tensor.
//!
//! The CPU and every case this path does not take use the simulation in
//! [`crate::kernels::fp8::round_rows`]: the same per-row E4M3 rounding of both operands
//! followed by the plain product, which `parallax selfcheck` compares this path against.

/// Whether the FP8 product kernels may be used (`PARALLAX_NO_FP8_GEMM` turns them off, leaving
/// the simulated rounding).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("PARALLAX_NO_FP8_GEMM").is_none())
}

/// Whether weights get one scale for the whole tensor (`PARALLAX_FP8_WEIGHT_SCALE=tensor`)
/// instead of one per output channel.
pub fn per_tensor_weights() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("PARALLAX_FP8_WEIGHT_SCALE").is_ok_and(|v| v.eq_ignore_ascii_case("tensor"))
    })
}

#[cfg(feature = "cuda")]
pub use cuda::{
    dequantize, gemv, linear_cat, linear_cat_q, quantize_rows, supported, Fp8Matrix, GEMV_MAX_ROWS,
};

#[cfg(feature = "cuda")]
mod cuda {
    use crate::kernels::cuda_util::{device, view, wrap};
    use candle_core::cuda_backend::cudarc::cublaslt::{result as lt, sys};
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DevicePtr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaDevice, DType, Result, Tensor, D};
    use half::bf16;
    use std::collections::HashMap;
    use std::ffi::c_void;
    use std::sync::{Arc, Mutex};

    const SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("fp8_quant.cu"));
    const WORKSPACE: usize = 32 << 20;

    /// A matrix in E4M3, row-major (rows, k), with one f32 scale per row: row r holds
    /// `q[r, :] · scale[r]`.
    pub struct Fp8Matrix {
        pub q: CudaSlice<u8>,
        pub scale: CudaSlice<f32>,
        pub rows: usize,
        pub k: usize,
        /// The device holding `q` and `scale`.
        pub dev: CudaDevice,
    }

    impl std::fmt::Debug for Fp8Matrix {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Fp8Matrix({}x{})", self.rows, self.k)
        }
    }

    /// Whether `dev` multiplies FP8 (compute capability 8.9 or newer).
    pub fn supported(dev: &CudaDevice) -> bool {
        matches!(crate::kernels::nvrtc::compute_capability(dev), Ok((major, minor)) if (major, minor) >= (8, 9))
    }

    fn err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Cuda(format!("{what}: {e:?}").into())
    }

    /// `x` (…, k) bf16 quantised per row of its last axis; with `per_tensor`, every row shares
    /// one scale, the whole tensor's ([`crate::kernels::fp8::e4m3_scale`] of its largest
    /// magnitude).
    pub fn quantize_rows(x: &Tensor, per_tensor: bool) -> Result<Fp8Matrix> {
        let dev = device(x)?;
        if x.dtype() != DType::BF16 {
            candle_core::bail!("FP8 quantisation takes bf16, not {:?}", x.dtype());
        }
        let k = x.dim(D::Minus1)?;
        if k % 16 != 0 {
            candle_core::bail!("FP8 quantisation needs rows of a multiple of 16 values (got {k})");
        }
        let x = if x.is_contiguous() && x.layout().start_offset() % 8 == 0 {
            x.clone()
        } else {
            x.force_contiguous()?
        };
        let rows = x.elem_count() / k;
        // SAFETY: the kernel writes every byte of `q` and every scale.
        let mut q = unsafe { dev.alloc::<u8>(rows * k)? };
        let mut scale = unsafe { dev.alloc::<f32>(rows)? };
        let func = crate::kernels::nvrtc::function(
            &dev,
            "fp8_quant",
            SOURCE,
            false,
            "parallax_fp8_quant_rows_bf16",
        )?;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let k32 = k as i32;
        let launch = |q: &mut CudaSlice<u8>,
                      scale: &mut CudaSlice<f32>,
                      fixed: Option<&CudaSlice<f32>>|
         -> Result<()> {
            let (st, l) = x.storage_and_layout();
            let xv = view::<bf16>(&st, l)?;
            let null: u64 = 0;
            let mut b = func.builder();
            b.arg(&xv);
            b.arg(q);
            b.arg(scale);
            match fixed {
                Some(f) => b.arg(f),
                None => b.arg(&null),
            };
            b.arg(&k32);
            // SAFETY: x holds rows·k bf16 values from its offset, q rows·k bytes, scale rows
            // floats; one block per row.
            unsafe { b.launch(cfg) }.w()?;
            Ok(())
        };
        if per_tensor && rows > 0 {
            // The whole tensor's largest magnitude (not the rows' scales: a row of zeros or of
            // non-finite values reports scale 1, which would take over).
            let amax = x
                .abs()?
                .max_all()?
                .to_dtype(DType::F32)?
                .to_scalar::<f32>()?;
            let fixed = dev
                .cuda_stream()
                .clone_htod(&[crate::kernels::fp8::e4m3_scale(amax)])
                .w()?;
            launch(&mut q, &mut scale, Some(&fixed))?;
        } else {
            launch(&mut q, &mut scale, None)?;
        }
        Ok(Fp8Matrix {
            q,
            scale,
            rows,
            k,
            dev,
        })
    }

    /// The bf16 matrix `w` stands for, (rows, k): each row's E4M3 values times its scale.
    pub fn dequantize(w: &Fp8Matrix) -> Result<Tensor> {
        let dev = &w.dev;
        let func = crate::kernels::nvrtc::function(
            dev,
            "fp8_quant",
            SOURCE,
            false,
            "parallax_fp8_dequant_rows_bf16",
        )?;
        // SAFETY: the kernel writes every value.
        let mut out = unsafe { dev.alloc::<bf16>(w.rows * w.k)? };
        let rows = w.rows as i64;
        let k = w.k as i32;
        let cfg = crate::kernels::cuda_util::grid_stride((w.rows * w.k / 8) as u64);
        let mut b = func.builder();
        b.arg(&w.q);
        b.arg(&w.scale);
        b.arg(&mut out);
        b.arg(&rows);
        b.arg(&k);
        // SAFETY: q holds rows·k bytes, scale rows floats, out rows·k bf16 values; k % 16 == 0.
        unsafe { b.launch(cfg) }.w()?;
        Ok(wrap(out, dev, &[w.rows, w.k]))
    }

    /// The most rows of `x` one [`gemv`] takes.
    pub const GEMV_MAX_ROWS: usize = 8;

    /// `x Wᵀ + b` for a few rows of `x` (…, k) in bf16 with `W` kept in FP8: weight-only FP8
    /// (the activations stay bf16), read once from memory. For the adaLN modulations, whose
    /// input is one conditioning vector per image.
    pub fn gemv(x: &Tensor, w: &Fp8Matrix, bias: Option<&Tensor>) -> Result<Tensor> {
        let dev = device(x)?;
        let k = x.dim(D::Minus1)?;
        let batch = x.elem_count() / k.max(1);
        if k != w.k || x.dtype() != DType::BF16 || batch == 0 || batch > GEMV_MAX_ROWS {
            candle_core::bail!(
                "FP8 matrix-vector product: x {:?} {:?} by ({}, {})",
                x.dims(),
                x.dtype(),
                w.rows,
                w.k
            );
        }
        let x = if x.is_contiguous() && x.layout().start_offset() % 8 == 0 {
            x.clone()
        } else {
            x.force_contiguous()?
        };
        let bias = bias
            .map(|b| b.to_dtype(DType::BF16)?.contiguous())
            .transpose()?;
        let func = crate::kernels::nvrtc::function(
            &dev,
            "fp8_quant",
            SOURCE,
            false,
            "parallax_fp8_gemv_bf16",
        )?;
        // SAFETY: the kernel writes every output value.
        let mut y = unsafe { dev.alloc::<bf16>(batch * w.rows)? };
        let (n32, k32, b32) = (w.rows as i32, k as i32, batch as i32);
        let cfg = LaunchConfig {
            grid_dim: (w.rows.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        {
            let (xs, xl) = x.storage_and_layout();
            let xv = view::<bf16>(&xs, xl)?;
            let bs = bias.as_ref().map(|b| b.storage_and_layout());
            let bv = match &bs {
                Some((s, l)) => Some(view::<bf16>(s, l)?),
                None => None,
            };
            let null: u64 = 0;
            let mut b = func.builder();
            b.arg(&w.q);
            b.arg(&w.scale);
            match &bv {
                Some(v) => b.arg(v),
                None => b.arg(&null),
            };
            b.arg(&xv);
            b.arg(&mut y);
            b.arg(&n32);
            b.arg(&k32);
            b.arg(&b32);
            // SAFETY: q holds n·k bytes, scale and bias n values, x batch·k bf16 values from a
            // 16-byte aligned offset, y batch·n; one warp per output row.
            unsafe { b.launch(cfg) }.w()?;
        }
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = w.rows;
        }
        Ok(wrap(y, &dev, &dims))
    }

    /// One cuBLASLt handle and workspace per device.
    struct Lt {
        handle: sys::cublasLtHandle_t,
        workspace: CudaSlice<u8>,
    }
    // SAFETY: the handle is used under the map's lock only to look it up; cuBLASLt handles may be
    // used from any thread, one call at a time per stream, which the device's single stream gives.
    unsafe impl Send for Lt {}
    unsafe impl Sync for Lt {}

    fn lt_for(dev: &CudaDevice) -> Result<Arc<Lt>> {
        static HANDLES: Mutex<Option<HashMap<candle_core::cuda_backend::DeviceId, Arc<Lt>>>> =
            Mutex::new(None);
        let mut map = HANDLES.lock().unwrap_or_else(|p| p.into_inner());
        let map = map.get_or_insert_with(HashMap::new);
        if let Some(h) = map.get(&dev.id()) {
            return Ok(h.clone());
        }
        let handle = lt::create_handle().map_err(|e| err("cuBLASLt handle", e))?;
        // SAFETY: scratch memory for cuBLASLt, never read by us.
        let workspace = unsafe { dev.alloc::<u8>(WORKSPACE)? };
        let h = Arc::new(Lt { handle, workspace });
        map.insert(dev.id(), h.clone());
        Ok(h)
    }

    /// Descriptors destroyed on every exit.
    struct Descs {
        desc: sys::cublasLtMatmulDesc_t,
        layouts: Vec<sys::cublasLtMatrixLayout_t>,
        pref: Option<sys::cublasLtMatmulPreference_t>,
    }
    impl Drop for Descs {
        fn drop(&mut self) {
            // SAFETY: each was created once and is destroyed once, here.
            unsafe {
                for l in &self.layouts {
                    let _ = lt::destroy_matrix_layout(*l);
                }
                if let Some(p) = self.pref {
                    let _ = lt::destroy_matmul_pref(p);
                }
                let _ = lt::destroy_matmul_desc(self.desc);
            }
        }
    }

    unsafe fn set<T>(
        desc: sys::cublasLtMatmulDesc_t,
        attr: sys::cublasLtMatmulDescAttributes_t,
        v: &T,
    ) -> Result<()> {
        lt::set_matmul_desc_attribute(
            desc,
            attr,
            v as *const T as *const c_void,
            std::mem::size_of::<T>(),
        )
        .map_err(|e| err("cuBLASLt attribute", e))
    }

    /// `[a, act(x Wᵀ + b)]` with `W` in FP8 (see the module's notes): a new bf16 tensor shaped
    /// like `x` whose last axis holds `a`'s columns (if any) and then the product's `w.rows`.
    /// Where cuBLASLt offers no FP8 kernel with the bias/GELU epilogue, the product runs without
    /// it and one element-wise pass adds them.
    pub fn linear_cat(
        a: Option<&Tensor>,
        x: &Tensor,
        w: &Fp8Matrix,
        bias: Option<&Tensor>,
        gelu: bool,
    ) -> Result<Tensor> {
        let xq = quantize_rows(x, false)?;
        linear_cat_q(a, &xq, x.dims(), w, bias, gelu)
    }

    /// [`linear_cat`] for an input already in E4M3 (`xq`, one row per token, its tensor's shape
    /// `dims`): written so by the kernel that made it ([`crate::kernels::ln_fp8`]), so no
    /// quantisation runs here.
    pub fn linear_cat_q(
        a: Option<&Tensor>,
        xq: &Fp8Matrix,
        dims: &[usize],
        w: &Fp8Matrix,
        bias: Option<&Tensor>,
        gelu: bool,
    ) -> Result<Tensor> {
        match product(a, dims, xq, w, bias, gelu) {
            Err(e) if bias.is_some() || gelu => {
                static ONCE: std::sync::Once = std::sync::Once::new();
                ONCE.call_once(|| {
                    tracing::warn!("FP8 product with its epilogue failed ({e}); adding bias/GELU in a separate pass")
                });
                let y = product(None, dims, xq, w, None, false)?;
                let y = match bias {
                    Some(b) => {
                        crate::kernels::elementwise::bias_act(&y, &b.to_dtype(DType::BF16)?, gelu)?
                    }
                    None => y.gelu()?,
                };
                match a {
                    Some(a) => Tensor::cat(&[a, &y], D::Minus1),
                    None => Ok(y),
                }
            }
            r => r,
        }
    }

    /// cuBLASLt's first `count` algorithms for the described product (best first; C and D share
    /// a layout), only those it says can run.
    ///
    /// # Safety
    /// The descriptors must be live.
    unsafe fn heuristics(
        handle: sys::cublasLtHandle_t,
        desc: sys::cublasLtMatmulDesc_t,
        [la, lb, lc]: [sys::cublasLtMatrixLayout_t; 3],
        pref: sys::cublasLtMatmulPreference_t,
        count: usize,
    ) -> Result<Vec<sys::cublasLtMatmulAlgo_t>> {
        let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> =
            vec![std::mem::zeroed(); count.max(1)];
        let mut returned = 0i32;
        sys::cublasLtMatmulAlgoGetHeuristic(
            handle,
            desc,
            la,
            lb,
            lc,
            lc,
            pref,
            results.len() as i32,
            results.as_mut_ptr(),
            &mut returned,
        )
        .result()
        .map_err(|e| err("cuBLASLt FP8 heuristic", e))?;
        results.truncate(returned.max(0) as usize);
        Ok(results
            .into_iter()
            .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo)
            .collect())
    }

    fn product(
        a: Option<&Tensor>,
        dims: &[usize],
        xq: &Fp8Matrix,
        w: &Fp8Matrix,
        bias: Option<&Tensor>,
        gelu: bool,
    ) -> Result<Tensor> {
        let dev = xq.dev.clone();
        let (n, k) = (w.rows, w.k);
        if dims.last() != Some(&k) || xq.k != k || n % 16 != 0 {
            candle_core::bail!("FP8 product: shapes {dims:?} x ({n}, {k})");
        }
        let col0 = a.map_or(Ok(0), |a| a.dim(D::Minus1))?;
        let ld = col0 + n;
        if ld % 8 != 0 {
            candle_core::bail!("FP8 product: output rows of {ld} values are not 16-byte aligned");
        }
        let mut dims = dims.to_vec();
        if let Some(last) = dims.last_mut() {
            *last = ld;
        }
        let rows = xq.rows;
        let bias = bias
            .map(|b| b.to_dtype(DType::BF16)?.contiguous())
            .transpose()?;
        // SAFETY: the product writes columns col0.. of every row; `a` fills the others below.
        let mut out = unsafe { dev.alloc::<bf16>(rows * ld)? };
        {
            let h = lt_for(&dev)?;
            let stream = dev.cuda_stream();
            let bs = bias.as_ref().map(|b| b.storage_and_layout());
            let bv = match &bs {
                Some((s, l)) => Some(view::<bf16>(s, l)?),
                None => None,
            };
            // SAFETY: plain descriptor calls; every pointer handed over lives until the matmul
            // below has been queued on the stream the buffers are used on.
            unsafe {
                let desc = lt::create_matmul_desc(
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cudaDataType_t::CUDA_R_32F,
                )
                .map_err(|e| err("cuBLASLt descriptor", e))?;
                let mut d = Descs {
                    desc,
                    layouts: vec![],
                    pref: None,
                };
                use sys::cublasLtMatmulDescAttributes_t as A;
                set(desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &1i32)?;
                set(desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &0i32)?;
                let outer =
                    sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F
                        as i32;
                set(desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &outer)?;
                set(desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &outer)?;
                let (wq, _g1) = w.q.device_ptr(&stream);
                let (ws, _g2) = w.scale.device_ptr(&stream);
                let (xqp, _g3) = xq.q.device_ptr(&stream);
                let (xs, _g4) = xq.scale.device_ptr(&stream);
                let (wk, _g5) = h.workspace.device_ptr(&stream);
                set(desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &ws)?;
                set(desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &xs)?;
                use sys::cublasLtEpilogue_t as E;
                let bias_ptr = bv.as_ref().map(|b| b.device_ptr(&stream));
                let epilogue = match (&bias_ptr, gelu) {
                    (Some(_), true) => E::CUBLASLT_EPILOGUE_GELU_BIAS,
                    (Some(_), false) => E::CUBLASLT_EPILOGUE_BIAS,
                    (None, true) => E::CUBLASLT_EPILOGUE_GELU,
                    (None, false) => E::CUBLASLT_EPILOGUE_DEFAULT,
                };
                set(desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE, &(epilogue as u32))?;
                if let Some((bp, _)) = &bias_ptr {
                    set(desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, bp)?;
                    let bt = sys::cudaDataType_t::CUDA_R_16BF as i32;
                    set(desc, A::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bt)?;
                }
                let layout = |t: sys::cudaDataType_t, r: usize, c: usize, ld: usize| {
                    lt::create_matrix_layout(t, r as u64, c as u64, ld as i64)
                        .map_err(|e| err("cuBLASLt layout", e))
                };
                // Column-major view: out (n, rows) ld = W (k, n)ᵀ · x (k, rows).
                let la = layout(sys::cudaDataType_t::CUDA_R_8F_E4M3, k, n, k)?;
                d.layouts.push(la);
                let lb = layout(sys::cudaDataType_t::CUDA_R_8F_E4M3, k, rows, k)?;
                d.layouts.push(lb);
                let lc = layout(sys::cudaDataType_t::CUDA_R_16BF, n, rows, ld)?;
                d.layouts.push(lc);
                let pref = lt::create_matmul_pref().map_err(|e| err("cuBLASLt preference", e))?;
                d.pref = Some(pref);
                lt::set_matmul_pref_attribute(
                    pref,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &WORKSPACE as *const usize as *const c_void,
                    std::mem::size_of::<usize>(),
                )
                .map_err(|e| err("cuBLASLt preference", e))?;
                let tuning = crate::kernels::lt_algo::tuning();
                if tuning.fast_accum {
                    set(desc, A::CUBLASLT_MATMUL_DESC_FAST_ACCUM, &1i8)?;
                }
                let (alpha, beta) = (1f32, 0f32);
                let mut ov = out.slice_mut(col0..);
                let (op, _g6) =
                    candle_core::cuda_backend::cudarc::driver::DevicePtrMut::device_ptr_mut(
                        &mut ov, &stream,
                    );
                let run = |algo: &sys::cublasLtMatmulAlgo_t| {
                    lt::matmul(
                        h.handle,
                        desc,
                        &alpha as *const f32 as *const c_void,
                        &beta as *const f32 as *const c_void,
                        wq as *const c_void,
                        la,
                        xqp as *const c_void,
                        lb,
                        op as *const c_void,
                        lc,
                        op as *mut c_void,
                        lc,
                        algo,
                        wk as *mut c_void,
                        WORKSPACE,
                        stream.cu_stream() as *mut _,
                    )
                    .map_err(|e| err("cuBLASLt FP8 matmul", e))
                };
                let key = crate::kernels::lt_algo::Key {
                    device: dev.id(),
                    rows,
                    k,
                    n,
                    ld,
                    epilogue: epilogue as u32,
                    fast_accum: tuning.fast_accum,
                };
                let offered = |count: usize| heuristics(h.handle, desc, [la, lb, lc], pref, count);
                let algo = crate::kernels::lt_algo::choose(key, &stream, offered, &run)?;
                run(&algo)?;
                drop(d);
            }
        }
        crate::kernels::elementwise::wrap_beside(out, &dev, &dims, a)
    }
}
