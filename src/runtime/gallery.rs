//! The gallery: every finished image kept on disk as a PNG that carries its settings, written
//! atomically (temporary file, then rename) so a crash never leaves a half-written entry. The
//! folder is the whole database: listing it reads the settings back from each PNG's text chunks
//! (the header alone: no pixels are decoded), and a thumbnail is made row by row, so a huge
//! image never lands in memory whole ([`read_thumbnail`]). Files an image's settings name beside
//! it (a painted mask, a copied source) live in [`SIDE_DIR`] and go when the last image naming
//! them is deleted.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::pipeline::image::{read_png, save_png, PngHeader, RgbImage};
use crate::pipeline::{Generated, GenerationSettings};

/// Extra facts about a run, stored beside the settings in the `parallax-run` chunk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub total_ms: f64,
    pub steps_computed: usize,
    pub steps_reused: usize,
    /// Unix time in milliseconds when it finished.
    pub created_ms: u64,
    /// The images made together (one compare sweep) share this name; `None` for one image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// One image of the gallery.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: PathBuf,
    pub settings: GenerationSettings,
    pub run: RunRecord,
}

/// A gallery folder.
#[derive(Debug, Clone)]
pub struct Gallery {
    dir: PathBuf,
}

/// The default gallery folder: `$PARALLAX_HOME/gallery`, else `$XDG_DATA_HOME/parallax/gallery`,
/// else `~/.local/share/parallax/gallery`, else `./parallax-gallery`.
pub fn default_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("PARALLAX_HOME") {
        return PathBuf::from(h).join("gallery");
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(x).join("parallax").join("gallery");
    }
    if let Some(home) = std::env::var_os("HOME") {
        return PathBuf::from(home).join(".local/share/parallax/gallery");
    }
    PathBuf::from("parallax-gallery")
}

/// Unix time in milliseconds.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The folder inside the gallery for the files images' settings name beside them: the studio's
/// painted masks and the copies of sources that were not in the gallery.
pub const SIDE_DIR: &str = "masks";

/// A file the gallery listing passed over, and why.
pub type Skipped = (PathBuf, String);

