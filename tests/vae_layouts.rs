//! The autoencoder loads identically from a Black Forest Labs `ae.safetensors` and from a
//! diffusers `vae/` folder, and reports mis-shaped or missing tensors by name.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use parallax::error::{CandleResultExt, Error};
use parallax::model::demo_weights::DemoWeights;
use parallax::model::vae::{self, AutoEncoder, VaeConfig, VaeDiffusersMap};
use parallax::model::weights::{self, Identity, KeyMap, MappedWeights, Recorder, SafetensorsSet};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A diffusers `vae/config.json` for [`VaeConfig::tiny`], shaped like FLUX.1's real one.
const TINY_DIFFUSERS_CONFIG: &str = r#"{
  "_class_name": "AutoencoderKL",
  "_diffusers_version": "0.30.0.dev0",
  "act_fn": "silu",
  "block_out_channels": [16, 32, 64, 64],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "force_upcast": true,
  "in_channels": 3,
  "latent_channels": 16,
  "latents_mean": null,
  "latents_std": null,
  "layers_per_block": 1,
  "mid_block_add_attention": true,
  "norm_num_groups": 8,
  "out_channels": 3,
  "sample_size": 1024,
  "scaling_factor": 0.3611,
  "shift_factor": 0.1159,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
  "use_post_quant_conv": false,
  "use_quant_conv": false
}"#;

/// The tiny demo autoencoder and the canonical tensors it was built from.
fn demo_vae() -> parallax::Result<(AutoEncoder, Vec<(String, Tensor)>)> {
    let (recorder, seen) = Recorder::new(DemoWeights::new(11));
    let vb = VarBuilder::from_backend(Box::new(recorder), DType::F32, Device::Cpu);
    let vae = AutoEncoder::new(&VaeConfig::tiny(), vb).px()?;
    let tensors = seen.lock().map(|s| s.clone()).unwrap_or_default();
    Ok((vae, tensors))
}

fn load(path: &Path, map: Arc<dyn KeyMap>) -> parallax::Result<VarBuilder<'static>> {
    let set = SafetensorsSet::open(path)?;
    Ok(MappedWeights::new(Arc::new(set), map).var_builder(DType::F32, &Device::Cpu))
}

