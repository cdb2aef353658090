//! Placement: where a generation's ranks run and how they are laid out, in one vocabulary for
//! every front end (the CLI's `--devices`/`--ulysses`/..., the runtime's [`crate::runtime::EngineSpec`],
//! the studio's devices panel).
//!
//! The device-list grammar, parsed by [`Devices::parse`] alone:
//!
//! | text | ranks |
//! | --- | --- |
//! | `cpu` | one worker on the CPU |
//! | `cpu:N` | N CPU worker threads standing in for GPUs (they share one model) |
//! | `cuda` (or `gpu`) | every GPU present, one rank each |
//! | `cuda:N` | GPU N alone |
//! | `cuda:0,1,3` | those GPUs, one rank each, NCCL between them |
//! | `cuda:0,0` | GPU 0 twice: only for data-parallel groups of one GPU each |
//!
//! [`Placement::plan`] checks a placement once against the GPUs present, the model's attention
//! heads and true CFG, and says which layout will run and why; the panel, the CLI and the
//! runtime all show that same text and refuse with the same messages.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::parallel::auto::AutoHints;
pub use crate::parallel::layout::Degrees;
use crate::parallel::layout::Stale;
use crate::parallel::mesh::{Link, Mesh, ParallelLayout};

/// The most CPU worker threads a placement takes.
pub const MAX_CPU_WORKERS: usize = 64;

/// Which devices take part, one rank per entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Devices {
    /// `cpu:N`: N worker threads on the CPU (`cpu` is one).
    Cpu(usize),
    /// `cuda`: every GPU present, one rank each.
    AllGpus,
    /// `cuda:0,1,...`: these GPUs by CUDA index, one rank per entry, in order.
    Gpus(Vec<usize>),
}

impl Default for Devices {
    fn default() -> Self {
        Devices::Cpu(1)
    }
}

