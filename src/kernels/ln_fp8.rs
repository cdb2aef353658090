//! The modulated LayerNorm of a FLUX block writing its rows straight in E4M3 for the FP8 products
//! that read them (issue 30): one pass computes `LN(x) · (1 + scale) + shift` as
//! [`crate::kernels::elementwise::ln_modulate`] does, rounds it to bf16, and quantises each row
//! per token as [`crate::kernels::fp8_gemm::quantize_rows`] would, so the product's separate
//! quantisation kernel and its read of the bf16 rows disappear (`ln_fp8.cu`). The bf16 rows are
//! written too only when asked (something besides an FP8 product reads them).
//!
//! [`reference`] is the same function on the CPU (the plain composition then the per-row E4M3
//! rounding of [`crate::kernels::fp8`]); `parallax selfcheck` compares the kernel's E4M3 rows with
//! [`quantise_rows`] of its own bf16 rows, and with the two-kernel path (measured on an H100:
//! identical).

use candle_core::{DType, Result, Tensor};

use crate::kernels::fp8::Fp8;

/// Whether the fused norm + quantisation may be used: on by default since 2026-12-07, when on an
/// H100 FLUX.1-dev's FP8 step took 90.7-91.2 ms with it against 91.8-92.1 without in four
/// alternating rounds (91.1/90.9 against 92.5/92.0 in two more; the build with it as the default
/// 89.8/90.0 against 91.3/91.6 off; BENCHMARKS.md), its rows equal to the two-kernel path's
/// (`parallax dev selfcheck`). An earlier version, which divided each value by the scale where
/// this multiplies by its reciprocal, had measured no gain.
/// `PARALLAX_FUSED_FP8_QUANT=0` turns it off (the norm writes bf16 rows and the FP8 products
/// quantise them); `PARALLAX_NO_FUSED_FP8_QUANT` also turns off [`shared_rows`].
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var_os("PARALLAX_FUSED_FP8_QUANT").is_none_or(|v| v != "0")
            && std::env::var_os("PARALLAX_NO_FUSED_FP8_QUANT").is_none()
    })
}

/// Whether a norm's bf16 rows read by several FP8 products are quantised once for all of them
/// (`crate::model::linear::Normed`); off with `PARALLAX_NO_FUSED_FP8_QUANT`, where each product
/// quantises its input itself.
pub fn shared_rows() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("PARALLAX_NO_FUSED_FP8_QUANT").is_none())
}

/// Rows in E4M3 with one f32 scale each, on the host: row `r` holds `q[r, :] · scale[r]`.
#[derive(Debug, Clone, PartialEq)]
pub struct HostFp8Rows {
    pub q: Vec<u8>,
    pub scale: Vec<f32>,
    /// Values per row.
    pub k: usize,
}

impl HostFp8Rows {
    /// The values the rows stand for, (rows, k) in f32.
    pub fn decoded(&self) -> Result<Tensor> {
        let table = Fp8::E4M3.table();
        let v: Vec<f32> = self
            .q
            .chunks(self.k.max(1))
            .zip(&self.scale)
            .flat_map(|(row, s)| row.iter().map(move |&b| table[b as usize] * s))
            .collect();
        Tensor::from_vec(v, (self.scale.len(), self.k), &candle_core::Device::Cpu)
    }
}

