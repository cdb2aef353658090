//! A second model family, for tests only: FLUX.1's double- and single-stream layout with SwiGLU
//! MLPs, no biases, modulation shared across blocks (one set for the double blocks' image
//! stream, one for their text stream, one for the single blocks), fused single-block input
//! projections, a 4-axis RoPE (theta 2000), no pooled text vector and a 32-channel latent
//! ([`LATENT`], decoded by [`SwigluCodec`]): the shape of the next
//! family, at a tiny size, enough to exercise the seams of [`parallax::model::family`]. Nothing
//! outside this folder knows it; tests register it at run time ([`register`]).

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{linear_no_bias, Linear, RmsNorm, VarBuilder};
use parallax::collective::Communicator;
use parallax::model::attention::{Attention, LocalAttention};
use parallax::model::demo_weights::DemoWeights;
use parallax::model::family::{
    BlockCtx, Denoiser, Family, LatentCodec, LatentSpec, PosEmbed, StepInput, Streams, TextSpec,
};
use parallax::model::step::apply_rope;

/// The family's registry name.
pub const NAME: &str = "swiglu-tiny";

/// Its latent: 32 channels (FLUX.2's count, twice FLUX.1's), 2x2 patches, 8 pixels a latent
/// pixel.
pub const LATENT: LatentSpec = LatentSpec {
    channels: 32,
    patch: 2,
    downscale: 8,
};

/// Sizes of the tiny model.
#[derive(Debug, Clone)]
pub struct SwigluConfig {
    /// Packed latent token width ([`LATENT`]: 32 channels x 2x2).
    pub in_channels: usize,
    /// Text hidden-state width (a decoder LM's joined layers, here made up).
    pub txt_dim: usize,
    pub hidden: usize,
    pub heads: usize,
    pub mlp_hidden: usize,
    pub depth: usize,
    pub depth_single: usize,
    /// RoPE dims per position axis (4 axes: time, row, column, text index).
    pub axes_dim: [usize; 4],
    pub theta: f64,
}

impl SwigluConfig {
    pub fn tiny() -> Self {
        Self {
            in_channels: LATENT.token_channels(),
            txt_dim: 48,
            hidden: 64,
            heads: 2,
            mlp_hidden: 96,
            depth: 2,
            depth_single: 3,
            axes_dim: [8, 8, 8, 8],
            theta: 2000.0,
        }
    }
    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }
}

/// `w2(silu(a) * b)` with `[a, b] = w13(x)`.
#[derive(Debug, Clone)]
struct SwiGlu {
    w13: Linear,
    w2: Linear,
}

impl SwiGlu {
    fn new(h: usize, m: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            w13: linear_no_bias(h, 2 * m, vb.pp("w13"))?,
            w2: linear_no_bias(m, h, vb.pp("w2"))?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let ab = self.w13.forward(x)?.chunk(2, D::Minus1)?;
        self.w2.forward(&(ab[0].silu()? * &ab[1])?)
    }
}

/// Shift, scale and gate triples of a shared modulation.
type Mods = Vec<(Tensor, Tensor, Tensor)>;

/// `lin(silu(vec))` split into `n` triples, each (B, 1, hidden).
fn modulate(lin: &Linear, vec: &Tensor, n: usize) -> Result<Mods> {
    let m = lin.forward(&vec.silu()?)?.unsqueeze(1)?;
    let c = m.chunk(3 * n, D::Minus1)?;
    Ok((0..n)
        .map(|i| (c[3 * i].clone(), c[3 * i + 1].clone(), c[3 * i + 2].clone()))
        .collect())
}

fn norm_mod(x: &Tensor, (shift, scale, _): &(Tensor, Tensor, Tensor)) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let n = xc.broadcast_div(&(var + 1e-6)?.sqrt()?)?;
    n.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
}

fn gated(x: &Tensor, (_, _, gate): &(Tensor, Tensor, Tensor), u: &Tensor) -> Result<Tensor> {
    x + u.broadcast_mul(gate)?
}

/// Per-head RMS norms of queries and keys.
#[derive(Debug, Clone)]
struct QkNorm {
    q: RmsNorm,
    k: RmsNorm,
}

impl QkNorm {
    fn new(d: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            q: candle_nn::rms_norm(d, 1e-6, vb.pp("query_norm"))?,
            k: candle_nn::rms_norm(d, 1e-6, vb.pp("key_norm"))?,
        })
    }
}

