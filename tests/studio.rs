//! The studio's main flows through egui_kittest, rendered by wgpu (lavapipe in CI): generate,
//! cancel, compare with the heatmap, export, restore and delete from the gallery; what a new user
//! ran into (threshold field, gallery grid, missing file dialog, failed model, large sizes,
//! stale caption, unwritable gallery); saving the settings to their own file; and the two WGSL
//! shaders against their CPU twins.
#![cfg(feature = "studio")]

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::Device;
use egui_kittest::kittest::{NodeT, Queryable};
use egui_kittest::Harness;
use parallax::app::dialogs::Dialogs;
use parallax::app::view::ModelStatus;
use parallax::app::{gpu, heatmap, StudioApp, StudioOptions, Tab};
use parallax::pipeline::cache::CacheSpec;
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

/// Step until the model has loaded.
fn wait_for_model(h: &mut Harness<'static, StudioApp>) {
    step_until(h, "the model", |a| matches!(a.model, ModelStatus::Ready(_)));
}

fn disabled(h: &Harness<'static, StudioApp>, label: &str) -> bool {
    h.get_by_label(label).accesskit_node().is_disabled()
}

/// Every label on screen that contains `part`.
fn labels_with(h: &Harness<'static, StudioApp>, part: &str) -> Vec<String> {
    labels_where(h, |l| l.contains(part))
}

/// Every label on screen whose text passes `test`.
fn labels_where(h: &Harness<'static, StudioApp>, test: impl Fn(&str) -> bool) -> Vec<String> {
    // Text labels carry their text as the node's value, buttons as its label.
    h.query_all_by(|n| n.label().or_else(|| n.value()).is_some_and(|l| test(&l)))
        .filter_map(|n| {
            let n = n.accesskit_node();
            // A wrapped label's lines are TextRun children: count the label once.
            (n.role() != egui::accesskit::Role::TextRun).then(|| n.label().or_else(|| n.value()))?
        })
        .collect()
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
                    || speedup_range(&l)
                    || l.contains("loaded in")
            })
        })
        .map(|n| n.rect())
        .collect();
    // The speed-up column has a fixed width: its whole cell is covered, whatever the verdict.
    let ranged: Vec<egui::Rect> = h
        .query_all_by(|n| n.value().is_some_and(|l| speedup_range(&l)))
        .map(|n| {
            let r = n.rect();
            egui::Rect::from_min_size(r.min, egui::vec2(140.0, r.height()))
        })
        .collect();
    for r in rects.into_iter().chain(ranged) {
        h.mask(r);
    }
}

/// A speed-up cell read from the timing rounds: "1.42x (1.35-1.50)", "no measurable gain" or
/// "slower (0.88-0.95x)".
fn speedup_range(l: &str) -> bool {
    let ranged = l.ends_with(')') && l.contains('-');
    l == "no measurable gain"
        || ranged && l.starts_with("slower (")
        || ranged && l.chars().next().is_some_and(|c| c.is_ascii_digit()) && l.contains("x (")
}

/// Hover `label` until its tooltip, which contains `says`, is on screen.
fn tooltip_of(h: &mut Harness<'static, StudioApp>, label: &str, says: &str) -> String {
    h.get_by_label(label).hover();
    for _ in 0..12 {
        h.step();
        if let Some(t) = labels_with(h, says).into_iter().next() {
            return t;
        }
    }
    panic!("no tooltip saying {says:?} on {label:?}");
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
    wait_for_model(&mut h);
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
        app.stats.steps_seen, 12,
        "a preview event for each of the demo's 12 steps"
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
    h.state_mut().settings.request.seed = 7;
    h.state_mut().settings.request.prompt = "something else".into();
    h.get_by_label("Gallery").click();
    step_until(&mut h, "the gallery listing", |a| {
        a.gallery.entries.len() == 1
    });
    h.get_by_label("Restore").click();
    h.step();
    assert_eq!(h.state().settings.request.seed, 42);
    assert_eq!(h.state().settings.request.prompt, settings.prompt);
    let path = h.state().gallery.entries[0].path.clone();
    assert!(path.exists());
    // Delete asks first; only the confirmation removes the file.
    h.get_by_label("Delete").click();
    h.run_steps(2);
    h.get_by_label("Delete this image?");
    assert!(path.exists());
    h.get_by_label("Yes, delete").click();
    step_until(&mut h, "the delete", |a| a.gallery.entries.is_empty());
    assert!(!path.exists());
}

