//! The cost model: the predicted time of one denoising step under every valid layout, from the
//! compute time measured on one device and the link's per-call latency and bandwidth.
//!
//! **Compute.** One rank's transformer work in a step is `fixed + linear(q) + attention(q, kv)`:
//! `q` tokens through the blocks' products (`2 (4 + 2 r) h^2` FLOPs a token a block, `r` the MLP
//! ratio: q, k, v, the output projection and the MLP) and `q` queries attending to `kv` keys
//! (`4 q kv h` FLOPs a block). A [`Calibration`] holds the rates each part ran at on a device and a
//! fixed cost per pass through one block (launches, element-wise passes that do not shrink with
//! the shard), fitted from measured steps ([`Calibration::fit`]; [`Calibration::hopper_bf16`]
//! holds BENCHMARKS.md's H100/H200 numbers). Rates do not fall with smaller shards beyond what
//! the fixed cost says (GEMMs of a few hundred rows run below the fitted rate: an optimistic
//! assumption at 8 GPUs and small images).
//!
//! **Communication** is `calls x latency + bytes / bandwidth` per collective, as Parallax's code
//! issues them ([`Link`]): Ulysses 2 all-to-alls a block (q, k and v in one, then the output; 4
//! inside a PipeFusion stage, where they go apart), ring `n - 1` exchanges
//! of a K/V block a block, the bytes the tests count (`parallel::traffic`). Nothing overlaps
//! compute except the
//! displaced-patch refresh (a background thread: only what exceeds the compute shows) and
//! PipeFusion's stages (pipelined). Ring's exchanges are not overlapped with its block's attention
//! in this code (the exchange returns before the block is attended).
//!
//! **PipeFusion**: `M` patches through `N` stages take `(M + N - 1)` patch passes a step (the
//! pipeline drains at the step's end), a send of the patch's activations between stages, and
//! the velocity broadcast; its warm-up steps run the whole sequence through the stages in turn.
//! **Displaced** patches: warm-up forwards gather every rank's K/V (exact); after them the
//! refresh runs in the background (rotating: none). **CFG 2**: each half runs one branch, the
//! velocities are exchanged once a step. Data parallelism is left out: it makes several images
//! at once, not one faster.
//!
//! **CPU workers** share one machine whose cores a single worker already keeps busy, so their
//! compute adds up beyond the cores: a step takes the longest rank's work or the sum of every
//! rank's work over the cores, whichever is longer ([`Sharing::Shared`]).
//!
//! Step times are averages over the step count (warm-up steps included); approximate layouts
//! (PipeFusion after warm-up, displaced patches) are marked so, since they change the image.

use super::mesh::{Mesh, ParallelLayout, Stale};
use crate::model::flux::FluxConfig;

/// What the model needs of a transformer and an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub hidden: usize,
    pub mlp_hidden: usize,
    pub heads: usize,
    /// Transformer blocks (double + single), each one attention call.
    pub blocks: usize,
    /// Text tokens (T5's length).
    pub txt: usize,
    /// Image tokens (the latent in 2x2 patches: `(w / 16) (h / 16)`).
    pub img: usize,
    /// Packed latent channels (what the velocity carries per image token).
    pub out_channels: usize,
    /// Bytes a value on the wire (2 in bf16, 4 in f32).
    pub elem: usize,
}

impl Shape {
    /// `cfg`'s transformer on a `width` x `height` image with `txt` text tokens, values of
    /// `elem` bytes.
    pub fn of(cfg: &FluxConfig, txt: usize, (width, height): (usize, usize), elem: usize) -> Self {
        Self {
            hidden: cfg.hidden_size,
            mlp_hidden: cfg.mlp_hidden(),
            heads: cfg.num_heads,
            blocks: cfg.num_blocks(),
            txt,
            img: (width / 16) * (height / 16),
            out_channels: cfg.in_channels,
            elem,
        }
    }

    /// `cfg`'s transformer with its text length (the demo's, or FLUX.1-dev's 512 and schnell's
    /// 256 T5 tokens) on a `width` x `height` image.
    pub fn of_model(cfg: &FluxConfig, size: (usize, usize), elem: usize) -> Self {
        use crate::model::layout::Variant;
        let variant = if cfg.context_in_dim == crate::model::text::DEMO_T5_DIM {
            Variant::Demo
        } else if cfg.guidance_embed {
            Variant::Dev
        } else {
            Variant::Schnell
        };
        Self::of(cfg, variant.t5_max_len(), size, elem)
    }

