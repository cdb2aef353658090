//! `parallax plan`: the predicted step time of every valid layout on N devices
//! ([`crate::parallel::cost`]), fastest first, with the assumptions under the table. No weights
//! are read (`dev`/`schnell` need not be downloaded: their built-in configs stand in). With
//! `--calibrate` the CPU's numbers are measured here first: `random:tiny`'s one-worker step at
//! three sizes and the worker threads' collectives ([`measure_cpu`]).

use std::time::Instant;

use anyhow::Context;
use clap::Args;

use crate::engine::{load, Degrees, Devices, Engine, LayoutChoice, ModelChoice, Placement};
use crate::parallel::cost::{self, Calibration, Link, Prediction, Shape};
use crate::parallel::mesh::{ParallelLayout, Stale};
use crate::pipeline::GenerateRequest;

#[derive(Debug, Clone, Args)]
pub struct PlanArgs {
    /// Devices: GPUs, or CPU worker threads with `--link cpu`.
    #[arg(long, visible_alias = "workers", default_value_t = 4)]
    pub gpus: usize,
    /// How they are linked: `nvlink`, `pcie` or `cpu` (worker threads in one process).
    #[arg(long, default_value = "nvlink")]
    pub link: String,
    /// Image size, WIDTHxHEIGHT in pixels.
    #[arg(long, default_value = "1024x1024", value_parser = parse_size)]
    pub size: (usize, usize),
    /// `dev`, `schnell`, `demo` or any model `generate` takes (only its config is read).
    #[arg(long, default_value = "dev")]
    pub model: String,
    /// Denoising steps (the approximate layouts' exact warm-up step is one of them).
    #[arg(long, default_value_t = 28)]
    pub steps: usize,
    /// Two branches a step (a negative prompt with a true-CFG scale): CFG parallelism is listed.
    #[arg(long)]
    pub true_cfg: bool,
    /// Per-call latency of a collective in microseconds, instead of the link's (e.g. 340, what
    /// SGLang observed per NCCL all-to-all inside a whole model).
    #[arg(long)]
    pub latency_us: Option<f64>,
    /// Link bandwidth per direction in GB/s, instead of the link's.
    #[arg(long)]
    pub bandwidth_gbs: Option<f64>,
    /// Measure this machine's CPU first (with `--link cpu`): `random:tiny`'s one-worker step at
    /// three sizes and the worker threads' collectives (about half a minute).
    #[arg(long)]
    pub calibrate: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `1024x768` -> (1024, 768).
fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("`{s}`: give WIDTHxHEIGHT, e.g. 1024x1024"))?;
    let num = |t: &str| {
        t.trim()
            .parse::<usize>()
            .ok()
            .filter(|&v| v >= 16)
            .ok_or_else(|| format!("`{s}`: the width and height are pixel counts of 16 or more"))
    };
    Ok((num(w)?, num(h)?))
}

