//! The device mesh: one object naming every process group.
//!
//! The workers (GPUs, or CPU threads standing in for them) are factored into data-parallel x
//! CFG x pipeline x ring x Ulysses degrees. Ranks are numbered with Ulysses innermost (its
//! all-to-alls are the most frequent, so its members should be the closest devices), then ring,
//! pipeline, CFG and data-parallel outermost. Each strategy asks the mesh for its group: the
//! ranks that share every coordinate but its own.

use crate::error::{Error, Result};

pub use super::layout::{ParallelLayout, Stale};

/// How the devices of a placement are linked, as `nvidia-smi topo -m` tells.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Link {
    /// Every pair through NVLink (or one device, or CPU threads).
    NvLink,
    /// Some pair only through PCIe (and the host bridge).
    Pcie,
    /// Not known (no `nvidia-smi`, or it said nothing readable).
    #[default]
    Unknown,
}

impl Link {
    /// The link between `gpus` from `nvidia-smi topo -m`'s matrix: NVLink when every pair's
    /// entry is `NV<n>`, PCIe when some pair's is `PIX`, `PXB`, `PHB`, `NODE` or `SYS`.
    pub fn from_topo(topo: &str, gpus: &[usize]) -> Self {
        // Rows start `GPU<i>`; the entries follow in column order of the header's GPUs.
        let mut rows: std::collections::HashMap<usize, Vec<&str>> = Default::default();
        for line in topo.lines() {
            let mut cells = line.split_whitespace();
            let Some(head) = cells.next() else { continue };
            let Some(i) = head
                .strip_prefix("GPU")
                .and_then(|n| n.parse::<usize>().ok())
            else {
                continue;
            };
            rows.insert(i, cells.collect());
        }
        let mut all_nv = true;
        for (a, &i) in gpus.iter().enumerate() {
            for &j in &gpus[a + 1..] {
                let Some(cell) = rows.get(&i).and_then(|r| r.get(j)) else {
                    return Link::Unknown;
                };
                if cell.starts_with("NV") {
                    continue;
                }
                if ["PIX", "PXB", "PHB", "NODE", "SYS"].contains(cell) {
                    all_nv = false;
                } else {
                    return Link::Unknown;
                }
            }
        }
        if all_nv {
            Link::NvLink
        } else {
            Link::Pcie
        }
    }
}

/// A mesh axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    Dp,
    Cfg,
    Pipeline,
    Ring,
    Ulysses,
}

/// A rank's position on every axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coords {
    pub dp: usize,
    pub cfg: usize,
    pub pipeline: usize,
    pub ring: usize,
    pub ulysses: usize,
}

/// The most PipeFusion patches a step may be split into.
pub const MAX_PATCHES: usize = 256;

/// The mesh: a validated layout over a number of workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mesh {
    layout: ParallelLayout,
}

