//! The library's error type: every failure a user or a file can cause has a variant that names
//! the file, tensor or value at fault. `anyhow` is used only at the edges (CLI, binaries).

use std::path::PathBuf;

/// Convenience alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path} is not a valid safetensors file ({reason})")]
    CorruptSafetensors { path: PathBuf, reason: String },

    #[error("tensor `{tensor}` is missing from {location}")]
    MissingTensor { tensor: String, location: String },

    #[error("tensor `{tensor}` in {location} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        tensor: String,
        location: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("tensor `{tensor}` in {location} has dtype {dtype}, which Parallax does not support (supported: bf16, f16, f32)")]
    UnsupportedDtype {
        tensor: String,
        location: String,
        dtype: String,
    },

    #[error("unknown model layout at {path}: {reason}")]
    UnknownLayout { path: PathBuf, reason: String },

    #[error("missing tokenizer files for {which}: {reason}")]
    MissingTokenizer { which: String, reason: String },

    #[error("bad config {path}: {reason}")]
    BadConfig { path: PathBuf, reason: String },

    #[error("invalid setting `{name}` = {value}: {reason}")]
    InvalidSetting {
        name: String,
        value: String,
        reason: String,
    },

    #[error("tokenizer error: {0}")]
    Tokenizer(String),

    /// An image that cannot be made, read or compared (encoders, metadata, previews, metrics):
    /// the message says it in full.
    #[error("{0}")]
    Image(String),

    /// A rank of a parallel job failed: which rank, what it was doing, and why.
    #[error("rank {rank} failed {doing}: {reason}")]
    Rank {
        rank: usize,
        doing: String,
        reason: String,
    },

    /// A collective of a parallel group that gave up (its group was aborted: a rank failed, did
    /// not reach a collective or send within the timeout, or panicked), as rank `rank` saw it
    /// while `doing` it (`"all_gather"`, `"receiving from rank 1"`, ...).
    #[error("collective aborted: {why} (rank {rank}, {doing})")]
    Collective {
        rank: usize,
        doing: String,
        why: String,
    },

    /// A fault injected on purpose (`PARALLAX_FAULT`, [`crate::parallel::fault`]) struck rank
    /// `rank` `when` (`"after step 1"`, `"after loading"`).
    #[error("injected fault: rank {rank} {when}")]
    Injected { rank: usize, when: String },

    /// The runtime (its engine thread and job queue, the gallery it writes) could not do
    /// `what`.
    #[error("{what}: {reason}")]
    Runtime { what: String, reason: String },

    /// The rendezvous of worker processes (`parallax worker --init tcp://...`): its store, its
    /// token, or a rank that did not join or answer. The message says it in full.
    #[error("{0}")]
    Rendezvous(String),

    /// A record that could not be written as JSON (settings, run and quality records).
    #[error("cannot serialise {what}: {reason}")]
    Serialise { what: String, reason: String },

    #[error("cancelled")]
    Cancelled,

    /// A failure while loading something, with what was being loaded.
    #[error("loading {what}: {source}")]
    Load {
        what: String,
        #[source]
        source: Box<Error>,
    },

    /// The latent stopped being finite numbers (it would decode to a black image).
    #[error("the image became NaN or infinite at denoising step {step} of {total}: lower the guidance (--guidance, --true-cfg), or check that the model's weights are not damaged")]
    NonFinite { step: usize, total: usize },

    /// Ranks of a parallel job that did not come back after their group was aborted: their
    /// threads are left running (see `parallel::abandoned`) and nothing they ran on is reused.
    #[error("{why}; gave up on rank {} (it did not stop when the job was aborted, and is left behind)", join_ranks(.ranks))]
    RanksAbandoned { ranks: Vec<usize>, why: String },

    #[error(transparent)]
    Candle(candle_core::Error),

    /// A LoRA file that cannot be applied as made (names the file and what is wrong).
    #[error("LoRA {path}: {reason}")]
    Lora { path: String, reason: String },
}

/// `?` on a candle result: a Parallax error that travelled through candle comes back as itself
/// ([`Error::from_candle`]), anything else is wrapped.
impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::from_candle(e)
    }
}

fn join_ranks(ranks: &[usize]) -> String {
    let v: Vec<String> = ranks.iter().map(usize::to_string).collect();
    v.join(", ")
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Rank `rank` failed while `doing` (`"while denoising"`, `"after step 3"`, ...).
    pub fn rank(rank: usize, doing: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Error::Rank {
            rank,
            doing: doing.into(),
            reason: reason.to_string(),
        }
    }

    /// The runtime could not do `what`.
    pub fn runtime(what: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Error::Runtime {
            what: what.into(),
            reason: reason.to_string(),
        }
    }

    /// `what` could not be written as JSON.
    pub fn serialise(what: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Error::Serialise {
            what: what.into(),
            reason: reason.to_string(),
        }
    }

    pub fn setting(name: &str, value: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        Error::InvalidSetting {
            name: name.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// `self`, said to have happened while loading `what`.
    pub fn loading(self, what: impl Into<String>) -> Self {
        Error::Load {
            what: what.into(),
            source: Box::new(self),
        }
    }

    /// Wrap into a candle error (for code that must return `candle_core::Result`, such as a
    /// `VarBuilder` backend or a [`crate::collective::Communicator`]); [`Error::from_candle`]
    /// recovers it, and [`shown`] says it in its own words while it is a candle error.
    pub fn into_candle(self) -> candle_core::Error {
        candle_core::Error::WrappedContext {
            wrapped: Box::new(self),
            context: "parallax".to_string(),
        }
    }

    /// Recover a Parallax error that travelled through candle (see [`Error::into_candle`]),
    /// keeping its variant so callers and tests can match on it.
    pub fn from_candle(e: candle_core::Error) -> Self {
        match e {
            candle_core::Error::WrappedContext { wrapped, context } => {
                match wrapped.downcast::<Error>() {
                    Ok(ours) => *ours,
                    Err(other) => Error::Candle(candle_core::Error::WrappedContext {
                        wrapped: other,
                        context,
                    }),
                }
            }
            candle_core::Error::WithBacktrace { inner, .. } => Self::from_candle(*inner),
            candle_core::Error::Context { inner, context } => match Self::from_candle(*inner) {
                Error::Candle(c) => Error::Candle(candle_core::Error::Context {
                    inner: Box::new(c),
                    context,
                }),
                ours => ours,
            },
            other => Error::Candle(other),
        }
    }
}

/// A candle error in words: a Parallax error it carries ([`Error::into_candle`]) as itself (candle
/// prints a carried error with `{:?}`), anything else as candle says it.
pub fn shown(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WrappedContext { wrapped, .. } => match wrapped.downcast_ref::<Error>()
        {
            Some(ours) => ours.to_string(),
            None => e.to_string(),
        },
        candle_core::Error::WithBacktrace { inner, .. } => shown(inner),
        candle_core::Error::Context { inner, context } => format!("{context}\n{}", shown(inner)),
        other => other.to_string(),
    }
}

/// Extension to turn candle results into Parallax results, unwrapping our own errors, where a
/// value is returned rather than `?`-propagated (`?` alone converts through `From`).
pub trait CandleResultExt<T> {
    fn px(self) -> Result<T>;
}

impl<T> CandleResultExt<T> for candle_core::Result<T> {
    fn px(self) -> Result<T> {
        self.map_err(Error::from_candle)
    }
}

/// What a caught panic said (its `&str` or `String` payload), or "a panic" when it said nothing
/// readable: for the error or log line that replaces it.
pub fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic".into())
}
