//! LoRA files for FLUX.1: the layouts people have — kohya's (`lora_unet_double_blocks_0_img_attn_qkv`
//! with `lora_down`/`lora_up`/`alpha`), diffusers'/PEFT's (`transformer.transformer_blocks.0.attn.to_q`
//! with `lora_A`/`lora_B`, with or without the `transformer.` prefix) and Black Forest Labs' or
//! ComfyUI's (`diffusion_model.double_blocks.0.img_attn.qkv`) — mapped onto Parallax's own linear
//! layers (Black Forest Labs' names). A part aimed at one slice of a fused layer (diffusers'
//! `to_q` of BFL's `qkv`, `proj_mlp` of a single block's `linear1`) lands on those output rows.
//!
//! [`LoraSet`] holds several files with strengths and makes, for each linear layer, one low-rank
//! path ([`LowRank`]) that runs beside the base product: `x Wᵀ + (x Aᵀ) Bᵀ`, the strengths and
//! each part's `alpha / rank` folded into `B`. The base weights are never touched, so a new
//! strength or set is a new path, not a reload.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::flux1::FluxConfig;
use super::layout::FluxDiffusersMap;
pub use super::lowrank::{AdaptedLinear, LowRank, LowRankSource};
use super::weights::{KeyMap, SafetensorsSet, Source};
use crate::error::{Error, Result};

/// Where a module name of a LoRA file lands: rows `rows` of Parallax's layer `layer`.
#[derive(Debug, Clone, PartialEq)]
struct Target {
    layer: String,
    rows: Range<usize>,
    /// diffusers' `norm_out.linear` computes (scale, shift), BFL's final modulation (shift,
    /// scale): the part's output rows are swapped by halves.
    swap_halves: bool,
    in_dim: usize,
}

/// Every linear layer of a FLUX.1 transformer of `cfg` with its (output, input) sizes, BFL names.
pub fn flux_linear_layers(cfg: &FluxConfig) -> Vec<(String, usize, usize)> {
    let h = cfg.hidden_size;
    let mlp = cfg.mlp_hidden();
    let mut v: Vec<(String, usize, usize)> = vec![
        ("img_in".into(), h, cfg.in_channels),
        ("txt_in".into(), h, cfg.context_in_dim),
        ("time_in.in_layer".into(), h, 256),
        ("time_in.out_layer".into(), h, h),
        ("vector_in.in_layer".into(), h, cfg.vec_in_dim),
        ("vector_in.out_layer".into(), h, h),
        ("final_layer.linear".into(), cfg.out_channels(), h),
        ("final_layer.adaLN_modulation.1".into(), 2 * h, h),
    ];
    if cfg.guidance_embed {
        v.push(("guidance_in.in_layer".into(), h, 256));
        v.push(("guidance_in.out_layer".into(), h, h));
    }
    for i in 0..cfg.depth {
        for s in ["img", "txt"] {
            v.push((format!("double_blocks.{i}.{s}_mod.lin"), 6 * h, h));
            v.push((format!("double_blocks.{i}.{s}_attn.qkv"), 3 * h, h));
            v.push((format!("double_blocks.{i}.{s}_attn.proj"), h, h));
            v.push((format!("double_blocks.{i}.{s}_mlp.0"), mlp, h));
            v.push((format!("double_blocks.{i}.{s}_mlp.2"), h, mlp));
        }
    }
    for i in 0..cfg.depth_single_blocks {
        v.push((format!("single_blocks.{i}.modulation.lin"), 3 * h, h));
        v.push((format!("single_blocks.{i}.linear1"), 3 * h + mlp, h));
        v.push((format!("single_blocks.{i}.linear2"), h, h + mlp));
    }
    v
}

