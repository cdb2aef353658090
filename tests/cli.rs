//! The `parallax` binary: generate, bench, info and export-demo, and clean failures on bad input.

mod common;

use common::free_init;
use std::path::Path;
use std::process::{Command, Output};

use parallax::pipeline::image::read_png;
use parallax::pipeline::GenerationSettings;

fn parallax(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_parallax"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run parallax")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Two `parallax worker` processes (`--world 2`) meeting at `init` with `args`: both must
/// succeed, and only rank 0 writes its image, to `out`.
fn two_workers(init: &str, args: &[&str], out: &Path) {
    let unused = out.with_file_name("rank1-unused.png");
    let spawn = |rank: &str, out: &Path| {
        let mut all = vec!["worker", "--rank", rank, "--world", "2", "--init", init];
        all.extend(args.iter().copied());
        all.extend(["--out", s(out)]);
        Command::new(env!("CARGO_BIN_EXE_parallax"))
            .args(&all)
            .output()
    };
    let (r0, r1) = std::thread::scope(|sc| {
        let h1 = sc.spawn(|| spawn("1", &unused));
        let h0 = sc.spawn(|| spawn("0", out));
        (h0.join().expect("rank 0"), h1.join().expect("rank 1"))
    });
    let (r0, r1) = (r0.expect("run rank 0"), r1.expect("run rank 1"));
    assert!(r0.status.success(), "rank 0: {}", text(&r0));
    assert!(r1.status.success(), "rank 1: {}", text(&r1));
    assert!(!unused.exists(), "only rank 0 writes");
}

/// `generate --prompt x` with `args` fails with an error naming `needle`, without a panic, and
/// writes no image.
fn refuses(dir: &Path, args: &[&str], needle: &str) {
    let out = dir.join("refused.png");
    let mut all = vec!["generate", "--prompt", "x", "--quiet", "--out", s(&out)];
    all.extend(args.iter().copied());
    let o = parallax(&all);
    assert!(!o.status.success(), "{args:?} should fail");
    let msg = text(&o);
    assert!(
        msg.contains("error:") && msg.contains(needle),
        "{args:?}: {msg}"
    );
    assert!(!msg.contains("panicked"), "{msg}");
    let written: Vec<_> = std::fs::read_dir(dir)
        .expect("dir")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("refused"))
        .collect();
    assert!(written.is_empty(), "{args:?} wrote {written:?}");
}

#[test]
fn generate_writes_a_png_with_its_settings() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("fox.png");
    let o = parallax(&[
        "generate",
        "--model",
        "demo",
        "--prompt",
        "a fox",
        "--width",
        "64",
        "--height",
        "32",
        "--steps",
        "3",
        "--seed",
        "5",
        "--cache-threshold",
        "0.5",
        "--quiet",
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("DEMO"),
        "the demo is announced: {}",
        text(&o)
    );
    let (img, chunks) = read_png(&out).expect("png");
    assert_eq!((img.width, img.height), (64, 32));
    let settings = GenerationSettings::from_png_text(&chunks).expect("settings");
    assert_eq!(settings.prompt, "a fox");
    assert_eq!(settings.seed, 5);
    assert_eq!(settings.steps, 3);
    assert_eq!(settings.cache_threshold, 0.5);
    assert_eq!(settings.model, "demo");
}

#[test]
fn bad_input_fails_cleanly_and_writes_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    for (args, needle) in [
        (vec!["--width", "100"], "width"),
        (vec!["--steps", "0"], "steps"),
        (vec!["--cache-threshold", "-1"], "cache-threshold"),
        (
            vec!["--model", "/no/such/model.safetensors"],
            "no such file",
        ),
        (vec!["--device", "tpu"], "unknown device"),
    ] {
        refuses(dir.path(), &args, needle);
    }
    // Nothing half-written either.
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
}

