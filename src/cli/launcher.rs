//! Where a `parallax worker` process stands in its job when the launcher a cluster already has
//! started it: `--rank`, `--world` and `--init` when given, else torchrun's environment
//! (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), else Slurm's
//! (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, the first host of `SLURM_STEP_NODELIST` or
//! `SLURM_JOB_NODELIST`, and `MASTER_PORT` or [`SLURM_DEFAULT_PORT`]).
//!
//! Under torchrun its agent may hold a store of its own on `MASTER_PORT`
//! (`TORCHELASTIC_USE_AGENT_STORE=True`): Parallax's store then listens on the port after it.

use anyhow::{bail, Context};

/// The rendezvous port under Slurm when `MASTER_PORT` is not set.
pub const SLURM_DEFAULT_PORT: u16 = 29_500;

/// A worker's place in its job.
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    pub rank: usize,
    pub world: usize,
    pub init: String,
    /// Its index among the job's processes on this machine (the GPU `--device cuda` takes).
    pub local_rank: Option<usize>,
    /// Who said so (`the command line`, `torchrun`, `Slurm`).
    pub by: &'static str,
}

/// Resolve the worker's place from its options and the environment `env` reads.
pub fn resolve(
    rank: Option<usize>,
    world: Option<usize>,
    init: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<Launch> {
    let num = |key: &str| -> anyhow::Result<Option<usize>> {
        env(key)
            .map(|v| {
                v.trim()
                    .parse::<usize>()
                    .with_context(|| format!("{key}={v:?} is not a whole number"))
            })
            .transpose()
    };
    let port = || -> anyhow::Result<Option<u16>> {
        env("MASTER_PORT")
            .map(|v| {
                v.trim()
                    .parse::<u16>()
                    .with_context(|| format!("MASTER_PORT={v:?} is not a port"))
            })
            .transpose()
    };
    let (by, env_rank, env_world, local, host, port) = if env("RANK").is_some() {
        let agent = env("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v == "True");
        let port = port()?.map(|p| {
            if agent {
                p.checked_add(1).unwrap_or(p)
            } else {
                p
            }
        });
        (
            "torchrun",
            num("RANK")?,
            num("WORLD_SIZE")?,
            num("LOCAL_RANK")?,
            env("MASTER_ADDR"),
            port,
        )
    } else if env("SLURM_PROCID").is_some() {
        let list = env("SLURM_STEP_NODELIST").or_else(|| env("SLURM_JOB_NODELIST"));
        (
            "Slurm",
            num("SLURM_PROCID")?,
            num("SLURM_NTASKS")?,
            num("SLURM_LOCALID")?,
            list.as_deref().and_then(first_host),
            Some(port()?.unwrap_or(SLURM_DEFAULT_PORT)),
        )
    } else {
        ("the command line", None, None, None, None, None)
    };
    let by = if rank.is_some() && world.is_some() && init.is_some() {
        "the command line"
    } else {
        by
    };
    let Some(rank) = rank.or(env_rank) else {
        bail!("no rank: give --rank (or start the workers with torchrun or srun)");
    };
    let Some(world) = world.or(env_world) else {
        bail!("no world size: give --world (or start the workers with torchrun or srun)");
    };
    let init = match (init, host, port) {
        (Some(i), _, _) => i.to_string(),
        (None, Some(h), Some(p)) => format!("tcp://{h}:{p}"),
        _ => bail!(
            "no rendezvous address: give --init tcp://HOST:PORT (or set MASTER_ADDR and \
             MASTER_PORT)"
        ),
    };
    Ok(Launch {
        rank,
        world,
        init,
        local_rank: local,
        by,
    })
}

/// The first host of a Slurm node list: `node[01-04,07],gpu5` is `node01`.
pub fn first_host(list: &str) -> Option<String> {
    let list = list.trim();
    let (prefix, rest) = match list.find(['[', ',']) {
        Some(i) if list.as_bytes()[i] == b'[' => (&list[..i], &list[i + 1..]),
        Some(i) => return Some(list[..i].to_string()).filter(|h| !h.is_empty()),
        None => return Some(list.to_string()).filter(|h| !h.is_empty()),
    };
    let close = rest.find(']')?;
    let first = rest[..close].split(',').next()?.split('-').next()?;
    let suffix = rest[close + 1..].split(',').next().unwrap_or("");
    Some(format!("{prefix}{first}{suffix}")).filter(|_| !first.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn slurm_node_lists_give_their_first_host() {
        assert_eq!(first_host("node[01-04,07]").as_deref(), Some("node01"));
        assert_eq!(first_host("gpu-[3,5-6],cpu1").as_deref(), Some("gpu-3"));
        assert_eq!(first_host("alpha,beta").as_deref(), Some("alpha"));
        assert_eq!(first_host("solo").as_deref(), Some("solo"));
        assert_eq!(
            first_host("rack[2-3]-n[1-4]").as_deref(),
            Some("rack2-n[1-4]")
        );
        assert_eq!(first_host(""), None);
        assert_eq!(first_host("n[]"), None);
    }

    #[test]
    fn torchrun_and_slurm_environments_place_the_worker() {
        let t = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node01"),
            ("MASTER_PORT", "29500"),
        ]);
        let l = resolve(None, None, None, &t).expect("torchrun");
        assert_eq!(
            l,
            Launch {
                rank: 3,
                world: 4,
                init: "tcp://node01:29500".into(),
                local_rank: Some(1),
                by: "torchrun"
            }
        );
        let agent = env(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "node01"),
            ("MASTER_PORT", "29500"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ]);
        let l = resolve(None, None, None, &agent).expect("torchrun's agent store");
        assert_eq!(l.init, "tcp://node01:29501");

        let s = env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[07-08]"),
        ]);
        let l = resolve(None, None, None, &s).expect("slurm");
        assert_eq!((l.rank, l.world, l.local_rank), (5, 8, Some(1)));
        assert_eq!(l.init, "tcp://gpu07:29500");
        // The command line wins.
        let l = resolve(Some(0), Some(2), Some("tcp://127.0.0.1:1"), &s).expect("flags");
        assert_eq!((l.rank, l.world, l.by), (0, 2, "the command line"));
        // Nothing to go on, or a malformed value: clear errors.
        let e = resolve(None, None, None, &env(&[])).expect_err("nothing");
        assert!(e.to_string().contains("--rank"), "{e}");
        let e = resolve(None, None, None, &env(&[("RANK", "one")])).expect_err("bad");
        assert!(format!("{e:#}").contains("RANK=\"one\""), "{e:#}");
    }
}
