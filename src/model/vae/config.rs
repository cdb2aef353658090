//! The autoencoder's configuration in a diffusers folder: reading `vae/config.json` into a
//! [`VaeConfig`] ([`vae_config_from_diffusers_json`]) and writing one
//! ([`VaeConfig::to_diffusers_json`]).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::VaeConfig;
use crate::error::{Error, Result};
use crate::model::weights::SafetensorsSet;

impl VaeConfig {
    /// This configuration as a diffusers `AutoencoderKL` `config.json` (what
    /// [`vae_config_from_diffusers_json`] reads back).
    pub fn to_diffusers_json(&self) -> serde_json::Value {
        let levels = self.ch_mult.len();
        let block_out: Vec<usize> = self.ch_mult.iter().map(|m| self.ch * m).collect();
        serde_json::json!({
            "_class_name": "AutoencoderKL",
            "act_fn": "silu",
            "block_out_channels": block_out,
            "down_block_types": vec!["DownEncoderBlock2D"; levels],
            "up_block_types": vec!["UpDecoderBlock2D"; levels],
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "latent_channels": self.z_channels,
            "layers_per_block": self.num_res_blocks,
            "norm_num_groups": self.norm_groups,
            "mid_block_add_attention": true,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "use_quant_conv": false,
            "use_post_quant_conv": false,
        })
    }
}

/// The fields of a diffusers `AutoencoderKL` `config.json` that matter here.
#[derive(Deserialize)]
struct DiffusersVaeJson {
    block_out_channels: Option<Vec<usize>>,
    layers_per_block: Option<usize>,
    latent_channels: Option<usize>,
    in_channels: Option<usize>,
    out_channels: Option<usize>,
    norm_num_groups: Option<usize>,
    scaling_factor: Option<f64>,
    shift_factor: Option<f64>,
    act_fn: Option<String>,
    use_quant_conv: Option<bool>,
    use_post_quant_conv: Option<bool>,
    mid_block_add_attention: Option<bool>,
}

/// Read a diffusers `vae/config.json` (an `AutoencoderKL` config) into a [`VaeConfig`].
///
/// `block_out_channels`, `layers_per_block` and `latent_channels` are required; the other fields
/// take diffusers' defaults when absent (3 image channels, 32 groups, scaling 0.18215, no
/// shift). Configurations this autoencoder cannot run (quant convolutions, no middle
/// attention, an activation other than silu) are refused.
pub fn vae_config_from_diffusers_json(path: &Path) -> Result<VaeConfig> {
    let text = crate::files::read_regular_text(path)?;
    vae_config_from_diffusers_str(&text, path)
}

/// [`vae_config_from_diffusers_json`] on the file's text (`path` is used in messages only).
pub fn vae_config_from_diffusers_str(text: &str, path: &Path) -> Result<VaeConfig> {
    let bad = |reason: String| Error::BadConfig {
        path: path.to_path_buf(),
        reason,
    };
    let raw: DiffusersVaeJson = serde_json::from_str(text)
        .map_err(|e| bad(format!("not a diffusers AutoencoderKL config: {e}")))?;
    let required = |field: &str| bad(format!("field `{field}` is missing"));
    let block_out = raw
        .block_out_channels
        .ok_or_else(|| required("block_out_channels"))?;
    let ch = *block_out
        .first()
        .ok_or_else(|| bad("`block_out_channels` is empty".into()))?;
    if ch == 0 {
        return Err(bad("`block_out_channels` holds a zero".into()));
    }
    let mut ch_mult = Vec::with_capacity(block_out.len());
    for &c in &block_out {
        if c % ch != 0 || c == 0 {
            return Err(bad(format!(
                "`block_out_channels` {block_out:?} are not all multiples of the first"
            )));
        }
        ch_mult.push(c / ch);
    }
    if let Some(act) = raw.act_fn.as_deref() {
        if act != "silu" && act != "swish" {
            return Err(bad(format!(
                "activation `{act}` is not supported (only silu)"
            )));
        }
    }
    if raw.use_quant_conv == Some(true) || raw.use_post_quant_conv == Some(true) {
        return Err(bad(
            "uses quant_conv/post_quant_conv, which the FLUX autoencoder does not have".into(),
        ));
    }
    if raw.mid_block_add_attention == Some(false) {
        return Err(bad(
            "has no middle attention block, which the FLUX autoencoder needs".into(),
        ));
    }
    let cfg = VaeConfig {
        in_channels: raw.in_channels.unwrap_or(3),
        out_channels: raw.out_channels.unwrap_or(3),
        ch,
        ch_mult,
        num_res_blocks: raw
            .layers_per_block
            .ok_or_else(|| required("layers_per_block"))?,
        z_channels: raw
            .latent_channels
            .ok_or_else(|| required("latent_channels"))?,
        norm_groups: raw.norm_num_groups.unwrap_or(32),
        scaling_factor: raw.scaling_factor.unwrap_or(0.18215),
        shift_factor: raw.shift_factor.unwrap_or(0.0),
    };
    cfg.validate().map_err(bad)?;
    Ok(cfg)
}