impl Gallery {
    /// Open (and create) a gallery folder.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| Error::Io {
            path: dir.clone(),
            source: e,
        })?;
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Store a finished image; returns its path.
    pub fn save(&self, g: &Generated) -> Result<PathBuf> {
        self.save_in_group(g, None)
    }

    /// Store a finished image as one of the images made together under `group` (a compare
    /// sweep's, which the gallery keeps as one group); returns its path.
    pub fn save_in_group(&self, g: &Generated, group: Option<&str>) -> Result<PathBuf> {
        let run = RunRecord {
            total_ms: g.timings.total_ms,
            steps_computed: g.stats.computed,
            steps_reused: g.stats.reused,
            created_ms: now_ms(),
            group: group.map(str::to_string),
        };
        let mut text = g.settings.png_text()?;
        text.push((
            "parallax-run".into(),
            serde_json::to_string(&run).map_err(|e| Error::serialise("the run record", e))?,
        ));
        // Name: time, seed, cache policy; a counter keeps two images of one millisecond apart.
        let stem = format!(
            "{:013}-seed{}-{}",
            run.created_ms,
            g.settings.seed,
            g.settings.cache_spec().file_tag()
        );
        let mut path = self.dir.join(format!("{stem}.png"));
        let mut n = 1;
        while path.exists() {
            path = self.dir.join(format!("{stem}-{n}.png"));
            n += 1;
        }
        // The PNG writer names its temporary file when it fails; the user chose the folder.
        save_png(&path, &g.image, &text).map_err(|e| match e {
            Error::Io { source, .. } => Error::Write {
                path: path.clone(),
                source,
            },
            other => other,
        })?;
        Ok(path)
    }

    /// Whether images can be written here now (checked before a job, so a read-only folder is
    /// reported before the generation, not after it).
    pub fn check_writable(&self) -> Result<()> {
        check_writable_dir(&self.dir)
    }

    /// Every readable entry, newest first. Files that are not Parallax PNGs (or are damaged) are
    /// skipped with a warning in the log.
    pub fn list(&self) -> Result<Vec<Entry>> {
        Ok(self.list_and_skipped()?.0)
    }

    /// [`Gallery::list`], and the PNG files it skipped with why (not Parallax's, or damaged).
    pub fn list_and_skipped(&self) -> Result<(Vec<Entry>, Vec<Skipped>)> {
        let rd = std::fs::read_dir(&self.dir).map_err(|e| Error::Io {
            path: self.dir.clone(),
            source: e,
        })?;
        let mut out = Vec::new();
        let mut skipped = Vec::new();
        for ent in rd.flatten() {
            let path = ent.path();
            if path.extension().and_then(|e| e.to_str()) != Some("png") {
                continue;
            }
            match Self::read_entry(&path) {
                Ok(e) => out.push(e),
                Err(e) => {
                    tracing::warn!("gallery: skipping {}: {e}", path.display());
                    skipped.push((path, e.to_string()));
                }
            }
        }
        out.sort_by(|a, b| {
            b.run
                .created_ms
                .cmp(&a.run.created_ms)
                .then_with(|| b.path.cmp(&a.path))
        });
        Ok((out, skipped))
    }

    fn read_entry(path: &Path) -> Result<Entry> {
        // The text chunks come before the pixels: nothing is decoded.
        let text = PngHeader::open(path)?.text;
        let settings = GenerationSettings::from_png_text(&text)?;
        let run = text
            .iter()
            .find(|(k, _)| k == "parallax-run")
            .and_then(|(_, v)| serde_json::from_str(v).ok())
            .unwrap_or_default();
        Ok(Entry {
            path: path.to_path_buf(),
            settings,
            run,
        })
    }

    /// The pixels of an entry.
    pub fn image(&self, entry: &Entry) -> Result<RgbImage> {
        Ok(read_png(&entry.path)?.0)
    }

    /// Where the files images' settings name beside them are kept ([`SIDE_DIR`]).
    pub fn side_dir(&self) -> PathBuf {
        self.dir.join(SIDE_DIR)
    }

    /// Remove an entry (only files inside this gallery's folder), and its side files that no
    /// other entry names ([`Gallery::delete_keeping`]).
    pub fn delete(&self, path: &Path) -> Result<()> {
        self.delete_keeping(path, &[]).map(drop)
    }

    /// Remove an entry (only files inside this gallery's folder), then the files in
    /// [`Gallery::side_dir`] its settings name (its mask, a copied source) unless another entry
    /// or `keep` (say the request being edited) names them. Returns the side files removed; one
    /// that cannot be removed is logged, not an error (the image is gone).
    pub fn delete_keeping(&self, path: &Path, keep: &[PathBuf]) -> Result<Vec<PathBuf>> {
        if path.parent() != Some(self.dir.as_path()) {
            return Err(Error::runtime(
                format!("cannot delete {}", path.display()),
                format!("it is not in the gallery folder {}", self.dir.display()),
            ));
        }
        let side = Self::read_entry(path)
            .map(|e| self.side_files(&e.settings))
            .unwrap_or_default();
        std::fs::remove_file(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        if side.is_empty() {
            return Ok(Vec::new());
        }
        let mut named: Vec<PathBuf> = keep.iter().filter_map(|p| p.canonicalize().ok()).collect();
        // Without the listing no one can tell what other images name: all is kept.
        let entries = match self.list() {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!("gallery: side files kept, the folder cannot be listed: {e}");
                return Ok(Vec::new());
            }
        };
        for e in entries {
            named.extend(self.side_files(&e.settings));
        }
        let mut removed = Vec::new();
        for f in side.into_iter().filter(|f| !named.contains(f)) {
            match std::fs::remove_file(&f) {
                Ok(()) => removed.push(f),
                Err(e) => tracing::warn!("gallery: cannot remove {}: {e}", f.display()),
            }
        }
        Ok(removed)
    }

    /// The files `s` names that live in [`Gallery::side_dir`], as canonical paths.
    fn side_files(&self, s: &GenerationSettings) -> Vec<PathBuf> {
        let Ok(side) = self.side_dir().canonicalize() else {
            return Vec::new();
        };
        let Some(init) = &s.init else {
            return Vec::new();
        };
        [Some(&init.image), init.mask.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|p| p.canonicalize().ok())
            .filter(|p| p.parent() == Some(side.as_path()))
            .collect()
    }
}

/// The entries in listing order, with the images made together (one compare sweep) gathered
/// into one group where the first of them is listed; an image made alone is a group of one.
pub fn grouped(entries: &[Entry]) -> Vec<Vec<&Entry>> {
    let mut out: Vec<Vec<&Entry>> = Vec::new();
    for e in entries {
        let same = e.run.group.as_ref().and_then(|g| {
            out.iter_mut()
                .find(|grp| grp[0].run.group.as_ref() == Some(g))
        });
        match same {
            Some(grp) => grp.push(e),
            None => out.push(vec![e]),
        }
    }
    out
}

