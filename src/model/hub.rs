//! Fetch a FLUX.1 model from the Hugging Face Hub into the Hugging Face cache.
//!
//! The transfer is the `hf-hub` crate's blocking client (ureq, rustls): it writes the cache layout
//! that [`super::layout::find_in_hf_cache`] reads (`models--owner--name/blobs/<etag>`,
//! `snapshots/<commit>/<file>` links, `refs/main`), keeps a file's bytes in `blobs/<etag>.part`
//! while they arrive and resumes from there with a `Range` request the next time. This module lists
//! the repo through the Hub's API, picks the files Parallax reads (one copy of the transformer, the
//! autoencoder, both text encoders and tokenizers), skips those already in the snapshot, and turns
//! the Hub's refusals into messages that say what to do.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo};

use super::layout::DEMO_MARKER;
use super::layout::{hf_cache_dir, hf_cache_repo_dir};

/// The Hugging Face Hub, used when neither `--endpoint` nor `HF_ENDPOINT` names another.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// How often progress is reported while a file arrives.
const PROGRESS_EVERY: Duration = Duration::from_millis(100);

/// Why a download failed, in words that say what to do.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error(
        "the Hub refused access to {repo} (HTTP {status}): it is a gated repo. Accept its licence at \
         https://huggingface.co/{repo} while logged in, then set HF_TOKEN to an access token of that \
         account (https://huggingface.co/settings/tokens) or log in with `huggingface-cli login`{token_note}"
    )]
    Gated {
        repo: String,
        status: u16,
        /// Whether a token was sent (then it is the account's access that is missing).
        token_note: &'static str,
    },

    #[error(
        "the Hub refused the access token (HTTP 401: {message}): HF_TOKEN or the token file holds an \
         invalid or expired token; make a new one at https://huggingface.co/settings/tokens"
    )]
    BadToken { message: String },

    #[error(
        "{repo} does not exist on {endpoint} (HTTP {status}): check the repo id, e.g. \
         black-forest-labs/FLUX.1-schnell (a private repo also needs HF_TOKEN)"
    )]
    RepoNotFound {
        repo: String,
        endpoint: String,
        status: u16,
    },

    #[error("{repo} has no file {file} on {endpoint} (HTTP {status})")]
    FileNotFound {
        repo: String,
        file: String,
        endpoint: String,
        status: u16,
    },

    #[error("{repo}: {reason}")]
    NotFlux { repo: String, reason: String },

    #[error(
        "cannot reach {endpoint}: {reason}. Check the network connection (or --endpoint / \
         HF_ENDPOINT); running the download again resumes where it stopped"
    )]
    Network { endpoint: String, reason: String },

    #[error(
        "the download of {file} stopped: {reason}. The part that arrived is kept in the cache; \
         run the download again to resume it"
    )]
    Interrupted { file: String, reason: String },

    #[error("the server at {endpoint} did not answer as the Hugging Face Hub does: {reason}")]
    Server { endpoint: String, reason: String },

    #[error("another download is writing {file} into the cache ({lock}): wait for it to finish")]
    Busy { file: String, lock: PathBuf },

    #[error(
        "no Hugging Face cache folder: HOME, HF_HOME and HF_HUB_CACHE are all unset; set HF_HOME"
    )]
    NoCache,

    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "stopped before {next} ({done} of {count} files are in the cache); run the download again \
         to fetch the rest"
    )]
    Cancelled {
        next: String,
        done: usize,
        count: usize,
    },
}

/// Where to download from and into, and the token to send.
#[derive(Clone)]
pub struct HubOptions {
    /// The Hub's address, e.g. `https://huggingface.co` (no trailing slash needed).
    pub endpoint: String,
    /// The Hugging Face cache folder (`.../huggingface/hub`).
    pub cache_dir: PathBuf,
    /// An access token, sent as `Authorization: Bearer`.
    pub token: Option<String>,
}

