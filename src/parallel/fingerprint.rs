//! One job, agreed: before worker processes load anything, each presents a fingerprint of the job
//! it was started for (model files, dtype, prompt, seed, size, steps, layout, world, version...)
//! and compares it with every other rank's; any difference fails every rank at once, naming the
//! field and both values, instead of a wrong image or a hang.

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::layout::ModelSpec;

/// What a rank that was given no seed shows for it: it takes rank 0's.
pub const ANY_SEED: &str = "(rank 0's)";

/// The job's settings as named fields, in a fixed order.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Fingerprint(pub Vec<(String, String)>);

impl Fingerprint {
    pub fn new() -> Self {
        Fingerprint(Vec::new())
    }

    /// Add `field` = `value`.
    pub fn with(mut self, field: &str, value: impl std::fmt::Display) -> Self {
        self.0.push((field.to_string(), value.to_string()));
        self
    }

    pub fn get(&self, field: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(f, _)| f == field)
            .map(|(_, v)| v.as_str())
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_bytes(b: &[u8], rank: usize) -> Result<Self> {
        serde_json::from_slice(b).map_err(|e| {
            Error::rank(
                rank,
                "while joining",
                format!("a malformed job fingerprint: {e}"),
            )
        })
    }

    /// Compare rank `me`'s fingerprint (`self`) with rank `other`'s: the first field that differs
    /// (a seed shown as [`ANY_SEED`] matches any) is an error naming both values.
    pub fn agree(&self, me: usize, theirs: &Fingerprint, other: usize) -> Result<()> {
        for (field, mine) in &self.0 {
            let their = theirs.get(field).unwrap_or("(missing)");
            if field == "seed" && (mine == ANY_SEED || their == ANY_SEED) {
                continue;
            }
            if mine != their {
                // The lower rank first, so that every rank says the same.
                let ((a, ra), (b, rb)) = if me < other {
                    ((mine.as_str(), me), (their, other))
                } else {
                    ((their, other), (mine.as_str(), me))
                };
                return Err(Error::Rendezvous(format!(
                    "the ranks were started for different jobs: {field} is {a:?} on rank {ra} \
                     and {b:?} on rank {rb}; start every rank with the same settings"
                )));
            }
        }
        if let Some((field, their)) = theirs.0.iter().find(|(f, _)| self.get(f).is_none()) {
            return Err(Error::Rendezvous(format!(
                "the ranks were started for different jobs: rank {other} has {field} = {their:?} \
                 and rank {me} none (different Parallax versions?)"
            )));
        }
        Ok(())
    }
}

impl Default for Fingerprint {
    fn default() -> Self {
        Self::new()
    }
}

/// The model as files' names and sizes (paths differ between machines; the files must not).
pub fn model_identity(spec: &ModelSpec) -> String {
    match spec {
        ModelSpec::Demo => "demo".into(),
        ModelSpec::Random(v) => format!("random:{v:?}"),
        ModelSpec::RandomKlein(k) => format!("random:{}", k.name()),
        ModelSpec::Klein(f) => format!(
            "klein transformer {}, autoencoder {}, text encoder {}",
            identity(&f.transformer),
            identity(&f.vae),
            identity(&f.text_encoder)
        ),
        ModelSpec::Files(f) => format!(
            "transformer {}, autoencoder {}",
            identity(&f.transformer),
            identity(&f.vae)
        ),
    }
}

/// A file's name and size, or a folder's name and the count and total size of the files in it.
fn identity(p: &Path) -> String {
    let name = p.file_name().map_or(p.display().to_string(), |n| {
        n.to_string_lossy().into_owned()
    });
    match std::fs::metadata(p) {
        Ok(m) if m.is_file() => format!("{name} ({} bytes)", m.len()),
        Ok(_) => {
            let (mut files, mut bytes) = (0u64, 0u64);
            let mut stack = vec![p.to_path_buf()];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                    match std::fs::metadata(e.path()) {
                        Ok(m) if m.is_dir() => stack.push(e.path()),
                        Ok(m) => {
                            files += 1;
                            bytes += m.len();
                        }
                        Err(_) => {}
                    }
                }
            }
            format!("{name}/ ({files} files, {bytes} bytes)")
        }
        Err(e) => format!("{name} (unreadable: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_difference_names_the_field_and_both_values() {
        let a = Fingerprint::new().with("prompt", "a cat").with("seed", 5);
        let b = Fingerprint::new().with("prompt", "a cat").with("seed", 6);
        let msg = a.agree(0, &b, 1).expect_err("seeds differ").to_string();
        assert!(
            msg.contains(r#"seed is "5" on rank 0 and "6" on rank 1"#),
            "{msg}"
        );
        let any = Fingerprint::new()
            .with("prompt", "a cat")
            .with("seed", ANY_SEED);
        a.agree(0, &any, 1)
            .expect("a rank without a seed takes rank 0's");
        let round = Fingerprint::from_bytes(&a.to_bytes(), 0).expect("decode");
        assert_eq!(round, a);
        assert!(Fingerprint::from_bytes(b"{not json", 1).is_err());
    }
}
