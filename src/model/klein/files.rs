//! klein's parts on disk: which files make a FLUX.2 klein model, from a diffusers folder
//! (`transformer/`, `vae/`, `text_encoder/` (Qwen3), `tokenizer/`, `model_index.json`) or from
//! Black Forest Labs' single transformer file with the autoencoder and the Qwen3 text encoder
//! named apart ([`resolve`]); told apart from FLUX.1 by the transformer's tensor names
//! ([`super::keys::detect_layout`]). [`load_text`] reads Qwen3 and its tokenizer, [`load_rest`]
//! the transformer and the autoencoder (the text first, so a prompt can be encoded while the
//! rest is read).

use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::config::KleinConfig;
use super::family::{load_transformer_stage, load_vae};
use super::keys;
use super::model::Klein;
use super::text::{KleinTextEncoder, KLEIN_MAX_LEN, KLEIN_TEXT_LAYERS};
use super::vae::KleinVae;
use crate::error::{Error, Result};
use crate::model::linear::Fp8Groups;
use crate::model::load_clock::{time, LoadPhase};
use crate::model::text::T5Residency;
use crate::model::tokenizer::TOKENIZER_JSON;
use crate::model::weights::SafetensorsSet;

/// A FLUX.2 klein model's files, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KleinFiles {
    /// A diffusers `transformer/` folder or Black Forest Labs' single file.
    pub transformer: PathBuf,
    /// A diffusers `vae/` folder or Black Forest Labs' `ae.safetensors`.
    pub vae: PathBuf,
    /// Qwen3: a transformers folder (`config.json` and its weights) or one `.safetensors` file.
    pub text_encoder: PathBuf,
    /// The folder holding Qwen3's `tokenizer.json`.
    pub tokenizer: PathBuf,
    /// A distilled checkpoint (4 steps, no CFG) rather than a Base one (50 steps, true CFG).
    pub distilled: bool,
    /// The folder is marked as holding made-up weights (Parallax's demo marker file: the
    /// resolver sets it, [`resolve`] leaves it false).
    pub demo: bool,
}

impl KleinFiles {
    /// The transformer's config: its `config.json` in a diffusers folder, else read from the
    /// file's tensor shapes (no weights read).
    pub fn config(&self) -> Result<KleinConfig> {
        let json = self.transformer.join("config.json");
        if self.transformer.is_dir() && json.is_file() {
            return KleinConfig::from_diffusers_json(&json);
        }
        let set = SafetensorsSet::open(&self.transformer)?;
        let layout = klein_layout(&set, &self.transformer)?;
        keys::infer_config(&set, &layout)
    }

    /// Steps when the request names none: 4 for a distilled checkpoint, 50 for a Base one.
    pub fn default_steps(&self) -> usize {
        if self.distilled {
            4
        } else {
            50
        }
    }
}

fn klein_layout(set: &SafetensorsSet, path: &Path) -> Result<keys::KleinLayout> {
    keys::detect_layout(set.names()).ok_or_else(|| Error::UnknownLayout {
        path: path.to_path_buf(),
        reason: format!(
            "not a FLUX.2 transformer: no `{}` or `{}` tensor",
            keys::BFL_MARKER,
            keys::DIFFUSERS_MARKER
        ),
    })
}

/// The transformer `path` names: a model folder's `transformer/`, a folder's first
/// `flux*.safetensors`, or the file itself.
fn transformer_of(path: &Path) -> Option<PathBuf> {
    if path.is_file() {
        return Some(path.to_path_buf());
    }
    let sub = path.join("transformer");
    if sub.is_dir() {
        return Some(sub);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n.starts_with("flux") && n.ends_with(".safetensors")
        })
        .collect();
    files.sort();
    files.into_iter().next()
}

/// Whether `path` (a model folder or a transformer file) holds a FLUX.2 transformer. A folder
/// or file that cannot be read is not one (FLUX.1's resolution then says what is wrong).
pub fn is_klein(path: &Path) -> bool {
    transformer_of(path)
        .and_then(|t| SafetensorsSet::open(&t).ok())
        .is_some_and(|set| keys::detect_layout(set.names()).is_some())
}

