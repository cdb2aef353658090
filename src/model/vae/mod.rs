//! The FLUX.1 autoencoder: a 16-channel KL autoencoder that maps images to latents 8x smaller on
//! each side ([`AutoEncoder::encode`]) and back ([`AutoEncoder::decode`]).
//!
//! The network is the classic "taming transformers" encoder/decoder: a stack of resolution
//! levels made of ResNet blocks (GroupNorm, swish, 3x3 convolution, twice, plus a 1x1 shortcut
//! when the channel count changes), a middle section with one single-head self-attention block
//! between two ResNet blocks, and 2x down/upsampling between levels. Unlike the Stable Diffusion
//! autoencoder, FLUX has no `quant_conv`/`post_quant_conv`, and its latents are normalised with
//! a shift as well as a scale ([`VaeConfig::shift_factor`], [`VaeConfig::scaling_factor`]).
//!
//! Tensor names are Black Forest Labs' (`ae.safetensors`); [`VaeDiffusersMap`] (in `keys.rs`)
//! finds the same tensors in a diffusers `vae/diffusion_pytorch_model.safetensors`, and
//! [`vae_config_from_diffusers_json`] (in `config.rs`) reads that folder's `config.json`. This
//! file holds the architecture.
//!
//! The building blocks ([`GroupNorm`] with its two explicit steps, [`Conv2d`] with an unpadded
//! variant, [`AttnBlock`] with chunked attention, [`ResnetBlock`]) and the decoder's stages are
//! public so that a band-parallel decoder (rows of the latent split across GPUs, halo rows
//! exchanged before each 3x3 convolution, GroupNorm statistics summed across bands) can run the
//! same weights step by step.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

mod config;
mod keys;

pub use config::{infer_vae_config, vae_config_from_diffusers_json, vae_config_from_diffusers_str};
pub use keys::VaeDiffusersMap;

/// The epsilon of every GroupNorm in the autoencoder.
pub const GROUP_NORM_EPS: f64 = 1e-6;

/// How many attention scores (query rows x key positions x batch) one chunk of
/// [`attention`] may hold at once when [`AttnBlock`] picks the chunk size itself: 2^25 scores
/// are 128 MiB in f32. At 1024x1024 pixels (16384 latent positions) this means 2048 query rows
/// per chunk instead of a 1 GiB score matrix.
pub const ATTN_SCORE_BUDGET: usize = 1 << 25;

/// The autoencoder's hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    /// Image channels going in (3, RGB).
    pub in_channels: usize,
    /// Image channels coming out (3, RGB).
    pub out_channels: usize,
    /// Base channel count; level `i` has `ch * ch_mult[i]` channels.
    pub ch: usize,
    /// Channel multiplier of each resolution level, finest first.
    pub ch_mult: Vec<usize>,
    /// ResNet blocks per encoder level (the decoder has one more per level).
    pub num_res_blocks: usize,
    /// Latent channels.
    pub z_channels: usize,
    /// Groups of every GroupNorm.
    pub norm_groups: usize,
    /// Latents are stored as `(mean - shift_factor) * scaling_factor`.
    pub scaling_factor: f64,
    /// See [`VaeConfig::scaling_factor`].
    pub shift_factor: f64,
}

