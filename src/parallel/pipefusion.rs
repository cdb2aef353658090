//! PipeFusion (xDiT): the transformer's blocks split into consecutive stages, one per rank of
//! the pipeline group, and each step's tokens split into patches that flow through the stages
//! one after another, so stage s works on patch m while stage s + 1 works on patch m - 1.
//!
//! - **Stages.** Stage s holds blocks [`stage_blocks`]`(s)` only (an even share of the 57 blocks
//!   of FLUX.1; a double block and a single block cost the same per token), so each rank keeps
//!   about 1/N of the weights. Every stage computes the conditioning vector itself (small); stage 0
//!   embeds the tokens; the last stage applies the final layer.
//! - **Patches.** Patch m is [`Shard`] m of M: a slice of the text tokens and one of the image
//!   tokens (padded as sequence parallelism pads them). Between stages a patch's two token streams
//!   go by point-to-point send; nothing else crosses a stage boundary until the step's velocity,
//!   which the last stage broadcasts to the others.
//! - **Attention.** A patch's queries need every token's keys and values, most of which belong
//!   to patches this stage has not reached yet in this step. Each stage keeps, per block, the
//!   keys and values of every patch ([`PatchKv`]): a patch's own rows are written as it passes,
//!   so patch m attends to this step's K/V of patches 0..=m and the previous step's of the rest
//!   (one step stale; PipeFusion's "displaced" activations).
//! - **Warm-up.** The first `warmup` forwards run the whole sequence through the stages at once,
//!   unpatched: exactly the one-device forward (the stages only take turns). They fill the K/V
//!   buffers. With a warm-up covering every step the image equals the one-device image.
//!
//! - **Ulysses inside a stage** ([`PatchKv::with_ulysses`]): the stage's U ranks split each
//!   piece (a patch, or the whole sequence in warm-up) again as sequence parallelism does, trade
//!   token slices for head slices by all-to-all, and keep the K/V buffer for their heads only
//!   ([`PatchRows`] maps the rows). Rank u of a stage sends to rank u of the next.
//!
//! The step ends with a barrier (the velocity broadcast): the pipeline drains each step, leaving a
//! bubble of (N - 1) / (M + N - 1) of each stage's time. Cache policies run the blocks in pieces
//! themselves and are refused with it, as is ring attention inside a stage (not built).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{Result, Tensor};

use super::comm::Communicator;
use super::replica::Planned;
use super::shard::{Shard, ShardLayout};
use crate::model::attention::{Attention, LocalAttention};
use crate::model::family::{BlockCtx, Denoiser, ForwardPlan, StepInput, Streams};
use crate::model::flux::FluxConfig;

/// How the blocks are split over the stages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StageBalance {
    /// Even block counts: even work per token (a double block costs a single block's products
    /// per token), so no stage waits on another.
    #[default]
    Work,
    /// Even weight bytes: a double block holds 2.4 times a single block's weights, so the
    /// first stages take fewer blocks (for a model no single device holds; the later stages
    /// then do more of the work).
    Memory,
}

/// Parameters of each block of `cfg` in the unified numbering (double blocks first): products,
/// modulations, biases and norms.
pub fn block_params(cfg: &FluxConfig) -> Vec<u64> {
    cfg.block_params()
}

/// The blocks stage `stage` of `stages` holds under `balance`.
pub fn stage_split(
    cfg: &FluxConfig,
    stages: usize,
    stage: usize,
    balance: StageBalance,
) -> Range<usize> {
    split_blocks(&block_params(cfg), stages, stage, balance)
}

/// [`stage_split`] of any family's blocks, given each block's parameters.
pub fn split_blocks(
    params: &[u64],
    stages: usize,
    stage: usize,
    balance: StageBalance,
) -> Range<usize> {
    match balance {
        StageBalance::Work => stage_blocks(params.len(), stages, stage),
        StageBalance::Memory => weighted_blocks(params, stages, stage),
    }
}

