//! Where a model's files are and how they are laid out.
//!
//! Two layouts exist in the wild: Black Forest Labs' single files (`flux1-dev.safetensors`,
//! `ae.safetensors`, BFL tensor names, sometimes below ComfyUI's `model.diffusion_model.` prefix)
//! and diffusers folders (`transformer/`, `vae/`, `text_encoder/`, `text_encoder_2/`,
//! `tokenizer/`, `tokenizer_2/`). A Hugging Face cache snapshot of FLUX.1 holds both. This module
//! resolves what the user named (`demo`, a file, a folder, `dev`/`schnell` or a repo id found in the
//! Hugging Face cache) into a [`ModelFiles`], recording why, for `parallax info`.

use std::path::{Path, PathBuf};

use super::comfyui::{self, Encoder};
use super::flux::FluxConfig;
use super::text::TextEncoderPaths;
use super::weights::{KeyMap, SafetensorsSet, Source};
use crate::error::{Error, Result};

/// File whose presence marks a folder as holding the demo model, not FLUX.1 (the exporter,
/// `super::export`, writes it; resolving a folder reads it).
pub const DEMO_MARKER: &str = "PARALLAX_DEMO_MODEL.txt";

/// Which FLUX.1 variant a model is; sets the sampler's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// Guidance-distilled, 28–50 steps, shifted schedule, T5 at 512 tokens.
    Dev,
    /// Timestep-distilled, 1–4 steps, unshifted schedule, T5 at 256 tokens.
    Schnell,
    /// The built-in demo model (FLUX's structure, tiny, trained on Parallax's own scenes), and
    /// `random:tiny` (the same kind of model with made-up weights).
    Demo,
}

impl Variant {
    pub fn name(&self) -> &'static str {
        match self {
            Variant::Dev => "dev",
            Variant::Schnell => "schnell",
            Variant::Demo => "demo",
        }
    }
    pub fn default_steps(&self) -> usize {
        match self {
            Variant::Dev => 28,
            Variant::Schnell => 4,
            // The trained demo: its prompt score is the same from 4 to 28 steps; at 12 a 256 px
            // image takes about a second on two CPU cores and the cache finds steps to reuse
            // (BENCHMARKS.md).
            Variant::Demo => 12,
        }
    }
    /// Whether the sampler uses the resolution-dependent time shift.
    pub fn shifted_schedule(&self) -> bool {
        !matches!(self, Variant::Schnell)
    }
    pub fn t5_max_len(&self) -> usize {
        match self {
            Variant::Dev => 512,
            Variant::Schnell => 256,
            Variant::Demo => super::text::DEMO_T5_MAX_LEN,
        }
    }
    pub fn default_guidance(&self) -> f64 {
        match self {
            Variant::Schnell => 0.0,
            // The demo's guidance embedding is not distilled yet (it was trained to leave the
            // velocity unchanged for guidance 1 to 5): 1 says so.
            Variant::Demo => 1.0,
            Variant::Dev => 3.5,
        }
    }
}

/// How the transformer's tensors are named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransformerLayout {
    /// BFL names, below `prefix` (empty, or ComfyUI's `model.diffusion_model.`).
    Bfl {
        prefix: String,
    },
    Diffusers,
}

/// How the autoencoder's tensors are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaeLayout {
    Bfl,
    Diffusers,
}

/// A resolved model: the files of each part and how they are laid out.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub transformer: PathBuf,
    pub transformer_layout: TransformerLayout,
    pub vae: PathBuf,
    pub vae_layout: VaeLayout,
    /// Where the text encoders and their tokenizers are: a diffusers-style folder's
    /// `text_encoder/`, `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`, or single files
    /// (ComfyUI's `clip_l.safetensors`, `t5xxl_*.safetensors`) with tokenizers found elsewhere.
    pub text: TextEncoderPaths,
    /// The folder is marked as holding Parallax's demo model (see [`DEMO_MARKER`]).
    pub demo: bool,
}

/// `--text-encoders random` beside a transformer file: the text encoders and the autoencoder are
/// made with random weights on the device, as `random:dev`'s are (for timing a transformer read
/// from disk without the other parts' files: [`ModelFiles::random_parts`]).
pub const RANDOM_PARTS: &str = "random";

