//! What a scene of the demo dataset is made of: the palette, the shapes (as signed-distance-like
//! functions), the backgrounds, and where "left", "above" or "small" put things.
//!
//! Everything is in unit coordinates: x from 0 (left) to 1 (right), y from 0 (top) to 1 (bottom),
//! sizes as a fraction of the image side. The trainer's renderer (`scripts/train-demo/scenes.py`)
//! reads these numbers from the `spec.json` that `parallax dataset` writes, so both draw the same
//! pictures; [`super::render`] is the Rust twin used by the scorer and the tests.

use serde::{Deserialize, Serialize};

use crate::model::rng::SplitMix64;

/// The twelve named colours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    Red,
    Orange,
    Yellow,
    Green,
    Blue,
    Purple,
    Pink,
    White,
    Black,
    Brown,
    Gray,
    Cyan,
}

impl Colour {
    pub const ALL: [Colour; 12] = [
        Colour::Red,
        Colour::Orange,
        Colour::Yellow,
        Colour::Green,
        Colour::Blue,
        Colour::Purple,
        Colour::Pink,
        Colour::White,
        Colour::Black,
        Colour::Brown,
        Colour::Gray,
        Colour::Cyan,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Orange => "orange",
            Colour::Yellow => "yellow",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Purple => "purple",
            Colour::Pink => "pink",
            Colour::White => "white",
            Colour::Black => "black",
            Colour::Brown => "brown",
            Colour::Gray => "gray",
            Colour::Cyan => "cyan",
        }
    }

    /// The colour a word names (`grey` too), if any.
    pub fn from_word(word: &str) -> Option<Colour> {
        if word == "grey" {
            return Some(Colour::Gray);
        }
        Colour::ALL.into_iter().find(|c| c.name() == word)
    }

    /// Its sRGB value.
    pub fn rgb(self) -> Rgb {
        match self {
            Colour::Red => [220, 40, 40],
            Colour::Orange => [245, 140, 20],
            Colour::Yellow => [245, 220, 40],
            Colour::Green => [40, 170, 60],
            Colour::Blue => [40, 80, 220],
            Colour::Purple => [140, 60, 190],
            Colour::Pink => [245, 130, 190],
            Colour::White => [245, 245, 245],
            Colour::Black => [20, 20, 20],
            Colour::Brown => [130, 80, 40],
            Colour::Gray => [128, 128, 128],
            Colour::Cyan => [40, 200, 220],
        }
    }
}

/// An 8-bit sRGB triple.
pub type Rgb = [u8; 3];

/// Euclidean distance between two colours in sRGB units.
pub fn rgb_distance(a: Rgb, b: Rgb) -> f32 {
    let d: f32 = (0..3)
        .map(|i| {
            let x = a[i] as f32 - b[i] as f32;
            x * x
        })
        .sum();
    d.sqrt()
}

/// The seven shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
    Ring,
    Cross,
    Heart,
}

