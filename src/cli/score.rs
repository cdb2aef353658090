//! `parallax score`: how well images follow their prompts, by the demo dataset's scorer
//! ([`crate::scenes::score`]). Either one image (`--image PNG --prompt TEXT`), or the evaluation
//! set: `--prompts N` prompts from [`crate::scenes::sample::eval_samples`] (the first half like
//! the training scenes, the second half with held-out colour-shape pairs), each generated at every
//! `--thresholds` value, every `--caches` policy, every parallel layout and every `--precisions`
//! cell, reported per cell: prompt accuracy (all, in-distribution, held-out, per kind of check),
//! steps computed, time, speedup and PSNR/SSIM against the uncached image.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;

use super::{median, request_for, ModelArgs, SampleArgs};
use crate::model::family::Denoiser;
use crate::parallel::mesh::Stale;
use crate::pipeline::cache::CacheSpec;
use crate::pipeline::image::{read_png, RgbImage};
use crate::pipeline::metrics;
use crate::scenes::parse::parse;
use crate::scenes::sample::{eval_samples, eval_samples_on};
use crate::scenes::score::{score, Score};
use crate::scenes::spec::BackgroundKind;

#[derive(Debug, Clone, Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sample: SampleArgs,
    /// Score this image against --prompt instead of generating.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// Evaluation prompts to generate and score.
    #[arg(long, default_value_t = 40)]
    pub prompts: usize,
    /// Seed of the evaluation prompts (the training scenes used seed 1).
    #[arg(long, default_value_t = 7)]
    pub prompt_seed: u64,
    /// First Block Cache thresholds; 0, the reference, always runs first.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    pub thresholds: Vec<f64>,
    /// More cells, after the thresholds: cache policies with their settings, separated by `;`
    /// (e.g. `dbcache:t=0.2,taylor=1;taylorseer:n=3;magcache:t=0.3`).
    #[arg(long, value_delimiter = ';')]
    pub caches: Vec<CacheSpec>,
    /// More cells, uncached, on CPU worker threads: displaced patch layouts as `N:W` (N patch
    /// workers, W exact warm-up steps; `N:W:rotate` for piflux's rotation without K/V exchange),
    /// separated by `,` (e.g. `2:1,4:1,4:3:rotate`).
    #[arg(long, value_delimiter = ',', value_parser = parse_displaced)]
    pub displaced: Vec<(usize, usize, bool)>,
    /// More cells, uncached, on CPU worker threads: PipeFusion layouts as `N:M:W` (N stages, M
    /// patches, W exact warm-up steps), separated by `,` (e.g. `2:2:1,4:4:1,4:8:2`).
    #[arg(long, value_delimiter = ',', value_parser = parse_pipefusion)]
    pub pipefusion: Vec<(usize, usize, usize)>,
    /// More cells, uncached on one device: the model in other precisions, separated by `,`:
    /// `fp8` (FP8 products, as `--precision fp8`), `fp8-attention` (as `--fp8-attention`),
    /// `fp8+fp8-attention` (both), `native` (neither); each against the model as loaded (the
    /// first cell). FLUX.1 models.
    #[arg(long, value_delimiter = ',', value_parser = parse_precision_cell)]
    pub precisions: Vec<PrecisionCell>,
    /// Save every image here as eval-<prompt>-<threshold>.png.
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// List every prompt's checks, not only the totals.
    #[arg(long)]
    pub details: bool,
    /// Every evaluation prompt on polka dots, the background the demo LoRA
    /// (`assets/demo/lora-polka.safetensors`, with `--lora`) teaches.
    #[arg(long)]
    pub polka: bool,
}