impl Mesh {
    /// Check `layout` against the workers present and the model before anything is loaded.
    pub fn new(layout: ParallelLayout, devices: usize, heads: usize) -> Result<Self> {
        let desc = match layout.stale {
            Stale::PipeFusion {
                stages,
                patches,
                warmup,
                ..
            } => format!(
                "dp {} x cfg {} x pipefusion {stages} ({patches} patches, warm-up {warmup})",
                layout.dp, layout.cfg,
            ),
            Stale::Exact => format!(
                "dp {} x cfg {} x pipeline 1 x ring {} x ulysses {}",
                layout.dp, layout.cfg, layout.ring, layout.ulysses
            ),
            Stale::Displaced { warmup, rotate } => format!(
                "dp {} x cfg {} x displaced {}{} (warm-up {warmup})",
                layout.dp,
                layout.cfg,
                layout.ring,
                if rotate { ", rotating" } else { "" }
            ),
        };
        let bad = |reason: String| Error::setting("parallel layout", &desc, reason);
        if [
            layout.dp,
            layout.cfg,
            layout.pipeline(),
            layout.ring,
            layout.ulysses,
        ]
        .contains(&0)
        {
            return Err(bad("every degree must be at least 1".into()));
        }
        if layout.cfg > 2 {
            return Err(bad(
                "CFG parallelism has two branches: its degree is 1 or 2".into(),
            ));
        }
        if let Stale::PipeFusion {
            stages,
            patches,
            warmup,
            ..
        } = layout.stale
        {
            if stages < 2 {
                return Err(bad(
                    "PipeFusion splits the blocks over at least 2 stages".into()
                ));
            }
            if layout.ring > 1 {
                return Err(bad(
                    "ring attention or displaced patches inside a PipeFusion stage are not built: give --pipefusion with --ulysses, --cfg and --dp".into(),
                ));
            }
            if patches == 0 {
                return Err(bad("PipeFusion needs at least one patch".into()));
            }
            if patches > MAX_PATCHES {
                return Err(bad(format!(
                    "PipeFusion takes at most {MAX_PATCHES} patches a step (each patch is a pass \
                     through every stage; more only adds overhead)"
                )));
            }
            if warmup == 0 {
                return Err(bad(
                    "PipeFusion needs at least one warm-up step (it fills the keys and values the patches read)".into(),
                ));
            }
        }
        if layout.world() > devices {
            return Err(bad(format!(
                "asks for {} devices, but only {devices} are present",
                layout.world()
            )));
        }
        if layout.world() != devices {
            return Err(bad(format!(
                "multiplies to {} devices, but {devices} were given: the degrees must multiply to the device count",
                layout.world()
            )));
        }
        if layout.is_displaced() && layout.ulysses != 1 {
            return Err(bad(
                "displaced patches run over the ring axis alone: Ulysses must be 1".into(),
            ));
        }
        if heads % layout.ulysses != 0 {
            return Err(bad(format!(
                "the Ulysses degree {} must divide the model's {heads} attention heads",
                layout.ulysses
            )));
        }
        Ok(Self { layout })
    }

    pub fn layout(&self) -> ParallelLayout {
        self.layout
    }

    pub fn world(&self) -> usize {
        self.layout.world()
    }

    fn dims(&self) -> [usize; 5] {
        let l = self.layout;
        [l.dp, l.cfg, l.pipeline(), l.ring, l.ulysses]
    }

    /// Where `rank` sits on each axis.
    pub fn coords(&self, rank: usize) -> Coords {
        let d = self.dims();
        let mut r = rank;
        let mut c = [0usize; 5];
        for i in (0..5).rev() {
            c[i] = r % d[i];
            r /= d[i];
        }
        Coords {
            dp: c[0],
            cfg: c[1],
            pipeline: c[2],
            ring: c[3],
            ulysses: c[4],
        }
    }

    /// The rank at `coords`.
    pub fn rank(&self, c: Coords) -> usize {
        let d = self.dims();
        let cs = [c.dp, c.cfg, c.pipeline, c.ring, c.ulysses];
        cs.iter().zip(d).fold(0, |acc, (&ci, di)| acc * di + ci)
    }

    /// The ranks that share every coordinate with `rank` except `axis`, in axis order.
    pub fn group(&self, rank: usize, axis: Axis) -> Vec<usize> {
        let c = self.coords(rank);
        let n = match axis {
            Axis::Dp => self.layout.dp,
            Axis::Cfg => self.layout.cfg,
            Axis::Pipeline => self.layout.pipeline(),
            Axis::Ring => self.layout.ring,
            Axis::Ulysses => self.layout.ulysses,
        };
        (0..n)
            .map(|i| {
                let mut k = c;
                match axis {
                    Axis::Dp => k.dp = i,
                    Axis::Cfg => k.cfg = i,
                    Axis::Pipeline => k.pipeline = i,
                    Axis::Ring => k.ring = i,
                    Axis::Ulysses => k.ulysses = i,
                }
                self.rank(k)
            })
            .collect()
    }

