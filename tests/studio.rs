//! The studio's main flows through egui_kittest, rendered by wgpu (lavapipe in CI): generate,
//! cancel, compare with the heatmap, export, restore and delete from the gallery; what a new user
//! ran into (threshold field, gallery grid, missing file dialog, failed model, large sizes,
//! stale caption, unwritable gallery); saving the settings to their own file; the LoRA list
//! (the demo's polka LoRA added, its strength set, its concept drawn; a file that does not fit)
//! and the compare sweep over LoRA strengths; and the two WGSL shaders against their CPU twins.
#![cfg(feature = "studio")]

mod common;

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

/// The test window's size.
const WINDOW: [f32; 2] = [1100.0, 900.0];
/// Where the settings panel ends in that window.
const SETTINGS_PANEL_RIGHT: f32 = 420.0;

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
        .with_size(WINDOW)
        .wgpu()
        .build_eframe(move |cc| {
            let mut app = StudioApp::new(cc, opts).expect("studio starts");
            app.dialogs = Dialogs::Fixed(exports);
            app
        })
}

/// Step until the model has loaded.
fn wait_for_model(h: &mut Harness<'static, StudioApp>) {
    step_until(h, "the model", |a| {
        matches!(a.view.model, ModelStatus::Ready(_))
    });
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
    // Times ("1.23 s", "done in", "loaded in", "s left") get masks of a width that does not
    // depend on their text: a slower machine writes more digits. Speed-ups are masked below, to
    // their column's width.
    let rects: Vec<egui::Rect> = h
        .query_all_by(|n| {
            n.label().or_else(|| n.value()).is_some_and(|l| {
                !speedup_range(&l)
                    && (l.ends_with(" s")
                        || l.contains(" s left")
                        || l.starts_with("done in")
                        || l.contains("loaded in"))
            })
        })
        .map(|n| {
            // A short cell ("1.23 s", a table's wall time) is covered to a fixed width; a longer
            // line ("done in ...", "model loaded in ...") to its panel's right edge, so the
            // number of digits a loaded machine writes never moves a mask's edge.
            let r = n.rect();
            let right = if r.width() < 100.0 {
                r.min.x + 100.0
            } else if r.min.x < SETTINGS_PANEL_RIGHT {
                SETTINGS_PANEL_RIGHT.max(r.max.x)
            } else {
                WINDOW[0].max(r.max.x)
            };
            egui::Rect::from_min_max(r.min, egui::pos2(right, r.max.y))
        })
        .chain(
            h.query_all_by(|n| {
                n.label().or_else(|| n.value()).is_some_and(|l| {
                    l.ends_with('x') && l.chars().next().is_some_and(|c| c.is_ascii_digit())
                })
            })
            .map(|n| n.rect()),
        )
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
    engine_image(&s.to_request())
}

#[test]
fn generate_export_restore_and_delete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio(dir.path());
    wait_for_model(&mut h);
    assert!(
        h.state().uses_gpu_shaders(),
        "the test renderer gives the app a wgpu device that runs the WGSL passes \
         (Mesa's Vulkan driver, lavapipe: .ci/run installs mesa-vulkan-drivers)"
    );
    h.get_by_label("Generate").click_accesskit();
    h.step();
    assert!(h.state().is_busy());
    step_until(&mut h, "the image", |a| !a.is_busy());

    let app = h.state();
    let shown = app.view.result.as_ref().expect("an image on screen");
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
        a.view.messages.iter().any(|m| m.text.starts_with("saved"))
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
        a.view.gallery.entries.len() == 1
    });
    h.get_by_label("Restore").click();
    h.step();
    assert_eq!(h.state().settings.request.seed, 42);
    assert_eq!(h.state().settings.request.prompt, settings.prompt);
    let path = h.state().view.gallery.entries[0].path.clone();
    assert!(path.exists());
    // Delete asks first; only the confirmation removes the file.
    h.get_by_label("Delete").click();
    h.run_steps(2);
    h.get_by_label("Delete this image?");
    assert!(path.exists());
    h.get_by_label("Yes, delete").click();
    step_until(&mut h, "the delete", |a| a.view.gallery.entries.is_empty());
    assert!(!path.exists());
}

#[test]
fn cancel_with_escape() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio(dir.path());
    h.state_mut().settings.request.steps = Some(60);
    h.get_by_label("Generate").click_accesskit();
    step_until(&mut h, "the first step", |a| {
        a.view.job.as_ref().is_some_and(|j| j.step >= 1)
    });
    h.key_press(egui::Key::Escape);
    step_until(&mut h, "the cancel", |a| !a.is_busy());
    let app = h.state();
    assert!(app.view.result.is_none());
    assert!(app.view.messages.iter().any(|m| m.text == "cancelled"));
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
    assert_eq!(h.state().view.tab, Tab::Compare);
    step_until(&mut h, "the sweep", |a| !a.is_busy());
    let app = h.state();
    assert_eq!(app.view.compare.len(), 3);
    let r = &app.view.compare[1].result;
    assert_eq!(r.generated.settings.cache_threshold, 5.0);
    assert!(r.generated.stats.reused > 0);
    assert!(r.quality.is_some() && r.speedup.is_some());
    let m = &app.view.compare[2];
    assert_eq!(m.result.generated.settings.cache_spec(), policy);
    assert!(m.result.quality.is_some());
    // The default prompt is in the demo's world: every cell has its prompt score.
    assert!(app.view.compare.iter().all(|s| s.prompt_score.is_some()));
    // Timed in three rounds (the default): every cell has its three times; the table shows the
    // speed-ups with their range, and what each number means on hover.
    assert!(app.view.compare.iter().all(|s| s
        .timing
        .as_ref()
        .is_some_and(|t| t.wall_ms.len() == 3 && t.identical)));
    let spread = app.view.compare[1]
        .timing
        .as_ref()
        .and_then(|t| t.speedup())
        .expect("a speed-up with its range");
    assert!(spread.min <= spread.median && spread.median <= spread.max);
    let reusing = app.view.compare[1..]
        .iter()
        .filter(|s| s.result.generated.stats.reused > 0)
        .count();
    let ranged = labels_where(&h, speedup_range);
    assert_eq!(
        ranged.len(),
        reusing,
        "each cell that reused a step shows its range: {ranged:?}"
    );
    // Shown (another cell may read the same, e.g. two "no measurable gain" on a loaded machine).
    assert!(!labels_with(&h, spread.label().as_str()).is_empty());
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

/// The message log's lines.
fn messages(h: &Harness<'static, StudioApp>) -> Vec<String> {
    h.state()
        .view
        .messages
        .iter()
        .map(|m| m.text.clone())
        .collect()
}

/// The demo's polka LoRA, as the panel's one-click button adds it.
fn polka_lora() -> std::path::PathBuf {
    parallax::app::lora::demo_lora_path().expect("the demo LoRA")
}

/// The demo's image of `req`, through the engine directly (no studio).
fn engine_image(req: &parallax::pipeline::GenerateRequest) -> RgbImage {
    Pipeline::demo(&Device::Cpu)
        .expect("demo")
        .generate(req, &mut |_| Ok(()))
        .expect("generate")
        .image
}