/// Consecutive blocks for stage `stage` of `stages` with `weights[i]` for block i: each boundary
/// where the running total comes nearest to its share of the whole, every stage keeping at
/// least one block when there are enough.
pub fn weighted_blocks(weights: &[u64], stages: usize, stage: usize) -> Range<usize> {
    let (n, stages) = (weights.len(), stages.max(1));
    let total: u64 = weights.iter().sum();
    let mut prefix = vec![0u64; n + 1];
    for (i, w) in weights.iter().enumerate() {
        prefix[i + 1] = prefix[i] + w;
    }
    let mut bounds = vec![0usize];
    for s in 1..stages {
        let target = total as f64 * s as f64 / stages as f64;
        let lo = (bounds[s - 1] + 1).min(n);
        let hi = n.saturating_sub(stages - s).max(lo);
        let best = (lo..=hi)
            .min_by(|&a, &b| {
                let da = (prefix[a] as f64 - target).abs();
                let db = (prefix[b] as f64 - target).abs();
                da.total_cmp(&db)
            })
            .unwrap_or(lo);
        bounds.push(best);
    }
    bounds.push(n);
    bounds[stage.min(stages - 1)]..bounds[stage.min(stages - 1) + 1]
}

/// The blocks stage `stage` of `stages` holds, of `blocks` in all: consecutive, as even as they
/// divide (the first stages take one more when they do not).
pub fn stage_blocks(blocks: usize, stages: usize, stage: usize) -> Range<usize> {
    let stages = stages.max(1);
    let (base, extra) = (blocks / stages, blocks % stages);
    let start = stage * base + stage.min(extra);
    let len = base + usize::from(stage < extra);
    start.min(blocks)..(start + len).min(blocks)
}

/// What the stage's blocks are running now.
#[derive(Debug, Clone, Copy)]
enum Mode {
    /// The whole sequence at once, in its natural order (warm-up): exact attention; the K/V are
    /// kept in patch order for the patched forwards.
    Whole { txt_len: usize, img_len: usize },
    /// One patch (its place among the patches).
    Patch(ShardLayout),
}

/// One stage's attention under PipeFusion: every block's keys and values for all patches, in
/// patch order (each patch's text rows then its image rows, padded to the patches' equal size),
/// refreshed patch by patch (see the module's notes).
pub struct PatchKv {
    patches: usize,
    /// Ulysses inside the stage (two ranks or more): each rank holds a slice of every patch's
    /// tokens for all heads, and trades it for all of the patch's tokens for a slice of the heads
    /// (see [`PatchRows`]).
    ulysses: Option<Arc<dyn Communicator>>,
    local: LocalAttention,
    mode: Mutex<Option<Mode>>,
    /// (K, V) per block, (B, H, patches x patch rows, D) (H / Ulysses degree heads with Ulysses).
    layers: Mutex<HashMap<usize, (Tensor, Tensor)>>,
    /// Where every row comes from, for the token counts last seen.
    rows: Mutex<Option<CachedRows>>,
}

impl PatchKv {
    pub fn new(patches: usize) -> Self {
        Self {
            patches: patches.max(1),
            ulysses: None,
            local: LocalAttention::default(),
            mode: Mutex::new(None),
            layers: Mutex::new(HashMap::new()),
            rows: Mutex::new(None),
        }
    }

    /// With a Ulysses group of two ranks or more inside the stage.
    pub fn with_ulysses(mut self, group: Arc<dyn Communicator>) -> Self {
        if group.size() > 1 {
            self.ulysses = Some(group);
        }
        self
    }

    /// The Ulysses degree inside the stage (1 without).
    pub fn ulysses_degree(&self) -> usize {
        self.ulysses.as_ref().map_or(1, |g| g.size())
    }

    /// Block `layer`'s K/V buffer (kept by a warm-up step).
    fn buffer(&self, layer: usize) -> Result<(Tensor, Tensor)> {
        self.layers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&layer)
            .cloned()
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "PipeFusion: block {layer} has no keys and values from a warm-up step"
                ))
            })
    }

    /// Keep `kv` as block `layer`'s K/V buffer.
    fn keep(&self, layer: usize, kv: (Tensor, Tensor)) {
        self.layers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(layer, kv);
    }

    /// The row maps for `txt_len` text and `img_len` image tokens on `device`.
    fn patch_rows(
        &self,
        txt_len: usize,
        img_len: usize,
        device: &candle_core::Device,
    ) -> Result<Arc<PatchRows>> {
        let mut cached = self.rows.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((key, rows)) = cached.as_ref() {
            if *key == (txt_len, img_len) {
                return Ok(rows.clone());
            }
        }
        let rows = Arc::new(PatchRows::new(
            txt_len,
            img_len,
            self.patches,
            self.ulysses_degree(),
            device,
        )?);
        *cached = Some(((txt_len, img_len), rows.clone()));
        Ok(rows)
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner()) = Some(mode);
    }

    /// Bytes of K/V this stage keeps (what PipeFusion adds to a stage's memory).
    pub fn bytes(&self) -> usize {
        let layers = self.layers.lock().unwrap_or_else(|p| p.into_inner());
        layers
            .values()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum()
    }
}