#[test]
fn bench_prints_json_with_step_times_and_memory() {
    let o = parallax(&[
        "bench", "--model", "demo", "--width", "32", "--height", "32", "--steps", "2", "--runs",
        "2", "--warmup", "0",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json on stdout");
    assert_eq!(v["demo"], true);
    assert_eq!(v["steps"], 2);
    assert_eq!(v["runs"], 2);
    assert!(v["step_ms"]["median"].as_f64().expect("median") > 0.0);
    assert_eq!(v["total_ms"]["all"].as_array().expect("all").len(), 2);
    assert_eq!(v["cache_steps"]["computed"], 2);
    assert_eq!(v["cache"], "none");
    if cfg!(target_os = "linux") {
        assert!(v["peak_rss_mib"].as_f64().expect("rss") > 1.0);
    }
}

#[test]
fn export_demo_then_info_and_generate_from_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let model = dir.path().join("flux-demo");
    let o = parallax(&["export-demo", "--layout", "bfl", s(&model)]);
    assert!(o.status.success(), "{}", text(&o));
    let o = parallax(&["info", "--model", s(&model)]);
    assert!(o.status.success(), "{}", text(&o));
    let info = text(&o);
    assert!(info.contains("Bfl"), "{info}");
    assert!(info.contains("demo model"), "{info}");
    assert!(info.contains("text_encoder_2/: found"), "{info}");
    let out = dir.path().join("x.png");
    let o = parallax(&[
        "generate",
        "--model",
        s(&model),
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        "2",
        "--seed",
        "1",
        "--quiet",
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(out.is_file());
    // Exporting into a non-empty folder is refused.
    let o = parallax(&["export-demo", s(&model)]);
    assert!(!o.status.success());
    assert!(text(&o).contains("not empty"), "{}", text(&o));
}

#[test]
fn cpu_worker_threads_generate_and_bad_layouts_are_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("p.png");
    let o = parallax(&[
        "generate",
        "--devices",
        "cpu:4",
        "--parallel",
        "auto",
        "--prompt",
        "a fox",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--seed",
        "3",
        "--quiet",
        "--out",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("ring 2 x ulysses 2"), "{}", text(&o));
    assert!(out.is_file());
    for (args, needle) in [
        (vec!["--devices", "cpu:3", "--ulysses", "3"], "must divide"),
        (
            vec!["--devices", "cpu:4", "--ulysses", "2", "--ring", "1"],
            "multiply to the device count",
        ),
        (
            vec!["--devices", "cpu:2", "--cfg", "2"],
            "--negative-prompt",
        ),
        (vec!["--ulysses", "2"], "need --devices"),
        (vec!["--devices", "gpu:2"], "cpu:N"),
        (vec!["--devices", "cuda:0,0"], "named twice"),
        (vec!["--devices", "cuda:x"], "not a GPU number"),
    ] {
        refuses(dir.path(), &args, needle);
    }
}

/// Two `parallax worker` processes meeting at a TCP rendezvous make the same image as the same
/// layout on two in-process worker threads (bit for bit: reductions run in rank order on both).
#[test]
fn two_worker_processes_equal_two_worker_threads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let init = free_init();
    let common = [
        "--model",
        "demo",
        "--prompt",
        "two processes",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "3",
        "--seed",
        "5",
        "--ulysses",
        "2",
    ];
    let multi = dir.path().join("multi.png");
    two_workers(&init, &common, &multi);

    let threads = dir.path().join("threads.png");
    let mut args = vec![
        "generate",
        "--devices",
        "cpu:2",
        "--quiet",
        "--out",
        s(&threads),
    ];
    args.extend(common);
    let o = parallax(&args);
    assert!(o.status.success(), "{}", text(&o));
    let (a, _) = parallax::pipeline::image::read_png(&multi).expect("multi-process image");
    let (b, _) = parallax::pipeline::image::read_png(&threads).expect("threads image");
    assert_eq!(a, b);

    // A rank outside the world is refused before anything is loaded.
    let o = parallax(&[
        "worker", "--rank", "2", "--world", "2", "--init", &init, "--model", "demo",
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("below --world 2"), "{}", text(&o));

    // A rank that never starts is named once the rendezvous timeout passes, instead of rank 0
    // waiting for ever.
    let o = parallax(&[
        "worker",
        "--rank",
        "0",
        "--world",
        "2",
        "--init",
        &free_init(),
        "--timeout",
        "1",
        "--model",
        "demo",
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("waiting for rank 1 of 2 to join"),
        "{}",
        text(&o)
    );
}

/// A size whose token count does not divide over the workers (48 x 80 px: 15 image tokens over
/// 2 ranks; 10 latent rows decoded in bands of 5) makes the single-worker image, on worker
/// threads and on worker processes alike.
#[test]
fn uneven_token_counts_match_one_worker_on_threads_and_processes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let common = [
        "--model",
        "demo",
        "--prompt",
        "an odd size",
        "--width",
        "48",
        "--height",
        "80",
        "--steps",
        "3",
        "--seed",
        "9",
    ];
    let run = |name: &str, extra: &[&str]| {
        let out = dir.path().join(name);
        let mut args = vec!["generate", "--quiet", "--out", s(&out)];
        args.extend(common);
        args.extend(extra.iter().copied());
        let o = parallax(&args);
        assert!(o.status.success(), "{extra:?}: {}", text(&o));
        read_png(&out).expect("png").0
    };
    let one = run("one.png", &[]);
    let threads = run("threads.png", &["--devices", "cpu:2", "--ring", "2"]);
    assert_eq!((threads.width, threads.height), (48, 80));
    let worst = one
        .data
        .iter()
        .zip(&threads.data)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(255);
    assert!(worst <= 1, "threads differ from one worker by {worst}");

    let multi = dir.path().join("multi.png");
    let mut args = common.to_vec();
    args.extend(["--ring", "2"]);
    two_workers(&free_init(), &args, &multi);
    let (processes, _) = read_png(&multi).expect("multi-process image");
    assert_eq!(processes, threads);
}

/// `--dp 2 --images 2` on two CPU workers makes two images at once (seeds 4 and 5, one per
/// data-parallel group), each the same bytes as that seed made alone on one worker; images and
/// data parallelism are checked against bad input.
#[test]
fn data_parallel_groups_make_the_single_worker_images() {
    let dir = tempfile::tempdir().expect("tmp");
    let common = [
        "--prompt",
        "a harbour",
        "--width",
        "48",
        "--height",
        "48",
        "--steps",
        "2",
        "--quiet",
    ];
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec!["generate", "--out", s(out)];
        args.extend(common);
        args.extend(extra.iter().copied());
        let o = parallax(&args);
        assert!(o.status.success(), "{extra:?}: {}", text(&o));
        o
    };
    let o = run(
        &dir.path().join("dp.png"),
        &[
            "--devices",
            "cpu:2",
            "--dp",
            "2",
            "--images",
            "2",
            "--seed",
            "4",
        ],
    );
    assert!(
        text(&o).contains("dp 2 x cfg 1 x ring 1 x ulysses 1"),
        "{}",
        text(&o)
    );
    for seed in ["4", "5"] {
        let alone = dir.path().join(format!("alone-{seed}.png"));
        run(&alone, &["--seed", seed]);
        let (a, _) = read_png(&alone).expect("single-worker image");
        let (b, _) = read_png(&dir.path().join(format!("dp-{seed}.png"))).expect("dp image");
        assert_eq!(a, b, "seed {seed}");
    }
    // Several images on one worker, one after another, are those seeds' images too.
    run(
        &dir.path().join("seq.png"),
        &["--images", "2", "--seed", "4"],
    );
    for seed in ["4", "5"] {
        let (a, _) = read_png(&dir.path().join(format!("seq-{seed}.png"))).expect("sequential");
        let (b, _) = read_png(&dir.path().join(format!("alone-{seed}.png"))).expect("alone");
        assert_eq!(a, b, "seed {seed}");
    }
    for (args, needle) in [
        (
            vec!["--devices", "cpu:2", "--dp", "3"],
            "asks for 3 devices",
        ),
        (vec!["--dp", "2"], "need --devices"),
        (vec!["--images", "0"], "give 1 to"),
        (
            vec!["--devices", "cpu:2", "--dp", "2", "--images", "99999999"],
            "give 1 to",
        ),
    ] {
        refuses(dir.path(), &args, needle);
    }
}

/// `parallax bench-vae --tiny --width 64 --runs 1 --warmup 0` with `extra`: its JSON report.
fn bench_vae_tiny(extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "bench-vae",
        "--tiny",
        "--width",
        "64",
        "--runs",
        "1",
        "--warmup",
        "0",
    ];
    args.extend(extra.iter().copied());
    let o = parallax(&args);
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).expect("json")
}

