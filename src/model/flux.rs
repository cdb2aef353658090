//! The FLUX.1 transformer (MMDiT): 19 double-stream blocks, where text and image tokens keep their
//! own weights but attend jointly, then 38 single-stream blocks over the joined sequence.
//!
//! Tensor names are Black Forest Labs' (`double_blocks.0.img_attn.qkv.weight`, ...); other layouts
//! are mapped onto them by [`crate::model::layout`]. The forward pass is split into stages
//! ([`Flux::embed`], [`Flux::run_blocks`], [`Flux::final_layer`]) so that a cache policy can run the
//! first block alone and a pipeline-parallel strategy can run a range of blocks. Attention goes
//! through the [`Attention`] trait object the model holds.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{linear, linear_b, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use super::attention::{Attention, LocalAttention};
use super::shard::{Shard, ShardLayout};
use crate::collective::Communicator;
use crate::kernels::elementwise::{gated_residual, ln_modulate};
use crate::kernels::gemm;
use crate::kernels::qkv_prep::{qkv_prep, QkvStream, RopeTables};

/// Architecture hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FluxConfig {
    /// Packed latent channels: 16 latent channels x 2x2 patches.
    pub in_channels: usize,
    /// Pooled CLIP embedding width.
    pub vec_in_dim: usize,
    /// T5 embedding width.
    pub context_in_dim: usize,
    pub hidden_size: usize,
    pub mlp_ratio: f64,
    pub num_heads: usize,
    /// Double-stream blocks.
    pub depth: usize,
    /// Single-stream blocks.
    pub depth_single_blocks: usize,
    /// RoPE dimensions per position axis (text index, row, column); they sum to the head dim.
    pub axes_dim: Vec<usize>,
    pub theta: f64,
    pub qkv_bias: bool,
    /// FLUX.1-dev distils guidance into an embedding; schnell does not.
    pub guidance_embed: bool,
}

impl FluxConfig {
    pub fn dev() -> Self {
        Self {
            in_channels: 64,
            vec_in_dim: 768,
            context_in_dim: 4096,
            hidden_size: 3072,
            mlp_ratio: 4.0,
            num_heads: 24,
            depth: 19,
            depth_single_blocks: 38,
            axes_dim: vec![16, 56, 56],
            theta: 10_000.0,
            qkv_bias: true,
            guidance_embed: true,
        }
    }

    pub fn schnell() -> Self {
        Self {
            guidance_embed: false,
            ..Self::dev()
        }
    }

    /// A small model with FLUX's structure and made-up weights, for tests (`random:tiny`): 2 heads
    /// of 64, 2 double and 4 single blocks, text widths matching the demo text encoders.
    pub fn tiny() -> Self {
        Self {
            in_channels: 64,
            vec_in_dim: super::text::DEMO_CLIP_DIM,
            context_in_dim: super::text::DEMO_T5_DIM,
            hidden_size: 128,
            mlp_ratio: 4.0,
            num_heads: 2,
            depth: 2,
            depth_single_blocks: 4,
            axes_dim: vec![8, 28, 28],
            theta: 10_000.0,
            qkv_bias: true,
            guidance_embed: true,
        }
    }

    /// The trained demo model (`--model demo`, weights in `assets/demo/`): 2 heads of 64, 2 double
    /// and 6 single blocks, guidance embedded like FLUX.1-dev.
    pub fn demo() -> Self {
        Self {
            depth_single_blocks: 6,
            ..Self::tiny()
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    pub fn mlp_hidden(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio) as usize
    }

    /// Total blocks, double then single, as indexed by [`Flux::run_blocks`].
    pub fn num_blocks(&self) -> usize {
        self.depth + self.depth_single_blocks
    }

    /// Check internal consistency (used on configs read from files).
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.num_heads == 0 || self.hidden_size % self.num_heads != 0 {
            return Err(format!(
                "hidden size {} is not divisible by {} heads",
                self.hidden_size, self.num_heads
            ));
        }
        let sum: usize = self.axes_dim.iter().sum();
        if sum != self.head_dim() || self.axes_dim.iter().any(|a| a % 2 != 0) {
            return Err(format!(
                "RoPE axes {:?} must be even and sum to the head dim {}",
                self.axes_dim,
                self.head_dim()
            ));
        }
        if self.in_channels == 0 || self.depth + self.depth_single_blocks == 0 {
            return Err("model has no input channels or no blocks".into());
        }
        Ok(())
    }
}

impl FluxConfig {
    /// Floating-point operations of one transformer pass over `txt_len` text and `img_len` image
    /// tokens (batch 1): every linear layer (2 FLOP per multiply-add) plus the attention products
    /// (Q Kᵀ and P V). Modulation and embedding layers (per image, not per token) are left out.
    pub fn flops_per_step(&self, txt_len: usize, img_len: usize) -> f64 {
        let h = self.hidden_size as f64;
        let mlp = self.mlp_hidden() as f64;
        let l = (txt_len + img_len) as f64;
        // Double block, per token of either stream: qkv 3h², proj h², MLP 2·h·mlp.
        let double = 2.0 * (4.0 * h * h + 2.0 * h * mlp);
        // Single block: linear1 h·(3h + mlp), linear2 (h + mlp)·h.
        let single = 2.0 * (h * (3.0 * h + mlp) + (h + mlp) * h);
        let linear = l * (self.depth as f64 * double + self.depth_single_blocks as f64 * single);
        let attention = self.num_blocks() as f64 * 4.0 * l * l * h;
        let io = 2.0 * img_len as f64 * self.in_channels as f64 * h * 2.0
            + 2.0 * txt_len as f64 * self.context_in_dim as f64 * h;
        linear + attention + io
    }
}

/// Sinusoidal embedding of `t` (shape (B,)), scaled by `time_factor` first, cos half first.
pub fn timestep_embedding(t: &Tensor, dim: usize, dtype: DType) -> Result<Tensor> {
    const TIME_FACTOR: f64 = 1000.0;
    const MAX_PERIOD: f64 = 10_000.0;
    if dim % 2 != 0 {
        candle_core::bail!("timestep embedding dim {dim} must be even")
    }
    let half = dim / 2;
    let dev = t.device();
    let t = (t.to_dtype(DType::F32)? * TIME_FACTOR)?;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(MAX_PERIOD.ln()) * i as f64 / half as f64).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), dev)?;
    let args = t.unsqueeze(1)?.broadcast_mul(&freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)?.to_dtype(dtype)
}

