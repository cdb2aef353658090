//! Sequence-parallel transformer steps: one FLUX forward spread over a sequence-parallel group.
//!
//! Every rank holds an equal shard of the text tokens and of the image tokens, so its local
//! sequence is `[text shard ; image shard]`. Token-wise work (projections, norms, modulation,
//! MLPs) stays local; attention goes through the group's strategy (Ulysses or Ring), which sees
//! the shards of all ranks. The joint sequence the attention sees is a permutation of the
//! single-device one (text 0, image 0, text 1, image 1, ...); since each token carries its own
//! RoPE position and attention is not causal, the result is the same. Each rank's velocity shard
//! is gathered at the end.

use std::sync::Arc;

use candle_core::{Result, Tensor};

use super::comm::Communicator;
use crate::model::flux::{Flux, FluxInput, PosEmbed};

/// This rank's share of `len` tokens split `n` ways: (start, length). Lengths must divide.
fn shard(len: usize, n: usize, rank: usize, what: &str) -> Result<(usize, usize)> {
    if len % n != 0 {
        candle_core::bail!(
            "{what}: {len} tokens do not split evenly over {n} ranks (pad the sequence or pick another degree)"
        );
    }
    let s = len / n;
    Ok((rank * s, s))
}

/// This rank's share of a step's inputs: its text and image tokens and their RoPE rows.
#[derive(Debug, Clone)]
pub struct Shard {
    pub txt: Tensor,
    pub img: Tensor,
    pub pe: PosEmbed,
}

impl Shard {
    /// Rank `rank` of `n`: an equal slice of the text tokens and one of the image tokens.
    pub fn new(input: &FluxInput, n: usize, rank: usize) -> Result<Self> {
        let txt_len = input.txt.dim(1)?;
        let img_len = input.img.dim(1)?;
        let (ts, tl) = shard(txt_len, n, rank, "text")?;
        let (is, il) = shard(img_len, n, rank, "image")?;
        let rows = |t: &Tensor| -> Result<Tensor> {
            Tensor::cat(&[t.narrow(0, ts, tl)?, t.narrow(0, txt_len + is, il)?], 0)
        };
        Ok(Self {
            txt: input.txt.narrow(1, ts, tl)?,
            img: input.img.narrow(1, is, il)?,
            pe: PosEmbed {
                cos: rows(&input.pe.cos)?,
                sin: rows(&input.pe.sin)?,
            },
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
    use crate::parallel::comm::run_local;
    use crate::parallel::ring::RingAttention;
    use crate::parallel::ulysses::UlyssesAttention;
    use candle_core::{DType, Device};

    fn setup() -> Result<(Flux, Vec<Tensor>)> {
        let dev = Device::Cpu;
        let cfg = FluxConfig {
            num_heads: 4,
            hidden_size: 128,
            axes_dim: vec![4, 14, 14],
            ..FluxConfig::tiny()
        };
        let m = Flux::new(&cfg, DemoWeights::new(5).var_builder(DType::F32, &dev))?;
        let t = vec![
            Tensor::randn(0f32, 1.0, (1, 64, 64), &dev)?,
            Tensor::randn(0f32, 1.0, (1, 8, cfg.context_in_dim), &dev)?,
            Tensor::randn(0f32, 1.0, (1, cfg.vec_in_dim), &dev)?,
            Tensor::new(&[0.4f32], &dev)?,
            Tensor::new(&[3.5f32], &dev)?,
        ];
        Ok((m, t))
    }

    fn run(strategy: &str, n: usize) -> Result<f32> {
        let (m, t) = setup()?;
        let pe = m.pos_embed(8, 8, 8)?;
        let input = FluxInput {
            img: &t[0],
            txt: &t[1],
            y: &t[2],
            timesteps: &t[3],
            guidance: Some(&t[4]),
            pe: &pe,
        };
        let want = m.forward(&input)?;
        let outs = run_local(n, |_, comm| {
            let comm: Arc<dyn Communicator> = Arc::new(comm);
            let attn: Arc<dyn crate::model::attention::Attention> = match strategy {
                "ring" => Arc::new(RingAttention::new(comm.clone())),
                _ => Arc::new(UlyssesAttention::new(comm.clone())),
            };
            replica(&m, comm, attn).forward(&input)
        })?;
        let mut worst = 0f32;
        for o in outs {
            worst = worst.max((o - &want)?.abs()?.max_all()?.to_scalar::<f32>()?);
        }
        Ok(worst)
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
    fn uneven_sequences_are_refused_with_a_reason() -> Result<()> {
        let (m, t) = setup()?;
        let img = t[0].narrow(1, 0, 63)?;
        let pe = m.pos_embed(8, 9, 7)?;
        let input = FluxInput {
            img: &img,
            txt: &t[1],
            y: &t[2],
            timesteps: &t[3],
            guidance: Some(&t[4]),
            pe: &pe,
        };
        let r = run_local(2, |_, comm| {
            let comm: Arc<dyn Communicator> = Arc::new(comm);
            let attn = Arc::new(UlyssesAttention::new(comm.clone()));
            replica(&m, comm, attn).forward(&input)
        });
        match r {
            Err(e) => assert!(e.to_string().contains("do not split evenly"), "{e}"),
            Ok(_) => panic!("63 image tokens over 2 ranks should be refused"),
        }
        Ok(())
    }
}
