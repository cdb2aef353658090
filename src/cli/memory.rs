//! `parallax memory`: what one image of a model needs on one GPU under each memory budget, which
//! measures each budget takes, and where one GPU is not enough, how many GPUs of that size would
//! do as PipeFusion stages split by memory (estimated from the configs; no weights are read, and
//! `dev`/`schnell`/`klein-4b`/`klein-9b` need not be downloaded: their built-in configs stand
//! in). Measures a family's loader does not build yet, and estimates not measured for it, are
//! said so.

use clap::Args;

use super::ModelArgs;
use crate::engine::memory::{self, parse_budget};
use crate::engine::{load, DTypeChoice};
use crate::model::flux::Fp8Groups;

#[derive(Debug, Clone, Args)]
pub struct MemoryArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Image width in pixels.
    #[arg(long, default_value_t = 1024)]
    pub width: usize,
    #[arg(long, default_value_t = 1024)]
    pub height: usize,
    /// Budgets to plan for, one GPU's memory each (GiB without a unit; `--budget 11` for one).
    #[arg(long, visible_alias = "budget", value_delimiter = ',', value_parser = parse_budget, default_value = "8,10,12,16,24,48,80")]
    pub budgets: Vec<f64>,
    /// Plan for a GPU without FP8 products (before sm_89).
    #[arg(long)]
    pub no_fp8: bool,
    /// Print JSON instead of lines.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: MemoryArgs) -> anyhow::Result<()> {
    let resolved = a.model.choice().resolve_for_planning()?;
    let choice = a.model.choice();
    let dtype = match choice.dtype {
        DTypeChoice::F32 => candle_core::DType::F32,
        DTypeChoice::F16 => candle_core::DType::F16,
        _ => candle_core::DType::BF16,
    };
    let w = load::workload(&resolved, dtype, Some((a.width, a.height)), true)?;
    let asked = choice.precision.load_options();
    let gib = |b: f64| b / (1u64 << 30) as f64;
    let whole = memory::estimate(&w, &asked);
    // What the bf16 copies of the FP8 products would add (the products' weights in the dtype).
    let copies_bytes =
        (w.transformer.held(0..w.transformer.blocks.len()).products * w.dtype_bytes) as f64;
    let mut rows = Vec::new();
    if !a.json {
        for r in &resolved.reasons {
            println!("{r}");
        }
        println!(
            "{} at {}x{} px, {:?}: as asked, peak about {:.1} GiB (transformer {:.1}, {} {:.1})",
            a.model.model,
            a.width,
            a.height,
            dtype,
            gib(whole.peak()),
            gib(whole.transformer),
            w.text.name,
            gib(whole.text)
        );
        for n in &w.notes {
            println!("note: {n}");
        }
        if let Some(line) = fp8_copies_line(&asked, gib(copies_bytes)) {
            println!("{line}");
        }
    }
    for &b in &a.budgets {
        match memory::plan(&w, b, asked, !a.no_fp8) {
            Ok(p) => {
                if !a.json {
                    println!("  {p}");
                }
                rows.push(serde_json::json!({
                    "budget_gib": gib(b),
                    "fits": true,
                    "peak_gib": gib(p.peak()),
                    "transformer_gib": gib(p.estimate.transformer),
                    "phases_gib": p.estimate.phases.iter().map(|ph| (ph.name, gib(ph.bytes))).collect::<std::collections::BTreeMap<_, _>>(),
                    "measures": p.measures,
                    "not_built": p.unbuilt,
                }));
            }
            Err(e) => {
                let stages = memory::plan_stages(&w, b, asked, !a.no_fp8);
                if !a.json {
                    println!(
                        "  budget {:.1} GiB: one GPU is not enough: {}",
                        gib(b),
                        reason(&e)
                    );
                    match &stages {
                        Ok(s) => println!("    {s}"),
                        Err(why) => println!(
                            "    no number of {:.1} GiB GPUs would, even one block per GPU as \
                             PipeFusion stages: {}",
                            gib(b),
                            reason(why)
                        ),
                    }
                }
                let gpus = match &stages {
                    Ok(s) => serde_json::json!({
                        "gpus": s.gpus(),
                        "balance": "memory",
                        "not_built": s.unbuilt,
                        "stages": s.stages.iter().map(|((start, end), p)| serde_json::json!({
                            "blocks": [start, end],
                            "peak_gib": gib(p.peak()),
                            "measures": p.measures,
                        })).collect::<Vec<_>>(),
                    }),
                    Err(why) => serde_json::json!({ "gpus": null, "why": reason(why) }),
                };
                rows.push(serde_json::json!({
                    "budget_gib": gib(b),
                    "fits": false,
                    "why": reason(&e),
                    "pipefusion": gpus,
                }));
            }
        }
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": a.model.model,
                "family": w.family,
                "source": resolved.reasons,
                "notes": w.notes,
                "width": a.width,
                "height": a.height,
                "fp8_products": !a.no_fp8,
                "fp8_bf16_copies": match (asked.fp8 == Fp8Groups::NONE, asked.lean) {
                    (true, _) => serde_json::Value::Null,
                    (false, true) => "dropped".into(),
                    (false, false) => "kept".into(),
                },
                "as_asked_peak_gib": gib(whole.peak()),
                "budgets": rows,
            }))?
        );
    }
    Ok(())
}

/// A plan's refusal in the words of its reason alone: the line already names the budget, so the
/// error's own "invalid setting `memory budget` = ..." preamble would say it twice.
fn reason(e: &crate::error::Error) -> String {
    match e {
        crate::error::Error::InvalidSetting { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

/// What an FP8 run does with the bf16 copies of its products' weights (none without FP8).
fn fp8_copies_line(asked: &crate::pipeline::LoadOptions, copies_gib: f64) -> Option<String> {
    if asked.fp8 == Fp8Groups::NONE {
        return None;
    }
    Some(if asked.lean {
        format!(
            "  FP8: the blocks' product weights are held in E4M3 alone on GPUs with FP8 products \
             (their bf16 copies, {copies_gib:.1} GiB, are dropped; no feature needs them; \
             PARALLAX_FP8_KEEP_BF16=1 keeps them)"
        )
    } else {
        format!(
            "  FP8: the bf16 copies of the blocks' product weights are kept \
             (PARALLAX_FP8_KEEP_BF16: {copies_gib:.1} GiB more, dropped first under a budget)"
        )
    })
}
