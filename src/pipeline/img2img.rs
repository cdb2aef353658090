//! Image-to-image and inpainting, the way diffusers' `FluxImg2ImgPipeline` and
//! `FluxInpaintPipeline` do them, so that an image made there comes out the same here.
//!
//! - **Strength to steps**: of a schedule of `n` steps, `t_start = int(n - min(n * strength, n))`
//!   steps are skipped ([`start_step`]); the rest run from the time `timesteps[t_start]`.
//! - **The source latent**: the autoencoder's posterior mean (not a sample), normalised with the
//!   autoencoder's shift and scale ([`crate::model::vae::AutoEncoder::encode`]).
//! - **The first latent**: the flow-matching forward process at that time,
//!   `x = sigma * noise + (1 - sigma) * source` (diffusers' `scale_noise`), with the seed's noise.
//! - **Inpainting** ([`Blend`]): the mask (white = repaint) is binarised at one half, taken to the
//!   latent grid by nearest-neighbour sampling (PyTorch's `interpolate`, pixel `floor(i * H / h)`),
//!   and after every step the kept region is replaced by the source noised to the step's new
//!   time with the same noise: `x = (1 - m) * (t * noise + (1 - t) * source) + m * x` (the last
//!   step's time is 0, the source itself).
//! - **Soft mask** ([`InitImage::soft_mask`], not diffusers'): the mask's grey values are kept
//!   (`v / 255`, no threshold) and sampled at the same latent points, so a feathered edge blends
//!   the model's latent and the noised source by the fraction `m` in the same formula; a mask of
//!   only black and white gives the thresholded run's image exactly. FLUX.1 Fill was trained on
//!   hard masks given as input channels: there the mask is thresholded at one half as without the
//!   option, and the run's notes say so.
//!
//! - **FLUX.1 Fill** ([`fill_conditioning`]), as diffusers' `FluxFillPipeline`: no blend; the
//!   transformer takes, after the noisy latent, the packed latent of the source with the masked
//!   area zeroed (`image * (1 - mask)`, encoded like the source) and the binarised mask at image
//!   resolution, each 8x8 pixel block made 64 channels (row within the block, then column) and
//!   packed 2x2: 64 + 256 channels, the same every step.
//!
//! The blend works on whole latents: every rank of a parallel layout holds the whole latent
//! between steps (a sequence-parallel replica gathers each step's velocity), so the source, the
//! noise and the mask travel with the job as the noise does.
//!
//! Sizes: the output size is the source's, rounded down to a multiple of 16 ([`default_size`]),
//! unless a width and height are given; a source of another size is resized to it (Lanczos, as
//! diffusers' image processor does), and the run's notes say so. The mask must have the source
//! file's size and is resized with it.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::flux::pack_latent;
use crate::model::vae::AutoEncoder;

/// The source of image-to-image (and its mask, for inpainting), as a request and an image's
/// settings hold it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InitImage {
    /// The source image file (PNG, JPEG or WebP).
    pub image: PathBuf,
    /// How much of the schedule runs, in (0, 1]: 1 starts from noise (the source only shapes
    /// the kept region of a mask), lower keeps more of the source.
    pub strength: f64,
    /// The mask file, the source's size: white is repainted, black kept (grey counts as white
    /// from one half up, unless `soft_mask`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<PathBuf>,
    /// Blend by the mask's grey values (a feathered edge mixes the repainted and the kept)
    /// instead of thresholding it at one half as diffusers does. Not for FLUX.1 Fill, which
    /// takes the mask thresholded (a note says so).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub soft_mask: bool,
    /// Outpainting: pixels added to the canvas left, above, right and below the source. The
    /// added area is repainted (with or without a mask), the source's edge pixels stretched
    /// into it as the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extend: Option<[usize; 4]>,
}

