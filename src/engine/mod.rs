//! The engine every front end drives: a loaded model, the replicas a placement needs, and one
//! entry point that runs a generation on any placement — one device, CPU worker threads, GPUs
//! over NCCL, data-parallel groups. The CLI, the runtime (and through it the studio) translate
//! their inputs into [`ModelChoice`] and [`Placement`] and call this; none of them parses device
//! lists, chooses layouts, builds process groups or loads replicas itself.
//!
//! - [`placement`]: the device-list grammar, the degrees, the layout choice, [`Plan`].
//! - [`load`]: loading a model on a device; its config from the file headers.
//! - [`overlap`]: the first job's prompt encoded while the transformer loads.
//!
//! Loaded pipelines are kept by slot (device, copy) and reused by later plans: CPU ranks share
//! one model on the CPU; each GPU rank gets a pipeline on its GPU; a GPU named twice (data-parallel
//! groups of one GPU each sharing it) gets a second copy with its own handles, since two threads
//! must not share candle's cuBLAS handle.

pub mod load;
pub mod memory;
pub mod overlap;
pub mod placement;

use crate::error::{Error, Result};
use crate::parallel::mesh::ParallelLayout;
use crate::pipeline::{GenerateRequest, Generated, Pipeline, Progress};

pub use load::{
    load_pipeline, load_pipeline_blocks, model_config, DTypeChoice, ModelChoice, Precision,
};
pub use placement::{Degrees, Devices, LayoutChoice, Placement, Plan};

/// Where a loaded pipeline lives: its device and, for a GPU named several times, which copy;
/// and which transformer blocks it holds (a PipeFusion stage's on GPUs; `None`: all).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    device: String,
    copy: usize,
    blocks: Option<(usize, usize)>,
}

impl Slot {
    /// Whether a pipeline loaded for this slot can run as `needed` (the same device and copy,
    /// and every block it needs).
    fn serves(&self, needed: &Slot) -> bool {
        self.device == needed.device
            && self.copy == needed.copy
            && (self.blocks.is_none() || self.blocks == needed.blocks)
    }
}

/// GPUs present on this machine (0 in builds without the `cuda` feature).
pub fn gpus_present() -> usize {
    crate::device::cuda_device_count()
}

/// A model loaded for a series of plans.
pub struct Engine {
    choice: ModelChoice,
    /// The first entry is the pipeline loaded first ([`Engine::primary`]).
    loaded: Vec<(Slot, Pipeline)>,
    /// GPU pipelines a rank thread left behind may still be running on (see
    /// [`crate::parallel::abandoned`]): [`Engine::prepare`] loads fresh copies in their place.
    tainted: std::sync::Mutex<Vec<Slot>>,
}

impl Engine {
    /// Load `choice` on `device` (`cpu` or `cuda:N`: where rank 0 of the plans to come runs).
    pub fn load(choice: ModelChoice, device: &str) -> Result<Self> {
        let p = load_pipeline(&choice, device)?;
        Ok(Self {
            choice,
            loaded: vec![(
                Slot {
                    device: device.to_string(),
                    copy: 0,
                    blocks: None,
                },
                p,
            )],
            tainted: Default::default(),
        })
    }

    /// [`Engine::load`] for `plan`: under PipeFusion on GPUs the first pipeline holds only rank
    /// 0's stage (so a model no single GPU holds still loads, a stage per GPU); otherwise the
    /// whole model on rank 0's device.
    pub fn load_for(choice: ModelChoice, plan: &Plan) -> Result<Self> {
        Self::load_for_ahead(choice, plan, &[])
    }

    /// [`Engine::load_for`] for a first job whose prompts are `ahead` ([`overlap::prompts_for`]):
    /// encoded while the transformer loads, where the model is FLUX.1 or FLUX.2 klein from files.
    pub fn load_for_ahead(choice: ModelChoice, plan: &Plan, ahead: &[String]) -> Result<Self> {
        let device = plan
            .ranks
            .first()
            .ok_or_else(|| Error::setting("devices", "", "the plan has no ranks"))?;
        let blocks = if Self::staged(plan) {
            let (params, heads) = block_facts(&choice.resolve()?)?;
            Self::stage_of(plan, 0, &params, heads)
        } else {
            None
        };
        let p = load::load_pipeline_ahead(&choice, device, blocks, ahead)?;
        Ok(Self {
            choice,
            loaded: vec![(
                Slot {
                    device: device.clone(),
                    copy: 0,
                    blocks,
                },
                p,
            )],
            tainted: Default::default(),
        })
    }