impl VaeConfig {
    /// The autoencoder shipped with FLUX.1 (dev and schnell).
    pub fn flux() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            ch: 128,
            ch_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            z_channels: 16,
            norm_groups: 32,
            scaling_factor: 0.3611,
            shift_factor: 0.1159,
        }
    }

    /// A small autoencoder with FLUX's structure (four levels, 16 latent channels, same latent
    /// normalisation), for the demo model and tests.
    pub fn tiny() -> Self {
        Self {
            ch: 16,
            num_res_blocks: 1,
            norm_groups: 8,
            ..Self::flux()
        }
    }

    /// The trained demo model's autoencoder (`assets/demo/ae.safetensors`): base width 16, levels
    /// of 16, 16, 32 and 32 channels, FLUX's latent normalisation (the trainer keeps its latents
    /// near zero mean and unit spread under it).
    pub fn demo() -> Self {
        Self {
            ch: 16,
            ch_mult: vec![1, 1, 2, 2],
            num_res_blocks: 1,
            norm_groups: 8,
            ..Self::flux()
        }
    }

    /// How many pixels one latent position covers along each side (8 for FLUX).
    pub fn downscale_factor(&self) -> usize {
        1usize << self.ch_mult.len().saturating_sub(1)
    }

    /// Channels of resolution level `level` (`ch * ch_mult[level]`).
    pub fn level_channels(&self, level: usize) -> usize {
        self.ch * self.ch_mult.get(level).copied().unwrap_or(0)
    }

    /// Parameters of the decoder [`Decoder::new`] builds for this config (convolutions with
    /// biases, GroupNorm scales and shifts, the middle attention's four 1x1 projections).
    pub fn decoder_params(&self) -> u64 {
        let conv = |i: usize, o: usize, k: usize| (i * o * k * k + o) as u64;
        let norm = |c: usize| 2 * c as u64;
        let resnet = |i: usize, o: usize| {
            norm(i)
                + conv(i, o, 3)
                + norm(o)
                + conv(o, o, 3)
                + if i != o { conv(i, o, 1) } else { 0 }
        };
        let levels = self.ch_mult.len();
        let mut c = self.level_channels(levels.saturating_sub(1));
        let mut n = conv(self.z_channels, c, 3) + 2 * resnet(c, c) + norm(c) + 4 * conv(c, c, 1);
        for i in (0..levels).rev() {
            let out = self.level_channels(i);
            for _ in 0..=self.num_res_blocks {
                n += resnet(c, out);
                c = out;
            }
            if i != 0 {
                n += conv(c, c, 3);
            }
        }
        n + norm(c) + conv(c, self.out_channels, 3)
    }

    /// Check that the numbers describe a network that can be built.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.ch_mult.is_empty() {
            return Err("ch_mult is empty".into());
        }
        if self.ch == 0 || self.ch_mult.contains(&0) {
            return Err(format!(
                "channel counts must be positive (ch {}, ch_mult {:?})",
                self.ch, self.ch_mult
            ));
        }
        if self.in_channels == 0 || self.out_channels == 0 || self.z_channels == 0 {
            return Err("in_channels, out_channels and z_channels must be positive".into());
        }
        if self.norm_groups == 0 {
            return Err("norm_groups must be positive".into());
        }
        for (i, m) in self.ch_mult.iter().enumerate() {
            let c = self.ch * m;
            if c % self.norm_groups != 0 {
                return Err(format!(
                    "level {i} has {c} channels, not a multiple of norm_groups {}",
                    self.norm_groups
                ));
            }
        }
        if self.ch % self.norm_groups != 0 {
            return Err(format!(
                "ch {} is not a multiple of norm_groups {}",
                self.ch, self.norm_groups
            ));
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor != 0.0) {
            return Err(format!(
                "scaling_factor must be finite and non-zero, got {}",
                self.scaling_factor
            ));
        }
        if !self.shift_factor.is_finite() {
            return Err(format!(
                "shift_factor must be finite, got {}",
                self.shift_factor
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Building blocks
// ---------------------------------------------------------------------------------------------

/// Per-group statistics of a GroupNorm input: for each (batch item, group), the sum and the sum
/// of squares of its values and how many values that was. Statistics of disjoint parts of a
/// tensor (row bands) add up to those of the whole, so they can be all-reduced across devices.
#[derive(Debug, Clone)]
pub struct GroupStats {
    /// Sum of the values, f32, shape (B, groups).
    pub sum: Tensor,
    /// Sum of the squared values, f32, shape (B, groups).
    pub sum_sq: Tensor,
    /// Number of values per group.
    pub count: usize,
}

impl GroupStats {
    /// The statistics of the union of the parts `self` and `other` were taken from.
    pub fn combine(&self, other: &GroupStats) -> candle_core::Result<GroupStats> {
        Ok(GroupStats {
            sum: (&self.sum + &other.sum)?,
            sum_sq: (&self.sum_sq + &other.sum_sq)?,
            count: self.count + other.count,
        })
    }

    /// `sum` and `sum_sq` stacked into one (2, B, groups) tensor, for a single all-reduce.
    pub fn packed(&self) -> candle_core::Result<Tensor> {
        Tensor::stack(&[&self.sum, &self.sum_sq], 0)
    }

    /// Undo [`GroupStats::packed`] (after summing packs, pass the summed `count`).
    pub fn from_packed(packed: &Tensor, count: usize) -> candle_core::Result<GroupStats> {
        let (two, _, _) = packed.dims3()?;
        if two != 2 {
            candle_core::bail!("packed GroupNorm statistics must have 2 rows, got {two}");
        }
        Ok(GroupStats {
            sum: packed.get(0)?,
            sum_sq: packed.get(1)?,
            count,
        })
    }
}

/// Group normalisation in two explicit steps: [`GroupNorm::stats`] then
/// [`GroupNorm::normalize`]. Statistics are accumulated in f32 whatever the input dtype.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    channels: usize,
    eps: f64,
}

impl GroupNorm {
    /// Load `weight` and `bias` (both `channels` long) from `vb`.
    pub fn new(
        groups: usize,
        channels: usize,
        eps: f64,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
        let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
        Self::from_tensors(weight, bias, groups, eps)
    }

    /// Build from an affine weight and bias of shape (channels,).
    pub fn from_tensors(
        weight: Tensor,
        bias: Tensor,
        groups: usize,
        eps: f64,
    ) -> candle_core::Result<Self> {
        let channels = weight.dims1()?;
        if bias.dims1()? != channels {
            candle_core::bail!(
                "GroupNorm weight has {channels} channels but bias has {}",
                bias.dims1()?
            );
        }
        if groups == 0 || channels % groups != 0 {
            candle_core::bail!("GroupNorm: {groups} groups do not divide {channels} channels");
        }
        Ok(Self {
            weight,
            bias,
            groups,
            channels,
            eps,
        })
    }

    pub fn groups(&self) -> usize {
        self.groups
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    fn check_input(&self, x: &Tensor) -> candle_core::Result<usize> {
        let dims = x.dims();
        if dims.len() < 3 {
            candle_core::bail!("GroupNorm input must have rank 3 or more, got {:?}", dims);
        }
        if dims[1] != self.channels {
            candle_core::bail!(
                "GroupNorm expects {} channels, input has shape {:?}",
                self.channels,
                dims
            );
        }
        Ok(dims[0])
    }

    /// Step one: the per-group sums and sums of squares of `x` (B, C, ...).
    pub fn stats(&self, x: &Tensor) -> candle_core::Result<GroupStats> {
        let b = self.check_input(x)?;
        let per_group = x.elem_count() / (b * self.groups).max(1);
        if let Some((sum, sum_sq)) = crate::kernels::elementwise::group_sums(x, self.groups)? {
            return Ok(GroupStats {
                sum,
                sum_sq,
                count: per_group,
            });
        }
        let xg = x
            .to_dtype(DType::F32)?
            .reshape((b, self.groups, per_group))?;
        Ok(GroupStats {
            sum: xg.sum(2)?,
            sum_sq: xg.sqr()?.sum(2)?,
            count: per_group,
        })
    }

    /// Step two: normalise `x` (B, C, ...) with statistics `stats` (which may come from a larger
    /// tensor `x` is a part of), then apply the affine weight and bias. The result has `x`'s
    /// dtype; the arithmetic is done in f32.
    pub fn normalize(&self, x: &Tensor, stats: &GroupStats) -> candle_core::Result<Tensor> {
        self.normalize_act(x, stats, false)
    }

    /// [`GroupNorm::normalize`], then swish if `swish` (one fused pass on CUDA in bf16).
    pub fn normalize_act(
        &self,
        x: &Tensor,
        stats: &GroupStats,
        swish: bool,
    ) -> candle_core::Result<Tensor> {
        let b = self.check_input(x)?;
        if stats.sum.dims() != [b, self.groups] || stats.sum_sq.dims() != [b, self.groups] {
            candle_core::bail!(
                "GroupNorm statistics have shape {:?}/{:?}, expected [{b}, {}]",
                stats.sum.dims(),
                stats.sum_sq.dims(),
                self.groups
            );
        }
        if stats.count == 0 {
            candle_core::bail!("GroupNorm statistics cover no values");
        }
        let n = stats.count as f64;
        let mean = (&stats.sum / n)?;
        // Var = E[x²] - E[x]²; rounding can make it slightly negative, hence the relu.
        let var = ((&stats.sum_sq / n)? - mean.sqr()?)?.relu()?;
        let inv_std = (var + self.eps)?.sqrt()?.recip()?;
        // Per (batch, channel): y = x * a + c with a = w / std and c = bias - mean * a.
        let per = self.channels / self.groups;
        let expand = |t: &Tensor| -> candle_core::Result<Tensor> {
            t.unsqueeze(2)?
                .broadcast_as((b, self.groups, per))?
                .reshape((b, self.channels))
        };
        let w = self.weight.to_dtype(DType::F32)?.unsqueeze(0)?;
        let bias = self.bias.to_dtype(DType::F32)?.unsqueeze(0)?;
        let a = expand(&inv_std)?.broadcast_mul(&w)?;
        let c = bias.broadcast_sub(&expand(&mean)?.mul(&a)?)?;
        crate::kernels::elementwise::channel_affine(x, &a, &c, swish)
    }

    /// Both steps on one tensor.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let stats = self.stats(x)?;
        self.normalize(x, &stats)
    }

    /// Both steps, then swish: `swish(GroupNorm(x))`, as every ResNet block and output head does.
    pub fn forward_swish(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let stats = self.stats(x)?;
        self.normalize_act(x, &stats, true)
    }
}

/// Convolutions whose im2col matrix would hold more values than this run in bands
/// of output rows, with the same result ([`Conv2d::forward_banded`]): 2^28 values (512 MiB in
/// bf16) keep the autoencoder's peak memory down at 1024 px and up, while each band's product
/// stays large (233k positions at 128 channels). On candle's path a band also keeps cuDNN's
/// 32-bit tensor descriptors in range (a 4096 px map of 128 channels has 2^31 values).
pub const CONV_BAND_VALUES: usize = 1 << 28;

/// A 2D convolution with square kernel and bias (weight (out, in, k, k)).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let weight = vb.get((out_channels, in_channels, kernel, kernel), "weight")?;
        let bias = vb.get(out_channels, "bias")?;
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
        })
    }

    /// The kernel, (out, in, k, k).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    pub fn kernel_size(&self) -> usize {
        self.weight.dims().get(2).copied().unwrap_or(1)
    }

    pub fn stride(&self) -> usize {
        self.stride
    }

    /// The zero padding [`Conv2d::forward`] adds on every side.
    pub fn padding(&self) -> usize {
        self.padding
    }

    fn conv(
        &self,
        x: &Tensor,
        padding: usize,
        residual: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let y = self.conv_nobias(x, padding, CONV_BAND_VALUES)?;
        // Bias (and residual) added into the fresh output in place on CUDA.
        crate::kernels::elementwise::channel_bias_add(y, &self.bias, residual)
    }

    /// The convolution without bias, in bands of output rows when its im2col matrix would hold
    /// more than `max_values` values (any stride; 1x1 runs whole on Parallax's kernel, which
    /// needs no matrix for it).
    fn conv_nobias(
        &self,
        x: &Tensor,
        padding: usize,
        max_values: usize,
    ) -> candle_core::Result<Tensor> {
        use crate::kernels::conv::conv2d_rows;
        let (b, cin, h, w) = x.dims4()?;
        let k = self.kernel_size();
        let s = self.stride;
        if h + 2 * padding < k || w + 2 * padding < k {
            candle_core::bail!("convolution: a {h}x{w} map is smaller than its {k}x{k} kernel");
        }
        let (ho, wo) = ((h + 2 * padding - k) / s + 1, (w + 2 * padding - k) / s + 1);
        let per_row = b * cin * k * k * wo;
        let rows = (max_values / per_row.max(1)).max(1);
        // Parallax's kernel needs no column matrix for a 1x1 convolution; candle's builds one.
        let no_matrix = k == 1 && crate::kernels::conv::own_kernel(x);
        if no_matrix || rows >= ho {
            return conv2d_rows(x, &self.weight, s, padding, 0, ho);
        }
        crate::kernels::conv::conv2d_banded(x, &self.weight, s, padding, rows)
    }

    /// [`Conv2d::forward`] in bands of output rows, each band's im2col matrix at most
    /// `max_values` values (for tests; [`Conv2d::forward`] bands at [`CONV_BAND_VALUES`]).
    pub fn forward_banded(&self, x: &Tensor, max_values: usize) -> candle_core::Result<Tensor> {
        let y = self.conv_nobias(x, self.padding, max_values)?;
        crate::kernels::elementwise::channel_bias_add(y, &self.bias, None)
    }

    /// The convolution with its zero padding on all four sides.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.conv(x, self.padding, None)
    }

    /// [`Conv2d::forward`] plus `residual` (same shape as the output), added in the same pass as
    /// the bias.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        self.conv(x, self.padding, Some(residual))
    }

    /// The convolution without any padding ("valid"): for inputs the caller has already padded,
    /// e.g. a row band with halo rows from its neighbours above and below and zero columns on
    /// the left and right.
    pub fn forward_valid(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.conv(x, 0, None)
    }
}

