//! Latent previews: a fixed linear map from a family's latent channels (FLUX.1's 16, any count
//! [`LatentSpec::channels`] says) to RGB, applied every step so the studio can show the image
//! forming without running the autoencoder.
//!
//! The map is not guessed: [`PreviewFactors::fit`] decodes a few latents with the model's own
//! autoencoder, averages each decoded 8x8 pixel block, and solves the least-squares problem
//! `rgb ≈ W · z + b` over every latent position (ridge-regularised normal equations, f64). The
//! studio runs the same map on the GPU (`shaders/latent_preview.wgsl`) and on the CPU
//! ([`PreviewFactors::apply`]) when no GPU renderer is present; a test holds the two together.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::family::{LatentCodec, LatentSpec};
use crate::model::rng::SplitMix64;
use crate::model::vae::AutoEncoder;

/// `rgb = weights[c] · z + bias[c]` for c in R, G, B, in the autoencoder's [-1, 1] pixel range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreviewFactors {
    /// Three rows (R, G, B) of one weight per latent channel.
    pub weights: Vec<Vec<f32>>,
    pub bias: [f32; 3],
    /// Share of the decoded colour variance the map explains on held-out latents (R², 0..1).
    pub r2: f32,
}

/// One latent in channel-major order: `data[(c * height + y) * width + x]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Latent {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

impl Latent {
    /// From a (1, C, h, w) or (C, h, w) tensor, any number of channels C.
    pub fn from_tensor(z: &Tensor) -> Result<Self> {
        let z = match z.rank() {
            4 => z.get(0)?,
            _ => z.clone(),
        };
        let (_, h, w) = z.dims3()?;
        let data = z
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Self {
            width: w,
            height: h,
            data,
        })
    }

    /// From the sampler's packed latent (1, N, C p²), packed as `spec` says, of an image
    /// `width` x `height` pixels.
    pub fn from_packed(x: &Tensor, spec: &LatentSpec, width: usize, height: usize) -> Result<Self> {
        let z = spec.unpack(x, height / spec.downscale, width / spec.downscale)?;
        Self::from_tensor(&z)
    }

    /// Latent channels (planes of `width` x `height` values in [`Latent::data`]).
    pub fn channels(&self) -> usize {
        self.data.len() / (self.width * self.height).max(1)
    }

    fn at(&self, c: usize, y: usize, x: usize) -> f32 {
        self.data[(c * self.height + y) * self.width + x]
    }
}

impl PreviewFactors {
    /// The built-in demo model's map (`assets/demo/preview.json`, written by
    /// `UPDATE_DEMO_PREVIEW=1 cargo test --test demo_model shipped_preview_map`).
    pub fn demo() -> Result<Self> {
        serde_json::from_str(include_str!("../../assets/demo/preview.json"))
            .map_err(|e| Error::Image(format!("the demo's preview map is unreadable: {e}")))
    }

    /// Latent channels the map reads.
    pub fn channels(&self) -> usize {
        self.weights.first().map_or(0, Vec::len)
    }

    /// Map one latent to RGB bytes (one pixel per latent position, row-major RGB). A latent and
    /// a map of different channel counts (a map of another family) meet on their common
    /// channels.
    pub fn apply(&self, z: &Latent) -> Vec<u8> {
        let channels = self.channels().min(z.channels());
        let mut out = Vec::with_capacity(z.width * z.height * 3);
        for y in 0..z.height {
            for x in 0..z.width {
                for ch in 0..3 {
                    let mut v = self.bias[ch];
                    for c in 0..channels {
                        v += self.weights[ch][c] * z.at(c, y, x);
                    }
                    out.push(to_byte(v));
                }
            }
        }
        out
    }

    #[allow(clippy::needless_range_loop)] // index loops read as the maths does
    /// Fit the map to any family's autoencoder `vae` by regression on `samples` decoded latents
    /// of `size` x `size` positions (plus one held out for R²), with as many channels as its
    /// [`LatentSpec`] says. Latents are smoothed Gaussian noise at unit variance, which has the
    /// low-frequency content of image latents.
    pub fn fit(
        vae: &dyn LatentCodec,
        device: &Device,
        samples: usize,
        size: usize,
        seed: u64,
    ) -> Result<Self> {
        let channels = vae.latent_spec().channels;
        let mut rng = SplitMix64::new(seed);
        let mut fit_set = Vec::new();
        for _ in 0..samples.max(1) {
            let z = noise_latent(channels, size, &mut rng)?;
            fit_set.push(decode_pair(vae, device, &z)?);
        }
        let held_out = decode_pair(vae, device, &noise_latent(channels, size, &mut rng)?)?;
        Self::fit_pairs(&fit_set, &held_out)
    }