/// The demo LoRA added in the panel, its strength set on the slider, Generate: the image is the
/// engine's with that LoRA, it draws the polka background the prompt asks for where the same
/// image without the LoRA does not (the scorer's background check, as tests/demo_lora.rs reads
/// it), and its PNG names the LoRA; turned off, the image is the one without it. Then the list
/// is saved with the settings.
#[test]
fn a_lora_added_in_the_panel_draws_its_concept_and_goes_into_the_png() {
    use egui::accesskit::Role;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio(dir.path());
    wait_for_model(&mut h);
    let polka = "a yellow star, on a red and blue polka background";
    h.state_mut().settings.request.prompt = polka.into();
    h.get_by_label("Polka dots (demo)").click();
    h.run_steps(2);
    assert_eq!(h.state().settings.loras.len(), 1);
    step_until(&mut h, "the LoRA's check", |a| {
        matches!(
            a.lora_checks.fit(&a.settings.loras[0].path),
            Some(parallax::app::lora::Fit::Fits(_))
        )
    });
    assert_eq!(labels_with(&h, "fits the model: adapts").len(), 1);
    assert!(
        h.query_by_label("Polka dots (demo)").is_none(),
        "offered only while not listed"
    );
    h.get_by_role_and_label(Role::Slider, "lora-polka")
        .set_value_accesskit(1.25);
    h.run_steps(2);
    assert_eq!(h.state().settings.loras[0].strength, 1.25);
    assert_eq!(labels_with(&h, "LoRAs (1 of 1 on)").len(), 1);
    mask_timings(&mut h);
    h.snapshot("studio_lora_list");

    // Below the list, scrolled out of the panel: clicked as a screen reader would.
    h.get_by_label("Generate").click_accesskit();
    h.step();
    assert!(h.state().is_busy());
    step_until(&mut h, "the image", |a| !a.is_busy());
    let shown = h
        .state()
        .view
        .result
        .as_ref()
        .expect("an image")
        .result
        .clone();
    let g = &shown.generated;
    let lora = parallax::model::lora::LoraChoice {
        path: polka_lora(),
        strength: 1.25,
    };
    assert_eq!(
        g.settings.loras,
        vec![lora.clone()],
        "the PNG names the LoRA"
    );
    let with = g.image.clone();
    assert_eq!(with, engine_image(&g.settings.to_request()));
    let without_req = parallax::pipeline::GenerateRequest {
        loras: vec![],
        ..g.settings.to_request()
    };
    let without = engine_image(&without_req);
    assert_ne!(with, without);
    let asked = parallax::scenes::parse::parse(polka).expect("the scorer reads the prompt");
    let background = |img: &RgbImage| {
        parallax::scenes::score::score(img, &asked)
            .checks
            .iter()
            .find(|c| c.kind == "background")
            .expect("a background check")
            .passed
    };
    assert!(background(&with), "polka dots drawn with the LoRA");
    assert!(!background(&without), "and not without it");
    let saved = shown.saved.clone().expect("kept in the gallery");
    let (_, text) = read_png(&saved).expect("read the PNG");
    assert!(
        text.iter()
            .any(|(k, v)| k == "parallax" && v.contains("lora-polka.safetensors")),
        "{text:?}"
    );

    // Off: the image without it.
    h.get_by_role_and_label(Role::CheckBox, "lora-polka")
        .click();
    h.run_steps(2);
    assert!(!h.state().settings.loras[0].on);
    h.get_by_label("Generate").click_accesskit();
    h.step();
    assert!(h.state().is_busy());
    step_until(&mut h, "the image", |a| !a.is_busy());
    let off = &h.state().view.result.as_ref().expect("an image").result;
    assert!(off.generated.settings.loras.is_empty());
    assert_eq!(off.generated.image, without);

    // Dropping the first image back: its LoRA on again at its strength.
    h.state_mut()
        .queue(parallax::app::action::Action::RecallFrom(saved));
    h.run_steps(2);
    assert_eq!(h.state().settings.loras.len(), 1);
    assert!(h.state().settings.loras[0].on);
    assert_eq!(h.state().settings.request().loras, vec![lora]);
    // Saved with the settings (when the window closes, or the auto-save).
    let file = dir.path().join("settings.json");
    let s = h.state().settings.clone();
    parallax::app::settings_file::save(&file, &s).expect("save");
    match parallax::app::settings_file::load(&file) {
        parallax::app::settings_file::Loaded::Read(back) => assert_eq!(back.loras, s.loras),
        other => panic!("{other:?}"),
    }
}

/// A file that is no LoRA of this model: the engine's words under its row and in the log, and
/// Generate refused while it is on. A model it does not fit (random:tiny has 4 single blocks,
/// the demo LoRA adapts 6): said when that model loads, not dropped.
#[test]
fn a_lora_that_does_not_fit_is_said_and_blocks_generate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio(dir.path());
    wait_for_model(&mut h);
    let not_a_lora = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/clip.safetensors");
    h.state_mut()
        .queue(parallax::app::action::Action::AddLoras(vec![not_a_lora]));
    h.run_steps(2);
    step_until(&mut h, "the check", |a| !a.blockers().is_empty());
    let said = labels_with(&h, "are not LoRA weights of this FLUX.1 transformer");
    assert!(!said.is_empty(), "the engine's words on screen");
    assert!(disabled(&h, "Generate"));
    assert!(h
        .state()
        .blockers()
        .iter()
        .any(|b| b.contains("the LoRA clip does not fit this model")));
    h.get_by_label("Remove").click();
    h.run_steps(2);
    assert!(h.state().settings.loras.is_empty());
    assert!(!disabled(&h, "Generate"));

    h.state_mut()
        .queue(parallax::app::action::Action::AddLoras(vec![polka_lora()]));
    h.state_mut().queue(parallax::app::action::Action::UseModel(
        "random:tiny".into(),
    ));
    h.run_steps(2);
    step_until(&mut h, "random:tiny and the check", |a| {
        !a.blockers().is_empty()
    });
    let said = messages(&h);
    assert!(
        said.iter()
            .any(|m| m.contains("lora-polka") && m.ends_with("(model random:tiny)")),
        "{said:?}"
    );
    assert_eq!(h.state().settings.loras.len(), 1, "kept in the list");
}