/// The tokens (ids in the natural order, text first, then image) of the rows of every rank's
/// local sequence under `layout`, laid end to end (`None`: padding).
fn shard_tokens(layout: &ShardLayout) -> Vec<Option<usize>> {
    let mut rows = Vec::with_capacity(layout.ranks * layout.local_len());
    for r in 0..layout.ranks {
        for i in 0..layout.txt_shard {
            rows.push((i < layout.txt_real(r)).then(|| r * layout.txt_shard + i));
        }
        for i in 0..layout.img_shard {
            rows.push((i < layout.img_real(r)).then(|| layout.txt_len + r * layout.img_shard + i));
        }
    }
    rows
}

/// [`PatchRows`] for (text, image) token counts.
type CachedRows = ((usize, usize), Arc<PatchRows>);

/// Where the rows of a stage's K/V come from. The buffer holds the M patches end to end, each
/// its text rows then its image rows, padded to equal size. With Ulysses inside the stage a
/// patch (shard m of M) is split again over the U ranks (its padded streams sharded as sequence
/// parallelism shards them), so after the all-to-all a rank holds, for its heads, U sub-shards
/// of the patch end to end: `patch_rows` rows, padding at two levels (U = 1: the patch's own
/// rows). The warm-up shards the whole sequence over the U ranks instead (U = 1: the natural
/// order). Index tensors (u32, on the device) pick the real rows of either (`None`: every row
/// is real), and fill the patch-ordered buffer from a warm-up's K/V.
pub struct PatchRows {
    /// Rows per patch after the all-to-all (U x a sub-shard's local length).
    patch_rows: usize,
    /// The buffer's real rows (all M patches).
    buffer_real: Option<Tensor>,
    /// The warm-up's (gathered) rows that are real.
    whole_real: Option<Tensor>,
    /// For each buffer row, the warm-up row holding its token (row 0 for padding).
    fill: Tensor,
}

impl PatchRows {
    fn new(
        txt_len: usize,
        img_len: usize,
        patches: usize,
        ulysses: usize,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let patch = ShardLayout::new(txt_len, img_len, patches, 0)?;
        let by_patch = shard_tokens(&patch);
        // A sub-shard's rows name rows of the patch's local sequence (text rows, then image).
        let sub = ShardLayout::new(patch.txt_shard, patch.img_shard, ulysses, 0)?;
        let by_sub = shard_tokens(&sub);
        let mut buffer = Vec::with_capacity(patches * by_sub.len());
        for m in 0..patches {
            let rows = &by_patch[m * patch.local_len()..(m + 1) * patch.local_len()];
            buffer.extend(
                by_sub
                    .iter()
                    .map(|r| r.and_then(|i| rows.get(i).copied().flatten())),
            );
        }
        let whole = shard_tokens(&ShardLayout::new(txt_len, img_len, ulysses, 0)?);
        let mut at = vec![0u32; txt_len + img_len];
        for (row, t) in whole.iter().enumerate() {
            if let Some(t) = t {
                at[*t] = row as u32;
            }
        }
        let index = |v: Vec<u32>| {
            let n = v.len();
            Tensor::from_vec(v, n, device)
        };
        let real = |rows: &[Option<usize>]| -> Result<Option<Tensor>> {
            if rows.iter().all(Option::is_some) {
                return Ok(None);
            }
            let picked = rows
                .iter()
                .enumerate()
                .filter(|(_, t)| t.is_some())
                .map(|(i, _)| i as u32)
                .collect();
            Ok(Some(index(picked)?))
        };
        let fill = buffer.iter().map(|t| t.map_or(0, |t| at[t])).collect();
        Ok(Self {
            patch_rows: by_sub.len(),
            buffer_real: real(&buffer)?,
            whole_real: real(&whole)?,
            fill: index(fill)?,
        })
    }
}

/// `t`'s rows along dim 2 picked by `rows`, or `t` itself when `rows` is `None` (all of them).
fn pick(t: &Tensor, rows: Option<&Tensor>) -> Result<Tensor> {
    match rows {
        Some(i) => t.index_select(i, 2),
        None => Ok(t.clone()),
    }
}

impl Attention for PatchKv {
    fn attend(&self, _q: &Tensor, _k: &Tensor, _v: &Tensor) -> Result<Tensor> {
        candle_core::bail!("PipeFusion attends per layer (attend_layer)")
    }

