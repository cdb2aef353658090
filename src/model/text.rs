//! FLUX's two text encoders: T5-XXL (its encoder half) and CLIP-L's text model.
//!
//! A prompt becomes two tensors for the transformer:
//! - `txt`: T5's last hidden states over the whole padded sequence, `(1, t5_max_len, d_t5)`
//!   (4096 wide for T5-XXL; 512 tokens for FLUX.1-dev, 256 for schnell). Like the reference
//!   pipelines, T5 runs without an attention mask, so padding positions are encoded too.
//! - `vec`: CLIP's pooled output, `(1, d_clip)` (768 for CLIP-L): the final-layer-norm hidden
//!   state at the first end-of-text token, under CLIP's causal mask.
//!
//! [`TextEncoders::load_diffusers`] reads a diffusers checkout (`text_encoder/`,
//! `text_encoder_2/`, `tokenizer/`, `tokenizer_2/`); [`TextEncoders::load_parts`] reads the parts
//! from anywhere, including the single `clip_l.safetensors` / `t5xxl_*.safetensors` files that
//! people use next to Black Forest Labs' checkpoints. [`TextEncoders::demo`] builds tiny encoders
//! with made-up weights that need no files.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model::{
    Activation, ClipTextConfig, ClipTextTransformer,
};
use candle_transformers::models::t5::{self, T5EncoderModel};

use super::demo_weights::DemoWeights;
use super::on_demand::Slot;
use super::tokenizer::PromptTokenizer;
use super::weights::{Identity, MappedWeights, SafetensorsSet};
use crate::error::{CandleResultExt, Error, Result};

/// Width of the demo T5's hidden states (the demo FLUX transformer's context width).
pub const DEMO_T5_DIM: usize = 128;
/// Width of the demo CLIP's pooled output (the demo FLUX transformer's vector width).
pub const DEMO_CLIP_DIM: usize = 64;
/// T5 sequence length of the demo encoders.
pub const DEMO_T5_MAX_LEN: usize = 96;
/// CLIP's sequence length (CLIP-L has 77 position embeddings).
pub const CLIP_MAX_LEN: usize = 77;

/// A prompt, encoded.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// T5 hidden states, `(1, t5_max_len, t5_dim)`.
    pub txt: Tensor,
    /// CLIP pooled output, `(1, clip_dim)`.
    pub vec: Tensor,
    /// What the user should know about the encoding (e.g. that the prompt was cut).
    pub notes: Vec<String>,
}

/// Where [`TextEncoders::load_parts`] finds each part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextEncoderPaths {
    /// T5 encoder weights: a folder with `config.json` and `model.safetensors` (or shards and
    /// their `model.safetensors.index.json`), or one `.safetensors` file in transformers' names
    /// (ComfyUI's `t5xxl_fp16.safetensors`, or `t5xxl_fp8_e4m3fn`), which must have the shapes
    /// of T5-XXL v1.1 ([`t5_xxl_config`]) or the demo's T5.
    pub t5: PathBuf,
    /// CLIP text model weights: a folder with `config.json` and `model.safetensors`, or one
    /// `.safetensors` file (ComfyUI's `clip_l.safetensors`), which must have the shapes of CLIP-L
    /// ([`clip_l_config`]) or the demo's CLIP.
    pub clip: PathBuf,
    /// Folder with T5's `tokenizer.json`.
    pub t5_tokenizer: PathBuf,
    /// Folder with CLIP's `tokenizer.json`, or its `vocab.json` + `merges.txt`.
    pub clip_tokenizer: PathBuf,
}

impl TextEncoderPaths {
    /// The diffusers layout under `root`.
    pub fn diffusers(root: &Path) -> Self {
        Self {
            t5: root.join("text_encoder_2"),
            clip: root.join("text_encoder"),
            t5_tokenizer: root.join("tokenizer_2"),
            clip_tokenizer: root.join("tokenizer"),
        }
    }
}

/// Builds T5 from its weights (for [`T5Residency::OnDemand`]).
pub type T5Builder = Arc<dyn Fn() -> Result<T5EncoderModel> + Send + Sync>;

/// Where T5 (or klein's Qwen3) stays between prompts.
pub use super::on_demand::Residency as T5Residency;

/// T5 itself, or how to build it for each prompt (behind a mutex: its forward pass needs `&mut`).
type T5Slot = Slot<Mutex<T5EncoderModel>>;

