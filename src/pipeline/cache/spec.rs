//! A cache policy and its settings, as one value: what `--cache` takes, what settings files and
//! PNGs store, what a compare sweep lists.
//!
//! Written `name:key=value,...` (keys may be left out for their defaults):
//! - `none`
//! - `fbcache:t=0.12` (or `fbcache:0.12`): First Block Cache at residual-difference threshold t.
//! - `dbcache:f=1,b=1,t=0.12,max=0,warmup=0,taylor=0`: DBCache, the first `f` blocks always
//!   run as the probe, the last `b` always run to correct, the middle is reused while the probe's
//!   residual changes by less than `t`, at most `max` steps in a row (0: no limit), never in the
//!   first `warmup` steps; `taylor=1|2` extrapolates the middle's residual (TaylorSeer) instead of
//!   reusing it as it was.
//! - `taylorseer:n=3,order=1,warmup=2`: every `n`-th step (and the first `warmup`) runs every block;
//!   the steps between extrapolate the blocks' output by a Taylor series of order 1 or 2.
//! - `magcache:t=0.3,k=3,warmup=2`: skips steps while the error accumulated from the model's
//!   calibrated residual-magnitude ratios stays under `t`, at most `k` in a row.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use super::{
    CachePolicy, DbCache, DbCacheSettings, FirstBlockCache, MagCache, MagCalibration, NoCache,
    TaylorSeer,
};
use crate::{Error, Result};

/// The presets each policy has, from the most careful to the fastest.
pub const PRESET_NAMES: [&str; 3] = ["safe", "balanced", "fast"];

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum CacheSpec {
    #[default]
    None,
    FirstBlock {
        threshold: f64,
    },
    DbCache(DbCacheSettings),
    TaylorSeer {
        interval: usize,
        order: usize,
        warmup: usize,
    },
    MagCache {
        threshold: f64,
        max_skip: usize,
        warmup: usize,
    },
}

impl CacheSpec {
    /// The spec a plain First Block Cache threshold stands for (0: none).
    pub fn from_threshold(threshold: f64) -> Self {
        if threshold > 0.0 {
            CacheSpec::FirstBlock { threshold }
        } else {
            CacheSpec::None
        }
    }

