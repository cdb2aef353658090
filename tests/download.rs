//! `parallax download` against a local server speaking the Hugging Face Hub's HTTP API
//! (`tests/common/hub_server.rs`): the demo model exported in the diffusers layout is served as a
//! repo beside files Parallax does not need; a file cut part-way resumes with a `Range` request;
//! the cache then holds the Hub's layout, `--model <repo>` finds it and draws the demo's image;
//! a gated repo, a missing repo and an unreachable server each give a message saying what to do.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::hub_server::{HubRepo, HubServer};
use common::{s, text};
use parallax::model::export::{write_demo_model, DemoSource, ExportLayout};
use parallax::pipeline::image::read_png;

const REPO: &str = "parallax-test/FLUX.1-demo";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// `parallax args` with the Hugging Face cache at `cache` and no token or endpoint from the
/// environment of whoever runs the tests (`env` adds to it).
fn parallax(cache: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_parallax"));
    c.args(args)
        .env("HF_HUB_CACHE", cache)
        .env("HF_TOKEN_PATH", cache.join("no-token-here"))
        .env_remove("HF_TOKEN")
        .env_remove("HF_ENDPOINT")
        .env_remove("RUST_LOG");
    // The client (ureq 2) sends every request through a proxy named here, 127.0.0.1 too.
    for proxy in ["ALL_PROXY", "HTTPS_PROXY", "HTTP_PROXY"] {
        c.env_remove(proxy).env_remove(proxy.to_ascii_lowercase());
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run parallax")
}

/// The demo model in the diffusers layout, plus what a real FLUX.1 repo also holds and Parallax
/// must not fetch: the single-file transformer and autoencoder, a README, a scheduler config.
fn demo_repo(dir: &Path) -> HubRepo {
    let diffusers = dir.join("diffusers");
    write_demo_model(&diffusers, ExportLayout::Diffusers, DemoSource::Trained).expect("export");
    let mut repo = HubRepo::from_dir(&diffusers, COMMIT);
    let bfl = dir.join("bfl");
    write_demo_model(&bfl, ExportLayout::Bfl, DemoSource::Trained).expect("export bfl");
    for f in ["flux1-dev.safetensors", "ae.safetensors"] {
        repo.files
            .insert(f.into(), std::fs::read(bfl.join(f)).expect("read"));
    }
    repo.files.insert("README.md".into(), b"# demo".to_vec());
    repo.files
        .insert("scheduler/scheduler_config.json".into(), b"{}".to_vec());
    repo
}

/// The file of `repo` fetched in the largest piece (a transformer shard).
fn largest(repo: &HubRepo) -> String {
    repo.files
        .iter()
        .filter(|(f, _)| f.starts_with("transformer/") && f.ends_with(".safetensors"))
        .max_by_key(|(_, b)| b.len())
        .map(|(f, _)| f.clone())
        .expect("a transformer shard")
}

fn generate(cache: &Path, model: &str, out: &Path) {
    let o = parallax(
        cache,
        &[
            "generate",
            "--model",
            model,
            "--prompt",
            "a red circle",
            "--width",
            "32",
            "--height",
            "32",
            "--steps",
            "2",
            "--seed",
            "7",
            "--quiet",
            "--out",
            s(out),
        ],
        &[],
    );
    assert!(o.status.success(), "generate --model {model}: {}", text(&o));
}

#[test]
fn a_cut_download_resumes_and_the_cached_model_draws_the_demo_image() {
    let dir = tempfile::tempdir().expect("tmp");
    let repo = demo_repo(dir.path());
    let source = repo.files.clone();
    let cut = largest(&repo);
    let cut_len = source[&cut].len();
    let server = HubServer::start(vec![(REPO, repo)], &[format!("{REPO}/{cut}")]);
    let cache = dir.path().join("hub");
    let download = [
        "download",
        REPO,
        "--endpoint",
        server.endpoint.as_str(),
        "--quiet",
    ];

    // First run: the connection drops half-way through the shard.
    let o = parallax(&cache, &download, &[]);
    assert!(!o.status.success(), "the cut run must fail: {}", text(&o));
    let msg = text(&o);
    assert!(
        msg.contains(&format!("the download of {cut} stopped")),
        "{msg}"
    );
    assert!(msg.contains("run the download again to resume"), "{msg}");
    assert!(!msg.contains("panicked"), "{msg}");
    let blobs = cache
        .join("models--parallax-test--FLUX.1-demo")
        .join("blobs");
    let parts: Vec<u64> = std::fs::read_dir(&blobs)
        .expect("blobs")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "part"))
        .map(|e| e.metadata().expect("meta").len())
        .collect();
    assert_eq!(
        parts,
        [(cut_len / 2) as u64],
        "half the shard kept as a part file"
    );

    // Second run: resumes the shard from where it stopped and fetches the rest.
    let before = server.seen().len();
    let o = parallax(&cache, &download, &[]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        out.contains(&format!("use it with: parallax generate --model {REPO}")),
        "{out}"
    );
    let resumed: Vec<_> = server.seen()[before..]
        .iter()
        .filter(|r| r.path.ends_with(&cut) && r.range.as_deref() != Some("bytes=0-0"))
        .map(|r| r.range.clone())
        .collect();
    assert_eq!(
        resumed,
        [Some(format!("bytes={}-", cut_len / 2))],
        "the shard's body was asked for from the part's end"
    );

    // What was fetched: Parallax's files only, byte for byte, in the Hub cache layout.
    let fetched: std::collections::BTreeSet<String> = server
        .seen()
        .iter()
        .filter_map(|r| {
            r.path
                .split_once("/resolve/main/")
                .map(|(_, f)| f.to_string())
        })
        .collect();
    for f in [
        "flux1-dev.safetensors",
        "ae.safetensors",
        "README.md",
        "scheduler/scheduler_config.json",
    ] {
        assert!(!fetched.contains(f), "{f} is not needed but was fetched");
    }
    let repo_dir = cache.join("models--parallax-test--FLUX.1-demo");
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs").join("main")).expect("refs/main"),
        COMMIT
    );
    let snapshot = repo_dir.join("snapshots").join(COMMIT);
    for f in &fetched {
        let local = snapshot.join(f);
        assert!(
            std::fs::symlink_metadata(&local)
                .expect("in snapshot")
                .file_type()
                .is_symlink(),
            "{f}: a link into blobs/"
        );
        assert_eq!(
            std::fs::read(&local).expect("read"),
            source[f],
            "{f} differs from the source"
        );
    }
    assert!(fetched.contains(&cut) && fetched.contains("model_index.json"));
    assert!(fetched.iter().any(|f| f.starts_with("tokenizer_2/")));
    assert!(
        std::fs::read_dir(&blobs)
            .expect("blobs")
            .flatten()
            .all(|e| e.path().extension().is_none_or(|x| x != "part")),
        "no part file left"
    );

    // A third run finds everything in the cache and fetches nothing.
    let before = server.seen().len();
    let o = parallax(&cache, &download, &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        server.seen()[before..]
            .iter()
            .all(|r| r.path.starts_with("/api/")),
        "{:?}",
        &server.seen()[before..]
    );

    // --model <repo> finds the snapshot through refs/main and draws what the built-in demo draws.
    let o = parallax(&cache, &["info", "--model", REPO], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let info = text(&o);
    assert!(info.contains("found in the Hugging Face cache"), "{info}");
    assert!(info.contains("diffusers layout"), "{info}");
    assert!(info.contains("demo model"), "{info}");
    let (a, b) = (
        dir.path().join("cached.png"),
        dir.path().join("builtin.png"),
    );
    generate(&cache, REPO, &a);
    generate(&cache, "demo", &b);
    let (got, _) = read_png(&a).expect("read cached");
    let (want, _) = read_png(&b).expect("read builtin");
    assert_eq!(
        got, want,
        "the downloaded model draws the built-in demo's image"
    );
}