/// Cosine and sine tables for the interleaved 3-axis RoPE, (L, head_dim/2) each.
#[derive(Debug, Clone)]
pub struct PosEmbed {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl PosEmbed {
    /// Tables for `ids` (L, n_axes) of f32 positions.
    pub fn new(ids: &Tensor, axes_dim: &[usize], theta: f64, dtype: DType) -> Result<Self> {
        let (_, n_axes) = ids.dims2()?;
        if n_axes != axes_dim.len() {
            candle_core::bail!(
                "position ids have {n_axes} axes, RoPE has {}",
                axes_dim.len()
            )
        }
        let dev = ids.device();
        let mut angles = Vec::with_capacity(n_axes);
        for (a, &dim) in axes_dim.iter().enumerate() {
            let omega: Vec<f32> = (0..dim / 2)
                .map(|i| (1.0 / theta.powf((2 * i) as f64 / dim as f64)) as f32)
                .collect();
            let omega = Tensor::from_vec(omega, (1, dim / 2), dev)?;
            let pos = ids.narrow(1, a, 1)?.to_dtype(DType::F32)?;
            angles.push(pos.broadcast_mul(&omega)?);
        }
        let angles = Tensor::cat(&angles, 1)?;
        Ok(Self {
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
        })
    }

    /// The rows for tokens `start..start+len` (for sequence-sharded attention).
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            cos: self.cos.narrow(0, start, len)?,
            sin: self.sin.narrow(0, start, len)?,
        })
    }
}

impl<'a> From<&'a PosEmbed> for RopeTables<'a> {
    fn from(pe: &'a PosEmbed) -> Self {
        RopeTables {
            cos: &pe.cos,
            sin: &pe.sin,
        }
    }
}

/// Position ids of the joint sequence: `txt_len` text tokens at 0, then the image patches of an
/// `h` x `w` patch grid as (0, row, column).
pub fn position_ids(txt_len: usize, h: usize, w: usize, device: &Device) -> Result<Tensor> {
    let mut ids = vec![0f32; (txt_len + h * w) * 3];
    for r in 0..h {
        for c in 0..w {
            let i = (txt_len + r * w + c) * 3;
            ids[i + 1] = r as f32;
            ids[i + 2] = c as f32;
        }
    }
    Tensor::from_vec(ids, (txt_len + h * w, 3), device)
}

/// Apply the rotation to (B, H, L, D) queries or keys.
pub fn apply_rope(x: &Tensor, pe: &PosEmbed) -> Result<Tensor> {
    crate::kernels::reference::rope(x, &pe.cos, &pe.sin)
}

/// Two-layer MLP embedder: linear, SiLU, linear.
#[derive(Debug, Clone)]
struct MlpEmbedder {
    in_layer: Linear,
    out_layer: Linear,
}

impl MlpEmbedder {
    fn new(in_dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            in_layer: linear(in_dim, hidden, vb.pp("in_layer"))?,
            out_layer: linear(hidden, hidden, vb.pp("out_layer"))?,
        })
    }
}

impl Module for MlpEmbedder {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out_layer.forward(&self.in_layer.forward(x)?.silu()?)
    }
}

/// How a [`Lin`] uses FP8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fp8Mode {
    /// In the run's dtype.
    Off,
    /// FP8 products (W8A8): weight rows in E4M3 and the input rounded per token at each product
    /// (cuBLASLt on sm_89+ GPUs in bf16; elsewhere simulated by rounding).
    Products,
    /// Weight-only FP8 (W8A16): the weight kept in E4M3 per output channel, the input unrounded
    /// (the adaLN modulations under a memory budget: half the bytes, the products' input intact).
    WeightOnly,
}

/// A linear layer over token rows whose bias add (and GELU, when asked) runs inside the product on
/// CUDA ([`crate::kernels::gemm::linear`]); same function as `candle_nn::Linear`.
#[derive(Debug, Clone)]
struct Lin {
    /// The weight in the run's dtype; `None` once dropped under a memory budget ([`Lin::lean`]),
    /// when the GPU's E4M3 copy stands for it.
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    /// FP8 use. Simulated (where no GPU copy exists): the weight was rounded per output channel
    /// once by [`Lin::to_fp8`]; under [`Fp8Mode::Products`] the input is rounded per token too.
    fp8: Fp8Mode,
    /// On GPUs with FP8 products: the weight in E4M3 with its scales, multiplied by cuBLASLt
    /// ([`crate::kernels::fp8_gemm`]); `weight`, unless dropped, keeps its original values for
    /// the products the FP8 path does not take.
    #[cfg(feature = "cuda")]
    fp8_gpu: Option<std::sync::Arc<crate::kernels::fp8_gemm::Fp8Matrix>>,
}

impl Lin {
    fn new(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let l = linear_b(in_dim, out_dim, bias, vb)?;
        Ok(Self {
            weight: Some(l.weight().clone()),
            bias: l.bias().cloned(),
            fp8: Fp8Mode::Off,
            #[cfg(feature = "cuda")]
            fp8_gpu: None,
        })
    }

