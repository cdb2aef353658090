//! The autoencoder's 2D convolutions, by bands of output rows.
//!
//! On CUDA in bf16: Parallax's column-matrix kernel (`conv.cu`) writes the band's im2col matrix
//! laid out (K, M) — one row per kernel tap, one column per output position — straight from the
//! whole input map (zeros outside it, so a band needs no padded copy; the autoencoder's 3x3
//! stride-1 convolutions over widths of a multiple of 8 take a variant that reads aligned 16-byte
//! chunks of each input row), and one cuBLAS product
//! weight (Cout, K) × col (K, M) gives the band already in NCHW order. A 1x1 convolution is the
//! product alone. candle's own CUDA convolution spent 80 % of a 1024 px decode in its im2col
//! kernel and then transposed its (M, Cout) result (BENCHMARKS.md).
//!
//! Elsewhere (CPU, other dtypes, `PARALLAX_CONV=candle`): candle's `conv2d` on a zero-padded
//! copy of the band's input rows, which is also the reference `parallax selfcheck` compares the
//! kernel path against.

use candle_core::{DType, Device, Result, Tensor};

/// The kernel source (CUDA C++, compiled with NVRTC).
pub const SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("conv.cu"));

/// Which implementation convolutions on `dev` in `dtype` take: `"parallax im2col + cuBLAS"`,
/// `"candle conv2d (cuDNN)"` (CUDA in a `cudnn` build) or `"candle conv2d"`.
pub fn path(dev: &Device, dtype: DType) -> &'static str {
    if takes_own_kernel(dev, dtype) {
        "parallax im2col + cuBLAS"
    } else if dev.is_cuda() && cfg!(feature = "cudnn") {
        "candle conv2d (cuDNN)"
    } else {
        "candle conv2d"
    }
}

/// Whether convolutions on `x` take Parallax's kernel (bf16 on CUDA, unless `PARALLAX_CONV=candle`).
pub fn own_kernel(x: &Tensor) -> bool {
    takes_own_kernel(x.device(), x.dtype())
}

fn takes_own_kernel(dev: &Device, dtype: DType) -> bool {
    static CANDLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let candle =
        *CANDLE.get_or_init(|| std::env::var("PARALLAX_CONV").is_ok_and(|v| v == "candle"));
    cfg!(feature = "cuda") && dev.is_cuda() && dtype == DType::BF16 && !candle
}

/// The output size of a convolution along one axis.
fn out_len(n: usize, k: usize, stride: usize, pad: usize) -> Result<usize> {
    if stride == 0 || n + 2 * pad < k {
        candle_core::bail!("convolution: kernel {k} does not fit {n} positions padded by {pad}");
    }
    Ok((n + 2 * pad - k) / stride + 1)
}

/// Output rows `[r0, r1)` of the convolution of `x` (B, Cin, H, W) with `w` (Cout, Cin, k, k),
/// given stride and zero padding on every side: (B, Cout, r1 - r0, Wo), without bias.
pub fn conv2d_rows(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    pad: usize,
    r0: usize,
    r1: usize,
) -> Result<Tensor> {
    let (b, cin, h, wd) = x.dims4()?;
    let (cout, wcin, k, k2) = w.dims4()?;
    if wcin != cin || k2 != k {
        candle_core::bail!(
            "convolution: weight {:?} does not fit an input of {cin} channels",
            w.dims()
        );
    }
    let (ho, wo) = (out_len(h, k, stride, pad)?, out_len(wd, k, stride, pad)?);
    if r0 >= r1 || r1 > ho {
        candle_core::bail!("convolution: output rows {r0}..{r1} outside 0..{ho}");
    }
    #[cfg(feature = "cuda")]
    if own_kernel(x) && cin * k * k <= 65_535 && b <= 65_535 {
        return cuda::conv_rows(x, w, (b, cin, cout, k), stride, pad, r0, r1 - r0, wo);
    }
    let _ = (b, cout, wo);
    if r0 == 0 && r1 == ho {
        return x.conv2d(w, pad, stride, 1, 1);
    }
    // Input rows [r0·s - pad, (r1 - 1)·s + k - pad), zeros outside the map.
    let lo = (r0 * stride) as isize - pad as isize;
    let hi = ((r1 - 1) * stride + k) as isize - pad as isize;
    let (top, bottom) = ((-lo).max(0) as usize, (hi - h as isize).max(0) as usize);
    let start = lo.max(0) as usize;
    let len = (hi.min(h as isize) as usize).saturating_sub(start);
    // Contiguous at every step: cuDNN would otherwise be handed the whole map's strides, which
    // do not fit its 32-bit descriptors.
    let band = x
        .narrow(2, start, len)?
        .contiguous()?
        .pad_with_zeros(2, top, bottom)?
        .pad_with_zeros(3, pad, pad)?
        .contiguous()?;
    band.conv2d(w, 0, stride, 1, 1)
}