    /// The same transformer on another image size.
    pub fn with_size(self, (width, height): (usize, usize)) -> Self {
        Self {
            img: (width / 16) * (height / 16),
            ..self
        }
    }

    /// The joint sequence (text + image).
    pub fn tokens(&self) -> usize {
        self.txt + self.img
    }

    /// Product FLOPs of `q` tokens through one block.
    fn linear_flops(&self, q: f64) -> f64 {
        let h = self.hidden as f64;
        2.0 * (4.0 * h * h + 2.0 * h * self.mlp_hidden as f64) * q
    }

    /// Attention FLOPs of `q` queries over `kv` keys in one block.
    fn attention_flops(&self, q: f64, kv: f64) -> f64 {
        4.0 * q * kv * self.hidden as f64
    }

    /// Bytes of `tokens` rows of the hidden state.
    fn rows_bytes(&self, tokens: f64) -> f64 {
        tokens * (self.hidden * self.elem) as f64
    }
}

/// How fast one device ran the transformer, and where that was measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// FLOP/s the products ran at.
    pub linear_flops_per_s: f64,
    /// FLOP/s attention ran at.
    pub attention_flops_per_s: f64,
    /// Seconds per pass through one block that do not shrink with the tokens.
    pub block_pass_s: f64,
    /// Where the numbers come from.
    pub source: String,
}

impl Calibration {
    /// H100/H200 in bf16, fitted (with the fixed cost per block pass) to BENCHMARKS.md's
    /// "Step time against token count" (`scripts/device-cost.sh`, `random:dev` on one H100,
    /// 2026-12-06): 27.95 / 40.48 / 67.83 / 127.36 / 282.13 / 680.86 ms a step at 512 to 16384
    /// image tokens (+ 512 text tokens).
    pub fn hopper_bf16() -> Self {
        let shape = Shape::of(&FluxConfig::dev(), 512, (1024, 1024), 2);
        let points: Vec<Sample> = HOPPER_BF16_STEPS
            .iter()
            .map(|&(w, h, ms)| Sample::whole(shape.with_size((w, h)), ms * 1e-3))
            .collect();
        let mut c = Self::fit(&points, true).unwrap_or(Self {
            linear_flops_per_s: 5.4e14,
            attention_flops_per_s: 7.0e14,
            block_pass_s: 0.0,
            source: String::new(),
        });
        c.source = "H100 bf16, FLUX.1-dev one-GPU steps at six sizes (BENCHMARKS.md, \
                    scripts/device-cost.sh)"
            .into();
        c
    }

    /// CPU worker threads, f32: fitted by `parallax plan --link cpu --calibrate` on the 2-core
    /// build machine (`random:tiny`: 51.7 ms a step at 128 px and 118.0 ms at 256 px on one
    /// worker, 119.8 ms on two PipeFusion stages of 16 patches at 128 px; other builds were
    /// running). Another machine's CPU differs: `--calibrate` measures it.
    pub fn cpu_threads() -> Self {
        Self {
            linear_flops_per_s: 11.3e9,
            attention_flops_per_s: 11.5e9,
            block_pass_s: 1.92e-3,
            source: "CPU f32, random:tiny on the 2-core build machine".into(),
        }
    }

    /// Fit the rates (and, with `fixed`, the cost per block pass) to measured steps by least
    /// squares. Where separate rates for products and attention come out negative (too few or
    /// too noisy samples), one rate for both. `None` when nothing fits with positive costs.
    pub fn fit(samples: &[Sample], fixed: bool) -> Option<Self> {
        Self::fit_columns(samples, fixed, false).or_else(|| Self::fit_columns(samples, fixed, true))
    }

