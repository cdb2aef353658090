//! Faults in real worker processes: two `parallax worker` processes meet at a TCP rendezvous
//! (rank 0 serves the store; tensors go through it) with `PARALLAX_FAULT` naming one rank, which
//! fails, panics, exits its process or stalls after a denoising step. For each fault: the other
//! rank ends with an error that names the failed rank, in bounded time (the bound asserted here is
//! only a hang guard; the measured time is printed), no image or temporary file is left where the
//! image was to go, and a fresh pair of workers on the same rendezvous address makes the image.
//!
//! `parallax worker` makes one image per process, so "the next job" is a new pair of processes:
//! the multi-process path has no long-lived group that outlives a fault (the in-process runtime
//! does: tests/faults.rs).

mod common;

use common::free_init;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Seconds a worker waits for a stalled peer (`PARALLAX_COLLECTIVE_TIMEOUT_S`).
const TIMEOUT_S: f64 = 3.0;
/// A pair of workers that takes longer than this has hung.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// One worker process, its stderr read line by line as it comes, each line with the time it
/// arrived.
struct Worker {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    exit: Option<(Instant, ExitStatus)>,
}

impl Worker {
    fn spawn(rank: usize, init: &str, fault: Option<&str>, out: &Path) -> Worker {
        let env: Vec<(&str, &str)> = fault.map(|f| ("PARALLAX_FAULT", f)).into_iter().collect();
        Worker::start(rank, init, &[], &env, out)
    }

    /// Rank `rank` of the pair's job with the options in `over` replacing (or, `""`, removing)
    /// the defaults, and the environment `env` added.
    fn start(
        rank: usize,
        init: &str,
        over: &[(&str, &str)],
        env: &[(&str, &str)],
        out: &Path,
    ) -> Worker {
        let mut opts: Vec<(&str, &str)> = vec![
            ("--world", "2"),
            ("--timeout", "30"),
            ("--model", "demo"),
            ("--prompt", "a red circle, blue sky"),
            ("--width", "64"),
            ("--height", "64"),
            ("--steps", "4"),
            ("--seed", "5"),
            ("--ring", "2"),
        ];
        for (k, v) in over {
            opts.retain(|(o, _)| o != k);
            if !v.is_empty() {
                opts.push((k, v));
            }
        }
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_parallax"));
        cmd.arg("worker");
        // No address: the launcher's environment (in `env`) places the worker.
        if !init.is_empty() {
            cmd.args(["--rank", &rank.to_string(), "--init", init]);
        }
        for (k, v) in opts {
            cmd.args([k, v]);
        }
        cmd.arg("--out")
            .arg(out)
            .env_remove("RUST_LOG")
            .env_remove("PARALLAX_FAULT")
            .env_remove("PARALLAX_WORKER_TOKEN")
            .env("RUST_BACKTRACE", "0")
            .env("PARALLAX_COLLECTIVE_TIMEOUT_S", TIMEOUT_S.to_string())
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start parallax worker");
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().expect("lines").push((Instant::now(), line));
            }
        });
        Worker {
            child,
            lines,
            reader: Some(reader),
            exit: None,
        }
    }

    /// Whether it has exited (noting when, to within the polling interval).
    fn poll(&mut self) -> bool {
        if self.exit.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exit = Some((Instant::now(), status));
                if let Some(r) = self.reader.take() {
                    let _ = r.join();
                }
            }
        }
        self.exit.is_some()
    }

    fn text(&self) -> String {
        let lines = self.lines.lock().expect("lines");
        lines
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// When the first line containing `needle` arrived.
    fn first(&self, needle: &str) -> Option<Instant> {
        let lines = self.lines.lock().expect("lines");
        lines
            .iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(t, _)| *t)
    }

    fn status(&self) -> ExitStatus {
        self.exit.expect("exited").1
    }

    fn exited_at(&self) -> Instant {
        self.exit.expect("exited").0
    }
}

/// Run ranks 0 and 1 at `init` with `fault` until both exit (killing both and failing the test
/// past the hang guard); returns them in rank order and the seconds the pair took.
fn pair(init: &str, fault: Option<&str>, out: &Path) -> (Worker, Worker, f64) {
    let t0 = Instant::now();
    let w = [
        Worker::spawn(0, init, fault, out),
        Worker::spawn(1, init, fault, out),
    ];
    let [a, b] = wait_all(w, &format!("{fault:?}"));
    (a, b, t0.elapsed().as_secs_f64())
}