    /// Whether `plan`'s ranks hold shares of the transformer (PipeFusion on GPUs).
    fn staged(plan: &Plan) -> bool {
        plan.is_gpu()
            && matches!(
                plan.layout.stale,
                crate::parallel::layout::Stale::PipeFusion { .. }
            )
    }

    /// The blocks rank `r` of `plan` holds of a transformer whose blocks have `params`
    /// parameters each (the unified numbering) and whose attention has `heads` heads: its
    /// PipeFusion stage's on GPUs, else all (`None`; CPU workers share one whole model).
    fn stage_of(plan: &Plan, r: usize, params: &[u64], heads: usize) -> Option<(usize, usize)> {
        let l = plan.layout;
        let crate::parallel::layout::Stale::PipeFusion {
            stages, balance, ..
        } = l.stale
        else {
            return None;
        };
        if !plan.is_gpu() {
            return None;
        }
        // The stage is the rank's pipeline coordinate (the plan's layout is checked already).
        let mesh = crate::parallel::mesh::Mesh::new(l, plan.world(), heads).ok()?;
        let stage = mesh.coords(r).pipeline;
        let b = crate::parallel::pipefusion::split_blocks(params, stages, stage, balance);
        Some((b.start, b.end))
    }

    pub fn choice(&self) -> &ModelChoice {
        &self.choice
    }

    /// Merge LoRAs into the weights on every pipeline loaded, or run them beside the products
    /// ([`Pipeline::set_lora_merge`]).
    pub fn set_lora_merge(&self, on: bool) {
        for (_, p) in &self.loaded {
            p.set_lora_merge(on);
        }
    }

    /// The pipeline loaded first (its label, variant, config and text encoders speak for all).
    pub fn primary(&self) -> &Pipeline {
        &self.loaded[0].1
    }

    /// The device the first pipeline was loaded on.
    pub fn primary_device(&self) -> &str {
        &self.loaded[0].0.device
    }

    /// Check `placement` for requests like `req` on this model and the GPUs present.
    pub fn plan(&self, placement: &Placement, req: &GenerateRequest) -> Result<Plan> {
        let p = self.primary();
        let (heads, hints) = match p.model.as_flux1() {
            Some(f) => (
                f.flux.config().num_heads,
                auto_hints(f.flux.config(), placement),
            ),
            None => (
                p.denoiser().num_heads(),
                family_hints(p.denoiser().num_blocks()),
            ),
        };
        placement.plan_with(
            heads,
            wants_true_cfg(req),
            gpus_present(),
            hints.for_size(req.width, req.height),
        )
    }

    /// Each rank's slot: CPU ranks share the CPU model; the k-th mention of a GPU is its copy k;
    /// under PipeFusion a GPU rank needs only its stage's blocks.
    fn slots(&self, plan: &Plan) -> Vec<Slot> {
        // The whole transformer's blocks, whatever share the first copy holds.
        let model = self.primary().denoiser();
        let (params, heads) = (model.block_params(), model.num_heads());
        plan.ranks
            .iter()
            .enumerate()
            .map(|(r, d)| Slot {
                device: d.clone(),
                copy: if d == "cpu" {
                    0
                } else {
                    plan.ranks[..r].iter().filter(|e| *e == d).count()
                },
                blocks: Self::stage_of(plan, r, &params, heads),
            })
            .collect()
    }

