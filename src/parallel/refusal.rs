//! What a sound layout still refuses for one request: the checks that need the request (true
//! CFG, the cache policy) and the model's block count, beside [`super::mesh::Mesh::new`]'s checks
//! of the degrees alone. The engine refuses a job with [`check`] before its first step; the
//! studio runs the same check as the user types and words each [`Refusal`] in its own terms.

use super::mesh::{ParallelLayout, Stale};
use crate::error::Error;
use crate::pipeline::cache::CacheSpec;
use crate::pipeline::GenerateRequest;

/// Why a layout cannot run a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Displaced patches (`"displaced"`) or PipeFusion (`"pipefusion"`) keep one pass's keys and
    /// values a step: true CFG's two passes need a CFG degree of 2.
    StaleNeedsCfg2 { what: &'static str },
    /// More PipeFusion stages than the model has blocks.
    TooManyStages { stages: usize, blocks: usize },
    /// More PipeFusion patches than the image has tokens (at most one patch per token).
    TooManyPatches { patches: usize, tokens: usize },
    /// PipeFusion with a cache policy (the policies run the blocks in pieces on one device).
    PipeFusionCache,
    /// CFG parallelism without true CFG: it has no negative branch to run.
    Cfg2WithoutTrueCfg,
}

/// The first reason `layout` cannot run `req` on a model of `blocks` blocks, if any.
pub fn check(layout: ParallelLayout, req: &GenerateRequest, blocks: usize) -> Option<Refusal> {
    let true_cfg = req.true_cfg.unwrap_or(1.0) > 1.0;
    let stale = match layout.stale {
        Stale::Exact => None,
        Stale::Displaced { .. } => Some("displaced"),
        Stale::PipeFusion { .. } => Some("pipefusion"),
    };
    if let Some(what) = stale {
        if layout.cfg == 1 && true_cfg {
            return Some(Refusal::StaleNeedsCfg2 { what });
        }
    }
    if let Stale::PipeFusion {
        stages, patches, ..
    } = layout.stale
    {
        let tokens = (req.width / 16) * (req.height / 16);
        if patches > tokens {
            return Some(Refusal::TooManyPatches { patches, tokens });
        }
        if stages > blocks {
            return Some(Refusal::TooManyStages { stages, blocks });
        }
        let cache = req.cache_spec();
        if cache != CacheSpec::None {
            return Some(Refusal::PipeFusionCache);
        }
    }
    if layout.cfg == 2 && (!true_cfg || req.negative_prompt.is_none()) {
        return Some(Refusal::Cfg2WithoutTrueCfg);
    }
    None
}

impl From<Refusal> for Error {
    /// The engine's (and the CLI's) words.
    fn from(r: Refusal) -> Error {
        match r {
            Refusal::StaleNeedsCfg2 { what } => Error::setting(
                "parallel layout",
                what,
                format!(
                    "{what} keeps one pass's keys and values per step: with --true-cfg use --cfg 2"
                ),
            ),
            Refusal::TooManyStages { stages, blocks } => Error::setting(
                "parallel layout",
                format!("pipefusion {stages}"),
                format!("the model has {blocks} blocks: at most that many stages"),
            ),
            Refusal::TooManyPatches { patches, tokens } => Error::setting(
                "parallel layout",
                format!("{patches} patches"),
                format!("the image has {tokens} image tokens: at most one patch per token"),
            ),
            Refusal::PipeFusionCache => Error::setting(
                "parallel layout",
                "pipefusion",
                "cache policies run the blocks in pieces on one device: turn the cache off with --pipefusion",
            ),
            Refusal::Cfg2WithoutTrueCfg => Error::setting(
                "parallel layout",
                "cfg 2",
                "CFG parallelism runs the negative prompt's branch: give --negative-prompt and --true-cfg above 1",
            ),
        }
    }
}
