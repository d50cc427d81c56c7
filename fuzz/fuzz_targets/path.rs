//! MAIL and RCPT paths: `path::rewrite` and `path::literal_ip` on arbitrary bytes, then the
//! same lines through a session after EHLO. The input is split at LF: the first line is the
//! MAIL argument, the following ones RCPT arguments; the first byte picks the session.
//!
//! Invariants: no panic; a rewritten line keeps what was around the path and holds the
//! stand-in mailbox, which needs no rewriting itself; a mailbox from a rewrite has an `@`
//! and no bare CR/LF; the session answers every command with well-formed replies.

#![no_main]

mod common;

use std::time::SystemTime;

use libfuzzer_sys::fuzz_target;
use mxspool::smtp::path::{literal_ip, rewrite};
use mxspool::smtp::session::Step;

use common::reply_lines;

const STAND_IN: &[u8] = b"<stand-in@path.invalid>";

fn check_rewrite(line: &[u8]) {
    let _ = literal_ip(line);
    if let Ok(Some(r)) = rewrite(line) {
        assert!(
            r.line.windows(STAND_IN.len()).any(|w| w == STAND_IN),
            "rewritten line without the stand-in"
        );
        assert_eq!(
            rewrite(&r.line),
            Ok(None),
            "the stand-in was rewritten again"
        );
        assert!(
            r.mailbox.contains('@'),
            "mailbox without @: {:?}",
            r.mailbox
        );
        assert!(
            !r.mailbox.contains('\r') && !r.mailbox.contains('\n'),
            "CR or LF in mailbox {:?}",
            r.mailbox
        );
        assert!(r.line.len() <= line.len() + STAND_IN.len());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&choice, data)) = data.split_first() else {
        return;
    };
    let mut args = data.split(|&b| b == b'\n');
    let mut lines = Vec::new();
    if let Some(mail) = args.next() {
        lines.push([b"MAIL FROM:".as_slice(), mail, b"\r\n"].concat());
    }
    for rcpt in args.take(8) {
        lines.push([b"RCPT TO:".as_slice(), rcpt, b"\r\n"].concat());
    }
    for line in &lines {
        check_rewrite(line);
        check_rewrite(&line[..line.len() - 2]);
    }

    let now = SystemTime::UNIX_EPOCH;
    let mut s = common::session(choice & !2);
    reply_lines(&s.take_output());
    let step = s.receive(b"EHLO client.example\r\n", now);
    assert!(matches!(step, Step::Read));
    reply_lines(&s.take_output());
    for line in &lines {
        // A CR in an argument may end the line early and start another command.
        let mut step = s.receive(line, now);
        let mut closed = false;
        loop {
            reply_lines(&s.take_output());
            step = match step {
                Step::Read => break,
                Step::Close => {
                    closed = true;
                    break;
                }
                Step::Store(incoming) => s.stored(&incoming.envelope.id, Ok(()), now),
                Step::Etrn { domain, .. } => s.etrn_done(&domain, 0, false, now),
                Step::WritePart { .. } => s.part_written(Ok(()), now),
                Step::Discard { .. } => s.resume(now),
                Step::Verify(_) => s.verified(Ok(()), now),
                Step::StartTls => s.tls_started(common::tls13()),
            };
        }
        if closed {
            break;
        }
    }
    reply_lines(&s.take_output());
});