impl Devices {
    /// Parse the device-list grammar (see the module doc).
    pub fn parse(text: &str) -> Result<Self> {
        let t = text.trim();
        let usage = "use cpu, cpu:N (N worker threads), cuda (every GPU) or cuda:0,1,...";
        let bad = |reason: String| Error::setting("devices", t, reason);
        match t {
            "cpu" => return Ok(Devices::Cpu(1)),
            "cuda" | "gpu" => return Ok(Devices::AllGpus),
            _ => {}
        }
        if let Some(n) = t.strip_prefix("cpu:") {
            return match n.trim().parse::<usize>() {
                Ok(n) if (1..=MAX_CPU_WORKERS).contains(&n) => Ok(Devices::Cpu(n)),
                _ => Err(bad(format!(
                    "cpu:N takes 1 to {MAX_CPU_WORKERS} worker threads"
                ))),
            };
        }
        let Some(list) = t.strip_prefix("cuda:") else {
            return Err(bad(usage.into()));
        };
        let gpus = list
            .split(',')
            .map(|part| {
                part.trim()
                    .parse::<usize>()
                    .map_err(|_| bad(format!("`{}` is not a GPU number ({usage})", part.trim())))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Devices::Gpus(gpus))
    }

    /// One device named the way `--device` names it (`cpu`, `cuda` = GPU 0, `cuda:N`).
    pub fn single(text: &str) -> Result<Self> {
        let parsed = Self::parse(text).map_err(|_| {
            Error::setting("device", text, "unknown device: use cpu, cuda or cuda:N")
        })?;
        match parsed {
            Devices::AllGpus => Ok(Devices::Gpus(vec![0])),
            d @ (Devices::Cpu(1) | Devices::Gpus(_)) if d.named_count() == Some(1) => Ok(d),
            _ => Err(Error::setting(
                "device",
                text,
                "names one device: cpu, cuda or cuda:N (several go in --devices)",
            )),
        }
    }

    /// How many ranks the list names (`None` for `cuda`: as many as GPUs are present).
    pub fn named_count(&self) -> Option<usize> {
        match self {
            Devices::Cpu(n) => Some(*n),
            Devices::AllGpus => None,
            Devices::Gpus(g) => Some(g.len()),
        }
    }

    pub fn is_gpu(&self) -> bool {
        !matches!(self, Devices::Cpu(_))
    }

    /// The rank devices (`cpu` or `cuda:N` each) as named, `cuda` taken as every GPU present.
    pub fn listed(&self, gpus_present: usize) -> Result<Vec<String>> {
        let gpus: Vec<usize> = match self {
            Devices::Cpu(n) => return Ok(vec!["cpu".to_string(); (*n).max(1)]),
            Devices::AllGpus => (0..gpus_present).collect(),
            Devices::Gpus(g) => g.clone(),
        };
        if gpus.is_empty() {
            return Err(self.no_gpu());
        }
        Ok(gpus.iter().map(|i| format!("cuda:{i}")).collect())
    }

    fn no_gpu(&self) -> Error {
        Error::setting(
            "devices",
            self,
            "no CUDA GPU found (or this build has no `cuda` feature: rebuild with --features cuda)",
        )
    }

    /// The rank devices (`cpu` or `cuda:N` each), every GPU checked to be present.
    pub fn rank_names(&self, gpus_present: usize) -> Result<Vec<String>> {
        let ranks = self.listed(gpus_present)?;
        self.check_present(&ranks, gpus_present)?;
        Ok(ranks)
    }

    /// Check that every GPU named is present.
    fn check_present(&self, ranks: &[String], gpus_present: usize) -> Result<()> {
        if !self.is_gpu() {
            return Ok(());
        }
        if gpus_present == 0 {
            return Err(self.no_gpu());
        }
        let missing = ranks.iter().find(|r| {
            r.strip_prefix("cuda:")
                .and_then(|i| i.parse::<usize>().ok())
                .is_none_or(|i| i >= gpus_present)
        });
        match missing {
            None => Ok(()),
            Some(r) => Err(Error::setting(
                "devices",
                self,
                format!(
                    "{r} is not present: this machine has {gpus_present} GPU{} (cuda:0{})",
                    if gpus_present == 1 { "" } else { "s" },
                    if gpus_present > 1 {
                        format!("..{}", gpus_present - 1)
                    } else {
                        String::new()
                    }
                ),
            )),
        }
    }
}

impl fmt::Display for Devices {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Devices::Cpu(1) => write!(f, "cpu"),
            Devices::Cpu(n) => write!(f, "cpu:{n}"),
            Devices::AllGpus => write!(f, "cuda"),
            Devices::Gpus(g) => {
                let list: Vec<String> = g.iter().map(|i| i.to_string()).collect();
                write!(f, "cuda:{}", list.join(","))
            }
        }
    }
}

impl TryFrom<String> for Devices {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        Devices::parse(&s)
    }
}

impl From<Devices> for String {
    fn from(d: Devices) -> String {
        d.to_string()
    }
}

/// How the layout is chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayoutChoice {
    /// Picked for the workers, the model's heads and true CFG ([`ParallelLayout::auto`]).
    #[default]
    Auto,
    /// Degrees given by hand.
    Degrees(Degrees),
}

impl LayoutChoice {
    /// The layout over `workers` and why, checked against the model's `heads` and true CFG.
    pub fn resolve(
        &self,
        workers: usize,
        heads: usize,
        true_cfg: bool,
    ) -> Result<(ParallelLayout, String)> {
        self.resolve_with(workers, heads, true_cfg, AutoHints::default())
    }

    /// [`LayoutChoice::resolve`] with what else is known of the devices and the model.
    pub fn resolve_with(
        &self,
        workers: usize,
        heads: usize,
        true_cfg: bool,
        hints: AutoHints,
    ) -> Result<(ParallelLayout, String)> {
        let (layout, why) = match self {
            LayoutChoice::Auto if workers <= 1 => {
                (ParallelLayout::default(), "one worker".to_string())
            }
            LayoutChoice::Auto => ParallelLayout::auto_with(workers, heads, true_cfg, hints),
            LayoutChoice::Degrees(d) => (d.layout_for(workers), "degrees set by hand".into()),
        };
        Mesh::new(layout, workers, heads)?;
        if layout.cfg == 2 && !true_cfg {
            return Err(crate::parallel::refusal::Refusal::Cfg2WithoutTrueCfg.into());
        }
        Ok((layout, why))
    }
}