    /// The weight in the run's dtype: the kept one, or the E4M3 copy dequantised (a temporary,
    /// for the rare product the FP8 kernels cannot take once the original was dropped).
    fn weight(&self) -> Result<std::borrow::Cow<'_, Tensor>> {
        if let Some(w) = &self.weight {
            return Ok(std::borrow::Cow::Borrowed(w));
        }
        #[cfg(feature = "cuda")]
        if let Some(q) = &self.fp8_gpu {
            return Ok(std::borrow::Cow::Owned(
                crate::kernels::fp8_gemm::dequantize(q)?,
            ));
        }
        candle_core::bail!("a linear layer lost its weight (dropped with no FP8 copy)")
    }

    /// This layer with FP8 in `mode`: weight rows rounded to E4M3 now (per output channel) and,
    /// for products, inputs per token at every product.
    ///
    /// Where the GPU multiplies FP8 the weight is quantised there instead and `weight` keeps its
    /// original values: a product the FP8 path cannot take then runs unrounded (with a warning),
    /// and loading skips the CPU rounding of every weight.
    fn to_fp8(&self, mode: Fp8Mode) -> Result<Self> {
        if mode == Fp8Mode::Off {
            return Ok(self.clone());
        }
        let weight = self.weight()?.into_owned();
        #[cfg(feature = "cuda")]
        if let Some(q) = Self::fp8_weight_on_gpu(&weight) {
            return Ok(Self {
                weight: Some(weight),
                bias: self.bias.clone(),
                fp8: mode,
                fp8_gpu: Some(q),
            });
        }
        Ok(Self {
            weight: Some(crate::kernels::fp8::round_rows(&weight)?),
            bias: self.bias.clone(),
            fp8: mode,
            #[cfg(feature = "cuda")]
            fp8_gpu: None,
        })
    }

    /// This layer without its weight in the run's dtype where an E4M3 copy on the GPU stands for
    /// it (the memory an FP8 run saves); unchanged elsewhere.
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    fn lean(mut self) -> Self {
        #[cfg(feature = "cuda")]
        if self.fp8_gpu.is_some() {
            self.weight = None;
        }
        self
    }

    /// Bytes this layer's weights hold on their device (the run's dtype and any E4M3 copy).
    fn weight_bytes(&self) -> usize {
        let kept = self
            .weight
            .iter()
            .chain(self.bias.iter())
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum::<usize>();
        #[cfg(feature = "cuda")]
        let kept = kept
            + self
                .fp8_gpu
                .as_ref()
                .map_or(0, |q| q.rows * q.k + 4 * q.rows);
        kept
    }

    /// `weight` quantised on the GPU for the FP8 kernels, where the GPU has them (none
    /// elsewhere, or when quantising fails: the simulated rounding then serves).
    #[cfg(feature = "cuda")]
    fn fp8_weight_on_gpu(
        weight: &Tensor,
    ) -> Option<std::sync::Arc<crate::kernels::fp8_gemm::Fp8Matrix>> {
        use crate::kernels::fp8_gemm as f;
        let candle_core::Device::Cuda(dev) = weight.device() else {
            return None;
        };
        if !f::enabled() || !f::supported(dev) || weight.dtype() != DType::BF16 {
            return None;
        }
        match f::quantize_rows(weight, f::per_tensor_weights()) {
            Ok(m) => Some(std::sync::Arc::new(m)),
            Err(e) => {
                tracing::warn!("FP8 weight quantisation failed ({e}); simulating FP8 rounding");
                None
            }
        }
    }

    /// The product through the FP8 kernels, if this layer has them and they take `x`: cuBLASLt's
    /// FP8 product for [`Fp8Mode::Products`], the weight-only matrix-vector kernel for a few rows
    /// under [`Fp8Mode::WeightOnly`].
    #[cfg(feature = "cuda")]
    fn fp8_product(&self, a: Option<&Tensor>, x: &Tensor, gelu: bool) -> Option<Tensor> {
        use crate::kernels::fp8_gemm as f;
        let w = self.fp8_gpu.as_ref()?;
        if x.dtype() != DType::BF16 || !x.device().is_cuda() {
            return None;
        }
        let r = match self.fp8 {
            Fp8Mode::Products => f::linear_cat(a, x, w, self.bias.as_ref(), gelu),
            Fp8Mode::WeightOnly => {
                let rows = x.elem_count() / w.k.max(1);
                if a.is_some() || gelu || rows > f::GEMV_MAX_ROWS {
                    return None;
                }
                f::gemv(x, w, self.bias.as_ref())
            }
            Fp8Mode::Off => return None,
        };
        match r {
            Ok(y) => Some(y),
            Err(e) => {
                static ONCE: std::sync::Once = std::sync::Once::new();
                ONCE.call_once(|| {
                    tracing::warn!(
                        "FP8 product failed ({e}); running such products unrounded in bf16"
                    )
                });
                None
            }
        }
    }

    fn input<'a>(&self, x: &'a Tensor) -> Result<std::borrow::Cow<'a, Tensor>> {
        #[cfg(feature = "cuda")]
        let simulated = self.fp8 == Fp8Mode::Products && self.fp8_gpu.is_none();
        #[cfg(not(feature = "cuda"))]
        let simulated = self.fp8 == Fp8Mode::Products;
        Ok(if simulated {
            std::borrow::Cow::Owned(crate::kernels::fp8::round_rows(x)?)
        } else {
            std::borrow::Cow::Borrowed(x)
        })
    }

    /// Output rows `start..start+len` only (a slice of the weight's rows, no copy; taken at load,
    /// before any FP8 conversion).
    fn rows(&self, start: usize, len: usize) -> Result<Self> {
        #[allow(unused_mut)]
        let mut part = Self {
            weight: Some(self.weight()?.narrow(0, start, len)?),
            bias: match &self.bias {
                Some(b) => Some(b.narrow(0, start, len)?),
                None => None,
            },
            fp8: self.fp8,
            #[cfg(feature = "cuda")]
            fp8_gpu: None,
        };
        // The rows of a GPU-quantised layer are quantised again on their own (the same scales per
        // output channel; a per-tensor scale becomes the rows' own).
        #[cfg(feature = "cuda")]
        if self.fp8_gpu.is_some() {
            part.fp8_gpu = part.weight.as_ref().and_then(Self::fp8_weight_on_gpu);
            if self.weight.is_none() {
                part = part.lean();
            }
        }
        Ok(part)
    }

    /// `x Wᵀ + b`, then GELU if `gelu` (bias and GELU in the product's epilogue on CUDA).
    fn apply(&self, x: &Tensor, gelu: bool) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(y) = self.fp8_product(None, x, gelu) {
            return Ok(y);
        }
        gemm::linear(
            self.input(x)?.as_ref(),
            self.weight()?.as_ref(),
            self.bias.as_ref(),
            gelu,
        )
    }

    /// `[a, self.apply(x, gelu)]` along the last axis, the product written in place beside `a`.
    fn apply_beside(&self, a: &Tensor, x: &Tensor, gelu: bool) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if a.dtype() == DType::BF16 {
            if let Some(y) = self.fp8_product(Some(a), x, gelu) {
                return Ok(y);
            }
        }
        gemm::linear_cat(
            a,
            self.input(x)?.as_ref(),
            self.weight()?.as_ref(),
            self.bias.as_ref(),
            gelu,
        )
    }
}

/// `l` converted to FP8 in `mode` when `on` (and made lean with `lean`); the old weights are
/// freed as soon as nothing else holds them.
fn convert(l: &mut Lin, on: bool, mode: Fp8Mode, lean: bool) -> Result<()> {
    if on && l.fp8 == Fp8Mode::Off {
        let q = l.to_fp8(mode)?;
        *l = if lean { q.lean() } else { q };
    }
    Ok(())
}

impl Module for Lin {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false)
    }
}

/// Shift, scale and gate from an adaLN modulation, each (B, 1, hidden).
#[derive(Debug, Clone)]
pub struct ModulationOut {
    pub shift: Tensor,
    pub scale: Tensor,
    pub gate: Tensor,
}

impl ModulationOut {
    /// LayerNorm(x) * (1 + scale) + shift
    pub fn norm_modulate(&self, x: &Tensor) -> Result<Tensor> {
        ln_modulate(x, &self.shift, &self.scale)
    }

    /// x + gate * u
    pub fn gated_add(&self, x: &Tensor, u: &Tensor) -> Result<Tensor> {
        gated_residual(x, &self.gate, u)
    }
}

/// `lin(silu(vec))` split into `n` (shift, scale, gate) triples.
#[derive(Debug, Clone)]
struct Modulation {
    lin: Lin,
    n: usize,
}

impl Modulation {
    fn new(dim: usize, double: bool, vb: VarBuilder) -> Result<Self> {
        let n = if double { 2 } else { 1 };
        Ok(Self {
            lin: Lin::new(dim, 3 * n * dim, true, vb.pp("lin"))?,
            n,
        })
    }

    fn forward(&self, vec: &Tensor) -> Result<Vec<ModulationOut>> {
        let out = self.lin.forward(&vec.silu()?)?.unsqueeze(1)?;
        let chunks = out.chunk(3 * self.n, D::Minus1)?;
        Ok(chunks
            .chunks(3)
            .map(|c| ModulationOut {
                shift: c[0].clone(),
                scale: c[1].clone(),
                gate: c[2].clone(),
            })
            .collect())
    }
}