/// A 1x1 convolution applied as a matrix product over positions; its weight is stored as a
/// (out, in, 1, 1) kernel.
#[derive(Debug, Clone)]
pub struct PointwiseConv {
    linear: candle_nn::Linear,
}

impl PointwiseConv {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let weight = vb
            .get((out_channels, in_channels, 1, 1), "weight")?
            .reshape((out_channels, in_channels))?;
        let bias = vb.get(out_channels, "bias")?;
        Ok(Self {
            linear: candle_nn::Linear::new(weight, Some(bias)),
        })
    }

    /// Apply to positions laid out as (B, N, C_in), giving (B, N, C_out).
    pub fn forward_tokens(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.linear.forward(x)
    }
}

/// Swish (x * sigmoid(x)), the autoencoder's only non-linearity.
pub fn swish(x: &Tensor) -> candle_core::Result<Tensor> {
    x.silu()
}

/// A ResNet block: `x + conv2(swish(norm2(conv1(swish(norm1(x))))))`, with `x` passed through a
/// 1x1 convolution (`nin_shortcut`) when the channel count changes.
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub nin_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        groups: usize,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let norm1 = GroupNorm::new(groups, in_channels, GROUP_NORM_EPS, vb.pp("norm1"))?;
        let conv1 = Conv2d::new(in_channels, out_channels, 3, 1, 1, vb.pp("conv1"))?;
        let norm2 = GroupNorm::new(groups, out_channels, GROUP_NORM_EPS, vb.pp("norm2"))?;
        let conv2 = Conv2d::new(out_channels, out_channels, 3, 1, 1, vb.pp("conv2"))?;
        let nin_shortcut = if in_channels != out_channels {
            Some(Conv2d::new(
                in_channels,
                out_channels,
                1,
                1,
                0,
                vb.pp("nin_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1,
            conv1,
            norm2,
            conv2,
            nin_shortcut,
        })
    }

    /// The shortcut branch: `x` itself or its 1x1 projection.
    pub fn shortcut(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.nin_shortcut {
            Some(conv) => conv.forward(x),
            None => Ok(x.clone()),
        }
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // Each intermediate is dropped as soon as the next exists (peak memory: `x` and two maps).
        let mut h = self.norm1.forward_swish(x)?;
        h = self.conv1.forward(&h)?;
        h = self.norm2.forward_swish(&h)?;
        match &self.nin_shortcut {
            None => self.conv2.forward_residual(&h, x),
            Some(_) => {
                let s = self.shortcut(x)?;
                self.conv2.forward_residual(&h, &s)
            }
        }
    }
}

