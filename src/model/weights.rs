//! Weight files: memory-mapped safetensors (one file, or shards with their `*.index.json`),
//! validated on open, and a `VarBuilder` backend that maps the model's canonical tensor names
//! (Black Forest Labs' names for FLUX and its autoencoder) onto the names a file really uses.
//!
//! A [`KeyMap`] says where a canonical tensor lives in a file: under another name, as the
//! concatenation of several tensors (diffusers stores `to_q`/`to_k`/`to_v` where BFL stores one
//! `qkv`), or with its two halves swapped (diffusers' `norm_out` puts scale before shift). The
//! same map run backwards ([`export`]) writes a model in that layout, which is how the tests make
//! small checkpoints with the real key names.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::kernels::fp8::Fp8;

/// The names of an FP8 weight `X.weight`'s scale, `X.{name}`: ComfyUI's and the newer one.
const FP8_WEIGHT_SCALES: [&str; 2] = ["scale_weight", "weight_scale"];
/// The names of the static scale of an FP8 product's input, `X.{name}`, which a run quantising
/// each token's input itself does not use.
const FP8_INPUT_SCALES: [&str; 2] = ["scale_input", "input_scale"];

/// Where one tensor's bytes are.
#[derive(Debug, Clone)]
pub struct TensorMeta {
    /// The stored dtype (`U8` for a GGUF tensor in a quantised GGML type).
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    /// A GGUF file's tensor: how it is stored ([`crate::model::gguf`]).
    pub gguf: Option<Box<crate::model::gguf::GgufTensor>>,
    file: usize,
    start: usize,
    end: usize,
}

struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
    data_start: usize,
}

/// A set of safetensors files read as one (the shards of one model part).
pub struct SafetensorsSet {
    files: Vec<MappedFile>,
    tensors: BTreeMap<String, TensorMeta>,
    label: String,
}

impl std::fmt::Debug for SafetensorsSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsSet")
            .field("label", &self.label)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

impl SafetensorsSet {
    /// Open `path`: a `.safetensors` file, a `*.safetensors.index.json`, or a folder holding
    /// either (an index is preferred; otherwise every `*.safetensors` file in the folder).
    pub fn open(path: &Path) -> Result<Self> {
        crate::model::load_clock::time(crate::model::load_clock::LoadPhase::OpenIndex, || {
            Self::open_untimed(path)
        })
    }

