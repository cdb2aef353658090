//! Fused (flash-style) attention for the joint text+image sequence.
//!
//! [`attention`] runs the CUDA kernel in `flash_attn.cu` when it can (a CUDA tensor, bf16, head dim
//! 64 or 128) and [`sdpa_chunked`] otherwise. The kernel streams keys and values in tiles of 64
//! with an online softmax, so the L x L score matrix never exists; [`online_softmax_reference`]
//! is the same tiled algorithm written with candle ops, which the CPU tests check against plain
//! attention.

use candle_core::{DType, Result, Tensor, D};

use super::reference::sdpa_chunked;

/// The kernel source (CUDA C++, compiled with NVRTC): mma.sync tensor-core products, sm_80 on.
pub const SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("flash_attn.cu"));

/// The Hopper kernel source (wgmma warpgroup products, compiled for sm_90a; head dim 128).
pub const SOURCE_SM90: &str = concat!(
    include_str!("common.cuh"),
    include_str!("flash_attn_sm90.cu")
);

/// Key/value tile length of the kernel (and of the reference).
pub const TILE: usize = 64;

/// One compiled form of the fused attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnKernel {
    /// `flash_attn.cu` (any sm_80+ GPU): its name (`w4`, `w8`, `w4p`) and warps per block.
    Mma { name: &'static str, warps: usize },
    /// `flash_attn_sm90.cu` (sm_90 only, head dim 128): name, warpgroups per block (64 query
    /// rows each), keys per tile, shared-memory stages.
    Sm90 {
        name: &'static str,
        groups: usize,
        keys: usize,
        stages: usize,
        loads: Loads,
    },
}

/// How a Hopper variant fills its shared-memory tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loads {
    /// Every thread copies with cp.async; block-wide barriers per tile.
    CpAsync,
    /// The tensor memory accelerator, issued by thread 0; mbarriers per buffer.
    Tma,
    /// The tensor memory accelerator, issued by an extra producer warpgroup.
    TmaProducer,
}

const fn sm90(
    name: &'static str,
    groups: usize,
    keys: usize,
    stages: usize,
    loads: Loads,
) -> AttnKernel {
    AttnKernel::Sm90 {
        name,
        groups,
        keys,
        stages,
        loads,
    }
}

/// Every variant, for the self-check and the profile.
pub const VARIANTS: &[AttnKernel] = &[
    AttnKernel::Mma {
        name: "w4",
        warps: 4,
    },
    AttnKernel::Mma {
        name: "w8",
        warps: 8,
    },
    AttnKernel::Mma {
        name: "w4p",
        warps: 4,
    },
    // Hopper: warpgroups x keys per tile x buffers; `o`: the softmax of tile j overlaps
    // O += P V of tile j-1 (TMA variants only); `t`: tensor-memory-accelerator loads; `p`: a producer warpgroup.
    sm90("g2n128s2", 2, 128, 2, Loads::CpAsync),
    sm90("g2n128s3", 2, 128, 3, Loads::CpAsync),
    sm90("g2n64s3", 2, 64, 3, Loads::CpAsync),
    sm90("g3n64s3", 3, 64, 3, Loads::CpAsync),
    sm90("g2n128t2", 2, 128, 2, Loads::Tma),
    sm90("g2n128t3", 2, 128, 3, Loads::Tma),
    sm90("g2n128to", 2, 128, 3, Loads::Tma),
    sm90("g2n128tp", 2, 128, 2, Loads::TmaProducer),
    sm90("g2n128tpo", 2, 128, 3, Loads::TmaProducer),
];

/// The Hopper variant used on sm_90 GPUs unless `PARALLAX_FLASH` names another.
pub const SM90_DEFAULT: &str = "g2n128tpo";

impl AttnKernel {
    pub fn name(&self) -> &'static str {
        match self {
            AttnKernel::Mma { name, .. } | AttnKernel::Sm90 { name, .. } => name,
        }
    }

    /// Whether it runs on a GPU of compute capability `major.minor` with head dim `d`.
    pub fn runs_on(&self, major: i32, minor: i32, d: usize) -> bool {
        match self {
            AttnKernel::Mma { .. } => major >= 8 && (d == 64 || d == 128),
            AttnKernel::Sm90 { .. } => major == 9 && minor == 0 && d == 128,
        }
    }

    /// Dynamic shared memory in bytes (the Hopper kernels align their tiles to 1 KiB).
    pub fn shared_bytes(&self) -> usize {
        match self {
            AttnKernel::Mma { .. } => 0,
            AttnKernel::Sm90 {
                groups,
                keys,
                stages,
                ..
            } => groups * 64 * 256 + stages * keys * 512 + 1024 + 256,
        }
    }

    /// Query rows per block.
    pub fn rows_per_block(&self) -> usize {
        match self {
            AttnKernel::Mma { warps, .. } => warps * 16,
            AttnKernel::Sm90 { groups, .. } => groups * 64,
        }
    }

    /// Threads per block.
    pub fn threads(&self) -> usize {
        match self {
            AttnKernel::Mma { warps, .. } => warps * 32,
            AttnKernel::Sm90 { groups, loads, .. } => {
                groups * 128 + if *loads == Loads::TmaProducer { 128 } else { 0 }
            }
        }
    }

    fn by_name(name: &str) -> Option<AttnKernel> {
        VARIANTS.iter().copied().find(|v| v.name() == name)
    }
}

