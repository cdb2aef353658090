//! Rank 0's side of the worker store ([`super::store`]): a small key-value server on the
//! rendezvous address. Every connection first proves it holds the job's token
//! ([`super::store_auth`]) and claims one rank, once; what it sets is stored under that rank, so
//! no rank can write another's values, and a read names the rank whose value it wants.
//!
//! Nothing a client sends is trusted for size: every length is checked against a limit before
//! anything is allocated, and a value grows only as its bytes arrive. A malformed, oversized or
//! unauthenticated request closes that connection (and is logged); the store keeps serving the
//! others.

use std::collections::HashMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::store_auth::{self, Claim, Token};

pub(crate) const SET: u8 = 1;
pub(crate) const GET: u8 = 2;
/// A reply length that means "no value: an error message follows".
pub(crate) const FAILED: u64 = u64::MAX;
/// The longest key.
pub const MAX_KEY: usize = 512;
/// The largest value (the largest tensor the store communicator carries: a FLUX.1 activation of
/// a 2048 px image in f32 is about 0.2 GiB).
pub const MAX_VALUE: u64 = 1 << 30;
/// The longest error message a reply carries.
pub(crate) const MAX_MESSAGE: u64 = 64 << 10;
/// The most ranks a job may have.
pub const MAX_WORLD: usize = 4096;
/// Connections still in their handshake at once; more are closed at once.
const MAX_PENDING: usize = 64;
/// The longest a connection may take over its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The store's values, each under the rank that set it (with the reads it has left), the ranks
/// claimed and those that hung up before saying they were done, and why the job cannot go on.
/// Values by (owner rank, key), each with the reads it has left.
type Values = HashMap<(usize, String), (Arc<Vec<u8>>, u32)>;

#[derive(Default)]
struct Entries {
    values: Values,
    claimed: Vec<usize>,
    lost: Vec<usize>,
    failed: Option<String>,
}

type Table = (Mutex<Entries>, Condvar);

/// Serve the store for a job of `world` ranks on `listener` (on a thread of its own).
pub fn start(listener: TcpListener, world: usize, token: Token) -> std::io::Result<()> {
    let table: Arc<Table> = Arc::new((Mutex::new(Entries::default()), Condvar::new()));
    std::thread::Builder::new()
        .name("parallax-store".into())
        .spawn(move || serve(listener, table, world, token))
        .map(|_| ())
}

fn serve(listener: TcpListener, table: Arc<Table>, world: usize, token: Token) {
    let pending = Arc::new(AtomicUsize::new(0));
    let token = Arc::new(token);
    for stream in listener.incoming().flatten() {
        if pending.fetch_add(1, Ordering::SeqCst) >= MAX_PENDING {
            pending.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("store: too many connections in their handshake; one refused");
            continue;
        }
        let (table, token, pending) = (table.clone(), token.clone(), pending.clone());
        let spawned = std::thread::Builder::new()
            .name("parallax-store-conn".into())
            .spawn(move || {
                let peer = stream
                    .peer_addr()
                    .map_or("?".to_string(), |a| a.to_string());
                let claim = admit(&stream, &table, world, &token, &peer);
                pending.fetch_sub(1, Ordering::SeqCst);
                if let Some(rank) = claim {
                    connection(stream, rank, &table, &peer);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("store: no thread for a connection: {e}");
        }
    }
}

/// The handshake: the rank this connection may act for, or `None` (refused and logged).
fn admit(
    stream: &TcpStream,
    table: &Table,
    world: usize,
    token: &Token,
    peer: &str,
) -> Option<usize> {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT));
    let _ = stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT));
    let mut s = stream;
    let (claim, reply) = match store_auth::accept(&mut s, token) {
        Ok(Ok(x)) => x,
        Ok(Err(why)) => {
            tracing::warn!("store: refused {peer}: {why}");
            store_auth::refuse(&mut s, &why);
            return None;
        }
        Err(e) => {
            tracing::warn!("store: {peer} broke off its handshake: {e}");
            return None;
        }
    };
    let Claim {
        rank,
        world: theirs,
    } = claim;
    let (map, cv) = table;
    let mut m = map.lock().ok()?;
    let why = if theirs != world {
        // An authenticated rank of another size of job: the job cannot go on.
        let why = format!(
            "rank {rank} was started with --world {theirs}, rank 0 with --world {world}: start \
             every rank with the same --world"
        );
        m.failed.get_or_insert_with(|| why.clone());
        cv.notify_all();
        Some(why)
    } else if rank >= world {
        Some(format!(
            "rank {rank} is not below --world {world}: ranks are 0 to {}",
            world - 1
        ))
    } else if m.claimed.contains(&rank) {
        Some(format!(
            "rank {rank} has already joined this job: a second process with --rank {rank} is \
             refused"
        ))
    } else {
        m.claimed.push(rank);
        None
    };
    drop(m);
    if let Some(why) = why {
        tracing::warn!("store: refused {peer}: {why}");
        store_auth::refuse(&mut s, &why);
        return None;
    }
    if reply.welcome(&mut s).is_err() {
        return None;
    }
    let _ = stream.set_read_timeout(None);
    let _ = stream.set_write_timeout(None);
    tracing::debug!("store: {peer} joined as rank {rank}");
    Some(rank)
}

