//! `parallax calibrate-magcache`: measures how fast the magnitude of the transformer blocks'
//! residual changes over a denoising run, on this model, for MagCache
//! ([`crate::pipeline::cache::MagCalibrator`]). Every step of `--prompts` images runs in full;
//! the calibration (JSON) goes to `--out`, by default where the engine looks for it
//! ([`crate::pipeline::cache::calibration_file`]; the demo model's ships in
//! `assets/demo/magcache.json`).

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::{request_for, ModelArgs, SampleArgs};
use crate::pipeline::cache::{calibration_file, MagCalibrator};
use crate::scenes::sample::eval_samples;

#[derive(Debug, Clone, Args)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sample: SampleArgs,
    /// Images to measure (the demo's evaluation prompts from seed 11 for the demo, a fixed list of
    /// everyday prompts otherwise).
    #[arg(long, default_value_t = 8)]
    pub prompts: usize,
    /// Where to write the calibration (default: where the engine looks for this model's).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Everyday prompts for models other than the demo.
const PROMPTS: [&str; 8] = [
    "a lighthouse on a cliff at dawn",
    "a bowl of ripe oranges on a wooden table",
    "a red fox in fresh snow",
    "a city street at night in the rain, neon signs",
    "a watercolour of mountains above a lake",
    "a portrait of an old sailor with a grey beard",
    "a small robot watering plants in a greenhouse",
    "a sailing boat on a calm sea, sunset",
];

pub fn run(a: CalibrateArgs) -> anyhow::Result<()> {
    if a.prompts == 0 {
        anyhow::bail!("--prompts must be at least 1");
    }
    let choice = a.model.choice();
    let p = crate::engine::load_pipeline(&choice, &a.model.device)?;
    p.flux1("MagCache calibration")?;
    let demo = p.label == "demo";
    let prompts: Vec<String> = if demo {
        eval_samples(a.prompts, 11)
            .into_iter()
            .map(|s| s.caption)
            .collect()
    } else {
        (0..a.prompts)
            .map(|i| PROMPTS[i % PROMPTS.len()].to_string())
            .collect()
    };
    let mut cal = MagCalibrator::new();
    let bar = indicatif::ProgressBar::new(prompts.len() as u64);
    // Steps and size as the runs took them (the same for every prompt).
    let mut run = (0, 0, 0);
    for (i, prompt) in prompts.iter().enumerate() {
        let mut s = a.sample.clone();
        s.prompt = prompt.clone();
        s.seed = Some(a.sample.seed.unwrap_or(0) + i as u64);
        let req = request_for(demo, &s);
        let prep = p.prepare(&req, &mut |_| Ok(()))?;
        let job = &prep.job;
        run = (
            prep.settings.steps,
            prep.settings.width,
            prep.settings.height,
        );
        job.denoise_with(p.denoiser(), &mut cal, &mut |_| Ok(()))?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let source = format!(
        "{}: {} prompts, {} steps, {}x{} (parallax calibrate-magcache)",
        p.label,
        prompts.len(),
        run.0,
        run.1,
        run.2
    );
    let c = cal.finish(source)?;
    let out = a.out.unwrap_or_else(|| calibration_file(&p.label));
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = out.with_extension("json.partial");
    std::fs::write(&tmp, serde_json::to_string_pretty(&c)? + "\n")
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &out).with_context(|| format!("writing {}", out.display()))?;
    println!("{}", out.display());
    Ok(())
}