/// Wait for every worker of `w` to exit (killing them all and failing the test past the hang
/// guard).
fn wait_all<const N: usize>(mut w: [Worker; N], what: &str) -> [Worker; N] {
    let t0 = Instant::now();
    loop {
        // Poll all every time (each notes its own exit time), then ask whether all are done.
        let exited: Vec<bool> = w.iter_mut().map(Worker::poll).collect();
        if exited.iter().all(|e| *e) {
            return w;
        }
        if t0.elapsed() > HANG_GUARD {
            for x in &mut w {
                let _ = x.child.kill();
                let _ = x.child.wait();
            }
            let said: Vec<String> = w.iter().map(Worker::text).collect();
            panic!("{what}: the workers hung for {HANG_GUARD:?}\n{said:#?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The first error line a worker printed (failing the test if none).
fn error_line(w: &Worker, what: &str) -> String {
    let t = w.text();
    assert!(!t.contains("panicked"), "{what}: a panic:\n{t}");
    t.lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("{what}: no error line:\n{t}"))
        .to_string()
}

/// Every file in `dir`.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    v.sort();
    v
}

struct Case {
    fault: &'static str,
    faulty: usize,
    /// What the faulty rank's own stderr shows when the fault strikes.
    struck: &'static str,
    /// What the surviving rank's error must say: every one of these.
    survivor_says: &'static [&'static str],
    /// ... and one of these (empty: no more).
    survivor_says_one_of: &'static [&'static str],
    /// The faulty rank's exit status, where it is known.
    faulty_status: Option<i32>,
}

