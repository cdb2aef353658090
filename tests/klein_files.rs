//! FLUX.2 klein from files: `random:klein-tiny` written to disk in both of klein's layouts
//! (`parallax::model::klein_export::write_tiny`: a diffusers folder with a Qwen3 `text_encoder/`
//! and a `tokenizer/tokenizer.json`, and Black Forest Labs' single transformer file with its parts
//! beside it or named apart) runs through `parallax generate --model <dir or file>` on the CPU,
//! on one worker and on two (Ulysses), and makes the image the built-in `random:klein-tiny` makes
//! in process; a missing part is named with the option that supplies it; the Hugging Face cache
//! lists and resolves klein's repos.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use candle_core::{DType, Device};
use common::{max_pixel_diff, s, text};
use parallax::model::export::ExportLayout;
use parallax::model::klein::text::KleinTextEncoder;
use parallax::model::klein::Klein;
use parallax::model::klein_export::{write_tiny, TINY_BFL_FILE};
use parallax::model::layout::{self, ModelSpec};
use parallax::model::linear::Fp8Groups;
use parallax::model::text::T5Residency;
use parallax::pipeline::image::RgbImage;
use parallax::pipeline::{GenerateRequest, GenerationSettings, LoadOptions, Pipeline};

fn parallax(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_parallax"))
        .args(args)
        .env_remove("HF_HUB_CACHE")
        .output()
        .expect("run parallax")
}

const PROMPT: &str = "a red fox";

/// `random:klein-tiny`'s image in this process: 64 px, 2 steps, seed 7.
fn in_process() -> RgbImage {
    let r = layout::resolve("random:klein-tiny", None).expect("resolve");
    let p = Pipeline::load(&r, "random:klein-tiny", DType::F32, &Device::Cpu).expect("load");
    let req = GenerateRequest {
        prompt: PROMPT.into(),
        width: 64,
        height: 64,
        steps: Some(2),
        seed: 7,
        ..GenerateRequest::default()
    };
    p.generate(&req, &mut |_| Ok(())).expect("generate").image
}

/// `parallax generate` on `model` with the in-process run's settings and `extra` options.
fn generate(
    out: &Path,
    model: &str,
    extra: &[&str],
) -> Result<(RgbImage, GenerationSettings), String> {
    common::generate_small(out, model, extra, &[])
}

#[test]
fn klein_from_a_diffusers_folder_makes_the_random_klein_tiny_image() {
    let dir = tempfile::tempdir().expect("tmp");
    let model = dir.path().join("klein");
    write_tiny(&model, ExportLayout::Diffusers).expect("write");
    let r = layout::resolve(s(&model), None).expect("resolve");
    let ModelSpec::Klein(f) = &r.spec else {
        panic!("not resolved as klein: {:?}", r.spec)
    };
    assert!(f.distilled && f.demo, "{f:?}");
    assert_eq!(
        f.config().expect("config"),
        parallax::model::klein::KleinConfig::tiny()
    );

    let want = in_process();
    let (lo, hi) = (want.data.iter().min(), want.data.iter().max());
    assert!(lo < hi, "a flat image would match anything");
    let (one, settings) =
        generate(&dir.path().join("one.png"), s(&model), &[]).expect("one worker");
    assert_eq!(settings.model, s(&model));
    assert!(
        settings.schedule.starts_with("flux2"),
        "{}",
        settings.schedule
    );
    assert!(settings.synthetic, "made-up weights are labelled");
    let d = max_pixel_diff(&want, &one);
    eprintln!("klein diffusers folder against random:klein-tiny in process: {d} of 255");
    // The same weights; the autoencoder's deviation is sqrt((1 - eps) + eps) read back from
    // the file rather than 1 made in code.
    assert!(d <= 1, "diffusers folder: {d}");

    // Two CPU workers splitting the heads (Ulysses).
    let (two, _) = generate(
        &dir.path().join("two.png"),
        s(&model),
        &["--devices", "cpu:2", "--ulysses", "2"],
    )
    .expect("two workers");
    let d = max_pixel_diff(&one, &two);
    eprintln!("klein diffusers folder, ulysses 2 against one worker: {d} of 255");
    assert!(d <= 2, "ulysses 2: {d}");

    // `parallax info` describes it as klein.
    let o = parallax(&["info", "--model", s(&model)]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("FLUX.2 klein, distilled"), "{}", text(&o));
}

