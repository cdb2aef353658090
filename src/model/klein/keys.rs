//! Where klein's tensors live in the two layouts people share: Black Forest Labs' single files
//! (the canonical names, sometimes below ComfyUI's `model.diffusion_model.`) and diffusers
//! folders ([`KleinDiffusersMap`] for the transformer, [`KleinVaeDiffusersMap`] for the
//! autoencoder); which layout a set of tensor names uses ([`detect_layout`]); and a single file's
//! config read from its tensor shapes ([`infer_config`]).

use std::path::PathBuf;

use super::config::KleinConfig;
use crate::error::{Error, Result};
use crate::model::vae::{VaeConfig, VaeDiffusersMap};
use crate::model::weights::{Identity, KeyMap, SafetensorsSet, Source};

/// The shared single-block modulation, named as Black Forest Labs name it: no other family has it.
pub const BFL_MARKER: &str = "single_stream_modulation.lin.weight";
/// The same tensor in diffusers' `Flux2Transformer2DModel`.
pub const DIFFUSERS_MARKER: &str = "single_stream_modulation.linear.weight";

/// How a klein transformer's tensors are named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KleinLayout {
    /// Black Forest Labs' names below `prefix` (empty, or ComfyUI's `model.diffusion_model.`).
    Bfl {
        prefix: String,
    },
    Diffusers,
}

/// The layout of a transformer with these tensor names, if it is a FLUX.2 transformer.
pub fn detect_layout<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<KleinLayout> {
    for n in names {
        if let Some(prefix) = n.strip_suffix(BFL_MARKER) {
            return Some(KleinLayout::Bfl {
                prefix: prefix.to_string(),
            });
        }
        if n == DIFFUSERS_MARKER {
            return Some(KleinLayout::Diffusers);
        }
    }
    None
}

/// The key map of a layout.
pub fn key_map(layout: &KleinLayout, cfg: &KleinConfig) -> Box<dyn KeyMap> {
    match layout {
        KleinLayout::Bfl { prefix } => Box::new(Identity {
            prefix: prefix.clone(),
        }),
        KleinLayout::Diffusers => Box::new(KleinDiffusersMap {
            hidden: cfg.hidden_size,
        }),
    }
}

/// Black Forest Labs' FLUX.2 transformer names -> diffusers' `Flux2Transformer2DModel` names.
/// Diffusers splits the double blocks' fused QKV into three products and stores the final
/// adaLN's (shift, scale) as (scale, shift).
#[derive(Debug, Clone)]
pub struct KleinDiffusersMap {
    pub hidden: usize,
}

