//! GGUF files: the quantised single files the community shares for FLUX (ComfyUI-GGUF's layout:
//! Black Forest Labs' tensor names, weights in GGML's Q8_0 / Q5_K / Q5_0 / Q4_K / Q4_0 / F16 /
//! BF16 and small tensors in F32).
//!
//! Reading: [`index`] lists a file's tensors with their logical shapes and byte ranges, so a
//! GGUF file opens as a [`crate::model::weights::SafetensorsSet`] and every loader, layout
//! detector and key map works on it unchanged; [`dequantise`] turns one stored tensor back into
//! floats when it is loaded (the run then holds it in bf16, or quantises it to FP8 as it would a
//! bf16 file). Writing: [`write`] stores a model's tensors at a chosen [`GgufType`] with the same
//! per-tensor rule the community's converter follows (small and one-dimensional tensors stay
//! F32; rows that do not fill a block take a type that fits), which is how the tests and
//! `parallax dev export-gguf` make files with the real layout.

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// The first four bytes of every GGUF file.
pub const MAGIC: &[u8; 4] = b"GGUF";

/// Tensors with fewer elements than this are stored in F32 whatever the chosen type (biases,
/// norms' scales, small embeddings), as the community's converter does.
pub const SMALL_TENSOR: usize = 1024;

/// Metadata key ComfyUI-GGUF writes when it stored a tensor under another shape.
const ORIG_SHAPE_PREFIX: &str = "comfy.gguf.orig_shape.";

/// Whether `head` (a file's first bytes) starts a GGUF file.
pub fn is_gguf(head: &[u8]) -> bool {
    head.starts_with(MAGIC)
}

/// One tensor of a GGUF file.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    pub name: String,
    pub ggml: GgmlDType,
    /// The shape as stored (row-major, outermost first).
    pub stored_shape: Vec<usize>,
    /// The shape the model uses (differs from `stored_shape` only where the file says so).
    pub shape: Vec<usize>,
    /// Byte range of its data in the file.
    pub start: usize,
    pub end: usize,
}

/// The types a GGUF file can be written in, by the names people use for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q6K,
    Q5K,
    Q5_0,
    Q4K,
    Q4_0,
}

impl GgufType {
    pub const ALL: [GgufType; 9] = [
        GgufType::F32,
        GgufType::F16,
        GgufType::BF16,
        GgufType::Q8_0,
        GgufType::Q6K,
        GgufType::Q5K,
        GgufType::Q5_0,
        GgufType::Q4K,
        GgufType::Q4_0,
    ];

    pub fn name(self) -> &'static str {
        match self {
            GgufType::F32 => "F32",
            GgufType::F16 => "F16",
            GgufType::BF16 => "BF16",
            GgufType::Q8_0 => "Q8_0",
            GgufType::Q6K => "Q6_K",
            GgufType::Q5K => "Q5_K",
            GgufType::Q5_0 => "Q5_0",
            GgufType::Q4K => "Q4_K",
            GgufType::Q4_0 => "Q4_0",
        }
    }

    /// Parse `q8_0`, `Q5_K`, `q4k`, `bf16`, … (case and the underscore before K ignored).
    pub fn parse(s: &str) -> Option<Self> {
        let key = s.to_ascii_uppercase().replace("_K", "K");
        Self::ALL
            .into_iter()
            .find(|t| t.name().replace("_K", "K") == key)
    }

    fn ggml(self) -> GgmlDType {
        match self {
            GgufType::F32 => GgmlDType::F32,
            GgufType::F16 => GgmlDType::F16,
            GgufType::BF16 => GgmlDType::BF16,
            GgufType::Q8_0 => GgmlDType::Q8_0,
            GgufType::Q6K => GgmlDType::Q6K,
            GgufType::Q5K => GgmlDType::Q5K,
            GgufType::Q5_0 => GgmlDType::Q5_0,
            GgufType::Q4K => GgmlDType::Q4K,
            GgufType::Q4_0 => GgmlDType::Q4_0,
        }
    }

    /// The type a tensor of `shape` named `name` is stored in when the file's type is `self`.
    /// Quantised types need rows (the last dimension) that fill whole blocks: a K-quant whose
    /// rows are not a multiple of 256 takes the legacy type of about the same size (as llama.cpp
    /// does), and one that fits no block is stored in F16.
    pub fn for_tensor(self, name: &str, shape: &[usize]) -> GgmlDType {
        let elems: usize = shape.iter().product();
        if shape.len() < 2 || elems < SMALL_TENSOR || !name.ends_with(".weight") {
            return GgmlDType::F32;
        }
        let row = shape.last().copied().unwrap_or(0);
        let fits = |d: GgmlDType| row % d.block_size() == 0;
        let want = self.ggml();
        if fits(want) {
            return want;
        }
        let fallback = match want {
            GgmlDType::Q6K => GgmlDType::Q8_0,
            GgmlDType::Q5K => GgmlDType::Q5_1,
            GgmlDType::Q4K => GgmlDType::Q5_0,
            _ => GgmlDType::F16,
        };
        if fits(fallback) {
            fallback
        } else {
            GgmlDType::F16
        }
    }
}

