//! The automatic layout (`--parallel auto`): the cost model's fastest layout where it has a
//! calibration for the workers and their link ([`super::cost`]), else a rule of thumb from the
//! device count, the heads, true CFG, the link and whether one device holds the model.

use super::cost::{describe, rank_layouts, Hardware, Shape};
use super::layout::{ParallelLayout, Stale};
use super::mesh::Link;
use super::pipefusion::StageBalance;

/// What the automatic layout knows besides the device count: how the devices are linked and
/// whether one of them holds the whole model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoHints {
    pub link: Link,
    pub model_fits_one: bool,
    /// The model's blocks (PipeFusion's stages cannot outnumber them).
    pub blocks: usize,
    /// The model and image, for the cost model ([`super::cost`]); `None`: the rule of thumb.
    pub shape: Option<Shape>,
    /// What the workers are (the cost model needs a calibration for them).
    pub hardware: Hardware,
}

impl Default for AutoHints {
    fn default() -> Self {
        Self {
            link: Link::Unknown,
            model_fits_one: true,
            blocks: usize::MAX,
            shape: None,
            hardware: Hardware::Unknown,
        }
    }
}

impl AutoHints {
    /// The same hints for a `width` x `height` image (the cost model's token counts).
    pub fn for_size(self, width: usize, height: usize) -> Self {
        Self {
            shape: self.shape.map(|s| s.with_size((width, height))),
            ..self
        }
    }
}

impl ParallelLayout {
    /// A layout for `devices` workers and a model with `heads` attention heads: CFG over two
    /// groups when true CFG is on and the count is even, then Ulysses as wide as divides the heads
    /// (the best single-node choice on NVLink per the published FLUX scaling), ring for the rest.
    /// Returns the layout and why.
    pub fn auto(devices: usize, heads: usize, true_cfg: bool) -> (Self, String) {
        Self::auto_with(devices, heads, true_cfg, AutoHints::default())
    }

    /// [`ParallelLayout::auto`] knowing more. With the model's shape and a calibration for the
    /// workers and their link, the cost model's fastest layout ([`auto_layout`]).
    /// Otherwise the rule of thumb: PipeFusion over the devices CFG leaves when one
    /// device cannot hold the model (each stage holds a share of the blocks), or when the devices
    /// are linked by PCIe only (it sends one copy of the activations a step, against Ulysses'
    /// four all-to-alls a layer; approximate after its warm-up step).
    pub fn auto_with(
        devices: usize,
        heads: usize,
        true_cfg: bool,
        hints: AutoHints,
    ) -> (Self, String) {
        if hints.model_fits_one {
            if let Some(chosen) = auto_layout(devices, heads, true_cfg, &hints) {
                return chosen;
            }
        }
        let mut rest = devices.max(1);
        let cfg = if true_cfg && rest % 2 == 0 { 2 } else { 1 };
        rest /= cfg;
        let cfg_why = if cfg == 2 {
            "CFG 2 (true CFG runs two branches), "
        } else {
            ""
        };
        let pipe_why = if rest < 2 || rest > hints.blocks {
            None
        } else if !hints.model_fits_one {
            Some("the model does not fit one device: each stage holds 1/{n} of the blocks")
        } else if hints.link == Link::Pcie {
            Some("the devices are linked by PCIe only: PipeFusion sends one copy of the activations a step, where Ulysses sends four all-to-alls a layer (approximate after 1 exact warm-up step)")
        } else {
            None
        };
        if let Some(why) = pipe_why {
            let layout = Self {
                cfg,
                stale: Stale::PipeFusion {
                    stages: rest,
                    patches: rest,
                    warmup: 1,
                    // A model no single device holds: even out the stages' weights.
                    balance: if hints.model_fits_one {
                        StageBalance::Work
                    } else {
                        StageBalance::Memory
                    },
                },
                ..Self::default()
            };
            let why = format!(
                "{devices} device(s): {cfg_why}PipeFusion {rest} ({})",
                why.replace("{n}", &rest.to_string())
            );
            return (layout, why);
        }
        let ulysses = (1..=rest)
            .rev()
            .find(|u| rest % u == 0 && heads % u == 0)
            .unwrap_or(1);
        let ring = rest / ulysses;
        let layout = Self {
            cfg,
            ring,
            ulysses,
            ..Self::default()
        };
        let why = format!(
            "{devices} device(s): {cfg_why}Ulysses {ulysses} (largest degree dividing both {rest} and the {heads} heads){}",
            if ring > 1 { format!(", ring {ring} for the rest") } else { String::new() },
        );
        (layout, why)
    }
}

/// Steps the automatic layout plans for (FLUX.1-dev's default; the warm-up share of the
/// approximate layouts depends on it a little).
pub const AUTO_STEPS: usize = 28;

/// How much faster than the best exact layout PipeFusion must be predicted before the automatic
/// layout takes it (it changes the image after its warm-up step).
pub const APPROXIMATE_MARGIN: f64 = 1.25;