/// Every module name a LoRA for `cfg` may use (prefixes stripped), with where it lands.
fn targets(cfg: &FluxConfig) -> HashMap<String, Target> {
    let map = FluxDiffusersMap {
        hidden: cfg.hidden_size,
        mlp_hidden: cfg.mlp_hidden(),
    };
    let mut t = HashMap::new();
    for (layer, out, in_dim) in flux_linear_layers(cfg) {
        let whole = Target {
            layer: layer.clone(),
            rows: 0..out,
            swap_halves: false,
            in_dim,
        };
        // BFL / ComfyUI, and kohya's underscored form of the same names.
        t.insert(
            format!("lora_unet_{}", layer.replace('.', "_")),
            whole.clone(),
        );
        t.insert(layer.clone(), whole.clone());
        // diffusers / PEFT, and kohya's underscored form of those ("lora_transformer_...").
        let mut diffusers = |name: &str, target: Target| {
            let stem = name.strip_suffix(".weight").unwrap_or(name).to_string();
            t.insert(
                format!("lora_transformer_{}", stem.replace('.', "_")),
                target.clone(),
            );
            t.insert(stem, target);
        };
        match map.source(&format!("{layer}.weight")) {
            Some(Source::Tensor(name)) => diffusers(&name, whole),
            Some(Source::SwapHalves { name, .. }) => diffusers(
                &name,
                Target {
                    swap_halves: true,
                    ..whole
                },
            ),
            Some(Source::Concat { parts, .. }) => {
                let mut start = 0;
                for (name, rows) in parts {
                    let part = Target {
                        rows: start..start + rows,
                        ..whole.clone()
                    };
                    diffusers(&name, part);
                    start += rows;
                }
            }
            _ => {}
        }
    }
    t
}

/// The prefixes a module name may carry (diffusers' pipeline component, ComfyUI's model, PEFT's
/// wrapper).
const PREFIXES: [&str; 4] = [
    "transformer.",
    "model.diffusion_model.",
    "diffusion_model.",
    "base_model.model.",
];

/// The tensor kinds of one module: (suffix, which). Anything else is reported unknown.
const SUFFIXES: [(&str, Kind); 5] = [
    (".lora_A.weight", Kind::Down),
    (".lora_B.weight", Kind::Up),
    (".lora_down.weight", Kind::Down),
    (".lora_up.weight", Kind::Up),
    (".alpha", Kind::Alpha),
];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Down,
    Up,
    Alpha,
}

/// One low-rank pair of a file on its target.
#[derive(Debug, Clone)]
struct Part {
    /// The file's module name (for messages).
    module: String,
    target: Target,
    /// (rank, in) and (rows, rank), f32 on the CPU.
    down: Tensor,
    up: Tensor,
    /// `alpha / rank` (1 when the file stores no alpha).
    scale: f64,
}

/// The alpha a file saved by diffusers keeps in its header instead of alpha tensors: PEFT's
/// config as JSON under `lora_adapter_metadata`, keys prefixed `transformer.` (`lora_alpha`, and
/// `alpha_pattern` for modules that differ).
#[derive(Debug, Clone, Default)]
struct HeaderAlpha {
    alpha: Option<f64>,
    patterns: Vec<(String, f64)>,
}

impl HeaderAlpha {
    fn read(path: &Path) -> Result<Self> {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut n = [0u8; 8];
        f.read_exact(&mut n).map_err(|e| Error::io(path, e))?;
        let n = u64::from_le_bytes(n);
        if n > 100 << 20 {
            return Ok(Self::default());
        }
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
        let json: serde_json::Value = serde_json::from_slice(&header).unwrap_or_default();
        let Some(meta) = json
            .pointer("/__metadata__/lora_adapter_metadata")
            .and_then(|v| v.as_str())
            .and_then(|s| serde_json::from_str::<serde_json::Value>(s).ok())
        else {
            return Ok(Self::default());
        };
        let get = |k: &str| {
            meta.get(format!("transformer.{k}"))
                .or_else(|| meta.get(k))
                .cloned()
        };
        let patterns = get("alpha_pattern")
            .and_then(|p| p.as_object().cloned())
            .map(|o| {
                o.into_iter()
                    .filter_map(|(k, v)| Some((k, v.as_f64()?)))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            alpha: get("lora_alpha").and_then(|v| v.as_f64()),
            patterns,
        })
    }

