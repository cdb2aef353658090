//! Test support for the stale-activation methods: a tiny transformer, three forwards whose inputs
//! move as denoising moves them, and how far a parallel run's outputs land from one device's.

use candle_core::{DType, Device, Result, Tensor};

use crate::model::demo_weights::DemoWeights;
use crate::model::flux::{Flux, FluxConfig, FluxInput, PosEmbed};
use crate::model::rng::SplitMix64;

/// A tiny model (4 heads of 32) and the inputs of three denoising-like forwards over `txt` text
/// tokens and an `h` x `w` image, about one step of a 28-step schedule apart (scaled by
/// `moving`; 0: the same input every time). The inputs come from a fixed seed, so the bounds the
/// tests set on the stale methods' error hold in CI: with unseeded inputs (25 runs of each test)
/// the stale error reached 0.235 (PipeFusion) and 0.2 (displaced patches) of the 0.3 allowed,
/// and a small move's error 0.21 of a full step's, a third allowed.
pub struct Steps {
    pub model: Flux,
    txt: Tensor,
    y: Tensor,
    g: Tensor,
    pe: PosEmbed,
    steps: Vec<(Tensor, Tensor)>,
}

impl Steps {
    pub fn new((txt, h, w): (usize, usize, usize), moving: f64) -> Result<Self> {
        let mut rng = SplitMix64::new(7);
        let dev = Device::Cpu;
        let cfg = FluxConfig {
            num_heads: 4,
            hidden_size: 128,
            axes_dim: vec![4, 14, 14],
            ..FluxConfig::tiny()
        };
        let model = Flux::new(&cfg, DemoWeights::new(5).var_builder(DType::F32, &dev))?;
        let img0 = rng.normal_tensor((1, h * w, 64), &dev)?;
        let steps = (0..3)
            .map(|i| {
                let img = (&img0 * (1.0 - 0.02 * moving * i as f64))?;
                let t = 0.9f32 - (0.04 * moving) as f32 * i as f32;
                Ok((img, Tensor::new(&[t], &dev)?))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            txt: rng.normal_tensor((1, txt, cfg.context_in_dim), &dev)?,
            y: rng.normal_tensor((1, cfg.vec_in_dim), &dev)?,
            g: Tensor::new(&[3.5f32], &dev)?,
            pe: model.pos_embed(txt, h, w)?,
            model,
            steps,
        })
    }

    /// Every forward of `f`, in order.
    pub fn run(&self, f: &dyn crate::model::family::Denoiser) -> Result<Vec<Tensor>> {
        self.steps
            .iter()
            .map(|(img, t)| {
                f.forward(&FluxInput {
                    img,
                    txt: &self.txt,
                    y: &self.y,
                    timesteps: t,
                    guidance: Some(&self.g),
                    pe: &self.pe,
                })
            })
            .collect()
    }

    /// Per forward, the largest difference between any rank's output (`per_rank`) and one
    /// device's, relative to the largest one-device value.
    pub fn worst(&self, per_rank: &[Vec<Tensor>]) -> Result<Vec<f32>> {
        let want = self.run(&self.model)?;
        let mut worst = vec![0f32; want.len()];
        for outs in per_rank {
            for (i, (o, w)) in outs.iter().zip(&want).enumerate() {
                let d = (o - w)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let scale = w.abs()?.max_all()?.to_scalar::<f32>()?;
                worst[i] = worst[i].max(d / scale);
            }
        }
        Ok(worst)
    }
}
