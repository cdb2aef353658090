//! The studio's main flows through egui_kittest, rendered by wgpu (lavapipe in CI): generate,
//! cancel, compare with the heatmap, export, restore and delete from the gallery; and the two
//! WGSL shaders against their CPU twins.
#![cfg(feature = "studio")]

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::Device;
use egui_kittest::kittest::Queryable;
use egui_kittest::Harness;
use parallax::app::export::Dialogs;
use parallax::app::{gpu, heatmap, StudioApp, StudioOptions, Tab};
use parallax::pipeline::image::{read_png, RgbImage};
use parallax::pipeline::preview::{Latent, PreviewFactors};
use parallax::pipeline::{GenerationSettings, Pipeline};

fn studio(dir: &Path) -> Harness<'static, StudioApp> {
    let opts = StudioOptions {
        gallery_dir: Some(dir.join("gallery")),
        fresh_settings: true,
        skip_hf_cache: true,
        ..StudioOptions::default()
    };
    let exports = dir.join("exports");
    std::fs::create_dir_all(&exports).expect("exports dir");
    Harness::builder()
        .with_size([1100.0, 760.0])
        .wgpu()
        .build_eframe(move |cc| {
            let mut app = StudioApp::new(cc, opts).expect("studio starts");
            app.dialogs = Dialogs::Fixed(exports);
            app
        })
}

/// Step the UI until `done` holds (the engine works on its own thread meanwhile).
fn step_until(h: &mut Harness<'static, StudioApp>, what: &str, done: impl Fn(&StudioApp) -> bool) {
    let t0 = Instant::now();
    while !done(h.state()) {
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "timed out waiting for: {what}"
        );
        h.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    h.step();
}

/// Cover text that changes from run to run (wall times, speedups) before a snapshot.
fn mask_timings(h: &mut Harness<'static, StudioApp>) {
    let rects: Vec<egui::Rect> = h
        .query_all_by(|n| {
            n.label().or_else(|| n.value()).is_some_and(|l| {
                l.ends_with(" s")
                    || l.contains(" s left")
                    || l.starts_with("done in")
                    || l.ends_with('x') && l.chars().next().is_some_and(|c| c.is_ascii_digit())
                    || l.contains("loaded in")
            })
        })
        .map(|n| n.rect())
        .collect();
    for r in rects {
        h.mask(r);
    }
}

fn demo_image(s: &GenerationSettings) -> RgbImage {
    Pipeline::demo(&Device::Cpu)
        .expect("demo")
        .generate(&s.to_request(), &mut |_| Ok(()))
        .expect("generate")
        .image
}

#[test]
fn generate_export_restore_and_delete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio(dir.path());
    assert!(
        h.state().uses_gpu_shaders(),
        "the test renderer gives the app a wgpu device"
    );
    h.get_by_label("Generate").click();
    h.step();
    assert!(h.state().is_busy());
    step_until(&mut h, "the image", |a| !a.is_busy());

    let app = h.state();
    let shown = app.result.as_ref().expect("an image on screen");
    assert_eq!(
        app.stats.steps_seen, 4,
        "a preview event for each of the 4 steps"
    );
    let settings = shown.result.generated.settings.clone();
    assert_eq!(settings.seed, 42);
    assert_eq!(
        *shown.image,
        demo_image(&settings),
        "the studio's image is the engine's image"
    );
    mask_timings(&mut h);
    h.snapshot("studio_generated");

    // Export through the (fixed) save dialog: PNG with its settings.
    h.get_by_label("Export PNG…").click();
    step_until(&mut h, "the export", |a| {
        a.messages.iter().any(|m| m.text.starts_with("saved"))
    });
    let (img, text) = read_png(&dir.path().join("exports/parallax-42.png")).expect("exported PNG");
    assert_eq!(img, demo_image(&settings));
    assert_eq!(
        GenerationSettings::from_png_text(&text).expect("settings chunk"),
        settings
    );

    // Change the settings, then restore them from the gallery.
    h.state_mut().settings.seed = 7;
    h.state_mut().settings.prompt = "something else".into();
    h.get_by_label("Gallery").click();
    step_until(&mut h, "the gallery listing", |a| a.gallery.len() == 1);
    h.get_by_label("Restore").click();
    h.step();
    assert_eq!(h.state().settings.seed, 42);
    assert_eq!(h.state().settings.prompt, settings.prompt);
    let path = h.state().gallery[0].path.clone();
    assert!(path.exists());
    h.get_by_label("Delete").click();
    step_until(&mut h, "the delete", |a| a.gallery.is_empty());
    assert!(!path.exists());
}

#[test]
fn cancel_with_escape() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio(dir.path());
    h.state_mut().settings.steps = 60;
    h.get_by_label("Generate").click();
    step_until(&mut h, "the first step", |a| {
        a.job.as_ref().is_some_and(|j| j.step >= 1)
    });
    h.key_press(egui::Key::Escape);
    step_until(&mut h, "the cancel", |a| !a.is_busy());
    let app = h.state();
    assert!(app.result.is_none());
    assert!(app.messages.iter().any(|m| m.text == "cancelled"));
    assert!(app.stats.steps_seen < 60);
}

