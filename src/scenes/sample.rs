//! Random scenes with captions: what a caption says ([`Described`]), where that puts things
//! ([`Described::layout`]), and how it is said ([`Described::caption`], several phrasings).
//!
//! Some colour-shape pairs never appear in training ([`HELD_OUT`]); evaluation prompts that use
//! them test whether the model composes attributes it learnt apart.

use serde::{Deserialize, Serialize};

use super::spec::{
    rgb_distance, Background, BackgroundKind, Colour, Object, Position, Scene, Shape, Size,
    MIN_CONTRAST,
};
use crate::model::rng::SplitMix64;

/// Colour-shape pairs left out of the training scenes.
pub const HELD_OUT: [(Colour, Shape); 8] = [
    (Colour::Red, Shape::Star),
    (Colour::Blue, Shape::Heart),
    (Colour::Green, Shape::Triangle),
    (Colour::Yellow, Shape::Ring),
    (Colour::Purple, Shape::Cross),
    (Colour::Orange, Shape::Circle),
    (Colour::Pink, Shape::Square),
    (Colour::White, Shape::Star),
];

/// Longest caption the sampler keeps (the demo T5 reads 96 bytes, end token included).
pub const MAX_CAPTION: usize = 95;

/// One or two identical objects, as a caption names them ("two small yellow stars").
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Group {
    pub shape: Shape,
    pub colour: Colour,
    pub size: Option<Size>,
    pub count: u8,
}

/// How a caption places its groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arrangement {
    /// One group, at a stated position or anywhere.
    Alone(Option<Position>),
    /// Group 0 above group 1.
    Above,
    /// Group 0 below group 1.
    Below,
    /// Group 0 beside group 1, on one row (drawn left of it).
    NextTo,
    /// Group 0 to the left of group 1.
    LeftOf,
    /// Group 0 to the right of group 1.
    RightOf,
    /// Three groups in a row, left to right in the caption's order.
    Row,
}

/// What a caption says about its scene.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Described {
    pub groups: Vec<Group>,
    pub arrangement: Arrangement,
    pub background: Background,
}

/// Which colour-shape pairs a sampled scene may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// None of [`HELD_OUT`] (the training scenes).
    Train,
    /// At least one of [`HELD_OUT`] (composition tests).
    HeldOut,
}

/// A sampled scene: what is drawn and how it is captioned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub caption: String,
    pub described: Described,
    pub scene: Scene,
}