impl ModelFiles {
    /// Whether the text encoders and the autoencoder are random ([`RANDOM_PARTS`]).
    pub fn random_parts(&self) -> bool {
        self.vae.as_os_str() == RANDOM_PARTS
    }
}

/// What the user asked for, resolved.
#[derive(Debug, Clone)]
pub enum ModelSpec {
    Demo,
    /// FLUX.1's real sizes with random weights made on the device (`random:dev`,
    /// `random:schnell`): for measuring speed and memory without weights.
    Random(Variant),
    /// FLUX.2 klein with random weights (`random:klein-tiny`, `random:klein-4b`,
    /// `random:klein-9b`): [`super::klein::random_model`] makes it.
    RandomKlein(super::klein::RandomKlein),
    Files(ModelFiles),
    /// FLUX.2 klein from files (a diffusers folder, or Black Forest Labs' transformer file with
    /// its parts): [`super::klein::files`].
    Klein(super::klein::files::KleinFiles),
}

/// Where the user put a model's parts, when not beside the transformer: `--text-encoders` (a
/// diffusers-style folder), `--vae`, `--clip`, `--t5` (files or folders anywhere).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartPaths {
    pub text_encoders: Option<PathBuf>,
    pub vae: Option<PathBuf>,
    pub clip: Option<PathBuf>,
    pub t5: Option<PathBuf>,
}

/// A resolution and the reasons behind it.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub spec: ModelSpec,
    pub reasons: Vec<String>,
}

/// Resolve `name`: `demo`; `dev`/`schnell`/a repo id (`black-forest-labs/FLUX.1-dev`) looked up in
/// the Hugging Face cache; a `.safetensors` file (BFL transformer); or a folder (diffusers folder,
/// HF snapshot, a folder of BFL files, or a ComfyUI install). `text_root` overrides where text
/// encoders are looked for.
pub fn resolve(name: &str, text_root: Option<&Path>) -> Result<Resolved> {
    resolve_parts(
        name,
        &PartPaths {
            text_encoders: text_root.map(Path::to_path_buf),
            ..PartPaths::default()
        },
    )
}

/// [`resolve`] with the parts the user placed elsewhere ([`PartPaths`]).
pub fn resolve_parts(name: &str, parts: &PartPaths) -> Result<Resolved> {
    let mut reasons = Vec::new();
    if name.eq_ignore_ascii_case("demo") {
        reasons.push(
            "`demo`: the built-in demo model (tiny, trained by Parallax on coloured shapes; not FLUX)"
                .into(),
        );
        return Ok(Resolved {
            spec: ModelSpec::Demo,
            reasons,
        });
    }
    if let Some(kind) = name.strip_prefix("random:") {
        if let Some(k) = super::klein::RandomKlein::parse(kind) {
            reasons.push(format!("`{name}`: {}", k.describe()));
            return Ok(Resolved {
                spec: ModelSpec::RandomKlein(k),
                reasons,
            });
        }
        let variant = match kind {
            "dev" => Variant::Dev,
            "schnell" => Variant::Schnell,
            "tiny" => Variant::Demo,
            other => {
                return Err(Error::UnknownLayout {
                    path: PathBuf::from(name),
                    reason: format!(
                    "unknown random model `{other}`: use random:dev, random:schnell, random:tiny, random:klein-tiny, random:klein-4b or random:klein-9b"
                ),
                })
            }
        };
        reasons.push(if variant == Variant::Demo {
            format!("`{name}`: the demo model's structure at its smallest, with made-up weights from fixed seeds (for tests; its images are noise)")
        } else {
            format!(
                "`{name}`: FLUX.1-{kind}'s sizes (12B transformer, T5-XXL, CLIP-L, autoencoder) with random weights made on the device; not FLUX"
            )
        });
        return Ok(Resolved {
            spec: ModelSpec::Random(variant),
            reasons,
        });
    }
    let path = PathBuf::from(name);
    let path = if path.exists() {
        path
    } else if let Some(repo) = repo_id_for(name) {
        let snap = find_in_hf_cache(&repo, &mut reasons)?;
        reasons.push(format!(
            "`{name}` is {repo}, found in the Hugging Face cache at {}",
            snap.display()
        ));
        snap
    } else {
        return Err(Error::UnknownLayout {
            path,
            reason: "no such file or folder; give a path, `demo`, `dev`, `schnell` or a Hugging Face repo id".into(),
        });
    };
    if super::klein::files::is_klein(&path) {
        let named = super::klein::files::NamedParts {
            vae: parts.vae.as_deref(),
            text: parts.text_encoders.as_deref(),
        };
        let mut files = super::klein::files::resolve(&path, named, &mut reasons)?;
        let root = if path.is_dir() {
            path.as_path()
        } else {
            path.parent().unwrap_or(Path::new("."))
        };
        files.demo = root.join(DEMO_MARKER).is_file();
        if files.demo {
            reasons.push(format!(
                "{} holds {DEMO_MARKER}: made-up weights, not FLUX.2 klein",
                root.display()
            ));
        }
        return Ok(Resolved {
            spec: ModelSpec::Klein(files),
            reasons,
        });
    }
    let files = if path.is_dir() {
        resolve_dir(&path, parts, &mut reasons)?
    } else {
        resolve_file(&path, parts, &mut reasons)?
    };
    Ok(Resolved {
        spec: ModelSpec::Files(files),
        reasons,
    })
}

