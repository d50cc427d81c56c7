//! The LMTP client (`Connection::connect_lmtp`) against a real Dovecot LMTP server, over TCP
//! and over a Unix socket: messages land in the users' Maildirs byte for byte, and each
//! recipient gets its own verdict (refused at RCPT, refused after the final dot, saved).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mxspool::delivery::client::{
    ClientConfig, Connection, LmtpTarget, Outgoing, RcptResult, Timeouts,
};
use mxspool::delivery::Transcript;
use mxspool::envelope::{Body, Envelope, Recipient};

use crate::dovecot::{Dovecot, FULL_USER, UNKNOWN_USER};

fn config() -> ClientConfig {
    ClientConfig {
        helo_name: "mx2.test".to_string(),
        connect_timeout: Duration::from_secs(10),
        timeouts: Timeouts::all(Duration::from_secs(30)),
        ..ClientConfig::new("mx2.test")
    }
}

fn envelope(sender: &str, rcpts: &[&str]) -> Envelope {
    Envelope {
        id: "LMTPTEST".to_string(),
        sender: sender.to_string(),
        recipients: rcpts.iter().map(|r| Recipient::new(*r)).collect(),
        arrival_ms: 0,
        size: 0,
        body: Body::SevenBit,
        smtputf8: false,
        ret: None,
        envid: None,
        client_ip: String::new(),
        helo: String::new(),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap()
}

/// The message as Dovecot stores it: LF line ends (dot-stuffing undone by the server).
fn stored_form(message: &[u8]) -> Vec<u8> {
    String::from_utf8(message.to_vec())
        .unwrap()
        .replace("\r\n", "\n")
        .into_bytes()
}

/// Sends `message` to `rcpts` over one LMTP connection to `target`; returns the results,
/// the connection's `relay()` and the transcript.
fn send(
    target: &LmtpTarget,
    sender: &str,
    rcpts: &[&str],
    message: &[u8],
) -> (Vec<RcptResult>, String, Vec<String>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let seen = lines.clone();
    let transcript: Transcript = Arc::new(move |l: &str| seen.lock().unwrap().push(l.to_string()));
    let env = envelope(sender, rcpts);
    let (results, relay) = runtime().block_on(async {
        let mut c = Connection::connect_lmtp(target, &config(), Some(transcript))
            .await
            .unwrap_or_else(|e| panic!("LMTP connect to {target}: {e}"));
        assert!(c.is_lmtp());
        assert!(c.extensions().pipelining, "Dovecot offers PIPELINING");
        let relay = c.relay();
        let msg = Outgoing {
            envelope: &env,
            recipients: &env.recipients,
            message: &mxspool::spool::Message::from(message.to_vec()),
        };
        let results = c.send(&msg).await;
        assert!(c.is_usable());
        c.quit().await;
        (results, relay)
    });
    let lines = lines.lock().unwrap().clone();
    (results, relay, lines)
}

fn assert_saved(results: &[RcptResult], dovecot: &Dovecot) {
    for r in results {
        match r {
            RcptResult::Sent(reply) => {
                assert_eq!(reply.code, 250, "{reply}");
                assert_eq!(reply.status.as_deref(), Some("2.0.0"), "{reply}");
                assert!(reply.text.contains("Saved"), "{reply}");
            }
            other => panic!("not sent: {other:?}\n--- dovecot log\n{}", dovecot.log()),
        }
    }
}

/// One message file: Dovecot's trace headers on top (Return-Path, Received; Delivered-To
/// only for a transaction with one recipient), then exactly our message.
fn assert_message(file: &[u8], sender: &str, expected: &[u8]) {
    let text = String::from_utf8_lossy(file);
    assert!(
        file.ends_with(expected),
        "the stored message does not end with the one sent:\n{text}"
    );
    assert!(
        text.starts_with(&format!("Return-Path: <{sender}>\n")),
        "{text}"
    );
    assert!(text.contains("with LMTP"), "{text}");
}

const MESSAGE: &[u8] = b"From: s@sender.test\r\n\
To: alice@example.org\r\n\
Subject: over LMTP\r\n\
\r\n\
.a line that starts with a dot\r\n\
..and two\r\n\
.\r\n\
\tend \xc3\xa9\r\n";

#[test]
fn lmtp_over_tcp_two_recipients() {
    let dovecot = Dovecot::start();
    let target = LmtpTarget::parse(&dovecot.lmtp_addr()).unwrap();
    assert!(matches!(target, LmtpTarget::Tcp(_)));
    let (results, relay, transcript) = send(
        &target,
        "s@sender.test",
        &["alice@example.org", "Bob+lists@Example.NET"],
        MESSAGE,
    );
    assert_eq!(results.len(), 2);
    assert_saved(&results, &dovecot);
    assert_eq!(
        relay,
        format!("127.0.20.1[127.0.20.1]:{}", target_port(&target))
    );
    assert!(
        transcript.contains(&">>> LHLO mx2.test".to_string()),
        "{transcript:?}"
    );
    assert!(!transcript.iter().any(|l| l.contains("EHLO")));

    let expected = stored_form(MESSAGE);
    let alice = dovecot.messages("example.org", "alice");
    assert_eq!(alice.len(), 1, "{}", dovecot.log());
    assert_message(&alice[0], "s@sender.test", &expected);
    let bob = dovecot.messages("example.net", "bob");
    assert_eq!(bob.len(), 1, "{}", dovecot.log());
    assert_message(&bob[0], "s@sender.test", &expected);
}

#[test]
fn lmtp_over_a_unix_socket_two_recipients() {
    let dovecot = Dovecot::start();
    let socket = dovecot.lmtp_socket();
    let target = LmtpTarget::parse(socket.to_str().unwrap()).unwrap();
    assert_eq!(target, LmtpTarget::Unix(socket.clone()));
    let (results, relay, _) = send(
        &target,
        "",
        &["carol@example.org", "dave@example.com"],
        MESSAGE,
    );
    assert_eq!(results.len(), 2);
    assert_saved(&results, &dovecot);
    assert_eq!(relay, socket.display().to_string());

    let expected = stored_form(MESSAGE);
    let carol = dovecot.messages("example.org", "carol");
    assert_eq!(carol.len(), 1, "{}", dovecot.log());
    assert_message(&carol[0], "", &expected);
    let dave = dovecot.messages("example.com", "dave");
    assert_eq!(dave.len(), 1, "{}", dovecot.log());
    assert_message(&dave[0], "", &expected);
}

/// One transaction, four verdicts: saved, refused at RCPT (unknown user), refused after the
/// final dot (over quota: Dovecot's per-recipient reply), saved. Then a second message on
/// the same connection.
#[test]
fn lmtp_per_recipient_verdicts() {
    let dovecot = Dovecot::start();
    let target = LmtpTarget::parse(&dovecot.lmtp_addr()).unwrap();
    // Bigger than FULL_USER's 1 KiB quota.
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    for i in 0..100 {
        big.extend_from_slice(format!("line {i} of a message over the quota\r\n").as_bytes());
    }
    let env = envelope(
        "s@sender.test",
        &[
            "erin@example.org",
            UNKNOWN_USER,
            FULL_USER,
            "frank@example.org",
        ],
    );
    let second = envelope("t@sender.test", &["erin@example.org"]);
    let (first, again) = runtime().block_on(async {
        let mut c = Connection::connect_lmtp(&target, &config(), None)
            .await
            .unwrap();
        let first = c
            .send(&Outgoing {
                envelope: &env,
                recipients: &env.recipients,
                message: &mxspool::spool::Message::from(big.clone()),
            })
            .await;
        let again = c
            .send(&Outgoing {
                envelope: &second,
                recipients: &second.recipients,
                message: &mxspool::spool::Message::from(
                    b"Subject: second\r\n\r\nsecond\r\n".to_vec(),
                ),
            })
            .await;
        c.quit().await;
        (first, again)
    });
    let log = dovecot.log();
    assert_eq!(first.len(), 4);
    assert!(
        matches!(&first[0], RcptResult::Sent(r) if r.code == 250),
        "{first:?}\n{log}"
    );
    assert!(
        matches!(&first[1], RcptResult::Failed(r) if r.code == 550 && r.dsn_status() == "5.1.1"),
        "{first:?}\n{log}"
    );
    assert!(
        matches!(&first[2], RcptResult::Failed(r) if r.code == 552 && r.dsn_status() == "5.2.2"),
        "{first:?}\n{log}"
    );
    assert!(
        matches!(&first[3], RcptResult::Sent(r) if r.code == 250),
        "{first:?}\n{log}"
    );
    assert!(
        matches!(&again[..], [RcptResult::Sent(r)] if r.code == 250),
        "{again:?}\n{log}"
    );

    let expected = stored_form(&big);
    let erin = dovecot.messages("example.org", "erin");
    assert_eq!(erin.len(), 2, "{log}");
    let frank = dovecot.messages("example.org", "frank");
    assert_eq!(frank.len(), 1, "{log}");
    assert_message(&frank[0], "s@sender.test", &expected);
    assert!(dovecot.messages("example.org", "full").is_empty());
    assert!(dovecot.messages("example.org", "nosuchuser").is_empty());
    let mut bodies: Vec<&Vec<u8>> = erin.iter().collect();
    bodies.sort_by_key(|b| b.len());
    assert!(bodies[0].ends_with(b"Subject: second\n\nsecond\n"));
    assert!(bodies[1].ends_with(&expected));
}

#[test]
fn lmtp_connect_failure_is_transient() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.sock");
    let err = runtime()
        .block_on(Connection::connect_lmtp(
            &LmtpTarget::Unix(missing),
            &config(),
            None,
        ))
        .err()
        .expect("no such socket");
    assert!(err.to_string().starts_with("connect failed"), "{err}");
    assert!(!err.is_permanent());
}

fn target_port(t: &LmtpTarget) -> u16 {
    match t {
        LmtpTarget::Tcp(a) => a.port(),
        LmtpTarget::Unix(_) => panic!("not TCP"),
    }
}
