//! Parallel autoencoder decode: the latent split into row bands, one per worker.
//!
//! Every 3x3 convolution needs one row beyond each edge of the band: neighbours trade their edge
//! rows (halo exchange) and the convolution runs without row padding. GroupNorm stays exact by
//! all-reducing each band's per-group sums and sums of squares, and dividing by the whole image's
//! count. The middle block's attention gathers every band's keys and values; each worker attends
//! for its own positions. Upsampling and 1x1 convolutions are local. The result equals the
//! single-worker decode.
//!
//! Rows that do not divide by the worker count give unequal bands: the first `rows % n` workers
//! take one row more ([`band`]). Upsampling doubles every band, so the split stays consistent;
//! where a collective needs equal pieces (the all-gathers of the attention's keys and values and
//! of the image), each band is padded with zero rows to the longest and the padding cut out of
//! what arrives.

use candle_core::{Result, Tensor};

use super::comm::Communicator;
use crate::model::family::BandDecoder;
use crate::model::vae::{AttnBlock, Conv2d, Decoder, GroupNorm, GroupStats, ResnetBlock};

/// This worker's share of the latent's `rows` rows: (first row, count). The first `rows % n`
/// workers take one row more than the others; every worker needs at least one row.
pub fn band(rows: usize, n: usize, rank: usize) -> Result<(usize, usize)> {
    if rank >= n {
        candle_core::bail!("band decode: worker {rank} of {n}");
    }
    if rows < n {
        candle_core::bail!(
            "the latent's {rows} rows are fewer than the {n} workers (every band needs a row)"
        );
    }
    let (base, extra) = (rows / n, rows % n);
    Ok((
        rank * base + rank.min(extra),
        base + usize::from(rank < extra),
    ))
}

/// The bands of one decode: the communicator and the whole image's rows at the current
/// resolution (every band, and this total, doubles at each upsampling).
#[derive(Clone, Copy)]
struct Bands<'a> {
    comm: &'a dyn Communicator,
    /// The whole latent's rows.
    latent_rows: usize,
    /// Upsampling so far (1, 2, 4, ...).
    scale: usize,
}

impl Bands<'_> {
    /// The whole image's rows at the current resolution.
    fn rows(&self) -> usize {
        self.latent_rows * self.scale
    }

    /// Every worker's band height at the current resolution, in rank order.
    fn heights(&self) -> Result<Vec<usize>> {
        (0..self.comm.size())
            .map(|r| Ok(band(self.latent_rows, self.comm.size(), r)?.1 * self.scale))
            .collect()
    }

    fn upsampled(self) -> Self {
        Self {
            scale: self.scale * 2,
            ..self
        }
    }
}

/// Every worker's `t` concatenated along `dim` in rank order, where worker j's has `lens[j]` rows
/// there. Unequal pieces are padded with zeros to the longest for the all-gather (collectives
/// trade equal pieces) and cut back after it.
fn all_gather_uneven(
    comm: &dyn Communicator,
    t: &Tensor,
    dim: usize,
    lens: &[usize],
) -> Result<Tensor> {
    let longest = lens.iter().copied().max().unwrap_or(0);
    if lens.iter().all(|&l| l == longest) {
        return comm.all_gather(t, dim);
    }
    let own = t.dim(dim)?;
    if lens.get(comm.rank()) != Some(&own) {
        candle_core::bail!(
            "band decode: worker {} holds {own} rows along dim {dim}, expected {:?}",
            comm.rank(),
            lens.get(comm.rank())
        );
    }
    let padded = if own < longest {
        t.pad_with_zeros(dim, 0, longest - own)?
    } else {
        t.clone()
    };
    let all = comm.all_gather(&padded, dim)?;
    let parts = lens
        .iter()
        .enumerate()
        .map(|(j, &l)| all.narrow(dim, j * longest, l))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, dim)
}