/// The FLUX.1 variant a `--model` name stands for when it names Black Forest Labs' repos (`dev`,
/// `schnell`, `black-forest-labs/FLUX.1-dev`, …): what `parallax memory` plans for from the
/// built-in configs when nothing is downloaded.
pub fn published_variant(name: &str) -> Option<Variant> {
    let repo = repo_id_for(name)?;
    [Variant::Dev, Variant::Schnell]
        .into_iter()
        .find(|v| repo_id_for(v.name()).is_some_and(|r| r.eq_ignore_ascii_case(&repo)))
}

/// The Hugging Face repo a `--model` name stands for: `dev`/`schnell` (and `flux1-dev`, …) are
/// Black Forest Labs' repos; `owner/name` is itself.
pub fn repo_id_for(name: &str) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    match lower.as_str() {
        "dev" | "flux.1-dev" | "flux1-dev" => Some("black-forest-labs/FLUX.1-dev".into()),
        "schnell" | "flux.1-schnell" | "flux1-schnell" => {
            Some("black-forest-labs/FLUX.1-schnell".into())
        }
        _ if name.split('/').count() == 2 && !name.starts_with('.') && !name.starts_with('/') => {
            Some(name.to_string())
        }
        _ => None,
    }
}

/// The Hugging Face hub cache folder: `$HF_HUB_CACHE`, `$HF_HOME/hub`, or
/// `~/.cache/huggingface/hub`.
pub fn hf_cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    let home = std::env::var_os("HOME")?;
    Some(
        PathBuf::from(home)
            .join(".cache")
            .join("huggingface")
            .join("hub"),
    )
}

/// `repo`'s folder in the Hugging Face cache `cache` (`models--owner--name`).
pub fn hf_cache_repo_dir(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

/// Find `repo`'s snapshot in the cache: the one `refs/main` names, else the newest.
pub fn find_in_hf_cache(repo: &str, reasons: &mut Vec<String>) -> Result<PathBuf> {
    let cache = hf_cache_dir().ok_or_else(|| Error::UnknownLayout {
        path: PathBuf::from(repo),
        reason: "no Hugging Face cache folder (HOME, HF_HOME and HF_HUB_CACHE are unset)".into(),
    })?;
    let folder = hf_cache_repo_dir(&cache, repo);
    let snapshots = folder.join("snapshots");
    if !snapshots.is_dir() {
        return Err(Error::UnknownLayout {
            path: folder,
            reason: format!(
                "{repo} is not in the Hugging Face cache at {}",
                cache.display()
            ),
        });
    }
    if let Ok(rev) = std::fs::read_to_string(folder.join("refs").join("main")) {
        let snap = snapshots.join(rev.trim());
        if snap.is_dir() {
            reasons.push(format!("refs/main names snapshot {}", rev.trim()));
            return Ok(snap);
        }
    }
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    let rd = std::fs::read_dir(&snapshots).map_err(|e| Error::io(&snapshots, e))?;
    for entry in rd.flatten() {
        let p = entry.path();
        if !p.is_dir() {
            continue;
        }
        let t = entry
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        if newest.as_ref().map(|(nt, _)| t > *nt).unwrap_or(true) {
            newest = Some((t, p));
        }
    }
    match newest {
        Some((_, p)) => {
            reasons.push("no usable refs/main; took the newest snapshot".into());
            Ok(p)
        }
        None => Err(Error::UnknownLayout {
            path: snapshots,
            reason: format!("{repo} has no snapshot in the Hugging Face cache"),
        }),
    }
}

/// FLUX repos found in the Hugging Face cache (for `info` and the studio's model picker).
pub fn list_hf_cache() -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    let Some(cache) = hf_cache_dir() else {
        return out;
    };
    let Ok(rd) = std::fs::read_dir(&cache) else {
        return out;
    };
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if let Some(rest) = name.strip_prefix("models--") {
            let repo = rest.replacen("--", "/", 1);
            if repo.to_ascii_lowercase().contains("flux") {
                out.push((repo, entry.path()));
            }
        }
    }
    out.sort();
    out
}

