//! Attention with FP8 scores: S = Q Kᵀ from E4M3 copies of Q and K, the rest as the bf16 kernel.
//!
//! Q is rounded to E4M3 in groups of [`Q_GROUP`] query rows and K in groups of [`K_GROUP`] keys,
//! per (batch, head), each group scaled so its largest magnitude maps to 448 (the E4M3 maximum).
//! The scores are then products of the rounded values in f32, undone by the two group scales;
//! the softmax, P·V (P and V in bf16) and the output are the bf16 kernel's. The score product
//! runs at FP8's rate (twice bf16's on Hopper); V and P stay bf16, so the error is the scores'
//! rounding alone (a relative 2⁻⁴ a value at most), which the query-key RMS norms of FLUX keep
//! well inside E4M3's range. Measured on an H100 (BENCHMARKS.md, "FP8 attention on the GPU") it
//! is not faster: 0.566 ms a FLUX.1-dev call with the two quantisations against 0.510 ms for the
//! bf16 kernel, a step unchanged; at 4,608 tokens the softmax and the P·V product, not the score
//! product, bound the kernel, so FP8 pays only with P·V in FP8 as well (not built). The groups are the kernel's tiles:
//! one warpgroup's 64 query rows, one 128-key tile, so the scales fold into the softmax's scale
//! as one number a tile.
//!
//! On an sm_90 GPU with bf16 and head dim 128 the work is two launches: the group quantiser and
//! the `..._fp8` variant of the Hopper kernel (`flash_attn_sm90.cu`). Anywhere else,
//! [`reference`] computes the same function with candle ops in f32 (the CPU, for quality numbers
//! on the demo model), except on other GPUs, where attention stays exact in bf16 (logged once).

use candle_core::{DType, Result, Tensor};

use super::flash_attn::merge_heads;
use super::reference::sdpa_chunked;

/// Query rows sharing one E4M3 scale (per batch and head): a warpgroup's rows.
pub const Q_GROUP: usize = 64;
/// Keys sharing one E4M3 scale (per batch and head): a key tile of the kernel.
pub const K_GROUP: usize = 128;

/// `x` (B, H, L, D) rounded to E4M3 in groups of `group` consecutive rows of each (batch, head),
/// each group with its own scale ([`crate::kernels::fp8::round_group`]): quantise, then
/// dequantise, in f32 (the reciprocal product and round-to-nearest-even the GPU quantiser does).
pub fn round_row_groups(x: &Tensor, group: usize) -> Result<Tensor> {
    let (b, h, l, d) = x.dims4()?;
    let device = x.device().clone();
    let mut v = x
        .to_dtype(DType::F32)?
        .to_device(&candle_core::Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let group = group.max(1);
    for head in v.chunks_mut((l * d).max(1)) {
        for g in head.chunks_mut(group * d.max(1)) {
            crate::kernels::fp8::round_group(g);
        }
    }
    Tensor::from_vec(v, (b, h, l, d), &candle_core::Device::Cpu)?.to_device(&device)
}

/// FP8-scores attention computed with candle ops in f32 (Q and K rounded by
/// [`round_row_groups`], then plain attention over query chunks), returned in `q`'s dtype.
pub fn reference(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let qr = round_row_groups(q, Q_GROUP)?;
    let kr = round_row_groups(k, K_GROUP)?;
    sdpa_chunked(&qr, &kr, &v.to_dtype(DType::F32)?, 1024)?.to_dtype(q.dtype())
}

/// Whether the FP8-scores kernel runs on `device` for `dtype` and head width `head_dim`: it is
/// the FP8 twin of the Hopper kernel [`super::flash_attn::SM90_DEFAULT`], so wherever that
/// variant runs, in bf16.
pub fn kernel_runs_on(device: &candle_core::Device, dtype: DType, head_dim: usize) -> bool {
    dtype == DType::BF16
        && super::flash_attn::variants_on(device, head_dim)
            .iter()
            .any(|v| v.name() == super::flash_attn::SM90_DEFAULT)
}

/// Whether the FP8-scores kernel takes these inputs (else [`attention`] simulates or falls back):
/// where it runs ([`kernel_runs_on`]), all three bf16 (B, H, L, D) with rows 16-byte aligned for
/// the tensor memory accelerator.
pub fn kernel_takes(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    q.rank() == 4
        && q.dim(3)
            .is_ok_and(|d| kernel_runs_on(q.device(), q.dtype(), d))
        && [q, k, v]
            .iter()
            .all(|t| t.dtype() == DType::BF16 && t.layout().start_offset() % 8 == 0)
}

/// softmax(Q Kᵀ / √d) V over (B, H, L, D) with the scores from E4M3 Q and K: the kernel on an
/// sm_90 GPU, the f32 simulation on the CPU, exact bf16 attention on other GPUs.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    Ok(run(q, k, v, false)?.0)
}

