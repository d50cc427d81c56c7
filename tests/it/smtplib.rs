//! Python's smtplib as the client: EHLO extensions, DSN parameters, a refused relay
//! recipient next to an accepted one, SMTPUTF8, and the stored message.

use std::process::Command;

use serde_json::{json, Value};

use crate::harness::{
    assert_stored, check_ok, has_command, it_file, run_with_input, MxEnv, HOSTNAME,
};

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn smtplib() {
    let mut env = MxEnv::new();
    let server = env.start();

    // CRLF lines (smtplib would convert bare LF), a line that needs dot-stuffing, and a body
    // line that is only a dot in the middle of the text.
    let dsn_msg = b"From: Sender <s@sender.test>\r\n\
To: u@example.com\r\n\
Subject: smtplib DSN test\r\n\
Message-ID: <smtplib-1@sender.test>\r\n\
\r\n\
first line\r\n\
.leading dot, stuffed on the wire\r\n\
.\r\n\
..two dots\r\n\
last line\r\n"
        .to_vec();
    let utf8_msg = "From: <j\u{fc}rgen@sender.test>\r\n\
To: <m\u{fc}ller@example.com>\r\n\
Subject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\n\
Message-ID: <smtplib-2@sender.test>\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: 8bit\r\n\
\r\n\
Gr\u{fc}\u{df}e aus K\u{f6}ln.\r\n"
        .as_bytes()
        .to_vec();

    let request = json!({
        "helo": "client.test",
        "transactions": [
            {
                "from": "s@sender.test",
                "to": ["u@example.com", "u@evil.test"],
                "mail_options": ["RET=HDRS", "ENVID=abc"],
                "rcpt_options": ["NOTIFY=FAILURE"],
                "message_hex": hex(&dsn_msg),
            },
            {
                "from": "j\u{fc}rgen@sender.test",
                "to": ["m\u{fc}ller@example.com"],
                "mail_options": ["SMTPUTF8", "BODY=8BITMIME"],
                "message_hex": hex(&utf8_msg),
            },
        ],
    });
    let out = run_with_input(
        Command::new("python3")
            .arg(it_file("smtplib_client.py"))
            .arg("127.0.0.1")
            .arg(env.port.to_string()),
        60,
        request.to_string().as_bytes(),
    );
    check_ok("smtplib client", &out);
    let res: Value = serde_json::from_slice(&out.stdout).expect("client output is JSON");

    assert_eq!(res["banner"][0], 220, "banner: {}", res["banner"]);
    let banner = res["banner"][1].as_str().unwrap();
    assert_eq!(banner, format!("{HOSTNAME} ESMTP mxspool"));
    for ext in [
        "pipelining",
        "size",
        "8bitmime",
        "enhancedstatuscodes",
        "smtputf8",
        "dsn",
    ] {
        assert!(
            res["ehlo"].get(ext).is_some(),
            "EHLO does not advertise {ext}: {}",
            res["ehlo"]
        );
    }

    // Transaction 1: the partner recipient accepted, the other refused with 550 5.7.1.
    let r1 = &res["results"][0];
    assert!(r1.get("error").is_none(), "transaction 1 failed: {r1}");
    let refused = r1["refused"].as_object().unwrap();
    assert_eq!(refused.len(), 1, "refused: {refused:?}");
    let evil = &refused["u@evil.test"];
    assert_eq!(evil[0], 550, "u@evil.test: {evil}");
    assert!(
        evil[1].as_str().unwrap().starts_with("5.7.1"),
        "u@evil.test refused without 5.7.1: {evil}"
    );
    // Transaction 2: SMTPUTF8 addresses accepted.
    let r2 = &res["results"][1];
    assert_eq!(r2["refused"], json!({}), "transaction 2: {r2}");

    let queue = env.queue(None);
    assert_eq!(queue.len(), 2, "queue: {queue:#?}");
    let e1 = queue
        .iter()
        .find(|e| e.sender == "s@sender.test")
        .unwrap_or_else(|| panic!("s@sender.test not queued: {queue:#?}"));
    assert_eq!(e1.domain, "example.com");
    let rcpts: Vec<_> = e1.recipients.iter().map(|r| r.address.as_str()).collect();
    assert_eq!(rcpts, ["u@example.com"]);
    assert_eq!(e1.recipients[0].state, "pending");
    assert!(!e1.held);
    assert!(
        chrono::DateTime::parse_from_rfc3339(&e1.arrival).is_ok(),
        "arrival is not RFC 3339: {}",
        e1.arrival
    );
    let show = assert_stored(&env, e1, &dsn_msg);
    if has_command("show") {
        assert!(
            show.contains("abc"),
            "ENVID=abc not kept, mxspool show:\n{show}"
        );
    }

    let e2 = queue
        .iter()
        .find(|e| e.sender == "j\u{fc}rgen@sender.test")
        .unwrap_or_else(|| panic!("the SMTPUTF8 sender is not queued: {queue:#?}"));
    let rcpts: Vec<_> = e2.recipients.iter().map(|r| r.address.as_str()).collect();
    assert_eq!(rcpts, ["m\u{fc}ller@example.com"]);
    assert_stored(&env, e2, &utf8_msg);

    // The log line of each accepted message.
    let log = server.log();
    for e in [e1, e2] {
        let line = format!("{}: from=<{}>, size=", e.id, e.sender);
        assert!(
            log.lines()
                .any(|l| l.contains(&line) && l.contains("nrcpt=1 (queued)")),
            "no `{line}.., nrcpt=1 (queued)` log line:\n{log}"
        );
    }
    // --domain filters.
    assert_eq!(env.queue(Some("example.com")).len(), 2);
}