    /// The alpha of `module` (a pattern naming it or its tail, else the file's).
    fn alpha_of(&self, module: &str) -> Option<f64> {
        self.patterns
            .iter()
            .find(|(k, _)| module == k || module.ends_with(&format!(".{k}")))
            .map(|(_, a)| *a)
            .or(self.alpha)
    }
}

/// A LoRA file read and mapped onto a FLUX.1 transformer's layers.
#[derive(Debug, Clone)]
pub struct LoraFile {
    label: String,
    parts: Vec<Part>,
}

impl LoraFile {
    /// Read `path` for a transformer of `cfg`. Every tensor must be understood: names that are
    /// no LoRA tensor of a FLUX.1 layer of this size (text-encoder parts, DoRA scales, blocks the
    /// model does not have, ...) are listed in the error, never skipped.
    pub fn open(path: &Path, cfg: &FluxConfig) -> Result<Self> {
        let set = SafetensorsSet::open(path)?;
        let names: Vec<String> = set.names().map(str::to_string).collect();
        let label = path.display().to_string();
        let header = HeaderAlpha::read(path)?;
        Self::from_tensors(&label, &names, cfg, &header, |n| {
            set.load(n, DType::F32, &Device::Cpu)
        })
    }

    /// [`LoraFile::open`] over tensors in memory (name, tensor).
    pub fn from_named(label: &str, tensors: &[(String, Tensor)], cfg: &FluxConfig) -> Result<Self> {
        let names: Vec<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
        Self::from_tensors(label, &names, cfg, &HeaderAlpha::default(), |n| {
            let t = tensors
                .iter()
                .find(|(k, _)| k == n)
                .map(|(_, t)| t.to_dtype(DType::F32))
                .transpose()?;
            t.ok_or_else(|| Error::MissingTensor {
                tensor: n.to_string(),
                location: label.to_string(),
            })
        })
    }

    fn from_tensors(
        label: &str,
        names: &[String],
        cfg: &FluxConfig,
        header: &HeaderAlpha,
        load: impl Fn(&str) -> Result<Tensor>,
    ) -> Result<Self> {
        let bad = |reason: String| Error::Lora {
            path: label.to_string(),
            reason,
        };
        let targets = targets(cfg);
        // module -> (down, up, alpha) tensor names.
        let mut modules: BTreeMap<String, [Option<String>; 3]> = BTreeMap::new();
        let mut unknown = Vec::new();
        for name in names {
            let Some((module, kind)) = SUFFIXES
                .iter()
                .find_map(|(s, k)| name.strip_suffix(s).map(|m| (m, *k)))
            else {
                unknown.push(name.clone());
                continue;
            };
            let module = PREFIXES
                .iter()
                .find_map(|p| module.strip_prefix(p))
                .unwrap_or(module);
            if !targets.contains_key(module) {
                unknown.push(name.clone());
                continue;
            }
            let slot = match kind {
                Kind::Down => 0,
                Kind::Up => 1,
                Kind::Alpha => 2,
            };
            modules.entry(module.to_string()).or_default()[slot] = Some(name.clone());
        }
        if !unknown.is_empty() {
            unknown.sort();
            let n = unknown.len();
            let shown: Vec<&str> = unknown.iter().take(12).map(String::as_str).collect();
            let more = if n > shown.len() {
                format!(" and {} more", n - shown.len())
            } else {
                String::new()
            };
            return Err(bad(format!(
                "{n} tensor(s) are not LoRA weights of this FLUX.1 transformer's linear layers \
                 (text-encoder or DoRA parts, or blocks this model does not have), so the LoRA \
                 cannot be applied as made: {}{more}",
                shown.join(", ")
            )));
        }
        if modules.is_empty() {
            return Err(bad("it holds no LoRA weights".into()));
        }
        let mut parts = Vec::with_capacity(modules.len());
        for (module, [down, up, alpha]) in modules {
            let target = targets[&module].clone();
            let (Some(down), Some(up)) = (down, up) else {
                return Err(bad(format!(
                    "`{module}` has only half of its low-rank pair (both the down/A and up/B \
                     weights are needed)"
                )));
            };
            let down_t = load(&down)?;
            let up_t = load(&up)?;
            let rank = down_t.dims().first().copied().unwrap_or(0);
            let rows = target.rows.len();
            let shape_err =
                |tensor: &str, expected: Vec<usize>, found: &[usize]| Error::ShapeMismatch {
                    tensor: tensor.to_string(),
                    location: label.to_string(),
                    expected,
                    found: found.to_vec(),
                };
            if down_t.dims() != [rank, target.in_dim] || rank == 0 {
                return Err(shape_err(&down, vec![rank, target.in_dim], down_t.dims()));
            }
            if up_t.dims() != [rows, rank] {
                return Err(shape_err(&up, vec![rows, rank], up_t.dims()));
            }
            let scale = match alpha {
                Some(a) => {
                    let a = load(&a)?.flatten_all()?.to_vec1::<f32>()?;
                    match a.as_slice() {
                        [a] => *a as f64 / rank as f64,
                        _ => return Err(bad(format!("`{module}`'s alpha is not one number"))),
                    }
                }
                None => header.alpha_of(&module).map_or(1.0, |a| a / rank as f64),
            };
            parts.push(Part {
                module,
                target,
                down: down_t,
                up: up_t,
                scale,
            });
        }
        Ok(Self {
            label: label.to_string(),
            parts,
        })
    }

