//! Weight loading: both transformer layouts load to the same model, and every kind of bad file
//! gives an error naming the file, tensor and shapes.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use parallax::model::demo_weights::DemoWeights;
use parallax::model::family::Denoiser;
use parallax::model::flux::{Flux, FluxConfig, FluxInput};
use parallax::model::layout::{self, FluxDiffusersMap, ModelFiles, TransformerLayout, VaeLayout};
use parallax::model::weights::{export, save_safetensors, Recorder, SafetensorsSet};
use parallax::pipeline::load_transformer;
use parallax::Error;

/// The tiny transformer's canonical tensors, as the demo weights make them.
fn tiny_tensors(cfg: &FluxConfig) -> (Flux, Vec<(String, Tensor)>) {
    let (rec, seen) = Recorder::new(DemoWeights::new(123));
    let vb = candle_nn::VarBuilder::from_backend(Box::new(rec), DType::F32, Device::Cpu);
    let flux = Flux::new(cfg, vb).expect("tiny flux");
    let tensors = seen.lock().expect("lock").clone();
    (flux, tensors)
}

fn velocity(m: &dyn Denoiser) -> Tensor {
    let dev = Device::Cpu;
    let spec = m.text_spec();
    let t = Tensor::new(&[0.6f32], &dev).expect("t");
    let g = Tensor::new(&[3.5f32], &dev).expect("g");
    let pe = m.pos_embed(3, 4, 4).expect("pe");
    let guidance = if spec.guidance_embed { Some(&g) } else { None };
    // The same inputs for every model under comparison: fixed values, not candle's generator.
    let fixed = |shape: (usize, usize, usize), k: f32| {
        let n = shape.0 * shape.1 * shape.2;
        Tensor::from_vec(
            (0..n)
                .map(|i| (i as f32 * 0.37 + k).sin())
                .collect::<Vec<_>>(),
            shape,
            &dev,
        )
        .expect("fixed")
    };
    let img = fixed((1, 16, 64), 0.1);
    let txt = fixed((1, 3, spec.txt_dim), 0.2);
    let y = fixed((1, 1, spec.pooled_dim.unwrap_or(0)), 0.3)
        .squeeze(1)
        .expect("y");
    m.forward(&FluxInput {
        img: &img,
        txt: &txt,
        y: &y,
        timesteps: &t,
        guidance,
        pe: &pe,
    })
    .expect("forward")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .expect("sub")
        .abs()
        .expect("abs")
        .max_all()
        .expect("max")
        .to_scalar::<f32>()
        .expect("scalar")
}

fn files(transformer: &Path, layout: TransformerLayout) -> ModelFiles {
    ModelFiles {
        transformer: transformer.to_path_buf(),
        transformer_layout: layout,
        vae: transformer.to_path_buf(),
        vae_layout: VaeLayout::Bfl,
        text: parallax::model::text::TextEncoderPaths::diffusers(transformer),
        demo: false,
    }
}

/// Write `tensors` as a BFL single file called `name` in a new folder and load it as a
/// transformer (the folder is returned so it outlives the result).
fn load_bfl_file(
    tensors: &[(String, Tensor)],
    name: &str,
) -> (tempfile::TempDir, parallax::Result<(Flux, layout::Variant)>) {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join(name);
    save_safetensors(tensors, &path).expect("save");
    let bfl = TransformerLayout::Bfl {
        prefix: String::new(),
    };
    let result = load_transformer(&files(&path, bfl), DType::F32, &Device::Cpu);
    (dir, result)
}

#[test]
fn bfl_single_file_loads_to_the_same_model() {
    let cfg = FluxConfig::tiny();
    let (flux, tensors) = tiny_tensors(&cfg);
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("flux1-dev.safetensors");
    save_safetensors(&tensors, &path).expect("save");
    let set = SafetensorsSet::open(&path).expect("open");
    assert_eq!(
        layout::detect_transformer_layout(&set),
        Some(TransformerLayout::Bfl {
            prefix: String::new()
        })
    );
    assert_eq!(
        layout::infer_flux_config(
            &set,
            &TransformerLayout::Bfl {
                prefix: String::new()
            }
        )
        .expect("cfg"),
        cfg
    );
    let (loaded, variant) = load_transformer(
        &files(
            &path,
            TransformerLayout::Bfl {
                prefix: String::new(),
            },
        ),
        DType::F32,
        &Device::Cpu,
    )
    .expect("load");
    assert_eq!(variant, layout::Variant::Dev);
    assert_eq!(max_diff(&velocity(&flux), &velocity(&loaded)), 0.0);
}

#[test]
fn comfyui_prefixed_single_file_loads() {
    let cfg = FluxConfig {
        guidance_embed: false,
        ..FluxConfig::tiny()
    };
    let (flux, tensors) = tiny_tensors(&cfg);
    let prefixed: Vec<_> = tensors
        .into_iter()
        .map(|(n, t)| (format!("model.diffusion_model.{n}"), t))
        .collect();
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("flux1-schnell.safetensors");
    save_safetensors(&prefixed, &path).expect("save");
    let set = SafetensorsSet::open(&path).expect("open");
    let l = layout::detect_transformer_layout(&set).expect("layout");
    assert_eq!(
        l,
        TransformerLayout::Bfl {
            prefix: "model.diffusion_model.".into()
        }
    );
    let (loaded, variant) =
        load_transformer(&files(&path, l), DType::F32, &Device::Cpu).expect("load");
    assert_eq!(variant, layout::Variant::Schnell);
    assert_eq!(max_diff(&velocity(&flux), &velocity(&loaded)), 0.0);
}

/// Write `tensors` as `n` shards with a diffusers-style index.
fn write_sharded(dir: &Path, stem: &str, tensors: &[(String, Tensor)], n: usize) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let per = tensors.len().div_ceil(n);
    let mut weight_map = serde_json::Map::new();
    for (i, chunk) in tensors.chunks(per).enumerate() {
        let name = format!("{stem}-{:05}-of-{:05}.safetensors", i + 1, n);
        save_safetensors(chunk, &dir.join(&name)).expect("save shard");
        for (t, _) in chunk {
            weight_map.insert(t.clone(), serde_json::Value::String(name.clone()));
        }
    }
    let index = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": weight_map });
    std::fs::write(
        dir.join(format!("{stem}.safetensors.index.json")),
        index.to_string(),
    )
    .expect("index");
}

