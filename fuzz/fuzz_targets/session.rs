//! The SMTP session fed in random chunks. The first byte picks the session (policy,
//! client address, limits), the next 8 seed the generator that picks the split points and
//! the outcome of each store; the rest is what the client sends.
//!
//! Invariants: no panic; all output is CRLF-terminated lines with 3-digit codes; the reply
//! to the final dot (the first line after a `354`) is a 250 only when it came from
//! `Session::stored` answered Ok; a `Step::Store` comes only while that reply is awaited.

#![no_main]

mod common;

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use mxspool::smtp::session::{Session, Step, StoreFailure};

use common::{reply_lines, Rng};

struct Harness {
    session: Session,
    rng: Rng,
    /// A `354` was sent and the reply to the final dot not yet.
    awaiting_dot_reply: bool,
    closed: bool,
    now: SystemTime,
    stores: usize,
}

impl Harness {
    /// Checks the output; `from_store_ok` when it is the output of `stored(.., Ok(()))`.
    fn collect(&mut self, from_store_ok: bool) {
        let out = self.session.take_output();
        let _ = self.session.take_events();
        for (i, line) in reply_lines(&out).into_iter().enumerate() {
            if self.awaiting_dot_reply {
                self.awaiting_dot_reply = false;
                if line.starts_with("250") {
                    assert!(
                        from_store_ok && i == 0,
                        "250 to the final dot without a stored message: {line:?}"
                    );
                }
            } else {
                assert!(
                    !(from_store_ok && i == 0),
                    "stored() answered when no dot reply was due: {line:?}"
                );
            }
            if line.starts_with("354") {
                self.awaiting_dot_reply = true;
            }
        }
    }

    fn drive(&mut self, mut step: Step, mut from_store_ok: bool) {
        loop {
            self.collect(from_store_ok);
            from_store_ok = false;
            match step {
                Step::Read => return,
                Step::Close => {
                    self.closed = true;
                    return;
                }
                // The handshake worked: the session starts over.
                Step::StartTls => step = self.session.tls_started(common::tls13()),
                Step::Etrn { domain, .. } => {
                    let queued = self.rng.below(3);
                    let held = self.rng.below(4) == 0;
                    step = self.session.etrn_done(&domain, queued, held, self.now);
                }
                Step::WritePart { n, bytes, .. } => {
                    assert!(n >= 1, "parts are numbered from 1");
                    assert!(!bytes.is_empty(), "an empty part");
                    let result = match self.rng.below(8) {
                        0 => Err(StoreFailure::NoSpace),
                        _ => Ok(()),
                    };
                    step = self.session.part_written(result, self.now);
                }
                Step::Verify(address) => {
                    assert!(!address.is_empty(), "a callout for no address");
                    let result = match self.rng.below(3) {
                        0 => Err(format!("550 5.1.1 <{address}>: Recipient address rejected")),
                        _ => Ok(()),
                    };
                    step = self.session.verified(result, self.now);
                }
                Step::Discard { written, .. } => {
                    assert!(written >= 1, "a discard of nothing");
                    step = self.session.resume(self.now);
                }
                Step::Store(incoming) => {
                    assert!(
                        self.awaiting_dot_reply,
                        "Store step without a final dot awaiting its reply"
                    );
                    assert!(
                        !incoming.envelope.recipients.is_empty(),
                        "stored with no recipients"
                    );
                    self.stores += 1;
                    let result = match self.rng.below(5) {
                        0 => Err(StoreFailure::NoSpace),
                        1 => Err(StoreFailure::Spool),
                        2 => Err(StoreFailure::Quota("the queue of x.test is full".into())),
                        _ => Ok(()),
                    };
                    let id = format!("FUZZ{:04}", self.stores);
                    from_store_ok = result.is_ok();
                    step = self.session.stored(&id, result, self.now);
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let (head, input) = data.split_at(9);
    let mut h = Harness {
        session: common::session(head[0]),
        rng: Rng::new(&head[1..]),
        awaiting_dot_reply: false,
        closed: false,
        now: SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
        stores: 0,
    };
    h.collect(false);
    let mut rest = input;
    while !rest.is_empty() && !h.closed {
        // Mostly small reads, sometimes everything at once.
        let n = match h.rng.below(8) {
            0 => rest.len(),
            1 => 1,
            _ => 1 + h.rng.below(64),
        }
        .min(rest.len());
        let (piece, tail) = rest.split_at(n);
        rest = tail;
        let step = h.session.receive(piece, h.now);
        h.drive(step, false);
        h.now += Duration::from_millis(h.rng.below(2000) as u64);
    }
    if !h.closed {
        let step = if h.rng.below(2) == 0 {
            h.session.timeout()
        } else {
            h.session.eof()
        };
        h.drive(step, false);
    }
});