    /// The file as named when read.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Parallax's layers this file adapts (BFL names), sorted, each once.
    pub fn layers(&self) -> Vec<String> {
        let mut v: Vec<String> = self.parts.iter().map(|p| p.target.layer.clone()).collect();
        v.sort();
        v.dedup();
        v
    }

    /// The file's module names, sorted (as written, prefixes stripped).
    pub fn modules(&self) -> Vec<&str> {
        self.parts.iter().map(|p| p.module.as_str()).collect()
    }
}

/// A LoRA as a request names it: its file and strength (`FILE[:STRENGTH]` on the command line).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraChoice {
    pub path: std::path::PathBuf,
    pub strength: f64,
}

impl std::str::FromStr for LoraChoice {
    type Err = String;

    /// `FILE` (strength 1) or `FILE:STRENGTH`; a colon not followed by a number belongs to the
    /// file's name.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (path, strength) = match s.rsplit_once(':') {
            Some((p, v)) => match v.trim().parse::<f64>() {
                Ok(v) => (p, v),
                Err(_) => (s, 1.0),
            },
            None => (s, 1.0),
        };
        if path.trim().is_empty() {
            return Err("name a LoRA file, as FILE or FILE:STRENGTH".into());
        }
        if !strength.is_finite() {
            return Err(format!("the strength of {path} must be a number"));
        }
        Ok(Self {
            path: path.into(),
            strength,
        })
    }
}

impl std::fmt::Display for LoraChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.path.display(), self.strength)
    }
}

/// Files read already, by path, size, modification time and the transformer's shape, so that a
/// new strength or set reads no file again.
type FileKey = (
    std::path::PathBuf,
    u64,
    Option<std::time::SystemTime>,
    String,
);
static READ: std::sync::Mutex<Vec<(FileKey, Arc<LoraFile>)>> = std::sync::Mutex::new(Vec::new());
/// How many read files are kept.
const KEEP: usize = 16;

/// Several LoRA files with their strengths (negative allowed; 0 leaves a file out).
#[derive(Debug, Clone, Default)]
pub struct LoraSet {
    pub entries: Vec<(Arc<LoraFile>, f64)>,
}

impl LoraSet {
    pub fn new(entries: Vec<(Arc<LoraFile>, f64)>) -> Self {
        Self { entries }
    }