#[test]
fn cancel_with_escape() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio(dir.path());
    h.state_mut().settings.request.steps = Some(60);
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
    // And one other policy: the sweep is a list of cells, thresholds first.
    let policy = CacheSpec::preset("magcache", "balanced").expect("preset");
    h.state_mut().settings.compare_caches = vec![policy.clone()];
    h.state_mut().settings.request.steps = Some(6);
    h.get_by_label("Run compare").click();
    h.step();
    assert_eq!(h.state().tab, Tab::Compare);
    step_until(&mut h, "the sweep", |a| !a.is_busy());
    let app = h.state();
    assert_eq!(app.compare.len(), 3);
    let r = &app.compare[1].result;
    assert_eq!(r.generated.settings.cache_threshold, 5.0);
    assert!(r.generated.stats.reused > 0);
    assert!(r.quality.is_some() && r.speedup.is_some());
    let m = &app.compare[2];
    assert_eq!(m.result.generated.settings.cache_spec(), policy);
    assert!(m.result.quality.is_some());
    // The default prompt is in the demo's world: every cell has its prompt score.
    assert!(app.compare.iter().all(|s| s.prompt_score.is_some()));
    // Timed in three rounds (the default): every cell has its three times; the table shows the
    // speed-ups with their range, and what each number means on hover.
    assert!(app.compare.iter().all(|s| s
        .timing
        .as_ref()
        .is_some_and(|t| t.wall_ms.len() == 3 && t.identical)));
    let spread = app.compare[1]
        .timing
        .as_ref()
        .and_then(|t| t.speedup())
        .expect("a speed-up with its range");
    assert!(spread.min <= spread.median && spread.median <= spread.max);
    let reusing = app.compare[1..]
        .iter()
        .filter(|s| s.result.generated.stats.reused > 0)
        .count();
    let ranged = labels_where(&h, speedup_range);
    assert_eq!(
        ranged.len(),
        reusing,
        "each cell that reused a step shows its range: {ranged:?}"
    );
    assert_eq!(labels_with(&h, spread.label().as_str()).len(), 1);
    h.get_by_label("reference");
    // Cells are named by policy and preset, under the thumbnail and in the table (and the cell
    // on the right of the wipe in its caption).
    assert_eq!(labels_with(&h, "MagCache · balanced").len(), 2);
    assert_eq!(
        labels_with(&h, "First Block Cache · 5")
            .last()
            .map(String::as_str),
        Some("left: reference (no cache) · right: First Block Cache · 5")
    );
    let method = tooltip_of(&mut h, "speed-up", "median over the rounds");
    assert!(method.contains("no measurable gain"), "{method}");
    tooltip_of(&mut h, "PSNR", "invisible to the eye");
    tooltip_of(&mut h, "SSIM", "1: identical");
    tooltip_of(&mut h, "prompt", "only to the built-in demo model");
    h.hover_at(egui::pos2(1090.0, 750.0));
    h.run_steps(4);
    mask_timings(&mut h);
    h.snapshot("studio_compare_wipe");
    h.get_by_label("difference heatmap").click();
    h.run_steps(2);
    assert_eq!(
        labels_with(&h, "Difference scale: black = identical").len(),
        1
    );
    mask_timings(&mut h);
    h.snapshot("studio_compare_heatmap");
}

#[test]
fn threshold_field_keeps_what_is_typed_and_blocks_bad_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio(dir.path());
    wait_for_model(&mut h);
    let field = "Compare thresholds (0 to 1)";
    assert_eq!(
        h.get_by_label(field).value().as_deref(),
        Some("0, 0.08, 0.12, 0.2"),
        "the default list is shown whole"
    );
    // The default list fits its box.
    let text_w = h.get_by_label(field).rect().width();
    assert!(text_w > 200.0, "field is {text_w} wide");
    h.get_by_label(field).focus();
    h.step();
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    h.step();
    for c in ["0", ".", "2", ",", "3"] {
        h.get_by_label(field).type_text(c);
        h.step();
    }
    h.run_steps(2);
    assert_eq!(h.get_by_label(field).value().as_deref(), Some("0.2,3"));
    assert_eq!(
        labels_with(&h, "thresholds:"),
        ["thresholds: 3 is outside 0..=1"]
    );
    assert!(disabled(&h, "Run compare"));
    assert!(!disabled(&h, "Generate"), "only the sweep is blocked");
    h.get_by_label(field).type_text("x");
    h.run_steps(2);
    assert_eq!(
        labels_with(&h, "thresholds:"),
        ["thresholds: `3x` is not a number"]
    );
    h.key_press(egui::Key::Backspace);
    h.key_press(egui::Key::Backspace);
    h.get_by_label(field).type_text("5");
    h.run_steps(2);
    assert_eq!(h.get_by_label(field).value().as_deref(), Some("0.2,5"));
    h.key_press(egui::Key::Backspace);
    h.get_by_label(field).type_text("0.3");
    h.run_steps(2);
    assert!(labels_with(&h, "thresholds:").is_empty());
    assert!(!disabled(&h, "Run compare"));
    assert_eq!(h.state().settings.compare_thresholds, vec![0.2, 0.3]);
}

