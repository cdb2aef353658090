//! Repeated timings of a compare sweep, and how they read.
//!
//! The method ([`METHOD`]): after the warm-up, the sweep runs in rounds; each round times every
//! cell once, the uncached reference included, starting one cell later than the round before
//! ([`round_order`]), so slow drift and bursts of machine noise fall on every cell alike. A cell's
//! speed-up in a round is the reference's time in that round over the cell's; the cell reports
//! the median over the rounds and their range (lowest to highest, [`Spread`]). A range that
//! reaches 1.0 or below is "no measurable gain" ([`Verdict`]). The images come from the first
//! round; the runs are deterministic, and every later round's image is checked against it.

use serde::Serialize;

use crate::pipeline::image::RgbImage;

/// How the speed-ups are measured, in words (the studio's tooltip, the CLI's JSON, the docs).
pub const METHOD: &str = "Each cell is timed once per round, after a warm-up; every round times \
     every cell, the uncached reference too, starting one cell later than the round before, so \
     machine noise falls on every cell alike. Speed-up = the reference's time in a round / the \
     cell's time in the same round: the median over the rounds, and in brackets the lowest and \
     highest. A range that reaches 1.0x is \"no measurable gain\". Images and quality come from \
     the first round (later rounds make the same image, bit for bit).";

/// The cells in the order round `round` (0-based) times them: round 0 in their own order, each
/// later round starting one cell further on (wrapping).
pub fn round_order(cells: usize, round: usize) -> Vec<usize> {
    let start = if cells == 0 { 0 } else { round % cells };
    (0..cells).map(|k| (start + k) % cells).collect()
}

/// One cell's repeated timings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CellTiming {
    /// The cell's wall time in each round, in ms (round 1 first).
    pub wall_ms: Vec<f64>,
    /// The reference's time over this cell's in each round (empty for the reference itself).
    pub speedups: Vec<f64>,
    /// Every round made the first round's image, bit for bit.
    pub identical: bool,
}

impl CellTiming {
    /// The timings of every cell from their per-round wall times (`wall_ms[cell][round]`, the
    /// reference first) and whether each cell's rounds made the same image.
    pub fn of_sweep(wall_ms: &[Vec<f64>], identical: &[bool]) -> Vec<CellTiming> {
        Self::of_sweep_against(wall_ms, identical, &vec![0; wall_ms.len()])
    }

    /// [`CellTiming::of_sweep`] with each cell measured against its own reference
    /// (`references[cell]`, a cell's own index for a reference: a LoRA strength sweep's uncached
    /// cell of each strength).
    pub fn of_sweep_against(
        wall_ms: &[Vec<f64>],
        identical: &[bool],
        references: &[usize],
    ) -> Vec<CellTiming> {
        wall_ms
            .iter()
            .enumerate()
            .map(|(i, times)| CellTiming {
                wall_ms: times.clone(),
                speedups: match references.get(i).copied().unwrap_or(0) {
                    r if r == i => Vec::new(),
                    r => wall_ms
                        .get(r)
                        .map(Vec::as_slice)
                        .unwrap_or_default()
                        .iter()
                        .zip(times)
                        .map(|(r, t)| r / t.max(1e-9))
                        .collect(),
                },
                identical: identical.get(i).copied().unwrap_or(true),
            })
            .collect()
    }

    /// The median wall time over the rounds, in ms.
    pub fn median_ms(&self) -> f64 {
        median(&self.wall_ms)
    }

    /// The speed-up's median and range; `None` for the reference.
    pub fn speedup(&self) -> Option<Spread> {
        Spread::of(&self.speedups)
    }
}

/// What a sweep's rounds collect, cell by cell: each round's wall time, and whether every round
/// made the first round's image.
#[derive(Debug, Default)]
pub struct Recorder {
    first: Vec<Option<RgbImage>>,
    wall_ms: Vec<Vec<f64>>,
    identical: Vec<bool>,
}

impl Recorder {
    pub fn new(cells: usize) -> Self {
        Self {
            first: vec![None; cells],
            wall_ms: vec![Vec::new(); cells],
            identical: vec![true; cells],
        }
    }

    /// One run of cell `cell`: its image (kept the first time, compared after) and wall time.
    pub fn record(&mut self, cell: usize, image: &RgbImage, wall_ms: f64) {
        let (Some(first), Some(times), Some(same)) = (
            self.first.get_mut(cell),
            self.wall_ms.get_mut(cell),
            self.identical.get_mut(cell),
        ) else {
            return;
        };
        match first {
            Some(f) => *same &= f == image,
            None => *first = Some(image.clone()),
        }
        times.push(wall_ms);
    }

    /// Every cell's timing, each against its reference (`references[cell]`; see
    /// [`CellTiming::of_sweep_against`]).
    pub fn finish(&self, references: &[usize]) -> Vec<CellTiming> {
        CellTiming::of_sweep_against(&self.wall_ms, &self.identical, references)
    }
}

/// A median with the lowest and highest of the values it is taken over.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// How many values (rounds).
    pub rounds: usize,
}

/// What a speed-up's range says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The whole range is above 1.0.
    Gain,
    /// The range reaches 1.0: the gain is within the noise.
    NoMeasurableGain,
    /// The whole range is below 1.0.
    Slower,
    /// One round only: the noise is unknown.
    OneTiming,
}

impl Verdict {
    pub fn words(self) -> &'static str {
        match self {
            Verdict::Gain => "gain",
            Verdict::NoMeasurableGain => "no measurable gain",
            Verdict::Slower => "slower",
            Verdict::OneTiming => "one timing",
        }
    }
}

