//! Memory budgets: what a generation holds on one GPU, phase by phase, and which measures
//! (`--memory-budget`) bring FLUX.1 within a card's memory.
//!
//! The estimate counts the weights from the model's configs (exact up to biases and norms) and
//! the work space of each phase from this project's own measurements on an H200 (the decode's
//! peak from `bench-vae`, the denoising activations per token from `bench`); BENCHMARKS.md sets
//! the estimate beside the peak a device run measured. The measures, in the order they are
//! taken (least cost to the image first):
//!
//! 1. **FP8 without the bf16 copies** when `--precision fp8` was asked with the copies kept
//!    (`PARALLAX_FP8_KEEP_BF16=1`; since issue 30 FP8 drops them by default:
//!    [`crate::engine::Precision::load_options`]): the E4M3 weights stand alone (no cost
//!    beyond FP8's own).
//! 2. **T5 on demand**: T5-XXL (9.5 GB in bf16) is built for each prompt and freed after it. No
//!    cost to the image; each prompt reads T5's weights again (seconds, from the page cache).
//! 3. **FP8 products** (when not asked): the blocks' products in E4M3 and the bf16 copies
//!    dropped. Costs FP8's error (BENCHMARKS.md: about 2 % of the velocity on the demo model).
//! 4. **Modulations in FP8, weight-only**: the adaLN modulations are a quarter of the
//!    transformer's weights; stored in E4M3 they halve, and their input stays bf16.
//!
//! FP8 needs an sm_89 or newer GPU in bf16; elsewhere only measure 2 applies.

use std::fmt;

use candle_transformers::models::clip::text_model::ClipTextConfig;
use candle_transformers::models::t5;

use crate::error::{Error, Result};
use crate::model::family::ParamCounts;
use crate::model::flux::{FluxConfig, Fp8Groups};
use crate::model::text::T5Residency;
use crate::parallel::pipefusion::{stage_split, StageBalance};
use crate::pipeline::LoadOptions;

const GIB: f64 = (1u64 << 30) as f64;

/// Parameters of FLUX.1's autoencoder decoder (`VaeConfig::flux`; counted by a test).
pub const FLUX_DECODER_PARAMS: u64 = 49_545_475;

/// Device memory outside the tensors counted here: the CUDA context, cuBLAS/cuBLASLt
/// workspaces, the allocator's slack. On an H200 the device's used memory at dev 1024 px ran
/// 1.9 GiB above the tensors counted here plus 1.25 GiB in bf16 and 0.9 GiB below in FP8 with
/// the bf16 copies kept (BENCHMARKS.md): 2.5 GiB sits between, good to about 1 GiB.
const OVERHEAD: f64 = 2.5 * GIB;

/// The denoising activations per image token and image in the batch, in bytes of bf16 (the
/// widest block keeps about 16 hidden-sized rows per token alive).
fn activations(cfg: &FluxConfig, tokens: usize, batch: usize) -> f64 {
    (tokens * batch * cfg.hidden_size * 16 * 2) as f64
}

/// The decode's peak for `pixels` (width × height) in bf16: 1.90 / 5.65 / 20.66 GiB at 1024 /
/// 2048 / 4096 px on one GPU (BENCHMARKS.md), fitted as 0.55 GiB + 1.26 GiB per megapixel.
fn decode(pixels: usize) -> f64 {
    (0.55 + 1.26 * pixels as f64 / (1u64 << 20) as f64) * GIB
}

/// T5 encoder parameters (embedding, blocks, final norm, relative-position table).
pub fn t5_params(c: &t5::Config) -> u64 {
    let (d, inner) = (c.d_model as u64, (c.num_heads * c.d_kv) as u64);
    let ff_in = if c.feed_forward_proj.gated { 2 } else { 1 };
    let block = 4 * d * inner + (ff_in + 1) * d * c.d_ff as u64 + 2 * d;
    c.vocab_size as u64 * d
        + c.num_layers as u64 * block
        + d
        + (c.relative_attention_num_buckets * c.num_heads) as u64
}