impl InitImage {
    /// Check the strength and that the files are images (and the mask the source's size),
    /// reading only their headers.
    pub fn check(&self) -> Result<()> {
        if !self.strength.is_finite() || self.strength <= 0.0 || self.strength > 1.0 {
            return Err(Error::setting(
                "strength",
                self.strength,
                "must be above 0 and at most 1 (1 repaints everything, 0.3 keeps most of the source)",
            ));
        }
        let (w, h) = image_size(&self.image, "source image")?;
        if w == 0 || h == 0 {
            return Err(Error::Image(format!(
                "the source image {} is empty ({w}x{h})",
                self.image.display()
            )));
        }
        if let Some(e) = self.extend.filter(|e| e.iter().any(|&v| v > 16384)) {
            return Err(Error::setting(
                "extend",
                format!("{},{},{},{}", e[0], e[1], e[2], e[3]),
                "each side adds at most 16384 pixels",
            ));
        }
        if let Some(mask) = &self.mask {
            let (mw, mh) = image_size(mask, "mask")?;
            if (mw, mh) != (w, h) {
                return Err(Error::Image(format!(
                    "the mask {} is {mw}x{mh} but the source image {} is {w}x{h}: give a mask of the source's size (white = repaint)",
                    mask.display(),
                    self.image.display()
                )));
            }
        }
        Ok(())
    }

    /// The canvas's size: the source file's, plus the outpainting's extension.
    pub fn canvas_size(&self) -> Result<(usize, usize)> {
        let (w, h) = image_size(&self.image, "source image")?;
        let [l, t, r, b] = self.extend.unwrap_or_default();
        Ok((w + l + r, h + t + b))
    }
}

/// The pixel size of an image file, read from its header; `what` names it in errors.
pub fn image_size(path: &Path, what: &str) -> Result<(usize, usize)> {
    if !path.is_file() {
        return Err(Error::Image(format!(
            "the {what} {} does not exist (or is not a file)",
            path.display()
        )));
    }
    let (w, h) = image::image_dimensions(path).map_err(|e| {
        Error::Image(format!(
            "the {what} {} cannot be read as an image (PNG, JPEG or WebP): {e}",
            path.display()
        ))
    })?;
    Ok((w as usize, h as usize))
}

/// The output size for a source of `width` x `height`: each side rounded down to a multiple of
/// 16 (at least 16), as diffusers' image processor does for FLUX.
pub fn default_size(width: usize, height: usize) -> (usize, usize) {
    let down = |v: usize| (v / 16).max(1) * 16;
    (down(width), down(height))
}

/// The steps of an `n`-step schedule that image-to-image skips at `strength` (diffusers'
/// `get_timesteps`): `int(max(n - min(n * strength, n), 0))`.
pub fn start_step(steps: usize, strength: f64) -> usize {
    let n = steps as f64;
    let init = (n * strength).min(n);
    (n - init).max(0.0) as usize
}

/// The source and mask, read and brought to the output size.
#[derive(Debug, Clone)]
pub struct Source {
    /// (1, 3, H, W) in [-1, 1], f32 on the CPU.
    pub image: Tensor,
    /// (1, 1, H, W) of 0 (keep) and 1 (repaint), f32 on the CPU; with
    /// [`InitImage::soft_mask`] the grey values between (`v / 255`).
    pub mask: Option<Tensor>,
    /// What the user should know (a resize).
    pub notes: Vec<String>,
}

/// Read `init`'s files and bring them to `width` x `height`.
pub fn load_source(init: &InitImage, width: usize, height: usize) -> Result<Source> {
    init.check()?;
    let mut notes = Vec::new();
    let ext = init.extend.unwrap_or_default();
    let rgb = extend(&open(&init.image, "source image")?.to_rgb8(), ext, None);
    let (sw, sh) = (rgb.width() as usize, rgb.height() as usize);
    if (sw, sh) != (width, height) {
        notes.push(format!(
            "source image {}{} is {sw}x{sh}: resized to {width}x{height} (sizes are multiples of 16; give --width and --height to choose)",
            init.image.display(),
            if init.extend.is_some() { " on its extended canvas" } else { "" }
        ));
    }
    let image = to_tensor(&to_size(rgb, width, height))?;
    let grey = match &init.mask {
        Some(path) => {
            let m = open(path, "mask")?.to_rgb8();
            // PIL's "L" conversion (ITU-R 601-2 luma, fixed point), as diffusers' mask
            // processor converts to grey.
            Some(image::GrayImage::from_fn(m.width(), m.height(), |x, y| {
                let [r, g, b] = m.get_pixel(x, y).0;
                let l =
                    (u32::from(r) * 19595 + u32::from(g) * 38470 + u32::from(b) * 7471 + 0x8000)
                        >> 16;
                image::Luma([l.min(255) as u8])
            }))
        }
        // Outpainting without a mask keeps the whole source.
        None if init.extend.is_some() => {
            let (w, h) = (sw - ext[0] - ext[2], sh - ext[1] - ext[3]);
            Some(image::GrayImage::new(w as u32, h as u32))
        }
        None => None,
    };
    let mask = match grey {
        None => None,
        Some(grey) => {
            // The added canvas is white: repainted.
            let grey = to_size(extend(&grey, ext, Some(image::Luma([255]))), width, height);
            // Binarised at one half (v / 255 >= 0.5), or kept as it is for a soft mask.
            let values: Vec<f32> = grey
                .pixels()
                .map(|p| match (init.soft_mask, p.0[0]) {
                    (true, v) => f32::from(v) / 255.0,
                    (false, v) => f32::from(u8::from(v >= 128)),
                })
                .collect();
            if values.iter().all(|&v| v == 0.0) {
                notes.push("the mask is all black: nothing is repainted".to_string());
            }
            Some(Tensor::from_vec(
                values,
                (1, 1, height, width),
                &Device::Cpu,
            )?)
        }
    };
    Ok(Source { image, mask, notes })
}

