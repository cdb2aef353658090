//! `parallax dataset`: write the demo model's training scenes (captions and what to draw) and the
//! renderer's numbers, for the trainer in `scripts/train-demo/`; with `--eval`, the evaluation
//! prompts instead (half new scenes from the training distribution, half using held-out
//! colour-shape pairs), optionally with their reference pictures.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use crate::scenes::sample::{eval_samples, Sampler, Split};
use crate::scenes::spec::{spec_json, BackgroundKind};

#[derive(Debug, Clone, Args)]
pub struct DatasetArgs {
    /// Folder to write `spec.json` and `scenes.jsonl` into (created if needed).
    pub dir: PathBuf,
    /// How many scenes.
    #[arg(long, default_value_t = 300_000)]
    pub count: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write evaluation prompts (`eval.jsonl`) instead of training scenes.
    #[arg(long)]
    pub eval: bool,
    /// With --eval: also draw each prompt's reference picture at this size (`eval-N.png`).
    #[arg(long)]
    pub pictures: Option<usize>,
    /// Draw this share (0 to 1) of the scenes on polka dots, a background the base dataset never
    /// uses (the demo LoRA's data; scripts/train-demo/train_lora.py).
    #[arg(long, default_value_t = 0.0)]
    pub polka: f64,
}

/// A training line: `[caption, background kind, [colours], [[shape, colour, x, y, r], ...]]`,
/// coordinates to four decimals (what the trainer reads; about a third of the full record).
fn compact(s: &crate::scenes::sample::Sample) -> serde_json::Value {
    let r4 = |v: f32| (v as f64 * 1e4).round() / 1e4;
    let objects: Vec<serde_json::Value> = s
        .scene
        .objects
        .iter()
        .map(|o| serde_json::json!([o.shape, o.colour, r4(o.x), r4(o.y), r4(o.r)]))
        .collect();
    serde_json::json!([
        s.caption,
        s.scene.background.kind,
        s.scene.background.colours,
        objects
    ])
}

pub fn run(a: DatasetArgs) -> anyhow::Result<()> {
    if a.count == 0 {
        bail!("--count must be at least 1");
    }
    if !(0.0..=1.0).contains(&a.polka) {
        bail!("--polka is a share of the scenes: give a number from 0 to 1");
    }
    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    let spec_path = a.dir.join("spec.json");
    std::fs::write(&spec_path, serde_json::to_string_pretty(&spec_json())?)
        .with_context(|| format!("writing {}", spec_path.display()))?;
    let name = if a.eval { "eval.jsonl" } else { "scenes.jsonl" };
    let path = a.dir.join(name);
    let tmp = a.dir.join(format!(".{name}.partial"));
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let samples: Box<dyn Iterator<Item = _>> = if a.eval {
        Box::new(eval_samples(a.count, a.seed).into_iter())
    } else {
        let mut s = Sampler::new(a.seed);
        let share = a.polka;
        Box::new((0..a.count).map(move |i| {
            // Exactly `share` of every run of scenes, spread evenly.
            if ((i + 1) as f64 * share).floor() > (i as f64 * share).floor() {
                s.sample_on(Split::Train, BackgroundKind::Polka)
            } else {
                s.sample(Split::Train)
            }
        }))
    };
    let bar = indicatif::ProgressBar::new(a.count as u64);
    for (i, sample) in samples.enumerate() {
        if a.eval {
            serde_json::to_writer(&mut out, &sample)?;
        } else {
            serde_json::to_writer(&mut out, &compact(&sample))?;
        }
        out.write_all(b"\n")?;
        if let (true, Some(size)) = (a.eval, a.pictures) {
            let img = crate::scenes::render::render(&sample.scene, size, size);
            crate::pipeline::image::save_png(&a.dir.join(format!("eval-{i}.png")), &img, &[])?;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    out.flush()?;
    drop(out);
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    println!(
        "wrote {} {} to {} and the renderer's numbers to {}",
        a.count,
        if a.eval {
            "evaluation prompts"
        } else {
            "scenes"
        },
        path.display(),
        spec_path.display()
    );
    Ok(())
}