#[test]
fn klein_from_a_bfl_file_finds_or_is_told_its_parts() {
    let dir = tempfile::tempdir().expect("tmp");
    let model = dir.path().join("bfl");
    write_tiny(&model, ExportLayout::Bfl).expect("write");
    let file = model.join(TINY_BFL_FILE);
    let want = in_process();

    // Parts beside the file: found.
    let (img, _) = generate(&dir.path().join("beside.png"), s(&file), &[]).expect("beside");
    let d = max_pixel_diff(&want, &img);
    eprintln!("klein BFL file against random:klein-tiny in process: {d} of 255");
    assert!(d <= 1, "BFL file: {d}");

    // The text encoder and the autoencoder moved away: each missing part is named with the
    // option that supplies it.
    let qwen = dir.path().join("qwen");
    std::fs::create_dir_all(&qwen).expect("mkdir");
    for part in ["text_encoder", "tokenizer"] {
        std::fs::rename(model.join(part), qwen.join(part)).expect("move");
    }
    let err = generate(&dir.path().join("x.png"), s(&file), &[]).expect_err("no text encoder");
    assert!(
        err.contains("FLUX.2 klein transformer; it needs a Qwen3 text encoder")
            && err.contains("--text-encoders"),
        "{err}"
    );
    let ae = dir.path().join("ae-elsewhere.safetensors");
    std::fs::rename(model.join("ae.safetensors"), &ae).expect("move");
    let err = generate(
        &dir.path().join("x.png"),
        s(&file),
        &["--text-encoders", s(&qwen)],
    )
    .expect_err("no autoencoder");
    assert!(err.contains("--vae"), "{err}");

    // Named apart: the folder holding text_encoder/ and tokenizer/, or Qwen3's own folder
    // (its tokenizer/ beside it).
    let (img, _) = generate(
        &dir.path().join("named.png"),
        s(&file),
        &["--text-encoders", s(&qwen), "--vae", s(&ae)],
    )
    .expect("named");
    let d = max_pixel_diff(&want, &img);
    assert!(d <= 1, "named apart: {d}");
    let (own, _) = generate(
        &dir.path().join("own.png"),
        s(&file),
        &[
            "--text-encoders",
            s(&qwen.join("text_encoder")),
            "--vae",
            s(&ae),
        ],
    )
    .expect("Qwen3's own folder");
    assert_eq!(img.data, own.data);

    // A FLUX.1 autoencoder where klein's belongs is refused by name.
    let flux1 = dir.path().join("flux1");
    parallax::model::export::write_demo_model(
        &flux1,
        ExportLayout::Bfl,
        parallax::model::export::DemoSource::Trained,
    )
    .expect("demo");
    let err = generate(
        &dir.path().join("x.png"),
        s(&file),
        &[
            "--text-encoders",
            s(&qwen),
            "--vae",
            s(&flux1.join("ae.safetensors")),
        ],
    )
    .expect_err("FLUX.1's autoencoder");
    assert!(err.contains("not a FLUX.2 autoencoder"), "{err}");
}

