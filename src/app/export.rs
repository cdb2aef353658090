//! Export: an image as PNG, JPEG or WebP with its settings (PNG text chunks, or EXIF), and a
//! window screenshot as PNG.
//! Where the path comes from is [`super::dialogs`]; a path is checked when it is chosen (its
//! folder must exist and be writable), and a failed write says "cannot write <path>".

use std::path::Path;

use crate::error::{Error, Result};
use crate::pipeline::image::save_image as save_any;
use crate::pipeline::image::{save_png, RgbImage};
use crate::runtime::gallery::check_writable_dir;
use crate::runtime::ImageResult;

/// Whether a file can be written at `path`: a file name, in a folder that exists and is
/// writable. Checked when the path is chosen, before anything is encoded.
pub fn check_save_path(path: &Path) -> Result<()> {
    if path.file_name().is_none() || path.is_dir() {
        return Err(Error::Write {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "give a file name, not a folder",
            ),
        });
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    check_writable_dir(dir)
}

/// The writer's I/O errors name its temporary file; report the path the user chose. The format
/// follows the extension (PNG, JPEG or WebP; none: PNG).
fn write(path: &Path, img: &RgbImage, text: &[(String, String)]) -> Result<()> {
    check_save_path(path)?;
    let res = if path.extension().is_none() {
        save_png(path, img, text)
    } else {
        save_any(path, img, text)
    };
    res.map_err(|e| match e {
        Error::Io { source, .. } => Error::Write {
            path: path.to_path_buf(),
            source,
        },
        other => other,
    })
}

/// Write a finished image with its settings (and run record) in PNG text chunks.
pub fn save_image(path: &Path, result: &ImageResult) -> Result<()> {
    let g = &result.generated;
    let mut text = g.settings.png_text()?;
    if let Some(q) = result.quality {
        let q = serde_json::to_string(&q).map_err(|e| Error::serialise("the quality record", e))?;
        text.push(("parallax-quality".into(), q));
    }
    write(path, &g.image, &text)
}

/// Write a screenshot (RGBA from egui) as an RGB PNG.
pub fn save_screenshot(path: &Path, img: &egui::ColorImage) -> Result<()> {
    let [w, h] = img.size;
    let data = img
        .pixels
        .iter()
        .flat_map(|c| [c.r(), c.g(), c.b()])
        .collect();
    let rgb = RgbImage {
        width: w,
        height: h,
        data,
    };
    write(
        path,
        &rgb,
        &[(
            "Software".into(),
            format!("Parallax {} studio", env!("CARGO_PKG_VERSION")),
        )],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_paths_are_checked_when_chosen() {
        let tmp = tempfile::tempdir().expect("tempdir");
        assert!(check_save_path(&tmp.path().join("a.png")).is_ok());
        let gone = tmp.path().join("no-such-folder/a.png");
        let e = check_save_path(&gone).expect_err("missing folder");
        assert!(
            e.to_string().starts_with(&format!(
                "cannot write {}",
                tmp.path().join("no-such-folder").display()
            )),
            "{e}"
        );
        let e = check_save_path(tmp.path()).expect_err("a folder");
        assert!(e.to_string().contains("not a folder"), "{e}");
        let img = egui::ColorImage::new([2, 2], vec![egui::Color32::RED; 4]);
        assert!(save_screenshot(&gone, &img).is_err());
        let ok = tmp.path().join("shot.png");
        save_screenshot(&ok, &img).expect("saved");
        let (back, _) = crate::pipeline::image::read_png(&ok).expect("read back");
        assert_eq!(back.data, [255, 0, 0].repeat(4));
    }
}