    fn fit_columns(samples: &[Sample], fixed: bool, one_rate: bool) -> Option<Self> {
        // Unknowns: seconds per product FLOP, per attention FLOP (or one per FLOP of either),
        // per block pass.
        let rows: Vec<(Vec<f64>, f64)> = samples
            .iter()
            .map(|m| {
                let s = &m.shape;
                let b = s.blocks as f64 * m.copies;
                let (lin, attn) = (s.linear_flops(m.q) * b, s.attention_flops(m.q, m.kv) * b);
                let mut r = if one_rate {
                    vec![lin + attn]
                } else {
                    vec![lin, attn]
                };
                if fixed {
                    r.push(b);
                }
                (r, m.seconds)
            })
            .collect();
        let k = rows.first()?.0.len();
        // Normal equations, each column scaled to 1 for conditioning.
        let scale: Vec<f64> = (0..k)
            .map(|j| rows.iter().map(|(r, _)| r[j].abs()).fold(0.0, f64::max))
            .collect();
        if scale.contains(&0.0) {
            return None;
        }
        let mut a = vec![vec![0.0; k + 1]; k];
        for (r, t) in &rows {
            for i in 0..k {
                for j in 0..k {
                    a[i][j] += r[i] / scale[i] * r[j] / scale[j];
                }
                a[i][k] += r[i] / scale[i] * t;
            }
        }
        let x = solve(a)?;
        let x: Vec<f64> = x.iter().zip(&scale).map(|(v, s)| v / s).collect();
        let rates = if one_rate { 1 } else { 2 };
        if x[..rates].iter().any(|&v| v <= 0.0) || (fixed && x[rates] < 0.0) {
            return None;
        }
        Some(Self {
            linear_flops_per_s: 1.0 / x[0],
            attention_flops_per_s: 1.0 / x[rates - 1],
            block_pass_s: if fixed { x[rates] } else { 0.0 },
            source: format!("fitted to {} measured step(s)", samples.len()),
        })
    }

    /// Seconds for `q` queries (all heads, or Ulysses' equal share: `q` = tokens / u) over `kv`
    /// keys through `blocks` blocks, in `passes` passes.
    fn compute_s(&self, s: &Shape, q: f64, kv: f64, blocks: f64, passes: f64) -> f64 {
        blocks
            * (s.linear_flops(q) / self.linear_flops_per_s
                + s.attention_flops(q, kv) / self.attention_flops_per_s
                + passes * self.block_pass_s)
    }
}

/// One measured step for [`Calibration::fit`]: `copies` computations of `q` queries (their
/// products, and attention over `kv` keys) through every block took `seconds` of compute. One
/// device on the whole sequence: `q = kv = tokens`, one copy. CPU workers sharing the cores on
/// shards: `q = tokens / n`, `n` copies, the communication's prediction taken off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub shape: Shape,
    pub q: f64,
    pub kv: f64,
    pub copies: f64,
    pub seconds: f64,
}

impl Sample {
    /// A whole-sequence step on one device.
    pub fn whole(shape: Shape, seconds: f64) -> Self {
        let l = shape.tokens() as f64;
        Self {
            shape,
            q: l,
            kv: l,
            copies: 1.0,
            seconds,
        }
    }
}

/// One H100's bf16 FLUX.1-dev steps: (width, height, ms a step), BENCHMARKS.md.
pub const HOPPER_BF16_STEPS: [(usize, usize, f64); 6] = [
    (512, 256, 27.95),
    (512, 512, 40.48),
    (1024, 512, 67.83),
    (1024, 1024, 127.36),
    (2048, 1024, 282.13),
    (2048, 2048, 680.86),
];

/// What the workers are, as far as the cost model has a calibration for them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Hardware {
    /// Not known: the automatic layout falls back to its rule of thumb.
    #[default]
    Unknown,
    /// CPU worker threads.
    Cpu,
    /// NVIDIA H100 or H200 GPUs.
    Hopper,
}

impl Hardware {
    /// From a GPU's name (`NVIDIA H100 80GB HBM3`): Hopper for H100/H200, else not known.
    pub fn of_gpu(name: &str) -> Self {
        if name.contains("H100") || name.contains("H200") {
            Hardware::Hopper
        } else {
            Hardware::Unknown
        }
    }

    /// The calibration and link the automatic layout plans with (`link` as the topology told).
    pub fn model(self, link: super::mesh::Link) -> Option<(Calibration, Link)> {
        use super::mesh::Link as Topo;
        match (self, link) {
            (Hardware::Cpu, _) => Some((Calibration::cpu_threads(), Link::cpu())),
            (Hardware::Hopper, Topo::NvLink) => Some((Calibration::hopper_bf16(), Link::nvlink())),
            (Hardware::Hopper, Topo::Pcie) => Some((Calibration::hopper_bf16(), Link::pcie())),
            _ => None,
        }
    }
}

