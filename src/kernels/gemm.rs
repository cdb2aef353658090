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

/// The device's cuBLASLt handle (bf16 products elsewhere in the kernels: the autoencoder's
/// banded convolutions).
#[cfg(feature = "cuda")]
pub(crate) use cuda::handle as lt_handle;

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::kernels::cuda_util::{device, view};
    use candle_core::cuda_backend::cudarc::cublaslt::{
        Activation, CudaBlasLT, Matmul, MatmulConfig,
    };
    use candle_core::CudaDevice;
    use half::bf16;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    /// One cuBLASLt handle (and its workspace) per device, on the device's stream.
    pub(crate) fn handle(dev: &CudaDevice) -> Result<Arc<CudaBlasLT>> {
        static HANDLES: Mutex<
            Option<HashMap<candle_core::cuda_backend::DeviceId, Arc<CudaBlasLT>>>,
        > = Mutex::new(None);
        let mut map = HANDLES.lock().unwrap_or_else(|p| p.into_inner());
        let map = map.get_or_insert_with(HashMap::new);
        if let Some(h) = map.get(&dev.id()) {
            return Ok(h.clone());
        }
        let h = Arc::new(
            CudaBlasLT::new(dev.cuda_stream())
                .map_err(|e| candle_core::Error::Cuda(format!("cuBLASLt: {e:?}").into()))?,
        );
        map.insert(dev.id(), h.clone());
        Ok(h)
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
            let (xs, xl) = x.storage_and_layout();
            let (ws, wl) = w.storage_and_layout();
            let xv = view::<bf16>(&xs, xl)?;
            let wv = view::<bf16>(&ws, wl)?;
            let bs = bias.as_ref().map(|b| b.storage_and_layout());
            let bv = match &bs {
                Some((s, l)) => Some(view::<bf16>(s, l)?),
                None => None,
            };
            // Row-major out (rows, ld) = column-major (n, rows) with leading dimension ld:
            // W (n, k) row-major read transposed, x (rows, k) row-major as (k, rows).
            let cfg = MatmulConfig {
                transa: true,
                transb: false,
                transc: false,
                m: n as u64,
                n: rows as u64,
                k: k as u64,
                alpha: 1.0,
                lda: k as i64,
                ldb: k as i64,
                beta: 0.0,
                ldc: ld as i64,
                stride_a: None,
                stride_b: None,
                stride_c: None,
                stride_bias: None,
                batch_size: None,
            };
            let mut ov = out.slice_mut(col0..);
            let act = gelu.then_some(Activation::Gelu);
            let h = handle(&dev)?;
            // SAFETY: the views hold n·k, rows·k and n values from their offsets; the output
            // holds rows·ld values, written at rows·ld − col0 positions from col0.
            unsafe { h.matmul(cfg, &wv, &xv, &mut ov, bv.as_ref(), act.as_ref()) }
                .map_err(|e| candle_core::Error::Cuda(format!("cuBLASLt matmul: {e:?}").into()))?;
        }
        crate::kernels::elementwise::wrap_beside(out, &dev, &dims, a)
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