/// RMSNorm of queries and keys over the head dim, with learned scales.
#[derive(Debug, Clone)]
struct QkNorm {
    query: Tensor,
    key: Tensor,
}

impl QkNorm {
    fn new(head_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            query: vb.get(head_dim, "query_norm.scale")?,
            key: vb.get(head_dim, "key_norm.scale")?,
        })
    }

    /// This norm's scales with the QKV projection they apply to.
    fn stream<'a>(&'a self, qkv: &'a Tensor) -> QkvStream<'a> {
        QkvStream {
            qkv,
            q_scale: &self.query,
            k_scale: &self.key,
        }
    }
}

/// Attention weights of one stream in a double block.
#[derive(Debug, Clone)]
struct SelfAttn {
    qkv: Lin,
    norm: QkNorm,
    proj: Lin,
}

impl SelfAttn {
    fn new(cfg: &FluxConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            qkv: Lin::new(h, 3 * h, cfg.qkv_bias, vb.pp("qkv"))?,
            norm: QkNorm::new(cfg.head_dim(), vb.pp("norm"))?,
            proj: Lin::new(h, h, true, vb.pp("proj"))?,
        })
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    fc1: Lin,
    fc2: Lin,
}

impl Mlp {
    fn new(h: usize, mlp: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: Lin::new(h, mlp, true, vb.pp("0"))?,
            fc2: Lin::new(mlp, h, true, vb.pp("2"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.apply(x, true)?)
    }
}

/// A double-stream block: separate weights for text and image, joint attention.
#[derive(Debug, Clone)]
struct DoubleBlock {
    img_mod: Modulation,
    img_attn: SelfAttn,
    img_mlp: Mlp,
    txt_mod: Modulation,
    txt_attn: SelfAttn,
    txt_mlp: Mlp,
    heads: usize,
}

impl DoubleBlock {
    fn new(cfg: &FluxConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            img_mod: Modulation::new(h, true, vb.pp("img_mod"))?,
            img_attn: SelfAttn::new(cfg, vb.pp("img_attn"))?,
            img_mlp: Mlp::new(h, cfg.mlp_hidden(), vb.pp("img_mlp"))?,
            txt_mod: Modulation::new(h, true, vb.pp("txt_mod"))?,
            txt_attn: SelfAttn::new(cfg, vb.pp("txt_attn"))?,
            txt_mlp: Mlp::new(h, cfg.mlp_hidden(), vb.pp("txt_mlp"))?,
            heads: cfg.num_heads,
        })
    }

    /// FP8 in the groups `g` (see [`Flux::new_fp8`] for `lean`).
    fn convert_fp8(&mut self, g: Fp8Groups, lean: bool) -> Result<()> {
        for a in [&mut self.img_attn, &mut self.txt_attn] {
            convert(&mut a.qkv, g.double_attention, Fp8Mode::Products, lean)?;
            convert(&mut a.proj, g.double_attention, Fp8Mode::Products, lean)?;
        }
        for m in [&mut self.img_mlp, &mut self.txt_mlp] {
            convert(&mut m.fc1, g.double_mlp, Fp8Mode::Products, lean)?;
            convert(&mut m.fc2, g.double_mlp, Fp8Mode::Products, lean)?;
        }
        for m in [&mut self.img_mod, &mut self.txt_mod] {
            convert(&mut m.lin, g.modulations, Fp8Mode::WeightOnly, lean)?;
        }
        Ok(())
    }

    fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        ctx: &BlockCtx,
        attn: &dyn Attention,
        layer: usize,
    ) -> Result<(Tensor, Tensor)> {
        let img_m = self.img_mod.forward(&ctx.vec)?;
        let txt_m = self.txt_mod.forward(&ctx.vec)?;
        let img_qkv = self.img_attn.qkv.forward(&img_m[0].norm_modulate(img)?)?;
        let txt_qkv = self.txt_attn.qkv.forward(&txt_m[0].norm_modulate(txt)?)?;
        let (q, k, v) = qkv_prep(
            &[
                self.txt_attn.norm.stream(&txt_qkv),
                self.img_attn.norm.stream(&img_qkv),
            ],
            &ctx.pe,
            self.heads,
        )?;
        let out = ctx.attend_merged(attn, layer, &q, &k, &v)?;
        let txt_len = txt.dim(1)?;
        let txt_out = out.narrow(1, 0, txt_len)?;
        let img_out = out.narrow(1, txt_len, out.dim(1)? - txt_len)?;

        let img = img_m[0].gated_add(img, &self.img_attn.proj.forward(&img_out)?)?;
        let img_ff = self.img_mlp.forward(&img_m[1].norm_modulate(&img)?)?;
        let img = img_m[1].gated_add(&img, &img_ff)?;

        let txt = txt_m[0].gated_add(txt, &self.txt_attn.proj.forward(&txt_out)?)?;
        let txt_ff = self.txt_mlp.forward(&txt_m[1].norm_modulate(&txt)?)?;
        let txt = txt_m[1].gated_add(&txt, &txt_ff)?;
        Ok((img, txt))
    }
}

/// A single-stream block over the joined sequence: attention and MLP in parallel branches.
#[derive(Debug, Clone)]
struct SingleBlock {
    modulation: Modulation,
    /// linear1's rows that make q, k, v, and those that make the MLP's input (one weight
    /// tensor in the file, two products here so the MLP half gets bias + GELU fused).
    linear1_qkv: Lin,
    linear1_mlp: Lin,
    linear2: Lin,
    norm: QkNorm,
    heads: usize,
}

impl SingleBlock {
    fn new(cfg: &FluxConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let mlp = cfg.mlp_hidden();
        let linear1 = Lin::new(h, 3 * h + mlp, true, vb.pp("linear1"))?;
        Ok(Self {
            modulation: Modulation::new(h, false, vb.pp("modulation"))?,
            linear1_qkv: linear1.rows(0, 3 * h)?,
            linear1_mlp: linear1.rows(3 * h, mlp)?,
            linear2: Lin::new(h + mlp, h, true, vb.pp("linear2"))?,
            norm: QkNorm::new(cfg.head_dim(), vb.pp("norm"))?,
            heads: cfg.num_heads,
        })
    }

    /// FP8 in the groups `g` (see [`Flux::new_fp8`] for `lean`).
    fn convert_fp8(&mut self, g: Fp8Groups, lean: bool) -> Result<()> {
        convert(&mut self.linear1_qkv, g.single_in, Fp8Mode::Products, lean)?;
        convert(&mut self.linear1_mlp, g.single_in, Fp8Mode::Products, lean)?;
        convert(&mut self.linear2, g.single_out, Fp8Mode::Products, lean)?;
        convert(
            &mut self.modulation.lin,
            g.modulations,
            Fp8Mode::WeightOnly,
            lean,
        )
    }