    fn open_untimed(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let mut index = None;
            let mut files = Vec::new();
            let rd = std::fs::read_dir(path).map_err(|e| Error::io(path, e))?;
            for entry in rd {
                let entry = entry.map_err(|e| Error::io(path, e))?;
                let p = entry.path();
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if name.ends_with(".safetensors.index.json") {
                    index = Some(p.clone());
                } else if name.ends_with(".safetensors") {
                    files.push(p.clone());
                }
            }
            if let Some(index) = index {
                return Self::open_index(&index);
            }
            files.sort();
            if files.is_empty() {
                return Err(Error::UnknownLayout {
                    path: path.to_path_buf(),
                    reason: "folder holds no .safetensors file".into(),
                });
            }
            return Self::open_files(&files, path.display().to_string());
        }
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".json") {
            return Self::open_index(path);
        }
        Self::open_files(&[path.to_path_buf()], path.display().to_string())
    }

    /// Open the shards listed by a `*.safetensors.index.json` and check that each tensor the
    /// index names is really in its shard.
    pub fn open_index(index_path: &Path) -> Result<Self> {
        let text = crate::files::read_regular_text(index_path)?;
        let index: ShardIndex = serde_json::from_str(&text).map_err(|e| Error::BadConfig {
            path: index_path.to_path_buf(),
            reason: format!("not a safetensors shard index: {e}"),
        })?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut shard_names: Vec<&String> = index.weight_map.values().collect();
        shard_names.sort();
        shard_names.dedup();
        let paths: Vec<PathBuf> = shard_names.iter().map(|n| dir.join(n)).collect();
        let set = Self::open_files(&paths, index_path.display().to_string())?;
        for (tensor, shard) in &index.weight_map {
            let in_shard = set
                .tensors
                .get(tensor)
                .map(|m| set.files[m.file].path.ends_with(shard))
                .unwrap_or(false);
            if !in_shard {
                return Err(Error::MissingTensor {
                    tensor: tensor.clone(),
                    location: format!(
                        "{} (the index {} says it is there)",
                        dir.join(shard).display(),
                        index_path.display()
                    ),
                });
            }
        }
        Ok(set)
    }

    /// Open and validate several files as one set.
    pub fn open_files(paths: &[PathBuf], label: String) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = BTreeMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = crate::files::open_regular(path)?;
            // SAFETY: the file is opened read-only; Parallax never writes to weight files while
            // they are mapped. Another process truncating it underneath would be undefined
            // behaviour, as with every memory-mapped loader (candle's, safetensors' own).
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            if crate::model::gguf::is_gguf(&mmap) {
                for t in crate::model::gguf::index(&mmap, path)? {
                    let dtype = match t.ggml {
                        GgmlDType::F32 => safetensors::Dtype::F32,
                        GgmlDType::F16 => safetensors::Dtype::F16,
                        GgmlDType::BF16 => safetensors::Dtype::BF16,
                        _ => safetensors::Dtype::U8,
                    };
                    tensors.insert(
                        t.name.clone(),
                        TensorMeta {
                            dtype,
                            shape: t.shape.clone(),
                            file: i,
                            start: t.start,
                            end: t.end,
                            gguf: Some(Box::new(t)),
                        },
                    );
                }
                files.push(MappedFile {
                    path: path.clone(),
                    mmap,
                    data_start: 0,
                });
                continue;
            }
            let (header_len, meta) =
                safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
                    Error::CorruptSafetensors {
                        path: path.clone(),
                        reason: describe_st_error(&e, mmap.len()),
                    }
                })?;
            let data_start = 8 + header_len;
            for (name, info) in meta.tensors() {
                let (start, end) = info.data_offsets;
                tensors.insert(
                    name,
                    TensorMeta {
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        file: i,
                        start: data_start + start,
                        end: data_start + end,
                        gguf: None,
                    },
                );
            }
            files.push(MappedFile {
                path: path.clone(),
                mmap,
                data_start,
            });
        }
        Ok(Self {
            files,
            tensors,
            label,
        })
    }

    /// What the set is called in messages (its file, index or folder).
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn meta(&self, name: &str) -> Option<&TensorMeta> {
        self.tensors.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The paths of the files in this set.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|f| f.path.as_path())
    }

    /// The dtype most tensors are stored in (for `info`).
    pub fn storage_dtype(&self) -> Option<safetensors::Dtype> {
        let mut counts: HashMap<String, (usize, safetensors::Dtype)> = HashMap::new();
        for m in self.tensors.values() {
            counts
                .entry(format!("{:?}", m.dtype))
                .or_insert((0, m.dtype))
                .0 += 1;
        }
        counts.into_values().max_by_key(|(n, _)| *n).map(|(_, d)| d)
    }

    fn location_of(&self, name: &str) -> String {
        match self.tensors.get(name) {
            Some(m) => self.files[m.file].path.display().to_string(),
            None => self.label.clone(),
        }
    }

    /// Load one tensor in `dtype` on `device`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let meta = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            tensor: name.to_string(),
            location: self.label.clone(),
        })?;
        if let Some(g) = meta.gguf.as_deref() {
            if meta.dtype == safetensors::Dtype::U8 || g.shape != g.stored_shape {
                let t = crate::model::gguf::dequantise(g, self.bytes(name, meta)?)?;
                return Ok(t.to_dtype(dtype)?.to_device(device)?);
            }
        }
        let fp8 = match meta.dtype {
            safetensors::Dtype::F8_E4M3 => Some(Fp8::E4M3),
            safetensors::Dtype::F8_E5M2 => Some(Fp8::E5M2),
            _ => None,
        };
        if let Some(format) = fp8 {
            return self.load_fp8(name, format, dtype, device);
        }
        use crate::model::load_clock::{time, LoadPhase};
        let read = std::time::Instant::now();
        let src_dtype = match meta.dtype {
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::F32 => DType::F32,
            other => {
                return Err(Error::UnsupportedDtype {
                    tensor: name.to_string(),
                    location: self.location_of(name),
                    dtype: format!("{other:?}"),
                })
            }
        };
        let bytes = self.bytes(name, meta)?;
        crate::model::load_clock::read_bytes(bytes.len());
        let t = Tensor::from_raw_buffer(bytes, src_dtype, &meta.shape, &Device::Cpu)?;
        let t = if src_dtype == dtype {
            t
        } else {
            t.to_dtype(dtype)?
        };
        crate::model::load_clock::add(LoadPhase::Read, read.elapsed());
        Ok(time(LoadPhase::HostToDevice, || t.to_device(device))?)
    }
}

