//! The studio's settings file, written by Parallax itself (JSON), atomically
//! ([`crate::files::write_atomic`]): a crash, a kill or a full disk while saving leaves the last
//! settings whole. eframe's own `app.ron` (window size and place) is rewritten in place by eframe,
//! so a crash there can damage it; the settings no longer live in it. (Nor could they: RON cannot
//! read back the `#[serde(flatten)]` that keeps old flat files loading, so settings saved there
//! came back as "damaged" at every start.) Settings an earlier version left there are tried
//! when this file does not exist yet (see [`super::studio::saved_settings`]), and removed from
//! there at the next save.
//!
//! Where: `$PARALLAX_HOME/studio-settings.json`, else `$XDG_CONFIG_HOME/parallax/settings.json`,
//! else `~/.config/parallax/settings.json`.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::state::Settings;
use crate::error::{Error, Result};

/// The settings file's default place (`None` where no home folder is known: then the settings
/// are not kept).
pub fn default_path() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(h) = var("PARALLAX_HOME") {
        return Some(h.join("studio-settings.json"));
    }
    if let Some(x) = var("XDG_CONFIG_HOME").filter(|p| p.is_absolute()) {
        return Some(x.join("parallax").join("settings.json"));
    }
    var("HOME").map(|h| h.join(".config").join("parallax").join("settings.json"))
}

/// What reading the settings file found.
#[derive(Debug, Clone, PartialEq)]
pub enum Loaded {
    /// No file (a first run, or settings kept by an earlier version elsewhere).
    Missing,
    Read(Box<Settings>),
    /// A file that cannot be used (damaged, or not ours), and why: the studio starts from the
    /// defaults and says so; the next save replaces it.
    Damaged(String),
}

/// Read the settings at `path`. Temporary files a crashed save left beside it are not looked at.
pub fn load(path: &Path) -> Loaded {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Loaded::Missing,
        Err(e) => return Loaded::Damaged(format!("cannot read {}: {e}", path.display())),
    };
    match serde_json::from_slice::<Settings>(&bytes) {
        Ok(s) => Loaded::Read(Box::new(s)),
        Err(e) => Loaded::Damaged(format!("{}: {e}", path.display())),
    }
}

/// Write `settings` to `path`, atomically.
pub fn save(path: &Path, settings: &Settings) -> Result<()> {
    save_with(path, settings, crate::files::write_fault_from_env())
}

/// [`save`], failing after the temporary file is written when `fault` (tests).
pub fn save_with(path: &Path, settings: &Settings, fault: bool) -> Result<()> {
    let text =
        serde_json::to_vec_pretty(settings).map_err(|e| Error::serialise("the settings", e))?;
    crate::files::write_atomic_with(
        path,
        |w| w.write_all(&text).map_err(|e| Error::io(path, e)),
        fault,
    )
}

/// eframe's storage kept in memory (for tests and headless runs: nothing is written).
#[derive(Debug, Default)]
pub struct MemoryStorage(pub std::collections::HashMap<String, String>);

impl eframe::Storage for MemoryStorage {
    fn get_string(&self, key: &str) -> Option<String> {
        self.0.get(key).cloned()
    }
    fn set_string(&mut self, key: &str, value: String) {
        self.0.insert(key.into(), value);
    }
    fn remove_string(&mut self, key: &str) {
        self.0.remove(key);
    }
    fn flush(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edited() -> Settings {
        let mut s = Settings::default();
        s.request.prompt = "a blue heart, night sky".into();
        s.request.seed = 42;
        s.workers = 3;
        s
    }

    use crate::files::file_names as names;

    #[test]
    fn settings_round_trip_and_a_failed_save_keeps_the_last_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("home").join("studio-settings.json");
        assert_eq!(load(&path), Loaded::Missing);
        let first = edited();
        save_with(&path, &first, false).expect("save");
        assert_eq!(load(&path), Loaded::Read(Box::new(first.clone())));

        // A save that fails once its temporary file is written (a full disk, a kill): the file
        // still holds the last settings, whole, and nothing else is left.
        let mut second = first.clone();
        second.request.prompt = "changed".into();
        let e = save_with(&path, &second, true).expect_err("injected fault");
        assert!(e.to_string().contains("injected write fault"), "{e}");
        assert_eq!(load(&path), Loaded::Read(Box::new(first.clone())));
        let folder = path.parent().expect("folder");
        assert_eq!(names(folder), vec!["studio-settings.json".to_string()]);

        // A temporary file a crashed save left (half written) is not read, and the next save
        // goes through beside it.
        let leftover = folder.join(".studio-settings.json.4242.0.partial");
        std::fs::write(&leftover, b"{\"model\": \"dem").expect("leftover");
        assert!(crate::files::is_partial(&leftover));
        assert_eq!(load(&path), Loaded::Read(Box::new(first)));
        save_with(&path, &second, false).expect("save");
        assert_eq!(load(&path), Loaded::Read(Box::new(second)));
    }