/// Single-head softmax attention of queries `q` (B, Nq, C) over keys `k` and values `v`
/// (B, Nk, C), scaled by 1/sqrt(C). At most `query_rows` queries are processed at a time, so
/// only a (B, query_rows, Nk) block of scores exists at once. Softmax runs in f32 for f16/bf16
/// inputs.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    query_rows: usize,
) -> candle_core::Result<Tensor> {
    let (b, nq, c) = q.dims3()?;
    let (bk, _nk, ck) = k.dims3()?;
    if v.dims() != k.dims() || bk != b || ck != c {
        candle_core::bail!(
            "attention shapes do not fit: q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let dtype = q.dtype();
    let q = (q * (1.0 / (c as f64).sqrt()))?;
    let kt = k.t()?.contiguous()?; // (B, C, Nk)
    let v = v.contiguous()?;
    let rows = query_rows.clamp(1, nq.max(1));
    let mut outs = Vec::with_capacity(nq.div_ceil(rows));
    let mut start = 0;
    while start < nq {
        let len = rows.min(nq - start);
        let qc = q.narrow(1, start, len)?.contiguous()?;
        let scores = qc.matmul(&kt)?;
        let probs = match dtype {
            // The CUDA softmaxes accumulate f16/bf16 rows in f32 already.
            DType::F16 | DType::BF16 if !scores.device().is_cuda() => {
                candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(dtype)?
            }
            _ => crate::kernels::elementwise::softmax_last_dim(&scores)?,
        };
        drop(scores);
        outs.push(probs.matmul(&v)?);
        start += len;
    }
    match outs.len() {
        0 => Tensor::zeros((b, 0, c), dtype, q.device()),
        1 => Ok(outs.remove(0)),
        _ => Tensor::cat(&outs, 1),
    }
}

/// How many query rows [`AttnBlock`] gives one attention chunk over `keys` key positions for a
/// batch of `batch` on `device` (keeps the score block within [`attention_score_budget`], at
/// least 64 rows).
pub fn attention_query_rows(batch: usize, keys: usize, device: &candle_core::Device) -> usize {
    (attention_score_budget(device) / (batch * keys).max(1)).max(64)
}

/// Scores one attention chunk may hold: [`ATTN_SCORE_BUDGET`] on the CPU; 16x that (2^29, 1 GiB
/// in bf16) on a GPU, where small chunks starve the matrix units: on an H100 at 4096 px the
/// mid-block attention took 20.4 s with 2^25 (128-row chunks), 5.3 s with 2^27, 1.6 s with 2^29,
/// and the decode's peak memory stayed 23.08 GiB (it lies in the convolutions).
/// `PARALLAX_VAE_ATTN_BUDGET_LOG2` overrides it (for measurements).
pub fn attention_score_budget(device: &candle_core::Device) -> usize {
    if let Some(log2) = std::env::var("PARALLAX_VAE_ATTN_BUDGET_LOG2")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|&l| (16..=34).contains(&l))
    {
        return 1usize << log2;
    }
    if device.is_cpu() {
        ATTN_SCORE_BUDGET
    } else {
        ATTN_SCORE_BUDGET << 4
    }
}

/// The middle section's self-attention block: GroupNorm, q/k/v 1x1 projections, single-head
/// attention over all h*w positions, `proj_out`, residual.
#[derive(Debug, Clone)]
pub struct AttnBlock {
    pub norm: GroupNorm,
    pub q: PointwiseConv,
    pub k: PointwiseConv,
    pub v: PointwiseConv,
    pub proj_out: PointwiseConv,
    channels: usize,
    query_rows: Option<usize>,
}

impl AttnBlock {
    pub fn new(channels: usize, groups: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            norm: GroupNorm::new(groups, channels, GROUP_NORM_EPS, vb.pp("norm"))?,
            q: PointwiseConv::new(channels, channels, vb.pp("q"))?,
            k: PointwiseConv::new(channels, channels, vb.pp("k"))?,
            v: PointwiseConv::new(channels, channels, vb.pp("v"))?,
            proj_out: PointwiseConv::new(channels, channels, vb.pp("proj_out"))?,
            channels,
            query_rows: None,
        })
    }

    /// Fix the number of query rows per attention chunk (`None`: chosen from
    /// [`ATTN_SCORE_BUDGET`]).
    pub fn set_query_rows(&mut self, rows: Option<usize>) {
        self.query_rows = rows;
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    /// Turn a (B, C, h, w) map into (B, h*w, C) position tokens.
    pub fn to_tokens(x: &Tensor) -> candle_core::Result<Tensor> {
        x.flatten_from(2)?.transpose(1, 2)?.contiguous()
    }

    /// Queries, keys and values (each (B, h*w, C)) of an already normalised input (B, C, h, w).
    pub fn qkv(&self, normed: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let tokens = Self::to_tokens(normed)?;
        Ok((
            self.q.forward_tokens(&tokens)?,
            self.k.forward_tokens(&tokens)?,
            self.v.forward_tokens(&tokens)?,
        ))
    }

    /// `proj_out` of attention output tokens (B, h*w, C), back as a (B, C, h, w) map (without
    /// the residual).
    pub fn project_out(
        &self,
        attended: &Tensor,
        h: usize,
        w: usize,
    ) -> candle_core::Result<Tensor> {
        let (b, n, c) = attended.dims3()?;
        if n != h * w {
            candle_core::bail!("attention output has {n} positions, expected {h}x{w}");
        }
        self.proj_out
            .forward_tokens(attended)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        let (q, k, v) = self.qkv(&normed)?;
        drop(normed);
        let rows = self
            .query_rows
            .unwrap_or_else(|| attention_query_rows(b, h * w, x.device()));
        let attended = attention(&q, &k, &v, rows)?;
        x + self.project_out(&attended, h, w)?
    }
}