impl SafetensorsSet {
    fn bytes(&self, name: &str, meta: &TensorMeta) -> Result<&[u8]> {
        let file = &self.files[meta.file];
        debug_assert!(meta.start >= file.data_start);
        file.mmap
            .get(meta.start..meta.end)
            .ok_or_else(|| Error::CorruptSafetensors {
                path: file.path.clone(),
                reason: format!("tensor `{name}` points past the end of the file"),
            })
    }

    /// The scale stored beside an FP8 weight `X.weight`, if any: ComfyUI's `X.scale_weight`
    /// (its "scaled fp8" files) or `X.weight_scale` (newer quantised files).
    pub fn fp8_scale_name(&self, name: &str) -> Option<String> {
        let base = name.strip_suffix(".weight")?;
        FP8_WEIGHT_SCALES
            .iter()
            .map(|s| format!("{base}.{s}"))
            .find(|n| self.contains(n))
    }

    /// Refuses an FP8 weight `X.weight` with a scale beside it this loader does not read: any
    /// `X.*scale*` tensor other than its weight's scale ([`FP8_WEIGHT_SCALES`]) and its input's
    /// static scale ([`FP8_INPUT_SCALES`], which a run that quantises each token's input itself
    /// leaves alone) — say a block-wise `weight_scale_inv` or a second-level `weight_scale_2` —
    /// rather than load the weight without it.
    fn check_fp8_companions(&self, name: &str) -> Result<()> {
        let Some(base) = name.strip_suffix(".weight") else {
            return Ok(());
        };
        let prefix = format!("{base}.");
        let unknown = self.names().find(|n| {
            n.strip_prefix(&prefix).is_some_and(|rest| {
                rest.contains("scale")
                    && !FP8_WEIGHT_SCALES.contains(&rest)
                    && !FP8_INPUT_SCALES.contains(&rest)
            })
        });
        match unknown {
            None => Ok(()),
            Some(other) => Err(self.fp8_not_understood(
                name,
                format!("`{other}` scales it in a way Parallax does not read"),
            )),
        }
    }

    /// The error for an FP8 weight whose scales are laid out in a way not read here.
    fn fp8_not_understood(&self, name: &str, what: String) -> Error {
        Error::UnknownLayout {
            path: PathBuf::from(self.location_of(name)),
            reason: format!(
                "the FP8 weight `{name}`: {what}. Parallax reads FP8 weights with no scale, one                  scale per tensor or one per output row (`….scale_weight` or `….weight_scale`);                  use a bf16 or a per-tensor scaled FP8 file of this model"
            ),
        }
    }