    /// With Ulysses inside the stage, token slices are traded for head slices first (and back
    /// after). Then: in warm-up, attention over the real rows, the K/V kept in patch order; else
    /// this patch's rows written into the buffer and attention over the buffer's real rows.
    fn attend_layer(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _layout: Option<&ShardLayout>,
    ) -> Result<Tensor> {
        let mode = *self.mode.lock().unwrap_or_else(|p| p.into_inner());
        let (q, k, v) = match &self.ulysses {
            Some(g) => (
                g.all_to_all(q, 1, 2)?,
                g.all_to_all(k, 1, 2)?,
                g.all_to_all(v, 1, 2)?,
            ),
            None => (q.clone(), k.clone(), v.clone()),
        };
        let (kr, vr) = match mode {
            Some(Mode::Whole { txt_len, img_len }) => {
                let rows = self.patch_rows(txt_len, img_len, k.device())?;
                let kept = (
                    k.index_select(&rows.fill, 2)?.contiguous()?,
                    v.index_select(&rows.fill, 2)?.contiguous()?,
                );
                self.keep(layer, kept);
                let real = rows.whole_real.as_ref();
                (pick(&k, real)?, pick(&v, real)?)
            }
            Some(Mode::Patch(layout)) => {
                let rows = self.patch_rows(layout.txt_len, layout.img_len, k.device())?;
                let (kb, vb) = self.buffer(layer)?;
                // This patch's rows, fresh; the patches before it were written this step.
                let start = layout.rank * rows.patch_rows;
                kb.slice_set(&k.contiguous()?, 2, start)?;
                vb.slice_set(&v.contiguous()?, 2, start)?;
                let real = rows.buffer_real.as_ref();
                (pick(&kb, real)?, pick(&vb, real)?)
            }
            None => candle_core::bail!("PipeFusion: attention called outside a forward"),
        };
        match &self.ulysses {
            Some(g) => {
                let out = self.local.attend(&q, &kr, &vr)?;
                crate::kernels::flash_attn::merge_heads(&g.all_to_all(&out, 2, 1)?)
            }
            None => self.local.attend_merged(&q, &kr, &vr),
        }
    }

    fn name(&self) -> &str {
        "PipeFusion (this step's K/V for patches done, the previous step's for the rest)"
    }
    fn fp8_scores(&self) -> bool {
        self.local.fp8_scores
    }
}

/// One rank's stage of a PipeFusion pipeline: runs every forward of its replica
/// ([`super::replica::Planned`]).
pub struct PipeFusion {
    group: Arc<dyn Communicator>,
    patches: usize,
    warmup: usize,
    blocks: Range<usize>,
    kv: Arc<PatchKv>,
    forwards: AtomicUsize,
}

impl PipeFusion {
    /// Stage `group.rank()` of `group.size()`, running the blocks `blocks` with `kv` as its
    /// replica's attention; `patches` per step after `warmup` exact forwards (at least one: the
    /// patched forwards need a step's keys and values).
    pub fn new(
        group: Arc<dyn Communicator>,
        kv: Arc<PatchKv>,
        blocks: Range<usize>,
        warmup: usize,
    ) -> Result<Self> {
        if warmup == 0 {
            candle_core::bail!(
                "PipeFusion needs at least one warm-up step (it fills the keys and values the patches read)"
            );
        }
        Ok(Self {
            group,
            patches: kv.patches,
            warmup,
            blocks,
            kv,
            forwards: AtomicUsize::new(0),
        })
    }

    /// A replica of `model` (any family's) as this stage: only its blocks, attention through
    /// [`PatchKv`], forwards through the pipeline ([`super::replica::Planned`]).
    pub fn replica(
        model: &dyn Denoiser,
        group: Arc<dyn Communicator>,
        patches: usize,
        warmup: usize,
    ) -> Result<Planned> {
        Self::replica_with(model, group, patches, warmup, StageBalance::Work)
    }

    /// [`PipeFusion::replica`] with the blocks split as `balance` says.
    pub fn replica_with(
        model: &dyn Denoiser,
        group: Arc<dyn Communicator>,
        patches: usize,
        warmup: usize,
        balance: StageBalance,
    ) -> Result<Planned> {
        Self::replica_in(model, group, None, patches, warmup, balance)
    }

    /// [`PipeFusion::replica_with`] with Ulysses over `ulysses` inside the stage (each rank
    /// computes a slice of every patch; the degree must divide the heads).
    pub fn replica_in(
        model: &dyn Denoiser,
        group: Arc<dyn Communicator>,
        ulysses: Option<Arc<dyn Communicator>>,
        patches: usize,
        warmup: usize,
        balance: StageBalance,
    ) -> Result<Planned> {
        let plan = Self::stage_plan(model, group, ulysses, patches, warmup, balance)?;
        Ok(Planned::new(model.keep_blocks(plan.blocks.clone()), plan))
    }