/// The variant for a GPU of compute capability `major.minor` and head dim `d`: `PARALLAX_FLASH`
/// if it names one that runs there, else the Hopper kernel on sm_90 with head dim 128, else `w4`.
pub fn variant_for(major: i32, minor: i32, d: usize) -> AttnKernel {
    let fallback = AttnKernel::Mma {
        name: "w4",
        warps: 4,
    };
    if let Some(v) = std::env::var("PARALLAX_FLASH")
        .ok()
        .as_deref()
        .and_then(AttnKernel::by_name)
    {
        if v.runs_on(major, minor, d) {
            return v;
        }
        tracing::warn!(
            "PARALLAX_FLASH={} does not run on sm_{major}{minor} with head dim {d}",
            v.name()
        );
    }
    match AttnKernel::by_name(SM90_DEFAULT) {
        Some(v) if v.runs_on(major, minor, d) => v,
        _ => fallback,
    }
}

/// The variants that run on `dev` for head dim `d` (none off CUDA).
pub fn variants_on(dev: &candle_core::Device, d: usize) -> Vec<AttnKernel> {
    match capability(dev) {
        Some((major, minor)) => VARIANTS
            .iter()
            .copied()
            .filter(|v| v.runs_on(major, minor, d))
            .collect(),
        None => Vec::new(),
    }
}

/// The variant [`attention`] uses on `dev` for head dim `d` (none off CUDA).
pub fn chosen_on(dev: &candle_core::Device, d: usize) -> Option<AttnKernel> {
    capability(dev).map(|(major, minor)| variant_for(major, minor, d))
}

fn capability(dev: &candle_core::Device) -> Option<(i32, i32)> {
    match dev {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(d) => super::nvrtc::compute_capability(d).ok(),
        _ => None,
    }
}

/// Runs `f` with `PARALLAX_FLASH` set to `v` (for the self-check and the profile; the variable
/// is read at each launch), restoring what was there.
pub fn with_variant<T>(v: AttnKernel, f: impl FnOnce() -> T) -> T {
    let before = std::env::var("PARALLAX_FLASH").ok();
    std::env::set_var("PARALLAX_FLASH", v.name());
    let out = f();
    match before {
        Some(w) => std::env::set_var("PARALLAX_FLASH", w),
        None => std::env::remove_var("PARALLAX_FLASH"),
    }
    out
}

/// Whether the fused kernel takes these inputs.
pub fn kernel_supports(q: &Tensor) -> bool {
    let d = q.dims().last().copied().unwrap_or(0);
    q.device().is_cuda() && q.dtype() == DType::BF16 && q.rank() == 4 && (d == 64 || d == 128)
}

/// softmax(Q Kᵀ / √d) V over (B, H, L, D): the fused kernel where it applies, else chunked
/// plain attention.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    if takes(q, k, v) {
        return run_kernel(q, k, v, false, 0);
    }
    sdpa_chunked(q, k, v, 1024)
}

/// The same attention with heads merged: (B, H, L, D) in, (B, L, H·D) out, which is what the
/// output projection takes. The Hopper kernel writes this layout directly (no transpose copy);
/// elsewhere the (B, H, L, D) result is transposed.
pub fn attention_merged(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, l, d) = q.dims4()?;
    if takes(q, k, v) && d == 128 {
        let out = run_kernel(q, k, v, true, 0)?;
        // The op reports (B, L, H, D) when it merged, (B, H, L, D) when it could not.
        if out.dims() == [b, l, h, d] {
            return out.reshape((b, l, h * d));
        }
        return merge_heads(&out);
    }
    merge_heads(&attention(q, k, v)?)
}

