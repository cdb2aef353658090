//! What a family's transformer takes and passes between its stages, whatever the family:
//! one step's input ([`StepInput`]), the two token streams between blocks ([`Streams`]), what every
//! block needs besides them ([`BlockCtx`]) and the RoPE tables ([`PosEmbed`], any number of axes).

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Result, Tensor};

use crate::kernels::qkv_prep::RopeTables;
use crate::model::attention::Attention;
use crate::model::shard::ShardLayout;

/// Cosine and sine tables for an interleaved RoPE over any number of position axes, (L, head_dim/2)
/// each.
#[derive(Debug, Clone)]
pub struct PosEmbed {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl PosEmbed {
    /// Tables for `ids` (L, n_axes) of f32 positions.
    pub fn new(ids: &Tensor, axes_dim: &[usize], theta: f64, dtype: DType) -> Result<Self> {
        let (_, n_axes) = ids.dims2()?;
        if n_axes != axes_dim.len() {
            candle_core::bail!(
                "position ids have {n_axes} axes, RoPE has {}",
                axes_dim.len()
            )
        }
        let dev = ids.device();
        let mut angles = Vec::with_capacity(n_axes);
        for (a, &dim) in axes_dim.iter().enumerate() {
            let omega: Vec<f32> = (0..dim / 2)
                .map(|i| (1.0 / theta.powf((2 * i) as f64 / dim as f64)) as f32)
                .collect();
            let omega = Tensor::from_vec(omega, (1, dim / 2), dev)?;
            let pos = ids.narrow(1, a, 1)?.to_dtype(DType::F32)?;
            angles.push(pos.broadcast_mul(&omega)?);
        }
        let angles = Tensor::cat(&angles, 1)?;
        Ok(Self {
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
        })
    }

    /// The rows for tokens `start..start+len` (for sequence-sharded attention).
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            cos: self.cos.narrow(0, start, len)?,
            sin: self.sin.narrow(0, start, len)?,
        })
    }
}

impl<'a> From<&'a PosEmbed> for RopeTables<'a> {
    fn from(pe: &'a PosEmbed) -> Self {
        RopeTables {
            cos: &pe.cos,
            sin: &pe.sin,
        }
    }
}

/// Apply the rotation to (B, H, L, D) queries or keys.
pub fn apply_rope(x: &Tensor, pe: &PosEmbed) -> Result<Tensor> {
    crate::kernels::reference::rope(x, &pe.cos, &pe.sin)
}

/// What every block of one step needs besides the token streams.
#[derive(Clone)]
pub struct BlockCtx {
    /// The conditioning vector (B, hidden): timestep, guidance and pooled text as the family embeds
    /// them.
    pub vec: Tensor,
    /// RoPE tables for the joint (text, image) sequence.
    pub pe: PosEmbed,
    /// Under sequence parallelism: how the group's ranks split the tokens (which rows of this
    /// rank's streams are padding).
    pub shards: Option<ShardLayout>,
    /// The attention a parallel replica wrapping the model put here (its group's strategy):
    /// blocks attend through it instead of the model's own ([`BlockCtx::attend_merged`]).
    pub attention: Option<Arc<dyn Attention>>,
}

impl std::fmt::Debug for BlockCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCtx")
            .field("vec", &self.vec)
            .field("pe", &self.pe)
            .field("shards", &self.shards)
            .field("attention", &self.attention.as_ref().map(|a| a.name()))
            .finish()
    }
}

impl BlockCtx {
    /// Attention through `attn` (or the replica's, [`BlockCtx::attention`], where one is set)
    /// with heads merged, (B, Lq, H·D), as the output projection takes it; padded keys are left
    /// out when the shards hold padding.
    pub fn attend_merged(
        &self,
        attn: &dyn Attention,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let attn = self.attention.as_deref().unwrap_or(attn);
        attn.attend_layer(layer, q, k, v, self.shards.as_ref())
    }

    /// The rows of this rank's image stream `img` (B, N, ..) that are real tokens: all of them
    /// unless the shards hold padding.
    pub fn real_image(&self, img: &Tensor) -> Result<Tensor> {
        match &self.shards {
            Some(layout) if layout.is_padded() => img.narrow(1, 0, layout.img_real(layout.rank)),
            _ => Ok(img.clone()),
        }
    }
}

/// The two token streams between blocks.
#[derive(Debug, Clone)]
pub struct Streams {
    /// Image tokens (B, N, hidden).
    pub img: Tensor,
    /// Text tokens (B, L, hidden).
    pub txt: Tensor,
}

/// Everything the transformer takes for one denoising step.
#[derive(Debug, Clone)]
pub struct StepInput<'a> {
    /// Packed noisy latent (B, N, the family's token channels).
    pub img: &'a Tensor,
    /// Text hidden states (B, L, the family's text width): FLUX.1's T5.
    pub txt: &'a Tensor,
    /// Pooled text vector (B, the family's pooled width): FLUX.1's CLIP. A family without one
    /// ([`crate::model::family::TextSpec::pooled_dim`] `None`) is given a (B, 0) tensor and ignores it.
    pub y: &'a Tensor,
    /// Timesteps in [0, 1], (B,).
    pub timesteps: &'a Tensor,
    /// Guidance strength (B,), used when the model embeds guidance.
    pub guidance: Option<&'a Tensor>,
    pub pe: &'a PosEmbed,
}

/// Drop the blocks outside `keep` from a family's two kinds of blocks (`first` numbered from 0,
/// `second` after them, as [`crate::model::family::Denoiser::run_blocks`] numbers them): what a
/// pipeline stage keeps.
pub fn keep_blocks<A, B>(first: &mut [Option<A>], second: &mut [Option<B>], keep: &Range<usize>) {
    let depth = first.len();
    for (i, b) in first.iter_mut().enumerate() {
        if !keep.contains(&i) {
            *b = None;
        }
    }
    for (i, b) in second.iter_mut().enumerate() {
        if !keep.contains(&(depth + i)) {
            *b = None;
        }
    }
}

/// Whether two ranges of blocks have a block in common (a part outside the blocks used by
/// `users` is needed by a replica holding `held`).
pub fn shares_blocks(held: &Range<usize>, users: &Range<usize>) -> bool {
    held.start.max(users.start) < held.end.min(users.end)
}

/// The blocks still held among a family's two kinds (numbered as [`keep_blocks`] numbers them), as
/// one range; empty when none.
pub fn held_blocks<A, B>(first: &[Option<A>], second: &[Option<B>]) -> Range<usize> {
    let held: Vec<usize> = first
        .iter()
        .map(Option::is_some)
        .chain(second.iter().map(Option::is_some))
        .enumerate()
        .filter(|(_, h)| *h)
        .map(|(i, _)| i)
        .collect();
    match (held.first(), held.last()) {
        (Some(&a), Some(&b)) => a..b + 1,
        _ => 0..0,
    }
}

/// The checks every family's config shares: the heads divide the hidden width, and the RoPE axes
/// are even and sum to the head dimension.
pub fn check_heads_and_rope(
    hidden: usize,
    heads: usize,
    axes_dim: &[usize],
) -> std::result::Result<(), String> {
    if heads == 0 || hidden % heads != 0 {
        return Err(format!(
            "hidden size {hidden} is not divisible by {heads} heads"
        ));
    }
    let head_dim = hidden / heads;
    let sum: usize = axes_dim.iter().sum();
    if sum != head_dim || axes_dim.iter().any(|a| a % 2 != 0) {
        return Err(format!(
            "RoPE axes {axes_dim:?} must be even and sum to the head dim {head_dim}"
        ));
    }
    Ok(())
}
