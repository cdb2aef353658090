//! Which cuBLASLt algorithm an FP8 product runs with, and how it accumulates.
//!
//! By default a product shape takes cuBLASLt's heuristic first choice, asked once per shape and
//! device and kept (asking costs host time at every one of a step's ~270 FP8 products
//! otherwise), and accumulates in the tensor cores' fast mode. Two switches:
//! - `PARALLAX_GEMM_AUTOTUNE=1` (off by default): the first time a shape runs, the heuristic's
//!   first [`CANDIDATES`] algorithms are each timed on the GPU (on the call's own buffers,
//!   [`ROUNDS`] rounds of [`REPEATS`] calls) and the fastest by median is kept for the shape. On
//!   an H100 (2026-12-07) cuBLASLt offered one algorithm for each of FLUX.1's FP8 shapes, so it
//!   had nothing to choose among (the step 92.6/92.1 ms with it, 92.5/92.0 without);
//! - `PARALLAX_FP8_FAST_ACCUM=0` turns fast accumulation off (cuBLASLt's `FAST_ACCUM`: partial
//!   sums are not promoted to f32 registers along the inner dimension, as torchao's float8
//!   inference products do). On by default since an H200 run measured it (BENCHMARKS.md, "Issue
//!   30 in one H200 lease"): a FLUX.1-dev FP8 step 95.2 -> 89.6 ms, the FP8 error on random:dev
//!   0.0832 -> 0.0835 relative.
//!
//! [`report`] lists what was chosen, for `bench`'s JSON.

use std::sync::Mutex;

/// Algorithms the autotuner times per shape (the heuristic's first ones, in its order).
pub const CANDIDATES: usize = 8;
/// Timing rounds per candidate; the candidate's time is the median of its rounds.
pub const ROUNDS: usize = 3;
/// Calls per timing round (after one untimed call per candidate).
pub const REPEATS: usize = 4;

/// The switches, read once from the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// Time the heuristic's candidates and keep the fastest (`PARALLAX_GEMM_AUTOTUNE`).
    pub autotune: bool,
    /// FP8 products in fast accumulation (on unless `PARALLAX_FP8_FAST_ACCUM` says off).
    pub fast_accum: bool,
}

impl Default for Tuning {
    /// The heuristic's first algorithm, fast accumulation.
    fn default() -> Self {
        Self {
            autotune: false,
            fast_accum: true,
        }
    }
}

impl Tuning {
    /// From the two variables' values: autotuning on for `1`, `true`, `yes` or `on` (any case),
    /// off when unset or anything else; fast accumulation off for `0`, `false`, `no` or `off`,
    /// on when unset or anything else.
    pub fn parse(autotune: Option<&str>, fast_accum: Option<&str>) -> Self {
        let is = |v: Option<&str>, words: [&str; 4]| {
            v.is_some_and(|v| words.iter().any(|w| v.trim().eq_ignore_ascii_case(w)))
        };
        Self {
            autotune: is(autotune, ["1", "true", "yes", "on"]),
            fast_accum: !is(fast_accum, ["0", "false", "no", "off"]),
        }
    }
}

/// This process's switches.
pub fn tuning() -> Tuning {
    static T: std::sync::OnceLock<Tuning> = std::sync::OnceLock::new();
    *T.get_or_init(|| {
        let var = |k: &str| std::env::var(k).ok();
        Tuning::parse(
            var("PARALLAX_GEMM_AUTOTUNE").as_deref(),
            var("PARALLAX_FP8_FAST_ACCUM").as_deref(),
        )
    })
}

/// The candidate with the smallest median time: `times[c]` holds candidate `c`'s rounds, `None`
/// where it could not run these buffers. Ties go to the earlier (the heuristic's preference).
pub fn fastest(times: &[Option<Vec<f32>>]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, t) in times.iter().enumerate() {
        let Some(m) = t.as_deref().and_then(median) else {
            continue;
        };
        if best.is_none_or(|(_, b)| m < b) {
            best = Some((i, m));
        }
    }
    best.map(|(i, _)| i)
}