impl std::fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubOptions")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl HubOptions {
    /// From the environment: `endpoint` if given, else `HF_ENDPOINT`, else the Hub; the cache of
    /// [`hf_cache_dir`]; the token of [`token_from_env`].
    pub fn from_env(endpoint: Option<&str>) -> Result<Self, DownloadError> {
        let endpoint = match endpoint {
            Some(e) => e.to_string(),
            None => std::env::var("HF_ENDPOINT")
                .ok()
                .filter(|e| !e.trim().is_empty())
                .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string()),
        };
        Ok(HubOptions {
            endpoint,
            cache_dir: hf_cache_dir().ok_or(DownloadError::NoCache)?,
            token: token_from_env(),
        })
    }

    fn endpoint(&self) -> String {
        self.endpoint.trim().trim_end_matches('/').to_string()
    }
}

/// The access token: `HF_TOKEN`, else the file `huggingface-cli login` writes (`$HF_TOKEN_PATH`,
/// else `$HF_HOME/token`, else `~/.cache/huggingface/token`).
pub fn token_from_env() -> Option<String> {
    let non_empty = |s: String| {
        let t = s.trim().to_string();
        (!t.is_empty()).then_some(t)
    };
    if let Some(t) = std::env::var("HF_TOKEN").ok().and_then(non_empty) {
        return Some(t);
    }
    let file = if let Some(p) = std::env::var_os("HF_TOKEN_PATH") {
        PathBuf::from(p)
    } else if let Some(home) = std::env::var_os("HF_HOME") {
        PathBuf::from(home).join("token")
    } else {
        PathBuf::from(std::env::var_os("HOME")?)
            .join(".cache")
            .join("huggingface")
            .join("token")
    };
    std::fs::read_to_string(file).ok().and_then(non_empty)
}

/// How far a download is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DownloadProgress {
    /// The file arriving now (its path in the repo).
    pub file: String,
    /// Its position among the files to fetch (0-based) and their count.
    pub index: usize,
    pub count: usize,
    /// Bytes of this file in the cache (a resumed part counts) and its size.
    pub file_done: u64,
    pub file_size: u64,
    /// Bytes of all the files in the cache, and their total when the Hub listed sizes.
    pub done: u64,
    pub total: Option<u64>,
}

/// A finished download.
#[derive(Debug, Clone)]
pub struct Downloaded {
    pub repo: String,
    /// The commit the files belong to, and its snapshot folder in the cache.
    pub commit: String,
    pub snapshot: PathBuf,
    /// The files Parallax needs, all now in the snapshot.
    pub files: Vec<String>,
    /// How many of them were already there.
    pub already_cached: usize,
    /// Bytes that came over the network this time (resumed parts not counted twice).
    pub fetched_bytes: u64,
}

/// A file the Hub lists for a repo (`/api/models/{repo}/revision/main?blobs=true`).
#[derive(Debug, Clone, serde::Deserialize)]
struct Sibling {
    rfilename: String,
    #[serde(default)]
    size: Option<u64>,
}

#[derive(Debug, Clone, serde::Deserialize)]
struct RepoListing {
    sha: String,
    siblings: Vec<Sibling>,
}