fn resolve_dir(dir: &Path, parts: &PartPaths, reasons: &mut Vec<String>) -> Result<ModelFiles> {
    let transformer_dir = dir.join("transformer");
    if transformer_dir.is_dir() {
        reasons.push(format!(
            "{} has a transformer/ folder: diffusers layout",
            dir.display()
        ));
        let (vae, vae_layout) = match &parts.vae {
            Some(v) => named_vae(v, reasons),
            None if dir.join("vae").is_dir() => (dir.join("vae"), VaeLayout::Diffusers),
            None => {
                return Err(Error::UnknownLayout {
                    path: dir.to_path_buf(),
                    reason: "diffusers folder without a vae/ folder".into(),
                })
            }
        };
        let text_root = parts
            .text_encoders
            .clone()
            .unwrap_or_else(|| dir.to_path_buf());
        return Ok(ModelFiles {
            transformer: transformer_dir,
            transformer_layout: TransformerLayout::Diffusers,
            vae,
            vae_layout,
            text: text_paths(&text_root, None, parts, reasons),
            demo: is_demo_folder(dir, reasons),
        });
    }
    if let Some(models) = comfyui::models_dir_in(dir) {
        let found = comfyui::flux_transformers(&models);
        return match found.first() {
            Some(file) => {
                reasons.push(format!(
                    "{} is a ComfyUI folder: took {}{}",
                    dir.display(),
                    file.display(),
                    if found.len() > 1 {
                        format!(
                            " (also there: {}; name the file to take another)",
                            found[1..]
                                .iter()
                                .map(|p| p.display().to_string())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    } else {
                        String::new()
                    }
                ));
                resolve_file(file, parts, reasons)
            }
            None => Err(Error::UnknownLayout {
                path: dir.to_path_buf(),
                reason: format!(
                    "a ComfyUI folder with no FLUX transformer in {}",
                    comfyui::TRANSFORMER_DIRS
                        .map(|d| models.join(d).display().to_string())
                        .join(" or ")
                ),
            }),
        };
    }
    // A folder of BFL single files.
    let mut candidates: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            n.starts_with("flux") && (n.ends_with(".safetensors") || n.ends_with(".gguf"))
        })
        .collect();
    candidates.sort();
    match candidates.first() {
        Some(file) => {
            reasons.push(format!(
                "{} has no transformer/ folder but holds {}: BFL single-file layout",
                dir.display(),
                file.display()
            ));
            resolve_file(file, parts, reasons)
        }
        None => Err(Error::UnknownLayout {
            path: dir.to_path_buf(),
            reason: "neither a diffusers folder (transformer/, vae/, text_encoder*/), a folder holding flux*.safetensors, nor a ComfyUI folder (models/diffusion_models/)".into(),
        }),
    }
}