/// Gaussian elimination with partial pivoting on an augmented `k x (k + 1)` matrix.
fn solve(mut a: Vec<Vec<f64>>) -> Option<Vec<f64>> {
    let k = a.len();
    for c in 0..k {
        let p = (c..k).max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))?;
        if a[p][c].abs() < 1e-12 {
            return None;
        }
        a.swap(c, p);
        let pivot = a[c].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != c {
                let f = row[c] / pivot[c];
                for (x, p) in row.iter_mut().zip(&pivot).skip(c) {
                    *x -= f * p;
                }
            }
        }
    }
    Some((0..k).map(|i| a[i][k] / a[i][i]).collect())
}

/// Whether the ranks' compute runs on hardware of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// One device per rank (GPUs).
    Own,
    /// CPU worker threads on one machine: at most `parallel` ranks' work at once.
    Shared { parallel: usize },
}

/// A link between ranks: per collective call, `latency + bytes / bandwidth`.
#[derive(Debug, Clone, PartialEq)]
pub struct Link {
    pub name: String,
    /// Seconds per collective call before any byte moves (rendezvous, launch, skew).
    pub latency_s: f64,
    /// Bytes a second one rank sends (per direction).
    pub bytes_per_s: f64,
    pub sharing: Sharing,
    pub source: String,
}

impl Link {
    /// NVLink 4 between H100/H200s through NCCL: ~370 GB/s per direction for all-gather,
    /// all-to-all and ring traffic (450 GB/s raw, ~20 % protocol overhead; nccl-tests#212), and
    /// 34 us per all-to-all call at 1 MB on 4 x H100 (diffusion-bench-framework's
    /// ipc_a2a_rank_scaling_analysis; 35-85 us from 1 to 16 MB). SGLang observed ~340 us per
    /// call inside a whole model (rendezvous and rank skew, sglang#31852): pass `--latency-us` to
    /// plan for that. Numbers from shared/reference/peers-2026-12-05.md, section 6.
    pub fn nvlink() -> Self {
        Self {
            name: "nvlink".into(),
            latency_s: 34e-6,
            bytes_per_s: 370e9,
            sharing: Sharing::Own,
            source: "NVLink 4: 370 GB/s per direction (nccl-tests#212), 34 us a call (4 x H100 \
                     all-to-all at 1 MB)"
                .into(),
        }
    }

    /// PCIe between GPUs without NVLink: 8 x H100 PCIe measured 35-45 GB/s all-reduce bus
    /// bandwidth (docs.alayanew.com nccl-tests, 2026-05-06); 40 GB/s taken. Per-call latency: no
    /// published measurement found; twice NVLink's (70 us) assumed (traffic through the host
    /// bridge).
    pub fn pcie() -> Self {
        Self {
            name: "pcie".into(),
            latency_s: 70e-6,
            bytes_per_s: 40e9,
            sharing: Sharing::Own,
            source: "PCIe: 40 GB/s (8 x H100 PCIe all-reduce busbw 35-45 GB/s, alayanew \
                     nccl-tests); 70 us a call assumed (no published figure)"
                .into(),
        }
    }

    /// CPU worker threads in one process: a collective is a rendezvous of threads and copies in
    /// memory ([`crate::parallel::comm`]'s LocalComm), as measured on the 2-core build machine;
    /// `parallax plan --calibrate` measures this machine's.
    pub fn cpu() -> Self {
        Self {
            name: "cpu".into(),
            latency_s: 40e-6,
            bytes_per_s: 0.7e9,
            sharing: Sharing::Shared {
                parallel: std::thread::available_parallelism().map_or(1, |p| p.get()),
            },
            source: "CPU threads: two-rank all-to-alls on the 2-core build machine (25-208 us \
                     a call as it was busy, 0.7 GB/s); `--calibrate` measures this machine's"
                .into(),
        }
    }

    /// By name: `nvlink`, `pcie` or `cpu`.
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "nvlink" | "nvl" => Some(Self::nvlink()),
            "pcie" => Some(Self::pcie()),
            "cpu" => Some(Self::cpu()),
            _ => None,
        }
    }

    /// Compute seconds of a step whose longest rank works `critical` seconds and all ranks
    /// together `total`: on shared cores the total spreads over them at best.
    pub fn spread(&self, critical: f64, total: f64) -> f64 {
        match self.sharing {
            Sharing::Own => critical,
            Sharing::Shared { parallel } => critical.max(total / parallel.max(1) as f64),
        }
    }

    /// Seconds for `calls` collectives carrying `bytes` from each rank.
    fn time_s(&self, calls: f64, bytes: f64) -> f64 {
        calls * self.latency_s + bytes / self.bytes_per_s
    }
}

