//! `kill -9` in the middle of a drain loses nothing: 300 queued messages, the primary comes
//! back, mxspool is killed after the first ~30 have arrived and restarted on the same spool.
//! Every message must arrive at least once (a message in flight may arrive twice).

use std::collections::BTreeMap;
use std::thread;
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::receiver::{Behaviour, Receiver};

const TOTAL: usize = 300;
const CLIENTS: usize = 6;

fn subject_of(data: &[u8]) -> String {
    let t = String::from_utf8_lossy(data);
    t.lines()
        .find_map(|l| l.strip_prefix("Subject: "))
        .unwrap_or("")
        .trim_end()
        .to_string()
}

#[test]
fn kill9_during_delivery_loses_nothing() {
    let port = free_port_at("127.0.0.2");
    let primary: std::net::SocketAddr = format!("127.0.0.2:{port}").parse().unwrap();
    let mut env = MxEnv::custom(&format!(
        "[queue]\nretry_interval = \"1s\"\n\n[delivery]\nconnect_timeout = \"2s\"\n\n\
         [[partner]]\ndomain = \"example.com\"\nroute = [\"{primary}\"]\n"
    ));
    let mut server = env.start();

    // The primary is down; 300 messages with unique subjects go in over 6 connections.
    let addr = env.addr();
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let addr = addr.clone();
            thread::spawn(move || {
                let batch: Vec<(String, String, Vec<u8>)> = (0..TOTAL / CLIENTS)
                    .map(|i| {
                        let n = c * (TOTAL / CLIENTS) + i;
                        let msg = format!(
                            "From: <alice@sender.test>\r\nTo: <u{n}@example.com>\r\n\
                             Subject: crash-{n:03}\r\nMessage-ID: <crash{n}@sender.test>\r\n\r\n\
                             message {n}\r\n"
                        );
                        (
                            "alice@sender.test".to_string(),
                            format!("u{n}@example.com"),
                            msg.into_bytes(),
                        )
                    })
                    .collect();
                smtp_send_all(&addr, &batch)
            })
        })
        .collect();
    let ids: Vec<String> = clients
        .into_iter()
        .flat_map(|t| t.join().expect("client thread"))
        .collect();
    assert_eq!(ids.len(), TOTAL);
    eprintln!("{TOTAL} messages accepted in {:?}", started.elapsed());
    let queued = wait_for(Duration::from_secs(30), Duration::from_millis(200), || {
        env.queue(None).len() == TOTAL
    });
    assert!(
        queued,
        "{} of {TOTAL} queued\n--- mxspool log\n{}",
        env.queue(None).len(),
        server.log()
    );

    // The primary comes back; after ~30 deliveries mxspool dies.
    let receiver = Receiver::start(primary, Behaviour::Accept);
    assert!(
        receiver.wait_for(30, Duration::from_secs(20)),
        "only {} messages arrived in 20 s\n--- mxspool log\n{}",
        receiver.messages().len(),
        server.log()
    );
    server.kill9();
    let at_kill = receiver.messages().len();
    eprintln!("killed mxspool (SIGKILL) after {at_kill} deliveries");
    let first_log = server.log();
    assert!(
        at_kill < TOTAL,
        "all {TOTAL} messages were delivered before the kill; nothing was in flight\n{first_log}"
    );
    let left = env.queue(None).len();
    eprintln!("{left} messages still queued after the kill");

    // Restart on the same spool: the rest is delivered.
    let server = env.start();
    let emptied = wait_for(Duration::from_secs(60), Duration::from_millis(200), || {
        env.queue(None).is_empty()
    });
    let received = receiver.messages();
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for m in &received {
        *count.entry(subject_of(&m.data)).or_default() += 1;
    }
    let missing: Vec<String> = (0..TOTAL)
        .map(|n| format!("crash-{n:03}"))
        .filter(|s| !count.contains_key(s))
        .collect();
    assert!(
        emptied,
        "queue not empty 60 s after the restart ({} left; {} missing at the receiver)\n\
         --- log after restart\n{}",
        env.queue(None).len(),
        missing.len(),
        server.log()
    );
    let duplicates: Vec<(&String, &usize)> = count.iter().filter(|(_, &c)| c > 1).collect();
    eprintln!(
        "{} messages arrived for {TOTAL} sent: {} distinct, {} duplicated {:?}",
        received.len(),
        count.len(),
        duplicates.len(),
        duplicates
    );
    assert!(
        missing.is_empty(),
        "{} messages never arrived: {missing:?}\n--- log before the kill\n{first_log}\n\
         --- log after restart\n{}",
        missing.len(),
        server.log()
    );
    let strangers: Vec<&String> = count.keys().filter(|s| !s.starts_with("crash-")).collect();
    assert!(strangers.is_empty(), "unexpected messages: {strangers:?}");
    for m in &received {
        assert_eq!(m.sender, "alice@sender.test");
        assert_eq!(m.recipients.len(), 1);
        let n: usize = subject_of(&m.data)["crash-".len()..].parse().unwrap();
        assert_eq!(
            m.recipients[0],
            format!("u{n}@example.com"),
            "wrong envelope"
        );
    }
    // The restarted server did the rest of the work.
    assert!(
        server.log().contains("status=sent (250"),
        "no delivery after the restart:\n{}",
        server.log()
    );
}