    /// Load what `plan` needs for `images` images (only the data-parallel groups that will have
    /// work), reusing what is loaded already. `on_load` hears each device before it loads.
    pub fn prepare(
        &mut self,
        plan: &Plan,
        images: usize,
        on_load: &mut dyn FnMut(&str),
    ) -> Result<()> {
        self.replace_tainted(on_load)?;
        let groups = plan.layout.dp.clamp(1, images.max(1));
        let used = groups * plan.group_size();
        let needed: Vec<Slot> = self.slots(plan).into_iter().take(used).collect();
        // GPU copies this plan leaves idle are freed (their memory may be what the plan needs);
        // the first pipeline and the CPU model stay, unless the first holds a stage and this
        // plan needs more of the model there.
        if let Some(first) = needed.first() {
            let (s, _) = &self.loaded[0];
            if s.blocks.is_some() && s.device == first.device && !s.serves(first) {
                on_load(&first.device);
                let p = load_pipeline_blocks(&self.choice, &first.device, first.blocks)
                    .map_err(|e| e.loading(format!("the model on {}", first.device)))?;
                self.loaded[0] = (first.clone(), p);
            }
        }
        let mut index = 0;
        self.loaded.retain(|(s, _)| {
            index += 1;
            index == 1 || s.device == "cpu" || needed.iter().any(|n| s.serves(n))
        });
        for slot in needed {
            if self.loaded.iter().any(|(s, _)| s.serves(&slot)) {
                continue;
            }
            on_load(&slot.device);
            let p = load_pipeline_blocks(&self.choice, &slot.device, slot.blocks)
                .map_err(|e| e.loading(format!("a replica for {}", slot.device)))?;
            self.loaded.push((slot, p));
        }
        Ok(())
    }

    /// Drop the GPU pipelines a left-behind rank thread may still use (two threads must not
    /// share candle's handles), reloading the first one in place; the others load again when a
    /// plan needs them. The memory the old copies hold is freed only when those threads end.
    fn replace_tainted(&mut self, on_load: &mut dyn FnMut(&str)) -> Result<()> {
        let tainted = std::mem::take(&mut *self.tainted.lock().unwrap_or_else(|p| p.into_inner()));
        if tainted.is_empty() {
            return Ok(());
        }
        let hit = |s: &Slot| {
            tainted
                .iter()
                .any(|t| t.device == s.device && t.copy == s.copy)
        };
        let first = self.loaded[0].0.clone();
        if hit(&first) {
            tracing::warn!(
                "reloading the model on {}: a rank left behind may still run on the old copy",
                first.device
            );
            on_load(&first.device);
            let p = load_pipeline_blocks(&self.choice, &first.device, first.blocks)
                .map_err(|e| e.loading(format!("the model on {}", first.device)))?;
            self.loaded[0] = (first, p);
        }
        let mut index = 0;
        self.loaded.retain(|(s, _)| {
            index += 1;
            let drop = index > 1 && hit(s);
            if drop {
                tracing::warn!(
                    "dropping the replica on {} (copy {}): a rank left behind may still run on it",
                    s.device,
                    s.copy
                );
            }
            !drop
        });
        Ok(())
    }

    fn pipeline(&self, slot: &Slot) -> Result<&Pipeline> {
        self.loaded
            .iter()
            .find(|(s, _)| s.serves(slot))
            .map(|(_, p)| p)
            .ok_or_else(|| {
                Error::setting(
                    "devices",
                    &slot.device,
                    "no model loaded there: call Engine::prepare with the plan first",
                )
            })
    }

    /// One image on `plan` (on its first data-parallel group when it has several), reporting
    /// progress from rank 0.
    pub fn generate(
        &self,
        plan: &Plan,
        req: &GenerateRequest,
        progress: &mut dyn FnMut(Progress) -> Result<()>,
    ) -> Result<Generated> {
        self.on_group(plan, 0, req, progress)
    }

    /// Every request of `reqs`, spread over `plan`'s data-parallel groups running at once (group
    /// g takes requests g, g + dp, ...); results in request order. No per-step progress.
    pub fn generate_many(&self, plan: &Plan, reqs: &[GenerateRequest]) -> Vec<Result<Generated>> {
        if !plan.is_gpu() {
            // CPU groups share the one CPU model.
            return match self.pipeline(&self.slots(plan)[0]) {
                Ok(p) => crate::parallel::ranks::generate_many(p, plan.layout, reqs),
                Err(e) => {
                    let e = e.to_string();
                    reqs.iter()
                        .map(|_| Err(Error::runtime("cannot load the model for the workers", &e)))
                        .collect()
                }
            };
        }
        crate::parallel::ranks::over_groups(plan.layout.dp, reqs, |g, req| {
            self.on_group(plan, g, req, &mut |_| Ok(()))
        })
    }