    /// The plan of stage `group.rank()` for `model`: its blocks under `balance`, its attention.
    fn stage_plan(
        model: &dyn Denoiser,
        group: Arc<dyn Communicator>,
        ulysses: Option<Arc<dyn Communicator>>,
        patches: usize,
        warmup: usize,
        balance: StageBalance,
    ) -> Result<Arc<Self>> {
        let blocks = split_blocks(&model.block_params(), group.size(), group.rank(), balance);
        let mut kv = PatchKv::new(patches);
        // FP8 attention as the model was loaded (each patch's queries rounded in their groups).
        kv.local.fp8_scores = model.fp8_attention();
        if let Some(u) = ulysses {
            if model.num_heads() % u.size() != 0 {
                candle_core::bail!(
                    "PipeFusion: the Ulysses degree {} must divide the {} heads",
                    u.size(),
                    model.num_heads()
                );
            }
            kv = kv.with_ulysses(u);
        }
        Ok(Arc::new(Self::new(group, Arc::new(kv), blocks, warmup)?))
    }

    fn send(&self, s: &Streams) -> Result<()> {
        let next = self.group.rank() + 1;
        self.group.send(&s.img, next)?;
        self.group.send(&s.txt, next)
    }

    /// The previous stage's streams, on `device` (in-process ranks sharing a GPU hold device
    /// handles of their own: a received tensor is brought onto this stage's).
    fn recv(&self, device: &candle_core::Device) -> Result<Streams> {
        let prev = self.group.rank() - 1;
        let img = self.group.recv(prev)?.to_device(device)?;
        let txt = self.group.recv(prev)?.to_device(device)?;
        Ok(Streams { img, txt })
    }
}

impl PipeFusion {
    /// One piece (the whole input in warm-up, else one patch's) through this stage: its tokens
    /// embedded (stage 0) or received, the stage's blocks, then sent on; the last stage returns
    /// the velocity of the piece's image stream (padded at its end). With Ulysses inside the
    /// stage each rank takes its slice of the piece, and the slices' velocities are gathered.
    fn piece(
        &self,
        model: &dyn Denoiser,
        piece: &StepInput,
        vec: &Tensor,
        stage: usize,
        last: bool,
    ) -> Result<Option<Tensor>> {
        let slice;
        let local;
        let (input, ctx) = match &self.kv.ulysses {
            Some(g) => {
                slice = Shard::new(piece, g.size(), g.rank())?;
                local = slice.input(piece);
                (&local, self.ctx(vec, &slice.pe, Some(slice.layout)))
            }
            None => (piece, self.ctx(vec, piece.pe, None)),
        };
        let s = if stage == 0 {
            model.embed_streams(input)?
        } else {
            self.recv(model.device())?
        };
        let s = model.run_blocks(s, &ctx, self.blocks.clone())?;
        if !last {
            self.send(&s)?;
            return Ok(None);
        }
        let v = model.final_layer(&s.img, &ctx)?;
        match &self.kv.ulysses {
            Some(g) => Ok(Some(g.all_gather(&v, 1)?)),
            None => Ok(Some(v)),
        }
    }
}

impl PipeFusion {
    /// The block context of a piece: its attention through the stage's [`PatchKv`].
    fn ctx(
        &self,
        vec: &Tensor,
        pe: &crate::model::family::PosEmbed,
        shards: Option<ShardLayout>,
    ) -> BlockCtx {
        BlockCtx {
            vec: vec.clone(),
            pe: pe.clone(),
            shards,
            attention: Some(self.kv.clone()),
        }
    }
}

