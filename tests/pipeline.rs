//! End-to-end tests of the single-device pipeline on the built-in demo model (CPU).

use candle_core::{DType, Device, Tensor};
use parallax::model::flux::{pack_latent, Flux, FluxConfig, FluxInput};
use parallax::pipeline::cache::{CachePolicy, FirstBlockCache, NoCache, StepKind};
use parallax::pipeline::image::{read_png, save_png};
use parallax::pipeline::{sampler, GenerateRequest, GenerationSettings, Pipeline, Progress};
use parallax::Error;

fn demo() -> Pipeline {
    Pipeline::demo(&Device::Cpu).expect("demo model builds")
}

fn req(seed: u64, threshold: f64) -> GenerateRequest {
    GenerateRequest {
        prompt: "a red fox in fresh snow".into(),
        width: 64,
        height: 64,
        steps: Some(6),
        seed,
        cache_threshold: threshold,
        ..Default::default()
    }
}

#[test]
fn demo_generates_labelled_image_of_requested_size() {
    let p = demo();
    let mut events = Vec::new();
    let g = p
        .generate(
            &GenerateRequest {
                width: 96,
                height: 64,
                ..req(1, 0.0)
            },
            &mut |ev| {
                events.push(match ev {
                    Progress::TextEncoded { .. } => "text".to_string(),
                    Progress::Step(s) => format!("step{}/{}", s.index + 1, s.total),
                    Progress::Decoded { .. } => "decoded".to_string(),
                });
                Ok(())
            },
        )
        .expect("generate");
    assert_eq!((g.image.width, g.image.height), (96, 64));
    assert_eq!(g.image.data.len(), 96 * 64 * 3);
    assert_eq!(
        events,
        ["text", "step1/6", "step2/6", "step3/6", "step4/6", "step5/6", "step6/6", "decoded"]
    );
    assert_eq!(g.timings.steps_ms.len(), 6);
    assert!(g.notes.iter().any(|n| n.contains("DEMO")));
    // The DEMO stamp: its black box and yellow letters are in the corner.
    assert_eq!(g.image.pixel(2, 2), [0, 0, 0]);
    let text = g.settings.png_text().expect("text");
    assert!(text
        .iter()
        .any(|(k, v)| k == "Comment" && v.contains("DEMO")));
    // Not a flat image: the pixels vary.
    let first = g.image.data[3 * (40 * 96 + 40)];
    assert!(g.image.data.iter().any(|&v| v != first));
}

#[test]
fn same_seed_same_image_different_seed_different_image() {
    let p = demo();
    let a = p.generate(&req(42, 0.0), &mut |_| Ok(())).expect("a");
    let b = p.generate(&req(42, 0.0), &mut |_| Ok(())).expect("b");
    let c = p.generate(&req(43, 0.0), &mut |_| Ok(())).expect("c");
    assert_eq!(
        a.image, b.image,
        "same seed must give the same image bit for bit"
    );
    assert_ne!(a.image, c.image);
    // The noise itself is pinned: the first values of seed 42 never change.
    let n: Vec<f32> = p
        .noise(42, 64, 64)
        .expect("noise")
        .flatten_all()
        .expect("flat")
        .to_vec1()
        .expect("vec");
    let again: Vec<f32> = p
        .noise(42, 64, 64)
        .expect("noise")
        .flatten_all()
        .expect("flat")
        .to_vec1()
        .expect("vec");
    assert_eq!(n, again);
    assert_eq!(n.len(), 16 * 8 * 8);
}

#[test]
fn prompt_changes_the_image() {
    let p = demo();
    let a = p.generate(&req(5, 0.0), &mut |_| Ok(())).expect("a");
    let mut r = req(5, 0.0);
    r.prompt = "a blue whale".into();
    let b = p.generate(&r, &mut |_| Ok(())).expect("b");
    assert_ne!(a.image, b.image);
}

#[test]
fn cache_threshold_zero_equals_plain_loop_exactly() {
    let p = demo();
    // Through the pipeline: threshold 0 is the plain loop and computes every step.
    let g = p.generate(&req(9, 0.0), &mut |_| Ok(())).expect("gen");
    assert_eq!((g.stats.computed, g.stats.reused), (6, 0));

    // The First Block Cache machinery with threshold 0 gives bit-identical latents to no cache.
    let f1 = p.flux1("test").expect("FLUX.1");
    let enc = f1.text.encode("a red fox").expect("enc");
    let noise = p.noise(9, 64, 64).expect("noise");
    let x = pack_latent(&noise).expect("pack");
    let pe = f1
        .flux
        .pos_embed(enc.txt.dim(1).expect("dim"), 4, 4)
        .expect("pe");
    let cond = sampler::Conditioning {
        txt: enc.txt.clone(),
        y: enc.vec.clone(),
    };
    let ts = parallax::pipeline::schedule::timesteps(6, 16, true);
    let run = |policy: &mut dyn CachePolicy| {
        sampler::denoise(
            f1.flux,
            &cond,
            &pe,
            x.clone(),
            &ts,
            Some(3.5),
            policy,
            &mut |_| Ok(()),
        )
        .expect("denoise")
    };
    let (plain, s_plain) = run(&mut NoCache);
    let (fbc0, s_fbc0) = run(&mut FirstBlockCache::new(0.0));
    let d = (plain - fbc0)
        .expect("sub")
        .abs()
        .expect("abs")
        .max_all()
        .expect("max")
        .to_scalar::<f32>()
        .expect("s");
    assert_eq!(d, 0.0);
    assert_eq!(s_plain.computed, 6);
    assert_eq!(s_fbc0.computed, 6);
    assert_eq!(s_fbc0.reused, 0);
    // With the cache on but never hitting, it measured a diff from step 2 on.
    assert!(matches!(s_fbc0.steps[0], StepKind::Computed { diff: None }));
    assert!(matches!(s_fbc0.steps[1], StepKind::Computed { diff: Some(d) } if d > 0.0));
}