/// Serve an admitted connection of rank `rank` until it hangs up or sends something malformed.
fn connection(stream: TcpStream, rank: usize, table: &Table, peer: &str) {
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut done = false;
    let end = serve_one(
        rank,
        &mut done,
        BufReader::new(stream),
        BufWriter::new(write_half),
        table,
    );
    if let Err(why) = end {
        tracing::warn!("store: closed rank {rank}'s connection ({peer}): {why}");
    }
    // A rank that hangs up before it is done will never set what the others wait for: every
    // waiting and later read fails instead of hanging.
    if !done {
        let (map, cv) = table;
        if let Ok(mut m) = map.lock() {
            m.lost.push(rank);
        }
        cv.notify_all();
    }
}

/// Answers one connection's requests, one at a time, until the client hangs up (`Ok`) or sends
/// something malformed (`Err`, why).
fn serve_one(
    rank: usize,
    done: &mut bool,
    mut r: BufReader<TcpStream>,
    mut w: BufWriter<TcpStream>,
    table: &Table,
) -> std::result::Result<(), String> {
    loop {
        let req = match read_request(&mut r) {
            Ok(Some(req)) => req,
            Ok(None) => return Ok(()),
            Err(e) => return Err(e),
        };
        let reply = match req {
            Request::Set { key, readers, val } => {
                if key == "done" {
                    *done = true;
                }
                // Acknowledge before the value becomes visible: a waiter it wakes (rank 0 in
                // `finish`) may end this process at once, and the setter must already have its
                // reply by then.
                if w.write_all(&0u64.to_le_bytes())
                    .and_then(|_| w.flush())
                    .is_err()
                {
                    return Ok(());
                }
                let (map, cv) = table;
                if let Ok(mut m) = map.lock() {
                    m.values.insert((rank, key), (Arc::new(val), readers));
                }
                cv.notify_all();
                continue;
            }
            Request::Get { owner, key } => wait_for(table, owner, &key),
        };
        let Some(reply) = reply else { return Ok(()) };
        let ok = match reply {
            Ok(val) => w
                .write_all(&(val.len() as u64).to_le_bytes())
                .and_then(|_| w.write_all(&val)),
            Err(msg) => w
                .write_all(&FAILED.to_le_bytes())
                .and_then(|_| w.write_all(&(msg.len() as u64).to_le_bytes()))
                .and_then(|_| w.write_all(msg.as_bytes())),
        };
        if ok.and_then(|_| w.flush()).is_err() {
            return Ok(());
        }
    }
}

/// The value rank `owner` set under `key`, once it is there; an error once the job has failed
/// or a rank was lost; `None` if the table is poisoned.
fn wait_for(
    table: &Table,
    owner: usize,
    key: &str,
) -> Option<std::result::Result<Arc<Vec<u8>>, String>> {
    let (map, cv) = table;
    let mut m = map.lock().ok()?;
    let k = (owner, key.to_string());
    loop {
        if let Some((v, left)) = m.values.get_mut(&k) {
            let v = v.clone();
            *left = left.saturating_sub(1);
            if *left == 0 {
                m.values.remove(&k);
            }
            return Some(Ok(v));
        }
        if let Some(why) = &m.failed {
            return Some(Err(why.clone()));
        }
        if let Some(&lost) = m.lost.first() {
            return Some(Err(format!(
                "rank {lost} disconnected before it was done (while waiting for {key} from rank \
                 {owner})"
            )));
        }
        m = cv.wait(m).ok()?;
    }
}