/// A 3x3 convolution (stride 1, padding 1) over a row band: edge rows come from the neighbours,
/// zeros beyond the image.
fn conv3x3(conv: &Conv2d, x: &Tensor, comm: &dyn Communicator) -> Result<Tensor> {
    if conv.kernel_size() != 3 || conv.stride() != 1 || conv.padding() != 1 {
        return conv.forward(x);
    }
    let (n, r) = (comm.size(), comm.rank());
    let (b, c, h, w) = x.dims4()?;
    let top_row = x.narrow(2, 0, 1)?;
    let bottom_row = x.narrow(2, h - 1, 1)?;
    // Edge rows to the neighbours and theirs back, as one exchange.
    let (mut sends, mut from) = (Vec::new(), Vec::new());
    if r > 0 {
        sends.push((r - 1, &top_row));
        from.push(r - 1);
    }
    if r + 1 < n {
        sends.push((r + 1, &bottom_row));
        from.push(r + 1);
    }
    let mut got = comm.exchange(&sends, &from)?.into_iter();
    let zeros = Tensor::zeros((b, c, 1, w), x.dtype(), x.device())?;
    let lost = || candle_core::Error::Msg("halo exchange lost a row".into());
    let above = if r > 0 {
        got.next().ok_or_else(lost)?
    } else {
        zeros.clone()
    };
    let below = if r + 1 < n {
        got.next().ok_or_else(lost)?
    } else {
        zeros
    };
    let padded = Tensor::cat(&[&above, x, &below], 2)?.pad_with_zeros(3, 1, 1)?;
    conv.forward_valid(&padded)
}

/// GroupNorm (then swish if asked) with statistics over every band: summed sums and sums of
/// squares, divided by the whole image's count (bands may differ in height).
fn group_norm(norm: &GroupNorm, x: &Tensor, swish: bool, bands: Bands) -> Result<Tensor> {
    let h = x.dim(2)?;
    if h == 0 {
        candle_core::bail!("band decode: an empty band");
    }
    let local = norm.stats(x)?;
    let total = bands.comm.all_reduce_sum(&local.packed()?)?;
    // `local.count` is channels-per-group x h x w: per row, times every band's rows.
    let stats = GroupStats::from_packed(&total, local.count / h * bands.rows())?;
    norm.normalize_act(x, &stats, swish)
}

fn resnet(block: &ResnetBlock, x: &Tensor, bands: Bands) -> Result<Tensor> {
    let h = group_norm(&block.norm1, x, true, bands)?;
    let h = conv3x3(&block.conv1, &h, bands.comm)?;
    let h = group_norm(&block.norm2, &h, true, bands)?;
    let h = conv3x3(&block.conv2, &h, bands.comm)?;
    block.shortcut(x)? + h
}

fn attention(attn: &AttnBlock, x: &Tensor, bands: Bands) -> Result<Tensor> {
    let (b, _, h, w) = x.dims4()?;
    let normed = group_norm(&attn.norm, x, false, bands)?;
    let (q, k, v) = attn.qkv(&normed)?;
    // Keys and values of every band, in band order (tokens are row-major, so bands concatenate).
    let tokens: Vec<usize> = bands.heights()?.iter().map(|r| r * w).collect();
    let k = all_gather_uneven(bands.comm, &k, 1, &tokens)?;
    let v = all_gather_uneven(bands.comm, &v, 1, &tokens)?;
    let rows = crate::model::vae::attention_query_rows(b, k.dim(1)?, k.device());
    let attended = crate::model::vae::attention(&q, &k, &v, rows)?;
    x + attn.project_out(&attended, h, w)?
}