#[test]
fn the_hugging_face_cache_lists_and_resolves_klein_repos() {
    let cache = tempfile::tempdir().expect("tmp");
    let repos = [
        "black-forest-labs/FLUX.2-klein-4B",
        "black-forest-labs/FLUX.2-klein-9B",
        "black-forest-labs/FLUX.2-klein-base-4B",
        "black-forest-labs/FLUX.2-klein-base-9B",
    ];
    for repo in repos {
        let folder = layout::hf_cache_repo_dir(cache.path(), repo);
        let snap = folder.join("snapshots").join("abc123");
        write_tiny(&snap, ExportLayout::Diffusers).expect("write");
        std::fs::create_dir_all(folder.join("refs")).expect("refs");
        std::fs::write(folder.join("refs").join("main"), "abc123\n").expect("ref");
        if repo.contains("base") {
            // A Base checkpoint's model_index.json says it is not distilled.
            let index = snap.join("model_index.json");
            let text = std::fs::read_to_string(&index).expect("index");
            std::fs::write(
                &index,
                text.replace("\"is_distilled\": true", "\"is_distilled\": false"),
            )
            .expect("index");
        }
    }
    // The env var is process-wide: this is the only test of this binary that sets it.
    std::env::set_var("HF_HUB_CACHE", cache.path());
    let listed: Vec<String> = layout::list_hf_cache()
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    let mut want: Vec<String> = repos.iter().map(|r| r.to_string()).collect();
    want.sort();
    assert_eq!(listed, want);
    for repo in repos {
        let r = layout::resolve(repo, None).expect(repo);
        let ModelSpec::Klein(f) = &r.spec else {
            panic!("{repo}: not resolved as klein: {:?}", r.spec)
        };
        assert_eq!(f.distilled, !repo.contains("base"), "{repo}");
        assert_eq!(
            f.default_steps(),
            if f.distilled { 4 } else { 50 },
            "{repo}"
        );
        assert!(
            f.transformer.ends_with("snapshots/abc123/transformer"),
            "{repo}"
        );
    }
    std::env::remove_var("HF_HUB_CACHE");
}

/// `req` at 64 px, 2 steps, seed 7 for `prompt`.
fn request(prompt: &str) -> GenerateRequest {
    GenerateRequest {
        prompt: prompt.into(),
        width: 64,
        height: 64,
        steps: Some(2),
        seed: 7,
        ..GenerateRequest::default()
    }
}

/// klein's files loaded as `opts` say.
fn load_with(model: &Path, opts: LoadOptions) -> Pipeline {
    let r = layout::resolve(s(model), None).expect("resolve");
    Pipeline::load_with(&r, "klein", DType::F32, &Device::Cpu, opts).expect("load")
}

fn qwen3(p: &Pipeline) -> &KleinTextEncoder {
    p.model
        .text
        .as_any()
        .and_then(|a| a.downcast_ref())
        .expect("klein's text encoder")
}

fn transformer(p: &Pipeline) -> &Klein {
    p.model
        .denoiser
        .as_any()
        .and_then(|a| a.downcast_ref())
        .expect("klein's transformer")
}

/// What a memory budget asks of klein's loader, from the tiny files: Qwen3 built for each prompt
/// and freed after it gives the images of Qwen3 kept, prompt after prompt, and is built once per
/// job (never kept between them: the loader's count of builds); FP8 without the bf16 copies
/// (every block converted as it loads) holds no copy beside an E4M3 weight and gives the image of
/// FP8 with the copies kept, to the byte. On the CPU no copy exists either way (the simulation
/// holds the rounded weights only); on a GPU the same `Lin::lean` FLUX.1 uses drops them.
#[test]
fn klein_files_load_qwen3_on_demand_and_lean_fp8_with_the_same_images() {
    let dir = tempfile::tempdir().expect("tmp");
    let model = dir.path().join("klein");
    write_tiny(&model, ExportLayout::Diffusers).expect("write");

    let kept = load_with(&model, LoadOptions::default());
    let lazy = load_with(
        &model,
        LoadOptions {
            t5: T5Residency::OnDemand,
            ..Default::default()
        },
    );
    assert_eq!(qwen3(&kept).residency(), T5Residency::Resident);
    assert_eq!(qwen3(&lazy).residency(), T5Residency::OnDemand);
    assert_eq!(
        qwen3(&lazy).builds(),
        0,
        "nothing built before the first prompt"
    );
    for (job, prompt) in [PROMPT, "a hare in the snow", PROMPT].iter().enumerate() {
        let a = kept
            .generate(&request(prompt), &mut |_| Ok(()))
            .expect("kept");
        let b = lazy
            .generate(&request(prompt), &mut |_| Ok(()))
            .expect("on demand");
        assert_eq!(a.image.data, b.image.data, "{prompt}");
        // One build for each job: the Qwen3 of the last job was not kept for this one.
        assert_eq!(qwen3(&lazy).builds(), job + 1);
        assert_eq!(qwen3(&kept).builds(), 0);
    }

    let fp8 = |lean| {
        load_with(
            &model,
            LoadOptions {
                fp8: Fp8Groups::ALL,
                lean,
                ..Default::default()
            },
        )
    };
    let (copies, lean) = (fp8(false), fp8(true));
    let cfg = transformer(&lean).config().clone();
    assert_eq!(
        transformer(&lean).fp8_layers(),
        8 * cfg.depth + 2 * cfg.depth_single_blocks
    );
    assert_eq!(transformer(&lean).fp8_copies_kept(), 0);
    assert_eq!(
        transformer(&lean).weight_bytes(),
        transformer(&copies).weight_bytes()
    );
    let a = copies
        .generate(&request(PROMPT), &mut |_| Ok(()))
        .expect("copies");
    let b = lean
        .generate(&request(PROMPT), &mut |_| Ok(()))
        .expect("lean");
    assert_eq!(a.image.data, b.image.data);
    // FP8 changed the image (the products were converted), within FP8's error.
    let bf16 = kept
        .generate(&request(PROMPT), &mut |_| Ok(()))
        .expect("kept");
    assert_ne!(a.image.data, bf16.image.data);
}