fn parse_displaced(s: &str) -> Result<(usize, usize, bool), String> {
    let (s, rotate) = match s.strip_suffix(":rotate") {
        Some(rest) => (rest, true),
        None => (s, false),
    };
    let (n, w) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}`: give N:W (patch workers : warm-up steps), e.g. 4:1"))?;
    let n: usize = n
        .trim()
        .parse()
        .map_err(|_| format!("`{n}` is not a worker count"))?;
    let w: usize = w
        .trim()
        .parse()
        .map_err(|_| format!("`{w}` is not a step count"))?;
    if n < 2 {
        return Err(format!("`{s}`: displaced patches need 2 workers or more"));
    }
    Ok((n, w, rotate))
}

pub(crate) fn parse_pipefusion(s: &str) -> Result<(usize, usize, usize), String> {
    let parts: Vec<&str> = s.split(':').collect();
    let [n, m, w] = parts.as_slice() else {
        return Err(format!(
            "`{s}`: give N:M:W (stages : patches : warm-up steps), e.g. 2:4:1"
        ));
    };
    let num = |v: &str, what: &str| -> Result<usize, String> {
        v.trim()
            .parse()
            .map_err(|_| format!("`{v}` is not a count of {what}"))
    };
    let (n, m, w) = (num(n, "stages")?, num(m, "patches")?, num(w, "steps")?);
    if n < 2 || m < 1 || w < 1 {
        return Err(format!(
            "`{s}`: PipeFusion needs 2 stages or more, a patch and a warm-up step"
        ));
    }
    Ok((n, m, w))
}

/// A `--precisions` cell: FP8 in the transformer's products, in its attention, or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrecisionCell {
    products: bool,
    attention: bool,
}

impl PrecisionCell {
    const fn new(products: bool, attention: bool) -> Self {
        Self {
            products,
            attention,
        }
    }

    /// Every cell under its `--precisions` name.
    const ALL: [(&'static str, PrecisionCell); 4] = [
        ("native", PrecisionCell::new(false, false)),
        ("fp8", PrecisionCell::new(true, false)),
        ("fp8-attention", PrecisionCell::new(false, true)),
        ("fp8+fp8-attention", PrecisionCell::new(true, true)),
    ];

    fn name(&self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, c)| c == self)
            .map_or("native", |(n, _)| n)
    }

    /// The transformer of `p` (loaded native or as this cell asks) in this cell's precision.
    fn model(&self, p: &crate::pipeline::Pipeline) -> anyhow::Result<Arc<dyn Denoiser>> {
        let f = p.flux1("--precisions")?.flux;
        if f.fp8_products() && !self.products {
            bail!("--precisions {}: the model was loaded with FP8 products; leave out --precision fp8", self.name());
        }
        let f = if self.products && !f.fp8_products() {
            f.clone().with_fp8_products()?
        } else {
            f.clone()
        };
        Ok(Arc::new(f.with_fp8_attention(self.attention)))
    }
}

fn parse_precision_cell(s: &str) -> Result<PrecisionCell, String> {
    let s = s.trim();
    PrecisionCell::ALL
        .iter()
        .find(|(n, _)| *n == s)
        .map(|&(_, c)| c)
        .ok_or_else(|| format!("`{s}`: give native, fp8, fp8-attention or fp8+fp8-attention"))
}

/// One cell of the sweep: a cache setting on one device, a parallel layout uncached, or the
/// model in another precision uncached.
enum Sweep {
    Cache(CacheSpec),
    Layout(crate::parallel::mesh::ParallelLayout),
    Precision(PrecisionCell),
}

impl Sweep {
    fn displaced(n: usize, w: usize, rotate: bool) -> Self {
        Sweep::Layout(crate::parallel::mesh::ParallelLayout {
            ring: n,
            stale: Stale::Displaced { warmup: w, rotate },
            ..Default::default()
        })
    }
    fn pipefusion(n: usize, m: usize, w: usize) -> Self {
        Sweep::Layout(crate::parallel::mesh::ParallelLayout {
            stale: Stale::PipeFusion {
                stages: n,
                patches: m,
                warmup: w,
                balance: crate::parallel::pipefusion::StageBalance::Work,
            },
            ..Default::default()
        })
    }
    fn name(&self) -> String {
        match self {
            Sweep::Cache(c) => c.to_string(),
            Sweep::Layout(l) => match l.stale {
                Stale::Displaced { warmup, rotate } => format!(
                    "displaced:{},warmup={warmup}{}",
                    l.ring,
                    if rotate { ",rotate" } else { "" }
                ),
                Stale::PipeFusion {
                    stages,
                    patches,
                    warmup,
                    ..
                } => format!("pipefusion:{stages},patches={patches},warmup={warmup}"),
                Stale::Exact => crate::parallel::cost::describe(l),
            },
            Sweep::Precision(c) => format!("precision:{}", c.name()),
        }
    }
    fn file_stem(&self) -> String {
        match self {
            Sweep::Cache(c) => c.file_stem(),
            Sweep::Layout(l) => match l.stale {
                Stale::Displaced { warmup, rotate } => format!(
                    "displaced{}-w{warmup}{}",
                    l.ring,
                    if rotate { "-rot" } else { "" }
                ),
                Stale::PipeFusion {
                    stages,
                    patches,
                    warmup,
                    ..
                } => format!("pipefusion{stages}-m{patches}-w{warmup}"),
                Stale::Exact => crate::parallel::cost::describe(l).replace(' ', ""),
            },
            Sweep::Precision(c) => c.name().replace('+', "-"),
        }
    }
}

/// Totals of several scores, overall and per kind of check.
#[derive(Default)]
struct Tally {
    all: (usize, usize),
    in_dist: (usize, usize),
    held_out: (usize, usize),
    kinds: std::collections::BTreeMap<&'static str, (usize, usize)>,
}

impl Tally {
    fn add(&mut self, s: &Score, held_out: bool) {
        let add = |t: &mut (usize, usize)| {
            t.0 += s.passed();
            t.1 += s.total();
        };
        add(&mut self.all);
        add(if held_out {
            &mut self.held_out
        } else {
            &mut self.in_dist
        });
        for c in &s.checks {
            let e = self.kinds.entry(c.kind).or_default();
            e.0 += c.passed as usize;
            e.1 += 1;
        }
    }

    fn json(&self) -> serde_json::Value {
        let r = |t: (usize, usize)| {
            if t.1 == 0 {
                serde_json::Value::Null
            } else {
                serde_json::json!(t.0 as f64 / t.1 as f64)
            }
        };
        let kinds: serde_json::Map<String, serde_json::Value> = self
            .kinds
            .iter()
            .map(|(k, v)| (k.to_string(), r(*v)))
            .collect();
        serde_json::json!({
            "accuracy": r(self.all),
            "checks": self.all.1,
            "in_distribution": r(self.in_dist),
            "held_out_pairs": r(self.held_out),
            "by_kind": kinds,
        })
    }
}

pub fn run(a: ScoreArgs) -> anyhow::Result<()> {
    if let Some(path) = &a.image {
        let (img, _) = read_png(path).with_context(|| format!("reading {}", path.display()))?;
        let Some(d) = parse(&a.sample.prompt) else {
            bail!("--prompt names no coloured shape the scorer knows (e.g. \"a red circle on a blue background\")");
        };
        let s = score(&img, &d);
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "prompt": a.sample.prompt, "score": s.summary(), "checks": s.checks,
            }))?
        );
        return Ok(());
    }
    if a.prompts == 0 {
        bail!("--prompts must be at least 1");
    }
    if let Some(bad) = a.thresholds.iter().find(|t| !(t.is_finite() && **t >= 0.0)) {
        bail!("--thresholds: {bad} is not a threshold (give numbers of 0 or more)");
    }
    // The cells: no cache first (the reference), then each threshold, each policy, and each
    // displaced layout.
    let specs: Vec<Sweep> = std::iter::once(CacheSpec::None)
        .chain(
            a.thresholds
                .iter()
                .filter(|t| **t > 0.0)
                .map(|&t| CacheSpec::from_threshold(t)),
        )
        .chain(
            a.caches
                .iter()
                .filter(|c| !matches!(c, CacheSpec::None))
                .cloned(),
        )
        .map(Sweep::Cache)
        .chain(
            a.displaced
                .iter()
                .map(|&(n, w, r)| Sweep::displaced(n, w, r)),
        )
        .chain(
            a.pipefusion
                .iter()
                .map(|&(n, m, w)| Sweep::pipefusion(n, m, w)),
        )
        .chain(a.precisions.iter().map(|&c| Sweep::Precision(c)))
        .collect();
    if let Some(dir) = &a.save {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let choice = a.model.choice();
    let mut p = crate::engine::load_pipeline(&choice, &a.model.device)?;
    // The transformer of each --precisions cell, made once; the loaded one goes back after each.
    let loaded = p.model.denoiser.clone();
    let models = specs
        .iter()
        .map(|s| match s {
            Sweep::Precision(c) => c.model(&p).map(Some),
            _ => Ok(None),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if (!a.displaced.is_empty() || !a.pipefusion.is_empty()) && !p.device().is_cpu() {
        bail!("--displaced and --pipefusion run on CPU worker threads: use --device cpu");
    }
    let samples = if a.polka {
        eval_samples_on(a.prompts, a.prompt_seed, BackgroundKind::Polka)
    } else {
        eval_samples(a.prompts, a.prompt_seed)
    };
    let half = a.prompts.div_ceil(2);

    struct Cell {
        tally: Tally,
        ms: Vec<f64>,
        computed: usize,
        reused: usize,
        psnr: Vec<f64>,
        ssim: Vec<f64>,
    }
    let mut cells: Vec<Cell> = specs
        .iter()
        .map(|_| Cell {
            tally: Tally::default(),
            ms: vec![],
            computed: 0,
            reused: 0,
            psnr: vec![],
            ssim: vec![],
        })
        .collect();
    let mut details = Vec::new();
    let bar = indicatif::ProgressBar::new((samples.len() * specs.len()) as u64);
    let started = Instant::now();
    for (i, sample) in samples.iter().enumerate() {
        let mut reference: Option<RgbImage> = None;
        for (k, spec) in specs.iter().enumerate() {
            let mut s = a.sample.clone();
            s.prompt = sample.caption.clone();
            s.cache_threshold = 0.0;
            s.cache = Some(match spec {
                Sweep::Cache(c) => c.clone(),
                Sweep::Layout(_) | Sweep::Precision(_) => CacheSpec::None,
            });
            s.seed = Some(a.sample.seed.unwrap_or(0) + i as u64);
            let req = request_for(true, &s);
            let g = match spec {
                Sweep::Cache(_) => p.generate(&req, &mut |_| Ok(()))?,
                Sweep::Precision(_) => {
                    if let Some(m) = &models[k] {
                        p.model.denoiser = m.clone();
                    }
                    let g = p.generate(&req, &mut |_| Ok(()));
                    p.model.denoiser = loaded.clone();
                    g?
                }
                &Sweep::Layout(layout) => {
                    crate::parallel::ranks::generate(&p, layout, &req, &mut |_| Ok(()))?
                }
            };
            let sc = score(&g.image, &sample.described);
            let c = &mut cells[k];
            c.tally.add(&sc, i >= half);
            c.ms.push(g.timings.total_ms);
            c.computed += g.stats.computed;
            c.reused += g.stats.reused;
            match &reference {
                None => reference = Some(g.image.clone()),
                Some(r) => {
                    let q = metrics::quality(&g.image, r)?;
                    c.psnr.push(if q.psnr_db.is_finite() {
                        q.psnr_db
                    } else {
                        99.0
                    });
                    c.ssim.push(q.ssim);
                }
            }
            if let Some(dir) = &a.save {
                let out = dir.join(format!("eval-{i}-{}.png", spec.file_stem()));
                crate::pipeline::image::save_png(&out, &g.image, &g.settings.png_text()?)?;
            }
            if a.details {
                details.push(serde_json::json!({
                    "prompt": sample.caption, "cache": spec.name(), "held_out": i >= half,
                    "score": sc.summary(),
                    "failed": sc.checks.iter().filter(|c| !c.passed).collect::<Vec<_>>(),
                }));
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let mean = |v: &[f64]| {
        if v.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::json!(v.iter().sum::<f64>() / v.len() as f64)
        }
    };
    let base_ms = median(&cells[0].ms);
    let rows: Vec<serde_json::Value> = specs
        .iter()
        .zip(&cells)
        .map(|(spec, c)| {
            let ms = median(&c.ms);
            serde_json::json!({
                "threshold": match spec { Sweep::Cache(c) => c.fb_threshold(), _ => None },
                "cache": spec.name(),
                "prompt_score": c.tally.json(),
                "steps_computed": c.computed,
                "steps_reused": c.reused,
                "median_image_ms": ms,
                "speedup": if ms > 0.0 { base_ms / ms } else { 0.0 },
                "mean_psnr_db": mean(&c.psnr),
                "median_psnr_db": (!c.psnr.is_empty()).then(|| median(&c.psnr)),
                "min_psnr_db": c.psnr.iter().copied().reduce(f64::min),
                "mean_ssim": mean(&c.ssim),
            })
        })
        .collect();
    let req = request_for(true, &a.sample);
    let mut report = serde_json::json!({
        "model": a.model.model,
        "device": a.model.device,
        "prompts": a.prompts,
        "prompt_seed": a.prompt_seed,
        "held_out_from": half,
        "width": req.width,
        "height": req.height,
        "steps": req.steps,
        "true_cfg": req.true_cfg,
        "guidance": req.guidance,
        "wall_s": started.elapsed().as_secs_f64(),
        "thresholds": rows,
    });
    if a.details {
        report["details"] = serde_json::json!(details);
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
