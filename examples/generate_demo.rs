//! The engine from Rust, without the studio or the CLI: load the built-in demo model, generate
//! one image with a cache policy, then the same prompt over two CPU worker threads with
//! displaced patches, and save both as PNG with their settings.
//!
//!   cargo run --release --example generate_demo -- [OUT_DIR]

use std::path::PathBuf;

use candle_core::Device;
use parallax::parallel::layout::{ParallelLayout, Stale};
use parallax::parallel::ranks;
use parallax::pipeline::cache::CacheSpec;
use parallax::pipeline::image::save_png;
use parallax::pipeline::metrics::quality;
use parallax::pipeline::{GenerateRequest, Pipeline, Progress};

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| ".".into()));
    std::fs::create_dir_all(&out)?;
    let p = Pipeline::demo(&Device::Cpu)?;
    let req = GenerateRequest {
        prompt: "two small yellow stars above a green square, night sky".into(),
        seed: 4,
        cache: CacheSpec::preset("magcache", "balanced"),
        ..Default::default()
    };
    // One device, with MagCache's balanced preset; progress on every step.
    let one = p.generate(&req, &mut |ev| {
        if let Progress::Step(s) = ev {
            eprintln!("step {}/{}: {:?}", s.index + 1, s.total, s.kind);
        }
        Ok(())
    })?;
    let path = out.join("demo-magcache.png");
    save_png(&path, &one.image, &one.settings.png_text()?)?;
    println!(
        "{} ({} steps computed, {} reused)",
        path.display(),
        one.stats.computed,
        one.stats.reused
    );

    // Two CPU worker threads standing in for GPUs, displaced patches after one exact step.
    let layout = ParallelLayout {
        ring: 2,
        stale: Stale::Displaced {
            warmup: 1,
            rotate: false,
        },
        ..Default::default()
    };
    let uncached = GenerateRequest {
        cache: None,
        ..req.clone()
    };
    let exact = p.generate(&uncached, &mut |_| Ok(()))?;
    let two = ranks::generate(&p, layout, &uncached, &mut |_| Ok(()))?;
    let path = out.join("demo-displaced.png");
    save_png(&path, &two.image, &two.settings.png_text()?)?;
    let q = quality(&two.image, &exact.image)?;
    println!(
        "{}: {:.1} dB, SSIM {:.4} against one worker",
        path.display(),
        q.psnr_db,
        q.ssim
    );
    Ok(())
}