#[test]
fn high_threshold_skips_steps_and_says_so() {
    let p = demo();
    let plain = p.generate(&req(11, 0.0), &mut |_| Ok(())).expect("plain");
    let mut reused_events = 0;
    let cached = p
        .generate(&req(11, 1e9), &mut |ev| {
            if let Progress::Step(s) = ev {
                if s.kind.is_reused() {
                    reused_events += 1;
                }
            }
            Ok(())
        })
        .expect("cached");
    // The first step has nothing to compare with, so it is computed; every later one is reused.
    assert_eq!(cached.stats.computed, 1);
    assert_eq!(cached.stats.reused, 5);
    assert_eq!(reused_events, 5);
    assert_eq!(
        parallax::pipeline::step_pattern(&cached.stats.steps),
        "CRRRRR"
    );
    assert!(parallax::pipeline::describe_cache(&cached.stats).contains("5 reused"));
    // Reusing residuals is an approximation: the image changes.
    assert_ne!(plain.image, cached.image);
}

#[test]
fn moderate_threshold_reuses_some_but_not_all() {
    let p = demo();
    // Measure the step-to-step diffs with the cache on but never hitting, then pick a threshold
    // between the smallest and largest: some steps must be reused, some computed.
    let probe = p
        .generate(
            &GenerateRequest {
                steps: Some(8),
                ..req(3, 1e-12)
            },
            &mut |_| Ok(()),
        )
        .expect("probe");
    let diffs: Vec<f64> = probe
        .stats
        .steps
        .iter()
        .filter_map(|k| match k {
            StepKind::Computed { diff } => *diff,
            StepKind::Reused { diff } => Some(*diff),
        })
        .collect();
    assert_eq!(diffs.len(), 7);
    let lo = diffs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = diffs.iter().copied().fold(0.0, f64::max);
    assert!(lo < hi, "diffs {diffs:?}");
    let thr = (lo + hi) / 2.0;
    let g = p
        .generate(
            &GenerateRequest {
                steps: Some(8),
                ..req(3, thr)
            },
            &mut |_| Ok(()),
        )
        .expect("gen");
    assert!(g.stats.reused >= 1, "{:?}", g.stats);
    assert!(g.stats.computed >= 2, "{:?}", g.stats);
    assert_eq!(g.stats.computed + g.stats.reused, 8);
}

#[test]
fn png_metadata_round_trip_reproduces_the_image() {
    let p = demo();
    let mut r = req(77, 0.05);
    r.prompt = "Ünïcödé prompt — «quotes», emoji 🦊".into();
    r.negative_prompt = Some("blurry".into());
    let g = p.generate(&r, &mut |_| Ok(())).expect("gen");
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("out.png");
    save_png(&path, &g.image, &g.settings.png_text().expect("text")).expect("save");
    let (img, text) = read_png(&path).expect("read");
    assert_eq!(img, g.image);
    let settings = GenerationSettings::from_png_text(&text).expect("settings");
    assert_eq!(settings, g.settings);
    assert_eq!(settings.negative_prompt.as_deref(), Some("blurry"));
    // Regenerating from the stored settings gives the same pixels.
    let again = p
        .generate(&settings.to_request(), &mut |_| Ok(()))
        .expect("again");
    assert_eq!(again.image, g.image);
    assert!(g.notes.iter().any(|n| n.contains("negative prompt")));
}

#[test]
fn bad_settings_are_rejected_with_the_value_named() {
    let p = demo();
    let cases: Vec<(GenerateRequest, &str)> = vec![
        (
            GenerateRequest {
                width: 100,
                ..req(1, 0.0)
            },
            "width",
        ),
        (
            GenerateRequest {
                height: 0,
                ..req(1, 0.0)
            },
            "height",
        ),
        (
            GenerateRequest {
                steps: Some(0),
                ..req(1, 0.0)
            },
            "steps",
        ),
        (
            GenerateRequest {
                guidance: Some(f64::NAN),
                ..req(1, 0.0)
            },
            "guidance",
        ),
        (
            GenerateRequest {
                cache_threshold: -0.1,
                ..req(1, 0.0)
            },
            "cache-threshold",
        ),
    ];
    for (r, name) in cases {
        match p.generate(&r, &mut |_| Ok(())) {
            Err(Error::InvalidSetting { name: n, .. }) => assert_eq!(n, name),
            other => panic!("expected an InvalidSetting error for {name}, got {other:?}"),
        }
    }
}

