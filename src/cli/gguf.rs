//! `parallax dev export-gguf` and `parallax dev gguf-error`: GGUF files made from a FLUX
//! transformer in Black Forest Labs' names (the layout the community's quantised files use), and
//! what each GGUF type costs the demo model: the velocity's relative error at three steps, the
//! images' PSNR and SSIM against the unquantised model, the scorer's prompt accuracy, and the
//! file's size, as JSON.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Args;

use super::{request_for, ModelArgs, SampleArgs};
use crate::model::gguf::{self, GgufType};
use crate::model::layout::{detect_transformer_layout, TransformerLayout};
use crate::model::weights::SafetensorsSet;

#[derive(Debug, Clone, Args)]
pub struct ExportGgufArgs {
    /// A FLUX transformer in Black Forest Labs' names: a single `.safetensors` file (ComfyUI's
    /// `model.diffusion_model.` names too).
    pub from: PathBuf,
    /// The GGML type: q8_0, q6_k, q5_k, q5_0, q4_k, q4_0, bf16, f16 or f32. Biases, norms and
    /// small tensors stay F32; rows that fill no block take a type that fits.
    #[arg(long = "type", default_value = "q8_0")]
    pub kind: String,
    /// The file to write (default: beside the source, `<name>-<TYPE>.gguf`).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

fn parse_kind(s: &str) -> anyhow::Result<GgufType> {
    GgufType::parse(s).with_context(|| {
        format!(
            "unknown GGUF type `{s}`: use one of {}",
            GgufType::ALL.map(|t| t.name().to_lowercase()).join(", ")
        )
    })
}

/// Convert `from` to GGUF `kind` at `out`; returns how many tensors went into each GGML type.
pub fn convert(from: &Path, kind: GgufType, out: &Path) -> anyhow::Result<Vec<(String, usize)>> {
    let set = SafetensorsSet::open(from)?;
    let prefix = match detect_transformer_layout(&set) {
        Some(TransformerLayout::Bfl { prefix }) => prefix,
        Some(TransformerLayout::Diffusers) => bail!(
            "{} holds a transformer in diffusers' names; GGUF files carry Black Forest Labs' \
             names: convert from a single-file checkpoint (flux1-dev.safetensors or ComfyUI's)",
            from.display()
        ),
        None => bail!("{} holds no FLUX transformer", from.display()),
    };
    let names: Vec<String> = set.names().map(str::to_string).collect();
    let shapes: Vec<(String, Vec<usize>)> = names
        .iter()
        .filter_map(|n| {
            let meta = set.meta(n)?;
            let plain = n.strip_prefix(prefix.as_str())?;
            Some((plain.to_string(), meta.shape.clone()))
        })
        .collect();
    let written = gguf::write_with(out, &shapes, kind, "flux", &mut |i| {
        set.load(
            &format!("{prefix}{}", shapes[i].0),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
    })?;
    let mut counts: Vec<(String, usize)> = Vec::new();
    for (_, d) in written {
        let name = gguf::ggml_name(d);
        match counts.iter_mut().find(|(n, _)| *n == name) {
            Some((_, c)) => *c += 1,
            None => counts.push((name, 1)),
        }
    }
    Ok(counts)
}

pub fn export(a: ExportGgufArgs) -> anyhow::Result<()> {
    let kind = parse_kind(&a.kind)?;
    let out = a.out.clone().unwrap_or_else(|| {
        let stem = a
            .from
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("transformer");
        a.from
            .with_file_name(format!("{stem}-{}.gguf", kind.name()))
    });
    if out.exists() {
        bail!("{} exists; give another --out", out.display());
    }
    let counts = convert(&a.from, kind, &out)?;
    let bytes = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {} ({:.1} MB; tensors: {})",
        out.display(),
        bytes as f64 / 1e6,
        counts
            .iter()
            .map(|(n, c)| format!("{c} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

#[derive(Debug, Clone, Args)]
pub struct GgufErrorArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sample: SampleArgs,
    /// GGUF types to measure (default: every type).
    #[arg(long = "type", value_delimiter = ',')]
    pub kinds: Vec<String>,
    /// Evaluation prompts per type (the demo dataset's, scored by its scorer).
    #[arg(long, default_value_t = 8)]
    pub prompts: usize,
}

pub fn error(a: GgufErrorArgs) -> anyhow::Result<()> {
    use crate::model::export::{write_demo_model, DemoSource, ExportLayout};
    use crate::pipeline::metrics;
    use crate::scenes::sample::eval_samples;
    use crate::scenes::score::score;

    if a.model.model != "demo" {
        bail!("gguf-error measures the demo model (it exports it, then converts it): leave out --model");
    }
    let kinds: Vec<GgufType> = if a.kinds.is_empty() {
        GgufType::ALL.to_vec()
    } else {
        a.kinds
            .iter()
            .map(|k| parse_kind(k))
            .collect::<anyhow::Result<_>>()?
    };
    let dir = ScratchDir::new()?;
    write_demo_model(dir.path(), ExportLayout::Bfl, DemoSource::Trained)?;
    let source = dir.path().join("flux1-dev.safetensors");
    let load = |model: &Path| -> anyhow::Result<crate::pipeline::Pipeline> {
        let mut choice = a.model.choice();
        choice.model = model.display().to_string();
        Ok(crate::engine::load_pipeline(&choice, &a.model.device)?)
    };
    let native = load(&source)?;
    let samples = eval_samples(a.prompts.max(1), 0);
    let requests: Vec<_> = samples
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut sa = a.sample.clone();
            sa.prompt = s.caption.clone();
            sa.seed = Some(a.sample.seed.unwrap_or(0) + i as u64);
            request_for(true, &sa)
        })
        .collect();
    let generate_all = |p: &crate::pipeline::Pipeline| -> anyhow::Result<Vec<_>> {
        requests
            .iter()
            .map(|r| Ok(p.generate(r, &mut |_| Ok(()))?.image))
            .collect()
    };
    let accuracy = |images: &[crate::pipeline::image::RgbImage]| -> f64 {
        let (mut passed, mut total) = (0usize, 0usize);
        for (img, s) in images.iter().zip(&samples) {
            let sc = score(img, &s.described);
            passed += sc.passed();
            total += sc.total();
        }
        passed as f64 / total.max(1) as f64
    };
    let reference_images = generate_all(&native)?;
    let prep = native.prepare(&requests[0], &mut |_| Ok(()))?;
    let native_flux = native.flux1("the GGUF error table")?.flux;
    let inputs = super::fp8_error::three_step_inputs(native_flux, &prep.job)?;
    let reference_v = inputs
        .iter()
        .map(|(t, x)| super::fp8_error::velocity_at(native_flux, &prep.job, *t, x))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let source_bytes = std::fs::metadata(&source)?.len();
    let mut rows = Vec::new();
    for kind in kinds {
        let file = dir.path().join(format!("flux1-dev-{}.gguf", kind.name()));
        let counts = convert(&source, kind, &file)?;
        let bytes = std::fs::metadata(&file)?.len();
        let p = load(&file)?;
        let errs = inputs
            .iter()
            .zip(&reference_v)
            .map(|((t, x), v)| {
                let q = super::fp8_error::velocity_at(
                    p.flux1("the GGUF error table")?.flux,
                    &prep.job,
                    *t,
                    x,
                )?;
                Ok(metrics::relative_error(&q, v)?)
            })
            .collect::<anyhow::Result<Vec<f64>>>()?;
        let images = generate_all(&p)?;
        let mut psnr = Vec::new();
        let mut ssim = Vec::new();
        for (img, r) in images.iter().zip(&reference_images) {
            psnr.push(metrics::psnr(img, r)?);
            ssim.push(metrics::ssim(img, r)?);
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        rows.push(serde_json::json!({
            "type": kind.name(),
            "tensors": counts.iter().map(|(n, c)| serde_json::json!({"ggml": n, "count": c})).collect::<Vec<_>>(),
            "bytes": bytes,
            "velocity_relative_error": mean(&errs),
            "psnr_db": mean(&psnr),
            "ssim": mean(&ssim),
            "prompt_accuracy": accuracy(&images),
        }));
    }
    let report = serde_json::json!({
        "model": "demo",
        "reference": "the same model read from its safetensors export, in the run's dtype",
        "reference_bytes": source_bytes,
        "reference_prompt_accuracy": accuracy(&reference_images),
        "device": a.model.device,
        "prompts": requests.len(),
        "steps": prep.job.timesteps.len().saturating_sub(1),
        "types": rows,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// A folder under the system's temporary folder, removed when dropped.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "parallax-gguf-{}-{}",
            std::process::id(),
            crate::model::rng::fresh_seed()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
