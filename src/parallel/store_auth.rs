//! Who may talk to a worker store: every connection proves it holds the job's shared secret (the
//! token) with HMAC-SHA256 over random challenges from both sides, so the secret never crosses
//! the wire, a recorded handshake cannot be replayed, and a rank also knows it reached the real
//! rank 0. The token comes from `PARALLAX_WORKER_TOKEN` or a file (`--token-file`); when none is
//! given, rank 0 makes one. On a loopback rendezvous it is then left in a private folder
//! (`0700`, this user's) where the other ranks of this machine read it; elsewhere rank 0 prints
//! it for the other machines' ranks.
//!
//! The handshake (each side's messages of fixed size, so nothing here allocates what a stranger
//! asks for):
//! - store -> client: `MAGIC`, a 32-byte challenge `s`;
//! - client -> store: `MAGIC`, rank (u32 LE), world (u32 LE), its own challenge `c`,
//!   `HMAC(token, "client" s c rank world)`;
//! - store -> client: `0` and `HMAC(token, "server" s c rank world)`, or `1`, a u16 LE length and
//!   a message (why the client was refused).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Error, Result};

/// The protocol's first bytes (and its version).
pub const MAGIC: &[u8; 8] = b"PRLXST01";
/// A challenge's and a MAC's length.
pub const LEN: usize = 32;
/// The environment variable holding the token.
pub const TOKEN_ENV: &str = "PARALLAX_WORKER_TOKEN";
/// The longest a refusal message may be.
const MAX_MESSAGE: usize = 1024;

/// The job's shared secret.
#[derive(Clone)]
pub struct Token(Vec<u8>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    /// A token from text (surrounding white space dropped); refused when empty or under 16
    /// characters (too easy to guess).
    pub fn from_text(text: &str, whence: &str) -> Result<Token> {
        let t = text.trim();
        if t.len() < 16 {
            return Err(Error::setting(
                whence,
                "(hidden)",
                "a worker token needs at least 16 characters (leave it unset and rank 0 makes one)",
            ));
        }
        Ok(Token(t.as_bytes().to_vec()))
    }

    /// A fresh random token (64 hex digits).
    pub fn generate() -> Result<Token> {
        Ok(Token(hex(&random()?).into_bytes()))
    }

    /// The token as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }

    /// The token `--token-file` names, else `PARALLAX_WORKER_TOKEN`'s, else none.
    pub fn from_env_or_file(file: Option<&Path>) -> Result<Option<Token>> {
        if let Some(f) = file {
            let text = std::fs::read_to_string(f).map_err(|e| {
                Error::setting("token-file", f.display().to_string(), e.to_string())
            })?;
            return Token::from_text(&text, "token-file").map(Some);
        }
        match std::env::var(TOKEN_ENV) {
            Ok(v) => Token::from_text(&v, TOKEN_ENV).map(Some),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(Error::setting(TOKEN_ENV, "(hidden)", "is not valid UTF-8"))
            }
        }
    }

    /// The HMAC of one side's handshake (`side`, then the transcript).
    fn keyed(&self, side: &[u8], t: &Transcript) -> Hmac<Sha256> {
        // HMAC takes keys of any length.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("any key length");
        for part in [
            side,
            &t.s,
            &t.c,
            &t.rank.to_le_bytes(),
            &t.world.to_le_bytes(),
        ] {
            m.update(part);
        }
        m
    }

    fn mac(&self, side: &[u8], t: &Transcript) -> [u8; LEN] {
        self.keyed(side, t).finalize().into_bytes().into()
    }

    /// Whether `tag` is that HMAC (compared in constant time).
    fn verify(&self, side: &[u8], t: &Transcript, tag: &[u8; LEN]) -> bool {
        self.keyed(side, t).verify_slice(tag).is_ok()
    }
}

/// What both sides' proofs cover: the store's and the client's challenges and the claim.
struct Transcript {
    s: [u8; LEN],
    c: [u8; LEN],
    rank: u32,
    world: u32,
}

