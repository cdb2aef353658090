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
//! gathered. When the counts divide, nothing is padded and nothing changes. [`ShardLayout`] lives in
//! [`crate::model::shard`] (the block context carries it), [`Shard`] in [`super::shard`]; both
//! are re-exported here.

use std::sync::Arc;

#[cfg(test)]
use candle_core::{Result, Tensor};

use super::comm::Communicator;
use super::replica::SpReplica;
pub use super::shard::{Shard, ShardLayout};
use crate::model::flux::Flux;

/// A replica of `model` as rank `comm.rank()` of a sequence-parallel group using `attention`
/// (the hooks held by [`SpReplica`], not by the model).
pub fn replica(
    model: &Flux,
    comm: Arc<dyn Communicator>,
    attention: Arc<dyn crate::model::attention::Attention>,
) -> SpReplica {
    SpReplica::new(Arc::new(model.clone()), comm, attention)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::demo_weights::DemoWeights;
    use crate::model::family::Denoiser;
    use crate::model::flux::{FluxConfig, FluxInput};
    use crate::model::rng::SplitMix64;
    use crate::parallel::comm::{run_local, LocalComm};
    use crate::parallel::ring::RingAttention;
    use crate::parallel::ulysses::UlyssesAttention;
    use crate::parallel::usp::UspAttention;
    use candle_core::{DType, Device};

    /// A tiny transformer with `heads` heads of 32 and inputs for `txt` text tokens and an
    /// `h` x `w` grid of image tokens.
    fn setup(heads: usize, txt: usize, h: usize, w: usize) -> Result<(Flux, Vec<Tensor>)> {
        let mut rng = SplitMix64::new(2);
        let dev = Device::Cpu;
        let cfg = FluxConfig {
            num_heads: heads,
            hidden_size: 32 * heads,
            axes_dim: vec![4, 14, 14],
            ..FluxConfig::tiny()
        };
        let m = Flux::new(&cfg, DemoWeights::new(5).var_builder(DType::F32, &dev))?;
        let t = vec![
            rng.normal_tensor((1, h * w, 64), &dev)?,
            rng.normal_tensor((1, txt, cfg.context_in_dim), &dev)?,
            rng.normal_tensor((1, cfg.vec_in_dim), &dev)?,
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