#[test]
fn worker_processes_name_the_failed_rank_in_bounded_time_and_leave_no_image() {
    let dir = tempfile::tempdir().expect("tempdir");
    let init = free_init();
    let out = dir.path().join("image.png");

    // The baseline: a pair without faults makes the image; its time is the reference.
    let (a, b, secs) = pair(&init, None, &out);
    assert!(a.status().success(), "rank 0: {}", a.text());
    assert!(b.status().success(), "rank 1: {}", b.text());
    let (good, _) = parallax::pipeline::image::read_png(&out).expect("the baseline image");
    eprintln!("no fault: the pair took {secs:.2} s");
    std::fs::remove_file(&out).expect("rm");

    let stall = format!("rank=1,step=1,kind=stall:{}", 3.0 * TIMEOUT_S);
    let cases = [
        Case {
            fault: "rank=1,step=1,kind=fail",
            faulty: 1,
            struck: "injected fault: rank 1 after step 1",
            survivor_says: &["rank 1 disconnected before it was done"],
            survivor_says_one_of: &[],
            faulty_status: Some(1),
        },
        Case {
            fault: "rank=1,step=2,kind=panic",
            faulty: 1,
            struck: "injected fault: rank 1 after step 2",
            survivor_says: &["rank 1 disconnected before it was done"],
            survivor_says_one_of: &[],
            faulty_status: Some(101),
        },
        Case {
            fault: "rank=1,step=1,kind=exit",
            faulty: 1,
            struck: "injected fault: rank 1 after step 1",
            survivor_says: &["rank 1 disconnected before it was done"],
            survivor_says_one_of: &[],
            faulty_status: Some(parallax::parallel::fault::EXIT_STATUS),
        },
        Case {
            fault: Box::leak(stall.into_boxed_str()),
            faulty: 1,
            struck: "injected fault: rank 1 after step 1: stalling",
            survivor_says: &["from rank 1", "rank 1 is lost or stuck"],
            survivor_says_one_of: &[],
            // It wakes to find rank 0 (the store) gone: an error too.
            faulty_status: Some(1),
        },
        // Rank 0 serves the store: when its process goes, rank 1 must say that it was rank 0.
        Case {
            fault: "rank=0,step=1,kind=exit",
            faulty: 0,
            struck: "injected fault: rank 0 after step 1",
            survivor_says: &["rank 0, whose process serves the store, has exited"],
            survivor_says_one_of: &[],
            faulty_status: Some(parallax::parallel::fault::EXIT_STATUS),
        },
        // A rank 0 that fails (rather than vanishing) drops its own connection first: its store,
        // still up for a moment, may say so before the process ends.
        Case {
            fault: "rank=0,step=2,kind=fail",
            faulty: 0,
            struck: "injected fault: rank 0 after step 2",
            survivor_says: &[],
            survivor_says_one_of: &[
                "rank 0, whose process serves the store, has exited",
                "rank 0 disconnected before it was done",
            ],
            faulty_status: Some(1),
        },
    ];
    let mut report = Vec::new();
    for c in &cases {
        let (w0, w1, secs) = pair(&init, Some(c.fault), &out);
        let (faulty, survivor) = if c.faulty == 0 {
            (&w0, &w1)
        } else {
            (&w1, &w0)
        };
        let (ft, st) = (faulty.text(), survivor.text());
        // Both fail, the survivor with an error (not a panic) naming the faulty rank.
        assert!(
            !survivor.status().success(),
            "{}: survivor succeeded:\n{st}",
            c.fault
        );
        assert!(
            !faulty.status().success(),
            "{}: faulty rank succeeded:\n{ft}",
            c.fault
        );
        if let Some(code) = c.faulty_status {
            assert_eq!(faulty.status().code(), Some(code), "{}:\n{ft}", c.fault);
        }
        let error = st
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_else(|| panic!("{}: no error line from the survivor:\n{st}", c.fault));
        for needle in c.survivor_says {
            assert!(
                error.contains(needle),
                "{}: `{needle}` not in: {error}",
                c.fault
            );
        }
        assert!(
            c.survivor_says_one_of.is_empty()
                || c.survivor_says_one_of.iter().any(|n| error.contains(n)),
            "{}: none of {:?} in: {error}",
            c.fault,
            c.survivor_says_one_of
        );
        assert!(
            !st.contains("panicked"),
            "{}: the survivor panicked:\n{st}",
            c.fault
        );
        // Time to detect: from the fault striking (as the faulty rank's stderr shows it, or its
        // exit, whichever came first) to the survivor's error.
        let struck = faulty
            .first(c.struck)
            .into_iter()
            .chain([faulty.exited_at()])
            .min()
            .expect("a time");
        let said = survivor.first("error:").expect("the error line");
        let detect = said.saturating_duration_since(struck).as_secs_f64();
        assert!(
            detect < HANG_GUARD.as_secs_f64(),
            "{}: {detect:.1} s",
            c.fault
        );
        eprintln!(
            "{}: rank {} named in {detect:.2} s (pair ended in {secs:.2} s; exit status {:?}): {error}",
            c.fault,
            c.faulty,
            faulty.status().code()
        );
        report.push((c.fault, detect));
        // Nothing where the image was to go: neither the image nor a temporary file.
        assert_eq!(files(dir.path()), Vec::<PathBuf>::new(), "{}", c.fault);

        // A fresh pair on the same address makes the same image.
        let (a, b, secs) = pair(&init, None, &out);
        assert!(
            a.status().success(),
            "{} then rank 0: {}",
            c.fault,
            a.text()
        );
        assert!(
            b.status().success(),
            "{} then rank 1: {}",
            c.fault,
            b.text()
        );
        let (img, _) = parallax::pipeline::image::read_png(&out).expect("the next image");
        assert_eq!(img, good, "{}: the next image differs", c.fault);
        eprintln!("  then a fresh pair made the image in {secs:.2} s");
        std::fs::remove_file(&out).expect("rm");
    }

    // A write that fails on rank 0 (a full disk): the run fails saying so and leaves nothing,
    // not even the temporary file.
    let (w0, w1, _) = pair(&init, Some("kind=write"), &out);
    let t = w0.text();
    assert!(!w0.status().success(), "{t}");
    assert!(t.contains("injected write fault"), "{t}");
    // Rank 1 has nothing to write: it succeeds, unless rank 0 (the store) was gone before it
    // said it was done, which it then says.
    let t1 = w1.text();
    assert!(
        w1.status().success() || t1.contains("rank 0, whose process serves the store"),
        "rank 1: {t1}"
    );
    assert_eq!(files(dir.path()), Vec::<PathBuf>::new());
    eprintln!("detection times: {report:?}");
}