impl ForwardPlan for PipeFusion {
    fn forward(&self, model: &dyn Denoiser, input: &StepInput) -> Result<Tensor> {
        let f = self.forwards.fetch_add(1, Ordering::SeqCst);
        let (stage, stages) = (self.group.rank(), self.group.size());
        let last = stage + 1 == stages;
        let vec = model.conditioning(input)?;
        let (txt_len, img_len) = (input.txt.dim(1)?, input.img.dim(1)?);
        let v = if f < self.warmup {
            self.kv.set(Mode::Whole { txt_len, img_len });
            self.piece(model, input, &vec, stage, last)?
                .map(|v| v.narrow(1, 0, img_len))
                .transpose()?
        } else {
            let mut vs = Vec::with_capacity(self.patches);
            for m in 0..self.patches {
                let shard = Shard::new(input, self.patches, m)?;
                self.kv.set(Mode::Patch(shard.layout));
                if let Some(v) = self.piece(model, &shard.input(input), &vec, stage, last)? {
                    vs.push(v.narrow(1, 0, shard.layout.img_real(m))?);
                }
            }
            if last {
                Some(Tensor::cat(&vs, 1)?)
            } else {
                None
            }
        };
        if stages == 1 {
            return v.ok_or_else(|| candle_core::Error::Msg("PipeFusion: no velocity".into()));
        }
        // Every stage steps the sampler: the last one's velocity goes to all.
        let v = match v {
            Some(v) => v,
            None => Tensor::zeros(
                (input.img.dim(0)?, img_len, model.token_channels()),
                model.dtype(),
                model.device(),
            )?,
        };
        self.group.broadcast(&v, stages - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::demo_weights::DemoWeights;
    use crate::model::flux::{Flux, FluxConfig};
    use crate::model::rng::SplitMix64;
    use crate::parallel::comm::{run_local, LocalComm};
    use candle_core::{DType, Device};

    #[test]
    fn stages_split_the_blocks_evenly_and_cover_them_once() {
        for (blocks, stages) in [(57, 2), (57, 4), (10, 3), (3, 4), (8, 8)] {
            let parts: Vec<Range<usize>> = (0..stages)
                .map(|s| stage_blocks(blocks, stages, s))
                .collect();
            let covered: Vec<usize> = parts.iter().flat_map(|r| r.clone()).collect();
            assert_eq!(
                covered,
                (0..blocks).collect::<Vec<_>>(),
                "{blocks} / {stages}"
            );
            let lens: Vec<usize> = parts.iter().map(|r| r.len()).collect();
            let (lo, hi) = (lens.iter().min(), lens.iter().max());
            assert!(hi.zip(lo).is_some_and(|(h, l)| h - l <= 1), "{lens:?}");
        }
        assert_eq!(stage_blocks(57, 2, 0), 0..29);
        assert_eq!(stage_blocks(57, 2, 1), 29..57);
    }

    #[test]
    fn memory_balance_evens_the_weights_out() {
        let dev = FluxConfig::dev();
        let w = block_params(&dev);
        // A double block holds 2.4 times a single block's weights (its modulations are 4x).
        let ratio = w[0] as f64 / w[dev.depth] as f64;
        assert!((2.3..2.5).contains(&ratio), "{ratio}");
        for stages in [2, 3, 4, 8] {
            let parts: Vec<Range<usize>> = (0..stages)
                .map(|s| stage_split(&dev, stages, s, StageBalance::Memory))
                .collect();
            let covered: Vec<usize> = parts.iter().flat_map(|r| r.clone()).collect();
            assert_eq!(covered, (0..57).collect::<Vec<_>>(), "{stages}");
            let bytes: Vec<u64> = parts.iter().map(|r| w[r.clone()].iter().sum()).collect();
            let (lo, hi) = (bytes.iter().min(), bytes.iter().max());
            let spread = hi.zip(lo).map_or(1.0, |(h, l)| *h as f64 / *l as f64);
            // Within one double block of even (the blocks are whole).
            assert!(
                spread < 1.0 + 2.0 * w[0] as f64 / bytes[0] as f64,
                "{stages}: {bytes:?}"
            );
            // Even block counts put far more on the first stage.
            let work: u64 = w[stage_blocks(57, stages, 0)].iter().sum();
            assert!(bytes[0] < work, "{stages}");
        }
        // 2 stages: 17 of the 19 double blocks on the first, the rest on the second.
        assert_eq!(stage_split(&dev, 2, 0, StageBalance::Memory), 0..17);
        // More stages than blocks: a block each, the rest empty.
        let w3 = [5u64, 1, 1];
        let parts: Vec<Range<usize>> = (0..4).map(|s| weighted_blocks(&w3, 4, s)).collect();
        let covered: Vec<usize> = parts.iter().flat_map(|r| r.clone()).collect();
        assert_eq!(covered, vec![0, 1, 2]);
    }

    #[test]
    fn patch_order_interleaves_each_patchs_text_and_image_rows() -> Result<()> {
        // 3 text and 5 image tokens in 2 patches: text shards of 2 (1 + 1 padding), image
        // shards of 3 (2 + 1 padding). Tokens 1..=8 in natural order, the buffer filled from
        // them: [1, 2 | 4, 5, 6] then [3, pad | 7, 8, pad].
        let t = Tensor::arange(1f32, 9.0, &Device::Cpu)?.reshape((1, 1, 8, 1))?;
        let rows = PatchRows::new(3, 5, 2, 1, &Device::Cpu)?;
        assert_eq!(rows.patch_rows, 5);
        // The warm-up's natural order has no padding.
        assert!(rows.whole_real.is_none());
        let real = rows
            .buffer_real
            .ok_or_else(|| candle_core::Error::Msg("padding expected".into()))?;
        // Rows 6 and 9 of the buffer are the padding.
        assert_eq!(real.to_vec1::<u32>()?, vec![0, 1, 2, 3, 4, 5, 7, 8]);
        let p = pick(&t.index_select(&rows.fill, 2)?, Some(&real))?;
        let p = p.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(p, vec![1., 2., 4., 5., 6., 3., 7., 8.]);
        Ok(())
    }

    /// Three forwards of a tiny model (inputs nudged as denoising does) over `stages` stages and
    /// `patches` patches with `warmup` exact forwards: each forward's largest difference from one
    /// device, relative to the largest one-device value.
    fn forwards(
        stages: usize,
        patches: usize,
        warmup: usize,
        (txt, h, w): (usize, usize, usize),
    ) -> Result<Vec<f32>> {
        let s = crate::parallel::test_steps::Steps::new((txt, h, w), 1.0)?;
        let outs = run_local(stages, |_, comm| {
            s.run(&PipeFusion::replica(
                &s.model,
                Arc::new(comm),
                patches,
                warmup,
            )?)
        })?;
        s.worst(&outs)
    }

    #[test]
    fn warm_up_forwards_are_exact_and_patched_ones_close() -> Result<()> {
        // The tiny model has 2 double + 2 single blocks: 2 and 4 stages split them (4 stages:
        // one block each, double and single on different stages).
        for (stages, patches) in [(2, 2), (2, 4), (4, 4), (3, 2)] {
            let exact = forwards(stages, patches, 3, (8, 8, 8))?;
            assert!(
                exact.iter().all(|d| *d < 1e-5),
                "{stages}x{patches}: {exact:?}"
            );
            let stale = forwards(stages, patches, 1, (8, 8, 8))?;
            assert!(stale[0] < 1e-5, "{stages}x{patches}: {stale:?}");
            assert!(
                stale[1] > 1e-5 && stale[2] > 1e-5,
                "{stages}x{patches}: stale K/V changed nothing: {stale:?}"
            );
            assert!(
                stale[1] < 0.3 && stale[2] < 0.3,
                "{stages}x{patches}: {stale:?}"
            );
        }
        // Token counts that do not divide by the patches (padded patches) stay exact in warm-up
        // and close after it.
        let uneven = forwards(2, 3, 3, (7, 5, 7))?;
        assert!(uneven.iter().all(|d| *d < 1e-5), "{uneven:?}");
        let uneven = forwards(2, 3, 1, (7, 5, 7))?;
        assert!(uneven[1] < 0.3 && uneven[1] > 1e-5, "{uneven:?}");
        Ok(())
    }

    /// Every rank's outputs of `s`'s forwards over `stages` stages of `ulysses` ranks each (rank
    /// s * U + u is stage s's Ulysses rank u, as the mesh numbers them).
    fn ulysses_outputs(
        s: &crate::parallel::test_steps::Steps,
        (stages, ulysses): (usize, usize),
        patches: usize,
        warmup: usize,
    ) -> Result<Vec<Vec<Tensor>>> {
        let pipes: Vec<Vec<LocalComm>> = (0..ulysses).map(|_| LocalComm::group(stages)).collect();
        let ulys: Vec<Vec<LocalComm>> = (0..stages).map(|_| LocalComm::group(ulysses)).collect();
        run_local(stages * ulysses, |rank, _| {
            let (stage, u) = (rank / ulysses, rank % ulysses);
            let model = PipeFusion::replica_in(
                &s.model,
                Arc::new(pipes[u][stage].clone()),
                (ulysses > 1).then(|| Arc::new(ulys[stage][u].clone()) as Arc<dyn Communicator>),
                patches,
                warmup,
                StageBalance::Work,
            )?;
            s.run(&model)
        })
    }

    #[test]
    fn ulysses_inside_a_stage_is_exact_through_warm_up_and_matches_plain_stages_after() -> Result<()>
    {
        // The tiny model has 4 heads: Ulysses 2 and 4 divide them.
        for (stages, ulysses, patches) in [(2, 2, 2), (2, 2, 3), (1, 4, 2), (2, 4, 2)] {
            for tokens in [(8, 8, 8), (7, 5, 7)] {
                let s = crate::parallel::test_steps::Steps::new(tokens, 1.0)?;
                let exact = s.worst(&ulysses_outputs(&s, (stages, ulysses), patches, 3)?)?;
                assert!(
                    exact.iter().all(|d| *d < 1e-5),
                    "{stages}x{ulysses}, {patches} patches, {tokens:?}: {exact:?}"
                );
                // After warm-up: the same stale K/V as the stages without Ulysses, so the same
                // outputs; and not the one-device ones.
                let uly = ulysses_outputs(&s, (stages, ulysses), patches, 1)?;
                let plain = ulysses_outputs(&s, (stages, 1), patches, 1)?;
                for (a, b) in uly.iter().flatten().zip(plain[0].iter().cycle()) {
                    let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    let scale = b.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert!(d / scale < 1e-5, "{stages}x{ulysses}, {tokens:?}: {d}");
                }
                let stale = s.worst(&uly)?;
                assert!(
                    stale[1] > 1e-5,
                    "{stages}x{ulysses}: nothing stale: {stale:?}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn one_patch_after_warm_up_is_exact() -> Result<()> {
        // With a single patch there is nothing stale: every row of K/V is this step's.
        let d = forwards(2, 1, 1, (8, 4, 6))?;
        assert!(d.iter().all(|d| *d < 1e-5), "{d:?}");
        Ok(())
    }

    /// A patched step's bytes, counted on each stage, are what
    /// [`crate::parallel::traffic::pipefusion_bytes_per_step`] predicts.
    #[test]
    fn counted_traffic_matches_the_prediction() -> Result<()> {
        let mut rng = SplitMix64::new(6);
        use crate::parallel::traffic::{pipefusion_bytes_per_step, Counting};
        let dev = Device::Cpu;
        let cfg = FluxConfig::tiny();
        let m = Flux::new(&cfg, DemoWeights::new(5).var_builder(DType::F32, &dev))?;
        // 7 text and 5 x 7 image tokens in 3 patches: padded to 3 x (3 + 12) rows.
        let (txt, h, w, patches) = (7, 5, 7, 3);
        let img = rng.normal_tensor((1, h * w, 64), &dev)?;
        let txt_t = rng.normal_tensor((1, txt, cfg.context_in_dim), &dev)?;
        let y = rng.normal_tensor((1, cfg.vec_in_dim), &dev)?;
        let t = Tensor::new(&[0.5f32], &dev)?;
        let g = Tensor::new(&[3.5f32], &dev)?;
        let pe = m.pos_embed(txt, h, w)?;
        let input = StepInput {
            img: &img,
            txt: &txt_t,
            y: &y,
            timesteps: &t,
            guidance: Some(&g),
            pe: &pe,
        };
        for stages in [2, 3] {
            let sent = run_local(stages, |_, comm| {
                let counted = Arc::new(Counting::new(Arc::new(comm)));
                let stage = PipeFusion::replica(&m, counted.clone(), patches, 1)?;
                stage.forward(&input)?;
                let warm = counted.sent();
                stage.forward(&input)?;
                Ok(counted.sent() - warm)
            })?;
            let l = ShardLayout::new(txt, h * w, patches, 0)?;
            for (s, bytes) in sent.iter().enumerate() {
                let want = pipefusion_bytes_per_step(
                    stages,
                    s,
                    patches * l.local_len(),
                    cfg.hidden_size,
                    4,
                    (h * w, cfg.in_channels, 4),
                );
                assert_eq!(*bytes, want, "stage {s} of {stages}");
            }
        }
        Ok(())
    }

    #[test]
    fn a_stage_holds_only_its_blocks() -> Result<()> {
        let cfg = FluxConfig::tiny();
        let m = Flux::new(
            &cfg,
            DemoWeights::new(5).var_builder(DType::F32, &Device::Cpu),
        )?;
        let whole = m.weight_bytes();
        let comms = LocalComm::group(2);
        let mut parts = 0;
        for c in comms {
            let s = PipeFusion::replica(&m, Arc::new(c), 2, 1)?;
            assert!(s.weight_bytes() < whole);
            parts += s.weight_bytes();
        }
        // The blocks are split; the embedders and final layer are on both stages.
        let blocks_only = whole - m.clone().only_blocks(0..0).weight_bytes();
        assert_eq!(parts, whole + (whole - blocks_only));
        Ok(())
    }
}
