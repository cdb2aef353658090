//! Parallel autoencoder decode: the latent split into row bands, one per worker.
//!
//! Every 3x3 convolution needs one row beyond each edge of the band: neighbours trade their edge
//! rows (halo exchange) and the convolution runs without row padding. GroupNorm stays exact by
//! all-reducing each band's per-group sums and sums of squares. The middle block's attention
//! gathers every band's keys and values; each worker attends for its own positions. Upsampling
//! and 1x1 convolutions are local. The result equals the single-worker decode.

use candle_core::{Result, Tensor};

use super::comm::Communicator;
use crate::model::vae::{AttnBlock, AutoEncoder, Conv2d, GroupNorm, GroupStats, ResnetBlock};

/// This worker's share of the latent's `rows` rows: (first row, count). Rows must divide evenly.
pub fn band(rows: usize, n: usize, rank: usize) -> Result<(usize, usize)> {
    if rows % n != 0 {
        candle_core::bail!("the latent's {rows} rows do not split evenly over {n} workers");
    }
    Ok((rank * rows / n, rows / n))
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

/// GroupNorm (then swish if asked) with statistics over every band.
fn group_norm(
    norm: &GroupNorm,
    x: &Tensor,
    swish: bool,
    comm: &dyn Communicator,
) -> Result<Tensor> {
    let local = norm.stats(x)?;
    let total = comm.all_reduce_sum(&local.packed()?)?;
    let stats = GroupStats::from_packed(&total, local.count * comm.size())?;
    norm.normalize_act(x, &stats, swish)
}

fn resnet(block: &ResnetBlock, x: &Tensor, comm: &dyn Communicator) -> Result<Tensor> {
    let h = group_norm(&block.norm1, x, true, comm)?;
    let h = conv3x3(&block.conv1, &h, comm)?;
    let h = group_norm(&block.norm2, &h, true, comm)?;
    let h = conv3x3(&block.conv2, &h, comm)?;
    block.shortcut(x)? + h
}

fn attention(attn: &AttnBlock, x: &Tensor, comm: &dyn Communicator) -> Result<Tensor> {
    let (b, _, h, w) = x.dims4()?;
    let normed = group_norm(&attn.norm, x, false, comm)?;
    let (q, k, v) = attn.qkv(&normed)?;
    // Keys and values of every band, in band order (tokens are row-major, so bands concatenate).
    let k = comm.all_gather(&k, 1)?;
    let v = comm.all_gather(&v, 1)?;
    let rows = crate::model::vae::attention_query_rows(b, k.dim(1)?, k.device());
    let attended = crate::model::vae::attention(&q, &k, &v, rows)?;
    x + attn.project_out(&attended, h, w)?
}

/// Decode this worker's band of the scaled latent (B, 16, rows/n, W) into its band of the image
/// (B, 3, 8·rows/n, 8·W). Every worker of `comm` calls it with its own band.
pub fn decode_band(ae: &AutoEncoder, z: &Tensor, comm: &dyn Communicator) -> Result<Tensor> {
    let d = ae.decoder();
    let z = ae.unscale_latent(&z.to_dtype(ae.dtype())?)?;
    let h = conv3x3(&d.conv_in, &z, comm)?;
    let h = resnet(&d.mid_block_1, &h, comm)?;
    let h = attention(&d.mid_attn_1, &h, comm)?;
    let mut h = resnet(&d.mid_block_2, &h, comm)?;
    for level in d.up.iter().rev() {
        for block in &level.blocks {
            h = resnet(block, &h, comm)?;
        }
        if let Some(up) = &level.upsample {
            h = conv3x3(&up.conv, &crate::model::vae::Upsample::upsample(&h)?, comm)?;
        }
    }
    let h = group_norm(&d.norm_out, &h, true, comm)?;
    conv3x3(&d.conv_out, &h, comm)
}

/// Decode the whole latent on `comm`'s workers: each takes its band, the image is gathered.
pub fn decode(ae: &AutoEncoder, z: &Tensor, comm: &dyn Communicator) -> Result<Tensor> {
    let (start, len) = band(z.dim(2)?, comm.size(), comm.rank())?;
    let part = decode_band(ae, &z.narrow(2, start, len)?, comm)?;
    comm.all_gather(&part, 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::demo_weights::DemoWeights;
    use crate::model::vae::VaeConfig;
    use crate::parallel::comm::run_local;
    use candle_core::{DType, Device};

    #[test]
    fn banded_decode_equals_single_worker_decode() -> Result<()> {
        let dev = Device::Cpu;
        let ae = AutoEncoder::new_decoder_only(
            &VaeConfig::tiny(),
            DemoWeights::new(4).var_builder(DType::F32, &dev),
        )?;
        let z = Tensor::randn(0f32, 1.0, (1, 16, 8, 6), &dev)?;
        let want = ae.decode(&z)?;
        for n in [2, 4] {
            let outs = run_local(n, |_, comm| decode(&ae, &z, &comm))?;
            for o in outs {
                assert_eq!(o.dims(), want.dims());
                let d = (o - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(d < 1e-4, "{n} workers: max difference {d}");
            }
        }
        // Rows that do not split evenly are refused, not approximated.
        let z = Tensor::randn(0f32, 1.0, (1, 16, 5, 6), &dev)?;
        assert!(run_local(2, |_, comm| decode(&ae, &z, &comm)).is_err());
        Ok(())
    }
}
