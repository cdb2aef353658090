//! ComfyUI's model folders, as they lie on disk, and the tokenizers single-file text encoders
//! need.
//!
//! A ComfyUI install keeps FLUX.1 in parts: the transformer in `models/diffusion_models/` (or the
//! older `models/unet/`), the autoencoder as `models/vae/ae.safetensors`, and the text encoders
//! as single files in `models/text_encoders/` (or the older `models/clip/`): `clip_l.safetensors`
//! and `t5xxl_fp16.safetensors` / `t5xxl_fp8_e4m3fn.safetensors`, in transformers' tensor names.
//! Those single files carry no tokenizer: ComfyUI ships CLIP's in `comfy/sd1_tokenizer/` and
//! T5's in `comfy/text_encoders/t5_tokenizer/`; a FLUX.1 snapshot in the Hugging Face cache has
//! them in `tokenizer/` and `tokenizer_2/`. This module finds each of these, and says where it
//! looked when it finds nothing.

use std::path::{Path, PathBuf};

use super::tokenizer::{MERGES_TXT, TOKENIZER_JSON, VOCAB_JSON};
use super::weights::SafetensorsSet;

/// The folders ComfyUI reads transformers from, newest name first.
pub const TRANSFORMER_DIRS: [&str; 2] = ["diffusion_models", "unet"];
/// The folders ComfyUI reads text encoders from, newest name first.
pub const TEXT_ENCODER_DIRS: [&str; 2] = ["text_encoders", "clip"];
/// CLIP-L's single file.
pub const CLIP_L_FILE: &str = "clip_l.safetensors";
/// T5-XXL's single files, preferred first (the fp16 one loses nothing).
pub const T5_FILES: [&str; 3] = [
    "t5xxl_fp16.safetensors",
    "t5xxl_fp8_e4m3fn.safetensors",
    "t5xxl_fp8_e4m3fn_scaled.safetensors",
];
pub use super::tokenizer::{CLIP_TOKENIZER_DIR, T5_TOKENIZER_DIR};

/// The `models` folder above `file` when it lies in ComfyUI's `diffusion_models/` or `unet/`
/// (directly or in a subfolder).
pub fn models_dir_of(file: &Path) -> Option<PathBuf> {
    file.ancestors()
        .skip(1)
        .find(|a| {
            a.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| TRANSFORMER_DIRS.contains(&n))
        })
        .and_then(Path::parent)
        .map(Path::to_path_buf)
}

/// The `models` folder of `dir` when `dir` is a ComfyUI install or its `models` folder (it holds
/// `diffusion_models/` or `unet/`).
pub fn models_dir_in(dir: &Path) -> Option<PathBuf> {
    [dir.join("models"), dir.to_path_buf()]
        .into_iter()
        .find(|m| TRANSFORMER_DIRS.iter().any(|t| m.join(t).is_dir()))
}

/// The install above a `models` folder: its parent, when that holds ComfyUI's `comfy/` package.
pub fn install_of(models: &Path) -> Option<PathBuf> {
    let root = models.parent()?;
    root.join("comfy").is_dir().then(|| root.to_path_buf())
}

/// The `.safetensors` files in `dir` and its subfolders one level down, sorted.
fn safetensors_in(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in rd.flatten() {
        let p = entry.path();
        if p.is_dir() {
            if let Ok(sub) = std::fs::read_dir(&p) {
                out.extend(
                    sub.flatten()
                        .map(|e| e.path())
                        .filter(|p| is_weight_file(p)),
                );
            }
        } else if is_weight_file(&p) {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// A weight file: `.safetensors`, or `.gguf` (ComfyUI-GGUF keeps its quantised files in `unet/`).
fn is_weight_file(p: &Path) -> bool {
    p.is_file()
        && p.extension()
            .is_some_and(|e| e == "safetensors" || e == "gguf")
}

/// The FLUX transformers in a `models` folder's `diffusion_models/` and `unet/` (files whose
/// tensor names a registered model family recognises, [`super::family::detect`]; the headers are
/// read, not the weights).
pub fn flux_transformers(models: &Path) -> Vec<PathBuf> {
    TRANSFORMER_DIRS
        .iter()
        .flat_map(|d| safetensors_in(&models.join(d)))
        .filter(|p| {
            SafetensorsSet::open(p)
                .ok()
                .is_some_and(|s| super::family::detect(&s.names().collect::<Vec<_>>()).is_some())
        })
        .collect()
}

/// FLUX's autoencoder in a `models` folder: `vae/ae.safetensors`.
pub fn vae(models: &Path) -> Option<PathBuf> {
    let p = models.join("vae").join("ae.safetensors");
    p.is_file().then_some(p)
}

/// The text encoders' single files in a `models` folder: (`clip_l.safetensors`, the first of
/// [`T5_FILES`], else any `t5xxl*.safetensors`), each looked for in `text_encoders/` then
/// `clip/`.
pub fn text_encoders(models: &Path) -> (Option<PathBuf>, Option<PathBuf>) {
    let dirs: Vec<PathBuf> = TEXT_ENCODER_DIRS.iter().map(|d| models.join(d)).collect();
    let find = |name: &str| dirs.iter().map(|d| d.join(name)).find(|p| p.is_file());
    let clip = find(CLIP_L_FILE);
    let t5 = T5_FILES.iter().find_map(|n| find(n)).or_else(|| {
        dirs.iter().flat_map(|d| safetensors_in(d)).find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("t5xxl"))
        })
    });
    (clip, t5)
}