impl Shape {
    pub const ALL: [Shape; 7] = [
        Shape::Circle,
        Shape::Square,
        Shape::Triangle,
        Shape::Star,
        Shape::Ring,
        Shape::Cross,
        Shape::Heart,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
            Shape::Ring => "ring",
            Shape::Cross => "cross",
            Shape::Heart => "heart",
        }
    }

    pub fn plural(self) -> &'static str {
        match self {
            Shape::Cross => "crosses",
            Shape::Circle => "circles",
            Shape::Square => "squares",
            Shape::Triangle => "triangles",
            Shape::Star => "stars",
            Shape::Ring => "rings",
            Shape::Heart => "hearts",
        }
    }

    /// The shape a word names, singular or plural.
    pub fn from_word(word: &str) -> Option<Shape> {
        Shape::ALL
            .into_iter()
            .find(|s| s.name() == word || s.plural() == word)
    }

    /// Whether the point `(u, v)`, in the shape's own frame (centre at 0, half-size 1, v down),
    /// is inside.
    pub fn contains(self, u: f32, v: f32) -> bool {
        match self {
            Shape::Circle => u * u + v * v <= 1.0,
            Shape::Square => u.abs().max(v.abs()) <= 0.85,
            Shape::Triangle => {
                // Equilateral, pointing up, inscribed in the unit circle (inradius 0.5).
                let s = 0.866_025_4;
                v <= 0.5 && (-s * u - 0.5 * v) <= 0.5 && (s * u - 0.5 * v) <= 0.5
            }
            Shape::Star => {
                // Five points; the boundary's radius goes from 0.42 between points to 1 at them.
                let r = (u * u + v * v).sqrt();
                if r > 1.0 {
                    return false;
                }
                let sector = std::f32::consts::TAU / 5.0;
                let phi = u.atan2(-v).rem_euclid(sector);
                let local = ((phi - sector / 2.0).abs()) / (sector / 2.0);
                r <= 0.42 + 0.58 * local * local
            }
            Shape::Ring => {
                let r = (u * u + v * v).sqrt();
                (0.5..=1.0).contains(&r)
            }
            Shape::Cross => {
                let (a, b) = (u.abs(), v.abs());
                (a <= 1.0 && b <= 0.33) || (a <= 0.33 && b <= 1.0)
            }
            Shape::Heart => {
                let x = u * 1.15;
                let y = -v * 1.15 + 0.1;
                let q = x * x + y * y - 1.0;
                q * q * q - x * x * y * y * y <= 0.0
            }
        }
    }
}

/// Where a lone object sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Position {
    Left,
    Right,
    Top,
    Bottom,
    Centre,
}

impl Position {
    pub const ALL: [Position; 5] = [
        Position::Left,
        Position::Right,
        Position::Top,
        Position::Bottom,
        Position::Centre,
    ];

    /// The centre an object at this position is drawn around (before jitter).
    pub fn anchor(self) -> (f32, f32) {
        match self {
            Position::Left => (0.27, 0.5),
            Position::Right => (0.73, 0.5),
            Position::Top => (0.5, 0.27),
            Position::Bottom => (0.5, 0.73),
            Position::Centre => (0.5, 0.5),
        }
    }

    /// Whether a centroid at `(x, y)` reads as this position.
    pub fn holds(self, x: f32, y: f32) -> bool {
        match self {
            Position::Left => x < 0.42,
            Position::Right => x > 0.58,
            Position::Top => y < 0.42,
            Position::Bottom => y > 0.58,
            Position::Centre => (x - 0.5).abs() < 0.13 && (y - 0.5).abs() < 0.13,
        }
    }
}

/// Small or large, when the caption says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    Small,
    Large,
}

/// Half-size (fraction of the side) that separates "small" from "large" when judging an image.
pub const SIZE_SPLIT: f32 = 0.12;

/// The background kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackgroundKind {
    /// One colour.
    Plain,
    /// A vertical gradient from the colour (top) to a paler version (bottom).
    Sky,
    /// A pale sky above a horizon at [`HORIZON`], a dark blue sea below.
    Sea,
    /// Vertical stripes of two colours, [`BANDS`] of them.
    Stripes,
    /// A [`BANDS`] x [`BANDS`] checkerboard of two colours.
    Checkerboard,
    /// A dark night sky with small white dots ([`night_dots`]).
    Night,
    /// Polka dots: round dots of the second colour on the first, one in each cell of a
    /// [`POLKA_CELLS`] x [`POLKA_CELLS`] grid ([`polka_dot`]). The base dataset never draws it:
    /// the demo LoRA (`assets/demo/lora-polka.safetensors`) teaches it.
    Polka,
}

/// A background: its kind and the colours the caption names (none for sea and night, one for
/// plain and sky, two for stripes, checkerboards and polka dots).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Background {
    pub kind: BackgroundKind,
    pub colours: Vec<Colour>,
}