/// One layout's predicted step.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub layout: ParallelLayout,
    /// Seconds a step, averaged over the steps.
    pub step_s: f64,
    /// Seconds of it spent communicating (not hidden behind compute).
    pub comm_s: f64,
    /// Collective calls a step (from one rank).
    pub calls: f64,
    /// Same image as one device (false: PipeFusion after warm-up, displaced patches).
    pub exact: bool,
}

impl Prediction {
    /// The communication's share of the step.
    pub fn comm_share(&self) -> f64 {
        if self.step_s > 0.0 {
            self.comm_s / self.step_s
        } else {
            0.0
        }
    }
}

/// A layout in a few words (`ulysses 4`, `cfg 2 x pipefusion 2 (4 patches)`, ...).
pub fn describe(l: &ParallelLayout) -> String {
    let mut parts = Vec::new();
    if l.dp > 1 {
        parts.push(format!("dp {}", l.dp));
    }
    if l.cfg > 1 {
        parts.push(format!("cfg {}", l.cfg));
    }
    match l.stale {
        Stale::PipeFusion {
            stages, patches, ..
        } => parts.push(format!("pipefusion {stages} ({patches} patches)")),
        Stale::Displaced { rotate: true, .. } => {
            parts.push(format!("displaced {} rotating", l.ring))
        }
        Stale::Displaced { .. } => parts.push(format!("displaced {}", l.ring)),
        Stale::Exact => {}
    }
    if l.ring > 1 && !l.is_displaced() {
        parts.push(format!("ring {}", l.ring));
    }
    if l.ulysses > 1 {
        parts.push(format!("ulysses {}", l.ulysses));
    }
    if parts.is_empty() {
        "one device".into()
    } else {
        parts.join(" x ")
    }
}

/// Every layout worth predicting on `n` devices for a model of `heads` heads and `blocks`
/// blocks: CFG 2 when true CFG is on, then sequence parallelism (every Ulysses x ring split),
/// displaced patches (plain and rotating), and PipeFusion (one or two patches per stage, Ulysses
/// inside a stage where it divides). Each passes [`Mesh::new`]. No data parallelism.
pub fn layouts(n: usize, heads: usize, blocks: usize, true_cfg: bool) -> Vec<ParallelLayout> {
    let n = n.max(1);
    let mut out = Vec::new();
    let cfgs: &[usize] = if true_cfg && n % 2 == 0 {
        &[1, 2]
    } else {
        &[1]
    };
    for &cfg in cfgs {
        let rest = n / cfg;
        let base = ParallelLayout {
            cfg,
            ..ParallelLayout::default()
        };
        for u in (1..=rest).filter(|u| rest % u == 0) {
            out.push(ParallelLayout {
                ulysses: u,
                ring: rest / u,
                ..base
            });
        }
        if rest > 1 {
            for rotate in [false, true] {
                out.push(ParallelLayout {
                    ring: rest,
                    stale: Stale::Displaced { warmup: 1, rotate },
                    ..base
                });
            }
        }
        for p in (2..=rest.min(blocks)).filter(|p| rest % p == 0) {
            for patches in [p, 2 * p] {
                out.push(ParallelLayout {
                    ulysses: rest / p,
                    stale: Stale::PipeFusion {
                        stages: p,
                        patches,
                        warmup: 1,
                        balance: super::pipefusion::StageBalance::Work,
                    },
                    ..base
                });
            }
        }
    }
    out.retain(|l| Mesh::new(*l, n, heads).is_ok());
    out
}