#[test]
fn diffusers_sharded_folder_loads_to_the_same_model() {
    let cfg = FluxConfig::tiny();
    let (flux, tensors) = tiny_tensors(&cfg);
    let map = FluxDiffusersMap {
        hidden: cfg.hidden_size,
        mlp_hidden: cfg.mlp_hidden(),
    };
    let diff = export(&map, &tensors).expect("export");
    // Real diffusers names, split q/k/v, swapped norm_out halves.
    let names: Vec<&str> = diff.iter().map(|(n, _)| n.as_str()).collect();
    for want in [
        "x_embedder.weight",
        "transformer_blocks.0.attn.to_q.weight",
        "transformer_blocks.1.attn.add_v_proj.bias",
        "transformer_blocks.0.ff_context.net.0.proj.weight",
        "single_transformer_blocks.3.proj_mlp.weight",
        "single_transformer_blocks.0.attn.norm_k.weight",
        "time_text_embed.guidance_embedder.linear_2.weight",
        "norm_out.linear.weight",
    ] {
        assert!(names.contains(&want), "missing {want}");
    }
    let dir = tempfile::tempdir().expect("tmp");
    let tdir = dir.path().join("transformer");
    write_sharded(&tdir, "diffusion_pytorch_model", &diff, 3);
    std::fs::write(
        tdir.join("config.json"),
        layout::flux_config_to_diffusers_json(&cfg).to_string(),
    )
    .expect("cfg");
    assert_eq!(
        layout::flux_config_from_diffusers_json(&tdir.join("config.json")).expect("read cfg"),
        cfg
    );
    let (loaded, _) = load_transformer(
        &files(&tdir, TransformerLayout::Diffusers),
        DType::F32,
        &Device::Cpu,
    )
    .expect("load");
    assert_eq!(max_diff(&velocity(&flux), &velocity(&loaded)), 0.0);
    // Shapes alone are enough to infer the same config.
    let set = SafetensorsSet::open(&tdir).expect("open");
    assert_eq!(
        layout::infer_flux_config(&set, &TransformerLayout::Diffusers).expect("infer"),
        cfg
    );
    // bf16 and f16 loading work too (converted on load).
    for dt in [DType::BF16, DType::F16] {
        let (m, _) = load_transformer(
            &files(&tdir, TransformerLayout::Diffusers),
            dt,
            &Device::Cpu,
        )
        .expect("load half");
        assert_eq!(m.dtype(), dt);
    }
}

#[test]
fn truncated_file_names_the_file() {
    let cfg = FluxConfig::tiny();
    let (_, tensors) = tiny_tensors(&cfg);
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("flux1-dev.safetensors");
    save_safetensors(&tensors, &path).expect("save");
    let bytes = std::fs::read(&path).expect("read");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("truncate");
    match SafetensorsSet::open(&path) {
        Err(e @ Error::CorruptSafetensors { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("flux1-dev.safetensors"), "{msg}");
            assert!(msg.contains("truncated"), "{msg}");
        }
        other => panic!("expected CorruptSafetensors, got {other:?}"),
    }
    // A header cut short too.
    std::fs::write(&path, &bytes[..20]).expect("cut");
    assert!(matches!(
        SafetensorsSet::open(&path),
        Err(Error::CorruptSafetensors { .. })
    ));
}

#[test]
fn garbage_file_is_reported_as_corrupt() {
    let dir = tempfile::tempdir().expect("tmp");
    for (name, bytes) in [
        ("empty.safetensors", Vec::new()),
        (
            "text.safetensors",
            b"this is not a safetensors file at all".to_vec(),
        ),
        ("huge-header.safetensors", {
            let mut v = u64::MAX.to_le_bytes().to_vec();
            v.extend_from_slice(b"{}");
            v
        }),
        ("bad-json.safetensors", {
            let mut v = 5u64.to_le_bytes().to_vec();
            v.extend_from_slice(b"{oops");
            v
        }),
    ] {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).expect("write");
        match SafetensorsSet::open(&p) {
            Err(e @ Error::CorruptSafetensors { .. }) => {
                assert!(e.to_string().contains(name), "{e}")
            }
            other => panic!("{name}: expected CorruptSafetensors, got {other:?}"),
        }
    }
}