    /// Fit the map to `vae` on the latents of real pictures: each of `images` ((1, 3, H, W) in
    /// [-1, 1]) is encoded, then decoded; the last one is held out for R². Needs the encoder.
    pub fn fit_images(vae: &AutoEncoder, device: &Device, images: &[Tensor]) -> Result<Self> {
        if images.len() < 2 {
            return Err(Error::Image(
                "latent preview fit: give at least two images".into(),
            ));
        }
        let dtype = crate::pipeline::autoencoder_dtype(vae.dtype(), device);
        let mut pairs = Vec::with_capacity(images.len());
        for img in images {
            let z = vae
                .encode(&img.to_device(device)?.to_dtype(dtype)?)?
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?;
            pairs.push(decode_pair(vae, device, &z)?);
        }
        let held_out = pairs
            .pop()
            .ok_or_else(|| Error::Image("no images".into()))?;
        Self::fit_pairs(&pairs, &held_out)
    }

    #[allow(clippy::needless_range_loop)]
    fn fit_pairs(fit_set: &[(Latent, Vec<f32>)], held_out: &(Latent, Vec<f32>)) -> Result<Self> {
        // Normal equations with a bias column: (XᵀX + λI) W = XᵀY.
        let channels = held_out.0.channels();
        let d = channels + 1;
        let mut xtx = vec![vec![0f64; d]; d];
        let mut xty = vec![[0f64; 3]; d];
        for (z, rgb) in fit_set {
            for (i, feat) in features(z).enumerate() {
                for a in 0..d {
                    for b in 0..d {
                        xtx[a][b] += feat[a] * feat[b];
                    }
                    for ch in 0..3 {
                        xty[a][ch] += feat[a] * rgb[i * 3 + ch] as f64;
                    }
                }
            }
        }
        for (a, row) in xtx.iter_mut().enumerate().take(channels) {
            row[a] += 1e-3;
        }
        let sol = solve(xtx, xty).ok_or_else(|| {
            Error::Image("latent preview fit: the decoded samples are degenerate".into())
        })?;
        let mut factors = Self {
            weights: vec![vec![0.0; channels]; 3],
            bias: [0.0; 3],
            r2: 0.0,
        };
        for ch in 0..3 {
            for c in 0..channels {
                factors.weights[ch][c] = sol[c][ch] as f32;
            }
            factors.bias[ch] = sol[channels][ch] as f32;
        }
        factors.r2 = factors.r_squared(&held_out.0, &held_out.1) as f32;
        Ok(factors)
    }

    #[allow(clippy::needless_range_loop)]
    /// R² of the map on one latent against its decoded block means.
    fn r_squared(&self, z: &Latent, rgb: &[f32]) -> f64 {
        let n = (z.width * z.height) as f64;
        let mut mean = [0f64; 3];
        for (i, v) in rgb.iter().enumerate() {
            mean[i % 3] += *v as f64 / n;
        }
        let (mut ss_res, mut ss_tot) = (0f64, 0f64);
        for (i, feat) in features(z).enumerate() {
            for ch in 0..3 {
                let mut pred = self.bias[ch] as f64;
                for c in 0..self.channels() {
                    pred += self.weights[ch][c] as f64 * feat[c];
                }
                let y = rgb[i * 3 + ch] as f64;
                ss_res += (y - pred).powi(2);
                ss_tot += (y - mean[ch]).powi(2);
            }
        }
        if ss_tot == 0.0 {
            0.0
        } else {
            1.0 - ss_res / ss_tot
        }
    }
}

/// The byte a preview value in [-1, 1] shows as.
pub fn to_byte(v: f32) -> u8 {
    ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8
}

/// Features of each latent position, row-major: its channels and a 1 for the bias.
fn features(z: &Latent) -> impl Iterator<Item = Vec<f64>> + '_ {
    let channels = z.channels();
    (0..z.height).flat_map(move |y| {
        (0..z.width).map(move |x| {
            let mut f = vec![1f64; channels + 1];
            for (c, v) in f.iter_mut().enumerate().take(channels) {
                *v = z.at(c, y, x) as f64;
            }
            f
        })
    })
}

/// A smoothed random latent (1, channels, size, size) at unit variance.
fn noise_latent(channels: usize, size: usize, rng: &mut SplitMix64) -> Result<Tensor> {
    let raw = rng.normals(channels * size * size);
    let z = Tensor::from_vec(raw, (1, channels, size, size), &Device::Cpu)?;
    // 3x3 box blur (edges replicated) then back to unit variance.
    let z = z.pad_with_same(2, 1, 1)?.pad_with_same(3, 1, 1)?;
    let k = Tensor::ones((channels, 1, 3, 3), DType::F32, &Device::Cpu)?;
    let z = z.conv2d(&k, 0, 1, 1, channels)?;
    let std = z.sqr()?.mean_all()?.to_scalar::<f32>()?.sqrt().max(1e-6);
    Ok((z / std as f64)?)
}