    /// The policy's name, as written before the colon.
    pub fn policy_name(&self) -> &'static str {
        match self {
            CacheSpec::None => "none",
            CacheSpec::FirstBlock { .. } => "fbcache",
            CacheSpec::DbCache(_) => "dbcache",
            CacheSpec::TaylorSeer { .. } => "taylorseer",
            CacheSpec::MagCache { .. } => "magcache",
        }
    }

    /// Whether this spec can never reuse a step (its result equals no cache exactly).
    pub fn is_off(&self) -> bool {
        match *self {
            CacheSpec::None => true,
            CacheSpec::FirstBlock { threshold } => threshold <= 0.0,
            CacheSpec::DbCache(d) => d.threshold <= 0.0,
            CacheSpec::TaylorSeer { interval, .. } => interval <= 1,
            CacheSpec::MagCache { threshold, .. } => threshold <= 0.0,
        }
    }

    /// The First Block Cache threshold this spec amounts to, where it is one (0 for none): what
    /// older settings and PNG fields hold.
    pub fn fb_threshold(&self) -> Option<f64> {
        match *self {
            CacheSpec::None => Some(0.0),
            CacheSpec::FirstBlock { threshold } => Some(threshold),
            _ => None,
        }
    }

    /// This cell's part of a saved file's name: the threshold for First Block Cache (and `0` for
    /// none), else the spec with `:`, `,` and `=` made `_`.
    pub fn file_stem(&self) -> String {
        match self.fb_threshold() {
            Some(t) => t.to_string(),
            None => self.to_string().replace([':', ',', '='], "_"),
        }
    }

    /// The policy as an artist reads it: "No cache", "First Block Cache".
    pub fn policy_label(&self) -> &'static str {
        match self {
            CacheSpec::None => "No cache",
            CacheSpec::FirstBlock { .. } => "First Block Cache",
            CacheSpec::DbCache(_) => "DBCache",
            CacheSpec::TaylorSeer { .. } => "TaylorSeer",
            CacheSpec::MagCache { .. } => "MagCache",
        }
    }

    /// Which of its policy's presets ("safe", "balanced", "fast") this spec is, if any.
    pub fn preset_name(&self) -> Option<&'static str> {
        PRESET_NAMES
            .into_iter()
            .find(|p| CacheSpec::preset(self.policy_name(), p).as_ref() == Some(self))
    }

    /// The name the studio shows for a cell or an image: "TaylorSeer · balanced", "First Block
    /// Cache · 0.12" (a threshold is a sweep's own axis: it is named by its value), "DBCache ·
    /// custom" for settings that are no preset (the spec says which), "No cache".
    pub fn display_name(&self) -> String {
        match (self, self.preset_name()) {
            (CacheSpec::None, _) => self.policy_label().into(),
            (CacheSpec::FirstBlock { threshold }, _) => {
                format!("{} · {threshold}", self.policy_label())
            }
            (_, Some(p)) => format!("{} · {p}", self.policy_label()),
            (_, None) => format!("{} · custom", self.policy_label()),
        }
    }

    /// This spec's part of a gallery file's name: `nocache`, `fbcache-0_12`,
    /// `taylorseer-balanced`, or the spec spelt out for settings that are no preset.
    pub fn file_tag(&self) -> String {
        match (self, self.preset_name()) {
            (CacheSpec::None, _) => "nocache".into(),
            (CacheSpec::FirstBlock { threshold }, _) => {
                format!("fbcache-{}", threshold.to_string().replace('.', "_"))
            }
            (_, Some(p)) => format!("{}-{p}", self.policy_name()),
            (_, None) => self.file_stem().replace('.', "_"),
        }
    }

    /// The named presets the studio offers for `policy` ("fast", "balanced", "safe"), chosen from
    /// the measurements in BENCHMARKS.md (trained demo model, 12 steps).
    pub fn preset(policy: &str, name: &str) -> Option<Self> {
        let s = match (policy, name) {
            ("fbcache", "safe") => "fbcache:t=0.12",
            ("fbcache", "balanced") => "fbcache:t=0.2",
            ("fbcache", "fast") => "fbcache:t=0.3",
            ("dbcache", "safe") => "dbcache:f=1,b=1,t=0.2,max=2,warmup=2",
            ("dbcache", "balanced") => "dbcache:f=1,b=1,t=0.3,max=3,warmup=2",
            ("dbcache", "fast") => "dbcache:f=1,b=1,t=0.5,max=4,warmup=1,taylor=1",
            ("taylorseer", "safe") => "taylorseer:n=2,order=1,warmup=3",
            ("taylorseer", "balanced") => "taylorseer:n=3,order=1,warmup=2",
            ("taylorseer", "fast") => "taylorseer:n=4,order=1,warmup=2",
            ("magcache", "safe") => "magcache:t=0.1,k=2,warmup=2",
            ("magcache", "balanced") => "magcache:t=0.3,k=3,warmup=2",
            ("magcache", "fast") => "magcache:t=0.5,k=4,warmup=1",
            _ => return None,
        };
        s.parse().ok()
    }

    /// A fresh policy for one image. MagCache needs the model's calibration.
    pub fn policy(
        &self,
        calibration: Option<&Arc<MagCalibration>>,
    ) -> Result<Box<dyn CachePolicy>> {
        Ok(match *self {
            CacheSpec::None => Box::new(NoCache),
            CacheSpec::FirstBlock { threshold } => Box::new(FirstBlockCache::new(threshold)),
            CacheSpec::DbCache(d) => Box::new(DbCache::new(d)),
            CacheSpec::TaylorSeer {
                interval,
                order,
                warmup,
            } => Box::new(TaylorSeer::new(interval, order, warmup)),
            CacheSpec::MagCache {
                threshold,
                max_skip,
                warmup,
            } => {
                let cal = calibration.cloned().ok_or_else(|| {
                    Error::setting(
                        "cache",
                        self,
                        "MagCache needs this model's calibration (`parallax calibrate-magcache`); \
                         the demo model ships one",
                    )
                })?;
                Box::new(MagCache::new(threshold, max_skip, warmup, cal))
            }
        })
    }

    /// Checks the numbers a spec holds (the parser's rules, for specs built in code).
    pub fn validate(&self) -> Result<()> {
        let bad = |why: &str| Err(Error::setting("cache", self, why.to_string()));
        match *self {
            CacheSpec::None => Ok(()),
            CacheSpec::FirstBlock { threshold }
            | CacheSpec::DbCache(DbCacheSettings { threshold, .. })
            | CacheSpec::MagCache { threshold, .. }
                if !(threshold.is_finite() && threshold >= 0.0) =>
            {
                bad("the threshold must be a finite number >= 0")
            }
            CacheSpec::DbCache(DbCacheSettings { front, taylor, .. })
                if front == 0 || taylor > 2 =>
            {
                bad("DBCache needs f >= 1 probe block and taylor 0, 1 or 2")
            }
            CacheSpec::TaylorSeer {
                interval, order, ..
            } if interval == 0 || !(1..=2).contains(&order) => {
                bad("TaylorSeer needs n >= 1 and order 1 or 2")
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Display for CacheSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            CacheSpec::None => write!(f, "none"),
            CacheSpec::FirstBlock { threshold } => write!(f, "fbcache:t={threshold}"),
            CacheSpec::DbCache(DbCacheSettings {
                front,
                back,
                threshold,
                max_cached,
                warmup,
                taylor,
            }) => write!(
                f,
                "dbcache:f={front},b={back},t={threshold},max={max_cached},warmup={warmup},taylor={taylor}"
            ),
            CacheSpec::TaylorSeer {
                interval,
                order,
                warmup,
            } => write!(f, "taylorseer:n={interval},order={order},warmup={warmup}"),
            CacheSpec::MagCache {
                threshold,
                max_skip,
                warmup,
            } => write!(f, "magcache:t={threshold},k={max_skip},warmup={warmup}"),
        }
    }
}