pub fn run(a: PlanArgs) -> anyhow::Result<()> {
    let base = Link::named(&a.link)
        .ok_or_else(|| anyhow::anyhow!("--link `{}`: give nvlink, pcie or cpu", a.link))?;
    if a.gpus == 0 {
        anyhow::bail!("--gpus 0: give the number of devices, 1 or more");
    }
    if a.calibrate && base.sharing == cost::Sharing::Own {
        anyhow::bail!("--calibrate measures this machine's CPU: use it with --link cpu");
    }
    let resolved = ModelChoice::named(&a.model).resolve_for_planning()?;
    let cfg = load::model_config(&resolved)?;
    let gpu = base.sharing == cost::Sharing::Own;
    let dtype = if gpu {
        candle_core::DType::BF16
    } else {
        candle_core::DType::F32
    };
    let w = load::workload(&resolved, dtype, Some(a.size), gpu)?;
    let shape = Shape::of(&cfg, w.text.tokens, a.size, dtype.size_in_bytes());
    let (cal, mut link) = if a.calibrate {
        measure_cpu().context("measuring this machine's CPU")?
    } else if gpu {
        (Calibration::hopper_bf16(), base)
    } else {
        (Calibration::cpu_threads(), base)
    };
    if let Some(us) = a.latency_us {
        link.latency_s = us * 1e-6;
        link.source = format!("{} (latency set to {us} us)", link.source);
    }
    if let Some(gbs) = a.bandwidth_gbs {
        link.bytes_per_s = gbs * 1e9;
        link.source = format!("{} (bandwidth set to {gbs} GB/s)", link.source);
    }
    let one = cost::predict(
        &ParallelLayout::default(),
        &shape,
        &cal,
        &link,
        a.steps,
        a.true_cfg,
    );
    let ranked = cost::rank_layouts(a.gpus, &shape, &cal, &link, a.steps, a.true_cfg);
    if a.json {
        let rows: Vec<_> = ranked
            .iter()
            .map(|p| {
                serde_json::json!({
                    "layout": cost::describe(&p.layout),
                    "step_ms": p.step_s * 1e3,
                    "speedup": one.step_s / p.step_s,
                    "comm_share": p.comm_share(),
                    "calls_per_step": p.calls,
                    "exact": p.exact,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": a.model,
                "devices": a.gpus,
                "link": link.name,
                "width": a.size.0,
                "height": a.size.1,
                "tokens": shape.tokens(),
                "one_device_step_ms": one.step_s * 1e3,
                "layouts": rows,
                "assumptions": cost::assumptions(&cal, &link),
            }))?
        );
        return Ok(());
    }
    println!(
        "{} at {}x{} px ({} tokens), {} steps{}, {} device(s) over {}: one device {:.1} ms a step",
        a.model,
        a.size.0,
        a.size.1,
        shape.tokens(),
        a.steps,
        if a.true_cfg { ", true CFG" } else { "" },
        a.gpus,
        link.name,
        one.step_s * 1e3
    );
    print!("{}", table(&ranked, one.step_s));
    println!("assumptions:");
    for line in cost::assumptions(&cal, &link) {
        println!("  - {line}");
    }
    Ok(())
}

/// The ranked layouts as text, one a line, fastest first.
pub fn table(ranked: &[Prediction], one_step_s: f64) -> String {
    let mut out = format!(
        "{:>3}  {:<44} {:>9} {:>8} {:>6} {:>7}  {}\n",
        "#", "layout", "ms/step", "speedup", "comm", "calls", "image"
    );
    for (i, p) in ranked.iter().enumerate() {
        out.push_str(&format!(
            "{:>3}  {:<44} {:>9.1} {:>7.2}x {:>5.0}% {:>7.0}  {}\n",
            i + 1,
            cost::describe(&p.layout),
            p.step_s * 1e3,
            one_step_s / p.step_s,
            p.comm_share() * 100.0,
            p.calls,
            if p.exact { "exact" } else { "approximate" }
        ));
    }
    out
}

/// Median seconds a step of `req` on `workers` CPU threads of `engine` under `layout`
/// (`None`: the automatic layout), with the layout that ran.
pub fn measure_step(
    engine: &Engine,
    workers: usize,
    layout: Option<ParallelLayout>,
    req: &GenerateRequest,
) -> anyhow::Result<(f64, ParallelLayout)> {
    let placement = Placement {
        devices: Devices::Cpu(workers),
        layout: layout.map_or(LayoutChoice::Auto, |l| {
            LayoutChoice::Degrees(Degrees::of(l))
        }),
    };
    let plan = engine.plan(&placement, req)?;
    let g = engine.generate(&plan, req, &mut |_| Ok(()))?;
    let mut steps = g.timings.steps_ms.clone();
    steps.sort_by(f64::total_cmp);
    let median = steps
        .get(steps.len() / 2)
        .copied()
        .ok_or_else(|| anyhow::anyhow!("the run reported no steps"))?;
    Ok((median / 1e3, plan.layout))
}