/// Whether a file can be created in `dir`: it must exist, be a folder, and take a small probe
/// file (created and removed at once). The error names `dir` and says why.
pub fn check_writable_dir(dir: &Path) -> Result<()> {
    let write_err = |source| Error::Write {
        path: dir.to_path_buf(),
        source,
    };
    if !dir.is_dir() {
        let why = if dir.exists() {
            "it is not a folder"
        } else {
            "no such folder"
        };
        return Err(write_err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            why,
        )));
    }
    let probe = dir.join(format!(".parallax-write-check-{}", std::process::id()));
    std::fs::File::create(&probe).map_err(write_err)?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// The most pixels a gallery thumbnail is decoded from (row by row): 16 MP, four times a
/// 2048x2048 image. Larger images get no thumbnail (a note says why).
pub const THUMBNAIL_MAX_PIXELS: usize = 16 << 20;

/// An image opened large is read at most this many pixels a side (larger ones are shown
/// scaled down: a texture has a size limit) and from at most [`OPEN_MAX_PIXELS`].
pub const OPEN_MAX_SIDE: usize = 4096;
pub const OPEN_MAX_PIXELS: usize = 64 << 20;

/// The size of a thumbnail of a `width` x `height` image whose longer side is at most
/// `max_side`.
fn thumbnail_size(width: usize, height: usize, max_side: usize) -> (usize, usize) {
    let scale = (width.max(height) as f64 / max_side.max(1) as f64).max(1.0);
    (
        ((width as f64 / scale).round() as usize).max(1),
        ((height as f64 / scale).round() as usize).max(1),
    )
}