/// The kernel's function on the CPU: `ln_modulate(x, shift, scale)` in `x`'s dtype (bf16 rows,
/// as the kernel rounds them), then [`quantise_rows`].
pub fn reference(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<HostFp8Rows> {
    quantise_rows(&crate::kernels::elementwise::ln_modulate(x, shift, scale)?)
}

/// The kernel's quantisation on the CPU, for rows `y` (.., k) already normed: each row in E4M3
/// with its own scale ([`crate::kernels::fp8::encode_group`]). The GPU's
/// self-check feeds it the kernel's own bf16 rows: the CPU's bf16 norm rounds some values the
/// other way, and one bf16 step flips an E4M3 rounding (a 1.7 % relative difference measured on
/// an H100), which says nothing about the quantisation.
pub fn quantise_rows(y: &Tensor) -> Result<HostFp8Rows> {
    let k = y.dim(candle_core::D::Minus1)?;
    let v = y
        .to_device(&candle_core::Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut q = Vec::with_capacity(v.len());
    let mut scales = Vec::with_capacity(v.len() / k.max(1));
    for row in v.chunks(k.max(1)) {
        scales.push(crate::kernels::fp8::encode_group(row, &mut q));
    }
    Ok(HostFp8Rows {
        q,
        scale: scales,
        k,
    })
}

#[cfg(feature = "cuda")]
pub use cuda::ln_modulate_fp8;

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::kernels::cuda_util::{device, view, wrap};
    use crate::kernels::fp8_gemm::Fp8Matrix;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use half::bf16;

    const SOURCE: &str = concat!(
        include_str!("common.cuh"),
        include_str!("fp8_quant.cu"),
        include_str!("ln_fp8.cu")
    );

    /// `LN(x) · (1 + scale) + shift` for `x` (B, L, C) and `shift`, `scale` (B, 1, C), all bf16
    /// on an sm_89+ GPU, quantised per row to E4M3 (B·L rows of C), and the bf16 rows too when
    /// `keep_bf16`. `None` where the kernel does not take the inputs (another dtype or device,
    /// C not a multiple of 16 or past 8192, no FP8 on this GPU): the caller runs the two steps.
    pub fn ln_modulate_fp8(
        x: &Tensor,
        shift: &Tensor,
        scale: &Tensor,
        keep_bf16: bool,
    ) -> Result<Option<(Option<Tensor>, Fp8Matrix)>> {
        let (b, l, c) = x.dims3()?;
        let Ok(dev) = device(x) else {
            return Ok(None);
        };
        let ok = [x, shift, scale]
            .iter()
            .all(|t| t.dtype() == DType::BF16 && t.device().same_device(x.device()))
            && shift.dims() == [b, 1, c]
            && scale.dims() == [b, 1, c]
            && c % 16 == 0
            && c / 8 <= 1024
            && b * l > 0
            && crate::kernels::fp8_gemm::supported(&dev);
        if !ok {
            return Ok(None);
        }
        let aligned = |t: &Tensor| -> Result<Tensor> {
            if t.is_contiguous() && t.layout().start_offset() % 8 == 0 {
                Ok(t.clone())
            } else {
                t.force_contiguous()
            }
        };
        let (x, shift, scale) = (aligned(x)?, aligned(shift)?, aligned(scale)?);
        let rows = b * l;
        // SAFETY: the kernel writes every byte of `q`, every scale and (when given) every value
        // of `y`.
        let (mut q, mut qs) = unsafe { (dev.alloc::<u8>(rows * c)?, dev.alloc::<f32>(rows)?) };
        let mut y = if keep_bf16 {
            Some(unsafe { dev.alloc::<bf16>(rows * c)? })
        } else {
            None
        };
        let func = crate::kernels::nvrtc::function(
            &dev,
            "ln_fp8",
            SOURCE,
            false,
            "parallax_ln_modulate_fp8_bf16",
        )?;
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (((c / 8).div_ceil(32) * 32) as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        {
            let (xs, xl) = x.storage_and_layout();
            let (hs, hl) = shift.storage_and_layout();
            let (ss, sl) = scale.storage_and_layout();
            let (xv, hv, sv) = (
                view::<bf16>(&xs, xl)?,
                view::<bf16>(&hs, hl)?,
                view::<bf16>(&ss, sl)?,
            );
            let (l32, c32) = (l as i32, c as i32);
            let null: u64 = 0;
            let mut bld = func.builder();
            bld.arg(&xv);
            bld.arg(&hv);
            bld.arg(&sv);
            match &mut y {
                Some(y) => bld.arg(y),
                None => bld.arg(&null),
            };
            bld.arg(&mut q);
            bld.arg(&mut qs);
            bld.arg(&l32);
            bld.arg(&c32);
            // SAFETY: x holds B·L·C bf16 values, shift and scale B·C, from 16-byte aligned
            // offsets; q B·L·C bytes, qs B·L floats, y (if any) B·L·C values; one block a row.
            unsafe { bld.launch(cfg) }.w()?;
        }
        let y = y.map(|y| wrap(y, &dev, &[b, l, c]));
        Ok(Some((
            y,
            Fp8Matrix {
                q,
                scale: qs,
                rows,
                k: c,
                dev,
            },
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The reference is the plain norm then the per-row rounding the FP8 simulation uses: its
    /// decoded rows are `round_rows(ln_modulate(x))` exactly, and each row's largest value is
    /// 448 in E4M3.
    #[test]
    fn reference_is_the_norm_then_the_rounding() -> Result<()> {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 1.0, (2, 5, 32), &dev)? * 3.0)?.to_dtype(DType::BF16)?;
        let shift = (Tensor::randn(0f32, 1.0, (2, 1, 32), &dev)? * 0.5)?.to_dtype(DType::BF16)?;
        let scale = (Tensor::randn(0f32, 1.0, (2, 1, 32), &dev)? * 0.5)?.to_dtype(DType::BF16)?;
        let r = reference(&x, &shift, &scale)?;
        assert_eq!((r.scale.len(), r.k, r.q.len()), (10, 32, 320));
        let y = crate::kernels::elementwise::ln_modulate(&x, &shift, &scale)?;
        let want = crate::kernels::fp8::round_rows(&y.to_dtype(DType::F32)?.reshape((10, 32))?)?;
        let d = (r.decoded()? - want)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        for row in r.q.chunks(32) {
            assert!(
                row.iter().any(|&b| b & 0x7f == 0x7e),
                "the row's largest is 448"
            );
        }
        // A row of zeros keeps scale 1 and zero bytes.
        let z = Tensor::zeros((1, 1, 16), DType::BF16, &dev)?;
        let zero = Tensor::zeros((1, 1, 16), DType::BF16, &dev)?;
        let minus_one = (Tensor::ones((1, 1, 16), DType::BF16, &dev)? * -1.0)?;
        let r = reference(&z, &zero, &minus_one)?;
        assert_eq!(r.scale, vec![1.0]);
        assert!(r.q.iter().all(|&b| b == 0));
        Ok(())
    }
}