/// `"{n}.{rest}"` split at the block index.
fn block(s: &str) -> Option<(usize, &str)> {
    let (n, rest) = s.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

impl KleinDiffusersMap {
    fn double(&self, i: usize, rest: &str) -> Option<Source> {
        let p = format!("transformer_blocks.{i}");
        let t = |s: &str| Some(Source::Tensor(format!("{p}.{s}")));
        let (stream, part) = rest.split_once('.')?;
        let img = match stream {
            "img_attn" | "img_mlp" => true,
            "txt_attn" | "txt_mlp" => false,
            _ => return None,
        };
        match (stream, part) {
            (_, "qkv.weight") => {
                let names: [&str; 3] = if img {
                    ["to_q", "to_k", "to_v"]
                } else {
                    ["add_q_proj", "add_k_proj", "add_v_proj"]
                };
                Some(Source::Concat {
                    parts: names
                        .iter()
                        .map(|n| (format!("{p}.attn.{n}.weight"), self.hidden))
                        .collect(),
                    dim: 0,
                })
            }
            (_, "norm.query_norm.scale") if img => t("attn.norm_q.weight"),
            (_, "norm.key_norm.scale") if img => t("attn.norm_k.weight"),
            (_, "norm.query_norm.scale") => t("attn.norm_added_q.weight"),
            (_, "norm.key_norm.scale") => t("attn.norm_added_k.weight"),
            (_, "proj.weight") if img => t("attn.to_out.0.weight"),
            (_, "proj.weight") => t("attn.to_add_out.weight"),
            (_, "0.weight") if img => t("ff.linear_in.weight"),
            (_, "2.weight") if img => t("ff.linear_out.weight"),
            (_, "0.weight") => t("ff_context.linear_in.weight"),
            (_, "2.weight") => t("ff_context.linear_out.weight"),
            _ => None,
        }
    }

    fn single(&self, i: usize, rest: &str) -> Option<Source> {
        let part = match rest {
            "linear1.weight" => "attn.to_qkv_mlp_proj.weight",
            "linear2.weight" => "attn.to_out.weight",
            "norm.query_norm.scale" => "attn.norm_q.weight",
            "norm.key_norm.scale" => "attn.norm_k.weight",
            _ => return None,
        };
        Some(Source::Tensor(format!(
            "single_transformer_blocks.{i}.{part}"
        )))
    }
}

impl KeyMap for KleinDiffusersMap {
    fn source(&self, canonical: &str) -> Option<Source> {
        if let Some((i, rest)) = canonical.strip_prefix("double_blocks.").and_then(block) {
            return self.double(i, rest);
        }
        if let Some((i, rest)) = canonical.strip_prefix("single_blocks.").and_then(block) {
            return self.single(i, rest);
        }
        let name = match canonical {
            "img_in.weight" => "x_embedder.weight",
            "txt_in.weight" => "context_embedder.weight",
            "time_in.in_layer.weight" => "time_guidance_embed.timestep_embedder.linear_1.weight",
            "time_in.out_layer.weight" => "time_guidance_embed.timestep_embedder.linear_2.weight",
            "guidance_in.in_layer.weight" => {
                "time_guidance_embed.guidance_embedder.linear_1.weight"
            }
            "guidance_in.out_layer.weight" => {
                "time_guidance_embed.guidance_embedder.linear_2.weight"
            }
            "double_stream_modulation_img.lin.weight" => {
                "double_stream_modulation_img.linear.weight"
            }
            "double_stream_modulation_txt.lin.weight" => {
                "double_stream_modulation_txt.linear.weight"
            }
            "single_stream_modulation.lin.weight" => DIFFUSERS_MARKER,
            "final_layer.linear.weight" => "proj_out.weight",
            "final_layer.adaLN_modulation.1.weight" => {
                return Some(Source::SwapHalves {
                    name: "norm_out.linear.weight".into(),
                    dim: 0,
                })
            }
            _ => return None,
        };
        Some(Source::Tensor(name.into()))
    }

    fn layout_name(&self) -> &str {
        "diffusers"
    }
}

/// Black Forest Labs' FLUX.2 autoencoder names -> diffusers' `AutoencoderKLFlux2`: FLUX.1's
/// decoder names ([`VaeDiffusersMap`]), the post-quant convolution (inside `decoder.` in Black
/// Forest Labs' file, at the top in diffusers') and the batch-norm statistics (`bn.` in both).
#[derive(Debug, Clone, PartialEq)]
pub struct KleinVaeDiffusersMap {
    inner: VaeDiffusersMap,
}

impl KleinVaeDiffusersMap {
    pub fn new(cfg: VaeConfig) -> Self {
        Self {
            inner: VaeDiffusersMap::new(cfg),
        }
    }
}

impl KeyMap for KleinVaeDiffusersMap {
    fn source(&self, canonical: &str) -> Option<Source> {
        if let Some(rest) = canonical.strip_prefix("decoder.post_quant_conv.") {
            return Some(Source::Tensor(format!("post_quant_conv.{rest}")));
        }
        if let Some(rest) = canonical.strip_prefix("encoder.quant_conv.") {
            return Some(Source::Tensor(format!("quant_conv.{rest}")));
        }
        if canonical.starts_with("bn.") {
            return Some(Source::Tensor(canonical.into()));
        }
        self.inner.source(canonical)
    }

    fn layout_name(&self) -> &str {
        "diffusers"
    }
}

/// A transformer's config from its tensor shapes (Black Forest Labs' single files carry none).
/// RoPE takes a quarter of the head dim on each of its four axes, theta 2000, as klein's configs
/// say.
pub fn infer_config(set: &SafetensorsSet, layout: &KleinLayout) -> Result<KleinConfig> {
    let map = key_map(layout, &KleinConfig::klein_4b());
    let stored = |canonical: &str| -> String {
        match map.source(canonical) {
            Some(Source::Tensor(n))
            | Some(Source::Squeezed(n))
            | Some(Source::SwapHalves { name: n, .. }) => n,
            Some(Source::Concat { parts, .. }) => parts[0].0.clone(),
            None => canonical.to_string(),
        }
    };
    let shape = |canonical: &str| -> Result<Vec<usize>> {
        let name = stored(canonical);
        set.meta(&name)
            .map(|m| m.shape.clone())
            .ok_or_else(|| Error::MissingTensor {
                tensor: name,
                location: set.label().to_string(),
            })
    };
    let bad = |what: String| Error::UnknownLayout {
        path: PathBuf::from(set.label()),
        reason: format!("cannot infer the FLUX.2 transformer's config: {what}"),
    };
    let img_in = shape("img_in.weight")?;
    let txt_in = shape("txt_in.weight")?;
    let head = shape("double_blocks.0.img_attn.norm.query_norm.scale")?;
    let mlp_in = shape("double_blocks.0.img_mlp.0.weight")?;
    if img_in.len() != 2 || txt_in.len() != 2 || head.len() != 1 || mlp_in.len() != 2 {
        return Err(bad("unexpected tensor ranks".into()));
    }
    let (hidden, hd) = (img_in[0], head[0]);
    if hd == 0 || hidden % hd != 0 || hd % 8 != 0 {
        return Err(bad(format!(
            "hidden size {hidden} and head dim {hd} do not fit"
        )));
    }
    let (double_prefix, single_prefix) = match layout {
        KleinLayout::Bfl { prefix } => (
            format!("{prefix}double_blocks."),
            format!("{prefix}single_blocks."),
        ),
        KleinLayout::Diffusers => (
            "transformer_blocks.".to_string(),
            "single_transformer_blocks.".to_string(),
        ),
    };
    // Blocks counted by the highest index any tensor names, so a block with a tensor missing is
    // reported as a missing tensor rather than silently shortening the model.
    let count = |p: &str| {
        set.names()
            .filter_map(|n| n.strip_prefix(p))
            .filter_map(|rest| rest.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |m| m + 1)
    };
    let cfg = KleinConfig {
        in_channels: img_in[1],
        context_in_dim: txt_in[1],
        hidden_size: hidden,
        num_heads: hidden / hd,
        mlp_ratio: (mlp_in[0] / 2) as f64 / hidden as f64,
        depth: count(&double_prefix),
        depth_single_blocks: count(&single_prefix),
        axes_dim: vec![hd / 4; 4],
        theta: 2000.0,
        guidance_embed: set.contains(&stored("guidance_in.in_layer.weight")),
    };
    cfg.validate().map_err(bad)?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffusers_names() {
        let map = KleinDiffusersMap { hidden: 64 };
        let t = |s: &str| Some(Source::Tensor(s.to_string()));
        assert_eq!(
            map.source("double_blocks.1.txt_attn.norm.key_norm.scale"),
            t("transformer_blocks.1.attn.norm_added_k.weight")
        );
        assert_eq!(
            map.source("double_blocks.0.img_mlp.2.weight"),
            t("transformer_blocks.0.ff.linear_out.weight")
        );
        assert_eq!(
            map.source("single_blocks.3.linear1.weight"),
            t("single_transformer_blocks.3.attn.to_qkv_mlp_proj.weight")
        );
        assert_eq!(
            map.source("final_layer.adaLN_modulation.1.weight"),
            Some(Source::SwapHalves {
                name: "norm_out.linear.weight".into(),
                dim: 0
            })
        );
        match map.source("double_blocks.2.txt_attn.qkv.weight") {
            Some(Source::Concat { parts, dim: 0 }) => {
                assert_eq!(
                    parts[1],
                    ("transformer_blocks.2.attn.add_k_proj.weight".into(), 64)
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(map.source("vector_in.in_layer.weight"), None);
        assert_eq!(map.source("double_blocks.0.img_attn.qkv.bias"), None);
    }

    #[test]
    fn layouts_told_apart() {
        assert_eq!(
            detect_layout([
                "img_in.weight",
                "model.diffusion_model.single_stream_modulation.lin.weight"
            ]),
            Some(KleinLayout::Bfl {
                prefix: "model.diffusion_model.".into()
            })
        );
        assert_eq!(
            detect_layout(["x_embedder.weight", DIFFUSERS_MARKER]),
            Some(KleinLayout::Diffusers)
        );
        assert_eq!(detect_layout(["double_blocks.0.img_attn.qkv.weight"]), None);
    }
}
