//! Images out of the pipeline: decoded tensors to 8-bit RGB, PNG files whose text chunks hold every
//! setting needed to reproduce them (written atomically), and reading those settings back.

use std::path::Path;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// An 8-bit RGB image, rows top to bottom.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    /// From a decoded (1, 3, H, W) tensor in [-1, 1] (values outside are clamped).
    pub fn from_tensor(x: &Tensor) -> Result<Self> {
        let (_, c, h, w) = x.dims4()?;
        if c != 3 {
            return Err(Error::Image(format!("expected 3 channels, got {c}")));
        }
        // Made 8-bit where the tensor lives: a GPU hands back a quarter of the bytes (3 MiB, not
        // 12, at 1024 px) and the host has no pass over the pixels. After the clamp and the
        // rounding every value is a whole number in 0..=255, so the cast is exact.
        let data = x
            .get(0)?
            .to_dtype(DType::F32)?
            .clamp(-1f32, 1f32)?
            .affine(127.5, 127.5)?
            .round()?
            .permute((1, 2, 0))?
            .to_dtype(DType::U8)?
            .flatten_all()?
            .to_vec1::<u8>()?;
        Ok(Self {
            width: w,
            height: h,
            data,
        })
    }

    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }

    fn set_pixel(&mut self, x: usize, y: usize, rgb: [u8; 3]) {
        if x < self.width && y < self.height {
            let i = (y * self.width + x) * 3;
            self.data[i..i + 3].copy_from_slice(&rgb);
        }
    }

    /// Stamp a small "DEMO" label in the top-left corner, so a demo image is never mistaken for
    /// a FLUX image.
    pub fn stamp_demo_label(&mut self) {
        // 5x7 glyphs, one row per byte (bit 4 = leftmost column).
        const GLYPHS: [[u8; 7]; 4] = [
            [0x1E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1E], // D
            [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F], // E
            [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11], // M
            [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E], // O
        ];
        let scale = (self.width.min(self.height) / 128).max(1);
        let (ox, oy) = (2 * scale, 2 * scale);
        let box_w = (4 * 6 + 1) * scale;
        let box_h = 9 * scale;
        for y in oy..oy + box_h {
            for x in ox..ox + box_w {
                self.set_pixel(x, y, [0, 0, 0]);
            }
        }
        for (g, glyph) in GLYPHS.iter().enumerate() {
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        for dy in 0..scale {
                            for dx in 0..scale {
                                let x = ox + (1 + g * 6 + col) * scale + dx;
                                let y = oy + (1 + row) * scale + dy;
                                self.set_pixel(x, y, [255, 210, 0]);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Write `img` as PNG to `path` with UTF-8 text chunks (`iTXt`), atomically: the file appears
/// whole or not at all ([`crate::files::write_atomic`], which also injects
/// `PARALLAX_FAULT=kind=write`).
pub fn save_png(path: &Path, img: &RgbImage, text: &[(String, String)]) -> Result<()> {
    if img.data.len() != img.width * img.height * 3 {
        return Err(Error::Image(
            "pixel buffer does not match the image size".into(),
        ));
    }
    crate::files::write_atomic(path, |out| {
        let mut enc = png::Encoder::new(out, img.width as u32, img.height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            enc.add_itxt_chunk(k.clone(), v.clone())
                .map_err(|e| Error::Image(format!("text chunk `{k}`: {e}")))?;
        }
        let mut w = enc
            .write_header()
            .map_err(|e| Error::Image(format!("writing {}: {e}", path.display())))?;
        w.write_image_data(&img.data)
            .map_err(|e| Error::Image(format!("writing {}: {e}", path.display())))?;
        w.finish()
            .map_err(|e| Error::Image(format!("writing {}: {e}", path.display())))?;
        Ok(())
    })
}

/// The image formats Parallax writes, by file extension.
pub const FORMATS: &str = "png, jpg (jpeg) or webp";

/// Whether Parallax writes files with this extension (lower case, no dot).
pub fn is_known_extension(ext: &str) -> bool {
    matches!(ext, "png" | "jpg" | "jpeg" | "webp")
}

/// Write `img` to `path` in the format its extension names (see [`FORMATS`]), with its settings
/// `text` (as [`super::GenerationSettings::png_text`] gives them): PNG text chunks, or for JPEG
/// (quality 92) and lossless WebP an EXIF block with the settings JSON and the `parameters` text
/// ([`super::exif`]). Atomic like [`save_png`].
pub fn save_image(path: &Path, img: &RgbImage, text: &[(String, String)]) -> Result<()> {
    let ext = super::exif::extension(path).unwrap_or_default();
    if ext == "png" {
        return save_png(path, img, text);
    }
    if !is_known_extension(&ext) {
        return Err(Error::Image(format!(
            "{}: Parallax writes {FORMATS} files; give a name ending in one of them",
            path.display()
        )));
    }
    if img.data.len() != img.width * img.height * 3 || img.width == 0 || img.height == 0 {
        return Err(Error::Image(
            "pixel buffer does not match the image size".into(),
        ));
    }
    let get = |k: &str| {
        text.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    };
    let tiff = super::exif::exif_block(get("parallax"), get("parameters"), get("Software"));
    let (w, h) = (img.width as u32, img.height as u32);
    let mut encoded = Vec::new();
    let bytes = if ext == "webp" {
        ::image::codecs::webp::WebPEncoder::new_lossless(&mut encoded)
            .encode(&img.data, w, h, ::image::ExtendedColorType::Rgb8)
            .map_err(|e| Error::Image(format!("encoding {}: {e}", path.display())))?;
        super::exif::webp_with_exif(&encoded, &tiff, img.width, img.height)?
    } else {
        ::image::codecs::jpeg::JpegEncoder::new_with_quality(&mut encoded, 92)
            .encode(&img.data, w, h, ::image::ExtendedColorType::Rgb8)
            .map_err(|e| Error::Image(format!("encoding {}: {e}", path.display())))?;
        super::exif::jpeg_with_exif(&encoded, &tiff)?
    };
    crate::files::write_atomic(path, |out| {
        use std::io::Write;
        out.write_all(&bytes).map_err(|e| Error::Write {
            path: path.to_path_buf(),
            source: e,
        })
    })
}

/// An open PNG, its header and the text chunks before its pixels read, nothing decoded yet.
pub struct PngHeader {
    pub width: usize,
    pub height: usize,
    /// The text chunks before the pixels (where [`save_png`] writes them).
    pub text: Vec<(String, String)>,
    reader: png::Reader<std::io::BufReader<std::fs::File>>,
}

impl PngHeader {
    /// Open `path` and read up to its first pixel data: the size and the text chunks.
    pub fn open(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let reader = png::Decoder::new(std::io::BufReader::new(f))
            .read_info()
            .map_err(|e| Error::Image(format!("{}: {e}", path.display())))?;
        let info = reader.info();
        let mut text = Vec::new();
        for c in &info.utf8_text {
            if let Ok(t) = c.get_text() {
                text.push((c.keyword.clone(), t));
            }
        }
        for c in &info.uncompressed_latin1_text {
            text.push((c.keyword.clone(), c.text.clone()));
        }
        Ok(Self {
            width: info.width as usize,
            height: info.height as usize,
            text,
            reader,
        })
    }

    /// Whether the pixels are 8-bit RGB, not interlaced (what [`save_png`] writes): else why not.
    fn check_rgb8(&self, path: &Path) -> Result<()> {
        let info = self.reader.info();
        if info.color_type != png::ColorType::Rgb || info.bit_depth != png::BitDepth::Eight {
            return Err(Error::Image(format!(
                "{}: expected 8-bit RGB, found {:?} {:?}",
                path.display(),
                info.color_type,
                info.bit_depth
            )));
        }
        Ok(())
    }

    /// Decode the pixels row by row, handing each (RGB, top to bottom) to `row`: only one row
    /// is held at a time, whatever the image's size.
    pub fn rows(mut self, path: &Path, row: &mut dyn FnMut(usize, &[u8])) -> Result<()> {
        self.check_rgb8(path)?;
        if self.reader.info().interlaced {
            return Err(Error::Image(format!(
                "{}: interlaced PNGs are not read row by row",
                path.display()
            )));
        }
        let bad = |e: png::DecodingError| Error::Image(format!("{}: {e}", path.display()));
        let mut y = 0;
        while let Some(r) = self.reader.next_row().map_err(bad)? {
            row(y, r.data());
            y += 1;
        }
        Ok(())
    }
}

/// Read a PNG written by [`save_png`]: the pixels (as RGB) and its text chunks.
pub fn read_png(path: &Path) -> Result<(RgbImage, Vec<(String, String)>)> {
    let mut h = PngHeader::open(path)?;
    h.check_rgb8(path)?;
    let size = h
        .reader
        .output_buffer_size()
        .ok_or_else(|| Error::Image(format!("{}: image too large", path.display())))?;
    let mut buf = vec![0; size];
    let frame = h
        .reader
        .next_frame(&mut buf)
        .map_err(|e| Error::Image(format!("{}: {e}", path.display())))?;
    buf.truncate(frame.buffer_size());
    Ok((
        RgbImage {
            width: frame.width as usize,
            height: frame.height as usize,
            data: buf,
        },
        h.text,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn tensor_to_rgb_maps_range() -> Result<()> {
        let t = Tensor::new(&[-1f32, 0.0, 1.0, 2.0], &Device::Cpu)?.reshape((1, 1, 2, 2))?;
        let t = Tensor::cat(&[&t, &t, &t], 1)?;
        let img = RgbImage::from_tensor(&t)?;
        assert_eq!((img.width, img.height), (2, 2));
        assert_eq!(img.pixel(0, 0), [0, 0, 0]);
        assert_eq!(img.pixel(1, 0), [128, 128, 128]);
        assert_eq!(img.pixel(0, 1), [255, 255, 255]);
        assert_eq!(img.pixel(1, 1), [255, 255, 255]);
        Ok(())
    }

    /// Every pixel of a bf16 (1, 3, H, W) tensor with distinct channels and values spread over
    /// and past [-1, 1], against the formula written out per pixel on the host.
    #[test]
    fn tensor_to_rgb_matches_the_formula_per_pixel() -> Result<()> {
        let (h, w) = (5, 7);
        let vals: Vec<f32> = (0..3 * h * w)
            .map(|i| (i as f32 * 0.0371).sin() * 1.3)
            .collect();
        let t = Tensor::from_vec(vals, (1, 3, h, w), &Device::Cpu)?.to_dtype(DType::BF16)?;
        let img = RgbImage::from_tensor(&t)?;
        let back = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        for y in 0..h {
            for x in 0..w {
                let want: [u8; 3] = std::array::from_fn(|c| {
                    let v = back[(c * h + y) * w + x].clamp(-1.0, 1.0);
                    (v * 127.5 + 127.5).round() as u8
                });
                assert_eq!(img.pixel(x, y), want, "pixel ({x}, {y})");
            }
        }
        Ok(())
    }

    #[test]
    fn png_round_trip_with_text() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", e))?;
        let path = dir.path().join("sub").join("x.png");
        let mut img = RgbImage {
            width: 64,
            height: 32,
            data: (0..64 * 32 * 3).map(|i| (i % 251) as u8).collect(),
        };
        img.stamp_demo_label();
        let text = vec![("prompt".to_string(), "ein Bär 🐻 at dawn".to_string())];
        save_png(&path, &img, &text)?;
        let (back, t) = read_png(&path)?;
        assert_eq!(back, img);
        assert_eq!(t, text);
        // No partial files left behind.
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap_or(dir.path()))
            .map_err(|e| Error::io("dir", e))?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
            .collect();
        assert!(leftovers.is_empty());
        Ok(())
    }
}