/// Draws scenes from a seed.
pub struct Sampler {
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: SplitMix64::new(seed),
        }
    }

    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * self.rng.next_open01() as f32
    }

    fn below(&mut self, n: usize) -> usize {
        ((self.rng.next_open01() * n as f64) as usize).min(n.saturating_sub(1))
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    fn chance(&mut self, p: f64) -> bool {
        self.rng.next_open01() < p
    }

    /// One scene of `split`.
    pub fn sample(&mut self, split: Split) -> Sample {
        self.sample_with(split, Self::background)
    }

    /// One scene of `split` on a background of `kind` (two colours for stripes, checkerboards
    /// and polka dots, one for plain and sky). The base dataset draws its backgrounds with
    /// [`Sampler::sample`]; this is how scenes on a background it never draws (polka dots, the
    /// demo LoRA's) are made.
    pub fn sample_on(&mut self, split: Split, kind: BackgroundKind) -> Sample {
        self.sample_with(split, |s| match kind {
            BackgroundKind::Plain => Background::plain(s.pick(&Colour::ALL)),
            BackgroundKind::Sky => Background {
                kind,
                colours: vec![s.pick(&SKY_COLOURS)],
            },
            BackgroundKind::Sea | BackgroundKind::Night => Background {
                kind,
                colours: vec![],
            },
            BackgroundKind::Stripes | BackgroundKind::Checkerboard | BackgroundKind::Polka => {
                s.two_colours(kind)
            }
        })
    }

    fn sample_with(
        &mut self,
        split: Split,
        background: impl Fn(&mut Self) -> Background,
    ) -> Sample {
        loop {
            let bg = background(self);
            let described = self.describe(bg);
            let held = described
                .groups
                .iter()
                .any(|g| HELD_OUT.contains(&(g.colour, g.shape)));
            if held != (split == Split::HeldOut) {
                continue;
            }
            let caption = self.caption(&described);
            if caption.len() > MAX_CAPTION {
                continue;
            }
            let scene = self.layout(&described);
            return Sample {
                caption,
                described,
                scene,
            };
        }
    }

    /// A two-colour background of `kind`, its colours well apart.
    fn two_colours(&mut self, kind: BackgroundKind) -> Background {
        let a = self.pick(&Colour::ALL);
        loop {
            let b = self.pick(&Colour::ALL);
            if rgb_distance(a.rgb(), b.rgb()) > 100.0 {
                return Background {
                    kind,
                    colours: vec![a, b],
                };
            }
        }
    }

    fn background(&mut self) -> Background {
        let roll = self.rng.next_open01();
        match roll {
            r if r < 0.34 => Background::plain(self.pick(&Colour::ALL)),
            r if r < 0.49 => Background {
                kind: BackgroundKind::Sky,
                colours: vec![self.pick(&SKY_COLOURS)],
            },
            r if r < 0.61 => Background {
                kind: BackgroundKind::Sea,
                colours: vec![],
            },
            r if r < 0.74 => self.two_colours(BackgroundKind::Stripes),
            r if r < 0.87 => self.two_colours(BackgroundKind::Checkerboard),
            _ => Background {
                kind: BackgroundKind::Night,
                colours: vec![],
            },
        }
    }

    /// What a caption will say: on `background`, the arrangement and groups.
    fn describe(&mut self, background: Background) -> Described {
        let reserved = background.reserved_colours();
        let roll = self.rng.next_open01();
        let arrangement = match roll {
            r if r < 0.40 => {
                if self.chance(0.15) {
                    Arrangement::Alone(None)
                } else if self.chance(0.8) {
                    Arrangement::Alone(Some(self.pick(&Position::ALL)))
                } else {
                    Arrangement::Alone(None)
                }
            }
            r if r < 0.55 => Arrangement::Above,
            r if r < 0.63 => Arrangement::Below,
            r if r < 0.71 => Arrangement::NextTo,
            r if r < 0.77 => Arrangement::LeftOf,
            r if r < 0.83 => Arrangement::RightOf,
            _ => Arrangement::Row,
        };
        let n = match arrangement {
            Arrangement::Alone(_) => 1,
            Arrangement::Row => 3,
            _ => 2,
        };
        let mut groups: Vec<Group> = Vec::with_capacity(n);
        while groups.len() < n {
            let colour = self.pick(&Colour::ALL);
            let visible = reserved
                .iter()
                .all(|&r| rgb_distance(colour.rgb(), r) >= MIN_CONTRAST);
            if !visible || groups.iter().any(|g| g.colour == colour) {
                continue;
            }
            let shape = self.pick(&Shape::ALL);
            let size = match self.below(4) {
                0 => Some(Size::Small),
                1 if arrangement != Arrangement::Row => Some(Size::Large),
                _ => None,
            };
            let count = match arrangement {
                Arrangement::Alone(None) | Arrangement::Above | Arrangement::Below
                    if self.chance(0.2) =>
                {
                    2
                }
                _ => 1,
            };
            groups.push(Group {
                shape,
                colour,
                size,
                count,
            });
        }
        Described {
            groups,
            arrangement,
            background,
        }
    }

    /// Where everything goes.
    pub fn layout(&mut self, d: &Described) -> Scene {
        let mut objects = Vec::new();
        // Half-size ranges (small, large, unstated) for crowded and roomy scenes.
        let radius = |s: &mut Self, size: Option<Size>, roomy: bool, row: bool| match (size, roomy)
        {
            (Some(Size::Small), _) => s.uniform(0.07, 0.09),
            (Some(Size::Large), true) => s.uniform(0.185, 0.215),
            (Some(Size::Large), false) => s.uniform(0.15, 0.17),
            (None, true) => s.uniform(0.11, 0.16),
            (None, false) if row => s.uniform(0.09, 0.115),
            (None, false) => s.uniform(0.1, 0.13),
        };
        // Centres of a group drawn around (x, y): one object there, two side by side.
        let place =
            |s: &mut Self, g: &Group, x: f32, y: f32, roomy: bool, out: &mut Vec<Object>| {
                let xs: Vec<f32> = if g.count >= 2 {
                    vec![0.3, 0.7]
                } else {
                    vec![x]
                };
                for cx in xs {
                    let r = radius(s, g.size, roomy && g.count == 1, false);
                    out.push(Object {
                        shape: g.shape,
                        colour: g.colour,
                        x: cx + s.uniform(-0.03, 0.03),
                        y: y + s.uniform(-0.03, 0.03),
                        r,
                    });
                }
            };
        match d.arrangement {
            Arrangement::Alone(pos) => {
                let g = &d.groups[0];
                if g.count >= 2 {
                    place(self, g, 0.5, 0.5, false, &mut objects);
                } else {
                    let p = pos.unwrap_or_else(|| self.pick(&Position::ALL));
                    let (x, y) = p.anchor();
                    let jx = self.uniform(-0.04, 0.04);
                    let jy = self.uniform(-0.04, 0.04);
                    place(self, g, x + jx, y + jy, true, &mut objects);
                }
            }
            Arrangement::Above | Arrangement::Below => {
                let (first_y, second_y) = if d.arrangement == Arrangement::Above {
                    (0.28, 0.72)
                } else {
                    (0.72, 0.28)
                };
                let x0 = 0.5 + self.uniform(-0.05, 0.05);
                let x1 = 0.5 + self.uniform(-0.05, 0.05);
                place(self, &d.groups[0], x0, first_y, false, &mut objects);
                place(self, &d.groups[1], x1, second_y, false, &mut objects);
            }
            Arrangement::NextTo | Arrangement::LeftOf | Arrangement::RightOf => {
                let (first_x, second_x) = if d.arrangement == Arrangement::RightOf {
                    (0.72, 0.28)
                } else {
                    (0.28, 0.72)
                };
                let y = 0.5 + self.uniform(-0.04, 0.04);
                place(self, &d.groups[0], first_x, y, false, &mut objects);
                place(self, &d.groups[1], second_x, y, false, &mut objects);
            }
            Arrangement::Row => {
                let y = 0.5 + self.uniform(-0.04, 0.04);
                for (g, x) in d.groups.iter().zip([0.2, 0.5, 0.8]) {
                    let r = radius(self, g.size, false, true);
                    objects.push(Object {
                        shape: g.shape,
                        colour: g.colour,
                        x: x + self.uniform(-0.02, 0.02),
                        y: y + self.uniform(-0.03, 0.03),
                        r,
                    });
                }
            }
        }
        Scene {
            background: d.background.clone(),
            objects,
        }
    }

    fn group_phrase(&mut self, g: &Group) -> String {
        let size = match g.size {
            Some(Size::Small) => Some(if self.chance(0.75) { "small" } else { "tiny" }),
            Some(Size::Large) => Some(if self.chance(0.75) { "large" } else { "big" }),
            None => None,
        };
        let mut words: Vec<&str> = Vec::new();
        if let Some(s) = size {
            words.push(s);
        }
        words.push(g.colour.name());
        words.push(if g.count >= 2 {
            g.shape.plural()
        } else {
            g.shape.name()
        });
        let body = words.join(" ");
        let article = if g.count >= 2 {
            "two"
        } else if self.chance(0.1) {
            "one"
        } else if body.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        format!("{article} {body}")
    }

    /// The background as a trailing phrase (" on a blue background", ", night sky").
    fn background_phrase(&mut self, b: &Background) -> String {
        let c = |i: usize| colour_name(b, i);
        let k = self.below(3);
        match b.kind {
            BackgroundKind::Plain => match k {
                0 => format!(" on {} {} background", an(c(0)), c(0)),
                1 => format!(" against {} {} background", an(c(0)), c(0)),
                _ => format!(", {} background", c(0)),
            },
            BackgroundKind::Sky => match k {
                0 => format!(" under {} {} sky", an(c(0)), c(0)),
                1 => format!(" in {} {} sky", an(c(0)), c(0)),
                _ => format!(", {} sky", c(0)),
            },
            BackgroundKind::Sea => match k {
                0 => " by the sea".into(),
                1 => " over the sea".into(),
                _ => ", sea and horizon".into(),
            },
            BackgroundKind::Stripes => match k {
                0 => format!(" on {} and {} stripes", c(0), c(1)),
                1 => format!(", {} and {} stripes", c(0), c(1)),
                _ => format!(" on a striped {} and {} background", c(0), c(1)),
            },
            BackgroundKind::Checkerboard => match k {
                0 => format!(" on a {} and {} checkerboard", c(0), c(1)),
                1 => format!(", {} and {} checkerboard", c(0), c(1)),
                _ => format!(" on a {} and {} checkered background", c(0), c(1)),
            },
            BackgroundKind::Night => match k {
                0 => " at night".into(),
                1 => " under a night sky".into(),
                _ => ", night sky".into(),
            },
            BackgroundKind::Polka => match k {
                0 => format!(" on {} and {} polka dots", c(0), c(1)),
                1 => format!(", {} and {} polka dots", c(0), c(1)),
                _ => format!(" on a {} and {} polka background", c(0), c(1)),
            },
        }
    }

    /// The background as a leading noun phrase ("a night sky", "a blue background").
    fn background_lead(b: &Background) -> String {
        let c = |i: usize| colour_name(b, i);
        match b.kind {
            BackgroundKind::Plain => format!("{} {} background", an(c(0)), c(0)),
            BackgroundKind::Sky => format!("{} {} sky", an(c(0)), c(0)),
            BackgroundKind::Sea => "the sea".into(),
            BackgroundKind::Stripes => format!("{} and {} stripes", c(0), c(1)),
            BackgroundKind::Checkerboard => format!("a {} and {} checkerboard", c(0), c(1)),
            BackgroundKind::Night => "a night sky".into(),
            BackgroundKind::Polka => format!("{} and {} polka dots", c(0), c(1)),
        }
    }

    /// Say `d` in one of several ways.
    pub fn caption(&mut self, d: &Described) -> String {
        let g: Vec<String> = d
            .groups
            .clone()
            .iter()
            .map(|g| self.group_phrase(g))
            .collect();
        let bg = self.background_phrase(&d.background);
        match d.arrangement {
            Arrangement::Alone(pos) => {
                let pos = pos
                    .map(|p| {
                        let options: &[&str] = match p {
                            Position::Left => &["on the left", "at the left"],
                            Position::Right => &["on the right", "at the right"],
                            Position::Top => &["at the top", "near the top"],
                            Position::Bottom => &["at the bottom", "near the bottom"],
                            Position::Centre => {
                                &["in the centre", "in the center", "in the middle"]
                            }
                        };
                        format!(" {}", self.pick(options))
                    })
                    .unwrap_or_default();
                if self.chance(0.2) {
                    format!(
                        "{} with {}{}",
                        Self::background_lead(&d.background),
                        g[0],
                        pos
                    )
                } else {
                    format!("{}{}{}", g[0], pos, bg)
                }
            }
            Arrangement::Above => format!("{} above {}{}", g[0], g[1], bg),
            Arrangement::Below => format!("{} below {}{}", g[0], g[1], bg),
            Arrangement::NextTo => {
                let w = if self.chance(0.5) {
                    "next to"
                } else {
                    "beside"
                };
                format!("{} {w} {}{}", g[0], g[1], bg)
            }
            Arrangement::LeftOf => format!("{} to the left of {}{}", g[0], g[1], bg),
            Arrangement::RightOf => format!("{} to the right of {}{}", g[0], g[1], bg),
            Arrangement::Row => {
                if self.chance(0.5) {
                    format!("{}, {} and {} in a row{}", g[0], g[1], g[2], bg)
                } else {
                    format!("{}, {} and {}{}", g[0], g[1], g[2], bg)
                }
            }
        }
    }
}

