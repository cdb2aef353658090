//! Fused (flash-style) attention for the joint text+image sequence.
//!
//! [`attention`] runs the CUDA kernel in `flash_attn.cu` when it can (a CUDA tensor, bf16, head dim
//! 64 or 128) and [`sdpa_chunked`] otherwise. The kernel streams keys and values in tiles of 64
//! with an online softmax, so the L x L score matrix never exists; [`online_softmax_reference`]
//! is the same tiled algorithm written with candle ops, which the CPU tests check against plain
//! attention.

use candle_core::{DType, Result, Tensor, D};

use crate::model::attention::sdpa_chunked;

/// The kernel source (CUDA C++, compiled with NVRTC).
pub const SOURCE: &str = include_str!("flash_attn.cu");

/// Key/value tile length of the kernel (and of the reference).
pub const TILE: usize = 64;

/// The kernel variant: `w4` (default), `w8` or `w4p`, chosen with `PARALLAX_FLASH` (see
/// `flash_attn.cu` for the trade-offs), and its warps per block (16 query rows each).
pub fn variant() -> (&'static str, usize) {
    match std::env::var("PARALLAX_FLASH").ok().as_deref() {
        Some("w8") => ("w8", 8),
        Some("w4p") => ("w4p", 4),
        _ => ("w4", 4),
    }
}

/// Whether the fused kernel takes these inputs.
pub fn kernel_supports(q: &Tensor) -> bool {
    let d = q.dims().last().copied().unwrap_or(0);
    q.device().is_cuda() && q.dtype() == DType::BF16 && q.rank() == 4 && (d == 64 || d == 128)
}

/// softmax(Q Kᵀ / √d) V over (B, H, L, D): the fused kernel where it applies, else chunked
/// plain attention.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    if kernel_supports(q) && k.dtype() == q.dtype() && v.dtype() == q.dtype() {
        let d = q.dim(D::Minus1)?;
        let op = FlashAttn {
            scale: 1.0 / (d as f32).sqrt(),
        };
        return q
            .contiguous()?
            .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op);
    }
    sdpa_chunked(q, k, v, 1024)
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
        let (name, warps) = variant();
        let kernel = format!("parallax_flash_fwd_bf16_d{d}_{name}");
        let dev = &q.device;
        let (module, ptx) = super::nvrtc::ptx_for(dev, "flash_attn", SOURCE)?;
        let func = dev.get_or_load_custom_func(&kernel, &module, &ptx)?;
        let qs = q.as_cuda_slice::<bf16>()?.slice(ql.start_offset()..);
        let ks = k.as_cuda_slice::<bf16>()?.slice(kl.start_offset()..);
        let vs = v.as_cuda_slice::<bf16>()?.slice(vl.start_offset()..);
        let n = b * h * lq * d;
        // SAFETY: every element is written by the kernel (each query row of each head).
        let out = unsafe { dev.alloc::<bf16>(n)? };
        let lse_null: u64 = 0;
        let lq_i = lq as i32;
        let lk_i = lk as i32;
        let scale_log2 = self.scale * std::f32::consts::LOG2_E;
        let cfg = LaunchConfig {
            grid_dim: (lq.div_ceil(warps * 16) as u32, (b * h) as u32, 1),
            block_dim: ((warps * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut builder = func.builder();
        builder.arg(&qs);
        builder.arg(&ks);
        builder.arg(&vs);
        builder.arg(&out);
        builder.arg(&lse_null);
        builder.arg(&lq_i);
        builder.arg(&lk_i);
        builder.arg(&scale_log2);
        // SAFETY: arguments match the kernel's signature; buffers are sized from the shapes.
        unsafe { builder.launch(cfg) }.w()?;
        let out = candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone());
        Ok((out, ql.shape().clone()))
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
