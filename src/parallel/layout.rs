//! A parallel layout, described once for every front end and the engine.
//!
//! [`ParallelLayout`] is the layout that runs: a degree for each of the mesh's axes and, in
//! [`Stale`], the stale-activation strategy (if any) with its settings. [`Degrees`] is the layout
//! as a person gives it (the CLI's flags are derived from it; the runtime and the studio hand it
//! to the engine): degrees left out are 1, ring takes the workers the others leave.
//! [`Degrees::layout_for`] is the one place a strategy is chosen from what was given.

use serde::{Deserialize, Serialize};

use super::pipefusion::StageBalance;

/// Degrees of each kind of parallelism, and which stale-activation strategy runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParallelLayout {
    pub dp: usize,
    pub cfg: usize,
    pub ring: usize,
    pub ulysses: usize,
    /// Activations from the previous step in place of exact ones, and how (the pipeline axis is
    /// PipeFusion's stages; displaced patches run over the ring axis).
    #[serde(default)]
    pub stale: Stale,
}

/// The stale-activation strategies: after an exact warm-up, a rank reads other ranks' keys and
/// values from the previous step rather than waiting for this step's (approximate).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stale {
    /// Every step exact.
    #[default]
    Exact,
    /// Displaced patch parallelism over the ring axis (DistriFusion; [`super::displaced`]):
    /// `warmup` forwards exactly (every rank's K/V gathered), then each rank attends to the
    /// others' K/V from the previous forward. `rotate`: which patch each rank computes rotates,
    /// and no K/V is exchanged after the warm-up (piflux).
    Displaced { warmup: usize, rotate: bool },
    /// PipeFusion ([`super::pipefusion`]): the blocks split over `stages` ranks (the pipeline
    /// axis) as `balance` says, each step's tokens into `patches` pipelined through them;
    /// `warmup` exact steps before a patch reads the patches not yet computed from the previous
    /// step.
    PipeFusion {
        stages: usize,
        patches: usize,
        warmup: usize,
        balance: StageBalance,
    },
}

impl Stale {
    /// PipeFusion over `stages` with its defaults: one patch per stage, one warm-up step, the
    /// blocks split by work.
    pub fn pipefusion(stages: usize) -> Self {
        Stale::PipeFusion {
            stages,
            patches: stages,
            warmup: 1,
            balance: StageBalance::Work,
        }
    }

    /// Displaced patches with one exact warm-up step, not rotating.
    pub fn displaced() -> Self {
        Stale::Displaced {
            warmup: 1,
            rotate: false,
        }
    }

    /// Exact warm-up steps before stale activations are read (`None`: exact throughout).
    pub fn warmup(&self) -> Option<usize> {
        match *self {
            Stale::Exact => None,
            Stale::Displaced { warmup, .. } | Stale::PipeFusion { warmup, .. } => Some(warmup),
        }
    }
}

impl Default for ParallelLayout {
    fn default() -> Self {
        Self {
            dp: 1,
            cfg: 1,
            ring: 1,
            ulysses: 1,
            stale: Stale::Exact,
        }
    }
}

impl ParallelLayout {
    pub fn world(&self) -> usize {
        self.dp * self.cfg * self.pipeline() * self.ring * self.ulysses
    }

    /// The pipeline degree: PipeFusion's stages, else 1.
    pub fn pipeline(&self) -> usize {
        match self.stale {
            Stale::PipeFusion { stages, .. } => stages,
            _ => 1,
        }
    }

    /// Sequence-parallel degree (ring x Ulysses).
    pub fn sp(&self) -> usize {
        self.ring * self.ulysses
    }

    /// Whether displaced patches run (over the ring axis).
    pub fn is_displaced(&self) -> bool {
        matches!(self.stale, Stale::Displaced { .. })
    }
}