fn bfl_map() -> Arc<dyn KeyMap> {
    Arc::new(Identity {
        prefix: String::new(),
    })
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> candle_core::Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// A fixed latent (the same in every run).
fn latent() -> candle_core::Result<Tensor> {
    let n = 16 * 4 * 6;
    let values: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
        .collect();
    Tensor::from_vec(values, (1, 16, 4, 6), &Device::Cpu)
}

#[test]
fn bfl_and_diffusers_files_decode_identically() -> TestResult {
    let (reference, tensors) = demo_vae()?;
    let names: HashSet<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), tensors.len(), "a tensor was loaded twice");
    assert!(names.contains("encoder.mid.attn_1.q.weight"));
    assert!(names.contains("decoder.up.3.upsample.conv.weight"));
    assert!(!names.contains("decoder.up.0.upsample.conv.weight"));

    let dir = tempfile::tempdir()?;
    // (a) BFL's single file with the canonical names.
    let ae = dir.path().join("ae.safetensors");
    weights::save_safetensors(&tensors, &ae)?;
    // (b) A diffusers folder.
    let vae_dir = dir.path().join("vae");
    std::fs::create_dir_all(&vae_dir)?;
    let map = VaeDiffusersMap::new(VaeConfig::tiny());
    let exported = weights::export(&map, &tensors)?;
    weights::save_safetensors(
        &exported,
        &vae_dir.join("diffusion_pytorch_model.safetensors"),
    )?;
    std::fs::write(vae_dir.join("config.json"), TINY_DIFFUSERS_CONFIG)?;

    // The exported file really uses diffusers' names and shapes.
    let set = SafetensorsSet::open(&vae_dir)?;
    assert_eq!(set.len(), tensors.len());
    for name in [
        "decoder.up_blocks.0.resnets.0.conv1.weight",
        "decoder.up_blocks.0.upsamplers.0.conv.weight",
        "decoder.up_blocks.3.resnets.1.conv2.bias",
        "decoder.up_blocks.2.resnets.0.conv_shortcut.weight",
        "decoder.mid_block.resnets.1.norm2.weight",
        "decoder.mid_block.attentions.0.group_norm.bias",
        "decoder.mid_block.attentions.0.to_out.0.bias",
        "decoder.conv_norm_out.weight",
        "encoder.down_blocks.0.downsamplers.0.conv.weight",
        "encoder.down_blocks.1.resnets.0.conv_shortcut.bias",
        "encoder.conv_out.weight",
    ] {
        assert!(
            set.contains(name),
            "{name} missing from the diffusers export"
        );
    }
    assert!(!set.contains("decoder.up_blocks.3.upsamplers.0.conv.weight"));
    let to_q = set
        .meta("encoder.mid_block.attentions.0.to_q.weight")
        .ok_or("to_q missing")?;
    assert_eq!(to_q.shape, vec![64, 64]);

    let cfg = vae::vae_config_from_diffusers_json(&vae_dir.join("config.json"))?;
    assert_eq!(cfg, VaeConfig::tiny());

    let from_bfl = AutoEncoder::new(&VaeConfig::tiny(), load(&ae, bfl_map())?).px()?;
    let from_diffusers = AutoEncoder::new(
        &cfg,
        load(&vae_dir, Arc::new(VaeDiffusersMap::new(cfg.clone())))?,
    )
    .px()?;

    let z = latent()?;
    let expected = reference.decode(&z)?;
    assert_eq!(expected.dims(), &[1, 3, 32, 48]);
    assert_eq!(max_abs_diff(&from_bfl.decode(&z)?, &expected)?, 0.0);
    assert_eq!(max_abs_diff(&from_diffusers.decode(&z)?, &expected)?, 0.0);

    // The encoders were mapped correctly too.
    let expected = reference.encode(&expected)?;
    assert_eq!(expected.dims(), z.dims());
    let image = reference.decode(&z)?;
    assert_eq!(max_abs_diff(&from_bfl.encode(&image)?, &expected)?, 0.0);
    assert_eq!(
        max_abs_diff(&from_diffusers.encode(&image)?, &expected)?,
        0.0
    );
    Ok(())
}

#[test]
fn diffusers_config_round_trips() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("config.json");
    std::fs::write(&path, TINY_DIFFUSERS_CONFIG)?;
    assert_eq!(
        vae::vae_config_from_diffusers_json(&path)?,
        VaeConfig::tiny()
    );

    for cfg in [VaeConfig::tiny(), VaeConfig::flux()] {
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&cfg.to_diffusers_json())?,
        )?;
        assert_eq!(vae::vae_config_from_diffusers_json(&path)?, cfg);
    }

    std::fs::write(&path, r#"{"block_out_channels": 128}"#)?;
    match vae::vae_config_from_diffusers_json(&path) {
        Err(Error::BadConfig { path: p, reason }) => {
            assert_eq!(p, path);
            assert!(!reason.is_empty());
        }
        other => panic!("expected BadConfig, got {other:?}"),
    }
    match vae::vae_config_from_diffusers_json(&dir.path().join("absent.json")) {
        Err(Error::Io { .. }) => {}
        other => panic!("expected Io, got {other:?}"),
    }
    Ok(())
}