/// Which encoder a tokenizer is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoder {
    Clip,
    T5,
}

impl Encoder {
    /// The diffusers folder name of its tokenizer (`tokenizer`, `tokenizer_2`).
    pub fn diffusers_dir(self) -> &'static str {
        match self {
            Encoder::Clip => "tokenizer",
            Encoder::T5 => "tokenizer_2",
        }
    }

    /// Whether `dir` holds the files this encoder's tokenizer is read from.
    pub fn has_tokenizer(self, dir: &Path) -> bool {
        dir.join(TOKENIZER_JSON).is_file()
            || (self == Encoder::Clip
                && dir.join(VOCAB_JSON).is_file()
                && dir.join(MERGES_TXT).is_file())
    }

    /// The files to get, and from where, when none is found.
    pub fn what_to_get(self) -> String {
        super::tokenizer::what_to_get(match self {
            Encoder::Clip => "clip",
            Encoder::T5 => "t5",
        })
        .unwrap_or_default()
    }
}

/// The folder holding the tokenizer of a single-file `encoder` stored at `file`. Looked for, in
/// order: `tokenizer/` (CLIP) or `tokenizer_2/` (T5) in `text_root` and beside the file, the
/// ComfyUI install's own copy, the FLUX.1 snapshots of the Hugging Face cache in `snapshots`.
/// When none holds it, the folder beside the file is returned and `reasons` says what to put there.
pub fn tokenizer_for(
    encoder: Encoder,
    file: &Path,
    text_root: &Path,
    install: Option<&Path>,
    snapshots: &[PathBuf],
    reasons: &mut Vec<String>,
) -> PathBuf {
    let sub = encoder.diffusers_dir();
    let beside = file.parent().unwrap_or(Path::new(".")).join(sub);
    let mut candidates = vec![text_root.join(sub), beside.clone()];
    if let Some(install) = install {
        candidates.push(install.join(match encoder {
            Encoder::Clip => CLIP_TOKENIZER_DIR,
            Encoder::T5 => T5_TOKENIZER_DIR,
        }));
    }
    // FLUX.1's snapshots hold both tokenizers (`tokenizer/`, `tokenizer_2/`).
    candidates.extend(snapshots.iter().map(|snap| snap.join(sub)));
    let what = match encoder {
        Encoder::Clip => "CLIP",
        Encoder::T5 => "T5",
    };
    if let Some(found) = candidates.iter().find(|d| encoder.has_tokenizer(d)) {
        reasons.push(format!(
            "{what} tokenizer for {}: {}",
            file.display(),
            found.display()
        ));
        return found.clone();
    }
    let looked: Vec<String> = candidates.iter().map(|d| d.display().to_string()).collect();
    reasons.push(format!(
        "{what} tokenizer for {}: none found (looked in {}); get {} and put it in {}",
        file.display(),
        looked.join(", "),
        encoder.what_to_get(),
        beside.display()
    ));
    beside
}

/// ComfyUI installs in the usual places: `$COMFYUI_PATH`, then `ComfyUI/` (and
/// `ComfyUI_windows_portable/ComfyUI/`, `Documents/ComfyUI/`) in the home folder, then
/// `/workspace/ComfyUI` and `/opt/ComfyUI` (for the studio's model picker).
pub fn find_installs() -> Vec<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("COMFYUI_PATH") {
        candidates.push(PathBuf::from(p));
    }
    if let Some(home) = std::env::var_os("HOME").map(PathBuf::from) {
        for sub in [
            "ComfyUI",
            "ComfyUI_windows_portable/ComfyUI",
            "Documents/ComfyUI",
        ] {
            candidates.push(home.join(sub));
        }
    }
    candidates.push(PathBuf::from("/workspace/ComfyUI"));
    candidates.push(PathBuf::from("/opt/ComfyUI"));
    let mut out: Vec<PathBuf> = Vec::new();
    for c in candidates {
        if models_dir_in(&c).is_some() && !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

/// The FLUX transformers of the ComfyUI installs [`find_installs`] finds, for the studio's picker.
pub fn installed_flux_models() -> Vec<PathBuf> {
    find_installs()
        .iter()
        .filter_map(|i| models_dir_in(i))
        .flat_map(|m| flux_transformers(&m))
        .collect()
}