/// Name of a GGML type as people write it (`Q8_0`, `Q5_K`).
pub fn ggml_name(d: GgmlDType) -> String {
    let s = format!("{d:?}");
    match s.strip_suffix('K') {
        Some(base) if s.starts_with('Q') => format!("{base}_K"),
        _ => s,
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> Error {
    Error::CorruptSafetensors {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The tensors of the GGUF file whose bytes are `bytes` (read from `path`, named in errors).
/// Every tensor's byte range is checked to lie inside the file.
pub fn index(bytes: &[u8], path: &Path) -> Result<Vec<GgufTensor>> {
    let content = gguf_file::Content::read(&mut Cursor::new(bytes))
        .map_err(|e| corrupt(path, format!("not a readable GGUF file: {e}")))?;
    let base = content.tensor_data_offset as usize;
    let mut out = Vec::with_capacity(content.tensor_infos.len());
    for (name, info) in &content.tensor_infos {
        let stored_shape = info.shape.dims().to_vec();
        let elems: usize = stored_shape.iter().product();
        let block = info.ggml_dtype.block_size();
        if elems % block != 0 {
            return Err(corrupt(
                path,
                format!(
                    "tensor `{name}` {stored_shape:?} in {} does not fill whole blocks of {block}",
                    ggml_name(info.ggml_dtype)
                ),
            ));
        }
        let size = elems / block * info.ggml_dtype.type_size();
        let start = base
            .checked_add(info.offset as usize)
            .ok_or_else(|| corrupt(path, format!("tensor `{name}` has an offset past any file")))?;
        let end = start
            .checked_add(size)
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| {
                corrupt(
                    path,
                    format!(
                        "tensor `{name}` points past the end of the file ({} bytes; it needs {})",
                        bytes.len(),
                        start.saturating_add(size)
                    ),
                )
            })?;
        let shape = match content.metadata.get(&format!("{ORIG_SHAPE_PREFIX}{name}")) {
            Some(v) => {
                let dims = v
                    .to_vec()
                    .map_err(|e| corrupt(path, format!("`{ORIG_SHAPE_PREFIX}{name}`: {e}")))?
                    .iter()
                    .map(dim_of)
                    .collect::<Option<Vec<usize>>>()
                    .ok_or_else(|| {
                        corrupt(
                            path,
                            format!("`{ORIG_SHAPE_PREFIX}{name}` holds a non-size"),
                        )
                    })?;
                if dims.iter().product::<usize>() != elems {
                    return Err(corrupt(
                        path,
                        format!(
                            "`{name}`: its original shape {dims:?} does not hold {elems} values"
                        ),
                    ));
                }
                dims
            }
            None => stored_shape.clone(),
        };
        out.push(GgufTensor {
            name: name.clone(),
            ggml: info.ggml_dtype,
            stored_shape,
            shape,
            start,
            end,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// A dimension written as any integer type (ComfyUI-GGUF writes them as i32).
fn dim_of(v: &gguf_file::Value) -> Option<usize> {
    use gguf_file::Value as V;
    let n: i128 = match *v {
        V::U8(x) => x.into(),
        V::I8(x) => x.into(),
        V::U16(x) => x.into(),
        V::I16(x) => x.into(),
        V::U32(x) => x.into(),
        V::I32(x) => x.into(),
        V::U64(x) => x.into(),
        V::I64(x) => x.into(),
        _ => return None,
    };
    usize::try_from(n).ok()
}

/// One stored tensor's `data` (its bytes in the file) as f32 values of its logical shape, on
/// the CPU.
pub fn dequantise(t: &GgufTensor, data: &[u8]) -> Result<Tensor> {
    let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
        t.ggml,
        data,
        t.stored_shape.clone(),
        &Device::Cpu,
    )?;
    Ok(q.dequantize(&Device::Cpu)?.reshape(t.shape.as_slice())?)
}

/// What [`write`] stored: each tensor's name and GGML type.
pub type Written = Vec<(String, GgmlDType)>;

/// Write `tensors` (a model's tensors under the names the file should carry) to `path` as GGUF
/// in `kind`; see [`write_with`].
pub fn write(
    path: &Path,
    tensors: &[(String, Tensor)],
    kind: GgufType,
    architecture: &str,
) -> Result<Written> {
    let shapes: Vec<(String, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.dims().to_vec()))
        .collect();
    write_with(path, &shapes, kind, architecture, &mut |i| {
        Ok(tensors[i].1.clone())
    })
}

/// Write the tensors named in `shapes` to `path` as GGUF in `kind`, with `architecture` as
/// `general.architecture` (`flux` for FLUX.1, as the community's files say). `load(i)` gives the
/// `i`th tensor; each is quantised as soon as it is loaded, so only the quantised model is held
/// at once. The file is written beside `path` and renamed into place, so a crash never leaves
/// half a file under the name.
pub fn write_with(
    path: &Path,
    shapes: &[(String, Vec<usize>)],
    kind: GgufType,
    architecture: &str,
    load: &mut dyn FnMut(usize) -> Result<Tensor>,
) -> Result<Written> {
    let mut stored = Vec::with_capacity(shapes.len());
    let mut written = Vec::with_capacity(shapes.len());
    for (i, (name, shape)) in shapes.iter().enumerate() {
        let ggml = kind.for_tensor(name, shape);
        let t = load(i)?.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let q = QTensor::quantize(&t, ggml)?;
        stored.push((name.clone(), q));
        written.push((name.clone(), ggml));
    }
    let arch = gguf_file::Value::String(architecture.to_string());
    let quant_version = gguf_file::Value::U32(2);
    let by = gguf_file::Value::String(format!("parallax {}", env!("CARGO_PKG_VERSION")));
    let metadata = [
        ("general.architecture", &arch),
        ("general.quantization_version", &quant_version),
        ("general.quantized_by", &by),
    ];
    let refs: Vec<(&str, &QTensor)> = stored.iter().map(|(n, q)| (n.as_str(), q)).collect();
    let tmp: PathBuf = {
        let mut s = path.as_os_str().to_owned();
        s.push(".partial");
        s.into()
    };
    let result = (|| -> Result<()> {
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = std::io::BufWriter::new(file);
        gguf_file::write(&mut w, &metadata, &refs)?;
        w.flush().map_err(|e| Error::io(&tmp, e))?;
        w.into_inner()
            .map_err(|e| Error::io(&tmp, e.into_error()))?
            .sync_all()
            .map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::rng::SplitMix64;

    fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
        let norm = |t: &Tensor| {
            t.sqr()
                .and_then(|t| t.sum_all())
                .and_then(|t| t.to_scalar::<f32>())
                .expect("norm") as f64
        };
        (norm(&(a - b).expect("diff")) / norm(b)).sqrt()
    }

    #[test]
    fn type_names_parse_both_spellings() {
        assert_eq!(GgufType::parse("q8_0"), Some(GgufType::Q8_0));
        assert_eq!(GgufType::parse("Q5_K"), Some(GgufType::Q5K));
        assert_eq!(GgufType::parse("q4k"), Some(GgufType::Q4K));
        assert_eq!(GgufType::parse("bf16"), Some(GgufType::BF16));
        assert_eq!(GgufType::parse("q3_k"), None);
        assert_eq!(ggml_name(GgmlDType::Q5K), "Q5_K");
        assert_eq!(ggml_name(GgmlDType::Q8_0), "Q8_0");
    }

    #[test]
    fn each_tensor_gets_a_type_its_rows_fit() {
        let w = "double_blocks.0.img_mlp.0.weight";
        assert_eq!(GgufType::Q4K.for_tensor(w, &[3072, 3072]), GgmlDType::Q4K);
        // 128-wide rows fill no 256-block: the legacy type of about the same size.
        assert_eq!(GgufType::Q4K.for_tensor(w, &[512, 128]), GgmlDType::Q5_0);
        assert_eq!(GgufType::Q8_0.for_tensor(w, &[512, 128]), GgmlDType::Q8_0);
        // Rows of 40 fit no block at all.
        assert_eq!(GgufType::Q8_0.for_tensor(w, &[64, 40]), GgmlDType::F16);
        // Biases, norms and small tensors stay F32.
        assert_eq!(GgufType::Q8_0.for_tensor("x.bias", &[3072]), GgmlDType::F32);
        assert_eq!(
            GgufType::Q8_0.for_tensor("n.scale", &[128, 4]),
            GgmlDType::F32
        );
        assert_eq!(GgufType::Q8_0.for_tensor(w, &[16, 32]), GgmlDType::F32);
    }

    #[test]
    fn written_files_read_back_within_each_types_error() {
        let mut rng = SplitMix64::new(41);
        let dir = tempfile::tempdir().expect("tempdir");
        let dev = Device::Cpu;
        let a = rng.normal_tensor((64, 256), &dev).expect("randn");
        let b = rng.normal_tensor((64,), &dev).expect("randn");
        let tensors = vec![
            ("m.weight".to_string(), a.clone()),
            ("m.bias".to_string(), b.clone()),
        ];
        // Bounds on |x - q(x)| / |x| for Gaussian rows, generous over GGML's own.
        for (kind, bound) in [
            (GgufType::F32, 1e-7),
            (GgufType::F16, 1e-3),
            (GgufType::BF16, 5e-3),
            (GgufType::Q8_0, 1e-2),
            (GgufType::Q6K, 2e-2),
            (GgufType::Q5K, 4e-2),
            (GgufType::Q5_0, 6e-2),
            (GgufType::Q4K, 8e-2),
            (GgufType::Q4_0, 1.2e-1),
        ] {
            let path = dir.path().join(format!("{}.gguf", kind.name()));
            let written = write(&path, &tensors, kind, "flux").expect("write");
            assert_eq!(written[1].1, GgmlDType::F32);
            let bytes = std::fs::read(&path).expect("read");
            assert!(is_gguf(&bytes));
            let idx = index(&bytes, &path).expect("index");
            assert_eq!(idx.len(), 2);
            let w = idx.iter().find(|t| t.name == "m.weight").expect("weight");
            assert_eq!(w.shape, vec![64, 256]);
            assert_eq!(w.ggml, kind.for_tensor("m.weight", &[64, 256]));
            let back = dequantise(w, &bytes[w.start..w.end]).expect("dequantise");
            let err = relative_error(&back, &a);
            assert!(
                err < bound,
                "{}: relative error {err} over {bound}",
                kind.name()
            );
            let bias = idx.iter().find(|t| t.name == "m.bias").expect("bias");
            let bias_back = dequantise(bias, &bytes[bias.start..bias.end]).expect("bias");
            let diff = (bias_back - &b)
                .and_then(|d| d.abs())
                .and_then(|d| d.max_all())
                .and_then(|d| d.to_scalar::<f32>())
                .expect("diff");
            assert_eq!(diff, 0.0, "F32 tensors are stored exactly");
            assert!(!dir
                .path()
                .join(format!("{}.gguf.partial", kind.name()))
                .exists());
        }
    }

    #[test]
    fn a_cut_file_is_refused_by_name() {
        let mut rng = SplitMix64::new(42);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("m.gguf");
        let a = rng.normal_tensor((64, 256), &Device::Cpu).expect("randn");
        write(&path, &[("m.weight".into(), a)], GgufType::Q8_0, "flux").expect("write");
        let bytes = std::fs::read(&path).expect("read");
        let cut = &bytes[..bytes.len() - 100];
        let err = index(cut, &path).expect_err("a cut file");
        assert!(err.to_string().contains("m.weight"), "{err}");
        let err = index(&bytes[..40], &path).expect_err("a header only");
        assert!(err.to_string().contains("GGUF"), "{err}");
    }
}
