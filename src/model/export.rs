//! Write the built-in demo model (trained, or the made-up `random:tiny`) to disk in FLUX.1's real
//! layouts.
//!
//! The files carry the exact tensor names, key layouts, shard indexes, config files and tokenizer
//! files of the real checkpoints, at the demo model's tiny sizes. Tests use them to exercise the
//! loaders end to end without any download; `parallax export-demo` lets a user try the loaders.
//! Every written folder holds a [`DEMO_MARKER`] file, so a model loaded from it is still labelled
//! a demo.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model::ClipTextTransformer;
use candle_transformers::models::t5::T5EncoderModel;

use super::demo_weights::DemoWeights;
use super::flux::{Flux, FluxConfig};
use super::layout::{flux_config_to_diffusers_json, FluxDiffusersMap};
use super::text::{self, DEMO_T5_MAX_LEN};
use super::tokenizer::PromptTokenizer;
use super::vae::{AutoEncoder, VaeConfig, VaeDiffusersMap};
use super::weights::{export, save_safetensors, Recorder};
use crate::error::{CandleResultExt, Error, Result};

pub use super::layout::DEMO_MARKER;

/// Which on-disk layout to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportLayout {
    /// `flux1-dev.safetensors` + `ae.safetensors` (BFL names), text encoders in diffusers folders.
    Bfl,
    /// A diffusers folder: `transformer/` (sharded), `vae/`, `text_encoder*/`, `tokenizer*/`.
    Diffusers,
    /// A ComfyUI install's tree: `models/diffusion_models/flux1-dev.safetensors` (BFL names),
    /// `models/vae/ae.safetensors`, `models/clip/clip_l.safetensors` and
    /// `models/clip/t5xxl_fp16.safetensors` (transformers' names), and the tokenizers where
    /// ComfyUI ships them (`comfy/sd1_tokenizer/`, `comfy/text_encoders/t5_tokenizer/`). With
    /// `scaled_fp8` the transformer is `flux1-dev-fp8_scaled.safetensors` below
    /// `model.diffusion_model.` in ComfyUI's scaled-fp8 form and T5 `t5xxl_fp8_e4m3fn.safetensors`,
    /// a plain E4M3 cast ([`write_fp8`]). Other tensors keep the demo's f32: the loaders take each
    /// tensor's own dtype, so the file names are ComfyUI's, not the precision.
    ComfyUi { scaled_fp8: bool },
}

/// Seeds of the demo model's parts (the transformer's, the autoencoder's, the text encoders').
#[derive(Debug, Clone, Copy)]
pub struct DemoSeeds {
    pub flux: u64,
    pub vae: u64,
    pub text: u64,
}

impl DemoSeeds {
    /// The seeds of the built-in demo model.
    pub const BUILTIN: DemoSeeds = DemoSeeds {
        flux: 0x5041_5241_4C4C_4158, // "PARALLAX"
        vae: 0x5041_5241_4C4C_4159,
        text: 0x5041_5241_4C4C_415A,
    };
}

/// Which demo model to write.
#[derive(Debug, Clone, Copy)]
pub enum DemoSource {
    /// The trained weights compiled in from `assets/demo/` (`--model demo`).
    Trained,
    /// Made-up weights from seeds (`random:tiny` with [`DemoSeeds::BUILTIN`]).
    Seeded(DemoSeeds),
}

/// Which weights of a [`DemoSource`] to read.
#[derive(Debug, Clone, Copy)]
enum Part {
    Transformer,
    Autoencoder,
    T5,
    Clip,
}

impl DemoSource {
    fn backend(self, part: Part) -> Result<Box<dyn SimpleBackend>> {
        Ok(match self {
            DemoSource::Trained => super::demo::backend(match part {
                Part::Transformer => super::demo::TRANSFORMER,
                Part::Autoencoder => super::demo::AUTOENCODER,
                Part::T5 => super::demo::T5,
                Part::Clip => super::demo::CLIP,
            })?,
            DemoSource::Seeded(seeds) => Box::new(DemoWeights::new(match part {
                Part::Transformer => seeds.flux,
                Part::Autoencoder => seeds.vae,
                Part::T5 | Part::Clip => seeds.text,
            })),
        })
    }

    fn flux_config(self) -> FluxConfig {
        match self {
            DemoSource::Trained => FluxConfig::demo(),
            DemoSource::Seeded(_) => FluxConfig::tiny(),
        }
    }

    fn vae_config(self) -> VaeConfig {
        match self {
            DemoSource::Trained => VaeConfig::demo(),
            DemoSource::Seeded(_) => VaeConfig::tiny(),
        }
    }
}

