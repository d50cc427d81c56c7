//! Queue ids: short, printable and ordered by time.
//!
//! An id is 13 characters of Crockford base32 (`0-9A-Z` without `I L O U`, whose ASCII order
//! is its numeric order): 11 characters hold the microseconds since the Unix epoch, 2 more
//! hold a per-process sequence number. Ids made by one process are strictly increasing, so
//! sorting ids sorts by arrival, and a key range of ids is a time range.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Length of every queue id.
pub const LEN: usize = 13;

static LAST: AtomicU64 = AtomicU64::new(0);

/// A new id, later than every id this process made before.
pub fn next() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0);
    // (micros << 10 | seq): strictly increasing even when the clock stands still or steps back.
    let mut prev = LAST.load(Ordering::Relaxed);
    loop {
        let candidate = (now << 10).max(prev + 1);
        match LAST.compare_exchange_weak(prev, candidate, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return encode(candidate),
            Err(p) => prev = p,
        }
    }
}

fn encode(mut v: u64) -> String {
    // 13 * 5 = 65 bits; the top character only ever holds the high bit or zero.
    let mut out = [b'0'; LEN];
    for slot in out.iter_mut().rev() {
        *slot = ALPHABET[(v & 31) as usize];
        v >>= 5;
    }
    String::from_utf8(out.to_vec()).expect("alphabet is ASCII")
}

/// Whether `s` has the form of a queue id (used to reject garbage before a spool lookup).
pub fn is_valid(s: &str) -> bool {
    s.len() == LEN && s.bytes().all(|b| ALPHABET.contains(&b))
}

/// The arrival time coded in an id, in microseconds since the epoch.
pub fn micros(id: &str) -> Option<u64> {
    if !is_valid(id) {
        return None;
    }
    let mut v: u64 = 0;
    for b in id.bytes() {
        let digit = ALPHABET.iter().position(|&a| a == b)? as u64;
        v = (v << 5) | digit;
    }
    Some(v >> 10)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_valid_increasing_and_carry_the_time() {
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64;
        let ids: Vec<String> = (0..10_000).map(|_| next()).collect();
        for w in ids.windows(2) {
            assert!(w[0] < w[1], "{} !< {}", w[0], w[1]);
        }
        assert!(ids.iter().all(|i| is_valid(i)));
        let t = micros(&ids[0]).unwrap();
        assert!(t >= before && t < before + 10_000_000, "{t} vs {before}");
    }

    #[test]
    fn garbage_is_not_an_id() {
        assert!(!is_valid("hello"));
        assert!(!is_valid("0123456789ABI"));
        assert!(micros("../../etc/pas").is_none());
    }
}
