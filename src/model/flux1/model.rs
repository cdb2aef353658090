//! The FLUX.1 transformer (MMDiT): 19 double-stream blocks, where text and image tokens keep their
//! own weights but attend jointly, then 38 single-stream blocks over the joined sequence.
//!
//! Tensor names are Black Forest Labs' (`double_blocks.0.img_attn.qkv.weight`, ...); other layouts
//! are mapped onto them by [`crate::model::layout`]. The forward pass is split into stages
//! ([`Flux::embed`], [`Flux::run_blocks`], [`Flux::final_layer`]) so that a cache policy can run the
//! first block alone and a pipeline-parallel strategy can run a range of blocks. The model holds
//! only itself: attention is its one-device [`LocalAttention`] unless the block context carries a
//! parallel strategy's ([`BlockCtx::attention`], set by the replicas of `crate::parallel::replica`).

use std::ops::Range;

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{linear, VarBuilder};

use super::config::FluxConfig;
use crate::kernels::elementwise::{gated_residual, ln_modulate};
use crate::kernels::qkv_prep::{qkv_prep, QkvStream};
use crate::model::attention::{Attention, LocalAttention};
use crate::model::linear::{convert, Fp8Groups, Fp8Mode, Lin, Normed};
use crate::model::lowrank::{AdaptedLinear, LowRankSource};
pub use crate::model::step::{apply_rope, BlockCtx, PosEmbed, StepInput, Streams};

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

/// A plain linear layer with room for a LoRA path.
fn adapted(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<AdaptedLinear> {
    Ok(AdaptedLinear::new(linear(in_dim, out_dim, vb)?))
}

/// Two-layer MLP embedder: linear, SiLU, linear.
#[derive(Debug, Clone)]
struct MlpEmbedder {
    in_layer: AdaptedLinear,
    out_layer: AdaptedLinear,
}

impl MlpEmbedder {
    fn new(in_dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            in_layer: adapted(in_dim, hidden, vb.pp("in_layer"))?,
            out_layer: adapted(hidden, hidden, vb.pp("out_layer"))?,
        })
    }
}

impl Module for MlpEmbedder {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out_layer.forward(&self.in_layer.forward(x)?.silu()?)
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

    /// [`ModulationOut::norm_modulate`] for the layers `readers`, in E4M3 where they all run FP8
    /// products on the GPU (the norm's kernel quantises its rows: [`Normed::for_layers`]).
    pub(crate) fn norm_for(&self, x: &Tensor, readers: &[&Lin]) -> Result<Normed> {
        Normed::for_layers(x, &self.shift, &self.scale, readers)
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
pub(crate) struct QkNorm {
    pub(crate) query: Tensor,
    pub(crate) key: Tensor,
}

impl QkNorm {
    pub(crate) fn new(head_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            query: vb.get(head_dim, "query_norm.scale")?,
            key: vb.get(head_dim, "key_norm.scale")?,
        })
    }

