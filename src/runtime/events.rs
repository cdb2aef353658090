//! What the runtime is asked to do (jobs) and what it reports back (events).

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::engine::{ModelChoice, Placement};
use crate::pipeline::metrics::Quality;
use crate::pipeline::preview::{Latent, PreviewFactors};
use crate::pipeline::{GenerateRequest, Generated};

/// A job's number, unique within one runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobId(pub u64);

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "job {}", self.0)
    }
}

/// Work for the engine.
#[derive(Debug, Clone, PartialEq)]
pub enum JobSpec {
    /// One image.
    Generate(GenerateRequest),
    /// Several images (seeds s, s + 1, ...), made at once on the plan's data-parallel groups
    /// when it has several (no per-step previews then), else one after the other.
    Images(Vec<GenerateRequest>),
    /// The same prompt and seed at several First Block Cache thresholds, then under other cache
    /// policies (`caches`). The first image is the reference the others are measured against; a
    /// threshold of 0 (no cache) is put first if the list lacks it. Every cell is timed in
    /// `repeats` rounds (see [`super::repeats`]; 0 counts as 1).
    ///
    /// With `lora_strengths`, every cell runs at each strength in turn (every LoRA of `base` set
    /// to it), strength by strength; each cell is then measured against the uncached cell of its
    /// own strength ([`compare_references`]), so a row says what the cache costs with the LoRA
    /// at that strength. Empty: `base`'s LoRAs as they are.
    Compare {
        base: GenerateRequest,
        thresholds: Vec<f64>,
        caches: Vec<crate::pipeline::cache::CacheSpec>,
        repeats: usize,
        lora_strengths: Vec<f64>,
    },
}

impl JobSpec {
    /// The requests this job runs, in order.
    pub fn requests(&self) -> Vec<GenerateRequest> {
        match self {
            JobSpec::Generate(r) => vec![r.clone()],
            JobSpec::Images(reqs) => reqs.clone(),
            JobSpec::Compare {
                base,
                thresholds,
                caches,
                lora_strengths,
                ..
            } => {
                // First Block Cache entries in the policy list are thresholds: they join the
                // thresholds (once each) rather than being dropped.
                let all: Vec<f64> = thresholds
                    .iter()
                    .copied()
                    .chain(caches.iter().filter_map(|c| c.fb_threshold()))
                    .collect();
                let mut reqs: Vec<GenerateRequest> = compare_thresholds(&all)
                    .into_iter()
                    .map(|t| GenerateRequest {
                        cache_threshold: t,
                        cache: None,
                        ..base.clone()
                    })
                    .collect();
                let mut seen: Vec<&crate::pipeline::cache::CacheSpec> = Vec::new();
                for c in caches.iter().filter(|c| c.fb_threshold().is_none()) {
                    if !seen.contains(&c) {
                        seen.push(c);
                        reqs.push(GenerateRequest {
                            cache_threshold: 0.0,
                            cache: Some(c.clone()),
                            ..base.clone()
                        });
                    }
                }
                if lora_strengths.is_empty() {
                    return reqs;
                }
                let mut strengths: Vec<f64> = Vec::new();
                for &s in lora_strengths.iter().filter(|s| s.is_finite()) {
                    if !strengths.contains(&s) {
                        strengths.push(s);
                    }
                }
                strengths
                    .iter()
                    .flat_map(|&s| {
                        reqs.iter().map(move |r| {
                            let mut r = r.clone();
                            for l in &mut r.loras {
                                l.strength = s;
                            }
                            r
                        })
                    })
                    .collect()
            }
        }
    }
}

/// For each cell of a compare sweep, the cell it is measured against: the first cell with the
/// same LoRAs at the same strengths (the sweep's uncached cell of that strength; cell 0 for a
/// sweep without a strength list).
pub fn compare_references(reqs: &[GenerateRequest]) -> Vec<usize> {
    let loras: Vec<&[crate::model::lora::LoraChoice]> =
        reqs.iter().map(|r| r.loras.as_slice()).collect();
    first_alike(&loras)
}