/// The files of a repo Parallax reads, from the repo's file list: the diffusers transformer
/// (`transformer/`) if there is one, else one Black Forest Labs single file (`flux1-*.safetensors`,
/// with `ae.safetensors`); the autoencoder's `vae/`; `text_encoder/`, `text_encoder_2/`,
/// `tokenizer/`, `tokenizer_2/`; `model_index.json`. Weights in other formats (`.bin`, `.pt`,
/// ...) and reduced-precision duplicates (`x.fp16.safetensors` beside `x.safetensors`) are left.
pub fn pick_files(files: &[String]) -> Result<Vec<String>, String> {
    let has_dir = |d: &str| files.iter().any(|f| f.starts_with(&format!("{d}/")));
    let diffusers = has_dir("transformer");
    let single = {
        let mut singles: Vec<&String> = files
            .iter()
            .filter(|f| !f.contains('/') && f.starts_with("flux") && f.ends_with(".safetensors"))
            .collect();
        singles.sort();
        singles.first().map(|s| s.to_string())
    };
    if !diffusers && single.is_none() {
        return Err(
            "no FLUX.1 transformer in this repo (neither a transformer/ folder nor a \
             flux*.safetensors file)"
                .into(),
        );
    }
    let mut folders = vec!["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"];
    let mut roots: Vec<String> = vec!["model_index.json".into(), DEMO_MARKER.into()];
    if diffusers {
        folders.extend(["transformer", "vae"]);
    } else if let Some(single) = single {
        roots.push(single);
        if files.iter().any(|f| f == "ae.safetensors") {
            roots.push("ae.safetensors".into());
        } else {
            folders.push("vae");
        }
    }
    let wanted_ext = [".safetensors", ".json", ".txt", ".model"];
    let mut picked: Vec<String> = files
        .iter()
        .filter(|f| {
            let in_folder = f
                .split_once('/')
                .is_some_and(|(d, rest)| folders.contains(&d) && !rest.contains('/'));
            (in_folder && wanted_ext.iter().any(|e| f.ends_with(e))) || roots.contains(f)
        })
        .filter(|f| !is_variant_duplicate(f, files))
        .cloned()
        .collect();
    picked.sort();
    Ok(picked)
}

/// `dir/x.fp16.safetensors` (any `.variant.` infix) when `dir/x.safetensors` is listed too.
fn is_variant_duplicate(file: &str, files: &[String]) -> bool {
    let Some(stem) = file.strip_suffix(".safetensors") else {
        return false;
    };
    let Some((base, variant)) = stem.rsplit_once('.') else {
        return false;
    };
    !variant.contains('/') && files.iter().any(|f| *f == format!("{base}.safetensors"))
}

/// Download the files of `repo` that Parallax needs into the cache of `opts`, reporting progress
/// to `progress` (every [`PROGRESS_EVERY`] and at the end of each file). `cancel` is looked at
/// between files: the client cannot stop a file part-way, so a file that is arriving finishes.
/// Files already in the snapshot are not fetched again; a file cut short before resumes.
pub fn download(
    repo: &str,
    opts: &HubOptions,
    progress: &mut dyn FnMut(&DownloadProgress),
    cancel: &AtomicBool,
) -> Result<Downloaded, DownloadError> {
    let endpoint = opts.endpoint();
    let api = ApiBuilder::from_cache(Cache::new(opts.cache_dir.clone()))
        .with_endpoint(endpoint.clone())
        .with_token(opts.token.clone())
        .with_progress(false)
        .build()
        .map_err(|e| classify(e, repo, None, opts))?;
    let api = api.repo(Repo::model(repo.to_string()));
    let listing = list(&api, repo, opts)?;
    let names: Vec<String> = listing
        .siblings
        .iter()
        .map(|s| s.rfilename.clone())
        .collect();
    let files = pick_files(&names).map_err(|reason| DownloadError::NotFlux {
        repo: repo.to_string(),
        reason,
    })?;
    let size_of = |f: &str| {
        listing
            .siblings
            .iter()
            .find(|s| s.rfilename == f)
            .and_then(|s| s.size)
    };
    let total = files.iter().map(|f| size_of(f)).sum::<Option<u64>>();
    let repo_dir = hf_cache_repo_dir(&opts.cache_dir, repo);
    let snapshot = repo_dir.join("snapshots").join(&listing.sha);
    tracing::info!(
        "{repo} at {}: {} of {} files to fetch into {}",
        listing.sha,
        files.len(),
        names.len(),
        snapshot.display()
    );
    let mut state = DownloadProgress {
        count: files.len(),
        total,
        ..Default::default()
    };
    let mut already_cached = 0;
    let mut fetched_bytes = 0;
    for (index, file) in files.iter().enumerate() {
        state.index = index;
        state.file = file.clone();
        let cached = snapshot.join(file);
        if cached.is_file() {
            let len = std::fs::metadata(&cached).map(|m| m.len()).unwrap_or(0);
            already_cached += 1;
            state.done += len;
            state.file_done = len;
            state.file_size = len;
            progress(&state);
            continue;
        }
        if cancel.load(Ordering::Relaxed) {
            return Err(DownloadError::Cancelled {
                next: file.clone(),
                done: index,
                count: files.len(),
            });
        }
        let mut reporter = Reporter {
            before: state.done,
            state: &mut state,
            resumed: None,
            report: &mut *progress,
            last: Instant::now(),
        };
        let (path, fetched) =
            fetch(&api, file, &mut reporter).map_err(|e| classify(e, repo, Some(file), opts))?;
        check_size(&path, file, state.file_size, opts)?;
        fetched_bytes += fetched;
    }
    let refs = repo_dir.join("refs");
    std::fs::create_dir_all(&refs)
        .and_then(|_| std::fs::write(refs.join("main"), &listing.sha))
        .map_err(|source| DownloadError::Write {
            path: refs.join("main"),
            source,
        })?;
    Ok(Downloaded {
        repo: repo.to_string(),
        commit: listing.sha,
        snapshot,
        files,
        already_cached,
        fetched_bytes,
    })
}