    /// The sequence-parallel group of `rank`: the ranks that share its data-parallel, CFG and
    /// pipeline coordinates (ring x Ulysses of them), in rank order.
    pub fn sp_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.world())
            .filter(|&r| {
                let o = self.coords(r);
                (o.dp, o.cfg, o.pipeline) == (c.dp, c.cfg, c.pipeline)
            })
            .collect()
    }

    /// Every distinct group along `axis` (for creating communicators once per group).
    pub fn groups(&self, axis: Axis) -> Vec<Vec<usize>> {
        let mut out: Vec<Vec<usize>> = Vec::new();
        for r in 0..self.world() {
            let g = self.group(r, axis);
            if !out.contains(&g) {
                out.push(g);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(dp: usize, cfg: usize, ring: usize, ulysses: usize) -> ParallelLayout {
        ParallelLayout {
            dp,
            cfg,
            ring,
            ulysses,
            ..ParallelLayout::default()
        }
    }

    #[test]
    fn coordinates_round_trip_and_groups_partition_the_world() {
        let m = Mesh::new(l(2, 2, 2, 2), 16, 24).expect("valid");
        for r in 0..16 {
            assert_eq!(m.rank(m.coords(r)), r);
        }
        // Ulysses innermost: ranks 0,1 share everything but the Ulysses coordinate.
        assert_eq!(m.group(0, Axis::Ulysses), vec![0, 1]);
        assert_eq!(m.group(0, Axis::Ring), vec![0, 2]);
        assert_eq!(m.group(5, Axis::Cfg), vec![1, 5]);
        assert_eq!(m.group(3, Axis::Dp), vec![3, 11]);
        for axis in [Axis::Dp, Axis::Cfg, Axis::Ring, Axis::Ulysses] {
            let groups = m.groups(axis);
            let mut all: Vec<usize> = groups.concat();
            all.sort();
            assert_eq!(all, (0..16).collect::<Vec<_>>(), "{axis:?}");
        }
    }

    #[test]
    fn bad_layouts_are_rejected_before_loading() {
        let cases = [
            (l(1, 1, 1, 5), 5, "divide"),
            (l(1, 1, 2, 2), 2, "only 2 are present"),
            (l(1, 1, 1, 2), 4, "multiply to the device count"),
            (l(1, 3, 1, 1), 3, "1 or 2"),
            (l(0, 1, 1, 1), 1, "at least 1"),
        ];
        for (layout, devices, needle) in cases {
            match Mesh::new(layout, devices, 24) {
                Err(e) => assert!(e.to_string().contains(needle), "{layout:?}: {e}"),
                Ok(_) => panic!("{layout:?} on {devices} devices should be rejected"),
            }
        }
    }

    #[test]
    fn topology_tells_nvlink_from_pcie() {
        // As `nvidia-smi topo -m` prints it (the legend and affinity columns trimmed).
        let nv = "\tGPU0\tGPU1\tGPU2\tCPU Affinity\nGPU0\t X \tNV18\tNV18\t0-63\nGPU1\tNV18\t X \tNV18\t0-63\nGPU2\tNV18\tNV18\t X \t0-63\n";
        assert_eq!(Link::from_topo(nv, &[0, 1, 2]), Link::NvLink);
        let pcie =
            "\tGPU0\tGPU1\tGPU2\nGPU0\t X \tPHB\tNV4\nGPU1\tPHB\t X \tSYS\nGPU2\tNV4\tSYS\t X \n";
        assert_eq!(Link::from_topo(pcie, &[0, 2]), Link::NvLink);
        assert_eq!(Link::from_topo(pcie, &[0, 1]), Link::Pcie);
        assert_eq!(Link::from_topo(pcie, &[0, 1, 2]), Link::Pcie);
        assert_eq!(Link::from_topo(pcie, &[0, 5]), Link::Unknown);
        assert_eq!(Link::from_topo("no GPUs here", &[0, 1]), Link::Unknown);
    }
}
