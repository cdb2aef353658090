//! Faults injected on purpose, to test what the engine does when a rank fails: set
//! `PARALLAX_FAULT=rank=R,step=S,kind=K` and rank R, after its denoising step S (0-based; `load`:
//! once a worker process has loaded the model),
//! `fail`s with an error, runs out of memory (`oom`: the error a failed GPU allocation gives),
//! `panic`s, `exit`s its process at once (`std::process::exit(3)`: a worker process killed mid-run;
//! only for `parallax worker` processes, since it ends every thread of the process), or `stall`s
//! for a while (`stall:SECONDS`, default 3600) before going on. Read once
//! per job; unset, nothing happens. `kind=write` instead makes every PNG write fail after its
//! temporary file is written (see [`crate::pipeline::image::save_png`]). For tests and for trying
//! the watchdog by hand (`parallax generate --devices cpu:2 ...`).

use std::time::Duration;

/// What the faulty rank does.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FaultKind {
    Fail,
    Oom,
    /// PNG writes fail (handled where images are written; ranks ignore it).
    Write,
    Panic,
    /// The whole process exits with status [`EXIT_STATUS`], skipping every destructor and
    /// goodbye (as a killed worker would).
    Exit,
    Stall(Duration),
}

/// The "step" of a fault that strikes once the model is loaded, before the first step
/// (`step=load`; only `parallax worker` processes look for it).
pub const LOAD_STEP: usize = usize::MAX;

/// The exit status of a process ended by `kind=exit`.
pub const EXIT_STATUS: i32 = 3;

/// Rank `rank` misbehaves after step `step`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fault {
    pub rank: usize,
    pub step: usize,
    pub kind: FaultKind,
}

impl Fault {
    /// The fault `PARALLAX_FAULT` names, if any (a malformed value is reported and ignored).
    pub fn from_env() -> Option<Fault> {
        let v = std::env::var("PARALLAX_FAULT").ok()?;
        match Self::parse(&v) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!("PARALLAX_FAULT={v}: {e}; no fault injected");
                None
            }
        }
    }

    /// Parse `rank=R,step=S,kind=fail|oom|panic|exit|stall[:SECONDS]` (or `kind=write`).
    pub fn parse(s: &str) -> Result<Fault, String> {
        let (mut rank, mut step, mut kind) = (None, None, None);
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}` is not key=value"))?;
            match k.trim() {
                "rank" => rank = Some(v.trim().parse().map_err(|_| format!("rank `{v}`"))?),
                "step" if v.trim() == "load" => step = Some(LOAD_STEP),
                "step" => step = Some(v.trim().parse().map_err(|_| format!("step `{v}`"))?),
                "kind" => {
                    kind = Some(match v.trim().split_once(':') {
                        None if v.trim() == "fail" => FaultKind::Fail,
                        None if v.trim() == "oom" => FaultKind::Oom,
                        None if v.trim() == "write" => FaultKind::Write,
                        None if v.trim() == "panic" => FaultKind::Panic,
                        None if v.trim() == "exit" => FaultKind::Exit,
                        None if v.trim() == "stall" => FaultKind::Stall(Duration::from_secs(3600)),
                        Some(("stall", secs)) => FaultKind::Stall(Duration::from_secs_f64(
                            secs.trim()
                                .parse::<f64>()
                                .ok()
                                .filter(|s| s.is_finite() && *s >= 0.0)
                                .ok_or_else(|| format!("stall seconds `{secs}`"))?,
                        )),
                        _ => {
                            return Err(format!(
                                "kind `{v}` (fail, oom, panic, exit, stall[:SECONDS] or write)"
                            ))
                        }
                    })
                }
                other => return Err(format!("unknown key `{other}` (rank, step, kind)")),
            }
        }
        let kind = kind.unwrap_or(FaultKind::Fail);
        if kind == FaultKind::Write {
            return Ok(Fault {
                rank: rank.unwrap_or(0),
                step: step.unwrap_or(0),
                kind,
            });
        }
        Ok(Fault {
            rank: rank.ok_or("no rank=")?,
            step: step.ok_or("no step=")?,
            kind,
        })
    }

    /// Act out the fault if it is `rank`'s after `step`.
    pub fn strike(&self, rank: usize, step: usize) -> crate::Result<()> {
        if rank != self.rank || step != self.step {
            return Ok(());
        }
        let injected = crate::Error::Injected {
            rank,
            when: if step == LOAD_STEP {
                "after loading".into()
            } else {
                format!("after step {step}")
            },
        };
        let what = injected.to_string();
        match self.kind {
            FaultKind::Fail => Err(injected),
            // Said as candle says a failed CUDA allocation, so that what reads errors for an
            // out-of-memory (the advice, the CLI's hint) is tried on the real words.
            FaultKind::Oom => Err(crate::Error::Candle(candle_core::Error::Msg(format!(
                "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\") ({what})"
            )))),
            FaultKind::Write => Ok(()),
            FaultKind::Panic => panic!("{what}"),
            FaultKind::Exit => {
                // Said on stderr first, so that a test can tell when the rank went away.
                eprintln!("{what}: exiting the process (status {EXIT_STATUS})");
                std::process::exit(EXIT_STATUS)
            }
            FaultKind::Stall(d) => {
                tracing::warn!("{what}: stalling {:.1} s", d.as_secs_f64());
                std::thread::sleep(d);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_fault_is_typed_and_named() {
        let f = Fault::parse("rank=1,step=2,kind=fail").expect("fault");
        assert!(f.strike(0, 2).is_ok() && f.strike(1, 1).is_ok());
        let e = f.strike(1, 2).expect_err("struck");
        assert!(
            matches!(&e, crate::Error::Injected { rank: 1, when } if when == "after step 2"),
            "{e:?}"
        );
        assert_eq!(e.to_string(), "injected fault: rank 1 after step 2");
    }

    #[test]
    fn faults_parse() {
        assert_eq!(
            Fault::parse("rank=1,step=2,kind=fail"),
            Ok(Fault {
                rank: 1,
                step: 2,
                kind: FaultKind::Fail
            })
        );
        assert_eq!(
            Fault::parse("step=0, rank=3, kind=stall:1.5").map(|f| f.kind),
            Ok(FaultKind::Stall(Duration::from_millis(1500)))
        );
        assert!(Fault::parse("rank=1").is_err());
        assert_eq!(
            Fault::parse("kind=write").map(|f| f.kind),
            Ok(FaultKind::Write)
        );
        assert_eq!(
            Fault::parse("rank=0,step=3,kind=oom").map(|f| f.kind),
            Ok(FaultKind::Oom)
        );
        assert_eq!(
            Fault::parse("rank=1,step=0,kind=exit").map(|f| f.kind),
            Ok(FaultKind::Exit)
        );
        assert_eq!(
            Fault::parse("rank=1,step=load,kind=stall:2").map(|f| f.step),
            Ok(LOAD_STEP)
        );
        assert!(Fault::parse("rank=1,step=2,kind=explode").is_err());
        assert!(Fault::parse("rank=x,step=2").is_err());
    }
}
