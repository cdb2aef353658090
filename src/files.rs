//! Files written whole or not at all: [`write_atomic`] writes to a temporary file beside the
//! target (`.NAME.PID.N.partial`), flushes it to disk, renames it over the target and flushes the
//! folder, so a crash, a kill or a full disk at any moment leaves either the old file or the new
//! one, never a part of one. A crash may leave the temporary file behind; readers ignore such
//! files (they start with a dot and end in `.partial`).
//!
//! `PARALLAX_FAULT=kind=write` (see `parallel::fault`) makes every such write fail once its
//! temporary file is written, as a full disk would: tests use it to check what a failed write
//! leaves (nothing).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Whether `PARALLAX_FAULT` asks for failed writes (`kind=write`).
pub fn write_fault_from_env() -> bool {
    std::env::var("PARALLAX_FAULT").is_ok_and(|v| v.replace(' ', "").contains("kind=write"))
}

/// Whether `path` names a temporary file of [`write_atomic`] (left by a crash).
pub fn is_partial(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.') && n.ends_with(".partial"))
}

/// Write `path` through `write`, atomically (see the module doc); the folder is made if missing.
/// I/O errors name the temporary file; nothing is left behind on failure.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> Result<()>,
) -> Result<()> {
    write_atomic_with(path, write, write_fault_from_env())
}

/// [`write_atomic`], failing after the temporary file is written when `fault` (tests).
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> Result<()>,
    fault: bool,
) -> Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Image(format!("{} is not a file path", path.display())))?;
    // Unique per process and call: two threads writing one target never share a temporary file.
    let tmp: PathBuf = dir.join(format!(
        ".{name}.{}.{}.partial",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| -> Result<()> {
        let f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = BufWriter::new(f);
        write(&mut w)?;
        let f = w
            .into_inner()
            .map_err(|e| Error::io(&tmp, e.into_error()))?;
        // On disk before the rename makes it the target: otherwise a power cut after the
        // rename could leave the target empty.
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        if fault {
            return Err(Error::io(
                &tmp,
                std::io::Error::other("injected write fault (PARALLAX_FAULT=kind=write)"),
            ));
        }
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    // The rename itself is durable once the folder is flushed (where folders can be opened).
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// [`write_atomic`] of a byte string.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |w| w.write_all(bytes).map_err(|e| Error::io(path, e)))
}

/// The names of the entries of `dir`, sorted (what tests check a folder holds).
#[cfg(test)]
pub(crate) fn file_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    v.sort();
    v
}

#[cfg(test)]
mod tests {
    use super::file_names as names;
    use super::*;

    #[test]
    fn a_failed_write_keeps_the_old_file_and_leaves_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("sub").join("f.json");
        write_bytes_atomic(&p, b"old").expect("first write");
        assert_eq!(std::fs::read(&p).expect("read"), b"old");
        // The injected fault: the temporary file was written, then the write fails.
        let e = write_atomic_with(
            &p,
            |w| w.write_all(b"new").map_err(|e| Error::io(&p, e)),
            true,
        )
        .expect_err("injected");
        assert!(e.to_string().contains("injected write fault"), "{e}");
        // A writer that fails half way.
        let e = write_atomic_with(
            &p,
            |w| {
                w.write_all(b"ne").map_err(|e| Error::io(&p, e))?;
                Err(Error::Image("encoder gave up".into()))
            },
            false,
        )
        .expect_err("writer failed");
        assert!(e.to_string().contains("encoder gave up"), "{e}");
        assert_eq!(std::fs::read(&p).expect("read"), b"old");
        assert_eq!(names(&p.with_file_name("")), vec!["f.json".to_string()]);
        // A write that succeeds replaces it whole.
        write_bytes_atomic(&p, b"new").expect("second write");
        assert_eq!(std::fs::read(&p).expect("read"), b"new");
        assert_eq!(names(&p.with_file_name("")), vec!["f.json".to_string()]);
        assert!(is_partial(Path::new("/x/.f.json.12.0.partial")));
        assert!(!is_partial(Path::new("/x/f.json")));
    }

    /// Many threads writing one file at once: it always reads as one whole version.
    #[test]
    fn concurrent_writers_never_interleave() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f.txt");
        std::thread::scope(|s| {
            for t in 0..4u8 {
                let p = &p;
                s.spawn(move || {
                    for _ in 0..25 {
                        let body = vec![b'a' + t; 4096];
                        write_bytes_atomic(p, &body).expect("write");
                        let got = std::fs::read(p).expect("read");
                        assert_eq!(got.len(), 4096);
                        assert!(got.iter().all(|&b| b == got[0]), "a mixed file");
                    }
                });
            }
        });
        assert_eq!(names(dir.path()), vec!["f.txt".to_string()]);
    }
}