    /// One image on data-parallel group `g` of `plan`.
    fn on_group(
        &self,
        plan: &Plan,
        g: usize,
        req: &GenerateRequest,
        progress: &mut dyn FnMut(Progress) -> Result<()>,
    ) -> Result<Generated> {
        let per = plan.group_size();
        let slots: Vec<Slot> = self
            .slots(plan)
            .into_iter()
            .skip(g * per)
            .take(per)
            .collect();
        let head = self.pipeline(slots.first().ok_or_else(|| {
            Error::setting("parallel layout", g, "no such data-parallel group")
        })?)?;
        let inner = ParallelLayout {
            dp: 1,
            ..plan.layout
        };
        if inner.world() == 1 {
            return head.generate(req, progress);
        }
        if !plan.is_gpu() {
            return crate::parallel::ranks::generate(head, inner, req, progress);
        }
        let pipes = slots
            .iter()
            .map(|s| self.pipeline(s))
            .collect::<Result<Vec<_>>>()?;
        let r = on_gpus(&pipes, inner, req, progress);
        if let Err(Error::RanksAbandoned { ranks, .. }) = &r {
            // CPU ranks share the read-only CPU model and the job's own communicators: nothing
            // of theirs is reused. GPU ranks' pipelines are replaced before the next job.
            self.tainted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(ranks.iter().filter_map(|&r| slots.get(r).cloned()));
        }
        r
    }
}

/// One image over GPU ranks: rank r runs `pipes[r]` (rank 0's is the group's head, whose text
/// encoders run), NCCL between them.
#[cfg(feature = "cuda")]
fn on_gpus(
    pipes: &[&Pipeline],
    layout: ParallelLayout,
    req: &GenerateRequest,
    progress: &mut dyn FnMut(Progress) -> Result<()>,
) -> Result<Generated> {
    let devices: Vec<candle_core::Device> = pipes.iter().map(|p| p.device().clone()).collect();
    // Each rank's transformer with the request's LoRAs (a PipeFusion stage: its blocks' share).
    let models = pipes
        .iter()
        .map(|p| p.denoiser_for(req))
        .collect::<Result<Vec<_>>>()?;
    // Autoencoders with FLUX.1's kind of decoder (FLUX.1's, klein's) decode in row bands over
    // the GPUs; another decodes on rank 0's.
    let vaes: Vec<&dyn crate::model::family::BandDecoder> = pipes
        .iter()
        .map(|p| p.codec().band_decoder())
        .collect::<Option<_>>()
        .unwrap_or_default();
    crate::parallel::ranks::generate_on_gpus(
        pipes[0], &models, &vaes, &devices, layout, req, progress,
    )
}

#[cfg(not(feature = "cuda"))]
fn on_gpus(
    _: &[&Pipeline],
    _: ParallelLayout,
    _: &GenerateRequest,
    _: &mut dyn FnMut(Progress) -> Result<()>,
) -> Result<Generated> {
    Err(Error::setting(
        "devices",
        "cuda",
        "this build has no `cuda` feature: rebuild with --features cuda",
    ))
}

/// What the automatic layout should know of `cfg`'s transformer on `placement`'s devices:
/// whether the smallest GPU named holds its weights (bf16, from the config's parameter count)
/// with a tenth to spare for a step's work (CPU workers always do), and its block count. The
/// GPUs' links are read by [`Placement::plan_with`].
pub fn auto_hints(
    cfg: &crate::model::flux::FluxConfig,
    placement: &Placement,
) -> crate::parallel::auto::AutoHints {
    let gpus = crate::device::gpus();
    let smallest = placement
        .devices
        .listed(gpus_present())
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|r| r.strip_prefix("cuda:")?.parse::<usize>().ok())
        .filter_map(|i| gpus.iter().find(|g| g.index == i).map(|g| g.memory))
        .min();
    let weights = memory::FluxParams::of(cfg).bytes(&Default::default(), 2);
    // The cost model's view: bf16 on GPUs, f32 on CPU workers; 1024 px until the request says.
    use crate::parallel::cost::{Hardware, Shape};
    let (hardware, elem) = if placement.devices.is_gpu() {
        let first = gpus
            .first()
            .map_or(Hardware::Unknown, |g| Hardware::of_gpu(&g.name));
        let all = gpus.iter().all(|g| Hardware::of_gpu(&g.name) == first);
        (if all { first } else { Hardware::Unknown }, 2)
    } else {
        (Hardware::Cpu, 4)
    };
    crate::parallel::auto::AutoHints {
        model_fits_one: smallest.is_none_or(|m| weights as f64 * 1.1 < m as f64),
        blocks: cfg.num_blocks(),
        shape: Some(Shape::of_model(cfg, (1024, 1024), elem)),
        hardware,
        ..Default::default()
    }
}

