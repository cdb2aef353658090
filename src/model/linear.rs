//! The linear layer of the FLUX transformers' blocks ([`Lin`], FLUX.1's and FLUX.2 klein's) with
//! its FP8 modes (W8A8 products, W8A16 weight-only; real cuBLASLt kernels on sm_89+ GPUs,
//! simulated by rounding elsewhere), and the groups of layers ([`Fp8Groups`]) a run converts
//! (the two families' blocks have the same groups).

#[cfg(feature = "cuda")]
use candle_core::DType;
use candle_core::{Module, Result, Tensor};
use candle_nn::{linear_b, VarBuilder};

use crate::kernels::gemm;
use crate::model::lowrank::LowRank;

/// How a [`Lin`] uses FP8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fp8Mode {
    /// In the run's dtype.
    Off,
    /// FP8 products (W8A8): weight rows in E4M3 and the input rounded per token at each product
    /// (cuBLASLt on sm_89+ GPUs in bf16; elsewhere simulated by rounding).
    Products,
    /// Weight-only FP8 (W8A16): the weight kept in E4M3 per output channel, the input unrounded
    /// (the adaLN modulations under a memory budget: half the bytes, the products' input intact).
    WeightOnly,
}

/// A linear layer over token rows (with or without a bias) whose bias add (and GELU, when asked)
/// runs inside the product on CUDA ([`crate::kernels::gemm::linear`]); same function as
/// `candle_nn::Linear`.
#[derive(Debug, Clone)]
pub(crate) struct Lin {
    /// The weight in the run's dtype; `None` once dropped ([`Lin::lean`]: the default of an FP8
    /// run since issue 30, see `crate::engine::Precision::load_options`), when the GPU's E4M3
    /// copy stands for it. Where FP8 is simulated it holds the rounded weight the simulation
    /// multiplies by (never the original).
    pub(crate) weight: Option<Tensor>,
    pub(crate) bias: Option<Tensor>,
    /// FP8 use. Simulated (where no GPU copy exists): the weight was rounded per output channel
    /// once by [`Lin::to_fp8`]; under [`Fp8Mode::Products`] the input is rounded per token too.
    pub(crate) fp8: Fp8Mode,
    /// On GPUs with FP8 products: the weight in E4M3 with its scales, multiplied by cuBLASLt
    /// ([`crate::kernels::fp8_gemm`]); `weight`, unless dropped, keeps its original values for
    /// the products the FP8 path does not take.
    #[cfg(feature = "cuda")]
    pub(crate) fp8_gpu: Option<std::sync::Arc<crate::kernels::fp8_gemm::Fp8Matrix>>,
    /// A LoRA's low-rank path beside the product, in the run's dtype (never rounded to FP8:
    /// [`crate::model::lora`]).
    pub(crate) lora: Option<LowRank>,
}

impl Lin {
    pub(crate) fn new(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let l = linear_b(in_dim, out_dim, bias, vb)?;
        Ok(Self {
            weight: Some(l.weight().clone()),
            bias: l.bias().cloned(),
            fp8: Fp8Mode::Off,
            #[cfg(feature = "cuda")]
            fp8_gpu: None,
            lora: None,
        })
    }