/// `bench-vae --tiny` runs on the CPU and reports its decode time and convolution path as JSON.
#[test]
fn bench_vae_runs_the_tiny_autoencoder_on_the_cpu() {
    let v = bench_vae_tiny(&["--device", "cpu"]);
    assert_eq!(v["convolution"], "candle conv2d");
    assert!(
        v["decode_ms"]["median"].as_f64().is_some_and(|t| t > 0.0),
        "{v}"
    );

    // Split across three CPU workers (an uneven split of 8 latent rows), the decode matches the
    // one-worker decode of the same latent.
    let v = bench_vae_tiny(&["--devices", "cpu:3", "--compare"]);
    assert_eq!(v["workers"], 3);
    let diff = v["max_diff_vs_one_device"].as_f64().expect("a difference");
    assert!(diff < 1e-4, "{diff}");
}

/// The studio's path (a runtime job) and the CLI make the same image, byte for byte, for the
/// same settings on `cpu:4` in every layout: one engine under both front ends.
#[test]
fn runtime_jobs_equal_the_cli_in_every_cpu_layout() {
    use parallax::engine::{Degrees, Devices, LayoutChoice, Placement};
    use parallax::pipeline::GenerateRequest;
    use parallax::runtime::{EngineSpec, Event, JobSpec, Runtime, RuntimeOptions};

    let dir = tempfile::tempdir().expect("tmp");
    let degrees = |ulysses, ring, cfg, dp| Degrees {
        ulysses: Some(ulysses),
        ring: Some(ring),
        cfg: Some(cfg),
        dp: Some(dp),
        ..Degrees::default()
    };
    let neg = ["--negative-prompt", "blurry", "--true-cfg", "3"];
    let base = GenerateRequest {
        prompt: "a red circle".into(),
        width: 48,
        height: 32,
        steps: Some(2),
        seed: 5,
        ..GenerateRequest::default()
    };
    for (name, d, true_cfg) in [
        ("u2r2", degrees(2, 2, 1, 1), false),
        ("r4", degrees(1, 4, 1, 1), false),
        ("cfg2", degrees(2, 1, 2, 1), true),
        ("dp2", degrees(1, 2, 1, 2), false),
    ] {
        let out = dir.path().join(format!("{name}.png"));
        let (u, r, c, p) = (
            d.ulysses.unwrap_or(1).to_string(),
            d.ring.unwrap_or(1).to_string(),
            d.cfg.unwrap_or(1).to_string(),
            d.dp.unwrap_or(1).to_string(),
        );
        let mut args = vec![
            "generate",
            "--devices",
            "cpu:4",
            "--ulysses",
            &u,
            "--ring",
            &r,
            "--cfg",
            &c,
            "--dp",
            &p,
            "--images",
            "1",
            "--prompt",
            "a red circle",
            "--width",
            "48",
            "--height",
            "32",
            "--steps",
            "2",
            "--seed",
            "5",
            "--quiet",
            "--out",
            s(&out),
        ];
        if true_cfg {
            args.extend(neg);
        }
        let o = parallax(&args);
        assert!(o.status.success(), "{name}: {}", text(&o));
        let (cli, _) = read_png(&out).expect("cli image");

        let rt = Runtime::start(RuntimeOptions {
            engine: EngineSpec::new(
                "demo",
                Placement {
                    devices: Devices::Cpu(4),
                    layout: LayoutChoice::Degrees(d),
                },
            ),
            gallery_dir: None,
            notify: None,
        })
        .expect("runtime");
        let req = GenerateRequest {
            negative_prompt: true_cfg.then(|| "blurry".to_string()),
            true_cfg: true_cfg.then_some(3.0),
            ..base.clone()
        };
        let job = rt.submit(JobSpec::Generate(req));
        let mut image = None;
        loop {
            let ev = rt
                .recv_timeout(std::time::Duration::from_secs(120))
                .expect("event");
            if ev.job() != Some(job) {
                continue;
            }
            match ev {
                Event::ImageDone { result, .. } => image = Some(result.generated.image.clone()),
                Event::Failed { error, .. } => panic!("{name}: {error}"),
                e if e.is_terminal() => break,
                _ => {}
            }
        }
        let image = image.expect("an image");
        assert_eq!(
            image.data, cli.data,
            "{name}: the runtime's image differs from the CLI's"
        );
    }
}