/// T5 and CLIP with their tokenizers. `Send + Sync`: T5's forward pass needs `&mut`, so it sits
/// behind a mutex and concurrent [`TextEncoders::encode`] calls take turns on it.
pub struct TextEncoders {
    t5: T5Slot,
    clip: ClipTextTransformer,
    t5_tokenizer: PromptTokenizer,
    clip_tokenizer: PromptTokenizer,
    t5_dim: usize,
    clip_dim: usize,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for TextEncoders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextEncoders")
            .field("t5", &self.t5.residency())
            .field("t5_tokenizer", &self.t5_tokenizer)
            .field("clip_tokenizer", &self.clip_tokenizer)
            .field("t5_dim", &self.t5_dim)
            .field("clip_dim", &self.clip_dim)
            .field("dtype", &self.dtype)
            .field("device", &self.device)
            .finish()
    }
}

/// FLUX's T5: T5 v1.1 XXL (encoder used; gated-GELU feed-forward, untied embeddings).
pub fn t5_xxl_config() -> t5::Config {
    t5::Config {
        vocab_size: 32128,
        d_model: 4096,
        d_kv: 64,
        d_ff: 10240,
        num_layers: 24,
        num_decoder_layers: Some(24),
        num_heads: 64,
        relative_attention_num_buckets: 32,
        relative_attention_max_distance: 128,
        dropout_rate: 0.1,
        layer_norm_epsilon: 1e-6,
        initializer_factor: 1.0,
        feed_forward_proj: gated_gelu(),
        tie_word_embeddings: false,
        is_decoder: false,
        is_encoder_decoder: true,
        use_cache: true,
        pad_token_id: 0,
        eos_token_id: 1,
        decoder_start_token_id: Some(0),
    }
}

/// FLUX's CLIP: the text model of OpenAI's CLIP ViT-L/14.
pub fn clip_l_config() -> ClipTextConfig {
    ClipTextConfig {
        vocab_size: 49408,
        embed_dim: 768,
        activation: Activation::QuickGelu,
        intermediate_size: 3072,
        max_position_embeddings: 77,
        pad_with: None,
        num_hidden_layers: 12,
        num_attention_heads: 12,
        projection_dim: 768,
    }
}

/// The demo T5: 128 wide, 3 layers of 4 heads, gated-GELU like T5 v1.1, over the demo byte
/// tokenizer's vocabulary.
pub fn t5_demo_config() -> t5::Config {
    t5::Config {
        vocab_size: DEMO_VOCAB,
        d_model: DEMO_T5_DIM,
        d_kv: 32,
        d_ff: 256,
        num_layers: 3,
        num_decoder_layers: None,
        num_heads: 4,
        relative_attention_num_buckets: 32,
        relative_attention_max_distance: 128,
        dropout_rate: 0.0,
        layer_norm_epsilon: 1e-6,
        initializer_factor: 1.0,
        feed_forward_proj: gated_gelu(),
        tie_word_embeddings: false,
        is_decoder: false,
        is_encoder_decoder: false,
        use_cache: false,
        pad_token_id: 0,
        eos_token_id: DEMO_VOCAB - 1,
        decoder_start_token_id: None,
    }
}

/// The demo CLIP: 64 wide, 2 layers of 2 heads, 77 positions, over the demo byte tokenizer's
/// vocabulary.
pub fn clip_demo_config() -> ClipTextConfig {
    ClipTextConfig {
        vocab_size: DEMO_VOCAB,
        embed_dim: DEMO_CLIP_DIM,
        activation: Activation::QuickGelu,
        intermediate_size: 128,
        max_position_embeddings: CLIP_MAX_LEN,
        pad_with: None,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        projection_dim: DEMO_CLIP_DIM,
    }
}

/// Size of [`PromptTokenizer::demo`]'s vocabulary (padding, 256 bytes, two specials).
const DEMO_VOCAB: usize = 259;

fn gated_gelu() -> t5::ActivationWithOptionalGating {
    t5::ActivationWithOptionalGating {
        gated: true,
        activation: candle_nn::Activation::NewGelu,
    }
}

