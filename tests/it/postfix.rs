//! Postfix as the sending MTA: a private instance with mxspool as its relayhost. Mail injected
//! with Postfix's sendmail must arrive in mxspool's queue.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::harness::{wait_for, MxEnv, Postfix};

#[test]
fn postfix_relayhost() {
    let mut env = MxEnv::new();
    let server = env.start();

    // No smtpd: mail enters through sendmail/postdrop/pickup, leaves through the smtp client.
    let mut postfix = Postfix::start(
        &format!(
            "relayhost = [127.0.0.1]:{port}\n\
             minimal_backoff_time = 1s\n\
             maximal_backoff_time = 2s\n\
             queue_run_delay = 1s\n",
            port = env.port
        ),
        "",
    );

    let mut expected = BTreeSet::new();
    for i in 1..=5 {
        let rcpt = format!("user{i}@example.com");
        let msg = format!(
            "From: s@sender.test\nTo: {rcpt}\nSubject: via postfix {i}\n\nmessage {i}\n.\nend\n"
        );
        postfix.sendmail("s@sender.test", &[&rcpt], msg.as_bytes());
        expected.insert(rcpt);
    }

    let mut queued = BTreeSet::new();
    let arrived = wait_for(Duration::from_secs(60), Duration::from_millis(500), || {
        queued = env
            .queue(Some("example.com"))
            .into_iter()
            .filter(|e| e.sender == "s@sender.test")
            .flat_map(|e| e.recipients.into_iter().map(|r| r.address))
            .collect();
        queued == expected
    });
    assert!(
        arrived,
        "after 60 s mxspool has {queued:?}, expected {expected:?}\n--- postfix log\n{}\n--- mxspool log\n{}",
        postfix.log(),
        server.log()
    );
    let sent = postfix.log().matches("status=sent").count();
    assert_eq!(sent, 5, "postfix log:\n{}", postfix.log());
    postfix.stop();
}