    fn forward(
        &self,
        x: &Tensor,
        ctx: &BlockCtx,
        attn: &dyn Attention,
        layer: usize,
    ) -> Result<Tensor> {
        let m = &self.modulation.forward(&ctx.vec)?[0];
        let xm = m.norm_modulate(x)?;
        let qkv = self.linear1_qkv.forward(&xm)?;
        let (q, k, v) = qkv_prep(&[self.norm.stream(&qkv)], &ctx.pe, self.heads)?;
        let a = ctx.attend_merged(attn, layer, &q, &k, &v)?;
        // linear2's input: the attention output beside GELU(MLP half), which the product writes
        // straight into the joined buffer (bias and GELU in its epilogue).
        let joined = self.linear1_mlp.apply_beside(&a, &xm, true)?;
        let out = self.linear2.forward(&joined)?;
        m.gated_add(x, &out)
    }
}

/// What every block of one step needs besides the token streams.
#[derive(Debug, Clone)]
pub struct BlockCtx {
    /// The conditioning vector (B, hidden): timestep + guidance + pooled text.
    pub vec: Tensor,
    /// RoPE tables for the joint (text, image) sequence.
    pub pe: PosEmbed,
    /// Under sequence parallelism: how the group's ranks split the tokens (which rows of this
    /// rank's streams are padding).
    pub shards: Option<ShardLayout>,
}

impl BlockCtx {
    /// Attention through `attn` with heads merged, (B, Lq, H·D), as the output projection takes
    /// it; padded keys are left out when the shards hold padding.
    pub fn attend_merged(
        &self,
        attn: &dyn Attention,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        attn.attend_layer(layer, q, k, v, self.shards.as_ref())
    }

    /// The rows of this rank's image stream `img` (B, N, ..) that are real tokens: all of them
    /// unless the shards hold padding.
    pub fn real_image(&self, img: &Tensor) -> Result<Tensor> {
        match &self.shards {
            Some(layout) if layout.is_padded() => img.narrow(1, 0, layout.img_real(layout.rank)),
            _ => Ok(img.clone()),
        }
    }
}

/// Which groups of the blocks' linear layers run in FP8 ([`Flux::with_fp8_in`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8Groups {
    /// The double blocks' attention projections (qkv and output, both streams).
    pub double_attention: bool,
    /// The double blocks' MLPs (both streams).
    pub double_mlp: bool,
    /// The single blocks' input products (qkv and the MLP's first layer).
    pub single_in: bool,
    /// The single blocks' output product (`linear2`).
    pub single_out: bool,
    /// Every adaLN modulation, weight-only (W8A16: the weight stored in E4M3, the conditioning
    /// vector unrounded): not for speed (a matrix-vector product) but for memory, a quarter of
    /// FLUX.1's weights. Off in [`Fp8Groups::ALL`]; on under a memory budget.
    pub modulations: bool,
}

impl Default for Fp8Groups {
    fn default() -> Self {
        Self::NONE
    }
}

impl Fp8Groups {
    pub const NONE: Self = Self {
        double_attention: false,
        double_mlp: false,
        single_in: false,
        single_out: false,
        modulations: false,
    };
    /// Every block's products (what `--precision fp8` runs).
    pub const ALL: Self = Self {
        double_attention: true,
        double_mlp: true,
        single_in: true,
        single_out: true,
        modulations: false,
    };
    /// Every block's products, and the modulations stored in FP8 (a memory budget's choice).
    pub const ALL_AND_MODULATIONS: Self = Self {
        modulations: true,
        ..Self::ALL
    };

    /// Each group alone, then all, with their names.
    pub fn each() -> [(&'static str, Self); 7] {
        let n = Self::NONE;
        [
            (
                "double blocks: attention projections",
                Self {
                    double_attention: true,
                    ..n
                },
            ),
            (
                "double blocks: MLPs",
                Self {
                    double_mlp: true,
                    ..n
                },
            ),
            (
                "single blocks: linear1 (qkv + MLP in)",
                Self {
                    single_in: true,
                    ..n
                },
            ),
            (
                "single blocks: linear2",
                Self {
                    single_out: true,
                    ..n
                },
            ),
            (
                "adaLN modulations (weight-only)",
                Self {
                    modulations: true,
                    ..n
                },
            ),
            ("all products (--precision fp8)", Self::ALL),
            (
                "all products + modulations (--memory-budget)",
                Self::ALL_AND_MODULATIONS,
            ),
        ]
    }
}

/// A strategy that runs whole forward passes over several devices itself (PipeFusion), given
/// the replica whose stage API it calls. Cache policies call the stage API directly and bypass
/// it; the strategies that use one refuse them.
pub trait ForwardPlan: Send + Sync {
    /// The predicted velocity (B, N, 64) for the whole input, on every rank.
    fn forward(&self, model: &Flux, input: &FluxInput) -> Result<Tensor>;
}

/// The two token streams between blocks.
#[derive(Debug, Clone)]
pub struct Streams {
    /// Image tokens (B, N, hidden).
    pub img: Tensor,
    /// Text tokens (B, L, hidden).
    pub txt: Tensor,
}

/// Everything the transformer takes for one denoising step.
#[derive(Debug, Clone)]
pub struct FluxInput<'a> {
    /// Packed noisy latent (B, N, 64).
    pub img: &'a Tensor,
    /// T5 embeddings (B, L, context_in_dim).
    pub txt: &'a Tensor,
    /// Pooled CLIP embedding (B, vec_in_dim).
    pub y: &'a Tensor,
    /// Timesteps in [0, 1], (B,).
    pub timesteps: &'a Tensor,
    /// Guidance strength (B,), used when the model embeds guidance.
    pub guidance: Option<&'a Tensor>,
    pub pe: &'a PosEmbed,
}

/// The FLUX.1 transformer.
#[derive(Clone)]
pub struct Flux {
    img_in: Linear,
    txt_in: Linear,
    time_in: MlpEmbedder,
    vector_in: MlpEmbedder,
    guidance_in: Option<MlpEmbedder>,
    /// The blocks this replica holds (`None`: another pipeline stage's; [`Flux::only_blocks`]).
    double_blocks: Vec<Option<DoubleBlock>>,
    single_blocks: Vec<Option<SingleBlock>>,
    final_linear: Linear,
    final_mod: Linear,
    attention: Arc<dyn Attention>,
    /// The sequence-parallel group this replica belongs to, if any.
    sp: Option<Arc<dyn Communicator>>,
    /// Under displaced patches with rotation (piflux): forwards so far, which shifts the patch
    /// this rank computes by one each forward ([`Flux::with_patch_rotation`]).
    patch_rotation: Option<Arc<std::sync::atomic::AtomicUsize>>,
    /// A strategy that runs whole forwards itself (PipeFusion; [`Flux::with_plan`]).
    plan: Option<Arc<dyn ForwardPlan>>,
    cfg: FluxConfig,
    dtype: DType,
    device: Device,
    /// FP8 products (see [`Flux::with_fp8_products`]).
    fp8: bool,
}