/// Read a T5 `config.json` (transformers' format) into candle's config.
pub fn read_t5_config(path: &Path) -> Result<t5::Config> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let cfg: t5::Config = serde_json::from_str(&text).map_err(|e| Error::BadConfig {
        path: path.to_path_buf(),
        reason: format!("not a T5 config: {e}"),
    })?;
    let bad = |reason: String| Error::BadConfig {
        path: path.to_path_buf(),
        reason,
    };
    if cfg.d_model == 0 || cfg.num_heads == 0 || cfg.d_kv == 0 || cfg.num_layers == 0 {
        return Err(bad(format!(
            "d_model ({}), num_heads ({}), d_kv ({}) and num_layers ({}) must all be positive",
            cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.num_layers
        )));
    }
    if cfg.relative_attention_num_buckets < 4 {
        return Err(bad(format!(
            "relative_attention_num_buckets is {}; T5 needs at least 4",
            cfg.relative_attention_num_buckets
        )));
    }
    Ok(cfg)
}

/// The fields of a transformers `CLIPTextConfig` that candle's CLIP text model uses.
#[derive(serde::Deserialize)]
struct ClipTextJson {
    hidden_size: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    vocab_size: usize,
    projection_dim: Option<usize>,
    hidden_act: Option<String>,
    layer_norm_eps: Option<f64>,
}

/// Read a CLIP text `config.json` (a `CLIPTextModel` config, or a full `CLIPModel` config whose
/// `text_config` is used) into candle's config. Only `quick_gelu` (CLIP-L's activation) is
/// supported.
pub fn read_clip_config(path: &Path) -> Result<ClipTextConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let bad = |reason: String| Error::BadConfig {
        path: path.to_path_buf(),
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let value = match value.get("text_config") {
        Some(inner) if inner.is_object() => inner.clone(),
        _ => value,
    };
    let c: ClipTextJson =
        serde_json::from_value(value).map_err(|e| bad(format!("not a CLIP text config: {e}")))?;
    match c.hidden_act.as_deref() {
        None | Some("quick_gelu") => {}
        Some(other) => {
            return Err(bad(format!(
                "hidden_act is `{other}`; Parallax's CLIP text model supports only `quick_gelu` \
                 (the activation of CLIP-L, which FLUX uses)"
            )))
        }
    }
    if c.num_attention_heads == 0 || c.hidden_size % c.num_attention_heads != 0 {
        return Err(bad(format!(
            "hidden_size {} is not a multiple of num_attention_heads {}",
            c.hidden_size, c.num_attention_heads
        )));
    }
    if let Some(eps) = c.layer_norm_eps {
        if (eps - 1e-5).abs() > 1e-9 {
            tracing::warn!(
                "{}: layer_norm_eps is {eps}, but the CLIP implementation uses 1e-5",
                path.display()
            );
        }
    }
    Ok(ClipTextConfig {
        vocab_size: c.vocab_size,
        embed_dim: c.hidden_size,
        activation: Activation::QuickGelu,
        intermediate_size: c.intermediate_size,
        max_position_embeddings: c.max_position_embeddings,
        pad_with: None,
        num_hidden_layers: c.num_hidden_layers,
        num_attention_heads: c.num_attention_heads,
        projection_dim: c.projection_dim.unwrap_or(c.hidden_size),
    })
}

/// Which encoder a problem concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    T5,
    Clip,
}

/// Why a tokenizer cannot feed its model, if it cannot.
fn misfit(
    t5_tokenizer: &PromptTokenizer,
    t5_cfg: &t5::Config,
    clip_tokenizer: &PromptTokenizer,
    clip_cfg: &ClipTextConfig,
) -> Option<(Part, String)> {
    if t5_tokenizer.vocab_size() > t5_cfg.vocab_size {
        return Some((
            Part::T5,
            format!(
                "the T5 tokenizer has {} tokens but the T5 model only {} (vocab_size)",
                t5_tokenizer.vocab_size(),
                t5_cfg.vocab_size
            ),
        ));
    }
    if clip_tokenizer.vocab_size() > clip_cfg.vocab_size {
        return Some((
            Part::Clip,
            format!(
                "the CLIP tokenizer has {} tokens but the CLIP model only {} (vocab_size)",
                clip_tokenizer.vocab_size(),
                clip_cfg.vocab_size
            ),
        ));
    }
    if clip_tokenizer.max_len() > clip_cfg.max_position_embeddings {
        return Some((
            Part::Clip,
            format!(
                "CLIP sequences are {} tokens but the CLIP model has only {} positions",
                clip_tokenizer.max_len(),
                clip_cfg.max_position_embeddings
            ),
        ));
    }
    None
}