/// Ranks started for different jobs: every rank fails at once (long before any timeout), its
/// error naming the field and both values; nothing is written.
#[test]
fn ranks_started_for_different_jobs_fail_at_once_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("image.png");
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("--seed", "6")],
            r#"seed is "5" on rank 0 and "6" on rank 1"#,
        ),
        (&[("--prompt", "a green square")], "prompt is"),
        (
            &[("--steps", "3")],
            r#"steps is "4" on rank 0 and "3" on rank 1"#,
        ),
        (&[("--model", "random:schnell")], "model is"),
        (&[("--ring", ""), ("--ulysses", "2")], "layout is"),
        (&[("--negative-prompt", "blur")], "negative prompt is"),
        (&[("--width", "128")], "width is"),
    ];
    for (over, says) in cases {
        let what = format!("{over:?}");
        let init = free_init();
        let t0 = Instant::now();
        let [a, b] = wait_all(
            [
                Worker::start(0, &init, &[], &[], &out),
                Worker::start(1, &init, over, &[], &out),
            ],
            &what,
        );
        let secs = t0.elapsed().as_secs_f64();
        for w in [&a, &b] {
            assert!(!w.status().success(), "{what}: {}", w.text());
            let e = error_line(w, &what);
            assert!(
                e.contains(says) && e.contains("different jobs"),
                "{what}: {e}"
            );
        }
        eprintln!(
            "{what}: both ranks refused in {secs:.2} s: {}",
            error_line(&a, &what)
        );
        assert_eq!(files(dir.path()), Vec::<PathBuf>::new(), "{what}");
    }
}

/// Hangs that are bounded now: a rank started with another --world (rank 0 fails at once), a
/// rank stuck loading the model (the others name it after --load-timeout).
#[test]
fn a_world_mismatch_and_a_rank_stuck_loading_end_in_bounded_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("image.png");
    let init = free_init();
    let [a, b, c] = wait_all(
        [
            Worker::start(0, &init, &[], &[], &out),
            Worker::start(1, &init, &[("--world", "3")], &[], &out),
            Worker::start(2, &init, &[("--world", "3")], &[], &out),
        ],
        "world 2 against 3",
    );
    for w in [&a, &b, &c] {
        assert!(!w.status().success(), "{}", w.text());
    }
    let e = error_line(&a, "rank 0");
    assert!(e.contains("--world 3, rank 0 with --world 2"), "{e}");
    eprintln!("world 2 against 3: {e}");

    let init = free_init();
    let stall = [("PARALLAX_FAULT", "rank=1,step=load,kind=stall:10")];
    let t0 = Instant::now();
    let [a, _b] = wait_all(
        [
            Worker::start(0, &init, &[("--load-timeout", "2")], &stall, &out),
            Worker::start(1, &init, &[("--load-timeout", "2")], &stall, &out),
        ],
        "stuck loading",
    );
    let e = error_line(&a, "stuck loading");
    assert!(
        e.contains("rank 0")
            && e.contains("load the model")
            && e.contains("rank 1 is lost or stuck"),
        "{e}"
    );
    let secs = a.exited_at().duration_since(t0).as_secs_f64();
    eprintln!("a rank stuck loading: rank 0 failed in {secs:.2} s: {e}");
}