/// `img` with `[left, top, right, bottom]` pixels added around it, filled with `fill`, or with
/// the nearest edge pixel when `fill` is `None`.
fn extend<P>(
    img: &image::ImageBuffer<P, Vec<u8>>,
    [l, t, r, b]: [usize; 4],
    fill: Option<P>,
) -> image::ImageBuffer<P, Vec<u8>>
where
    P: image::Pixel<Subpixel = u8> + 'static,
{
    let (w, h) = (img.width() as usize, img.height() as usize);
    image::ImageBuffer::from_fn((w + l + r) as u32, (h + t + b) as u32, |x, y| {
        let (x, y) = (x as usize, y as usize);
        let inside = (l..l + w).contains(&x) && (t..t + h).contains(&y);
        match fill {
            Some(f) if !inside => f,
            _ => {
                let sx = x.saturating_sub(l).min(w - 1);
                let sy = y.saturating_sub(t).min(h - 1);
                *img.get_pixel(sx as u32, sy as u32)
            }
        }
    })
}

/// `img` at `width` x `height`: itself when it has that size, else resized (Lanczos, as
/// diffusers' image processor resizes).
fn to_size<P>(
    img: image::ImageBuffer<P, Vec<u8>>,
    width: usize,
    height: usize,
) -> image::ImageBuffer<P, Vec<u8>>
where
    P: image::Pixel<Subpixel = u8> + 'static,
{
    if (img.width() as usize, img.height() as usize) == (width, height) {
        img
    } else {
        image::imageops::resize(
            &img,
            width as u32,
            height as u32,
            image::imageops::FilterType::Lanczos3,
        )
    }
}

fn open(path: &Path, what: &str) -> Result<image::DynamicImage> {
    image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?
        .decode()
        .map_err(|e| {
            Error::Image(format!(
                "the {what} {} cannot be read as an image (PNG, JPEG or WebP): {e}",
                path.display()
            ))
        })
}

/// An 8-bit image as (1, 3, H, W) in [-1, 1].
fn to_tensor(rgb: &image::RgbImage) -> Result<Tensor> {
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let values: Vec<f32> = rgb
        .as_raw()
        .iter()
        .map(|&v| 2.0 * (f32::from(v) / 255.0) - 1.0)
        .collect();
    Ok(Tensor::from_vec(values, (1, h, w, 3), &Device::Cpu)?
        .permute((0, 3, 1, 2))?
        .contiguous()?)
}

/// A (1, 1, H, W) mask taken to the (lh, lw) latent grid by nearest-neighbour sampling
/// (PyTorch's `interpolate(mode="nearest")`: source pixel `floor(i * H / lh)`), repeated over
/// `channels`: (1, channels, lh, lw).
pub fn mask_to_latent(mask: &Tensor, lh: usize, lw: usize, channels: usize) -> Result<Tensor> {
    let (_, _, h, w) = mask.dims4()?;
    let pick = |out: usize, len: usize| -> Vec<u32> {
        let scale = len as f32 / out as f32;
        (0..out)
            .map(|i| ((i as f32 * scale).floor() as usize).min(len - 1) as u32)
            .collect()
    };
    let rows = Tensor::new(pick(lh, h), mask.device())?;
    let cols = Tensor::new(pick(lw, w), mask.device())?;
    let small = mask.index_select(&rows, 2)?.index_select(&cols, 3)?;
    Ok(small.repeat((1, channels, 1, 1))?)
}

