//! A large part of a model (FLUX.1's T5, klein's Qwen3) either kept on the device or built for
//! each use and freed after it ([`Slot`]), as a memory budget chooses ([`Residency`], named
//! `T5Residency` where FLUX.1's text encoders and the load options take it). The slot counts the
//! builds, so a caller (a test, a report) can tell that an on-demand part was not kept between
//! uses.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::error::Result;

/// Where the large text encoder stays between prompts: FLUX.1's T5 (9.5 GB in bf16 for
/// T5-XXL), klein's Qwen3 ([`crate::model::klein::text::KleinTextEncoder`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Residency {
    /// Loaded once and kept on the device.
    #[default]
    Resident,
    /// Built on the device for each prompt and freed after it: the device holds it only while
    /// it encodes (a memory budget's choice; each prompt then reads its weights again, from the
    /// page cache after the first).
    OnDemand,
}

/// Builds the part from its weights, the same part each time.
pub type Builder<T> = Arc<dyn Fn() -> Result<T> + Send + Sync>;

/// The part itself, or how to build it for each use.
pub enum Slot<T> {
    Resident(T),
    OnDemand {
        build: Builder<T>,
        /// How many times it was built.
        builds: AtomicUsize,
    },
}

impl<T> Slot<T> {
    /// Built for each use ([`Residency::OnDemand`]).
    pub fn on_demand(build: Builder<T>) -> Self {
        Self::OnDemand {
            build,
            builds: AtomicUsize::new(0),
        }
    }

    /// Kept ([`Residency::Resident`]), or built for each use, as `residency` says: the part is
    /// built once now when kept.
    pub fn with_residency(residency: Residency, build: Builder<T>) -> Result<Self> {
        Ok(match residency {
            Residency::Resident => Self::Resident(build()?),
            Residency::OnDemand => Self::on_demand(build),
        })
    }

    pub fn residency(&self) -> Residency {
        match self {
            Self::Resident(_) => Residency::Resident,
            Self::OnDemand { .. } => Residency::OnDemand,
        }
    }

    /// Times an on-demand part was built (0 for a kept one).
    pub fn builds(&self) -> usize {
        match self {
            Self::Resident(_) => 0,
            Self::OnDemand { builds, .. } => builds.load(Ordering::Relaxed),
        }
    }

    /// `f` on the part: the kept one, or one built now and freed when `f` returns (its output
    /// is new tensors, so the part's weights go with it). `what` names it in the log.
    pub fn run<R>(&self, what: &str, f: impl FnOnce(&T) -> Result<R>) -> Result<R> {
        match self {
            Self::Resident(t) => f(t),
            Self::OnDemand { build, builds } => {
                let t0 = std::time::Instant::now();
                let part = build()?;
                builds.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    "{what} built for this prompt in {:.2}s",
                    t0.elapsed().as_secs_f64()
                );
                let out = f(&part);
                drop(part);
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_demand_builds_for_each_use_and_resident_once() -> Result<()> {
        let made = Arc::new(AtomicUsize::new(0));
        let m = made.clone();
        let build: Builder<Arc<()>> = Arc::new(move || {
            m.fetch_add(1, Ordering::Relaxed);
            Ok(Arc::new(()))
        });
        let kept = Slot::with_residency(Residency::Resident, build.clone())?;
        let lazy = Slot::with_residency(Residency::OnDemand, build)?;
        assert_eq!(made.load(Ordering::Relaxed), 1);
        let mut weak = None;
        for _ in 0..2 {
            kept.run("part", |_| Ok(()))?;
            lazy.run("part", |p| {
                weak = Some(Arc::downgrade(p));
                Ok(())
            })?;
            // The part built for the use is gone once it returns.
            assert!(weak.as_ref().is_some_and(|w| w.upgrade().is_none()));
        }
        assert_eq!((kept.builds(), lazy.builds()), (0, 2));
        assert_eq!(made.load(Ordering::Relaxed), 3);
        assert_eq!(lazy.residency(), Residency::OnDemand);
        Ok(())
    }
}
