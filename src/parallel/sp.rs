//! Sequence-parallel transformer steps: one FLUX forward spread over a sequence-parallel group.
//!
//! Every rank holds an equal shard of the text tokens and of the image tokens, so its local
//! sequence is `[text shard ; image shard]`. Token-wise work (projections, norms, modulation,
//! MLPs) stays local; attention goes through the group's strategy (Ulysses or Ring), which sees
//! the shards of all ranks. The joint sequence the attention sees is a permutation of the
//! single-device one (text 0, image 0, text 1, image 1, ...); since each token carries its own
//! RoPE position and attention is not causal, the result is the same. Each rank's velocity shard
//! is gathered at the end.
//!
//! Token counts that do not divide by the group size are padded: each stream (text, image) gets
//! zero tokens at its end up to the next multiple of the group size, so every shard has the same
//! length and the collectives trade equal pieces ([`ShardLayout`] says which rows are real). The
//! attention strategies leave padded keys out ([`ShardLayout::real_rows`]), so padding never
//! reaches a real token; padded queries are computed and their rows dropped when the velocity is
//! gathered. When the counts divide, nothing is padded and nothing changes.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{Result, Tensor};

use super::comm::Communicator;
use crate::model::flux::{Flux, FluxInput, PosEmbed};

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
    pub fn new(input: &FluxInput, n: usize, rank: usize) -> Result<Self> {
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
    pub fn input<'a>(&'a self, full: &FluxInput<'a>) -> FluxInput<'a> {
        FluxInput {
            img: &self.img,
            txt: &self.txt,
            pe: &self.pe,
            ..full.clone()
        }
    }
}

/// A replica of `model` as rank `comm.rank()` of a sequence-parallel group using `attention`.
pub fn replica(
    model: &Flux,
    comm: Arc<dyn Communicator>,
    attention: Arc<dyn crate::model::attention::Attention>,
) -> Flux {
    model
        .clone()
        .with_attention(attention)
        .with_sequence_parallel(comm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::demo_weights::DemoWeights;
    use crate::model::flux::FluxConfig;
    use crate::parallel::comm::{run_local, LocalComm};
    use crate::parallel::ring::RingAttention;
    use crate::parallel::ulysses::{UlyssesAttention, UspAttention};
    use candle_core::{DType, Device};

    /// A tiny transformer with `heads` heads of 32 and inputs for `txt` text tokens and an
    /// `h` x `w` grid of image tokens.
    fn setup(heads: usize, txt: usize, h: usize, w: usize) -> Result<(Flux, Vec<Tensor>)> {
        let dev = Device::Cpu;
        let cfg = FluxConfig {
            num_heads: heads,
            hidden_size: 32 * heads,
            axes_dim: vec![4, 14, 14],
            ..FluxConfig::tiny()
        };
        let m = Flux::new(&cfg, DemoWeights::new(5).var_builder(DType::F32, &dev))?;
        let t = vec![
            Tensor::randn(0f32, 1.0, (1, h * w, 64), &dev)?,
            Tensor::randn(0f32, 1.0, (1, txt, cfg.context_in_dim), &dev)?,
            Tensor::randn(0f32, 1.0, (1, cfg.vec_in_dim), &dev)?,
            Tensor::new(&[0.4f32], &dev)?,
            Tensor::new(&[3.5f32], &dev)?,
        ];
        Ok((m, t))
    }

    /// The largest difference between the single-device velocity and every rank's, with
    /// `strategy` ("ulysses", "ring" or "usp", the last as Ulysses 2 x ring n/2) on `n` ranks.
    fn run_with(
        strategy: &str,
        n: usize,
        heads: usize,
        (txt, h, w): (usize, usize, usize),
    ) -> Result<f32> {
        let (m, t) = setup(heads, txt, h, w)?;
        let pe = m.pos_embed(txt, h, w)?;
        let input = FluxInput {
            img: &t[0],
            txt: &t[1],
            y: &t[2],
            timesteps: &t[3],
            guidance: Some(&t[4]),
            pe: &pe,
        };
        let want = m.forward(&input)?;
        // USP's subgroups: sequence-parallel rank r is Ulysses rank r % 2 of ring member r / 2.
        let uly: Vec<Vec<LocalComm>> = (0..n / 2).map(|_| LocalComm::group(2)).collect();
        let ring: Vec<Vec<LocalComm>> = (0..2).map(|_| LocalComm::group(n / 2)).collect();
        let outs = run_local(n, |rank, comm| {
            let comm: Arc<dyn Communicator> = Arc::new(comm);
            let attn: Arc<dyn crate::model::attention::Attention> = match strategy {
                "ring" => Arc::new(RingAttention::new(comm.clone())),
                "usp" => Arc::new(UspAttention::new(
                    Arc::new(uly[rank / 2][rank % 2].clone()),
                    Arc::new(ring[rank % 2][rank / 2].clone()),
                )),
                _ => Arc::new(UlyssesAttention::new(comm.clone())),
            };
            replica(&m, comm, attn).forward(&input)
        })?;
        let mut worst = 0f32;
        for o in outs {
            assert_eq!(o.dims(), want.dims());
            worst = worst.max((o - &want)?.abs()?.max_all()?.to_scalar::<f32>()?);
        }
        Ok(worst)
    }

    fn run(strategy: &str, n: usize) -> Result<f32> {
        run_with(strategy, n, 4, (8, 8, 8))
    }

    #[test]
    fn ulysses_transformer_step_matches_one_device() -> Result<()> {
        for n in [2, 4] {
            let d = run("ulysses", n)?;
            assert!(d < 1e-4, "ulysses {n}: {d}");
        }
        Ok(())
    }

    #[test]
    fn ring_transformer_step_matches_one_device() -> Result<()> {
        for n in [2, 4] {
            let d = run("ring", n)?;
            assert!(d < 1e-4, "ring {n}: {d}");
        }
        Ok(())
    }

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

    #[test]
    fn uneven_sequences_match_one_device_in_every_mode() -> Result<()> {
        // 12 heads: Ulysses 2, 3 and 4 all divide them.
        for n in [2, 3, 4] {
            // 7 text tokens and a 5 x 7 image (35): neither divides by 2, 3 or 4.
            for strategy in ["ulysses", "ring"] {
                let d = run_with(strategy, n, 12, (7, 5, 7))?;
                assert!(d < 1e-4, "{strategy} {n}: {d}");
            }
        }
        let d = run_with("usp", 4, 12, (7, 5, 7))?;
        assert!(d < 1e-4, "usp 2x2: {d}");
        Ok(())
    }

    #[test]
    fn more_ranks_than_tokens_still_match_one_device() -> Result<()> {
        // 2 text and 3 image tokens over 4 ranks: rank 3 holds nothing but padding, whose keys
        // every strategy must skip (ring: a whole block of padding).
        for strategy in ["ulysses", "ring", "usp"] {
            let d = run_with(strategy, 4, 4, (2, 1, 3))?;
            assert!(d < 1e-4, "{strategy}: {d}");
        }
        Ok(())
    }
}