/// (B, L, 3·H·D) -> q, k, v as (B, H, L, D), q and k normed.
fn split_qkv(qkv: &Tensor, heads: usize, norm: &QkNorm) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, l, three_hd) = qkv.dims3()?;
    let d = three_hd / 3 / heads;
    let qkv = qkv.reshape((b, l, 3, heads, d))?.permute((2, 0, 3, 1, 4))?;
    let q = norm.q.forward(&qkv.get(0)?.contiguous()?)?;
    let k = norm.k.forward(&qkv.get(1)?.contiguous()?)?;
    Ok((q, k, qkv.get(2)?.contiguous()?))
}

#[derive(Debug, Clone)]
struct DoubleBlock {
    img_qkv: Linear,
    img_norm: QkNorm,
    img_proj: Linear,
    img_mlp: SwiGlu,
    txt_qkv: Linear,
    txt_norm: QkNorm,
    txt_proj: Linear,
    txt_mlp: SwiGlu,
}

#[derive(Debug, Clone)]
struct SingleBlock {
    /// qkv and the SwiGLU's `w13` in one product.
    linear1: Linear,
    norm: QkNorm,
    /// The attention output and the SwiGLU's hidden, projected together.
    linear2: Linear,
}

/// The tiny SwiGLU transformer.
#[derive(Debug, Clone)]
pub struct SwigluModel {
    cfg: SwigluConfig,
    img_in: Linear,
    txt_in: Linear,
    time_in: (Linear, Linear),
    double_mod_img: Linear,
    double_mod_txt: Linear,
    single_mod: Linear,
    double: Vec<DoubleBlock>,
    single: Vec<SingleBlock>,
    final_mod: Linear,
    final_linear: Linear,
    dtype: DType,
    device: Device,
}