#[test]
fn compare_sweep_with_wipe_and_heatmap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio(dir.path());
    // The demo's residuals are large: 5 is a threshold at which it reuses steps.
    h.state_mut().settings.compare_thresholds = vec![0.0, 5.0];
    h.state_mut().settings.steps = 6;
    h.get_by_label("Run compare").click();
    h.step();
    assert_eq!(h.state().tab, Tab::Compare);
    step_until(&mut h, "the sweep", |a| !a.is_busy());
    let app = h.state();
    assert_eq!(app.compare.len(), 2);
    let r = &app.compare[1].result;
    assert_eq!(r.generated.settings.cache_threshold, 5.0);
    assert!(r.generated.stats.reused > 0);
    assert!(r.quality.is_some() && r.speedup.is_some());
    h.get_by_label("reference");
    mask_timings(&mut h);
    h.snapshot("studio_compare_wipe");
    h.get_by_label("difference heatmap").click();
    h.run_steps(2);
    mask_timings(&mut h);
    h.snapshot("studio_compare_heatmap");
}

/// A window that only draws one paint callback at 1:1 scale, for reading pixels back.
struct Probe<F: FnMut(&mut egui::Ui)>(F);

impl<F: FnMut(&mut egui::Ui)> eframe::App for Probe<F> {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        egui::CentralPanel::default()
            .frame(egui::Frame::NONE)
            .show(ui, |ui| (self.0)(ui));
    }
}

fn probe<F: FnMut(&mut egui::Ui) + 'static>(draw: F) -> image::RgbaImage {
    let mut h = Harness::builder()
        .with_size([64.0, 64.0])
        .with_pixels_per_point(1.0)
        .wgpu()
        .build_eframe(|cc| {
            gpu::install(cc.wgpu_render_state.as_ref().expect("wgpu"));
            Probe(draw)
        });
    h.run_steps(2);
    h.render().expect("render")
}

#[test]
fn preview_shader_matches_the_cpu_map() {
    let (w, h) = (8usize, 6usize);
    let mut rng = parallax::model::rng::SplitMix64::new(3);
    let latent = Latent {
        width: w,
        height: h,
        data: rng.normals(16 * w * h),
    };
    let mut f = PreviewFactors {
        weights: [[0.0; 16]; 3],
        bias: [0.05, -0.1, 0.2],
        r2: 1.0,
    };
    for (ch, row) in f.weights.iter_mut().enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            *v = ((ch * 16 + c) as f32 * 0.37).sin() * 0.12;
        }
    }
    let cpu = f.apply(&latent);
    let (lat, fac) = (std::sync::Arc::new(latent), std::sync::Arc::new(f));
    // Each latent position covers a 4x4 pixel block at 1:1.
    let img = probe(move |ui| {
        let rect = egui::Rect::from_min_size(egui::pos2(0.0, 0.0), egui::vec2(32.0, 24.0));
        ui.painter().add(egui_wgpu::Callback::new_paint_callback(
            rect,
            gpu::PreviewCallback {
                latent: lat.clone(),
                version: 1,
                factors: fac.clone(),
            },
        ));
    });
    for y in 0..h {
        for x in 0..w {
            let px = img.get_pixel((x * 4 + 2) as u32, (y * 4 + 2) as u32);
            for c in 0..3 {
                let want = cpu[(y * w + x) * 3 + c] as i32;
                assert!(
                    (px[c] as i32 - want).abs() <= 1,
                    "({x},{y}) channel {c}: shader {} vs CPU {want}",
                    px[c]
                );
            }
        }
    }
}

#[test]
fn heatmap_shader_matches_the_cpu_twin() {
    let mk = |f: &dyn Fn(usize, usize) -> [u8; 3]| {
        let mut data = Vec::new();
        for y in 0..16 {
            for x in 0..16 {
                data.extend(f(x, y));
            }
        }
        RgbImage {
            width: 16,
            height: 16,
            data,
        }
    };
    let a = mk(&|x, y| [(x * 16) as u8, (y * 16) as u8, 128]);
    let b = mk(&|x, y| {
        [
            (x * 16) as u8,
            ((y * 16) as u8).saturating_add((x * 3) as u8),
            128 - (y as u8),
        ]
    });
    let cpu = heatmap::diff_heatmap(&a, &b, 4.0).expect("same size");
    let (ra, rb) = (std::sync::Arc::new(a), std::sync::Arc::new(b));
    let img = probe(move |ui| {
        let rect = egui::Rect::from_min_size(egui::pos2(0.0, 0.0), egui::vec2(32.0, 32.0));
        ui.painter().add(egui_wgpu::Callback::new_paint_callback(
            rect,
            gpu::HeatmapCallback {
                reference: (1, ra.clone()),
                candidate: (2, rb.clone()),
                gain: 4.0,
            },
        ));
    });
    for y in 0..16 {
        for x in 0..16 {
            let px = img.get_pixel((x * 2 + 1) as u32, (y * 2 + 1) as u32);
            let want = cpu.pixel(x, y);
            for c in 0..3 {
                assert!(
                    (px[c] as i32 - want[c] as i32).abs() <= 2,
                    "({x},{y}) channel {c}: shader {} vs CPU {}",
                    px[c],
                    want[c]
                );
            }
        }
    }
}