#[test]
fn missing_tensor_is_named() {
    let cfg = FluxConfig::tiny();
    let (_, tensors) = tiny_tensors(&cfg);
    let kept: Vec<_> = tensors
        .into_iter()
        .filter(|(n, _)| n != "single_blocks.2.linear2.weight")
        .collect();
    let (_dir, result) = load_bfl_file(&kept, "flux1-dev.safetensors");
    let err = result.map(|_| ()).expect_err("must fail");
    match &err {
        Error::MissingTensor { tensor, location } => {
            assert!(tensor.contains("single_blocks.2.linear2.weight"), "{err}");
            assert!(location.contains("flux1-dev.safetensors"), "{err}");
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
}

#[test]
fn misshaped_tensor_names_tensor_and_both_shapes() {
    let cfg = FluxConfig::tiny();
    let (_, mut tensors) = tiny_tensors(&cfg);
    for (n, t) in tensors.iter_mut() {
        if n == "double_blocks.1.img_attn.proj.weight" {
            *t = Tensor::zeros((128, 64), DType::F32, &Device::Cpu).expect("zeros");
        }
    }
    let (_dir, result) = load_bfl_file(&tensors, "flux1-dev.safetensors");
    let err = result.map(|_| ()).expect_err("must fail");
    match &err {
        Error::ShapeMismatch {
            tensor,
            expected,
            found,
            location,
        } => {
            assert!(tensor.contains("double_blocks.1.img_attn.proj.weight"));
            assert_eq!(expected, &vec![128, 128]);
            assert_eq!(found, &vec![128, 64]);
            assert!(location.contains("flux1-dev.safetensors"));
            let msg = err.to_string();
            assert!(
                msg.contains("[128, 128]") && msg.contains("[128, 64]"),
                "{msg}"
            );
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

#[test]
fn misshaped_part_of_a_diffusers_concat_is_named() {
    let cfg = FluxConfig::tiny();
    let (_, tensors) = tiny_tensors(&cfg);
    let map = FluxDiffusersMap {
        hidden: cfg.hidden_size,
        mlp_hidden: cfg.mlp_hidden(),
    };
    let mut diff = export(&map, &tensors).expect("export");
    for (n, t) in diff.iter_mut() {
        if n == "transformer_blocks.0.attn.to_k.weight" {
            *t = Tensor::zeros((96, 128), DType::F32, &Device::Cpu).expect("zeros");
        }
    }
    let dir = tempfile::tempdir().expect("tmp");
    let tdir = dir.path().join("transformer");
    std::fs::create_dir_all(&tdir).expect("mkdir");
    save_safetensors(&diff, &tdir.join("diffusion_pytorch_model.safetensors")).expect("save");
    std::fs::write(
        tdir.join("config.json"),
        layout::flux_config_to_diffusers_json(&cfg).to_string(),
    )
    .expect("cfg");
    let err = load_transformer(
        &files(&tdir, TransformerLayout::Diffusers),
        DType::F32,
        &Device::Cpu,
    )
    .expect_err("fail");
    match &err {
        Error::ShapeMismatch {
            tensor,
            expected,
            found,
            ..
        } => {
            assert!(
                tensor.contains("transformer_blocks.0.attn.to_k.weight"),
                "{err}"
            );
            assert!(
                tensor.contains("double_blocks.0.img_attn.qkv.weight"),
                "{err}"
            );
            assert_eq!(expected, &vec![128, 128]);
            assert_eq!(found, &vec![96, 128]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}

#[test]
fn unsupported_dtype_is_named() {
    let cfg = FluxConfig::tiny();
    let (_, mut tensors) = tiny_tensors(&cfg);
    for (n, t) in tensors.iter_mut() {
        if n == "img_in.weight" {
            *t = t.to_dtype(DType::U8).expect("u8");
        }
    }
    let (_dir, result) = load_bfl_file(&tensors, "flux1-dev-int8.safetensors");
    let err = result.map(|_| ()).expect_err("fail");
    match &err {
        Error::UnsupportedDtype {
            tensor,
            dtype,
            location,
        } => {
            assert_eq!(tensor, "img_in.weight");
            assert_eq!(dtype, "U8");
            assert!(location.contains("flux1-dev-int8.safetensors"));
        }
        other => panic!("expected UnsupportedDtype, got {other:?}"),
    }
}

#[test]
fn shard_index_pointing_at_the_wrong_shard_is_caught() {
    let cfg = FluxConfig::tiny();
    let (_, tensors) = tiny_tensors(&cfg);
    let dir = tempfile::tempdir().expect("tmp");
    write_sharded(dir.path(), "model", &tensors, 2);
    let index_path = dir.path().join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index_path).expect("read");
    let mut index: serde_json::Value = serde_json::from_str(&text).expect("json");
    index["weight_map"]["img_in.weight"] =
        serde_json::Value::String("model-00002-of-00002.safetensors".into());
    index["weight_map"]["not_there.weight"] =
        serde_json::Value::String("model-00001-of-00002.safetensors".into());
    std::fs::write(&index_path, index.to_string()).expect("write");
    assert!(matches!(
        SafetensorsSet::open(dir.path()),
        Err(Error::MissingTensor { .. })
    ));
    // A missing shard file is an I/O error naming it.
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).expect("rm");
    match SafetensorsSet::open(&index_path) {
        Err(e @ Error::Io { .. }) => assert!(e.to_string().contains("model-00002-of-00002"), "{e}"),
        other => panic!("expected Io, got {other:?}"),
    }
}

#[test]
fn unknown_layouts_are_rejected_with_a_reason() {
    let dir = tempfile::tempdir().expect("tmp");
    // An empty folder.
    match layout::resolve(dir.path().to_str().expect("utf8"), None) {
        Err(Error::UnknownLayout { reason, .. }) => {
            assert!(reason.contains("diffusers"), "{reason}")
        }
        other => panic!("expected UnknownLayout, got {other:?}"),
    }
    // A safetensors file that is not a FLUX transformer.
    let p = dir.path().join("flux-something.safetensors");
    let t = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).expect("z");
    save_safetensors(&[("encoder.layer.0.weight".to_string(), t)], &p).expect("save");
    match layout::resolve(p.to_str().expect("utf8"), None) {
        Err(Error::UnknownLayout { reason, .. }) => assert!(
            reason.contains("double_blocks.0.img_attn.qkv.weight"),
            "{reason}"
        ),
        other => panic!("expected UnknownLayout, got {other:?}"),
    }
    // A path that does not exist.
    assert!(matches!(
        layout::resolve("/nonexistent/flux.safetensors", None),
        Err(Error::UnknownLayout { .. })
    ));
    // A transformer without an autoencoder beside it.
    let cfg = FluxConfig::tiny();
    let (_, tensors) = tiny_tensors(&cfg);
    let d2 = tempfile::tempdir().expect("tmp");
    let f = d2.path().join("flux1-dev.safetensors");
    save_safetensors(&tensors, &f).expect("save");
    match layout::resolve(f.to_str().expect("utf8"), None) {
        Err(Error::UnknownLayout { reason, .. }) => {
            assert!(reason.contains("ae.safetensors"), "{reason}")
        }
        other => panic!("expected UnknownLayout, got {other:?}"),
    }
}

#[test]
fn hf_cache_discovery_finds_the_snapshot() {
    let cache = tempfile::tempdir().expect("tmp");
    let repo = cache.path().join("models--black-forest-labs--FLUX.1-dev");
    let snap = repo.join("snapshots").join("abc123");
    std::fs::create_dir_all(&snap).expect("mkdir");
    std::fs::create_dir_all(repo.join("refs")).expect("refs");
    std::fs::write(repo.join("refs").join("main"), "abc123\n").expect("ref");
    // The env var is process-wide: this is the only test that sets it.
    std::env::set_var("HF_HUB_CACHE", cache.path());
    let mut reasons = Vec::new();
    let found =
        layout::find_in_hf_cache("black-forest-labs/FLUX.1-dev", &mut reasons).expect("found");
    assert_eq!(found, snap);
    let listed = layout::list_hf_cache();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].0, "black-forest-labs/FLUX.1-dev");
    // `dev` resolves to it; the empty snapshot is then an unknown layout, named.
    match layout::resolve("dev", None) {
        Err(Error::UnknownLayout { path, .. }) => assert_eq!(path, snap),
        other => panic!("expected UnknownLayout for an empty snapshot, got {other:?}"),
    }
    assert!(matches!(
        layout::find_in_hf_cache("black-forest-labs/FLUX.1-schnell", &mut reasons),
        Err(Error::UnknownLayout { .. })
    ));
    std::env::remove_var("HF_HUB_CACHE");
}

/// The demo model written in each real layout loads back through `--model DIR` resolution and
/// makes the same image, pixel for pixel, as the built-in demo model.
#[test]
fn exported_demo_model_loads_in_both_layouts_and_matches_builtin() {
    use parallax::model::export::{write_demo_model, DemoSource, ExportLayout};
    use parallax::pipeline::{GenerateRequest, Pipeline};
    let builtin = Pipeline::demo(&Device::Cpu).expect("demo");
    let req = GenerateRequest {
        prompt: "a castle made of glass".into(),
        width: 64,
        height: 48,
        steps: Some(3),
        seed: 2024,
        ..Default::default()
    };
    let want = builtin
        .generate(&req, &mut |_| Ok(()))
        .expect("builtin image");
    for (layout, expect_file) in [
        (ExportLayout::Bfl, "flux1-dev.safetensors"),
        (
            ExportLayout::Diffusers,
            "transformer/diffusion_pytorch_model.safetensors.index.json",
        ),
    ] {
        let dir = tempfile::tempdir().expect("tmp");
        write_demo_model(dir.path(), layout, DemoSource::Trained).expect("export");
        assert!(
            dir.path().join(expect_file).is_file(),
            "{layout:?}: {expect_file}"
        );
        let resolved = layout::resolve(dir.path().to_str().expect("utf8"), None).expect("resolve");
        assert!(
            resolved.reasons.iter().any(|r| r.contains("demo model")),
            "{:?}",
            resolved.reasons
        );
        let p = Pipeline::load(&resolved, "exported", DType::F32, &Device::Cpu).expect("load");
        assert!(
            p.is_demo(),
            "a folder marked as the demo model stays labelled a demo"
        );
        let got = p.generate(&req, &mut |_| Ok(())).expect("image");
        assert_eq!(
            got.image, want.image,
            "{layout:?} layout gives a different image"
        );
    }
}

#[test]
fn missing_tokenizer_folder_is_reported_when_loading_a_model() {
    use parallax::model::export::{write_demo_model, DemoSource, ExportLayout};
    use parallax::pipeline::Pipeline;
    let dir = tempfile::tempdir().expect("tmp");
    write_demo_model(dir.path(), ExportLayout::Diffusers, DemoSource::Trained).expect("export");
    std::fs::remove_dir_all(dir.path().join("tokenizer_2")).expect("rm");
    let resolved = layout::resolve(dir.path().to_str().expect("utf8"), None).expect("resolve");
    match Pipeline::load(&resolved, "x", DType::F32, &Device::Cpu) {
        Err(e @ Error::MissingTokenizer { .. }) => {
            assert!(e.to_string().contains("tokenizer_2"), "{e}")
        }
        other => panic!("expected MissingTokenizer, got {:?}", other.map(|_| ())),
    }
}

/// Real weights default to bf16; on the CPU the transformer runs in bf16 and the autoencoder in
/// f32 (candle's CPU convolutions take no bf16), and a whole image still comes out.
#[test]
fn bf16_model_from_files_generates_on_the_cpu() {
    use parallax::model::export::{write_demo_model, DemoSource, ExportLayout};
    use parallax::pipeline::{GenerateRequest, Pipeline};
    let dir = tempfile::tempdir().expect("tmp");
    write_demo_model(dir.path(), ExportLayout::Diffusers, DemoSource::Trained).expect("export");
    let resolved = layout::resolve(dir.path().to_str().expect("utf8"), None).expect("resolve");
    let p = Pipeline::load(&resolved, "bf16", DType::BF16, &Device::Cpu).expect("load");
    let f1 = p.flux1("test").expect("FLUX.1");
    assert_eq!(f1.flux.dtype(), DType::BF16);
    assert_eq!(f1.vae.dtype(), DType::F32);
    let g = p
        .generate(
            &GenerateRequest {
                width: 32,
                height: 32,
                steps: Some(2),
                seed: 1,
                ..Default::default()
            },
            &mut |_| Ok(()),
        )
        .expect("bf16 generation on the CPU");
    assert_eq!((g.image.width, g.image.height), (32, 32));
}

/// FP8 checkpoints as people have them: the trained demo's transformer re-saved as a ComfyUI
/// single file (`model.diffusion_model.` prefix, every matrix in F8_E4M3), once with ComfyUI's
/// per-tensor `scale_weight` tensors and `scaled_fp8` marker (one matrix with a per-row
/// `weight_scale` instead), once as a plain cast with no scales. Both load on the CPU
/// (dequantised) and draw nearly the picture the f32 weights draw.
#[test]
fn fp8_checkpoints_load_dequantised() {
    use parallax::kernels::fp8::Fp8;
    use parallax::model::export::{write_demo_model, DemoSource, ExportLayout};
    use parallax::pipeline::{metrics, GenerateRequest, Pipeline};
    use safetensors::tensor::TensorView;
    use safetensors::Dtype as St;

    let req = GenerateRequest {
        prompt: "a red circle on the left, blue sky".into(),
        width: 128,
        height: 128,
        steps: Some(4),
        seed: 11,
        ..Default::default()
    };
    let reference = Pipeline::demo(&Device::Cpu)
        .expect("demo")
        .generate(&req, &mut |_| Ok(()))
        .expect("f32 image");

    let mut psnr = Vec::new();
    for scaled in [true, false] {
        let dir = tempfile::tempdir().expect("tmp");
        write_demo_model(dir.path(), ExportLayout::Bfl, DemoSource::Trained).expect("export");
        let file = dir.path().join("flux1-dev.safetensors");
        let tensors = candle_core::safetensors::load(&file, &Device::Cpu).expect("read");
        let mut out: Vec<(String, St, Vec<usize>, Vec<u8>)> = Vec::new();
        let mut matrices = 0;
        for (name, t) in &tensors {
            let key = format!("model.diffusion_model.{name}");
            let values: Vec<f32> = t.flatten_all().and_then(|x| x.to_vec1()).expect("values");
            if t.rank() != 2 {
                let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                out.push((key, St::F32, t.dims().to_vec(), bytes));
                continue;
            }
            matrices += 1;
            let rows = t.dims()[0];
            let per_row = scaled && name == "img_in.weight";
            let scales: Vec<f32> = if !scaled {
                vec![1.0]
            } else if per_row {
                values
                    .chunks(values.len() / rows)
                    .map(|r| {
                        r.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12) / Fp8::E4M3.max()
                    })
                    .collect()
            } else {
                vec![values.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12) / Fp8::E4M3.max()]
            };
            let per = values.len() / scales.len();
            let bytes: Vec<u8> = values
                .iter()
                .enumerate()
                .map(|(i, v)| Fp8::E4M3.encode(v / scales[i / per]))
                .collect();
            out.push((key.clone(), St::F8_E4M3, t.dims().to_vec(), bytes));
            if scaled {
                let stem = key.strip_suffix(".weight").expect("weight");
                let (suffix, shape) = if per_row {
                    ("weight_scale", vec![rows])
                } else {
                    ("scale_weight", vec![])
                };
                let bytes = scales.iter().flat_map(|v| v.to_le_bytes()).collect();
                out.push((format!("{stem}.{suffix}"), St::F32, shape, bytes));
            }
        }
        assert!(matrices > 40, "{matrices} matrices");
        if scaled {
            out.push(("scaled_fp8".into(), St::F8_E4M3, vec![0], vec![]));
        }
        let views: Vec<(String, TensorView)> = out
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).expect("view")))
            .collect();
        std::fs::write(
            &file,
            safetensors::tensor::serialize(views, None).expect("serialise"),
        )
        .expect("write");

        let set = SafetensorsSet::open(&file).expect("open");
        let (e4m3, e5m2, scales, marker) = set.fp8_summary();
        assert_eq!(
            (e4m3 > 40, e5m2, scales > 40, marker),
            (true, 0, scaled, scaled)
        );
        // `info` says what it found.
        let info = std::process::Command::new(env!("CARGO_BIN_EXE_parallax"))
            .args(["info", "--model", dir.path().to_str().expect("utf8")])
            .output()
            .expect("run info");
        let text = String::from_utf8_lossy(&info.stdout);
        assert!(info.status.success(), "{text}");
        assert!(
            text.contains(&format!("FP8: {e4m3} tensors in E4M3")),
            "{text}"
        );
        assert_eq!(text.contains("ComfyUI scaled-fp8 file"), scaled, "{text}");
        let resolved = layout::resolve(dir.path().to_str().expect("utf8"), None).expect("resolve");
        let p = Pipeline::load(&resolved, "fp8", DType::F32, &Device::Cpu).expect("load fp8");
        let g = p.generate(&req, &mut |_| Ok(())).expect("fp8 image");
        let q = metrics::quality(&g.image, &reference.image).expect("quality");
        psnr.push(q.psnr_db);
    }
    // Measured 40.1 dB (scaled) and 42.6 dB (plain): the demo's weights sit in E4M3's normal
    // range either way, where a cast keeps 3 mantissa bits whatever the scale.
    assert!(psnr[0] > 32.0, "scaled FP8 image vs f32: {} dB", psnr[0]);
    assert!(psnr[1] > 32.0, "plain FP8 image vs f32: {} dB", psnr[1]);
}

