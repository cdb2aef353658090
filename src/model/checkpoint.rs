//! Random FLUX.1 transformer checkpoints of real size on disk, in Black Forest Labs' single-file
//! layout (`flux1-dev.safetensors`: the bare canonical names `double_blocks.0.img_attn.qkv.weight`,
//! …), for timing a cold start without downloading weights (issue 30).
//!
//! The file is written tensor by tensor: the names and shapes come from building the transformer
//! over a backend that hands out zero-sized broadcast views (nothing is allocated), the header is
//! written first, then each tensor's values are drawn, converted and written before the next is
//! made, so no more than one tensor is held at a time (the largest of FLUX.1-dev, a single
//! block's `linear1`, is 132 MB in bf16). Values follow [`crate::model::demo_weights::init_for`]'s
//! scales, drawn uniform with the same standard deviation (cheap; a timing needs sizes, not
//! images). In FP8 every matrix is stored in E4M3 with one f32 scale beside it
//! (`….scale_weight`, as the scaled FP8 files people use carry, which the loader applies); the
//! rest stays bf16.

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::demo_weights::{init_for, InitKind};
use super::flux::{Flux, FluxConfig};
use super::rng::stream;
use crate::error::{CandleResultExt, Error, Result};
use crate::kernels::fp8::Fp8;

/// How the matrices are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointDtype {
    Bf16,
    /// Matrices in E4M3 with a per-tensor f32 scale; vectors in bf16.
    Fp8,
}

/// A backend that answers every request with a broadcast view of one zero (no memory).
struct ShapesOnly;