/// Nearest-neighbour 2x upsampling followed by a 3x3 convolution.
#[derive(Debug, Clone)]
pub struct Upsample {
    pub conv: Conv2d,
}

impl Upsample {
    pub fn new(channels: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            conv: Conv2d::new(channels, channels, 3, 1, 1, vb.pp("conv"))?,
        })
    }

    /// The nearest-neighbour 2x step alone.
    pub fn upsample(x: &Tensor) -> candle_core::Result<Tensor> {
        crate::kernels::elementwise::upsample_nearest2x(x)
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.conv.forward(&Self::upsample(x)?)
    }
}

/// Zero padding of one column on the right and one row at the bottom, then a 3x3 convolution
/// with stride 2 and no padding.
#[derive(Debug, Clone)]
pub struct Downsample {
    pub conv: Conv2d,
}

impl Downsample {
    pub fn new(channels: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            conv: Conv2d::new(channels, channels, 3, 2, 0, vb.pp("conv"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let padded = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
        self.conv.forward(&padded)
    }
}

// ---------------------------------------------------------------------------------------------
// Decoder and encoder
// ---------------------------------------------------------------------------------------------

/// One decoder resolution level: `num_res_blocks + 1` ResNet blocks, then (except at level 0,
/// the finest) an upsampling.
#[derive(Debug, Clone)]
pub struct UpLevel {
    pub blocks: Vec<ResnetBlock>,
    pub upsample: Option<Upsample>,
}

/// The decoder: unscaled latent (B, z, h, w) to image (B, out, 8h, 8w).
///
/// Stages in run order: [`Decoder::conv_in`], [`Decoder::mid_block_1`], [`Decoder::mid_attn_1`],
/// [`Decoder::mid_block_2`], then `up[i]` for i from `up.len() - 1` down to 0 (the index is the
/// resolution level, as in BFL's names), then [`Decoder::norm_out`], swish and
/// [`Decoder::conv_out`].
#[derive(Debug, Clone)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block_1: ResnetBlock,
    pub mid_attn_1: AttnBlock,
    pub mid_block_2: ResnetBlock,
    pub up: Vec<UpLevel>,
    pub norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Decoder {
    /// Load from `vb` pointing at the decoder (`decoder.` in BFL's names).
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(format!("bad VAE config: {e}")))?;
        let levels = cfg.ch_mult.len();
        let g = cfg.norm_groups;
        let mut block_in = cfg.level_channels(levels - 1);
        let conv_in = Conv2d::new(cfg.z_channels, block_in, 3, 1, 1, vb.pp("conv_in"))?;
        let mid = vb.pp("mid");
        let mid_block_1 = ResnetBlock::new(block_in, block_in, g, mid.pp("block_1"))?;
        let mid_attn_1 = AttnBlock::new(block_in, g, mid.pp("attn_1"))?;
        let mid_block_2 = ResnetBlock::new(block_in, block_in, g, mid.pp("block_2"))?;
        // Built in run order (coarsest level first), stored by level index.
        let mut up: Vec<Option<UpLevel>> = vec![None; levels];
        for i in (0..levels).rev() {
            let vb_level = vb.pp("up").pp(i);
            let block_out = cfg.level_channels(i);
            let mut blocks = Vec::with_capacity(cfg.num_res_blocks + 1);
            for j in 0..=cfg.num_res_blocks {
                blocks.push(ResnetBlock::new(
                    block_in,
                    block_out,
                    g,
                    vb_level.pp("block").pp(j),
                )?);
                block_in = block_out;
            }
            let upsample = if i != 0 {
                Some(Upsample::new(block_in, vb_level.pp("upsample"))?)
            } else {
                None
            };
            up[i] = Some(UpLevel { blocks, upsample });
        }
        let up = up.into_iter().flatten().collect();
        let norm_out = GroupNorm::new(g, block_in, GROUP_NORM_EPS, vb.pp("norm_out"))?;
        let conv_out = Conv2d::new(block_in, cfg.out_channels, 3, 1, 1, vb.pp("conv_out"))?;
        Ok(Self {
            conv_in,
            mid_block_1,
            mid_attn_1,
            mid_block_2,
            up,
            norm_out,
            conv_out,
        })
    }