/// What a memory budget loads: T5 built for each prompt, every block converted to FP8 as it loads
/// (modulations weight-only) — the same image as the whole model loaded first and converted
/// after, prompt after prompt (on the CPU the FP8 is simulated; the bf16 copies a GPU drops
/// are the same values).
#[test]
fn memory_budget_loading_gives_the_image_of_converting_after_loading() {
    use parallax::model::export::{write_demo_model, DemoSource, ExportLayout};
    use parallax::model::flux::Fp8Groups;
    use parallax::model::text::T5Residency;
    use parallax::pipeline::{GenerateRequest, LoadOptions, Pipeline};
    let dir = tempfile::tempdir().expect("tmp");
    write_demo_model(dir.path(), ExportLayout::Bfl, DemoSource::Trained).expect("export");
    let resolved = layout::resolve(dir.path().to_str().expect("utf8"), None).expect("resolve");
    let mut whole = Pipeline::load(&resolved, "whole", DType::F32, &Device::Cpu).expect("load");
    let fp8 = whole
        .flux1("test")
        .expect("FLUX.1")
        .flux
        .clone()
        .with_fp8_in(Fp8Groups::ALL_AND_MODULATIONS)
        .expect("convert");
    whole.set_flux1(fp8).expect("FLUX.1");
    let opts = LoadOptions {
        fp8: Fp8Groups::ALL_AND_MODULATIONS,
        lean: true,
        t5: T5Residency::OnDemand,
        ..Default::default()
    };
    let lean =
        Pipeline::load_with(&resolved, "lean", DType::F32, &Device::Cpu, opts).expect("lean");
    let f1 = lean.flux1("test").expect("FLUX.1");
    assert_eq!(f1.text.t5_residency(), T5Residency::OnDemand);
    assert!(f1.flux.fp8_products());
    for prompt in ["a red circle on the left", "two blue squares"] {
        let req = GenerateRequest {
            prompt: prompt.into(),
            width: 64,
            height: 64,
            steps: Some(3),
            seed: 7,
            ..Default::default()
        };
        let a = whole.generate(&req, &mut |_| Ok(())).expect("whole");
        let b = lean.generate(&req, &mut |_| Ok(())).expect("lean");
        assert_eq!(a.image, b.image, "{prompt}");
    }
    // The modulations in FP8 change the image (they are converted), but only a little.
    let plain = Pipeline::load(&resolved, "plain", DType::F32, &Device::Cpu).expect("load");
    let req = GenerateRequest {
        prompt: "a red circle on the left".into(),
        width: 64,
        height: 64,
        steps: Some(3),
        seed: 7,
        ..Default::default()
    };
    let x = plain.generate(&req, &mut |_| Ok(())).expect("plain");
    let y = lean.generate(&req, &mut |_| Ok(())).expect("lean");
    assert_ne!(x.image, y.image);
    let psnr = parallax::pipeline::metrics::psnr(&x.image, &y.image).expect("psnr");
    assert!(psnr > 30.0, "FP8 with modulations: {psnr} dB");
}