/// The predicted step of `layout` for `shape` over `steps` steps (`true_cfg`: two branches a
/// step), compute from `cal`, communication over `link`.
pub fn predict(
    layout: &ParallelLayout,
    shape: &Shape,
    cal: &Calibration,
    link: &Link,
    steps: usize,
    true_cfg: bool,
) -> Prediction {
    let s = shape;
    let l = s.tokens() as f64;
    let blocks = s.blocks as f64;
    let steps = steps.max(1) as f64;
    // Branches each rank runs (batched: same calls, twice the bytes).
    let branches = if true_cfg && layout.cfg == 1 {
        2.0
    } else {
        1.0
    };
    let n = layout.world() as f64;
    let (u, r) = (layout.ulysses as f64, layout.ring as f64);
    // Velocity of one branch: what a step's end gathers or broadcasts.
    let velocity = (s.img * s.out_channels * s.elem) as f64;
    // CFG 2: the two branches' velocities exchanged once a step.
    let (cfg_calls, cfg_bytes) = if layout.cfg == 2 {
        (1.0, velocity)
    } else {
        (0.0, 0.0)
    };
    // Ulysses' all-to-alls in a block over `tokens` rows split `u` ways: q, k, v and the output
    // (`calls`: 2 where q, k and v go in one, 4 where they go apart, as inside PipeFusion).
    let ulysses_block = |tokens: f64, calls: f64| -> (f64, f64) {
        if u > 1.0 {
            (
                calls,
                4.0 * s.rows_bytes(tokens / u) * (u - 1.0) / u * branches,
            )
        } else {
            (0.0, 0.0)
        }
    };
    let (compute, comm, calls, exact) = if let Stale::PipeFusion {
        stages,
        patches,
        warmup,
        ..
    } = layout.stale
    {
        let p = stages as f64;
        let m = patches as f64;
        let warm = (warmup as f64).min(steps);
        let stage_blocks = blocks / p;
        // After warm-up: M patches of L/M tokens (split u ways inside the stage).
        let q = l / m / u;
        let pass = cal.compute_s(s, q, l, stage_blocks, 1.0) * branches;
        let (uc, ub) = ulysses_block(l / m, 4.0);
        let send = link.time_s(1.0, s.rows_bytes(q) * branches);
        let pass_comm = link.time_s(uc * stage_blocks, ub * stage_blocks) + send;
        let end = link.time_s(1.0 + cfg_calls, (p - 1.0) * velocity + cfg_bytes);
        let ticks = m + p - 1.0;
        let stale_compute = link.spread(ticks * pass, n * m * pass);
        let stale = (stale_compute, ticks * pass_comm + end);
        // Warm-up: the whole sequence through the stages in turn.
        let full = cal.compute_s(s, l / u, l, blocks, 1.0) * branches;
        let (wuc, wub) = ulysses_block(l, 4.0);
        let warm_comm = link.time_s(
            wuc * blocks + (p - 1.0),
            wub * blocks + (p - 1.0) * s.rows_bytes(l / u) * branches,
        ) + end;
        let warm_compute = link.spread(full, full * n / p);
        let avg = |a: f64, b: f64| (warm * a + (steps - warm) * b) / steps;
        let calls = avg(
            wuc * blocks + p + cfg_calls,
            ticks * (uc * stage_blocks + 1.0) + 1.0 + cfg_calls,
        );
        (
            avg(warm_compute, stale.0),
            avg(warm_comm, stale.1),
            calls,
            warm >= steps,
        )
    } else {
        let sp = u * r;
        let q = (l / sp).ceil();
        let per_rank = cal.compute_s(s, q, l, blocks, 1.0) * branches;
        let compute = link.spread(per_rank, per_rank * n);
        // The output latent gathered at the step's end.
        let (end_calls, end_bytes) = if sp > 1.0 {
            (1.0, velocity * (sp - 1.0) / sp)
        } else {
            (0.0, 0.0)
        };
        // Each rank's K and V (its heads' share) to every other ring member.
        let kv_bytes = 2.0 * s.rows_bytes(q) * (r - 1.0) * branches;
        match layout.stale {
            Stale::Displaced { warmup, rotate } => {
                let warm = (warmup as f64).min(steps);
                let exchange = link.time_s(2.0 * blocks, kv_bytes * blocks);
                let base = link.time_s(end_calls + cfg_calls, end_bytes + cfg_bytes);
                // After warm-up the refresh runs beside the compute; rotating sends nothing.
                let stale = if rotate {
                    base
                } else {
                    base + (exchange - compute).max(0.0)
                };
                let avg = |a: f64, b: f64| (warm * a + (steps - warm) * b) / steps;
                let stale_calls = if rotate { 0.0 } else { 2.0 * blocks };
                (
                    compute,
                    avg(exchange + base, stale),
                    avg(2.0 * blocks, stale_calls) + end_calls + cfg_calls,
                    false,
                )
            }
            Stale::Exact | Stale::PipeFusion { .. } => {
                let (uc, ub) = ulysses_block(l / r, 2.0);
                let ring_calls = (r - 1.0) * blocks;
                let calls = uc * blocks + ring_calls + end_calls + cfg_calls;
                let bytes = ub * blocks + kv_bytes / u * blocks + end_bytes + cfg_bytes;
                (compute, link.time_s(calls, bytes), calls, true)
            }
        }
    };
    Prediction {
        layout: *layout,
        step_s: compute + comm,
        comm_s: comm,
        calls,
        exact,
    }
}