/// CLIP text model parameters (embeddings, layers with biases, final norm).
pub fn clip_params(c: &ClipTextConfig) -> u64 {
    let (d, ff) = (c.embed_dim as u64, c.intermediate_size as u64);
    let layer = 4 * (d * d + d) + 2 * d * ff + ff + d + 4 * d;
    (c.vocab_size + c.max_position_embeddings) as u64 * d
        + c.num_hidden_layers as u64 * layer
        + 2 * d
}

/// The transformer's parameters by kind ([`ParamCounts`]: products the FP8 groups cover, their
/// output rows, modulations, the rest), from the family's own formula.
pub type FluxParams = ParamCounts;

impl ParamCounts {
    /// FLUX.1's parameters for `c` ([`FluxConfig::block_param_counts`] and what is outside the
    /// blocks).
    pub fn of(c: &FluxConfig) -> Self {
        Self::of_blocks(c, 0..c.num_blocks())
    }

    /// The parameters a device holding only `blocks` (a PipeFusion stage's, in the unified
    /// numbering: double blocks first) keeps: those blocks and everything outside the blocks
    /// (every stage loads the embedders and the final layer).
    pub fn of_blocks(c: &FluxConfig, blocks: std::ops::Range<usize>) -> Self {
        c.param_counts_of(blocks)
    }

    /// Bytes on the device with `opts`, weights in a dtype of `bytes` per value (2 for bf16).
    pub fn bytes(&self, opts: &LoadOptions, bytes: u64) -> u64 {
        let fp8 = |w: u64, rows: u64| w + 4 * rows;
        let products = if opts.fp8 == Fp8Groups::NONE {
            self.products * bytes
        } else if opts.lean {
            fp8(self.products, self.product_rows)
        } else {
            self.products * bytes + fp8(self.products, self.product_rows)
        };
        let modulations = if !opts.fp8.modulations {
            self.modulations * bytes
        } else if opts.lean {
            fp8(self.modulations, self.modulation_rows)
        } else {
            self.modulations * bytes + fp8(self.modulations, self.modulation_rows)
        };
        products + modulations + self.other * bytes
    }
}

/// What a generation is: the model's parts and the image.
#[derive(Debug, Clone)]
pub struct Workload {
    pub flux: FluxConfig,
    pub t5: t5::Config,
    pub clip: ClipTextConfig,
    /// T5 tokens (512 for dev).
    pub t5_tokens: usize,
    pub width: usize,
    pub height: usize,
    /// Images through the transformer at once (2 with true CFG on one device).
    pub batch: usize,
    /// Bytes per weight value in the run's dtype.
    pub dtype_bytes: u64,
    /// FLUX.1's autoencoder (the decode's measured peak applies); else the demo's small one.
    pub flux_vae: bool,
    /// On a GPU (the CUDA context and workspaces count).
    pub gpu: bool,
}

/// One phase's estimate.
#[derive(Debug, Clone, PartialEq)]
pub struct Phase {
    pub name: &'static str,
    /// Bytes the device holds at the phase's peak.
    pub bytes: f64,
}

/// The estimate under one set of load options.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    pub transformer: f64,
    pub t5: f64,
    pub clip_and_vae: f64,
    pub phases: Vec<Phase>,
}

impl Estimate {
    /// The largest phase.
    pub fn peak(&self) -> f64 {
        self.phases.iter().map(|p| p.bytes).fold(0.0, f64::max)
    }
}