/// Decode this worker's band of the decoder's input into its band of the image: `h` is
/// (B, z, r, W), rows [`band`] gives this worker of the input's `rows`, as
/// [`BandDecoder::decoder_input`] makes it; the result (B, 3, 8·r, 8·W). Every worker of `comm`
/// calls it with its own band.
pub fn decode_band(
    decoder: &Decoder,
    h: &Tensor,
    rows: usize,
    comm: &dyn Communicator,
) -> Result<Tensor> {
    let (_, own) = band(rows, comm.size(), comm.rank())?;
    if h.dim(2)? != own {
        candle_core::bail!(
            "band decode: worker {} of {} was given {} latent rows, its band of {rows} has {own}",
            comm.rank(),
            comm.size(),
            h.dim(2)?
        );
    }
    let mut bands = Bands {
        comm,
        latent_rows: rows,
        scale: 1,
    };
    let d = decoder;
    let h = conv3x3(&d.conv_in, h, comm)?;
    let h = resnet(&d.mid_block_1, &h, bands)?;
    let h = attention(&d.mid_attn_1, &h, bands)?;
    let mut h = resnet(&d.mid_block_2, &h, bands)?;
    for level in d.up.iter().rev() {
        for block in &level.blocks {
            h = resnet(block, &h, bands)?;
        }
        if let Some(up) = &level.upsample {
            h = conv3x3(&up.conv, &crate::model::vae::Upsample::upsample(&h)?, comm)?;
            bands = bands.upsampled();
        }
    }
    let h = group_norm(&d.norm_out, &h, true, bands)?;
    conv3x3(&d.conv_out, &h, comm)
}

/// Decode the whole latent (as the transformer denoises it) on `comm`'s workers: each
/// prepares the decoder's input ([`BandDecoder::decoder_input`]), decodes its band, and the
/// image is gathered.
pub fn decode<D: BandDecoder + ?Sized>(
    ae: &D,
    z: &Tensor,
    comm: &dyn Communicator,
) -> Result<Tensor> {
    let rows = z.dim(2)?;
    let (start, len) = band(rows, comm.size(), comm.rank())?;
    let input = ae.decoder_input(z)?;
    let part = decode_band(ae.decoder(), &input.narrow(2, start, len)?, rows, comm)?;
    // Image rows per latent row (8 for FLUX's autoencoders).
    let per_row = part.dim(2)? / len;
    let heights = (0..comm.size())
        .map(|r| Ok(band(rows, comm.size(), r)?.1 * per_row))
        .collect::<Result<Vec<_>>>()?;
    all_gather_uneven(comm, &part, 2, &heights)
}