/// The same with heads merged, (B, L, H·D).
pub fn attention_merged(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (out, merged) = run(q, k, v, true)?;
    if merged {
        let (b, l, h, d) = out.dims4()?;
        return out.reshape((b, l, h * d));
    }
    merge_heads(&out)
}

/// The same with each query's natural-log log-sum-exp of its scaled scores, (B, H, Lq), both in
/// f32: what ring attention merges partial results with (see
/// [`super::flash_attn::attention_with_lse`]).
pub fn attention_with_lse(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if kernel_takes(q, k, v) {
        let (b, h, lq, _) = q.dims4()?;
        let lse = Tensor::zeros((b, h, lq), DType::F32, q.device())?;
        let ptr = super::flash_attn::device_address(&lse)?;
        // The kernel writes `lse` on the stream it is read on afterwards; `lse` lives past the
        // launch.
        let op = cuda::FlashAttnFp8 {
            merged: false,
            lse: ptr,
        };
        let out = q
            .contiguous()?
            .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?;
        return Ok((out.to_dtype(DType::F32)?, lse));
    }
    if q.device().is_cpu() {
        let qr = round_row_groups(q, Q_GROUP)?;
        let kr = round_row_groups(k, K_GROUP)?;
        return super::flash_attn::online_softmax_reference(
            &qr,
            &kr,
            &v.to_dtype(DType::F32)?,
            1024,
        );
    }
    super::flash_attn::attention_with_lse(q, k, v)
}