/// 32 bytes from the operating system's random source.
pub fn random() -> Result<[u8; LEN]> {
    let mut b = [0u8; LEN];
    getrandom::fill(&mut b)
        .map_err(|e| Error::Rendezvous(format!("no random bytes from the system: {e}")))?;
    Ok(b)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What a client claimed, once its proof checked out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Claim {
    pub rank: usize,
    pub world: usize,
}

/// The store's side: challenge the client and check its answer: its claim and the reply that
/// welcomes it, or (`Ok(Err)`) why it failed, for the caller to [`refuse`] it; `Err`: the
/// connection broke.
pub fn accept(
    conn: &mut (impl Read + Write),
    token: &Token,
) -> std::io::Result<std::result::Result<(Claim, AcceptReply), String>> {
    let s = random().map_err(|e| std::io::Error::other(e.to_string()))?;
    conn.write_all(MAGIC)?;
    conn.write_all(&s)?;
    conn.flush()?;
    let mut hello = [0u8; 8 + 4 + 4 + LEN + LEN];
    conn.read_exact(&mut hello)?;
    if &hello[..8] != MAGIC {
        return Ok(Err("not a Parallax worker (wrong protocol)".into()));
    }
    let u32_at =
        |i: usize| u32::from_le_bytes([hello[i], hello[i + 1], hello[i + 2], hello[i + 3]]);
    let (rank, world) = (u32_at(8), u32_at(12));
    let mut c = [0u8; LEN];
    c.copy_from_slice(&hello[16..16 + LEN]);
    let mut tag = [0u8; LEN];
    tag.copy_from_slice(&hello[16 + LEN..]);
    let t = Transcript { s, c, rank, world };
    if !token.verify(b"client", &t, &tag) {
        return Ok(Err(format!(
            "a client claiming rank {rank} failed authentication (wrong or missing worker token)"
        )));
    }
    Ok(Ok((
        Claim {
            rank: rank as usize,
            world: world as usize,
        },
        AcceptReply {
            proof: token.mac(b"server", &t),
        },
    )))
}

/// The store's answer to a client that proved itself: sent once the store has also accepted its
/// claim ([`AcceptReply::welcome`]) or refused it ([`refuse`]).
pub struct AcceptReply {
    proof: [u8; LEN],
}

impl AcceptReply {
    pub fn welcome(&self, conn: &mut impl Write) -> std::io::Result<()> {
        conn.write_all(&[0])?;
        conn.write_all(&self.proof)?;
        conn.flush()
    }
}

/// Tell a client why it is refused (best effort: it may already be gone).
pub fn refuse(conn: &mut impl Write, why: &str) {
    let msg = &why.as_bytes()[..why.len().min(MAX_MESSAGE)];
    let _ = conn
        .write_all(&[1])
        .and_then(|_| conn.write_all(&(msg.len() as u16).to_le_bytes()))
        .and_then(|_| conn.write_all(msg))
        .and_then(|_| conn.flush());
}

/// How a client's handshake ended.
#[derive(Debug)]
pub enum Outcome {
    Accepted,
    /// The store refused the claim (its message).
    Refused(String),
    /// The store is not one that holds this token (or not a Parallax store at all).
    NotTheStore(String),
}

/// The client's side: answer the store's challenge as rank `rank` of `world` and check that the
/// store holds the token too.
pub fn join(
    conn: &mut (impl Read + Write),
    token: &Token,
    rank: usize,
    world: usize,
) -> std::io::Result<Outcome> {
    let mut first = [0u8; 8 + LEN];
    conn.read_exact(&mut first)?;
    if &first[..8] != MAGIC {
        return Ok(Outcome::NotTheStore(
            "what answers there is not a Parallax worker store".into(),
        ));
    }
    let mut s = [0u8; LEN];
    s.copy_from_slice(&first[8..]);
    let c = random().map_err(|e| std::io::Error::other(e.to_string()))?;
    let (r, w) = (rank as u32, world as u32);
    conn.write_all(MAGIC)?;
    conn.write_all(&r.to_le_bytes())?;
    conn.write_all(&w.to_le_bytes())?;
    conn.write_all(&c)?;
    let t = Transcript {
        s,
        c,
        rank: r,
        world: w,
    };
    conn.write_all(&token.mac(b"client", &t))?;
    conn.flush()?;
    let mut status = [0u8; 1];
    conn.read_exact(&mut status)?;
    if status[0] == 0 {
        let mut proof = [0u8; LEN];
        conn.read_exact(&mut proof)?;
        if !token.verify(b"server", &t, &proof) {
            return Ok(Outcome::NotTheStore(
                "the store there does not hold this job's worker token".into(),
            ));
        }
        return Ok(Outcome::Accepted);
    }
    let mut n = [0u8; 2];
    conn.read_exact(&mut n)?;
    let n = (u16::from_le_bytes(n) as usize).min(MAX_MESSAGE);
    let mut msg = vec![0u8; n];
    conn.read_exact(&mut msg)?;
    Ok(Outcome::Refused(String::from_utf8_lossy(&msg).into_owned()))
}

/// Where the token of a loopback rendezvous on `port` is left for this machine's other ranks:
/// a folder only this user may enter (made if missing; refused if anyone else can enter it).
pub fn local_token_path(port: u16) -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let uid = std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .map_err(|e| Error::Rendezvous(format!("who am I (/proc/self): {e}")))?;
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("parallax-workers-{uid}"));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => {
            return Err(Error::Rendezvous(format!(
                "cannot make {}: {e}",
                dir.display()
            )))
        }
    }
    let m = std::fs::symlink_metadata(&dir)
        .map_err(|e| Error::Rendezvous(format!("{}: {e}", dir.display())))?;
    if !m.is_dir() || m.uid() != uid || m.permissions().mode() & 0o077 != 0 {
        return Err(Error::Rendezvous(format!(
            "{} is not a private folder of this user (it must be a folder with mode 0700): \
             the worker token is not left there; set {TOKEN_ENV} on every rank instead",
            dir.display()
        )));
    }
    Ok(dir.join(format!("store-{port}.token")))
}