/// Every layout of [`layouts`] predicted, fastest first.
pub fn rank_layouts(
    n: usize,
    shape: &Shape,
    cal: &Calibration,
    link: &Link,
    steps: usize,
    true_cfg: bool,
) -> Vec<Prediction> {
    let mut v: Vec<Prediction> = layouts(n, shape.heads, shape.blocks, true_cfg)
        .iter()
        .map(|l| predict(l, shape, cal, link, steps, true_cfg))
        .collect();
    v.sort_by(|a, b| a.step_s.total_cmp(&b.step_s));
    v
}

/// The fastest exact layout (same image as one device), or the fastest of all when
/// `approximate` allows layouts that change the image.
pub fn best(
    n: usize,
    shape: &Shape,
    cal: &Calibration,
    link: &Link,
    steps: usize,
    true_cfg: bool,
    approximate: bool,
) -> Option<Prediction> {
    rank_layouts(n, shape, cal, link, steps, true_cfg)
        .into_iter()
        .find(|p| approximate || p.exact)
}

/// `543 TFLOP/s`, or `12.3 GFLOP/s` below a TFLOP/s.
fn flops(per_s: f64) -> String {
    if per_s >= 1e12 {
        format!("{:.0} TFLOP/s", per_s / 1e12)
    } else {
        format!("{:.1} GFLOP/s", per_s / 1e9)
    }
}

