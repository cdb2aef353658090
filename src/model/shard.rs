//! How a sequence-parallel group splits one step's tokens: [`ShardLayout`] says which rows each
//! rank holds and which of them are padding (the block context carries it, the attention
//! strategies read it). Cutting a rank's share of the inputs is the parallel floor's
//! (`crate::parallel::shard`).
//!
//! Every rank holds an equal shard of the text tokens and of the image tokens, its local sequence
//! being `[text shard ; image shard]`. Token counts that do not divide by the group size are
//! padded: each stream gets zero tokens at its end up to the next multiple of the group size. The
//! attention strategies in `parallel` read the layout to leave padded keys out.

use std::ops::Range;

use candle_core::{Result, Tensor};

/// How a sequence-parallel group of `ranks` splits one step's tokens, seen from rank `rank`: each
/// rank holds `txt_shard` text rows then `img_shard` image rows (its local sequence), shard i
/// being rows `i * shard ..` of the stream padded at its end. Rows past the real counts are
/// padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardLayout {
    /// Ranks in the sequence-parallel group.
    pub ranks: usize,
    /// This rank's place in the group.
    pub rank: usize,
    /// Real text tokens (the whole sequence).
    pub txt_len: usize,
    /// Real image tokens (the whole sequence).
    pub img_len: usize,
    /// Text rows per rank (real and padding).
    pub txt_shard: usize,
    /// Image rows per rank (real and padding).
    pub img_shard: usize,
}

impl ShardLayout {
    /// `txt_len` text and `img_len` image tokens over `ranks` ranks, seen from `rank`.
    pub fn new(txt_len: usize, img_len: usize, ranks: usize, rank: usize) -> Result<Self> {
        if ranks == 0 || rank >= ranks {
            candle_core::bail!("sequence parallelism: rank {rank} of a group of {ranks}");
        }
        if img_len == 0 {
            candle_core::bail!("sequence parallelism: the step has no image tokens");
        }
        Ok(Self {
            ranks,
            rank,
            txt_len,
            img_len,
            txt_shard: txt_len.div_ceil(ranks),
            img_shard: img_len.div_ceil(ranks),
        })
    }

    /// Whether any shard holds padding (false when both counts divide by the group size).
    pub fn is_padded(&self) -> bool {
        self.txt_shard * self.ranks != self.txt_len || self.img_shard * self.ranks != self.img_len
    }

    /// Rows of every rank's local sequence (text shard then image shard).
    pub fn local_len(&self) -> usize {
        self.txt_shard + self.img_shard
    }

    /// Real text tokens in rank `r`'s shard (they come first in it).
    pub fn txt_real(&self, r: usize) -> usize {
        self.txt_len
            .saturating_sub(r * self.txt_shard)
            .min(self.txt_shard)
    }

    /// Real image tokens in rank `r`'s shard (they come first in it).
    pub fn img_real(&self, r: usize) -> usize {
        self.img_len
            .saturating_sub(r * self.img_shard)
            .min(self.img_shard)
    }

    /// The real rows of the local sequences of `ranks`, laid end to end, as (start, length) runs
    /// (touching runs merged).
    pub fn real_runs(&self, ranks: Range<usize>) -> Vec<(usize, usize)> {
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for (i, r) in ranks.enumerate() {
            let base = i * self.local_len();
            for (start, len) in [
                (base, self.txt_real(r)),
                (base + self.txt_shard, self.img_real(r)),
            ] {
                if len == 0 {
                    continue;
                }
                match runs.last_mut() {
                    Some((s, l)) if *s + *l == start => *l += len,
                    _ => runs.push((start, len)),
                }
            }
        }
        runs
    }

    /// The real rows of `t` along `dim`, where `t` holds the local sequences of `ranks` end to end
    /// (`t` itself when nothing is padded); `None` when all of them are padding.
    pub fn real_rows(&self, t: &Tensor, dim: usize, ranks: Range<usize>) -> Result<Option<Tensor>> {
        let want = ranks.len() * self.local_len();
        if t.dim(dim)? != want {
            candle_core::bail!(
                "sequence parallelism: {} rows along dim {dim} of {:?}, expected {want} ({} ranks of {})",
                t.dim(dim)?,
                t.dims(),
                ranks.len(),
                self.local_len()
            );
        }
        let runs = self.real_runs(ranks);
        match runs.as_slice() {
            [] => Ok(None),
            [(0, len)] if *len == want => Ok(Some(t.clone())),
            [(start, len)] => Ok(Some(t.narrow(dim, *start, *len)?)),
            _ => {
                let parts = runs
                    .iter()
                    .map(|&(s, l)| t.narrow(dim, s, l))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Some(Tensor::cat(&parts, dim)?))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn shard_layout_pads_each_stream_at_its_end() -> Result<()> {
        // 7 text and 35 image tokens over 4 ranks: shards of 2 and 9.
        let l = ShardLayout::new(7, 35, 4, 3)?;
        assert!(l.is_padded());
        assert_eq!((l.txt_shard, l.img_shard, l.local_len()), (2, 9, 11));
        let txt: Vec<usize> = (0..4).map(|r| l.txt_real(r)).collect();
        let img: Vec<usize> = (0..4).map(|r| l.img_real(r)).collect();
        assert_eq!((txt, img), (vec![2, 2, 2, 1], vec![9, 9, 9, 8]));
        // Rank 3's local sequence: 1 real text row, 1 padding, 8 real image rows, 1 padding.
        assert_eq!(l.real_runs(3..4), vec![(0, 1), (2, 8)]);
        // Ranks 0 and 1 end to end have no padding: one run.
        assert_eq!(l.real_runs(0..2), vec![(0, 22)]);
        // More ranks than tokens: 2 text and 3 image tokens over 4 ranks leave rank 3 empty.
        let l = ShardLayout::new(2, 3, 4, 0)?;
        assert_eq!(l.real_runs(3..4), vec![]);
        assert_eq!(l.real_runs(0..4), vec![(0, 4), (5, 1)]);
        let t = Tensor::arange(0f32, 8.0, &Device::Cpu)?;
        assert!(l.real_rows(&t.narrow(0, 6, 2)?, 0, 3..4)?.is_none());
        let real = l
            .real_rows(&t, 0, 0..4)?
            .ok_or_else(|| candle_core::Error::Msg("none".into()))?;
        assert_eq!(real.to_vec1::<f32>()?, vec![0.0, 1.0, 2.0, 3.0, 5.0]);
        // Counts that divide: no padding, rows untouched.
        let even = ShardLayout::new(8, 64, 4, 1)?;
        assert!(!even.is_padded());
        assert_eq!(even.real_runs(0..4), vec![(0, 72)]);
        // A step without image tokens, or a rank outside the group, is refused.
        assert!(ShardLayout::new(8, 0, 2, 0).is_err());
        assert!(ShardLayout::new(8, 8, 2, 2).is_err());
        Ok(())
    }
}