/// Parallel degrees given by hand (the CLI's flags for `generate`, `info`, `worker`, ...); those
/// not given are 1, except ring, which takes the workers the others leave.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[command(group(clap::ArgGroup::new("stale_mode").args(["displaced", "pipefusion"])))]
pub struct Degrees {
    /// Ulysses degree (must divide the attention heads).
    #[arg(long)]
    pub ulysses: Option<usize>,
    /// Ring degree (default: the workers left over by the other degrees).
    #[arg(long)]
    pub ring: Option<usize>,
    /// CFG degree: 2 runs true CFG's negative branch on its own half of the workers (needs
    /// --negative-prompt and --true-cfg).
    #[arg(long)]
    pub cfg: Option<usize>,
    /// Data-parallel groups: that many images at once, each on its own group of workers (with
    /// `generate --images`, consecutive seeds).
    #[arg(long)]
    pub dp: Option<usize>,
    /// Displaced patch parallelism (DistriFusion) over this many workers, instead of Ulysses or
    /// ring: each computes its patch of the tokens and attends to the others' keys and values
    /// from the previous step, gathered in the background. Approximate after the warm-up.
    #[arg(long, conflicts_with_all = ["ulysses", "ring"])]
    #[serde(default)]
    pub displaced: Option<usize>,
    /// Exact steps before --displaced or --pipefusion use stale keys and values (default 1).
    #[arg(long, requires = "stale_mode")]
    #[serde(default)]
    pub warmup_steps: Option<usize>,
    /// With --displaced: rotate which patch each worker computes, and exchange no keys or values
    /// after the warm-up (piflux): each worker refreshes its own copy as it goes round.
    #[arg(long, requires = "displaced")]
    #[serde(default)]
    pub displaced_rotate: bool,
    /// PipeFusion over this many workers: the transformer's blocks split into that many stages,
    /// each step's tokens into patches pipelined through them; a patch attends to the patches
    /// not yet computed this step through their previous step's keys and values. Each worker
    /// holds only its stage's blocks. Approximate after the warm-up.
    #[arg(long, conflicts_with_all = ["ring", "displaced"])]
    #[serde(default)]
    pub pipefusion: Option<usize>,
    /// PipeFusion's patches per step (default: one per stage; more shrinks the pipeline's bubble).
    #[arg(long, requires = "pipefusion")]
    #[serde(default)]
    pub pipefusion_patches: Option<usize>,
    /// How --pipefusion splits the blocks: `work` (even block counts: even work per token, the
    /// default) or `memory` (even weight bytes, for a model no single GPU holds).
    #[arg(long, requires = "pipefusion", value_parser = parse_balance)]
    #[serde(default)]
    pub pipefusion_balance: Option<StageBalance>,
}

fn parse_balance(s: &str) -> Result<StageBalance, String> {
    match s.trim() {
        "work" => Ok(StageBalance::Work),
        "memory" => Ok(StageBalance::Memory),
        other => Err(format!("`{other}`: give work or memory")),
    }
}

impl Degrees {
    /// Whether any degree was given.
    pub fn any(&self) -> bool {
        self.ulysses.is_some()
            || self.ring.is_some()
            || self.cfg.is_some()
            || self.dp.is_some()
            || self.displaced.is_some()
            || self.pipefusion.is_some()
    }

    /// The layout over `workers`: PipeFusion when its stages are given, else displaced patches
    /// when given, else ring attention (exact).
    pub fn layout_for(&self, workers: usize) -> ParallelLayout {
        let dp = self.dp.unwrap_or(1);
        let cfg = self.cfg.unwrap_or(1);
        let warmup = self.warmup_steps.unwrap_or(1);
        let (stale, ring) = match (self.pipefusion, self.displaced) {
            // Ulysses or ring given beside them are kept, for the mesh to refuse with its reason.
            (Some(stages), _) if stages > 1 => (
                Stale::PipeFusion {
                    stages,
                    patches: self.pipefusion_patches.unwrap_or(stages),
                    warmup,
                    balance: self.pipefusion_balance.unwrap_or_default(),
                },
                self.ring.unwrap_or(1),
            ),
            // The patch group is the ring axis.
            (_, Some(n)) => (
                Stale::Displaced {
                    warmup,
                    rotate: self.displaced_rotate,
                },
                self.ring.unwrap_or(n),
            ),
            _ => {
                let ulysses = self.ulysses.unwrap_or(1);
                let ring = self.ring.unwrap_or_else(|| {
                    (workers / dp.saturating_mul(cfg).saturating_mul(ulysses).max(1)).max(1)
                });
                (Stale::Exact, ring)
            }
        };
        ParallelLayout {
            dp,
            cfg,
            ring,
            ulysses: self.ulysses.unwrap_or(1),
            stale,
        }
    }

    /// Exactly `layout`'s degrees.
    pub fn of(layout: ParallelLayout) -> Self {
        let mut d = Self {
            ulysses: Some(layout.ulysses),
            ring: Some(layout.ring),
            cfg: Some(layout.cfg),
            dp: Some(layout.dp),
            warmup_steps: layout.stale.warmup(),
            ..Self::default()
        };
        match layout.stale {
            Stale::Exact => {}
            Stale::Displaced { rotate, .. } => {
                d.displaced = Some(layout.ring);
                d.displaced_rotate = rotate;
            }
            Stale::PipeFusion {
                stages,
                patches,
                balance,
                ..
            } => {
                d.pipefusion = Some(stages);
                d.pipefusion_patches = Some(patches);
                d.pipefusion_balance = Some(balance);
            }
        }
        d
    }
}
