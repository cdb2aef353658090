//! The `parallax` binary: generate, bench, info and export-demo, and clean failures on bad input.

mod common;

use common::{free_init, max_pixel_diff, s, text};
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
    assert_eq!(v["fp8_attention"], false);
    // `--fp8-attention` reaches the model, and the report says so.
    let args: Vec<&str> = "bench --model demo --width 32 --height 32 --steps 1 --runs 1 --warmup 0"
        .split(' ')
        .chain(["--fp8-attention"])
        .collect();
    let o = parallax(&args);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json on stdout");
    assert_eq!(v["fp8_attention"], true);
    assert!(
        v["dtype"]
            .as_str()
            .expect("dtype")
            .contains("fp8 attention"),
        "{v}"
    );
}

/// A cold start from a written checkpoint: `dev write-checkpoint` writes a random transformer in
/// BFL's single-file layout (bf16 and FP8), `bench` loads it with random text encoders and
/// reports where loading went and the first image's timings, and `generate` draws from it.
/// A written tiny checkpoint with random text encoders and autoencoder, 32 px, 2 steps.
fn tiny_cold(file: &Path) -> Vec<&str> {
    vec![
        "--model",
        s(file),
        "--text-encoders",
        "random",
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        "2",
    ]
}

#[test]
fn written_checkpoints_load_cold_and_report_their_phases() {
    let dir = tempfile::tempdir().expect("tmp");
    for dtype in ["bf16", "fp8"] {
        let file = dir.path().join(format!("tiny-{dtype}.safetensors"));
        let o = parallax(&[
            "dev",
            "write-checkpoint",
            "--model",
            "random:tiny",
            "--dtype",
            dtype,
            "--out",
            s(&file),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let w: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
        let size = std::fs::metadata(&file).expect("written").len();
        assert_eq!(w["bytes"].as_u64(), Some(size));
        let mut args = vec!["bench", "--runs", "1", "--warmup", "0"];
        args.extend(tiny_cold(&file));
        let o = parallax(&args);
        assert!(o.status.success(), "{}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json on stdout");
        assert_eq!(v["demo"], true, "random text encoders label the output");
        let cold = &v["cold_start"];
        // Every tensor was read from the file: its bytes less the header.
        let read = cold["bytes_read"].as_u64().expect("bytes read");
        assert!(read > size * 9 / 10 && read < size, "{read} of {size}");
        let phases = &cold["load_phases_ms"];
        for phase in [
            "open_index",
            "read_tensors",
            "host_to_device",
            "text_encoders",
        ] {
            assert!(
                phases[phase].as_f64().expect(phase) > 0.0,
                "{phase}: {cold}"
            );
        }
        assert!(cold["first_image"]["first_step_ms"].as_f64().expect("step") > 0.0);
        assert!(
            cold["first_image"]["from_load_start_ms"]
                .as_f64()
                .expect("image")
                >= cold["load_ms"].as_f64().expect("load")
        );
        // The prompt was encoded while the transformer loaded (issue 30's cold start), and
        // was ready once the load was.
        let ready = cold["first_image"]["text_ready_from_load_start_ms"].as_f64();
        assert!(ready.expect("ready") >= cold["load_ms"].as_f64().expect("load"));
        let overlap = &cold["load_overlap"];
        assert_eq!(overlap["prompts"].as_u64(), Some(1), "{cold}");
        assert!(overlap["text_encode_ms"].as_f64().expect("encode") > 0.0);
        assert!(overlap["hidden_ms"].as_f64().expect("hidden") >= 0.0);
    }
    // With the overlap off the block says so, and `generate` draws the very same image.
    let bf16 = dir.path().join("tiny-bf16.safetensors");
    let mut tiny = tiny_cold(&bf16);
    tiny.extend(["--seed", "3"]);
    let off = [("PARALLAX_NO_LOAD_OVERLAP", "1")];
    let limit = std::time::Duration::from_secs(300);
    let mut args = vec!["bench", "--runs", "1", "--warmup", "0"];
    args.extend(&tiny);
    let (o, _) = parallax_within(&args, &off, limit);
    let o = o.expect("bench ends");
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json on stdout");
    assert!(v["cold_start"]["load_overlap"].is_null(), "{v}");
    let mut pngs = Vec::new();
    for (name, env) in [("on.png", &[][..]), ("off.png", &off[..])] {
        let png = dir.path().join(name);
        let mut args = vec!["generate", "--quiet", "--out", s(&png)];
        args.extend(&tiny);
        let (o, _) = parallax_within(&args, env, limit);
        let o = o.expect("generate ends");
        assert!(o.status.success(), "{}", text(&o));
        pngs.push(read_png(&png).expect("png").0);
    }
    assert_eq!(
        pngs[0], pngs[1],
        "the same image with and without the overlap"
    );
    let out = dir.path().join("x.png");
    let fp8 = dir.path().join("tiny-fp8.safetensors");
    let mut args = vec!["generate", "--out", s(&out), "--quiet"];
    args.extend(tiny_cold(&fp8));
    let o = parallax(&args);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(read_png(&out).expect("png").0.width, 32);
}

#[test]
fn bench_from_an_image_runs_the_steps_its_strength_leaves() {
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("src.png");
    let o = parallax(&[
        "generate", "--model", "demo", "--width", "32", "--height", "32", "--steps", "2",
        "--quiet", "--out", s(&src),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let o = parallax(&[
        "bench", "--model", "demo", "--steps", "8", "--runs", "1", "--warmup", "0", "--image",
        s(&src), "--strength", "0.5",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json on stdout");
    assert_eq!(v["steps"], 8);
    assert_eq!(v["steps_run"], 4, "{v}");
    assert_eq!(v["strength"], 0.5);
    // The size follows the source image.
    assert_eq!(v["width"], 32);
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
    assert!(info.contains("text_encoder_2 (found)"), "{info}");
    assert!(info.contains("tokenizer_2 (found)"), "{info}");
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
    // Auto on CPU workers picks by the cost model (ring 4: fewer calls than ring 2 x ulysses 2
    // for the same compute; `parallax plan` shows the table).
    assert!(text(&o).contains("(cost model, cpu link"), "{}", text(&o));
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
        text(&o).contains("waiting for all 2 ranks to join") && text(&o).contains("rank 1 is lost"),
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
    let worst = max_pixel_diff(&one, &threads);
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

/// A bad placement is refused by the CLI (before loading) and by the studio's panel as it is
/// typed: both ask the engine's one check; the panel says it in its own words.
#[cfg(feature = "studio")]
#[test]
fn the_cli_and_the_studio_panel_refuse_bad_placements_alike() {
    use parallax::app::Settings;
    let tiny = parallax::model::flux::FluxConfig::tiny();
    let shape = parallax::app::state::ModelShape {
        heads: tiny.num_heads,
        blocks: tiny.num_blocks(),
        magcache: true,
    };
    let dir = tempfile::tempdir().expect("tmp");
    for (workers, ulysses, ring, cfg, dp) in [
        (3, 3, 1, 1, 1),
        (4, 2, 1, 1, 1),
        (2, 1, 1, 2, 1),
        (2, 1, 1, 1, 3),
    ] {
        let settings = Settings {
            device: "cpu".into(),
            workers,
            layout_auto: false,
            layout: parallax::parallel::mesh::ParallelLayout {
                ulysses,
                ring,
                cfg,
                dp,
                ..Default::default()
            },
            ..Settings::default()
        };
        let panel = settings.layout_check(shape).expect_err("a bad placement");
        // The engine's refusal: the CLI says it with its flags, the panel in its own words.
        let engine = settings.plan(shape.heads).expect_err("a bad placement");
        assert_eq!(panel, parallax::app::state::in_studio_words(&engine));
        assert!(!panel.contains("--"), "{panel}");
        let engine = engine.to_string();
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
            text(&o).contains(&engine),
            "the CLI said {:?}, the engine {engine:?}",
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
    // A compare sweep with a MagCache cell on that model is refused whole, before its first
    // image: nothing is saved from the cells that could have run.
    let saved = dir.path().join("sweep");
    let out = Command::new(env!("CARGO_BIN_EXE_parallax"))
        .args([
            "compare",
            "--model",
            "random:tiny",
            "--steps",
            "2",
            "--thresholds",
            "0",
            "--caches",
            "fbcache:t=0.2;magcache:t=0.3",
            "--save",
            s(&saved),
        ])
        .env("PARALLAX_HOME", dir.path().join("home"))
        .env_remove("RUST_LOG")
        .output()
        .expect("run parallax");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("calibrate-magcache"));
    let made = std::fs::read_dir(&saved).map(|d| d.count()).unwrap_or(0);
    assert_eq!(
        made, 0,
        "the sweep made images before refusing its MagCache cell"
    );
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
    // Four groups of products, the modulations (weight-only), all products, all + modulations,
    // FP8 attention alone and beside all products.
    assert_eq!(groups.len(), 9);
    assert_eq!(groups[7]["fp8_attention"], true, "{}", groups[7]);
    for g in groups {
        let e = g["relative_error"].as_f64().expect("error");
        // E4M3 keeps 3 mantissa bits: a few percent at most on the demo's velocity, never 0.
        assert!(e > 0.0 && e < 0.2, "{g}");
        assert_eq!(g["per_step"].as_array().expect("steps").len(), 3);
    }
    let out = parallax(&["fp8-error", "--precision", "fp8"]);
    assert!(!out.status.success());
}

/// "Will it fit?" with nothing downloaded: `parallax memory --model dev|schnell` with an empty
/// Hugging Face cache plans from the built-in configs, for every default budget; where one GPU is
/// not enough the answer is the fewest GPUs of that size whose PipeFusion stages, split by
/// memory (`stage_split`), each fit (checked against the library: the same stages, and one GPU
/// fewer does not do); `--budget 11` plans for 11 GiB alone.
#[test]
fn memory_answers_without_weights() {
    use parallax::engine::load::workload;
    use parallax::engine::memory::{plan, plan_stages};
    use parallax::model::layout::{ModelSpec, Resolved, Variant};
    use parallax::parallel::pipefusion::{stage_split, StageBalance};
    use parallax::pipeline::LoadOptions;
    let empty = tempfile::tempdir().expect("tmp");
    let memory = |args: &[&str]| memory_with_empty_cache(empty.path(), args);
    const GIB: f64 = (1u64 << 30) as f64;
    // A budget of dev's where one GPU is not enough and several are.
    let mut split_budget = None;
    for (model, variant) in [("dev", Variant::Dev), ("schnell", Variant::Schnell)] {
        let out = memory(&["--model", model, "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        assert!(
            v["source"].to_string().contains("built-in configs"),
            "{v:#}"
        );
        // What the built-in configs give, as the library reads them.
        let planned = Resolved {
            spec: ModelSpec::Random(variant),
            reasons: Vec::new(),
        };
        let w = workload(&planned, candle_core::DType::BF16, Some((1024, 1024)), true)
            .expect("workload");
        let flux = parallax::engine::load::model_config(&planned).expect("config");
        let rows = v["budgets"].as_array().expect("budgets");
        let budgets: Vec<f64> = rows
            .iter()
            .filter_map(|r| r["budget_gib"].as_f64())
            .collect();
        assert_eq!(
            budgets,
            vec![8.0, 10.0, 12.0, 16.0, 24.0, 48.0, 80.0],
            "{v:#}"
        );
        for row in rows {
            let b = row["budget_gib"].as_f64().expect("budget") * GIB;
            let one = plan(&w, b, LoadOptions::default(), true);
            assert_eq!(row["fits"].as_bool(), Some(one.is_ok()), "{row:#}");
            if one.is_ok() {
                assert!(
                    row["peak_gib"].as_f64().expect("peak") * GIB <= b,
                    "{row:#}"
                );
                continue;
            }
            let pf = &row["pipefusion"];
            match plan_stages(&w, b, LoadOptions::default(), true) {
                Ok(s) => {
                    if model == "dev" {
                        split_budget = Some(b / GIB);
                    }
                    let n = s.gpus();
                    assert_eq!(pf["gpus"].as_u64(), Some(n as u64), "{row:#}");
                    let stages = pf["stages"].as_array().expect("stages");
                    assert_eq!(stages.len(), n);
                    for (i, st) in stages.iter().enumerate() {
                        let r = stage_split(&flux, n, i, StageBalance::Memory);
                        assert_eq!(st["blocks"], serde_json::json!([r.start, r.end]), "{row:#}");
                        assert!(st["peak_gib"].as_f64().expect("peak") * GIB <= b, "{row:#}");
                    }
                    // One GPU fewer is not enough.
                    if n > 2 {
                        let fewer = (0..n - 1).all(|i| {
                            let r = stage_split(&flux, n - 1, i, StageBalance::Memory);
                            let o = LoadOptions {
                                blocks: Some((r.start, r.end)),
                                ..Default::default()
                            };
                            plan(&w, b, o, true).is_ok()
                        });
                        assert!(!fewer, "{n} - 1 GPUs would do: {row:#}");
                    }
                }
                Err(_) => {
                    assert!(pf["gpus"].is_null(), "{row:#}");
                    assert!(pf["why"].as_str().is_some_and(|w| !w.is_empty()), "{row:#}");
                }
            }
        }
    }
    let split = split_budget.expect("no default budget of dev's needs more than one GPU");

    // The text answer, for a custom budget and for one that needs several GPUs.
    let out = text(&memory(&["--model", "dev", "--budget", "11"]));
    assert!(out.contains("built-in configs"), "{out}");
    assert!(out.contains("budget 11.0 GiB"), "{out}");
    assert!(!out.contains("budget 8.0 GiB"), "{out}");
    let out = text(&memory(&[
        "--model",
        "dev",
        "--budgets",
        &split.to_string(),
    ]));
    let answer = format!("GPUs of {split:.1} GiB would, as PipeFusion stages split by memory");
    assert!(out.contains(&answer), "{out}");
    assert!(out.contains("--pipefusion-balance memory"), "{out}");
}

/// `parallax memory ARGS` with an empty Hugging Face cache at `hf_home` (it must succeed).
fn memory_with_empty_cache(hf_home: &std::path::Path, args: &[&str]) -> Output {
    let o = Command::new(env!("CARGO_BIN_EXE_parallax"))
        .arg("memory")
        .args(args)
        .env_remove("HF_HUB_CACHE")
        .env("HF_HOME", hf_home)
        .env_remove("RUST_LOG")
        .output()
        .expect("run parallax memory");
    assert!(o.status.success(), "{}", text(&o));
    o
}

/// `parallax memory --model klein-4b|klein-9b` with nothing downloaded plans from klein's built-in
/// configs (and `random:klein-*` from the same): Qwen3 named where FLUX.1 names T5, the 12, 16 and
/// 24 GiB budgets answered as the library plans them, no FLUX.1-only measure (modulations in FP8)
/// taken, no measure called unbuilt (klein's loader builds them all), and the work space said to
/// be an estimate.
#[test]
fn memory_plans_klein_from_its_built_in_configs() {
    use parallax::engine::load::workload;
    use parallax::engine::memory::{plan, FP8_MODULATIONS};
    use parallax::model::klein::RandomKlein;
    use parallax::model::layout::{ModelSpec, Resolved};
    use parallax::pipeline::LoadOptions;
    let empty = tempfile::tempdir().expect("tmp");
    let memory = |args: &[&str]| memory_with_empty_cache(empty.path(), args);
    const GIB: f64 = (1u64 << 30) as f64;
    for (name, kind) in [
        ("klein-4b", RandomKlein::FourB),
        ("klein-9b", RandomKlein::NineB),
        ("random:klein-4b", RandomKlein::FourB),
    ] {
        let out = text(&memory(&["--model", name, "--budgets", "12,16,24"]));
        if !name.starts_with("random:") {
            assert!(out.contains("built-in configs"), "{out}");
        }
        assert!(out.contains("Qwen3") && !out.contains("T5"), "{out}");
        assert!(out.contains("estimated, not measured"), "{out}");
        assert!(!out.contains(FP8_MODULATIONS), "{out}");
        let planned = Resolved {
            spec: ModelSpec::RandomKlein(kind),
            reasons: Vec::new(),
        };
        let w = workload(&planned, candle_core::DType::BF16, Some((1024, 1024)), true)
            .expect("workload");
        for b in [12.0, 16.0, 24.0] {
            let line = out
                .lines()
                .find(|l| l.contains(&format!("budget {b:.1} GiB")))
                .unwrap_or_else(|| panic!("no {b} GiB line: {out}"));
            match plan(&w, b * GIB, LoadOptions::default(), true) {
                Ok(p) if p.measures.is_empty() => assert!(line.contains("fits as asked"), "{line}"),
                Ok(p) => {
                    assert!(line.contains(&p.measures.join(", ")), "{line}");
                    assert!(!line.contains("not built"), "{line}");
                }
                Err(_) => assert!(line.contains("one GPU is not enough"), "{line}"),
            }
        }
        // 4B: a 24 GiB card holds it as asked, a 16 GiB one with Qwen3 built for each prompt.
        if kind == RandomKlein::FourB {
            assert!(out.contains("budget 24.0 GiB: peak about") && out.contains("fits as asked"));
            assert!(
                out.contains("measures: Qwen3 built for each prompt"),
                "{out}"
            );
        }
    }
    let v: serde_json::Value =
        serde_json::from_slice(&memory(&["--model", "klein-9b", "--json"]).stdout).expect("json");
    assert_eq!(v["family"], "FLUX.2 klein", "{v:#}");
    assert!(
        v["notes"].as_array().is_some_and(|n| !n.is_empty()),
        "{v:#}"
    );
}

/// Run `parallax args` with `env`, killing it if it outlasts `limit`: its output and how long it
/// took (`None` as the output when it had to be killed: a hang).
fn parallax_within(
    args: &[&str],
    env: &[(&str, &str)],
    limit: std::time::Duration,
) -> (Option<Output>, std::time::Duration) {
    let t0 = std::time::Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_parallax"))
        .args(args)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run parallax");
    while t0.elapsed() < limit {
        if child.try_wait().expect("wait").is_some() {
            let out = child.wait_with_output().expect("output");
            return (Some(out), t0.elapsed());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    (None, t0.elapsed())
}

/// A rank that stalls for good (10 minutes, against a 1 s collective timeout) ends the job at
/// the timeout: the command exits with an error naming the rank, writes nothing, and does not
/// wait for the stalled thread.
#[test]
fn a_rank_stalled_for_good_ends_generate_at_the_timeout() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("stalled.png");
    for fault in [
        "rank=1,step=1,kind=stall:600",
        "rank=0,step=0,kind=stall:600",
    ] {
        let (o, took) = parallax_within(
            &[
                "generate",
                "--prompt",
                "a fox",
                "--quiet",
                "--devices",
                "cpu:2",
                "--width",
                "64",
                "--height",
                "48",
                "--steps",
                "4",
                "--out",
                s(&out),
            ],
            &[
                ("PARALLAX_FAULT", fault),
                ("PARALLAX_COLLECTIVE_TIMEOUT_S", "1"),
            ],
            std::time::Duration::from_secs(60),
        );
        let o = o.unwrap_or_else(|| panic!("{fault}: still running after {took:?}"));
        let msg = text(&o);
        assert!(!o.status.success(), "{fault}: {msg}");
        let rank = &fault[5..6];
        assert!(
            msg.contains(&format!("gave up on rank {rank}")) && msg.contains("did not reach"),
            "{fault}: {msg}"
        );
        assert!(!msg.contains("panicked"), "{msg}");
        // The timeout (1 s) and the grace for the ranks still out (1 s), plus start-up: far
        // below the stall.
        assert!(took.as_secs_f64() < 20.0, "{fault}: {took:?}");
        eprintln!("{fault}: ended in {:.2} s", took.as_secs_f64());
        assert!(!out.exists());
    }
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
}

/// A reader that goes away (`parallax info | true`) ends the command quietly: status 0, no
/// panic. The writer starts after the reader has gone, so every write meets a closed pipe.
#[test]
fn a_closed_pipe_ends_output_quietly() {
    let bin = env!("CARGO_BIN_EXE_parallax");
    let o = Command::new("sh")
        .args([
            "-c",
            r#"exec 3>&1; { sleep 0.3; "$0" info --model demo; echo "status $?" >&3; } | true"#,
            bin,
        ])
        .env_remove("RUST_LOG")
        .output()
        .expect("sh");
    let msg = text(&o);
    assert!(msg.contains("status 0"), "{msg}");
    assert!(!msg.contains("panicked"), "{msg}");
}

/// Bad inputs found before anything loads or runs, each told once: a bad size beside a damaged
/// model is the size; an output folder that cannot be written is said before the work; a
/// guidance that overflows is caught at the step it ruins the image (not saved black); a pipe
/// in place of the weights is refused, not waited on; PipeFusion's patches are bounded.
#[test]
fn bad_inputs_are_refused_early_and_said_once() {
    let dir = tempfile::tempdir().expect("tmp");
    let damaged = dir.path().join("damaged.safetensors");
    std::fs::write(&damaged, b"not a safetensors file at all").expect("write");
    refuses(
        dir.path(),
        &["--model", s(&damaged), "--width", "100"],
        "width",
    );
    // Read-only even for root.
    let o = parallax(&[
        "generate",
        "--prompt",
        "x",
        "--quiet",
        "--out",
        "/proc/x.png",
    ]);
    let msg = text(&o);
    assert!(!o.status.success());
    assert!(msg.contains("cannot write /proc"), "{msg}");
    // Said once: the library's errors print their cause; the command line adds no copy.
    assert_eq!(msg.matches("os error").count(), 1, "{msg}");
    assert!(
        !msg.contains("cannot read") && !msg.contains("DEMO"),
        "{msg}"
    );
    refuses(
        dir.path(),
        &[
            "--guidance",
            "1e308",
            "--steps",
            "3",
            "--width",
            "64",
            "--height",
            "64",
        ],
        "NaN or infinite at denoising step 1 of 3",
    );
    let mut too_many = vec!["--devices", "cpu:2", "--pipefusion", "2", "--width", "64"];
    too_many.extend(["--height", "64", "--pipefusion-patches", "100000"]);
    refuses(dir.path(), &too_many, "at most 256 patches");
    too_many[9] = "200";
    refuses(dir.path(), &too_many, "at most one patch per token");
    // A FIFO named like a weight file: opening it would wait for a writer for ever.
    let fifo = dir.path().join("fifo.safetensors");
    let made = Command::new("mkfifo").arg(&fifo).status();
    if made.is_ok_and(|s| s.success()) {
        let out = dir.path().join("refused.png");
        let (o, took) = parallax_within(
            &[
                "generate",
                "--prompt",
                "x",
                "--quiet",
                "--model",
                s(&fifo),
                "--out",
                s(&out),
            ],
            &[],
            std::time::Duration::from_secs(60),
        );
        let o = o.unwrap_or_else(|| panic!("blocked on the FIFO for {took:?}"));
        let msg = text(&o);
        assert!(!o.status.success());
        assert!(msg.contains("not a regular file"), "{msg}");
    }
}

/// Whether process `pid` catches SIGINT: bit 2 of `SigCgt` in /proc/PID/status (Linux; elsewhere
/// taken as caught).
fn catches_sigint(pid: u32) -> bool {
    if !cfg!(target_os = "linux") {
        return true;
    }
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let mask = s.lines().find_map(|l| l.strip_prefix("SigCgt:"))?;
            u64::from_str_radix(mask.trim(), 16).ok()
        })
        .is_some_and(|m| m & (1 << 1) != 0)
}

/// Ctrl-C ends `generate` with status 130, leaving no temporary file behind.
#[test]
fn an_interrupt_ends_generate_and_leaves_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("big.png");
    let mut child = Command::new(env!("CARGO_BIN_EXE_parallax"))
        .args([
            "generate",
            "--prompt",
            "a fox",
            "--quiet",
            "--width",
            "512",
            "--height",
            "512",
            "--steps",
            "200",
            "--out",
            s(&out),
        ])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // Signal only once the process catches SIGINT (it sets its handler as it starts, which on a
    // busy machine may come later than a fixed sleep), then 1.5 s into the generation.
    let t0 = std::time::Instant::now();
    while !catches_sigint(child.id()) {
        if let Some(status) = child.try_wait().expect("wait") {
            panic!("generate ended before it was interrupted: {status}");
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "no Ctrl-C handler after a minute"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success());
    let o = child.wait_with_output().expect("wait");
    let msg = text(&o);
    assert_eq!(o.status.code(), Some(130), "{msg}");
    assert!(msg.contains("interrupted"), "{msg}");
    assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 0);
}

/// `parallax --help` lists what a user runs; the project's own instruments sit under
/// `parallax dev`, and their old top-level spellings still work.
#[test]
fn help_lists_the_users_commands_and_dev_holds_the_instruments() {
    let listed = |args: &[&str]| -> Vec<String> {
        let out = parallax(args);
        assert!(out.status.success(), "{args:?} failed");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let commands = text
            .split("Commands:")
            .nth(1)
            .and_then(|t| t.split("Options:").next())
            .unwrap_or("")
            .to_string();
        commands
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    };
    let users = listed(&["--help"]);
    for c in [
        "studio", "generate", "compare", "info", "memory", "download", "worker", "bench", "dev",
    ] {
        assert!(users.contains(&c.to_string()), "{c} missing from {users:?}");
    }
    let instruments = [
        "selfcheck",
        "profile",
        "bench-vae",
        "export-demo",
        "dataset",
        "score",
        "calibrate-magcache",
        "fp8-error",
        "displaced-error",
    ];
    let dev = listed(&["dev", "--help"]);
    for c in instruments {
        assert!(!users.contains(&c.to_string()), "{c} is listed to users");
        assert!(
            dev.contains(&c.to_string()),
            "{c} missing from dev: {dev:?}"
        );
    }
    // The old spellings, with and without a global flag before them.
    let out = parallax(&["dataset", "--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("parallax dev dataset"));
    let out = parallax(&["-v", "score", "--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("parallax dev score"));
}

/// `--out` names the format: JPEG and lossless WebP keep the settings too (EXIF), in the
/// `parameters` layout other tools read; WebP's pixels are the PNG's.
#[test]
fn generate_writes_jpeg_and_webp_with_their_settings() {
    let dir = tempfile::tempdir().expect("tmp");
    let made = |name: &str| {
        let out = dir.path().join(name);
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
            "2",
            "--seed",
            "5",
            "--quiet",
            "--out",
            s(&out),
        ]);
        assert!(o.status.success(), "{name}: {}", text(&o));
        out
    };
    let png = made("fox.png");
    let (want, chunks) = read_png(&png).expect("png");
    let params = &chunks
        .iter()
        .find(|(k, _)| k == "parameters")
        .expect("parameters")
        .1;
    assert!(
        params.starts_with("a fox\nSteps: 2, Sampler: Euler"),
        "{params}"
    );
    assert!(
        params.contains("Seed: 5, Size: 64x32, Model: demo"),
        "{params}"
    );
    for (name, magic) in [("fox.jpg", &b"\xFF\xD8"[..]), ("fox.webp", &b"RIFF"[..])] {
        let path = made(name);
        let bytes = std::fs::read(&path).expect("read");
        assert!(bytes.starts_with(magic), "{name} is not in its format");
        let r = parallax::pipeline::metadata::recall_file(&path).expect("settings back");
        assert_eq!(r.source, "Parallax");
        assert_eq!(
            (r.prompt.as_deref(), r.seed, r.steps),
            (Some("a fox"), Some(5), Some(2))
        );
        let img = image::load_from_memory(&bytes).expect("decodes").to_rgb8();
        assert_eq!((img.width(), img.height()), (64, 32));
        if name.ends_with("webp") {
            assert_eq!(img.as_raw(), &want.data, "lossless WebP keeps every pixel");
        }
    }
    let gif = dir.path().join("fox.gif");
    let o = parallax(&[
        "generate",
        "--model",
        "demo",
        "--prompt",
        "x",
        "--out",
        s(&gif),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("png, jpg (jpeg) or webp"), "{}", text(&o));
    assert!(!gif.exists());
}

/// `parallax dev bench-klein` makes a whole klein image (text, steps, decode) with the tiny random
/// klein on the CPU and reports each phase; a size that is not a multiple of 16 is refused.
#[test]
fn bench_klein_times_a_whole_tiny_klein_image() {
    let out = parallax(&[
        "dev",
        "bench-klein",
        "--model",
        "random:klein-tiny",
        "--device",
        "cpu",
        "--size",
        "64",
        "--runs",
        "1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(rows.len(), 3, "{text}");
    for r in &rows[..2] {
        assert_eq!(r["image_finite"], true, "{r}");
        assert_eq!(r["image_tokens"], 16);
        assert_eq!(r["text_tokens"], 512);
        assert!(r["step_ms"].as_f64().is_some_and(|v| v > 0.0), "{r}");
    }
    assert_eq!(rows[2]["runs"], 1);
    let bad = parallax(&[
        "dev",
        "bench-klein",
        "--model",
        "random:klein-tiny",
        "--size",
        "70",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("multiple of 16"));
}

/// FLUX.2 klein through the image pipeline (`random:klein-tiny`, made-up weights, on the CPU):
/// a PNG whose settings name the model and FLUX.2's schedule, the same pixels for the same seed,
/// true CFG, and two workers (Ulysses, CFG parallel) giving the one-worker image.
#[test]
fn generate_runs_a_tiny_klein_through_the_pipeline() {
    let dir = tempfile::tempdir().expect("tmp");
    let run = |name: &str, extra: &[&str]| {
        common::generate_small(&dir.path().join(name), "random:klein-tiny", extra, &[])
            .unwrap_or_else(|e| panic!("{extra:?}: {e}"))
    };
    let (a, settings) = run("a.png", &[]);
    assert_eq!((a.width, a.height), (64, 64));
    assert_eq!(settings.model, "random:klein-tiny");
    assert_eq!(settings.steps, 2);
    assert!(
        settings.schedule.starts_with("flux2"),
        "{}",
        settings.schedule
    );
    assert!(
        settings.noise.contains("(32, H/8, W/8)"),
        "{}",
        settings.noise
    );
    assert!(settings.synthetic);
    let (b, _) = run("b.png", &[]);
    assert_eq!(a.data, b.data, "the same seed gives the same image");
    let (cfg, cfg_settings) = run("cfg.png", &["--true-cfg", "4", "--negative-prompt", "blur"]);
    assert_eq!(cfg_settings.true_cfg, 4.0);
    assert_ne!(a.data, cfg.data, "true CFG changes the image");
    // CFG parallelism (each branch on its own worker) gives the one-worker true-CFG image.
    let (cfg2, _) = run(
        "cfg2.png",
        &[
            "--true-cfg",
            "4",
            "--negative-prompt",
            "blur",
            "--devices",
            "cpu:2",
            "--cfg",
            "2",
        ],
    );
    let d = max_pixel_diff(&cfg, &cfg2);
    eprintln!("klein tiny, cfg 2 against one worker: largest difference {d} of 255");
    assert!(d <= 2, "cfg 2: {d}");
    // Two CPU workers splitting the heads (Ulysses): the one-worker image, up to rounding of
    // the attention's all-to-all order (at most 2 of 255 in any channel).
    let (u, _) = run("u.png", &["--devices", "cpu:2", "--ulysses", "2"]);
    let d = max_pixel_diff(&a, &u);
    eprintln!("klein tiny, ulysses 2 against one worker: largest difference {d} of 255");
    assert!(d <= 2, "ulysses 2: {d}");
}

/// `--lora-merge` merges the demo's LoRA into the weights: the image is the one with the LoRA
/// beside the products, up to rounding (one step of 255 at most).
#[test]
fn a_merged_lora_draws_what_the_lora_beside_draws() {
    let dir = tempfile::tempdir().expect("tmp");
    let lora = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/assets/demo/lora-polka.safetensors"
    );
    let run = |name: &str, merge: bool| {
        let out = dir.path().join(name);
        let mut args = vec![
            "generate",
            "--prompt",
            "a yellow star, on a red and blue polka background",
            "--seed",
            "3",
            "--steps",
            "4",
            "--width",
            "64",
            "--height",
            "64",
            "--quiet",
            "--lora",
            lora,
            "--out",
        ];
        let path = out.to_str().expect("utf8").to_string();
        args.push(&path);
        if merge {
            args.push("--lora-merge");
        }
        let o = parallax(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        read_png(&out).expect("png").0
    };
    let beside = run("beside.png", false);
    let merged = run("merged.png", true);
    let worst = max_pixel_diff(&beside, &merged);
    assert!(worst <= 1, "largest difference {worst} of 255");
}