/// This machine's CPU: the worker threads' collectives (a rendezvous timed on tiny
/// all-to-alls, the bandwidth on large ones), then `random:tiny`'s step on one worker at two
/// sizes and on two ring workers (shards of half the tokens, the predicted communication taken
/// off), fitted with a fixed cost per block pass.
pub fn measure_cpu() -> anyhow::Result<(Calibration, Link)> {
    let link = measure_cpu_link()?;
    let engine = Engine::load(ModelChoice::named("random:tiny"), "cpu")?;
    let cfg = engine
        .primary()
        .flux1("the CPU calibration")?
        .flux
        .config()
        .clone();
    let mut samples = Vec::new();
    let mut seen = Vec::new();
    // One worker on the whole sequence at two sizes, and two PipeFusion stages on 16 patches
    // (small passes: the fixed cost per block pass shows).
    let (m, p) = (16usize, 2usize);
    let pipe = ParallelLayout {
        stale: Stale::PipeFusion {
            stages: p,
            patches: m,
            warmup: 1,
            balance: crate::parallel::pipefusion::StageBalance::Work,
        },
        ..ParallelLayout::default()
    };
    for (size, layout) in [
        (128, ParallelLayout::default()),
        (256, ParallelLayout::default()),
        (128, pipe),
    ] {
        let req = GenerateRequest {
            prompt: "a lighthouse".into(),
            width: size,
            height: size,
            steps: Some(5),
            seed: 1,
            ..GenerateRequest::default()
        };
        // The faster of two runs (a busy machine only ever slows a run down).
        let (a, _) = measure_step(&engine, layout.world(), Some(layout), &req)?;
        let (b, _) = measure_step(&engine, layout.world(), Some(layout), &req)?;
        let s = a.min(b);
        let shape = Shape::of_model(&cfg, (size, size), 4);
        seen.push(format!(
            "{} tokens, {}: {:.1} ms",
            shape.tokens(),
            cost::describe(&layout),
            s * 1e3
        ));
        let l = shape.tokens() as f64;
        samples.push(if layout.pipeline() > 1 {
            // Whatever the compute, the communication as predicted.
            let comm = cost::predict(
                &layout,
                &shape,
                &Calibration::cpu_threads(),
                &link,
                5,
                false,
            )
            .comm_s;
            // M + p - 1 passes of 1/p of the blocks on the longest rank, or all p x M passes
            // over the cores: in whole-model passes of L / M tokens.
            let (m, p) = (m as f64, p as f64);
            let copies = link.spread((m + p - 1.0) / p, m);
            cost::Sample {
                shape,
                q: l / m,
                kv: l,
                copies,
                seconds: (s - comm).max(0.0),
            }
        } else {
            cost::Sample::whole(shape, s)
        });
    }
    let mut cal = Calibration::fit(&samples, true)
        .or_else(|| Calibration::fit(&samples, false))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "the measured steps ({}) did not fit the model with positive costs: the machine \
                 was busy? run it again",
                seen.join(", ")
            )
        })?;
    cal.source = format!("CPU f32, random:tiny measured here ({})", seen.join(", "));
    Ok((cal, link))
}

/// Per-call latency and bandwidth of CPU worker threads' all-to-all over two ranks.
fn measure_cpu_link() -> anyhow::Result<Link> {
    use crate::parallel::comm::{run_local, Communicator};
    let time = |elems: usize, calls: usize| -> anyhow::Result<f64> {
        let t = candle_core::Tensor::zeros(
            (2, elems / 2),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )?;
        let secs = run_local(2, |_, comm| {
            let t0 = Instant::now();
            for _ in 0..calls {
                comm.all_to_all(&t, 0, 1)?;
            }
            Ok(t0.elapsed().as_secs_f64() / calls as f64)
        })?;
        Ok(secs.into_iter().fold(0.0, f64::max))
    };
    let small = time(64, 200)?;
    let big_elems = 1 << 22;
    let big = time(big_elems, 5)?;
    // One rank sends half of its tensor in a two-rank all-to-all.
    let bytes = (big_elems * 4 / 2) as f64;
    let bytes_per_s = bytes / (big - small).max(1e-9);
    Ok(Link {
        latency_s: small,
        bytes_per_s,
        source: "CPU threads, measured here (two-rank all-to-alls)".into(),
        ..Link::cpu()
    })
}