/// The compare sweep at two LoRA strengths crossed with a cache threshold: four cells, each
/// strength's cached cell measured against that strength's uncached one, shown by strength.
#[test]
fn compare_sweeps_lora_strengths_against_each_strengths_reference() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio(dir.path());
    wait_for_model(&mut h);
    h.state_mut().settings.request.prompt =
        "a yellow star, on a red and blue polka background".into();
    h.state_mut()
        .queue(parallax::app::action::Action::AddDemoLora);
    h.run_steps(2);
    h.state_mut().settings.compare_thresholds = vec![0.0, 5.0];
    h.state_mut().settings.compare_caches = vec![];
    h.state_mut().settings.compare_repeats = 1;
    h.state_mut().settings.request.steps = Some(6);
    h.state_mut().settings.compare_lora_strengths =
        parallax::app::state::parse_strengths("0, 1").expect("strengths");
    h.run_steps(2);
    let field = h.get_by_role_and_label(
        egui::accesskit::Role::TextInput,
        "Compare at strengths (-2 to 2)",
    );
    assert_eq!(
        field.value().as_deref(),
        Some("0, 1"),
        "the field shows the strengths"
    );
    h.state_mut().start_compare();
    h.step();
    step_until(&mut h, "the sweep", |a| !a.is_busy());
    let cells = &h.state().view.compare;
    assert_eq!(cells.len(), 4);
    let strength = |i: usize| cells[i].result.generated.settings.loras[0].strength;
    assert_eq!(
        (strength(0), strength(1), strength(2), strength(3)),
        (0.0, 0.0, 1.0, 1.0)
    );
    assert!(cells[3].result.generated.stats.reused > 0);
    // Each cached cell against its own strength's uncached image.
    for (cell, reference) in [(1, 0), (3, 2)] {
        let q = parallax::pipeline::metrics::quality(&cells[cell].image, &cells[reference].image)
            .expect("quality");
        assert_eq!(cells[cell].result.quality, Some(q));
    }
    assert!(cells[2].result.quality.is_none(), "strength 1's reference");
    // Strength 0 is the image without the LoRA; strength 1 the engine's with it.
    let base = cells[0].result.generated.settings.to_request();
    assert_eq!(
        *cells[0].image,
        engine_image(&parallax::pipeline::GenerateRequest {
            loras: vec![],
            ..base.clone()
        })
    );
    assert_eq!(
        *cells[2].image,
        engine_image(&cells[2].result.generated.settings.to_request())
    );
    assert_ne!(cells[0].image, cells[2].image);
    // Shown by strength: under the thumbnails and in the table's LoRA column, two references.
    assert_eq!(labels_with(&h, "LoRA 1 · First Block Cache · 5").len(), 1);
    assert!(!labels_with(&h, "LoRA 0 · No cache").is_empty());
    assert_eq!(h.query_all_by_label("reference").count(), 2);
    h.get_by_label("LoRA");
    h.hover_at(egui::pos2(1090.0, 750.0));
    h.run_steps(4);
    mask_timings(&mut h);
    h.snapshot("studio_compare_lora");
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
    let r = &h.state().view.compare[1].result;
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
    let said: Vec<String> = h
        .state()
        .view
        .messages
        .iter()
        .map(|m| m.text.clone())
        .collect();
    let notes: Vec<&String> = said
        .iter()
        .filter(|m| m.contains("gallery: skipped"))
        .collect();
    assert_eq!(notes.len(), 1, "{said:?}");
    assert!(notes[0].contains("and 1 more"), "{said:?}");
    assert!(h.state().view.gallery.entries.is_empty());
    // Said once, not at every refresh.
    h.state_mut().view.gallery.dirty = true;
    h.run_steps(4);
    let again: Vec<usize> = h
        .state()
        .view
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
        .view
        .result
        .as_ref()
        .and_then(|s| s.result.saved.clone())
        .expect("saved");
    for i in 0..11 {
        let copy = first.with_file_name(format!("copy-{i:02}.png"));
        std::fs::copy(&first, copy).expect("copy");
    }
    h.get_by_label("Gallery").click();
    step_until(&mut h, "the listing", |a| {
        a.view.gallery.entries.len() == 12
    });
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
    let last = h.state().view.gallery.entries[11].path.clone();
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
            .view
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
    assert!(h.state().view.gallery.confirm_delete.is_none());
    h.get_by_label("Back to the gallery").click();
    h.run_steps(2);
    assert!(h.state().view.gallery.opened.is_none());
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
        .view
        .path_prompt
        .as_mut()
        .expect("the path field")
        .text = bad.display().to_string();
    h.get_by_label("Save").click();
    h.run_steps(2);
    let err = h
        .state()
        .view
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
    h.state_mut()
        .view
        .path_prompt
        .as_mut()
        .expect("still open")
        .text = good.display().to_string();
    h.get_by_label("Save").click();
    h.run_steps(2);
    assert!(h.state().view.path_prompt.is_none());
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
        matches!(a.view.model, ModelStatus::Failed { .. })
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
    let said: Vec<String> = h
        .state()
        .view
        .messages
        .iter()
        .map(|m| m.text.clone())
        .collect();
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
    let said: Vec<String> = h
        .state()
        .view
        .messages
        .iter()
        .map(|m| m.text.clone())
        .collect();
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
    // FLUX.1's 16 latent channels, and 32 (FLUX.2's): the map is sized by the family's latent.
    for channels in [16, 32] {
        preview_shader_matches_the_cpu_map_at(channels);
    }
}

fn preview_shader_matches_the_cpu_map_at(channels: usize) {
    let (w, h) = (8usize, 6usize);
    let mut rng = parallax::model::rng::SplitMix64::new(3);
    let latent = Latent {
        width: w,
        height: h,
        data: rng.normals(channels * w * h),
    };
    let mut f = PreviewFactors {
        weights: vec![vec![0.0; channels]; 3],
        bias: [0.05, -0.1, 0.2],
        r2: 1.0,
    };
    for (ch, row) in f.weights.iter_mut().enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            *v = ((ch * 16 + c) as f32 * 0.37).sin() * 0.12 * 16.0 / channels as f32;
        }
    }
    let cpu = f.apply(&latent);
    let (lat, fac) = (std::sync::Arc::new(latent), std::sync::Arc::new(f));
    // Each latent position covers a 5x5 pixel block at 1:1: the block's middle pixel's centre is
    // the position itself, where the filtered preview equals the map.
    let img = probe(move |ui| {
        let rect = egui::Rect::from_min_size(egui::pos2(0.0, 0.0), egui::vec2(40.0, 30.0));
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
            let px = img.get_pixel((x * 5 + 2) as u32, (y * 5 + 2) as u32);
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
    // Filtered, not blocks: between two positions the colour lies between theirs, and differs
    // from both somewhere.
    let mut between = 0;
    for y in 0..h {
        for x in 0..w - 1 {
            // 2 px right of position x's centre: 40 % of the way to position x + 1.
            let px = img.get_pixel((x * 5 + 4) as u32, (y * 5 + 2) as u32);
            for c in 0..3 {
                let (a, b) = (
                    cpu[(y * w + x) * 3 + c] as i32,
                    cpu[(y * w + x + 1) * 3 + c] as i32,
                );
                let v = px[c] as i32;
                assert!(
                    v >= a.min(b) - 1 && v <= a.max(b) + 1,
                    "({x},{y}) channel {c}: {v} is not between {a} and {b}"
                );
                between += usize::from((a - b).abs() > 4 && v != a && v != b);
            }
        }
    }
    assert!(between > 10, "only {between} filtered values: hard blocks?");
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
    assert_eq!(
        (s.layout.ulysses, s.layout.ring, s.layout_auto),
        (2, 2, false)
    );
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
        .layout_check(h.state().view.model_shape)
        .expect_err("ring 3 on 4 workers");
    assert!(message.contains("asks for 6 devices"), "{message}");
    assert!(h
        .query_all_by_label_contains("asks for 6 devices")
        .next()
        .is_some());
    h.get_by_label("ring").set_value_accesskit(2.0);
    h.step();

    h.get_by_label("Generate").click_accesskit();
    h.step();
    step_until(&mut h, "the image", |a| !a.is_busy());
    let app = h.state();
    let shown = app.view.result.as_ref().expect("an image on screen");
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
        app.view
            .messages
            .iter()
            .any(|m| m.text.contains("ring 2 x ulysses 2")),
        "the job's layout is reported: {:?}",
        app.view
            .messages
            .iter()
            .map(|m| &m.text)
            .collect::<Vec<_>>()
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
        .view
        .messages
        .iter()
        .filter(|m| m.text.contains("the settings were not saved"))
        .count();
    assert_eq!(said, 1);
    // The file saved before is untouched.
    assert!(matches!(load(&file), Loaded::Read(_)));
}

/// The budget picker answers "will it fit?" for a model that is not downloaded (`dev`, from its
/// built-in configs): where one GPU of the budget is not enough it says how many would, as
/// PipeFusion stages split by memory, and a custom budget gets its own answer. A file model shows
/// the fields for its separate parts; the demo does not.
#[test]
fn budget_picker_answers_without_weights() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut h = studio(dir.path());
    h.step();
    assert!(labels_with(&h, "Separate files").is_empty());
    h.state_mut().settings.model = "dev".into();
    h.state_mut().settings.memory_budget_gib = Some(16);
    h.step();
    h.step();
    let answer = labels_with(&h, "dev at 1024x1024 px");
    assert_eq!(answer.len(), 1, "{answer:?}");
    assert!(
        answer[0].contains("GPUs of 16 GiB would, as PipeFusion stages split by memory"),
        "{answer:?}"
    );
    assert_eq!(labels_with(&h, "Separate files (0 named)").len(), 1);
    // A custom budget (not one of the presets): T5-XXL alone does not fit in 11 GiB.
    h.state_mut().settings.memory_budget_gib = Some(11);
    h.step();
    h.step();
    let answer = labels_with(&h, "dev at 1024x1024 px");
    assert!(
        answer
            .iter()
            .any(|a| a.contains("no number of 11 GiB GPUs would")),
        "{answer:?}"
    );
    assert_eq!(
        h.state().settings.engine_spec().model.memory_budget_mib,
        Some(11 * 1024)
    );
}