    /// An FP8 tensor dequantised: decoded exactly, multiplied by its scale (one number, or one
    /// per output row: a `[rows]` or `[rows, 1]` tensor), then converted to `dtype` on `device`.
    /// Scales laid out otherwise (block-wise, or under names not read here) are refused in words
    /// ([`SafetensorsSet::check_fp8_companions`]).
    fn load_fp8(&self, name: &str, format: Fp8, dtype: DType, device: &Device) -> Result<Tensor> {
        let meta = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            tensor: name.to_string(),
            location: self.label.clone(),
        })?;
        self.check_fp8_companions(name)?;
        use crate::model::load_clock::{time, LoadPhase};
        let read = std::time::Instant::now();
        let bytes = self.bytes(name, meta)?;
        crate::model::load_clock::read_bytes(bytes.len());
        let values = crate::kernels::fp8::decode_all(format, bytes);
        let mut t = Tensor::from_vec(values, meta.shape.as_slice(), &Device::Cpu)?;
        if let Some(scale_name) = self.fp8_scale_name(name) {
            let scale = self.load(&scale_name, DType::F32, &Device::Cpu)?;
            let rows = meta.shape.first().copied().unwrap_or(1);
            let per_row =
                !meta.shape.is_empty() && (scale.dims() == [rows] || scale.dims() == [rows, 1]);
            t = match scale.elem_count() {
                1 => {
                    let s = scale.flatten_all()?.to_vec1::<f32>()?[0];
                    (t * s as f64)?
                }
                _ if per_row => {
                    let mut shape = vec![1usize; meta.shape.len()];
                    shape[0] = rows;
                    t.broadcast_mul(&scale.flatten_all()?.reshape(shape)?)?
                }
                _ => {
                    return Err(self.fp8_not_understood(
                        name,
                        format!(
                            "its scale `{scale_name}` has shape {:?} for a weight of shape {:?}                              (block-wise scales are not read)",
                            scale.dims(),
                            meta.shape
                        ),
                    ))
                }
            };
        }
        let t = t.to_dtype(dtype)?;
        crate::model::load_clock::add(LoadPhase::Read, read.elapsed());
        Ok(time(LoadPhase::HostToDevice, || t.to_device(device))?)
    }

    /// How many tensors a GGUF set holds in each GGML type (`Q8_0: 304, F32: 476`), for
    /// `info`; `None` for safetensors.
    pub fn gguf_summary(&self) -> Option<String> {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for m in self.tensors.values() {
            if let Some(g) = m.gguf.as_deref() {
                *counts
                    .entry(crate::model::gguf::ggml_name(g.ggml))
                    .or_default() += 1;
            }
        }
        if counts.is_empty() {
            return None;
        }
        let mut by_count: Vec<_> = counts.into_iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        Some(
            by_count
                .iter()
                .map(|(k, n)| format!("{n} in {k}"))
                .collect::<Vec<_>>()
                .join(", "),
        )
    }

    /// What FP8 the set holds, for `info`: (E4M3 tensors, E5M2 tensors, scale tensors, whether
    /// ComfyUI's `scaled_fp8` marker is present).
    pub fn fp8_summary(&self) -> (usize, usize, usize, bool) {
        let count = |d: safetensors::Dtype| self.tensors.values().filter(|m| m.dtype == d).count();
        let scales = self
            .names()
            .filter(|n| n.ends_with(".scale_weight") || n.ends_with(".weight_scale"))
            .count();
        let marker = self
            .names()
            .any(|n| n == "scaled_fp8" || n.ends_with(".scaled_fp8"));
        (
            count(safetensors::Dtype::F8_E4M3),
            count(safetensors::Dtype::F8_E5M2),
            scales,
            marker,
        )
    }
}

fn describe_st_error(e: &safetensors::SafeTensorError, len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => format!("file is {len} bytes, too short to hold a header"),
        E::InvalidHeaderLength => {
            "header length runs past the end of the file (truncated download?)".into()
        }
        E::MetadataIncompleteBuffer => {
            "tensor data does not match the file size (truncated or padded file)".into()
        }
        other => other.to_string(),
    }
}

/// Where a canonical tensor is found in a file.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// Stored under this name.
    Tensor(String),
    /// The concatenation along `dim` of these tensors, each `size` long on that axis.
    Concat {
        parts: Vec<(String, usize)>,
        dim: usize,
    },
    /// Stored under `name` with the two halves along `dim` swapped.
    SwapHalves { name: String, dim: usize },
    /// Stored under `name` with its trailing size-1 axes dropped (a 1x1 convolution kernel
    /// stored as a linear layer's matrix).
    Squeezed(String),
}

