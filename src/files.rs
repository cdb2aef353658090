//! Files written whole or not at all: [`write_atomic`] writes to a temporary file beside the
//! target (`.NAME.PID.N.partial`), flushes it to disk, renames it over the target and flushes the
//! folder, so a crash, a kill or a full disk at any moment leaves either the old file or the new
//! one, never a part of one. A crash may leave the temporary file behind; readers ignore such
//! files (they start with a dot and end in `.partial`).
//!
//! The temporary files being written are listed while they are: [`remove_in_flight`] deletes
//! them (the command line's Ctrl-C handler calls it before exiting), and the first write into a
//! folder sweeps the temporary files there whose process has ended ([`sweep_stale`]).
//!
//! [`open_regular`] opens a file to read only when it is a regular file: a FIFO or a device put
//! where a weight file belongs would otherwise block the open, or the read, for ever.
//!
//! `PARALLAX_FAULT=kind=write` (see `parallel::fault`) makes every such write fail once its
//! temporary file is written, as a full disk would: tests use it to check what a failed write
//! leaves (nothing).

use std::fs::File;
use std::io::BufWriter;
#[cfg(test)]
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// Whether `PARALLAX_FAULT` asks for failed writes (`kind=write`).
pub fn write_fault_from_env() -> bool {
    std::env::var("PARALLAX_FAULT").is_ok_and(|v| v.replace(' ', "").contains("kind=write"))
}

/// Open `path` to read, refusing (with an error naming it) anything but a regular file, or a
/// link to one, before opening it.
pub fn open_regular(path: &Path) -> Result<File> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        let what = if meta.is_dir() {
            "a folder"
        } else {
            "not a regular file (a pipe, socket or device)"
        };
        return Err(Error::io(
            path,
            std::io::Error::other(format!("{what}: give a file")),
        ));
    }
    File::open(path).map_err(|e| Error::io(path, e))
}

/// The text of the regular file `path` (see [`open_regular`]).
pub fn read_regular_text(path: &Path) -> Result<String> {
    let mut s = String::new();
    std::io::Read::read_to_string(&mut open_regular(path)?, &mut s)
        .map_err(|e| Error::io(path, e))?;
    Ok(s)
}

/// Whether `path` names a temporary file of [`write_atomic`] (left by a crash; tests check none
/// is left).
#[cfg(test)]
pub(crate) fn is_partial(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.') && n.ends_with(".partial"))
}