    /// The files of `choices` for a transformer of `cfg` (each read once while unchanged on
    /// disk; those at strength 0 not read at all).
    pub fn load(choices: &[LoraChoice], cfg: &FluxConfig) -> Result<Self> {
        let mut entries = Vec::new();
        for c in choices.iter().filter(|c| c.strength != 0.0) {
            let meta = std::fs::metadata(&c.path).map_err(|e| Error::Lora {
                path: c.path.display().to_string(),
                reason: format!("cannot read the file ({e}); check its path"),
            })?;
            let key: FileKey = (
                c.path.clone(),
                meta.len(),
                meta.modified().ok(),
                format!("{cfg:?}"),
            );
            let cached = READ
                .lock()
                .ok()
                .and_then(|r| r.iter().find(|(k, _)| *k == key).map(|(_, f)| f.clone()));
            let file = match cached {
                Some(f) => f,
                None => {
                    let f = Arc::new(LoraFile::open(&c.path, cfg)?);
                    if let Ok(mut r) = READ.lock() {
                        r.retain(|(k, _)| k.0 != key.0);
                        if r.len() >= KEEP {
                            r.remove(0);
                        }
                        r.push((key, f.clone()));
                    }
                    f
                }
            };
            entries.push((file, c.strength));
        }
        Ok(Self { entries })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.iter().all(|(_, s)| *s == 0.0)
    }
}

impl LowRankSource for LoraSet {
    /// The low-rank path for rows `rows` of layer `layer` (BFL name), in `dtype` on `device`:
    /// every part of every file aimed there, stacked (`A` (Σr, in), `B` (rows, Σr) with the
    /// strength and `alpha / rank` folded in, zero where a part covers other rows). `None` when
    /// nothing is aimed there.
    fn low_rank(
        &self,
        layer: &str,
        rows: Range<usize>,
        dtype: DType,
        device: &Device,
    ) -> Result<Option<LowRank>> {
        let mut downs = Vec::new();
        let mut ups = Vec::new();
        for (file, strength) in &self.entries {
            if *strength == 0.0 {
                continue;
            }
            for p in file.parts.iter().filter(|p| p.target.layer == layer) {
                let t = &p.target;
                let (start, end) = (t.rows.start.max(rows.start), t.rows.end.min(rows.end));
                if start >= end {
                    continue;
                }
                let up = if t.swap_halves {
                    let half = p.up.dim(0)? / 2;
                    Tensor::cat(&[p.up.narrow(0, half, half)?, p.up.narrow(0, 0, half)?], 0)?
                } else {
                    p.up.clone()
                };
                let rank = p.down.dim(0)?;
                let up = (up.narrow(0, start - t.rows.start, end - start)? * (strength * p.scale))?;
                let zeros = |n: usize| Tensor::zeros((n, rank), DType::F32, &Device::Cpu);
                let up = Tensor::cat(&[zeros(start - rows.start)?, up, zeros(rows.end - end)?], 0)?;
                downs.push(p.down.clone());
                ups.push(up);
            }
        }
        if downs.is_empty() {
            return Ok(None);
        }
        let a = Tensor::cat(&downs, 0)?.to_dtype(dtype)?.to_device(device)?;
        let b = Tensor::cat(&ups, 1)?.to_dtype(dtype)?.to_device(device)?;
        Ok(Some(LowRank { a, b }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> FluxConfig {
        FluxConfig::tiny()
    }

    fn pair(rank: usize, rows: usize, cols: usize, k: f32) -> (Tensor, Tensor) {
        let f =
            |n: usize, s: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * s + k).sin()).collect() };
        let d = Tensor::from_vec(f(rank * cols, 0.31), (rank, cols), &Device::Cpu).unwrap();
        let u = Tensor::from_vec(f(rows * rank, 0.17), (rows, rank), &Device::Cpu).unwrap();
        (d, u)
    }