/// Open the weights of one part: a file, or a folder (its `model.safetensors.index.json`, its
/// `model.safetensors`, or else all of its `.safetensors` files).
pub(crate) fn open_weights(path: &Path) -> Result<Arc<SafetensorsSet>> {
    if path.is_dir() {
        for name in ["model.safetensors.index.json", "model.safetensors"] {
            let p = path.join(name);
            if p.is_file() {
                return Ok(Arc::new(SafetensorsSet::open(&p)?));
            }
        }
        return Ok(Arc::new(SafetensorsSet::open(path)?));
    }
    if !path.exists() {
        return Err(Error::UnknownLayout {
            path: path.to_path_buf(),
            reason: "no such file or folder".into(),
        });
    }
    Ok(Arc::new(SafetensorsSet::open(path)?))
}

/// The prefix under which a set stores a model, found from one tensor the model must have
/// (`anchor`): e.g. `text_model.` for diffusers' CLIP, empty for T5.
pub(crate) fn find_prefix(set: &SafetensorsSet, anchor: &str, model: &str) -> Result<String> {
    set.names()
        .filter_map(|n| n.strip_suffix(anchor))
        .filter(|p| p.is_empty() || p.ends_with('.'))
        .min_by_key(|p| p.len())
        .map(str::to_string)
        .ok_or_else(|| Error::MissingTensor {
            tensor: anchor.to_string(),
            location: format!("{} (looking for the {model})", set.label()),
        })
}

/// A config a single-file encoder may have, and the shapes its tensors then have.
struct Known<C> {
    name: &'static str,
    cfg: C,
    /// Tensors (with the file's prefix) and their shapes under this config.
    shapes: Vec<(String, Vec<usize>)>,
    /// A tensor the file must not have (the block after the last).
    absent: String,
}

/// T5-XXL v1.1 and the demo's T5, with the shapes of their tensors below `prefix` (`embed`: the
/// name the file gives the token embedding).
fn known_t5(prefix: &str, embed: &str) -> Vec<Known<t5::Config>> {
    [
        ("T5-XXL v1.1", t5_xxl_config()),
        ("the demo's T5", t5_demo_config()),
    ]
    .into_iter()
    .map(|(name, c)| {
        let block = |i: usize, rest: &str| format!("{prefix}encoder.block.{i}.layer.{rest}");
        let q = vec![c.num_heads * c.d_kv, c.d_model];
        let wi = if c.feed_forward_proj.gated {
            "wi_0"
        } else {
            "wi"
        };
        Known {
            name,
            shapes: vec![
                (format!("{prefix}{embed}"), vec![c.vocab_size, c.d_model]),
                (block(0, "0.SelfAttention.q.weight"), q.clone()),
                (
                    block(0, "0.SelfAttention.relative_attention_bias.weight"),
                    vec![c.relative_attention_num_buckets, c.num_heads],
                ),
                (
                    block(0, &format!("1.DenseReluDense.{wi}.weight")),
                    vec![c.d_ff, c.d_model],
                ),
                (block(c.num_layers - 1, "0.SelfAttention.q.weight"), q),
            ],
            absent: block(c.num_layers, "0.SelfAttention.q.weight"),
            cfg: c,
        }
    })
    .collect()
}

/// CLIP-L's text model and the demo's CLIP, with the shapes of their tensors below `prefix`.
fn known_clip(prefix: &str) -> Vec<Known<ClipTextConfig>> {
    [
        ("CLIP-L", clip_l_config()),
        ("the demo's CLIP", clip_demo_config()),
    ]
    .into_iter()
    .map(|(name, c)| {
        let fc1 = |i: usize| format!("{prefix}encoder.layers.{i}.mlp.fc1.weight");
        let embeddings = format!("{prefix}embeddings");
        Known {
            name,
            shapes: vec![
                (
                    format!("{embeddings}.token_embedding.weight"),
                    vec![c.vocab_size, c.embed_dim],
                ),
                (
                    format!("{embeddings}.position_embedding.weight"),
                    vec![c.max_position_embeddings, c.embed_dim],
                ),
                (fc1(0), vec![c.intermediate_size, c.embed_dim]),
                (
                    fc1(c.num_hidden_layers - 1),
                    vec![c.intermediate_size, c.embed_dim],
                ),
            ],
            absent: fc1(c.num_hidden_layers),
            cfg: c,
        }
    })
    .collect()
}