/// The seeds of the gallery's images in the order they were made.
fn gallery_seeds_in_order(dir: &Path) -> Vec<u64> {
    let mut entries = parallax::runtime::Gallery::open(dir.join("gallery"))
        .expect("gallery")
        .list()
        .expect("list");
    entries.sort_by_key(|e| e.run.created_ms);
    entries.iter().map(|e| e.settings.seed).collect()
}

/// Generate while a job runs queues the job, shown under the progress bar: a batch of two
/// (seeds 100, 101) and one more (seed 200) wait behind the running one; the last is moved up,
/// the first taken out, the running job cancelled; the rest run in the queue's order.
#[test]
fn generate_while_busy_queues_jobs_to_reorder_and_cancel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio(dir.path());
    wait_for_model(&mut h);
    h.state_mut().settings.request.steps = Some(100);
    h.get_by_label("Generate").click_accesskit();
    step_until(&mut h, "the first step", |a| {
        a.view.job.as_ref().is_some_and(|j| j.step >= 1)
    });
    // Quick jobs behind it.
    {
        let s = &mut h.state_mut().settings;
        s.request.steps = Some(2);
        s.request.width = 64;
        s.request.height = 64;
        s.request.seed = 100;
        s.batch = 2;
    }
    h.run_steps(2);
    assert!(
        !disabled(&h, "Generate"),
        "Generate stays on while a job runs"
    );
    h.get_by_label("Generate").click_accesskit();
    h.run_steps(2);
    h.state_mut().settings.request.seed = 200;
    h.state_mut().settings.batch = 1;
    h.run_steps(2);
    h.get_by_label("Generate").click_accesskit();
    h.run_steps(2);
    let waiting = |h: &Harness<'static, StudioApp>| -> Vec<String> {
        h.state()
            .view
            .queue
            .iter()
            .map(|q| q.summary.clone())
            .collect()
    };
    assert_eq!(
        waiting(&h),
        [
            "64x64, 2 steps, seed 100",
            "64x64, 2 steps, seed 101",
            "64x64, 2 steps, seed 200"
        ]
    );
    assert_eq!(labels_with(&h, "waiting"), ["3 waiting"]);
    assert!(!labels_with(&h, "3. two yellow stars").is_empty());
    // Seed 200 up, twice: first in the queue.
    h.query_all_by_label("up")
        .nth(2)
        .expect("up of the third")
        .click();
    h.run_steps(2);
    h.query_all_by_label("up")
        .nth(1)
        .expect("up of the second")
        .click();
    h.run_steps(2);
    assert_eq!(
        waiting(&h),
        [
            "64x64, 2 steps, seed 200",
            "64x64, 2 steps, seed 100",
            "64x64, 2 steps, seed 101"
        ]
    );
    // Seed 100 out.
    h.query_all_by_label("remove")
        .nth(1)
        .expect("x of the second")
        .click();
    h.run_steps(2);
    assert_eq!(waiting(&h).len(), 2);
    assert_eq!(
        h.state()
            .view
            .job
            .as_ref()
            .map(|j| (j.total, j.summary.clone())),
        Some((100, "256x256, 100 steps, seed 42".into())),
        "the first job still runs; waiting: {:?}",
        waiting(&h)
    );
    // Cancel the running one: the queue goes on, in its order.
    h.key_press(egui::Key::Escape);
    step_until(&mut h, "the queue", |a| !a.is_busy());
    assert!(h.state().view.queue.is_empty());
    assert_eq!(gallery_seeds_in_order(dir.path()), [200, 101]);
    assert!(h
        .state()
        .view
        .messages
        .iter()
        .any(|m| m.text == "cancelled"));
}

/// dp 2 means two images a Generate, seeds s and s + 1, both in the gallery.
#[test]
fn dp_two_makes_two_images_with_consecutive_seeds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio(dir.path());
    wait_for_model(&mut h);
    {
        let s = &mut h.state_mut().settings;
        s.device = "cpu".into();
        s.workers = 2;
        s.request.width = 64;
        s.request.height = 64;
        s.request.steps = Some(2);
        s.request.seed = 7;
    }
    h.run_steps(2);
    h.get_by_label("auto layout").click();
    h.run_steps(2);
    h.get_by_label("ulysses").set_value_accesskit(1.0);
    h.get_by_label("dp").set_value_accesskit(2.0);
    h.run_steps(2);
    assert!(
        h.query_by_label_contains("2 images at once").is_some(),
        "the plan says so"
    );
    h.get_by_label("Generate").click_accesskit();
    h.step();
    assert_eq!(
        h.state().view.job.as_ref().map(|j| j.summary.clone()),
        Some("64x64, 2 steps, seeds 7 to 8 (2 images at once)".into())
    );
    step_until(&mut h, "the images", |a| !a.is_busy());
    let mut seeds = gallery_seeds_in_order(dir.path());
    seeds.sort();
    assert_eq!(seeds, [7, 8]);
}

