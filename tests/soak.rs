//! A soak of the runtime on two CPU worker ranks: a few hundred short jobs in batches, with
//! random cancels and injected rank faults (`PARALLAX_FAULT`), bounded in time. Every job ends
//! with exactly one final event, the gallery holds exactly the finished images, the runtime
//! still runs a job at the end, and the resident memory is reported (and must not run away).
//! One test function: faults are set through the environment, which the process shares.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parallax::pipeline::GenerateRequest;
use parallax::runtime::{Event, JobId, JobSpec};

fn rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<f64>().ok()? / 1024.0)
}

fn req(seed: u64) -> GenerateRequest {
    GenerateRequest {
        prompt: "a blue square on the right".into(),
        width: 32,
        height: 32,
        steps: Some(2),
        seed,
        ..GenerateRequest::default()
    }
}

#[derive(Debug, Default)]
struct Tally {
    finished: usize,
    failed: usize,
    cancelled: usize,
}

#[test]
fn a_few_hundred_jobs_with_cancels_and_faults_leave_the_runtime_whole() {
    const JOBS: usize = 240;
    const BATCH: usize = 4;
    let dir = tempfile::tempdir().expect("tempdir");
    let gallery = dir.path().join("gallery");
    let rt = common::two_rank_runtime(gallery.clone());
    std::env::set_var("PARALLAX_COLLECTIVE_TIMEOUT_S", "1");
    let started = Instant::now();
    let mut rss_after_warmup = None;
    let mut finals: HashMap<JobId, Vec<&'static str>> = HashMap::new();
    let mut tally = Tally::default();
    // A fixed pseudo-random sequence (the same soak every run).
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut seed = 0u64;
    for batch in 0..JOBS / BATCH {
        let roll = next() % 100;
        let fault = match roll {
            0..=9 => Some("rank=1,step=0,kind=fail"),
            10..=12 => Some("rank=0,step=1,kind=fail"),
            13..=14 => Some("rank=1,step=0,kind=stall:0.1"),
            _ => None,
        };
        match fault {
            Some(f) => std::env::set_var("PARALLAX_FAULT", f),
            None => std::env::remove_var("PARALLAX_FAULT"),
        }
        let jobs: Vec<JobId> = (0..BATCH)
            .map(|_| {
                seed += 1;
                rt.submit(JobSpec::Generate(req(seed)))
            })
            .collect();
        for &j in &jobs {
            finals.insert(j, Vec::new());
            if next() % 100 < 15 {
                rt.cancel(j);
            }
        }
        let mut open = jobs.len();
        while open > 0 {
            let ev = rt
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|| panic!("batch {batch}: no event for a minute"));
            let (job, what) = match &ev {
                Event::Finished { job, .. } => (*job, "finished"),
                Event::Failed { job, .. } => (*job, "failed"),
                Event::Cancelled { job } => (*job, "cancelled"),
                _ => continue,
            };
            let Some(seen) = finals.get_mut(&job) else {
                panic!("a final event for a job never submitted: {ev:?}");
            };
            seen.push(what);
            if seen.len() == 1 {
                open -= 1;
                match what {
                    "finished" => tally.finished += 1,
                    "failed" => tally.failed += 1,
                    _ => tally.cancelled += 1,
                }
            }
        }
        if batch == 0 {
            rss_after_warmup = rss_mib();
        }
    }
    std::env::remove_var("PARALLAX_FAULT");
    // Anything late (a second final event) would be here.
    while let Some(ev) = rt.recv_timeout(Duration::from_millis(300)) {
        if let Some(j) = ev.job() {
            if ev.is_terminal() {
                finals.get_mut(&j).expect("known job").push("late");
            }
        }
    }
    for (job, seen) in &finals {
        assert_eq!(seen.len(), 1, "{job:?}: final events {seen:?}");
    }
    let pngs = std::fs::read_dir(&gallery)
        .map(|d| d.filter_map(|e| e.ok()).count())
        .unwrap_or(0);
    assert_eq!(
        pngs, tally.finished,
        "the gallery holds exactly the finished images"
    );
    assert!(
        tally.failed > 0 && tally.cancelled > 0 && tally.finished > JOBS / 2,
        "{tally:?}"
    );
    // Still usable.
    let last = rt.submit(JobSpec::Generate(req(10_000)));
    loop {
        let ev = rt.recv_timeout(Duration::from_secs(60)).expect("an event");
        if ev.job() == Some(last) && ev.is_terminal() {
            assert!(matches!(ev, Event::Finished { .. }), "{ev:?}");
            break;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let (before, after) = (rss_after_warmup, rss_mib());
    eprintln!(
        "soak: {JOBS} jobs in {secs:.1} s: {tally:?}; RSS after the first batch {before:?} MiB, after all {after:?} MiB"
    );
    if let (Some(b), Some(a)) = (before, after) {
        // Flat, give or take the allocator: a leak of a job's worth per job would be far more.
        assert!(a < b * 1.5 + 64.0, "RSS grew from {b:.0} to {a:.0} MiB");
    }
    std::env::remove_var("PARALLAX_COLLECTIVE_TIMEOUT_S");
}