impl From<CacheSpec> for String {
    fn from(s: CacheSpec) -> String {
        s.to_string()
    }
}

impl TryFrom<String> for CacheSpec {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl FromStr for CacheSpec {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        let text = text.trim();
        let (name, rest) = text.split_once(':').unwrap_or((text, ""));
        let name = name.trim().to_ascii_lowercase();
        let bad = |why: String| Error::setting("cache", text, why);
        // key=value pairs; a bare number stands for t.
        let mut pairs: Vec<(String, String)> = Vec::new();
        for part in rest.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some((k, v)) => pairs.push((k.trim().to_ascii_lowercase(), v.trim().to_string())),
                None => pairs.push(("t".into(), part.to_string())),
            }
        }
        let known: &[&str] = match name.as_str() {
            "none" | "off" => &[],
            "fbcache" | "first-block" => &["t"],
            "dbcache" => &["f", "b", "t", "max", "warmup", "taylor"],
            "taylorseer" | "taylor" => &["n", "order", "warmup"],
            "magcache" => &["t", "k", "warmup"],
            _ => {
                return Err(bad(
                    "unknown cache policy (none, fbcache, dbcache, taylorseer, magcache)".into(),
                ))
            }
        };
        for (k, _) in &pairs {
            if !known.contains(&k.as_str()) {
                return Err(bad(format!(
                    "`{k}` is not a setting of {name} (it takes: {})",
                    if known.is_empty() {
                        "nothing".to_string()
                    } else {
                        known.join(", ")
                    }
                )));
            }
        }
        let num = |key: &str, default: f64| -> Result<f64> {
            match pairs.iter().rev().find(|(k, _)| k == key) {
                None => Ok(default),
                Some((_, v)) => v
                    .parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or_else(|| bad(format!("{key}={v}: not a number >= 0"))),
            }
        };
        let int = |key: &str, default: usize| -> Result<usize> {
            match pairs.iter().rev().find(|(k, _)| k == key) {
                None => Ok(default),
                Some((_, v)) => v
                    .parse::<usize>()
                    .map_err(|_| bad(format!("{key}={v}: not a whole number >= 0"))),
            }
        };
        let spec = match name.as_str() {
            "none" | "off" => CacheSpec::None,
            "fbcache" | "first-block" => CacheSpec::FirstBlock {
                threshold: num("t", 0.12)?,
            },
            "dbcache" => CacheSpec::DbCache(DbCacheSettings {
                front: int("f", 1)?,
                back: int("b", 1)?,
                threshold: num("t", 0.12)?,
                max_cached: int("max", 0)?,
                warmup: int("warmup", 0)?,
                taylor: int("taylor", 0)?,
            }),
            "taylorseer" | "taylor" => CacheSpec::TaylorSeer {
                interval: int("n", 3)?,
                order: int("order", 1)?,
                warmup: int("warmup", 2)?,
            },
            _ => CacheSpec::MagCache {
                threshold: num("t", 0.3)?,
                max_skip: int("k", 3)?,
                warmup: int("warmup", 2)?,
            },
        };
        spec.validate()?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_and_bad_ones_say_why() {
        for s in [
            "none",
            "fbcache:t=0.12",
            "dbcache:f=2,b=1,t=0.2,max=3,warmup=2,taylor=1",
            "taylorseer:n=3,order=2,warmup=2",
            "magcache:t=0.3,k=3,warmup=2",
        ] {
            let spec: CacheSpec = s.parse().expect(s);
            assert_eq!(spec.to_string(), s);
            let json = serde_json::to_string(&spec).expect("json");
            assert_eq!(
                serde_json::from_str::<CacheSpec>(&json).expect("back"),
                spec
            );
        }
        assert_eq!(
            "fbcache:0.2".parse::<CacheSpec>().expect("bare t"),
            CacheSpec::FirstBlock { threshold: 0.2 }
        );
        for (bad, says) in [
            ("lru:0.1", "unknown cache policy"),
            ("dbcache:q=1", "`q` is not a setting of dbcache"),
            ("fbcache:t=-1", "not a number >= 0"),
            ("taylorseer:order=3", "order 1 or 2"),
            ("dbcache:f=0", "f >= 1"),
        ] {
            let e = bad.parse::<CacheSpec>().expect_err(bad).to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        for p in ["fbcache", "dbcache", "taylorseer", "magcache"] {
            for n in ["safe", "balanced", "fast"] {
                assert!(CacheSpec::preset(p, n).is_some(), "{p} {n}");
            }
        }
        assert!("dbcache:t=0".parse::<CacheSpec>().expect("off").is_off());
    }

    #[test]
    fn specs_are_named_by_their_preset() {
        let spec: CacheSpec = "taylorseer:n=3,order=1,warmup=2".parse().expect("spec");
        assert_eq!(spec.preset_name(), Some("balanced"));
        assert_eq!(spec.display_name(), "TaylorSeer · balanced");
        assert_eq!(spec.file_tag(), "taylorseer-balanced");
        let fast = CacheSpec::preset("magcache", "fast").expect("preset");
        assert_eq!(fast.display_name(), "MagCache · fast");
        let custom: CacheSpec = "dbcache:t=0.25".parse().expect("spec");
        assert_eq!(custom.preset_name(), None);
        assert_eq!(custom.display_name(), "DBCache · custom");
        assert_eq!(
            custom.file_tag(),
            "dbcache_f_1_b_1_t_0_25_max_0_warmup_0_taylor_0"
        );
        assert_eq!(CacheSpec::None.display_name(), "No cache");
        assert_eq!(CacheSpec::None.file_tag(), "nocache");
        let fb = CacheSpec::from_threshold(0.12);
        assert_eq!(fb.display_name(), "First Block Cache · 0.12");
        assert_eq!(fb.file_tag(), "fbcache-0_12");
        assert!("taylorseer:n=1".parse::<CacheSpec>().expect("off").is_off());
    }
}