    /// The weight in the run's dtype: the kept one, or the E4M3 copy dequantised (a temporary,
    /// for the rare product the FP8 kernels cannot take once the original was dropped).
    pub(crate) fn weight(&self) -> Result<std::borrow::Cow<'_, Tensor>> {
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
    pub(crate) fn to_fp8(&self, mode: Fp8Mode) -> Result<Self> {
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
                lora: self.lora.clone(),
            });
        }
        Ok(Self {
            weight: Some(crate::kernels::fp8::round_rows(&weight)?),
            bias: self.bias.clone(),
            fp8: mode,
            #[cfg(feature = "cuda")]
            fp8_gpu: None,
            lora: self.lora.clone(),
        })
    }

    /// This layer without its weight in the run's dtype where an E4M3 copy on the GPU stands for
    /// it (the memory an FP8 run saves); unchanged elsewhere.
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    pub(crate) fn lean(mut self) -> Self {
        #[cfg(feature = "cuda")]
        if self.fp8_gpu.is_some() {
            self.weight = None;
        }
        self
    }

    /// Whether this layer holds its weight in the run's dtype beside an E4M3 copy on the GPU
    /// (the copy an FP8 run drops unless asked to keep it).
    pub(crate) fn holds_copy(&self) -> bool {
        #[cfg(feature = "cuda")]
        {
            self.fp8_gpu.is_some() && self.weight.is_some()
        }
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// Bytes this layer's weights hold on their device (the run's dtype and any E4M3 copy).
    pub(crate) fn weight_bytes(&self) -> usize {
        let kept = self
            .weight
            .iter()
            .chain(self.bias.iter())
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum::<usize>()
            + self.lora.as_ref().map_or(0, LowRank::bytes);
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
    pub(crate) fn fp8_weight_on_gpu(
        weight: &Tensor,
    ) -> Option<std::sync::Arc<crate::kernels::fp8_gemm::Fp8Matrix>> {
        use crate::kernels::fp8_gemm as f;
        let candle_core::Device::Cuda(dev) = weight.device() else {
            return None;
        };
        if !f::enabled() || !f::supported(dev) || weight.dtype() != DType::BF16 {
            return None;
        }
        let start = std::time::Instant::now();
        // Waited for, so that the load's timing tells the quantisation apart from the next copy.
        let q = f::quantize_rows(weight, f::per_tensor_weights())
            .and_then(|m| weight.device().synchronize().map(|_| m));
        crate::model::load_clock::add(
            crate::model::load_clock::LoadPhase::Fp8Quantise,
            start.elapsed(),
        );
        match q {
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
    pub(crate) fn fp8_product(&self, a: Option<&Tensor>, x: &Tensor, gelu: bool) -> Option<Tensor> {
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

    pub(crate) fn input<'a>(&self, x: &'a Tensor) -> Result<std::borrow::Cow<'a, Tensor>> {
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
    pub(crate) fn rows(&self, start: usize, len: usize) -> Result<Self> {
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
            lora: None,
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

    /// Output rows of the layer (its weight's, or its E4M3 copy's once the weight was dropped).
    /// Take a LoRA's low-rank path: merged into the weight (`W + B A`, summed in f32) where the
    /// layer runs in its own dtype, so its products cost nothing more; beside the product where
    /// it runs in FP8 (rounding would swallow the LoRA's change: [`crate::model::lora`]).
    pub(crate) fn merge_low_rank(&mut self, lr: LowRank) -> Result<()> {
        #[cfg(feature = "cuda")]
        let on_gpu_fp8 = self.fp8_gpu.is_some();
        #[cfg(not(feature = "cuda"))]
        let on_gpu_fp8 = false;
        match &self.weight {
            Some(w) if self.fp8 == Fp8Mode::Off && !on_gpu_fp8 => {
                self.weight = Some(lr.merged_into(w)?);
                self.lora = None;
            }
            _ => self.lora = Some(lr),
        }
        Ok(())
    }

    pub(crate) fn out_rows(&self) -> Result<usize> {
        if let Some(w) = &self.weight {
            return w.dim(0);
        }
        #[cfg(feature = "cuda")]
        if let Some(q) = &self.fp8_gpu {
            return Ok(q.rows);
        }
        candle_core::bail!("a linear layer lost its weight (dropped with no FP8 copy)")
    }

    /// `x Wᵀ + b`, then GELU if `gelu` (bias and GELU in the product's epilogue on CUDA); with a
    /// LoRA, its low-rank path is added before the GELU.
    pub(crate) fn apply(&self, x: &Tensor, gelu: bool) -> Result<Tensor> {
        if let Some(l) = &self.lora {
            let y = (self.product(x, false)? + l.delta(x)?)?;
            return if gelu { y.gelu() } else { Ok(y) };
        }
        self.product(x, gelu)
    }

    /// [`Lin::apply`] without the LoRA path.
    fn product(&self, x: &Tensor, gelu: bool) -> Result<Tensor> {
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

    /// Whether this layer takes its input in E4M3 rows ([`Normed::Fp8`]): FP8 products on the
    /// GPU and no LoRA path (which reads the bf16 rows).
    #[cfg(feature = "cuda")]
    pub(crate) fn takes_fp8_rows(&self) -> bool {
        self.fp8 == Fp8Mode::Products && self.fp8_gpu.is_some() && self.lora.is_none()
    }

    /// [`Lin::apply`] on a norm's output.
    pub(crate) fn apply_normed(&self, x: &Normed, gelu: bool) -> Result<Tensor> {
        match x {
            Normed::Rows(x) => self.apply(x, gelu),
            #[cfg(feature = "cuda")]
            Normed::Fp8 { q, dims } => self.apply_fp8_rows(None, q, dims, gelu),
        }
    }

    /// [`Lin::apply_beside`] on a norm's output.
    pub(crate) fn apply_beside_normed(&self, a: &Tensor, x: &Normed, gelu: bool) -> Result<Tensor> {
        match x {
            Normed::Rows(x) => self.apply_beside(a, x, gelu),
            #[cfg(feature = "cuda")]
            Normed::Fp8 { q, dims } => self.apply_fp8_rows(Some(a), q, dims, gelu),
        }
    }

    /// The FP8 product on rows already in E4M3; where it fails, the rows decoded (the input
    /// FP8 rounded, as the simulation sees it) through the plain path.
    #[cfg(feature = "cuda")]
    fn apply_fp8_rows(
        &self,
        a: Option<&Tensor>,
        q: &crate::kernels::fp8_gemm::Fp8Matrix,
        dims: &[usize],
        gelu: bool,
    ) -> Result<Tensor> {
        use crate::kernels::fp8_gemm as f;
        if let (Some(w), true) = (&self.fp8_gpu, self.takes_fp8_rows()) {
            match f::linear_cat_q(a, q, dims, w, self.bias.as_ref(), gelu) {
                Ok(y) => return Ok(y),
                Err(e) => {
                    static ONCE: std::sync::Once = std::sync::Once::new();
                    ONCE.call_once(|| {
                        tracing::warn!("FP8 product on quantised rows failed ({e}); decoding them")
                    });
                }
            }
        }
        let x = f::dequantize(q)?.reshape(dims)?;
        match a {
            Some(a) => self.apply_beside(a, &x, gelu),
            None => self.apply(&x, gelu),
        }
    }

    /// `[a, self.apply(x, gelu)]` along the last axis, the product written in place beside `a`.
    pub(crate) fn apply_beside(&self, a: &Tensor, x: &Tensor, gelu: bool) -> Result<Tensor> {
        if self.lora.is_some() {
            return Tensor::cat(&[a, &self.apply(x, gelu)?], candle_core::D::Minus1);
        }
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

/// A product's input as the modulated LayerNorm made it: bf16 rows, or, where every layer that
/// reads it runs FP8 products on the GPU, the rows already in E4M3 with their per-token scales,
/// written by the norm's own kernel ([`crate::kernels::ln_fp8`]) so that no product quantises
/// them again and no bf16 rows are written at all.
pub(crate) enum Normed {
    Rows(Tensor),
    #[cfg(feature = "cuda")]
    Fp8 {
        q: Box<crate::kernels::fp8_gemm::Fp8Matrix>,
        /// The shape of the rows' tensor (B, L, C).
        dims: Vec<usize>,
    },
}

impl Normed {
    /// `LayerNorm(x) · (1 + scale) + shift` for the layers `readers`: in E4M3 where each of them
    /// would quantise it for an FP8 product anyway and the fused kernel takes the shapes (or,
    /// without the fused kernel, where more than one reads it: quantised once by the products'
    /// own quantiser), in the run's dtype otherwise.
    pub(crate) fn for_layers(
        x: &Tensor,
        shift: &Tensor,
        scale: &Tensor,
        readers: &[&Lin],
    ) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if crate::kernels::ln_fp8::enabled()
            && !readers.is_empty()
            && readers.iter().all(|l| l.takes_fp8_rows())
        {
            match crate::kernels::ln_fp8::ln_modulate_fp8(x, shift, scale, false) {
                Ok(Some((_, q))) => {
                    return Ok(Normed::Fp8 {
                        q: Box::new(q),
                        dims: x.dims().to_vec(),
                    })
                }
                Ok(None) => {}
                Err(e) => {
                    static ONCE: std::sync::Once = std::sync::Once::new();
                    ONCE.call_once(|| {
                        tracing::warn!(
                            "the fused norm + FP8 quantisation failed ({e}); quantising each \
                             product's input separately"
                        )
                    });
                }
            }
        }
        let rows = crate::kernels::elementwise::ln_modulate(x, shift, scale)?;
        // Several FP8 readers (the single blocks' two halves of linear1) would each quantise the
        // same rows: quantise them once here (the same per-token rounding each would do).
        #[cfg(feature = "cuda")]
        if readers.len() > 1
            && crate::kernels::ln_fp8::shared_rows()
            && readers.iter().all(|l| l.takes_fp8_rows())
            && rows.dtype() == candle_core::DType::BF16
            && rows.device().is_cuda()
        {
            match crate::kernels::fp8_gemm::quantize_rows(&rows, false) {
                Ok(q) => {
                    return Ok(Normed::Fp8 {
                        q: Box::new(q),
                        dims: rows.dims().to_vec(),
                    })
                }
                Err(e) => {
                    static ONCE: std::sync::Once = std::sync::Once::new();
                    ONCE.call_once(|| {
                        tracing::warn!(
                            "quantising the norm's rows once for its FP8 readers failed ({e}); \
                             each product quantises them"
                        )
                    });
                }
            }
        }
        let _ = readers;
        Ok(Normed::Rows(rows))
    }
}

/// `l` converted to FP8 in `mode` when `on` (and made lean with `lean`); the old weights are
/// freed as soon as nothing else holds them.
pub(crate) fn convert(l: &mut Lin, on: bool, mode: Fp8Mode, lean: bool) -> Result<()> {
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

/// Which groups of the blocks' linear layers run in FP8
/// ([`crate::model::flux::Flux::with_fp8_in`], [`crate::model::klein::Klein::with_fp8_in`]).
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
