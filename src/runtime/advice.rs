//! What to try after a failed job or model load: one line for the studio's message log and the
//! CLI, read from the error's text (out of memory, a lost worker, damaged weights, ...) and the
//! settings it ran with.

/// The settings a suggestion can refer to.
#[derive(Debug, Clone, Copy, Default)]
pub struct Context {
    pub width: usize,
    pub height: usize,
    /// Workers (ranks) the job ran on.
    pub workers: usize,
    pub fp8: bool,
    /// GiB, when a memory budget was set.
    pub memory_budget_gib: Option<u32>,
}

/// A suggestion for `error`, if one fits.
pub fn next_step(error: &str, c: &Context) -> Option<String> {
    let e = error.to_ascii_lowercase();
    if e.contains("out_of_memory") || e.contains("out of memory") {
        let mut tries = Vec::new();
        if c.width * c.height > 1024 * 1024 {
            tries.push(format!(
                "a smaller image (now {}x{}; 1024x1024 needs about a quarter of 2048x2048's memory)",
                c.width, c.height
            ));
        }
        if c.memory_budget_gib.is_none() {
            tries.push("a memory budget (24 GiB: T5 per prompt, FP8 weights)".to_string());
        }
        if !c.fp8 {
            tries.push("FP8 products (half the transformer's weights, on sm_89+ GPUs)".to_string());
        }
        tries.push("more GPUs (the decode splits in row bands across them)".to_string());
        return Some(format!(
            "the GPU ran out of memory: try {}",
            tries.join(", or ")
        ));
    }
    // The in-process groups and NCCL say "collective aborted", "did not reach", "sent nothing";
    // the store of worker processes "is lost or stuck", "disconnected before it was done", or
    // that rank 0, which serves it, "has exited or was killed".
    if [
        "collective aborted",
        "did not reach",
        "sent nothing",
        "is lost or stuck",
        "disconnected before it was done",
        "has exited or was killed",
    ]
    .iter()
    .any(|n| e.contains(n))
    {
        return Some(if c.workers > 1 {
            format!(
                "a worker was lost or stuck: the others stopped; the next job runs again on the \
                 same {} workers, or try fewer",
                c.workers
            )
        } else {
            "a worker was lost or stuck: try again".to_string()
        });
    }
    if e.contains("safetensors")
        || e.contains("header")
        || e.contains("truncated")
        || e.contains("unexpected end")
    {
        return Some(
            "the weight file looks damaged or incomplete: download it again, or pick another \
             model (the demo model needs no files)"
                .to_string(),
        );
    }
    if e.contains("must divide") || e.contains("parallel layout") {
        return Some("the layout does not fit the model or the workers: try auto layout".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_fit_the_failure() {
        let big = Context {
            width: 4096,
            height: 4096,
            workers: 1,
            ..Default::default()
        };
        let s = next_step("CUDA_ERROR_OUT_OF_MEMORY, out of memory", &big).expect("oom");
        assert!(s.contains("smaller image") && s.contains("memory budget") && s.contains("FP8"));
        let lean = Context {
            width: 1024,
            height: 1024,
            fp8: true,
            memory_budget_gib: Some(24),
            workers: 1,
        };
        let s = next_step("out of memory", &lean).expect("oom");
        assert!(
            !s.contains("smaller image") && !s.contains("FP8 products") && s.contains("more GPUs")
        );
        let lost = Context {
            workers: 4,
            ..Default::default()
        };
        let s = next_step("collective aborted: rank 2 of 4 did not reach", &lost).expect("lost");
        assert!(s.contains("fewer"), "{s}");
        for store in [
            "rendezvous: rank 1 disconnected before it was done (while waiting for world/c3/1)",
            "rank 0: nothing came from rank 1 for `k` within 3.0 s: rank 1 is lost or stuck",
            "rendezvous: get: the store closed the connection (early eof): rank 0, whose process \
             serves the store, has exited or was killed",
        ] {
            let s = next_step(store, &lost).unwrap_or_default();
            assert!(s.contains("a worker was lost"), "{store}: {s:?}");
        }
        assert!(next_step("error reading safetensors header", &lost).is_some());
        assert_eq!(next_step("cancelled", &lost), None);
    }
}