/// Unticking auto layout starts from auto's choice; a refusal is said once, in the panel's
/// words (no command-line flags), and the engine's late refusals (PipeFusion with a cache) are
/// caught as typed; the left panel keeps its width through it all.
#[test]
fn layout_by_hand_starts_from_auto_and_refusals_are_said_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio(dir.path());
    wait_for_model(&mut h);
    let prompt_width = |h: &Harness<'static, StudioApp>| h.get_by_label("Prompt").rect().width();
    let width = prompt_width(&h);
    h.state_mut().settings.workers = 4;
    h.run_steps(2);
    let auto = h
        .state()
        .settings
        .plan(h.state().view.model_shape.heads)
        .expect("auto plan");
    h.get_by_label("auto layout").click();
    h.run_steps(2);
    let s = &h.state().settings;
    assert!(!s.layout_auto);
    assert_eq!(
        (s.layout.ulysses, s.layout.ring, s.layout.cfg, s.layout.dp),
        (
            auto.layout.ulysses,
            auto.layout.ring,
            auto.layout.cfg,
            auto.layout.dp
        ),
        "by hand starts from auto's {}",
        auto.describe()
    );
    assert!(h.query_by_label_contains("Will run: 4 workers").is_some());
    // A layout that does not fit: said once, without flags.
    h.get_by_label("ring").set_value_accesskit(3.0);
    h.run_steps(2);
    assert_eq!(labels_with(&h, "asks for").len(), 1);
    assert!(disabled(&h, "Generate"));
    // PipeFusion with a cache: the engine refuses it at Generate; the panel does as typed.
    {
        let s = &mut h.state_mut().settings;
        s.workers = 2;
        s.layout.ring = 1;
        s.layout.ulysses = 1;
        s.layout.stale = parallax::parallel::mesh::Stale::pipefusion(2);
        s.request.cache_threshold = 0.1;
    }
    h.run_steps(2);
    let said = labels_with(&h, "PipeFusion runs without a cache");
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(disabled(&h, "Generate"));
    // True CFG on PipeFusion without cfg 2, the CLI's words become the panel's.
    h.state_mut().settings.request.cache_threshold = 0.0;
    h.state_mut().settings.request.true_cfg = Some(3.0);
    h.state_mut().settings.request.negative_prompt = Some("blur".into());
    h.run_steps(2);
    let said = labels_with(&h, "needs two");
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(said[0].contains("set cfg to 2"), "{}", said[0]);
    h.state_mut().settings.request.true_cfg = Some(1.0);
    h.run_steps(2);
    assert!(h.query_by_label_contains("Will run: 2 workers").is_some());
    assert!(!disabled(&h, "Generate"));
    // No flag in anything the panel said on the way.
    for m in h.state().settings.problems(h.state().view.model_shape) {
        assert!(!m.contains("--"), "{m}");
    }
    assert_eq!(prompt_width(&h), width, "the left panel kept its width");
}

/// The seed field takes every u64: seeds above 2^53 reach the engine whole.
#[test]
fn the_seed_field_keeps_seeds_above_2_pow_53() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio(dir.path());
    let big: u64 = (1 << 53) + 1;
    h.get_by_label("Seed").focus();
    h.step();
    h.key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::A);
    h.get_by_label("Seed").type_text(&big.to_string());
    h.run_steps(3);
    assert_eq!(h.state().settings.request.seed, big);
    assert_eq!(h.get_by_label("Seed").value(), Some(big.to_string()));
    // Set elsewhere (restore, random): the field follows.
    h.state_mut().settings.request.seed = u64::MAX;
    h.run_steps(2);
    assert_eq!(h.get_by_label("Seed").value(), Some(u64::MAX.to_string()));
    h.state_mut().settings.request.width = 64;
    h.state_mut().settings.request.height = 64;
    h.state_mut().settings.request.steps = Some(1);
    h.state_mut().generate();
    step_until(&mut h, "the image", |a| !a.is_busy());
    let shown = h.state().view.result.as_ref().expect("an image");
    assert_eq!(shown.result.generated.settings.seed, u64::MAX);
}

/// `--fresh` starts from the defaults and never writes over the remembered settings.
#[test]
fn fresh_leaves_the_remembered_settings_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    std::fs::create_dir_all(&home).expect("home");
    // The other tests start with `fresh_settings` and give their gallery: none reads this.
    std::env::set_var("PARALLAX_HOME", &home);
    let file = home.join("studio-settings.json");
    let mut remembered = parallax::app::Settings::default();
    remembered.request.prompt = "remembered".into();
    parallax::app::settings_file::save_with(&file, &remembered, false).expect("save");
    let before = std::fs::read(&file).expect("read");

    let mut h = studio(dir.path());
    assert_ne!(h.state().settings.request.prompt, "remembered");
    h.state_mut().settings.request.prompt = "a fresh start".into();
    let mut kv = Kv::default();
    eframe::App::save(h.state_mut(), &mut kv);
    drop(h);
    assert_eq!(std::fs::read(&file).expect("read"), before, "untouched");
    assert!(kv.0.is_empty(), "nor kept in eframe's storage: {:?}", kv.0);

    // Without --fresh, the same place is read (so the test looked where the studio looks).
    let opts = StudioOptions {
        gallery_dir: Some(dir.path().join("gallery")),
        skip_hf_cache: true,
        ..StudioOptions::default()
    };
    let h = Harness::builder()
        .wgpu()
        .build_eframe(move |cc| StudioApp::new(cc, opts).expect("studio starts"));
    assert_eq!(h.state().settings.request.prompt, "remembered");
}

/// The gallery lists an image from its header alone and bounds what a thumbnail decodes: a
/// 20000x20000 PNG whose pixels are junk is listed, and shown without a preview, with why.
#[test]
fn a_huge_gallery_image_is_listed_from_its_header_without_decoding() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gallery = dir.path().join("gallery");
    std::fs::create_dir_all(&gallery).expect("gallery");
    let path = gallery.join("huge.png");
    write_huge_png(&path, 20000, 20000);
    let mut h = studio(dir.path());
    h.get_by_label("Gallery").click();
    step_until(&mut h, "the listing", |a| a.view.gallery.entries.len() == 1);
    h.run_steps(3);
    let note = labels_with(&h, "no preview");
    assert_eq!(note.len(), 1, "{note:?}");
    assert!(note[0].contains("20000x20000"), "{}", note[0]);
    // Opened large: refused from the header too, with the reason.
    h.state_mut()
        .queue(parallax::app::Action::OpenImage(path.clone()));
    h.run_steps(2);
    assert!(h.state().view.gallery.opened.is_none());
    assert!(h
        .state()
        .view
        .messages
        .iter()
        .any(|m| m.text.contains("too large")));
}

