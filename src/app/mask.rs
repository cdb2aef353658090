//! The inpainting mask the studio paints over a source image, and the painter's state: a grey
//! buffer of the source's size (255 = repaint, 0 = keep, as `--mask` reads it), brush strokes
//! rasterised into it, invert and clear, and a feathered (soft-edged) copy written as the PNG the
//! engine reads. No egui and no GPU here: the image tab draws it ([`super::tabs::edit`]) and the
//! studio hands the file to the request ([`MaskEditor::file_for_request`]).

use std::path::{Path, PathBuf};

use crate::pipeline::img2img::{image_size, InitImage};

/// A mask value from one half up is repainted (the engine binarises at one half).
const HALF: u8 = 128;

/// A grey mask, row-major, one byte a pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mask {
    width: usize,
    height: usize,
    data: Vec<u8>,
}

impl Mask {
    /// All black (nothing repainted).
    pub fn new(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            data: vec![0; width * height],
        }
    }

    /// Read a mask file (any image: its brightness is the mask).
    pub fn load(path: &Path) -> Result<Self, String> {
        let img = image::open(path)
            .map_err(|e| format!("the mask {} cannot be read: {e}", path.display()))?
            .to_luma8();
        Ok(Self {
            width: img.width() as usize,
            height: img.height() as usize,
            data: img.into_raw(),
        })
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    /// The value at (`x`, `y`): 0 kept to 255 repainted.
    pub fn at(&self, x: usize, y: usize) -> u8 {
        self.data[y * self.width + x]
    }

    /// Pixels repainted (at least half white).
    pub fn painted(&self) -> usize {
        self.data.iter().filter(|&&v| v >= HALF).count()
    }

    /// The share of the image repainted, 0 to 1.
    pub fn coverage(&self) -> f64 {
        self.painted() as f64 / self.data.len().max(1) as f64
    }

    /// A stroke of the brush from `a` to `b` (pixel coordinates, the image's top left at 0, 0):
    /// every pixel whose centre is within `radius` of the segment is painted white, or erased
    /// to black.
    pub fn stroke(&mut self, a: [f32; 2], b: [f32; 2], radius: f32, paint: bool) {
        let r = radius.max(0.5);
        let value = if paint { 255 } else { 0 };
        let (w, h) = (self.width as f32, self.height as f32);
        let x0 = (a[0].min(b[0]) - r).floor().clamp(0.0, w) as usize;
        let x1 = (a[0].max(b[0]) + r).ceil().clamp(0.0, w) as usize;
        let y0 = (a[1].min(b[1]) - r).floor().clamp(0.0, h) as usize;
        let y1 = (a[1].max(b[1]) + r).ceil().clamp(0.0, h) as usize;
        let (dx, dy) = (b[0] - a[0], b[1] - a[1]);
        let len2 = dx * dx + dy * dy;
        for y in y0..y1 {
            for x in x0..x1 {
                let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
                // The nearest point of the segment.
                let t = if len2 > 0.0 {
                    (((px - a[0]) * dx + (py - a[1]) * dy) / len2).clamp(0.0, 1.0)
                } else {
                    0.0
                };
                let (ex, ey) = (px - (a[0] + t * dx), py - (a[1] + t * dy));
                if ex * ex + ey * ey <= r * r {
                    self.data[y * self.width + x] = value;
                }
            }
        }
    }

    /// Repaint what was kept and keep what was repainted.
    pub fn invert(&mut self) {
        for v in &mut self.data {
            *v = 255 - *v;
        }
    }

    /// Nothing repainted.
    pub fn clear(&mut self) {
        self.data.fill(0);
    }

    /// The mask with its edges softened over about `px` pixels on each side (two box blurs of
    /// half that radius, a tent: a straight edge becomes a ramp from black `px` outside it to
    /// white `px` inside, half grey on the painted edge). 0: the mask as painted.
    pub fn feathered(&self, px: usize) -> Vec<u8> {
        if px == 0 {
            return self.data.clone();
        }
        let r = px.div_ceil(2);
        let mut v = self.data.clone();
        for _ in 0..2 {
            v = box_blur(&v, self.width, self.height, r, true);
            v = box_blur(&v, self.width, self.height, r, false);
        }
        v
    }

    /// Write the mask, feathered by `feather` pixels, as a grey PNG in `dir`, named by its
    /// content (the same mask is written once); returns its path.
    pub fn save(&self, dir: &Path, feather: usize) -> Result<PathBuf, String> {
        let data = self.feathered(feather);
        let name = content_name(&data);
        let path = dir.join(format!("mask-{}x{}-{name}.png", self.width, self.height));
        if path.is_file() {
            return Ok(path);
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot make the mask folder {}: {e}", dir.display()))?;
        let img = image::GrayImage::from_raw(self.width as u32, self.height as u32, data)
            .ok_or_else(|| "the mask's buffer does not match its size".to_string())?;
        // Written beside, then renamed: a half-written mask is never read.
        let part = path.with_extension("png.part");
        img.save_with_format(&part, image::ImageFormat::Png)
            .and_then(|()| std::fs::rename(&part, &path).map_err(image::ImageError::IoError))
            .map_err(|e| format!("cannot write the mask {}: {e}", path.display()))?;
        Ok(path)
    }
}

/// A file name part that follows `data`'s content (16 hex digits of its SHA-256): the same
/// pixels get the same name, others another.
pub fn content_name(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(data)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One pass of a box blur of radius `r` along rows (`rows`) or columns, the edges repeated.
fn box_blur(src: &[u8], w: usize, h: usize, r: usize, rows: bool) -> Vec<u8> {
    let (len, lines) = if rows { (w, h) } else { (h, w) };
    let at = |line: usize, i: usize| if rows { line * w + i } else { i * w + line };
    let n = (2 * r + 1) as u32;
    let mut out = vec![0u8; src.len()];
    for line in 0..lines {
        let get = |i: isize| u32::from(src[at(line, i.clamp(0, len as isize - 1) as usize)]);
        let r = r as isize;
        let mut sum: u32 = (-r..=r).map(get).sum();
        for i in 0..len {
            out[at(line, i)] = ((sum + n / 2) / n) as u8;
            sum += get(i as isize + r + 1);
            sum -= get(i as isize - r);
        }
    }
    out
}

/// The mask painter's state: the mask of the settings' source image, the brush, and where the
/// mask was last written.
#[derive(Debug, Clone)]
pub struct MaskEditor {
    /// The source the mask belongs to, and the mask (the source's size); `None` without a
    /// source, or when the source cannot be read (`error` says why).
    pub source: Option<PathBuf>,
    pub mask: Option<Mask>,
    /// The brush's radius in the source's pixels.
    pub brush: f32,
    /// The brush erases (keeps) rather than paints (repaints).
    pub erase: bool,
    /// Soft edge in pixels, applied to the file the engine reads.
    pub feather: usize,
    /// The mask drawn over the image.
    pub overlay: bool,
    /// The image tab shows the source and the mask (rather than the last image).
    pub editing: bool,
    /// What went wrong reading the source or the mask.
    pub error: Option<String>,
    /// Bumped at every change of the mask or its feather (textures follow it).
    pub version: u64,
    /// The file holding the mask as it is now (and the feather it was written with).
    written: Option<(PathBuf, usize)>,
    /// The request's mask file last seen: another one there (a restored image's) is loaded.
    seen: Option<PathBuf>,
    /// The stroke in progress: the pointer's last point.
    last: Option<[f32; 2]>,
}

impl Default for MaskEditor {
    fn default() -> Self {
        Self {
            source: None,
            mask: None,
            brush: 12.0,
            erase: false,
            feather: 0,
            overlay: true,
            editing: false,
            error: None,
            version: 0,
            written: None,
            seen: None,
            last: None,
        }
    }
}

impl MaskEditor {
    /// Follow the request's source: a new source gets a blank mask of its size, or the mask
    /// file the request names (a restored image's).
    pub fn sync(&mut self, init: Option<&InitImage>) {
        let Some(init) = init else {
            if self.source.is_some() || self.mask.is_some() {
                *self = Self {
                    brush: self.brush,
                    feather: self.feather,
                    overlay: self.overlay,
                    version: self.version + 1,
                    ..Self::default()
                };
            }
            return;
        };
        let new_source = self.source.as_deref() != Some(init.image.as_path());
        let new_mask = init.mask.is_some() && init.mask != self.seen;
        if !(new_source || new_mask) {
            return;
        }
        self.source = Some(init.image.clone());
        self.seen = init.mask.clone();
        self.written = None;
        self.last = None;
        self.version += 1;
        self.error = None;
        self.mask = match image_size(&init.image, "source image") {
            Err(e) => {
                self.error = Some(e.to_string());
                None
            }
            Ok((w, h)) => Some(match &init.mask {
                None => Mask::new(w, h),
                Some(p) => match Mask::load(p) {
                    Ok(m) if (m.width, m.height) == (w, h) => {
                        self.written = Some((p.clone(), self.feather));
                        m
                    }
                    Ok(m) => {
                        self.error = Some(format!(
                            "the mask {} is {}x{}, the source {w}x{h}: starting a blank mask",
                            p.display(),
                            m.width,
                            m.height
                        ));
                        Mask::new(w, h)
                    }
                    Err(e) => {
                        self.error = Some(format!("{e}: starting a blank mask"));
                        Mask::new(w, h)
                    }
                },
            }),
        };
    }

    /// The pointer over the source at `at` (pixels) with the button held, or `None` when it is
    /// up or away: paints (or erases) from the last point to this one.
    pub fn pointer(&mut self, at: Option<[f32; 2]>) {
        let (Some(p), Some(mask)) = (at, self.mask.as_mut()) else {
            self.last = None;
            return;
        };
        mask.stroke(self.last.unwrap_or(p), p, self.brush, !self.erase);
        self.last = Some(p);
        self.changed();
    }

    pub fn invert(&mut self) {
        if let Some(m) = &mut self.mask {
            m.invert();
            self.changed();
        }
    }

    pub fn clear(&mut self) {
        if let Some(m) = &mut self.mask {
            m.clear();
            self.changed();
        }
    }

    /// The mask (or its feather) changed.
    pub fn changed(&mut self) {
        self.written = None;
        self.version += 1;
    }

    /// Whether the request `init`, about to name the mask file `file`, blends by the mask's
    /// grey values ([`InitImage::soft_mask`]): with a feather above 0, and for a restored
    /// image's mask file taken unchanged, as it was made.
    pub fn soft_for(&self, file: Option<&Path>, init: &InitImage) -> bool {
        let unchanged = file.is_some() && file == init.mask.as_deref();
        file.is_some() && (self.feather > 0 || (unchanged && init.soft_mask))
    }

    /// Whether anything is painted.
    pub fn has_mask(&self) -> bool {
        self.mask.as_ref().is_some_and(|m| m.painted() > 0)
    }

    /// The mask file for a request: `None` when nothing is painted (image-to-image), else the
    /// mask as it is now, feathered, written in `dir` if it was not yet.
    pub fn file_for_request(&mut self, dir: &Path) -> Result<Option<PathBuf>, String> {
        let Some(mask) = self.mask.as_ref().filter(|m| m.painted() > 0) else {
            self.seen = None;
            return Ok(None);
        };
        let path = match &self.written {
            Some((p, f)) if *f == self.feather && p.is_file() => p.clone(),
            _ => mask.save(dir, self.feather)?,
        };
        self.written = Some((path.clone(), self.feather));
        self.seen = Some(path.clone());
        Ok(Some(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stroke_paints_a_capsule_and_erase_takes_it_back() {
        let mut m = Mask::new(40, 20);
        m.stroke([10.0, 10.0], [30.0, 10.0], 3.0, true);
        // On the segment and within the radius of its ends; not beyond.
        assert_eq!(m.at(10, 10), 255);
        assert_eq!(m.at(20, 12), 255);
        assert_eq!(m.at(32, 9), 255);
        assert_eq!(m.at(20, 14), 0);
        assert_eq!(m.at(34, 10), 0);
        assert_eq!(m.at(5, 10), 0);
        // Its area is close to a capsule's: 2 r L + pi r^2.
        let area = 2.0 * 3.0 * 20.0 + std::f64::consts::PI * 9.0;
        assert!((m.painted() as f64 - area).abs() < 12.0, "{}", m.painted());
        m.stroke([20.0, 10.0], [20.0, 10.0], 2.0, false);
        assert_eq!(m.at(20, 10), 0);
        assert_eq!(m.at(12, 10), 255);
        // A stroke off the image's edge paints what is on it and nothing else.
        m.stroke([-5.0, -5.0], [2.0, 2.0], 2.0, true);
        assert_eq!(m.at(0, 0), 255);
    }

    #[test]
    fn invert_and_clear() {
        let mut m = Mask::new(8, 8);
        m.stroke([4.0, 4.0], [4.0, 4.0], 1.0, true);
        let painted = m.painted();
        assert!(painted > 0);
        m.invert();
        assert_eq!(m.painted(), 64 - painted);
        m.invert();
        assert_eq!(m.painted(), painted);
        m.clear();
        assert_eq!(m.painted(), 0);
        assert_eq!(m.coverage(), 0.0);
    }

    #[test]
    fn feather_softens_an_edge_over_its_width_and_keeps_it_in_place() {
        // The left half white.
        let mut m = Mask::new(64, 4);
        for y in 0..4 {
            m.stroke([0.0, y as f32 + 0.5], [31.5, y as f32 + 0.5], 0.5, true);
        }
        assert_eq!((m.at(31, 0), m.at(32, 0)), (255, 0), "{:?}", &m.data[..64]);
        assert_eq!(m.feathered(0), m.data);
        let f = m.feathered(8);
        let row: Vec<u8> = f[..64].to_vec();
        // Full 8 px inside and empty 8 px outside; half grey at the edge; falling between.
        assert_eq!(row[23], 255, "{row:?}");
        assert_eq!(row[40], 0, "{row:?}");
        assert!((100..=156).contains(&row[31]) || (100..=156).contains(&row[32]));
        assert!(row.windows(2).all(|w| w[0] >= w[1]), "{row:?}");
        // What the engine repaints (at least half white) barely moves.
        let painted = |v: &[u8]| v.iter().filter(|&&x| x >= HALF).count();
        assert!((painted(&row) as i64 - 32).abs() <= 1, "{}", painted(&row));
    }

    #[test]
    fn a_feather_makes_the_mask_soft() {
        let (a, b) = (PathBuf::from("a.png"), PathBuf::from("b.png"));
        let init = |mask: Option<&PathBuf>, soft_mask| InitImage {
            image: "src.png".into(),
            strength: 1.0,
            mask: mask.cloned(),
            soft_mask,
            extend: None,
        };
        let mut ed = MaskEditor::default();
        assert!(!ed.soft_for(Some(&a), &init(None, false)));
        // A restored soft image's mask, unchanged, stays soft; another file follows the feather.
        assert!(ed.soft_for(Some(&a), &init(Some(&a), true)));
        assert!(!ed.soft_for(Some(&b), &init(Some(&a), true)));
        ed.feather = 8;
        assert!(ed.soft_for(Some(&b), &init(None, false)));
        // Nothing painted: no mask, nothing soft.
        assert!(!ed.soft_for(None, &init(Some(&a), true)));
    }

    #[test]
    fn the_editor_paints_writes_once_and_follows_the_source() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src.png");
        image::RgbImage::new(32, 16).save(&src).expect("save");
        let mut init = InitImage {
            image: src.clone(),
            strength: 0.6,
            mask: None,
            soft_mask: false,
            extend: None,
        };
        let mut ed = MaskEditor::default();
        ed.sync(Some(&init));
        let m = ed.mask.as_ref().expect("a blank mask");
        assert_eq!((m.width(), m.height(), m.painted()), (32, 16, 0));
        // Nothing painted: no mask file (image-to-image).
        assert_eq!(ed.file_for_request(dir.path()), Ok(None));
        ed.brush = 3.0;
        ed.pointer(Some([5.0, 5.0]));
        ed.pointer(Some([15.0, 5.0]));
        ed.pointer(None);
        assert!(ed.has_mask());
        let file = ed
            .file_for_request(dir.path())
            .expect("written")
            .expect("a file");
        let back = Mask::load(&file).expect("read back");
        assert_eq!(&back, ed.mask.as_ref().expect("mask"));
        // Unchanged: the same file; changed: another.
        assert_eq!(ed.file_for_request(dir.path()), Ok(Some(file.clone())));
        init.mask = Some(file.clone());
        ed.sync(Some(&init));
        assert_eq!(
            ed.mask.as_ref(),
            Some(&back),
            "its own file is not reloaded"
        );
        ed.erase = true;
        ed.pointer(Some([5.0, 5.0]));
        ed.pointer(None);
        let other = ed.file_for_request(dir.path()).expect("written");
        assert!(other.is_some() && other != Some(file.clone()));
        // A restored request naming the first file: loaded.
        init.mask = Some(file);
        ed.sync(Some(&init));
        assert_eq!(ed.mask.as_ref(), Some(&back));
        // No source: no mask.
        ed.sync(None);
        assert!(ed.mask.is_none() && ed.source.is_none());
        assert_eq!(ed.brush, 3.0, "the brush stays");
        // A source that is not there: said.
        init.image = dir.path().join("gone.png");
        init.mask = None;
        ed.sync(Some(&init));
        assert!(ed.mask.is_none());
        assert!(ed.error.as_deref().is_some_and(|e| e.contains("gone.png")));
    }
}