#[test]
fn a_sweep_without_reuse_says_so_instead_of_a_speedup() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio(dir.path());
    h.state_mut().settings.compare_thresholds = vec![0.0, 0.06];
    h.state_mut().settings.compare_caches = vec![];
    h.state_mut().settings.request.steps = Some(3);
    h.state_mut().start_compare();
    step_until(&mut h, "the sweep", |a| !a.is_busy());
    let r = &h.state().compare[1].result;
    assert_eq!(
        r.generated.stats.reused, 0,
        "the demo reuses nothing at 0.06"
    );
    h.get_by_label("no reuse");
    assert!(h.query_by_label("reference").is_some());
}

#[test]
fn damaged_and_foreign_pngs_in_the_gallery_are_skipped_with_a_note() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gallery = dir.path().join("gallery");
    std::fs::create_dir_all(&gallery).expect("gallery dir");
    std::fs::write(gallery.join("junk.png"), b"\x89PNG\r\n\x1a\n not really").expect("junk");
    // A real PNG without Parallax's settings.
    image::RgbImage::new(4, 4)
        .save(gallery.join("foreign.png"))
        .expect("foreign png");
    let mut h = studio(dir.path());
    h.get_by_label("Gallery").click();
    h.run_steps(4);
    let said: Vec<String> = h.state().messages.iter().map(|m| m.text.clone()).collect();
    let notes: Vec<&String> = said
        .iter()
        .filter(|m| m.contains("gallery: skipped"))
        .collect();
    assert_eq!(notes.len(), 1, "{said:?}");
    assert!(notes[0].contains("and 1 more"), "{said:?}");
    assert!(h.state().gallery.entries.is_empty());
    // Said once, not at every refresh.
    h.state_mut().gallery.dirty = true;
    h.run_steps(4);
    let again: Vec<usize> = h
        .state()
        .messages
        .iter()
        .filter(|m| m.text.contains("gallery: skipped"))
        .map(|m| m.count)
        .collect();
    assert_eq!(again, [1]);
}

#[test]
fn gallery_grid_wraps_scrolls_and_opens_an_image() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio(dir.path());
    h.state_mut().settings.request.width = 64;
    h.state_mut().settings.request.height = 64;
    h.state_mut().settings.request.steps = Some(1);
    h.state_mut().generate();
    step_until(&mut h, "the image", |a| !a.is_busy());
    // Eleven more images (copies carry the same settings).
    let first = h
        .state()
        .result
        .as_ref()
        .and_then(|s| s.result.saved.clone())
        .expect("saved");
    for i in 0..11 {
        let copy = first.with_file_name(format!("copy-{i:02}.png"));
        std::fs::copy(&first, copy).expect("copy");
    }
    h.get_by_label("Gallery").click();
    step_until(&mut h, "the listing", |a| a.gallery.entries.len() == 12);
    h.run_steps(4);
    let restore: Vec<egui::Rect> = h.query_all_by_label("Restore").map(|n| n.rect()).collect();
    assert_eq!(restore.len(), 12);
    let mut rows: Vec<i32> = restore.iter().map(|r| r.top().round() as i32).collect();
    rows.dedup();
    assert!(rows.len() >= 2, "the grid wraps: rows at {rows:?}");
    assert!(
        restore.iter().all(|r| r.right() <= 1100.0),
        "no cell past the window's right edge"
    );
    // The last image is below the fold: scroll to it and open it.
    let last = h.state().gallery.entries[11].path.clone();
    let name = last
        .file_name()
        .and_then(|n| n.to_str())
        .expect("name")
        .to_string();
    let label = format!("open {name}");
    h.get_by_label(&label).scroll_to_me();
    h.run_steps(3);
    assert!(
        h.get_by_label(&label).rect().bottom() <= 760.0,
        "scrolled into view"
    );
    h.get_by_label(&label).click();
    h.run_steps(2);
    assert_eq!(
        h.state()
            .gallery
            .opened
            .as_ref()
            .map(|o| o.entry.path.clone()),
        Some(last.clone())
    );
    // Large, it has one Delete: it asks, and Keep keeps the file.
    h.get_by_label("Delete").click();
    h.run_steps(2);
    h.get_by_label("Delete this image?");
    h.get_by_label("Keep").click();
    h.run_steps(2);
    assert!(last.exists());
    assert!(h.state().gallery.confirm_delete.is_none());
    h.get_by_label("Back to the gallery").click();
    h.run_steps(2);
    assert!(h.state().gallery.opened.is_none());
}