#[test]
fn refusals_and_failures_say_what_to_do() {
    let dir = tempfile::tempdir().expect("tmp");
    let cache = dir.path().join("hub");
    let gated = HubRepo {
        files: [
            ("model_index.json", "{}"),
            ("transformer/config.json", "{}"),
        ]
        .into_iter()
        .map(|(f, b)| (f.to_string(), b.as_bytes().to_vec()))
        .collect(),
        commit: COMMIT.into(),
        gated: true,
    };
    let server = HubServer::start(vec![("black-forest-labs/FLUX.1-dev", gated)], &[]);
    let endpoint = server.endpoint.as_str();

    // A gated repo without a token: 401; the message names the licence page and HF_TOKEN.
    let o = parallax(&cache, &["download", "dev", "--endpoint", endpoint], &[]);
    assert!(!o.status.success());
    let msg = text(&o);
    for needle in [
        "gated repo",
        "https://huggingface.co/black-forest-labs/FLUX.1-dev",
        "HF_TOKEN",
        "huggingface-cli login",
        "no token was found",
    ] {
        assert!(msg.contains(needle), "`{needle}` missing from: {msg}");
    }
    // With HF_TOKEN the token is sent, and the message says the account lacks access.
    let o = parallax(
        &cache,
        &["download", "dev", "--endpoint", endpoint],
        &[("HF_TOKEN", "hf_test_token")],
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("a token was sent"), "{}", text(&o));
    assert!(server
        .seen()
        .iter()
        .any(|r| r.authorization.as_deref() == Some("Bearer hf_test_token")));

    // A repo the Hub does not have: 404, named.
    let o = parallax(
        &cache,
        &["download", "nobody/nothing", "--endpoint", endpoint],
        &[],
    );
    assert!(!o.status.success());
    let msg = text(&o);
    assert!(
        msg.contains(&format!("nobody/nothing does not exist on {endpoint}")),
        "{msg}"
    );

    // Nothing listening: the network failure is said, and that running again resumes.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let o = parallax(&cache, &["download", "schnell", "--endpoint", &closed], &[]);
    assert!(!o.status.success());
    let msg = text(&o);
    assert!(msg.contains(&format!("cannot reach {closed}")), "{msg}");
    assert!(msg.contains("resumes"), "{msg}");
    // HF_ENDPOINT is the default endpoint.
    let o = parallax(
        &cache,
        &["download", "nobody/nothing"],
        &[("HF_ENDPOINT", endpoint)],
    );
    assert!(
        text(&o).contains(&format!("does not exist on {endpoint}")),
        "{}",
        text(&o)
    );
    assert!(!text(&o).contains("panicked"), "{}", text(&o));
}