/// Where and how: the devices and the layout choice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub devices: Devices,
    pub layout: LayoutChoice,
}

/// A checked placement: one device per rank and the layout over them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Rank r runs on `ranks[r]` (`cpu` or `cuda:N`).
    pub ranks: Vec<String>,
    pub layout: ParallelLayout,
    /// Why this layout (auto's reasoning, or "degrees set by hand").
    pub why: String,
}

impl Plan {
    pub fn world(&self) -> usize {
        self.ranks.len()
    }

    pub fn is_gpu(&self) -> bool {
        self.ranks.first().is_some_and(|d| d.starts_with("cuda"))
    }

    /// Ranks per data-parallel group.
    pub fn group_size(&self) -> usize {
        (self.world() / self.layout.dp.max(1)).max(1)
    }

    /// The rank devices of data-parallel group `g`.
    pub fn group(&self, g: usize) -> &[String] {
        let per = self.group_size();
        let start = (g * per).min(self.ranks.len());
        &self.ranks[start..(start + per).min(self.ranks.len())]
    }

    /// Whether data-parallel groups run on shared hardware (CPU threads, or a GPU in two
    /// groups): their images are made at the same time, so their wall times are not comparable.
    pub fn groups_share_hardware(&self) -> bool {
        if self.layout.dp <= 1 {
            return false;
        }
        if !self.is_gpu() {
            return true;
        }
        let groups: Vec<&[String]> = (0..self.layout.dp).map(|g| self.group(g)).collect();
        groups.iter().enumerate().any(|(i, a)| {
            groups[i + 1..]
                .iter()
                .any(|b| a.iter().any(|d| b.contains(d)))
        })
    }

    /// One line for the user: the workers, the layout and why (what `info`, the CLI, the
    /// runtime's Started event and the studio's panel show).
    pub fn describe(&self) -> String {
        if self.world() == 1 {
            return format!("one worker ({})", self.ranks[0]);
        }
        let l = self.layout;
        let steps = |w: usize| format!("{w} exact warm-up step{}", if w == 1 { "" } else { "s" });
        let inner = match l.stale {
            Stale::Displaced { warmup, rotate } => format!(
                "displaced patches {}{} ({}, then stale K/V: approximate)",
                l.ring,
                if rotate {
                    ", rotating, no K/V exchanged"
                } else {
                    ""
                },
                steps(warmup)
            ),
            Stale::PipeFusion {
                stages,
                patches,
                warmup,
                balance,
            } => format!(
                "pipefusion {stages} ({patches} patches a step,{} {}, then stale K/V: approximate)",
                if balance == crate::parallel::pipefusion::StageBalance::Memory {
                    " blocks split by weight bytes,"
                } else {
                    ""
                },
                steps(warmup)
            ),
            Stale::Exact => format!("ring {} x ulysses {}", l.ring, l.ulysses),
        };
        let mut text = format!(
            "{} workers ({}): dp {} x cfg {} x {inner} ({})",
            self.world(),
            summarise(&self.ranks),
            l.dp,
            l.cfg,
            self.why
        );
        if l.dp > 1 {
            text.push_str(&format!("; {} images at once", l.dp));
        }
        text
    }
}

/// `cpu x4`, or the GPU list.
fn summarise(ranks: &[String]) -> String {
    if ranks.iter().all(|r| r == "cpu") {
        return format!("cpu x{}", ranks.len());
    }
    ranks.join(",")
}