/// `file`'s tensors written again with `extra` tensors added (f32 values of the given shapes).
fn with_tensors(file: &Path, extra: &[(&str, Vec<usize>)]) {
    use safetensors::tensor::TensorView;
    let bytes = std::fs::read(file).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let added: Vec<(String, Vec<usize>, Vec<u8>)> = extra
        .iter()
        .map(|(n, shape)| {
            let count: usize = shape.iter().product();
            let v: Vec<u8> = (0..count).flat_map(|_| 0.01f32.to_le_bytes()).collect();
            (n.to_string(), shape.clone(), v)
        })
        .collect();
    let mut views: Vec<(String, TensorView)> = st.tensors();
    for (n, shape, v) in &added {
        let view = TensorView::new(safetensors::Dtype::F32, shape.clone(), v).expect("view");
        views.push((n.clone(), view));
    }
    let out = safetensors::tensor::serialize(views, None).expect("serialise");
    std::fs::write(file, out).expect("write");
}

/// FP8 klein single files as people share them, written from the tiny klein by the writer
/// FLUX.1's FP8 files come from (`export::write_fp8`): ComfyUI's scaled form (a scale and an
/// input scale per matrix, the `scaled_fp8` marker, `model.diffusion_model.` names) and a plain
/// E4M3 cast. Each loads dequantised in the run's dtype and, under `--precision fp8`, as FP8
/// products; both images stay near the full-precision file's. Scales laid out otherwise
/// (block-wise, or a scale under a name not read here) are refused in words.
#[test]
fn klein_fp8_files_load_dequantised_or_as_fp8_products() {
    use parallax::model::klein_export::write_tiny_fp8;
    use parallax::model::weights::SafetensorsSet;
    use parallax::pipeline::metrics;
    let dir = tempfile::tempdir().expect("tmp");
    let model = dir.path().join("bfl");
    write_tiny(&model, ExportLayout::Bfl).expect("write");
    let want = load_with(&model.join(TINY_BFL_FILE), LoadOptions::default())
        .generate(&request(PROMPT), &mut |_| Ok(()))
        .expect("full precision");
    let fp8_opts = LoadOptions {
        fp8: Fp8Groups::ALL,
        lean: true,
        ..Default::default()
    };
    let mut measured = Vec::new();
    for scaled in [true, false] {
        let file = write_tiny_fp8(&model, scaled).expect("fp8 file");
        let set = SafetensorsSet::open(&file).expect("open");
        let (e4m3, _, scales, marker) = set.fp8_summary();
        assert!(e4m3 > 20, "{e4m3} matrices in E4M3");
        // A scale for each matrix; the marker is an (empty) E4M3 tensor too.
        let matrices = e4m3 - usize::from(scaled);
        assert_eq!(
            (scales, marker),
            (if scaled { matrices } else { 0 }, scaled)
        );
        for opts in [LoadOptions::default(), fp8_opts] {
            let p = load_with(&file, opts);
            assert_eq!(
                transformer(&p).fp8_layers() > 0,
                opts.fp8 != Fp8Groups::NONE
            );
            let img = p
                .generate(&request(PROMPT), &mut |_| Ok(()))
                .expect("fp8 file");
            let q = metrics::quality(&img.image, &want.image).expect("quality");
            let d = max_pixel_diff(&want.image, &img.image);
            eprintln!(
                "klein FP8 file (scaled {scaled}, FP8 products {}): {:.1} dB, max {d} of 255",
                opts.fp8 != Fp8Groups::NONE,
                q.psnr_db
            );
            measured.push(q.psnr_db);
        }
    }
    // Measured 39.1 / 39.0 dB (scaled; dequantised / FP8 products) and 38.5 / 37.9 dB (plain
    // cast), at most 19 of 255 on a pixel: the tiny model's weights sit in E4M3's normal range.
    assert!(measured.iter().all(|&db| db > 35.0), "{measured:?}");

    // Block-wise scales and scales under other names are refused, naming the tensor.
    let w = "double_blocks.0.img_attn.qkv";
    let refused = |name: String, shape: Vec<usize>| -> String {
        let file = write_tiny_fp8(&model, false).expect("fp8 file");
        with_tensors(&file, &[(&name, shape)]);
        let r = layout::resolve(s(&file), None).expect("resolve");
        match Pipeline::load_with(
            &r,
            "klein",
            DType::F32,
            &Device::Cpu,
            LoadOptions::default(),
        ) {
            Ok(_) => panic!("{name} was not refused"),
            Err(e) => e.to_string(),
        }
    };
    let e = refused(format!("{w}.weight_scale_inv"), vec![1, 1]);
    assert!(
        e.contains(&format!("`{w}.weight_scale_inv` scales it")),
        "{e}"
    );
    assert!(e.contains("per-tensor scaled FP8 file"), "{e}");
    let e = refused(format!("{w}.weight_scale"), vec![2, 3]);
    assert!(e.contains("block-wise scales are not read"), "{e}");
}