    /// `conv_in` and the middle section.
    pub fn forward_mid(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.conv_in.forward(z)?;
        h = self.mid_block_1.forward(&h)?;
        h = self.mid_attn_1.forward(&h)?;
        self.mid_block_2.forward(&h)
    }

    /// Resolution level `level`: its ResNet blocks and its upsampling, if any.
    pub fn forward_level(&self, level: usize, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_level_owned(level, x.clone())
    }

    /// [`Decoder::forward_level`] taking its input, so that the input's memory goes as soon as
    /// the first block is done with it (when the caller holds no other handle to it).
    pub fn forward_level_owned(&self, level: usize, x: Tensor) -> candle_core::Result<Tensor> {
        let lvl = self
            .up
            .get(level)
            .ok_or_else(|| candle_core::Error::Msg(format!("decoder has no level {level}")))?;
        let mut h = x;
        for block in &lvl.blocks {
            h = block.forward(&h)?;
        }
        match &lvl.upsample {
            Some(up) => {
                let u = Upsample::upsample(&h)?;
                drop(h);
                up.conv.forward(&u)
            }
            None => Ok(h),
        }
    }

    /// `norm_out`, swish, `conv_out`.
    pub fn forward_out(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.norm_out.forward_swish(x)?;
        self.conv_out.forward(&h)
    }

    /// Decode an unscaled latent.
    pub fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.forward_mid(z)?;
        for level in (0..self.up.len()).rev() {
            h = self.forward_level_owned(level, h)?;
        }
        self.forward_out(&h)
    }
}

/// One encoder resolution level: `num_res_blocks` ResNet blocks, then (except at the coarsest
/// level) a downsampling.
#[derive(Debug, Clone)]
pub struct DownLevel {
    pub blocks: Vec<ResnetBlock>,
    pub downsample: Option<Downsample>,
}

/// The encoder: image (B, in, H, W) to the (B, 2z, H/8, W/8) moments (mean, then log-variance).
#[derive(Debug, Clone)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down: Vec<DownLevel>,
    pub mid_block_1: ResnetBlock,
    pub mid_attn_1: AttnBlock,
    pub mid_block_2: ResnetBlock,
    pub norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Encoder {
    /// Load from `vb` pointing at the encoder (`encoder.` in BFL's names).
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(format!("bad VAE config: {e}")))?;
        let levels = cfg.ch_mult.len();
        let g = cfg.norm_groups;
        let conv_in = Conv2d::new(cfg.in_channels, cfg.ch, 3, 1, 1, vb.pp("conv_in"))?;
        let mut block_in = cfg.ch;
        let mut down = Vec::with_capacity(levels);
        for i in 0..levels {
            let vb_level = vb.pp("down").pp(i);
            let block_out = cfg.level_channels(i);
            let mut blocks = Vec::with_capacity(cfg.num_res_blocks);
            for j in 0..cfg.num_res_blocks {
                blocks.push(ResnetBlock::new(
                    block_in,
                    block_out,
                    g,
                    vb_level.pp("block").pp(j),
                )?);
                block_in = block_out;
            }
            let downsample = if i + 1 != levels {
                Some(Downsample::new(block_in, vb_level.pp("downsample"))?)
            } else {
                None
            };
            down.push(DownLevel { blocks, downsample });
        }
        let mid = vb.pp("mid");
        let mid_block_1 = ResnetBlock::new(block_in, block_in, g, mid.pp("block_1"))?;
        let mid_attn_1 = AttnBlock::new(block_in, g, mid.pp("attn_1"))?;
        let mid_block_2 = ResnetBlock::new(block_in, block_in, g, mid.pp("block_2"))?;
        let norm_out = GroupNorm::new(g, block_in, GROUP_NORM_EPS, vb.pp("norm_out"))?;
        let conv_out = Conv2d::new(block_in, 2 * cfg.z_channels, 3, 1, 1, vb.pp("conv_out"))?;
        Ok(Self {
            conv_in,
            down,
            mid_block_1,
            mid_attn_1,
            mid_block_2,
            norm_out,
            conv_out,
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for level in &self.down {
            for block in &level.blocks {
                h = block.forward(&h)?;
            }
            if let Some(ds) = &level.downsample {
                h = ds.forward(&h)?;
            }
        }
        let h = self.mid_block_1.forward(&h)?;
        let h = self.mid_attn_1.forward(&h)?;
        let h = self.mid_block_2.forward(&h)?;
        let h = self.norm_out.forward_swish(&h)?;
        self.conv_out.forward(&h)
    }
}

/// The FLUX autoencoder. The encoder is optional: image generation needs only the decoder.
#[derive(Debug, Clone)]
pub struct AutoEncoder {
    cfg: VaeConfig,
    encoder: Option<Encoder>,
    decoder: Decoder,
    dtype: DType,
}

