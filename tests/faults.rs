//! Faults across CPU worker ranks (`PARALLAX_FAULT`, `PARALLAX_COLLECTIVE_TIMEOUT_S`): a rank
//! that fails, panics or stalls (for a while or for good) becomes an error naming it, in bounded
//! time (a rank stalled for good is left behind at the timeout), and the runtime
//! stays usable (the next job runs on the loaded model) with nothing half written in the
//! gallery. One test function: the fault is set through the environment, which every thread of
//! this process shares.

mod common;

use std::time::{Duration, Instant};

use parallax::engine::{Degrees, Devices, LayoutChoice, Placement};
use parallax::pipeline::GenerateRequest;
use parallax::runtime::{EngineSpec, Event, JobSpec, Runtime};

fn req(seed: u64) -> GenerateRequest {
    GenerateRequest {
        prompt: "a red fox in snow".into(),
        width: 64,
        height: 48,
        steps: Some(4),
        seed,
        ..GenerateRequest::default()
    }
}

/// The job's terminal event and the seconds it took.
fn run(rt: &Runtime, r: GenerateRequest) -> (Event, f64) {
    let t0 = Instant::now();
    let job = rt.submit(JobSpec::Generate(r));
    loop {
        let ev = rt
            .recv_timeout(Duration::from_secs(120))
            .expect("an event within two minutes");
        if ev.job() == Some(job) && ev.is_terminal() {
            return (ev, t0.elapsed().as_secs_f64());
        }
    }
}

fn pngs(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn failed_panicked_and_stalled_ranks_are_errors_and_the_runtime_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gallery = dir.path().join("gallery");
    let rt = common::two_rank_runtime(gallery.clone());
    // Warm up (model loaded, first image made): the baseline.
    let (ev, _) = run(&rt, req(1));
    assert!(matches!(ev, Event::Finished { .. }), "{ev:?}");
    assert_eq!(pngs(&gallery).len(), 1);

    std::env::set_var("PARALLAX_COLLECTIVE_TIMEOUT_S", "1");
    for (fault, needle) in [
        ("rank=1,step=1,kind=fail", "injected fault: rank 1"),
        // The panic is named, unless printing its backtrace outlasts the timeout: then the
        // others name rank 1 as lost first.
        ("rank=1,step=2,kind=panic", "rank 1"),
        ("rank=0,step=1,kind=stall:2.5", "rank 0 of 2 did not reach"),
        // Stalled for good: the job ends at the timeout, the thread is left behind.
        ("rank=1,step=1,kind=stall:600", "gave up on rank 1"),
        ("rank=1,step=0,kind=oom", "OUT_OF_MEMORY"),
    ] {
        std::env::set_var("PARALLAX_FAULT", fault);
        let (ev, secs) = run(&rt, req(2));
        std::env::remove_var("PARALLAX_FAULT");
        match &ev {
            Event::Failed { error, .. } => {
                assert!(error.contains(needle), "{fault}: {error}");
                // What the studio suggests next.
                let next = parallax::runtime::advice::next_step(
                    error,
                    &parallax::runtime::advice::Context {
                        width: 64,
                        height: 48,
                        workers: 2,
                        ..Default::default()
                    },
                )
                .unwrap_or_default();
                let want = if needle == "OUT_OF_MEMORY" {
                    "memory budget"
                } else {
                    "a worker was lost"
                };
                if !fault.contains("panic") || error.contains("did not reach") {
                    assert!(next.contains(want), "{fault}: advice {next:?}");
                }
            }
            other => panic!("{fault}: expected a failure, got {other:?}"),
        }
        // Bounded: a failure is known at once; a stall by the timeout, plus as long again for
        // the stalled rank to come back before it is left behind.
        assert!(secs < 10.0, "{fault}: {secs:.1} s");
        if fault.contains("stall:600") {
            // Accounted for: the stalled thread is listed as still running.
            let left = parallax::parallel::abandoned::still_running();
            assert!(left.iter().any(|a| a.rank == 1), "{left:?}");
        }
        eprintln!("{fault}: failed in {secs:.2} s: {ev:?}");
        // Nothing was added to the gallery, and the next job runs on the loaded model.
        assert_eq!(pngs(&gallery).len(), 1, "{fault}");
        let (ev, _) = run(&rt, req(3));
        assert!(matches!(ev, Event::Finished { .. }), "{fault}: then {ev:?}");
        assert_eq!(pngs(&gallery).len(), 2, "{fault}");
        std::fs::remove_file(pngs(&gallery).pop().expect("the new image")).expect("rm");
    }
    std::env::remove_var("PARALLAX_COLLECTIVE_TIMEOUT_S");

    // A write that fails (a full disk): the image is made, not saved, the job says so, and
    // nothing is left in the gallery folder, not even the temporary file.
    std::env::set_var("PARALLAX_FAULT", "kind=write");
    let t0 = Instant::now();
    let job = rt.submit(JobSpec::Generate(req(4)));
    let mut notes = Vec::new();
    loop {
        let ev = rt.recv_timeout(Duration::from_secs(120)).expect("an event");
        if let Event::ImageDone { result, .. } = &ev {
            notes.extend(result.notes.iter().cloned());
        }
        if ev.job() == Some(job) && ev.is_terminal() {
            break;
        }
    }
    std::env::remove_var("PARALLAX_FAULT");
    assert!(
        notes
            .iter()
            .any(|n| n.contains("not saved") && n.contains("injected write fault")),
        "{notes:?}"
    );
    let left: Vec<_> = std::fs::read_dir(&gallery)
        .expect("gallery")
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    assert_eq!(left.len(), 1, "only the first image: {left:?}");
    eprintln!(
        "write fault: reported in {:.2} s",
        t0.elapsed().as_secs_f64()
    );

    // The same under PipeFusion (two stages passing patches point to point): a stage that fails
    // or stalls is named in bounded time, and the next job runs.
    rt.configure(EngineSpec::new(
        "demo",
        Placement {
            devices: Devices::parse("cpu:2").expect("devices"),
            layout: LayoutChoice::Degrees(Degrees {
                pipefusion: Some(2),
                ..Degrees::default()
            }),
        },
    ));
    let (ev, _) = run(&rt, req(5));
    assert!(matches!(ev, Event::Finished { .. }), "pipefusion: {ev:?}");
    let before = pngs(&gallery).len();
    std::env::set_var("PARALLAX_COLLECTIVE_TIMEOUT_S", "1");
    for (fault, needle) in [
        ("rank=1,step=1,kind=fail", "injected fault: rank 1"),
        ("rank=0,step=1,kind=stall:2.5", "rank 0"),
        ("rank=0,step=1,kind=stall:600", "gave up on rank 0"),
    ] {
        std::env::set_var("PARALLAX_FAULT", fault);
        let (ev, secs) = run(&rt, req(6));
        std::env::remove_var("PARALLAX_FAULT");
        match &ev {
            Event::Failed { error, .. } => assert!(error.contains(needle), "{fault}: {error}"),
            other => panic!("pipefusion, {fault}: expected a failure, got {other:?}"),
        }
        assert!(secs < 10.0, "pipefusion, {fault}: {secs:.1} s");
        eprintln!("pipefusion, {fault}: failed in {secs:.2} s");
        assert_eq!(pngs(&gallery).len(), before, "{fault}");
        let (ev, _) = run(&rt, req(7));
        assert!(matches!(ev, Event::Finished { .. }), "{fault}: then {ev:?}");
        std::fs::remove_file(pngs(&gallery).pop().expect("the new image")).expect("rm");
    }
    std::env::remove_var("PARALLAX_COLLECTIVE_TIMEOUT_S");
}