/// Inpainting's blend after each step, on packed latents (1, N, 64), f32.
#[derive(Debug, Clone)]
pub struct Blend {
    /// The source's latent.
    pub source: Tensor,
    /// The noise the run started from.
    pub noise: Tensor,
    /// 1 where the model repaints, 0 where the source is kept.
    pub mask: Tensor,
}

impl Blend {
    /// The latent after a step that ended at time `t`: the kept region replaced by the source
    /// noised to `t` with the run's noise (diffusers' order of operations).
    pub fn apply(&self, x: &Tensor, t: f64) -> Result<Tensor> {
        let proper = ((&self.noise * t)? + (&self.source * (1.0 - t))?)?;
        let keep = self.mask.affine(-1.0, 1.0)?;
        Ok(((keep * proper)? + (&self.mask * x)?)?)
    }

    /// This blend's tensors on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        Ok(Self {
            source: self.source.to_device(device)?,
            noise: self.noise.to_device(device)?,
            mask: self.mask.to_device(device)?,
        })
    }
}

/// Image-to-image's start on `device`: `init`'s source (and mask) read at `size` (width,
/// height), encoded by `vae` to its posterior mean, and the schedule `timesteps` entered at the
/// strength from `noise` ((1, C, H/8, W/8)). Notes for the user go to `notes`. With `fill`, as a
/// FLUX.1 Fill checkpoint takes it: the mask goes into the transformer ([`Entered::fill`], see
/// [`fill_conditioning`]) instead of the blend, and `init` must have a mask (or an extended
/// canvas).
#[allow(clippy::too_many_arguments)]
pub fn start_with(
    vae: &AutoEncoder,
    device: &Device,
    init: &InitImage,
    size: (usize, usize),
    noise: &Tensor,
    timesteps: &[f64],
    notes: &mut Vec<String>,
    fill: bool,
) -> Result<Entered> {
    let src = load_source(init, size.0, size.1)?;
    notes.extend(src.notes.iter().cloned());
    let encode = |image: &Tensor| -> Result<Tensor> {
        Ok(vae
            .encode(&image.to_device(vae.device())?)?
            .to_dtype(DType::F32)?
            .to_device(device)?)
    };
    let latent = encode(&src.image)?;
    let (_, c, lh, lw) = latent.dims4()?;
    if fill {
        let Some(mask) = &src.mask else {
            return Err(Error::Image(FILL_NEEDS_MASK.to_string()));
        };
        let hard;
        let mask = if init.soft_mask {
            notes.push(FILL_HARD_MASK.to_string());
            hard = mask.ge(0.5)?.to_dtype(DType::F32)?;
            &hard
        } else {
            mask
        };
        let masked = src.image.broadcast_mul(&mask.affine(-1.0, 1.0)?)?;
        let cond = fill_conditioning(&encode(&masked)?, &mask.to_device(device)?)?;
        let mut e = enter(&latent, noise, None, timesteps, init.strength)?;
        e.fill = Some(cond);
        return Ok(e);
    }
    let mask = match &src.mask {
        Some(m) => Some(mask_to_latent(&m.to_device(device)?, lh, lw, c)?),
        None => None,
    };
    enter(&latent, noise, mask.as_ref(), timesteps, init.strength)
}

/// The guidance a FLUX.1 Fill model runs at when none is asked for: the value diffusers'
/// `FluxFillPipeline` example uses (Fill is made for far more guidance than FLUX.1 dev's 3.5).
pub const FILL_GUIDANCE: f64 = 30.0;

/// What a FLUX.1 Fill checkpoint asked to run without a source image and a mask is told.
pub const FILL_NEEDS_MASK: &str = "this is a FLUX.1 Fill model: it repaints the white area of a mask over a source image, so it needs both (on the command line --image and --mask; in the studio a start image with a painted mask)";

/// What a FLUX.1 Fill run asked for a soft mask is told.
pub const FILL_HARD_MASK: &str = "soft mask: FLUX.1 Fill takes the mask as input channels and was trained on hard masks, so the mask is thresholded at half grey (a feather only rounds the outline)";

