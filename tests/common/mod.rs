//! What several test binaries share (each uses some of it).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;

use parallax::engine::{Degrees, Devices, LayoutChoice, Placement};
use parallax::runtime::{EngineSpec, Runtime, RuntimeOptions};

pub mod hub_server;

/// The runtime on the demo model over two CPU worker ranks (ring 2), images to `gallery`.
pub fn two_rank_runtime(gallery: PathBuf) -> Runtime {
    Runtime::start(RuntimeOptions {
        engine: EngineSpec::new(
            "demo",
            Placement {
                devices: Devices::parse("cpu:2").expect("devices"),
                layout: LayoutChoice::Degrees(Degrees {
                    ring: Some(2),
                    ..Degrees::default()
                }),
            },
        ),
        gallery_dir: Some(gallery),
        notify: None,
    })
    .expect("runtime starts")
}

/// A free TCP rendezvous address on this machine (for `parallax worker --init`).
pub fn free_init() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
    format!("tcp://127.0.0.1:{port}")
}

/// `parallax generate` of `model` at the tests' small settings ("a red fox", 64 px, 2 steps,
/// seed 7, quiet) to `out`, with `extra` arguments and the variables `env`: the image and the
/// settings its PNG carries, or the command's output when it fails. The Hugging Face cache and
/// `RUST_LOG` of the machine running the tests are left out.
pub fn generate_small(
    out: &Path,
    model: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Result<
    (
        parallax::pipeline::image::RgbImage,
        parallax::pipeline::GenerationSettings,
    ),
    String,
> {
    let mut args = vec![
        "generate",
        "--model",
        model,
        "--prompt",
        "a red fox",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "2",
        "--seed",
        "7",
        "--quiet",
        "--out",
        s(out),
    ];
    args.extend(extra.iter().copied());
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_parallax"))
        .args(&args)
        .env_remove("HF_HUB_CACHE")
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .output()
        .expect("run parallax");
    if !o.status.success() {
        return Err(text(&o));
    }
    let (img, chunks) = parallax::pipeline::image::read_png(out).map_err(|e| e.to_string())?;
    let settings = parallax::pipeline::GenerationSettings::from_png_text(&chunks)
        .map_err(|e| e.to_string())?;
    Ok((img, settings))
}

/// A finished command's stdout and stderr, together.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A test path as the `&str` a command line takes.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The largest difference between two images' channel values (255 when their sizes differ).
pub fn max_pixel_diff(
    a: &parallax::pipeline::image::RgbImage,
    b: &parallax::pipeline::image::RgbImage,
) -> u8 {
    if (a.width, a.height) != (b.width, b.height) {
        return 255;
    }
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// Mean absolute difference (0-255) between `a` and `b` over the pixels where `keep` holds.
pub fn mean_diff_where(
    a: &parallax::pipeline::image::RgbImage,
    b: &parallax::pipeline::image::RgbImage,
    keep: &dyn Fn(usize, usize) -> bool,
) -> f64 {
    let (mut sum, mut n) = (0f64, 0usize);
    for y in 0..a.height {
        for x in 0..a.width {
            if keep(x, y) {
                let (p, q) = (a.pixel(x, y), b.pixel(x, y));
                sum += (0..3).map(|c| f64::from(p[c].abs_diff(q[c]))).sum::<f64>() / 3.0;
                n += 1;
            }
        }
    }
    sum / n.max(1) as f64
}