/// The assumptions under the table, one a line.
pub fn assumptions(cal: &Calibration, link: &Link) -> Vec<String> {
    vec![
        format!(
            "compute: {}: products at {}, attention at {}, {:.1} us fixed a block pass",
            cal.source,
            flops(cal.linear_flops_per_s),
            flops(cal.attention_flops_per_s),
            cal.block_pass_s * 1e6
        ),
        format!(
            "link {}: {:.0} us a call, {:.1} GB/s per direction ({})",
            link.name,
            link.latency_s * 1e6,
            link.bytes_per_s / 1e9,
            link.source
        ),
        "compute scales with FLOPs down to any shard (optimistic for small shards on GPUs)".into(),
        "no collective overlaps compute except the displaced-patch refresh and PipeFusion's pipeline".into(),
        "Ulysses: 2 all-to-alls a block (4 inside a PipeFusion stage); ring: n-1 K/V exchanges a block; PipeFusion drains each step ((M + N - 1) patch passes)".into(),
        match link.sharing {
            Sharing::Own => "one device per rank".into(),
            Sharing::Shared { parallel } => format!(
                "CPU workers share {parallel} core(s): a step takes the longest rank's work or all ranks' work over the cores"
            ),
        },
        "data parallelism is not listed (several images at once, none faster)".into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(size: usize) -> Shape {
        Shape::of(&FluxConfig::dev(), 512, (size, size), 2)
    }

    #[test]
    fn one_gpu_reproduces_the_calibrated_steps() {
        let cal = Calibration::hopper_bf16();
        // A least-squares fit of three constants to six steps: each within 10 %, 1024 px within 3 %.
        for (w, h, ms) in HOPPER_BF16_STEPS {
            let p = predict(
                &ParallelLayout::default(),
                &dev(1024).with_size((w, h)),
                &cal,
                &Link::nvlink(),
                28,
                false,
            );
            let tol = if (w, h) == (1024, 1024) { 0.03 } else { 0.10 };
            assert!(
                (p.step_s * 1e3 - ms).abs() < tol * ms,
                "{w}x{h}: {} ms against {ms}",
                p.step_s * 1e3
            );
            assert_eq!(p.comm_s, 0.0);
        }
    }

    #[test]
    fn a_fit_recovers_the_constants_it_was_made_from() {
        let truth = Calibration {
            linear_flops_per_s: 3e11,
            attention_flops_per_s: 1e11,
            block_pass_s: 2e-4,
            source: String::new(),
        };
        let t = Shape::of(&FluxConfig::tiny(), 32, (64, 64), 4);
        let mut points: Vec<Sample> = [(64, 64), (256, 256)]
            .iter()
            .map(|&wh| {
                let s = t.with_size(wh);
                let l = s.tokens() as f64;
                Sample::whole(s, truth.compute_s(&s, l, l, s.blocks as f64, 1.0))
            })
            .collect();
        // Four shards of 128 px summed, as CPU workers on shared cores.
        let s = t.with_size((128, 128));
        let l = s.tokens() as f64;
        points.push(Sample {
            shape: s,
            q: l / 4.0,
            kv: l,
            copies: 4.0,
            seconds: 4.0 * truth.compute_s(&s, l / 4.0, l, s.blocks as f64, 1.0),
        });
        let fit = Calibration::fit(&points, true).expect("fits");
        assert!((fit.linear_flops_per_s / 3e11 - 1.0).abs() < 1e-6);
        assert!((fit.attention_flops_per_s / 1e11 - 1.0).abs() < 1e-6);
        assert!((fit.block_pass_s / 2e-4 - 1.0).abs() < 1e-6);
    }

    #[test]
    fn more_gpus_are_never_predicted_faster_than_perfect_scaling() {
        let cal = Calibration::hopper_bf16();
        for link in [Link::nvlink(), Link::pcie()] {
            for size in [512, 1024, 2048] {
                for true_cfg in [false, true] {
                    let one = predict(
                        &ParallelLayout::default(),
                        &dev(size),
                        &cal,
                        &link,
                        28,
                        true_cfg,
                    );
                    for n in [2, 3, 4, 6, 8] {
                        for p in rank_layouts(n, &dev(size), &cal, &link, 28, true_cfg) {
                            assert!(
                                p.step_s >= one.step_s / n as f64 * 0.999,
                                "{} on {n} ({} px, {}): {} s against one's {} s",
                                describe(&p.layout),
                                size,
                                link.name,
                                p.step_s,
                                one.step_s
                            );
                            assert!(p.comm_s >= 0.0 && p.comm_s <= p.step_s);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_listed_layout_is_valid_and_the_families_are_there() {
        let all = layouts(8, 24, 57, true);
        for l in &all {
            assert!(Mesh::new(*l, 8, 24).is_ok(), "{l:?}");
        }
        let names: Vec<String> = all.iter().map(describe).collect();
        for want in [
            "ulysses 8",
            "ring 8",
            "ring 2 x ulysses 4",
            "displaced 8",
            "displaced 8 rotating",
            "pipefusion 8 (8 patches)",
            "cfg 2 x ulysses 4",
            "cfg 2 x pipefusion 2 (4 patches) x ulysses 2",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
        }
        // 5 devices: 24 heads rule out Ulysses 5.
        assert!(layouts(5, 24, 57, false).iter().all(|l| l.ulysses == 1));
    }

    /// Where latency dominates (a small image on many PCIe-linked GPUs), the best exact layout
    /// makes fewer collective calls than Ulysses over every GPU; where compute dominates (a large
    /// image on NVLink), the best is within a few percent of perfect scaling.
    #[test]
    fn latency_bound_regimes_pick_fewer_calls() {
        let cal = Calibration::hopper_bf16();
        let small = dev(512);
        let ranked = rank_layouts(8, &small, &cal, &Link::pcie(), 28, false);
        let uly = ranked
            .iter()
            .find(|p| p.layout.ulysses == 8)
            .expect("ulysses 8 listed");
        let best = &ranked[0];
        assert!(best.calls < uly.calls, "{best:?} against {uly:?}");
        assert!(best.step_s < uly.step_s);
        // More latency per call never makes the many-call layouts relatively better.
        let slow = Link {
            latency_s: 340e-6,
            ..Link::nvlink()
        };
        let fast_best = best_exact(&small, &Link::nvlink());
        let slow_best = best_exact(&small, &slow);
        assert!(
            slow_best.calls <= fast_best.calls,
            "{slow_best:?} vs {fast_best:?}"
        );
        let big = dev(2048);
        let one = predict(
            &ParallelLayout::default(),
            &big,
            &cal,
            &Link::nvlink(),
            28,
            false,
        );
        let b = best_exact(&big, &Link::nvlink());
        assert!(b.step_s < one.step_s / 4.0 * 1.2, "{b:?} against {one:?}");
    }

    fn best_exact(s: &Shape, link: &Link) -> Prediction {
        best(4, s, &Calibration::hopper_bf16(), link, 28, false, false).expect("a layout")
    }
}