/// FLUX.1 Fill's conditioning (1, N, 320), f32, as diffusers' `FluxFillPipeline` builds it:
/// `masked_latent` ((1, 16, h, w): the source with the masked area zeroed, encoded and
/// normalised) packed, then `mask` ((1, 1, 8h, 8w) of 0 and 1, 1 = repaint) with each 8x8 pixel
/// block made 64 channels (row within the block, then column) and packed 2x2.
pub fn fill_conditioning(masked_latent: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (_, _, lh, lw) = masked_latent.dims4()?;
    let (b, _, h, w) = mask.dims4()?;
    if (h, w) != (lh * 8, lw * 8) {
        return Err(Error::Image(format!(
            "the mask is {w}x{h} but the latent {lw}x{lh}: the mask must be 8 times the latent's size"
        )));
    }
    let blocks = mask
        .to_dtype(DType::F32)?
        .reshape((b, lh, 8, lw, 8))?
        .permute((0, 2, 4, 1, 3))?
        .reshape((b, 64, lh, lw))?;
    Ok(Tensor::cat(
        &[
            pack_latent(&masked_latent.to_dtype(DType::F32)?)?,
            pack_latent(&blocks)?,
        ],
        2,
    )?)
}

/// Where an image-to-image run starts.
#[derive(Debug, Clone)]
pub struct Entered {
    /// The first latent, packed (1, N, 64), f32.
    pub x: Tensor,
    /// The schedule from the entry time on (`steps - start_step + 1` times).
    pub timesteps: Vec<f64>,
    /// Steps skipped.
    pub skipped: usize,
    /// Inpainting's blend, when there is a mask (and the model is not a Fill checkpoint).
    pub blend: Option<Blend>,
    /// A FLUX.1 Fill checkpoint's conditioning (1, N, 320), f32 ([`fill_conditioning`]).
    pub fill: Option<Tensor>,
}