    /// This norm's scales with the QKV projection they apply to.
    pub(crate) fn stream<'a>(&'a self, qkv: &'a Tensor) -> QkvStream<'a> {
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

impl Mlp {
    /// fc2(GELU(fc1(x))) on the norm's output.
    fn forward_normed(&self, x: &Normed) -> Result<Tensor> {
        self.fc2.forward(&self.fc1.apply_normed(x, true)?)
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
        let (img_qkv, txt_qkv) = (&self.img_attn.qkv, &self.txt_attn.qkv);
        let img_qkv = img_qkv.apply_normed(&img_m[0].norm_for(img, &[img_qkv])?, false)?;
        let txt_qkv = txt_qkv.apply_normed(&txt_m[0].norm_for(txt, &[txt_qkv])?, false)?;
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
        let img_ff = self
            .img_mlp
            .forward_normed(&img_m[1].norm_for(&img, &[&self.img_mlp.fc1])?)?;
        let img = img_m[1].gated_add(&img, &img_ff)?;

        let txt = txt_m[0].gated_add(txt, &self.txt_attn.proj.forward(&txt_out)?)?;
        let txt_ff = self
            .txt_mlp
            .forward_normed(&txt_m[1].norm_for(&txt, &[&self.txt_mlp.fc1])?)?;
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
        // Both halves of linear1 read the norm's rows: quantised once when both run FP8 products
        // on the GPU (in the norm's pass with the fused kernel, right after it otherwise).
        let xm = m.norm_for(x, &[&self.linear1_qkv, &self.linear1_mlp])?;
        let qkv = self.linear1_qkv.apply_normed(&xm, false)?;
        let (q, k, v) = qkv_prep(&[self.norm.stream(&qkv)], &ctx.pe, self.heads)?;
        let a = ctx.attend_merged(attn, layer, &q, &k, &v)?;
        // linear2's input: the attention output beside GELU(MLP half), which the product writes
        // straight into the joined buffer (bias and GELU in its epilogue).
        let joined = self.linear1_mlp.apply_beside_normed(&a, &xm, true)?;
        let out = self.linear2.forward(&joined)?;
        m.gated_add(x, &out)
    }
}

/// FLUX.1's name for one step's input (the same type as every family's).
pub type FluxInput<'a> = StepInput<'a>;

/// The FLUX.1 transformer.
#[derive(Clone)]
pub struct Flux {
    img_in: AdaptedLinear,
    txt_in: AdaptedLinear,
    time_in: MlpEmbedder,
    vector_in: MlpEmbedder,
    guidance_in: Option<MlpEmbedder>,
    /// The blocks this replica holds (`None`: another pipeline stage's; [`Flux::only_blocks`]).
    double_blocks: Vec<Option<DoubleBlock>>,
    single_blocks: Vec<Option<SingleBlock>>,
    final_linear: AdaptedLinear,
    final_mod: AdaptedLinear,
    /// Attention on this device (blocks use the context's where a parallel replica set one).
    attention: LocalAttention,
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
            img_in: adapted(cfg.in_channels, h, vb.pp("img_in"))?,
            txt_in: adapted(cfg.context_in_dim, h, vb.pp("txt_in"))?,
            time_in: MlpEmbedder::new(256, h, vb.pp("time_in"))?,
            vector_in: MlpEmbedder::new(cfg.vec_in_dim, h, vb.pp("vector_in"))?,
            guidance_in,
            double_blocks,
            single_blocks,
            final_linear: adapted(h, cfg.out_channels(), vb.pp("final_layer.linear"))?,
            final_mod: adapted(h, 2 * h, vb.pp("final_layer.adaLN_modulation.1"))?,
            attention: LocalAttention::default(),
            cfg: cfg.clone(),
            dtype,
            device,
            fp8: g != Fp8Groups::NONE,
        })
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
        let lin = |l: &AdaptedLinear| {
            t(l.base.weight())
                + l.base.bias().map_or(0, t)
                + l.lora.as_ref().map_or(0, |l| l.bytes())
        };
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

    /// This transformer with the LoRAs of `set` beside its layers (those of the blocks it holds:
    /// a pipeline stage takes its blocks' share), in place of any it had: the base weights are
    /// shared, not reloaded, so a new strength or set costs only the low-rank paths. An empty set
    /// gives the base model back. The paths stay in the run's dtype beside FP8 products.
    pub fn with_loras(&self, set: &dyn LowRankSource) -> Result<Self> {
        self.adapted(set, false)
    }

    /// [`Flux::with_loras`] with each path merged into its layer's weight (`W + B A`) where the
    /// layer runs in its own dtype (FP8 products keep theirs beside): no cost a step, but the
    /// adapted layers' weights are copied (the base stays shared and unchanged, so the merge is
    /// undone by taking the base again).
    pub fn with_loras_merged(&self, set: &dyn LowRankSource) -> Result<Self> {
        self.adapted(set, true)
    }