/// A PNG that says it is `w` x `h` with a Parallax settings chunk, whose pixel data is junk
/// (a reader that decodes it fails; one that reads the header does not).
fn write_huge_png(path: &Path, w: u32, h: u32) {
    let req = parallax::pipeline::GenerateRequest {
        prompt: "a huge one".into(),
        width: 64,
        height: 64,
        steps: Some(1),
        ..Default::default()
    };
    let mut settings = Pipeline::demo(&Device::Cpu)
        .expect("demo")
        .settings_for(&req)
        .expect("settings");
    (settings.width, settings.height) = (w as usize, h as usize);
    // A real 1x1 PNG with the text, then its size rewritten in the header (CRC fixed).
    let small = RgbImage {
        width: 1,
        height: 1,
        data: vec![0, 0, 0],
    };
    let text = settings.png_text().expect("text");
    parallax::pipeline::image::save_png(path, &small, &text).expect("save");
    let mut bytes = std::fs::read(path).expect("read");
    // Signature (8), IHDR length (4) and type (4): width and height follow.
    bytes[16..20].copy_from_slice(&w.to_be_bytes());
    bytes[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&bytes[12..29]);
    bytes[29..33].copy_from_slice(&crc.to_be_bytes());
    std::fs::write(path, bytes).expect("write");
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 == 1 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// How soon the first preview comes at 256 px on the demo (printed, not asserted: a measure for
/// BENCHMARKS.md): from Generate to the first step's preview leaving the engine.
#[test]
fn first_preview_latency_at_256_px() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio(dir.path());
    wait_for_model(&mut h);
    for _ in 0..3 {
        h.state_mut().generate();
        step_until(&mut h, "the image", |a| !a.is_busy());
    }
    let first = &h.state().stats.first_preview_ms;
    assert_eq!(first.len(), 3, "one first preview a job");
    println!("first preview at 256 px, ms after Generate: {first:?}");
}

/// An image dropped on the window gives its settings: all of them from a Parallax PNG, and
/// what Automatic1111's `parameters` state from another tool's image (the model left as it is).
#[test]
fn a_dropped_image_gives_its_settings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio(dir.path());
    wait_for_model(&mut h);
    /// A file as the window system hands it over.
    #[derive(Debug)]
    struct Dropped(std::path::PathBuf);
    impl egui::DroppedFile for Dropped {
        fn path(&self) -> &Path {
            &self.0
        }
        fn bytes(&self) -> Result<Vec<u8>, String> {
            std::fs::read(&self.0).map_err(|e| e.to_string())
        }
    }
    let drop = |h: &mut Harness<'static, StudioApp>, path: &Path| {
        h.input_mut()
            .dropped_files
            .push(std::sync::Arc::new(Dropped(path.to_path_buf())));
        h.run_steps(2);
    };
    let img = RgbImage {
        width: 8,
        height: 8,
        data: vec![128; 8 * 8 * 3],
    };
    // Another tool's PNG.
    let a1111 = dir.path().join("a1111.png");
    let params = "a green star at the top\nNegative prompt: blurry\nSteps: 9, Sampler: Euler, CFG scale: 1, Distilled CFG Scale: 2.5, Seed: 777, Size: 320x256, Model: flux1-dev";
    parallax::pipeline::image::save_png(&a1111, &img, &[("parameters".into(), params.into())])
        .expect("write");
    drop(&mut h, &a1111);
    let s = &h.state().settings;
    assert_eq!(s.request.prompt, "a green star at the top");
    assert_eq!(s.request.negative_prompt.as_deref(), Some("blurry"));
    assert_eq!((s.request.width, s.request.height), (320, 256));
    assert_eq!((s.request.steps, s.request.seed), (Some(9), 777));
    assert_eq!(s.request.guidance, Some(2.5));
    assert_eq!(s.model, "demo", "the model is left as it is");
    assert!(!s.random_seed);
    let said: Vec<String> = h
        .state()
        .view
        .messages
        .iter()
        .map(|m| m.text.clone())
        .collect();
    assert!(
        said.iter()
            .any(|m| m.contains("(Automatic1111)") && m.contains("made with flux1-dev")),
        "{said:?}"
    );
    // A Parallax image: everything, as the gallery's Restore does.
    let settings = Pipeline::demo(&Device::Cpu)
        .expect("demo")
        .settings_for(&parallax::pipeline::GenerateRequest {
            prompt: "a red circle on the left".into(),
            seed: 31,
            steps: Some(5),
            width: 256,
            height: 256,
            ..Default::default()
        })
        .expect("settings");
    let ours = dir.path().join("ours.webp");
    parallax::pipeline::image::save_image(&ours, &img, &settings.png_text().expect("text"))
        .expect("write webp");
    drop(&mut h, &ours);
    let s = &h.state().settings;
    assert_eq!(s.request.prompt, "a red circle on the left");
    assert_eq!((s.request.steps, s.request.seed), (Some(5), 31));
    let said: Vec<String> = h
        .state()
        .view
        .messages
        .iter()
        .map(|m| m.text.clone())
        .collect();
    assert!(
        said.iter().any(|m| m == "settings restored from ours.webp"),
        "{said:?}"
    );
    // Something with no settings: said, nothing changed.
    let bare = dir.path().join("bare.png");
    parallax::pipeline::image::save_png(&bare, &img, &[]).expect("write");
    drop(&mut h, &bare);
    assert_eq!(h.state().settings.request.seed, 31);
    let said: Vec<String> = h
        .state()
        .view
        .messages
        .iter()
        .map(|m| m.text.clone())
        .collect();
    assert!(
        said.iter()
            .any(|m| m.starts_with("cannot take settings from bare.png")),
        "{said:?}"
    );
}

/// A FLUX.2 klein folder picked as the model (`random:klein-tiny` written in the diffusers
/// layout) loads and generates in the studio: the image on screen is the one `random:klein-tiny`
/// makes in process with the same settings.
#[test]
fn a_klein_folder_loads_and_generates() {
    use parallax::model::export::ExportLayout;
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("klein");
    parallax::model::klein_export::write_tiny(&model, ExportLayout::Diffusers).expect("write");
    let mut h = studio(dir.path());
    wait_for_model(&mut h);
    h.state_mut().settings.model = model.display().to_string();
    h.get_by_label("Load").click();
    step_until(&mut h, "the klein model", |a| match &a.view.model {
        ModelStatus::Ready(s) => s.contains("(klein)"),
        ModelStatus::Failed { .. } => true,
        _ => false,
    });
    assert!(
        matches!(&h.state().view.model, ModelStatus::Ready(_)),
        "{:?}",
        h.state().view.model
    );
    {
        let r = &mut h.state_mut().settings.request;
        (r.width, r.height, r.steps, r.seed) = (64, 64, Some(2), 7);
        r.prompt = "a red fox".into();
    }
    h.get_by_label("Generate").click_accesskit();
    h.step();
    step_until(&mut h, "the image", |a| !a.is_busy());
    let shown = h.state().view.result.as_ref().expect("an image on screen");
    let settings = shown.result.generated.settings.clone();
    assert_eq!(settings.model, model.display().to_string());
    assert!(
        settings.schedule.starts_with("flux2"),
        "{}",
        settings.schedule
    );
    let r = parallax::model::layout::resolve("random:klein-tiny", None).expect("resolve");
    let p = Pipeline::load(
        &r,
        "random:klein-tiny",
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .expect("random:klein-tiny");
    let want = p
        .generate(&settings.to_request(), &mut |_| Ok(()))
        .expect("generate")
        .image;
    assert_eq!((want.width, want.height), (64, 64));
    let d = want
        .data
        .iter()
        .zip(&shown.image.data)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap_or(255);
    // The studio may split the run over CPU workers (its automatic layout): up to rounding of
    // the attention's all-to-all order.
    assert!(
        d <= 2,
        "studio's klein image against random:klein-tiny: {d} of 255"
    );
}

/// The studio with the demo's default image made and on screen.
fn studio_with_an_image(dir: &Path) -> Harness<'static, StudioApp> {
    let mut h = studio(dir);
    wait_for_model(&mut h);
    h.get_by_label("Generate").click_accesskit();
    step_until(&mut h, "the first image", |a| {
        !a.is_busy() && a.view.result.is_some()
    });
    h
}

