//! The DATA decoder (`DataReader`). The first 2 bytes pick the size limit and seed the split
//! points; the rest is what the client sends after `354`.
//!
//! Invariants: no panic; `feed` never consumes more than it was given and stops at the end
//! (`CRLF.CRLF`); the result (message, verdict, bytes consumed, `seen`) is the same however
//! the input is split; the kept message is never longer than the limit (plus the final
//! CRLF) and is what was seen, dot-unstuffed.

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use mxspool::smtp::data::{DataReader, Verdict};

use common::Rng;

/// Feeds `input` in pieces of the sizes `split` gives; returns (consumed, done, seen, finish).
fn decode(
    max: usize,
    input: &[u8],
    mut split: impl FnMut(usize) -> usize,
) -> (usize, bool, usize, Vec<u8>, Verdict) {
    let mut r = DataReader::new(max);
    let mut at = 0;
    let mut done = false;
    while at < input.len() {
        let n = split(input.len() - at).clamp(1, input.len() - at);
        let piece = &input[at..at + n];
        let (used, end) = r.feed(piece);
        assert!(used <= piece.len(), "consumed {used} of {}", piece.len());
        at += used;
        if end {
            done = true;
            break;
        }
        assert_eq!(used, piece.len(), "stopped early without the end");
    }
    let seen = r.seen();
    let (body, verdict) = r.finish();
    (at, done, seen, body, verdict)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let max = match data[0] % 4 {
        0 => 0,
        1 => 16,
        2 => 1000,
        _ => 1 << 20,
    };
    let input = &data[2..];
    let whole = decode(max, input, |left| left);
    let mut rng = Rng::new(&data[..2]);
    let split = decode(max, input, |_| 1 + rng.below(17));
    let bytes = decode(max, input, |_| 1);
    assert_eq!(whole, split, "split into random pieces: a different result");
    assert_eq!(whole, bytes, "fed byte by byte: a different result");

    let (used, done, seen, body, verdict) = whole;
    if done {
        assert!(
            used >= 3 && input[..used].ends_with(b".\r\n"),
            "end without .CRLF"
        );
    } else {
        assert_eq!(used, input.len());
    }
    assert!(
        body.len() <= max + 2,
        "kept {} bytes over the limit {max}",
        body.len()
    );
    assert!(body.len() <= used, "more out than in");
    if seen > max {
        assert_eq!(verdict, Verdict::TooBig);
    }
    if verdict == Verdict::Ok && done {
        assert!(!body.contains(&0), "NUL in an accepted message");
        assert!(
            body.is_empty() || body.ends_with(b"\r\n"),
            "accepted message without its final CRLF"
        );
    }
});
