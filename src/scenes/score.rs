//! Check an image against what its prompt asks for ([`Described`], from [`super::parse`]): one
//! check per object for its colour (is there a patch of it?), its shape (which of the seven
//! outlines fits the patch best), its size when the prompt gives one; one check for where things
//! are (the stated position, or the relation between the groups); one for the background (does
//! the image's free area look like the background the prompt names?). The score is the share of
//! checks passed.
//!
//! It knows the dataset's palette and layout rules ([`super::spec`]) and nothing else: it scores
//! the demo model's world, not arbitrary pictures.

use serde::Serialize;

use super::render::render_background;
use super::sample::{Arrangement, Described};
use super::spec::{polka_dot, rgb_distance, BackgroundKind, Colour, Rgb, Shape, Size, SIZE_SPLIT};
use crate::pipeline::image::RgbImage;

/// One check and whether it passed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Check {
    /// What was checked: `colour`, `shape`, `size`, `position` or `background`.
    pub kind: &'static str,
    /// What the prompt asked for ("red star", "left", "night").
    pub expected: String,
    pub passed: bool,
}

/// The checks of one image.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Score {
    pub checks: Vec<Check>,
}

impl Score {
    pub fn passed(&self) -> usize {
        self.checks.iter().filter(|c| c.passed).count()
    }

    pub fn total(&self) -> usize {
        self.checks.len()
    }

    /// `{"passed", "total", "accuracy"}`, as `parallax score` and `parallax compare` report it.
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "passed": self.passed(),
            "total": self.total(),
            "accuracy": self.accuracy(),
        })
    }

    /// Share of checks passed (1 when there is nothing to check).
    pub fn accuracy(&self) -> f64 {
        if self.checks.is_empty() {
            1.0
        } else {
            self.passed() as f64 / self.total() as f64
        }
    }

    fn push(&mut self, kind: &'static str, expected: impl Into<String>, passed: bool) {
        self.checks.push(Check {
            kind,
            expected: expected.into(),
            passed,
        });
    }
}

/// How far a pixel may be from its palette colour and still count as it.
const COLOUR_TOLERANCE: f32 = 75.0;
/// How far a pixel must be from the expected background there to count as an object's.
const OFF_BACKGROUND: f32 = 45.0;
/// Smallest patch taken for an object, as a share of the image.
const MIN_PATCH: f32 = 0.0012;

/// A connected patch of one colour.
#[derive(Debug, Clone)]
struct Patch {
    /// Pixel indices.
    pixels: Vec<usize>,
    x0: usize,
    y0: usize,
    x1: usize,
    y1: usize,
}

impl Patch {
    fn centroid(&self, w: usize, h: usize) -> (f32, f32) {
        let n = self.pixels.len().max(1) as f32;
        let (sx, sy) = self.pixels.iter().fold((0f32, 0f32), |(sx, sy), &i| {
            (sx + (i % w) as f32 + 0.5, sy + (i / w) as f32 + 0.5)
        });
        (sx / n / w as f32, sy / n / h as f32)
    }
}

fn nearest_palette(rgb: Rgb) -> (Colour, f32) {
    Colour::ALL
        .into_iter()
        .map(|c| (c, rgb_distance(rgb, c.rgb())))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or((Colour::Gray, f32::MAX))
}

/// Connected patches (4-neighbour) of `mask`, largest first, those above the minimum size.
fn patches(mask: &[bool], w: usize, h: usize) -> Vec<Patch> {
    let mut seen = vec![false; mask.len()];
    let mut out = Vec::new();
    let min = ((w * h) as f32 * MIN_PATCH).ceil() as usize;
    for start in 0..mask.len() {
        if !mask[start] || seen[start] {
            continue;
        }
        let mut stack = vec![start];
        seen[start] = true;
        let mut p = Patch {
            pixels: Vec::new(),
            x0: usize::MAX,
            y0: usize::MAX,
            x1: 0,
            y1: 0,
        };
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            p.pixels.push(i);
            p.x0 = p.x0.min(x);
            p.y0 = p.y0.min(y);
            p.x1 = p.x1.max(x);
            p.y1 = p.y1.max(y);
            let mut visit = |j: usize| {
                if mask[j] && !seen[j] {
                    seen[j] = true;
                    stack.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < w {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - w);
            }
            if y + 1 < h {
                visit(i + w);
            }
        }
        if p.pixels.len() >= min {
            out.push(p);
        }
    }
    out.sort_by_key(|p| std::cmp::Reverse(p.pixels.len()));
    out
}

