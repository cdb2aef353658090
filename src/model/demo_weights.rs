//! Deterministic made-up weights for the built-in demo model and for test checkpoints.
//!
//! Every tensor is drawn from its own stream keyed by (seed, tensor name), so it does not depend on
//! the order a model asks for its tensors. Scales follow common initialisations: matrices and
//! convolution kernels N(0, 1/fan_in), norm weights and QK-norm scales one, norm biases zero, other
//! biases N(0, 0.02²). These weights are random: a model built from them is a demo, not FLUX.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::rng;

/// A `VarBuilder` backend that makes every tensor it is asked for.
#[derive(Debug, Clone)]
pub struct DemoWeights {
    pub seed: u64,
}

impl DemoWeights {
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }

    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    /// The tensor named `name` of shape `shape` (f32 on the CPU).
    pub fn make(&self, name: &str, shape: &Shape) -> candle_core::Result<Tensor> {
        let n = shape.elem_count();
        let values: Vec<f32> = match init_for(name, shape.dims()) {
            InitKind::Const(c) => vec![c; n],
            InitKind::Normal(std) => rng::stream(self.seed, name)
                .normals(n)
                .into_iter()
                .map(|x| x * std)
                .collect(),
        };
        Tensor::from_vec(values, shape.clone(), &Device::Cpu)
    }
}

/// How a made-up tensor is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InitKind {
    Const(f32),
    Normal(f32),
}

/// The initialisation rule shared by [`DemoWeights`] and [`RandomWeights`].
pub fn init_for(name: &str, dims: &[usize]) -> InitKind {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    let is_norm = name.contains("norm") || name.contains("layer_norm") || name.contains("ln_");
    if leaf == "scale" || (is_norm && leaf == "weight" && dims.len() == 1) {
        InitKind::Const(1.0)
    } else if is_norm && leaf == "bias" {
        InitKind::Const(0.0)
    } else if dims.len() <= 1 {
        InitKind::Normal(0.02)
    } else {
        let fan_in: usize = dims[1..].iter().product::<usize>().max(1);
        InitKind::Normal(1.0 / (fan_in as f32).sqrt())
    }
}

/// Random weights generated directly on the target device (for `--model random:dev`: real sizes,
/// no files, no host copies). Same rules as [`DemoWeights`], drawn from the device's own
/// generator (seeded with `Device::set_seed`), so reproducible only on the same device.
#[derive(Debug, Clone, Copy)]
pub struct RandomWeights;

impl RandomWeights {
    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = match init_for(name, s.dims()) {
            InitKind::Const(c) => Tensor::full(c, s, dev)?,
            InitKind::Normal(std) => Tensor::randn(0f32, std, s, dev)?,
        };
        t.to_dtype(dtype)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for `{name}`")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

impl SimpleBackend for DemoWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.make(name, &s)?.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        candle_core::bail!("demo weights need a shape for `{name}`")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}