/// A PipeFusion stage reads only its blocks from the files: with the other stage's tensors
/// unreadable (stored as U8, which the loader refuses) a whole load fails naming one of them,
/// while the stage loads; and two stages loaded this way, pipelined, give the whole model's
/// velocity through their warm-up.
#[test]
fn a_pipefusion_stage_reads_only_its_blocks() {
    use parallax::parallel::comm::run_local;
    use parallax::parallel::pipefusion::{stage_blocks, PipeFusion};
    use parallax::pipeline::{load_transformer_with, LoadOptions};
    use std::sync::Arc;

    let cfg = FluxConfig::tiny();
    let (flux, tensors) = tiny_tensors(&cfg);
    let n = cfg.num_blocks();
    let bfl = || TransformerLayout::Bfl {
        prefix: String::new(),
    };
    let dir = tempfile::tempdir().expect("tmp");
    let mut stages = Vec::new();
    for s in 0..2 {
        let held = stage_blocks(n, 2, s);
        let other = |name: &str| {
            (0..n).filter(|i| !held.contains(i)).any(|i| {
                let prefix = if i < cfg.depth {
                    format!("double_blocks.{i}.")
                } else {
                    format!("single_blocks.{}.", i - cfg.depth)
                };
                name.starts_with(&prefix)
            })
        };
        let poisoned: Vec<(String, Tensor)> = tensors
            .iter()
            .map(|(name, t)| {
                let t = if other(name) {
                    t.to_dtype(DType::U8).expect("u8")
                } else {
                    t.clone()
                };
                (name.clone(), t)
            })
            .collect();
        let path = dir.path().join(format!("stage{s}.safetensors"));
        save_safetensors(&poisoned, &path).expect("save");
        match load_transformer(&files(&path, bfl()), DType::F32, &Device::Cpu) {
            Err(Error::UnsupportedDtype { tensor, .. }) => assert!(other(&tensor), "{tensor}"),
            other => panic!("stage {s}: a whole load should fail on the other blocks: {other:?}"),
        }
        let opts = LoadOptions {
            blocks: Some((held.start, held.end)),
            ..Default::default()
        };
        let (stage, _) =
            load_transformer_with(&files(&path, bfl()), DType::F32, &Device::Cpu, opts)
                .expect("a stage reads its blocks alone");
        assert_eq!(stage.held_blocks(), held);
        assert!(stage.weight_bytes() < flux.weight_bytes());
        stages.push(stage);
    }
    let want = velocity(&flux);
    let got = run_local(2, |rank, comm| {
        let stage = PipeFusion::replica(&stages[rank], Arc::new(comm), 2, 1)?;
        Ok(velocity(&stage))
    })
    .expect("pipelined");
    for v in got {
        assert!(max_diff(&v, &want) < 1e-5);
    }
}