/// Issue 30's cold start for klein: the first job's prompts (here with true CFG, so a negative
/// prompt too) encoded by Qwen3 while the transformer and the autoencoder load make the very
/// image of a load that encodes them in the job, in process through the loader `generate` uses
/// and through `parallax generate` with the overlap on and off; later jobs encode their own.
#[test]
fn klein_prompts_encoded_while_loading_give_the_same_image() {
    use parallax::engine::load::load_pipeline_ahead;
    use parallax::engine::ModelChoice;
    use parallax::pipeline::ahead::prompts_of;
    let dir = tempfile::tempdir().expect("tmp");
    let model = dir.path().join("klein");
    write_tiny(&model, ExportLayout::Diffusers).expect("write");
    let choice = ModelChoice::named(s(&model));
    let req = GenerateRequest {
        negative_prompt: Some("green".into()),
        true_cfg: Some(2.0),
        ..request(PROMPT)
    };
    let ahead = prompts_of(&req);
    assert_eq!(ahead.len(), 2);
    let overlapped = load_pipeline_ahead(&choice, "cpu", None, &ahead).expect("load ahead");
    assert_eq!(
        overlapped.ahead.len(),
        2,
        "both prompts encoded during the load"
    );
    let plain = load_pipeline_ahead(&choice, "cpu", None, &[]).expect("load");
    assert!(plain.ahead.is_empty());
    assert_eq!(qwen3(&overlapped).residency(), T5Residency::Resident);

    let g1 = overlapped
        .generate(&req, &mut |_| Ok(()))
        .expect("overlapped");
    assert!(overlapped.ahead.is_empty(), "the job took them");
    let g2 = plain.generate(&req, &mut |_| Ok(())).expect("plain");
    let (lo, hi) = (g2.image.data.iter().min(), g2.image.data.iter().max());
    assert!(lo < hi, "a flat image would match anything");
    assert_eq!(g1.image.data, g2.image.data, "identical images");
    assert_eq!(g1.notes, g2.notes);
    let g3 = overlapped.generate(&req, &mut |_| Ok(())).expect("again");
    assert_eq!(g3.image.data, g2.image.data);

    // `parallax generate`, the overlap on (the default) and off: the same PNG pixels.
    let run = |name: &str, overlap_off: &str| {
        let env = [("PARALLAX_NO_LOAD_OVERLAP", overlap_off)];
        common::generate_small(&dir.path().join(name), s(&model), &[], &env)
    };
    let (img_on, _) = run("on.png", "0").expect("overlap on");
    let (img_off, _) = run("off.png", "1").expect("overlap off");
    assert_eq!(img_on.data, img_off.data, "the overlap changes no pixel");
    let (lo, hi) = (img_on.data.iter().min(), img_on.data.iter().max());
    assert!(lo < hi, "a flat image would match anything");
}