/// The config of a single-file encoder (its file carries none): the one of `known` whose
/// shapes its tensors have. `what` names the encoder in messages.
fn single_file_config<C>(
    set: &SafetensorsSet,
    path: &Path,
    known: Vec<Known<C>>,
    what: &str,
) -> Result<C> {
    let names: Vec<&str> = known.iter().map(|k| k.name).collect();
    for k in known {
        let fits = k
            .shapes
            .iter()
            .all(|(n, shape)| set.meta(n).is_some_and(|m| &m.shape == shape))
            && !set.contains(&k.absent);
        if fits {
            tracing::info!(
                "{} is a single file: its tensors have {}'s shapes; using that configuration",
                path.display(),
                k.name
            );
            return Ok(k.cfg);
        }
    }
    Err(Error::BadConfig {
        path: path.to_path_buf(),
        reason: format!(
            "a single-file {what} whose tensor shapes are none of {} (the configurations Parallax \
             knows); give a folder with the model's config.json and weights instead",
            names.join(", ")
        ),
    })
}

/// A part's weights and config: a folder's `config.json`, or for a single file the known config
/// its shapes match.
fn part_config<C>(
    path: &Path,
    read: impl Fn(&Path) -> Result<C>,
    set: &SafetensorsSet,
    known: impl FnOnce() -> Vec<Known<C>>,
    what: &str,
) -> Result<(C, Option<PathBuf>)> {
    if path.is_dir() {
        let cfg_path = path.join("config.json");
        Ok((read(&cfg_path)?, Some(cfg_path)))
    } else {
        Ok((single_file_config(set, path, known(), what)?, None))
    }
}

/// Check that an encoder's weights are there before anything is read: `hint` says what was
/// expected.
fn require(path: &Path, hint: &str) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    Err(Error::UnknownLayout {
        path: path.to_path_buf(),
        reason: format!("not found: {hint}"),
    })
}

impl TextEncoders {
    /// Build from ready weights. `t5_vb` is positioned where T5's `shared.weight` and
    /// `encoder.*` live, `clip_vb` where the CLIP text model's `embeddings.*`, `encoder.*` and
    /// `final_layer_norm.*` live (diffusers: `text_model.`). Both must produce the same dtype,
    /// on the same device.
    pub fn new(
        t5_vb: VarBuilder,
        t5_cfg: &t5::Config,
        clip_vb: VarBuilder,
        clip_cfg: &ClipTextConfig,
        t5_tokenizer: PromptTokenizer,
        clip_tokenizer: PromptTokenizer,
    ) -> Result<Self> {
        let dtype = t5_vb.dtype();
        let device = t5_vb.device().clone();
        let t5 = T5EncoderModel::load(t5_vb, t5_cfg)?;
        Self::assemble(
            Slot::Resident(Mutex::new(t5)),
            (t5_cfg, dtype, device),
            clip_vb,
            clip_cfg,
            t5_tokenizer,
            clip_tokenizer,
        )
    }

    /// Like [`TextEncoders::new`], with T5 built by `build` for each prompt and freed after it
    /// ([`T5Residency::OnDemand`]); `build` makes a T5 of `t5_cfg` in `dtype` on `device`.
    pub fn with_t5_builder(
        build: T5Builder,
        (t5_cfg, dtype, device): (&t5::Config, DType, &Device),
        clip_vb: VarBuilder,
        clip_cfg: &ClipTextConfig,
        t5_tokenizer: PromptTokenizer,
        clip_tokenizer: PromptTokenizer,
    ) -> Result<Self> {
        Self::assemble(
            Slot::on_demand(Arc::new(move || Ok(Mutex::new(build()?)))),
            (t5_cfg, dtype, device.clone()),
            clip_vb,
            clip_cfg,
            t5_tokenizer,
            clip_tokenizer,
        )
    }

