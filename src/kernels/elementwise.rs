//! Fused element-wise steps of a FLUX block: bias (+GELU) after a matrix product, LayerNorm with
//! adaLN modulation, and the gated residual add. On CUDA in bf16 each is one pass of
//! `elementwise.cu`; elsewhere (and for shapes the kernels do not take) the plain candle
//! composition, which is the reference the selfcheck compares against.

use candle_core::{DType, Result, Tensor};

/// The kernel source (CUDA C++, compiled with NVRTC).
pub const SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("elementwise.cu"));

/// Whether fused element-wise kernels may be used (`PARALLAX_NO_FUSED_ELEMENTWISE` turns them off).
pub fn fused_enabled() -> bool {
    std::env::var_os("PARALLAX_NO_FUSED_ELEMENTWISE").is_none()
}

fn fusable(ts: &[&Tensor], last: usize) -> bool {
    cfg!(feature = "cuda")
        && fused_enabled()
        && last % 8 == 0
        && ts
            .iter()
            .all(|t| t.device().is_cuda() && t.dtype() == DType::BF16)
}

/// `x + bias` (bias over the last axis), then GELU (tanh form) if `gelu`.
pub fn bias_act(x: &Tensor, bias: &Tensor, gelu: bool) -> Result<Tensor> {
    let n = x.dim(candle_core::D::Minus1)?;
    #[cfg(feature = "cuda")]
    if fusable(&[x, bias], n) && bias.dims() == [n] {
        use cuda::Arg::{I32, U64};
        let name = if gelu {
            "parallax_bias_gelu_bf16"
        } else {
            "parallax_bias_bf16"
        };
        let n8 = (x.elem_count() / 8) as u64;
        let scalars = [U64(n8), I32(n as i32)];
        let cfg = crate::kernels::cuda_util::grid_stride(n8);
        return cuda::fresh(name, &[x, bias], x.dims(), &scalars, cfg);
    }
    let _ = n;
    let y = x.broadcast_add(bias)?;
    if gelu {
        y.gelu()
    } else {
        Ok(y)
    }
}

/// `x + gate * u` with `x`, `u` (B, L, C) and `gate` (B, 1, C).
pub fn gated_residual(x: &Tensor, gate: &Tensor, u: &Tensor) -> Result<Tensor> {
    let (b, l, c) = x.dims3()?;
    #[cfg(feature = "cuda")]
    if fusable(&[x, gate, u], c) && gate.dims() == [b, 1, c] && u.dims() == x.dims() {
        use cuda::Arg::{I32, U64};
        let n8 = (x.elem_count() / 8) as u64;
        let scalars = [U64(n8), I32(l as i32), I32(c as i32)];
        let cfg = crate::kernels::cuda_util::grid_stride(n8);
        return cuda::fresh(
            "parallax_gated_residual_bf16",
            &[x, gate, u],
            x.dims(),
            &scalars,
            cfg,
        );
    }
    let _ = (b, l, c);
    x + u.broadcast_mul(gate)?
}

/// `[a, GELU(y + bias)]` along the last axis, `a` (B, L, A), `y` (B, L, M), `bias` (M): the
/// single-stream block's attention output joined to its MLP activation, one pass on CUDA.
pub fn cat_bias_gelu(a: &Tensor, y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (b, l, wa) = a.dims3()?;
    let (b2, l2, m) = y.dims3()?;
    #[cfg(feature = "cuda")]
    if fusable(&[a, y, bias], wa) && m % 8 == 0 && (b, l) == (b2, l2) && bias.dims() == [m] {
        use cuda::Arg::{I32, U64};
        let n8 = (b * l * (wa + m) / 8) as u64;
        let scalars = [U64(n8), I32(wa as i32), I32(m as i32)];
        let cfg = crate::kernels::cuda_util::grid_stride(n8);
        let dims = [b, l, wa + m];
        return cuda::fresh(
            "parallax_cat_bias_gelu_bf16",
            &[a, y, bias],
            &dims,
            &scalars,
            cfg,
        );
    }
    let _ = (b, l, b2, l2, wa, m);
    Tensor::cat(&[a, &bias_act(y, bias, true)?], candle_core::D::Minus1)
}

