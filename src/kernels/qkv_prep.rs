//! From QKV projections to attention-ready queries, keys and values, in one pass on CUDA.
//!
//! [`qkv_prep`] splits each stream's projection into q, k, v, RMS-normalises q and k with their
//! learned scales, joins the streams along the sequence (text first), and applies the 3-axis
//! RoPE, returning (B, H, L, D) tensors. On CUDA in bf16 it runs `qkv_prep.cu`; elsewhere
//! [`qkv_prep_reference`], the same function in plain candle ops. The rotation comes as plain
//! cosine and sine tables ([`RopeTables`]); the model's `PosEmbed` converts into them.

use candle_core::{Result, Tensor, D};

use super::reference::rope;

/// The kernel source (CUDA C++, compiled with NVRTC).
pub const SOURCE: &str = concat!(include_str!("common.cuh"), include_str!("qkv_prep.cu"));

/// One token stream: its QKV projection (B, rows, >= 3·H·D; only the first 3·H·D columns are
/// read) and its q/k RMSNorm scales (D).
#[derive(Debug, Clone, Copy)]
pub struct QkvStream<'a> {
    pub qkv: &'a Tensor,
    pub q_scale: &'a Tensor,
    pub k_scale: &'a Tensor,
}

/// The interleaved RoPE tables of the joint sequence: cosine and sine, (L, head_dim/2) each.
#[derive(Debug, Clone, Copy)]
pub struct RopeTables<'a> {
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
}

/// q, k, v (B, H, L, D) for one or two streams (text then image), rotated by `pe`.
pub fn qkv_prep<'a>(
    streams: &[QkvStream],
    pe: impl Into<RopeTables<'a>>,
    heads: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let pe = pe.into();
    #[cfg(feature = "cuda")]
    if fused_enabled() {
        if let Some(out) = cuda::try_qkv_prep(streams, pe, heads)? {
            return Ok(out);
        }
    }
    qkv_prep_reference(streams, pe, heads)
}

/// Whether the fused kernel may be used (`PARALLAX_NO_FUSED_QKV` turns it off, to compare).
pub fn fused_enabled() -> bool {
    std::env::var_os("PARALLAX_NO_FUSED_QKV").is_none()
}