/// What the user named besides the transformer.
#[derive(Debug, Clone, Copy, Default)]
pub struct NamedParts<'a> {
    /// `--vae`: the autoencoder (a `vae/` folder or `ae.safetensors`).
    pub vae: Option<&'a Path>,
    /// `--text-encoders`: a folder with `text_encoder/` and `tokenizer/` (a klein repo), or
    /// Qwen3's own folder or file (its tokenizer in it or in a `tokenizer/` folder beside it).
    pub text: Option<&'a Path>,
}

/// The error for a missing part of a klein model.
fn missing(path: &Path, reason: String) -> Error {
    Error::UnknownLayout {
        path: path.to_path_buf(),
        reason,
    }
}

/// The files of the klein model at `path` (a model folder, or the transformer file), with the
/// parts the user named elsewhere; `reasons` hears how each part was found. Call it on a path
/// [`is_klein`] accepts.
pub fn resolve(path: &Path, named: NamedParts, reasons: &mut Vec<String>) -> Result<KleinFiles> {
    let transformer = transformer_of(path).ok_or_else(|| {
        missing(
            path,
            "no FLUX.2 transformer here (a transformer/ folder or a flux*.safetensors file)".into(),
        )
    })?;
    let root = if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    let set = SafetensorsSet::open(&transformer)?;
    let layout = klein_layout(&set, &transformer)?;
    reasons.push(format!(
        "{}: a FLUX.2 klein transformer ({})",
        transformer.display(),
        match layout {
            keys::KleinLayout::Diffusers => "diffusers layout".to_string(),
            keys::KleinLayout::Bfl { ref prefix } if prefix.is_empty() => "BFL layout".into(),
            keys::KleinLayout::Bfl { ref prefix } => format!("BFL layout below `{prefix}`"),
        }
    ));
    let vae = match named.vae {
        Some(v) => {
            reasons.push(format!("autoencoder: {} as named", v.display()));
            v.to_path_buf()
        }
        None => ["vae", "ae.safetensors", "flux2-vae.safetensors"]
            .iter()
            .map(|n| root.join(n))
            .find(|p| p.exists())
            .ok_or_else(|| {
                missing(
                    &transformer,
                    format!(
                        "this is a FLUX.2 klein transformer; it needs FLUX.2's autoencoder: \
                         none beside it (vae/ or ae.safetensors in {}): pass --vae PATH",
                        root.display()
                    ),
                )
            })?,
    };
    let (text_encoder, tokenizer) = text_parts(&root, named.text)?;
    reasons.push(format!(
        "text encoder: Qwen3 at {}, tokenizer from {}",
        text_encoder.display(),
        tokenizer.display()
    ));
    let distilled = is_distilled(&root, &transformer, reasons);
    Ok(KleinFiles {
        transformer,
        vae,
        text_encoder,
        tokenizer,
        distilled,
        demo: false,
    })
}

/// The Qwen3 weights and the tokenizer folder: under the folder the user named, else the
/// model folder's `text_encoder/` and `tokenizer/`.
fn text_parts(root: &Path, named: Option<&Path>) -> Result<(PathBuf, PathBuf)> {
    let needs = |path: &Path, what: &str| {
        missing(
            path,
            format!(
                "this is a FLUX.2 klein transformer; it needs {what}: pass --text-encoders DIR \
                 (a folder with text_encoder/ and tokenizer/, as in the klein repo, or Qwen3's \
                 own folder with its tokenizer.json)"
            ),
        )
    };
    let base = named.unwrap_or(root);
    let (weights, beside) = if base.join("text_encoder").exists() {
        (base.join("text_encoder"), base.to_path_buf())
    } else if named.is_some() && base.exists() {
        let parent = base.parent().unwrap_or(Path::new(".")).to_path_buf();
        (base.to_path_buf(), parent)
    } else {
        return Err(needs(
            base,
            &format!(
                "a Qwen3 text encoder (no text_encoder/ in {})",
                base.display()
            ),
        ));
    };
    let tokenizer = [
        weights.clone(),
        beside.join("tokenizer"),
        root.join("tokenizer"),
    ]
    .into_iter()
    .find(|d| d.join(TOKENIZER_JSON).is_file())
    .ok_or_else(|| {
        needs(
            &weights,
            &format!(
                "Qwen3's {TOKENIZER_JSON} (none in {0}, {1}/tokenizer or {2}/tokenizer)",
                weights.display(),
                beside.display(),
                root.display()
            ),
        )
    })?;
    Ok((weights, tokenizer))
}

