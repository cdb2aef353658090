//! Where the autoencoder's tensors live in a diffusers `AutoencoderKL` file: [`VaeDiffusersMap`]
//! maps each canonical (Black Forest Labs) name to its diffusers name.

use super::VaeConfig;
use crate::model::weights::{KeyMap, Source};

/// Where each canonical (BFL) autoencoder tensor lives in a diffusers `AutoencoderKL` file.
///
/// Diffusers numbers the decoder's `up_blocks` in run order (coarsest first), the reverse of
/// BFL's `up.{level}`, and stores the attention projections as linear layers ([C, C]) where BFL
/// has 1x1 convolutions ([C, C, 1, 1]).
#[derive(Debug, Clone, PartialEq)]
pub struct VaeDiffusersMap {
    pub cfg: VaeConfig,
}

impl VaeDiffusersMap {
    pub fn new(cfg: VaeConfig) -> Self {
        Self { cfg }
    }
}

/// `weight` or `bias`.
fn param_leaf(s: &str) -> Option<&str> {
    matches!(s, "weight" | "bias").then_some(s)
}

/// The name of a ResNet block's part (`norm1.weight`, `nin_shortcut.bias`, ...) in diffusers.
fn diffusers_resnet_part(rest: &str) -> Option<String> {
    let (layer, leaf) = rest.split_once('.')?;
    let leaf = param_leaf(leaf)?;
    let layer = match layer {
        "norm1" | "conv1" | "norm2" | "conv2" => layer,
        "nin_shortcut" => "conv_shortcut",
        _ => return None,
    };
    Some(format!("{layer}.{leaf}"))
}