/// Leave `token` at `path` (readable by this user only), replacing an older one at once.
pub fn write_local_token(path: &Path, token: &Token) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("{}.partial", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| f.write_all(&token.0))
        .and_then(|_| std::fs::rename(&tmp, path));
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::Rendezvous(format!(
            "cannot leave the worker token at {}: {e}",
            path.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn handshake(store: &Token, client: &Token, rank: usize) -> (Option<Claim>, Outcome) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = {
            let store = store.clone();
            std::thread::spawn(move || {
                let (mut s, _) = l.accept().expect("accept");
                match accept(&mut s, &store).expect("io") {
                    Ok((claim, reply)) => {
                        reply.welcome(&mut s).expect("welcome");
                        Some(claim)
                    }
                    Err(why) => {
                        refuse(&mut s, &why);
                        None
                    }
                }
            })
        };
        let mut c = TcpStream::connect(addr).expect("connect");
        let out = join(&mut c, client, rank, 2).expect("io");
        (server.join().expect("thread"), out)
    }

    #[test]
    fn the_same_token_is_accepted_and_another_refused() {
        let t = Token::generate().expect("token");
        let (claim, out) = handshake(&t, &t, 1);
        assert_eq!(claim, Some(Claim { rank: 1, world: 2 }));
        assert!(matches!(out, Outcome::Accepted), "{out:?}");

        let other = Token::generate().expect("token");
        let (claim, out) = handshake(&t, &other, 1);
        assert_eq!(claim, None);
        match out {
            Outcome::Refused(m) => assert!(m.contains("failed authentication"), "{m}"),
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn short_tokens_are_refused() {
        assert!(Token::from_text("short", "t").is_err());
        assert!(Token::from_text("  0123456789abcdef \n", "t").is_ok());
    }
}
