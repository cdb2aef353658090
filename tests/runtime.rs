//! The runtime behind the studio, on the demo model: event order, previews, gallery, cancel,
//! failures that leave it running, compare sweeps, model (re)loading.

use std::time::Duration;

use candle_core::Device;
use parallax::engine::{Degrees, Devices, LayoutChoice, Placement};
use parallax::pipeline::{GenerateRequest, Pipeline};
use parallax::runtime::{EngineSpec, Event, JobId, JobSpec, Runtime, RuntimeOptions};

/// `devices` with `--dp dp` (ring takes the rest), or auto without.
fn placement(devices: &str, dp: Option<usize>) -> Placement {
    Placement {
        devices: Devices::parse(devices).expect("device list"),
        layout: match dp {
            None => LayoutChoice::Auto,
            Some(dp) => LayoutChoice::Degrees(Degrees {
                dp: Some(dp),
                ..Degrees::default()
            }),
        },
    }
}

fn req(steps: usize, threshold: f64) -> GenerateRequest {
    GenerateRequest {
        prompt: "a red fox in snow".into(),
        width: 64,
        height: 48,
        steps: Some(steps),
        seed: 11,
        cache_threshold: threshold,
        ..GenerateRequest::default()
    }
}

fn start(gallery: Option<&std::path::Path>) -> Runtime {
    Runtime::start(RuntimeOptions {
        engine: EngineSpec::default(),
        gallery_dir: gallery.map(|p| p.to_path_buf()),
        notify: None,
    })
    .expect("runtime starts")
}

/// Every event until `job` ends (events of other jobs and model events included).
fn until_done(rt: &Runtime, job: JobId) -> Vec<Event> {
    let mut out = Vec::new();
    loop {
        let ev = rt
            .recv_timeout(Duration::from_secs(120))
            .expect("an event within two minutes");
        let end = ev.job() == Some(job) && ev.is_terminal();
        out.push(ev);
        if end {
            return out;
        }
    }
}

/// The first image among `events`.
fn image_done(events: &[Event]) -> std::sync::Arc<parallax::runtime::ImageResult> {
    events
        .iter()
        .find_map(|e| match e {
            Event::ImageDone { result, .. } => Some(result.clone()),
            _ => None,
        })
        .expect("an image")
}

#[test]
fn a_job_streams_steps_with_previews_and_lands_in_the_gallery() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = start(Some(dir.path()));
    let job = rt.submit(JobSpec::Generate(req(3, 0.0)));
    let events = until_done(&rt, job);

    let names: Vec<&str> = events
        .iter()
        .map(|e| match e {
            Event::ModelLoading { .. } => "loading",
            Event::ModelLoaded { .. } => "loaded",
            Event::PreviewFactors(_) => "factors",
            Event::Queued { .. } => "queued",
            Event::Started { .. } => "started",
            Event::TextEncoded { .. } => "text",
            Event::Step { .. } => "step",
            Event::ImageDone { .. } => "image",
            Event::Finished { .. } => "finished",
            _ => "other",
        })
        .collect();
    assert_eq!(
        names,
        [
            "queued", "loading", "loaded", "factors", "started", "text", "step", "step", "step",
            "image", "finished"
        ],
    );
    let steps: Vec<(usize, usize)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Step {
                step,
                total,
                preview,
                ..
            } => {
                assert_eq!(
                    (preview.width, preview.height, preview.data.len()),
                    (8, 6, 16 * 8 * 6)
                );
                Some((*step, *total))
            }
            _ => None,
        })
        .collect();
    assert_eq!(steps, [(1, 3), (2, 3), (3, 3)]);

    // The image equals a direct generation, and the gallery holds it with its settings.
    let direct = Pipeline::demo(&Device::Cpu)
        .expect("demo")
        .generate(&req(3, 0.0), &mut |_| Ok(()))
        .expect("direct");
    let result = image_done(&events);
    assert_eq!(result.generated.image, direct.image);
    let saved = result.saved.clone().expect("saved to the gallery");
    let gallery = rt.gallery().expect("gallery");
    let entries = gallery.list().expect("list");
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].path, saved);
    assert_eq!(entries[0].settings, direct.settings);
    assert_eq!(gallery.image(&entries[0]).expect("read back"), direct.image);
    gallery.delete(&saved).expect("delete");
    assert!(gallery.list().expect("list").is_empty());
}