#[test]
fn without_a_file_dialog_a_path_field_is_offered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio(dir.path());
    h.state_mut().dialogs = Dialogs::InWindow("no desktop file dialog here".into());
    h.state_mut().settings.request.steps = Some(1);
    h.state_mut().generate();
    step_until(&mut h, "the image", |a| !a.is_busy());
    h.get_by_label("Export PNG…").click();
    h.run_steps(3);
    assert!(
        !labels_with(&h, "no desktop file dialog here").is_empty(),
        "the field says why it is there"
    );
    // A folder that does not exist: refused when chosen, with the path named.
    let bad = dir.path().join("missing/x.png");
    h.state_mut()
        .path_prompt
        .as_mut()
        .expect("the path field")
        .text = bad.display().to_string();
    h.get_by_label("Save").click();
    h.run_steps(2);
    let err = h
        .state()
        .path_prompt
        .as_ref()
        .and_then(|p| p.error.clone())
        .expect("an error");
    assert!(
        err.starts_with(&format!(
            "cannot write {}",
            dir.path().join("missing").display()
        )),
        "{err}"
    );
    let good = dir.path().join("typed.png");
    h.state_mut().path_prompt.as_mut().expect("still open").text = good.display().to_string();
    h.get_by_label("Save").click();
    h.run_steps(2);
    assert!(h.state().path_prompt.is_none());
    assert!(good.exists());
}

#[test]
fn a_failed_model_disables_generate_until_another_loads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio(dir.path());
    wait_for_model(&mut h);
    h.state_mut().settings.model = dir.path().join("gone.safetensors").display().to_string();
    h.get_by_label("Load").click();
    step_until(&mut h, "the failure", |a| {
        matches!(a.model, ModelStatus::Failed { .. })
    });
    h.run_steps(2);
    assert!(disabled(&h, "Generate"));
    assert!(!labels_with(&h, "did not load: choose another model").is_empty());
    h.state_mut().generate();
    assert!(!h.state().is_busy(), "refused while the model is broken");
    h.get_by_label("Demo").click();
    wait_for_model(&mut h);
    h.run_steps(2);
    assert!(!disabled(&h, "Generate"));
}

#[test]
fn a_large_size_warns_but_is_allowed_and_the_caption_follows_the_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio(dir.path());
    wait_for_model(&mut h);
    h.state_mut().settings.request.width = 8000;
    h.state_mut().settings.request.height = 8000;
    h.run_steps(2);
    let warn = labels_with(&h, "latent tokens");
    assert_eq!(warn.len(), 1, "{warn:?}");
    assert!(warn[0].contains("250000 latent tokens"), "{}", warn[0]);
    assert!(!disabled(&h, "Generate"));
    // A finished image's caption, then a new job: the caption describes the new job.
    h.state_mut().settings.request.width = 256;
    h.state_mut().settings.request.height = 256;
    h.state_mut().settings.request.steps = Some(1);
    h.state_mut().generate();
    step_until(&mut h, "the image", |a| !a.is_busy());
    assert_eq!(labels_with(&h, "computed").len(), 1);
    h.state_mut().settings.request.steps = Some(60);
    h.state_mut().generate();
    h.run_steps(2);
    assert!(
        labels_with(&h, "computed").is_empty(),
        "the old caption is gone"
    );
    assert_eq!(
        labels_with(&h, "generating"),
        ["generating 256x256, 60 steps, seed 42…"]
    );
    h.state_mut().cancel();
    step_until(&mut h, "the cancel", |a| !a.is_busy());
}

#[test]
fn an_unwritable_gallery_is_reported_before_the_generation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio(dir.path());
    wait_for_model(&mut h);
    // The gallery folder is replaced by a file: nothing can be written there.
    let gal = dir.path().join("gallery");
    std::fs::remove_dir_all(&gal).expect("rm");
    std::fs::write(&gal, b"not a folder").expect("write");
    h.state_mut().settings.request.steps = Some(1);
    h.state_mut().generate();
    let said: Vec<String> = h.state().messages.iter().map(|m| m.text.clone()).collect();
    assert!(
        said.iter()
            .any(|m| m.starts_with("images will not be kept in the gallery: cannot write")),
        "{said:?}"
    );
    assert!(
        h.state().is_busy(),
        "the image is still made (and can be exported)"
    );
    step_until(&mut h, "the image", |a| !a.is_busy());
    let said: Vec<String> = h.state().messages.iter().map(|m| m.text.clone()).collect();
    assert!(
        said.iter().any(
            |m| m.contains("not saved to the gallery: cannot write") && !m.contains(".partial")
        ),
        "{said:?}"
    );
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

