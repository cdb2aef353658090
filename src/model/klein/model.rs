//! The FLUX.2 transformer klein uses: FLUX.1's double- then single-stream layout with no biases
//! anywhere, SwiGLU MLPs, one adaLN modulation per kind of block shared by every block of that
//! kind (the double blocks' image stream, their text stream, the single blocks), the single
//! blocks' q, k, v and SwiGLU input in one product, and a 4-axis RoPE (theta 2000) over (time,
//! row, column, text index).
//!
//! Tensor names are Black Forest Labs' (`double_blocks.0.img_attn.qkv.weight`,
//! `double_stream_modulation_img.lin.weight`, ...); diffusers' names map onto them through
//! [`super::keys::KleinDiffusersMap`]. The forward pass is split into the stage API's pieces
//! ([`Klein::conditioning`], [`Klein::embed_streams`], [`Klein::run_blocks`],
//! [`Klein::final_layer`]) as FLUX.1's is, and uses the same kernels: the fused LayerNorm +
//! modulation, the gated residual, the QKV split + QK-norm + RoPE, the fused SwiGLU, and the
//! attention a parallel strategy puts in the block context. The blocks' products are
//! [`crate::model::linear`]'s layers, so they run in FP8 as FLUX.1's do ([`Klein::with_fp8_in`]).

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use super::config::{KleinConfig, StagePart};
use crate::kernels::elementwise::{cat_swiglu, gated_residual, ln_modulate, swiglu};
use crate::kernels::gemm;
use crate::kernels::qkv_prep::qkv_prep;
use crate::model::attention::{Attention, LocalAttention};
use crate::model::family::Denoiser;
use crate::model::flux1::{timestep_embedding, QkNorm};
use crate::model::linear::{convert, Fp8Groups, Fp8Mode, Lin};
use crate::model::step::{BlockCtx, PosEmbed, StepInput, Streams};

/// Width of the sinusoidal timestep (and guidance) embedding.
const TIME_CHANNELS: usize = 256;

/// The error for a part outside the blocks (`what`) that this replica, a pipeline stage, does
/// not hold (`whose`: which stage does).
fn not_held(what: &str, whose: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "{what}: not held by this replica, a pipeline stage ({whose})"
    ))
}

/// A linear layer without bias, `x Wᵀ`.
#[derive(Debug, Clone)]
struct Proj {
    w: Tensor,
}

impl Proj {
    fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            w: vb.get((out_dim, in_dim), "weight")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        gemm::linear(x, &self.w, None, false)
    }

    fn bytes(&self) -> usize {
        self.w.elem_count() * self.w.dtype().size_in_bytes()
    }
}

/// `out_layer(silu(in_layer(x)))`.
#[derive(Debug, Clone)]
struct Embedder {
    in_layer: Proj,
    out_layer: Proj,
}

impl Embedder {
    fn new(in_dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            in_layer: Proj::new(in_dim, hidden, vb.pp("in_layer"))?,
            out_layer: Proj::new(hidden, hidden, vb.pp("out_layer"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out_layer.forward(&self.in_layer.forward(x)?.silu()?)
    }

    fn bytes(&self) -> usize {
        self.in_layer.bytes() + self.out_layer.bytes()
    }
}

/// Shift, scale and gate of one modulated sub-block, each (B, 1, hidden).
#[derive(Debug, Clone)]
struct Mod {
    shift: Tensor,
    scale: Tensor,
    gate: Tensor,
}

impl Mod {
    /// LayerNorm(x) * (1 + scale) + shift
    fn norm(&self, x: &Tensor) -> Result<Tensor> {
        ln_modulate(x, &self.shift, &self.scale)
    }

    /// x + gate * u
    fn add(&self, x: &Tensor, u: &Tensor) -> Result<Tensor> {
        gated_residual(x, &self.gate, u)
    }
}

/// A modulation shared by every block of one kind: `lin(silu(vec))` split into `sets`
/// (shift, scale, gate) triples.
#[derive(Debug, Clone)]
struct SharedMod {
    lin: Lin,
    sets: usize,
}

impl SharedMod {
    fn new(h: usize, sets: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            lin: Lin::new(h, 3 * sets * h, false, vb.pp("lin"))?,
            sets,
        })
    }