/// `out`, a fresh bf16 buffer a product wrote columns `wa..` of (rows of `dims`' last axis),
/// as a tensor of `dims` with `a` (`wa` wide, the same rows) in its first columns: the product
/// joined to the tensor beside it (the single blocks' attention output before their MLP
/// activation). One vectorised pass (`parallax_copy_columns_bf16`, 16 bytes a thread; candle's
/// strided copy ran at a third of the memory's rate: 2 ms a FLUX.1 step) where both widths are
/// multiples of 8, `slice_set` otherwise or with `PARALLAX_NO_FUSED_ELEMENTWISE`.
#[cfg(feature = "cuda")]
pub fn wrap_beside(
    mut out: candle_core::cuda_backend::cudarc::driver::CudaSlice<half::bf16>,
    dev: &candle_core::CudaDevice,
    dims: &[usize],
    a: Option<&Tensor>,
) -> Result<Tensor> {
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::WrapErr;
    let ld = dims.last().copied().unwrap_or(1).max(1);
    let rows = dims.iter().product::<usize>() / ld;
    let Some(a) = a else {
        return Ok(crate::kernels::cuda_util::wrap(out, dev, dims));
    };
    let wa = a.dim(candle_core::D::Minus1)?;
    let vectorised = fused_enabled()
        && a.dtype() == DType::BF16
        && a.device().is_cuda()
        && wa % 8 == 0
        && ld % 8 == 0
        && wa <= ld
        && a.elem_count() == rows * wa
        && out.len() >= rows * ld;
    if vectorised {
        let a = if a.is_contiguous() && a.layout().start_offset() % 8 == 0 {
            a.clone()
        } else {
            a.force_contiguous()?
        };
        let func = crate::kernels::nvrtc::function(
            dev,
            "elementwise",
            SOURCE,
            false,
            "parallax_copy_columns_bf16",
        )?;
        let (s, l) = a.storage_and_layout();
        let av = crate::kernels::cuda_util::view::<half::bf16>(&s, l)?;
        let (n8, wa_i, ld_u) = ((rows * wa / 8) as u64, wa as i32, ld as u64);
        let mut b = func.builder();
        b.arg(&av);
        b.arg(&mut out);
        b.arg(&n8);
        b.arg(&wa_i);
        b.arg(&ld_u);
        // SAFETY: `a` holds rows·wa values from its (16-byte aligned) start; `out` holds rows·ld,
        // each row written at columns 0..wa <= ld.
        unsafe { b.launch(crate::kernels::cuda_util::grid_stride(n8)) }.w()?;
    }
    let out = crate::kernels::cuda_util::wrap(out, dev, dims);
    if !vectorised {
        out.slice_set(&a.contiguous()?, dims.len() - 1, 0)?;
    }
    Ok(out)
}

