//! Drive the runtime (the studio's engine path) without a window: one generation on one
//! placement, then a compare sweep on another, printing every event in order and saving each
//! image, so the images can be compared with `parallax generate`'s. The GPU check of the runtime:
//!
//! ```sh
//! cargo run --release --example runtime_jobs -- --devices cuda:0 --sweep-devices cuda:0,0 \
//!     --sweep-dp 2 --model demo --size 256 --out /tmp/rt
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use parallax::engine::{Degrees, Devices, LayoutChoice, Placement};
use parallax::pipeline::{image, GenerateRequest, Generated};
use parallax::runtime::{EngineSpec, Event, JobSpec, Runtime, RuntimeOptions};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "demo")]
    model: String,
    /// Where the generation runs (the device-list grammar: cpu:N, cuda:0, cuda:0,1, ...).
    #[arg(long, default_value = "cpu")]
    devices: String,
    /// Where the compare sweep runs.
    #[arg(long, default_value = "cpu:2")]
    sweep_devices: String,
    /// Data-parallel groups of the sweep.
    #[arg(long, default_value_t = 2)]
    sweep_dp: usize,
    #[arg(long, default_value = "a lighthouse on a cliff at dawn")]
    prompt: String,
    #[arg(long, default_value_t = 256)]
    size: usize,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Thresholds of the sweep (the uncached reference is added first).
    #[arg(long, value_delimiter = ',', default_value = "0.08,0.2")]
    thresholds: Vec<f64>,
    #[arg(long, default_value = "runtime-jobs")]
    out: PathBuf,
}

/// Run `job` to its end, printing each of its events; returns the images in order.
fn run(rt: &Runtime, job: JobSpec, label: &str) -> anyhow::Result<Vec<Generated>> {
    let id = rt.submit(job);
    let mut images = Vec::new();
    let mut last_step = (0, 0);
    loop {
        let ev = rt
            .recv_timeout(Duration::from_secs(600))
            .context("no event for ten minutes")?;
        if ev.job() != Some(id) {
            println!("{label}: (engine) {}", describe(&ev));
            continue;
        }
        println!("{label}: {}", describe(&ev));
        match &ev {
            Event::Step { image, step, .. } => {
                if (*image, *step) <= last_step {
                    bail!("{label}: step events out of order: {last_step:?} then ({image}, {step})");
                }
                last_step = (*image, *step);
            }
            Event::ImageDone { result, .. } => images.push(result.generated.clone()),
            Event::Failed { error, .. } => bail!("{label}: {error}"),
            Event::Cancelled { .. } => bail!("{label}: cancelled"),
            _ => {}
        }
        if ev.is_terminal() {
            return Ok(images);
        }
    }
}

fn describe(ev: &Event) -> String {
    match ev {
        Event::Step { image, step, total, ms, reused, .. } => format!(
            "step image {image} {step}/{total} {ms:.1} ms{}",
            if *reused { " (cache)" } else { "" }
        ),
        Event::ImageDone { image, result, .. } => format!(
            "image {image} done: {:.0} ms, {} reused, speedup {:?}, PSNR {:?}",
            result.generated.timings.total_ms,
            result.generated.stats.reused,
            result.speedup,
            result.quality.map(|q| q.psnr_db)
        ),
        other => {
            let text = format!("{other:?}");
            text.chars().take(200).collect()
        }
    }
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    std::fs::create_dir_all(&a.out)?;
    let base = GenerateRequest {
        prompt: a.prompt.clone(),
        width: a.size,
        height: a.size,
        steps: a.steps,
        seed: a.seed,
        ..GenerateRequest::default()
    };
    let rt = Runtime::start(RuntimeOptions {
        engine: EngineSpec::new(
            a.model.clone(),
            Placement {
                devices: Devices::parse(&a.devices)?,
                layout: LayoutChoice::Auto,
            },
        ),
        gallery_dir: None,
        notify: None,
    })?;
    let one = run(&rt, JobSpec::Generate(base.clone()), "generate")?;
    // Saved as `parallax generate` saves (settings in the text chunks), so equal images with
    // equal settings are equal files.
    for (i, g) in one.iter().enumerate() {
        image::save_png(&a.out.join(format!("generate-{i}.png")), &g.image, &g.settings.png_text()?)?;
    }
    rt.configure(EngineSpec::new(
        a.model.clone(),
        Placement {
            devices: Devices::parse(&a.sweep_devices)?,
            layout: LayoutChoice::Degrees(Degrees {
                dp: Some(a.sweep_dp),
                ..Degrees::default()
            }),
        },
    ));
    let sweep = run(
        &rt,
        JobSpec::Compare {
            base,
            thresholds: a.thresholds.clone(),
        },
        "compare",
    )?;
    for (i, g) in sweep.iter().enumerate() {
        let name = format!("compare-{}.png", g.settings.cache_threshold);
        image::save_png(&a.out.join(name), &g.image, &g.settings.png_text()?)?;
    }
    println!("{} + {} images in {}", one.len(), sweep.len(), a.out.display());
    Ok(())
}