/// Drag the simulated pointer over the mask canvas along `points` (fractions of its size).
fn paint_stroke(h: &mut Harness<'static, StudioApp>, points: &[(f32, f32)]) {
    let r = h.get_by_label("mask canvas").rect();
    let at = |(u, v): (f32, f32)| r.min + egui::vec2(u * r.width(), v * r.height());
    h.hover_at(at(points[0]));
    h.step();
    h.drag_at(at(points[0]));
    h.step();
    for &p in &points[1..] {
        h.hover_at(at(p));
        h.step();
    }
    h.drop_at(at(points[points.len() - 1]));
    h.run_steps(2);
}

/// Inpainting from the studio: the image on screen as the source, a stroke painted over it with
/// the pointer, Generate: the painted area is redrawn (the red square, as the prompt's blue
/// circle), the rest of the image stays (within 6 levels on average, 8 px away from the mask's
/// edge and off the DEMO label: the demo autoencoder's round trip is what moves it), and the
/// image's settings name the source, the mask file and the strength.
#[test]
fn inpainting_a_painted_stroke_redraws_it_and_keeps_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio_with_an_image(dir.path());
    let source = h.state().view.result.as_ref().expect("image").image.clone();
    assert!(!disabled(&h, "Current image"));
    h.get_by_label("Current image").click();
    h.run_steps(3);
    let init = h.state().settings.request.init.clone().expect("a source");
    assert_eq!(
        Some(&init.image),
        h.state()
            .view
            .result
            .as_ref()
            .and_then(|r| r.result.saved.as_ref())
    );
    assert!(
        h.state().view.edit.mask.editing,
        "the Image tab shows the source to paint on"
    );
    // Strength 1: the square is redrawn from noise, as a blue circle.
    h.get_by_role_and_label(egui::accesskit::Role::Slider, "Strength")
        .set_value_accesskit(1.0);
    h.state_mut().settings.request.prompt =
        "two yellow stars above a blue circle, night sky".into();
    h.state_mut().view.edit.mask.brush = 36.0;
    h.run_steps(2);
    assert_eq!(labels_with(&h, "12 of 12 steps run").len(), 1);
    // Over the red square (the lower middle of the seed-42 image).
    paint_stroke(&mut h, &[(0.38, 0.72), (0.5, 0.74), (0.63, 0.72)]);
    let mask = h.state().view.edit.mask.mask.clone().expect("a mask");
    assert_eq!((mask.width(), mask.height()), (256, 256));
    let cover = mask.coverage();
    assert!((0.05..0.4).contains(&cover), "{cover}");
    // Under the stroke's points painted, the top of the image not.
    assert_eq!(mask.at(128, 189), 255);
    assert_eq!(mask.at(97, 184), 255);
    assert_eq!(mask.at(128, 40), 0);
    assert_eq!(
        labels_with(&h, "of the image redrawn").len(),
        1,
        "the panel says what share is redrawn"
    );
    // The brush's outline under the pointer; the gallery file's name (it holds the time) masked.
    let r = h.get_by_label("mask canvas").rect();
    h.hover_at(r.min + egui::vec2(0.3 * r.width(), 0.45 * r.height()));
    h.run_steps(2);
    // The README's screenshot, before the snapshot's masks.
    if let Some(out) = std::env::var_os("STUDIO_MASK_SHOT") {
        h.render()
            .expect("render")
            .save(out)
            .expect("save the README screenshot");
    }
    mask_timings(&mut h);
    let named: Vec<egui::Rect> = h
        .query_all_by(|n| n.value().is_some_and(|v| v.contains("-seed42-")))
        .map(|n| n.rect())
        .collect();
    for r in named {
        h.mask(r);
    }
    h.snapshot("studio_mask_painted");
    h.get_by_label("Generate").click_accesskit();
    h.step();
    step_until(&mut h, "the inpainted image", |a| !a.is_busy());
    let shown = h.state().view.result.as_ref().expect("the inpainted image");
    let g = &shown.result.generated;
    let used = g.settings.init.clone().expect("settings keep the source");
    assert_eq!(
        (used.image.as_path(), used.strength),
        (init.image.as_path(), 1.0)
    );
    let mask_file = used
        .mask
        .clone()
        .expect("the painted mask went with the request");
    assert!(!used.soft_mask, "no feather: the mask is thresholded");
    assert!(
        mask_file.starts_with(dir.path().join("gallery/masks")),
        "{}",
        mask_file.display()
    );
    let (w, hh) = (256usize, 256usize);
    let near_mask = |x: usize, y: usize| {
        let (x0, y0) = (x.saturating_sub(8), y.saturating_sub(8));
        (y0..(y + 9).min(hh)).any(|yy| (x0..(x + 9).min(w)).any(|xx| mask.at(xx, yy) >= 128))
    };
    let in_label = |x: usize, y: usize| x < 60 && y < 26;
    let outside = |x: usize, y: usize| !(in_label(x, y) || near_mask(x, y));
    let inside = |x: usize, y: usize| mask.at(x, y) >= 128;
    let kept = common::mean_diff_where(&g.image, &source, &outside);
    let changed = common::mean_diff_where(&g.image, &source, &inside);
    eprintln!("studio inpainting: mean |diff| outside the mask {kept:.2}, inside {changed:.1}");
    assert!(kept < 6.0, "outside the mask: {kept}");
    assert!(changed > 20.0, "inside the mask: {changed}");
    // The PNG says it, in A1111's words too.
    let (_, text) = read_png(shown.result.saved.as_ref().expect("in the gallery")).expect("png");
    let params = text
        .iter()
        .find(|(k, _)| k == "parameters")
        .map(|(_, v)| v.clone());
    assert!(params.is_some_and(|p| p.contains("Denoising strength: 1")));
}