/// A bad placement is refused with the same message by the CLI (before loading) and by the
/// studio's panel as it is typed: both ask the engine's one check.
#[cfg(feature = "studio")]
#[test]
fn the_cli_and_the_studio_panel_refuse_bad_placements_alike() {
    use parallax::app::Settings;
    let heads = parallax::model::flux::FluxConfig::tiny().num_heads;
    let dir = tempfile::tempdir().expect("tmp");
    for (workers, ulysses, ring, cfg, dp) in [
        (3, 3, 1, 1, 1),
        (4, 2, 1, 1, 1),
        (2, 1, 1, 2, 1),
        (2, 1, 1, 1, 3),
    ] {
        let panel = Settings {
            device: "cpu".into(),
            workers,
            layout_auto: false,
            ulysses,
            ring,
            cfg,
            dp,
            ..Settings::default()
        }
        .layout_check(heads)
        .expect_err("a bad placement");
        let devices = format!("cpu:{workers}");
        let (u, r, c, d) = (
            ulysses.to_string(),
            ring.to_string(),
            cfg.to_string(),
            dp.to_string(),
        );
        let out = dir.path().join("x.png");
        let o = parallax(&[
            "generate",
            "--prompt",
            "x",
            "--quiet",
            "--out",
            s(&out),
            "--devices",
            &devices,
            "--ulysses",
            &u,
            "--ring",
            &r,
            "--cfg",
            &c,
            "--dp",
            &d,
        ]);
        assert!(!o.status.success());
        assert!(
            text(&o).contains(&panel),
            "the CLI said {:?}, the panel {panel:?}",
            text(&o)
        );
        assert!(!out.exists());
    }
}