/// The automatic layout by the cost model: the fastest exact layout, or PipeFusion where it is
/// predicted [`APPROXIMATE_MARGIN`] times faster still (displaced patches are never picked for
/// the user: ask for them). `None` when `hints` lack the shape or the hardware has no
/// calibration (the caller keeps its rule of thumb).
pub fn auto_layout(
    devices: usize,
    heads: usize,
    true_cfg: bool,
    hints: &AutoHints,
) -> Option<(ParallelLayout, String)> {
    let shape = Shape {
        heads,
        ..hints.shape?
    };
    let (cal, link) = hints.hardware.model(hints.link)?;
    let ranked = rank_layouts(devices, &shape, &cal, &link, AUTO_STEPS, true_cfg);
    let exact = ranked.iter().find(|p| p.exact)?;
    let pipe = ranked
        .iter()
        .find(|p| matches!(p.layout.stale, Stale::PipeFusion { .. }));
    let chosen = match pipe {
        Some(p) if p.step_s * APPROXIMATE_MARGIN < exact.step_s => p,
        _ => exact,
    };
    let why = format!(
        "{devices} device(s): {} (cost model, {} link: {:.1} ms a step predicted, {:.0}% communication{}; `parallax plan` shows every layout)",
        describe(&chosen.layout),
        link.name,
        chosen.step_s * 1e3,
        chosen.comm_share() * 100.0,
        if chosen.exact {
            String::new()
        } else {
            format!(
                "; approximate after 1 exact warm-up step, {:.1}x the best exact layout's speed",
                exact.step_s / chosen.step_s
            )
        }
    );
    Some((chosen.layout, why))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::flux::FluxConfig;
    use crate::parallel::cost;
    use crate::parallel::mesh::Mesh;

    fn dev(size: usize) -> Shape {
        Shape::of(&FluxConfig::dev(), 512, (size, size), 2)
    }

    #[test]
    fn auto_layout_prefers_pipefusion_on_pcie_or_when_the_model_does_not_fit() {
        let pcie = AutoHints {
            link: Link::Pcie,
            ..AutoHints::default()
        };
        let (a, why) = ParallelLayout::auto_with(4, 24, false, pcie);
        assert_eq!((a.pipeline(), a.ulysses, a.ring), (4, 1, 1));
        assert!(why.contains("PCIe"), "{why}");
        let (a, _) = ParallelLayout::auto_with(4, 24, true, pcie);
        assert_eq!((a.cfg, a.pipeline()), (2, 2));
        let big = AutoHints {
            model_fits_one: false,
            ..AutoHints::default()
        };
        let (a, why) = ParallelLayout::auto_with(2, 24, false, big);
        assert_eq!(a.pipeline(), 2);
        assert!(matches!(
            a.stale,
            Stale::PipeFusion {
                balance: StageBalance::Memory,
                ..
            }
        ));
        assert!(why.contains("1/2 of the blocks"), "{why}");
        // NVLink (or not known): Ulysses as before; never more stages than blocks.
        let nv = AutoHints {
            link: Link::NvLink,
            ..AutoHints::default()
        };
        assert_eq!(ParallelLayout::auto_with(4, 24, false, nv).0.ulysses, 4);
        let few = AutoHints { blocks: 3, ..pcie };
        assert_eq!(ParallelLayout::auto_with(4, 24, false, few).0.pipeline(), 1);
        for n in 1..=8 {
            for hints in [pcie, big, nv] {
                let (a, _) = ParallelLayout::auto_with(n, 24, n % 2 == 0, hints);
                assert!(Mesh::new(a, n, 24).is_ok(), "auto layout for {n} is valid");
            }
        }
    }

    #[test]
    fn auto_layout_prefers_ulysses_and_uses_cfg_for_true_cfg() {
        let (a, why) = ParallelLayout::auto(4, 24, false);
        assert_eq!((a.ulysses, a.ring, a.cfg), (4, 1, 1));
        assert!(why.contains("Ulysses 4"));
        let (a, _) = ParallelLayout::auto(8, 24, true);
        assert_eq!((a.cfg, a.ulysses, a.ring), (2, 4, 1));
        // 5 GPUs: 5 does not divide 24 heads -> ring 5.
        let (a, why) = ParallelLayout::auto(5, 24, false);
        assert_eq!((a.ulysses, a.ring), (1, 5));
        assert!(why.contains("ring 5"));
        for n in 1..=8 {
            let (a, _) = ParallelLayout::auto(n, 24, n % 2 == 0);
            assert!(Mesh::new(a, n, 24).is_ok(), "auto layout for {n} is valid");
        }
    }

    #[test]
    fn auto_uses_the_model_where_it_has_a_calibration_and_the_rule_elsewhere() {
        let hints = AutoHints {
            link: Link::NvLink,
            blocks: 57,
            shape: Some(dev(1024)),
            hardware: Hardware::Hopper,
            ..AutoHints::default()
        };
        for n in 1..=8 {
            let (a, why) = ParallelLayout::auto_with(n, 24, false, hints);
            assert!(why.contains("cost model"), "{why}");
            assert!(Mesh::new(a, n, 24).is_ok(), "{a:?}");
            let want = cost::best(
                n,
                &dev(1024),
                &cost::Calibration::hopper_bf16(),
                &cost::Link::nvlink(),
                AUTO_STEPS,
                false,
                false,
            )
            .expect("a layout");
            // The fastest exact layout, or PipeFusion by the margin.
            assert!(a == want.layout || (a.pipeline() > 1), "{a:?} vs {want:?}");
        }
        // No calibration for the link or the GPU: the rule of thumb.
        for h in [
            AutoHints {
                link: Link::Unknown,
                ..hints
            },
            AutoHints {
                hardware: Hardware::Unknown,
                ..hints
            },
            AutoHints {
                shape: None,
                ..hints
            },
        ] {
            let (_, why) = ParallelLayout::auto_with(4, 24, false, h);
            assert!(!why.contains("cost model"), "{why}");
        }
        // A model no device holds: PipeFusion by memory, whatever the model says.
        let big = AutoHints {
            model_fits_one: false,
            ..hints
        };
        assert_eq!(ParallelLayout::auto_with(2, 24, false, big).0.pipeline(), 2);
        // CPU workers: the built-in CPU calibration.
        let cpu = AutoHints {
            hardware: Hardware::Cpu,
            link: Link::Unknown,
            ..hints
        };
        assert!(ParallelLayout::auto_with(4, 24, true, cpu)
            .1
            .contains("cost model"));
    }
}