/// The automatic layout's hints for a model of a family other than FLUX.1, of `blocks` blocks:
/// the rule of thumb (the cost model and the memory check read FLUX.1's config).
pub fn family_hints(blocks: usize) -> crate::parallel::auto::AutoHints {
    crate::parallel::auto::AutoHints {
        blocks,
        ..Default::default()
    }
}

/// The attention heads and automatic-layout hints of `resolved`'s transformer on `placement`,
/// from its config alone (no weights read): FLUX.1's through [`auto_hints`], a `random:klein-*`
/// model's through [`family_hints`].
pub fn layout_facts(
    resolved: &crate::model::layout::Resolved,
    placement: &Placement,
) -> Result<(usize, crate::parallel::auto::AutoHints)> {
    if let Some(c) = klein_config(resolved)? {
        return Ok((c.num_heads, family_hints(c.num_blocks())));
    }
    let cfg = model_config(resolved)?;
    Ok((cfg.num_heads, auto_hints(&cfg, placement)))
}

/// The transformer config of `resolved` when it is a FLUX.2 klein model (files or
/// `random:klein-*`), from its config alone.
fn klein_config(
    resolved: &crate::model::layout::Resolved,
) -> Result<Option<crate::model::klein::KleinConfig>> {
    use crate::model::layout::ModelSpec;
    Ok(match &resolved.spec {
        ModelSpec::RandomKlein(k) => Some(k.config()),
        ModelSpec::Klein(f) => Some(f.config()?),
        _ => None,
    })
}

/// Each block's parameters (the unified numbering) and the attention heads of `resolved`'s
/// transformer, from its config alone (no weights read): what PipeFusion splits its stages by,
/// before any copy is loaded.
pub fn block_facts(resolved: &crate::model::layout::Resolved) -> Result<(Vec<u64>, usize)> {
    if let Some(c) = klein_config(resolved)? {
        return Ok((c.block_params(), c.num_heads));
    }
    let cfg = model_config(resolved)?;
    Ok((cfg.block_params(), cfg.num_heads))
}

