//! The two 8-bit floating-point formats of FP8 checkpoints, on the host: E4M3 ("e4m3fn": 4
//! exponent bits with bias 7, 3 mantissa bits, no infinities, one NaN pattern per sign, largest
//! value 448) and E5M2 (5 exponent bits with bias 15, 2 mantissa bits, IEEE-style infinities and
//! NaNs, largest finite value 57344). Decoding is exact (every FP8 value is an f32 value);
//! encoding rounds to the nearest representable value, ties to even, and saturates at the largest
//! finite value (what PyTorch's `float8_e4m3fn` casts do for in-range inputs, and what scaled
//! quantisation relies on).

/// An FP8 format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8 {
    E4M3,
    E5M2,
}

impl Fp8 {
    fn bits(self) -> (u32, u32, i32) {
        match self {
            Fp8::E4M3 => (4, 3, 7),
            Fp8::E5M2 => (5, 2, 15),
        }
    }

    /// The largest finite value.
    pub fn max(self) -> f32 {
        match self {
            Fp8::E4M3 => 448.0,
            Fp8::E5M2 => 57344.0,
        }
    }

    /// The value of one byte.
    pub fn decode(self, b: u8) -> f32 {
        let (e_bits, m_bits, bias) = self.bits();
        let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = ((b >> m_bits) & ((1 << e_bits) - 1)) as i32;
        let m = (b & ((1 << m_bits) - 1)) as f32;
        let scale = (1u32 << m_bits) as f32;
        let e_max = (1 << e_bits) - 1;
        match self {
            Fp8::E4M3 if e == e_max && m as u32 == 7 => return f32::NAN,
            Fp8::E5M2 if e == e_max => {
                return if m == 0.0 {
                    sign * f32::INFINITY
                } else {
                    f32::NAN
                }
            }
            _ => {}
        }
        if e == 0 {
            sign * (m / scale) * 2f32.powi(1 - bias)
        } else {
            sign * (1.0 + m / scale) * 2f32.powi(e - bias)
        }
    }

    /// Every byte's value (computed once per format).
    pub fn table(self) -> &'static [f32; 256] {
        static E4M3: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
        static E5M2: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
        let cell = match self {
            Fp8::E4M3 => &E4M3,
            Fp8::E5M2 => &E5M2,
        };
        cell.get_or_init(|| std::array::from_fn(|b| self.decode(b as u8)))
    }

    /// The byte code of the largest positive finite value.
    fn top(self) -> u8 {
        match self {
            Fp8::E4M3 => 0x7E,
            Fp8::E5M2 => 0x7B,
        }
    }

    /// The byte nearest `x` (ties to an even mantissa), saturating at ±[`Fp8::max`]; NaN stays
    /// NaN.
    pub fn encode(self, x: f32) -> u8 {
        let table = self.table();
        if x.is_nan() {
            return match self {
                Fp8::E4M3 => 0x7F,
                Fp8::E5M2 => 0x7E,
            };
        }
        let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
        let a = x.abs().min(self.max());
        // Positive finite codes are monotonic in their byte value: 0 .. the largest finite.
        let top = self.top();
        let (mut lo, mut hi) = (0u8, top);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if table[mid as usize] <= a {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        let below = lo;
        let pick = if below == top || table[below as usize] == a {
            below
        } else {
            let above = below + 1;
            let (d0, d1) = (a - table[below as usize], table[above as usize] - a);
            if d0 < d1 || (d0 == d1 && below % 2 == 0) {
                below
            } else {
                above
            }
        };
        sign | pick
    }

    /// `x` rounded to this format (encode then decode).
    pub fn round(self, x: f32) -> f32 {
        self.table()[self.encode(x) as usize]
    }
}

/// The E4M3 scale of values whose largest magnitude is `m`, as every GPU quantiser computes it
/// (`e4m3_scale` in `common.cuh`): `m / 448`, at least the smallest normal f32 (its reciprocal
/// stays finite), or 1 where `m` is 0, not finite or past 3e38 (the values then saturate). The
/// values are then multiplied by `1 / scale` and rounded.
pub fn e4m3_scale(m: f32) -> f32 {
    if m > 0.0 && m < 3.0e38 {
        (m / Fp8::E4M3.max()).max(f32::MIN_POSITIVE)
    } else {
        1.0
    }
}

/// One group of values (a row, or a group of rows) quantised to E4M3 with a scale of its own, as
/// every quantiser here and on the GPU does it: [`e4m3_scale`] of the group's largest magnitude,
/// each value multiplied by the scale's reciprocal and rounded. The bytes are appended to `out`;
/// returns the scale.
pub fn encode_group(values: &[f32], out: &mut Vec<u8>) -> f32 {
    let scale = group_scale(values);
    let inv = 1.0 / scale;
    out.extend(values.iter().map(|x| Fp8::E4M3.encode(x * inv)));
    scale
}

/// [`encode_group`] then decoded in place: the values as FP8 leaves them. Returns the scale.
pub fn round_group(values: &mut [f32]) -> f32 {
    let scale = group_scale(values);
    let inv = 1.0 / scale;
    for x in values.iter_mut() {
        *x = Fp8::E4M3.round(*x * inv) * scale;
    }
    scale
}