/// Maps canonical tensor names onto a layout's names.
pub trait KeyMap: Send + Sync {
    /// Where `canonical` lives, or `None` when the layout has no such tensor.
    fn source(&self, canonical: &str) -> Option<Source>;
    /// A short name of the layout for messages.
    fn layout_name(&self) -> &str;
}

/// The canonical layout itself, optionally below a prefix (e.g. `model.diffusion_model.`).
pub struct Identity {
    pub prefix: String,
}

impl KeyMap for Identity {
    fn source(&self, canonical: &str) -> Option<Source> {
        Some(Source::Tensor(format!("{}{canonical}", self.prefix)))
    }
    fn layout_name(&self) -> &str {
        "canonical"
    }
}

/// A `VarBuilder` backend over a [`SafetensorsSet`] through a [`KeyMap`], checking shapes.
pub struct MappedWeights {
    set: Arc<SafetensorsSet>,
    map: Arc<dyn KeyMap>,
}

impl MappedWeights {
    pub fn new(set: Arc<SafetensorsSet>, map: Arc<dyn KeyMap>) -> Self {
        Self { set, map }
    }

    /// A `VarBuilder` that loads through this map, converting to `dtype` on `device`.
    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn describe(&self, canonical: &str, stored: &str) -> String {
        if canonical == stored {
            format!("`{stored}`")
        } else {
            format!("`{stored}` (canonical `{canonical}`)")
        }
    }

    fn fetch(&self, canonical: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let source = self
            .map
            .source(canonical)
            .ok_or_else(|| Error::MissingTensor {
                tensor: canonical.to_string(),
                location: format!(
                    "{} ({} layout has no such tensor)",
                    self.set.label(),
                    self.map.layout_name()
                ),
            })?;
        match source {
            Source::Tensor(name) | Source::Squeezed(name) => {
                self.load_named(canonical, &name, dtype, dev)
            }
            Source::SwapHalves { name, dim } => {
                let t = self.load_named(canonical, &name, dtype, dev)?;
                let n = t.dim(dim)?;
                if n % 2 != 0 {
                    return Err(Error::ShapeMismatch {
                        tensor: self.describe(canonical, &name),
                        location: self.set.location_of(&name),
                        expected: vec![n + 1],
                        found: t.dims().to_vec(),
                    });
                }
                let a = t.narrow(dim, 0, n / 2)?;
                let b = t.narrow(dim, n / 2, n / 2)?;
                Ok(Tensor::cat(&[b, a], dim)?)
            }
            Source::Concat { parts, dim } => {
                let mut ts = Vec::with_capacity(parts.len());
                for (name, size) in &parts {
                    let t = self.load_named(canonical, name, dtype, dev)?;
                    if t.rank() <= dim || t.dim(dim)? != *size {
                        let mut expected = t.dims().to_vec();
                        if expected.len() > dim {
                            expected[dim] = *size;
                        }
                        return Err(Error::ShapeMismatch {
                            tensor: self.describe(canonical, name),
                            location: self.set.location_of(name),
                            expected,
                            found: t.dims().to_vec(),
                        });
                    }
                    ts.push(t);
                }
                Ok(Tensor::cat(&ts, dim)?)
            }
        }
    }

    fn load_named(
        &self,
        canonical: &str,
        name: &str,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        if !self.set.contains(name) {
            return Err(Error::MissingTensor {
                tensor: self.describe(canonical, name),
                location: self.set.label().to_string(),
            });
        }
        self.set.load(name, dtype, dev)
    }
}

