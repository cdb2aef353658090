//! The demo LoRA (`assets/demo/lora-polka.safetensors`, trained by
//! `scripts/train-demo/train_lora.py`) teaches the built-in demo model a background its dataset
//! never drew: polka dots. Through the real `--lora` flag of `parallax dev score`, with the
//! scorer's background check (dots and the field between them must each match): prompts that
//! ask for polka dots get them with the LoRA and not without it, and prompts from the base
//! model's evaluation set score about as well with the LoRA on as without.

use std::path::Path;

/// Prompts in each run (polka, base): a handful, so the test stays quick on the CPU.
const POLKA_PROMPTS: &str = "4";
const BASE_PROMPTS: &str = "3";

fn lora_file() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo/lora-polka.safetensors");
    p.to_str().expect("utf-8 path").to_string()
}

/// `parallax dev score` on the demo (its defaults: 256 px, 12 steps), polka prompts or the base
/// evaluation prompts, with or without the LoRA: the uncached cell's prompt score.
fn score(polka: bool, lora: bool) -> serde_json::Value {
    let file = lora_file();
    let mut args = vec![
        "dev",
        "score",
        "--model",
        "demo",
        "--prompts",
        if polka { POLKA_PROMPTS } else { BASE_PROMPTS },
        "--prompt-seed",
        "11",
    ];
    if polka {
        args.push("--polka");
    }
    if lora {
        args.extend(["--lora", &file]);
    }
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_parallax"))
        .args(&args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run parallax");
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("score's JSON");
    v["thresholds"][0]["prompt_score"].clone()
}

fn share(v: &serde_json::Value, key: &str) -> f64 {
    let got = if key == "accuracy" {
        &v["accuracy"]
    } else {
        &v["by_kind"][key]
    };
    got.as_f64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

#[test]
fn the_polka_lora_teaches_polka_dots_and_keeps_the_rest() {
    let with = score(true, true);
    let without = score(true, false);
    let (bg_with, bg_without) = (share(&with, "background"), share(&without, "background"));
    assert!(
        bg_with >= 0.75,
        "polka dots drawn on {bg_with} of the prompts with the LoRA"
    );
    assert!(
        bg_without <= 0.25,
        "polka dots drawn on {bg_without} of the prompts without the LoRA"
    );

    // The base model's own prompts: the LoRA on costs at most a little of their score.
    let base_with = share(&score(false, true), "accuracy");
    let base_without = share(&score(false, false), "accuracy");
    eprintln!(
        "polka background check: {bg_with} with the LoRA, {bg_without} without; base prompts' \
         score: {base_with} with, {base_without} without"
    );
    assert!(
        base_with >= base_without - 0.1,
        "base prompts score {base_with} with the LoRA, {base_without} without"
    );
}

/// `parallax compare --lora-strengths`: every cell at each strength, each strength's cells
/// measured against its own uncached image; without exactly one `--lora` it is refused.
#[test]
fn compare_sweeps_the_lora_strength() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = lora_file();
    let save = dir.path().to_str().expect("utf-8 path");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "compare",
            "--model",
            "demo",
            "--prompt",
            "a yellow star, on a red and blue polka background",
            "--seed",
            "42",
            "--steps",
            "4",
            "--thresholds",
            "0,5",
            "--repeats",
            "1",
            "--lora-strengths",
            "0,1",
        ];
        args.extend(extra);
        std::process::Command::new(env!("CARGO_BIN_EXE_parallax"))
            .args(&args)
            .env_remove("RUST_LOG")
            .output()
            .expect("run parallax")
    };
    let o = run(&[]);
    assert!(!o.status.success());
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(said.contains("name it with one --lora FILE"), "{said}");

    let o = run(&["--lora", &file, "--save", save]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("compare's JSON");
    let rows = v["images"].as_array().expect("rows");
    let strengths: Vec<f64> = rows
        .iter()
        .map(|r| r["lora_strength"].as_f64().expect("a strength"))
        .collect();
    assert_eq!(strengths, [0.0, 0.0, 1.0, 1.0]);
    // Cells 0 and 2 are their strength's references; 1 and 3 are measured against them.
    for (i, reference) in [(0, true), (1, false), (2, true), (3, false)] {
        assert_eq!(rows[i]["psnr_db"].is_null(), reference, "{}", rows[i]);
        assert_eq!(rows[i]["speedup"].is_null(), reference, "{}", rows[i]);
    }
    let image = |name: &str| {
        parallax::pipeline::image::read_png(&dir.path().join(name))
            .expect("saved")
            .0
    };
    let uncached = parallax::pipeline::cache::CacheSpec::from_threshold(0.0).file_stem();
    let (off, on) = (
        image(&format!("compare-lora0-{uncached}.png")),
        image(&format!("compare-lora1-{uncached}.png")),
    );
    assert_ne!(off, on, "the LoRA at 1 changes the image");
}
