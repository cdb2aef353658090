//! Memory budgets: what a generation holds on one GPU, phase by phase, and which measures
//! (`--memory-budget`) bring a model within a card's memory, for any family whose parts are
//! counted here ([`Workload::flux1`], [`Workload::klein`]).
//!
//! The estimate counts the weights from the family's configs (FLUX.1: exact up to biases and
//! norms; klein: exact, checked against the built models) and the work space of each phase
//! from this project's own measurements of FLUX.1 on an H200 (the decode's peak from
//! `bench-vae`, the denoising activations per token from `bench`); BENCHMARKS.md sets the
//! estimate beside the peak a device run measured. klein's work space is an estimate until a
//! GPU run measures it ([`Workload::notes`]): its decoder has FLUX.1's widths (the same decode
//! fit), its transformer's activations scale with its width and tokens as FLUX.1's do, with a
//! wider fused projection. The measures, in the order they are taken (least cost to the image
//! first):
//!
//! 1. **FP8 without the bf16 copies** when `--precision fp8` was asked with the copies kept
//!    (`PARALLAX_FP8_KEEP_BF16=1`; since issue 30 FP8 drops them by default:
//!    [`crate::engine::Precision::load_options`]): the E4M3 weights stand alone (no cost
//!    beyond FP8's own).
//! 2. **The large text encoder on demand** (FLUX.1's T5-XXL, 9.5 GB in bf16; klein's Qwen3):
//!    built for each prompt and freed after it. No cost to the image; each prompt reads its
//!    weights again (seconds, from the page cache).
//! 3. **FP8 products** (when not asked): the blocks' products in E4M3 and the bf16 copies
//!    dropped. Costs FP8's error (BENCHMARKS.md: about 2 % of the velocity on the demo model).
//! 4. **Modulations in FP8, weight-only** (FLUX.1 only): the adaLN modulations are a quarter of
//!    FLUX.1's weights; stored in E4M3 they halve, and their input stays bf16. klein shares three
//!    modulations across its blocks (4 % of its weights): the measure does not apply.
//!
//! FP8 needs an sm_89 or newer GPU in bf16; elsewhere only measure 2 applies. A family whose
//! loader does not build a measure yet ([`Workload::unbuilt`]) is still planned with it, and
//! the plan says which of its measures are not built ([`MemoryPlan::unbuilt`]).

use std::fmt;

use candle_transformers::models::clip::text_model::ClipTextConfig;
use candle_transformers::models::t5;

use crate::error::{Error, Result};
use crate::model::family::ParamCounts;
use crate::model::flux::{FluxConfig, Fp8Groups};
use crate::model::klein::KleinConfig;
use crate::model::qwen3::Qwen3Config;
use crate::model::text::T5Residency;
use crate::model::vae::VaeConfig;
use crate::parallel::pipefusion::{split_blocks, StageBalance};
use crate::pipeline::LoadOptions;

const GIB: f64 = (1u64 << 30) as f64;

/// Parameters of FLUX.1's autoencoder decoder (`VaeConfig::flux`; counted by a test).
pub const FLUX_DECODER_PARAMS: u64 = 49_545_475;

/// Device memory outside the tensors counted here: the CUDA context, cuBLAS/cuBLASLt
/// workspaces, the allocator's slack. On an H200 the device's used memory at dev 1024 px ran
/// 1.9 GiB above the tensors counted here plus 1.25 GiB in bf16 and 0.9 GiB below in FP8 with
/// the bf16 copies kept (BENCHMARKS.md): 2.5 GiB sits between, good to about 1 GiB.
const OVERHEAD: f64 = 2.5 * GIB;

/// Hidden-sized bf16 rows a token keeps alive in FLUX.1's widest block (measured: the
/// denoising activations per token and image in the batch).
const FLUX1_ACTIVATION_ROWS: usize = 16;

/// klein's estimate of the same: FLUX.1's 16 scaled by the widest product's output, its fused
/// single-block projection (`3h + 2m` = 9 widths against FLUX.1's `3h + m` = 7), rounded up.
const KLEIN_ACTIVATION_ROWS: usize = 21;

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

/// A transformer as the estimate counts it: each block's parameters by kind (the unified
/// numbering, double blocks first), what every stage holds outside the blocks, the parts outside
/// them that only some stages hold, and its width.
#[derive(Debug, Clone, PartialEq)]
pub struct TransformerCounts {
    pub blocks: Vec<ParamCounts>,
    pub outside: ParamCounts,
    /// Parts outside the blocks held by a stage holding any of the blocks beside them (klein's
    /// shared modulations, input projections, final layer); none for FLUX.1.
    pub parts: Vec<(ParamCounts, std::ops::Range<usize>)>,
    pub hidden: usize,
}