    fn forward(&self, vec: &Tensor) -> Result<Vec<Mod>> {
        let out = self.lin.forward(&vec.silu()?)?.unsqueeze(1)?;
        let c = out.chunk(3 * self.sets, D::Minus1)?;
        Ok(c.chunks(3)
            .map(|m| Mod {
                shift: m[0].clone(),
                scale: m[1].clone(),
                gate: m[2].clone(),
            })
            .collect())
    }
}

/// Bytes of a QK norm's two scales.
fn norm_bytes(n: &QkNorm) -> usize {
    (n.query.elem_count() + n.key.elem_count()) * n.query.dtype().size_in_bytes()
}

/// One stream of a double block: attention projections, QK norms, SwiGLU MLP.
#[derive(Debug, Clone)]
struct Stream {
    qkv: Lin,
    norm: QkNorm,
    proj: Lin,
    /// The SwiGLU's gate and up halves in one product (gate first).
    mlp_in: Lin,
    mlp_out: Lin,
}

impl Stream {
    fn new(cfg: &KleinConfig, vb_attn: VarBuilder, vb_mlp: VarBuilder) -> Result<Self> {
        let (h, m) = (cfg.hidden_size, cfg.mlp_hidden());
        Ok(Self {
            qkv: Lin::new(h, 3 * h, false, vb_attn.pp("qkv"))?,
            norm: QkNorm::new(cfg.head_dim(), vb_attn.pp("norm"))?,
            proj: Lin::new(h, h, false, vb_attn.pp("proj"))?,
            mlp_in: Lin::new(h, 2 * m, false, vb_mlp.pp("0"))?,
            mlp_out: Lin::new(m, h, false, vb_mlp.pp("2"))?,
        })
    }

    /// FP8 products in the groups `g` (attention projections, MLP); `lean` as
    /// [`Klein::with_fp8`] says.
    fn convert_fp8(&mut self, g: Fp8Groups, lean: bool) -> Result<()> {
        convert(&mut self.qkv, g.double_attention, Fp8Mode::Products, lean)?;
        convert(&mut self.proj, g.double_attention, Fp8Mode::Products, lean)?;
        convert(&mut self.mlp_in, g.double_mlp, Fp8Mode::Products, lean)?;
        convert(&mut self.mlp_out, g.double_mlp, Fp8Mode::Products, lean)
    }

    /// The residual stream after attention output `a` and the MLP, modulated by `m`.
    fn finish(&self, x: &Tensor, a: &Tensor, m: &[Mod]) -> Result<Tensor> {
        let x = m[0].add(x, &self.proj.forward(a)?)?;
        let ff = self
            .mlp_out
            .forward(&swiglu(&self.mlp_in.forward(&m[1].norm(&x)?)?)?)?;
        m[1].add(&x, &ff)
    }

    fn bytes(&self) -> usize {
        self.qkv.weight_bytes()
            + norm_bytes(&self.norm)
            + self.proj.weight_bytes()
            + self.mlp_in.weight_bytes()
            + self.mlp_out.weight_bytes()
    }
}

/// A double-stream block: text and image keep their weights, attend jointly.
#[derive(Debug, Clone)]
struct DoubleBlock {
    img: Stream,
    txt: Stream,
}

impl DoubleBlock {
    fn new(cfg: &KleinConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            img: Stream::new(cfg, vb.pp("img_attn"), vb.pp("img_mlp"))?,
            txt: Stream::new(cfg, vb.pp("txt_attn"), vb.pp("txt_mlp"))?,
        })
    }
}

/// A single-stream block over the joined sequence: attention and SwiGLU side by side.
#[derive(Debug, Clone)]
struct SingleBlock {
    /// q, k, v and the SwiGLU's two halves in one product (3h + 2m rows).
    linear1: Lin,
    /// The attention output and the SwiGLU's hidden, projected together (h + m columns).
    linear2: Lin,
    norm: QkNorm,
}

impl SingleBlock {
    fn new(cfg: &KleinConfig, vb: VarBuilder) -> Result<Self> {
        let (h, m) = (cfg.hidden_size, cfg.mlp_hidden());
        Ok(Self {
            linear1: Lin::new(h, 3 * h + 2 * m, false, vb.pp("linear1"))?,
            linear2: Lin::new(h + m, h, false, vb.pp("linear2"))?,
            norm: QkNorm::new(cfg.head_dim(), vb.pp("norm"))?,
        })
    }