impl Spread {
    /// `None` for no values (or any that is not finite).
    pub fn of(values: &[f64]) -> Option<Self> {
        if values.is_empty() || values.iter().any(|v| !v.is_finite()) {
            return None;
        }
        Some(Self {
            median: median(values),
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            rounds: values.len(),
        })
    }

    pub fn verdict(&self) -> Verdict {
        if self.rounds < 2 {
            Verdict::OneTiming
        } else if self.min > 1.0 {
            Verdict::Gain
        } else if self.max < 1.0 {
            Verdict::Slower
        } else {
            Verdict::NoMeasurableGain
        }
    }

    /// The speed-up as a table cell shows it: `1.42x (1.35-1.50)`, `no measurable gain` (the
    /// numbers are in the cell's tooltip), `slower (0.88-0.95x)`, or `1.42x (one timing)`.
    pub fn label(&self) -> String {
        let (m, lo, hi) = (self.median, self.min, self.max);
        match self.verdict() {
            Verdict::Gain => format!("{m:.2}x ({lo:.2}-{hi:.2})"),
            Verdict::NoMeasurableGain => "no measurable gain".into(),
            Verdict::Slower => format!("slower ({lo:.2}-{hi:.2}x)"),
            Verdict::OneTiming => format!("{m:.2}x (one timing)"),
        }
    }

    /// The median and range in words, for a tooltip: "median 1.01x, 0.95x to 1.07x over 3 rounds".
    pub fn describe(&self) -> String {
        format!(
            "median {:.2}x, {:.2}x to {:.2}x over {} rounds",
            self.median, self.min, self.max, self.rounds
        )
    }
}

/// The middle value (the mean of the two middle ones for an even count); NaN for none.
pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_round_times_every_cell_once_each_starting_further_on() {
        assert_eq!(round_order(4, 0), [0, 1, 2, 3]);
        assert_eq!(round_order(4, 1), [1, 2, 3, 0]);
        assert_eq!(round_order(4, 5), [1, 2, 3, 0]);
        assert_eq!(round_order(0, 3), Vec::<usize>::new());
        // Over as many rounds as cells, each cell sits at each position once.
        for pos in 0..4 {
            let mut at: Vec<usize> = (0..4).map(|r| round_order(4, r)[pos]).collect();
            at.sort();
            assert_eq!(at, [0, 1, 2, 3]);
        }
    }

    #[test]
    fn speedups_are_per_round_ratios_with_their_median_and_range() {
        // The reference and two cells over three rounds; round 2 is slow for everyone.
        let wall = vec![
            vec![100.0, 200.0, 100.0],
            vec![50.0, 100.0, 80.0],
            vec![98.0, 210.0, 104.0],
        ];
        let t = CellTiming::of_sweep(&wall, &[true, true, false]);
        assert!(t[0].speedup().is_none(), "the reference has no speed-up");
        assert_eq!(t[0].median_ms(), 100.0);
        let fast = t[1].speedup().expect("a speed-up");
        assert_eq!((fast.median, fast.min, fast.max), (2.0, 1.25, 2.0));
        assert_eq!(fast.verdict(), Verdict::Gain);
        assert_eq!(fast.label(), "2.00x (1.25-2.00)");
        assert!(fast.min <= fast.median && fast.median <= fast.max);
        let same = t[2].speedup().expect("a speed-up");
        assert_eq!(same.verdict(), Verdict::NoMeasurableGain);
        assert_eq!(same.label(), "no measurable gain");
        assert!(
            same.describe().contains("over 3 rounds"),
            "{}",
            same.describe()
        );
        assert!(!t[2].identical);
    }

    #[test]
    fn the_recorder_keeps_each_rounds_time_and_notices_a_different_image() {
        let img = |v: u8| RgbImage {
            width: 1,
            height: 1,
            data: vec![v; 3],
        };
        let mut r = Recorder::new(2);
        for (round, t) in [(0, 10.0), (1, 12.0)] {
            for cell in round_order(2, round) {
                r.record(cell, &img(cell as u8), t / (cell + 1) as f64);
            }
        }
        r.record(1, &img(9), 5.0);
        r.record(7, &img(0), 1.0); // no such cell: ignored
        let t = r.finish(&[0, 0]);
        assert_eq!(t[0].wall_ms, [10.0, 12.0]);
        assert_eq!(t[1].wall_ms, [5.0, 6.0, 5.0]);
        assert_eq!(
            t[1].speedups,
            [2.0, 2.0],
            "one ratio per round with both times"
        );
        assert!(t[0].identical && !t[1].identical);
    }

    #[test]
    fn the_verdict_reads_the_range_not_the_median() {
        let s = |v: &[f64]| Spread::of(v).expect("values");
        assert_eq!(s(&[1.43, 0.95, 1.2]).verdict(), Verdict::NoMeasurableGain);
        assert_eq!(s(&[1.01, 1.02, 1.5]).verdict(), Verdict::Gain);
        assert_eq!(s(&[1.0, 1.3, 1.4]).verdict(), Verdict::NoMeasurableGain);
        assert_eq!(s(&[0.9, 0.8, 0.95]).verdict(), Verdict::Slower);
        assert_eq!(s(&[0.9, 0.8, 0.95]).label(), "slower (0.80-0.95x)");
        assert_eq!(s(&[1.4]).verdict(), Verdict::OneTiming);
        assert_eq!(s(&[1.4]).label(), "1.40x (one timing)");
        assert!(Spread::of(&[]).is_none());
        assert!(Spread::of(&[f64::NAN, 1.0]).is_none());
        assert_eq!(median(&[3.0, 1.0, 2.0, 10.0]), 2.5);
    }
}
