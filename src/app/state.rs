//! The studio's settings: what the panels edit, persisted between runs (eframe storage), and how
//! they become engine requests.

use serde::{Deserialize, Serialize};

use crate::engine::{Degrees, Devices, LayoutChoice, Placement};
use crate::parallel::mesh::ParallelLayout;
use crate::pipeline::{GenerateRequest, GenerationSettings};
use crate::runtime::EngineSpec;

/// Resolution presets (width, height).
pub const PRESETS: &[(&str, usize, usize)] = &[
    ("256 x 256 (demo)", 256, 256),
    ("512 x 512", 512, 512),
    ("1024 x 1024", 1024, 1024),
    ("1344 x 768 (16:9)", 1344, 768),
    ("768 x 1344 (9:16)", 768, 1344),
    ("2048 x 2048", 2048, 2048),
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    pub model: String,
    pub device: String,
    /// Worker threads on the CPU (GPU workers come with the multi-GPU engine).
    pub workers: usize,
    pub layout_auto: bool,
    pub ulysses: usize,
    pub ring: usize,
    pub cfg: usize,
    pub dp: usize,
    pub prompt: String,
    pub negative_prompt: String,
    pub true_cfg: f64,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub seed: u64,
    pub random_seed: bool,
    pub guidance: f64,
    pub cache_threshold: f64,
    pub compare_thresholds: Vec<f64>,
    pub heatmap_gain: f32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            model: "demo".into(),
            device: "cpu".into(),
            workers: 1,
            layout_auto: true,
            ulysses: 1,
            ring: 1,
            cfg: 1,
            dp: 1,
            prompt: "a lighthouse on a cliff at dawn, oil painting".into(),
            negative_prompt: String::new(),
            true_cfg: 1.0,
            width: 256,
            height: 256,
            steps: 4,
            seed: 42,
            random_seed: false,
            guidance: 3.5,
            cache_threshold: 0.0,
            compare_thresholds: vec![0.0, 0.06, 0.08, 0.12],
            heatmap_gain: 4.0,
        }
    }
}

impl Settings {
    /// The request for the current settings (the seed as shown).
    pub fn request(&self) -> GenerateRequest {
        GenerateRequest {
            prompt: self.prompt.clone(),
            negative_prompt: (!self.negative_prompt.trim().is_empty())
                .then(|| self.negative_prompt.clone()),
            true_cfg: Some(self.true_cfg),
            width: self.width,
            height: self.height,
            steps: Some(self.steps),
            seed: self.seed,
            guidance: Some(self.guidance),
            cache_threshold: self.cache_threshold,
        }
    }

    pub fn layout(&self) -> Option<ParallelLayout> {
        (!self.layout_auto).then_some(ParallelLayout {
            dp: self.dp,
            cfg: self.cfg,
            pipeline: 1,
            ring: self.ring,
            ulysses: self.ulysses,
        })
    }

    /// The placement these settings name: the device list (`cpu`, `cuda:0,1`, ...), with
    /// `workers` CPU threads when it says `cpu`.
    pub fn placement(&self) -> crate::Result<Placement> {
        let device = self.device.trim();
        let devices = match (Devices::parse(device)?, self.workers.max(1)) {
            (Devices::Cpu(1), n) => Devices::Cpu(n),
            (d, _) => d,
        };
        Ok(Placement {
            devices,
            layout: self
                .layout()
                .map_or(LayoutChoice::Auto, |l| LayoutChoice::Degrees(Degrees::of(l))),
        })
    }

    /// Take a placement given at start-up (`parallax studio --devices ...`).
    pub fn set_placement(&mut self, p: &Placement) {
        match p.devices {
            Devices::Cpu(n) => {
                self.device = "cpu".into();
                self.workers = n;
            }
            ref gpus => self.device = gpus.to_string(),
        }
        match p.layout {
            LayoutChoice::Auto => self.layout_auto = true,
            LayoutChoice::Degrees(d) => {
                // The degrees as they resolve over these workers (ring takes the rest).
                let workers = match &p.devices {
                    Devices::Cpu(n) => *n,
                    Devices::Gpus(g) => g.len(),
                    Devices::AllGpus => crate::engine::gpus_present().max(1),
                };
                let l = d.layout_for(workers);
                self.layout_auto = false;
                (self.ulysses, self.ring, self.cfg, self.dp) = (l.ulysses, l.ring, l.cfg, l.dp);
            }
        }
    }