#[test]
fn cancel_stops_a_running_job_and_drops_a_queued_one() {
    let rt = start(None);
    let running = rt.submit(JobSpec::Generate(req(40, 0.0)));
    let queued = rt.submit(JobSpec::Generate(req(2, 0.0)));
    // Wait for the first step of the running job, then cancel both.
    loop {
        let ev = rt.recv_timeout(Duration::from_secs(120)).expect("event");
        if matches!(ev, Event::Step { job, .. } if job == running) {
            break;
        }
    }
    rt.cancel(queued);
    rt.cancel(running);
    let mut cancelled = Vec::new();
    let mut steps_after = 0;
    while cancelled.len() < 2 {
        match rt.recv_timeout(Duration::from_secs(120)).expect("event") {
            Event::Cancelled { job } => cancelled.push(job),
            Event::Step { .. } => steps_after += 1,
            Event::ImageDone { .. } | Event::Finished { .. } => panic!("a cancelled job finished"),
            _ => {}
        }
    }
    cancelled.sort();
    assert_eq!(cancelled, [running, queued]);
    assert!(
        steps_after < 39,
        "cancel must stop within a step or so, saw {steps_after} more steps"
    );
    // The runtime is still up.
    let next = rt.submit(JobSpec::Generate(req(1, 0.0)));
    assert!(matches!(
        until_done(&rt, next).last(),
        Some(Event::Finished { .. })
    ));
}

#[test]
fn a_failed_job_says_why_and_the_runtime_stays_up() {
    let rt = start(None);
    let bad = rt.submit(JobSpec::Generate(GenerateRequest {
        width: 70,
        ..req(2, 0.0)
    }));
    match until_done(&rt, bad).last() {
        Some(Event::Failed { error, .. }) => assert!(error.contains("70"), "{error}"),
        other => panic!("expected a failure, got {other:?}"),
    }
    let good = rt.submit(JobSpec::Generate(req(1, 0.0)));
    assert!(matches!(
        until_done(&rt, good).last(),
        Some(Event::Finished { .. })
    ));
}