/// `compare` runs the studio's sweep through the runtime: the reference first, a huge threshold
/// reusing steps; each saved image is the one `generate` makes with that threshold.
#[test]
fn compare_sweeps_thresholds_through_the_runtime() {
    let dir = tempfile::tempdir().expect("tmp");
    let common = [
        "--prompt",
        "a red fox",
        "--steps",
        "3",
        "--width",
        "64",
        "--height",
        "64",
        "--seed",
        "9",
    ];
    let mut args = vec![
        "compare",
        "--devices",
        "cpu:2",
        "--dp",
        "2",
        "--thresholds",
        "1e9",
    ];
    args.extend(common);
    args.extend(["--save", s(dir.path())]);
    let o = parallax(&args);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON on stdout");
    let images = v["images"].as_array().expect("images");
    assert_eq!(images.len(), 2, "{v}");
    assert_eq!(images[0]["threshold"], 0.0);
    assert_eq!(images[0]["steps_reused"], 0);
    assert_eq!(images[1]["steps_reused"], 2, "{v}");
    assert!(
        images[1]["psnr_db"].as_f64().is_some_and(f64::is_finite),
        "{v}"
    );
    assert!(
        v["layout"].as_str().is_some_and(|l| l.contains("dp 2")),
        "{v}"
    );
    for (threshold, saved) in [("0", "compare-0.png"), ("1e9", "compare-1000000000.png")] {
        let out = dir.path().join(format!("generate-{threshold}.png"));
        let mut g = vec![
            "generate",
            "--quiet",
            "--cache-threshold",
            threshold,
            "--out",
            s(&out),
        ];
        g.extend(common);
        let o = parallax(&g);
        assert!(o.status.success(), "{}", text(&o));
        let (a, _) = read_png(&out).expect("generate's image");
        let (b, _) = read_png(&dir.path().join(saved)).expect("compare's image");
        assert_eq!(a, b, "threshold {threshold}");
    }
    let o = parallax(&["compare", "--thresholds", "0.1,-2", "--prompt", "x"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("-2"), "{}", text(&o));
}

/// `compare --repeats 3` times every cell in three rounds: each row has its three wall times,
/// a ratio per round with the median inside the range, and a verdict that reads the range.
#[test]
fn compare_repeats_give_each_cell_its_rounds_and_a_range() {
    let o = parallax(&[
        "compare",
        "--prompt",
        "a red circle on the left, blue sky",
        "--steps",
        "4",
        "--width",
        "64",
        "--height",
        "64",
        "--thresholds",
        "5",
        "--caches",
        "taylorseer:n=3,order=1,warmup=2",
        "--repeats",
        "3",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON on stdout");
    assert_eq!(v["repeats"], 3, "{v}");
    assert!(v["timing_method"]
        .as_str()
        .is_some_and(|m| m.contains("median")));
    let images = v["images"].as_array().expect("images");
    assert_eq!(images.len(), 3, "{v}");
    for (i, row) in images.iter().enumerate() {
        let rounds = row["wall_ms_rounds"].as_array().expect("wall_ms_rounds");
        assert_eq!(rounds.len(), 3, "{row}");
        assert_eq!(row["repeats_identical"], true, "{row}");
        let wall = row["wall_ms"].as_f64().expect("wall_ms");
        let times: Vec<f64> = rounds.iter().filter_map(|t| t.as_f64()).collect();
        assert!(times.contains(&wall), "3 values: the median is one of them");
        if i == 0 {
            assert!(row["speedup"].is_null(), "the reference: {row}");
            continue;
        }
        let speedups = row["speedup_rounds"].as_array().expect("speedup_rounds");
        assert_eq!(speedups.len(), 3, "{row}");
        let (lo, hi) = (
            row["speedup_range"][0].as_f64().expect("low"),
            row["speedup_range"][1].as_f64().expect("high"),
        );
        let median = row["speedup"].as_f64().expect("speedup");
        assert!(lo <= median && median <= hi, "{row}");
        let verdict = row["speedup_verdict"].as_str().expect("verdict");
        let expected = if lo > 1.0 {
            "gain"
        } else if hi < 1.0 {
            "slower"
        } else {
            "no measurable gain"
        };
        assert_eq!(verdict, expected, "{row}");
        assert!(row["speedup_label"].is_string(), "{row}");
    }
    assert_eq!(images[2]["cache"], "taylorseer:n=3,order=1,warmup=2");
}

/// `dataset` writes the scenes the trainer reads and the evaluation prompts with their pictures;
/// `score` gives a reference picture full marks against its own caption and refuses a prompt it
/// cannot read.
#[test]
fn dataset_and_score() {
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path().to_str().expect("utf8");
    let out = parallax(&["dataset", d, "--count", "50", "--seed", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let scenes = std::fs::read_to_string(dir.path().join("scenes.jsonl")).expect("scenes");
    assert_eq!(scenes.lines().count(), 50);
    let first: serde_json::Value =
        serde_json::from_str(scenes.lines().next().expect("line")).expect("json");
    assert!(first[0].is_string() && first[3].is_array(), "{first}");
    assert!(dir.path().join("spec.json").is_file());

    let out = parallax(&["dataset", d, "--eval", "--count", "3", "--pictures", "96"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let eval = std::fs::read_to_string(dir.path().join("eval.jsonl")).expect("eval");
    let e: serde_json::Value =
        serde_json::from_str(eval.lines().next().expect("line")).expect("json");
    let caption = e["caption"].as_str().expect("caption");
    let png = dir.path().join("eval-0.png");
    let out = parallax(&[
        "score",
        "--image",
        png.to_str().expect("utf8"),
        "--prompt",
        caption,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["score"]["accuracy"], 1.0, "{v}");

    let out = parallax(&[
        "score",
        "--image",
        png.to_str().expect("utf8"),
        "--prompt",
        "a lighthouse",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("names no coloured shape"));
    let out = parallax(&["dataset", d, "--count", "0"]);
    assert!(!out.status.success());
}

/// `--cache` names a policy: its settings reach the PNG, `compare --caches` runs it after the
/// thresholds, and a wrong spec or a model without MagCache's calibration is refused with why.
#[test]
fn cache_policies_on_the_command_line() {
    let dir = tempfile::tempdir().expect("tmp");
    let png = dir.path().join("db.png");
    let out = parallax(&[
        "generate",
        "--prompt",
        "a red circle on the left, blue sky",
        "--seed",
        "1",
        "--steps",
        "6",
        "--cache",
        "dbcache:f=1,b=1,t=0.3,max=2",
        "--out",
        png.to_str().expect("utf8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, text) = parallax::pipeline::image::read_png(&png).expect("png");
    let settings = parallax::pipeline::GenerationSettings::from_png_text(&text).expect("settings");
    assert_eq!(
        settings.cache_spec().to_string(),
        "dbcache:f=1,b=1,t=0.3,max=2,warmup=0,taylor=0"
    );

    let out = parallax(&[
        "compare",
        "--prompt",
        "a red circle on the left, blue sky",
        "--steps",
        "6",
        "--thresholds",
        "0",
        "--caches",
        "taylorseer:n=2,warmup=1;magcache:t=0.5,k=2,warmup=1",
        "--repeats",
        "1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let caches: Vec<&str> = v["images"]
        .as_array()
        .expect("images")
        .iter()
        .map(|i| i["cache"].as_str().expect("cache"))
        .collect();
    assert_eq!(
        caches,
        [
            "none",
            "taylorseer:n=2,order=1,warmup=1",
            "magcache:t=0.5,k=2,warmup=1"
        ]
    );
    assert!(v["images"][1]["steps_reused"].as_u64().expect("reused") > 0);

    let out = parallax(&[
        "generate",
        "--cache",
        "fbcache:t=0.2",
        "--cache-threshold",
        "0.1",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cache and --cache-threshold"));
    let out = parallax(&["generate", "--cache", "dbcache:q=1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`q` is not a setting of dbcache"));
    // No calibration for random:tiny where this run looks (an empty PARALLAX_HOME).
    let out = Command::new(env!("CARGO_BIN_EXE_parallax"))
        .args([
            "generate",
            "--model",
            "random:tiny",
            "--cache",
            "magcache:t=0.3",
            "--out",
            s(&dir.path().join("m.png")),
        ])
        .env("PARALLAX_HOME", dir.path().join("home"))
        .env_remove("RUST_LOG")
        .output()
        .expect("run parallax");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("calibrate-magcache"));
}

/// `fp8-error` measures FP8's cost per group of layers against the native velocity.
#[test]
fn fp8_error_reports_every_group() {
    let out = parallax(&[
        "fp8-error",
        "--steps",
        "4",
        "--seed",
        "2",
        "--prompt",
        "a red heart",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let groups = v["groups"].as_array().expect("groups");
    // Four groups of products, the modulations (weight-only), all products, all + modulations.
    assert_eq!(groups.len(), 7);
    for g in groups {
        let e = g["relative_error"].as_f64().expect("error");
        // E4M3 keeps 3 mantissa bits: a few percent at most on the demo's velocity, never 0.
        assert!(e > 0.0 && e < 0.2, "{g}");
        assert_eq!(g["per_step"].as_array().expect("steps").len(), 3);
    }
    let out = parallax(&["fp8-error", "--precision", "fp8"]);
    assert!(!out.status.success());
}