/// Attention over (B, H, L, D) with each query's natural-log log-sum-exp of its scaled scores,
/// (B, H, Lq): what ring attention merges partial results with. Both in f32. On CUDA in bf16 the
/// fused kernel writes the log-sum-exp as it goes; elsewhere [`online_softmax_reference`].
pub fn attention_with_lse(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if takes(q, k, v) {
        let (b, h, lq, _) = q.dims4()?;
        let lse = Tensor::zeros((b, h, lq), DType::F32, q.device())?;
        let ptr = device_address(&lse)?;
        // The kernel writes `lse` on the same stream it is read on afterwards; `lse` lives
        // until the end of this function, past the launch.
        let out = run_kernel(q, k, v, false, ptr)?;
        return Ok((out.to_dtype(DType::F32)?, lse));
    }
    online_softmax_reference(q, k, v, usize::MAX)
}

/// The device address of an f32 CUDA tensor's first element (for a kernel that writes into it
/// while the tensor is held past the launch).
#[cfg(feature = "cuda")]
pub(crate) fn device_address(t: &Tensor) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cuda(cs) = &*storage else {
        candle_core::bail!("expected a GPU buffer");
    };
    let slice = cs.as_cuda_slice::<f32>()?.slice(layout.start_offset()..);
    let stream = cs.device.cuda_stream();
    let (ptr, _sync) = slice.device_ptr(&stream);
    Ok(ptr)
}

/// Whether the fused kernel takes these inputs (and all three share a dtype).
fn takes(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    kernel_supports(q) && k.dtype() == q.dtype() && v.dtype() == q.dtype()
}

/// The fused kernel on contiguous q, k, v (see [`FlashAttn`] for `merged` and `lse`).
fn run_kernel(q: &Tensor, k: &Tensor, v: &Tensor, merged: bool, lse: u64) -> Result<Tensor> {
    let d = q.dim(D::Minus1)?;
    let op = FlashAttn {
        scale: 1.0 / (d as f32).sqrt(),
        merged,
        lse,
    };
    q.contiguous()?
        .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)
}

/// (B, H, L, D) -> (B, L, H·D)
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, l, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, l, h * d))
}

/// The tiled online-softmax algorithm of the kernel, with candle ops, in f32: returns the output
/// (B, H, Lq, D) and the natural-log log-sum-exp of each query's scaled scores (B, H, Lq).
pub fn online_softmax_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    tile: usize,
) -> Result<(Tensor, Tensor)> {
    let (b, h, lq, d) = q.dims4()?;
    let lk = k.dim(2)?;
    let scale = 1.0 / (d as f64).sqrt();
    let q = q.to_dtype(DType::F32)?;
    let k = k.to_dtype(DType::F32)?;
    let v = v.to_dtype(DType::F32)?;
    let dev = q.device();
    let mut m = Tensor::full(f32::NEG_INFINITY, (b, h, lq, 1), dev)?;
    let mut l = Tensor::zeros((b, h, lq, 1), DType::F32, dev)?;
    let mut o = Tensor::zeros((b, h, lq, d), DType::F32, dev)?;
    let mut k0 = 0;
    while k0 < lk {
        let n = tile.min(lk - k0);
        let kt = k.narrow(2, k0, n)?;
        let vt = v.narrow(2, k0, n)?;
        let s = (q.matmul(&kt.t()?)? * scale)?;
        let m_new = m.maximum(&s.max_keepdim(D::Minus1)?)?;
        let alpha = (&m - &m_new)?.exp()?;
        let p = s.broadcast_sub(&m_new)?.exp()?;
        l = ((&l * &alpha)? + p.sum_keepdim(D::Minus1)?)?;
        o = (o.broadcast_mul(&alpha)? + p.matmul(&vt)?)?;
        m = m_new;
        k0 += n;
    }
    let out = o.broadcast_div(&l)?;
    let lse = (m + l.log()?)?.squeeze(D::Minus1)?;
    Ok((out, lse))
}

/// The fused attention as a candle op (CUDA only).
#[derive(Debug, Clone, Copy)]
pub struct FlashAttn {
    pub scale: f32,
    /// Write (B, L, H, D) instead of (B, H, L, D) where the kernel can (Hopper variants).
    pub merged: bool,
    /// Device address of a contiguous f32 (B, H, Lq) buffer for the log-sum-exp, or 0 for none
    /// (see [`attention_with_lse`], which owns that buffer across the call).
    pub lse: u64,
}

impl candle_core::CustomOp3 for FlashAttn {
    fn name(&self) -> &'static str {
        "parallax-flash-attn"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("the fused attention kernel runs on CUDA only; `attention` falls back to plain attention elsewhere")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &candle_core::Layout,
        k: &candle_core::CudaStorage,
        kl: &candle_core::Layout,
        v: &candle_core::CudaStorage,
        vl: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda_backend::WrapErr;
        use half::bf16;