/// Capture the canonical tensors a model asks for when built from `backend`.
pub(crate) fn capture<T>(
    backend: Box<dyn SimpleBackend>,
    build: impl FnOnce(VarBuilder<'static>) -> Result<T>,
) -> Result<Vec<(String, Tensor)>> {
    let (rec, seen) = Recorder::boxed(backend);
    let vb = VarBuilder::from_backend(Box::new(rec), DType::F32, Device::Cpu);
    build(vb)?;
    let mut tensors = seen
        .lock()
        .map_err(|_| Error::Image("tensor recorder poisoned".into()))?
        .clone();
    // A model may ask for a tensor twice (shared embeddings): keep the first.
    let mut names = std::collections::HashSet::new();
    tensors.retain(|(n, _)| names.insert(n.clone()));
    Ok(tensors)
}

pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Image(format!("serialising {}: {e}", path.display())))?;
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

pub(crate) fn mkdir(path: &Path) -> Result<()> {
    std::fs::create_dir_all(path).map_err(|e| Error::io(path, e))
}

/// Write `tensors` as `shards` files `{stem}-0000i-of-0000n.safetensors` plus the index json.
pub fn write_sharded(
    dir: &Path,
    stem: &str,
    tensors: &[(String, Tensor)],
    shards: usize,
) -> Result<()> {
    mkdir(dir)?;
    let shards = shards.max(1);
    let per = tensors.len().div_ceil(shards).max(1);
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    let n = tensors.len().div_ceil(per);
    for (i, chunk) in tensors.chunks(per).enumerate() {
        let name = format!("{stem}-{:05}-of-{:05}.safetensors", i + 1, n);
        save_safetensors(chunk, &dir.join(&name))?;
        for (t, x) in chunk {
            weight_map.insert(t.clone(), serde_json::Value::String(name.clone()));
            total += x.elem_count() * x.dtype().size_in_bytes();
        }
    }
    write_json(
        &dir.join(format!("{stem}.safetensors.index.json")),
        &serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map }),
    )
}