/// Write `path` through `write`, atomically (see the module doc); the folder is made if missing.
/// I/O errors name the folder (it takes no new file) or the temporary file; nothing is left
/// behind on failure.
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
        std::fs::create_dir_all(dir).map_err(|e| write_err(dir, e))?;
    }
    let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
        let not_a_file = std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path");
        write_err(path, not_a_file)
    })?;
    sweep_once(dir);
    // Unique per process and call: two threads writing one target never share a temporary file.
    let tmp: PathBuf = dir.join(format!(
        ".{name}.{}.{}.partial",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _listed = InFlight::list(&tmp);
    let written = (|| -> Result<()> {
        // A folder that takes no new file is named as such (not the temporary file's name).
        let f = File::create(&tmp).map_err(|e| write_err(dir, e))?;
        let mut w = BufWriter::new(f);
        write(&mut w)?;
        let f = w
            .into_inner()
            .map_err(|e| write_err(&tmp, e.into_error()))?;
        // On disk before the rename makes it the target: otherwise a power cut after the
        // rename could leave the target empty.
        f.sync_all().map_err(|e| write_err(&tmp, e))?;
        if fault {
            return Err(write_err(
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
        return Err(write_err(path, e));
    }
    // The rename itself is durable once the folder is flushed (where folders can be opened).
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The temporary files being written now, by every thread of this process.
static IN_FLIGHT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// One temporary file listed in [`IN_FLIGHT`] for as long as this lives.
struct InFlight(PathBuf);

impl InFlight {
    fn list(tmp: &Path) -> Self {
        IN_FLIGHT
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tmp.to_path_buf());
        InFlight(tmp.to_path_buf())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut v = IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = v.iter().position(|p| *p == self.0) {
            v.swap_remove(i);
        }
    }
}

/// Delete every temporary file being written now (an interrupted process's last act: the
/// targets keep their old contents). Returns how many were deleted.
pub fn remove_in_flight() -> usize {
    remove_listed(None)
}

/// [`remove_in_flight`], only those in `dir` when given.
fn remove_listed(dir: Option<&Path>) -> usize {
    let v = IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner());
    v.iter()
        .filter(|p| dir.is_none_or(|d| p.parent() == Some(d)))
        .filter(|p| std::fs::remove_file(p).is_ok())
        .count()
}

/// The process id in a temporary file's name (`.NAME.PID.N.partial`), if it is one.
fn partial_pid(path: &Path) -> Option<u32> {
    let name = path.file_name()?.to_str()?;
    let mut parts = name.strip_suffix(".partial")?.rsplitn(3, '.');
    parts.next()?.parse::<u64>().ok()?;
    let pid = parts.next()?.parse::<u32>().ok()?;
    parts.next().filter(|rest| rest.starts_with('.'))?;
    Some(pid)
}

/// Whether process `pid` is running (read from /proc; `None` where there is no /proc).
fn process_alive(pid: u32) -> Option<bool> {
    let proc = Path::new("/proc");
    proc.join("self")
        .exists()
        .then(|| proc.join(pid.to_string()).exists())
}

/// Delete the temporary files in `dir` left by processes that have ended (a crash, a kill, an
/// interrupt before this cleanup existed); those of running processes stay. Returns how many
/// were deleted. Does nothing where it cannot tell which processes run (no /proc).
pub fn sweep_stale(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for p in entries.flatten().map(|e| e.path()) {
        let Some(pid) = partial_pid(&p) else { continue };
        if pid != std::process::id()
            && process_alive(pid) == Some(false)
            && std::fs::remove_file(&p).is_ok()
        {
            tracing::info!(
                "removed {} (left by process {pid}, which has ended)",
                p.display()
            );
            removed += 1;
        }
    }
    removed
}

/// [`sweep_stale`] of `dir`, the first time this process writes there.
fn sweep_once(dir: &Path) {
    static SWEPT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    let key = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    {
        let mut swept = SWEPT.lock().unwrap_or_else(|p| p.into_inner());
        if swept.contains(&key) {
            return;
        }
        swept.push(key);
    }
    sweep_stale(dir);
}

/// [`write_atomic`] of a byte string.
#[cfg(test)]
pub(crate) fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |w| w.write_all(bytes).map_err(|e| write_err(path, e)))
}

/// A failed write of `path` ("cannot write", not "cannot read").
pub fn write_err(path: &Path, source: std::io::Error) -> Error {
    Error::Write {
        path: path.to_path_buf(),
        source,
    }
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

    /// Temporary files of ended processes are swept; those of running ones, this one's and
    /// other files stay. A write in progress is listed, and [`remove_in_flight`] deletes it.
    #[test]
    fn stale_temporary_files_are_swept_and_in_flight_ones_removable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        // Beyond Linux's largest process id: never running.
        let dead = d.join(".cat.png.4294967.0.partial");
        let mine = d.join(format!(".cat.png.{}.7.partial", std::process::id()));
        let init = d.join(".cat.png.1.3.partial");
        let other = d.join("cat.png.partial");
        for p in [&dead, &mine, &init, &other] {
            std::fs::write(p, b"x").expect("write");
        }
        assert_eq!(partial_pid(&dead), Some(4294967));
        assert_eq!(partial_pid(&other), None);
        assert_eq!(partial_pid(Path::new(".a.b.12.x.partial")), None);
        if process_alive(1).is_none() {
            return; // no /proc: nothing is swept
        }
        assert_eq!(sweep_stale(d), 1);
        assert!(!dead.exists());
        assert!(mine.exists() && init.exists() && other.exists());

        // A write held half way: its temporary file is listed until it ends.
        let target = d.join("held.png");
        let (started, go) = (std::sync::mpsc::channel(), std::sync::mpsc::channel::<()>());
        let (started_tx, started_rx) = started;
        let (go_tx, go_rx) = go;
        std::thread::scope(|s| {
            let t = &target;
            let h = s.spawn(move || {
                write_atomic_with(
                    t,
                    |w| {
                        w.write_all(b"half").map_err(|e| write_err(t, e))?;
                        w.flush().map_err(|e| write_err(t, e))?;
                        started_tx.send(()).expect("send");
                        go_rx.recv().expect("recv");
                        Ok(())
                    },
                    false,
                )
            });
            started_rx.recv().expect("the write started");
            let held = names(d)
                .into_iter()
                .filter(|n| n.starts_with(".held.png."))
                .count();
            assert_eq!(held, 1);
            // (Only this folder's: other tests write at the same time.)
            assert_eq!(remove_listed(Some(d)), 1);
            assert!(!names(d).iter().any(|n| n.starts_with(".held.png.")));
            go_tx.send(()).expect("go");
            // The rename then fails (its file is gone): the target was never written.
            assert!(h.join().expect("writer").is_err());
        });
        assert!(!target.exists());
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