/// For each item, the index of the first item equal to it.
pub fn first_alike<T: PartialEq>(items: &[T]) -> Vec<usize> {
    items
        .iter()
        .map(|r| items.iter().position(|o| o == r).unwrap_or(0))
        .collect()
}

/// The thresholds a compare sweep runs: the uncached reference first, then the others in the
/// order given, without repeats (negative or non-finite thresholds are dropped).
pub fn compare_thresholds(thresholds: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0];
    for &t in thresholds {
        if t.is_finite() && t > 0.0 && !out.iter().any(|&o| (o - t).abs() < 1e-12) {
            out.push(t);
        }
    }
    out
}

/// Which model on which workers. Changing `model` reloads the weights; changing the placement
/// does not (rank 0's device aside, the engine loads what a plan needs at the job and keeps it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EngineSpec {
    /// `demo`, `random:dev`, a repo id, a file or a folder (as `parallax generate --model`),
    /// with the text encoders' folder and the dtype.
    #[serde(default)]
    pub model: ModelChoice,
    /// The devices and the layout (`--devices`, `--ulysses`, ..., `--parallel auto`).
    #[serde(default)]
    pub placement: Placement,
}

impl Default for EngineSpec {
    fn default() -> Self {
        Self::new("demo", Placement::default())
    }
}

impl EngineSpec {
    pub fn new(model: impl Into<ModelChoice>, placement: Placement) -> Self {
        Self {
            model: model.into(),
            placement,
        }
    }
}

/// One finished image of a job.
#[derive(Debug, Clone)]
pub struct ImageResult {
    pub generated: Generated,
    /// Where the gallery keeps it (`None` if saving failed; the reason is in `notes`).
    pub saved: Option<PathBuf>,
    /// Against the job's first image (compare sweeps).
    pub quality: Option<Quality>,
    /// The first image's wall time over this one's.
    pub speedup: Option<f64>,
    pub notes: Vec<String>,
}

/// Everything the runtime reports. Events of one job arrive in order.
#[derive(Debug, Clone)]
pub enum Event {
    ModelLoading {
        spec: EngineSpec,
    },
    ModelLoaded {
        spec: EngineSpec,
        summary: String,
        load_ms: f64,
        /// Attention heads of the transformer (what a layout must divide).
        heads: usize,
        /// Its double and single blocks (PipeFusion's most stages).
        blocks: usize,
        /// Whether it has a MagCache calibration (without one, MagCache cannot run on it).
        magcache: bool,
        /// The FLUX.1 transformer's shape, what a LoRA file must fit (`None`: a model of another
        /// family, which takes no LoRAs).
        lora_config: Option<crate::model::flux::FluxConfig>,
    },
    /// The latent preview map for the loaded model (fitted to its autoencoder).
    PreviewFactors(Arc<PreviewFactors>),
    ModelFailed {
        spec: EngineSpec,
        error: String,
    },
    Queued {
        job: JobId,
        position: usize,
    },
    /// Work a job does before it starts (loading the model on the devices its plan adds).
    Preparing {
        job: JobId,
        what: String,
    },
    Started {
        job: JobId,
        images: usize,
        /// The plan, as [`crate::engine::Plan::describe`] says it.
        layout: String,
    },
    /// Text encoded for image `image` of the job.
    TextEncoded {
        job: JobId,
        image: usize,
        ms: f64,
    },
    Step {
        job: JobId,
        image: usize,
        /// 1-based.
        step: usize,
        total: usize,
        ms: f64,
        /// The step reused the cache instead of running the remaining blocks.
        reused: bool,
        preview: Arc<Latent>,
        /// When the engine finished the step (for the step-to-screen latency).
        at: std::time::Instant,
    },
    ImageDone {
        job: JobId,
        image: usize,
        result: Arc<ImageResult>,
    },
    /// A compare sweep times its cells again: round `round` (1-based, from 2) of `rounds`, cell
    /// `image`, the `position`-th (0-based) of the round.
    Timing {
        job: JobId,
        round: usize,
        rounds: usize,
        image: usize,
        position: usize,
    },
    /// A compare sweep's cell, timed in every round (after the last round).
    Timed {
        job: JobId,
        image: usize,
        timing: super::repeats::CellTiming,
    },
    Finished {
        job: JobId,
        wall_ms: f64,
    },
    Failed {
        job: JobId,
        error: String,
    },
    Cancelled {
        job: JobId,
    },
}