    /// FP8 products in the groups `g` (linear1, linear2); `lean` as [`Klein::with_fp8`] says.
    fn convert_fp8(&mut self, g: Fp8Groups, lean: bool) -> Result<()> {
        convert(&mut self.linear1, g.single_in, Fp8Mode::Products, lean)?;
        convert(&mut self.linear2, g.single_out, Fp8Mode::Products, lean)
    }
}

/// The token streams' input projections.
#[derive(Debug, Clone)]
struct Inputs {
    img_in: Proj,
    txt_in: Proj,
}

/// The double blocks' shared modulations, one per stream.
#[derive(Debug, Clone)]
struct DoubleMods {
    img: SharedMod,
    txt: SharedMod,
}

/// The final adaLN ((shift, scale) in Black Forest Labs' order) and projection.
#[derive(Debug, Clone)]
struct FinalLayer {
    modulation: Proj,
    linear: Proj,
}

/// The FLUX.2 transformer (klein's sizes, or any other FLUX.2 config). A pipeline stage holds
/// its blocks and, outside them, only the parts it uses ([`StagePart`]): the input projections
/// on the first stage, each kind of block's shared modulation where its blocks are, the final
/// layer on the last stage; the timestep (and guidance) embedders on every stage.
#[derive(Clone)]
pub struct Klein {
    inputs: Option<Inputs>,
    time_in: Embedder,
    guidance_in: Option<Embedder>,
    double_mods: Option<DoubleMods>,
    single_mod: Option<SharedMod>,
    /// The blocks this replica holds (`None`: another pipeline stage's).
    double_blocks: Vec<Option<DoubleBlock>>,
    single_blocks: Vec<Option<SingleBlock>>,
    final_layer: Option<FinalLayer>,
    attention: Arc<dyn Attention>,
    cfg: KleinConfig,
    dtype: DType,
    device: Device,
}

impl std::fmt::Debug for Klein {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Klein")
            .field("cfg", &self.cfg)
            .field("dtype", &self.dtype)
            .field("attention", &self.attention.name())
            .finish()
    }
}

impl Klein {
    /// Load every block from `vb` (Black Forest Labs' names).
    pub fn new(cfg: &KleinConfig, vb: VarBuilder) -> Result<Self> {
        Self::new_stage(cfg, vb, 0..cfg.num_blocks())
    }

    /// [`Klein::new`] reading only the blocks `blocks` of the unified numbering (double blocks
    /// first): one pipeline stage's share, with the parts outside the blocks that it uses
    /// ([`KleinConfig::needs`]); nothing else is read.
    pub fn new_stage(cfg: &KleinConfig, vb: VarBuilder, blocks: Range<usize>) -> Result<Self> {
        Self::new_stage_fp8(cfg, vb, blocks, Fp8Groups::NONE, false)
    }

