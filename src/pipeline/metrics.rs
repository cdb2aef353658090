//! Image quality against a reference: PSNR and SSIM, as the compare view reports them for each
//! cache threshold against the uncached image.

use super::image::RgbImage;
use crate::error::{Error, Result};

/// Quality of `img` against `reference`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Quality {
    /// Peak signal-to-noise ratio in dB over RGB (infinite for identical images).
    pub psnr_db: f64,
    /// Mean structural similarity of the luma (1 = identical).
    pub ssim: f64,
}

fn same_size(a: &RgbImage, b: &RgbImage) -> Result<()> {
    if a.width != b.width || a.height != b.height || a.data.len() != b.data.len() {
        return Err(Error::Image(format!(
            "images differ in size: {}x{} vs {}x{}",
            a.width, a.height, b.width, b.height
        )));
    }
    Ok(())
}

/// PSNR and SSIM of `img` against `reference` (same size).
pub fn quality(img: &RgbImage, reference: &RgbImage) -> Result<Quality> {
    Ok(Quality {
        psnr_db: psnr(img, reference)?,
        ssim: ssim(img, reference)?,
    })
}

/// `|a - b| / |b|` (Euclidean norms over every value, in f32): how far a tensor lands from a
/// reference.
pub fn relative_error(a: &candle_core::Tensor, b: &candle_core::Tensor) -> Result<f64> {
    use candle_core::DType;
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let num = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let den = b.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    Ok((num / den.max(1e-30)).sqrt())
}

/// Peak signal-to-noise ratio over all RGB samples, 8-bit peak.
pub fn psnr(a: &RgbImage, b: &RgbImage) -> Result<f64> {
    same_size(a, b)?;
    let mse = a
        .data
        .iter()
        .zip(&b.data)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        / a.data.len().max(1) as f64;
    Ok(if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255f64.powi(2) / mse).log10()
    })
}

fn luma(img: &RgbImage) -> Vec<f64> {
    img.data
        .chunks_exact(3)
        .map(|p| 0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64)
        .collect()
}

/// Structural similarity of the luma, 7x7 uniform windows at every position where one fits
/// (Wang et al. 2004 with K1 = 0.01, K2 = 0.03, L = 255; windows shrink for tiny images).
pub fn ssim(a: &RgbImage, b: &RgbImage) -> Result<f64> {
    same_size(a, b)?;
    let (w, h) = (a.width, a.height);
    let win = 7.min(w).min(h);
    if win == 0 {
        return Err(Error::Image("cannot compare empty images".into()));
    }
    let (x, y) = (luma(a), luma(b));
    let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
    let n = (win * win) as f64;
    let mut total = 0.0;
    let mut count = 0usize;
    for y0 in 0..=h - win {
        for x0 in 0..=w - win {
            let (mut sx, mut sy, mut sxx, mut syy, mut sxy) = (0.0, 0.0, 0.0, 0.0, 0.0);
            for dy in 0..win {
                let row = (y0 + dy) * w + x0;
                for i in row..row + win {
                    let (p, q) = (x[i], y[i]);
                    sx += p;
                    sy += q;
                    sxx += p * p;
                    syy += q * q;
                    sxy += p * q;
                }
            }
            let (mx, my) = (sx / n, sy / n);
            // Sample (co)variances, as in the paper's reference code.
            let vx = (sxx - n * mx * mx) / (n - 1.0).max(1.0);
            let vy = (syy - n * my * my) / (n - 1.0).max(1.0);
            let cxy = (sxy - n * mx * my) / (n - 1.0).max(1.0);
            total += ((2.0 * mx * my + c1) * (2.0 * cxy + c2))
                / ((mx * mx + my * my + c1) * (vx + vy + c2));
            count += 1;
        }
    }
    Ok(total / count as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(w: usize, h: usize, f: impl Fn(usize, usize) -> [u8; 3]) -> RgbImage {
        let mut data = Vec::new();
        for y in 0..h {
            for x in 0..w {
                data.extend(f(x, y));
            }
        }
        RgbImage {
            width: w,
            height: h,
            data,
        }
    }

    #[test]
    fn identical_images_are_perfect() {
        let a = img(16, 12, |x, y| {
            [(x * 9) as u8, (y * 13) as u8, ((x + y) * 5) as u8]
        });
        let q = quality(&a, &a).expect("same size");
        assert!(q.psnr_db.is_infinite());
        assert!((q.ssim - 1.0).abs() < 1e-12);
    }

    #[test]
    fn psnr_matches_hand_computation() {
        let a = img(4, 4, |_, _| [100, 100, 100]);
        let b = img(4, 4, |_, _| [110, 100, 100]);
        // MSE = 100 / 3 over all samples.
        let expect = 10.0 * (255f64 * 255.0 / (100.0 / 3.0)).log10();
        assert!((psnr(&a, &b).expect("same size") - expect).abs() < 1e-9);
    }

    #[test]
    fn more_damage_scores_lower() {
        let a = img(32, 32, |x, y| {
            [((x * 7 + y * 3) % 256) as u8, (x * 8) as u8, (y * 8) as u8]
        });
        let noisy = |amp: i32| {
            img(32, 32, |x, y| {
                let p = a.pixel(x, y);
                let d = if (x * 31 + y * 17) % 2 == 0 {
                    amp
                } else {
                    -amp
                };
                p.map(|v| (v as i32 + d).clamp(0, 255) as u8)
            })
        };
        let (q1, q2) = (
            quality(&noisy(4), &a).expect("q1"),
            quality(&noisy(20), &a).expect("q2"),
        );
        assert!(q1.psnr_db > q2.psnr_db);
        assert!(q1.ssim > q2.ssim && q2.ssim < 0.99);
        assert!(quality(&img(8, 8, |_, _| [0; 3]), &a).is_err());
    }
}