impl Event {
    /// The job an event belongs to, if any.
    pub fn job(&self) -> Option<JobId> {
        match self {
            Event::Queued { job, .. }
            | Event::Preparing { job, .. }
            | Event::Started { job, .. }
            | Event::TextEncoded { job, .. }
            | Event::Step { job, .. }
            | Event::ImageDone { job, .. }
            | Event::Timing { job, .. }
            | Event::Timed { job, .. }
            | Event::Finished { job, .. }
            | Event::Failed { job, .. }
            | Event::Cancelled { job } => Some(*job),
            _ => None,
        }
    }

    /// The job is over (finished, failed or cancelled).
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Event::Finished { .. } | Event::Failed { .. } | Event::Cancelled { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::cache::CacheSpec;

    #[test]
    fn first_block_cache_entries_among_the_policies_join_the_thresholds() {
        let job = JobSpec::Compare {
            base: GenerateRequest::default(),
            thresholds: vec![0.12],
            caches: vec![
                CacheSpec::from_threshold(0.2),
                CacheSpec::preset("magcache", "balanced").expect("preset"),
                CacheSpec::from_threshold(0.12),
            ],
            repeats: 1,
            lora_strengths: Vec::new(),
        };
        let cells: Vec<(f64, Option<String>)> = job
            .requests()
            .iter()
            .map(|r| (r.cache_threshold, r.cache.as_ref().map(|c| c.to_string())))
            .collect();
        assert_eq!(cells.len(), 4, "{cells:?}");
        assert_eq!(
            cells.iter().map(|c| c.0).take(3).collect::<Vec<_>>(),
            [0.0, 0.12, 0.2]
        );
        assert!(cells[3]
            .1
            .as_deref()
            .is_some_and(|c| c.starts_with("magcache")));
        assert_eq!(compare_references(&job.requests()), vec![0; 4]);
    }

    #[test]
    fn a_strength_sweep_crosses_the_cells_and_measures_each_strength_on_its_own() {
        let lora = |strength| crate::model::lora::LoraChoice {
            path: "polka.safetensors".into(),
            strength,
        };
        let job = JobSpec::Compare {
            base: GenerateRequest {
                loras: vec![lora(1.0)],
                ..GenerateRequest::default()
            },
            thresholds: vec![0.0, 0.2],
            caches: vec![CacheSpec::preset("magcache", "balanced").expect("preset")],
            repeats: 1,
            lora_strengths: vec![0.0, 0.5, 0.5, -1.0],
        };
        let reqs = job.requests();
        let cells: Vec<(f64, f64, bool)> = reqs
            .iter()
            .map(|r| (r.loras[0].strength, r.cache_threshold, r.cache.is_some()))
            .collect();
        assert_eq!(
            cells,
            vec![
                (0.0, 0.0, false),
                (0.0, 0.2, false),
                (0.0, 0.0, true),
                (0.5, 0.0, false),
                (0.5, 0.2, false),
                (0.5, 0.0, true),
                (-1.0, 0.0, false),
                (-1.0, 0.2, false),
                (-1.0, 0.0, true),
            ]
        );
        assert_eq!(compare_references(&reqs), vec![0, 0, 0, 3, 3, 3, 6, 6, 6]);
    }
}