/// A latent and the block means of its decode, a block per latent pixel (row-major RGB, [-1, 1]).
fn decode_pair(vae: &dyn LatentCodec, device: &Device, z: &Tensor) -> Result<(Latent, Vec<f32>)> {
    let dtype = crate::pipeline::autoencoder_dtype(vae.dtype(), device);
    let img = vae
        .decode_latent(&z.to_device(device)?.to_dtype(dtype)?)?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?;
    let f = vae.latent_spec().downscale;
    // Block means: (1, 3, H, W) -> (3, h, w) -> row-major RGB.
    let pooled = img
        .avg_pool2d(f)?
        .get(0)?
        .permute((1, 2, 0))?
        .flatten_all()?;
    Ok((Latent::from_tensor(z)?, pooled.to_vec1::<f32>()?))
}

#[allow(clippy::needless_range_loop)]
/// Solve `a · x = b` for a small dense system (a D x D, b D x 3) by Gaussian elimination with
/// partial pivoting.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<[f64; 3]>) -> Option<Vec<[f64; 3]>> {
    let d = a.len();
    for col in 0..d {
        let pivot = (col..d).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in 0..d {
            if row != col {
                let f = a[row][col] / a[col][col];
                if f != 0.0 {
                    for k in col..d {
                        a[row][k] -= f * a[col][k];
                    }
                    for k in 0..3 {
                        b[row][k] -= f * b[col][k];
                    }
                }
            }
        }
    }
    let mut x = vec![[0f64; 3]; d];
    for i in 0..d {
        for k in 0..3 {
            x[i][k] = b[i][k] / a[i][i];
        }
    }
    Some(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solver_recovers_a_known_system() {
        let a = [[4.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 2.0]];
        let x_true = [[1.0, -2.0, 0.5], [2.0, 0.0, -1.0], [-1.0, 1.0, 3.0]];
        let mut b = [[0.0; 3]; 3];
        for i in 0..3 {
            for k in 0..3 {
                b[i][k] = (0..3).map(|j| a[i][j] * x_true[j][k]).sum();
            }
        }
        let x = solve(a.map(Vec::from).to_vec(), b.to_vec()).expect("solvable");
        for i in 0..3 {
            for k in 0..3 {
                assert!((x[i][k] - x_true[i][k]).abs() < 1e-9);
            }
        }
        assert!(solve(
            vec![vec![1.0, 2.0], vec![2.0, 4.0]],
            vec![[1.0; 3], [2.0; 3]]
        )
        .is_none());
    }

    #[test]
    fn apply_is_the_affine_map() {
        const CHANNELS: usize = 16;
        let mut f = PreviewFactors {
            weights: vec![vec![0.0; CHANNELS]; 3],
            bias: [0.1, -0.2, 0.0],
            r2: 1.0,
        };
        f.weights[0][3] = 0.5;
        f.weights[2][15] = -1.0;
        let mut data = vec![0.0; CHANNELS * 2];
        data[3 * 2 + 1] = 1.0; // channel 3 at x = 1
        data[15 * 2] = 0.4; // channel 15 at x = 0
        let z = Latent {
            width: 2,
            height: 1,
            data,
        };
        let px = f.apply(&z);
        assert_eq!(
            px,
            vec![
                to_byte(0.1),
                to_byte(-0.2),
                to_byte(-0.4),
                to_byte(0.6),
                to_byte(-0.2),
                to_byte(0.0)
            ]
        );
    }

    #[test]
    fn the_demo_preview_explains_its_own_pictures() {
        let p = crate::pipeline::Pipeline::demo(&Device::Cpu).expect("demo model");
        let f = p.preview_factors().expect("fit");
        // Fitted on five of the demo's scenes, judged on a sixth (measured R² 0.951).
        assert!(f.r2 > 0.8, "R² on a held-out picture = {}", f.r2);
    }

    #[test]
    fn fit_explains_the_demo_autoencoder() {
        let p = crate::pipeline::Pipeline::demo(&Device::Cpu).expect("demo model");
        let f = PreviewFactors::fit(p.flux1("test").expect("FLUX.1").vae, &Device::Cpu, 4, 32, 7)
            .expect("fit");
        // Smoothed noise is not what the trained autoencoder was made for (measured R² 0.64 on a
        // noise latent the fit never saw); the fit must still clearly beat predicting the mean
        // colour (R² 0). Real FLUX checkpoints, loaded without an encoder, are fitted this way.
        assert!(f.r2 > 0.15, "R² on held-out latent = {}", f.r2);
        // And the map is a real function of the latent, not a constant.
        assert!(f.weights.iter().flatten().any(|w| w.abs() > 1e-3));
    }
}
