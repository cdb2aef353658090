//! FLUX.2's autoencoder as klein decodes with it: FLUX.1's decoder at 32 latent channels (the
//! same convolution widths, so the split decode carries over), a 1x1 post-quant convolution
//! before it, and batch-norm statistics over the 2x2-patched latent (128 channels) that the
//! transformer's latent is normalised by. [`KleinVae::decode`] undoes that normalisation and
//! decodes; as a [`BandDecoder`] it decodes in row bands over parallel workers, as FLUX.1's does.
//!
//! Names are Black Forest Labs' (`decoder.post_quant_conv.weight`, `bn.running_mean`,
//! `decoder.up.0.block.0.conv1.weight`, ...); [`super::keys::KleinVaeDiffusersMap`] finds them in
//! a diffusers `AutoencoderKLFlux2` file. The encoder is not loaded (text-to-image needs only the
//! decoder).

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use crate::model::family::{BandDecoder, LatentCodec, LatentSpec};
use crate::model::vae::{Conv2d, Decoder, VaeConfig};

/// klein's latent: 32 channels, 2x2 patches into 128-channel tokens, 8 pixels a latent pixel.
pub const LATENT: LatentSpec = LatentSpec {
    channels: 32,
    patch: 2,
    downscale: 8,
};

/// The batch norm's epsilon in FLUX.2's autoencoder config (`batch_norm_eps`).
pub const BATCH_NORM_EPS: f64 = 1e-4;

/// FLUX.2's autoencoder config: FLUX.1's widths at 32 latent channels, no shift or scale (the
/// batch-norm statistics normalise instead).
pub fn vae_config() -> VaeConfig {
    VaeConfig {
        z_channels: LATENT.channels,
        scaling_factor: 1.0,
        shift_factor: 0.0,
        ..VaeConfig::flux()
    }
}

/// A small autoencoder of the same structure (`random:klein-tiny`, the reference fixtures):
/// widths 16, 16, 32, 32, one ResNet block a level, 8 groups.
pub fn tiny_vae_config() -> VaeConfig {
    VaeConfig {
        ch: 16,
        ch_mult: vec![1, 1, 2, 2],
        num_res_blocks: 1,
        norm_groups: 8,
        ..vae_config()
    }
}

/// The decoding half of FLUX.2's autoencoder.
#[derive(Debug, Clone)]
pub struct KleinVae {
    cfg: VaeConfig,
    post_quant_conv: Conv2d,
    decoder: Decoder,
    /// Batch-norm mean and standard deviation (`sqrt(var + eps)`), (128,) each.
    bn_mean: Tensor,
    bn_std: Tensor,
    dtype: DType,
}

impl KleinVae {
    /// Load from `vb` at the root of Black Forest Labs' names, the statistics included.
    pub fn new(cfg: &VaeConfig, vb: VarBuilder, bn_eps: f64) -> Result<Self> {
        let n = LATENT.token_channels();
        let mean = vb.get(n, "bn.running_mean")?;
        let var = vb.get(n, "bn.running_var")?;
        let std = (var.to_dtype(DType::F32)? + bn_eps)?.sqrt()?;
        Self::with_stats(cfg, vb, mean, std)
    }

    /// Load the convolutions from `vb` with statistics of mean 0 and deviation 1 (made-up
    /// weights: `random:klein-*`, whose generators know nothing of running variances).
    pub fn new_unnormalised(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let n = LATENT.token_channels();
        let dev = vb.device().clone();
        let mean = Tensor::zeros(n, DType::F32, &dev)?;
        let std = Tensor::ones(n, DType::F32, &dev)?;
        Self::with_stats(cfg, vb, mean, std)
    }