    fn assemble(
        t5: T5Slot,
        (t5_cfg, dtype, device): (&t5::Config, DType, Device),
        clip_vb: VarBuilder,
        clip_cfg: &ClipTextConfig,
        t5_tokenizer: PromptTokenizer,
        clip_tokenizer: PromptTokenizer,
    ) -> Result<Self> {
        if let Some((_, reason)) = misfit(&t5_tokenizer, t5_cfg, &clip_tokenizer, clip_cfg) {
            return Err(Error::setting("text encoders", "tokenizers", reason));
        }
        let clip = ClipTextTransformer::new(clip_vb, clip_cfg)?;
        Ok(Self {
            t5,
            clip,
            t5_tokenizer,
            clip_tokenizer,
            t5_dim: t5_cfg.d_model,
            clip_dim: clip_cfg.embed_dim,
            dtype,
            device,
        })
    }

    /// Load the encoders of a diffusers checkout at `root`: `text_encoder/` (CLIP-L),
    /// `text_encoder_2/` (T5-XXL, usually sharded), `tokenizer/` and `tokenizer_2/`. T5 takes
    /// `t5_max_len` tokens (FLUX.1-dev 512, schnell 256); CLIP takes as many as it has
    /// positions (77). Weights are converted to `dtype` on `device` (bf16 or f32 suit T5; in
    /// f16 its activations can overflow).
    pub fn load_diffusers(
        root: &Path,
        t5_max_len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::load_diffusers_with(root, t5_max_len, dtype, device, T5Residency::Resident)
    }