/// Each shape's extent in its own frame: (u min, u max, v min, v max), measured once.
fn extents() -> &'static [(Shape, [f32; 4])] {
    static EXTENTS: std::sync::OnceLock<Vec<(Shape, [f32; 4])>> = std::sync::OnceLock::new();
    EXTENTS.get_or_init(|| {
        Shape::ALL
            .into_iter()
            .map(|s| {
                let mut e = [f32::MAX, f32::MIN, f32::MAX, f32::MIN];
                let n = 200;
                for j in 0..n {
                    for i in 0..n {
                        let u = -1.2 + 2.4 * (i as f32 + 0.5) / n as f32;
                        let v = -1.2 + 2.4 * (j as f32 + 0.5) / n as f32;
                        if s.contains(u, v) {
                            e = [e[0].min(u), e[1].max(u), e[2].min(v), e[3].max(v)];
                        }
                    }
                }
                (s, e)
            })
            .collect()
    })
}

/// Fit `shape` to the patch's bounding box: its half-size and the intersection over union of its
/// outline with the patch (whose pixels are `inside`).
fn fit(
    p: &Patch,
    inside: &std::collections::HashSet<usize>,
    shape: Shape,
    e: [f32; 4],
    w: usize,
    h: usize,
) -> (f32, f32) {
    let (bw, bh) = ((p.x1 + 1 - p.x0) as f32, (p.y1 + 1 - p.y0) as f32);
    let r = (bw / (e[1] - e[0])).max(bh / (e[3] - e[2])).max(0.5);
    // The frame's centre, so that the outline's box sits on the patch's box.
    let cx = p.x0 as f32 + bw / 2.0 - r * (e[0] + e[1]) / 2.0;
    let cy = p.y0 as f32 + bh / 2.0 - r * (e[2] + e[3]) / 2.0;
    let (mut inter, mut uni) = (0usize, 0usize);
    let pad = 2;
    for y in p.y0.saturating_sub(pad)..(p.y1 + pad + 1).min(h) {
        for x in p.x0.saturating_sub(pad)..(p.x1 + pad + 1).min(w) {
            let t = shape.contains((x as f32 + 0.5 - cx) / r, (y as f32 + 0.5 - cy) / r);
            let m = inside.contains(&(y * w + x));
            inter += (t && m) as usize;
            uni += (t || m) as usize;
        }
    }
    (r / w.max(h) as f32, inter as f32 / uni.max(1) as f32)
}

/// Share of pixels in a polka-dot region (and in the field around the dots) that must be close
/// to the named background there.
const POLKA_REGION_MATCH: f32 = 0.6;

/// Whether the dots and the field of a polka background each match `reference` (the background
/// drawn alone) on at least [`POLKA_REGION_MATCH`] of their pixels.
fn polka_regions_match(image: &RgbImage, reference: Option<&RgbImage>) -> bool {
    let Some(reference) = reference else {
        return false;
    };
    let (w, h) = (image.width, image.height);
    // [dots, field]: (close, all)
    let mut counts = [(0usize, 0usize); 2];
    for y in 0..h {
        for x in 0..w {
            let dot = polka_dot((x as f32 + 0.5) / w as f32, (y as f32 + 0.5) / h as f32);
            let c = &mut counts[usize::from(!dot)];
            c.1 += 1;
            if rgb_distance(image.pixel(x, y), reference.pixel(x, y)) < 60.0 {
                c.0 += 1;
            }
        }
    }
    counts
        .iter()
        .all(|&(close, all)| close as f32 >= POLKA_REGION_MATCH * all.max(1) as f32)
}