impl SimpleBackend for MappedWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut t = self.fetch(name, dtype, dev).map_err(Error::into_candle)?;
        let source = self.map.source(name);
        if let Some(Source::Squeezed(_)) = &source {
            if t.elem_count() == s.elem_count() && squeeze_trailing(s.dims()) == t.dims() {
                t = t.reshape(s.clone())?;
            }
        }
        if t.dims() != s.dims() {
            let stored = match source {
                Some(Source::Tensor(n))
                | Some(Source::Squeezed(n))
                | Some(Source::SwapHalves { name: n, .. }) => n,
                _ => name.to_string(),
            };
            return Err(Error::ShapeMismatch {
                tensor: self.describe(name, &stored),
                location: self.set.location_of(&stored),
                expected: s.dims().to_vec(),
                found: t.dims().to_vec(),
            }
            .into_candle());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, dtype, dev).map_err(Error::into_candle)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        match self.map.source(name) {
            Some(Source::Tensor(n))
            | Some(Source::Squeezed(n))
            | Some(Source::SwapHalves { name: n, .. }) => self.set.contains(&n),
            Some(Source::Concat { parts, .. }) => parts.iter().all(|(n, _)| self.set.contains(n)),
            None => false,
        }
    }
}

/// The tensors a [`Recorder`] saw, in the order they were asked for.
pub type Recorded = Arc<Mutex<Vec<(String, Tensor)>>>;

/// Wraps a backend and records every tensor a model asked for, in order, so that a model built
/// once (e.g. the demo model) can be written out as a checkpoint.
pub struct Recorder {
    inner: Box<dyn SimpleBackend>,
    seen: Recorded,
}

impl Recorder {
    pub fn new(inner: impl SimpleBackend + 'static) -> (Self, Recorded) {
        Self::boxed(Box::new(inner))
    }

    /// A recorder in front of a backend that is already boxed.
    pub fn boxed(inner: Box<dyn SimpleBackend>) -> (Self, Recorded) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        (
            Self {
                inner,
                seen: seen.clone(),
            },
            seen,
        )
    }
}

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.inner.get(s, name, h, dtype, dev)?;
        if let Ok(mut seen) = self.seen.lock() {
            seen.push((name.to_string(), t.clone()));
        }
        Ok(t)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.inner.get_unchecked(name, dtype, dev)?;
        if let Ok(mut seen) = self.seen.lock() {
            seen.push((name.to_string(), t.clone()));
        }
        Ok(t)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// Run a [`KeyMap`] backwards: turn canonical tensors into the tensors a file of that layout
/// holds (splitting concatenations, swapping halves back).
pub fn export(map: &dyn KeyMap, canonical: &[(String, Tensor)]) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::new();
    for (name, t) in canonical {
        match map.source(name) {
            None => {
                return Err(Error::MissingTensor {
                    tensor: name.clone(),
                    location: format!("the {} layout", map.layout_name()),
                })
            }
            Some(Source::Tensor(n)) => out.push((n, t.clone())),
            Some(Source::Squeezed(n)) => {
                let dims = squeeze_trailing(t.dims());
                out.push((n, t.reshape(dims)?));
            }
            Some(Source::SwapHalves { name: n, dim }) => {
                let len = t.dim(dim)?;
                let a = t.narrow(dim, 0, len / 2)?;
                let b = t.narrow(dim, len / 2, len / 2)?;
                out.push((n, Tensor::cat(&[b, a], dim)?));
            }
            Some(Source::Concat { parts, dim }) => {
                let mut offset = 0;
                for (n, size) in parts {
                    out.push((n, t.narrow(dim, offset, size)?.contiguous()?));
                    offset += size;
                }
            }
        }
    }
    Ok(out)
}

/// `dims` without its trailing size-1 axes (keeping at least two).
fn squeeze_trailing(dims: &[usize]) -> Vec<usize> {
    let mut d = dims.to_vec();
    while d.len() > 2 && d.last() == Some(&1) {
        d.pop();
    }
    d
}

/// Write tensors as one safetensors file, atomically (a temporary file renamed into place).
pub fn save_safetensors(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    let tmp = path.with_extension("safetensors.partial");
    candle_core::safetensors::save(&map, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    Ok(())
}