/// Each phase's peak device memory for `w` loaded as `opts`.
pub fn estimate(w: &Workload, opts: &LoadOptions) -> Estimate {
    let blocks = opts.block_range(w.flux.num_blocks());
    let transformer =
        FluxParams::of_blocks(&w.flux, blocks.clone()).bytes(opts, w.dtype_bytes) as f64;
    let t5 = (t5_params(&w.t5) * w.dtype_bytes) as f64;
    let clip_and_vae = ((clip_params(&w.clip) + FLUX_DECODER_PARAMS) * w.dtype_bytes) as f64;
    let resident_t5 = match opts.t5 {
        T5Residency::Resident => t5,
        T5Residency::OnDemand => 0.0,
    };
    let overhead = if w.gpu { OVERHEAD } else { 0.0 };
    let held = transformer + resident_t5 + clip_and_vae + overhead;
    let decode_bytes = if w.flux_vae {
        decode(w.width * w.height)
    } else {
        // The demo's autoencoder: a few 128-channel f32 maps at full size.
        (w.width * w.height * 128 * 4 * 4) as f64
    };
    // T5's own work space: a few hidden-sized rows per token and the attention scores in f32.
    let t5_work = (w.t5_tokens * w.t5.d_model * 2 * 8
        + w.t5.num_heads * w.t5_tokens * w.t5_tokens * 4) as f64;
    let image_tokens = (w.width / 16) * (w.height / 16);
    // A PipeFusion stage keeps every one of its blocks' keys and values for the whole sequence
    // (the patches' one-step-stale K/V).
    let stage_kv = if opts.blocks.is_some() {
        (2 * blocks.len() * (image_tokens + w.t5_tokens) * w.flux.hidden_size * w.batch) as f64
            * w.dtype_bytes as f64
    } else {
        0.0
    };
    let phases = vec![
        Phase {
            name: "text encoders",
            bytes: held - resident_t5 + t5 + t5_work,
        },
        Phase {
            name: "denoising",
            bytes: held + activations(&w.flux, image_tokens + w.t5_tokens, w.batch) + stage_kv,
        },
        Phase {
            name: "decode",
            bytes: held + decode_bytes,
        },
    ];
    Estimate {
        transformer,
        t5,
        clip_and_vae,
        phases,
    }
}

/// A budget's choice: the load options, the measures taken and the estimate under them.
#[derive(Debug, Clone)]
pub struct MemoryPlan {
    pub budget: f64,
    pub options: LoadOptions,
    /// The measures taken, in order (empty when everything fits as asked).
    pub measures: Vec<&'static str>,
    pub estimate: Estimate,
}

impl MemoryPlan {
    pub fn peak(&self) -> f64 {
        self.estimate.peak()
    }
}