/// The library call the CLI and the studio share: progress reaches the listed total, a second
/// call finds everything cached, and a cancelled call stops before its first file.
#[test]
fn progress_counts_to_the_total_and_cancel_stops_between_files() {
    use parallax::model::hub::{self, DownloadError, HubOptions};
    use std::sync::atomic::AtomicBool;
    let dir = tempfile::tempdir().expect("tmp");
    let repo = demo_repo(dir.path());
    let server = HubServer::start(vec![(REPO, repo)], &[]);
    let opts = HubOptions {
        endpoint: format!("{}/", server.endpoint),
        cache_dir: dir.path().join("hub"),
        token: None,
    };
    match hub::download(REPO, &opts, &mut |_| {}, &AtomicBool::new(true)) {
        Err(DownloadError::Cancelled { done: 0, count, .. }) => assert!(count > 5, "{count}"),
        other => panic!("expected a stop before the first file, got {other:?}"),
    }
    let mut seen = Vec::new();
    let got = hub::download(
        REPO,
        &opts,
        &mut |p| seen.push(p.clone()),
        &AtomicBool::new(false),
    )
    .expect("download");
    let last = seen.last().expect("progress");
    let total = last.total.expect("the listing gives sizes");
    assert_eq!(last.done, total);
    assert_eq!(got.fetched_bytes, total, "nothing was there before");
    assert!(
        seen.windows(2).all(|w| w[0].done <= w[1].done),
        "progress only grows"
    );
    assert_eq!(got.files.len(), last.count);
    let again = hub::download(REPO, &opts, &mut |_| {}, &AtomicBool::new(false)).expect("again");
    assert_eq!(
        (again.already_cached, again.fetched_bytes),
        (got.files.len(), 0)
    );
}

/// The studio's "Download…" button: the download runs on its own thread while the window keeps
/// drawing, and when it is done the downloaded model is the one selected.
#[cfg(feature = "studio")]
#[test]
fn the_studio_downloads_on_a_thread_and_selects_the_model() {
    use egui_kittest::kittest::Queryable;
    use parallax::app::{StudioApp, StudioOptions};
    use parallax::model::hub::HubOptions;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().expect("tmp");
    let repo = demo_repo(dir.path());
    let server = HubServer::start(vec![(REPO, repo)], &[]);
    let opts = StudioOptions {
        gallery_dir: Some(dir.path().join("gallery")),
        fresh_settings: true,
        skip_hf_cache: true,
        ..StudioOptions::default()
    };
    let mut h = egui_kittest::Harness::builder()
        .with_size([1100.0, 760.0])
        .build_eframe(move |cc| StudioApp::new(cc, opts).expect("studio starts"));
    let cache = dir.path().join("hub");
    h.state_mut().download.options = Some(HubOptions {
        endpoint: server.endpoint.clone(),
        cache_dir: cache.clone(),
        token: None,
    });
    h.get_by_label("Download…").click();
    h.run_steps(2);
    h.state_mut().download.repo = REPO.into();
    h.get_by_label("Start").click();
    h.step();
    assert!(
        h.state().download.busy(),
        "the download runs on its own thread"
    );
    let t0 = Instant::now();
    while h.state().download.busy() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the download hangs"
        );
        h.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    h.step();
    let app = h.state();
    assert_eq!(app.settings.model, REPO, "the downloaded model is selected");
    assert!(
        app.view.messages
            .iter()
            .any(|m| m.text.starts_with(&format!("downloaded {REPO}")) && !m.error),
        "{:?}",
        app.view.messages.iter().map(|m| &m.text).collect::<Vec<_>>()
    );
    assert!(cache
        .join("models--parallax-test--FLUX.1-demo/snapshots")
        .join(COMMIT)
        .join("model_index.json")
        .is_file());
}
