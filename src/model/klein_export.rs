//! `random:klein-tiny` written to disk in FLUX.2 klein's real layouts ([`write_tiny`]): the
//! exact tensor names, config files and tokenizer file of the published checkpoints at the tiny
//! model's sizes, so the loaders run end to end without a download (tests, and a user trying
//! `parallax generate --model DIR`). The folder is marked as holding made-up weights
//! ([`DEMO_MARKER`]), so images made from it are labelled.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::demo_weights::DemoWeights;
use crate::model::export::{capture, mkdir, write_fp8, write_json, ExportLayout};
use crate::model::klein::keys::{KleinDiffusersMap, KleinVaeDiffusersMap};
use crate::model::klein::text::{KLEIN_MAX_LEN, KLEIN_TEXT_LAYERS, QWEN_CHAT_TOKENS};
use crate::model::klein::{
    tiny_vae_config, Klein, KleinConfig, KleinVae, BATCH_NORM_EPS, LATENT, TINY_SEEDS,
    TINY_TEXT_SEED,
};
use crate::model::layout::DEMO_MARKER;
use crate::model::qwen3::{Qwen3, Qwen3Config};
use crate::model::tokenizer::{PromptTokenizer, TOKENIZER_JSON};
use crate::model::weights::{export, save_safetensors};

/// The name of the single transformer file in the Black Forest Labs layout.
pub const TINY_BFL_FILE: &str = "flux-2-klein-tiny.safetensors";
/// The name of the FP8 single transformer file [`write_tiny_fp8`] writes.
pub const TINY_FP8_FILE: &str = "flux-2-klein-tiny-fp8.safetensors";

/// A transformer config as diffusers' `Flux2Transformer2DModel` writes it.
fn transformer_json(cfg: &KleinConfig) -> serde_json::Value {
    serde_json::json!({
        "_class_name": "Flux2Transformer2DModel",
        "attention_head_dim": cfg.head_dim(),
        "num_attention_heads": cfg.num_heads,
        "num_layers": cfg.depth,
        "num_single_layers": cfg.depth_single_blocks,
        "in_channels": cfg.in_channels,
        "joint_attention_dim": cfg.context_in_dim,
        "mlp_ratio": cfg.mlp_ratio,
        "guidance_embeds": cfg.guidance_embed,
        "axes_dims_rope": cfg.axes_dim,
        "rope_theta": cfg.theta,
    })
}

/// A Qwen3 config as transformers writes it.
fn qwen3_json(cfg: &Qwen3Config) -> serde_json::Value {
    serde_json::json!({
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_act": "silu",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
    })
}

