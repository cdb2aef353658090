//! `parallax download schnell|dev|REPO`: fetch a model's files from the Hugging Face Hub into the
//! Hugging Face cache (resumable), with a progress bar, then check that `--model` finds it.

use std::sync::atomic::AtomicBool;

use anyhow::Context;
use clap::Args;

use crate::model::hub::{self, DownloadProgress, HubOptions};
use crate::model::layout;

#[derive(Debug, Clone, Args)]
pub struct DownloadArgs {
    /// `schnell`, `dev` (black-forest-labs/FLUX.1-schnell / -dev) or a repo id (`owner/name`).
    pub model: String,
    /// The Hub's address (default: $HF_ENDPOINT, else https://huggingface.co).
    #[arg(long)]
    pub endpoint: Option<String>,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn run(a: DownloadArgs) -> anyhow::Result<()> {
    let repo = layout::repo_id_for(&a.model).with_context(|| {
        format!(
            "`{}` is not a model on the Hub: give `schnell`, `dev` or a repo id such as \
             black-forest-labs/FLUX.1-schnell",
            a.model
        )
    })?;
    let opts = HubOptions::from_env(a.endpoint.as_deref())?;
    if !a.quiet {
        eprintln!(
            "downloading {repo} from {} into {}",
            opts.endpoint,
            opts.cache_dir.display()
        );
    }
    let bar = if a.quiet {
        indicatif::ProgressBar::hidden()
    } else {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "[{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} (eta {eta}) {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b
    };
    let mut show = |p: &DownloadProgress| {
        // Without the Hub's sizes the bar follows the file arriving.
        let (len, pos) = match p.total {
            Some(total) => (total, p.done),
            None => (p.file_size, p.file_done),
        };
        bar.set_length(len);
        bar.set_position(pos);
        bar.set_message(format!("file {}/{}: {}", p.index + 1, p.count, p.file));
    };
    let result = hub::download(&repo, &opts, &mut show, &AtomicBool::new(false));
    bar.finish_and_clear();
    let got = result?;
    println!(
        "{repo}: {} files in {} ({} already there, {} fetched)",
        got.files.len(),
        got.snapshot.display(),
        got.already_cached,
        indicatif::HumanBytes(got.fetched_bytes)
    );
    // `--model` takes what was typed: `dev`, `schnell` and repo ids are looked up in the cache.
    layout::resolve(&a.model, None).with_context(|| {
        format!(
            "the files are in {}, but --model {} does not load from the cache",
            got.snapshot.display(),
            a.model
        )
    })?;
    println!("use it with: parallax generate --model {}", a.model);
    Ok(())
}