    /// [`Klein::new_stage`] with FP8 in the groups `g`, each block converted as soon as it is
    /// loaded (so loading never holds more than one block beyond the converted model, as
    /// FLUX.1's [`crate::model::flux::Flux::new_fp8`] loads); `lean` as [`Klein::with_fp8`].
    pub fn new_stage_fp8(
        cfg: &KleinConfig,
        vb: VarBuilder,
        blocks: Range<usize>,
        g: Fp8Groups,
        lean: bool,
    ) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::msg)?;
        let h = cfg.hidden_size;
        let double_blocks = (0..cfg.depth)
            .map(|i| {
                if !blocks.contains(&i) {
                    return Ok(None);
                }
                let mut b = DoubleBlock::new(cfg, vb.pp(format!("double_blocks.{i}")))?;
                b.img.convert_fp8(g, lean)?;
                b.txt.convert_fp8(g, lean)?;
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
        let guidance_in = cfg
            .guidance_embed
            .then(|| Embedder::new(TIME_CHANNELS, h, vb.pp("guidance_in")))
            .transpose()?;
        let needs = |part| cfg.needs(&blocks, part);
        let inputs = needs(StagePart::Inputs)
            .then(|| -> Result<Inputs> {
                Ok(Inputs {
                    img_in: Proj::new(cfg.in_channels, h, vb.pp("img_in"))?,
                    txt_in: Proj::new(cfg.context_in_dim, h, vb.pp("txt_in"))?,
                })
            })
            .transpose()?;
        let double_mods = needs(StagePart::DoubleModulations)
            .then(|| -> Result<DoubleMods> {
                Ok(DoubleMods {
                    img: SharedMod::new(h, 2, vb.pp("double_stream_modulation_img"))?,
                    txt: SharedMod::new(h, 2, vb.pp("double_stream_modulation_txt"))?,
                })
            })
            .transpose()?;
        let single_mod = needs(StagePart::SingleModulation)
            .then(|| SharedMod::new(h, 1, vb.pp("single_stream_modulation")))
            .transpose()?;
        let final_layer = needs(StagePart::FinalLayer)
            .then(|| -> Result<FinalLayer> {
                Ok(FinalLayer {
                    modulation: Proj::new(h, 2 * h, vb.pp("final_layer.adaLN_modulation.1"))?,
                    linear: Proj::new(h, cfg.in_channels, vb.pp("final_layer.linear"))?,
                })
            })
            .transpose()?;
        let mut m = Self {
            inputs,
            time_in: Embedder::new(TIME_CHANNELS, h, vb.pp("time_in"))?,
            guidance_in,
            double_mods,
            single_mod,
            double_blocks,
            single_blocks,
            final_layer,
            attention: Arc::new(LocalAttention::default()),
            cfg: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        };
        m.convert_modulations(g, lean)?;
        Ok(m)
    }

    pub fn config(&self) -> &KleinConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Replace the attention implementation (for parallel strategies).
    pub fn with_attention(mut self, attention: Arc<dyn Attention>) -> Self {
        self.attention = attention;
        self
    }

    /// Attention on this device (blocks use the context's where a parallel replica set one).
    pub fn attention(&self) -> &dyn Attention {
        self.attention.as_ref()
    }

    /// The same model with one-device attention whose scores come from E4M3 queries and keys
    /// (`on`) or exact: the load option `fp8_attention` ([`crate::kernels::flash_attn_fp8`]).
    pub fn with_fp8_attention(self, on: bool) -> Self {
        self.with_attention(Arc::new(LocalAttention {
            fp8_scores: on,
            ..LocalAttention::default()
        }))
    }

    /// FP8 in the chosen groups of the blocks' layers, as FLUX.1's
    /// [`crate::model::flux::Flux::with_fp8_in`] converts them ([`Fp8Groups::ALL`] is what
    /// `--precision fp8` runs): E4M3 products with cuBLASLt on sm_89+ GPUs in bf16, simulated
    /// by rounding elsewhere; the modulations weight-only when `g.modulations`. The embedders,
    /// the final layer and attention stay in the run's dtype; groups not chosen are left as they
    /// are ([`Fp8Groups::NONE`] changes nothing). The weights in the run's dtype stay beside the
    /// GPU's E4M3 copies (to compare against, as `parallax dev fp8-error` does): [`Klein::with_fp8`]
    /// with `lean` drops them.
    pub fn with_fp8_in(self, g: Fp8Groups) -> Result<Self> {
        self.with_fp8(g, false)
    }

    /// [`Klein::with_fp8_in`]; with `lean`, each converted layer's weight in the run's dtype is
    /// dropped wherever a GPU E4M3 copy stands for it ([`crate::pipeline::LoadOptions::lean`],
    /// the default of `--precision fp8` unless `PARALLAX_FP8_KEEP_BF16=1`: FLUX.1's switch). A
    /// layer is dropped as soon as it is converted, so the copies never all exist at once. On the
    /// CPU and GPUs without FP8 products nothing is dropped: the simulation holds only the
    /// rounded weights it multiplies by.
    pub fn with_fp8(mut self, g: Fp8Groups, lean: bool) -> Result<Self> {
        for b in self.double_blocks.iter_mut().flatten() {
            b.img.convert_fp8(g, lean)?;
            b.txt.convert_fp8(g, lean)?;
        }
        for b in self.single_blocks.iter_mut().flatten() {
            b.convert_fp8(g, lean)?;
        }
        self.convert_modulations(g, lean)?;
        Ok(self)
    }

    /// The shared modulations (those this model holds) weight-only in FP8 when `g.modulations`.
    fn convert_modulations(&mut self, g: Fp8Groups, lean: bool) -> Result<()> {
        let double = self
            .double_mods
            .iter_mut()
            .flat_map(|m| [&mut m.img, &mut m.txt]);
        for m in double.chain(self.single_mod.as_mut()) {
            convert(&mut m.lin, g.modulations, Fp8Mode::WeightOnly, lean)?;
        }
        Ok(())
    }

    /// Every linear layer of the blocks and the shared modulations, in block order.
    fn block_linears(&self) -> impl Iterator<Item = &Lin> {
        let double = self.double_blocks.iter().flatten().flat_map(|b| {
            [&b.img, &b.txt]
                .into_iter()
                .flat_map(|s| [&s.qkv, &s.proj, &s.mlp_in, &s.mlp_out])
        });
        let single = self
            .single_blocks
            .iter()
            .flatten()
            .flat_map(|b| [&b.linear1, &b.linear2]);
        let mods = self
            .double_mods
            .iter()
            .flat_map(|m| [&m.img.lin, &m.txt.lin])
            .chain(self.single_mod.iter().map(|m| &m.lin));
        mods.chain(double).chain(single)
    }

    /// The layers in FP8 that still hold their weight in the run's dtype beside the GPU's E4M3
    /// copy: none after a lean conversion ([`Klein::with_fp8`]); the CPU's simulated FP8 never
    /// holds any.
    pub fn fp8_copies_kept(&self) -> usize {
        self.block_linears().filter(|l| l.holds_copy()).count()
    }

    /// The layers converted to FP8 (products or weight-only).
    pub fn fp8_layers(&self) -> usize {
        self.block_linears()
            .filter(|l| l.fp8 != Fp8Mode::Off)
            .count()
    }

    /// Keep only the blocks `blocks` of the unified numbering (a pipeline stage's share), and
    /// of the parts outside them those the stage uses (as [`Klein::new_stage`] builds them).
    pub fn only_blocks(mut self, blocks: Range<usize>) -> Self {
        crate::model::step::keep_blocks(&mut self.double_blocks, &mut self.single_blocks, &blocks);
        let held = self.held_blocks();
        let needs = |part| self.cfg.needs(&held, part);
        let (inputs, double, single, last) = (
            needs(StagePart::Inputs),
            needs(StagePart::DoubleModulations),
            needs(StagePart::SingleModulation),
            needs(StagePart::FinalLayer),
        );
        self.inputs = self.inputs.filter(|_| inputs);
        self.double_mods = self.double_mods.filter(|_| double);
        self.single_mod = self.single_mod.filter(|_| single);
        self.final_layer = self.final_layer.filter(|_| last);
        self
    }

    /// The blocks this replica holds, as a range of the unified numbering (empty when none).
    pub fn held_blocks(&self) -> Range<usize> {
        crate::model::step::held_blocks(&self.double_blocks, &self.single_blocks)
    }

    /// Bytes the weights hold on their device.
    pub fn weight_bytes(&self) -> usize {
        let double: usize = self
            .double_blocks
            .iter()
            .flatten()
            .map(|b| b.img.bytes() + b.txt.bytes())
            .sum();
        let single: usize = self
            .single_blocks
            .iter()
            .flatten()
            .map(|b| b.linear1.weight_bytes() + b.linear2.weight_bytes() + norm_bytes(&b.norm))
            .sum();
        let mods: usize = self
            .double_mods
            .iter()
            .flat_map(|m| [&m.img, &m.txt])
            .chain(self.single_mod.as_ref())
            .map(|m| m.lin.weight_bytes())
            .sum();
        double
            + single
            + mods
            + self
                .inputs
                .as_ref()
                .map_or(0, |i| i.img_in.bytes() + i.txt_in.bytes())
            + self.time_in.bytes()
            + self.guidance_in.as_ref().map_or(0, Embedder::bytes)
            + self
                .final_layer
                .as_ref()
                .map_or(0, |f| f.modulation.bytes() + f.linear.bytes())
    }

    /// Position ids of the joint sequence: `txt_len` text tokens at (0, 0, 0, i), then the
    /// `h` x `w` grid of image tokens at (0, row, column, 0).
    pub fn position_ids(txt_len: usize, h: usize, w: usize, device: &Device) -> Result<Tensor> {
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
        Tensor::from_vec(ids, (txt_len + h * w, 4), device)
    }

    /// RoPE tables for `txt_len` text tokens and an `h` x `w` grid of image tokens.
    pub fn pos_embed(&self, txt_len: usize, h: usize, w: usize) -> Result<PosEmbed> {
        let ids = Self::position_ids(txt_len, h, w, &self.device)?;
        PosEmbed::new(&ids, &self.cfg.axes_dim, self.cfg.theta, self.dtype)
    }

    /// The conditioning vector (B, hidden): the timestep embedded, plus the guidance where the
    /// model embeds one (no pooled text: FLUX.2 has none).
    pub fn conditioning(&self, input: &StepInput) -> Result<Tensor> {
        let t = timestep_embedding(input.timesteps, TIME_CHANNELS, self.dtype)?;
        let vec = self.time_in.forward(&t)?;
        match &self.guidance_in {
            None => Ok(vec),
            Some(g_in) => {
                let g = input.guidance.ok_or_else(|| {
                    candle_core::Error::Msg(
                        "this model embeds guidance: a guidance value is required".into(),
                    )
                })?;
                vec + g_in.forward(&timestep_embedding(g, TIME_CHANNELS, self.dtype)?)?
            }
        }
    }

    /// The input projections of the token streams.
    pub fn embed_streams(&self, input: &StepInput) -> Result<Streams> {
        let i = self.inputs.as_ref().ok_or_else(|| {
            not_held(
                "the input projections",
                "the first pipeline stage embeds the tokens",
            )
        })?;
        let img = i.img_in.forward(&input.img.to_dtype(self.dtype)?)?;
        let txt = i.txt_in.forward(&input.txt.to_dtype(self.dtype)?)?;
        Ok(Streams { img, txt })
    }

    /// Run blocks `range` of the unified numbering (double blocks first, then single blocks).
    pub fn run_blocks(&self, s: Streams, ctx: &BlockCtx, range: Range<usize>) -> Result<Streams> {
        let Streams { mut img, mut txt } = s;
        let attn = self.attention.as_ref();
        let heads = self.cfg.num_heads;
        let depth = self.cfg.depth;
        let absent = |i: usize| {
            candle_core::Error::Msg(format!(
                "block {i} is not held by this replica (another pipeline stage's)"
            ))
        };
        if range.start < depth.min(range.end) {
            let mods = self
                .double_mods
                .as_ref()
                .ok_or_else(|| absent(range.start))?;
            let mi = mods.img.forward(&ctx.vec)?;
            let mt = mods.txt.forward(&ctx.vec)?;
            for i in range.start..range.end.min(depth) {
                let b = self.double_blocks[i].as_ref().ok_or_else(|| absent(i))?;
                let img_qkv = b.img.qkv.forward(&mi[0].norm(&img)?)?;
                let txt_qkv = b.txt.qkv.forward(&mt[0].norm(&txt)?)?;
                let (q, k, v) = qkv_prep(
                    &[b.txt.norm.stream(&txt_qkv), b.img.norm.stream(&img_qkv)],
                    &ctx.pe,
                    heads,
                )?;
                let out = ctx.attend_merged(attn, i, &q, &k, &v)?;
                let l = txt.dim(1)?;
                let txt_out = out.narrow(1, 0, l)?;
                let img_out = out.narrow(1, l, out.dim(1)? - l)?;
                img = b.img.finish(&img, &img_out, &mi)?;
                txt = b.txt.finish(&txt, &txt_out, &mt)?;
            }
        }
        let start = range.start.max(depth);
        let end = range.end.min(self.cfg.num_blocks());
        if start < end {
            let single_mod = self.single_mod.as_ref().ok_or_else(|| absent(start))?;
            let m = &single_mod.forward(&ctx.vec)?[0];
            let (h, mlp) = (self.cfg.hidden_size, self.cfg.mlp_hidden());
            let l = txt.dim(1)?;
            let mut x = Tensor::cat(&[&txt, &img], 1)?;
            for i in start..end {
                let b = self.single_blocks[i - depth]
                    .as_ref()
                    .ok_or_else(|| absent(i))?;
                let y = b.linear1.forward(&m.norm(&x)?)?;
                let (q, k, v) = qkv_prep(&[b.norm.stream(&y)], &ctx.pe, heads)?;
                let a = ctx.attend_merged(attn, i, &q, &k, &v)?;
                // linear2's input: the attention output beside the SwiGLU of linear1's last 2m
                // columns, read in place and joined in one pass on CUDA.
                let joined = cat_swiglu(&a, &y.narrow(D::Minus1, 3 * h, 2 * mlp)?)?;
                let u = b.linear2.forward(&joined)?;
                x = m.add(&x, &u)?;
            }
            txt = x.narrow(1, 0, l)?;
            img = x.narrow(1, l, x.dim(1)? - l)?;
        }
        Ok(Streams { img, txt })
    }

    /// The final adaLN and projection back to packed latent channels, for the tokens of `img`.
    pub fn final_layer(&self, img: &Tensor, ctx: &BlockCtx) -> Result<Tensor> {
        let f = self
            .final_layer
            .as_ref()
            .ok_or_else(|| not_held("the final layer", "the last pipeline stage applies it"))?;
        let m = f.modulation.forward(&ctx.vec.silu()?)?.unsqueeze(1)?;
        let c = m.chunk(2, D::Minus1)?;
        f.linear.forward(&ln_modulate(img, &c[0], &c[1])?)
    }

    /// The whole transformer: predicted velocity (B, N, packed latent channels).
    pub fn forward(&self, input: &StepInput) -> Result<Tensor> {
        let (s, ctx) = Denoiser::embed(self, input)?;
        let s = self.run_blocks(s, &ctx, 0..self.cfg.num_blocks())?;
        self.final_layer(&s.img, &ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::demo_weights::DemoWeights;
    use crate::model::rng::SplitMix64;

    /// One step's input for a model on the CPU: 5 random text tokens and a 4x4 grid of random
    /// image tokens at t = 0.7.
    struct Inputs {
        img: Tensor,
        txt: Tensor,
        y: Tensor,
        t: Tensor,
        pe: PosEmbed,
    }

    impl Inputs {
        fn new(m: &Klein) -> Result<Self> {
            let mut rng = SplitMix64::new(31);
            let (cfg, dev) = (m.config(), &Device::Cpu);
            Ok(Self {
                img: rng.normal_tensor((1, 16, cfg.in_channels), dev)?,
                txt: rng.normal_tensor((1, 5, cfg.context_in_dim), dev)?,
                y: Tensor::zeros((1, 0), DType::F32, dev)?,
                t: Tensor::new(&[0.7f32], dev)?,
                pe: m.pos_embed(5, 4, 4)?,
            })
        }

        fn step(&self) -> StepInput<'_> {
            StepInput {
                img: &self.img,
                txt: &self.txt,
                y: &self.y,
                timesteps: &self.t,
                guidance: None,
                pe: &self.pe,
            }
        }
    }

    #[test]
    fn blocks_in_pieces_equal_forward() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = KleinConfig::tiny();
        let m = Klein::new(&cfg, DemoWeights::new(3).var_builder(DType::F32, &dev))?;
        let inputs = Inputs::new(&m)?;
        let (input, pe) = (inputs.step(), &inputs.pe);
        let full = m.forward(&input)?;
        assert_eq!(full.dims(), &[1, 16, cfg.in_channels]);
        let vec = m.conditioning(&input)?;
        let ctx = BlockCtx {
            vec,
            pe: pe.clone(),
            shards: None,
            attention: None,
        };
        let s = m.embed_streams(&input)?;
        let s = m.run_blocks(s, &ctx, 0..1)?;
        let s = m.run_blocks(s, &ctx, 1..3)?;
        let s = m.run_blocks(s, &ctx, 3..cfg.num_blocks())?;
        let pieces = m.final_layer(&s.img, &ctx)?;
        let d = (full - pieces)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(d, 0.0);
        // A stage holding blocks 1..3 says so and refuses the others, and what only the first
        // and last stages hold (the input projections, the final layer); its blocks run as the
        // whole model's.
        let stage = m.clone().only_blocks(1..3);
        assert_eq!(stage.held_blocks(), 1..3);
        assert!(stage.embed_streams(&input).is_err());
        let s = m.run_blocks(m.embed_streams(&input)?, &ctx, 0..1)?;
        assert!(stage.run_blocks(s.clone(), &ctx, 0..1).is_err());
        assert!(stage.final_layer(&s.img, &ctx).is_err());
        let (a, b) = (
            stage.run_blocks(s.clone(), &ctx, 1..3)?,
            m.run_blocks(s, &ctx, 1..3)?,
        );
        assert_eq!((a.img - b.img)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        // Built as a stage, it is the same model, holding the same.
        let vb = DemoWeights::new(3).var_builder(DType::F32, &dev);
        let built = Klein::new_stage(&cfg, vb, 1..3)?;
        assert_eq!(built.weight_bytes(), stage.weight_bytes());
        Ok(())
    }

    /// FP8 products, simulated on the CPU: each group alone reaches its layers (it moves the
    /// velocity), and every product in FP8 moves random:klein-tiny's velocity by under 5% (relative
    /// L2; 1.9% when written, each group alone 0.6-1.2%), as FLUX.1's FP8 products move the demo's.
    #[test]
    fn fp8_products_move_the_velocity_a_little() -> Result<()> {
        let dev = Device::Cpu;
        let (m, _) = crate::model::klein::random_model(
            crate::model::klein::RandomKlein::Tiny,
            DType::F32,
            &dev,
        )?;
        let inputs = Inputs::new(&m)?;
        let input = inputs.step();
        let base = m.forward(&input)?;
        let norm = |t: &Tensor| -> Result<f32> { t.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>() };
        for (name, g) in Fp8Groups::each() {
            let v = m.clone().with_fp8_in(g)?.forward(&input)?;
            let r = norm(&(v - &base)?)? / norm(&base)?;
            assert!(r > 1e-5 && r < 0.05, "{name}: relative change {r}");
        }
        Ok(())
    }

    /// A lean FP8 klein (every product and the modulations) holds no weight in the run's dtype
    /// beside an E4M3 copy, each converted layer's one weight being the rounded one the products
    /// use; it has the bytes and gives the velocity of the conversion that keeps the copies, to
    /// the bit. On the CPU both hold only the rounded weights (nothing is dropped: the GPU's
    /// E4M3 copies are what `lean` drops), and converting at load equals converting after.
    #[test]
    fn lean_fp8_holds_no_copies_and_gives_the_same_velocity() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = KleinConfig::tiny();
        let vb = || DemoWeights::new(3).var_builder(DType::F32, &dev);
        let g = Fp8Groups::ALL_AND_MODULATIONS;
        let kept = Klein::new(&cfg, vb())?.with_fp8(g, false)?;
        let lean = Klein::new(&cfg, vb())?.with_fp8(g, true)?;
        let at_load = Klein::new_stage_fp8(&cfg, vb(), 0..cfg.num_blocks(), g, true)?;
        for m in [&lean, &at_load] {
            assert_eq!(m.fp8_copies_kept(), 0);
            assert_eq!(
                m.fp8_layers(),
                3 + 8 * cfg.depth + 2 * cfg.depth_single_blocks
            );
            for l in m.block_linears() {
                let w = l.weight()?;
                let r = crate::kernels::fp8::round_rows(&w)?;
                assert_eq!((w.as_ref() - r)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
            }
            assert_eq!(m.weight_bytes(), kept.weight_bytes());
        }
        let inputs = Inputs::new(&kept)?;
        let input = inputs.step();
        let want = kept.forward(&input)?;
        for m in [&lean, &at_load] {
            let d = (m.forward(&input)? - &want)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert_eq!(d, 0.0);
        }
        Ok(())
    }

    #[test]
    fn text_and_image_positions() -> Result<()> {
        let ids: Vec<Vec<f32>> = Klein::position_ids(2, 2, 3, &Device::Cpu)?.to_vec2()?;
        assert_eq!(ids[0], [0.0, 0.0, 0.0, 0.0]);
        assert_eq!(ids[1], [0.0, 0.0, 0.0, 1.0]);
        assert_eq!(ids[2], [0.0, 0.0, 0.0, 0.0]);
        assert_eq!(ids[2 + 4], [0.0, 1.0, 1.0, 0.0]);
        Ok(())
    }
}