/// One band's product on [`conv2d_banded`]'s in-place path, column-major as cuBLASLt takes it:
/// C (m × Cout, leading dimension `ldc`) starting `c_offset` values into the NCHW output equals
/// A (m × taps, leading dimension m) starting `a_offset` values into the band's column matrix
/// (taps × m per batch item, row-major) times the weight (taps × Cout, leading dimension taps).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BandProduct {
    pub r0: usize,
    pub rows: usize,
    pub batch: usize,
    /// Output positions of the band (rows · Wo).
    pub m: usize,
    pub a_offset: usize,
    pub c_offset: usize,
    pub ldc: usize,
}

/// The products of a convolution with output (B, Cout, Ho, Wo) and `taps` = Cin·k·k in bands of
/// `band` rows: band by band, each band's batch items in turn.
pub fn band_products(
    (b, taps, cout): (usize, usize, usize),
    (ho, wo): (usize, usize),
    band: usize,
) -> Vec<BandProduct> {
    let band = band.max(1);
    let map = ho * wo;
    let mut out = Vec::new();
    let mut r0 = 0;
    while r0 < ho {
        let rows = band.min(ho - r0);
        let m = rows * wo;
        for batch in 0..b {
            out.push(BandProduct {
                r0,
                rows,
                batch,
                m,
                a_offset: batch * taps * m,
                c_offset: batch * cout * map + r0 * wo,
                ldc: map,
            });
        }
        r0 += rows;
    }
    out
}

/// Whether every band product starts its A and C 256 bytes into alignment (bf16: 128 values),
/// with 16-byte aligned output columns: what cuBLASLt's default heuristics assume.
pub fn aligned_in_place(products: &[BandProduct], (ho, wo): (usize, usize)) -> bool {
    ho > 0
        && (ho * wo) % 8 == 0
        && products
            .iter()
            .all(|p| p.a_offset % 128 == 0 && p.c_offset % 128 == 0)
}

/// The whole convolution of `x` with `w` (no bias) computed in bands of at most `band` output
/// rows (each band's im2col matrix is what bounds the memory), the bands written into one output.
/// Bands are made as tall as allowed with each starting a multiple of 128 values into a channel's
/// map (where `band` leaves room for that). On Parallax's kernel each band's product writes its
/// rows of the NCHW output in place (the product's output leading dimension is the map's size),
/// so no zeroed output, band tensor or copy is made; elsewhere, where a band's start is still not
/// 256-byte aligned, or with `PARALLAX_NO_CONV_BANDS_IN_PLACE`, band by band into a zeroed output.
pub fn conv2d_banded(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    pad: usize,
    band: usize,
) -> Result<Tensor> {
    let (b, cin, h, wd) = x.dims4()?;
    let (cout, _, k, _) = w.dims4()?;
    let (ho, wo) = (out_len(h, k, stride, pad)?, out_len(wd, k, stride, pad)?);
    // Rows that start 128 values apart: a multiple of 128 / gcd(Wo, 128).
    let q = 128 / gcd(wo, 128);
    let band = if band >= q {
        band - band % q
    } else {
        band.max(1)
    };
    let products = band_products((b, cin * k * k, cout), (ho, wo), band);
    #[cfg(feature = "cuda")]
    if own_kernel(x)
        && std::env::var_os("PARALLAX_NO_CONV_BANDS_IN_PLACE").is_none()
        && cin * k * k <= 65_535
        && b <= 65_535
        && w.dims4()? == (cout, cin, k, k)
        && aligned_in_place(&products, (ho, wo))
    {
        match cuda::conv_banded(x, w, (b, cin, cout, k), stride, pad, (ho, wo), &products) {
            Ok(y) => return Ok(y),
            Err(e) => {
                static ONCE: std::sync::Once = std::sync::Once::new();
                ONCE.call_once(|| {
                    tracing::warn!(
                        "convolution bands written in place failed ({e}); copying each band"
                    )
                });
            }
        }
    }
    let x = &x.contiguous()?;
    let out = Tensor::zeros((b, cout, ho, wo), x.dtype(), x.device())?;
    for p in bands(&products).filter_map(|band| band.first()) {
        out.slice_set(
            &conv2d_rows(x, w, stride, pad, p.r0, p.r0 + p.rows)?,
            2,
            p.r0,
        )?;
    }
    Ok(out)
}

