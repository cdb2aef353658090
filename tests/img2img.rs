//! Image-to-image and inpainting (issue 29 part 2).
//!
//! Against diffusers: `scripts/img2img-reference.py` built a tiny FLUX.1 transformer and
//! autoencoder in diffusers' layouts with seeded weights, ran `FluxImg2ImgPipeline` and
//! `FluxInpaintPipeline` in f32 on the CPU from given prompt embeddings and noise (the posterior
//! mean as the source latent), and stored weights, inputs and images in
//! `tests/fixtures/img2img/`. The same weights and noise here give the same images within 1/255.
//!
//! On the demo model: every parallel layout, cache policy and the simulated FP8 path, and a
//! repaint of one object of a demo scene checked with the scorer.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use parallax::model::flux::{unpack_latent, Flux};
use parallax::model::layout::{ModelFiles, TransformerLayout, VaeLayout};
use parallax::model::vae::AutoEncoder;
use parallax::pipeline::img2img::{self, InitImage};
use parallax::pipeline::sampler::Conditioning;
use parallax::pipeline::{self, cache::CacheSpec, schedule, DenoiseJob};

const WIDTH: usize = 80;
const HEIGHT: usize = 48;
const GUIDANCE: f64 = 3.5;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/img2img")
}

fn reference() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir().join("reference.safetensors"), &Device::Cpu)
        .expect("reference fixture")
}

/// The fixture's transformer and autoencoder, read as a diffusers folder is.
fn tiny_models() -> (Flux, AutoEncoder) {
    let dir = fixture_dir();
    let files = ModelFiles {
        transformer: dir.join("transformer"),
        transformer_layout: TransformerLayout::Diffusers,
        vae: dir.join("vae"),
        vae_layout: VaeLayout::Diffusers,
        text: parallax::model::text::TextEncoderPaths::diffusers(&dir),
        demo: false,
    };
    let (flux, _) =
        pipeline::load_transformer(&files, DType::F32, &Device::Cpu).expect("transformer");
    let vae = pipeline::load_vae(&files, DType::F32, &Device::Cpu).expect("autoencoder");
    assert!(vae.has_encoder());
    (flux, vae)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("max |a - b|")
}

fn init(strength: f64, mask: bool) -> InitImage {
    InitImage {
        image: fixture_dir().join("source.png"),
        strength,
        mask: mask.then(|| fixture_dir().join("mask.png")),
    }
}

/// The fixture's run through Parallax's image-to-image: the image in [0, 1], (1, 3, H, W).
fn run_fixture(steps: usize, init: &InitImage) -> Tensor {
    let (flux, vae) = tiny_models();
    let f = reference();
    let (lh, lw) = (HEIGHT / 8, WIDTH / 8);
    let ts = schedule::timesteps(steps, (lh / 2) * (lw / 2), true);
    let mut notes = Vec::new();
    let entered = img2img::start(
        &vae,
        &Device::Cpu,
        init,
        (WIDTH, HEIGHT),
        &f["noise"],
        &ts,
        &mut notes,
    )
    .expect("enter");
    assert!(notes.is_empty(), "{notes:?}");
    let txt = &f["prompt_embeds"];
    let job = DenoiseJob {
        cond: Conditioning {
            txt: txt.clone(),
            y: f["pooled_prompt_embeds"].clone(),
        },
        neg: None,
        true_cfg: 1.0,
        pe: flux
            .pos_embed(txt.dim(1).expect("len"), lh / 2, lw / 2)
            .expect("rope"),
        x: entered.x,
        timesteps: entered.timesteps,
        guidance: GUIDANCE,
        cache: CacheSpec::None,
        magcache: None,
        blend: entered.blend,
    };
    let (x, stats) = pipeline::denoise(&flux, &job, None, &mut |_| Ok(())).expect("denoise");
    assert_eq!(
        stats.computed,
        steps - img2img::start_step(steps, init.strength)
    );
    let image = vae
        .decode(&unpack_latent(&x, lh, lw).expect("unpack"))
        .expect("decode");
    ((image / 2.0).expect("half") + 0.5)
        .expect("shift")
        .clamp(0f32, 1f32)
        .expect("clamp")
}

#[test]
fn the_source_latent_is_diffusers_posterior_mean() {
    let (_, vae) = tiny_models();
    let src = img2img::load_source(&init(0.5, false), WIDTH, HEIGHT).expect("source");
    let latent = vae.encode(&src.image).expect("encode");
    let want = &reference()["source_latent"];
    let d = max_abs_diff(&latent, want);
    eprintln!("source latent: max |diff| {d:e}");
    assert!(d < 1e-4, "{d}");
}

#[test]
fn image_to_image_matches_diffusers() {
    // 4 steps at strength 0.6: diffusers skips int(4 - 2.4) = 1 step and runs 3.
    let got = run_fixture(4, &init(0.6, false));
    let want = &reference()["img2img"];
    let d = max_abs_diff(&got, want);
    eprintln!("img2img: max |diff| {d:e} (1/255 = {:e})", 1.0 / 255.0);
    assert!(d <= 1.0 / 255.0, "{d}");
    // The comparison means something: the image is far from a plain decode of the source.
    assert!(max_abs_diff(&got, &reference()["inpaint"]) > 0.05);
}

#[test]
fn inpainting_matches_diffusers() {
    // 6 steps at strength 0.7: 5 run, each followed by the blend with the re-noised source.
    let got = run_fixture(6, &init(0.7, true));
    let want = &reference()["inpaint"];
    let d = max_abs_diff(&got, want);
    eprintln!("inpaint: max |diff| {d:e} (1/255 = {:e})", 1.0 / 255.0);
    assert!(d <= 1.0 / 255.0, "{d}");
    // Without the blend the same run is far off: the test sees the blend.
    let plain = run_fixture(6, &init(0.7, false));
    let off = max_abs_diff(&plain, want);
    eprintln!("the same run without the mask: max |diff| {off:e}");
    assert!(off > 20.0 / 255.0, "{off}");
}

#[test]
fn bad_sources_and_masks_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = InitImage {
        image: dir.path().join("nope.png"),
        strength: 0.5,
        mask: None,
    };
    let e = missing.check().expect_err("missing file").to_string();
    assert!(
        e.contains("nope.png") && e.contains("does not exist"),
        "{e}"
    );
    for s in [0.0, -0.2, 1.5, f64::NAN] {
        let e = init(s, false).check().expect_err("strength").to_string();
        assert!(e.contains("strength"), "{e}");
    }
    assert!(init(1.0, true).check().is_ok());
    // A mask of another size.
    let small = dir.path().join("small.png");
    image::GrayImage::new(16, 16).save(&small).expect("save");
    let e = InitImage {
        mask: Some(small),
        ..init(0.5, false)
    }
    .check()
    .expect_err("size")
    .to_string();
    assert!(e.contains("16x16") && e.contains("80x48"), "{e}");
    // Not an image.
    let text = dir.path().join("notes.png");
    std::fs::write(&text, "hello").expect("write");
    let e = InitImage {
        image: text,
        ..init(0.5, false)
    }
    .check()
    .expect_err("not an image")
    .to_string();
    assert!(e.contains("cannot be read as an image"), "{e}");
}