    fn with_stats(cfg: &VaeConfig, vb: VarBuilder, mean: Tensor, std: Tensor) -> Result<Self> {
        if cfg.z_channels != LATENT.channels {
            candle_core::bail!(
                "FLUX.2's autoencoder has {} latent channels, the config says {}",
                LATENT.channels,
                cfg.z_channels
            )
        }
        let z = cfg.z_channels;
        let post_quant_conv = Conv2d::new(z, z, 1, 1, 0, vb.pp("decoder.post_quant_conv"))?;
        let decoder = Decoder::new(cfg, vb.pp("decoder"))?;
        let dtype = decoder.conv_in.weight().dtype();
        Ok(Self {
            cfg: cfg.clone(),
            post_quant_conv,
            decoder,
            bn_mean: mean.to_dtype(DType::F32)?,
            bn_std: std,
            dtype,
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        self.decoder.conv_in.weight().device()
    }

    /// The latent as the transformer denoises it (B, 32, H, W) -> the latent the decoder takes:
    /// each 2x2-patched channel times its deviation plus its mean (in f32).
    pub fn denormalize(&self, z: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = z.dims4()?;
        if c != LATENT.channels {
            candle_core::bail!(
                "FLUX.2's autoencoder decodes {}-channel latents, got shape {:?}",
                LATENT.channels,
                z.dims()
            )
        }
        let tokens = LATENT.pack(&z.to_dtype(DType::F32)?)?;
        let tokens = tokens
            .broadcast_mul(&self.bn_std)?
            .broadcast_add(&self.bn_mean)?;
        LATENT.unpack(&tokens, h, w)
    }

    /// A latent (B, 32, H, W) as the transformer denoises it, to pixels (B, 3, 8H, 8W) in about
    /// [-1, 1] (not clamped), in the weights' dtype.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        self.decoder.forward(&self.decoder_input(z)?)
    }

    /// The latent as the transformer denoises it (B, 32, H, W) -> the decoder's input: the
    /// statistics undone ([`KleinVae::denormalize`]), then the post-quant convolution, in the
    /// weights' dtype.
    pub fn decoder_input(&self, z: &Tensor) -> Result<Tensor> {
        let z = self.denormalize(z)?.to_dtype(self.dtype)?;
        self.post_quant_conv.forward(&z)
    }
}

impl LatentCodec for KleinVae {
    fn latent_spec(&self) -> LatentSpec {
        LATENT
    }
    fn decode_latent(&self, z: &Tensor) -> Result<Tensor> {
        self.decode(z)
    }
    fn device(&self) -> &Device {
        KleinVae::device(self)
    }
    fn dtype(&self) -> DType {
        KleinVae::dtype(self)
    }
    fn band_decoder(&self) -> Option<&dyn BandDecoder> {
        Some(self)
    }
}

/// FLUX.1's decoder after the statistics and the post-quant convolution: the row-band decode
/// carries over.
impl BandDecoder for KleinVae {
    fn decoder_input(&self, z: &Tensor) -> Result<Tensor> {
        KleinVae::decoder_input(self, z)
    }
    fn decoder(&self) -> &Decoder {
        KleinVae::decoder(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::demo_weights::DemoWeights;

    #[test]
    fn denormalizes_patched_channels() -> Result<()> {
        let dev = Device::Cpu;
        let vb = DemoWeights::new(1).var_builder(DType::F32, &dev);
        let mut vae = KleinVae::new_unnormalised(&tiny_vae_config(), vb)?;
        // Channel k of the patched latent: mean k, deviation 2.
        vae.bn_mean = Tensor::arange(0f32, 128.0, &dev)?;
        vae.bn_std = Tensor::full(2f32, 128, &dev)?;
        let z = Tensor::zeros((1, 32, 4, 4), DType::F32, &dev)?;
        let d = vae.denormalize(&z)?;
        // Latent channel c, pixel (dy, dx) of its patch, is patched channel 4c + 2dy + dx.
        let v: Vec<Vec<f32>> = d.get(0)?.get(3)?.to_vec2()?;
        assert_eq!(v[0][..2], [12.0, 13.0]);
        assert_eq!(v[1][..2], [14.0, 15.0]);
        assert_eq!(vae.decode(&z)?.dims(), &[1, 3, 32, 32]);
        Ok(())
    }
}