impl TransformerCounts {
    /// FLUX.1's, from its config.
    pub fn flux1(c: &FluxConfig) -> Self {
        Self {
            blocks: c.block_param_counts(),
            outside: c.outside_param_counts(),
            parts: Vec::new(),
            hidden: c.hidden_size,
        }
    }

    /// klein's, from its config.
    pub fn klein(c: &KleinConfig) -> Self {
        Self {
            blocks: c.block_param_counts(),
            outside: c.outside_param_counts(),
            parts: crate::model::klein::StagePart::ALL
                .iter()
                .map(|&p| (c.part_param_counts(p), c.part_users(p)))
                .collect(),
            hidden: c.hidden_size,
        }
    }

    /// What a device holding `blocks` keeps.
    pub fn held(&self, blocks: std::ops::Range<usize>) -> ParamCounts {
        let parts = self
            .parts
            .iter()
            .filter(|(_, users)| crate::model::step::shares_blocks(&blocks, users))
            .map(|(c, _)| *c)
            .sum::<ParamCounts>();
        ParamCounts::held(&self.blocks, self.outside, blocks) + parts
    }

    /// Every parameter, each block's and outside them.
    pub fn total(&self) -> u64 {
        self.held(0..self.blocks.len()).total()
    }
}

/// The text encoder a prompt needs that may be built for each prompt and freed after it
/// (FLUX.1's T5, klein's Qwen3).
#[derive(Debug, Clone, PartialEq)]
pub struct TextCounts {
    /// Its name in messages (`T5`, `Qwen3`).
    pub name: &'static str,
    /// The parameters it loads.
    pub params: u64,
    /// Tokens a prompt takes (the joint sequence's text part).
    pub tokens: usize,
    /// Its work space while encoding, in bytes: a few hidden-sized rows per token in bf16 and
    /// the attention scores in f32.
    pub work: f64,
    /// The measure that builds it for each prompt ([`MemoryPlan::measures`]' words).
    pub on_demand: &'static str,
}

impl TextCounts {
    fn new(
        name: &'static str,
        params: u64,
        tokens: usize,
        (width, heads): (usize, usize),
        on_demand: &'static str,
    ) -> Self {
        Self {
            name,
            params,
            tokens,
            work: (tokens * width * 2 * 8 + heads * tokens * tokens * 4) as f64,
            on_demand,
        }
    }
}

/// The measures' names (as [`MemoryPlan::measures`] lists them).
pub const LEAN_FP8: &str = "FP8 weights without their bf16 copies";
pub const T5_ON_DEMAND: &str = "T5 built for each prompt and freed after it";
pub const QWEN3_ON_DEMAND: &str = "Qwen3 built for each prompt and freed after it";
pub const FP8_PRODUCTS: &str = "FP8 products (bf16 copies dropped)";
pub const FP8_MODULATIONS: &str = "adaLN modulations stored in FP8 (weight-only)";

/// What a generation is: the model's parts, counted from its family's configs, and the image.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The family, in messages (`FLUX.1`, `FLUX.2 klein`).
    pub family: &'static str,
    pub transformer: TransformerCounts,
    pub text: TextCounts,
    /// Parameters held throughout besides the transformer and `text`: FLUX.1's CLIP and the
    /// autoencoder's decoder.
    pub resident_params: u64,
    /// What `resident_params` are, in messages (`CLIP + VAE`).
    pub resident_name: &'static str,
    pub width: usize,
    pub height: usize,
    /// Images through the transformer at once (2 with true CFG on one device).
    pub batch: usize,
    /// Bytes per weight value in the run's dtype.
    pub dtype_bytes: u64,
    /// An autoencoder of FLUX.1's widths (the decode's measured peak applies); else the demo's
    /// small one.
    pub flux_vae: bool,
    /// On a GPU (the CUDA context and workspaces count).
    pub gpu: bool,
    /// Hidden-sized bf16 rows a token keeps alive in the widest block.
    pub activation_rows: usize,
    /// Whether the modulations-in-FP8 measure applies (FLUX.1's per-block modulations).
    pub fp8_modulations: bool,
    /// Measures that apply to the family but that its loader does not build yet (their names),
    /// and whether PipeFusion stages split by memory are not built for it yet.
    pub unbuilt: Vec<&'static str>,
    pub stages_unbuilt: bool,
    /// What in the estimate is not measured for this family (empty: measured).
    pub notes: Vec<&'static str>,
}