/// Decode `z` across workers that each hold their own autoencoder replica (`replicas[r]` on
/// worker r's device, identical weights), exchanging through `comms` (one per worker, in rank
/// order; [`crate::parallel::comm::LocalComm`]s on the CPU, NCCL communicators on GPUs): every
/// worker decodes its band, and the first worker's copy of the gathered image is returned. One
/// worker, or a latent with fewer rows than workers, decodes whole on the first.
pub fn decode_across<D: BandDecoder + ?Sized>(
    replicas: &[&D],
    comms: &[&dyn Communicator],
    z: &Tensor,
) -> Result<Tensor> {
    if replicas.len() != comms.len() || replicas.is_empty() {
        candle_core::bail!(
            "{} autoencoder replicas for {} workers",
            replicas.len(),
            comms.len()
        );
    }
    if comms.len() == 1 || z.dim(2)? < comms.len() {
        return replicas[0].decode_latent(&z.to_device(replicas[0].device())?);
    }
    // The latent must be written before the workers' threads (each on a stream of its own)
    // read it.
    z.device().synchronize()?;
    let mut images = crate::parallel::comm::run_each(comms.to_vec(), |rank, comm| {
        let ae = replicas[rank];
        let z = z.to_device(ae.device())?;
        let image = decode(ae, &z, comm);
        // Each thread queues on a stream of its own: the image must be written before another
        // thread reads it (and on errors, before the caller frees the latent).
        ae.device().synchronize()?;
        image
    })?;
    Ok(images.swap_remove(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::demo_weights::DemoWeights;
    use crate::model::rng::SplitMix64;
    use crate::model::vae::{AutoEncoder, VaeConfig};
    use crate::parallel::comm::run_local;
    use candle_core::{DType, Device};

    /// The largest difference between `ae`'s whole decode of a random latent of `channels` x
    /// `rows` x 6 and every worker's image from its decode in bands over `workers`.
    fn banded_difference<D: BandDecoder>(
        ae: &D,
        channels: usize,
        rows: usize,
        workers: usize,
    ) -> Result<f32> {
        let mut rng = SplitMix64::new(3);
        let z = rng.normal_tensor((1, channels, rows, 6), &Device::Cpu)?;
        let want = ae.decode_latent(&z)?;
        let outs = run_local(workers, |_, comm| decode(ae, &z, &comm))?;
        let mut worst = 0f32;
        for o in outs {
            assert_eq!(o.dims(), want.dims());
            worst = worst.max((o - &want)?.abs()?.max_all()?.to_scalar::<f32>()?);
        }
        Ok(worst)
    }

    #[test]
    fn banded_decode_equals_single_worker_decode() -> Result<()> {
        let dev = Device::Cpu;
        let ae = AutoEncoder::new_decoder_only(
            &VaeConfig::tiny(),
            DemoWeights::new(4).var_builder(DType::F32, &dev),
        )?;
        for n in [2, 4] {
            let d = banded_difference(&ae, 16, 8, n)?;
            assert!(d < 1e-4, "{n} workers: max difference {d}");
        }
        Ok(())
    }

    #[test]
    fn bands_split_uneven_rows_with_the_extra_rows_first() -> Result<()> {
        let bands: Vec<(usize, usize)> = (0..4).map(|r| band(10, 4, r)).collect::<Result<_>>()?;
        assert_eq!(bands, vec![(0, 3), (3, 3), (6, 2), (8, 2)]);
        assert_eq!(band(8, 4, 2)?, (4, 2));
        // Fewer rows than workers: a worker would have no band.
        let e = band(3, 4, 0)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("fewer than the 4 workers"), "{e}");
        Ok(())
    }

    #[test]
    fn banded_decode_of_rows_that_do_not_divide_equals_single_worker_decode() -> Result<()> {
        let mut rng = SplitMix64::new(4);
        let dev = Device::Cpu;
        let ae = AutoEncoder::new_decoder_only(
            &VaeConfig::tiny(),
            DemoWeights::new(4).var_builder(DType::F32, &dev),
        )?;
        for (rows, workers) in [(5, 2), (7, 3), (5, 3), (10, 4), (5, 4)] {
            let d = banded_difference(&ae, 16, rows, workers)?;
            assert!(
                d < 1e-4,
                "{rows} rows on {workers} workers: max difference {d}"
            );
        }
        // Fewer latent rows than workers is refused with a reason, not approximated.
        let z = rng.normal_tensor((1, 16, 2, 6), &dev)?;
        assert!(run_local(3, |_, comm| decode(&ae, &z, &comm)).is_err());
        Ok(())
    }

    /// klein's autoencoder (`random:klein-tiny`'s: FLUX.1's decoder at 32 latent channels after
    /// the batch-norm statistics over 2x2 patches and the post-quant convolution) through the
    /// same bands: within 1e-4 of its whole decode (largest difference, as FLUX.1's above), on
    /// 2, 3 and 4 workers, with bands that start on odd latent rows (8 rows over 3: 3, 3, 2;
    /// 10 over 4: 3, 3, 2, 2).
    #[test]
    fn klein_banded_decode_equals_its_whole_decode() -> Result<()> {
        use crate::model::klein::{random_model, RandomKlein};
        let (_, vae) = random_model(RandomKlein::Tiny, DType::F32, &Device::Cpu)?;
        for (rows, workers) in [(8, 2), (8, 3), (8, 4), (10, 4)] {
            let d = banded_difference(&vae, 32, rows, workers)?;
            assert!(
                d < 1e-4,
                "klein, {rows} rows on {workers} workers: max difference {d}"
            );
        }
        Ok(())
    }
}