/// `LayerNorm(x) * (1 + scale) + shift`, LayerNorm without affine parameters (eps 1e-6), `x`
/// (B, L, C), `shift` and `scale` (B, 1, C).
pub fn ln_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let (b, l, c) = x.dims3()?;
    let shapes_ok = shift.dims() == [b, 1, c] && scale.dims() == [b, 1, c] && c / 8 <= 1024;
    #[cfg(feature = "cuda")]
    if fusable(&[x, shift, scale], c) && shapes_ok {
        // One block a row, a thread per eight values.
        let cfg = candle_core::cuda_backend::cudarc::driver::LaunchConfig {
            grid_dim: ((b * l) as u32, 1, 1),
            block_dim: (((c / 8).div_ceil(32) * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let scalars = [cuda::Arg::I32(l as i32), cuda::Arg::I32(c as i32)];
        return cuda::fresh(
            "parallax_ln_modulate_bf16",
            &[x, shift, scale],
            x.dims(),
            &scalars,
            cfg,
        );
    }
    let _ = (l, shapes_ok);
    let ones = Tensor::ones(c, x.dtype(), x.device())?;
    let zeros = Tensor::zeros(c, x.dtype(), x.device())?;
    let n = candle_nn::ops::layer_norm(&x.contiguous()?, &ones, &zeros, 1e-6)?;
    n.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
}

/// Per-(batch, group) sums and sums of squares, in f32, of `x` (B, C, ...) whose channels form
/// `groups` equal contiguous groups: `(sum, sum_sq)`, each (B, groups). One pass on CUDA in bf16
/// (partial sums added in a fixed order, so results repeat bit for bit); `None` elsewhere.
pub fn group_sums(x: &Tensor, groups: usize) -> Result<Option<(Tensor, Tensor)>> {
    let b = x.dim(0)?;
    let per = x.elem_count() / (b * groups).max(1);
    if !fusable(&[x], per) || !x.is_contiguous() || groups == 0 || x.dim(1)? % groups != 0 {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        return cuda::group_sums(x, b, groups, per).map(Some);
    }
    #[allow(unreachable_code)]
    Ok(None)
}

/// `y = x * a + c` per (batch, channel), then swish (x·sigmoid(x)) if `swish`; `x` (B, C, ...),
/// `a` and `c` (B, C) in f32. One pass on CUDA in bf16; candle ops elsewhere.
pub fn channel_affine(x: &Tensor, a: &Tensor, c: &Tensor, swish: bool) -> Result<Tensor> {
    let (b, ch) = (x.dim(0)?, x.dim(1)?);
    let hw = x.elem_count() / (b * ch).max(1);
    let ok = a.dims() == [b, ch]
        && c.dims() == [b, ch]
        && a.dtype() == DType::F32
        && c.dtype() == DType::F32;
    #[cfg(feature = "cuda")]
    if ok && fusable(&[x], hw) && x.is_contiguous() {
        return cuda::channel_affine(x, &a.contiguous()?, &c.contiguous()?, hw, swish);
    }
    let _ = (ok, hw);
    let mut shape = vec![b, ch];
    shape.extend(std::iter::repeat_n(1, x.rank().saturating_sub(2)));
    let a = a.reshape(shape.as_slice())?;
    let c = c.reshape(shape.as_slice())?;
    let y = x
        .to_dtype(DType::F32)?
        .broadcast_mul(&a)?
        .broadcast_add(&c)?
        .to_dtype(x.dtype())?;
    if swish {
        y.silu()
    } else {
        Ok(y)
    }
}

/// The epilogue of a convolution: `y + bias[c]`, plus `residual` if given, for a (B, C, ...) map
/// `y` and `bias` of shape (C,). On CUDA in bf16 it is one pass that writes into `y`'s own storage
/// (no new tensor): `y` must be a tensor no one else holds, such as a convolution's fresh output.
/// Elsewhere the plain candle composition `(y + bias) + residual`.
pub fn channel_bias_add(y: Tensor, bias: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
    let (b, ch) = (y.dim(0)?, y.dim(1)?);
    let hw = y.elem_count() / (b * ch).max(1);
    let mut ts = vec![&y, bias];
    if let Some(r) = residual {
        ts.push(r);
    }
    let shapes_ok = bias.dims() == [ch] && residual.is_none_or(|r| r.dims() == y.dims());
    if fusable(&ts, hw) && shapes_ok && y.is_contiguous() && hw > 0 {
        let bias = bias.contiguous()?;
        match residual {
            Some(r) => y.inplace_op3(&bias, &r.contiguous()?, &ChannelBias)?,
            None => y.inplace_op2(&bias, &ChannelBias)?,
        }
        return Ok(y);
    }
    let mut shape = vec![1, ch];
    shape.extend(std::iter::repeat_n(1, y.rank().saturating_sub(2)));
    let y = y.broadcast_add(&bias.reshape(shape.as_slice())?)?;
    match residual {
        Some(r) => y + r,
        None => Ok(y),
    }
}

/// Nearest-neighbour 2x upsampling of a (B, C, H, W) map to (B, C, 2H, 2W). One pass on CUDA in
/// bf16 with 64-bit indexing (for maps past 2^32 values); candle's `upsample_nearest2d` elsewhere.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    #[cfg(feature = "cuda")]
    if fusable(&[x], 8) && w % 4 == 0 && x.is_contiguous() {
        return cuda::upsample2x(x, (b, c, h, w));
    }
    let _ = (b, c);
    x.upsample_nearest2d(2 * h, 2 * w)
}

/// Softmax over the last axis. One block per row on CUDA in bf16 (rows a multiple of 8 long), for
/// the long rows of the autoencoder's attention scores, where candle's kernel (one warp per row)
/// crawls; candle's `softmax_last_dim` elsewhere.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let n = x.dim(candle_core::D::Minus1)?;
    #[cfg(feature = "cuda")]
    if fusable(&[x], n) && n > 0 {
        let rows = x.elem_count() / n;
        // A thread per eight values, up to 1024 (short rows take fewer).
        let threads = (n / 8).next_multiple_of(32).clamp(32, 1024);
        let cfg = candle_core::cuda_backend::cudarc::driver::LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        if rows <= i32::MAX as usize {
            let scalars = [cuda::Arg::U64(n as u64)];
            return cuda::fresh("parallax_softmax_rows_bf16", &[x], x.dims(), &scalars, cfg);
        }
    }
    let _ = n;
    candle_nn::ops::softmax_last_dim(x)
}