    pub fn engine_spec(&self) -> EngineSpec {
        EngineSpec::new(self.model.trim(), self.placement().unwrap_or_default())
    }

    /// Problems with the settings as typed, shown next to the fields and blocking Generate.
    pub fn problems(&self, heads: usize) -> Vec<String> {
        let mut out = Vec::new();
        if self.width == 0 || self.height == 0 || self.width % 16 != 0 || self.height % 16 != 0 {
            out.push(format!(
                "size {}x{}: width and height must be positive multiples of 16",
                self.width, self.height
            ));
        }
        if self.steps == 0 {
            out.push("steps must be at least 1".into());
        }
        if !(self.cache_threshold.is_finite() && self.cache_threshold >= 0.0) {
            out.push("cache threshold must be 0 or more".into());
        }
        if self.model.trim().is_empty() {
            out.push("choose a model (demo, a file, a folder or a Hugging Face repo id)".into());
        }
        if let Err(e) = self.layout_check(heads) {
            out.push(e);
        }
        out
    }

    /// The layout these settings give, or why they are refused.
    pub fn layout_check(&self, heads: usize) -> Result<String, String> {
        // The engine's own check, so the panel shows exactly the plan a job will run with.
        self.placement()
            .and_then(|p| {
                p.plan(
                    heads,
                    crate::engine::wants_true_cfg(&self.request()),
                    crate::engine::gpus_present(),
                )
            })
            .map(|plan| plan.describe())
            .map_err(|e| e.to_string())
    }

    /// Take the settings an image was made with (gallery "restore").
    pub fn restore(&mut self, s: &GenerationSettings) {
        self.prompt = s.prompt.clone();
        self.negative_prompt = s.negative_prompt.clone().unwrap_or_default();
        self.true_cfg = s.true_cfg;
        self.width = s.width;
        self.height = s.height;
        self.steps = s.steps;
        self.seed = s.seed;
        self.random_seed = false;
        self.guidance = s.guidance;
        self.cache_threshold = s.cache_threshold;
        self.model = s.model.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_input_is_explained() {
        let s = Settings::default();
        assert!(s.problems(24).is_empty(), "{:?}", s.problems(24));
        let bad = Settings {
            width: 100,
            steps: 0,
            workers: 4,
            layout_auto: false,
            ulysses: 5,
            ring: 1,
            ..Settings::default()
        };
        let p = bad.problems(24);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains("multiples of 16"));
    }

    #[test]
    fn auto_layout_and_restore() {
        let s = Settings {
            workers: 4,
            ..Settings::default()
        };
        assert!(s.layout_check(24).expect("valid").contains("ulysses 4"));
        let mut t = Settings::default();
        let g = GenerationSettings {
            prompt: "p".into(),
            negative_prompt: Some("n".into()),
            true_cfg: 2.0,
            width: 64,
            height: 48,
            steps: 7,
            seed: 9,
            guidance: 2.5,
            cache_threshold: 0.08,
            model: "demo".into(),
            variant: crate::model::layout::Variant::Schnell,
            synthetic: true,
            dtype: "f32".into(),
            sampler: "euler".into(),
            schedule: "x".into(),
            noise: "y".into(),
            parallax_version: "0".into(),
        };
        t.restore(&g);
        assert_eq!(t.request(), g.to_request());
    }

    #[test]
    fn persisted_settings_round_trip_and_old_files_still_load() {
        let s = Settings {
            prompt: "x".into(),
            seed: 5,
            compare_thresholds: vec![0.0, 0.1],
            ..Settings::default()
        };
        let text = serde_json::to_string(&s).expect("serialise");
        assert_eq!(serde_json::from_str::<Settings>(&text).expect("parse"), s);
        // A file from an older version with fewer fields takes defaults for the rest.
        let old: Settings =
            serde_json::from_str(r#"{"prompt": "old", "steps": 9}"#).expect("parse");
        assert_eq!((old.prompt.as_str(), old.steps, old.width), ("old", 9, 256));
    }
}