/// (output, whether it is already (B, L, H, D)).
fn run(q: &Tensor, k: &Tensor, v: &Tensor, merged: bool) -> Result<(Tensor, bool)> {
    #[cfg(feature = "cuda")]
    if kernel_takes(q, k, v) {
        let op = cuda::FlashAttnFp8 { merged, lse: 0 };
        let out = q
            .contiguous()?
            .apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?;
        return Ok((out, merged));
    }
    #[cfg(not(feature = "cuda"))]
    let _ = merged;
    if q.device().is_cpu() {
        return Ok((reference(q, k, v)?, false));
    }
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        tracing::warn!(
            "FP8 attention scores need an sm_90 GPU with bf16 and head dim 128; attention stays exact"
        )
    });
    Ok((super::flash_attn::attention(q, k, v)?, false))
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::super::flash_attn::tma;
    use super::{K_GROUP, Q_GROUP};
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, Layout, Result, Shape};
    use half::bf16;

    /// The kernel's dynamic shared memory: E4M3 Q (128 rows of 128 bytes), three stages of E4M3
    /// K (128 x 128 bytes) and bf16 V (128 x 256 bytes), 1 KiB alignment, the barriers.
    const SHARED: usize = 128 * 128 + 3 * (128 * 128 + 128 * 256) + 1024 + 256;
    const KERNEL: &str = "parallax_flash_sm90_g2n128tpo_fp8";

    /// The FP8-scores attention as a candle op: quantise Q and K, then the Hopper kernel.
    #[derive(Debug, Clone, Copy)]
    pub struct FlashAttnFp8 {
        /// Write (B, L, H, D) instead of (B, H, L, D).
        pub merged: bool,
        /// Device address of a contiguous f32 (B, H, Lq) buffer for the log-sum-exp, or 0.
        pub lse: u64,
    }

    impl candle_core::CustomOp3 for FlashAttnFp8 {
        fn name(&self) -> &'static str {
            "parallax-flash-attn-fp8"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("the FP8-scores attention kernel runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            q: &CudaStorage,
            ql: &Layout,
            k: &CudaStorage,
            kl: &Layout,
            v: &CudaStorage,
            vl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let (b, h, lq, d) = ql.shape().dims4()?;
            let (bk, hk, lk, dk) = kl.shape().dims4()?;
            if (bk, hk, dk) != (b, h, d) || vl.shape().dims() != kl.shape().dims() || d != 128 {
                candle_core::bail!(
                    "FP8 attention: shapes q {:?} k {:?} v {:?} do not fit (head dim 128)",
                    ql.shape(),
                    kl.shape(),
                    vl.shape()
                );
            }
            if lk == 0 {
                candle_core::bail!("FP8 attention: no keys");
            }
            let dev = &q.device;
            let stream = dev.cuda_stream();
            let qs = q.as_cuda_slice::<bf16>()?.slice(ql.start_offset()..);
            let ks = k.as_cuda_slice::<bf16>()?.slice(kl.start_offset()..);
            let vs = v.as_cuda_slice::<bf16>()?.slice(vl.start_offset()..);
            let bh = b * h;
            let (ngq, ngk) = (lq.div_ceil(Q_GROUP), lk.div_ceil(K_GROUP));
            // SAFETY: the quantiser writes every byte of each E4M3 copy and every group scale.
            let (mut q8, mut qsc) =
                unsafe { (dev.alloc::<u8>(bh * lq * d)?, dev.alloc::<f32>(bh * ngq)?) };
            let (mut k8, mut ksc) =
                unsafe { (dev.alloc::<u8>(bh * lk * d)?, dev.alloc::<f32>(bh * ngk)?) };
            let source = super::super::flash_attn::SOURCE_SM90;
            let quant = super::super::nvrtc::function(
                dev,
                "flash_attn_sm90",
                source,
                true,
                "parallax_fp8_row_groups_d128",
            )?;
            for (x, out, scale, rows, group, groups) in [
                (&qs, &mut q8, &mut qsc, lq, Q_GROUP, ngq),
                (&ks, &mut k8, &mut ksc, lk, K_GROUP, ngk),
            ] {
                let cfg = LaunchConfig {
                    grid_dim: (groups as u32, bh as u32, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                let (rows_i, group_i) = (rows as i32, group as i32);
                let mut bld = quant.builder();
                bld.arg(x);
                bld.arg(out);
                bld.arg(scale);
                bld.arg(&rows_i);
                bld.arg(&group_i);
                // SAFETY: x holds bh·rows·128 bf16 values, out as many bytes, scale bh·groups
                // floats; one block per (group, bh).
                unsafe { bld.launch(cfg) }.w()?;
            }
            let func = super::super::nvrtc::function(dev, "flash_attn_sm90", source, true, KERNEL)?;
            func.set_attribute(
                candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                SHARED as i32,
            )
            .w()?;
            // SAFETY: the kernel writes every element (each query row of each head).
            let out = unsafe { dev.alloc::<bf16>(bh * lq * d)? };
            let (qp, _qg) = q8.device_ptr(&stream);
            let (kp, _kg) = k8.device_ptr(&stream);
            let (vp, _vg) = vs.device_ptr(&stream);
            let maps = [
                tma::map_u8(qp, lq, bh, 128)?,
                tma::map_u8(kp, lk, bh, 128)?,
                tma::map(vp, lk, bh, 128)?,
            ];
            let lse = self.lse;
            let (lq_i, lk_i, h_i, merged_i) = (lq as i32, lk as i32, h as i32, self.merged as i32);
            let scale_log2 = std::f32::consts::LOG2_E / (d as f32).sqrt();
            let cfg = LaunchConfig {
                grid_dim: (lq.div_ceil(128) as u32, bh as u32, 1),
                block_dim: (384, 1, 1),
                shared_mem_bytes: SHARED as u32,
            };
            let mut bld = func.builder();
            for m in &maps {
                bld.arg(m);
            }
            bld.arg(&out);
            bld.arg(&lse);
            bld.arg(&lq_i);
            bld.arg(&lk_i);
            bld.arg(&scale_log2);
            bld.arg(&h_i);
            bld.arg(&merged_i);
            bld.arg(&qsc);
            bld.arg(&ksc);
            // SAFETY: arguments match the kernel's signature; every buffer is sized from the
            // shapes and lives past the launch (stream-ordered frees at the end of this scope).
            unsafe { bld.launch(cfg) }.w()?;
            let out = CudaStorage::wrap_cuda_slice(out, dev.clone());
            if self.merged {
                return Ok((out, (b, lq, h, d).into()));
            }
            Ok((out, ql.shape().clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        let num = (a - b)
            .and_then(|d| d.sqr())
            .and_then(|d| d.sum_all())
            .and_then(|d| d.to_scalar::<f32>())
            .unwrap_or(f32::INFINITY);
        let den = b
            .sqr()
            .and_then(|d| d.sum_all())
            .and_then(|d| d.to_scalar::<f32>())
            .unwrap_or(0.0);
        (num / den.max(1e-30)).sqrt()
    }

    #[test]
    fn groups_round_to_e4m3_with_their_own_scale() -> Result<()> {
        let dev = Device::Cpu;
        // Two groups of 2 rows (d = 2) in one head, the second 1000x larger: each keeps E4M3's
        // relative precision, which one scale for both could not.
        let x = Tensor::new(
            &[[[[1.0f32, -0.3], [0.01, 0.5], [1000.0, -300.0], [10.0, 500.0]]]],
            &dev,
        )?;
        let r = round_row_groups(&x, 2)?.flatten_all()?.to_vec1::<f32>()?;
        let orig = x.flatten_all()?.to_vec1::<f32>()?;
        for (a, b) in r.iter().zip(&orig) {
            // The largest magnitude of a group maps to 448 exactly; every other value is within
            // half an E4M3 step (2^-4 relative) or, below the normal range, of the subnormal step.
            let group_max = if orig.iter().position(|v| v == b).unwrap_or(0) < 4 {
                1.0
            } else {
                1000.0
            };
            let step = (b.abs() / 16.0).max(group_max / 448.0 * 2f32.powi(-9));
            assert!((a - b).abs() <= step, "{a} vs {b}");
        }
        assert_eq!(r[0], 1.0);
        assert_eq!(r[4], 1000.0);
        // A group of zeros stays zeros (scale 1, no division by zero).
        let z = round_row_groups(&Tensor::zeros((1, 1, 3, 4), DType::F32, &dev)?, 2)?;
        assert_eq!(z.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    #[test]
    fn fp8_scores_stay_close_to_exact_attention() -> Result<()> {
        let dev = Device::Cpu;
        // Query/key rows RMS-normed as FLUX's are (values around 1), lengths not multiples of
        // the groups.
        let norm = |t: Tensor| -> Result<Tensor> {
            let rms = t.sqr()?.mean_keepdim(3)?.sqrt()?;
            t.broadcast_div(&rms)
        };
        let q = norm(Tensor::randn(0f32, 1.0, (1, 2, 150, 128), &dev)?)?;
        let k = norm(Tensor::randn(0f32, 1.0, (1, 2, 300, 128), &dev)?)?;
        let v = Tensor::randn(0f32, 1.0, (1, 2, 300, 128), &dev)?;
        let exact = sdpa_chunked(&q, &k, &v, 1024)?;
        let fp8 = attention(&q, &k, &v)?;
        // Random queries and keys give near-uniform weights over 300 random values, so the
        // output is small and its relative error large: about 3.7 % here (bf16 Q and K alone:
        // about 16x less). The images are what judge it (BENCHMARKS.md).
        let e = rel(&fp8, &exact);
        assert!(e > 0.0 && e < 0.06, "FP8 scores error {e}");
        let bf = sdpa_chunked(
            &q.to_dtype(DType::BF16)?.to_dtype(DType::F32)?,
            &k.to_dtype(DType::BF16)?.to_dtype(DType::F32)?,
            &v,
            1024,
        )?;
        assert!(rel(&bf, &exact) < e / 4.0);
        // Merged heads are the same numbers, transposed.
        let m = attention_merged(&q, &k, &v)?;
        assert_eq!(m.dims(), &[1, 150, 256]);
        assert!(rel(&m, &merge_heads(&fp8)?) < 1e-7);
        Ok(())
    }
}