impl Workload {
    /// FLUX.1 (`cfg`, its T5 and CLIP with `t5_tokens` prompt tokens) on a `width` x `height`
    /// image in a dtype of `dtype_bytes`; `flux_vae`: FLUX.1's autoencoder (else the demo's).
    #[allow(clippy::too_many_arguments)]
    pub fn flux1(
        cfg: &FluxConfig,
        t5: &t5::Config,
        clip: &ClipTextConfig,
        t5_tokens: usize,
        (width, height): (usize, usize),
        dtype_bytes: u64,
        flux_vae: bool,
        gpu: bool,
    ) -> Self {
        Self {
            family: "FLUX.1",
            transformer: TransformerCounts::flux1(cfg),
            text: TextCounts::new(
                "T5",
                t5_params(t5),
                t5_tokens,
                (t5.d_model, t5.num_heads),
                T5_ON_DEMAND,
            ),
            resident_params: clip_params(clip) + FLUX_DECODER_PARAMS,
            resident_name: "CLIP + VAE",
            width,
            height,
            batch: 1,
            dtype_bytes,
            flux_vae,
            gpu,
            activation_rows: FLUX1_ACTIVATION_ROWS,
            fp8_modulations: true,
            unbuilt: Vec::new(),
            stages_unbuilt: false,
            notes: Vec::new(),
        }
    }

    /// FLUX.2 klein (`cfg`, its Qwen3 `text` read through the last of `text_layers`, `tokens`
    /// prompt tokens, its autoencoder `vae`) on a `width` x `height` image. Its loader builds the
    /// measures (lean FP8 and FP8 products converted block by block as they load, Qwen3 built
    /// for each prompt: `crate::pipeline::Pipeline::load_klein`) and PipeFusion stages holding
    /// only their blocks.
    #[allow(clippy::too_many_arguments)]
    pub fn klein(
        cfg: &KleinConfig,
        text: &Qwen3Config,
        text_layers: usize,
        tokens: usize,
        vae: &VaeConfig,
        (width, height): (usize, usize),
        dtype_bytes: u64,
        gpu: bool,
    ) -> Self {
        // The decoder and the 1x1 `post_quant_conv` before it.
        let z = vae.z_channels as u64;
        let flux_vae = vae.ch == VaeConfig::flux().ch && vae.ch_mult == VaeConfig::flux().ch_mult;
        Self {
            family: "FLUX.2 klein",
            transformer: TransformerCounts::klein(cfg),
            text: TextCounts::new(
                "Qwen3",
                text.params_through(text_layers),
                tokens,
                (text.hidden_size, text.num_attention_heads),
                QWEN3_ON_DEMAND,
            ),
            resident_params: vae.decoder_params() + z * z + z,
            resident_name: "VAE",
            width,
            height,
            batch: 1,
            dtype_bytes,
            flux_vae,
            gpu,
            activation_rows: KLEIN_ACTIVATION_ROWS,
            fp8_modulations: false,
            unbuilt: Vec::new(),
            stages_unbuilt: false,
            notes: vec![
                "klein's work space is estimated, not measured: the decode as FLUX.1's (the \
                 same decoder widths), the denoising activations as FLUX.1's per token and \
                 width with its wider fused projection (21 rows a token against FLUX.1's 16)",
            ],
        }
    }
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
    /// The text encoder that may be built on demand ([`Workload::text`]).
    pub text: f64,
    /// What stays besides ([`Workload::resident_params`]).
    pub resident: f64,
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
    let blocks = opts.block_range(w.transformer.blocks.len());
    let transformer = w
        .transformer
        .held(blocks.clone())
        .bytes(opts, w.dtype_bytes) as f64;
    let text = (w.text.params * w.dtype_bytes) as f64;
    let resident = (w.resident_params * w.dtype_bytes) as f64;
    let resident_text = match opts.t5 {
        T5Residency::Resident => text,
        T5Residency::OnDemand => 0.0,
    };
    let overhead = if w.gpu { OVERHEAD } else { 0.0 };
    let held = transformer + resident_text + resident + overhead;
    let decode_bytes = if w.flux_vae {
        decode(w.width * w.height)
    } else {
        // The demo's autoencoder: a few 128-channel f32 maps at full size.
        (w.width * w.height * 128 * 4 * 4) as f64
    };
    let image_tokens = (w.width / 16) * (w.height / 16);
    let tokens = image_tokens + w.text.tokens;
    // A PipeFusion stage keeps every one of its blocks' keys and values for the whole sequence
    // (the patches' one-step-stale K/V).
    let stage_kv = if opts.blocks.is_some() {
        (2 * blocks.len() * tokens * w.transformer.hidden * w.batch) as f64 * w.dtype_bytes as f64
    } else {
        0.0
    };
    // The denoising activations per token and image in the batch, in bf16.
    let activations = (tokens * w.batch * w.transformer.hidden * w.activation_rows * 2) as f64;
    let phases = vec![
        Phase {
            name: "text encoders",
            bytes: held - resident_text + text + w.text.work,
        },
        Phase {
            name: "denoising",
            bytes: held + activations + stage_kv,
        },
        Phase {
            name: "decode",
            bytes: held + decode_bytes,
        },
    ];
    Estimate {
        transformer,
        text,
        resident,
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
    /// Those of `measures` the family's loader does not build yet ([`Workload::unbuilt`]).
    pub unbuilt: Vec<&'static str>,
    /// The family planned for (`FLUX.1`, ...), and what its encoder and the rest are called.
    pub family: &'static str,
    pub names: (&'static str, &'static str),
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
        (LEAN_FP8, |o, ok| {
            ok && o.fp8 != Fp8Groups::NONE && !o.lean && {
                o.lean = true;
                true
            }
        }),
        (w.text.on_demand, |o, _| {
            o.t5 == T5Residency::Resident && {
                o.t5 = T5Residency::OnDemand;
                true
            }
        }),
        (FP8_PRODUCTS, |o, ok| {
            ok && o.fp8 == Fp8Groups::NONE && {
                o.fp8 = Fp8Groups::ALL;
                o.lean = true;
                true
            }
        }),
        (FP8_MODULATIONS, |o, ok| {
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
        if name == FP8_MODULATIONS && !w.fp8_modulations {
            continue;
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
                 transformer {:.1} GiB, {} {:.1} GiB{fp8}; try a smaller image or a larger budget",
                w.width,
                w.height,
                est.peak() / GIB,
                phases,
                est.transformer / GIB,
                w.text.name,
                est.text / GIB,
            ),
        ));
    }
    let unbuilt = measures
        .iter()
        .copied()
        .filter(|m| w.unbuilt.contains(m))
        .collect();
    Ok(MemoryPlan {
        budget,
        options: opts,
        measures,
        unbuilt,
        family: w.family,
        names: (w.text.name, w.resident_name),
        estimate: est,
    })
}