#[test]
fn compare_sweep_measures_each_threshold_against_the_uncached_image() {
    let rt = start(None);
    let job = rt.submit(JobSpec::Compare {
        base: req(6, 0.0),
        thresholds: vec![0.12, 5.0],
        caches: vec![],
        repeats: 3,
        lora_strengths: Vec::new(),
    });
    let events = until_done(&rt, job);
    // Rounds 2 and 3 time every cell again, each starting one cell further on; then every
    // cell's timings arrive, with a ratio per round and the same image in every round.
    let rounds: Vec<(usize, usize)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Timing { round, image, .. } => Some((*round, *image)),
            _ => None,
        })
        .collect();
    assert_eq!(rounds, [(2, 1), (2, 2), (2, 0), (3, 2), (3, 0), (3, 1)]);
    let timed: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Timed { image, timing, .. } => Some((*image, timing.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(timed.iter().map(|t| t.0).collect::<Vec<_>>(), [0, 1, 2]);
    for (i, t) in &timed {
        assert_eq!(t.wall_ms.len(), 3, "cell {i}");
        assert!(
            t.identical,
            "cell {i}: every round makes the first round's image"
        );
        match t.speedup() {
            None => assert_eq!(*i, 0, "only the reference has no speed-up"),
            Some(s) => {
                assert_eq!(t.speedups.len(), 3);
                assert!(s.min <= s.median && s.median <= s.max, "{s:?}");
            }
        }
    }
    let images: Vec<_> = events
        .into_iter()
        .filter_map(|e| match e {
            Event::ImageDone { image, result, .. } => Some((image, result)),
            _ => None,
        })
        .collect();
    assert_eq!(images.len(), 3);
    let thresholds: Vec<f64> = images
        .iter()
        .map(|(_, r)| r.generated.settings.cache_threshold)
        .collect();
    assert_eq!(thresholds, [0.0, 0.12, 5.0]);
    assert!(images[0].1.quality.is_none() && images[0].1.speedup.is_none());
    for (_, r) in &images[1..] {
        let q = r.quality.expect("quality vs reference");
        assert!(q.ssim <= 1.0 && q.psnr_db > 0.0);
        assert!(r.speedup.expect("speedup") > 0.0);
    }
    // Threshold 5 reuses every step after the first (the demo's residuals always pass), so it
    // differs from the reference; the reference is the plain uncached image.
    let huge = &images[2].1;
    assert!(huge.generated.stats.reused > 0);
    assert!(huge.quality.expect("quality").psnr_db.is_finite());
    let direct = Pipeline::demo(&Device::Cpu)
        .expect("demo")
        .generate(&req(6, 0.0), &mut |_| Ok(()))
        .expect("direct");
    assert_eq!(images[0].1.generated.image, direct.image);
}

#[test]
fn models_load_once_and_bad_models_are_reported() {
    let rt = start(None);
    rt.configure(EngineSpec {
        model: "/no/such/model.safetensors".into(),
        ..EngineSpec::default()
    });
    let failed = loop {
        match rt.recv_timeout(Duration::from_secs(60)).expect("event") {
            Event::ModelFailed { error, .. } => break error,
            Event::ModelLoaded { .. } => panic!("a missing file loaded"),
            _ => {}
        }
    };
    assert!(failed.contains("no/such"), "{failed}");
    rt.configure(EngineSpec::default());
    rt.configure(EngineSpec::new("demo", placement("cpu:2", None))); // placement only: no reload
    let job = rt.submit(JobSpec::Generate(req(1, 0.0)));
    let events = until_done(&rt, job);
    let loads = events
        .iter()
        .filter(|e| matches!(e, Event::ModelLoading { .. }))
        .count();
    assert_eq!(
        loads, 1,
        "one load for the demo, none for the worker change"
    );
    let started = events
        .iter()
        .find_map(|e| match e {
            Event::Started { layout, .. } => Some(layout.clone()),
            _ => None,
        })
        .expect("started");
    assert!(started.starts_with("2 workers"), "{started}");
}

/// With a data-parallel layout a compare sweep runs its images at once on separate worker
/// groups; the images equal the one-after-another sweep's.
#[test]
fn compare_sweep_over_data_parallel_groups_equals_the_sequential_one() {
    let sweep = JobSpec::Compare {
        base: req(4, 0.0),
        thresholds: vec![5.0],
        // Other policies in the same sweep: each data-parallel group runs its own.
        caches: vec![
            "dbcache:f=1,b=1,t=5,taylor=1".parse().expect("spec"),
            "taylorseer:n=2,order=1,warmup=1".parse().expect("spec"),
        ],
        repeats: 2,
        lora_strengths: Vec::new(),
    };
    let images = |rt: &Runtime| -> Vec<parallax::pipeline::image::RgbImage> {
        let job = rt.submit(sweep.clone());
        until_done(rt, job)
            .into_iter()
            .filter_map(|e| match e {
                Event::ImageDone { result, .. } => Some(result.generated.image.clone()),
                _ => None,
            })
            .collect()
    };
    let one = start(None);
    let sequential = images(&one);
    let dp = start(None);
    dp.configure(EngineSpec::new("demo", placement("cpu:2", Some(2))));
    let parallel = images(&dp);
    assert_eq!(
        sequential.len(),
        4,
        "reference, threshold 5, DBCache, TaylorSeer"
    );
    assert_eq!(sequential, parallel);
}

/// The studio's way in: a job queued with a model from files that is not loaded yet loads it as
/// it starts, its prompt encoded while the transformer loads (issue 30's cold start), and draws
/// the image of a plain load.
#[test]
fn a_job_queued_on_a_model_from_files_loads_it_with_its_prompt_encoded_alongside() {
    use parallax::model::export::{write_demo_model, DemoSource, ExportLayout};
    let dir = tempfile::tempdir().expect("tmp");
    write_demo_model(dir.path(), ExportLayout::Bfl, DemoSource::Trained).expect("export");
    let model = dir.path().to_str().expect("utf8").to_string();
    let rt = start(None);
    let job = rt.submit_on(
        JobSpec::Generate(req(2, 0.0)),
        EngineSpec::new(model.as_str(), placement("cpu", None)),
    );
    let events = until_done(&rt, job);
    let loads = events
        .iter()
        .filter(|e| matches!(e, Event::ModelLoading { .. }))
        .count();
    assert_eq!(loads, 1, "one load, with the job");
    let result = image_done(&events);
    // Only this test loads a model from files in this binary.
    assert!(
        parallax::model::load_clock::ahead_snapshot().is_some(),
        "the prompt was encoded while the model loaded"
    );
    let plain =
        parallax::engine::load_pipeline(&parallax::engine::ModelChoice::named(model), "cpu")
            .expect("plain load");
    let direct = plain
        .generate(&req(2, 0.0), &mut |_| Ok(()))
        .expect("direct");
    assert_eq!(result.generated.image, direct.image);
}

/// Turning FP8 attention on changes the model (as a precision change does): the runtime loads it
/// again, and the next image says it ran with FP8 attention.
#[test]
fn fp8_attention_reloads_the_model() {
    let rt = start(None);
    let loads = |events: &[Event]| {
        events
            .iter()
            .filter(|e| matches!(e, Event::ModelLoading { .. }))
            .count()
    };
    let first = until_done(&rt, rt.submit(JobSpec::Generate(req(1, 0.0))));
    assert!(!image_done(&first).generated.settings.dtype.contains("fp8"));
    let mut spec = EngineSpec::default();
    spec.model.fp8_attention = true;
    rt.configure(spec);
    let events = until_done(&rt, rt.submit(JobSpec::Generate(req(1, 0.0))));
    assert_eq!(loads(&events), 1, "FP8 attention did not reload the model");
    let dtype = image_done(&events).generated.settings.dtype.clone();
    assert!(dtype.contains("fp8 attention"), "{dtype}");
}