/// Check `image` against `d`.
pub fn score(image: &RgbImage, d: &Described) -> Score {
    let (w, h) = (image.width, image.height);
    let mut s = Score::default();
    let bg_known = !(d.background.kind == BackgroundKind::Plain && d.background.colours.is_empty());
    // The named background drawn at the image's size: what each pixel would be without objects.
    let reference = bg_known.then(|| render_background(&d.background, w, h));
    let bg_at = |x: usize, y: usize| reference.as_ref().map(|r| r.pixel(x, y));

    // Background: most of the image matches the named background.
    if reference.is_some() {
        let mut close = 0usize;
        for y in 0..h {
            for x in 0..w {
                if bg_at(x, y).is_some_and(|b| rgb_distance(image.pixel(x, y), b) < 60.0) {
                    close += 1;
                }
            }
        }
        let name = match d.background.kind {
            BackgroundKind::Sea => "sea".to_string(),
            BackgroundKind::Night => "night sky".to_string(),
            k => format!(
                "{} {:?}",
                d.background
                    .colours
                    .iter()
                    .map(|c| c.name())
                    .collect::<Vec<_>>()
                    .join(" and "),
                k
            )
            .to_lowercase(),
        };
        let mut passed = close as f32 >= 0.5 * (w * h) as f32;
        if d.background.kind == BackgroundKind::Polka {
            // Most of the image can be the first colour without a single dot: the dots and the
            // field between them must each match on their own.
            passed &= polka_regions_match(image, reference.as_ref());
        }
        s.push("background", name, passed);
    }

    // Objects: per group, its colour's patches.
    let ext = extents();
    let mut found: Vec<Vec<(f32, f32)>> = Vec::new();
    for g in &d.groups {
        let mask: Vec<bool> = (0..w * h)
            .map(|i| {
                let (x, y) = (i % w, i / w);
                let px = image.pixel(x, y);
                let (c, dist) = nearest_palette(px);
                c == g.colour
                    && dist < COLOUR_TOLERANCE
                    && bg_at(x, y).is_none_or(|b| rgb_distance(px, b) > OFF_BACKGROUND)
            })
            .collect();
        let ps = patches(&mask, w, h);
        let label = format!("{} {}", g.colour.name(), g.shape.name());
        let mut centres = Vec::new();
        for k in 0..g.count as usize {
            let p = ps.get(k);
            s.push("colour", g.colour.name(), p.is_some());
            let Some(p) = p else {
                s.push("shape", label.clone(), false);
                if let Some(size) = g.size {
                    s.push("size", format!("{size:?}").to_lowercase(), false);
                }
                continue;
            };
            let inside = p.pixels.iter().copied().collect();
            let fits: Vec<(Shape, f32, f32)> = ext
                .iter()
                .map(|&(shape, e)| {
                    let (r, iou) = fit(p, &inside, shape, e, w, h);
                    (shape, r, iou)
                })
                .collect();
            let best = fits.iter().max_by(|a, b| a.2.total_cmp(&b.2)).map(|f| f.0);
            s.push("shape", label.clone(), best == Some(g.shape));
            if let Some(size) = g.size {
                let r = fits
                    .iter()
                    .find(|f| f.0 == g.shape)
                    .map(|f| f.1)
                    .unwrap_or(0.0);
                let got = if r < SIZE_SPLIT {
                    Size::Small
                } else {
                    Size::Large
                };
                s.push("size", format!("{size:?}").to_lowercase(), got == size);
            }
            centres.push(p.centroid(w, h));
        }
        found.push(centres);
    }

    // Where things are.
    let all = |i: usize| {
        found
            .get(i)
            .filter(|c| !c.is_empty() && c.len() == d.groups[i].count as usize)
    };
    let mean = |c: &[(f32, f32)]| {
        let n = c.len().max(1) as f32;
        (
            c.iter().map(|p| p.0).sum::<f32>() / n,
            c.iter().map(|p| p.1).sum::<f32>() / n,
        )
    };
    match d.arrangement {
        Arrangement::Alone(Some(pos)) => {
            let ok = all(0).is_some_and(|c| c.iter().all(|&(x, y)| pos.holds(x, y)));
            s.push("position", format!("{pos:?}").to_lowercase(), ok);
        }
        Arrangement::Alone(None) => {}
        Arrangement::Row => {
            let xs: Option<Vec<f32>> = (0..d.groups.len())
                .map(|i| all(i).map(|c| mean(c).0))
                .collect();
            let ok = xs.is_some_and(|xs| xs.windows(2).all(|p| p[0] + 0.08 < p[1]));
            s.push("position", "in a row, in order", ok);
        }
        a => {
            let ok = match (all(0), all(1)) {
                (Some(c0), Some(c1)) => {
                    let (a0, b0) = (mean(c0), mean(c1));
                    match a {
                        Arrangement::Above => a0.1 + 0.1 < b0.1,
                        Arrangement::Below => a0.1 > b0.1 + 0.1,
                        Arrangement::LeftOf => a0.0 + 0.1 < b0.0,
                        Arrangement::RightOf => a0.0 > b0.0 + 0.1,
                        _ => (a0.1 - b0.1).abs() < 0.15 && (a0.0 - b0.0).abs() > 0.1,
                    }
                }
                _ => false,
            };
            s.push("position", format!("{a:?}").to_lowercase(), ok);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenes::render::render;
    use crate::scenes::sample::{eval_samples, Sampler, Split};

    #[test]
    fn the_scenes_themselves_score_nearly_full_marks() {
        let mut s = Sampler::new(8);
        let (mut passed, mut total) = (0, 0);
        for i in 0..120 {
            let x = s.sample(if i % 2 == 0 {
                Split::Train
            } else {
                Split::HeldOut
            });
            let sc = score(&render(&x.scene, 128, 128), &x.described);
            passed += sc.passed();
            total += sc.total();
        }
        let acc = passed as f64 / total as f64;
        assert!(acc > 0.97, "ground truth scores {acc}");
    }

    #[test]
    fn polka_dots_are_checked_dots_and_field_apart() {
        use crate::scenes::spec::{Background, BackgroundKind};
        let mut s = Sampler::new(5);
        let background_passes = |img: &RgbImage, d: &Described| {
            score(img, d)
                .checks
                .iter()
                .any(|c| c.kind == "background" && c.passed)
        };
        let (mut right, mut plain, mut stripes) = (0, 0, 0);
        let n = 30;
        for _ in 0..n {
            let x = s.sample_on(Split::Train, BackgroundKind::Polka);
            right += background_passes(&render(&x.scene, 96, 96), &x.described) as usize;
            // The same scene on the field colour alone, and on stripes of the two colours.
            let mut other = x.scene.clone();
            other.background = Background::plain(x.scene.background.colours[0]);
            plain += background_passes(&render(&other, 96, 96), &x.described) as usize;
            other.background.kind = BackgroundKind::Stripes;
            other.background.colours = x.scene.background.colours.clone();
            stripes += background_passes(&render(&other, 96, 96), &x.described) as usize;
        }
        assert_eq!((right, plain, stripes), (n, 0, 0));
    }

    #[test]
    fn the_wrong_picture_scores_badly() {
        let e = eval_samples(40, 3);
        let (mut passed, mut total) = (0, 0);
        for (a, b) in e.iter().zip(e.iter().skip(1)) {
            // Score each prompt against the next prompt's picture.
            let sc = score(&render(&b.scene, 128, 128), &a.described);
            passed += sc.passed();
            total += sc.total();
        }
        let acc = passed as f64 / total as f64;
        assert!(acc < 0.5, "mismatched pictures score {acc}");
    }
}