#[test]
fn mis_shaped_tensor_is_named() -> TestResult {
    let (_, tensors) = demo_vae()?;
    let dir = tempfile::tempdir()?;

    // BFL layout: a 3x3 kernel stored as 5x5.
    let target = "decoder.up.1.block.0.conv1.weight";
    let good = tensors
        .iter()
        .find(|(n, _)| n == target)
        .map(|(_, t)| t.dims().to_vec())
        .ok_or("tensor not recorded")?;
    assert_eq!(good, vec![32, 64, 3, 3]);
    let mut broken = tensors.clone();
    for (n, t) in broken.iter_mut() {
        if n == target {
            *t = Tensor::zeros((32, 64, 5, 5), DType::F32, &Device::Cpu)?;
        }
    }
    let ae = dir.path().join("ae.safetensors");
    weights::save_safetensors(&broken, &ae)?;
    let err = AutoEncoder::new(&VaeConfig::tiny(), load(&ae, bfl_map())?)
        .err()
        .ok_or("a mis-shaped tensor was accepted")?;
    match Error::from_candle(err) {
        Error::ShapeMismatch {
            tensor,
            location,
            expected,
            found,
        } => {
            assert!(tensor.contains(target), "{tensor}");
            assert!(location.contains("ae.safetensors"), "{location}");
            assert_eq!(expected, vec![32, 64, 3, 3]);
            assert_eq!(found, vec![32, 64, 5, 5]);
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }

    // Diffusers layout: an attention projection with a wrong column count.
    let map = VaeDiffusersMap::new(VaeConfig::tiny());
    let mut exported = weights::export(&map, &tensors)?;
    let stored = "decoder.mid_block.attentions.0.to_q.weight";
    let mut replaced = false;
    for (n, t) in exported.iter_mut() {
        if n == stored {
            *t = Tensor::zeros((64, 65), DType::F32, &Device::Cpu)?;
            replaced = true;
        }
    }
    assert!(replaced);
    let path = dir.path().join("diffusion_pytorch_model.safetensors");
    weights::save_safetensors(&exported, &path)?;
    let err = AutoEncoder::new(&VaeConfig::tiny(), load(&path, Arc::new(map))?)
        .px()
        .err()
        .ok_or("a mis-shaped tensor was accepted")?;
    let message = err.to_string();
    match err {
        Error::ShapeMismatch {
            tensor,
            expected,
            found,
            ..
        } => {
            assert!(tensor.contains(stored), "{tensor}");
            assert!(tensor.contains("decoder.mid.attn_1.q.weight"), "{tensor}");
            assert_eq!(expected, vec![64, 64, 1, 1]);
            assert_eq!(found, vec![64, 65]);
            assert!(message.contains("[64, 65]") && message.contains("[64, 64, 1, 1]"));
        }
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
    Ok(())
}

#[test]
fn decoder_only_file_loads_without_encoder() -> TestResult {
    let (reference, tensors) = demo_vae()?;
    let decoder_only: Vec<(String, Tensor)> = tensors
        .into_iter()
        .filter(|(n, _)| n.starts_with("decoder."))
        .collect();
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("ae.safetensors");
    weights::save_safetensors(&decoder_only, &path)?;

    let err = AutoEncoder::new(&VaeConfig::tiny(), load(&path, bfl_map())?)
        .px()
        .err()
        .ok_or("a file without encoder loaded as a full autoencoder")?;
    match err {
        Error::MissingTensor { tensor, .. } => assert!(tensor.contains("encoder."), "{tensor}"),
        other => panic!("expected MissingTensor, got {other:?}"),
    }

    let vae =
        AutoEncoder::new_with_optional_encoder(&VaeConfig::tiny(), load(&path, bfl_map())?).px()?;
    assert!(!vae.has_encoder());
    let vae2 = AutoEncoder::new_decoder_only(&VaeConfig::tiny(), load(&path, bfl_map())?).px()?;
    let z = latent()?;
    let expected = reference.decode(&z)?;
    assert_eq!(max_abs_diff(&vae.decode(&z)?, &expected)?, 0.0);
    assert_eq!(max_abs_diff(&vae2.decode(&z)?, &expected)?, 0.0);
    assert!(vae.encode(&expected).is_err());
    Ok(())
}