/// [`band_products`] band by band, top to bottom: each band's products, one per batch item.
fn bands(products: &[BandProduct]) -> impl Iterator<Item = &[BandProduct]> {
    products.chunk_by(|a, b| a.r0 == b.r0)
}

/// Greatest common divisor.
fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a.max(1)
    } else {
        gcd(b, a % b)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::kernels::cuda_util::{device, view, wrap};
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use half::bf16;

    /// The column matrix of output rows `r0..r0 + rows` of `x` (contiguous): (B, taps, rows·Wo),
    /// one row per kernel tap and one column per output position, zeros outside the map.
    #[allow(clippy::too_many_arguments)]
    fn im2col(
        x: &Tensor,
        (b, cin, k): (usize, usize, usize),
        stride: usize,
        pad: usize,
        r0: usize,
        rows: usize,
        wo: usize,
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaSlice<bf16>> {
        let (_, _, h, wd) = x.dims4()?;
        let dev = device(x)?;
        let taps = cin * k * k;
        let m = rows * wo;
        let count = b * taps * m;
        // SAFETY: the kernel writes every element of the column matrix.
        let col = unsafe { dev.alloc::<bf16>(count)? };
        // Stride 1 with a centred kernel of width 1 or 3 over rows of a multiple of 8 values:
        // the variant that reads aligned 16-byte chunks (it takes no stride argument).
        let aligned = x.layout().start_offset() % 8 == 0;
        let chunked =
            stride == 1 && k == 2 * pad + 1 && pad <= 1 && wd % 8 == 0 && wo == wd && aligned;
        let name = if chunked {
            "parallax_im2col_s1_bf16"
        } else {
            "parallax_im2col_bf16"
        };
        let func = crate::kernels::nvrtc::function(&dev, "conv", SOURCE, false, name)?;
        {
            let (xs, xl) = x.storage_and_layout();
            let xv = view::<bf16>(&xs, xl)?;
            let int = |v: usize| -> Result<i32> {
                i32::try_from(v).map_err(|_| {
                    candle_core::Error::Msg(format!("convolution: size {v} past 2^31"))
                })
            };
            let mut args = vec![int(cin)?, int(h)?, int(wd)?, int(k)?];
            if !chunked {
                args.push(int(stride)?);
            }
            args.extend([int(pad)?, int(r0)?, int(rows)?, int(wo)?]);
            let mut bld = func.builder();
            bld.arg(&xv);
            bld.arg(&col);
            for a in &args {
                bld.arg(a);
            }
            let cfg = LaunchConfig {
                grid_dim: (
                    m.div_ceil(8 * 256).clamp(1, 65_535) as u32,
                    taps as u32,
                    b as u32,
                ),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: arguments match the kernel; sizes from the checked shapes, the grid's
            // y and z within the checked limits.
            unsafe { bld.launch(cfg) }.w()?;
        }
        Ok(col)
    }

    /// [`super::conv2d_banded`] on Parallax's kernel: per band, the column matrix, then per batch
    /// item one cuBLASLt product written straight into the band's rows of every output channel.
    /// Column-major, the band's output is (positions × Cout) with leading dimension Ho·Wo (a
    /// channel's map), equal to col (positions × taps, leading dimension positions) times the
    /// weight (taps × Cout, leading dimension taps): no transposes.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn conv_banded(
        x: &Tensor,
        w: &Tensor,
        (b, cin, cout, k): (usize, usize, usize, usize),
        stride: usize,
        pad: usize,
        (ho, wo): (usize, usize),
        products: &[super::BandProduct],
    ) -> Result<Tensor> {
        use candle_core::cuda_backend::cudarc::cublaslt::{Matmul, MatmulConfig};
        let x = x.contiguous()?;
        let dev = device(&x)?;
        let taps = cin * k * k;
        let wmat = w.to_dtype(DType::BF16)?.contiguous()?;
        let map = ho * wo;
        // SAFETY: the bands together write every output row of every channel.
        let mut out = unsafe { dev.alloc::<bf16>(b * cout * map)? };
        let h = crate::kernels::gemm::lt_handle(&dev)?;
        let (ws, wl) = wmat.storage_and_layout();
        let wv = view::<bf16>(&ws, wl)?;
        for band in super::bands(products) {
            let Some(first) = band.first() else { continue };
            let col = im2col(&x, (b, cin, k), stride, pad, first.r0, first.rows, wo)?;
            for p in band {
                let m = p.m;
                let cfg = MatmulConfig {
                    transa: false,
                    transb: false,
                    transc: false,
                    m: m as u64,
                    n: cout as u64,
                    k: taps as u64,
                    alpha: 1.0,
                    lda: m as i64,
                    ldb: taps as i64,
                    beta: 0.0,
                    ldc: p.ldc as i64,
                    stride_a: None,
                    stride_b: None,
                    stride_c: None,
                    stride_bias: None,
                    batch_size: None,
                };
                let a = col.slice(p.a_offset..p.a_offset + taps * m);
                let mut c = out.slice_mut(p.c_offset..p.c_offset + (cout - 1) * p.ldc + m);
                // SAFETY: `a` holds m·taps values, the weight taps·Cout; the output view holds
                // (Cout - 1)·Ho·Wo + m values from the band's first position of channel 0, the
                // last channel's band ending at its end.
                unsafe { h.matmul(cfg, &a, &wv, &mut c, None, None) }.map_err(|e| {
                    candle_core::Error::Cuda(format!("cuBLASLt convolution product: {e:?}").into())
                })?;
            }
        }
        Ok(wrap(out, &dev, &[b, cout, ho, wo]))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn conv_rows(
        x: &Tensor,
        w: &Tensor,
        (b, cin, cout, k): (usize, usize, usize, usize),
        stride: usize,
        pad: usize,
        r0: usize,
        rows: usize,
        wo: usize,
    ) -> Result<Tensor> {
        let taps = cin * k * k;
        let m = rows * wo;
        let wmat = w
            .contiguous()?
            .reshape((1, cout, taps))?
            .broadcast_as((b, cout, taps))?;
        if k == 1 && stride == 1 && pad == 0 {
            let xs = x.narrow(2, r0, rows)?.contiguous()?.reshape((b, cin, m))?;
            return wmat.matmul(&xs)?.reshape((b, cout, rows, wo));
        }
        let x = x.contiguous()?;
        let dev = device(&x)?;
        let col = im2col(&x, (b, cin, k), stride, pad, r0, rows, wo)?;
        let col = wrap(col, &dev, &[b, taps, m]);
        wmat.matmul(&col)?.reshape((b, cout, rows, wo))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The column matrix of output rows `r0..r0 + rows` as the im2col kernel lays it out:
    /// (B, taps, rows·Wo) row-major, taps in (channel, ky, kx) order (the weight's), zeros
    /// outside the map.
    #[allow(clippy::too_many_arguments)]
    fn im2col_cpu(
        x: &[f32],
        (b, cin, h, w): (usize, usize, usize, usize),
        k: usize,
        (stride, pad): (usize, usize),
        r0: usize,
        rows: usize,
        wo: usize,
    ) -> Vec<f32> {
        let (taps, m) = (cin * k * k, rows * wo);
        let mut col = vec![0f32; b * taps * m];
        for bi in 0..b {
            for ci in 0..cin {
                for ky in 0..k {
                    for kx in 0..k {
                        let t = (ci * k + ky) * k + kx;
                        for r in 0..rows {
                            for cx in 0..wo {
                                let y = ((r0 + r) * stride + ky) as isize - pad as isize;
                                let xx = (cx * stride + kx) as isize - pad as isize;
                                if y >= 0 && xx >= 0 && (y as usize) < h && (xx as usize) < w {
                                    col[(bi * taps + t) * m + r * wo + cx] =
                                        x[((bi * cin + ci) * h + y as usize) * w + xx as usize];
                                }
                            }
                        }
                    }
                }
            }
        }
        col
    }

    /// The in-place path's products (`band_products`: offsets and leading dimensions), run here
    /// as plain column-major products over the column matrix, write every output value once and
    /// equal candle's convolution, for bands of several heights (the last one shorter) and two
    /// batch items; and the alignment test accepts the autoencoder's shapes.
    #[test]
    fn band_products_compute_the_convolution_in_place() -> Result<()> {
        let dev = Device::Cpu;
        let (b, cin, cout, k, h, w) = (2usize, 3usize, 5usize, 3usize, 7usize, 6usize);
        let x = Tensor::randn(0f32, 1.0, (b, cin, h, w), &dev)?;
        let wt = Tensor::randn(0f32, 1.0, (cout, cin, k, k), &dev)?;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let ws = wt.flatten_all()?.to_vec1::<f32>()?;
        let taps = cin * k * k;
        for (stride, pad) in [(1usize, 1usize), (2, 0)] {
            let want = x.conv2d(&wt, pad, stride, 1, 1)?;
            let (ho, wo) = (want.dim(2)?, want.dim(3)?);
            let want = want.flatten_all()?.to_vec1::<f32>()?;
            for band in [1, 2, 3, ho] {
                let mut out = vec![f32::NAN; b * cout * ho * wo];
                let products = band_products((b, taps, cout), (ho, wo), band);
                // As the CUDA path walks them: one column matrix a band, a product a batch item.
                for band in bands(&products) {
                    let Some(first) = band.first() else { continue };
                    let col = im2col_cpu(
                        &xs,
                        (b, cin, h, w),
                        k,
                        (stride, pad),
                        first.r0,
                        first.rows,
                        wo,
                    );
                    for p in band {
                        for c in 0..cout {
                            for i in 0..p.m {
                                let s: f32 = (0..taps)
                                    .map(|t| col[p.a_offset + t * p.m + i] * ws[c * taps + t])
                                    .sum();
                                let at = p.c_offset + c * p.ldc + i;
                                assert!(out[at].is_nan(), "output {at} written twice");
                                out[at] = s;
                            }
                        }
                    }
                }
                for (i, (g, e)) in out.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() < 1e-4,
                        "stride {stride} band {band} at {i}: {g} vs {e}"
                    );
                }
            }
        }
        // The autoencoder at 1024 px: 128 channels at full size in bands of 224 rows (a multiple
        // of 128 values apart), and 512 channels at 256 px; a batch of two with a last band whose
        // column matrix would start unaligned is refused.
        let in_place = |(b, taps, cout), (ho, wo), band| {
            aligned_in_place(&band_products((b, taps, cout), (ho, wo), band), (ho, wo))
        };
        assert!(in_place((1, 128 * 9, 128), (1024, 1024), 224));
        assert!(in_place((2, 512 * 9, 512), (256, 256), 50));
        assert!(in_place((1, 27, 16), (20, 8), 16));
        assert!(!in_place((2, 27, 16), (20, 8), 16));
        assert!(!in_place((1, 9, 8), (10, 20), 3));
        Ok(())
    }

    #[test]
    fn row_bands_equal_the_whole_convolution() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 9, 7), &dev)?;
        for (k, pad) in [(3usize, 1usize), (3, 0), (1, 0), (5, 2)] {
            let w = Tensor::randn(0f32, 1.0, (4, 3, k, k), &dev)?;
            let whole = x.conv2d(&w, pad, 1, 1, 1)?;
            let ho = whole.dim(2)?;
            for (r0, r1) in [(0, ho), (0, 1), (1, ho), (ho / 2, ho), (ho - 1, ho)] {
                let got = conv2d_rows(&x, &w, 1, pad, r0, r1)?;
                let want = whole.narrow(2, r0, r1 - r0)?;
                let d = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(d < 1e-5, "k {k} pad {pad} rows {r0}..{r1}: {d}");
            }
        }
        // Stride 2 (the encoder's downsampling), with and without padding.
        let w = Tensor::randn(0f32, 1.0, (4, 3, 3, 3), &dev)?;
        for pad in [0usize, 1] {
            let whole = x.conv2d(&w, pad, 2, 1, 1)?;
            let ho = whole.dim(2)?;
            for (r0, r1) in [(0, 1), (1, ho), (ho / 2, ho), (ho - 1, ho)] {
                let got = conv2d_rows(&x, &w, 2, pad, r0, r1)?;
                let d = (got - whole.narrow(2, r0, r1 - r0)?)?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?;
                assert!(d < 1e-5, "stride 2 pad {pad} rows {r0}..{r1}: {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn bad_shapes_are_errors() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &dev)?;
        let w = Tensor::zeros((2, 3, 3, 3), DType::F32, &dev)?;
        assert!(conv2d_rows(&x, &w, 1, 1, 0, 5).is_err());
        assert!(conv2d_rows(&x, &w, 1, 1, 2, 2).is_err());
        assert!(conv2d_rows(
            &x,
            &Tensor::zeros((2, 5, 3, 3), DType::F32, &dev)?,
            1,
            1,
            0,
            4
        )
        .is_err());
        let tiny = Tensor::zeros((1, 3, 1, 1), DType::F32, &dev)?;
        assert!(conv2d_rows(&tiny, &w, 1, 0, 0, 1).is_err());
        Ok(())
    }
}