    /// [`TextEncoders::load_diffusers`] with T5 kept as `residency` says.
    pub fn load_diffusers_with(
        root: &Path,
        t5_max_len: usize,
        dtype: DType,
        device: &Device,
        residency: T5Residency,
    ) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::UnknownLayout {
                path: root.to_path_buf(),
                reason: "not a folder (expected a diffusers checkout with text_encoder/, \
                         text_encoder_2/, tokenizer/ and tokenizer_2/)"
                    .into(),
            });
        }
        for sub in ["text_encoder", "text_encoder_2"] {
            if !root.join(sub).is_dir() {
                return Err(Error::UnknownLayout {
                    path: root.to_path_buf(),
                    reason: format!("no {sub}/ folder (a diffusers FLUX checkout has one)"),
                });
            }
        }
        Self::load_parts_with(
            &TextEncoderPaths::diffusers(root),
            t5_max_len,
            dtype,
            device,
            residency,
        )
    }

    /// Load the encoders from the places `paths` names (see [`TextEncoderPaths`]).
    pub fn load_parts(
        paths: &TextEncoderPaths,
        t5_max_len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::load_parts_with(paths, t5_max_len, dtype, device, T5Residency::Resident)
    }

    /// [`TextEncoders::load_parts`] with T5 kept as `residency` says.
    pub fn load_parts_with(
        paths: &TextEncoderPaths,
        t5_max_len: usize,
        dtype: DType,
        device: &Device,
        residency: T5Residency,
    ) -> Result<Self> {
        require(
            &paths.t5,
            "the T5 encoder: a diffusers text_encoder_2/ folder, or a single file such as \
             ComfyUI's t5xxl_fp16.safetensors (--t5)",
        )?;
        require(
            &paths.clip,
            "the CLIP text model: a diffusers text_encoder/ folder, or a single file such as \
             ComfyUI's clip_l.safetensors (--clip)",
        )?;
        let t5_set = open_weights(&paths.t5)?;
        let t5_prefix = find_prefix(
            &t5_set,
            "encoder.block.0.layer.0.SelfAttention.q.weight",
            "T5 encoder",
        )?;
        let t5_embed = if t5_set.contains(&format!("{t5_prefix}shared.weight")) {
            "shared.weight"
        } else {
            "encoder.embed_tokens.weight"
        };
        let (t5_cfg, t5_cfg_path) = part_config(
            &paths.t5,
            read_t5_config,
            &t5_set,
            || known_t5(&t5_prefix, t5_embed),
            "T5 encoder",
        )?;
        let clip_set = open_weights(&paths.clip)?;
        let clip_prefix = find_prefix(
            &clip_set,
            "embeddings.token_embedding.weight",
            "CLIP text model",
        )?;
        let (clip_cfg, clip_cfg_path) = part_config(
            &paths.clip,
            read_clip_config,
            &clip_set,
            || known_clip(&clip_prefix),
            "CLIP text model",
        )?;

        let t5_tokenizer = PromptTokenizer::from_folder(&paths.t5_tokenizer, "t5", t5_max_len)?;
        let clip_max_len = clip_cfg.max_position_embeddings.min(CLIP_MAX_LEN);
        let clip_tokenizer =
            PromptTokenizer::from_folder(&paths.clip_tokenizer, "clip", clip_max_len)?;
        if let Some((part, reason)) = misfit(&t5_tokenizer, &t5_cfg, &clip_tokenizer, &clip_cfg) {
            let path = match part {
                Part::T5 => t5_cfg_path.unwrap_or_else(|| paths.t5.clone()),
                Part::Clip => clip_cfg_path.unwrap_or_else(|| paths.clip.clone()),
            };
            return Err(Error::BadConfig { path, reason });
        }

        let t5_vb = {
            let (set, prefix, dtype, device) = (t5_set.clone(), t5_prefix, dtype, device.clone());
            move || {
                MappedWeights::new(
                    set.clone(),
                    Arc::new(Identity {
                        prefix: prefix.clone(),
                    }),
                )
                .var_builder(dtype, &device)
            }
        };

        let clip_vb = MappedWeights::new(
            clip_set,
            Arc::new(Identity {
                prefix: clip_prefix,
            }),
        )
        .var_builder(dtype, device);

        match residency {
            T5Residency::Resident => Self::new(
                t5_vb(),
                &t5_cfg,
                clip_vb,
                &clip_cfg,
                t5_tokenizer,
                clip_tokenizer,
            ),
            T5Residency::OnDemand => {
                let cfg = t5_cfg.clone();
                let build: T5Builder = Arc::new(move || T5EncoderModel::load(t5_vb(), &cfg).px());
                Self::with_t5_builder(
                    build,
                    (&t5_cfg, dtype, device),
                    clip_vb,
                    &clip_cfg,
                    t5_tokenizer,
                    clip_tokenizer,
                )
            }
        }
    }

    /// Where T5 stays between prompts.
    pub fn t5_residency(&self) -> T5Residency {
        self.t5.residency()
    }

    /// Tiny encoders with made-up weights ([`t5_demo_config`], [`clip_demo_config`], the demo
    /// byte tokenizers, T5 sequences of [`DEMO_T5_MAX_LEN`]), in f32 on `device`. The same
    /// `seed` gives the same encoders.
    pub fn demo(seed: u64, device: &Device) -> Result<Self> {
        let vb = DemoWeights::new(seed).var_builder(DType::F32, device);
        Self::new(
            vb.clone(),
            &t5_demo_config(),
            vb.pp("text_model"),
            &clip_demo_config(),
            PromptTokenizer::demo(DEMO_T5_MAX_LEN, "t5")?,
            PromptTokenizer::demo(CLIP_MAX_LEN, "clip")?,
        )
    }

    /// Encode `prompt` (see [`Encoded`]). The tensors are in the encoders' dtype
    /// ([`TextEncoders::dtype`]); [`TextEncoders::encode_as`] converts them.
    pub fn encode(&self, prompt: &str) -> Result<Encoded> {
        let mut notes = Vec::new();

        let t5_tokens = self.t5_tokenizer.encode(prompt)?;
        if let Some(n) = t5_tokens.truncated_from {
            notes.push(format!(
                "prompt is {n} T5 tokens; the encoder takes {}, so it was truncated",
                self.t5_tokenizer.max_len()
            ));
        }
        let clip_tokens = self.clip_tokenizer.encode(prompt)?;
        if let Some(n) = clip_tokens.truncated_from {
            notes.push(format!(
                "prompt is {n} CLIP tokens; CLIP takes {}, so its pooled summary sees only the \
                 start of the prompt",
                self.clip_tokenizer.max_len()
            ));
        }
        for note in &notes {
            tracing::warn!("{note}");
        }

        let t5_ids = Tensor::new(t5_tokens.ids.as_slice(), &self.device)?.unsqueeze(0)?;
        let txt = self.t5.run("T5", |t5| {
            // A panic elsewhere while holding the lock leaves the encoder unchanged (it keeps no
            // state between calls), so a poisoned lock is still usable.
            let mut t5 = t5.lock().unwrap_or_else(|p| p.into_inner());
            Ok(t5.forward(&t5_ids)?)
        })?;

        let clip_ids = Tensor::new(clip_tokens.ids.as_slice(), &self.device)?.unsqueeze(0)?;
        let hidden = self.clip.forward_with_mask(&clip_ids, usize::MAX)?;
        // CLIP's summary is the state at the first end-of-text token.
        let pool_at = self
            .clip_tokenizer
            .eos_id()
            .and_then(|eos| clip_tokens.ids.iter().position(|&id| id == eos))
            .unwrap_or(clip_tokens.used.saturating_sub(1));
        let vec = hidden.i((.., pool_at, ..))?.contiguous()?;

        Ok(Encoded { txt, vec, notes })
    }

    /// [`TextEncoders::encode`], with both tensors converted to `dtype`.
    pub fn encode_as(&self, prompt: &str, dtype: DType) -> Result<Encoded> {
        let e = self.encode(prompt)?;
        Ok(Encoded {
            txt: e.txt.to_dtype(dtype)?,
            vec: e.vec.to_dtype(dtype)?,
            notes: e.notes,
        })
    }

    /// How many tokens T5 reads (the second axis of `txt`).
    pub fn t5_max_len(&self) -> usize {
        self.t5_tokenizer.max_len()
    }

    /// Width of T5's hidden states (the last axis of `txt`).
    pub fn t5_dim(&self) -> usize {
        self.t5_dim
    }

    /// Width of CLIP's pooled output (the last axis of `vec`).
    pub fn clip_dim(&self) -> usize {
        self.clip_dim
    }

    /// The dtype the encoders compute in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the encoders live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// T5's tokenizer.
    pub fn t5_tokenizer(&self) -> &PromptTokenizer {
        &self.t5_tokenizer
    }

    /// CLIP's tokenizer.
    pub fn clip_tokenizer(&self) -> &PromptTokenizer {
        &self.clip_tokenizer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn encoders_are_send_and_sync() {
        assert_send_sync::<TextEncoders>();
        assert_send_sync::<PromptTokenizer>();
    }

    #[test]
    fn demo_configs_match_the_demo_tokenizer() -> Result<()> {
        let t = PromptTokenizer::demo(8, "t5")?;
        assert_eq!(t5_demo_config().vocab_size, t.vocab_size());
        assert_eq!(Some(t5_demo_config().eos_token_id as u32), t.eos_id());
        assert_eq!(clip_demo_config().vocab_size, t.vocab_size());
        assert_eq!(t5_demo_config().d_model, DEMO_T5_DIM);
        assert_eq!(clip_demo_config().embed_dim, DEMO_CLIP_DIM);
        Ok(())
    }

    #[test]
    fn demo_shapes_and_notes() -> Result<()> {
        let enc = TextEncoders::demo(3, &Device::Cpu)?;
        let e = enc.encode("a small red fox")?;
        assert_eq!(e.txt.dims(), &[1, DEMO_T5_MAX_LEN, DEMO_T5_DIM]);
        assert_eq!(e.vec.dims(), &[1, DEMO_CLIP_DIM]);
        assert!(e.notes.is_empty());
        let long = "x".repeat(100);
        let e = enc.encode_as(&long, DType::BF16)?;
        assert_eq!(e.txt.dtype(), DType::BF16);
        assert_eq!(e.notes.len(), 2, "{:?}", e.notes);
        assert!(e.notes[0].contains("101 T5 tokens"), "{:?}", e.notes);
        Ok(())
    }

    #[test]
    fn clip_config_rejects_other_activations() -> std::result::Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("config.json");
        std::fs::write(
            &p,
            r#"{"hidden_size": 32, "intermediate_size": 64, "max_position_embeddings": 77,
                "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 259,
                "hidden_act": "gelu"}"#,
        )?;
        let err = read_clip_config(&p);
        assert!(
            matches!(&err, Err(Error::BadConfig { reason, .. }) if reason.contains("gelu")),
            "{err:?}"
        );
        std::fs::write(
            &p,
            r#"{"text_config": {"hidden_size": 32, "intermediate_size": 64,
                "max_position_embeddings": 77, "num_hidden_layers": 2, "num_attention_heads": 2,
                "vocab_size": 259, "hidden_act": "quick_gelu"}}"#,
        )?;
        let cfg = read_clip_config(&p)?;
        assert_eq!(cfg.embed_dim, 32);
        assert_eq!(cfg.projection_dim, 32);
        Ok(())
    }
}
