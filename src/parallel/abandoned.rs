//! Rank threads the engine gave up on: a rank that did not come back after its group was
//! aborted (stuck in a kernel, a driver call or an injected stall) is left running, detached,
//! so that the job ends at the collective timeout instead of when (or if) the rank returns. Each
//! one is recorded here until its thread ends, so the runtime can say what is still held and a
//! later job knows not to reuse what it was running on.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A rank thread left behind.
#[derive(Debug, Clone)]
pub struct Abandoned {
    /// Its rank in the job it ran.
    pub rank: usize,
    /// Where it ran (`cpu`, or the GPU's description).
    pub device: String,
    /// How long ago it was given up on.
    pub since: Duration,
}

struct Entry {
    rank: usize,
    device: String,
    at: Instant,
    ended: Arc<AtomicBool>,
}

static LIST: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
static TOTAL: AtomicU64 = AtomicU64::new(0);

/// Set by a rank thread when it ends (its `Drop`, so a panic sets it too).
pub struct Ended(pub Arc<AtomicBool>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Record rank `rank`'s thread (on `device`) as left behind; `ended` turns true when it ends.
pub fn record(rank: usize, device: String, ended: Arc<AtomicBool>) {
    TOTAL.fetch_add(1, Ordering::SeqCst);
    LIST.lock().unwrap_or_else(|p| p.into_inner()).push(Entry {
        rank,
        device,
        at: Instant::now(),
        ended,
    });
}

/// The rank threads left behind that are still running (those that ended are forgotten).
pub fn still_running() -> Vec<Abandoned> {
    let mut list = LIST.lock().unwrap_or_else(|p| p.into_inner());
    list.retain(|e| !e.ended.load(Ordering::SeqCst));
    list.iter()
        .map(|e| Abandoned {
            rank: e.rank,
            device: e.device.clone(),
            since: e.at.elapsed(),
        })
        .collect()
}

/// How many rank threads were ever left behind in this process (ended or not).
pub fn total() -> u64 {
    TOTAL.load(Ordering::SeqCst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_are_listed_until_they_end() {
        let before = total();
        let ended = Arc::new(AtomicBool::new(false));
        let guard = Ended(ended.clone());
        record(7, "test-device".into(), ended);
        assert_eq!(total(), before + 1);
        let mine = |v: Vec<Abandoned>| v.into_iter().filter(|a| a.device == "test-device").count();
        assert_eq!(mine(still_running()), 1);
        drop(guard);
        assert_eq!(mine(still_running()), 0);
    }
}