    #[test]
    fn a_fused_bfl_part_equals_its_diffusers_split() -> Result<()> {
        let c = cfg();
        let h = c.hidden_size;
        let (d, u) = pair(4, 3 * h, h, 0.3);
        let bfl = LoraFile::from_named(
            "bfl",
            &[
                (
                    "diffusion_model.double_blocks.1.img_attn.qkv.lora_A.weight".into(),
                    d.clone(),
                ),
                (
                    "diffusion_model.double_blocks.1.img_attn.qkv.lora_B.weight".into(),
                    u.clone(),
                ),
            ],
            &c,
        )?;
        let mut split = Vec::new();
        for (i, n) in ["to_q", "to_k", "to_v"].iter().enumerate() {
            let b = format!("transformer_blocks.1.attn.{n}");
            split.push((format!("{b}.lora_A.weight"), d.clone()));
            split.push((format!("{b}.lora_B.weight"), u.narrow(0, i * h, h)?));
        }
        let diff = LoraFile::from_named("diffusers", &split, &c)?;
        let w = |f: LoraFile| -> Result<Tensor> {
            let s = LoraSet::new(vec![(Arc::new(f), 1.0)]);
            let l = s.low_rank(
                "double_blocks.1.img_attn.qkv",
                0..3 * h,
                DType::F32,
                &Device::Cpu,
            )?;
            Ok(l.expect("aimed there").weight()?)
        };
        let (a, b) = (w(bfl)?, w(diff)?);
        let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "{d}");
        Ok(())
    }

    #[test]
    fn a_choice_reads_file_and_strength() {
        let c: LoraChoice = "styles/ink.safetensors:-0.5".parse().expect("choice");
        assert_eq!(
            (c.path.to_str(), c.strength),
            (Some("styles/ink.safetensors"), -0.5)
        );
        let c: LoraChoice = "ink.safetensors".parse().expect("choice");
        assert_eq!(c.strength, 1.0);
        let c: LoraChoice = r"C:\loras\ink.safetensors".parse().expect("choice");
        assert_eq!(
            (c.path.to_str(), c.strength),
            (Some(r"C:\loras\ink.safetensors"), 1.0)
        );
        assert_eq!(c.to_string().parse::<LoraChoice>(), Ok(c));
        assert!(":0.5".parse::<LoraChoice>().is_err());
    }

    #[test]
    fn unknown_names_are_listed() {
        let c = cfg();
        let (d, u) = pair(2, c.hidden_size, c.hidden_size, 0.1);
        let e = LoraFile::from_named(
            "x.safetensors",
            &[
                (
                    "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight".into(),
                    d.clone(),
                ),
                (
                    "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight".into(),
                    d.clone(),
                ),
                (
                    "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight".into(),
                    u.clone(),
                ),
                (
                    "lora_unet_double_blocks_7_img_attn_proj.lora_up.weight".into(),
                    u,
                ),
                (
                    "lora_unet_double_blocks_0_img_attn_proj.dora_scale".into(),
                    d,
                ),
            ],
            &c,
        )
        .expect_err("unknown names");
        let m = e.to_string();
        for n in [
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
            "lora_unet_double_blocks_7_img_attn_proj.lora_up.weight",
            "lora_unet_double_blocks_0_img_attn_proj.dora_scale",
        ] {
            assert!(m.contains(n), "{m}");
        }
        assert!(m.contains("3 tensor(s)"), "{m}");
    }

    #[test]
    fn alpha_scales_and_the_single_linear1_splits_by_rows() -> Result<()> {
        let c = cfg();
        let h = c.hidden_size;
        let out = 3 * h + c.mlp_hidden();
        let (d, u) = pair(4, out, h, 0.7);
        let alpha = Tensor::new(2f32, &Device::Cpu)?;
        let f = LoraFile::from_named(
            "kohya",
            &[
                (
                    "lora_unet_single_blocks_2_linear1.lora_down.weight".into(),
                    d.clone(),
                ),
                (
                    "lora_unet_single_blocks_2_linear1.lora_up.weight".into(),
                    u.clone(),
                ),
                ("lora_unet_single_blocks_2_linear1.alpha".into(), alpha),
            ],
            &c,
        )?;
        let s = LoraSet::new(vec![(Arc::new(f), -1.5)]);
        let mlp = s
            .low_rank(
                "single_blocks.2.linear1",
                3 * h..out,
                DType::F32,
                &Device::Cpu,
            )?
            .expect("mlp rows");
        let want = (u.narrow(0, 3 * h, out - 3 * h)?.matmul(&d)? * (-1.5 * 2.0 / 4.0))?;
        let diff = (mlp.weight()? - want)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        assert!(s
            .low_rank("single_blocks.1.linear1", 0..out, DType::F32, &Device::Cpu)?
            .is_none());
        Ok(())
    }
}
