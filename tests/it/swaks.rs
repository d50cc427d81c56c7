//! swaks as the client: a pipelined transaction to a partner, a refused relay attempt, and
//! sender-specified routing through a partner domain refused.

use std::process::{Command, Output};

use crate::harness::{run, text, MxEnv};

fn run_swaks(env: &MxEnv, to: &str, extra: &[&str]) -> Output {
    run(
        Command::new("swaks")
            .args(["--server", &env.addr()])
            .args(["--helo", "client.test"])
            .args(["--from", "s@sender.test"])
            .args(["--to", to])
            .args(["--timeout", "20"])
            .args(extra),
        60,
    )
}

/// The transcript line swaks prints for the server's reply to `RCPT TO:<to>`.
fn rcpt_reply(out: &Output, to: &str) -> String {
    let transcript = text(&out.stdout);
    let mut lines = transcript.lines();
    lines
        .by_ref()
        .find(|l| l.contains("RCPT TO:") && l.contains(to))
        .unwrap_or_else(|| panic!("no RCPT TO:<{to}> in the transcript:\n{transcript}"));
    lines
        .find(|l| l.starts_with("<") && l.len() > 4)
        .unwrap_or_else(|| panic!("no reply to RCPT TO:<{to}>:\n{transcript}"))
        .to_string()
}

#[test]
fn swaks() {
    let mut env = MxEnv::new();
    let _server = env.start();

    // swaks 20201014 (Debian 12) spells it --pipeline; it falls back to lockstep when
    // PIPELINING is not advertised, so check the transcript: RCPT sent before MAIL's reply.
    let ok = run_swaks(&env, "u@example.com", &["--pipeline"]);
    let transcript = text(&ok.stdout);
    assert!(
        ok.status.success(),
        "swaks --pipeline to a partner failed ({}):\n{transcript}{}",
        ok.status,
        text(&ok.stderr)
    );
    let lines: Vec<_> = transcript.lines().collect();
    let mail = lines
        .iter()
        .position(|l| l.starts_with(" -> MAIL FROM:"))
        .unwrap();
    assert!(
        lines[mail + 1].starts_with(" -> RCPT TO:"),
        "swaks did not pipeline MAIL and RCPT:\n{transcript}"
    );
    let queue = env.queue(None);
    assert_eq!(queue.len(), 1, "queue after one message: {queue:#?}");
    assert_eq!(queue[0].sender, "s@sender.test");
    assert_eq!(queue[0].recipients[0].address, "u@example.com");

    // Not a partner: relaying denied.
    let relay = run_swaks(&env, "u@evil.test", &[]);
    assert!(!relay.status.success(), "swaks to u@evil.test succeeded");
    let reply = rcpt_reply(&relay, "u@evil.test");
    assert!(reply.contains("550 5.7.1"), "u@evil.test: {reply}");

    // Sender-specified routing through a partner domain: refused with 5xx at RCPT.
    for to in [
        "u%evil.test@example.com",
        "evil.test!u@example.com",
        "\"u@evil.test\"@example.com",
    ] {
        let out = run_swaks(&env, to, &[]);
        assert!(
            !out.status.success(),
            "swaks to {to} succeeded:\n{}",
            text(&out.stdout)
        );
        let reply = rcpt_reply(&out, to);
        assert!(reply.starts_with("<** 5"), "{to}: {reply}");
    }

    let queue = env.queue(None);
    assert_eq!(queue.len(), 1, "refused mail was queued: {queue:#?}");
}