impl Placement {
    /// Check this placement and say which layout runs: against the GPUs present, the model's
    /// attention `heads` and whether true CFG is on (`true_cfg`: a negative prompt with a scale
    /// above 1). Every front end calls this before loading anything.
    pub fn plan(&self, heads: usize, true_cfg: bool, gpus_present: usize) -> Result<Plan> {
        self.plan_with(heads, true_cfg, gpus_present, AutoHints::default())
    }

    /// [`Placement::plan`] with what is known of the model (`hints`); the GPUs' links are read
    /// here (`nvidia-smi topo -m`) when `hints` does not say.
    pub fn plan_with(
        &self,
        heads: usize,
        true_cfg: bool,
        gpus_present: usize,
        mut hints: AutoHints,
    ) -> Result<Plan> {
        let ranks = self.devices.listed(gpus_present)?;
        if hints.link == Link::Unknown && self.devices.is_gpu() && ranks.len() > 1 {
            let ids: Vec<usize> = ranks
                .iter()
                .filter_map(|r| r.strip_prefix("cuda:")?.parse().ok())
                .collect();
            hints.link = crate::device::gpu_topology()
                .map_or(Link::Unknown, |topo| Link::from_topo(topo, &ids));
        }
        let (layout, why) = self
            .layout
            .resolve_with(ranks.len(), heads, true_cfg, hints)?;
        // NCCL takes one rank per GPU. Data-parallel groups of one GPU each may share a GPU (two
        // images at once on one large GPU); groups of several may not, since two communicators
        // running collectives at once over the same GPUs can deadlock.
        let per = (ranks.len() / layout.dp.max(1)).max(1);
        if self.devices.is_gpu() && per > 1 {
            if let Some(g) = (1..ranks.len()).find(|&i| ranks[..i].contains(&ranks[i])) {
                return Err(Error::setting(
                    "devices",
                    &self.devices,
                    format!(
                        "{} named twice (one rank per GPU; only data-parallel groups of one GPU each may share a GPU)",
                        ranks[g]
                    ),
                ));
            }
        }
        self.devices.check_present(&ranks, gpus_present)?;
        Ok(Plan { ranks, layout, why })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipefusion_degrees_make_a_pipeline_layout() -> Result<()> {
        let d = Degrees {
            pipefusion: Some(2),
            pipefusion_patches: Some(4),
            warmup_steps: Some(2),
            ..Degrees::default()
        };
        let p = plan("cpu:2", d, 0)?;
        assert_eq!(
            p.layout.stale,
            Stale::PipeFusion {
                stages: 2,
                patches: 4,
                warmup: 2,
                balance: crate::parallel::pipefusion::StageBalance::Work
            }
        );
        assert!(
            p.describe().contains("pipefusion 2 (4 patches"),
            "{}",
            p.describe()
        );
        assert_eq!(Degrees::of(p.layout).layout_for(2), p.layout);
        // Ulysses inside a stage runs; ring inside one is refused with the mesh's reason.
        let uly = plan(
            "cpu:4",
            Degrees {
                ulysses: Some(2),
                ..d
            },
            0,
        )?;
        assert_eq!((uly.layout.pipeline(), uly.layout.ulysses), (2, 2));
        let bad = Degrees { ring: Some(2), ..d };
        let e = plan("cpu:4", bad, 0).map(|p| p.layout);
        assert!(
            matches!(&e, Err(err) if err.to_string().contains("inside a PipeFusion stage")),
            "{e:?}"
        );
        Ok(())
    }

    fn plan(devices: &str, degrees: Degrees, gpus: usize) -> Result<Plan> {
        Placement {
            devices: Devices::parse(devices)?,
            layout: LayoutChoice::Degrees(degrees),
        }
        .plan(24, false, gpus)
    }

    #[test]
    fn the_grammar_round_trips_and_bad_lists_are_explained() -> Result<()> {
        for text in ["cpu", "cpu:4", "cuda", "cuda:1", "cuda:0,1,3", "cuda:0,0"] {
            assert_eq!(Devices::parse(text)?.to_string(), text);
        }
        assert_eq!(Devices::parse("gpu")?, Devices::AllGpus);
        assert_eq!(Devices::parse(" cuda:0, 2 ")?, Devices::Gpus(vec![0, 2]));
        for (bad, needle) in [
            ("gpu:2", "cpu:N"),
            ("cuda:x", "not a GPU number"),
            ("cpu:0", "1 to 64"),
            ("cpu:many", "1 to 64"),
            ("tpu", "cpu:N"),
            ("", "cpu:N"),
        ] {
            let e = Devices::parse(bad).expect_err(bad).to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
        assert_eq!(Devices::single("cuda")?, Devices::Gpus(vec![0]));
        assert!(Devices::single("cuda:0,1").is_err());
        assert!(Devices::single("cpu:2").is_err());
        let json = serde_json::to_string(&Devices::Gpus(vec![0, 1]))
            .map_err(|e| Error::serialise("a device list", e))?;
        assert_eq!(json, "\"cuda:0,1\"");
        Ok(())
    }

    #[test]
    fn plans_check_gpus_present_and_sharing() -> Result<()> {
        let dp2 = Degrees {
            dp: Some(2),
            ..Degrees::default()
        };
        let p = plan("cuda:0,0", dp2, 1)?;
        assert_eq!(p.ranks, ["cuda:0", "cuda:0"]);
        assert!(p.groups_share_hardware());
        assert!(!plan("cuda:0,1", dp2, 2)?.groups_share_hardware());
        assert!(plan("cpu:2", dp2, 0)?.groups_share_hardware());
        assert!(!plan("cuda:0,1", Degrees::default(), 2)?.groups_share_hardware());
        assert_eq!(p.group(1), ["cuda:0"]);
        assert_eq!(
            plan("cuda:0,1,0,1", Degrees { dp: Some(4), ..dp2 }, 2)?.world(),
            4
        );
        for (devices, degrees, gpus, needle) in [
            ("cuda:0,0", Degrees::default(), 1, "named twice"),
            ("cuda:1,1,2,3", dp2, 4, "named twice"),
            ("cuda:1,2,1,2", dp2, 4, "named twice"),
            ("cuda:0,1", Degrees::default(), 1, "cuda:1 is not present"),
            ("cuda", Degrees::default(), 0, "no CUDA GPU"),
            (
                "cpu:5",
                Degrees {
                    ulysses: Some(5),
                    ..Degrees::default()
                },
                0,
                "must divide",
            ),
            (
                "cpu:2",
                Degrees {
                    dp: Some(3),
                    ..Degrees::default()
                },
                0,
                "asks for 3 devices",
            ),
            (
                "cpu:2",
                Degrees {
                    cfg: Some(2),
                    ..Degrees::default()
                },
                0,
                "--negative-prompt",
            ),
        ] {
            let e = plan(devices, degrees, gpus).expect_err(devices).to_string();
            assert!(e.contains(needle), "{devices}: {e}");
        }
        let all = plan("cuda", Degrees::default(), 3)?;
        assert_eq!(all.ranks, ["cuda:0", "cuda:1", "cuda:2"]);
        assert_eq!(all.layout.ring, 3);
        Ok(())
    }

    #[test]
    fn auto_describes_what_runs() -> Result<()> {
        let p = Placement {
            devices: Devices::Cpu(4),
            layout: LayoutChoice::Auto,
        };
        let one = p.plan(24, false, 0)?;
        assert_eq!((one.layout.ulysses, one.layout.ring), (4, 1));
        assert!(one
            .describe()
            .starts_with("4 workers (cpu x4): dp 1 x cfg 1 x ring 1 x ulysses 4"));
        let cfg = p.plan(2, true, 0)?;
        assert_eq!(
            (cfg.layout.cfg, cfg.layout.ulysses, cfg.layout.ring),
            (2, 2, 1)
        );
        let single = Placement::default().plan(2, false, 0)?;
        assert_eq!(single.describe(), "one worker (cpu)");
        Ok(())
    }
}