/// GPUs of one size that together hold a model no single one does: PipeFusion stages split by
/// memory ([`StageBalance::Memory`]), each stage planned within the budget.
#[derive(Debug, Clone)]
pub struct StagePlans {
    /// Each stage's blocks (`start`, `end`) and plan; as many stages as GPUs.
    pub stages: Vec<((usize, usize), MemoryPlan)>,
    /// The family's loader does not build PipeFusion stages yet (a plan, said so).
    pub unbuilt: bool,
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
    let params: Vec<u64> = w
        .transformer
        .blocks
        .iter()
        .map(ParamCounts::total)
        .collect();
    let n = params.len();
    for gpus in 2..=n {
        let stages: Result<Vec<_>> = (0..gpus)
            .map(|s| {
                let r = split_blocks(&params, gpus, s, StageBalance::Memory);
                let opts = LoadOptions {
                    blocks: Some((r.start, r.end)),
                    ..asked
                };
                plan(w, budget, opts, fp8_ok).map(|p| ((r.start, r.end), p))
            })
            .collect();
        if let Ok(stages) = stages {
            return Ok(StagePlans {
                stages,
                unbuilt: w.stages_unbuilt,
            });
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
            "fits on one GPU (peak about {:.1} GiB) with {}{}",
            p.peak() / GIB,
            p.measures.join(", "),
            unbuilt_note(p.family, &p.measures, &p.unbuilt)
        ),
        Err(_) => match plan_stages(w, budget, asked, fp8_ok) {
            Ok(s) => format!(
                "one GPU is not enough; {} GPUs of {:.0} GiB would, as PipeFusion stages split by \
                 memory{}",
                s.gpus(),
                budget / GIB,
                if s.unbuilt {
                    unbuilt_note(w.family, &[], &["PipeFusion stages"])
                } else {
                    String::new()
                }
            ),
            Err(e) => format!("no number of {:.0} GiB GPUs would: {e}", budget / GIB),
        },
    }
}

