//! The studio's LoRA list: the files an artist added, each on or off at a strength (the ones on
//! go into every request, so the image's PNG names them), a folder's files added at once, the
//! demo's bundled LoRA, and each file checked against the loaded model on a thread of its own
//! ([`LoraChecks`]): a file that cannot be read, or does not fit the model, is said in the
//! engine's words beside its row and blocks Generate while it is on.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};

use crate::model::flux::FluxConfig;
use crate::model::lora::{LoraChoice, LoraSet};

/// The strengths the slider offers (negative ones push away from what the LoRA learnt).
pub const STRENGTHS: std::ops::RangeInclusive<f64> = -2.0..=2.0;

/// One row of the list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraEntry {
    pub path: PathBuf,
    pub strength: f64,
    #[serde(default = "on")]
    pub on: bool,
}

fn on() -> bool {
    true
}

impl LoraEntry {
    /// A file just added: on, at strength 1.
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            strength: 1.0,
            on: true,
        }
    }

    /// The row's name: the file's name without `.safetensors`.
    pub fn name(&self) -> String {
        self.path.file_stem().map_or_else(
            || self.path.display().to_string(),
            |n| n.to_string_lossy().into(),
        )
    }
}

/// The requests' LoRAs: the rows that are on.
pub fn choices(list: &[LoraEntry]) -> Vec<LoraChoice> {
    list.iter()
        .filter(|e| e.on)
        .map(|e| LoraChoice {
            path: e.path.clone(),
            strength: e.strength,
        })
        .collect()
}

/// Add files to the list (on, at strength 1); a file listed already is left as it is. Returns
/// how many were new.
pub fn add(list: &mut Vec<LoraEntry>, paths: impl IntoIterator<Item = PathBuf>) -> usize {
    let before = list.len();
    for p in paths {
        if !list.iter().any(|e| e.path == p) {
            list.push(LoraEntry::new(p));
        }
    }
    list.len() - before
}

/// Put a request's LoRAs (a restored image's) in the list: each on at its strength, added when
/// not listed yet.
pub fn add_choices(list: &mut Vec<LoraEntry>, choices: Vec<LoraChoice>) {
    for c in choices {
        match list.iter_mut().find(|e| e.path == c.path) {
            Some(e) => {
                e.strength = c.strength;
                e.on = true;
            }
            None => list.push(LoraEntry {
                path: c.path,
                strength: c.strength,
                on: true,
            }),
        }
    }
}

/// Every `.safetensors` file in `dir` (not in its subfolders), by name.
pub fn in_folder(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let read = std::fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    let mut out: Vec<PathBuf> = read
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|x| x.eq_ignore_ascii_case("safetensors"))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The demo model's LoRA (polka dots, `scripts/train-demo/train_lora.py`), built in.
static DEMO_LORA: &[u8] = include_bytes!("../../assets/demo/lora-polka.safetensors");
/// Its name in the source tree and when written out.
const DEMO_LORA_NAME: &str = "lora-polka.safetensors";

/// Where the demo's LoRA is read from: the source tree's `assets/demo/` when this build's is
/// there (so images name the file the README's commands use), else the built-in copy written
/// once beside the gallery (`$PARALLAX_HOME/loras/`, `~/.local/share/parallax/loras/`).
pub fn demo_lora_path() -> Result<PathBuf, String> {
    let tree = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets/demo")
        .join(DEMO_LORA_NAME);
    if std::fs::read(&tree).is_ok_and(|b| b == DEMO_LORA) {
        return Ok(tree);
    }
    let base = crate::runtime::gallery::default_dir();
    let dir = base.parent().unwrap_or(Path::new(".")).join("loras");
    let out = dir.join(DEMO_LORA_NAME);
    if std::fs::read(&out).is_ok_and(|b| b == DEMO_LORA) {
        return Ok(out);
    }
    std::fs::create_dir_all(&dir)
        .and_then(|_| {
            crate::files::write_atomic(&out, |w| {
                std::io::Write::write_all(w, DEMO_LORA).map_err(|e| crate::Error::io(&out, e))
            })
            .map_err(std::io::Error::other)
        })
        .map_err(|e| format!("cannot write the demo LoRA to {}: {e}", out.display()))?;
    Ok(out)
}