/// A group's E4M3 scale: [`e4m3_scale`] of its largest magnitude.
fn group_scale(values: &[f32]) -> f32 {
    e4m3_scale(values.iter().fold(0f32, |m, x| m.max(x.abs())))
}

/// `t` rounded to E4M3 with one scale per row of its last axis (the row's largest magnitude maps
/// to 448): FP8's rounding simulated in `t`'s dtype, quantise then dequantise. Weights (out, in)
/// get a scale per output channel; activations (.., tokens, width) a scale per token, as dynamic
/// per-token quantisation gives them.
pub fn round_rows(t: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    use candle_core::{DType, Device};
    let (dtype, device, shape) = (t.dtype(), t.device().clone(), t.shape().clone());
    let width = shape.dims().last().copied().unwrap_or(1).max(1);
    let mut v = t
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    for row in v.chunks_mut(width) {
        round_group(row);
    }
    candle_core::Tensor::from_vec(v, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(&device)
}

/// Decode a buffer of FP8 bytes.
pub fn decode_all(format: Fp8, bytes: &[u8]) -> Vec<f32> {
    let table = format.table();
    bytes.iter().map(|&b| table[b as usize]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_keep_their_largest_value_and_lose_little() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        let t = candle_core::Tensor::randn(0f32, 1.0, (7, 33), &dev)?;
        let r = round_rows(&t)?;
        let (a, b) = (t.to_vec2::<f32>()?, r.to_vec2::<f32>()?);
        for (x, y) in a.iter().zip(&b) {
            let m = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let my = y.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(
                (m - my).abs() <= m * 1e-6,
                "the row's largest value is kept"
            );
            for (u, v) in x.iter().zip(y) {
                // Half a step of E4M3 at the value's binade, or of the smallest normal.
                assert!((u - v).abs() <= (u.abs() / 16.0).max(m / 448.0 * 2f32.powi(-7)) + 1e-7);
            }
        }
        Ok(())
    }

    /// Rows whose largest value is so small that `m / 448` would have no finite reciprocal keep
    /// a finite scale (the smallest normal f32): no NaN for their zeros, no infinities; zero,
    /// non-finite and huge maxima take scale 1, as the GPU's quantisers do.
    #[test]
    fn tiny_rows_get_a_scale_with_a_finite_reciprocal() -> candle_core::Result<()> {
        for m in [1e-38f32, 1e-40, 2e-45] {
            let s = e4m3_scale(m);
            assert!(
                s >= f32::MIN_POSITIVE && (1.0 / s).is_finite(),
                "{m}: scale {s}"
            );
        }
        assert_eq!(e4m3_scale(0.0), 1.0);
        assert_eq!(e4m3_scale(f32::INFINITY), 1.0);
        assert_eq!(e4m3_scale(f32::NAN), 1.0);
        assert_eq!(e4m3_scale(3.2e38), 1.0);
        assert_eq!(e4m3_scale(448.0), 1.0);
        let dev = candle_core::Device::Cpu;
        let t = candle_core::Tensor::new(&[[1e-39f32, 0.0, -5e-40, 0.0]], &dev)?;
        let r = round_rows(&t)?.to_vec2::<f32>()?;
        assert!(r[0].iter().all(|v| v.is_finite()), "{r:?}");
        assert_eq!((r[0][1], r[0][3]), (0.0, 0.0));
        Ok(())
    }

    #[test]
    fn known_values() {
        let f = Fp8::E4M3;
        assert_eq!(f.decode(0x00), 0.0);
        assert_eq!(f.decode(0x38), 1.0); // e = 7, m = 0
        assert_eq!(f.decode(0x7E), 448.0);
        assert!(f.decode(0x7F).is_nan());
        assert_eq!(f.decode(0x01), 2f32.powi(-9)); // smallest subnormal
        assert_eq!(f.decode(0xB8), -1.0);
        let g = Fp8::E5M2;
        assert_eq!(g.decode(0x3C), 1.0); // e = 15, m = 0
        assert_eq!(g.decode(0x7B), 57344.0);
        assert_eq!(g.decode(0x7C), f32::INFINITY);
        assert_eq!(g.decode(0x01), 2f32.powi(-16));
    }

    #[test]
    fn encode_round_trips_every_finite_code_and_rounds_to_nearest() {
        for f in [Fp8::E4M3, Fp8::E5M2] {
            for b in 0..=255u8 {
                let v = f.decode(b);
                if v.is_finite() && !(v == 0.0 && b & 0x80 != 0) {
                    assert_eq!(f.encode(v), b, "{f:?} {b:#x} {v}");
                }
            }
            assert_eq!(f.round(1e9), f.max());
            assert_eq!(f.round(-1e9), -f.max());
        }
        // 1.0625 lies halfway between 1.0 (m = 0) and 1.125 (m = 1): ties go to the even one.
        assert_eq!(Fp8::E4M3.round(1.0625), 1.0);
        assert_eq!(Fp8::E4M3.round(1.07), 1.125);
        // Relative error of a rounding is at most half a step: 2^-4 for E4M3 normals.
        for i in 0..1000 {
            let x = 0.02 + i as f32 * 0.37;
            let r = Fp8::E4M3.round(x);
            assert!(((r - x) / x).abs() <= 0.0625 + 1e-6, "{x} -> {r}");
        }
    }
}