static SWIGLU_OFF: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Turn the fused SwiGLU off (or back on) for this process, to time the plain ops beside it
/// (`parallax dev bench-klein --swiglu plain`).
pub fn set_swiglu_fused(on: bool) {
    SWIGLU_OFF.store(!on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the fused SwiGLU may be used: the fused element-wise kernels are on and neither
/// `PARALLAX_NO_FUSED_SWIGLU` nor [`set_swiglu_fused`] turned it off.
pub fn swiglu_fused() -> bool {
    !SWIGLU_OFF.load(std::sync::atomic::Ordering::Relaxed)
        && std::env::var_os("PARALLAX_NO_FUSED_SWIGLU").is_none()
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
/// `(rows, row stride)` of `x` read as rows of its last axis, where those rows lie at one fixed
/// stride with the last axis contiguous: a contiguous tensor, or a column range of one (FLUX.2's
/// single blocks take their SwiGLU input from the columns past q, k and v). `None` otherwise.
fn strided_rows(x: &Tensor) -> Option<(usize, usize)> {
    let (dims, stride) = (x.dims(), x.stride());
    let (&w, lead) = dims.split_last()?;
    if w > 1 && stride[lead.len()] != 1 {
        return None;
    }
    // From the innermost leading axis out: each steps by the row stride times the rows inside it.
    let mut row_stride = None;
    let mut inner = 1;
    for (&d, &st) in lead.iter().zip(stride).rev() {
        if d == 1 {
            continue;
        }
        match row_stride {
            None => row_stride = Some(st),
            Some(rs) if st != rs * inner => return None,
            Some(_) => {}
        }
        inner *= d;
    }
    Some((lead.iter().product(), row_stride.unwrap_or(w)))
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
/// Whether the fused SwiGLU takes these tensors: bf16 on CUDA, the SwiGLU's width `f` and the
/// joined tensor's `a` a multiple of 8, something to compute.
fn swiglu_fusable(ts: &[&Tensor], f: usize, a: usize) -> bool {
    swiglu_fused() && fusable(ts, f) && a % 8 == 0 && f > 0 && ts[0].elem_count() > 0
}

/// `silu(gate) * up` for `gate` and `up` the first and second halves of `x`'s last axis (FLUX.2's
/// order, as diffusers' `Flux2SwiGLU` splits it): (.., 2F) -> (.., F). On CUDA in bf16 one pass
/// that reads the halves where they lie (`x` may be a column range of a wider product) and
/// computes in f32; candle's ops elsewhere.
pub fn swiglu(x: &Tensor) -> Result<Tensor> {
    let f = x.dim(candle_core::D::Minus1)? / 2;
    #[cfg(feature = "cuda")]
    if swiglu_fusable(&[x], f, 0) && x.dim(candle_core::D::Minus1)? == 2 * f {
        let mut dims = x.dims().to_vec();
        dims.pop();
        dims.push(f);
        return cuda::swiglu(None, x, None, f, &dims);
    }
    x.narrow(candle_core::D::Minus1, 0, f)?.silu()? * x.narrow(candle_core::D::Minus1, f, f)?
}

/// `silu(gate) * up` for two tensors of one shape (Qwen3's MLP, whose gate and up products are
/// separate): one pass on CUDA in bf16, candle's ops elsewhere.
pub fn swiglu_pair(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let f = gate.dim(candle_core::D::Minus1)?;
    #[cfg(feature = "cuda")]
    if swiglu_fusable(&[gate, up], f, 0) && gate.dims() == up.dims() {
        return cuda::swiglu(None, gate, Some(up), f, gate.dims());
    }
    let _ = f;
    gate.silu()? * up
}

/// `[a, swiglu(x)]` along the last axis, `a` (.., A) and `x` (.., 2F) with the same leading axes:
/// a single-stream block's attention output beside its SwiGLU activation, joined for the output
/// product in the same pass (no separate concatenation copy) on CUDA in bf16.
pub fn cat_swiglu(a: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (wa, w) = (
        a.dim(candle_core::D::Minus1)?,
        x.dim(candle_core::D::Minus1)?,
    );
    let f = w / 2;
    #[cfg(feature = "cuda")]
    {
        let lead_a = &a.dims()[..a.rank() - 1];
        let lead_x = &x.dims()[..x.rank() - 1];
        if swiglu_fusable(&[x, a], f, wa) && w == 2 * f && lead_a == lead_x {
            let mut dims = lead_x.to_vec();
            dims.push(wa + f);
            return cuda::swiglu(Some(a), x, None, f, &dims);
        }
    }
    let _ = (wa, w, f);
    Tensor::cat(&[a, &swiglu(x)?], candle_core::D::Minus1)
}

/// [`channel_bias_add`]'s in-place kernels (CUDA only; callers fall back before the CPU).
#[derive(Debug, Clone, Copy)]
struct ChannelBias;

impl candle_core::InplaceOp2 for ChannelBias {
    fn name(&self) -> &'static str {
        "parallax_channel_bias_bf16"
    }

    fn cpu_fwd(
        &self,
        _: &mut candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<()> {
        candle_core::bail!("the in-place channel bias runs on CUDA only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &mut candle_core::CudaStorage,
        yl: &candle_core::Layout,
        bias: &candle_core::CudaStorage,
        bl: &candle_core::Layout,
    ) -> Result<()> {
        cuda::channel_bias(y, yl, bias, bl, None)
    }
}

impl candle_core::InplaceOp3 for ChannelBias {
    fn name(&self) -> &'static str {
        "parallax_channel_bias_residual_bf16"
    }

    fn cpu_fwd(
        &self,
        _: &mut candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<()> {
        candle_core::bail!("the in-place channel bias runs on CUDA only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &mut candle_core::CudaStorage,
        yl: &candle_core::Layout,
        bias: &candle_core::CudaStorage,
        bl: &candle_core::Layout,
        r: &candle_core::CudaStorage,
        rl: &candle_core::Layout,
    ) -> Result<()> {
        cuda::channel_bias(y, yl, bias, bl, Some((r, rl)))
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::kernels::cuda_util::{device, view, wrap};
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use half::bf16;

    /// A scalar kernel argument (after the pointers).
    pub(super) enum Arg {
        U64(u64),
        I32(i32),
    }

    /// Launches `kernel` of `elementwise.cu` with `inputs` (bf16, made contiguous) as its first
    /// arguments, a fresh bf16 output of `dims` next and `scalars` last; returns the output.
    pub(super) fn fresh(
        kernel: &str,
        inputs: &[&Tensor],
        dims: &[usize],
        scalars: &[Arg],
        cfg: LaunchConfig,
    ) -> Result<Tensor> {
        let first = inputs
            .first()
            .copied()
            .ok_or_else(|| candle_core::Error::Msg(format!("{kernel}: no inputs")))?;
        let dev = device(first)?;
        // Contiguous and 16-byte aligned (the kernels load eight values at a time), on one GPU.
        let inputs = inputs
            .iter()
            .map(|t| {
                if !t.device().same_device(first.device()) {
                    candle_core::bail!("{kernel}: inputs on different devices");
                }
                if t.is_contiguous() && t.layout().start_offset() % 8 == 0 {
                    Ok((*t).clone())
                } else {
                    t.force_contiguous()
                }
            })
            .collect::<Result<Vec<_>>>()?;
        // SAFETY: every kernel of this file writes each element of its output.
        let out = unsafe { dev.alloc::<bf16>(dims.iter().product())? };
        let func = crate::kernels::nvrtc::function(&dev, "elementwise", SOURCE, false, kernel)?;
        {
            let guards: Vec<_> = inputs.iter().map(|t| t.storage_and_layout()).collect();
            let views = guards
                .iter()
                .map(|(s, l)| view::<bf16>(s, l))
                .collect::<Result<Vec<_>>>()?;
            let mut b = func.builder();
            for v in &views {
                b.arg(v);
            }
            b.arg(&out);
            for a in scalars {
                match a {
                    Arg::U64(v) => b.arg(v),
                    Arg::I32(v) => b.arg(v),
                };
            }
            // SAFETY: the callers pass the kernel's arguments in order, with sizes from the
            // checked shapes.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(wrap(out, &dev, dims))
    }

    /// `x` as rows at one stride with 16-byte aligned starts (itself where it already is, a
    /// contiguous copy elsewhere): `(tensor, rows, row stride)`.
    fn aligned_rows(x: &Tensor) -> Result<(Tensor, usize, usize)> {
        if let Some((rows, s)) = strided_rows(x) {
            if s % 8 == 0 && x.layout().start_offset() % 8 == 0 {
                return Ok((x.clone(), rows, s));
            }
        }
        let c = x.force_contiguous()?;
        let w = c.dim(candle_core::D::Minus1)?.max(1);
        let rows = c.elem_count() / w;
        Ok((c, rows, w))
    }

    /// A device view of a tensor's storage from `extra` values past its start.
    fn view_at<'a>(
        s: &'a candle_core::Storage,
        l: &candle_core::Layout,
        extra: usize,
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, bf16>> {
        match s {
            candle_core::Storage::Cuda(c) => {
                Ok(c.as_cuda_slice::<bf16>()?.slice(l.start_offset() + extra..))
            }
            _ => candle_core::bail!("expected a CUDA tensor"),
        }
    }

    /// `[a, silu(gate) * up]` (just the SwiGLU without `a`) of `elementwise.cu`'s
    /// `parallax_cat_swiglu_bf16`: `gate` the first `f` columns of `x`'s rows and `up` the next
    /// `f` (or `up`'s rows when given); a fresh bf16 output of `dims`. Shapes were checked by the
    /// caller (`f` and `a`'s width multiples of 8, the same rows throughout).
    pub(super) fn swiglu(
        a: Option<&Tensor>,
        x: &Tensor,
        up: Option<&Tensor>,
        f: usize,
        dims: &[usize],
    ) -> Result<Tensor> {
        let dev = device(x)?;
        let (mut x, rows, mut s) = aligned_rows(x)?;
        let mut up = up.map(aligned_rows).transpose()?;
        if let Some((u, urows, us)) = &mut up {
            if *urows != rows {
                candle_core::bail!("swiglu: gate has {rows} rows, up {urows}");
            }
            if *us != s {
                // One stride serves both: lay both out contiguously.
                *u = u.force_contiguous()?;
                x = x.force_contiguous()?;
                (*us, s) = (f, f);
            }
        }
        let a = match a {
            Some(a) if a.is_contiguous() && a.layout().start_offset() % 8 == 0 => Some(a.clone()),
            Some(a) => Some(a.force_contiguous()?),
            None => None,
        };
        let wa = a
            .as_ref()
            .map_or(Ok(0), |a| a.dim(candle_core::D::Minus1))?;
        if a.as_ref().is_some_and(|a| a.elem_count() != rows * wa) {
            candle_core::bail!("swiglu: the joined tensor's rows differ from the input's");
        }
        let count = rows * (wa + f);
        // SAFETY: the kernel writes every element of its output.
        let out = unsafe { dev.alloc::<bf16>(count)? };
        let func = crate::kernels::nvrtc::function(
            &dev,
            "elementwise",
            SOURCE,
            false,
            "parallax_cat_swiglu_bf16",
        )?;
        {
            let (xs, xl) = x.storage_and_layout();
            let gv = view_at(&xs, xl, 0)?;
            let ug = up.as_ref().map(|(u, _, _)| u.storage_and_layout());
            let uv = match &ug {
                Some((us, ul)) => view_at(us, ul, 0)?,
                None => view_at(&xs, xl, f)?,
            };
            let ag = a.as_ref().map(|a| a.storage_and_layout());
            let av = match &ag {
                Some((as_, al)) => view_at(as_, al, 0)?,
                None => view_at(&xs, xl, 0)?,
            };
            let (n8, wa_i, f_i, s_u) = ((count / 8) as u64, wa as i32, f as i32, s as u64);
            let mut b = func.builder();
            b.arg(&av);
            b.arg(&gv);
            b.arg(&uv);
            b.arg(&out);
            b.arg(&n8);
            b.arg(&wa_i);
            b.arg(&f_i);
            b.arg(&s_u);
            let cfg = crate::kernels::cuda_util::grid_stride(n8);
            // SAFETY: arguments match the kernel; every row read lies inside its tensor (rows at
            // stride `s`, `f` values from each start, the up half `f` past the gate's).
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(wrap(out, &dev, dims))
    }

    pub(super) fn group_sums(
        x: &Tensor,
        b: usize,
        groups: usize,
        per: usize,
    ) -> Result<(Tensor, Tensor)> {
        let dev = device(x)?;
        const CHUNK: usize = 256 * 8 * 8;
        let splits = per.div_ceil(CHUNK).clamp(1, 1024);
        let chunk = per.div_ceil(splits).div_ceil(8) * 8;
        let splits = per.div_ceil(chunk);
        let n = b * groups * splits;
        // SAFETY: the kernel writes every partial sum (one block per entry).
        let (ps, pq) = unsafe { (dev.alloc::<f32>(n)?, dev.alloc::<f32>(n)?) };
        let func = crate::kernels::nvrtc::function(
            &dev,
            "elementwise",
            SOURCE,
            false,
            "parallax_group_partial_sums_bf16",
        )?;
        {
            let (st, l) = x.storage_and_layout();
            let xv = view::<bf16>(&st, l)?;
            let (per_u, chunk_u) = (per as u64, chunk as u64);
            let mut bld = func.builder();
            bld.arg(&xv);
            bld.arg(&ps);
            bld.arg(&pq);
            bld.arg(&per_u);
            bld.arg(&chunk_u);
            let cfg = LaunchConfig {
                grid_dim: (splits as u32, (b * groups) as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments match the kernel; sizes from the checked shapes.
            unsafe { bld.launch(cfg) }.w()?;
        }
        let ps = wrap(ps, &dev, &[b, groups, splits]);
        let pq = wrap(pq, &dev, &[b, groups, splits]);
        Ok((ps.sum(2)?, pq.sum(2)?))
    }

    /// In place: y += bias[c] (+ r). Shapes were checked by the caller (contiguous (B, C, HW)
    /// with HW a multiple of 8).
    pub(super) fn channel_bias(
        y: &mut candle_core::CudaStorage,
        yl: &candle_core::Layout,
        bias: &candle_core::CudaStorage,
        bl: &candle_core::Layout,
        r: Option<(&candle_core::CudaStorage, &candle_core::Layout)>,
    ) -> Result<()> {
        let dims = yl.shape().dims();
        let (b, ch) = (dims[0], dims[1]);
        let count = yl.shape().elem_count();
        let hw = count / (b * ch).max(1);
        let dev = y.device.clone();
        let name = if r.is_some() {
            "parallax_channel_bias_residual_bf16"
        } else {
            "parallax_channel_bias_bf16"
        };
        let func = crate::kernels::nvrtc::function(&dev, "elementwise", SOURCE, false, name)?;
        let bv = bias.as_cuda_slice::<bf16>()?.slice(bl.start_offset()..);
        let rv = match r {
            Some((rs, rl)) => Some(rs.as_cuda_slice::<bf16>()?.slice(rl.start_offset()..)),
            None => None,
        };
        let mut yv = y
            .as_cuda_slice_mut::<bf16>()?
            .slice_mut(yl.start_offset()..);
        let (n8, hw_u, c_u) = ((count / 8) as u64, hw as u64, ch as u64);
        let mut bld = func.builder();
        bld.arg(&mut yv);
        bld.arg(&bv);
        if let Some(rv) = &rv {
            bld.arg(rv);
        }
        bld.arg(&n8);
        bld.arg(&hw_u);
        bld.arg(&c_u);
        let cfg = crate::kernels::cuda_util::grid_stride(n8);
        // SAFETY: arguments match the kernel; sizes from the checked shapes.
        unsafe { bld.launch(cfg) }.w()?;
        Ok(())
    }

    pub(super) fn upsample2x(
        x: &Tensor,
        (b, c, h, w): (usize, usize, usize, usize),
    ) -> Result<Tensor> {
        let n4 = (x.elem_count() / 4) as u64;
        let cfg = crate::kernels::cuda_util::grid_stride(n4);
        let scalars = [Arg::U64(n4), Arg::U64(w as u64)];
        fresh(
            "parallax_upsample2x_bf16",
            &[x],
            &[b, c, 2 * h, 2 * w],
            &scalars,
            cfg,
        )
    }

    pub(super) fn channel_affine(
        x: &Tensor,
        a: &Tensor,
        c: &Tensor,
        hw: usize,
        swish: bool,
    ) -> Result<Tensor> {
        let dev = device(x)?;
        let count = x.elem_count();
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<bf16>(count)? };
        let func = crate::kernels::nvrtc::function(
            &dev,
            "elementwise",
            SOURCE,
            false,
            "parallax_channel_affine_bf16",
        )?;
        {
            let (xs, xl) = x.storage_and_layout();
            let (as_, al) = a.storage_and_layout();
            let (cs, cl) = c.storage_and_layout();
            let xv = view::<bf16>(&xs, xl)?;
            let av = view::<f32>(&as_, al)?;
            let cv = view::<f32>(&cs, cl)?;
            let n8 = (count / 8) as u64;
            let hw_u = hw as u64;
            let sw = swish as i32;
            let mut bld = func.builder();
            bld.arg(&xv);
            bld.arg(&av);
            bld.arg(&cv);
            bld.arg(&out);
            bld.arg(&n8);
            bld.arg(&hw_u);
            bld.arg(&sw);
            let cfg = crate::kernels::cuda_util::grid_stride(n8);
            // SAFETY: arguments match the kernel; sizes from the checked shapes.
            unsafe { bld.launch(cfg) }.w()?;
        }
        Ok(wrap(out, &dev, x.dims()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cpu_compositions_compute_the_documented_functions() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 8), &dev)?;
        let u = Tensor::randn(0f32, 1.0, (2, 3, 8), &dev)?;
        let g = Tensor::randn(0f32, 1.0, (2, 1, 8), &dev)?;
        let bias = Tensor::randn(0f32, 1.0, 8, &dev)?;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let us: Vec<f32> = u.flatten_all()?.to_vec1()?;
        let gs: Vec<f32> = g.flatten_all()?.to_vec1()?;
        let bs: Vec<f32> = bias.to_vec1()?;
        let got: Vec<f32> = gated_residual(&x, &g, &u)?.flatten_all()?.to_vec1()?;
        let gelu: Vec<f32> = bias_act(&x, &bias, true)?.flatten_all()?.to_vec1()?;
        for i in 0..48 {
            let (b, c) = (i / 24, i % 8);
            assert!((got[i] - (xs[i] + gs[b * 8 + c] * us[i])).abs() < 1e-6);
            let s = xs[i] + bs[c];
            let want = 0.5 * s * (1.0 + (0.797_884_6 * (s + 0.044715 * s * s * s)).tanh());
            assert!((gelu[i] - want).abs() < 1e-4, "{} vs {want}", gelu[i]);
        }
        // LayerNorm + modulation: zero scale and shift leave a normalised row.
        let z = Tensor::zeros((2, 1, 8), DType::F32, &dev)?;
        let n = ln_modulate(&x, &z, &z)?;
        let mean = n.mean_keepdim(2)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let var = n.sqr()?.mean_keepdim(2)?;
        let var_err = (var - 1.0)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(mean < 1e-5 && var_err < 1e-3, "{mean} {var_err}");
        Ok(())
    }

    /// silu(g) * u, one value at a time.
    fn swiglu_at(g: f32, u: f32) -> f32 {
        g / (1.0 + (-g).exp()) * u
    }

    #[test]
    fn swiglu_takes_the_first_half_as_the_gate() -> Result<()> {
        let dev = Device::Cpu;
        // A wider product (2 x 3 rows of 5 + 2*8 columns) whose last 16 columns are the input,
        // as a single block's SwiGLU input follows its q, k and v.
        let y = Tensor::randn(0f32, 1.0, (2, 3, 21), &dev)?;
        let x = y.narrow(2, 5, 16)?;
        let ys: Vec<f32> = y.flatten_all()?.to_vec1()?;
        let got: Vec<f32> = swiglu(&x)?.flatten_all()?.to_vec1()?;
        assert_eq!(got.len(), 6 * 8);
        let a = Tensor::randn(0f32, 1.0, (2, 3, 4), &dev)?;
        let as_: Vec<f32> = a.flatten_all()?.to_vec1()?;
        let joined: Vec<f32> = cat_swiglu(&a, &x)?.flatten_all()?.to_vec1()?;
        let (gate, up) = (x.narrow(2, 0, 8)?, x.narrow(2, 8, 8)?);
        let pair: Vec<f32> = swiglu_pair(&gate.contiguous()?, &up.contiguous()?)?
            .flatten_all()?
            .to_vec1()?;
        for r in 0..6 {
            for c in 0..8 {
                let want = swiglu_at(ys[r * 21 + 5 + c], ys[r * 21 + 13 + c]);
                assert!((got[r * 8 + c] - want).abs() < 1e-6, "{r} {c}");
                assert!((pair[r * 8 + c] - want).abs() < 1e-6, "{r} {c}");
                assert!((joined[r * 12 + 4 + c] - want).abs() < 1e-6, "{r} {c}");
            }
            assert_eq!(joined[r * 12..r * 12 + 4], as_[r * 4..r * 4 + 4]);
        }
        Ok(())
    }

    #[test]
    fn rows_at_one_stride_are_found() -> Result<()> {
        let dev = Device::Cpu;
        let y = Tensor::zeros((2, 3, 40), DType::F32, &dev)?;
        assert_eq!(strided_rows(&y), Some((6, 40)));
        assert_eq!(strided_rows(&y.narrow(2, 24, 16)?), Some((6, 40)));
        assert_eq!(
            strided_rows(&y.narrow(0, 1, 1)?.narrow(2, 8, 16)?),
            Some((3, 40))
        );
        // Rows of a sliced middle axis are not at one stride; a transposed view has no unit step.
        assert_eq!(strided_rows(&y.narrow(1, 0, 2)?), None);
        assert_eq!(strided_rows(&y.transpose(1, 2)?), None);
        Ok(())
    }
}