impl SimpleBackend for ShapesOnly {
    fn get(
        &self,
        s: Shape,
        _name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("a checkpoint's tensors need shapes (`{name}`)")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

/// The canonical tensors (BFL's names) of FLUX.1's transformer for `cfg`, with their shapes, in
/// the order the model reads them.
pub fn tensor_shapes(cfg: &FluxConfig) -> Result<Vec<(String, Vec<usize>)>> {
    let (rec, seen) = super::weights::Recorder::new(ShapesOnly);
    let vb = VarBuilder::from_backend(Box::new(rec), DType::BF16, Device::Cpu);
    Flux::new(cfg, vb).px()?;
    let seen = seen
        .lock()
        .map_err(|_| Error::Image("tensor recorder poisoned".into()))?;
    let mut names = std::collections::HashSet::new();
    Ok(seen
        .iter()
        .filter(|(n, _)| names.insert(n.clone()))
        .map(|(n, t)| (n.clone(), t.dims().to_vec()))
        .collect())
}

/// One tensor of the file: its name, stored dtype and shape, and how its values are made.
struct Entry {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    values: Values,
}

enum Values {
    /// Drawn for the canonical tensor `name` (bf16, or E4M3 divided by `scale`).
    Drawn {
        name: String,
        fp8_scale: Option<f32>,
    },
    /// One f32 number (a matrix's FP8 scale).
    Scalar(f32),
}

impl Entry {
    fn bytes(&self) -> usize {
        let n: usize = self.shape.iter().product();
        match self.dtype {
            "F8_E4M3" => n,
            "F32" => 4 * n,
            _ => 2 * n,
        }
    }
}

/// The file's tensors for `cfg` in `dtype`.
fn entries(cfg: &FluxConfig, dtype: CheckpointDtype) -> Result<Vec<Entry>> {
    let mut out = Vec::new();
    for (name, shape) in tensor_shapes(cfg)? {
        let matrix = shape.len() == 2 && name.ends_with(".weight");
        let fp8_scale = match (dtype, init_for(&name, &shape)) {
            (CheckpointDtype::Fp8, InitKind::Normal(std)) if matrix => {
                // The largest value drawn, √3·std, maps to E4M3's largest.
                Some(3f32.sqrt() * std / Fp8::E4M3.max())
            }
            _ => None,
        };
        if let Some(scale) = fp8_scale {
            let stem = &name[..name.len() - ".weight".len()];
            out.push(Entry {
                name: format!("{stem}.scale_weight"),
                dtype: "F32",
                shape: vec![],
                values: Values::Scalar(scale),
            });
        }
        out.push(Entry {
            name: name.clone(),
            dtype: if fp8_scale.is_some() {
                "F8_E4M3"
            } else {
                "BF16"
            },
            shape,
            values: Values::Drawn { name, fp8_scale },
        });
    }
    Ok(out)
}

/// The safetensors header for `entries` (data offsets in order), padded with spaces to a multiple
/// of 8 bytes as the format recommends.
fn header(entries: &[Entry], variant: &str) -> Result<Vec<u8>> {
    let mut map = serde_json::Map::new();
    map.insert(
        "__metadata__".into(),
        serde_json::json!({ "format": "pt", "parallax": format!("random FLUX.1-{variant} checkpoint (not FLUX)") }),
    );
    let mut at = 0usize;
    for e in entries {
        let end = at + e.bytes();
        map.insert(
            e.name.clone(),
            serde_json::json!({ "dtype": e.dtype, "shape": e.shape, "data_offsets": [at, end] }),
        );
        at = end;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(map))
        .map_err(|e| Error::Image(format!("checkpoint header: {e}")))?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    Ok(h)
}

/// The stored bytes of the canonical tensor `name` with `n` values: uniform with the standard
/// deviation of `kind` (or all its constant), drawn from the stream of `name`, as bf16 or, with
/// `fp8_scale`, as E4M3 of the values over the scale. Made in parallel chunks, each from its own
/// stream (the bytes do not depend on the thread count).
fn tensor_bytes(
    seed: u64,
    name: &str,
    kind: InitKind,
    n: usize,
    fp8_scale: Option<f32>,
) -> Vec<u8> {
    const CHUNK: usize = 1 << 20;
    let width = if fp8_scale.is_some() { 1 } else { 2 };
    let mut out = vec![0u8; n * width];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let per = n.div_ceil(CHUNK).div_ceil(threads).max(1) * CHUNK;
    std::thread::scope(|s| {
        for (t, part) in out.chunks_mut(per * width).enumerate() {
            s.spawn(move || {
                for (c, chunk) in part.chunks_mut(CHUNK * width).enumerate() {
                    let mut g = stream(seed ^ ((t * per / CHUNK + c) as u64), name);
                    let mut value = || match kind {
                        InitKind::Const(v) => v,
                        // 24 random bits to [-1, 1), times √3·std (a uniform of that std).
                        InitKind::Normal(std) => {
                            ((g.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
                                * 3f32.sqrt()
                                * std
                        }
                    };
                    match fp8_scale {
                        Some(sc) => chunk
                            .iter_mut()
                            .for_each(|b| *b = Fp8::E4M3.encode(value() / sc)),
                        None => chunk.chunks_mut(2).for_each(|b| {
                            b.copy_from_slice(&half::bf16::from_f32(value()).to_le_bytes())
                        }),
                    }
                }
            });
        }
    });
    out
}

/// Write FLUX.1's transformer for `cfg` with random weights (from `seed`) to `path` in BFL's
/// single-file layout, tensor by tensor; `progress` hears each tensor's name and the bytes
/// written so far. Returns the file's size.
pub fn write_random(
    cfg: &FluxConfig,
    variant: &str,
    dtype: CheckpointDtype,
    seed: u64,
    path: &Path,
    progress: &mut dyn FnMut(&str, u64),
) -> Result<u64> {
    let entries = entries(cfg, dtype)?;
    let head = header(&entries, variant)?;
    let tmp = path.with_extension("safetensors.partial");
    let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
    let io = |e| Error::io(&tmp, e);
    w.write_all(&(head.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&head).map_err(io)?;
    let mut written = 8 + head.len() as u64;
    for e in &entries {
        let bytes = match &e.values {
            Values::Scalar(v) => v.to_le_bytes().to_vec(),
            Values::Drawn { name, fp8_scale } => {
                let n = e.shape.iter().product();
                tensor_bytes(seed, name, init_for(name, &e.shape), n, *fp8_scale)
            }
        };
        w.write_all(&bytes).map_err(io)?;
        written += bytes.len() as u64;
        progress(&e.name, written);
    }
    let file = w
        .into_inner()
        .map_err(|e| Error::io(&tmp, e.into_error()))?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::SafetensorsSet;

    /// Both dtypes write a valid file holding every tensor the transformer reads, with the
    /// declared shapes; the FP8 file's matrices are E4M3 with a scale each and load dequantised
    /// to the values the bf16 file holds, within E4M3's rounding.
    #[test]
    fn random_checkpoints_hold_every_tensor_and_load() -> Result<()> {
        let cfg = FluxConfig::tiny();
        let dir = tempfile::tempdir().map_err(|e| Error::io(Path::new("tmp"), e))?;
        let shapes = tensor_shapes(&cfg)?;
        assert!(shapes
            .iter()
            .any(|(n, s)| n == "double_blocks.0.img_attn.qkv.weight"
                && s == &[3 * cfg.hidden_size, cfg.hidden_size]));
        let mut sets = Vec::new();
        for dtype in [CheckpointDtype::Bf16, CheckpointDtype::Fp8] {
            let path = dir.path().join(format!("{dtype:?}.safetensors"));
            let mut last = 0;
            let size = write_random(&cfg, "tiny", dtype, 7, &path, &mut |_, b| last = b)?;
            assert_eq!(size, last);
            assert_eq!(
                std::fs::metadata(&path)
                    .map_err(|e| Error::io(&path, e))?
                    .len(),
                size
            );
            let set = SafetensorsSet::open(&path)?;
            for (name, shape) in &shapes {
                let t = set.load(name, DType::F32, &Device::Cpu)?;
                assert_eq!(t.dims(), shape.as_slice(), "{name}");
            }
            sets.push(set);
        }
        let (e4m3, _, scales, _) = sets[1].fp8_summary();
        assert!(
            e4m3 > 20 && e4m3 == scales,
            "{e4m3} matrices, {scales} scales"
        );
        let name = "single_blocks.1.linear1.weight";
        let a = sets[0].load(name, DType::F32, &Device::Cpu)?;
        let b = sets[1].load(name, DType::F32, &Device::Cpu)?;
        let d = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let m = a.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d <= m / 16.0 + 1e-6 && m > 0.0, "{d} vs {m}");
        // A transformer loads from the file and runs.
        for file in ["Bf16.safetensors", "Fp8.safetensors"] {
            let set = SafetensorsSet::open(&dir.path().join(file))?;
            let layout = crate::model::layout::detect_transformer_layout(&set);
            let Some(layout) = layout else {
                panic!("{file}: no FLUX layout detected")
            };
            assert_eq!(crate::model::layout::infer_flux_config(&set, &layout)?, cfg);
            let map = crate::model::layout::transformer_key_map(&layout, &cfg);
            let vb = crate::model::weights::MappedWeights::new(set.into(), map.into())
                .var_builder(DType::F32, &Device::Cpu);
            Flux::new(&cfg, vb).px()?;
        }
        Ok(())
    }
}