/// Qwen3 built for each prompt (a memory plan's choice, so Qwen3 and the transformer are never
/// on the device together): nothing is encoded, nor Qwen3 built, while the transformer loads;
/// the job encodes its prompt itself, to the same image.
#[test]
fn klein_qwen3_built_per_prompt_is_not_encoded_during_the_load() {
    use parallax::engine::overlap::load_text_first;
    use parallax::pipeline::ahead::KleinTextFirst;
    let dir = tempfile::tempdir().expect("tmp");
    let model = dir.path().join("klein");
    write_tiny(&model, ExportLayout::Diffusers).expect("write");
    let r = layout::resolve(s(&model), None).expect("resolve");
    let ModelSpec::Klein(files) = &r.spec else {
        panic!("not resolved as klein: {:?}", r.spec)
    };
    let prompts = [PROMPT.to_string()];
    let load = |t5| {
        let opts = LoadOptions {
            t5,
            ..Default::default()
        };
        let first =
            KleinTextFirst::load(files, "klein", DType::F32, &Device::Cpu, opts).expect("Qwen3");
        load_text_first(first, &prompts).expect("load")
    };
    let (resident, on_demand) = (load(T5Residency::Resident), load(T5Residency::OnDemand));
    assert_eq!(resident.ahead.len(), 1);
    assert!(
        on_demand.ahead.is_empty(),
        "Qwen3 built per prompt: nothing ahead"
    );
    assert_eq!(
        qwen3(&on_demand).builds(),
        0,
        "Qwen3 not built during the load"
    );
    let a = resident
        .generate(&request(PROMPT), &mut |_| Ok(()))
        .expect("resident");
    let b = on_demand
        .generate(&request(PROMPT), &mut |_| Ok(()))
        .expect("on demand");
    assert_eq!(qwen3(&on_demand).builds(), 1);
    assert_eq!(a.image.data, b.image.data);
}

/// `load_pipeline_ahead` on `model` with a prompt to encode while it loads, on a thread of its
/// own: its result, or a failure if it does not come back within two minutes (a hang).
fn load_ahead_within_a_bound(model: &Path) -> parallax::Result<()> {
    use parallax::engine::load::load_pipeline_ahead;
    let choice = parallax::engine::ModelChoice::named(s(model));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = load_pipeline_ahead(&choice, "cpu", None, &[PROMPT.to_string()]);
        let _ = tx.send(r.map(|_| ()));
    });
    rx.recv_timeout(std::time::Duration::from_secs(120))
        .expect("the load came back (no hang)")
}

/// A damaged Qwen3 file, with a prompt to encode while the transformer loads: the load fails at
/// once with an error naming the file (Qwen3 loads first), not a hang or a panic. A damaged
/// autoencoder, read while Qwen3 encodes on the other thread, fails the load the same way once
/// the encoding thread has stopped.
#[test]
fn a_damaged_qwen3_fails_the_overlapped_klein_load_clearly() {
    let dir = tempfile::tempdir().expect("tmp");
    let model = dir.path().join("klein");
    write_tiny(&model, ExportLayout::Diffusers).expect("write");
    let qwen = model.join("text_encoder").join("model.safetensors");
    let good = std::fs::read(&qwen).expect("read");
    std::fs::write(&qwen, b"not a safetensors file at all").expect("damage");
    let e = load_ahead_within_a_bound(&model).expect_err("a damaged Qwen3 fails the load");
    eprintln!("damaged Qwen3: {e}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
    assert!(e.to_string().contains("text_encoder"), "{e}");

    std::fs::write(&qwen, good).expect("mend");
    let vae = std::fs::read_dir(model.join("vae"))
        .expect("vae folder")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .expect("the autoencoder's file");
    std::fs::write(&vae, b"not a safetensors file either").expect("damage");
    let e = load_ahead_within_a_bound(&model).expect_err("a damaged autoencoder fails the load");
    eprintln!("damaged autoencoder: {e}");
    assert!(e.to_string().contains("vae"), "{e}");
}
