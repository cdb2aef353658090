//! Where loading a model spends its time, by phase, summed process-wide (issue 30's cold start):
//! opening and indexing weight files, reading tensors (the bytes out of the memory-mapped file,
//! which is where the disk is read, and any conversion on the host), copying them to the device,
//! quantising weights to FP8 on the device, and building the text encoders and the autoencoder.
//! `parallax bench` prints the sums. The phases nest only where a part's own build includes its
//! reads (the text encoders' and the autoencoder's times contain their files' reads and copies);
//! with several ranks loading at once the sums add their threads' times. Prompts encoded while a
//! transformer loads ([`encoded_ahead`]) are counted apart: not a phase of loading, but what
//! the load hid behind its reading.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A phase of loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadPhase {
    /// Opening weight files and reading their headers (and shard indexes).
    OpenIndex,
    /// Tensors' bytes read from the mapped files and converted on the host.
    Read,
    /// Host-to-device copies of the tensors read.
    HostToDevice,
    /// Weights quantised to E4M3 on the device (FP8 products), waited for.
    Fp8Quantise,
    /// The text encoders built (read from files, or drawn at random).
    TextEncoders,
    /// The autoencoder built.
    Autoencoder,
}

impl LoadPhase {
    pub const ALL: [LoadPhase; 6] = [
        LoadPhase::OpenIndex,
        LoadPhase::Read,
        LoadPhase::HostToDevice,
        LoadPhase::Fp8Quantise,
        LoadPhase::TextEncoders,
        LoadPhase::Autoencoder,
    ];

    /// The phase's name in JSON.
    pub fn name(self) -> &'static str {
        match self {
            LoadPhase::OpenIndex => "open_index",
            LoadPhase::Read => "read_tensors",
            LoadPhase::HostToDevice => "host_to_device",
            LoadPhase::Fp8Quantise => "fp8_quantise",
            LoadPhase::TextEncoders => "text_encoders",
            LoadPhase::Autoencoder => "autoencoder",
        }
    }
}

static NANOS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];
static BYTES_READ: AtomicU64 = AtomicU64::new(0);

/// Add `d` to `phase`.
pub fn add(phase: LoadPhase, d: Duration) {
    NANOS[phase as usize].fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
}

/// Run `f`, its time added to `phase`.
pub fn time<T>(phase: LoadPhase, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let r = f();
    add(phase, start.elapsed());
    r
}

/// Count `n` bytes read from weight files.
pub fn read_bytes(n: usize) {
    BYTES_READ.fetch_add(n as u64, Ordering::Relaxed);
}

static AHEAD_NANOS: AtomicU64 = AtomicU64::new(0);
static AHEAD_WAIT_NANOS: AtomicU64 = AtomicU64::new(0);
static AHEAD_PROMPTS: AtomicU64 = AtomicU64::new(0);

/// Count prompts encoded while a transformer loaded (the engine's overlap): `prompts` of them in
/// `encode` on their own thread, and the load `waited` for them after the transformer (and
/// autoencoder) were read: `encode - waited` was hidden behind the reading.
pub fn encoded_ahead(prompts: usize, encode: Duration, waited: Duration) {
    AHEAD_PROMPTS.fetch_add(prompts as u64, Ordering::Relaxed);
    AHEAD_NANOS.fetch_add(encode.as_nanos() as u64, Ordering::Relaxed);
    AHEAD_WAIT_NANOS.fetch_add(waited.as_nanos() as u64, Ordering::Relaxed);
}

/// The sums of [`encoded_ahead`] so far: (prompts, encoding ms, waited ms); `None` when no
/// load encoded ahead.
pub fn ahead_snapshot() -> Option<(u64, f64, f64)> {
    let n = AHEAD_PROMPTS.load(Ordering::Relaxed);
    (n > 0).then(|| {
        (
            n,
            AHEAD_NANOS.load(Ordering::Relaxed) as f64 / 1e6,
            AHEAD_WAIT_NANOS.load(Ordering::Relaxed) as f64 / 1e6,
        )
    })
}

/// The sums so far: (phase, milliseconds) for every phase, and the bytes read.
pub fn snapshot() -> (Vec<(LoadPhase, f64)>, u64) {
    let phases = LoadPhase::ALL
        .iter()
        .map(|&p| (p, NANOS[p as usize].load(Ordering::Relaxed) as f64 / 1e6))
        .collect();
    (phases, BYTES_READ.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_add_up() {
        let (before, _) = snapshot();
        add(LoadPhase::Fp8Quantise, Duration::from_millis(3));
        let v = time(LoadPhase::Fp8Quantise, || 5);
        assert_eq!(v, 5);
        let (after, _) = snapshot();
        let q = |s: &[(LoadPhase, f64)]| s[LoadPhase::Fp8Quantise as usize].1;
        assert!(q(&after) - q(&before) >= 3.0);
        let names: Vec<_> = LoadPhase::ALL.iter().map(|p| p.name()).collect();
        assert_eq!(names.len(), 6);
    }
}