/// The repo's commit and files, with sizes where the Hub gives them.
fn list(api: &ApiRepo, repo: &str, opts: &HubOptions) -> Result<RepoListing, DownloadError> {
    let response = api
        .info_request()
        .query("blobs", "true")
        .call()
        .map_err(|e| classify(ApiError::RequestError(Box::new(e)), repo, None, opts))?;
    response
        .into_json::<RepoListing>()
        .map_err(|e| DownloadError::Server {
            endpoint: opts.endpoint(),
            reason: format!("its file list for {repo} is not the Hub's JSON ({e})"),
        })
}

/// Fetch one file through the client: its path in the snapshot and the bytes that came over the
/// network.
fn fetch(
    api: &ApiRepo,
    file: &str,
    reporter: &mut Reporter<'_>,
) -> Result<(PathBuf, u64), ApiError> {
    let path = api.download_with_progress(file, &mut *reporter)?;
    let size = reporter.state.file_size;
    reporter.state.file_done = size;
    reporter.state.done = reporter.before + size;
    (reporter.report)(reporter.state);
    Ok((path, size.saturating_sub(reporter.resumed.unwrap_or(0))))
}

/// The client does not compare what arrived with the size the server announced (a server that
/// ignored the resume's `Range` would leave a longer file): a file of another size is removed,
/// blob and link, so that the next run fetches it again.
fn check_size(path: &Path, file: &str, size: u64, opts: &HubOptions) -> Result<(), DownloadError> {
    let blob = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let len = std::fs::metadata(&blob).map(|m| m.len()).unwrap_or(0);
    if len == size {
        return Ok(());
    }
    for p in [&blob, &path.to_path_buf()] {
        if let Err(e) = std::fs::remove_file(p) {
            tracing::warn!("cannot remove {}: {e}", p.display());
        }
    }
    Err(DownloadError::Server {
        endpoint: opts.endpoint(),
        reason: format!(
            "{file} arrived with {len} bytes where {size} were announced; it was removed, run the \
             download again"
        ),
    })
}

/// Keeps a [`DownloadProgress`] up to date from the client's progress calls.
struct Reporter<'a> {
    state: &'a mut DownloadProgress,
    /// Bytes of the files before this one.
    before: u64,
    /// Bytes already in the part file: the client reports them first, as one update.
    resumed: Option<u64>,
    report: &'a mut dyn FnMut(&DownloadProgress),
    last: Instant,
}