impl std::fmt::Debug for Flux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flux")
            .field("cfg", &self.cfg)
            .field("dtype", &self.dtype)
            .field("attention", &self.attention.name())
            .finish()
    }
}

impl Flux {
    pub fn new(cfg: &FluxConfig, vb: VarBuilder) -> Result<Self> {
        Self::new_fp8(cfg, vb, Fp8Groups::NONE, false)
    }

    /// Load with FP8 in the groups `g`, each block converted as soon as it is loaded (so loading
    /// never holds more than one block beyond the converted model); with `lean`, the weights in
    /// the run's dtype are dropped wherever a GPU E4M3 copy stands for them (a memory budget).
    pub fn new_fp8(cfg: &FluxConfig, vb: VarBuilder, g: Fp8Groups, lean: bool) -> Result<Self> {
        Self::new_stage(cfg, vb, g, lean, 0..cfg.num_blocks())
    }

    /// [`Flux::new_fp8`] reading only the blocks `blocks` of the unified numbering (double
    /// blocks first): one pipeline stage's share, the other blocks never loaded. The embedders
    /// and the final layer are loaded on every stage (small beside the blocks).
    pub fn new_stage(
        cfg: &FluxConfig,
        vb: VarBuilder,
        g: Fp8Groups,
        lean: bool,
        blocks: Range<usize>,
    ) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let h = cfg.hidden_size;
        let dtype = vb.dtype();
        let device = vb.device().clone();
        let double_blocks = (0..cfg.depth)
            .map(|i| {
                if !blocks.contains(&i) {
                    return Ok(None);
                }
                let mut b = DoubleBlock::new(cfg, vb.pp(format!("double_blocks.{i}")))?;
                b.convert_fp8(g, lean)?;
                Ok(Some(b))
            })
            .collect::<Result<Vec<_>>>()?;
        let single_blocks = (0..cfg.depth_single_blocks)
            .map(|i| {
                if !blocks.contains(&(cfg.depth + i)) {
                    return Ok(None);
                }
                let mut b = SingleBlock::new(cfg, vb.pp(format!("single_blocks.{i}")))?;
                b.convert_fp8(g, lean)?;
                Ok(Some(b))
            })
            .collect::<Result<Vec<_>>>()?;
        let guidance_in = if cfg.guidance_embed {
            Some(MlpEmbedder::new(256, h, vb.pp("guidance_in"))?)
        } else {
            None
        };
        Ok(Self {
            img_in: linear(cfg.in_channels, h, vb.pp("img_in"))?,
            txt_in: linear(cfg.context_in_dim, h, vb.pp("txt_in"))?,
            time_in: MlpEmbedder::new(256, h, vb.pp("time_in"))?,
            vector_in: MlpEmbedder::new(cfg.vec_in_dim, h, vb.pp("vector_in"))?,
            guidance_in,
            double_blocks,
            single_blocks,
            final_linear: linear(h, cfg.in_channels, vb.pp("final_layer.linear"))?,
            final_mod: linear(h, 2 * h, vb.pp("final_layer.adaLN_modulation.1"))?,
            attention: Arc::new(LocalAttention::default()),
            sp: None,
            patch_rotation: None,
            plan: None,
            cfg: cfg.clone(),
            dtype,
            device,
            fp8: g != Fp8Groups::NONE,
        })
    }

    /// Make this replica one rank of a sequence-parallel group: [`Flux::embed`] keeps only this
    /// rank's shard of the text and image tokens (with their RoPE rows; padded when the counts do
    /// not divide by the group size, see [`crate::model::shard`]) and [`Flux::final_layer`]
    /// gathers every rank's velocity, so callers still pass and receive whole tensors. The
    /// attention must be the group's strategy (Ulysses, Ring, USP).
    pub fn with_sequence_parallel(mut self, group: Arc<dyn Communicator>) -> Self {
        self.sp = Some(group);
        self
    }

    /// Rotate the shards over the sequence-parallel group (piflux): forward f of rank r computes
    /// shard `(r + f) mod n`, counted in `forwards`; [`Flux::final_layer`] puts the gathered
    /// velocity back in order.
    pub fn with_patch_rotation(mut self, forwards: Arc<std::sync::atomic::AtomicUsize>) -> Self {
        self.patch_rotation = Some(forwards);
        self
    }

    /// The sequence-parallel group, if this replica is part of one.
    pub fn sp_group(&self) -> Option<&Arc<dyn Communicator>> {
        self.sp.as_ref()
    }

    /// FP8 products simulated in every block's linear layers (attention projections and MLPs):
    /// weights rounded to E4M3 per output channel now, activations per token at each product.
    /// What stays in the run's dtype is what the peers found breaks the image in FP8: the input
    /// embedders, the timestep/guidance/text embedders, every adaLN modulation, the final norm
    /// and output projection. Attention itself stays in the run's dtype.
    pub fn with_fp8_products(self) -> Result<Self> {
        self.with_fp8_in(Fp8Groups::ALL)
    }

    /// FP8 products in the chosen groups of layers only (to measure what each costs).
    pub fn with_fp8_in(mut self, g: Fp8Groups) -> Result<Self> {
        for b in self.double_blocks.iter_mut().flatten() {
            b.convert_fp8(g, false)?;
        }
        for b in self.single_blocks.iter_mut().flatten() {
            b.convert_fp8(g, false)?;
        }
        self.fp8 = g != Fp8Groups::NONE;
        Ok(self)
    }

    /// Bytes the transformer's weights hold on their device (what a memory budget counts).
    pub fn weight_bytes(&self) -> usize {
        let t = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let lin = |l: &Linear| t(l.weight()) + l.bias().map_or(0, t);
        let mlp = |m: &MlpEmbedder| lin(&m.in_layer) + lin(&m.out_layer);
        let norm = |n: &QkNorm| t(&n.query) + t(&n.key);
        let norms: usize = self
            .double_blocks
            .iter()
            .flatten()
            .map(|b| norm(&b.img_attn.norm) + norm(&b.txt_attn.norm))
            .chain(self.single_blocks.iter().flatten().map(|b| norm(&b.norm)))
            .sum();
        self.block_linears().map(Lin::weight_bytes).sum::<usize>()
            + norms
            + lin(&self.img_in)
            + lin(&self.txt_in)
            + mlp(&self.time_in)
            + mlp(&self.vector_in)
            + self.guidance_in.as_ref().map_or(0, mlp)
            + lin(&self.final_linear)
            + lin(&self.final_mod)
    }

    /// Every linear layer of the blocks (modulations included), in block order.
    fn block_linears(&self) -> impl Iterator<Item = &Lin> {
        let double = self.double_blocks.iter().flatten().flat_map(|b| {
            [
                &b.img_mod.lin,
                &b.txt_mod.lin,
                &b.img_attn.qkv,
                &b.img_attn.proj,
                &b.txt_attn.qkv,
                &b.txt_attn.proj,
                &b.img_mlp.fc1,
                &b.img_mlp.fc2,
                &b.txt_mlp.fc1,
                &b.txt_mlp.fc2,
            ]
        });
        let single = self.single_blocks.iter().flatten().flat_map(|b| {
            [
                &b.modulation.lin,
                &b.linear1_qkv,
                &b.linear1_mlp,
                &b.linear2,
            ]
        });
        double.chain(single)
    }

    /// Whether [`Flux::with_fp8_products`] was applied.
    pub fn fp8_products(&self) -> bool {
        self.fp8
    }

    /// Whether the layers converted to FP8 run as real FP8 kernels (cuBLASLt on an sm_89+ GPU in
    /// bf16) rather than simulated by rounding (whichever groups were converted).
    pub fn fp8_kernels(&self) -> bool {
        #[cfg(feature = "cuda")]
        {
            self.fp8 && self.block_linears().any(|l| l.fp8_gpu.is_some())
        }
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// Keep only the blocks `blocks` of the unified numbering (a pipeline stage's share; the
    /// others are dropped from this replica, and running them is an error).
    pub fn only_blocks(mut self, blocks: Range<usize>) -> Self {
        let depth = self.cfg.depth;
        for (i, b) in self.double_blocks.iter_mut().enumerate() {
            if !blocks.contains(&i) {
                *b = None;
            }
        }
        for (i, b) in self.single_blocks.iter_mut().enumerate() {
            if !blocks.contains(&(depth + i)) {
                *b = None;
            }
        }
        self
    }

    /// The blocks this replica holds, as a range of the unified numbering (empty when none).
    pub fn held_blocks(&self) -> Range<usize> {
        let depth = self.cfg.depth;
        let held: Vec<usize> = self
            .double_blocks
            .iter()
            .enumerate()
            .filter(|(_, b)| b.is_some())
            .map(|(i, _)| i)
            .chain(
                self.single_blocks
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| b.is_some())
                    .map(|(i, _)| depth + i),
            )
            .collect();
        match (held.first(), held.last()) {
            (Some(&a), Some(&b)) => a..b + 1,
            _ => 0..0,
        }
    }

    /// Let `plan` run every [`Flux::forward`] of this replica (it calls the stage API itself:
    /// [`Flux::embed_patch`], [`Flux::run_blocks`], [`Flux::final_layer`]).
    pub fn with_plan(mut self, plan: Arc<dyn ForwardPlan>) -> Self {
        self.plan = Some(plan);
        self
    }

    /// Replace the attention implementation (for parallel strategies).
    pub fn with_attention(mut self, attention: Arc<dyn Attention>) -> Self {
        self.attention = attention;
        self
    }

    pub fn attention(&self) -> &Arc<dyn Attention> {
        &self.attention
    }

    pub fn config(&self) -> &FluxConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// RoPE tables for `txt_len` text tokens and an `h` x `w` grid of image patches.
    pub fn pos_embed(&self, txt_len: usize, h: usize, w: usize) -> Result<PosEmbed> {
        let ids = position_ids(txt_len, h, w, &self.device)?;
        PosEmbed::new(&ids, &self.cfg.axes_dim, self.cfg.theta, self.dtype)
    }

    /// Input projections and the conditioning vector.
    pub fn embed(&self, input: &FluxInput) -> Result<(Streams, BlockCtx)> {
        match &self.sp {
            Some(group) => {
                let patch = match &self.patch_rotation {
                    Some(f) => {
                        let f = f.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        (group.rank() + f) % group.size()
                    }
                    None => group.rank(),
                };
                self.embed_patch(input, group.size(), patch)
            }
            None => {
                let vec = self.conditioning(input)?;
                Ok((self.embed_streams(input)?, self.ctx(vec, input.pe, None)))
            }
        }
    }

    /// [`Flux::embed`] of patch `patch` of `patches`: its shard of the text and image tokens
    /// (padded as [`Shard`] says), whatever group this replica belongs to.
    pub fn embed_patch(
        &self,
        input: &FluxInput,
        patches: usize,
        patch: usize,
    ) -> Result<(Streams, BlockCtx)> {
        let shard = Shard::new(input, patches, patch)?;
        let local = shard.input(input);
        let vec = self.conditioning(&local)?;
        Ok((
            self.embed_streams(&local)?,
            self.ctx(vec, &shard.pe, Some(shard.layout)),
        ))
    }

    /// What every block needs besides the tokens, from a conditioning vector and RoPE rows.
    pub fn ctx(&self, vec: Tensor, pe: &PosEmbed, shards: Option<ShardLayout>) -> BlockCtx {
        BlockCtx {
            vec,
            pe: pe.clone(),
            shards,
        }
    }

    /// The input projections of the token streams.
    pub fn embed_streams(&self, input: &FluxInput) -> Result<Streams> {
        let img = self.img_in.forward(&input.img.to_dtype(self.dtype)?)?;
        let txt = self.txt_in.forward(&input.txt.to_dtype(self.dtype)?)?;
        Ok(Streams { img, txt })
    }

    /// The conditioning vector (B, hidden): timestep, guidance and pooled text embedded.
    pub fn conditioning(&self, input: &FluxInput) -> Result<Tensor> {
        let mut vec =
            self.time_in
                .forward(&timestep_embedding(input.timesteps, 256, self.dtype)?)?;
        if let Some(g_in) = &self.guidance_in {
            let g = match input.guidance {
                Some(g) => g.clone(),
                None => {
                    candle_core::bail!("this model embeds guidance: a guidance value is required")
                }
            };
            vec = (vec + g_in.forward(&timestep_embedding(&g, 256, self.dtype)?)?)?;
        }
        self.vector_in.forward(&input.y.to_dtype(self.dtype)?)? + vec
    }

    /// Run blocks `range` of the unified numbering (double blocks first, then single blocks).
    pub fn run_blocks(&self, s: Streams, ctx: &BlockCtx, range: Range<usize>) -> Result<Streams> {
        let Streams { mut img, mut txt } = s;
        let attn = self.attention.as_ref();
        let depth = self.cfg.depth;
        let absent = |i: usize| {
            candle_core::Error::Msg(format!(
                "block {i} is not held by this replica (another pipeline stage's)"
            ))
        };
        for i in range.start..range.end.min(depth) {
            let b = self.double_blocks[i].as_ref().ok_or_else(|| absent(i))?;
            (img, txt) = b.forward(&img, &txt, ctx, attn, i)?;
        }
        let single_start = range.start.max(depth);
        let single_end = range.end.min(self.cfg.num_blocks());
        if single_start < single_end {
            let txt_len = txt.dim(1)?;
            let mut x = Tensor::cat(&[&txt, &img], 1)?;
            for i in single_start..single_end {
                let b = self.single_blocks[i - depth]
                    .as_ref()
                    .ok_or_else(|| absent(i))?;
                x = b.forward(&x, ctx, attn, i)?;
            }
            txt = x.narrow(1, 0, txt_len)?;
            img = x.narrow(1, txt_len, x.dim(1)? - txt_len)?;
        }
        Ok(Streams { img, txt })
    }

    /// The final adaLN and projection back to packed latent channels (B, N, 64).
    pub fn final_layer(&self, img: &Tensor, ctx: &BlockCtx) -> Result<Tensor> {
        let m = self.final_mod.forward(&ctx.vec.silu()?)?.unsqueeze(1)?;
        let c = m.chunk(2, D::Minus1)?;
        let (shift, scale) = (&c[0], &c[1]);
        let v = self
            .final_linear
            .forward(&ln_modulate(img, shift, scale)?)?;
        match (&self.sp, &ctx.shards) {
            // Every rank's shard: in rank order, or under rotation in shard order again;
            // padding sits at the end of the image stream.
            (Some(group), Some(layout)) => {
                let all = group.all_gather(&v, 1)?;
                let n = group.size();
                let shift = (layout.rank + n - group.rank()) % n;
                let all = if shift == 0 {
                    all
                } else {
                    // Shard q came from rank (q - shift) mod n.
                    let chunk = layout.img_shard;
                    let parts = (0..n)
                        .map(|q| all.narrow(1, ((q + n - shift) % n) * chunk, chunk))
                        .collect::<Result<Vec<_>>>()?;
                    Tensor::cat(&parts, 1)?
                };
                if layout.is_padded() {
                    all.narrow(1, 0, layout.img_len)
                } else {
                    Ok(all)
                }
            }
            (Some(group), None) => group.all_gather(&v, 1),
            (None, _) => Ok(v),
        }
    }

    /// The whole transformer: predicted velocity (B, N, 64).
    pub fn forward(&self, input: &FluxInput) -> Result<Tensor> {
        if let Some(plan) = &self.plan {
            return plan.forward(self, input);
        }
        let (s, ctx) = self.embed(input)?;
        let s = self.run_blocks(s, &ctx, 0..self.cfg.num_blocks())?;
        self.final_layer(&s.img, &ctx)
    }
}

