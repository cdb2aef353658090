//! The Qwen3 decoder's forward pass, returning the hidden states of chosen layers.
//!
//! Each layer: RMSNorm, grouped-query self-attention (q and k RMS-normed per head, then rotated
//! with RoPE over the head's two halves), a residual add, RMSNorm, the SwiGLU MLP
//! (`down(silu(gate(x)) * up(x))`) and a residual add. Attention is causal, and keys that are
//! padding (mask 0) are left out. Positions count from 0 at the first token whatever the mask
//! says, as transformers counts them when it is given no position ids.
//!
//! Hidden states are numbered as transformers' `output_hidden_states` numbers them: 0 is the
//! token embedding, `k` the output of the first `k` layers, and `num_hidden_layers` the last
//! layer's output after the final norm. A model built with [`Qwen3::new_partial`] holds only the
//! layers a caller reads (FLUX.2 klein reads 9, 18 and 27 of Qwen3's 36).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{embedding, linear_no_bias, rms_norm, Embedding, Linear, RmsNorm, VarBuilder};

use super::config::Qwen3Config;

/// Grouped-query self-attention with per-head q/k norms and RoPE.
#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &Qwen3Config, vb: VarBuilder) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        Ok(Self {
            q_proj: linear_no_bias(h, cfg.num_attention_heads * d, vb.pp("q_proj"))?,
            k_proj: linear_no_bias(h, cfg.num_key_value_heads * d, vb.pp("k_proj"))?,
            v_proj: linear_no_bias(h, cfg.num_key_value_heads * d, vb.pp("v_proj"))?,
            o_proj: linear_no_bias(cfg.num_attention_heads * d, h, vb.pp("o_proj"))?,
            q_norm: rms_norm(d, cfg.rms_norm_eps, vb.pp("q_norm"))?,
            k_norm: rms_norm(d, cfg.rms_norm_eps, vb.pp("k_norm"))?,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: d,
        })
    }

    /// `x` (B, L, hidden); `rope` the (L, head_dim / 2) tables; `bias` the additive (B, 1, L, L)
    /// f32 mask.
    fn forward(&self, x: &Tensor, rope: &Rope, bias: &Tensor) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let d = self.head_dim;
        let heads = |proj: &Linear, norm: Option<&RmsNorm>, n: usize| -> Result<Tensor> {
            let t = proj.forward(x)?.reshape((b, l, n, d))?;
            let t = match norm {
                Some(norm) => norm.forward(&t)?,
                None => t,
            };
            t.transpose(1, 2)?.contiguous()
        };
        let q = heads(&self.q_proj, Some(&self.q_norm), self.heads)?;
        let k = heads(&self.k_proj, Some(&self.k_norm), self.kv_heads)?;
        let v = heads(&self.v_proj, None, self.kv_heads)?;
        let q = candle_nn::rotary_emb::rope(&q, &rope.cos, &rope.sin)?;
        let k = candle_nn::rotary_emb::rope(&k, &rope.cos, &rope.sin)?;

        // Each key/value head serves `group` consecutive query heads: fold those heads into
        // the query axis instead of repeating K and V.
        let group = self.heads / self.kv_heads;
        let q = q.reshape((b, self.kv_heads, group * l, d))?;
        let scale = 1.0 / (d as f64).sqrt();
        let scores = q
            .matmul(&k.t()?)?
            .to_dtype(DType::F32)?
            .affine(scale, 0.0)?
            .reshape((b, self.heads, l, l))?
            .broadcast_add(bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?
            .to_dtype(v.dtype())?
            .reshape((b, self.kv_heads, group * l, l))?;
        let out = probs
            .matmul(&v)?
            .reshape((b, self.heads, l, d))?
            .transpose(1, 2)?
            .reshape((b, l, self.heads * d))?;
        self.o_proj.forward(&out)
    }
}

/// The SwiGLU MLP.
#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &Qwen3Config, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate_proj: linear_no_bias(h, i, vb.pp("gate_proj"))?,
            up_proj: linear_no_bias(h, i, vb.pp("up_proj"))?,
            down_proj: linear_no_bias(i, h, vb.pp("down_proj"))?,
        })
    }

    /// `down(silu(gate(x)) * up(x))`, the SwiGLU one fused pass on CUDA in bf16.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?;
        let up = self.up_proj.forward(x)?;
        self.down_proj
            .forward(&crate::kernels::elementwise::swiglu_pair(&gate, &up)?)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl Layer {
    fn new(cfg: &Qwen3Config, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            input_layernorm: rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("input_layernorm"))?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"))?,
            post_attention_layernorm: rms_norm(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
        })
    }

    fn forward(&self, x: &Tensor, rope: &Rope, bias: &Tensor) -> Result<Tensor> {
        let h = (x + self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, rope, bias)?)?;
        &h + self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&h)?)?
    }
}

/// RoPE tables for one sequence length: (L, head_dim / 2) each, in the model's dtype.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    fn new(cfg: &Qwen3Config, len: usize, dtype: DType, device: &Device) -> Result<Self> {
        let half = cfg.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / cfg.rope_theta.powf(2.0 * i as f64 / cfg.head_dim as f64)) as f32)
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let pos = Tensor::arange(0u32, len as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((len, 1))?;
        let freqs = pos.broadcast_mul(&inv_freq)?;
        Ok(Self {
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
        })
    }
}

