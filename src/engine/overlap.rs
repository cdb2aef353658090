//! The first job's prompt encoded while the transformer loads (issue 30's cold start). A FLUX.1
//! or FLUX.2 klein model from files loads its text encoder first ([`TextFirst`]: FLUX.1's CLIP
//! and T5, klein's Qwen3); then one thread encodes the prompts of the job that asked for the
//! load while this thread reads the transformer's file (and the autoencoder's) onto the device,
//! and the load returns once both are done, the encodings waiting in the pipeline
//! ([`crate::pipeline::ahead::AheadPrompts`]) for the job's first step. The encoders, prompt and dtype are those the job would use itself, so the image
//! is the very one made without the overlap. `PARALLAX_NO_LOAD_OVERLAP=1` turns it off (one
//! part after the other, the prompt encoded by the job), to time the difference.
//!
//! Memory at the peak: the text encoders, the transformer and the autoencoder at once, with one
//! prompt's encoder activations: what a load without the overlap holds when its job encodes,
//! since the encoders stay loaded. Where T5 (klein: Qwen3) is built for each prompt and freed
//! after it ([`T5Residency::OnDemand`], a memory budget's choice so that it and the transformer
//! are never on the device together) nothing is encoded ahead: that promise holds.
//!
//! On a GPU the encoding thread queues on its own stream (candle's per-thread streams); the text
//! encoders' weights are waited for before it starts, its results before it returns. The
//! transformer's load runs no matrix products (reads, copies, conversions, FP8 quantisation), so
//! the encoder is the only user of the device's cuBLAS handle meanwhile. An error or a panic on
//! either side comes back as an error once both sides have stopped (the load's own error first,
//! the encoder's logged beside it); nothing is left running.

use std::time::{Duration, Instant};

use candle_core::{DType, Device};

use crate::error::{Error, Result};
use crate::model::layout::ModelFiles;
use crate::model::text::T5Residency;
use crate::pipeline::ahead::{self, EncodedPrompt, Flux1TextFirst, TextFirst};
use crate::pipeline::{GenerateRequest, LoadOptions, Pipeline};

/// Whether loads encode the first job's prompt beside the transformer's reading (on unless
/// `PARALLAX_NO_LOAD_OVERLAP` is set to something other than `0`).
pub fn enabled() -> bool {
    !std::env::var_os("PARALLAX_NO_LOAD_OVERLAP").is_some_and(|v| v != "0" && !v.is_empty())
}

/// The prompts a load for the first job `req` encodes ahead: `req`'s
/// ([`ahead::prompts_of`]), none when the overlap is off.
pub fn prompts_for(req: &GenerateRequest) -> Vec<String> {
    if enabled() {
        ahead::prompts_of(req)
    } else {
        Vec::new()
    }
}

/// FLUX.1 from `files` with `prompts` encoded while the transformer loads (see the module's
/// doc); with no prompts, or T5 built for each prompt, the parts one after the other.
pub fn load_files(
    files: &ModelFiles,
    label: &str,
    dtype: DType,
    device: &Device,
    opts: LoadOptions,
    prompts: &[String],
) -> Result<Pipeline> {
    load_text_first(
        Flux1TextFirst::load(files, label, dtype, device, opts)?,
        prompts,
    )
}