    fn adapted(&self, set: &dyn LowRankSource, merge: bool) -> Result<Self> {
        let mut m = self.clone();
        let (dtype, dev) = (self.dtype, self.device.clone());
        let h = self.cfg.hidden_size;
        let low_rank = |layer: &str, rows: Range<usize>| {
            set.low_rank(layer, rows, dtype, &dev)
                .map_err(crate::Error::into_candle)
        };
        let take = |l: &mut Lin, lr: Option<crate::model::lowrank::LowRank>| -> Result<()> {
            match lr {
                Some(lr) if merge => l.merge_low_rank(lr),
                other => {
                    l.lora = other;
                    Ok(())
                }
            }
        };
        let whole = |l: &mut Lin, layer: String| -> Result<()> {
            let lr = low_rank(&layer, 0..l.out_rows()?)?;
            take(l, lr)
        };
        for (i, b) in m.double_blocks.iter_mut().enumerate() {
            let Some(b) = b else { continue };
            let p = format!("double_blocks.{i}");
            for (l, n) in [
                (&mut b.img_mod.lin, "img_mod.lin"),
                (&mut b.txt_mod.lin, "txt_mod.lin"),
                (&mut b.img_attn.qkv, "img_attn.qkv"),
                (&mut b.img_attn.proj, "img_attn.proj"),
                (&mut b.txt_attn.qkv, "txt_attn.qkv"),
                (&mut b.txt_attn.proj, "txt_attn.proj"),
                (&mut b.img_mlp.fc1, "img_mlp.0"),
                (&mut b.img_mlp.fc2, "img_mlp.2"),
                (&mut b.txt_mlp.fc1, "txt_mlp.0"),
                (&mut b.txt_mlp.fc2, "txt_mlp.2"),
            ] {
                whole(l, format!("{p}.{n}"))?;
            }
        }
        for (i, b) in m.single_blocks.iter_mut().enumerate() {
            let Some(b) = b else { continue };
            let p = format!("single_blocks.{i}");
            whole(&mut b.modulation.lin, format!("{p}.modulation.lin"))?;
            whole(&mut b.linear2, format!("{p}.linear2"))?;
            // linear1 is held as two products: its q/k/v rows, then its MLP rows.
            let mlp = b.linear1_mlp.out_rows()?;
            take(
                &mut b.linear1_qkv,
                low_rank(&format!("{p}.linear1"), 0..3 * h)?,
            )?;
            take(
                &mut b.linear1_mlp,
                low_rank(&format!("{p}.linear1"), 3 * h..3 * h + mlp)?,
            )?;
        }
        let plain = |l: &mut AdaptedLinear, layer: &str| -> Result<()> {
            match low_rank(layer, 0..l.base.weight().dim(0)?)? {
                Some(lr) if merge => {
                    let merged = lr.merged_into(l.base.weight())?;
                    l.base = candle_nn::Linear::new(merged, l.base.bias().cloned());
                    l.lora = None;
                }
                other => l.lora = other,
            }
            Ok(())
        };
        plain(&mut m.img_in, "img_in")?;
        plain(&mut m.txt_in, "txt_in")?;
        plain(&mut m.time_in.in_layer, "time_in.in_layer")?;
        plain(&mut m.time_in.out_layer, "time_in.out_layer")?;
        plain(&mut m.vector_in.in_layer, "vector_in.in_layer")?;
        plain(&mut m.vector_in.out_layer, "vector_in.out_layer")?;
        if let Some(g) = &mut m.guidance_in {
            plain(&mut g.in_layer, "guidance_in.in_layer")?;
            plain(&mut g.out_layer, "guidance_in.out_layer")?;
        }
        plain(&mut m.final_linear, "final_layer.linear")?;
        plain(&mut m.final_mod, "final_layer.adaLN_modulation.1")?;
        Ok(m)
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

    /// The block layers in FP8 that still hold their weight in the run's dtype beside the GPU's
    /// E4M3 copy: none unless the run kept the copies (`PARALLAX_FP8_KEEP_BF16`, or a model
    /// converted after loading by [`Flux::with_fp8_in`], which shares the originals with the
    /// model it came from). The CPU's simulated FP8 holds only the rounded weights it multiplies
    /// by.
    pub fn fp8_copies_kept(&self) -> usize {
        self.block_linears().filter(|l| l.holds_copy()).count()
    }

    /// Keep only the blocks `blocks` of the unified numbering (a pipeline stage's share; the
    /// others are dropped from this replica, and running them is an error).
    pub fn only_blocks(mut self, blocks: Range<usize>) -> Self {
        crate::model::step::keep_blocks(&mut self.double_blocks, &mut self.single_blocks, &blocks);
        self
    }

    /// The blocks this replica holds, as a range of the unified numbering (empty when none).
    pub fn held_blocks(&self) -> Range<usize> {
        crate::model::step::held_blocks(&self.double_blocks, &self.single_blocks)
    }

    /// The attention the blocks use on this device.
    pub fn attention(&self) -> &dyn Attention {
        &self.attention
    }

    /// The same model with attention's scores from E4M3 queries and keys (`on`) or exact: the
    /// load option `fp8_attention` ([`crate::kernels::flash_attn_fp8`]).
    pub fn with_fp8_attention(mut self, on: bool) -> Self {
        self.attention.fp8_scores = on;
        self
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

    /// Input projections and the conditioning vector, for every token of `input` (a
    /// sequence-parallel replica hands in its shard: `crate::parallel::replica`).
    pub fn embed(&self, input: &FluxInput) -> Result<(Streams, BlockCtx)> {
        let vec = self.conditioning(input)?;
        let ctx = BlockCtx {
            vec,
            pe: input.pe.clone(),
            shards: None,
            attention: None,
        };
        Ok((self.embed_streams(input)?, ctx))
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
        let attn = &self.attention;
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

    /// The final adaLN and projection back to packed latent channels (B, N, 64), for the tokens
    /// of `img` (a sequence-parallel replica gathers every rank's).
    pub fn final_layer(&self, img: &Tensor, ctx: &BlockCtx) -> Result<Tensor> {
        let m = self.final_mod.forward(&ctx.vec.silu()?)?.unsqueeze(1)?;
        let c = m.chunk(2, D::Minus1)?;
        let (shift, scale) = (&c[0], &c[1]);
        self.final_linear.forward(&ln_modulate(img, shift, scale)?)
    }

    /// The whole transformer: predicted velocity (B, N, 64).
    pub fn forward(&self, input: &FluxInput) -> Result<Tensor> {
        let (s, ctx) = self.embed(input)?;
        let s = self.run_blocks(s, &ctx, 0..self.cfg.num_blocks())?;
        self.final_layer(&s.img, &ctx)
    }
}

/// (B, 16, H, W) latent -> (B, H/2 * W/2, 64) patch tokens ([`super::LATENT`]'s packing).
pub fn pack_latent(x: &Tensor) -> Result<Tensor> {
    super::LATENT.pack(x)
}

/// Inverse of [`pack_latent`] for a latent of `h` x `w` (latent pixels).
pub fn unpack_latent(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    super::LATENT.unpack(x, h, w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::demo_weights::DemoWeights;
    use crate::model::rng::SplitMix64;

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
        let mut rng = SplitMix64::new(21);
        let dev = Device::Cpu;
        let ids = position_ids(2, 3, 2, &dev)?;
        let pe = PosEmbed::new(&ids, &[4, 6, 6], 10_000.0, DType::F32)?;
        let x = rng.normal_tensor((1, 1, 8, 16), &dev)?;
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

    /// Random inputs of one step of a tiny model: 16 image tokens (a 4x4 grid), 5 text tokens.
    struct TinyStep {
        img: Tensor,
        txt: Tensor,
        y: Tensor,
        t: Tensor,
        g: Tensor,
        pe: PosEmbed,
    }

    impl TinyStep {
        fn new(m: &Flux) -> Result<Self> {
            let mut rng = SplitMix64::new(22);
            let (cfg, dev) = (m.config(), &Device::Cpu);
            Ok(Self {
                img: rng.normal_tensor((1, 16, 64), dev)?,
                txt: rng.normal_tensor((1, 5, cfg.context_in_dim), dev)?,
                y: rng.normal_tensor((1, cfg.vec_in_dim), dev)?,
                t: Tensor::new(&[0.7f32], dev)?,
                g: Tensor::new(&[3.5f32], dev)?,
                pe: m.pos_embed(5, 4, 4)?,
            })
        }

        fn input(&self) -> FluxInput<'_> {
            FluxInput {
                img: &self.img,
                txt: &self.txt,
                y: &self.y,
                timesteps: &self.t,
                guidance: Some(&self.g),
                pe: &self.pe,
            }
        }
    }

    #[test]
    fn lean_fp8_keeps_only_the_rounded_weights_and_the_same_velocity() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = FluxConfig::tiny();
        let vb = || DemoWeights::new(3).var_builder(DType::F32, &dev);
        let lean = Flux::new_fp8(&cfg, vb(), Fp8Groups::ALL, true)?;
        let kept = Flux::new_fp8(&cfg, vb(), Fp8Groups::ALL, false)?;
        assert_eq!(lean.fp8_copies_kept(), 0);
        // Every product layer holds one weight, already rounded to E4M3 per output channel: the
        // simulation's, not the original beside it.
        let mut products = 0;
        for l in lean.block_linears().filter(|l| l.fp8 == Fp8Mode::Products) {
            let w = l.weight()?;
            let r = crate::kernels::fp8::round_rows(&w)?;
            assert_eq!((w.as_ref() - r)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
            products += 1;
        }
        assert_eq!(products, 8 * cfg.depth + 3 * cfg.depth_single_blocks);
        assert_eq!(lean.weight_bytes(), kept.weight_bytes());
        let step = TinyStep::new(&lean)?;
        let input = step.input();
        let d = (lean.forward(&input)? - kept.forward(&input)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        Ok(())
    }

    #[test]
    fn blocks_in_pieces_equal_forward() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = FluxConfig::tiny();
        let m = Flux::new(&cfg, DemoWeights::new(3).var_builder(DType::F32, &dev))?;
        let step = TinyStep::new(&m)?;
        let input = step.input();
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