/// What is known of a file against the loaded model.
#[derive(Debug, Clone, PartialEq)]
pub enum Fit {
    /// Being read.
    Checking,
    /// It fits: how many of the model's layers it adapts.
    Fits(usize),
    /// It cannot be read, or does not fit: the engine's words.
    DoesNotFit(String),
}

/// Each listed file checked against the loaded model, on a thread of its own (the engine's own
/// reading, [`LoraSet::load`], which also keeps the file read for the first image). A model that
/// loads starts the checks again.
pub struct LoraChecks {
    /// The loaded model's name and FLUX.1 shape (`None`: it takes no LoRAs); `None` before one
    /// has loaded.
    model: Option<(String, Option<FluxConfig>)>,
    fits: HashMap<PathBuf, Fit>,
    /// Bumped at each model, so a check of the last model's is not taken for this one's.
    generation: u64,
    tx: mpsc::Sender<(u64, PathBuf, Fit)>,
    rx: mpsc::Receiver<(u64, PathBuf, Fit)>,
}

impl Default for LoraChecks {
    fn default() -> Self {
        let (tx, rx) = mpsc::channel();
        Self {
            model: None,
            fits: HashMap::new(),
            generation: 0,
            tx,
            rx,
        }
    }
}

impl LoraChecks {
    /// A model loaded: every file is checked again against it.
    pub fn model_loaded(&mut self, name: &str, config: Option<FluxConfig>) {
        self.generation += 1;
        self.fits.clear();
        self.model = Some((name.trim().to_string(), config));
    }

    /// What is known of `path`; `None` before a model has loaded.
    pub fn fit(&self, path: &Path) -> Option<&Fit> {
        self.fits.get(path)
    }

    /// Start a check for each listed file not checked yet, and take the finished ones: returns
    /// those that do not fit, with the model's name, to be said once.
    pub fn poll(&mut self, list: &[LoraEntry]) -> Vec<(PathBuf, String)> {
        let mut failed = Vec::new();
        while let Ok((generation, path, fit)) = self.rx.try_recv() {
            if generation != self.generation {
                continue;
            }
            if let (Fit::DoesNotFit(why), Some((model, _))) = (&fit, &self.model) {
                failed.push((path.clone(), format!("{why} (model {model})")));
            }
            self.fits.insert(path, fit);
        }
        let Some((model, config)) = &self.model else {
            return failed;
        };
        for e in list {
            if self.fits.contains_key(&e.path) {
                continue;
            }
            let Some(cfg) = config.clone() else {
                let why = format!(
                    "LoRAs work with FLUX.1 models only so far; {model} is not one: turn it off, \
                     or use a FLUX.1 model"
                );
                failed.push((e.path.clone(), why.clone()));
                self.fits.insert(e.path.clone(), Fit::DoesNotFit(why));
                continue;
            };
            self.fits.insert(e.path.clone(), Fit::Checking);
            let (tx, generation, path) = (self.tx.clone(), self.generation, e.path.clone());
            std::thread::spawn(move || {
                let choice = LoraChoice {
                    path: path.clone(),
                    strength: 1.0,
                };
                let fit = match LoraSet::load(&[choice], &cfg) {
                    Ok(set) => Fit::Fits(set.entries.first().map_or(0, |(f, _)| f.layers().len())),
                    Err(e) => Fit::DoesNotFit(e.to_string()),
                };
                let _ = tx.send((generation, path, fit));
            });
        }
        failed
    }