/// The second half of `first` (FLUX.1's [`Flux1TextFirst`], klein's
/// [`crate::pipeline::ahead::KleinTextFirst`]) read while `prompts` are encoded with its text
/// encoder, or after nothing is (no prompts, or the encoder's large part built for each prompt).
pub fn load_text_first(first: impl TextFirst, prompts: &[String]) -> Result<Pipeline> {
    if prompts.is_empty() || first.text_residency() == T5Residency::OnDemand {
        if !prompts.is_empty() {
            tracing::info!(
                "the text encoder is built for each prompt under this memory plan: the prompt is \
                 encoded after the transformer loads, not beside it"
            );
        }
        return first.finish();
    }
    let (dtype, device) = (first.dtype(), first.text().device().clone());
    // The encoder's weights are written by this thread's stream: done before another reads them.
    crate::device::synchronize(&device)?;
    let encode = || -> Result<Vec<EncodedPrompt>> {
        let out = prompts
            .iter()
            .map(|p| ahead::encode_prompt(first.text(), p, dtype, &device))
            .collect::<Result<Vec<_>>>()?;
        // This thread's stream: the tensors are written before the loading thread takes them.
        crate::device::synchronize(&device)?;
        Ok(out)
    };
    let t0 = Instant::now();
    let (rest, encoded, waited) = beside(encode, || first.rest())?;
    let encode_ms: f64 = encoded.iter().map(|e| e.ms).sum();
    crate::model::load_clock::encoded_ahead(
        encoded.len(),
        Duration::from_secs_f64(encode_ms / 1e3),
        waited,
    );
    tracing::info!(
        "{} prompt(s) encoded while the transformer loaded ({encode_ms:.0} ms; {:.0} ms waited \
         after it; {:.0} ms for both together)",
        encoded.len(),
        waited.as_secs_f64() * 1e3,
        t0.elapsed().as_secs_f64() * 1e3,
    );
    let p = first.assemble(rest);
    for e in encoded {
        p.ahead.put(e);
    }
    Ok(p)
}

/// Run `side` on a thread of its own while `main` runs on this one; both results once both are
/// done, and how long `main`'s end waited for `side`'s. A failure of either (an error, or a
/// panic of `side`) is an error once both have stopped: `main`'s when both failed, `side`'s
/// logged.
fn beside<A, B: Send>(
    side: impl FnOnce() -> Result<B> + Send,
    main: impl FnOnce() -> Result<A>,
) -> Result<(A, B, Duration)> {
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name("parallax-encode-ahead".into())
            .spawn_scoped(s, side)
            .map_err(|e| Error::runtime("cannot start the prompt-encoding thread", e));
        let handle = match handle {
            Ok(h) => h,
            Err(e) => return Err(e),
        };
        let main = main();
        let t = Instant::now();
        let side = handle.join().unwrap_or_else(|panic| {
            Err(Error::runtime(
                "encoding the prompt while the model loaded",
                format!(
                    "the encoder stopped: {}",
                    crate::error::panic_text(panic.as_ref())
                ),
            ))
        });
        let waited = t.elapsed();
        match (main, side) {
            (Ok(a), Ok(b)) => Ok((a, b, waited)),
            (Err(e), Ok(_)) => Err(e),
            (Ok(_), Err(e)) => Err(e),
            (Err(e), Err(other)) => {
                tracing::error!("encoding the prompt while the model loaded also failed: {other}");
                Err(e)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_run_and_their_results_come_back() {
        let (a, b, _) = beside(|| Ok(2), || Ok("main")).expect("both");
        assert_eq!((a, b), ("main", 2));
    }

    #[test]
    fn a_side_error_or_panic_is_an_error_after_main_finishes() {
        let main_ran = std::sync::atomic::AtomicBool::new(false);
        let r: Result<((), (), _)> = beside(
            || Err(Error::Tokenizer("no such token".into())),
            || {
                std::thread::sleep(Duration::from_millis(50));
                main_ran.store(true, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            },
        );
        let e = r.expect_err("the side's error");
        assert!(e.to_string().contains("no such token"), "{e}");
        assert!(main_ran.load(std::sync::atomic::Ordering::SeqCst));

        let r: Result<((), (), _)> = beside(|| panic!("encoder blew up"), || Ok(()));
        let e = r.expect_err("the side's panic");
        assert!(e.to_string().contains("encoder blew up"), "{e}");
    }

    #[test]
    fn a_main_error_waits_for_the_side_and_wins() {
        let side_done = std::sync::atomic::AtomicBool::new(false);
        let r: Result<((), (), _)> = beside(
            || {
                std::thread::sleep(Duration::from_millis(50));
                side_done.store(true, std::sync::atomic::Ordering::SeqCst);
                Err(Error::Tokenizer("side".into()))
            },
            || Err(Error::Image("transformer file damaged".into())),
        );
        let e = r.expect_err("main's error");
        assert!(e.to_string().contains("transformer file damaged"), "{e}");
        // The side thread was joined before the error came back: nothing left running.
        assert!(side_done.load(std::sync::atomic::Ordering::SeqCst));
    }
}