/// What a careless user types is refused before any work, with a clear error and no panic:
/// --timeout 0, an out-of-range PARALLAX_COLLECTIVE_TIMEOUT_S (in `worker` and `generate`), an
/// output that is not a PNG or whose folder is missing.
#[test]
fn bad_timeouts_and_outputs_are_refused_before_any_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("image.png");
    let init = free_init();
    let one = |over: &[(&str, &str)], env: &[(&str, &str)], out: &Path| {
        let [w] = wait_all(
            [Worker::start(0, &init, over, env, out)],
            &format!("{over:?} {env:?}"),
        );
        assert!(!w.status().success(), "{}", w.text());
        assert!(!w.text().contains("panicked"), "{}", w.text());
        w.text()
    };
    let t = one(&[("--timeout", "0")], &[], &out);
    assert!(
        t.contains("--timeout") && t.contains("0 is not in 1..=86400"),
        "{t}"
    );
    for bad in ["1e300", "-1", "NaN", "soon", "0"] {
        let env = [("PARALLAX_COLLECTIVE_TIMEOUT_S", bad)];
        let t = one(&[], &env, &out);
        assert!(
            t.contains("PARALLAX_COLLECTIVE_TIMEOUT_S") && t.contains("at most 86400"),
            "{bad}: {t}"
        );
        let g = Command::new(env!("CARGO_BIN_EXE_parallax"))
            .args([
                "generate", "--model", "demo", "--steps", "1", "--width", "64", "--height", "64",
            ])
            .arg("--out")
            .arg(&out)
            .env("PARALLAX_COLLECTIVE_TIMEOUT_S", bad)
            .output()
            .expect("generate");
        let gt = String::from_utf8_lossy(&g.stderr);
        assert!(
            !g.status.success() && !gt.contains("panicked"),
            "{bad}: {gt}"
        );
        assert!(gt.contains("PARALLAX_COLLECTIVE_TIMEOUT_S"), "{bad}: {gt}");
    }
    let t = one(&[], &[], &dir.path().join("x.gif"));
    assert!(t.contains("png, jpg (jpeg) or webp"), "{t}");
    let t = one(&[], &[], &dir.path().join("missing").join("x.png"));
    assert!(t.contains("does not exist"), "{t}");
    assert_eq!(files(dir.path()), Vec::<PathBuf>::new());
}

/// A rank with the wrong token is refused (without reaching the job), rank 0 keeps serving,
/// and the right rank 1 then makes the image with it.
#[test]
fn a_rank_without_the_token_is_refused_and_rank_0_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("image.png");
    let init = free_init();
    let token = [("PARALLAX_WORKER_TOKEN", "the job's token, 0123456789")];
    let mut zero = Worker::start(0, &init, &[], &token, &out);
    let wrong = [("PARALLAX_WORKER_TOKEN", "a stranger's guess, 0123456789")];
    let [stranger] = wait_all([Worker::start(1, &init, &[], &wrong, &out)], "stranger");
    let e = error_line(&stranger, "stranger");
    assert!(e.contains("failed authentication"), "{e}");
    assert!(!zero.poll(), "rank 0 gave up: {}", zero.text());
    let [zero, one] = wait_all(
        [zero, Worker::start(1, &init, &[], &token, &out)],
        "the right rank 1",
    );
    assert!(zero.status().success(), "{}", zero.text());
    assert!(one.status().success(), "{}", one.text());
    assert!(out.is_file());
}

/// Workers started as torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
/// MASTER_PORT; no --rank, --world or --init) and as srun does (SLURM_PROCID, SLURM_NTASKS,
/// SLURM_LOCALID, SLURM_JOB_NODELIST, MASTER_PORT) make the image.
#[test]
fn workers_start_from_torchrun_and_slurm_environments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("image.png");
    for launcher in ["torchrun", "slurm"] {
        let port = free_init().rsplit(':').next().expect("port").to_string();
        let envs: Vec<Vec<(&str, String)>> = (0..2)
            .map(|r| match launcher {
                "torchrun" => vec![
                    ("RANK", r.to_string()),
                    ("WORLD_SIZE", "2".into()),
                    ("LOCAL_RANK", r.to_string()),
                    ("MASTER_ADDR", "127.0.0.1".into()),
                    ("MASTER_PORT", port.clone()),
                ],
                _ => vec![
                    ("SLURM_PROCID", r.to_string()),
                    ("SLURM_NTASKS", "2".into()),
                    ("SLURM_LOCALID", r.to_string()),
                    ("SLURM_JOB_NODELIST", "localhost".into()),
                    ("MASTER_PORT", port.clone()),
                ],
            })
            .collect();
        let start = |r: usize| {
            let env: Vec<(&str, &str)> = envs[r].iter().map(|(k, v)| (*k, v.as_str())).collect();
            Worker::start(r, "", &[("--world", "")], &env, &out)
        };
        let [a, b] = wait_all([start(0), start(1)], launcher);
        assert!(a.status().success(), "{launcher} rank 0: {}", a.text());
        assert!(b.status().success(), "{launcher} rank 1: {}", b.text());
        assert!(out.is_file(), "{launcher}");
        std::fs::remove_file(&out).expect("rm");
    }
}