/// ComfyUI's files as they lie on disk (the trained demo written as a ComfyUI install:
/// `models/diffusion_models/`, `models/vae/ae.safetensors`, `models/clip/clip_l.safetensors` and
/// `t5xxl_fp16.safetensors` in transformers' names, the tokenizers in `comfy/`): the install
/// folder and the transformer file both resolve to those parts, and the image is the one the
/// same weights give in the BFL layout, pixel for pixel. The scaled-fp8 transformer
/// (`model.diffusion_model.` names, E4M3 matrices with `scale_weight`, `scale_input` and the
/// `scaled_fp8` marker) with `t5xxl_fp8_e4m3fn.safetensors` (a plain E4M3 cast) loads
/// dequantised and draws nearly that image.
#[test]
fn comfyui_tree_loads_and_matches_the_bfl_layout() {
    use parallax::model::export::{write_demo_model, DemoSource, ExportLayout};
    use parallax::pipeline::{metrics, GenerateRequest, Pipeline};
    let req = GenerateRequest {
        prompt: "a red circle on the left, blue sky".into(),
        width: 64,
        height: 64,
        steps: Some(3),
        seed: 7,
        ..Default::default()
    };
    let bfl = tempfile::tempdir().expect("tmp");
    write_demo_model(bfl.path(), ExportLayout::Bfl, DemoSource::Trained).expect("bfl export");
    let resolved = layout::resolve(bfl.path().to_str().expect("utf8"), None).expect("bfl");
    let want = Pipeline::load(&resolved, "bfl", DType::F32, &Device::Cpu)
        .and_then(|p| p.generate(&req, &mut |_| Ok(())))
        .expect("bfl image");

    for scaled_fp8 in [false, true] {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path();
        write_demo_model(
            root,
            ExportLayout::ComfyUi { scaled_fp8 },
            DemoSource::Trained,
        )
        .expect("comfyui export");
        let file = root.join("models/diffusion_models").join(if scaled_fp8 {
            "flux1-dev-fp8_scaled.safetensors"
        } else {
            "flux1-dev.safetensors"
        });
        for named in [root.to_path_buf(), file.clone()] {
            let resolved = layout::resolve(named.to_str().expect("utf8"), None).expect("resolve");
            let layout::ModelSpec::Files(f) = &resolved.spec else {
                panic!("{named:?} resolved to {:?}", resolved.spec)
            };
            let prefix = if scaled_fp8 {
                "model.diffusion_model."
            } else {
                ""
            };
            assert_eq!(f.transformer, file);
            assert_eq!(
                f.transformer_layout,
                TransformerLayout::Bfl {
                    prefix: prefix.into()
                }
            );
            assert_eq!(f.vae, root.join("models/vae/ae.safetensors"));
            assert_eq!(f.text.clip, root.join("models/clip/clip_l.safetensors"));
            let t5 = if scaled_fp8 {
                "models/clip/t5xxl_fp8_e4m3fn.safetensors"
            } else {
                "models/clip/t5xxl_fp16.safetensors"
            };
            assert_eq!(f.text.t5, root.join(t5));
            assert_eq!(f.text.clip_tokenizer, root.join("comfy/sd1_tokenizer"));
            assert_eq!(
                f.text.t5_tokenizer,
                root.join("comfy/text_encoders/t5_tokenizer")
            );
            assert!(f.demo, "{:?}", resolved.reasons);
        }
        let resolved = layout::resolve(root.to_str().expect("utf8"), None).expect("resolve");
        let p = Pipeline::load(&resolved, "comfyui", DType::F32, &Device::Cpu).expect("load");
        let got = p.generate(&req, &mut |_| Ok(())).expect("image");
        if scaled_fp8 {
            let q = metrics::quality(&got.image, &want.image).expect("quality");
            eprintln!("scaled fp8 vs the BFL layout: {q:?}");
            // Measured 53.9 dB (SSIM 0.9988) at 64 px in 3 steps (54.0 with T5 in f32): E4M3
            // keeps 3 mantissa bits of every matrix weight.
            assert!(q.psnr_db > 45.0, "scaled fp8 vs the BFL layout: {q:?}");
        } else {
            assert_eq!(got.image, want.image, "ComfyUI tree gives another image");
        }
    }
}

/// `--vae`, `--clip`, `--t5` name the parts wherever they are (a transformer alone in its folder,
/// the rest elsewhere under other names; the tokenizers in `tokenizer/` and `tokenizer_2/`
/// beside the single files): the same image as the BFL layout. Without T5's tokenizer, loading
/// says exactly which file to get and where to put it.
#[test]
fn separate_part_files_load_by_flag() {
    use parallax::engine::ModelChoice;
    use parallax::model::export::{write_demo_model, DemoSource, ExportLayout};
    use parallax::pipeline::{GenerateRequest, Pipeline};
    let req = GenerateRequest {
        prompt: "a blue square".into(),
        width: 48,
        height: 32,
        steps: Some(2),
        seed: 3,
        ..Default::default()
    };
    let dir = tempfile::tempdir().expect("tmp");
    let tree = dir.path().join("tree");
    write_demo_model(
        &tree,
        ExportLayout::ComfyUi { scaled_fp8: false },
        DemoSource::Trained,
    )
    .expect("export");
    let (t, parts) = (dir.path().join("t"), dir.path().join("parts"));
    for d in [&t, &parts] {
        std::fs::create_dir_all(d).expect("mkdir");
    }
    let copy = |from: &str, to: &Path| {
        std::fs::copy(tree.join(from), to).expect("copy");
    };
    copy(
        "models/diffusion_models/flux1-dev.safetensors",
        &t.join("model.safetensors"),
    );
    copy(
        "models/diffusion_models/PARALLAX_DEMO_MODEL.txt",
        &t.join("PARALLAX_DEMO_MODEL.txt"),
    );
    copy(
        "models/vae/ae.safetensors",
        &parts.join("my-vae.safetensors"),
    );
    copy(
        "models/clip/clip_l.safetensors",
        &parts.join("clip.safetensors"),
    );
    copy(
        "models/clip/t5xxl_fp16.safetensors",
        &parts.join("t5.safetensors"),
    );
    for (from, to) in [
        ("comfy/sd1_tokenizer", "tokenizer"),
        ("comfy/text_encoders/t5_tokenizer", "tokenizer_2"),
    ] {
        std::fs::create_dir_all(parts.join(to)).expect("mkdir");
        copy(
            &format!("{from}/tokenizer.json"),
            &parts.join(to).join("tokenizer.json"),
        );
    }
    let choice = ModelChoice {
        vae: Some(parts.join("my-vae.safetensors")),
        clip: Some(parts.join("clip.safetensors")),
        t5: Some(parts.join("t5.safetensors")),
        ..ModelChoice::named(t.join("model.safetensors").to_str().expect("utf8"))
    };
    let resolved = choice.resolve().expect("resolve");
    let p = Pipeline::load(&resolved, "parts", DType::F32, &Device::Cpu).expect("load");
    let got = p.generate(&req, &mut |_| Ok(())).expect("image");
    let want = Pipeline::demo(&Device::Cpu)
        .and_then(|p| p.generate(&req, &mut |_| Ok(())))
        .expect("demo image");
    assert_eq!(got.image, want.image);

    // No T5 tokenizer anywhere (an empty Hugging Face cache): the message names the file.
    std::fs::remove_dir_all(parts.join("tokenizer_2")).expect("rm");
    let empty = tempfile::tempdir().expect("tmp");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_parallax"))
        .env_remove("HF_HUB_CACHE")
        .env("HF_HOME", empty.path())
        .args([
            "generate", "--steps", "1", "--width", "16", "--height", "16", "--model",
        ])
        .arg(t.join("model.safetensors"))
        .arg("--vae")
        .arg(parts.join("my-vae.safetensors"))
        .arg("--clip")
        .arg(parts.join("clip.safetensors"))
        .arg("--t5")
        .arg(parts.join("t5.safetensors"))
        .arg("--out")
        .arg(dir.path().join("x.png"))
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    for needle in [
        "tokenizer.json",
        "tokenizer_2/",
        "FLUX.1-schnell",
        "comfy/text_encoders/t5_tokenizer",
        &parts.join("tokenizer_2").display().to_string(),
    ] {
        assert!(text.contains(needle), "`{needle}` not in: {text}");
    }
}