/// One request, its sizes checked.
#[derive(Debug)]
enum Request {
    Set {
        key: String,
        readers: u32,
        val: Vec<u8>,
    },
    Get {
        owner: usize,
        key: String,
    },
}

/// The next request; `Ok(None)` when the client hung up between requests; `Err` (why) for a
/// malformed or oversized one, or one cut off.
fn read_request(r: &mut impl Read) -> std::result::Result<Option<Request>, String> {
    let mut op = [0u8; 1];
    match r.read_exact(&mut op) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(format!("reading a request: {e}")),
    }
    let cut = |e: std::io::Error| format!("request cut off: {e}");
    let mut n = [0u8; 4];
    match op[0] {
        SET => {
            let key = read_key(r)?;
            r.read_exact(&mut n).map_err(cut)?;
            let readers = u32::from_le_bytes(n);
            if readers as usize >= MAX_WORLD {
                return Err(format!(
                    "{readers} readers for {key:?} (at most {MAX_WORLD})"
                ));
            }
            let mut len = [0u8; 8];
            r.read_exact(&mut len).map_err(cut)?;
            let val = read_bounded(r, u64::from_le_bytes(len), MAX_VALUE, "value")?;
            Ok(Some(Request::Set { key, readers, val }))
        }
        GET => {
            r.read_exact(&mut n).map_err(cut)?;
            let owner = u32::from_le_bytes(n) as usize;
            if owner >= MAX_WORLD {
                return Err(format!(
                    "a read of rank {owner}'s value (at most {MAX_WORLD} ranks)"
                ));
            }
            Ok(Some(Request::Get {
                owner,
                key: read_key(r)?,
            }))
        }
        other => Err(format!("unknown request {other}")),
    }
}

fn read_key(r: &mut impl Read) -> std::result::Result<String, String> {
    let mut n = [0u8; 4];
    r.read_exact(&mut n)
        .map_err(|e| format!("request cut off: {e}"))?;
    let key = read_bounded(r, u32::from_le_bytes(n) as u64, MAX_KEY as u64, "key")?;
    String::from_utf8(key).map_err(|_| "a key that is not UTF-8".to_string())
}

/// `len` bytes, refused above `max` before anything is allocated; the buffer grows only as the
/// bytes arrive, so a length that lies costs nothing.
pub(crate) fn read_bounded(
    r: &mut impl Read,
    len: u64,
    max: u64,
    what: &str,
) -> std::result::Result<Vec<u8>, String> {
    if len > max {
        return Err(format!("a {what} of {len} bytes (at most {max})"));
    }
    let mut v = Vec::with_capacity(len.min(64 << 10) as usize);
    r.take(len)
        .read_to_end(&mut v)
        .map_err(|e| format!("{what} cut off: {e}"))?;
    if v.len() as u64 != len {
        return Err(format!("{what} cut off after {} of {len} bytes", v.len()));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_lengths_are_refused_before_allocating() {
        // SET, a key length of 4, "seed", 1 reader, then a value length of 2^40.
        let mut req = vec![SET];
        req.extend(4u32.to_le_bytes());
        req.extend(b"seed");
        req.extend(1u32.to_le_bytes());
        req.extend((1u64 << 40).to_le_bytes());
        let err = read_request(&mut req.as_slice()).expect_err("too large");
        assert!(err.contains("1099511627776 bytes"), "{err}");
        // A key length of 2^32 - 1.
        let mut req = vec![GET];
        req.extend(0u32.to_le_bytes());
        req.extend(u32::MAX.to_le_bytes());
        assert!(read_request(&mut req.as_slice()).is_err());
        // A length that lies about what follows.
        let mut req = vec![SET];
        req.extend(1u32.to_le_bytes());
        req.extend(b"k");
        req.extend(1u32.to_le_bytes());
        req.extend(1000u64.to_le_bytes());
        req.extend([0u8; 10]);
        let err = read_request(&mut req.as_slice()).expect_err("cut off");
        assert!(err.contains("after 10 of 1000"), "{err}");
        assert!(read_request(&mut [9u8].as_slice()).is_err());
        assert!(matches!(read_request(&mut [].as_slice()), Ok(None)));
    }
}