        for (name, l) in [("q", ql), ("k", kl), ("v", vl)] {
            if !l.is_contiguous() {
                candle_core::bail!("flash attention: {name} must be contiguous");
            }
        }
        let (b, h, lq, d) = ql.shape().dims4()?;
        let (bk, hk, lk, dk) = kl.shape().dims4()?;
        if (bk, hk, dk) != (b, h, d) || vl.shape().dims() != kl.shape().dims() {
            candle_core::bail!(
                "flash attention: shapes q {:?} k {:?} v {:?} do not fit",
                ql.shape(),
                kl.shape(),
                vl.shape()
            );
        }
        if lk == 0 {
            candle_core::bail!("flash attention: no keys");
        }
        if d != 128 && d != 64 {
            candle_core::bail!("flash attention: head dim {d} not supported");
        }
        let dev = &q.device;
        let (major, minor) = super::nvrtc::compute_capability(dev)?;
        let mut var = variant_for(major, minor, d);
        // The tensor memory accelerator needs 16-byte aligned rows' start.
        let aligned = [ql, kl, vl].iter().all(|l| l.start_offset() % 8 == 0);
        if matches!(var, AttnKernel::Sm90 { loads, .. } if loads != Loads::CpAsync) && !aligned {
            var = AttnKernel::by_name("g2n128s2").unwrap_or(var);
        }
        let (func, merged) = match var {
            AttnKernel::Mma { name, .. } => {
                let kernel = format!("parallax_flash_fwd_bf16_d{d}_{name}");
                let func = super::nvrtc::function(dev, "flash_attn", SOURCE, false, &kernel)?;
                (func, false)
            }
            AttnKernel::Sm90 { name, .. } => {
                let kernel = format!("parallax_flash_sm90_{name}");
                let func =
                    super::nvrtc::function(dev, "flash_attn_sm90", SOURCE_SM90, true, &kernel)?;
                // More than 48 KiB of dynamic shared memory has to be asked for.
                func.set_attribute(
                        candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        var.shared_bytes() as i32,
                    )
                    .w()?;
                (func, self.merged)
            }
        };
        let qs = q.as_cuda_slice::<bf16>()?.slice(ql.start_offset()..);
        let ks = k.as_cuda_slice::<bf16>()?.slice(kl.start_offset()..);
        let vs = v.as_cuda_slice::<bf16>()?.slice(vl.start_offset()..);
        let n = b * h * lq * d;
        // SAFETY: every element is written by the kernel (each query row of each head).
        let out = unsafe { dev.alloc::<bf16>(n)? };
        let lse_ptr: u64 = self.lse;
        let lq_i = lq as i32;
        let lk_i = lk as i32;
        let h_i = h as i32;
        let merged_i = merged as i32;
        let scale_log2 = self.scale * std::f32::consts::LOG2_E;
        let cfg = LaunchConfig {
            grid_dim: (lq.div_ceil(var.rows_per_block()) as u32, (b * h) as u32, 1),
            block_dim: (var.threads() as u32, 1, 1),
            shared_mem_bytes: var.shared_bytes() as u32,
        };
        let stream = dev.cuda_stream();
        let mut builder = func.builder();
        // Tensor maps (and the guards that keep the buffers' stream order) for TMA variants.
        let (maps, _guards) = match var {
            AttnKernel::Sm90 {
                loads,
                groups,
                keys,
                ..
            } if loads != Loads::CpAsync => {
                use candle_core::cuda_backend::cudarc::driver::DevicePtr;
                let (qp, qg) = qs.device_ptr(&stream);
                let (kp, kg) = ks.device_ptr(&stream);
                let (vp, vg) = vs.device_ptr(&stream);
                let maps = [
                    tma::map(qp, lq, b * h, groups * 64)?,
                    tma::map(kp, lk, b * h, keys)?,
                    tma::map(vp, lk, b * h, keys)?,
                ];
                (Some(maps), Some((qg, kg, vg)))
            }
            _ => (None, None),
        };
        match &maps {
            Some([mq, mk, mv]) => {
                builder.arg(mq);
                builder.arg(mk);
                builder.arg(mv);
            }
            None => {
                builder.arg(&qs);
                builder.arg(&ks);
                builder.arg(&vs);
            }
        }
        builder.arg(&out);
        builder.arg(&lse_ptr);
        builder.arg(&lq_i);
        builder.arg(&lk_i);
        builder.arg(&scale_log2);
        if matches!(var, AttnKernel::Sm90 { .. }) {
            builder.arg(&h_i);
            builder.arg(&merged_i);
        }
        // SAFETY: arguments match the kernel's signature; buffers are sized from the shapes.
        unsafe { builder.launch(cfg) }.w()?;
        let out = candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone());
        if merged {
            return Ok((out, (b, lq, h, d).into()));
        }
        Ok((out, ql.shape().clone()))
    }
}