/// The plain composition: split, RMSNorm, concatenate, rotate.
pub fn qkv_prep_reference<'a>(
    streams: &[QkvStream],
    pe: impl Into<RopeTables<'a>>,
    heads: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let pe = pe.into();
    let (mut qs, mut ks, mut vs) = (Vec::new(), Vec::new(), Vec::new());
    for s in streams {
        let (b, l, w) = s.qkv.dims3()?;
        let d = s.q_scale.dim(0)?;
        let hd = heads * d;
        if w < 3 * hd {
            candle_core::bail!("qkv projection is {w} wide, needs at least {}", 3 * hd)
        }
        let qkv = s
            .qkv
            .narrow(D::Minus1, 0, 3 * hd)?
            .reshape((b, l, 3, heads, d))?
            .permute((2, 0, 3, 1, 4))?;
        let q = candle_nn::ops::rms_norm(&qkv.get(0)?.contiguous()?, s.q_scale, 1e-6)?;
        let k = candle_nn::ops::rms_norm(&qkv.get(1)?.contiguous()?, s.k_scale, 1e-6)?;
        qs.push(q);
        ks.push(k);
        vs.push(qkv.get(2)?);
    }
    let join = |v: Vec<Tensor>| -> Result<Tensor> {
        if v.len() == 1 {
            v[0].contiguous()
        } else {
            Tensor::cat(&v, 2)
        }
    };
    let q = rope(&join(qs)?, pe.cos, pe.sin)?;
    let k = rope(&join(ks)?, pe.cos, pe.sin)?;
    Ok((q, k, join(vs)?))
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::*;
    use crate::kernels::cuda_util::{view, wrap};
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::WrapErr;
    use candle_core::DType;
    use half::bf16;

    /// The fused kernel, or `None` when the inputs are not what it takes.
    pub(super) fn try_qkv_prep(
        streams: &[QkvStream],
        pe: RopeTables<'_>,
        heads: usize,
    ) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        if streams.is_empty() || streams.len() > 2 {
            return Ok(None);
        }
        let first = streams[0].qkv;
        let d = streams[0].q_scale.dim(0)?;
        if !first.device().is_cuda() || !(d == 64 || d == 128) {
            return Ok(None);
        }
        let mut rows = Vec::new();
        let mut row_strides = Vec::new();
        let mut b = 0;
        for s in streams {
            let (bb, l, w) = s.qkv.dims3()?;
            let st = s.qkv.stride();
            let ok_layout = st[2] == 1 && (bb == 1 || st[0] == l * st[1]) && st[1] % 2 == 0;
            let ok_dtype = [s.qkv, s.q_scale, s.k_scale]
                .iter()
                .all(|t| t.dtype() == DType::BF16);
            if !ok_layout || !ok_dtype || w < 3 * heads * d || s.q_scale.dim(0)? != d {
                return Ok(None);
            }
            if s.qkv.layout().start_offset() % 2 != 0 {
                return Ok(None);
            }
            b = bb;
            rows.push(l);
            row_strides.push(st[1]);
        }
        if pe.cos.dtype() != DType::BF16 {
            return Ok(None);
        }
        let total: usize = rows.iter().sum();
        let dev = match first.device() {
            candle_core::Device::Cuda(d) => d.clone(),
            _ => return Ok(None),
        };
        let cos = pe.cos.contiguous()?;
        let sin = pe.sin.contiguous()?;
        if cos.dims() != [total, d / 2] {
            candle_core::bail!(
                "qkv_prep: RoPE tables {:?} for {total} tokens of head dim {d}",
                cos.dims()
            )
        }
        // Text stream (or the only stream) first.
        let (txt, img) = if streams.len() == 2 {
            (streams[0], streams[1])
        } else {
            (streams[0], streams[0])
        };
        let (lt, li) = if streams.len() == 2 {
            (rows[0], rows[1])
        } else {
            (0, rows[0])
        };
        let (ts, is) = if streams.len() == 2 {
            (row_strides[0], row_strides[1])
        } else {
            (row_strides[0], row_strides[0])
        };
        let guards = [
            txt.qkv.storage_and_layout(),
            txt.q_scale.storage_and_layout(),
            txt.k_scale.storage_and_layout(),
            img.qkv.storage_and_layout(),
            img.q_scale.storage_and_layout(),
            img.k_scale.storage_and_layout(),
            cos.storage_and_layout(),
            sin.storage_and_layout(),
        ];
        let views = guards
            .iter()
            .map(|(s, l)| view::<bf16>(s, l))
            .collect::<Result<Vec<_>>>()?;
        let n = b * heads * total * d;
        // SAFETY: the kernel writes every element of q, k and v.
        let (q, k, v) = unsafe {
            (
                dev.alloc::<bf16>(n)?,
                dev.alloc::<bf16>(n)?,
                dev.alloc::<bf16>(n)?,
            )
        };
        let kernel = if d == 128 {
            "parallax_qkv_prep_bf16_d128"
        } else {
            "parallax_qkv_prep_bf16_d64"
        };
        let func = crate::kernels::nvrtc::function(&dev, "qkv_prep", SOURCE, false, kernel)?;
        let (ts, is, lt, li, h) = (ts as i32, is as i32, lt as i32, li as i32, heads as i32);
        let mut builder = func.builder();
        builder.arg(&views[0]);
        builder.arg(&ts);
        builder.arg(&views[1]);
        builder.arg(&views[2]);
        builder.arg(&views[3]);
        builder.arg(&is);
        builder.arg(&views[4]);
        builder.arg(&views[5]);
        builder.arg(&views[6]);
        builder.arg(&views[7]);
        builder.arg(&q);
        builder.arg(&k);
        builder.arg(&v);
        builder.arg(&lt);
        builder.arg(&li);
        builder.arg(&h);
        let cfg = LaunchConfig {
            grid_dim: (total as u32, b as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match the kernel's signature; sizes come from the checked shapes.
        unsafe { builder.launch(cfg) }.w()?;
        drop(views);
        drop(guards);
        let shape = [b, heads, total, d];
        Ok(Some((
            wrap(q, &dev, &shape),
            wrap(k, &dev, &shape),
            wrap(v, &dev, &shape),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn reference_handles_strided_single_stream_rows() -> Result<()> {
        // A single-block style input: qkv columns followed by MLP columns in the same rows.
        let dev = Device::Cpu;
        let (b, l, h, d) = (1, 6, 2, 8);
        let wide = Tensor::randn(0f32, 1.0, (b, l, 3 * h * d + 5), &dev)?;
        let narrow = wide.narrow(2, 0, 3 * h * d)?.contiguous()?;
        let qs = Tensor::randn(1f32, 0.1, d, &dev)?;
        let ks = Tensor::randn(1f32, 0.1, d, &dev)?;
        // RoPE tables for the l tokens: any angles make a rotation.
        let angles = Tensor::randn(0f32, 1.0, (l, d / 2), &dev)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        let pe = RopeTables {
            cos: &cos,
            sin: &sin,
        };
        let s = |t| QkvStream {
            qkv: t,
            q_scale: &qs,
            k_scale: &ks,
        };
        let (q1, k1, v1) = qkv_prep_reference(&[s(&wide)], pe, h)?;
        let (q2, k2, v2) = qkv_prep_reference(&[s(&narrow)], pe, h)?;
        for (a, c) in [(q1, q2), (k1, k2), (v1, v2)] {
            assert_eq!(a.dims(), &[b, h, l, d]);
            let diff = (a - c)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0);
        }
        // Two streams join text first.
        let (txt, img) = (wide.narrow(1, 0, 2)?, wide.narrow(1, 2, 4)?);
        let (q3, _, v3) = qkv_prep_reference(&[s(&txt), s(&img)], pe, h)?;
        let (q4, _, v4) = qkv_prep_reference(&[s(&wide)], pe, h)?;
        assert_eq!((q3 - q4)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        assert_eq!((v3 - v4)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }
}