fn resolve_file(file: &Path, parts: &PartPaths, reasons: &mut Vec<String>) -> Result<ModelFiles> {
    let set = SafetensorsSet::open(file)?;
    let layout = detect_transformer_layout(&set).ok_or_else(|| Error::UnknownLayout {
        path: file.to_path_buf(),
        reason: "no FLUX transformer tensors found (looked for `double_blocks.0.img_attn.qkv.weight` and `transformer_blocks.0.attn.to_q.weight`, also under `model.diffusion_model.`)".into(),
    })?;
    reasons.push(format!(
        "{}: transformer tensors in {layout:?} layout",
        file.display()
    ));
    if parts.text_encoders.as_deref() == Some(Path::new(RANDOM_PARTS)) {
        reasons.push(
            "--text-encoders random: text encoders and autoencoder with random weights made on \
             the device (as random:dev's; the images are noise, labelled DEMO)"
                .into(),
        );
        let random = PathBuf::from(RANDOM_PARTS);
        return Ok(ModelFiles {
            transformer: file.to_path_buf(),
            transformer_layout: layout,
            vae: random.clone(),
            vae_layout: VaeLayout::Bfl,
            text: TextEncoderPaths::diffusers(&random),
            demo: false,
        });
    }
    let dir = file.parent().unwrap_or(Path::new("."));
    let models = comfyui::models_dir_of(file);
    let comfy_vae = models.as_deref().and_then(comfyui::vae);
    let (vae, vae_layout) = if let Some(v) = &parts.vae {
        named_vae(v, reasons)
    } else if dir.join("ae.safetensors").is_file() {
        reasons.push("autoencoder: ae.safetensors beside it (BFL layout)".into());
        (dir.join("ae.safetensors"), VaeLayout::Bfl)
    } else if dir.join("vae").is_dir() {
        reasons.push("autoencoder: vae/ folder beside it (diffusers layout)".into());
        (dir.join("vae"), VaeLayout::Diffusers)
    } else if let Some(v) = comfy_vae {
        reasons.push(format!(
            "autoencoder: {} (ComfyUI's vae/ folder, BFL layout)",
            v.display()
        ));
        (v, VaeLayout::Bfl)
    } else {
        let comfy = models
            .as_ref()
            .map(|m| format!(", or {}", m.join("vae").join("ae.safetensors").display()))
            .unwrap_or_default();
        return Err(Error::UnknownLayout {
            path: file.to_path_buf(),
            reason: format!("no autoencoder beside it: expected ae.safetensors or a vae/ folder in the same folder{comfy}; or name it with --vae"),
        });
    };
    let text_root = parts
        .text_encoders
        .clone()
        .unwrap_or_else(|| dir.to_path_buf());
    Ok(ModelFiles {
        transformer: file.to_path_buf(),
        transformer_layout: layout,
        vae,
        vae_layout,
        text: text_paths(&text_root, models.as_deref(), parts, reasons),
        demo: is_demo_folder(dir, reasons),
    })
}

/// The autoencoder the user named: a folder is diffusers' `vae/`, a file BFL's `ae.safetensors`.
fn named_vae(path: &Path, reasons: &mut Vec<String>) -> (PathBuf, VaeLayout) {
    let layout = if path.is_dir() {
        VaeLayout::Diffusers
    } else {
        VaeLayout::Bfl
    };
    reasons.push(format!(
        "autoencoder: {} as named ({layout:?} layout)",
        path.display()
    ));
    (path.to_path_buf(), layout)
}

/// Where the text encoders are: the diffusers folders under `text_root`, else (when it has none
/// and the transformer lies in a ComfyUI `models` folder) ComfyUI's single files, each replaced
/// by what the user named. A single file's tokenizer is found by [`comfyui::tokenizer_for`].
fn text_paths(
    text_root: &Path,
    models: Option<&Path>,
    parts: &PartPaths,
    reasons: &mut Vec<String>,
) -> TextEncoderPaths {
    let mut paths = TextEncoderPaths::diffusers(text_root);
    if parts.text_encoders.is_none() && !text_root.join("text_encoder").is_dir() {
        if let Some(models) = models {
            let (clip, t5) = comfyui::text_encoders(models);
            for (found, slot, what) in [(clip, &mut paths.clip, "CLIP"), (t5, &mut paths.t5, "T5")]
            {
                if let Some(f) = found {
                    reasons.push(format!("{what}: {} (ComfyUI single file)", f.display()));
                    *slot = f;
                }
            }
        }
    }
    for (named, slot, what) in [
        (&parts.clip, &mut paths.clip, "CLIP"),
        (&parts.t5, &mut paths.t5, "T5"),
    ] {
        if let Some(p) = named {
            reasons.push(format!("{what}: {} as named", p.display()));
            *slot = p.clone();
        }
    }
    let install = models.and_then(comfyui::install_of);
    // FLUX.1's snapshots in the Hugging Face cache hold both tokenizers.
    let snapshots: Vec<PathBuf> = if paths.clip.is_file() || paths.t5.is_file() {
        ["schnell", "dev"]
            .into_iter()
            .filter_map(repo_id_for)
            .filter_map(|repo| find_in_hf_cache(&repo, &mut Vec::new()).ok())
            .collect()
    } else {
        Vec::new()
    };
    for (encoder, file, tokenizer) in [
        (Encoder::Clip, &paths.clip, &mut paths.clip_tokenizer),
        (Encoder::T5, &paths.t5, &mut paths.t5_tokenizer),
    ] {
        if file.is_file() {
            *tokenizer = comfyui::tokenizer_for(
                encoder,
                file,
                text_root,
                install.as_deref(),
                &snapshots,
                reasons,
            );
        }
    }
    paths
}