/// Write `random:klein-tiny` (its transformer, autoencoder, Qwen3 and byte tokenizer, the same
/// weights [`crate::model::klein::random_model`] and [`crate::model::klein::random_text`] make)
/// to `dir`:
/// - [`ExportLayout::Diffusers`]: a klein repo's folder (`transformer/`, `vae/`,
///   `text_encoder/`, `tokenizer/`, `model_index.json` of a distilled checkpoint);
/// - [`ExportLayout::Bfl`]: Black Forest Labs' [`TINY_BFL_FILE`] and `ae.safetensors`, with
///   the text encoder in `text_encoder/` and `tokenizer/` beside them.
///
/// The autoencoder's statistics are written as mean 0 and variance `1 - eps` (a deviation of 1
/// once the batch norm's epsilon is added back).
pub fn write_tiny(dir: &Path, layout: ExportLayout) -> Result<()> {
    mkdir(dir)?;
    let cfg = KleinConfig::tiny();
    let transformer = tiny_transformer(&cfg)?;
    let vae_cfg = tiny_vae_config();
    let mut vae = capture(Box::new(DemoWeights::new(TINY_SEEDS.1)), |vb| {
        Ok(KleinVae::new_unnormalised(&vae_cfg, vb)?)
    })?;
    let n = LATENT.token_channels();
    vae.push((
        "bn.running_mean".into(),
        Tensor::zeros(n, DType::F32, &Device::Cpu)?,
    ));
    vae.push((
        "bn.running_var".into(),
        Tensor::full((1.0 - BATCH_NORM_EPS) as f32, n, &Device::Cpu)?,
    ));
    match layout {
        ExportLayout::Bfl => {
            save_safetensors(&transformer, &dir.join(TINY_BFL_FILE))?;
            save_safetensors(&vae, &dir.join("ae.safetensors"))?;
        }
        ExportLayout::Diffusers => {
            let tdir = dir.join("transformer");
            mkdir(&tdir)?;
            let map = KleinDiffusersMap {
                hidden: cfg.hidden_size,
            };
            save_safetensors(
                &export(&map, &transformer)?,
                &tdir.join("diffusion_pytorch_model.safetensors"),
            )?;
            write_json(&tdir.join("config.json"), &transformer_json(&cfg))?;
            let vdir = dir.join("vae");
            mkdir(&vdir)?;
            let map = KleinVaeDiffusersMap::new(vae_cfg.clone());
            save_safetensors(
                &export(&map, &vae)?,
                &vdir.join("diffusion_pytorch_model.safetensors"),
            )?;
            let mut json = vae_cfg.to_diffusers_json();
            json["_class_name"] = "AutoencoderKLFlux2".into();
            json["batch_norm_eps"] = BATCH_NORM_EPS.into();
            write_json(&vdir.join("config.json"), &json)?;
            write_json(
                &dir.join("model_index.json"),
                &serde_json::json!({
                    "_class_name": "Flux2KleinPipeline",
                    "is_distilled": true,
                    "transformer": ["diffusers", "Flux2Transformer2DModel"],
                    "vae": ["diffusers", "AutoencoderKLFlux2"],
                    "text_encoder": ["transformers", "Qwen3ForCausalLM"],
                    "tokenizer": ["transformers", "Qwen2TokenizerFast"],
                    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                }),
            )?;
        }
        ExportLayout::ComfyUi { .. } => {
            return Err(Error::setting(
                "layout",
                "comfyui",
                "klein is written in the diffusers or the Black Forest Labs layout",
            ))
        }
    }
    write_text_encoder(dir)?;
    std::fs::write(
        dir.join(DEMO_MARKER),
        "This folder holds FLUX.2 klein's layout and tensor names at a tiny size with made-up \
         weights (Parallax's random:klein-tiny). It is not FLUX.2 klein; images made from it \
         are labelled DEMO.\n",
    )
    .map_err(|source| Error::Write {
        path: dir.join(DEMO_MARKER),
        source,
    })
}

/// `random:klein-tiny`'s transformer, in Black Forest Labs' names.
fn tiny_transformer(cfg: &KleinConfig) -> Result<Vec<(String, Tensor)>> {
    capture(Box::new(DemoWeights::new(TINY_SEEDS.0)), |vb| {
        Ok(Klein::new(cfg, vb)?)
    })
}

/// `random:klein-tiny`'s transformer as an FP8 single file, [`TINY_FP8_FILE`] in `dir` (beside
/// what [`write_tiny`] writes in the Black Forest Labs layout, which it needs to run), written as
/// FLUX.1's FP8 files are ([`crate::model::export::write_fp8`]): every matrix in E4M3, the rest
/// in f32; `scaled`: ComfyUI's scaled-fp8 form below `model.diffusion_model.` (a scale per
/// matrix, an input scale of 1, the `scaled_fp8` marker), else a plain cast under BFL's names.
/// Returns the file's path.
pub fn write_tiny_fp8(dir: &Path, scaled: bool) -> Result<PathBuf> {
    mkdir(dir)?;
    let path = dir.join(TINY_FP8_FILE);
    let prefix = if scaled { "model.diffusion_model." } else { "" };
    write_fp8(
        &tiny_transformer(&KleinConfig::tiny())?,
        prefix,
        scaled,
        &path,
    )?;
    Ok(path)
}

/// The tiny Qwen3 (`text_encoder/`, the layers klein reads) and its byte tokenizer
/// (`tokenizer/tokenizer.json`).
fn write_text_encoder(dir: &Path) -> Result<()> {
    let qcfg = Qwen3Config::tiny();
    let highest = KLEIN_TEXT_LAYERS[KLEIN_TEXT_LAYERS.len() - 1].min(qcfg.num_hidden_layers);
    let qwen = capture(Box::new(DemoWeights::new(TINY_TEXT_SEED)), |vb| {
        Ok(Qwen3::new_partial(&qcfg, vb, highest)?)
    })?;
    let edir = dir.join("text_encoder");
    mkdir(&edir)?;
    save_safetensors(&qwen, &edir.join("model.safetensors"))?;
    write_json(&edir.join("config.json"), &qwen3_json(&qcfg))?;
    let kdir = dir.join("tokenizer");
    mkdir(&kdir)?;
    PromptTokenizer::byte_level_chat(KLEIN_MAX_LEN, "qwen3", &QWEN_CHAT_TOKENS, 0)?
        .save(&kdir.join(TOKENIZER_JSON))
}
