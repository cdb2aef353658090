//! Plain candle compositions at the bottom of the library: chunked attention and the interleaved
//! RoPE rotation. The kernels fall back to them on inputs they do not take and are checked against
//! them; the model calls them through [`crate::model::attention::sdpa_chunked`] and
//! [`crate::model::flux::apply_rope`].

use candle_core::{DType, Result, Tensor, D};

/// softmax(Q Kᵀ / √d) V, over chunks of `chunk` queries.
pub fn sdpa_chunked(q: &Tensor, k: &Tensor, v: &Tensor, chunk: usize) -> Result<Tensor> {
    let (_, _, lq, d) = q.dims4()?;
    let scale = 1.0 / (d as f64).sqrt();
    let kt = k.transpose(D::Minus2, D::Minus1)?.contiguous()?;
    let v = v.contiguous()?;
    let chunk = chunk.max(1);
    let mut outs = Vec::with_capacity(lq.div_ceil(chunk));
    let mut start = 0;
    while start < lq {
        let n = chunk.min(lq - start);
        let qc = q.narrow(2, start, n)?.contiguous()?;
        let scores = (qc.matmul(&kt)? * scale)?;
        // candle's CPU softmax sums in the input dtype, which loses most of a long bf16/f16 row
        // (relative error ~1 at 4608 keys): take it in f32 there. GPU kernels accumulate in f32.
        let p = if scores.device().is_cpu() && scores.dtype() != DType::F32 {
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
                .to_dtype(scores.dtype())?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        outs.push(p.matmul(&v)?);
        start += n;
    }
    if outs.len() == 1 {
        return Ok(outs.remove(0));
    }
    Tensor::cat(&outs, 2)
}

/// Rotate (B, H, L, D) queries or keys by the interleaved RoPE tables `cos` and `sin`
/// (L, D/2 each): pair (2i, 2i+1) of token l turns by the angle whose cosine is `cos[l][i]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    candle_nn::rotary_emb::rope_i(&x.contiguous()?, cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn chunked_equals_unchunked() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 37, 16), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, 2, 37, 16), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, 2, 37, 16), &dev)?;
        let a = sdpa_chunked(&q, &k, &v, 1000)?;
        let b = sdpa_chunked(&q, &k, &v, 5)?;
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        // Against the textbook formula.
        let s = (q.matmul(&k.t()?)? / 4.0)?;
        let p = candle_nn::ops::softmax(&s, D::Minus1)?;
        let c = p.matmul(&v)?;
        let diff = (sdpa_chunked(&q, &k, &v, 8)? - c)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    #[test]
    fn half_precision_on_cpu_stays_accurate_for_long_rows() -> Result<()> {
        // 3000 keys: a softmax summed in bf16 would be off by ~100%.
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 40, 64), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, 2, 3000, 64), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, 2, 3000, 64), &dev)?;
        let bf = |t: &Tensor| t.to_dtype(DType::BF16);
        let out = sdpa_chunked(&bf(&q)?, &bf(&k)?, &bf(&v)?, 16)?.to_dtype(DType::F32)?;
        let reference = sdpa_chunked(
            &bf(&q)?.to_dtype(DType::F32)?,
            &bf(&k)?.to_dtype(DType::F32)?,
            &bf(&v)?.to_dtype(DType::F32)?,
            16,
        )?;
        let num = (&out - &reference)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()?
            .sqrt();
        let den = reference.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
        assert!(num / den < 2e-2, "relative error {}", num / den);
        Ok(())
    }
}