fn median(v: &[f32]) -> Option<f32> {
    let mut v: Vec<f32> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f32::total_cmp);
    Some(v[v.len() / 2])
}

/// One product shape's choice, as [`report`] lists it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Choice {
    /// Output rows (tokens), inner dimension, output columns.
    pub rows: usize,
    pub k: usize,
    pub n: usize,
    /// The epilogue (cuBLASLt's enum value: 1 none, 4 bias, 32 GELU, 36 GELU + bias).
    pub epilogue: u32,
    /// Candidates the heuristic offered, and the index kept (0: its first choice).
    pub offered: usize,
    pub chosen: usize,
    /// Median ms a call of the kept and of the heuristic's first (autotune only).
    pub ms_chosen: Option<f32>,
    pub ms_first: Option<f32>,
}

static CHOICES: Mutex<Vec<Choice>> = Mutex::new(Vec::new());

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn note(c: Choice) {
    CHOICES.lock().unwrap_or_else(|p| p.into_inner()).push(c);
}

/// The switches and every shape's choice so far, for `bench`'s JSON.
pub fn report() -> serde_json::Value {
    let t = tuning();
    let shapes = CHOICES.lock().unwrap_or_else(|p| p.into_inner()).clone();
    serde_json::json!({
        "autotune": t.autotune,
        "fp8_fast_accum": t.fast_accum,
        "shapes": shapes,
    })
}

#[cfg(feature = "cuda")]
pub use cuda::{choose, Key};