/// Where the sea meets the sky.
pub const HORIZON: f32 = 0.55;
/// Stripes and checkerboard cells across the image.
pub const BANDS: f32 = 8.0;
/// The sky's pale end: the colour mixed with white by this much.
pub const SKY_PALE: f32 = 0.55;
pub const SEA_SKY_TOP: Rgb = [110, 170, 235];
pub const SEA_SKY_HORIZON: Rgb = [200, 225, 250];
pub const SEA_NEAR: Rgb = [20, 60, 120];
pub const SEA_FAR: Rgb = [10, 35, 80];
pub const NIGHT: Rgb = [12, 14, 45];
pub const NIGHT_DOT: Rgb = [235, 235, 255];
/// Radius of a night-sky dot.
pub const NIGHT_DOT_RADIUS: f32 = 0.008;
/// How many dots a night sky has.
pub const NIGHT_DOTS: usize = 48;
/// Polka-dot cells across the image (one dot centred in each).
pub const POLKA_CELLS: f32 = 5.0;
/// Radius of a polka dot (a third of the image's area is dots).
pub const POLKA_RADIUS: f32 = 0.065;

/// Whether `(x, y)` falls in a polka dot.
pub fn polka_dot(x: f32, y: f32) -> bool {
    let centre = |v: f32| ((v * POLKA_CELLS).floor() + 0.5) / POLKA_CELLS;
    let (dx, dy) = (x - centre(x), y - centre(y));
    dx * dx + dy * dy <= POLKA_RADIUS * POLKA_RADIUS
}

/// The night sky's dots: the same fixed pattern for every night scene.
pub fn night_dots() -> Vec<(f32, f32)> {
    let mut rng = SplitMix64::new(0x6E_6967_6874);
    (0..NIGHT_DOTS)
        .map(|_| (rng.next_open01() as f32, rng.next_open01() as f32))
        .collect()
}

fn lerp(a: Rgb, b: Rgb, t: f32) -> [f32; 3] {
    let t = t.clamp(0.0, 1.0);
    [0, 1, 2].map(|i| a[i] as f32 + (b[i] as f32 - a[i] as f32) * t)
}

fn mix_white(c: Rgb, t: f32) -> Rgb {
    lerp(c, [255, 255, 255], t).map(|v| v.round() as u8)
}

impl Background {
    pub fn plain(c: Colour) -> Self {
        Self {
            kind: BackgroundKind::Plain,
            colours: vec![c],
        }
    }

    /// The background's colour at `(x, y)` (floats in 0..=255); `dots` is [`night_dots`].
    pub fn colour_at(&self, x: f32, y: f32, dots: &[(f32, f32)]) -> [f32; 3] {
        let c = |i: usize| self.colours.get(i).copied().unwrap_or(Colour::Gray).rgb();
        let f = |rgb: Rgb| rgb.map(|v| v as f32);
        match self.kind {
            BackgroundKind::Plain => f(c(0)),
            BackgroundKind::Sky => lerp(c(0), mix_white(c(0), SKY_PALE), y),
            BackgroundKind::Sea => {
                if y < HORIZON {
                    lerp(SEA_SKY_TOP, SEA_SKY_HORIZON, y / HORIZON)
                } else {
                    lerp(SEA_NEAR, SEA_FAR, (y - HORIZON) / (1.0 - HORIZON))
                }
            }
            BackgroundKind::Stripes => {
                let band = (x * BANDS).floor() as i64;
                f(c((band.rem_euclid(2)) as usize))
            }
            BackgroundKind::Checkerboard => {
                let cell = (x * BANDS).floor() as i64 + (y * BANDS).floor() as i64;
                f(c((cell.rem_euclid(2)) as usize))
            }
            BackgroundKind::Night => {
                let r2 = NIGHT_DOT_RADIUS * NIGHT_DOT_RADIUS;
                if dots
                    .iter()
                    .any(|&(dx, dy)| (x - dx) * (x - dx) + (y - dy) * (y - dy) <= r2)
                {
                    f(NIGHT_DOT)
                } else {
                    f(NIGHT)
                }
            }
            BackgroundKind::Polka => f(c(polka_dot(x, y) as usize)),
        }
    }