/// Enter the schedule `timesteps` (`steps + 1` times from 1 to 0) at `strength` from the scaled
/// source latent `source` and `noise` (both (1, C, h, w)), with the latent mask `mask`
/// ((1, C, h, w), 1 = repaint; see [`mask_to_latent`]) for inpainting.
pub fn enter(
    source: &Tensor,
    noise: &Tensor,
    mask: Option<&Tensor>,
    timesteps: &[f64],
    strength: f64,
) -> Result<Entered> {
    let steps = timesteps.len().saturating_sub(1);
    let skipped = start_step(steps, strength);
    if skipped >= steps {
        return Err(Error::setting(
            "strength",
            strength,
            format!("with {steps} steps it leaves no step to run: raise the strength or the steps"),
        ));
    }
    let timesteps = timesteps[skipped..].to_vec();
    let sigma = timesteps[0];
    let source = source.to_dtype(DType::F32)?;
    let noise = noise.to_dtype(DType::F32)?.to_device(source.device())?;
    let x = ((&noise * sigma)? + (&source * (1.0 - sigma))?)?;
    let blend = match mask {
        None => None,
        Some(m) => Some(Blend {
            source: pack_latent(&source)?,
            noise: pack_latent(&noise)?,
            mask: pack_latent(&m.to_dtype(DType::F32)?.to_device(source.device())?)?,
        }),
    };
    Ok(Entered {
        x: pack_latent(&x)?,
        timesteps,
        skipped,
        blend,
        fill: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strength_to_steps_as_diffusers() {
        // n * strength, then int(n - that): 4 * 0.6 = 2.4 -> int(1.6) = 1.
        assert_eq!(start_step(4, 0.6), 1);
        assert_eq!(start_step(6, 0.7), 1);
        assert_eq!(start_step(28, 1.0), 0);
        assert_eq!(start_step(10, 0.5), 5);
        assert_eq!(start_step(10, 0.25), 7); // int(7.5)
        assert_eq!(start_step(4, 0.1), 3); // one step left
        assert_eq!(start_step(3, 0.3), 2); // 3 - 0.9 = 2.1
    }

    #[test]
    fn sizes_round_down_to_16() {
        assert_eq!(default_size(1000, 750), (992, 736));
        assert_eq!(default_size(512, 512), (512, 512));
        assert_eq!(default_size(10, 40), (16, 32));
    }

    #[test]
    fn enter_noises_the_source_to_the_entry_time() -> Result<()> {
        let dev = Device::Cpu;
        let src = Tensor::full(2f32, (1, 16, 4, 6), &dev)?;
        let noise = Tensor::full(-1f32, (1, 16, 4, 6), &dev)?;
        let ts = vec![1.0, 0.75, 0.5, 0.25, 0.0];
        let e = enter(&src, &noise, None, &ts, 0.6)?;
        assert_eq!(e.timesteps, vec![0.75, 0.5, 0.25, 0.0]);
        assert_eq!(e.skipped, 1);
        let v = e.x.flatten_all()?.to_vec1::<f32>()?;
        // 0.75 * -1 + 0.25 * 2
        assert!(v.iter().all(|&x| (x + 0.25).abs() < 1e-6));
        assert!(enter(&src, &noise, None, &ts, 1e-30).is_err());
        Ok(())
    }

    #[test]
    fn the_blend_keeps_the_source_outside_the_mask() -> Result<()> {
        let dev = Device::Cpu;
        let src = Tensor::full(2f32, (1, 16, 4, 4), &dev)?;
        let noise = Tensor::full(-1f32, (1, 16, 4, 4), &dev)?;
        let mut m = vec![0f32; 16];
        m[5] = 1.0; // one latent pixel repainted
        let mask = Tensor::from_vec(m, (1, 1, 4, 4), &dev)?.repeat((1, 16, 1, 1))?;
        let e = enter(&src, &noise, Some(&mask), &[1.0, 0.5, 0.0], 1.0)?;
        let blend = e.blend.expect("a blend");
        let x = Tensor::full(7f32, (1, 4, 64), &dev)?;
        let mid = crate::model::flux::unpack_latent(&blend.apply(&x, 0.5)?, 4, 4)?;
        let v = mid.get(0)?.get(0)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(v[5], 7.0);
        assert_eq!(v[0], 0.5); // 0.5 * -1 + 0.5 * 2
        let end = crate::model::flux::unpack_latent(&blend.apply(&x, 0.0)?, 4, 4)?;
        let v = end.get(0)?.get(0)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!((v[5], v[0]), (7.0, 2.0));
        Ok(())
    }

    #[test]
    fn fill_conditioning_packs_each_8x8_block_into_channels() -> Result<()> {
        let dev = Device::Cpu;
        // A 2x2 latent (one token) over a 16x16 mask; white only at pixel (row 9, column 3):
        // latent pixel (1, 0) = packed position 2, block channel 1 * 8 + 3 = 11.
        let mut m = vec![0f32; 256];
        m[9 * 16 + 3] = 1.0;
        let mask = Tensor::from_vec(m, (1, 1, 16, 16), &dev)?;
        let latent = Tensor::full(0.5f32, (1, 16, 2, 2), &dev)?;
        let c = fill_conditioning(&latent, &mask)?;
        assert_eq!(c.dims(), &[1, 1, 320]);
        let v = c.flatten_all()?.to_vec1::<f32>()?;
        assert!(v[..64].iter().all(|&x| x == 0.5));
        let ones: Vec<usize> = (64..320).filter(|&i| v[i] == 1.0).collect();
        assert_eq!(ones, vec![64 + 11 * 4 + 2]);
        assert!(fill_conditioning(&latent, &mask.narrow(2, 0, 8)?).is_err());
        Ok(())
    }

    #[test]
    fn the_mask_is_sampled_at_the_top_left_of_each_cell() -> Result<()> {
        let dev = Device::Cpu;
        // 16x16 mask, white only at pixel (8, 8): latent (1, 1) of a 2x2 grid.
        let mut m = vec![0f32; 256];
        m[8 * 16 + 8] = 1.0;
        m[3 * 16 + 3] = 1.0; // not sampled
        let mask = Tensor::from_vec(m, (1, 1, 16, 16), &dev)?;
        let l = mask_to_latent(&mask, 2, 2, 3)?;
        assert_eq!(l.dims(), &[1, 3, 2, 2]);
        assert_eq!(
            l.get(0)?.get(2)?.flatten_all()?.to_vec1::<f32>()?,
            vec![0.0, 0.0, 0.0, 1.0]
        );
        Ok(())
    }
}