/// Infer the autoencoder config of a BFL-layout `ae.safetensors` from tensor shapes (the file
/// carries no config). GroupNorm's group count is not stored in weights: Parallax uses 32 (FLUX's)
/// when the base width is at least 64, else half the base width (the tiny demo/test models).
pub fn infer_vae_config(set: &SafetensorsSet) -> Result<VaeConfig> {
    let shape = |name: &str| -> Result<Vec<usize>> {
        set.meta(name)
            .map(|m| m.shape.clone())
            .ok_or_else(|| Error::MissingTensor {
                tensor: name.to_string(),
                location: set.label().to_string(),
            })
    };
    let conv_in = shape("decoder.conv_in.weight")?;
    let conv_out = shape("decoder.conv_out.weight")?;
    if conv_in.len() != 4 || conv_out.len() != 4 {
        return Err(Error::UnknownLayout {
            path: PathBuf::from(set.label()),
            reason: "decoder convolutions are not 4-dimensional".into(),
        });
    }
    let ch = conv_out[1];
    let mut ch_mult = Vec::new();
    while let Some(m) = set.meta(&format!(
        "decoder.up.{}.block.0.conv2.weight",
        ch_mult.len()
    )) {
        ch_mult.push(m.shape.first().copied().unwrap_or(0) / ch.max(1));
    }
    let blocks = (0..)
        .take_while(|j| set.contains(&format!("decoder.up.0.block.{j}.conv1.weight")))
        .count();
    let flux = VaeConfig::flux();
    let cfg = VaeConfig {
        in_channels: set
            .meta("encoder.conv_in.weight")
            .and_then(|m| m.shape.get(1).copied())
            .unwrap_or(flux.in_channels),
        out_channels: conv_out[0],
        ch,
        ch_mult,
        num_res_blocks: blocks.saturating_sub(1),
        z_channels: conv_in[1],
        norm_groups: if ch >= 64 { 32 } else { (ch / 2).max(1) },
        ..flux
    };
    cfg.validate().map_err(|reason| Error::UnknownLayout {
        path: PathBuf::from(set.label()),
        reason: format!("cannot infer the autoencoder config: {reason}"),
    })?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffusers_config_parsing() {
        let p = Path::new("vae/config.json");
        let flux = VaeConfig::flux().to_diffusers_json().to_string();
        assert_eq!(
            vae_config_from_diffusers_str(&flux, p).ok(),
            Some(VaeConfig::flux())
        );
        for bad in [
            "{",
            "[]",
            r#"{"layers_per_block": 2, "latent_channels": 16}"#,
            r#"{"block_out_channels": [128, 200], "layers_per_block": 2, "latent_channels": 16}"#,
            r#"{"block_out_channels": [128], "layers_per_block": "two", "latent_channels": 16}"#,
            r#"{"block_out_channels": [128], "layers_per_block": 2, "latent_channels": 16, "use_quant_conv": true}"#,
        ] {
            match vae_config_from_diffusers_str(bad, p) {
                Err(Error::BadConfig { path, .. }) => assert_eq!(path, p),
                other => panic!("{bad}: expected BadConfig, got {other:?}"),
            }
        }
    }
}