/// Whether `req` runs true CFG's negative branch (what CFG parallelism splits off).
pub fn wants_true_cfg(req: &GenerateRequest) -> bool {
    req.true_cfg.unwrap_or(1.0) > 1.0 && req.negative_prompt.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::layout::Stale;

    fn req(seed: u64) -> GenerateRequest {
        GenerateRequest {
            prompt: "a red fox".into(),
            negative_prompt: None,
            true_cfg: None,
            width: 48,
            height: 32,
            steps: Some(2),
            seed,
            guidance: None,
            cache_threshold: 0.0,
            cache: None,
            ..GenerateRequest::default()
        }
    }

    #[test]
    fn pipefusion_gpu_ranks_need_only_their_stage() {
        let plan = |devices: &[&str], layout: ParallelLayout| Plan {
            ranks: devices.iter().map(|d| d.to_string()).collect(),
            layout,
            why: String::new(),
        };
        let pipe = ParallelLayout {
            cfg: 2,
            stale: Stale::pipefusion(2),
            ..ParallelLayout::default()
        };
        let gpus = plan(&["cuda:0", "cuda:1", "cuda:2", "cuda:3"], pipe);
        // CFG outermost: ranks 0, 1 are one branch's stages 0, 1; ranks 2, 3 the other's.
        let cfg = crate::model::flux::FluxConfig::dev();
        let dev = (cfg.block_params(), cfg.num_heads);
        let stage_of = |plan: &Plan, r, (params, heads): &(Vec<u64>, usize)| {
            Engine::stage_of(plan, r, params, *heads)
        };
        let stages: Vec<_> = (0..4).map(|r| stage_of(&gpus, r, &dev)).collect();
        assert_eq!(
            stages,
            vec![Some((0, 29)), Some((29, 57)), Some((0, 29)), Some((29, 57))]
        );
        // klein 4B (5 double and 20 single blocks, 24 heads) from its built-in config, before
        // any copy loads: its stages too.
        let r = crate::model::layout::resolve("random:klein-4b", None).expect("klein 4B");
        let klein = block_facts(&r).expect("klein's blocks");
        assert_eq!((klein.0.len(), klein.1), (25, 24));
        let stages: Vec<_> = (0..2).map(|r| stage_of(&gpus, r, &klein)).collect();
        assert_eq!(stages, vec![Some((0, 13)), Some((13, 25))]);
        // Balanced by memory: 17 double blocks on the first stage, the other 40 blocks on the
        // second.
        let mem = plan(
            &["cuda:0", "cuda:1"],
            ParallelLayout {
                stale: Stale::PipeFusion {
                    stages: 2,
                    patches: 2,
                    warmup: 1,
                    balance: crate::parallel::pipefusion::StageBalance::Memory,
                },
                ..ParallelLayout::default()
            },
        );
        assert_eq!(stage_of(&mem, 1, &dev), Some((17, 57)));
        // CPU workers share one whole model; other layouts need every block.
        let cpu = plan(&["cpu", "cpu"], pipe);
        assert_eq!(stage_of(&cpu, 1, &dev), None);
        let uly = plan(
            &["cuda:0", "cuda:1"],
            ParallelLayout {
                ulysses: 2,
                ..ParallelLayout::default()
            },
        );
        assert_eq!(stage_of(&uly, 1, &dev), None);
        // A whole model serves a stage on its device; a stage serves only itself.
        let slot = |blocks| Slot {
            device: "cuda:1".into(),
            copy: 0,
            blocks,
        };
        assert!(slot(None).serves(&slot(Some((29, 57)))));
        assert!(slot(Some((29, 57))).serves(&slot(Some((29, 57)))));
        assert!(!slot(Some((29, 57))).serves(&slot(None)));
        assert!(!slot(Some((0, 29))).serves(&slot(Some((29, 57)))));
    }

    fn placement(devices: &str, degrees: Degrees) -> Result<Placement> {
        Ok(Placement {
            devices: Devices::parse(devices)?,
            layout: LayoutChoice::Degrees(degrees),
        })
    }

    #[test]
    fn every_placement_runs_through_one_engine_and_matches_one_worker() -> Result<()> {
        let mut e = Engine::load(ModelChoice::default(), "cpu")?;
        let one = e.primary().generate(&req(7), &mut |_| Ok(()))?;
        for (devices, degrees) in [
            ("cpu", Degrees::default()),
            (
                "cpu:4",
                Degrees {
                    ulysses: Some(2),
                    ring: Some(2),
                    ..Degrees::default()
                },
            ),
            (
                "cpu:2",
                Degrees {
                    dp: Some(2),
                    ..Degrees::default()
                },
            ),
        ] {
            let plan = e.plan(&placement(devices, degrees)?, &req(7))?;
            e.prepare(&plan, 2, &mut |d| panic!("{d}: the CPU model is shared"))?;
            let g = e.generate(&plan, &req(7), &mut |_| Ok(()))?;
            let diff = g
                .image
                .data
                .iter()
                .zip(&one.image.data)
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap_or(0);
            assert!(diff <= 1, "{devices}: pixels differ by {diff}");
            let many = e.generate_many(&plan, &[req(7), req(8)]);
            assert_eq!(many.len(), 2);
            let second = many.into_iter().nth(1).expect("two results")?;
            assert_eq!(second.settings.seed, 8);
        }
        Ok(())
    }

    #[test]
    fn gpu_plans_are_refused_without_gpus() -> Result<()> {
        let e = Engine::load(ModelChoice::default(), "cpu")?;
        let err = e
            .plan(&placement("cuda:0,1", Degrees::default())?, &req(1))
            .expect_err("no GPUs in tests");
        assert!(err.to_string().contains("GPU"), "{err}");
        Ok(())
    }
}