/// Write canonical tensors with every matrix in F8_E4M3, below `prefix`, the rest in f32.
/// `scaled` gives ComfyUI's "scaled fp8" form (its `*_fp8_scaled` transformers): each matrix
/// divided by its own scale (its largest magnitude over E4M3's largest value), the scale beside
/// it as an f32 scalar `….scale_weight` (and a `….scale_input` of 1, which loaders that
/// dequantise leave alone), and the `scaled_fp8` marker tensor ComfyUI looks for. Unscaled, the
/// matrices are plain casts with no scales (as in `t5xxl_fp8_e4m3fn.safetensors`).
pub fn write_fp8(
    tensors: &[(String, Tensor)],
    prefix: &str,
    scaled: bool,
    path: &Path,
) -> Result<()> {
    use crate::kernels::fp8::Fp8;
    use safetensors::Dtype as St;
    let f32_bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut out: Vec<(String, St, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in tensors {
        let key = format!("{prefix}{name}");
        let values: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        if t.rank() != 2 || !key.ends_with(".weight") {
            out.push((key, St::F32, t.dims().to_vec(), f32_bytes(&values)));
            continue;
        }
        let stem = &key[..key.len() - ".weight".len()];
        let scale = if scaled {
            values.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12) / Fp8::E4M3.max()
        } else {
            1.0
        };
        let fp8: Vec<u8> = values.iter().map(|v| Fp8::E4M3.encode(v / scale)).collect();
        if scaled {
            out.push((
                format!("{stem}.scale_weight"),
                St::F32,
                vec![],
                f32_bytes(&[scale]),
            ));
            out.push((
                format!("{stem}.scale_input"),
                St::F32,
                vec![],
                f32_bytes(&[1.0]),
            ));
        }
        out.push((key, St::F8_E4M3, t.dims().to_vec(), fp8));
    }
    if scaled {
        out.push((format!("{prefix}scaled_fp8"), St::F8_E4M3, vec![0], vec![]));
    }
    let mut views = Vec::with_capacity(out.len());
    for (name, dtype, shape, bytes) in &out {
        let view = safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
            .map_err(|e| Error::Image(format!("tensor {name}: {e}")))?;
        views.push((name.clone(), view));
    }
    let bytes = safetensors::tensor::serialize(views, None)
        .map_err(|e| Error::Image(format!("serialising {}: {e}", path.display())))?;
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// The demo text encoders' canonical tensors: (T5's, CLIP's below `text_model.`), the names of
/// transformers' `T5EncoderModel` and `CLIPTextModel`.
type EncoderTensors = (Vec<(String, Tensor)>, Vec<(String, Tensor)>);

fn demo_text_tensors(source: DemoSource) -> Result<EncoderTensors> {
    let t5_cfg = text::t5_demo_config();
    let clip_cfg = text::clip_demo_config();
    let t5 = capture(source.backend(Part::T5)?, |vb| {
        T5EncoderModel::load(vb, &t5_cfg).px()
    })?;
    let clip = capture(source.backend(Part::Clip)?, |vb| {
        ClipTextTransformer::new(vb.pp("text_model"), &clip_cfg).px()
    })?;
    Ok((t5, clip))
}

/// Write ComfyUI's tree under `dir` (see [`ExportLayout::ComfyUi`]), the transformer's and
/// autoencoder's canonical tensors given; returns the transformer's folder (for the marker).
fn write_comfyui_tree(
    dir: &Path,
    flux: &[(String, Tensor)],
    vae: &[(String, Tensor)],
    scaled_fp8: bool,
    source: DemoSource,
) -> Result<std::path::PathBuf> {
    let models = dir.join("models");
    let (unet, vae_dir, clip_dir) = (
        models.join("diffusion_models"),
        models.join("vae"),
        models.join("clip"),
    );
    for d in [&unet, &vae_dir, &clip_dir] {
        mkdir(d)?;
    }
    save_safetensors(vae, &vae_dir.join("ae.safetensors"))?;
    let (t5, clip) = demo_text_tensors(source)?;
    save_safetensors(&clip, &clip_dir.join("clip_l.safetensors"))?;
    if scaled_fp8 {
        write_fp8(
            flux,
            "model.diffusion_model.",
            true,
            &unet.join("flux1-dev-fp8_scaled.safetensors"),
        )?;
        write_fp8(
            &t5,
            "",
            false,
            &clip_dir.join("t5xxl_fp8_e4m3fn.safetensors"),
        )?;
    } else {
        save_safetensors(flux, &unet.join("flux1-dev.safetensors"))?;
        save_safetensors(&t5, &clip_dir.join("t5xxl_fp16.safetensors"))?;
    }
    for (sub, name, len) in [
        (
            super::comfyui::CLIP_TOKENIZER_DIR,
            "clip",
            text::CLIP_MAX_LEN,
        ),
        (super::comfyui::T5_TOKENIZER_DIR, "t5", DEMO_T5_MAX_LEN),
    ] {
        let d = dir.join(sub);
        mkdir(&d)?;
        PromptTokenizer::demo(len, name)?.save(&d.join("tokenizer.json"))?;
    }
    Ok(unet)
}

/// Write the demo text encoders as a diffusers checkout under `root`: `text_encoder/` (CLIP),
/// `text_encoder_2/` (T5, two shards), `tokenizer/`, `tokenizer_2/` (tokenizer.json files).
pub fn write_demo_text_encoders(root: &Path, source: DemoSource) -> Result<()> {
    let t5_cfg = text::t5_demo_config();
    let clip_cfg = text::clip_demo_config();
    let (t5, clip) = demo_text_tensors(source)?;

    let te = root.join("text_encoder");
    mkdir(&te)?;
    write_json(
        &te.join("config.json"),
        &serde_json::json!({
            "architectures": ["CLIPTextModel"],
            "model_type": "clip_text_model",
            "hidden_size": clip_cfg.embed_dim,
            "intermediate_size": clip_cfg.intermediate_size,
            "max_position_embeddings": clip_cfg.max_position_embeddings,
            "num_hidden_layers": clip_cfg.num_hidden_layers,
            "num_attention_heads": clip_cfg.num_attention_heads,
            "vocab_size": clip_cfg.vocab_size,
            "projection_dim": clip_cfg.projection_dim,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        }),
    )?;
    save_safetensors(&clip, &te.join("model.safetensors"))?;

    let te2 = root.join("text_encoder_2");
    mkdir(&te2)?;
    write_json(
        &te2.join("config.json"),
        &serde_json::json!({
            "architectures": ["T5EncoderModel"],
            "model_type": "t5",
            "vocab_size": t5_cfg.vocab_size,
            "d_model": t5_cfg.d_model,
            "d_kv": t5_cfg.d_kv,
            "d_ff": t5_cfg.d_ff,
            "num_layers": t5_cfg.num_layers,
            "num_heads": t5_cfg.num_heads,
            "relative_attention_num_buckets": t5_cfg.relative_attention_num_buckets,
            "relative_attention_max_distance": t5_cfg.relative_attention_max_distance,
            "dropout_rate": t5_cfg.dropout_rate,
            "layer_norm_epsilon": t5_cfg.layer_norm_epsilon,
            "initializer_factor": t5_cfg.initializer_factor,
            "feed_forward_proj": "gated-gelu",
            "tie_word_embeddings": t5_cfg.tie_word_embeddings,
            "is_encoder_decoder": t5_cfg.is_encoder_decoder,
            "use_cache": t5_cfg.use_cache,
            "pad_token_id": t5_cfg.pad_token_id,
            "eos_token_id": t5_cfg.eos_token_id,
        }),
    )?;
    write_sharded(&te2, "model", &t5, 2)?;

    for (sub, name, len) in [
        ("tokenizer", "clip", text::CLIP_MAX_LEN),
        ("tokenizer_2", "t5", DEMO_T5_MAX_LEN),
    ] {
        let dir = root.join(sub);
        mkdir(&dir)?;
        PromptTokenizer::demo(len, name)?.save(&dir.join("tokenizer.json"))?;
    }
    Ok(())
}

/// Write a demo model (the trained one [`crate::pipeline::Pipeline::demo`] loads, or the made-up
/// one of [`crate::pipeline::Pipeline::tiny_random`]) under `dir`.
pub fn write_demo_model(dir: &Path, layout: ExportLayout, source: DemoSource) -> Result<()> {
    mkdir(dir)?;
    let flux_cfg = source.flux_config();
    let vae_cfg = source.vae_config();
    let flux = capture(source.backend(Part::Transformer)?, |vb| {
        Flux::new(&flux_cfg, vb).px()
    })?;
    let vae = capture(source.backend(Part::Autoencoder)?, |vb| {
        AutoEncoder::new(&vae_cfg, vb).px()
    })?;
    let mut marked = dir.to_path_buf();
    match layout {
        ExportLayout::Bfl => {
            save_safetensors(&flux, &dir.join("flux1-dev.safetensors"))?;
            save_safetensors(&vae, &dir.join("ae.safetensors"))?;
        }
        ExportLayout::ComfyUi { scaled_fp8 } => {
            marked = write_comfyui_tree(dir, &flux, &vae, scaled_fp8, source)?;
        }
        ExportLayout::Diffusers => {
            let tmap = FluxDiffusersMap {
                hidden: flux_cfg.hidden_size,
                mlp_hidden: flux_cfg.mlp_hidden(),
            };
            let tdir = dir.join("transformer");
            write_sharded(&tdir, "diffusion_pytorch_model", &export(&tmap, &flux)?, 2)?;
            write_json(
                &tdir.join("config.json"),
                &flux_config_to_diffusers_json(&flux_cfg),
            )?;
            let vdir = dir.join("vae");
            mkdir(&vdir)?;
            let vmap = VaeDiffusersMap::new(vae_cfg.clone());
            save_safetensors(
                &export(&vmap, &vae)?,
                &vdir.join("diffusion_pytorch_model.safetensors"),
            )?;
            write_json(&vdir.join("config.json"), &vae_cfg.to_diffusers_json())?;
            write_json(
                &dir.join("model_index.json"),
                &serde_json::json!({
                    "_class_name": "FluxPipeline",
                    "transformer": ["diffusers", "FluxTransformer2DModel"],
                    "vae": ["diffusers", "AutoencoderKL"],
                    "text_encoder": ["transformers", "CLIPTextModel"],
                    "text_encoder_2": ["transformers", "T5EncoderModel"],
                    "tokenizer": ["transformers", "CLIPTokenizer"],
                    "tokenizer_2": ["transformers", "T5TokenizerFast"],
                }),
            )?;
        }
    }
    if !matches!(layout, ExportLayout::ComfyUi { .. }) {
        write_demo_text_encoders(dir, source)?;
    }
    let weights = match source {
        DemoSource::Trained => "trained by Parallax on its own scenes of coloured shapes",
        DemoSource::Seeded(_) => "with made-up weights",
    };
    std::fs::write(
        marked.join(DEMO_MARKER),
        format!(
            "This folder holds Parallax's demo model: FLUX.1's layout and tensor names at a tiny \
             size, {weights}. It is not FLUX.1; images made from it are labelled DEMO.\n"
        ),
    )
    .map_err(|e| Error::io(marked.join(DEMO_MARKER), e))
}
