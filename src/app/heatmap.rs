//! CPU twin of `shaders/diff_heatmap.wgsl`: the same ramp and gain, for windows without a wgpu
//! renderer and for the tests that hold the shader to it.

use crate::pipeline::image::RgbImage;

/// The ramp black -> red -> yellow -> white of `t` in [0, 1], as bytes.
pub fn heat_color(t: f32) -> [u8; 3] {
    let s = t.clamp(0.0, 1.0) * 3.0;
    [s, s - 1.0, s - 2.0].map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
}

/// Per pixel: the largest channel difference (0..1) times `gain`, through [`heat_color`].
/// `None` when the sizes differ.
pub fn diff_heatmap(reference: &RgbImage, candidate: &RgbImage, gain: f32) -> Option<RgbImage> {
    if reference.width != candidate.width || reference.height != candidate.height {
        return None;
    }
    let data = reference
        .data
        .chunks_exact(3)
        .zip(candidate.data.chunks_exact(3))
        .flat_map(|(a, b)| {
            let d = (0..3)
                .map(|c| (a[c] as f32 - b[c] as f32).abs() / 255.0)
                .fold(0.0, f32::max);
            heat_color(d * gain)
        })
        .collect();
    Some(RgbImage {
        width: reference.width,
        height: reference.height,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramp_ends_and_thirds() {
        assert_eq!(heat_color(0.0), [0, 0, 0]);
        assert_eq!(heat_color(1.0 / 3.0), [255, 0, 0]);
        assert_eq!(heat_color(2.0 / 3.0), [255, 255, 0]);
        assert_eq!(heat_color(1.0), [255, 255, 255]);
        assert_eq!(heat_color(7.0), [255, 255, 255]);
    }

    #[test]
    fn identical_images_are_black_and_sizes_must_match() {
        let a = RgbImage {
            width: 2,
            height: 1,
            data: vec![10, 20, 30, 40, 50, 60],
        };
        let mut b = a.clone();
        assert!(diff_heatmap(&a, &b, 4.0)
            .expect("same size")
            .data
            .iter()
            .all(|&v| v == 0));
        b.data[3] = 40 + 64; // quarter-scale difference in one channel of pixel 1
        let h = diff_heatmap(&a, &b, 4.0).expect("same size");
        assert_eq!(&h.data[3..6], &heat_color(64.0 / 255.0 * 4.0));
        let c = RgbImage {
            width: 1,
            height: 2,
            data: a.data.clone(),
        };
        assert!(diff_heatmap(&a, &c, 1.0).is_none());
    }
}