impl hf_hub::api::Progress for &mut Reporter<'_> {
    fn init(&mut self, size: usize, _filename: &str) {
        self.state.file_size = size as u64;
        self.state.file_done = 0;
        self.resumed = None;
    }

    fn update(&mut self, n: usize) {
        self.resumed.get_or_insert(n as u64);
        self.state.file_done += n as u64;
        self.state.done = self.before + self.state.file_done;
        if self.last.elapsed() >= PROGRESS_EVERY {
            self.last = Instant::now();
            (self.report)(self.state);
        }
    }

    fn finish(&mut self) {}
}

/// Turn the client's error into one that says what to do.
fn classify(e: ApiError, repo: &str, file: Option<&str>, opts: &HubOptions) -> DownloadError {
    let endpoint = opts.endpoint();
    let server = |reason: String| DownloadError::Server {
        endpoint: endpoint.clone(),
        reason,
    };
    match e {
        ApiError::RequestError(err) => match *err {
            ureq::Error::Status(status, response) => {
                let code = response.header("x-error-code").unwrap_or("").to_string();
                let message = response.header("x-error-message").unwrap_or("").to_string();
                refusal(status, &code, &message, repo, file, opts)
            }
            ureq::Error::Transport(t) => DownloadError::Network {
                endpoint,
                reason: t.to_string(),
            },
        },
        ApiError::IoError(err) => DownloadError::Interrupted {
            file: file.unwrap_or(repo).to_string(),
            reason: err.to_string(),
        },
        ApiError::TooManyRetries(inner) => classify(*inner, repo, file, opts),
        ApiError::LockAcquisition(lock) => DownloadError::Busy {
            file: file.unwrap_or(repo).to_string(),
            lock,
        },
        ApiError::InvalidResume => server(format!(
            "the part of {} already in the cache is longer than the file; delete the \
             blobs/*.part files under {} and download again",
            file.unwrap_or(repo),
            opts.cache_dir.display()
        )),
        other => server(other.to_string()),
    }
}

