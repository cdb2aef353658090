//! A small server on 127.0.0.1 that answers the Hugging Face Hub routes `hf-hub`'s blocking client
//! uses, for the download tests:
//!
//! - `GET /api/models/{repo}/revision/{rev}` (`?blobs=true`): `{"sha", "siblings": [{"rfilename",
//!   "size"}]}`;
//! - `GET /{repo}/resolve/{rev}/{file}` with `Range: bytes=A-` or `bytes=A-B`: 206 with `ETag`,
//!   `X-Repo-Commit`, `Content-Range: bytes A-B/SIZE` and `Content-Length` (the client asks for
//!   `bytes=0-0` first to learn the commit, the etag and the size, then `bytes=K-` for the body,
//!   K being what its part file already holds).
//!
//! A repo can be gated (its files answer 401 `X-Error-Code: GatedRepo`, as the Hub does without a
//! token); a repo it does not hold answers 404 `RepoNotFound`. A file can be cut: the first time
//! its body is asked for, the server sends half of it under the full `Content-Length` and closes
//! the connection. Every request is logged (path, `Range`, `Authorization`).

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// One repo the server holds.
pub struct HubRepo {
    pub files: BTreeMap<String, Vec<u8>>,
    pub commit: String,
    pub gated: bool,
}

impl HubRepo {
    /// Every file under `dir`, by its path relative to `dir` (`/`-separated).
    pub fn from_dir(dir: &Path, commit: &str) -> HubRepo {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
            for entry in std::fs::read_dir(dir).expect("read source dir") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    walk(root, &path, out);
                } else {
                    let rel = path.strip_prefix(root).expect("under root");
                    let name = rel
                        .components()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .collect::<Vec<_>>()
                        .join("/");
                    out.insert(name, std::fs::read(&path).expect("read source file"));
                }
            }
        }
        let mut files = BTreeMap::new();
        walk(dir, dir, &mut files);
        HubRepo {
            files,
            commit: commit.to_string(),
            gated: false,
        }
    }
}

/// A request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
}

struct State {
    repos: BTreeMap<String, HubRepo>,
    /// `repo/file`s to cut the first time their body is asked for.
    cut: Mutex<HashSet<String>>,
    log: Mutex<Vec<Seen>>,
}

/// The running server (it stops with the test process).
pub struct HubServer {
    pub endpoint: String,
    state: Arc<State>,
}

impl HubServer {
    /// Serve `repos` (by repo id); cut each of `cut` (`repo/file`) once.
    pub fn start(repos: Vec<(&str, HubRepo)>, cut: &[String]) -> HubServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(State {
            repos: repos
                .into_iter()
                .map(|(id, r)| (id.to_string(), r))
                .collect(),
            cut: Mutex::new(cut.iter().cloned().collect()),
            log: Mutex::new(Vec::new()),
        });
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let state = shared.clone();
                std::thread::spawn(move || {
                    // A client that hangs up early is not the server's failure.
                    let _ = answer(&state, stream);
                });
            }
        });
        HubServer { endpoint, state }
    }

    /// The requests so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.log.lock().expect("log").clone()
    }
}

/// A file's etag: a fingerprint of its bytes (two FNV-1a variants and the length, in hex; the
/// client only needs it stable and distinct per content, and names the blob after it).
fn etag(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut g: u64 = 0x8422_2325_cbf2_9ce4;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        g = (g ^ b as u64)
            .wrapping_mul(0x0000_0100_0000_01b3)
            .rotate_left(7);
    }
    format!("{h:016x}{g:016x}{:016x}", bytes.len())
}

fn answer(state: &State, stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let (mut range, mut authorization) = (None, None);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "range" => range = Some(v.trim().to_string()),
                "authorization" => authorization = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    let path = target.split('?').next().unwrap_or("").to_string();
    state.log.lock().expect("log").push(Seen {
        path: path.clone(),
        range: range.clone(),
        authorization,
    });
    let mut out = stream;
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let Some((repo, _rev)) = rest.split_once("/revision/") else {
            return reply(&mut out, 400, &[], b"bad request");
        };
        let Some(r) = state.repos.get(repo) else {
            return not_found(&mut out);
        };
        let siblings: Vec<serde_json::Value> = r
            .files
            .iter()
            .map(|(name, bytes)| serde_json::json!({ "rfilename": name, "size": bytes.len() }))
            .collect();
        let body = serde_json::json!({ "id": repo, "sha": r.commit, "siblings": siblings });
        return reply(
            &mut out,
            200,
            &[("Content-Type", "application/json".into())],
            body.to_string().as_bytes(),
        );
    }
    // /{owner}/{name}/resolve/{rev}/{file}
    let Some((repo, rest)) = path.trim_start_matches('/').split_once("/resolve/") else {
        return reply(&mut out, 400, &[], b"bad request");
    };
    let file = rest.split_once('/').map(|(_, f)| f).unwrap_or("");
    let Some(r) = state.repos.get(repo) else {
        return not_found(&mut out);
    };
    if r.gated {
        return reply(
            &mut out,
            401,
            &[
                ("X-Error-Code", "GatedRepo".into()),
                (
                    "X-Error-Message",
                    format!("Access to model {repo} is restricted. You must have access to it and be authenticated to access it. Please log in."),
                ),
            ],
            b"gated",
        );
    }
    let Some(bytes) = r.files.get(file) else {
        return reply(
            &mut out,
            404,
            &[("X-Error-Code", "EntryNotFound".into())],
            b"Entry not found",
        );
    };
    let size = bytes.len();
    let (start, end) = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .map(|(a, b)| {
            let a: usize = a.parse().unwrap_or(0);
            let b: usize = b.parse().unwrap_or(size.saturating_sub(1));
            (a, b.min(size.saturating_sub(1)))
        })
        .unwrap_or((0, size.saturating_sub(1)));
    let headers = vec![
        ("ETag", format!("\"{}\"", etag(bytes))),
        ("X-Repo-Commit", r.commit.clone()),
        ("Content-Range", format!("bytes {start}-{end}/{size}")),
    ];
    let body = &bytes[start.min(size)..(end + 1).min(size)];
    let cut = range.is_some_and(|r| r != "bytes=0-0")
        && state
            .cut
            .lock()
            .expect("cut")
            .remove(&format!("{repo}/{file}"));
    if cut {
        // Promise the whole body, send half, hang up.
        write_head(&mut out, 206, &headers, body.len())?;
        out.write_all(&body[..body.len() / 2])?;
        out.flush()?;
        return out.shutdown(std::net::Shutdown::Both);
    }
    reply(&mut out, 206, &headers, body)
}

fn not_found(out: &mut TcpStream) -> std::io::Result<()> {
    reply(
        out,
        404,
        &[("X-Error-Code", "RepoNotFound".into())],
        b"Repository not found",
    )
}

fn write_head(
    out: &mut TcpStream,
    status: u16,
    headers: &[(&str, String)],
    len: usize,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Bad Request",
    };
    let mut head =
        format!("HTTP/1.1 {status} {reason}\r\nContent-Length: {len}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())
}

fn reply(
    out: &mut TcpStream,
    status: u16,
    headers: &[(&str, String)],
    body: &[u8],
) -> std::io::Result<()> {
    write_head(out, status, headers, body.len())?;
    out.write_all(body)?;
    out.flush()
}