#[test]
fn cancelling_stops_at_the_next_step() {
    let p = demo();
    let mut seen = 0;
    let r = p.generate(&req(1, 0.0), &mut |ev| {
        if let Progress::Step(_) = ev {
            seen += 1;
            if seen == 2 {
                return Err(Error::Cancelled);
            }
        }
        Ok(())
    });
    assert!(matches!(r, Err(Error::Cancelled)));
    assert_eq!(seen, 2);
}

#[test]
fn long_prompt_is_truncated_and_reported() {
    let p = demo();
    let long = "a very long prompt about many things ".repeat(20);
    let g = p
        .generate(
            &GenerateRequest {
                prompt: long,
                ..req(1, 0.0)
            },
            &mut |_| Ok(()),
        )
        .expect("gen");
    assert!(
        g.notes.iter().any(|n| n.contains("truncat")),
        "notes: {:?}",
        g.notes
    );
}

#[test]
fn flux_forward_is_batch_consistent() {
    // Two images in one batch give the same velocities as each alone.
    let dev = Device::Cpu;
    let cfg = FluxConfig::tiny();
    let m = Flux::new(
        &cfg,
        parallax::model::demo_weights::DemoWeights::new(1).var_builder(DType::F32, &dev),
    )
    .expect("flux");
    // Inputs from a fixed seed (the same on every run).
    let mut rng = parallax::model::rng::SplitMix64::new(8);
    let mut normal = |shape: &[usize]| {
        let n = shape.iter().product();
        Tensor::from_vec(rng.normals(n), shape, &dev).expect("inputs")
    };
    let img = normal(&[2, 16, 64]);
    let txt = normal(&[2, 4, cfg.context_in_dim]);
    let y = normal(&[2, cfg.vec_in_dim]);
    let t = Tensor::new(&[0.3f32, 0.9], &dev).expect("t");
    let g = Tensor::new(&[3.5f32, 2.0], &dev).expect("g");
    let pe = m.pos_embed(4, 4, 4).expect("pe");
    let both = m
        .forward(&FluxInput {
            img: &img,
            txt: &txt,
            y: &y,
            timesteps: &t,
            guidance: Some(&g),
            pe: &pe,
        })
        .expect("fwd");
    for i in 0..2 {
        let one = |x: &Tensor| x.narrow(0, i, 1).expect("narrow");
        let alone = m
            .forward(&FluxInput {
                img: &one(&img),
                txt: &one(&txt),
                y: &one(&y),
                timesteps: &one(&t),
                guidance: Some(&one(&g)),
                pe: &pe,
            })
            .expect("fwd1");
        let d = (one(&both) - alone)
            .expect("d")
            .abs()
            .expect("a")
            .max_all()
            .expect("m")
            .to_scalar::<f32>()
            .expect("s");
        assert!(d < 1e-4, "batch item {i} differs by {d}");
    }
}

#[test]
fn true_cfg_is_exact_where_it_must_be_and_changes_the_image_otherwise() {
    let p = demo();
    let base = p.generate(&req(8, 0.0), &mut |_| Ok(())).expect("base");
    // Negative prompt equal to the prompt: v_neg == v_pos, so any scale gives the plain result.
    let same = GenerateRequest {
        negative_prompt: Some(req(8, 0.0).prompt),
        true_cfg: Some(4.0),
        ..req(8, 0.0)
    };
    let g = p.generate(&same, &mut |_| Ok(())).expect("same");
    assert_eq!(g.image, base.image);
    assert!(
        g.notes.iter().any(|n| n.contains("true CFG 4")),
        "{:?}",
        g.notes
    );
    // Scale 1 is off, whatever the negative prompt.
    let off = GenerateRequest {
        negative_prompt: Some("blurry, low quality".into()),
        true_cfg: Some(1.0),
        ..req(8, 0.0)
    };
    assert_eq!(
        p.generate(&off, &mut |_| Ok(())).expect("off").image,
        base.image
    );
    // A real negative prompt with scale > 1 steers the image.
    let on = GenerateRequest {
        true_cfg: Some(3.0),
        ..off
    };
    let g = p.generate(&on, &mut |_| Ok(())).expect("on");
    assert_ne!(g.image, base.image);
    assert_eq!(g.settings.true_cfg, 3.0);
    // Below 1 is refused.
    let bad = GenerateRequest {
        true_cfg: Some(0.5),
        ..req(8, 0.0)
    };
    assert!(matches!(
        p.generate(&bad, &mut |_| Ok(())),
        Err(Error::InvalidSetting { .. })
    ));
}
