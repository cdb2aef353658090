//! `parallax profile`: time the pieces of one FLUX step on a device, at FLUX.1-dev's sizes.
//!
//! Each piece runs on random inputs, warmed up, then timed over several runs with the device
//! synchronised around each; the median is printed with the rate it implies (TFLOP/s for matrix
//! work, GB/s for memory-bound work). The last lines estimate a whole step from the block times.

use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};

use crate::kernels::flash_attn;
use crate::kernels::qkv_prep::{qkv_prep, qkv_prep_reference, QkvStream};
use crate::model::attention::sdpa_chunked;
use crate::model::demo_weights::RandomWeights;
use crate::model::flux::{Flux, FluxConfig, FluxInput};

fn time_ms(
    dev: &Device,
    runs: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    dev.synchronize()?;
    let mut v = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Ok(v[v.len() / 2])
}

fn row(name: &str, ms: f64, flop: f64, bytes: f64) {
    let rate = if flop > 0.0 {
        format!("{:>7.0} TFLOP/s", flop / (ms * 1e-3) / 1e12)
    } else {
        format!("{:>7.0} GB/s   ", bytes / (ms * 1e-3) / 1e9)
    };
    println!("{name:<56} {ms:>9.3} ms {rate}");
}

pub fn run(device: &str, width: usize) -> anyhow::Result<()> {
    let dev = crate::device::parse(device)?;
    println!(
        "profile on {} at {width}px (FLUX.1-dev sizes, bf16)",
        crate::device::describe(&dev)
    );
    let bf = DType::BF16;
    let (lt, li) = (512usize, (width / 16) * (width / 16));
    let l = lt + li;
    let (h, d) = (24usize, 128usize);
    let hid = h * d;
    let runs = 10;
    let rnd = |shape: &[usize]| -> anyhow::Result<Tensor> {
        Ok(Tensor::randn(0f32, 1.0, shape, &dev)?.to_dtype(bf)?)
    };

    // Attention.
    let (q, k, v) = (
        rnd(&[1, h, l, d])?,
        rnd(&[1, h, l, d])?,
        rnd(&[1, h, l, d])?,
    );
    let attn_flop = 4.0 * (l * l * d * h) as f64;
    for var in flash_attn::variants_on(&dev, d) {
        let ms = flash_attn::with_variant(var, || {
            time_ms(&dev, runs, || {
                Ok(flash_attn::attention(&q, &k, &v).map(|_| ())?)
            })
        })?;
        row(
            &format!("attention fused 1x{h}x{l}x{d} ({})", var.name()),
            ms,
            attn_flop,
            0.0,
        );
    }
    if let Some(var) = flash_attn::chosen_on(&dev, d) {
        let ms = time_ms(&dev, runs, || {
            Ok(flash_attn::attention_merged(&q, &k, &v).map(|_| ())?)
        })?;
        row(
            &format!(
                "attention fused, heads merged ({}, the default)",
                var.name()
            ),
            ms,
            attn_flop,
            0.0,
        );
    }
    if crate::kernels::flash_attn_fp8::kernel_takes(&q, &k, &v) {
        // FP8 scores: the two quantisations and the kernel, heads merged (as the model calls it).
        let ms = time_ms(&dev, runs, || {
            Ok(crate::kernels::flash_attn_fp8::attention_merged(&q, &k, &v).map(|_| ())?)
        })?;
        row(
            "attention, FP8 scores (quantise Q and K + kernel, heads merged)",
            ms,
            attn_flop,
            0.0,
        );
    }
    let ms = time_ms(&dev, 3, || Ok(sdpa_chunked(&q, &k, &v, 1024).map(|_| ())?))?;
    row(
        &format!("attention plain (chunked) 1x{h}x{l}x{d}"),
        ms,
        attn_flop,
        0.0,
    );

    // Linear layers of a step, with bias (as the model runs them) and without.
    let vb = RandomWeights.var_builder(bf, &dev);
    for (name, rows, kin, kout) in [
        ("qkv (img)", li, hid, 3 * hid),
        ("proj (img)", li, hid, hid),
        ("mlp up (img)", li, hid, 4 * hid),
        ("mlp down (img)", li, 4 * hid, hid),
        ("single linear1", l, hid, 7 * hid),
        ("single linear2", l, 5 * hid, hid),
    ] {
        let x = rnd(&[1, rows, kin])?;
        let lin = candle_nn::linear(kin, kout, vb.pp(name.replace(' ', "_")))?;
        let flop = 2.0 * (rows * kin * kout) as f64;
        let ms = time_ms(&dev, runs, || Ok(lin.forward(&x).map(|_| ())?))?;
        row(
            &format!("linear {name} {rows}x{kin}->{kout} +bias"),
            ms,
            flop,
            0.0,
        );
        let w = lin.weight().clone();
        let ms = time_ms(&dev, runs, || {
            Ok(x.broadcast_matmul(&w.t()?).map(|_| ())?)
        })?;
        row(&format!("matmul {name} (no bias)"), ms, flop, 0.0);
    }

    // Memory-bound pieces on the image stream (li x hid) and the MLP activation.
    let x = rnd(&[1, li, hid])?;
    let y = rnd(&[1, li, hid])?;
    let m = rnd(&[1, 1, hid])?;
    let ones = Tensor::ones(hid, bf, &dev)?;
    let zeros = Tensor::zeros(hid, bf, &dev)?;
    let bytes = (li * hid * 2) as f64;
    let ms = time_ms(&dev, runs, || {
        Ok(candle_nn::ops::layer_norm(&x, &ones, &zeros, 1e-6).map(|_| ())?)
    })?;
    row("layer norm (image stream)", ms, 0.0, 2.0 * bytes);
    let ms = time_ms(&dev, runs, || {
        Ok(x.broadcast_mul(&(&m + 1.0)?)?
            .broadcast_add(&m)
            .map(|_| ())?)
    })?;
    row("modulate (1+scale)*x+shift", ms, 0.0, 2.0 * bytes);
    let ms = time_ms(&dev, runs, || Ok((&x + y.broadcast_mul(&m)?).map(|_| ())?))?;
    row("gated residual x + gate*y", ms, 0.0, 3.0 * bytes);
    let big = rnd(&[1, li, 4 * hid])?;
    let ms = time_ms(&dev, runs, || Ok(big.gelu().map(|_| ())?))?;
    row("gelu (mlp activation)", ms, 0.0, 8.0 * bytes);

    // QKV preparation.
    let qkv_t = rnd(&[1, lt, 3 * hid])?;
    let qkv_i = rnd(&[1, li, 3 * hid])?;
    let sc = rnd(&[d])?;
    let ids = crate::model::flux::position_ids(lt, width / 16, width / 16, &dev)?;
    let pe = crate::model::flux::PosEmbed::new(&ids, &[16, 56, 56], 10_000.0, bf)?;
    let streams = [
        QkvStream {
            qkv: &qkv_t,
            q_scale: &sc,
            k_scale: &sc,
        },
        QkvStream {
            qkv: &qkv_i,
            q_scale: &sc,
            k_scale: &sc,
        },
    ];
    let qkv_bytes = (l * 3 * hid * 2 * 2) as f64;
    let ms = time_ms(&dev, runs, || Ok(qkv_prep(&streams, &pe, h).map(|_| ())?))?;
    row("qkv prep fused (double block)", ms, 0.0, qkv_bytes);
    let ms = time_ms(&dev, runs, || {
        Ok(qkv_prep_reference(&streams, &pe, h).map(|_| ())?)
    })?;
    row("qkv prep plain composition", ms, 0.0, qkv_bytes);

    // One double and one single block of the real model.
    let cfg = FluxConfig {
        depth: 1,
        depth_single_blocks: 1,
        ..FluxConfig::dev()
    };
    let model = Flux::new(&cfg, RandomWeights.var_builder(bf, &dev))?;
    let img = rnd(&[1, li, 64])?;
    let txt = rnd(&[1, lt, 4096])?;
    let yv = rnd(&[1, 768])?;
    let t = Tensor::new(&[0.5f32], &dev)?;
    let g = Tensor::new(&[3.5f32], &dev)?;
    let pe = model.pos_embed(lt, width / 16, width / 16)?;
    let input = FluxInput {
        img: &img,
        txt: &txt,
        y: &yv,
        timesteps: &t,
        guidance: Some(&g),
        pe: &pe,
    };
    let (s0, ctx) = model.embed(&input)?;
    let per_block = cfg.flops_per_step(lt, li) / 2.0;
    let ms_double = time_ms(&dev, runs, || {
        Ok(model.run_blocks(s0.clone(), &ctx, 0..1).map(|_| ())?)
    })?;
    row("double block (whole)", ms_double, per_block, 0.0);
    let s1 = model.run_blocks(s0.clone(), &ctx, 0..1)?;
    let ms_single = time_ms(&dev, runs, || {
        Ok(model.run_blocks(s1.clone(), &ctx, 1..2).map(|_| ())?)
    })?;
    row("single block (whole)", ms_single, per_block, 0.0);
    let dev_cfg = FluxConfig::dev();
    let est = dev_cfg.depth as f64 * ms_double + dev_cfg.depth_single_blocks as f64 * ms_single;
    println!(
        "estimated step: {} x double + {} x single = {est:.1} ms ({:.0} TFLOP/s)",
        dev_cfg.depth,
        dev_cfg.depth_single_blocks,
        dev_cfg.flops_per_step(lt, li) / (est * 1e-3) / 1e12
    );
    Ok(())
}
