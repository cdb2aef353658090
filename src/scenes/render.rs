//! Draw a scene: each pixel averages 2x2 samples (at a quarter and three quarters of the pixel),
//! each sample the background's colour there with the objects painted over it in order. The
//! trainer's renderer draws the same way, so its pictures and these agree to rounding.

use super::spec::{night_dots, Background, Scene};
use crate::pipeline::image::RgbImage;

/// The scene at `width` x `height` pixels (unit coordinates stretched over both sides, as the
/// scorer reads positions).
pub fn render(scene: &Scene, width: usize, height: usize) -> RgbImage {
    let dots = night_dots();
    let mut data = Vec::with_capacity(width * height * 3);
    let (sw, sh) = (width as f32, height as f32);
    for py in 0..height {
        for px in 0..width {
            let mut acc = [0f32; 3];
            for (oy, ox) in [(0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75)] {
                let x = (px as f32 + ox) / sw;
                let y = (py as f32 + oy) / sh;
                let mut c = scene.background.colour_at(x, y, &dots);
                for o in &scene.objects {
                    if o.covers(x, y) {
                        c = o.colour.rgb().map(|v| v as f32);
                    }
                }
                for i in 0..3 {
                    acc[i] += c[i] / 4.0;
                }
            }
            data.extend(acc.map(|v| v.round().clamp(0.0, 255.0) as u8));
        }
    }
    RgbImage {
        width,
        height,
        data,
    }
}

/// `n` evaluation scenes ([`super::sample::eval_samples`] of `seed`) drawn at `size` x `size`,
/// as (1, 3, size, size) tensors in [-1, 1] (what an autoencoder takes).
pub fn scene_tensors(n: usize, size: usize, seed: u64) -> crate::Result<Vec<candle_core::Tensor>> {
    super::sample::eval_samples(n, seed)
        .iter()
        .map(|s| {
            let img = render(&s.scene, size, size);
            let data: Vec<f32> = img.data.iter().map(|&v| v as f32 / 127.5 - 1.0).collect();
            Ok(
                candle_core::Tensor::from_vec(data, (1, size, size, 3), &candle_core::Device::Cpu)?
                    .permute((0, 3, 1, 2))?
                    .contiguous()?,
            )
        })
        .collect()
}

/// The background alone at `width` x `height` (what the scorer compares the image's free area
/// with).
pub fn render_background(background: &Background, width: usize, height: usize) -> RgbImage {
    render(
        &Scene {
            background: background.clone(),
            objects: Vec::new(),
        },
        width,
        height,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenes::spec::{Background, Colour, Object, Shape};

    #[test]
    fn a_red_circle_on_blue() {
        let scene = Scene {
            background: Background::plain(Colour::Blue),
            objects: vec![Object {
                shape: Shape::Circle,
                colour: Colour::Red,
                x: 0.5,
                y: 0.5,
                r: 0.2,
            }],
        };
        let img = render(&scene, 64, 64);
        assert_eq!(img.pixel(32, 32), Colour::Red.rgb());
        assert_eq!(img.pixel(2, 2), Colour::Blue.rgb());
        // The edge is blended.
        let edge = img.pixel(32 + 12, 32);
        assert!(edge != Colour::Red.rgb() || img.pixel(32 + 13, 32) != Colour::Red.rgb());
    }
}