fn is_demo_folder(dir: &Path, reasons: &mut Vec<String>) -> bool {
    let marked = dir.join(DEMO_MARKER).is_file();
    if marked {
        reasons.push(format!(
            "{} holds {}: this is Parallax's demo model written to disk, not FLUX.1",
            dir.display(),
            DEMO_MARKER
        ));
    }
    marked
}

/// Which naming a set of transformer tensors uses.
pub fn detect_transformer_layout(set: &SafetensorsSet) -> Option<TransformerLayout> {
    for prefix in ["", "model.diffusion_model.", "diffusion_model."] {
        if set.contains(&format!("{prefix}double_blocks.0.img_attn.qkv.weight"))
            || set.contains(&format!("{prefix}img_in.weight"))
        {
            return Some(TransformerLayout::Bfl {
                prefix: prefix.to_string(),
            });
        }
    }
    if set.contains("transformer_blocks.0.attn.to_q.weight") || set.contains("x_embedder.weight") {
        return Some(TransformerLayout::Diffusers);
    }
    None
}

/// Infer the transformer config from tensor shapes (BFL single files carry no config).
pub fn infer_flux_config(set: &SafetensorsSet, layout: &TransformerLayout) -> Result<FluxConfig> {
    let map = transformer_key_map(layout, &FluxConfig::dev());
    let shape = |canonical: &str| -> Result<Vec<usize>> {
        let name = match map.source(canonical) {
            Some(Source::Tensor(n))
            | Some(Source::Squeezed(n))
            | Some(Source::SwapHalves { name: n, .. }) => n,
            Some(Source::Concat { parts, .. }) => parts[0].0.clone(),
            None => canonical.to_string(),
        };
        set.meta(&name)
            .map(|m| m.shape.clone())
            .ok_or_else(|| Error::MissingTensor {
                tensor: name,
                location: set.label().to_string(),
            })
    };
    let img_in = shape("img_in.weight")?;
    let txt_in = shape("txt_in.weight")?;
    let vec_in = shape("vector_in.in_layer.weight")?;
    let head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")?;
    let mlp = shape("double_blocks.0.img_mlp.0.weight")?;
    let bad = |what: &str| Error::UnknownLayout {
        path: PathBuf::from(set.label()),
        reason: format!("cannot infer the model config: {what}"),
    };
    if img_in.len() != 2
        || txt_in.len() != 2
        || vec_in.len() != 2
        || head_dim.len() != 1
        || mlp.len() != 2
    {
        return Err(bad("unexpected tensor ranks"));
    }
    let hidden = img_in[0];
    let hd = head_dim[0];
    if hd == 0 || hidden % hd != 0 || hd % 16 != 0 {
        return Err(bad(&format!(
            "hidden size {hidden} and head dim {hd} do not fit"
        )));
    }
    // Count blocks by the highest index any tensor names, so a block with a tensor missing is
    // reported as a missing tensor rather than silently shortening the model.
    let (double_prefix, single_prefix) = match layout {
        TransformerLayout::Bfl { prefix } => (
            format!("{prefix}double_blocks."),
            format!("{prefix}single_blocks."),
        ),
        TransformerLayout::Diffusers => (
            "transformer_blocks.".to_string(),
            "single_transformer_blocks.".to_string(),
        ),
    };
    let count = |block_prefix: &str| {
        set.names()
            .filter_map(|n| n.strip_prefix(block_prefix))
            .filter_map(|rest| rest.split('.').next()?.parse::<usize>().ok())
            .max()
            .map(|m| m + 1)
            .unwrap_or(0)
    };
    let guidance = match map.source("guidance_in.in_layer.weight") {
        Some(Source::Tensor(n)) => set.contains(&n),
        _ => false,
    };
    let cfg = FluxConfig {
        in_channels: img_in[1],
        vec_in_dim: vec_in[1],
        context_in_dim: txt_in[1],
        hidden_size: hidden,
        mlp_ratio: mlp[0] as f64 / hidden as f64,
        num_heads: hidden / hd,
        depth: count(&double_prefix),
        depth_single_blocks: count(&single_prefix),
        axes_dim: vec![hd / 8, hd * 7 / 16, hd * 7 / 16],
        theta: 10_000.0,
        qkv_bias: true,
        guidance_embed: guidance,
    };
    cfg.validate().map_err(|e| bad(&e))?;
    Ok(cfg)
}

