//! The command line's standard output. A reader that went away (`parallax info | head -1`,
//! `| true`) ends the command quietly with status 0, as Unix tools end on a closed pipe, instead
//! of the panic `std::println!` gives (Rust ignores SIGPIPE, so the write fails with
//! `BrokenPipe`). Any other failed write (a full disk behind `> file`) is one error line and
//! status 1.
//!
//! Ctrl-C ([`on_interrupt`]) deletes the temporary files being written (no hidden
//! `.NAME.PID.N.partial` left beside the output) and exits with status 130.

use std::io::Write;

/// Write one line of `args` to standard output (see the module doc for a closed pipe).
pub fn line(args: std::fmt::Arguments) {
    let mut out = std::io::stdout().lock();
    let written = out
        .write_fmt(args)
        .and_then(|_| out.write_all(b"\n"))
        .and_then(|_| out.flush());
    if let Err(e) = written {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: cannot write to standard output: {e}");
        std::process::exit(1);
    }
}

/// Set by the SIGINT handler (the one thing a signal handler may safely do here).
#[cfg(unix)]
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Catch Ctrl-C (SIGINT): a watcher thread then deletes the temporary files being written
/// ([`crate::files::remove_in_flight`]), says so and exits with status 130.
#[cfg(unix)]
pub fn on_interrupt() {
    use std::sync::atomic::Ordering;
    const SIGINT: std::os::raw::c_int = 2;
    // SAFETY: the action only stores to an atomic, which is async-signal-safe.
    let registered = unsafe {
        signal_hook_registry::register(SIGINT, || INTERRUPTED.store(true, Ordering::SeqCst))
    };
    if let Err(e) = registered {
        tracing::warn!("no Ctrl-C handler: {e}");
        return;
    }
    let watcher = std::thread::Builder::new()
        .name("parallax-interrupt".into())
        .spawn(|| loop {
            std::thread::sleep(std::time::Duration::from_millis(50));
            if INTERRUPTED.load(Ordering::SeqCst) {
                let removed = crate::files::remove_in_flight();
                eprintln!(
                    "interrupted{}",
                    if removed > 0 {
                        " (the file being written was removed)"
                    } else {
                        ""
                    }
                );
                std::process::exit(130);
            }
        });
    if let Err(e) = watcher {
        tracing::warn!("no Ctrl-C handler: {e}");
    }
}

#[cfg(not(unix))]
pub fn on_interrupt() {}