/// (B, 16, H, W) latent -> (B, H/2 * W/2, 64) patch tokens.
pub fn pack_latent(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((b, (h / 2) * (w / 2), c * 4))
}

/// Inverse of [`pack_latent`] for a latent of `h` x `w` (latent pixels).
pub fn unpack_latent(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _n, cp) = x.dims3()?;
    let c = cp / 4;
    x.reshape((b, h / 2, w / 2, c, 2, 2))?
        .permute((0, 3, 1, 4, 2, 5))?
        .reshape((b, c, h, w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::demo_weights::DemoWeights;

    #[test]
    fn pack_unpack_round_trip() -> Result<()> {
        let x =
            Tensor::arange(0f32, 2.0 * 16.0 * 4.0 * 6.0, &Device::Cpu)?.reshape((2, 16, 4, 6))?;
        let p = pack_latent(&x)?;
        assert_eq!(p.dims(), &[2, 6, 64]);
        // Token 0 holds the 2x2 patch at the top-left of every channel, channel-major.
        let t0: Vec<f32> = p.get(0)?.get(0)?.to_vec1()?;
        assert_eq!(&t0[..4], &[0.0, 1.0, 6.0, 7.0]);
        let back = unpack_latent(&p, 4, 6)?;
        let d = (back - x)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        Ok(())
    }

    #[test]
    fn rope_matches_explicit_rotation() -> Result<()> {
        let dev = Device::Cpu;
        let ids = position_ids(2, 3, 2, &dev)?;
        let pe = PosEmbed::new(&ids, &[4, 6, 6], 10_000.0, DType::F32)?;
        let x = Tensor::randn(0f32, 1.0, (1, 1, 8, 16), &dev)?;
        let got = apply_rope(&x, &pe)?;
        // Explicit: pair (2i, 2i+1) rotated by angle a_i.
        let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let cos: Vec<Vec<f32>> = pe.cos.to_vec2()?;
        let sin: Vec<Vec<f32>> = pe.sin.to_vec2()?;
        let mut want = vec![0f32; xv.len()];
        for l in 0..8 {
            for i in 0..8 {
                let (a, b) = (xv[l * 16 + 2 * i], xv[l * 16 + 2 * i + 1]);
                want[l * 16 + 2 * i] = a * cos[l][i] - b * sin[l][i];
                want[l * 16 + 2 * i + 1] = a * sin[l][i] + b * cos[l][i];
            }
        }
        let got: Vec<f32> = got.flatten_all()?.to_vec1()?;
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
        // Text tokens sit at position 0 on every axis: no rotation at all.
        assert_eq!(&got[..32], &xv[..32]);
        Ok(())
    }

    #[test]
    fn flop_count_matches_the_published_floor() {
        // 1024x1024: 4096 image + 512 text tokens; 59.5 TFLOP linear + 14.9 attention ~ 74.4.
        let f = FluxConfig::dev().flops_per_step(512, 4096) / 1e12;
        assert!((f - 74.4).abs() < 0.5, "{f}");
    }

    #[test]
    fn timestep_embedding_values() -> Result<()> {
        let t = Tensor::new(&[0.5f32], &Device::Cpu)?;
        let e: Vec<f32> = timestep_embedding(&t, 8, DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        // t*1000 = 500; freqs 10000^(-i/4)
        for i in 0..4 {
            let a = 500.0 * (-(10_000f64.ln()) * i as f64 / 4.0).exp();
            assert!((e[i] as f64 - a.cos()).abs() < 1e-3);
            assert!((e[i + 4] as f64 - a.sin()).abs() < 1e-3);
        }
        Ok(())
    }

    #[test]
    fn blocks_in_pieces_equal_forward() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = FluxConfig::tiny();
        let m = Flux::new(&cfg, DemoWeights::new(3).var_builder(DType::F32, &dev))?;
        let img = Tensor::randn(0f32, 1.0, (1, 16, 64), &dev)?;
        let txt = Tensor::randn(0f32, 1.0, (1, 5, cfg.context_in_dim), &dev)?;
        let y = Tensor::randn(0f32, 1.0, (1, cfg.vec_in_dim), &dev)?;
        let t = Tensor::new(&[0.7f32], &dev)?;
        let g = Tensor::new(&[3.5f32], &dev)?;
        let pe = m.pos_embed(5, 4, 4)?;
        let input = FluxInput {
            img: &img,
            txt: &txt,
            y: &y,
            timesteps: &t,
            guidance: Some(&g),
            pe: &pe,
        };
        let full = m.forward(&input)?;
        assert_eq!(full.dims(), &[1, 16, 64]);
        let (s, ctx) = m.embed(&input)?;
        let s = m.run_blocks(s, &ctx, 0..1)?;
        let s = m.run_blocks(s, &ctx, 1..3)?;
        let s = m.run_blocks(s, &ctx, 3..cfg.num_blocks())?;
        let pieces = m.final_layer(&s.img, &ctx)?;
        let d = (full - pieces)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        Ok(())
    }
}