/// The name of a background's `i`-th colour.
fn colour_name(b: &Background, i: usize) -> &'static str {
    b.colours.get(i).map(|c| c.name()).unwrap_or("gray")
}

/// "a" or "an" before `word`.
fn an(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// Colours a sky background comes in.
pub const SKY_COLOURS: [Colour; 6] = [
    Colour::Blue,
    Colour::Orange,
    Colour::Pink,
    Colour::Purple,
    Colour::Cyan,
    Colour::Yellow,
];

/// `n` evaluation prompts from `seed`: the first half from the training distribution (new scenes,
/// not ones the trainer saw: its seed differs), the second half using held-out colour-shape pairs.
pub fn eval_samples(n: usize, seed: u64) -> Vec<Sample> {
    eval_samples_with(n, seed, None)
}

/// [`eval_samples`] with every background of `kind` (polka dots: the demo LoRA's prompts).
pub fn eval_samples_on(n: usize, seed: u64, kind: BackgroundKind) -> Vec<Sample> {
    eval_samples_with(n, seed, Some(kind))
}

fn eval_samples_with(n: usize, seed: u64, kind: Option<BackgroundKind>) -> Vec<Sample> {
    let mut s = Sampler::new(seed);
    (0..n)
        .map(|i| {
            let split = if i < n.div_ceil(2) {
                Split::Train
            } else {
                Split::HeldOut
            };
            match kind {
                Some(kind) => s.sample_on(split, kind),
                None => s.sample(split),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_respect_their_split_length_and_contrast() {
        let mut s = Sampler::new(1);
        for i in 0..2000 {
            let split = if i % 3 == 0 {
                Split::HeldOut
            } else {
                Split::Train
            };
            let x = s.sample(split);
            assert!(x.caption.len() <= MAX_CAPTION, "{}", x.caption);
            let held = x
                .scene
                .objects
                .iter()
                .any(|o| HELD_OUT.contains(&(o.colour, o.shape)));
            assert_eq!(held, split == Split::HeldOut, "{}", x.caption);
            for o in &x.scene.objects {
                assert!((0.0..=1.0).contains(&o.x) && (0.0..=1.0).contains(&o.y));
                for r in x.scene.background.reserved_colours() {
                    assert!(
                        rgb_distance(o.colour.rgb(), r) >= MIN_CONTRAST,
                        "{}",
                        x.caption
                    );
                }
            }
            let drawn: usize = x.described.groups.iter().map(|g| g.count as usize).sum();
            assert_eq!(drawn, x.scene.objects.len());
        }
    }

    #[test]
    fn same_seed_same_scenes() {
        let a: Vec<_> = (0..20)
            .map(|_| Sampler::new(5).sample(Split::Train))
            .collect();
        let b: Vec<_> = (0..20)
            .map(|_| Sampler::new(5).sample(Split::Train))
            .collect();
        assert_eq!(a, b);
        let e = eval_samples(10, 3);
        assert_eq!(e.len(), 10);
        assert!(e[5..].iter().all(|x| x
            .described
            .groups
            .iter()
            .any(|g| HELD_OUT.contains(&(g.colour, g.shape)))));
    }
}