/// Tensor maps for the tensor memory accelerator (TMA variants of the Hopper kernel).
#[cfg(feature = "cuda")]
pub(crate) mod tma {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::cuda_backend::cudarc::driver::DeviceRepr;

    /// A `CUtensorMap` passed by value as a kernel parameter.
    #[repr(transparent)]
    pub struct TensorMap(sys::CUtensorMap);

    // SAFETY: a plain 128-byte value the kernel receives as a `__grid_constant__` parameter.
    unsafe impl DeviceRepr for TensorMap {}

    /// The map of a contiguous (bh, rows, 128) bf16 tensor at `ptr`, as the 3-D (128, rows, bh)
    /// tensor the kernel reads, in boxes of 64 columns x `box_rows` rows with 128-byte swizzling;
    /// rows past the end read as zeros.
    pub fn map(
        ptr: sys::CUdeviceptr,
        rows: usize,
        bh: usize,
        box_rows: usize,
    ) -> candle_core::Result<TensorMap> {
        encode(
            ptr,
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            2,
            rows,
            bh,
            box_rows,
        )
    }

    /// The same for a (bh, rows, 128) tensor of bytes (E4M3), in boxes of all 128 columns (one
    /// 128-byte line a row).
    pub fn map_u8(
        ptr: sys::CUdeviceptr,
        rows: usize,
        bh: usize,
        box_rows: usize,
    ) -> candle_core::Result<TensorMap> {
        encode(
            ptr,
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
            1,
            rows,
            bh,
            box_rows,
        )
    }

    /// A (bh, rows, 128) tensor of `elem_bytes`-byte values, boxes of 128 bytes' worth of
    /// columns x `box_rows` rows.
    fn encode(
        ptr: sys::CUdeviceptr,
        dtype: sys::CUtensorMapDataType,
        elem_bytes: usize,
        rows: usize,
        bh: usize,
        box_rows: usize,
    ) -> candle_core::Result<TensorMap> {
        let row = (128 * elem_bytes) as u64;
        let dims = [128u64, rows as u64, bh as u64];
        let strides = [row, rows as u64 * row];
        let boxes = [(128 / elem_bytes) as u32, box_rows as u32, 1];
        let elem = [1u32; 3];
        let mut out = std::mem::MaybeUninit::<sys::CUtensorMap>::uninit();
        // SAFETY: the arrays have the lengths the rank (3) asks for; `out` is written on success.
        unsafe {
            sys::cuTensorMapEncodeTiled(
                out.as_mut_ptr(),
                dtype,
                3,
                ptr as *mut std::ffi::c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                elem.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
            .result()
            .map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
            Ok(TensorMap(out.assume_init()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .unwrap_or(f32::INFINITY)
    }

    #[test]
    fn tiled_online_softmax_equals_plain_attention() -> Result<()> {
        let dev = Device::Cpu;
        // Lengths that are and are not multiples of the tile, including fewer keys than a tile.
        for (lq, lk) in [(64, 64), (100, 130), (7, 300), (130, 5)] {
            let q = Tensor::randn(0f32, 1.0, (2, 3, lq, 32), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (2, 3, lk, 32), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (2, 3, lk, 32), &dev)?;
            let (o, lse) = online_softmax_reference(&q, &k, &v, TILE)?;
            let plain = sdpa_chunked(&q, &k, &v, 1 << 20)?;
            assert!(max_diff(&o, &plain) < 1e-5, "lq {lq} lk {lk}");
            // lse = log sum_j exp(q.k_j / sqrt(d))
            let s = (q.matmul(&k.t()?)? / (32f64).sqrt())?;
            let want = s.exp()?.sum(D::Minus1)?.log()?;
            assert!(max_diff(&lse, &want) < 1e-4, "lse lq {lq} lk {lk}");
        }
        Ok(())
    }

    #[test]
    fn cpu_tensors_fall_back_to_plain_attention() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 10, 128), &dev)?;
        assert!(!kernel_supports(&q));
        let out = attention(&q, &q, &q)?;
        assert!(max_diff(&out, &sdpa_chunked(&q, &q, &q, 4)?) < 1e-6);
        Ok(())
    }
}
