//! Random and hostile byte streams at a worker store (rank 0's rendezvous server), for a bounded
//! time and from a fixed seed: strangers without the token, and authenticated ranks that then
//! send garbage, lying lengths (the 18-byte SET whose length says 2^40) and cut-off requests. The
//! store must close each such connection, keep its memory flat, and still answer a good client
//! afterwards.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use parallax::parallel::store_auth::{self, Outcome, Token};
use parallax::parallel::store_server::{self, MAX_WORLD};

/// How long the fuzzing runs (a few seconds in CI).
const FUZZ_FOR: Duration = Duration::from_secs(3);
const SEED: u64 = 0x5EED_2026;

/// SplitMix64: a small seeded generator, so a failing run can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Resident memory of this process (the store runs in it), in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages");
    pages * 4096
}

/// A hostile request: valid-looking headers whose lengths lie or overflow.
fn hostile(rng: &mut Rng) -> Vec<u8> {
    let mut b = Vec::new();
    match rng.below(5) {
        // The 18-byte SET: key "", one reader, a value of 2^40 bytes.
        0 => {
            b.push(1);
            b.extend(0u32.to_le_bytes());
            b.extend(1u32.to_le_bytes());
            b.extend((1u64 << 40).to_le_bytes());
        }
        // A key length of up to 4 GiB.
        1 => {
            b.push(1 + rng.below(2) as u8);
            if b[0] == 2 {
                b.extend((rng.below(8) as u32).to_le_bytes());
            }
            b.extend((rng.next() as u32 | 1 << 20).to_le_bytes());
        }
        // A value that says more than comes.
        2 => {
            b.push(1);
            b.extend(1u32.to_le_bytes());
            b.push(b'k');
            b.extend(1u32.to_le_bytes());
            b.extend((rng.below(1 << 29) + 100).to_le_bytes());
            let n = rng.below(64) as usize;
            b.extend(rng.bytes(n));
        }
        // Too many readers, or a read of a rank past any world.
        3 => {
            b.push(1);
            b.extend(1u32.to_le_bytes());
            b.push(b'k');
            b.extend(u32::MAX.to_le_bytes());
            b.extend(1u64.to_le_bytes());
            b.push(0);
        }
        _ => {
            b.push(2);
            b.extend(u32::MAX.to_le_bytes());
            b.extend(1u32.to_le_bytes());
            b.push(b'k');
        }
    }
    b
}

fn set(c: &mut TcpStream, key: &str, val: &[u8]) -> std::io::Result<u64> {
    let mut b = vec![1u8];
    b.extend((key.len() as u32).to_le_bytes());
    b.extend(key.as_bytes());
    b.extend(1u32.to_le_bytes());
    b.extend((val.len() as u64).to_le_bytes());
    b.extend(val);
    c.write_all(&b)?;
    let mut ack = [0u8; 8];
    c.read_exact(&mut ack)?;
    Ok(u64::from_le_bytes(ack))
}

fn get(c: &mut TcpStream, owner: u32, key: &str) -> std::io::Result<Vec<u8>> {
    let mut b = vec![2u8];
    b.extend(owner.to_le_bytes());
    b.extend((key.len() as u32).to_le_bytes());
    b.extend(key.as_bytes());
    c.write_all(&b)?;
    let mut n = [0u8; 8];
    c.read_exact(&mut n)?;
    let mut v = vec![0u8; u64::from_le_bytes(n) as usize];
    c.read_exact(&mut v)?;
    Ok(v)
}

#[test]
fn the_store_survives_random_and_hostile_streams_with_flat_memory() {
    let token = Token::generate().expect("token");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    store_server::start(listener, MAX_WORLD, token.clone()).expect("store");
    let mut rng = Rng(SEED);
    let before = rss();
    let t0 = Instant::now();
    let (mut strangers, mut ranks, mut next_rank) = (0, 0, 1u32);
    while t0.elapsed() < FUZZ_FOR && (next_rank as usize) < MAX_WORLD - 1 {
        let Ok(mut c) = TcpStream::connect(addr) else {
            continue;
        };
        c.set_read_timeout(Some(Duration::from_secs(1)))
            .expect("timeout");
        let authenticated = rng.below(2) == 0;
        if authenticated {
            let rank = next_rank as usize;
            next_rank += 1;
            match store_auth::join(&mut c, &token, rank, MAX_WORLD) {
                Ok(Outcome::Accepted) => ranks += 1,
                other => panic!("rank {rank} refused: {other:?}"),
            }
        } else {
            strangers += 1;
        }
        let stream = if rng.below(2) == 0 {
            hostile(&mut rng)
        } else {
            let n = rng.below(4096) as usize;
            rng.bytes(n)
        };
        let _ = c.write_all(&stream);
        // Some hang up at once; the others say they are done sending and wait to be thrown out.
        if rng.below(4) != 0 {
            let _ = c.shutdown(std::net::Shutdown::Write);
            let _ = c.read_to_end(&mut Vec::new());
        }
    }
    eprintln!(
        "seed {SEED:#x}: {strangers} strangers and {ranks} ranks in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    // The store still serves a rank with the token.
    let mut good = TcpStream::connect(addr).expect("connect");
    good.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let rank = next_rank;
    assert!(matches!(
        store_auth::join(&mut good, &token, rank as usize, MAX_WORLD).expect("handshake"),
        Outcome::Accepted
    ));
    assert_eq!(set(&mut good, "after", b"still here").expect("set"), 0);
    assert_eq!(get(&mut good, rank, "after").expect("get"), b"still here");
    let grown = rss().saturating_sub(before);
    eprintln!("resident memory grew {} KiB", grown >> 10);
    assert!(grown < 256 << 20, "the store grew by {} MiB", grown >> 20);
    assert!(strangers > 0 && ranks > 0);
}
