//! Parallel replicas of any family's transformer, the parallel hooks held on the parallel floor
//! instead of by the model: a pipeline stage run by its plan ([`Planned`]), and a
//! sequence-parallel rank ([`SpReplica`]) with its group, attention strategy and patch rotation.
//! The latter's [`Denoiser::embed`] cuts this rank's shard of the tokens (with their
//! RoPE rows, padded as [`Shard`] says) and hands the model its local input, the block context
//! carries the group's attention to the model's blocks, and [`Denoiser::final_layer`] gathers
//! every rank's velocity, so the sampler and the cache policies see whole tensors as on one
//! device. The engine's sequence-parallel and displaced layouts run every rank through it
//! ([`super::sp::replica`]), FLUX.1 as any other family.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};

use super::comm::Communicator;
use super::shard::{gather_velocity, Shard};
use crate::model::attention::Attention;
use crate::model::family::{
    BlockCtx, Denoiser, ForwardPlan, PosEmbed, StepInput, Streams, TextSpec,
};

/// Rank `group.rank()` of a sequence-parallel group running `model` with `attention`.
pub struct SpReplica {
    model: Arc<dyn Denoiser>,
    group: Arc<dyn Communicator>,
    attention: Arc<dyn Attention>,
    /// Under displaced patches with rotation (piflux): forwards so far; forward f of rank r
    /// computes shard `(r + f) mod n`.
    rotation: Option<Arc<AtomicUsize>>,
}

impl std::fmt::Debug for SpReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpReplica")
            .field("model", &self.model)
            .field("rank", &self.group.rank())
            .field("size", &self.group.size())
            .field("attention", &self.attention.name())
            .finish()
    }
}

impl SpReplica {
    /// `model` (a one-device replica, holding no group of its own) as a rank of `group`, its
    /// attention `attention` (the group's strategy: Ulysses, Ring, USP, displaced).
    pub fn new(
        model: Arc<dyn Denoiser>,
        group: Arc<dyn Communicator>,
        attention: Arc<dyn Attention>,
    ) -> Self {
        Self {
            model,
            group,
            attention,
            rotation: None,
        }
    }

    /// Rotate the shards over the group (piflux; with a rotating displaced attention).
    pub fn with_patch_rotation(mut self) -> Self {
        self.rotation = Some(Arc::new(AtomicUsize::new(0)));
        self
    }
}

/// The [`Denoiser`] methods a replica passes straight to the model it wraps (its `model` field).
macro_rules! pass_to_model {
    () => {
        fn family(&self) -> &'static str {
            self.model.family()
        }
        fn device(&self) -> &Device {
            self.model.device()
        }
        fn dtype(&self) -> DType {
            self.model.dtype()
        }
        fn num_blocks(&self) -> usize {
            self.model.num_blocks()
        }
        fn num_heads(&self) -> usize {
            self.model.num_heads()
        }
        fn hidden_size(&self) -> usize {
            self.model.hidden_size()
        }
        fn block_params(&self) -> Vec<u64> {
            self.model.block_params()
        }
        fn text_spec(&self) -> TextSpec {
            self.model.text_spec()
        }
        fn token_channels(&self) -> usize {
            self.model.token_channels()
        }
        fn cond_channels(&self) -> usize {
            self.model.cond_channels()
        }
        fn pos_embed(&self, txt_len: usize, h: usize, w: usize) -> Result<PosEmbed> {
            self.model.pos_embed(txt_len, h, w)
        }
        fn conditioning(&self, input: &StepInput) -> Result<Tensor> {
            self.model.conditioning(input)
        }
        fn embed_streams(&self, input: &StepInput) -> Result<Streams> {
            self.model.embed_streams(input)
        }
        fn run_blocks(&self, s: Streams, ctx: &BlockCtx, range: Range<usize>) -> Result<Streams> {
            self.model.run_blocks(s, ctx, range)
        }
        fn held_blocks(&self) -> Range<usize> {
            self.model.held_blocks()
        }
        fn keep_blocks(&self, blocks: Range<usize>) -> Arc<dyn Denoiser> {
            self.model.keep_blocks(blocks)
        }
        fn weight_bytes(&self) -> usize {
            self.model.weight_bytes()
        }
        fn fp8_attention(&self) -> bool {
            self.model.fp8_attention()
        }
    };
}

impl Denoiser for SpReplica {
    pass_to_model!();

    fn embed(&self, input: &StepInput) -> Result<(Streams, BlockCtx)> {
        let n = self.group.size();
        let patch = match &self.rotation {
            Some(f) => (self.group.rank() + f.fetch_add(1, Ordering::SeqCst)) % n,
            None => self.group.rank(),
        };
        let shard = Shard::new(input, n, patch)?;
        let (s, mut ctx) = self.model.embed(&shard.input(input))?;
        ctx.shards = Some(shard.layout);
        ctx.attention = Some(self.attention.clone());
        Ok((s, ctx))
    }
    fn final_layer(&self, img: &Tensor, ctx: &BlockCtx) -> Result<Tensor> {
        let v = self.model.final_layer(img, ctx)?;
        match &ctx.shards {
            Some(layout) => gather_velocity(self.group.as_ref(), &v, layout),
            None => self.group.all_gather(&v, 1),
        }
    }
    fn forward(&self, input: &StepInput) -> Result<Tensor> {
        let (s, ctx) = self.embed(input)?;
        let s = self.run_blocks(s, &ctx, 0..self.num_blocks())?;
        self.final_layer(&s.img, &ctx)
    }
    fn sp_group(&self) -> Option<&Arc<dyn Communicator>> {
        Some(&self.group)
    }
}

/// A pipeline stage of any family's transformer: the stage's blocks of the model, whole forwards
/// run by the plan ([`super::pipefusion::PipeFusion::replica_in`]), the stage API passed to the
/// model.
pub struct Planned {
    model: Arc<dyn Denoiser>,
    plan: Arc<dyn ForwardPlan>,
}

impl std::fmt::Debug for Planned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Planned")
            .field("model", &self.model)
            .finish()
    }
}

impl Planned {
    pub fn new(model: Arc<dyn Denoiser>, plan: Arc<dyn ForwardPlan>) -> Self {
        Self { model, plan }
    }
}

impl Denoiser for Planned {
    pass_to_model!();

    fn embed(&self, input: &StepInput) -> Result<(Streams, BlockCtx)> {
        self.model.embed(input)
    }
    fn final_layer(&self, img: &Tensor, ctx: &BlockCtx) -> Result<Tensor> {
        self.model.final_layer(img, ctx)
    }
    fn forward(&self, input: &StepInput) -> Result<Tensor> {
        self.plan.forward(self.model.as_ref(), input)
    }
    fn sp_group(&self) -> Option<&Arc<dyn Communicator>> {
        None
    }
}