/// Read a diffusers `transformer/config.json`.
pub fn flux_config_from_diffusers_json(path: &Path) -> Result<FluxConfig> {
    #[derive(serde::Deserialize)]
    struct Raw {
        attention_head_dim: usize,
        num_attention_heads: usize,
        num_layers: usize,
        num_single_layers: usize,
        in_channels: usize,
        joint_attention_dim: usize,
        pooled_projection_dim: usize,
        #[serde(default)]
        guidance_embeds: bool,
        #[serde(default)]
        axes_dims_rope: Option<Vec<usize>>,
    }
    let text = crate::files::read_regular_text(path)?;
    let raw: Raw = serde_json::from_str(&text).map_err(|e| Error::BadConfig {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let hidden = raw.attention_head_dim * raw.num_attention_heads;
    let cfg = FluxConfig {
        in_channels: raw.in_channels,
        vec_in_dim: raw.pooled_projection_dim,
        context_in_dim: raw.joint_attention_dim,
        hidden_size: hidden,
        mlp_ratio: 4.0,
        num_heads: raw.num_attention_heads,
        depth: raw.num_layers,
        depth_single_blocks: raw.num_single_layers,
        axes_dim: raw.axes_dims_rope.unwrap_or_else(|| vec![16, 56, 56]),
        theta: 10_000.0,
        qkv_bias: true,
        guidance_embed: raw.guidance_embeds,
    };
    cfg.validate().map_err(|reason| Error::BadConfig {
        path: path.to_path_buf(),
        reason,
    })?;
    Ok(cfg)
}

/// Write a diffusers `transformer/config.json` for `cfg` (used by tests and exporters).
pub fn flux_config_to_diffusers_json(cfg: &FluxConfig) -> serde_json::Value {
    serde_json::json!({
        "_class_name": "FluxTransformer2DModel",
        "attention_head_dim": cfg.head_dim(),
        "num_attention_heads": cfg.num_heads,
        "num_layers": cfg.depth,
        "num_single_layers": cfg.depth_single_blocks,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels(),
        "joint_attention_dim": cfg.context_in_dim,
        "pooled_projection_dim": cfg.vec_in_dim,
        "guidance_embeds": cfg.guidance_embed,
        "axes_dims_rope": cfg.axes_dim,
        "patch_size": 1,
    })
}

/// The key map for a transformer layout.
pub fn transformer_key_map(layout: &TransformerLayout, cfg: &FluxConfig) -> Box<dyn KeyMap> {
    match layout {
        TransformerLayout::Bfl { prefix } => Box::new(super::weights::Identity {
            prefix: prefix.clone(),
        }),
        TransformerLayout::Diffusers => Box::new(FluxDiffusersMap {
            hidden: cfg.hidden_size,
            mlp_hidden: cfg.mlp_hidden(),
        }),
    }
}

/// BFL transformer names -> diffusers `FluxTransformer2DModel` names.
#[derive(Debug, Clone)]
pub struct FluxDiffusersMap {
    pub hidden: usize,
    pub mlp_hidden: usize,
}

impl KeyMap for FluxDiffusersMap {
    fn layout_name(&self) -> &str {
        "diffusers"
    }

    fn source(&self, canonical: &str) -> Option<Source> {
        let t = |s: String| Some(Source::Tensor(s));
        // Split "<stem>.<leaf>" where leaf is weight/bias/scale.
        let (stem, leaf) = canonical.rsplit_once('.')?;
        let simple = match stem {
            "img_in" => Some("x_embedder"),
            "txt_in" => Some("context_embedder"),
            "time_in.in_layer" => Some("time_text_embed.timestep_embedder.linear_1"),
            "time_in.out_layer" => Some("time_text_embed.timestep_embedder.linear_2"),
            "vector_in.in_layer" => Some("time_text_embed.text_embedder.linear_1"),
            "vector_in.out_layer" => Some("time_text_embed.text_embedder.linear_2"),
            "guidance_in.in_layer" => Some("time_text_embed.guidance_embedder.linear_1"),
            "guidance_in.out_layer" => Some("time_text_embed.guidance_embedder.linear_2"),
            "final_layer.linear" => Some("proj_out"),
            _ => None,
        };
        if let Some(s) = simple {
            return t(format!("{s}.{leaf}"));
        }
        if stem == "final_layer.adaLN_modulation.1" {
            return Some(Source::SwapHalves {
                name: format!("norm_out.linear.{leaf}"),
                dim: 0,
            });
        }
        let h = self.hidden;
        if let Some(rest) = stem.strip_prefix("double_blocks.") {
            let (i, part) = rest.split_once('.')?;
            let b = format!("transformer_blocks.{i}");
            let qkv = |q: &str, k: &str, v: &str| {
                Some(Source::Concat {
                    parts: vec![
                        (format!("{b}.attn.{q}.{leaf}"), h),
                        (format!("{b}.attn.{k}.{leaf}"), h),
                        (format!("{b}.attn.{v}.{leaf}"), h),
                    ],
                    dim: 0,
                })
            };
            return match (part, leaf) {
                ("img_mod.lin", _) => t(format!("{b}.norm1.linear.{leaf}")),
                ("txt_mod.lin", _) => t(format!("{b}.norm1_context.linear.{leaf}")),
                ("img_attn.qkv", _) => qkv("to_q", "to_k", "to_v"),
                ("txt_attn.qkv", _) => qkv("add_q_proj", "add_k_proj", "add_v_proj"),
                ("img_attn.norm.query_norm", "scale") => t(format!("{b}.attn.norm_q.weight")),
                ("img_attn.norm.key_norm", "scale") => t(format!("{b}.attn.norm_k.weight")),
                ("txt_attn.norm.query_norm", "scale") => t(format!("{b}.attn.norm_added_q.weight")),
                ("txt_attn.norm.key_norm", "scale") => t(format!("{b}.attn.norm_added_k.weight")),
                ("img_attn.proj", _) => t(format!("{b}.attn.to_out.0.{leaf}")),
                ("txt_attn.proj", _) => t(format!("{b}.attn.to_add_out.{leaf}")),
                ("img_mlp.0", _) => t(format!("{b}.ff.net.0.proj.{leaf}")),
                ("img_mlp.2", _) => t(format!("{b}.ff.net.2.{leaf}")),
                ("txt_mlp.0", _) => t(format!("{b}.ff_context.net.0.proj.{leaf}")),
                ("txt_mlp.2", _) => t(format!("{b}.ff_context.net.2.{leaf}")),
                _ => None,
            };
        }
        if let Some(rest) = stem.strip_prefix("single_blocks.") {
            let (i, part) = rest.split_once('.')?;
            let b = format!("single_transformer_blocks.{i}");
            return match (part, leaf) {
                ("modulation.lin", _) => t(format!("{b}.norm.linear.{leaf}")),
                ("linear1", _) => Some(Source::Concat {
                    parts: vec![
                        (format!("{b}.attn.to_q.{leaf}"), h),
                        (format!("{b}.attn.to_k.{leaf}"), h),
                        (format!("{b}.attn.to_v.{leaf}"), h),
                        (format!("{b}.proj_mlp.{leaf}"), self.mlp_hidden),
                    ],
                    dim: 0,
                }),
                ("linear2", _) => t(format!("{b}.proj_out.{leaf}")),
                ("norm.query_norm", "scale") => t(format!("{b}.attn.norm_q.weight")),
                ("norm.key_norm", "scale") => t(format!("{b}.attn.norm_k.weight")),
                _ => None,
            };
        }
        None
    }
}

pub use super::vae::infer_vae_config;