/// A GGUF file written by the community's own writer (gguf-py, as llama.cpp and ComfyUI-GGUF's
/// converter use it; `scripts/gguf-reference.py` made the fixture) reads to the values gguf-py
/// dequantises it to, in each type gguf-py can write, and a tensor stored flat comes back in the
/// shape ComfyUI-GGUF's metadata gives.
#[test]
fn community_gguf_file_reads_to_the_reference_values() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let set = SafetensorsSet::open(&fixtures.join("gguf-community.gguf")).expect("open gguf");
    let want = SafetensorsSet::open(&fixtures.join("gguf-community-expected.safetensors"))
        .expect("open expected");
    assert_eq!(set.len(), want.len());
    let summary = set.gguf_summary().expect("a GGUF set says what it holds");
    for kind in ["Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "BF16", "F16", "F32"] {
        assert!(summary.contains(kind), "{summary}");
    }
    for name in want.names() {
        let w = want.load(name, DType::F32, &Device::Cpu).expect("expected");
        let got = set.load(name, DType::F32, &Device::Cpu).expect("gguf tensor");
        assert_eq!(got.dims(), w.dims(), "{name}");
        assert_eq!(max_diff(&got, &w), 0.0, "{name}");
    }
    assert_eq!(
        set.meta("final_layer.adaLN_modulation.1.weight")
            .expect("meta")
            .shape,
        vec![4, 8, 32]
    );
}

/// The demo model exported to GGUF runs as a model like its safetensors: F32 GGUF gives the very
/// same image, Q8_0 one within a stated PSNR, and the file is found and described like any
/// single file.
#[test]
fn demo_model_as_gguf_generates_like_its_safetensors() {
    use parallax::model::export::{write_demo_model, DemoSource, ExportLayout};
    use parallax::model::gguf::{self, GgufType};
    use parallax::pipeline::{GenerateRequest, Pipeline};
    let dir = tempfile::tempdir().expect("tmp");
    write_demo_model(dir.path(), ExportLayout::Bfl, DemoSource::Trained).expect("export");
    let source = dir.path().join("flux1-dev.safetensors");
    let set = SafetensorsSet::open(&source).expect("open");
    let tensors: Vec<(String, Tensor)> = set
        .names()
        .map(|n| {
            (
                n.to_string(),
                set.load(n, DType::F32, &Device::Cpu).expect("load"),
            )
        })
        .collect();
    let req = GenerateRequest {
        prompt: "a red circle on a blue background".into(),
        width: 64,
        height: 64,
        steps: Some(4),
        seed: 11,
        ..Default::default()
    };
    let image_of = |model: &Path| {
        let resolved = layout::resolve(model.to_str().expect("utf8"), None).expect("resolve");
        let p = Pipeline::load(&resolved, "gguf", DType::F32, &Device::Cpu).expect("load");
        assert!(p.is_demo());
        p.generate(&req, &mut |_| Ok(())).expect("image").image
    };
    let want = image_of(&source);
    for (kind, min_psnr) in [(GgufType::F32, f64::INFINITY), (GgufType::Q8_0, 30.0)] {
        let file = dir.path().join(format!("flux1-dev-{}.gguf", kind.name()));
        let written = gguf::write(&file, &tensors, kind, "flux").expect("write gguf");
        if kind == GgufType::Q8_0 {
            assert!(written
                .iter()
                .any(|(_, d)| *d == candle_core::quantized::GgmlDType::Q8_0));
        }
        let got = image_of(&file);
        let psnr = parallax::pipeline::metrics::psnr(&got, &want).expect("psnr");
        if kind == GgufType::Q8_0 {
            // ComfyUI-GGUF keeps its files in models/unet/: a ComfyUI folder finds it there.
            let comfy = tempfile::tempdir().expect("tmp");
            let models = comfy.path().join("models");
            std::fs::create_dir_all(models.join("unet")).expect("unet");
            std::fs::create_dir_all(models.join("vae")).expect("vae");
            std::fs::copy(&file, models.join("unet").join("flux1-dev-Q8_0.gguf")).expect("cp");
            std::fs::copy(dir.path().join("ae.safetensors"), models.join("vae/ae.safetensors"))
                .expect("cp ae");
            let r = layout::resolve(comfy.path().to_str().expect("utf8"), None).expect("resolve");
            match r.spec {
                layout::ModelSpec::Files(f) => {
                    assert!(f.transformer.ends_with("unet/flux1-dev-Q8_0.gguf"), "{f:?}")
                }
                other => panic!("{other:?}"),
            }
        }
        if min_psnr.is_infinite() {
            assert_eq!(got, want, "{}: an F32 GGUF holds the same numbers", kind.name());
        } else {
            assert!(psnr >= min_psnr, "{}: PSNR {psnr:.1} dB", kind.name());
        }
    }
}

