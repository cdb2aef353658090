//! One rank's shard of a step's inputs ([`Shard`]: its text and image tokens and RoPE rows, padded
//! as [`ShardLayout`] says) and every rank's velocity gathered whole again ([`gather_velocity`]):
//! what a sequence-parallel replica ([`super::replica::SpReplica`]) and a PipeFusion stage cut
//! and gather around any family's transformer.

use std::ops::Range;

use candle_core::{Result, Tensor};

use super::comm::Communicator;
use crate::model::family::{PosEmbed, StepInput};
pub use crate::model::shard::ShardLayout;

/// Rows `start..start + real` of `t` along `dim`, then zeros up to `shard` rows.
fn padded_rows(t: &Tensor, dim: usize, start: usize, real: usize, shard: usize) -> Result<Tensor> {
    if real == 0 {
        let mut dims = t.dims().to_vec();
        dims[dim] = shard;
        return Tensor::zeros(dims, t.dtype(), t.device());
    }
    let rows = t.narrow(dim, start, real)?;
    if real == shard {
        Ok(rows)
    } else {
        rows.pad_with_zeros(dim, 0, shard - real)
    }
}

/// Keys and values (B, H, L, D) holding the local sequences of `ranks` end to end, without their
/// padding rows when `layout` has some; `None` when every row is padding.
pub(crate) fn real_keys(
    k: &Tensor,
    v: &Tensor,
    layout: Option<&ShardLayout>,
    ranks: Range<usize>,
) -> Result<Option<(Tensor, Tensor)>> {
    match layout {
        Some(l) if l.is_padded() => {
            match (l.real_rows(k, 2, ranks.clone())?, l.real_rows(v, 2, ranks)?) {
                (Some(k), Some(v)) => Ok(Some((k, v))),
                _ => Ok(None),
            }
        }
        _ => Ok(Some((k.clone(), v.clone()))),
    }
}

/// This rank's share of a step's inputs: its text and image tokens and their RoPE rows, padded
/// to the layout's shard lengths.
#[derive(Debug, Clone)]
pub struct Shard {
    pub txt: Tensor,
    pub img: Tensor,
    pub pe: PosEmbed,
    pub layout: ShardLayout,
}

impl Shard {
    /// Rank `rank` of `n`: an equal slice of the (padded) text tokens and one of the (padded)
    /// image tokens. Padding rows are zeros, their RoPE rows too.
    pub fn new(input: &StepInput, n: usize, rank: usize) -> Result<Self> {
        let txt_len = input.txt.dim(1)?;
        let img_len = input.img.dim(1)?;
        let layout = ShardLayout::new(txt_len, img_len, n, rank)?;
        if input.pe.cos.dim(0)? != txt_len + img_len {
            candle_core::bail!(
                "RoPE tables have {} rows for {txt_len} text and {img_len} image tokens",
                input.pe.cos.dim(0)?
            );
        }
        let (ts, tr) = (rank * layout.txt_shard, layout.txt_real(rank));
        let (is, ir) = (rank * layout.img_shard, layout.img_real(rank));
        let rows = |t: &Tensor| -> Result<Tensor> {
            Tensor::cat(
                &[
                    padded_rows(t, 0, ts, tr, layout.txt_shard)?,
                    padded_rows(t, 0, txt_len + is, ir, layout.img_shard)?,
                ],
                0,
            )
        };
        Ok(Self {
            txt: padded_rows(input.txt, 1, ts, tr, layout.txt_shard)?,
            img: padded_rows(input.img, 1, is, ir, layout.img_shard)?,
            pe: PosEmbed {
                cos: rows(&input.pe.cos)?,
                sin: rows(&input.pe.sin)?,
            },
            layout,
        })
    }

    /// `full` with the token streams and RoPE tables replaced by this shard's.
    pub fn input<'a>(&'a self, full: &StepInput<'a>) -> StepInput<'a> {
        StepInput {
            img: &self.img,
            txt: &self.txt,
            pe: &self.pe,
            ..full.clone()
        }
    }
}

/// Every rank's velocity shard `v` (B, shard, C) gathered whole (B, N, C): in rank order, or
/// under patch rotation (this rank computed shard `layout.rank`) in shard order again; the image
/// stream's padding, at its end, dropped.
pub fn gather_velocity(
    group: &dyn Communicator,
    v: &Tensor,
    layout: &ShardLayout,
) -> Result<Tensor> {
    let all = group.all_gather(v, 1)?;
    let n = group.size();
    let shift = (layout.rank + n - group.rank()) % n;
    let all = if shift == 0 {
        all
    } else {
        // Shard q came from rank (q - shift) mod n.
        let chunk = layout.img_shard;
        let parts = (0..n)
            .map(|q| all.narrow(1, ((q + n - shift) % n) * chunk, chunk))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 1)?
    };
    if layout.is_padded() {
        all.narrow(1, 0, layout.img_len)
    } else {
        Ok(all)
    }
}