/// A thumbnail of the PNG at `path` whose longer side is at most `max_side` (box filter), made
/// row by row: what is held is one row and the thumbnail, whatever the image's size. Images of
/// more than `max_pixels` are refused from their header, before anything is decoded.
pub fn read_thumbnail(path: &Path, max_side: usize, max_pixels: usize) -> Result<RgbImage> {
    let png = PngHeader::open(path)?;
    let (w, h) = (png.width, png.height);
    if w.saturating_mul(h) > max_pixels {
        return Err(Error::Image(format!(
            "{w}x{h} ({:.0} MP) is too large to preview here (at most {:.0} MP)",
            (w * h) as f64 / 1e6,
            max_pixels as f64 / 1e6
        )));
    }
    let (tw, th) = thumbnail_size(w, h, max_side);
    let mut sums = vec![0u64; tw * th * 3];
    let mut counts = vec![0u64; tw * th];
    png.rows(path, &mut |y, row| {
        let ty = (y * th / h.max(1)).min(th - 1);
        for (x, p) in row.chunks_exact(3).take(w).enumerate() {
            let at = ty * tw + (x * tw / w.max(1)).min(tw - 1);
            counts[at] += 1;
            for c in 0..3 {
                sums[at * 3 + c] += u64::from(p[c]);
            }
        }
    })?;
    let data = sums
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let n = counts[i / 3].max(1);
            ((s + n / 2) / n) as u8
        })
        .collect();
    Ok(RgbImage {
        width: tw,
        height: th,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo(req: &crate::pipeline::GenerateRequest) -> Generated {
        crate::pipeline::Pipeline::demo(&candle_core::Device::Cpu)
            .expect("demo")
            .generate(req, &mut |_| Ok(()))
            .expect("generate")
    }

    #[test]
    fn policy_images_are_named_by_their_policy_and_sweeps_stay_together() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let gal = Gallery::open(tmp.path()).expect("open");
        let req = crate::pipeline::GenerateRequest {
            prompt: "x".into(),
            width: 32,
            height: 32,
            steps: Some(3),
            cache: crate::pipeline::cache::CacheSpec::preset("taylorseer", "balanced"),
            ..Default::default()
        };
        let alone = gal.save(&demo(&req)).expect("save");
        let name = alone
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert!(name.ends_with("-seed0-taylorseer-balanced.png"), "{name}");
        let plain = crate::pipeline::GenerateRequest {
            cache: None,
            ..req.clone()
        };
        let mut sweep = Vec::new();
        for r in [&plain, &req] {
            sweep.push(gal.save_in_group(&demo(r), Some("sweep-1")).expect("save"));
        }
        assert!(sweep[0].to_string_lossy().ends_with("-nocache.png"));
        let entries = gal.list().expect("list");
        let groups = grouped(&entries);
        let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 3);
        assert!(sizes.contains(&2) && sizes.contains(&1), "{sizes:?}");
        let pair = groups.iter().find(|g| g.len() == 2).expect("the sweep");
        assert!(pair
            .iter()
            .all(|e| e.run.group.as_deref() == Some("sweep-1")));
    }

    /// Deleting an image removes the mask and the copied source its settings name in the side
    /// folder, but not a mask another image still names (until that one goes too), not one
    /// the caller keeps, and never a file outside the side folder.
    #[test]
    fn deleting_an_image_removes_its_side_files_no_one_else_names() {
        use crate::pipeline::img2img::InitImage;
        let tmp = tempfile::tempdir().expect("tempdir");
        let gal = Gallery::open(tmp.path().join("gallery")).expect("open");
        let side = gal.side_dir();
        std::fs::create_dir_all(&side).expect("side dir");
        let file = |p: PathBuf| {
            std::fs::write(&p, b"png").expect("write");
            p
        };
        let (shared, own, source) = (
            file(side.join("mask-1.png")),
            file(side.join("mask-2.png")),
            file(side.join("source-3.png")),
        );
        let users = file(tmp.path().join("my-mask.png"));
        let g = demo(&crate::pipeline::GenerateRequest {
            prompt: "x".into(),
            width: 32,
            height: 32,
            steps: Some(1),
            ..Default::default()
        });
        let save = |image: &PathBuf, mask: &PathBuf| {
            let mut g = g.clone();
            g.settings.init = Some(InitImage {
                image: image.clone(),
                strength: 0.6,
                mask: Some(mask.clone()),
                soft_mask: false,
                extend: None,
            });
            gal.save(&g).expect("save")
        };
        let a = save(&source, &own);
        let b = save(&users, &shared);
        let c = save(&users, &shared);
        let d = save(&users, &users);
        let removed = gal.delete_keeping(&a, &[]).expect("delete a");
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(!a.exists() && !own.exists() && !source.exists());
        gal.delete(&b).expect("delete b");
        assert!(shared.exists(), "c still names it");
        let kept = gal
            .delete_keeping(&c, std::slice::from_ref(&shared))
            .expect("delete c");
        assert!(kept.is_empty() && shared.exists(), "the caller keeps it");
        gal.delete(&d).expect("delete d");
        assert!(users.exists(), "a file outside the side folder stays");
        let e = save(&users, &shared);
        gal.delete(&e).expect("delete e");
        assert!(!shared.exists(), "the last image naming it is gone");
        assert!(gal.list().expect("list").is_empty());
    }

    #[test]
    fn unwritable_places_are_named_as_such() {
        let tmp = tempfile::tempdir().expect("tempdir");
        assert!(check_writable_dir(tmp.path()).is_ok());
        let leftovers = std::fs::read_dir(tmp.path()).expect("list").count();
        assert_eq!(leftovers, 0, "the probe file is removed");

        let missing = tmp.path().join("nope");
        let e = check_writable_dir(&missing).expect_err("missing folder");
        assert_eq!(
            e.to_string(),
            format!("cannot write {}: no such folder", missing.display())
        );
        let file = tmp.path().join("file.txt");
        std::fs::write(&file, b"x").expect("write");
        let e = check_writable_dir(&file).expect_err("a file is not a folder");
        assert!(e.to_string().contains("it is not a folder"), "{e}");

        // A gallery whose folder became a file: the save error says "cannot write <image>".
        let dir = tmp.path().join("g");
        let gal = Gallery::open(&dir).expect("open");
        std::fs::remove_dir(&dir).expect("rmdir");
        std::fs::write(&dir, b"not a folder").expect("write");
        assert!(gal.check_writable().is_err());
        let req = crate::pipeline::GenerateRequest {
            prompt: "x".into(),
            width: 32,
            height: 32,
            steps: Some(1),
            ..Default::default()
        };
        let g = demo(&req);
        let e = gal.save(&g).expect_err("cannot save");
        let msg = e.to_string();
        assert!(msg.starts_with("cannot write "), "{msg}");
        assert!(!msg.contains(".partial"), "{msg}");
    }
}