impl AutoEncoder {
    /// Load encoder and decoder; `vb` is at the root of BFL's names (`encoder.*`, `decoder.*`).
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let encoder = Encoder::new(cfg, vb.pp("encoder"))?;
        Self::assemble(cfg, Some(encoder), vb)
    }

    /// Load only the decoder (`decoder.*`); [`AutoEncoder::encode`] then fails.
    pub fn new_decoder_only(cfg: &VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        Self::assemble(cfg, None, vb)
    }

    /// Load the decoder, and the encoder when the weights hold one (judged by
    /// `encoder.conv_in.weight`).
    pub fn new_with_optional_encoder(cfg: &VaeConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        if vb.contains_tensor("encoder.conv_in.weight") {
            Self::new(cfg, vb)
        } else {
            Self::new_decoder_only(cfg, vb)
        }
    }

    fn assemble(
        cfg: &VaeConfig,
        encoder: Option<Encoder>,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let decoder = Decoder::new(cfg, vb.pp("decoder"))?;
        let dtype = decoder.conv_in.weight().dtype();
        Ok(Self {
            cfg: cfg.clone(),
            encoder,
            decoder,
            dtype,
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// The dtype of the weights (inputs are converted to it).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &candle_core::Device {
        self.decoder.conv_in.weight().device()
    }

    pub fn has_encoder(&self) -> bool {
        self.encoder.is_some()
    }

    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    pub fn encoder(&self) -> Option<&Encoder> {
        self.encoder.as_ref()
    }

    /// Mutable access to the decoder (e.g. to set its attention chunk size).
    pub fn decoder_mut(&mut self) -> &mut Decoder {
        &mut self.decoder
    }

    /// Undo the latent normalisation: `z / scaling_factor + shift_factor`.
    pub fn unscale_latent(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        (z / self.cfg.scaling_factor)? + self.cfg.shift_factor
    }

    /// Apply the latent normalisation: `(mean - shift_factor) * scaling_factor`.
    pub fn scale_latent(&self, mean: &Tensor) -> candle_core::Result<Tensor> {
        (mean - self.cfg.shift_factor)? * self.cfg.scaling_factor
    }

    /// Decode a scaled latent (B, z_channels, h, w), as the diffusion model produces it, into an
    /// image (B, out_channels, 8h, 8w) with values roughly in [-1, 1] (not clamped), in the
    /// weights' dtype.
    pub fn decode(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        self.check_latent(z)?;
        let z = self.unscale_latent(&z.to_dtype(self.dtype)?)?;
        self.decoder.forward(&z)
    }

    /// Refuse a latent that is not (B, z_channels, h, w).
    pub fn check_latent(&self, z: &Tensor) -> candle_core::Result<()> {
        let (_, c, _, _) = z.dims4()?;
        if c != self.cfg.z_channels {
            candle_core::bail!(
                "VAE decode expects a latent with {} channels, got shape {:?}",
                self.cfg.z_channels,
                z.dims()
            );
        }
        Ok(())
    }

    /// Encode an image (B, in_channels, H, W) with values in [-1, 1] into the scaled latent
    /// (B, z_channels, H/8, W/8): the mean of the latent distribution (no sampling), normalised.
    pub fn encode(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let encoder = self.encoder.as_ref().ok_or_else(|| {
            candle_core::Error::Msg("this autoencoder was loaded without its encoder".into())
        })?;
        let (_, c, _, _) = x.dims4()?;
        if c != self.cfg.in_channels {
            candle_core::bail!(
                "VAE encode expects an image with {} channels, got shape {:?}",
                self.cfg.in_channels,
                x.dims()
            );
        }
        let moments = encoder.forward(&x.to_dtype(self.dtype)?)?;
        let mean = moments.narrow(1, 0, self.cfg.z_channels)?;
        self.scale_latent(&mean)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::demo_weights::DemoWeights;
    use crate::model::rng::SplitMix64;
    use candle_core::{Device, D};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .unwrap_or(f32::INFINITY)
    }

    fn tiny_vae() -> AutoEncoder {
        let vb = DemoWeights::new(7).var_builder(DType::F32, &Device::Cpu);
        AutoEncoder::new(&VaeConfig::tiny(), vb).unwrap()
    }

    #[test]
    fn two_step_group_norm_matches_candle() -> candle_core::Result<()> {
        let mut rng = SplitMix64::new(11);
        let dev = Device::Cpu;
        let (c, g) = (24, 6);
        // An offset and scale so that mean and variance are far from 0 and 1.
        let x = ((rng.normal_tensor((2, c, 5, 7), &dev)? * 3.0)? + 1.5)?;
        let w = rng.normal_tensor(c, &dev)?.affine(0.3, 1.0)?;
        let b = rng.normal_tensor(c, &dev)?.affine(0.3, 0.0)?;
        let ours = GroupNorm::from_tensors(w.clone(), b.clone(), g, 1e-6)?;
        let theirs = candle_nn::GroupNorm::new(w, b, c, g, 1e-6)?;
        let expected = theirs.forward(&x)?;
        assert!(max_abs_diff(&ours.forward(&x)?, &expected) < 1e-4);

        // Statistics of row bands, combined, give the same result band by band.
        let top = x.narrow(2, 0, 2)?;
        let bottom = x.narrow(2, 2, 3)?;
        let stats = ours.stats(&top)?.combine(&ours.stats(&bottom)?)?;
        let stats = GroupStats::from_packed(&stats.packed()?, stats.count)?;
        let banded = Tensor::cat(
            &[
                ours.normalize(&top, &stats)?,
                ours.normalize(&bottom, &stats)?,
            ],
            2,
        )?;
        assert!(max_abs_diff(&banded, &expected) < 1e-4);

        // bf16 input keeps its dtype.
        let y = ours.forward(&x.to_dtype(DType::BF16)?)?;
        assert_eq!(y.dtype(), DType::BF16);
        assert!(max_abs_diff(&y.to_dtype(DType::F32)?, &expected) < 0.1);
        Ok(())
    }

    #[test]
    fn chunked_attention_matches_unchunked() -> candle_core::Result<()> {
        let mut rng = SplitMix64::new(12);
        let dev = Device::Cpu;
        let q = rng.normal_tensor((2, 37, 16), &dev)?;
        let k = rng.normal_tensor((2, 37, 16), &dev)?;
        let v = rng.normal_tensor((2, 37, 16), &dev)?;
        let full = attention(&q, &k, &v, 37)?;
        // Reference written out directly.
        let scores = (q.matmul(&k.t()?)? / 4.0)?;
        let reference = candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&v)?;
        assert!(max_abs_diff(&full, &reference) < 1e-5);
        for rows in [1, 5, 36] {
            let chunked = attention(&q, &k, &v, rows)?;
            assert_eq!(chunked.dims(), &[2, 37, 16]);
            assert!(max_abs_diff(&chunked, &full) < 1e-6, "rows {rows}");
        }
        Ok(())
    }

    #[test]
    fn attn_block_chunking_does_not_change_output() -> candle_core::Result<()> {
        let mut rng = SplitMix64::new(13);
        let vb = DemoWeights::new(3).var_builder(DType::F32, &Device::Cpu);
        let mut block = AttnBlock::new(16, 4, vb)?;
        let x = rng.normal_tensor((1, 16, 6, 5), &Device::Cpu)?;
        let whole = block.forward(&x)?;
        block.set_query_rows(Some(7));
        let chunked = block.forward(&x)?;
        assert!(max_abs_diff(&whole, &chunked) < 1e-5);
        Ok(())
    }

    #[test]
    fn banded_convolution_equals_whole() -> candle_core::Result<()> {
        let mut rng = SplitMix64::new(14);
        let dev = Device::Cpu;
        for (k, pad, stride) in [(3usize, 1usize, 1usize), (1, 0, 1), (3, 0, 2)] {
            let vb = DemoWeights::new(11).var_builder(DType::F32, &dev);
            let conv = Conv2d::new(6, 5, k, stride, pad, vb.pp("c"))?;
            let x = rng.normal_tensor((2, 6, 13, 9), &dev)?;
            let whole = conv.forward(&x)?;
            // Limits from one output row per band up to a few rows (a row's im2col matrix holds
            // batch x channels x taps x width values).
            let row = 2 * 6 * k * k * whole.dim(3)?;
            for limit in [1, row, row * 4, row * 7 + 5] {
                let banded = conv.forward_banded(&x, limit)?;
                assert_eq!(banded.dims(), whole.dims());
                let d = (&banded - &whole)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    d < 1e-5,
                    "k {k} stride {stride}, limit {limit}: max diff {d}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn conv_epilogue_and_upsampling_on_the_cpu() -> candle_core::Result<()> {
        let mut rng = SplitMix64::new(15);
        use crate::kernels::elementwise::{channel_bias_add, upsample_nearest2x};
        let dev = Device::Cpu;
        let y = rng.normal_tensor((2, 3, 4, 5), &dev)?;
        let r = rng.normal_tensor((2, 3, 4, 5), &dev)?;
        let bias = Tensor::new(&[1f32, -2.0, 0.5], &dev)?;
        let got = channel_bias_add(y.clone(), &bias, Some(&r))?;
        let want = ((&y + &r)? + bias.reshape((1, 3, 1, 1))?.broadcast_as(y.dims())?)?;
        let d = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-6, "{d}");
        let u = upsample_nearest2x(&y)?;
        assert_eq!(u.dims(), &[2, 3, 8, 10]);
        let ys = y.reshape((6, 20))?.to_vec2::<f32>()?;
        let us = u.reshape((6, 80))?.to_vec2::<f32>()?;
        for (p, (yp, up)) in ys.iter().zip(&us).enumerate() {
            for i in 0..8 {
                for j in 0..10 {
                    assert_eq!(
                        up[i * 10 + j],
                        yp[(i / 2) * 5 + j / 2],
                        "plane {p} ({i},{j})"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn decode_tiny_latent() -> candle_core::Result<()> {
        let mut rng = SplitMix64::new(16);
        let vae = tiny_vae();
        let z = rng.normal_tensor((1, 16, 8, 8), &Device::Cpu)?;
        let img = vae.decode(&z)?;
        assert_eq!(img.dims(), &[1, 3, 64, 64]);
        let values = img.flatten_all()?.to_vec1::<f32>()?;
        assert!(values.iter().all(|v| v.is_finite()));
        Ok(())
    }

    #[test]
    fn encode_decode_round_trip_shapes() -> candle_core::Result<()> {
        let mut rng = SplitMix64::new(17);
        let vae = tiny_vae();
        let z = rng.normal_tensor((2, 16, 4, 6), &Device::Cpu)?;
        let img = vae.decode(&z)?;
        assert_eq!(img.dims(), &[2, 3, 32, 48]);
        let z2 = vae.encode(&img)?;
        assert_eq!(z2.dims(), z.dims());
        assert!(z2
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|v| v.is_finite()));
        Ok(())
    }

    #[test]
    fn decoder_only_cannot_encode() -> candle_core::Result<()> {
        let vb = DemoWeights::new(7).var_builder(DType::F32, &Device::Cpu);
        let vae = AutoEncoder::new_decoder_only(&VaeConfig::tiny(), vb)?;
        assert!(!vae.has_encoder());
        let x = Tensor::zeros((1, 3, 16, 16), DType::F32, &Device::Cpu)?;
        assert!(vae.encode(&x).is_err());
        Ok(())
    }

    #[test]
    fn decode_rejects_wrong_channels() {
        let vae = tiny_vae();
        let z = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
        assert!(vae.decode(&z).is_err());
    }

    #[test]
    fn flux_config_is_valid() {
        assert_eq!(VaeConfig::flux().validate(), Ok(()));
        assert_eq!(VaeConfig::tiny().validate(), Ok(()));
        assert_eq!(VaeConfig::flux().downscale_factor(), 8);
        let mut bad = VaeConfig::tiny();
        bad.norm_groups = 5;
        assert!(bad.validate().is_err());
    }
}