/// A FLUX.1 Fill checkpoint is told by `img_in`'s 384 input channels in either layout, from the
/// shapes alone (made-up weights: a BFL single file and the same tensors in diffusers' names).
#[test]
fn fill_checkpoints_are_detected_in_both_layouts() {
    use parallax::model::flux::FILL_IN_CHANNELS;
    let cfg = FluxConfig {
        in_channels: FILL_IN_CHANNELS,
        ..FluxConfig::tiny()
    };
    assert!(cfg.is_fill() && !FluxConfig::tiny().is_fill());
    assert_eq!((cfg.out_channels(), cfg.cond_channels()), (64, 320));
    assert_eq!(FluxConfig::tiny().cond_channels(), 0);
    let (_, tensors) = tiny_tensors(&cfg);
    let (_dir, loaded) = load_bfl_file(&tensors, "flux1-fill-dev.safetensors");
    let (flux, _) = loaded.expect("load fill");
    assert_eq!(flux.config(), &cfg);
    assert_eq!((flux.token_channels(), flux.cond_channels()), (64, 320));

    let map = FluxDiffusersMap {
        hidden: cfg.hidden_size,
        mlp_hidden: cfg.mlp_hidden(),
    };
    let diff = export(&map, &tensors).expect("export");
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("diffusion_pytorch_model.safetensors");
    save_safetensors(&diff, &path).expect("save");
    let set = SafetensorsSet::open(&path).expect("open");
    assert_eq!(
        layout::infer_flux_config(&set, &TransformerLayout::Diffusers).expect("infer"),
        cfg
    );
    // And a diffusers config.json says so with out_channels 64.
    let json = layout::flux_config_to_diffusers_json(&cfg);
    assert_eq!(
        (json["in_channels"].as_u64(), json["out_channels"].as_u64()),
        (Some(384), Some(64))
    );
}

/// Issue 30's cold start: a model from files with the first job's prompts (here with true CFG,
/// so a negative prompt too) encoded while the transformer loads makes the very image of a load
/// that encodes them in the job; the job takes the encodings made ahead, and later jobs encode
/// their own.
#[test]
fn prompts_encoded_while_loading_give_the_same_image() {
    use parallax::engine::load::load_pipeline_ahead;
    use parallax::engine::ModelChoice;
    use parallax::model::export::{write_demo_model, DemoSource, ExportLayout};
    use parallax::pipeline::ahead::prompts_of;
    use parallax::pipeline::GenerateRequest;
    let dir = tempfile::tempdir().expect("tmp");
    write_demo_model(dir.path(), ExportLayout::Diffusers, DemoSource::Trained).expect("export");
    let choice = ModelChoice::named(dir.path().to_str().expect("utf8"));
    let req = GenerateRequest {
        prompt: "a red circle on a blue square".into(),
        negative_prompt: Some("green".into()),
        true_cfg: Some(2.0),
        width: 64,
        height: 64,
        steps: Some(3),
        seed: 7,
        ..Default::default()
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
    let (sums, _) = parallax::model::load_clock::snapshot();
    assert!(!sums.is_empty());
    assert!(
        parallax::model::load_clock::ahead_snapshot().is_some_and(|(n, ms, _)| n >= 2 && ms > 0.0)
    );

    let g1 = overlapped
        .generate(&req, &mut |_| Ok(()))
        .expect("overlapped");
    assert!(overlapped.ahead.is_empty(), "the job took them");
    let g2 = plain.generate(&req, &mut |_| Ok(())).expect("plain");
    assert_eq!(g1.image.data, g2.image.data, "identical images");
    assert_eq!(g1.notes, g2.notes);
    // The next job encodes for itself, and still draws the same image.
    let g3 = overlapped.generate(&req, &mut |_| Ok(())).expect("again");
    assert_eq!(g3.image.data, g2.image.data);
    // A first job with another prompt: what was encoded ahead is dropped, not used.
    let other = load_pipeline_ahead(&choice, "cpu", None, &["a yellow star".to_string()])
        .expect("load ahead");
    let g4 = other.generate(&req, &mut |_| Ok(())).expect("other prompt");
    assert!(other.ahead.is_empty());
    assert_eq!(g4.image.data, g2.image.data);
}

/// A damaged text encoder file, with a prompt to encode while the transformer loads: the load
/// fails at once with an error naming the file (the text encoders load first), not a hang or a
/// panic.
#[test]
fn a_damaged_text_encoder_fails_the_overlapped_load_clearly() {
    use parallax::engine::load::load_pipeline_ahead;
    use parallax::engine::ModelChoice;
    use parallax::model::export::{write_demo_model, DemoSource, ExportLayout};
    let dir = tempfile::tempdir().expect("tmp");
    write_demo_model(dir.path(), ExportLayout::Diffusers, DemoSource::Trained).expect("export");
    let t5_dir = dir.path().join("text_encoder_2");
    let shard = std::fs::read_dir(&t5_dir)
        .expect("t5 folder")
        .map(|e| e.expect("entry").path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .expect("a T5 shard");
    std::fs::write(&shard, b"not a safetensors file at all").expect("damage");
    let choice = ModelChoice::named(dir.path().to_str().expect("utf8"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = load_pipeline_ahead(&choice, "cpu", None, &["a red circle".to_string()]);
        let _ = tx.send(r.map(|_| ()));
    });
    let r = rx
        .recv_timeout(std::time::Duration::from_secs(120))
        .expect("the load came back (no hang)");
    let e = r.expect_err("a damaged T5 shard fails the load");
    let name = shard
        .file_name()
        .expect("name")
        .to_string_lossy()
        .to_string();
    assert!(e.to_string().contains(&name), "{e}");
}

/// Where a memory plan builds T5 for each prompt (so that T5 and the transformer are never on the
/// device together), nothing is encoded while the transformer loads: that promise holds, and the
/// job encodes its prompt itself.
#[test]
fn t5_built_per_prompt_is_not_encoded_during_the_load() {
    use parallax::engine::overlap::load_files;
    use parallax::model::export::{write_demo_model, DemoSource, ExportLayout};
    use parallax::model::text::T5Residency;
    use parallax::pipeline::{GenerateRequest, LoadOptions};
    let dir = tempfile::tempdir().expect("tmp");
    write_demo_model(dir.path(), ExportLayout::Bfl, DemoSource::Trained).expect("export");
    let resolved = layout::resolve(dir.path().to_str().expect("utf8"), None).expect("resolve");
    let layout::ModelSpec::Files(files) = resolved.spec else {
        panic!("a FLUX.1 folder")
    };
    let prompts = ["a red circle".to_string()];
    let load = |t5| {
        let opts = LoadOptions {
            t5,
            ..Default::default()
        };
        load_files(&files, "x", DType::F32, &Device::Cpu, opts, &prompts).expect("load")
    };
    let (resident, on_demand) = (load(T5Residency::Resident), load(T5Residency::OnDemand));
    assert_eq!(resident.ahead.len(), 1);
    assert!(
        on_demand.ahead.is_empty(),
        "T5 built per prompt: nothing ahead"
    );
    let req = GenerateRequest {
        prompt: prompts[0].clone(),
        width: 64,
        height: 64,
        steps: Some(2),
        seed: 5,
        ..Default::default()
    };
    let a = resident.generate(&req, &mut |_| Ok(())).expect("resident");
    let b = on_demand
        .generate(&req, &mut |_| Ok(()))
        .expect("on demand");
    assert_eq!(a.image, b.image);
}