    #[test]
    fn a_damaged_or_foreign_file_is_reported_not_trusted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("studio-settings.json");
        // What a non-atomic writer leaves when killed half way: the start of a file.
        let whole = serde_json::to_string_pretty(&edited()).expect("json");
        std::fs::write(&path, &whole.as_bytes()[..whole.len() / 2]).expect("write");
        match load(&path) {
            Loaded::Damaged(why) => assert!(why.contains("studio-settings.json"), "{why}"),
            other => panic!("a torn file read as {other:?}"),
        }
        std::fs::write(&path, b"\x89PNG not json").expect("write");
        assert!(matches!(load(&path), Loaded::Damaged(_)));
        // The next save replaces it.
        save_with(&path, &edited(), false).expect("save");
        assert_eq!(load(&path), Loaded::Read(Box::new(edited())));
    }

    #[test]
    fn the_default_place_follows_parallax_home() {
        // Only read here: the variables are not changed (tests share the environment).
        if let Some(h) = std::env::var_os("PARALLAX_HOME").filter(|v| !v.is_empty()) {
            assert_eq!(
                default_path(),
                Some(PathBuf::from(h).join("studio-settings.json"))
            );
        } else if std::env::var_os("HOME").is_some() {
            let p = default_path().expect("a path under HOME or XDG_CONFIG_HOME");
            assert!(p.ends_with("parallax/settings.json"), "{}", p.display());
        }
    }

    #[test]
    fn the_list_is_saved_with_the_settings_and_restored_from_an_image() {
        let mut s = Settings::default();
        crate::app::lora::add(
            &mut s.loras,
            ["/l/ink.safetensors".into(), "/l/dots.safetensors".into()],
        );
        s.loras[0].strength = -1.5;
        s.loras[1].on = false;
        let req = s.request();
        assert_eq!(req.loras, crate::app::lora::choices(&s.loras));
        assert_eq!(req.loras.len(), 1);
        assert_eq!(s.lora_sweep(), vec![0.0, 0.5, 1.0]);
        let text = serde_json::to_string(&s).expect("serialise");
        let back: Settings = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, s);
        // Settings saved before the list: no LoRAs, the default sweep strengths.
        let old: Settings =
            serde_json::from_str(r#"{"model": "demo", "workers": 2}"#).expect("parse an old file");
        assert!(old.loras.is_empty() && old.request().loras.is_empty());
        assert!(old.lora_sweep().is_empty(), "no LoRA on: nothing to sweep");
        // A request that kept LoRAs (a restored image's, saved before the list) gives them to
        // the list, on.
        let kept = r#"{"request": {"prompt": "p", "negative_prompt": "", "width": 256,
            "height": 256, "steps": 12, "seed": 1, "guidance": 1.0, "cache_threshold": 0.0,
            "loras": [{"path": "/l/ink.safetensors", "strength": 0.75}]}}"#;
        let kept: Settings = serde_json::from_str(kept).expect("parse");
        assert!(kept.request.loras.is_empty());
        assert_eq!(
            kept.loras,
            vec![crate::app::lora::LoraEntry {
                path: "/l/ink.safetensors".into(),
                strength: 0.75,
                on: true
            }]
        );
        // Restoring an image: its LoRAs on at its strengths, the others off.
        let mut t = s.clone();
        let mut g = crate::pipeline::Pipeline::demo(&candle_core::Device::Cpu)
            .expect("demo")
            .settings_for(&crate::pipeline::GenerateRequest {
                loras: vec![crate::model::lora::LoraChoice {
                    path: "/l/dots.safetensors".into(),
                    strength: 0.25,
                }],
                ..Settings::default().request()
            })
            .expect("settings");
        t.restore(&g);
        assert_eq!(t.request().loras, g.loras);
        assert!(t.request.loras.is_empty());
        assert!(!t.loras[0].on && t.loras[1].on && t.loras[1].strength == 0.25);
        g.loras.clear();
        t.restore(&g);
        assert!(
            t.request().loras.is_empty(),
            "an image without LoRAs turns them off"
        );
        assert_eq!(t.loras.len(), 2, "and keeps them listed");
    }
}