    /// The colours an object must keep away from to stay visible on this background.
    pub fn reserved_colours(&self) -> Vec<Rgb> {
        match self.kind {
            BackgroundKind::Plain
            | BackgroundKind::Stripes
            | BackgroundKind::Checkerboard
            | BackgroundKind::Polka => self.colours.iter().map(|c| c.rgb()).collect(),
            BackgroundKind::Sky => {
                let c = self.colours.first().copied().unwrap_or(Colour::Blue).rgb();
                vec![c, mix_white(c, SKY_PALE), mix_white(c, SKY_PALE / 2.0)]
            }
            BackgroundKind::Sea => vec![SEA_SKY_TOP, SEA_SKY_HORIZON, SEA_NEAR, SEA_FAR],
            BackgroundKind::Night => vec![NIGHT],
        }
    }
}

/// How far (sRGB distance) an object's colour stays from every background colour.
pub const MIN_CONTRAST: f32 = 90.0;

/// One drawn object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub shape: Shape,
    pub colour: Colour,
    /// Centre.
    pub x: f32,
    pub y: f32,
    /// Half-size, a fraction of the image side.
    pub r: f32,
}

impl Object {
    /// Whether `(x, y)` falls inside the object.
    pub fn covers(&self, x: f32, y: f32) -> bool {
        let (u, v) = ((x - self.x) / self.r, (y - self.y) / self.r);
        u.abs() <= 1.2 && v.abs() <= 1.2 && self.shape.contains(u, v)
    }
}

/// A scene: a background and the objects drawn over it, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub background: Background,
    pub objects: Vec<Object>,
}

/// The numbers the trainer's renderer needs, as `parallax dataset` writes them to `spec.json`.
pub fn spec_json() -> serde_json::Value {
    let palette: serde_json::Map<String, serde_json::Value> = Colour::ALL
        .iter()
        .map(|c| (c.name().to_string(), serde_json::json!(c.rgb())))
        .collect();
    serde_json::json!({
        "palette": palette,
        "shapes": Shape::ALL.iter().map(|s| s.name()).collect::<Vec<_>>(),
        "horizon": HORIZON,
        "bands": BANDS,
        "sky_pale": SKY_PALE,
        "sea_sky_top": SEA_SKY_TOP,
        "sea_sky_horizon": SEA_SKY_HORIZON,
        "sea_near": SEA_NEAR,
        "sea_far": SEA_FAR,
        "night": NIGHT,
        "night_dot": NIGHT_DOT,
        "night_dot_radius": NIGHT_DOT_RADIUS,
        "night_dots": night_dots(),
        "polka_cells": POLKA_CELLS,
        "polka_radius": POLKA_RADIUS,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn palette_colours_are_far_apart() {
        for a in Colour::ALL {
            for b in Colour::ALL {
                if a != b {
                    assert!(rgb_distance(a.rgb(), b.rgb()) > 80.0, "{a:?} {b:?}");
                }
            }
        }
    }

    #[test]
    fn words_round_trip() {
        for s in Shape::ALL {
            assert_eq!(Shape::from_word(s.name()), Some(s));
            assert_eq!(Shape::from_word(s.plural()), Some(s));
        }
        for c in Colour::ALL {
            assert_eq!(Colour::from_word(c.name()), Some(c));
        }
        assert_eq!(Colour::from_word("grey"), Some(Colour::Gray));
    }

    #[test]
    fn shapes_cover_their_centre_region_and_not_the_corners() {
        for s in Shape::ALL {
            let inside = s.contains(0.0, 0.1) || s.contains(0.0, 0.75);
            assert!(inside, "{s:?}");
            assert!(!s.contains(1.0, 1.0), "{s:?}");
        }
        assert!(!Shape::Ring.contains(0.0, 0.0));
        assert!(Shape::Ring.contains(0.75, 0.0));
    }
}