/// The load options that bring `w` within `budget` bytes, starting from `asked` (the precision
/// the user chose; `fp8_ok`: the device runs FP8 products). An error names the smallest
/// estimate reached and what it is made of.
pub fn plan(w: &Workload, budget: f64, asked: LoadOptions, fp8_ok: bool) -> Result<MemoryPlan> {
    let mut opts = asked;
    let mut measures = Vec::new();
    type Step = (&'static str, fn(&mut LoadOptions, bool) -> bool);
    let steps: [Step; 4] = [
        ("FP8 weights without their bf16 copies", |o, ok| {
            ok && o.fp8 != Fp8Groups::NONE && !o.lean && {
                o.lean = true;
                true
            }
        }),
        ("T5 built for each prompt and freed after it", |o, _| {
            o.t5 == T5Residency::Resident && {
                o.t5 = T5Residency::OnDemand;
                true
            }
        }),
        ("FP8 products (bf16 copies dropped)", |o, ok| {
            ok && o.fp8 == Fp8Groups::NONE && {
                o.fp8 = Fp8Groups::ALL;
                o.lean = true;
                true
            }
        }),
        ("adaLN modulations stored in FP8 (weight-only)", |o, ok| {
            ok && o.fp8 != Fp8Groups::NONE && !o.fp8.modulations && {
                o.fp8.modulations = true;
                o.lean = true;
                true
            }
        }),
    ];
    let mut est = estimate(w, &opts);
    for (name, step) in steps {
        if est.peak() <= budget {
            break;
        }
        if step(&mut opts, fp8_ok) {
            measures.push(name);
            est = estimate(w, &opts);
        }
    }
    if est.peak() > budget {
        let phases = est
            .phases
            .iter()
            .map(|p| format!("{} {:.1} GiB", p.name, p.bytes / GIB))
            .collect::<Vec<_>>()
            .join(", ");
        let fp8 = if fp8_ok {
            ""
        } else {
            " (FP8, which would shrink the transformer, needs bf16 on an sm_89 or newer GPU)"
        };
        return Err(Error::setting(
            "memory budget",
            format!("{:.1} GiB", budget / GIB),
            format!(
                "{}x{} px needs about {:.1} GiB at its peak even with every measure ({}): \
                 transformer {:.1} GiB, T5 {:.1} GiB{fp8}; try a smaller image or a larger budget",
                w.width,
                w.height,
                est.peak() / GIB,
                phases,
                est.transformer / GIB,
                est.t5 / GIB,
            ),
        ));
    }
    Ok(MemoryPlan {
        budget,
        options: opts,
        measures,
        estimate: est,
    })
}

/// GPUs of one size that together hold a model no single one does: PipeFusion stages split by
/// memory ([`StageBalance::Memory`]), each stage planned within the budget.
#[derive(Debug, Clone)]
pub struct StagePlans {
    /// Each stage's blocks (`start`, `end`) and plan; as many stages as GPUs.
    pub stages: Vec<((usize, usize), MemoryPlan)>,
}

impl StagePlans {
    pub fn gpus(&self) -> usize {
        self.stages.len()
    }
}

/// The fewest GPUs of `budget` bytes each (two or more) whose PipeFusion stages, split by
/// memory, each fit as [`plan`] plans them, starting from `asked`. `Err` (from a one-block stage's
/// plan) when no count does: what every stage holds whatever its share (T5 while encoding, CLIP,
/// the autoencoder, the decode, the embedders) is too much already.
pub fn plan_stages(
    w: &Workload,
    budget: f64,
    asked: LoadOptions,
    fp8_ok: bool,
) -> Result<StagePlans> {
    let n = w.flux.num_blocks();
    for gpus in 2..=n {
        let stages: Result<Vec<_>> = (0..gpus)
            .map(|s| {
                let r = stage_split(&w.flux, gpus, s, StageBalance::Memory);
                let opts = LoadOptions {
                    blocks: Some((r.start, r.end)),
                    ..asked
                };
                plan(w, budget, opts, fp8_ok).map(|p| ((r.start, r.end), p))
            })
            .collect();
        if let Ok(stages) = stages {
            return Ok(StagePlans { stages });
        }
    }
    // One block per GPU (or as few as there are) still does not fit: say why.
    let one = LoadOptions {
        blocks: Some((0, 1.min(n))),
        ..asked
    };
    plan(w, budget, one, fp8_ok)?;
    Err(Error::setting(
        "memory budget",
        format!("{:.1} GiB", budget / GIB),
        "no split of the blocks over GPUs of this size fits",
    ))
}

/// One line for a budget (the studio's budget picker): whether one GPU of `budget` bytes holds
/// `w` and with which measures, else how many such GPUs would as PipeFusion stages, else why none.
pub fn budget_answer(w: &Workload, budget: f64, asked: LoadOptions, fp8_ok: bool) -> String {
    match plan(w, budget, asked, fp8_ok) {
        Ok(p) if p.measures.is_empty() => format!(
            "fits on one GPU as asked (peak about {:.1} GiB)",
            p.peak() / GIB
        ),
        Ok(p) => format!(
            "fits on one GPU (peak about {:.1} GiB) with {}",
            p.peak() / GIB,
            p.measures.join(", ")
        ),
        Err(_) => match plan_stages(w, budget, asked, fp8_ok) {
            Ok(s) => format!(
                "one GPU is not enough; {} GPUs of {:.0} GiB would, as PipeFusion stages split by \
                 memory",
                s.gpus(),
                budget / GIB
            ),
            Err(e) => format!("no number of {:.0} GiB GPUs would: {e}", budget / GIB),
        },
    }
}

impl fmt::Display for StagePlans {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let budget = self.stages.first().map_or(0.0, |(_, p)| p.budget);
        write!(
            f,
            "{} GPUs of {:.1} GiB would, as PipeFusion stages split by memory (--pipefusion {} \
             --pipefusion-balance memory):",
            self.gpus(),
            budget / GIB,
            self.gpus()
        )?;
        for (i, ((a, b), p)) in self.stages.iter().enumerate() {
            write!(
                f,
                "{} stage {i} blocks {a}..{b} peak about {:.1} GiB",
                if i == 0 { "" } else { ";" },
                p.peak() / GIB
            )?;
            if !p.measures.is_empty() {
                write!(f, " ({})", p.measures.join(", "))?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = &self.estimate;
        write!(
            f,
            "budget {:.1} GiB: peak about {:.1} GiB (transformer {:.1}, T5 {:.1}{}, CLIP + VAE {:.2});",
            self.budget / GIB,
            self.peak() / GIB,
            e.transformer / GIB,
            e.t5 / GIB,
            match self.options.t5 {
                T5Residency::OnDemand => " while encoding",
                T5Residency::Resident => "",
            },
            e.clip_and_vae / GIB,
        )?;
        for p in &e.phases {
            write!(f, " {} {:.1}", p.name, p.bytes / GIB)?;
        }
        if self.measures.is_empty() {
            write!(f, "; fits as asked")
        } else {
            write!(f, "; measures: {}", self.measures.join(", "))
        }
    }
}

/// Parse a budget: a number of GiB (`24`, `24G`, `24GiB`, `24GB`) or MiB (`20000M`, `20000MiB`).
pub fn parse_budget(s: &str) -> std::result::Result<f64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let (num, unit) = match lower.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&t[..i], &lower[i..]),
        None => (t, "g"),
    };
    let scale = match unit.trim() {
        "g" | "gb" | "gib" => GIB,
        "m" | "mb" | "mib" => (1u64 << 20) as f64,
        other => return Err(format!("`{other}` is not a unit (use G or M, e.g. 24G)")),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size (e.g. 24, 24G, 20000M)"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("`{s}`: a budget must be more than 0"));
    }
    Ok(v * scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::text::{clip_l_config, t5_xxl_config};

    fn dev_1024() -> Workload {
        Workload {
            flux: FluxConfig::dev(),
            t5: t5_xxl_config(),
            clip: clip_l_config(),
            t5_tokens: 512,
            width: 1024,
            height: 1024,
            batch: 1,
            dtype_bytes: 2,
            flux_vae: true,
            gpu: true,
        }
    }

    #[test]
    fn parameter_counts_match_the_published_sizes() {
        // FLUX.1-dev: 11.9 B parameters; T5-XXL's encoder 4.76 B; CLIP-L's text model 123 M.
        let p = FluxParams::of(&FluxConfig::dev());
        let total = p.products + p.modulations + p.other;
        assert!((11.85e9..11.95e9).contains(&(total as f64)), "{total}");
        assert!(
            (3.2e9..3.3e9).contains(&(p.modulations as f64)),
            "{}",
            p.modulations
        );
        let t5 = t5_params(&t5_xxl_config()) as f64;
        assert!((4.70e9..4.80e9).contains(&t5), "{t5}");
        let clip = clip_params(&clip_l_config()) as f64;
        assert!((1.22e8..1.24e8).contains(&clip), "{clip}");
    }

    #[test]
    fn decoder_parameter_count_is_the_built_decoder() -> candle_core::Result<()> {
        use crate::model::vae::{AutoEncoder, VaeConfig};
        use candle_nn::VarMap;
        let map = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(
            &map,
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        );
        AutoEncoder::new_decoder_only(&VaeConfig::flux(), vb)?;
        let n: usize = map.all_vars().iter().map(|v| v.elem_count()).sum();
        assert_eq!(n as u64, FLUX_DECODER_PARAMS);
        Ok(())
    }

    #[test]
    fn lean_fp8_halves_the_products_and_copies_double_them() {
        let p = FluxParams::of(&FluxConfig::dev());
        let bf16 = p.bytes(&LoadOptions::default(), 2);
        let fp8 = LoadOptions {
            fp8: Fp8Groups::ALL,
            ..Default::default()
        };
        let kept = p.bytes(&fp8, 2);
        let lean = p.bytes(&LoadOptions { lean: true, ..fp8 }, 2);
        assert!(kept > bf16 && lean < bf16);
        // The products go from 2 bytes a weight to 1 (plus a 4-byte scale a row).
        assert_eq!(bf16 - lean, p.products - 4 * p.product_rows);
        assert_eq!(kept - bf16, p.products + 4 * p.product_rows);
    }

    #[test]
    fn budgets_take_measures_in_order_and_refuse_what_cannot_fit() {
        let w = dev_1024();
        let roomy = plan(&w, 80.0 * GIB, LoadOptions::default(), true).expect("80 GiB");
        assert!(roomy.measures.is_empty(), "{roomy}");
        let p48 = plan(&w, 48.0 * GIB, LoadOptions::default(), true).expect("48 GiB");
        assert!(p48.measures.is_empty(), "{p48}");
        let p24 = plan(&w, 24.0 * GIB, LoadOptions::default(), true).expect("24 GiB");
        assert_eq!(p24.options.t5, T5Residency::OnDemand, "{p24}");
        assert!(
            p24.options.lean && p24.options.fp8 != Fp8Groups::NONE,
            "{p24}"
        );
        assert!(p24.peak() <= 24.0 * GIB);
        // Without FP8 kernels only T5 can move, and the bf16 transformer (22 GiB) is too big.
        let err = plan(&w, 24.0 * GIB, LoadOptions::default(), false).expect_err("no fp8");
        assert!(err.to_string().contains("sm_89"), "{err}");
        // FP8 asked: dropping the copies comes first.
        let asked = LoadOptions {
            fp8: Fp8Groups::ALL,
            ..Default::default()
        };
        let p = plan(&w, 36.0 * GIB, asked, true).expect("36 GiB");
        assert_eq!(
            p.measures.first(),
            Some(&"FP8 weights without their bf16 copies")
        );
        // Nothing fits in 4 GiB.
        assert!(plan(&w, 4.0 * GIB, LoadOptions::default(), true).is_err());
    }

    #[test]
    fn stages_hold_their_blocks_and_every_stage_the_rest() {
        let c = FluxConfig::dev();
        let whole = FluxParams::of(&c);
        let none = FluxParams::of_blocks(&c, 0..0);
        assert_eq!((none.products, none.modulations), (0, 0));
        // Three stages split by memory: the blocks' parameters add up to the whole model's, and
        // what is outside the blocks is on every stage.
        let parts: Vec<FluxParams> = (0..3)
            .map(|s| FluxParams::of_blocks(&c, stage_split(&c, 3, s, StageBalance::Memory)))
            .collect();
        let sum = |f: fn(&FluxParams) -> u64| parts.iter().map(f).sum::<u64>();
        assert_eq!(sum(|p| p.products), whole.products);
        assert_eq!(sum(|p| p.modulations), whole.modulations);
        assert_eq!(
            sum(|p| p.other) - whole.other,
            2 * none.other,
            "the embedders and final layer are counted once per stage"
        );
        // A stage plans within a budget one GPU does not meet, and keeps its blocks' K/V.
        let w = dev_1024();
        let stage = LoadOptions {
            blocks: Some((0, 12)),
            ..Default::default()
        };
        let kv = 2.0 * 12.0 * (4096.0 + 512.0) * 3072.0 * 2.0;
        let (a, b) = (estimate(&w, &stage), estimate(&w, &LoadOptions::default()));
        // Twelve of the 19 double blocks: about a third of the weights (a double block holds 2.4
        // times a single block's).
        assert!(a.transformer < b.transformer / 2.0 && a.transformer > b.transformer / 4.0);
        let denoise = |e: &Estimate| e.phases[1].bytes - e.transformer;
        assert!((denoise(&a) - denoise(&b) - kv).abs() < 1.0, "{a:?} {b:?}");
        let s = plan_stages(&w, 16.0 * GIB, LoadOptions::default(), true).expect("16 GiB");
        assert!(s.gpus() >= 2 && s.stages.iter().all(|(_, p)| p.peak() <= 16.0 * GIB));
        assert!(plan_stages(&w, 8.0 * GIB, LoadOptions::default(), true).is_err());
    }

    #[test]
    fn budgets_parse_with_units() {
        assert_eq!(parse_budget("24"), Ok(24.0 * GIB));
        assert_eq!(parse_budget("24G"), Ok(24.0 * GIB));
        assert_eq!(parse_budget("24 GiB"), Ok(24.0 * GIB));
        assert_eq!(parse_budget("2048M"), Ok(2.0 * GIB));
        assert!(parse_budget("0").is_err());
        assert!(parse_budget("lots").is_err());
        assert!(parse_budget("24T").is_err());
    }
}