/// Whether the checkpoint is distilled: diffusers' `model_index.json` says (`is_distilled`);
/// a single file is Base when its name says `base`, else distilled.
fn is_distilled(root: &Path, transformer: &Path, reasons: &mut Vec<String>) -> bool {
    let index = root.join("model_index.json");
    if let Ok(text) = crate::files::read_regular_text(&index) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            let distilled = v
                .get("is_distilled")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false);
            reasons.push(format!(
                "model_index.json: {}",
                if distilled {
                    "distilled (4 steps, no CFG)"
                } else {
                    "Base (50 steps; true CFG with --true-cfg)"
                }
            ));
            return distilled;
        }
    }
    let name = transformer
        .file_name()
        .map(|n| n.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    !name.contains("base")
}

/// How klein's transformer loads besides its dtype and device (what a run's load options ask of
/// it: `crate::pipeline::LoadOptions`; Qwen3's residency goes to [`load_text`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadAs {
    /// The transformer's layers in FP8, converted as each block loads.
    pub fp8: Fp8Groups,
    /// Without the bf16 copies beside the GPU's E4M3 weights ([`Klein::with_fp8`]).
    pub lean: bool,
}

/// The text half of `files`: Qwen3 in `dtype` on `device` (kept, or built for each prompt as
/// `residency` says) and its tokenizer, checked against the transformer's text width (read from
/// the transformer's config or header, no weights), so a prompt can be encoded before the
/// transformer is read.
pub fn load_text(
    files: &KleinFiles,
    (dtype, device): (DType, &Device),
    residency: T5Residency,
) -> Result<KleinTextEncoder> {
    let wants = files.config()?.context_in_dim;
    let text = time(LoadPhase::TextEncoders, || {
        KleinTextEncoder::load_as(
            &files.text_encoder,
            &files.tokenizer,
            &KLEIN_TEXT_LAYERS,
            KLEIN_MAX_LEN,
            (dtype, device),
            residency,
        )
    })?;
    let width = text.config().hidden_size * KLEIN_TEXT_LAYERS.len();
    if width != wants {
        return Err(Error::UnknownLayout {
            path: files.text_encoder.clone(),
            reason: format!(
                "this Qwen3 gives {width}-wide text states (three layers of {}); the transformer \
                 takes {wants}: klein 4B takes Qwen3-4B, klein 9B Qwen3-8B",
                text.config().hidden_size
            ),
        });
    }
    Ok(text)
}

/// The rest of `files`: the transformer in `dtype`, the autoencoder in `vae_dtype`, on `device`,
/// as `how` says (FP8, lean); of the transformer only the blocks `blocks` and what they use (a
/// pipeline stage's share, [`load_transformer_stage`]), or all (`None`).
pub fn load_rest(
    files: &KleinFiles,
    dtype: DType,
    vae_dtype: DType,
    device: &Device,
    blocks: Option<Range<usize>>,
    how: LoadAs,
) -> Result<(Klein, KleinVae)> {
    let transformer =
        load_transformer_stage(&files.transformer, dtype, device, blocks, how.fp8, how.lean)?;
    let vae = time(LoadPhase::Autoencoder, || {
        load_vae(&files.vae, vae_dtype, device)
    })?;
    Ok((transformer, vae))
}