/// The devices panel: the device list and the layout set by hand in the window run the job on
/// those workers (the Started event says so), the image equals one worker's within a level, and
/// a layout that does not fit is refused as it is typed with the engine's own message.
#[test]
fn devices_and_layout_set_in_the_panel_run_the_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio(dir.path());
    h.state_mut().settings.request.width = 64;
    h.state_mut().settings.request.height = 64;
    h.step();
    // Type the device list: four CPU worker threads.
    h.get_by_label("Device list").focus();
    h.step();
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    h.get_by_label("Device list").type_text("cpu:4");
    h.step();
    assert_eq!(h.state().settings.device, "cpu:4");
    // Degrees by hand: Ulysses 2 x ring 2.
    h.get_by_label("auto layout").click();
    h.step();
    h.get_by_label("ulysses").set_value_accesskit(2.0);
    h.step();
    h.get_by_label("ring").set_value_accesskit(2.0);
    h.step();
    let s = &h.state().settings;
    assert_eq!((s.ulysses, s.ring, s.layout_auto), (2, 2, false));
    let will_run = "Will run: 4 workers (cpu x4): dp 1 x cfg 1 x ring 2 x ulysses 2";
    assert!(
        h.query_by_label_contains(will_run).is_some(),
        "the panel shows the plan"
    );
    // Ring 3 does not fit four workers: refused as typed, with the engine's message.
    h.get_by_label("ring").set_value_accesskit(3.0);
    h.step();
    let message = h
        .state()
        .settings
        .layout_check(2)
        .expect_err("ring 3 on 4 workers");
    assert!(message.contains("asks for 6 devices"), "{message}");
    assert!(h
        .query_all_by_label_contains("asks for 6 devices")
        .next()
        .is_some());
    h.get_by_label("ring").set_value_accesskit(2.0);
    h.step();

    h.get_by_label("Generate").click();
    h.step();
    step_until(&mut h, "the image", |a| !a.is_busy());
    let app = h.state();
    let shown = app.result.as_ref().expect("an image on screen");
    let one = demo_image(&shown.result.generated.settings);
    let worst = shown
        .image
        .data
        .iter()
        .zip(&one.data)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(255);
    assert!(worst <= 1, "four workers differ from one by {worst}");
    assert!(
        app.messages
            .iter()
            .any(|m| m.text.contains("ring 2 x ulysses 2")),
        "the job's layout is reported: {:?}",
        app.messages.iter().map(|m| &m.text).collect::<Vec<_>>()
    );
}

use parallax::app::settings_file::MemoryStorage as Kv;

/// The studio saves its settings to their own file (written atomically) and takes them out of
/// eframe's storage, where earlier versions kept them; a save that cannot be written is said
/// once, not at every auto-save, and leaves no file behind.
#[test]
fn settings_are_saved_to_their_own_file_and_leave_eframe_storage() {
    use parallax::app::settings_file::{load, Loaded};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio(dir.path());
    let file = dir.path().join("home").join("studio-settings.json");
    h.state_mut().settings_file = Some(file.clone());
    h.state_mut().settings.request.prompt = "saved by the studio".into();
    let mut kv = Kv::default();
    kv.0.insert("parallax-settings".into(), "(model: \"old\")".into());
    kv.0.insert("window".into(), "kept".into());
    eframe::App::save(h.state_mut(), &mut kv);
    match load(&file) {
        Loaded::Read(s) => assert_eq!(s.request.prompt, "saved by the studio"),
        other => panic!("the saved settings read back as {other:?}"),
    }
    assert!(!kv.0.contains_key("parallax-settings"), "{:?}", kv.0);
    assert_eq!(kv.0.get("window").map(String::as_str), Some("kept"));

    // A folder that is a file: the save fails, twice, and says so once.
    let blocked = dir.path().join("blocked");
    std::fs::write(&blocked, b"a file").expect("write");
    h.state_mut().settings_file = Some(blocked.join("studio-settings.json"));
    eframe::App::save(h.state_mut(), &mut kv);
    eframe::App::save(h.state_mut(), &mut kv);
    let said = h
        .state()
        .messages
        .iter()
        .filter(|m| m.text.contains("the settings were not saved"))
        .count();
    assert_eq!(said, 1);
    // The file saved before is untouched.
    assert!(matches!(load(&file), Loaded::Read(_)));
}