    /// Why Generate is refused: each file that is on and does not fit the loaded model.
    pub fn blockers(&self, list: &[LoraEntry]) -> Vec<String> {
        list.iter()
            .filter(|e| e.on)
            .filter_map(|e| match self.fits.get(&e.path) {
                Some(Fit::DoesNotFit(_)) => Some(format!(
                    "the LoRA {} does not fit this model (see its row): turn it off or remove it",
                    e.name()
                )),
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rows_on_go_into_the_request_and_files_are_added_once() {
        let mut list = Vec::new();
        let n = add(
            &mut list,
            ["/l/a.safetensors".into(), "/l/b.safetensors".into()],
        );
        assert_eq!(n, 2);
        assert_eq!(add(&mut list, ["/l/a.safetensors".into()]), 0);
        assert_eq!(list[0].name(), "a");
        list[0].strength = -0.5;
        list[1].on = false;
        assert_eq!(
            choices(&list),
            vec![LoraChoice {
                path: "/l/a.safetensors".into(),
                strength: -0.5
            }]
        );
        // A restored image's LoRAs: the listed one turned on at the image's strength, a new
        // one added.
        add_choices(
            &mut list,
            vec![
                LoraChoice {
                    path: "/l/b.safetensors".into(),
                    strength: 0.7,
                },
                LoraChoice {
                    path: "/l/c.safetensors".into(),
                    strength: 1.2,
                },
            ],
        );
        assert_eq!(list.len(), 3);
        assert!(list[1].on && list[1].strength == 0.7);
        assert_eq!(list[2].name(), "c");
    }

    #[test]
    fn a_folder_gives_its_safetensors_files_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        for n in ["b.safetensors", "a.SAFETENSORS", "notes.txt"] {
            std::fs::write(dir.path().join(n), b"x").expect("write");
        }
        std::fs::create_dir(dir.path().join("sub.safetensors")).expect("dir");
        let names: Vec<String> = in_folder(dir.path())
            .expect("read")
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into()))
            .collect();
        assert_eq!(names, ["a.SAFETENSORS", "b.safetensors"]);
        assert!(in_folder(&dir.path().join("gone")).is_err());
    }

    #[test]
    fn the_demo_lora_is_found_and_checked_against_the_demo_and_a_wrong_shape() {
        let path = demo_lora_path().expect("the demo LoRA");
        let demo = FluxConfig::demo();
        let mut checks = LoraChecks::default();
        let list = vec![
            LoraEntry::new(path.clone()),
            LoraEntry::new("/no/such/lora.safetensors".into()),
        ];
        assert!(
            checks.poll(&list).is_empty(),
            "nothing checked before a model"
        );
        checks.model_loaded("demo", Some(demo.clone()));
        let mut failed = Vec::new();
        let t0 = std::time::Instant::now();
        while list
            .iter()
            .any(|e| matches!(checks.fit(&e.path), None | Some(Fit::Checking)))
        {
            assert!(t0.elapsed().as_secs() < 60, "the checks finish");
            failed.extend(checks.poll(&list));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(matches!(checks.fit(&path), Some(Fit::Fits(n)) if *n > 0));
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(failed[0].1.contains("cannot read the file"), "{failed:?}");
        assert_eq!(checks.blockers(&list).len(), 1);
        // A model of another width: the engine's shape error, said for the row.
        let wider = FluxConfig {
            hidden_size: demo.hidden_size * 2,
            ..demo
        };
        checks.model_loaded("wide", Some(wider));
        let list = &list[..1];
        let t0 = std::time::Instant::now();
        let mut failed = Vec::new();
        while failed.is_empty() {
            assert!(t0.elapsed().as_secs() < 60, "the check finishes");
            failed.extend(checks.poll(list));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(failed[0].1.ends_with("(model wide)"), "{failed:?}");
        assert!(matches!(checks.fit(&path), Some(Fit::DoesNotFit(_))));
        // A model of another family takes none.
        checks.model_loaded("klein", None);
        let failed = checks.poll(list);
        assert!(failed[0].1.contains("FLUX.1 models only"), "{failed:?}");
    }
}