/// A Qwen3 decoder without its LM head (what a text encoder reads).
#[derive(Debug, Clone)]
pub struct Qwen3 {
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    /// The final norm, held when the model holds every layer.
    norm: Option<RmsNorm>,
    cfg: Qwen3Config,
    dtype: DType,
    device: Device,
}

impl Qwen3 {
    /// The whole decoder, with `vb` where `embed_tokens`, `layers` and `norm` live (a
    /// `Qwen3ForCausalLM` checkpoint stores them under `model.`).
    pub fn new(cfg: &Qwen3Config, vb: VarBuilder) -> Result<Self> {
        Self::new_partial(cfg, vb, cfg.num_hidden_layers)
    }

    /// The embedding and the first `layers` layers only: enough for hidden states up to
    /// `layers` (the final norm is loaded only when `layers` is all of them). The weights of the
    /// other layers are never read.
    pub fn new_partial(cfg: &Qwen3Config, vb: VarBuilder, layers: usize) -> Result<Self> {
        if layers > cfg.num_hidden_layers {
            candle_core::bail!(
                "Qwen3 has {} layers; {layers} were asked for",
                cfg.num_hidden_layers
            );
        }
        let dtype = vb.dtype();
        let device = vb.device().clone();
        let embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("embed_tokens"))?;
        let layers = (0..layers)
            .map(|i| Layer::new(cfg, vb.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let norm = if layers.len() == cfg.num_hidden_layers {
            Some(rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp("norm"))?)
        } else {
            None
        };
        Ok(Self {
            embed_tokens,
            layers,
            norm,
            cfg: cfg.clone(),
            dtype,
            device,
        })
    }

    pub fn config(&self) -> &Qwen3Config {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The highest hidden-state index this model can give.
    pub fn max_output(&self) -> usize {
        self.layers.len()
    }

    /// The hidden states numbered `outputs` (see the module's doc), each (B, L, hidden), in
    /// the order asked. `ids` is (B, L) u32; `mask` (B, L), 1 for a token and 0 for padding,
    /// or `None` when every position is a token.
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        outputs: &[usize],
    ) -> Result<Vec<Tensor>> {
        let last = outputs.iter().copied().max().unwrap_or(0);
        if last > self.max_output() {
            candle_core::bail!(
                "hidden state {last} asked for, but this Qwen3 holds {} of its {} layers",
                self.layers.len(),
                self.cfg.num_hidden_layers
            );
        }
        let (b, l) = ids.dims2()?;
        let rope = Rope::new(&self.cfg, l, self.dtype, &self.device)?;
        let bias = attention_bias(mask, b, l, &self.device)?;

        let mut states: Vec<Option<Tensor>> = vec![None; outputs.len()];
        let mut keep = |index: usize, h: &Tensor| {
            for (slot, _) in states.iter_mut().zip(outputs).filter(|(_, &o)| o == index) {
                *slot = Some(h.clone());
            }
        };
        let mut h = self.embed_tokens.forward(ids)?;
        keep(0, &h);
        for (i, layer) in self.layers.iter().take(last).enumerate() {
            h = layer.forward(&h, &rope, &bias)?;
            let index = i + 1;
            if index == self.cfg.num_hidden_layers {
                if let Some(norm) = &self.norm {
                    h = norm.forward(&h)?;
                }
            }
            keep(index, &h);
        }
        states
            .into_iter()
            .map(|s| s.ok_or_else(|| candle_core::Error::Msg("hidden state not reached".into())))
            .collect()
    }
}

/// The additive attention mask (B, 1, L, L) in f32: 0 where a query may see a key (the key is
/// not after it and is not padding), the lowest f32 elsewhere (a row with no key to see then
/// spreads evenly instead of becoming NaN).
fn attention_bias(mask: Option<&Tensor>, b: usize, l: usize, device: &Device) -> Result<Tensor> {
    let causal: Vec<u8> = (0..l)
        .flat_map(|q| (0..l).map(move |k| u8::from(k <= q)))
        .collect();
    let allowed = Tensor::from_vec(causal, (1, 1, l, l), device)?;
    let allowed = match mask {
        Some(mask) => {
            let keys = mask.ne(0u32)?.reshape((b, 1, 1, l))?;
            allowed.broadcast_mul(&keys)?
        }
        None => allowed.broadcast_as((b, 1, l, l))?.contiguous()?,
    };
    let zeros = Tensor::zeros((b, 1, l, l), DType::F32, device)?;
    let lowest = Tensor::full(f32::MIN, (b, 1, l, l), device)?;
    allowed.where_cond(&zeros, &lowest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mask_hides_later_tokens_and_padding() -> Result<()> {
        let mask = Tensor::new(&[[1u32, 1, 1, 0]], &Device::Cpu)?;
        let bias = attention_bias(Some(&mask), 1, 4, &Device::Cpu)?;
        let seen: Vec<Vec<bool>> = bias
            .squeeze(0)?
            .squeeze(0)?
            .to_vec2::<f32>()?
            .into_iter()
            .map(|row| row.into_iter().map(|v| v == 0.0).collect())
            .collect();
        assert_eq!(
            seen,
            vec![
                vec![true, false, false, false],
                vec![true, true, false, false],
                vec![true, true, true, false],
                // A padding query sees the tokens before it, never padding.
                vec![true, true, true, false],
            ]
        );
        Ok(())
    }
}