#[cfg(feature = "cuda")]
mod cuda {
    use super::{fastest, median, note, Choice, CANDIDATES, REPEATS, ROUNDS};
    use candle_core::cuda_backend::cudarc::cublaslt::sys;
    use candle_core::cuda_backend::cudarc::driver::{sys as drv, CudaStream};
    use candle_core::Result;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// What a kept algorithm is keyed by: the device and everything the descriptors say.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Key {
        pub device: candle_core::cuda_backend::DeviceId,
        pub rows: usize,
        pub k: usize,
        pub n: usize,
        pub ld: usize,
        pub epilogue: u32,
        pub fast_accum: bool,
    }

    static KEPT: Mutex<Option<HashMap<Key, sys::cublasLtMatmulAlgo_t>>> = Mutex::new(None);

    fn err(what: &str, e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Cuda(format!("{what}: {e:?}").into())
    }

    /// The algorithm for `key`: kept from an earlier call, or chosen now. `offered(n)` asks the
    /// heuristic for its first `n` algorithms (best first); `run(algo)` queues the product with
    /// one of them on `stream` (the autotuner calls it on the real buffers; the caller runs the
    /// product with the returned algorithm afterwards, so what the timing calls wrote is
    /// overwritten).
    pub fn choose(
        key: Key,
        stream: &CudaStream,
        offered: impl FnOnce(usize) -> Result<Vec<sys::cublasLtMatmulAlgo_t>>,
        mut run: impl FnMut(&sys::cublasLtMatmulAlgo_t) -> Result<()>,
    ) -> Result<sys::cublasLtMatmulAlgo_t> {
        if let Some(a) = KEPT
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(HashMap::new)
            .get(&key)
        {
            return Ok(*a);
        }
        let autotune = super::tuning().autotune;
        let algos = offered(if autotune { CANDIDATES } else { 1 })?;
        let Some(first) = algos.first().copied() else {
            return Err(err("cuBLASLt heuristic", "no algorithm for this product"));
        };
        let (chosen, times) = if autotune && algos.len() > 1 {
            let times = time_each(&algos, stream, &mut run)?;
            (fastest(&times).unwrap_or(0), times)
        } else {
            (0, vec![])
        };
        let ms = |i: usize| times.get(i).and_then(|t| t.as_deref()).and_then(median);
        let choice = Choice {
            rows: key.rows,
            k: key.k,
            n: key.n,
            epilogue: key.epilogue,
            offered: algos.len(),
            chosen,
            ms_chosen: ms(chosen),
            ms_first: ms(0),
        };
        if autotune {
            tracing::info!(
                "FP8 product {}x{} -> {} (epilogue {}): algorithm {} of {} ({:?} ms a call; the \
                 heuristic's first {:?} ms)",
                key.rows,
                key.k,
                key.n,
                key.epilogue,
                chosen,
                algos.len(),
                choice.ms_chosen,
                choice.ms_first
            );
        }
        note(choice);
        let algo = algos.get(chosen).copied().unwrap_or(first);
        KEPT.lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(HashMap::new)
            .insert(key, algo);
        Ok(algo)
    }

    /// Each algorithm's time per call over [`ROUNDS`] rounds (rounds interleave the candidates,
    /// so a clock change falls on all of them); `None` for one that fails on these buffers.
    fn time_each(
        algos: &[sys::cublasLtMatmulAlgo_t],
        stream: &CudaStream,
        run: &mut impl FnMut(&sys::cublasLtMatmulAlgo_t) -> Result<()>,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let flags = Some(drv::CUevent_flags::CU_EVENT_DEFAULT);
        let mut times: Vec<Option<Vec<f32>>> = algos
            .iter()
            .map(|a| run(a).ok().map(|_| Vec::with_capacity(ROUNDS)))
            .collect();
        for _ in 0..ROUNDS {
            for (a, t) in algos.iter().zip(times.iter_mut()) {
                let Some(rounds) = t else { continue };
                let start = stream.record_event(flags).map_err(|e| err("event", e))?;
                let mut ok = true;
                for _ in 0..REPEATS {
                    ok &= run(a).is_ok();
                }
                let end = stream.record_event(flags).map_err(|e| err("event", e))?;
                let ms = start.elapsed_ms(&end).map_err(|e| err("event", e))?;
                if ok {
                    rounds.push(ms / REPEATS as f32);
                } else {
                    *t = None;
                }
            }
        }
        Ok(times)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_read_the_usual_words() {
        let default = Tuning::parse(None, None);
        assert_eq!(default, Tuning::default());
        assert!(default.fast_accum && !default.autotune);
        for on in ["1", "true", "YES", " on "] {
            let t = Tuning::parse(Some(on), Some(on));
            assert!(t.autotune && t.fast_accum, "{on:?}");
        }
        for off in ["0", "false", "No", " OFF "] {
            let t = Tuning::parse(Some(off), Some(off));
            assert!(!t.autotune && !t.fast_accum, "{off:?}");
        }
        // Anything else leaves each switch at its default.
        for other in ["", "fast", "2"] {
            assert_eq!(
                Tuning::parse(Some(other), Some(other)),
                Tuning::default(),
                "{other:?}"
            );
        }
        let t = Tuning::parse(Some("1"), None);
        assert!(t.fast_accum && t.autotune);
        let t = Tuning::parse(None, Some("0"));
        assert!(!t.fast_accum && !t.autotune);
    }

    #[test]
    fn fastest_takes_the_smallest_median_among_those_that_ran() {
        // Candidate 1 has one slow round (a clock dip) but the smaller median; 2 failed.
        let times = vec![
            Some(vec![1.0, 1.1, 1.05]),
            Some(vec![0.9, 3.0, 0.95]),
            None,
            Some(vec![0.97, 0.96, 0.99]),
        ];
        assert_eq!(fastest(&times), Some(1));
        // Ties keep the heuristic's order; nothing that ran, no choice.
        assert_eq!(fastest(&[Some(vec![1.0]), Some(vec![1.0])]), Some(0));
        assert_eq!(fastest(&[None, Some(vec![])]), None);
        assert_eq!(fastest(&[Some(vec![f32::NAN]), Some(vec![2.0])]), Some(1));
    }

    #[test]
    fn the_report_names_the_switches() {
        let r = report();
        assert_eq!(r["autotune"], serde_json::json!(tuning().autotune));
        assert_eq!(r["fp8_fast_accum"], serde_json::json!(tuning().fast_accum));
        assert!(r["shapes"].is_array());
    }
}