/// ` (not built for FLUX.2 klein yet: ...; planned as if they were)` for the `unbuilt` of
/// `measures` (all of them: not named again), or nothing when every measure is built.
fn unbuilt_note(family: &str, measures: &[&str], unbuilt: &[&str]) -> String {
    if unbuilt.is_empty() {
        String::new()
    } else if unbuilt == measures {
        format!(" (not built for {family} yet: planned as if they were)")
    } else {
        format!(
            " (not built for {family} yet: {}; planned as if they were)",
            unbuilt.join(", ")
        )
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
        if self.unbuilt {
            let family = self.stages.first().map_or("", |(_, p)| p.family);
            let mut unbuilt = vec!["PipeFusion stages"];
            for m in self.stages.iter().flat_map(|(_, p)| &p.unbuilt) {
                if !unbuilt.contains(m) {
                    unbuilt.push(m);
                }
            }
            write!(f, "{}", unbuilt_note(family, &[], &unbuilt))?;
        }
        Ok(())
    }
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = &self.estimate;
        write!(
            f,
            "budget {:.1} GiB: peak about {:.1} GiB (transformer {:.1}, {} {:.1}{}, {} {:.2});",
            self.budget / GIB,
            self.peak() / GIB,
            e.transformer / GIB,
            self.names.0,
            e.text / GIB,
            match self.options.t5 {
                T5Residency::OnDemand => " while encoding",
                T5Residency::Resident => "",
            },
            self.names.1,
            e.resident / GIB,
        )?;
        for p in &e.phases {
            write!(f, " {} {:.1}", p.name, p.bytes / GIB)?;
        }
        if self.measures.is_empty() {
            write!(f, "; fits as asked")
        } else {
            write!(
                f,
                "; measures: {}{}",
                self.measures.join(", "),
                unbuilt_note(self.family, &self.measures, &self.unbuilt)
            )
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
        Workload::flux1(
            &FluxConfig::dev(),
            &t5_xxl_config(),
            &clip_l_config(),
            512,
            (1024, 1024),
            2,
            true,
            true,
        )
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
        use crate::model::vae::AutoEncoder;
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
        assert_eq!(VaeConfig::flux().decoder_params(), FLUX_DECODER_PARAMS);
        Ok(())
    }

    /// Parameters a model built on `map` holds.
    fn built(map: &candle_nn::VarMap) -> u64 {
        map.all_vars().iter().map(|v| v.elem_count() as u64).sum()
    }

    fn var_builder(map: &candle_nn::VarMap) -> candle_nn::VarBuilder<'_> {
        candle_nn::VarBuilder::from_varmap(map, candle_core::DType::F32, &candle_core::Device::Cpu)
    }

    /// klein's counted parts are the built models' parameters: the transformer (tiny, with and
    /// without a guidance embedder, and one of its stages), the Qwen3 read through klein's last
    /// layer, the autoencoder's decoding half (`random:klein-tiny`'s and the real size's).
    #[test]
    fn klein_counts_are_the_built_models() -> candle_core::Result<()> {
        use crate::model::klein::{self, text::KLEIN_TEXT_LAYERS, Klein, KleinVae};
        use crate::model::qwen3::Qwen3;
        for cfg in [
            KleinConfig::tiny(),
            KleinConfig {
                guidance_embed: true,
                depth: 3,
                ..KleinConfig::tiny()
            },
        ] {
            let map = candle_nn::VarMap::new();
            Klein::new(&cfg, var_builder(&map))?;
            let counts = TransformerCounts::klein(&cfg);
            assert_eq!(built(&map), counts.total(), "{cfg:?}");
            // A stage: its blocks and what it uses outside them (the first stage's input
            // projections, the shared modulations of its kinds of block, the last stage's final
            // layer).
            for blocks in [1..4, 0..2, 2..3, 4..cfg.num_blocks()] {
                let map = candle_nn::VarMap::new();
                Klein::new_stage(&cfg, var_builder(&map), blocks.clone())?;
                let held = counts.held(blocks.clone()).total();
                assert_eq!(built(&map), held, "{blocks:?} of {cfg:?}");
            }
        }
        let last = KLEIN_TEXT_LAYERS[KLEIN_TEXT_LAYERS.len() - 1];
        let q = Qwen3Config::tiny();
        let map = candle_nn::VarMap::new();
        Qwen3::new_partial(&q, var_builder(&map), last)?;
        for vae in [klein::tiny_vae_config(), klein::vae_config()] {
            let w = Workload::klein(
                &KleinConfig::tiny(),
                &q,
                last,
                512,
                &vae,
                (256, 256),
                4,
                false,
            );
            assert_eq!(w.text.params, built(&map));
            let vmap = candle_nn::VarMap::new();
            KleinVae::new_unnormalised(&vae, var_builder(&vmap))?;
            assert_eq!(w.resident_params, built(&vmap), "{vae:?}");
        }
        // The published sizes: about 3.9 and 9.1 billion parameters in the transformers.
        for (cfg, range) in [
            (KleinConfig::klein_4b(), 3.8e9..4.0e9),
            (KleinConfig::klein_9b(), 8.9e9..9.3e9),
        ] {
            let t = TransformerCounts::klein(&cfg).total() as f64;
            assert!(range.contains(&t), "{t}");
        }
        Ok(())
    }

    fn klein_1024(cfg: KleinConfig, text: Qwen3Config) -> Workload {
        use crate::model::klein;
        Workload::klein(
            &cfg,
            &text,
            27,
            512,
            &klein::vae_config(),
            (1024, 1024),
            2,
            true,
        )
    }

    /// klein's budgets: 4B fits a 24 GiB card as asked and 16 GiB with Qwen3 on demand; 13 GiB
    /// takes FP8 products too, and 12 GiB is not enough; the modulations measure never applies;
    /// every measure taken is one its loader builds, so the plan calls none unbuilt.
    #[test]
    fn klein_budgets_take_the_measures_that_apply_to_it() {
        let w4 = klein_1024(KleinConfig::klein_4b(), Qwen3Config::qwen3_4b());
        let w9 = klein_1024(KleinConfig::klein_9b(), Qwen3Config::qwen3_8b());
        let asked = LoadOptions::default();
        let p24 = plan(&w4, 24.0 * GIB, asked, true).expect("24 GiB");
        assert!(p24.measures.is_empty(), "{p24}");
        let p16 = plan(&w4, 16.0 * GIB, asked, true).expect("16 GiB");
        assert_eq!(p16.measures, vec![QWEN3_ON_DEMAND], "{p16}");
        assert!(!p16.to_string().contains("not built"), "{p16}");
        assert!(p16.to_string().contains("Qwen3"), "{p16}");
        // 12 GiB: with FP8 products too, encoding still holds the transformer beside Qwen3.
        let e12 = plan(&w4, 12.0 * GIB, asked, true).expect_err("12 GiB");
        assert!(e12.to_string().contains("text encoders"), "{e12}");
        assert!(e12.to_string().contains("Qwen3"), "{e12}");
        let p13 = plan(&w4, 13.0 * GIB, asked, true).expect("13 GiB");
        assert_eq!(p13.measures, vec![QWEN3_ON_DEMAND, FP8_PRODUCTS], "{p13}");
        assert!(p13.peak() <= 13.0 * GIB);
        for w in [&w4, &w9] {
            for b in [8.0, 10.0, 12.0, 16.0, 24.0] {
                if let Ok(p) = plan(w, b * GIB, asked, true) {
                    assert!(!p.measures.contains(&FP8_MODULATIONS), "{p}");
                    assert!(p.unbuilt.is_empty(), "{p}");
                }
            }
        }
        // 9B: more than a 24 GiB card holds as asked; without FP8 not even with Qwen3 on demand.
        assert!(!plan(&w9, 24.0 * GIB, asked, true)
            .expect("24 GiB")
            .measures
            .is_empty());
        let err = plan(&w9, 16.0 * GIB, asked, false).expect_err("no FP8");
        assert!(err.to_string().contains("Qwen3"), "{err}");
        // Its stages split by memory are planned, and built (each GPU loads its stage only).
        let s = plan_stages(&w9, 20.0 * GIB, asked, false).expect("stages");
        assert!(
            !s.unbuilt && !s.to_string().contains("PipeFusion stages;"),
            "{s}"
        );
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
        assert_eq!(p.measures.first(), Some(&LEAN_FP8));
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
            .map(|s| {
                FluxParams::of_blocks(
                    &c,
                    crate::parallel::pipefusion::stage_split(&c, 3, s, StageBalance::Memory),
                )
            })
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