impl SwigluModel {
    pub fn new(cfg: &SwigluConfig, vb: VarBuilder) -> Result<Self> {
        let (h, m, d) = (cfg.hidden, cfg.mlp_hidden, cfg.head_dim());
        let double = (0..cfg.depth)
            .map(|i| {
                let vb = vb.pp(format!("double_blocks.{i}"));
                Ok(DoubleBlock {
                    img_qkv: linear_no_bias(h, 3 * h, vb.pp("img_attn.qkv"))?,
                    img_norm: QkNorm::new(d, vb.pp("img_attn.norm"))?,
                    img_proj: linear_no_bias(h, h, vb.pp("img_attn.proj"))?,
                    img_mlp: SwiGlu::new(h, m, vb.pp("img_mlp"))?,
                    txt_qkv: linear_no_bias(h, 3 * h, vb.pp("txt_attn.qkv"))?,
                    txt_norm: QkNorm::new(d, vb.pp("txt_attn.norm"))?,
                    txt_proj: linear_no_bias(h, h, vb.pp("txt_attn.proj"))?,
                    txt_mlp: SwiGlu::new(h, m, vb.pp("txt_mlp"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let single = (0..cfg.depth_single)
            .map(|i| {
                let vb = vb.pp(format!("single_blocks.{i}"));
                Ok(SingleBlock {
                    linear1: linear_no_bias(h, 3 * h + 2 * m, vb.pp("linear1"))?,
                    norm: QkNorm::new(d, vb.pp("norm"))?,
                    linear2: linear_no_bias(h + m, h, vb.pp("linear2"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            img_in: linear_no_bias(cfg.in_channels, h, vb.pp("img_in"))?,
            txt_in: linear_no_bias(cfg.txt_dim, h, vb.pp("txt_in"))?,
            time_in: (
                linear_no_bias(256, h, vb.pp("time_in.in_layer"))?,
                linear_no_bias(h, h, vb.pp("time_in.out_layer"))?,
            ),
            double_mod_img: linear_no_bias(h, 6 * h, vb.pp("double_stream_modulation_img"))?,
            double_mod_txt: linear_no_bias(h, 6 * h, vb.pp("double_stream_modulation_txt"))?,
            single_mod: linear_no_bias(h, 3 * h, vb.pp("single_stream_modulation"))?,
            double,
            single,
            final_mod: linear_no_bias(h, 2 * h, vb.pp("final_layer.adaLN_modulation"))?,
            final_linear: linear_no_bias(h, cfg.in_channels, vb.pp("final_layer.linear"))?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
            cfg: cfg.clone(),
        })
    }

    /// Joint attention of `q`, `k`, `v` (B, H, L, D) with RoPE, heads merged (B, L, H·D).
    fn attend(
        &self,
        ctx: &BlockCtx,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let q = apply_rope(q, &ctx.pe)?;
        let k = apply_rope(k, &ctx.pe)?;
        let attn: &dyn Attention = &LocalAttention::default();
        ctx.attend_merged(attn, layer, &q, &k, v)
    }
}

/// Sinusoidal embedding of timesteps in [0, 1], 256 wide.
fn time_embedding(t: &Tensor, dtype: DType) -> Result<Tensor> {
    let half = 128;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10_000f64.ln()) * i as f64 / half as f64).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = (t.to_dtype(DType::F32)? * 1000.0)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)?.to_dtype(dtype)
}

impl Denoiser for SwigluModel {
    fn family(&self) -> &'static str {
        NAME
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
    fn num_blocks(&self) -> usize {
        self.cfg.depth + self.cfg.depth_single
    }
    fn num_heads(&self) -> usize {
        self.cfg.heads
    }
    fn hidden_size(&self) -> usize {
        self.cfg.hidden
    }
    fn block_params(&self) -> Vec<u64> {
        let (h, m, d) = (
            self.cfg.hidden as u64,
            self.cfg.mlp_hidden as u64,
            self.cfg.head_dim() as u64,
        );
        let stream = 3 * h * h + h * h + 2 * h * m + m * h + 2 * d;
        let single = h * (3 * h + 2 * m) + (h + m) * h + 2 * d;
        std::iter::repeat_n(2 * stream, self.cfg.depth)
            .chain(std::iter::repeat_n(single, self.cfg.depth_single))
            .collect()
    }
    fn text_spec(&self) -> TextSpec {
        TextSpec {
            txt_dim: self.cfg.txt_dim,
            pooled_dim: None,
            guidance_embed: false,
        }
    }
    fn token_channels(&self) -> usize {
        self.cfg.in_channels
    }
    /// Text tokens at (0, 0, 0, i), image tokens at (0, row, column, 0).
    fn pos_embed(&self, txt_len: usize, h: usize, w: usize) -> Result<PosEmbed> {
        let mut ids = vec![0f32; (txt_len + h * w) * 4];
        for i in 0..txt_len {
            ids[i * 4 + 3] = i as f32;
        }
        for r in 0..h {
            for c in 0..w {
                let i = (txt_len + r * w + c) * 4;
                ids[i + 1] = r as f32;
                ids[i + 2] = c as f32;
            }
        }
        let ids = Tensor::from_vec(ids, (txt_len + h * w, 4), &self.device)?;
        PosEmbed::new(&ids, &self.cfg.axes_dim, self.cfg.theta, self.dtype)
    }
    fn conditioning(&self, input: &StepInput) -> Result<Tensor> {
        let t = time_embedding(input.timesteps, self.dtype)?;
        self.time_in.1.forward(&self.time_in.0.forward(&t)?.silu()?)
    }
    fn embed_streams(&self, input: &StepInput) -> Result<Streams> {
        let img = self.img_in.forward(&input.img.to_dtype(self.dtype)?)?;
        let txt = self.txt_in.forward(&input.txt.to_dtype(self.dtype)?)?;
        Ok(Streams { img, txt })
    }
    fn run_blocks(&self, s: Streams, ctx: &BlockCtx, range: Range<usize>) -> Result<Streams> {
        let Streams { mut img, mut txt } = s;
        let (heads, depth) = (self.cfg.heads, self.cfg.depth);
        if range.start < depth {
            let mi = modulate(&self.double_mod_img, &ctx.vec, 2)?;
            let mt = modulate(&self.double_mod_txt, &ctx.vec, 2)?;
            for i in range.start..range.end.min(depth) {
                let b = &self.double[i];
                let (iq, ik, iv) = split_qkv(
                    &b.img_qkv.forward(&norm_mod(&img, &mi[0])?)?,
                    heads,
                    &b.img_norm,
                )?;
                let (tq, tk, tv) = split_qkv(
                    &b.txt_qkv.forward(&norm_mod(&txt, &mt[0])?)?,
                    heads,
                    &b.txt_norm,
                )?;
                let q = Tensor::cat(&[&tq, &iq], 2)?;
                let k = Tensor::cat(&[&tk, &ik], 2)?;
                let v = Tensor::cat(&[&tv, &iv], 2)?;
                let a = self.attend(ctx, i, &q, &k, &v)?;
                let l = txt.dim(1)?;
                let (ta, ia) = (a.narrow(1, 0, l)?, a.narrow(1, l, a.dim(1)? - l)?);
                img = gated(&img, &mi[0], &b.img_proj.forward(&ia)?)?;
                img = gated(&img, &mi[1], &b.img_mlp.forward(&norm_mod(&img, &mi[1])?)?)?;
                txt = gated(&txt, &mt[0], &b.txt_proj.forward(&ta)?)?;
                txt = gated(&txt, &mt[1], &b.txt_mlp.forward(&norm_mod(&txt, &mt[1])?)?)?;
            }
        }
        let (start, end) = (range.start.max(depth), range.end.min(self.num_blocks()));
        if start < end {
            let ms = modulate(&self.single_mod, &ctx.vec, 1)?;
            let (h, m) = (self.cfg.hidden, self.cfg.mlp_hidden);
            let l = txt.dim(1)?;
            let mut x = Tensor::cat(&[&txt, &img], 1)?;
            for i in start..end {
                let b = &self.single[i - depth];
                let y = b.linear1.forward(&norm_mod(&x, &ms[0])?)?;
                let (q, k, v) = split_qkv(&y.narrow(D::Minus1, 0, 3 * h)?, heads, &b.norm)?;
                let ab = y.narrow(D::Minus1, 3 * h, 2 * m)?.chunk(2, D::Minus1)?;
                let a = self.attend(ctx, i, &q, &k, &v)?;
                let hidden = (ab[0].silu()? * &ab[1])?;
                let u = b
                    .linear2
                    .forward(&Tensor::cat(&[&a, &hidden], D::Minus1)?)?;
                x = gated(&x, &ms[0], &u)?;
            }
            txt = x.narrow(1, 0, l)?;
            img = x.narrow(1, l, x.dim(1)? - l)?;
        }
        Ok(Streams { img, txt })
    }
    fn final_layer(&self, img: &Tensor, ctx: &BlockCtx) -> Result<Tensor> {
        let m = self.final_mod.forward(&ctx.vec.silu()?)?.unsqueeze(1)?;
        let c = m.chunk(2, D::Minus1)?;
        let mods = (c[0].clone(), c[1].clone(), c[0].zeros_like()?);
        self.final_linear.forward(&norm_mod(img, &mods)?)
    }
    fn forward(&self, input: &StepInput) -> Result<Tensor> {
        let (s, ctx) = self.embed(input)?;
        let s = self.run_blocks(s, &ctx, 0..self.num_blocks())?;
        self.final_layer(&s.img, &ctx)
    }
    fn sp_group(&self) -> Option<&Arc<dyn Communicator>> {
        None
    }
    fn held_blocks(&self) -> Range<usize> {
        0..self.num_blocks()
    }
    /// Keeps every block (small enough that a stage holding the others costs nothing).
    fn keep_blocks(&self, _blocks: Range<usize>) -> Arc<dyn Denoiser> {
        Arc::new(self.clone())
    }
    fn weight_bytes(&self) -> usize {
        self.block_params().iter().sum::<u64>() as usize * self.dtype.size_in_bytes()
    }
}

/// The family's registry entry.
#[derive(Debug, Clone, Copy)]
pub struct SwigluFamily;

impl Family for SwigluFamily {
    fn name(&self) -> &'static str {
        NAME
    }
    /// Its own tensor names: the shared modulations and no pooled-text embedder.
    fn recognises(&self, tensor_names: &[&str]) -> bool {
        tensor_names
            .iter()
            .any(|n| n.ends_with("double_stream_modulation_img.weight"))
    }
    fn tiny_transformer(
        &self,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Arc<dyn Denoiser>> {
        let vb = DemoWeights::new(seed).var_builder(dtype, device);
        Ok(Arc::new(SwigluModel::new(&SwigluConfig::tiny(), vb)?))
    }
}

/// The family's tiny autoencoder, decode only: each latent pixel's 32 channels mapped to RGB by
/// a made-up linear layer, squashed by tanh into [-1, 1], drawn as an 8x8 block.
pub struct SwigluCodec {
    to_rgb: Linear,
    device: Device,
}

impl SwigluCodec {
    pub fn new(seed: u64, device: &Device) -> Result<Self> {
        let vb = DemoWeights::new(seed).var_builder(DType::F32, device);
        Ok(Self {
            to_rgb: linear_no_bias(LATENT.channels, 3, vb.pp("to_rgb"))?,
            device: device.clone(),
        })
    }
}

impl LatentCodec for SwigluCodec {
    fn latent_spec(&self) -> LatentSpec {
        LATENT
    }
    fn decode_latent(&self, z: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = z.dims4()?;
        let f = LATENT.downscale;
        let rgb = self
            .to_rgb
            .forward(&z.permute((0, 2, 3, 1))?)?
            .tanh()?
            .permute((0, 3, 1, 2))?;
        rgb.upsample_nearest2d(h * f, w * f)
    }
    fn device(&self) -> &Device {
        &self.device
    }
    fn dtype(&self) -> DType {
        DType::F32
    }
}

/// Add the family to the registry (idempotent).
pub fn register() {
    parallax::model::family::register(Arc::new(SwigluFamily));
}