/// Split `"{n}.{rest}"`.
fn split_index(s: &str) -> Option<(usize, &str)> {
    let (n, rest) = s.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

impl VaeDiffusersMap {
    /// The diffusers name of a canonical name below `encoder.`/`decoder.` (`name` without that
    /// part), or `None`.
    fn map_part(&self, is_decoder: bool, name: &str) -> Option<Source> {
        let levels = self.cfg.ch_mult.len();
        let plain = |s: String| Some(Source::Tensor(s));
        if let Some(leaf) = name.strip_prefix("conv_in.").and_then(param_leaf) {
            return plain(format!("conv_in.{leaf}"));
        }
        if let Some(leaf) = name.strip_prefix("conv_out.").and_then(param_leaf) {
            return plain(format!("conv_out.{leaf}"));
        }
        if let Some(leaf) = name.strip_prefix("norm_out.").and_then(param_leaf) {
            return plain(format!("conv_norm_out.{leaf}"));
        }
        if let Some(mid) = name.strip_prefix("mid.") {
            if let Some(rest) = mid.strip_prefix("block_1.") {
                return plain(format!(
                    "mid_block.resnets.0.{}",
                    diffusers_resnet_part(rest)?
                ));
            }
            if let Some(rest) = mid.strip_prefix("block_2.") {
                return plain(format!(
                    "mid_block.resnets.1.{}",
                    diffusers_resnet_part(rest)?
                ));
            }
            let rest = mid.strip_prefix("attn_1.")?;
            let (layer, leaf) = rest.split_once('.')?;
            let leaf = param_leaf(leaf)?;
            let base = "mid_block.attentions.0";
            let target = match layer {
                "norm" => return plain(format!("{base}.group_norm.{leaf}")),
                "q" => "to_q",
                "k" => "to_k",
                "v" => "to_v",
                "proj_out" => "to_out.0",
                _ => return None,
            };
            let stored = format!("{base}.{target}.{leaf}");
            return Some(if leaf == "weight" {
                Source::Squeezed(stored)
            } else {
                Source::Tensor(stored)
            });
        }
        if is_decoder {
            let (level, rest) = split_index(name.strip_prefix("up.")?)?;
            if level >= levels {
                return None;
            }
            let block = levels - 1 - level;
            if let Some(rest) = rest.strip_prefix("block.") {
                let (j, rest) = split_index(rest)?;
                if j > self.cfg.num_res_blocks {
                    return None;
                }
                return plain(format!(
                    "up_blocks.{block}.resnets.{j}.{}",
                    diffusers_resnet_part(rest)?
                ));
            }
            let leaf = rest.strip_prefix("upsample.conv.").and_then(param_leaf)?;
            if level == 0 {
                return None;
            }
            plain(format!("up_blocks.{block}.upsamplers.0.conv.{leaf}"))
        } else {
            let (level, rest) = split_index(name.strip_prefix("down.")?)?;
            if level >= levels {
                return None;
            }
            if let Some(rest) = rest.strip_prefix("block.") {
                let (j, rest) = split_index(rest)?;
                if j >= self.cfg.num_res_blocks {
                    return None;
                }
                return plain(format!(
                    "down_blocks.{level}.resnets.{j}.{}",
                    diffusers_resnet_part(rest)?
                ));
            }
            let leaf = rest.strip_prefix("downsample.conv.").and_then(param_leaf)?;
            if level + 1 == levels {
                return None;
            }
            plain(format!("down_blocks.{level}.downsamplers.0.conv.{leaf}"))
        }
    }
}

impl KeyMap for VaeDiffusersMap {
    fn source(&self, canonical: &str) -> Option<Source> {
        let (is_decoder, rest, prefix) = if let Some(rest) = canonical.strip_prefix("decoder.") {
            (true, rest, "decoder.")
        } else if let Some(rest) = canonical.strip_prefix("encoder.") {
            (false, rest, "encoder.")
        } else {
            return None;
        };
        Some(match self.map_part(is_decoder, rest)? {
            Source::Tensor(n) => Source::Tensor(format!("{prefix}{n}")),
            Source::Squeezed(n) => Source::Squeezed(format!("{prefix}{n}")),
            other => other,
        })
    }

    fn layout_name(&self) -> &str {
        "diffusers"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffusers_names() {
        let map = VaeDiffusersMap::new(VaeConfig::flux());
        let t = |s: &str| Some(Source::Tensor(s.to_string()));
        assert_eq!(
            map.source("decoder.up.3.block.0.conv1.weight"),
            t("decoder.up_blocks.0.resnets.0.conv1.weight")
        );
        assert_eq!(
            map.source("decoder.up.0.block.2.nin_shortcut.bias"),
            t("decoder.up_blocks.3.resnets.2.conv_shortcut.bias")
        );
        assert_eq!(
            map.source("decoder.up.1.upsample.conv.weight"),
            t("decoder.up_blocks.2.upsamplers.0.conv.weight")
        );
        assert_eq!(map.source("decoder.up.0.upsample.conv.weight"), None);
        assert_eq!(map.source("decoder.up.4.block.0.conv1.weight"), None);
        assert_eq!(
            map.source("encoder.down.2.downsample.conv.bias"),
            t("encoder.down_blocks.2.downsamplers.0.conv.bias")
        );
        assert_eq!(map.source("encoder.down.3.downsample.conv.bias"), None);
        assert_eq!(map.source("encoder.down.0.block.2.conv1.weight"), None);
        assert_eq!(
            map.source("encoder.mid.attn_1.q.weight"),
            Some(Source::Squeezed(
                "encoder.mid_block.attentions.0.to_q.weight".into()
            ))
        );
        assert_eq!(
            map.source("decoder.mid.attn_1.proj_out.bias"),
            t("decoder.mid_block.attentions.0.to_out.0.bias")
        );
        assert_eq!(
            map.source("decoder.mid.attn_1.norm.weight"),
            t("decoder.mid_block.attentions.0.group_norm.weight")
        );
        assert_eq!(
            map.source("decoder.mid.block_2.norm1.weight"),
            t("decoder.mid_block.resnets.1.norm1.weight")
        );
        assert_eq!(
            map.source("decoder.norm_out.bias"),
            t("decoder.conv_norm_out.bias")
        );
        assert_eq!(
            map.source("encoder.conv_in.weight"),
            t("encoder.conv_in.weight")
        );
        assert_eq!(map.source("quant_conv.weight"), None);
        assert_eq!(map.layout_name(), "diffusers");
    }
}