/// The strength slider sets how many steps run (and the job runs that many); a gallery image's
/// "Use as source"; Invert and Clear on the mask; Clear on the source returns to text-to-image.
#[test]
fn strength_sets_the_steps_run_and_invert_and_clear_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio_with_an_image(dir.path());
    h.get_by_label("Gallery").click();
    step_until(&mut h, "the gallery listing", |a| {
        a.view.gallery.entries.len() == 1
    });
    let entry = h.state().view.gallery.entries[0].path.clone();
    h.get_by_label("Use as source").click();
    h.run_steps(3);
    assert_eq!(h.state().view.tab, Tab::Image);
    assert_eq!(
        h.state()
            .settings
            .request
            .init
            .as_ref()
            .map(|i| i.image.clone()),
        Some(entry)
    );
    // 0.6 by default: int(12 - 7.2) = 4 skipped, 8 run.
    assert_eq!(labels_with(&h, "8 of 12 steps run").len(), 1);
    let slider = |h: &Harness<'static, StudioApp>| {
        h.get_by_role_and_label(egui::accesskit::Role::Slider, "Strength")
            .rect()
            .center()
    };
    h.hover_at(slider(&h));
    h.run_steps(12);
    let help = labels_with(&h, "Lower keeps more of the source")
        .pop()
        .expect("the strength's tooltip");
    assert!(help.contains("fewer steps"), "{help}");
    h.get_by_role_and_label(egui::accesskit::Role::Slider, "Strength")
        .set_value_accesskit(0.5);
    h.run_steps(2);
    assert_eq!(labels_with(&h, "6 of 12 steps run").len(), 1);
    // Kept at its size (the source is 256 x 256, as chosen).
    assert_eq!(labels_with(&h, "the source is kept at its size").len(), 1);
    // Invert paints everything; Clear nothing.
    h.get_by_label("Invert").click();
    h.run_steps(2);
    let m = h.state().view.edit.mask.mask.as_ref().expect("mask");
    assert_eq!(m.coverage(), 1.0);
    assert_eq!(labels_with(&h, "100% of the image redrawn").len(), 1);
    h.get_by_label("Clear mask").click();
    h.run_steps(2);
    assert!(!h.state().view.edit.mask.has_mask());
    assert_eq!(
        labels_with(&h, "no mask: the whole image is changed").len(),
        1
    );
    let before = h.state().stats.steps_seen;
    h.get_by_label("Generate").click_accesskit();
    h.step();
    step_until(&mut h, "the image-to-image", |a| !a.is_busy());
    let g = &h
        .state()
        .view
        .result
        .as_ref()
        .expect("image")
        .result
        .generated;
    assert_eq!(h.state().stats.steps_seen - before, 6, "six steps ran");
    assert!(
        g.notes
            .iter()
            .any(|n| n.contains("image-to-image") && n.contains("6 of 12 steps run")),
        "{:?}",
        g.notes
    );
    assert_eq!(
        g.settings.init.as_ref().and_then(|i| i.mask.clone()),
        None,
        "no mask painted: none sent"
    );
    // A compare sweep keeps the source: every cell starts from it at the same strength.
    {
        let s = &mut h.state_mut().settings;
        s.compare_thresholds = vec![0.0, 5.0];
        s.compare_caches = vec![CacheSpec::preset("magcache", "balanced").expect("preset")];
        s.compare_repeats = 1;
    }
    // Below the window's edge now that the source is in the panel.
    h.get_by_label("Run compare").scroll_to_me();
    h.run_steps(3);
    h.get_by_label("Run compare").click();
    h.step();
    step_until(&mut h, "the sweep", |a| !a.is_busy());
    let cells = &h.state().view.compare;
    assert_eq!(cells.len(), 3);
    for c in cells {
        let s = &c.result.generated.settings;
        assert_eq!(s.init.as_ref().map(|i| i.strength), Some(0.5));
        assert!(c
            .result
            .generated
            .notes
            .iter()
            .any(|n| n.contains("6 of 12 steps run")));
    }
    assert!(cells[1].result.quality.is_some());
    h.get_by_label("Image").click();
    h.run_steps(2);
    // Outpainting: 64 px on the right makes a 320 x 256 canvas, resized to the size chosen
    // unless its own size is taken.
    h.state_mut()
        .settings
        .request
        .init
        .as_mut()
        .expect("source")
        .extend = Some([0, 0, 64, 0]);
    h.run_steps(2);
    assert_eq!(
        labels_with(&h, "the extended canvas (320x256) is resized to 256x256").len(),
        1
    );
    h.get_by_label("Use 320x256").click();
    h.run_steps(2);
    assert_eq!(
        (
            h.state().settings.request.width,
            h.state().settings.request.height
        ),
        (320, 256)
    );
    assert_eq!(labels_with(&h, "is kept at its size").len(), 1);
    h.get_by_label("Clear").click();
    h.run_steps(2);
    assert_eq!(h.state().settings.request.init, None);
    assert!(h.state().view.edit.mask.mask.is_none());
}

/// "Open image…" without a desktop dialog: the path field; a file that is not an image is
/// refused with its name, a JPEG is taken as the source (its size shown, a blank mask of it).
#[test]
fn a_source_file_is_opened_through_the_path_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio(dir.path());
    h.state_mut().dialogs = Dialogs::InWindow("no desktop file dialog here".into());
    h.get_by_label("Open image…").click();
    h.run_steps(3);
    let typed = |h: &mut Harness<'static, StudioApp>, p: &Path| {
        h.state_mut()
            .view
            .path_prompt
            .as_mut()
            .expect("the path field")
            .text = p.display().to_string();
        h.get_by_label("Open").click();
        h.run_steps(3);
    };
    let not_image = dir.path().join("notes.png");
    std::fs::write(&not_image, b"not an image").expect("write");
    typed(&mut h, &not_image);
    let err = h
        .state()
        .view
        .path_prompt
        .as_ref()
        .and_then(|p| p.error.clone())
        .expect("refused");
    assert!(err.contains("notes.png"), "{err}");
    assert_eq!(h.state().settings.request.init, None);
    let jpeg = dir.path().join("photo.jpg");
    image::RgbImage::from_pixel(320, 200, image::Rgb([90, 140, 200]))
        .save(&jpeg)
        .expect("write a JPEG");
    typed(&mut h, &jpeg);
    assert!(h.state().view.path_prompt.is_none());
    let init = h.state().settings.request.init.clone().expect("a source");
    assert_eq!((init.image.as_path(), init.strength), (jpeg.as_path(), 0.6));
    let m = h
        .state()
        .view
        .edit
        .mask
        .mask
        .as_ref()
        .expect("a blank mask");
    assert_eq!((m.width(), m.height(), m.painted()), (320, 200, 0));
    assert!(labels_with(&h, "320x200").contains(&"320x200".to_string()));
    // The demo draws at 256 x 256: the source is resized, and its own size is offered.
    assert_eq!(labels_with(&h, "the source is resized to 256x256").len(), 1);
    h.get_by_label("Use 320x192").click_accesskit();
    h.run_steps(2);
    let r = &h.state().settings.request;
    assert_eq!((r.width, r.height), (320, 192));
}

/// The "FP8 attention" checkbox beside the precision: the engine's model choice asks for it (a
/// changed choice reloads the model), and the settings file keeps it.
#[test]
fn fp8_attention_checkbox_reaches_the_engine_choice_and_the_settings_file() {
    use parallax::app::settings_file::{load, Loaded};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut h = studio(dir.path());
    assert!(!h.state().settings.fp8_attention);
    assert!(!h.state().settings.engine_spec().model.fp8_attention);
    h.get_by_label("FP8 attention").click();
    h.step();
    assert!(h.state().settings.fp8_attention);
    assert!(h.state().settings.engine_spec().model.fp8_attention);
    let file = dir.path().join("home").join("studio-settings.json");
    h.state_mut().settings_file = Some(file.clone());
    eframe::App::save(h.state_mut(), &mut Kv::default());
    match load(&file) {
        Loaded::Read(s) => assert!(s.fp8_attention, "not saved"),
        other => panic!("the saved settings read back as {other:?}"),
    }
}