/// A refusal by HTTP status and the Hub's `X-Error-Code` / `X-Error-Message` headers.
fn refusal(
    status: u16,
    code: &str,
    message: &str,
    repo: &str,
    file: Option<&str>,
    opts: &HubOptions,
) -> DownloadError {
    let endpoint = opts.endpoint();
    let repo = repo.to_string();
    let not_found = |repo: String| match file {
        Some(f) if code != "RepoNotFound" => DownloadError::FileNotFound {
            repo,
            file: f.to_string(),
            endpoint: endpoint.clone(),
            status,
        },
        _ => DownloadError::RepoNotFound {
            repo,
            endpoint: endpoint.clone(),
            status,
        },
    };
    match (status, code) {
        (_, "RepoNotFound") | (_, "EntryNotFound") | (_, "RevisionNotFound") | (404, _) => {
            not_found(repo)
        }
        (401, _) if message.contains("Invalid credentials") => DownloadError::BadToken {
            message: message.to_string(),
        },
        (_, "GatedRepo") | (401, _) | (403, _) => DownloadError::Gated {
            repo,
            status,
            token_note: if opts.token.is_some() {
                " (a token was sent: its account has not been granted access yet)"
            } else {
                " (no token was found)"
            },
        },
        _ => DownloadError::Server {
            endpoint,
            reason: format!("HTTP {status} {code} {message}").trim().to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// FLUX.1-dev's file list as the Hub gives it (both layouts, extras).
    const DEV: &[&str] = &[
        ".gitattributes",
        "LICENSE.md",
        "README.md",
        "ae.safetensors",
        "dev_grid.jpg",
        "flux1-dev.safetensors",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "text_encoder_2/config.json",
        "text_encoder_2/model-00001-of-00002.safetensors",
        "text_encoder_2/model-00002-of-00002.safetensors",
        "text_encoder_2/model.safetensors.index.json",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
        "tokenizer/vocab.json",
        "tokenizer_2/special_tokens_map.json",
        "tokenizer_2/spiece.model",
        "tokenizer_2/tokenizer.json",
        "tokenizer_2/tokenizer_config.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
        "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
        "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.json",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ];

    #[test]
    fn flux_dev_takes_the_diffusers_folders_and_not_the_single_files() {
        let picked = pick_files(&names(DEV)).expect("flux");
        for f in &picked {
            assert!(
                !matches!(
                    f.as_str(),
                    "flux1-dev.safetensors"
                        | "ae.safetensors"
                        | "dev_grid.jpg"
                        | "README.md"
                        | ".gitattributes"
                ) && !f.starts_with("scheduler/"),
                "{f} is not needed"
            );
        }
        let want: Vec<&str> = DEV
            .iter()
            .copied()
            .filter(|f| {
                ["transformer/", "vae/", "text_encoder", "tokenizer"]
                    .iter()
                    .any(|p| f.starts_with(p))
                    || *f == "model_index.json"
            })
            .collect();
        assert_eq!(picked, want);
    }

    #[test]
    fn a_single_file_repo_takes_one_transformer_and_its_autoencoder() {
        let files = names(&[
            "flux1-schnell.safetensors",
            "flux1-schnell-fp8.safetensors",
            "ae.safetensors",
            "text_encoder/model.safetensors",
            "text_encoder/model.fp16.safetensors",
            "text_encoder/pytorch_model.bin",
            "tokenizer_2/tokenizer.json",
            "README.md",
        ]);
        let picked = pick_files(&files).expect("flux");
        assert_eq!(
            picked,
            [
                "ae.safetensors",
                "flux1-schnell-fp8.safetensors",
                "text_encoder/model.safetensors",
                "tokenizer_2/tokenizer.json"
            ]
        );
        let err = pick_files(&names(&["README.md", "model.safetensors"])).unwrap_err();
        assert!(err.contains("no FLUX.1 transformer"), "{err}");
    }

    fn opts(token: Option<&str>) -> HubOptions {
        HubOptions {
            endpoint: "http://127.0.0.1:1/".into(),
            cache_dir: PathBuf::from("/nowhere"),
            token: token.map(str::to_string),
        }
    }

    #[test]
    fn refusals_say_what_to_do() {
        let repo = "black-forest-labs/FLUX.1-dev";
        let gated = refusal(401, "GatedRepo", "", repo, Some("x"), &opts(None)).to_string();
        assert!(gated.contains("gated"), "{gated}");
        assert!(
            gated.contains("https://huggingface.co/black-forest-labs/FLUX.1-dev"),
            "{gated}"
        );
        assert!(gated.contains("HF_TOKEN"), "{gated}");
        let forbidden = refusal(403, "", "", repo, Some("x"), &opts(Some("t"))).to_string();
        assert!(forbidden.contains("a token was sent"), "{forbidden}");
        let bad = refusal(
            401,
            "",
            "Invalid credentials in Authorization header",
            repo,
            None,
            &opts(Some("t")),
        );
        assert!(matches!(bad, DownloadError::BadToken { .. }), "{bad}");
        let missing = refusal(404, "", "", "me/nothing", None, &opts(None)).to_string();
        assert!(
            missing.contains("me/nothing does not exist on http://127.0.0.1:1"),
            "{missing}"
        );
        // The Hub answers 401 RepoNotFound for a repo that is not there when no token is sent.
        let hidden = refusal(
            401,
            "RepoNotFound",
            "",
            "me/nothing",
            Some("a"),
            &opts(None),
        );
        assert!(
            matches!(hidden, DownloadError::RepoNotFound { .. }),
            "{hidden}"
        );
        let file = refusal(
            404,
            "EntryNotFound",
            "",
            repo,
            Some("vae/x.json"),
            &opts(None),
        );
        assert!(file.to_string().contains("no file vae/x.json"), "{file}");
    }
}
