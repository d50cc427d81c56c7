//! Durability: 20 clients send mail as fast as they can; the server gets SIGKILL mid-stream;
//! after a restart on the same spool every message that got `250` after its final dot is
//! queued, once, whole, and nothing half-written is.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::harness::{assert_stored, has_command, MxEnv, Smtp};

const CLIENTS: usize = 20;
/// Messages per connection before a client reconnects.
const PER_CONNECTION: u32 = 10;

/// One message a client tried to send.
struct Sent {
    sender: String,
    message: Vec<u8>,
    body_sha256: String,
    /// Got `250` after the final dot.
    acked: bool,
}

/// A small deterministic PRNG (xorshift64*), so the test needs no `rand`.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Message `seq` of client `client`: the sender is unique and of fixed length (so mxspool's
/// `Received:` header has the same length for every message), the body is of random length
/// (some lines start with a dot) and its SHA-256 is in a header.
fn message(client: usize, seq: u32, rng: &mut Rng) -> (String, Vec<u8>, String) {
    let sender = format!("c{client:02}-{seq:06}@sender.test");
    let lines = 1 + rng.next() % 200;
    let mut body = String::new();
    for i in 0..lines {
        if rng.next().is_multiple_of(10) {
            body.push('.');
        }
        let len = rng.next() % 100;
        for _ in 0..len {
            body.push((b'!' + (rng.next() % 94) as u8) as char);
        }
        body.push_str(&format!(" {client}/{seq}/{i}\r\n"));
    }
    let sha = format!("{:x}", Sha256::digest(body.as_bytes()));
    let msg = format!(
        "From: <{sender}>\r\nTo: <u@example.com>\r\nSubject: crash test {client}/{seq}\r\n\
         X-Body-SHA256: {sha}\r\n\r\n{body}"
    );
    (sender, msg.into_bytes(), sha)
}

/// Sends one message on `c`; `Ok(true)` if the final dot got 250.
fn send(
    c: &mut Smtp,
    sent: &mut Vec<Sent>,
    sender: String,
    msg: Vec<u8>,
    sha: String,
) -> std::io::Result<bool> {
    let r = c.cmd(&format!("MAIL FROM:<{sender}>"))?;
    if r.code != 250 {
        return Err(std::io::Error::other(format!("MAIL: {r}")));
    }
    let r = c.cmd("RCPT TO:<u@example.com>")?;
    if r.code != 250 {
        return Err(std::io::Error::other(format!("RCPT: {r}")));
    }
    // Recorded before DATA: from here on the message may be in the spool.
    sent.push(Sent {
        sender,
        message: msg.clone(),
        body_sha256: sha,
        acked: false,
    });
    match c.data(&msg)? {
        Ok(r) if r.code == 250 => {
            sent.last_mut().unwrap().acked = true;
            Ok(true)
        }
        Ok(r) | Err(r) => Err(std::io::Error::other(format!("DATA: {r}"))),
    }
}

/// One client: sends until `stop` or until the server is gone.
fn client(addr: String, id: usize, stop: Arc<AtomicBool>) -> (Vec<Sent>, Option<String>) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (id as u64 + 1));
    let mut sent = Vec::new();
    let mut seq = 0;
    let error = 'outer: loop {
        if stop.load(Ordering::Relaxed) {
            break None;
        }
        let (mut c, banner) = match Smtp::connect(&addr) {
            Ok(x) => x,
            Err(e) => break Some(format!("connect: {e}")),
        };
        if banner.code != 220 {
            break Some(format!("banner: {banner}"));
        }
        match c.cmd("EHLO client.test") {
            Ok(r) if r.code == 250 => {}
            Ok(r) => break Some(format!("EHLO: {r}")),
            Err(e) => break Some(format!("EHLO: {e}")),
        }
        for _ in 0..PER_CONNECTION {
            if stop.load(Ordering::Relaxed) {
                break 'outer None;
            }
            seq += 1;
            let (sender, msg, sha) = message(id, seq, &mut rng);
            if let Err(e) = send(&mut c, &mut sent, sender, msg, sha) {
                break 'outer Some(e.to_string());
            }
        }
        let _ = c.cmd("QUIT");
    };
    (sent, error)
}

#[test]
fn crash() {
    let mut env = MxEnv::new();
    let mut server = env.start();

    // Calibration: how much larger than the sent message its `size` is (mxspool's
    // `Received:` header, or nothing). All senders have the same length, so this is constant.
    let mut sent = Vec::new();
    let (mut c, _) = Smtp::connect(&env.addr()).unwrap();
    c.cmd("EHLO client.test").unwrap();
    let (sender, msg, sha) = message(99, 0, &mut Rng(42));
    assert!(send(&mut c, &mut sent, sender, msg, sha).unwrap());
    let _ = c.cmd("QUIT");
    let q = env.queue(None);
    assert_eq!(q.len(), 1, "{q:#?}");
    assert_stored(&env, &q[0], &sent[0].message);
    let overhead = q[0].size as i64 - sent[0].message.len() as i64;

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| {
            let (addr, stop) = (env.addr(), stop.clone());
            thread::spawn(move || client(addr, id, stop))
        })
        .collect();
    thread::sleep(Duration::from_secs(2));
    server.kill9();
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for h in clients {
        let (s, e) = h.join().unwrap();
        sent.extend(s);
        errors.extend(e);
    }
    let first_log = server.log();
    drop(server);

    let acked = sent.iter().filter(|s| s.acked).count();
    assert!(
        acked > CLIENTS,
        "only {acked} messages acknowledged in 2 s; client errors: {errors:?}\n{first_log}"
    );

    let server = env.start();
    let queue = env.queue(None);
    let by_sender: HashMap<&str, &Sent> = sent.iter().map(|s| (s.sender.as_str(), s)).collect();
    let mut seen = HashSet::new();
    for e in &queue {
        let s = by_sender
            .get(e.sender.as_str())
            .unwrap_or_else(|| panic!("queued message from a sender never used: {e:?}"));
        assert!(seen.insert(e.sender.as_str()), "queued twice: {}", e.sender);
        let expected = s.message.len() as i64 + overhead;
        assert_eq!(
            e.size as i64,
            expected,
            "{} ({}, acked: {}): size {} but the message sent has {} (+{overhead}): \
             half-written?",
            e.id,
            e.sender,
            s.acked,
            e.size,
            s.message.len()
        );
        let rcpts: Vec<_> = e.recipients.iter().map(|r| r.address.as_str()).collect();
        assert_eq!(rcpts, ["u@example.com"], "{e:?}");
    }
    let lost: Vec<_> = sent
        .iter()
        .filter(|s| s.acked && !seen.contains(s.sender.as_str()))
        .map(|s| s.sender.as_str())
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {acked} acknowledged messages lost after kill -9: {:?}...\n--- log before the \
         kill\n{first_log}\n--- log after restart\n{}",
        lost.len(),
        &lost[..lost.len().min(10)],
        server.log()
    );

    // A sample checked byte for byte against what was sent.
    let sample: Vec<_> = queue.iter().step_by((queue.len() / 10).max(1)).collect();
    for e in sample {
        let s = by_sender[e.sender.as_str()];
        let show = assert_stored(&env, e, &s.message);
        if has_command("show") {
            assert!(show.contains(&s.body_sha256), "{}:\n{show}", e.id);
        }
    }
    eprintln!(
        "crash: {} attempted, {acked} acknowledged, {} queued after restart",
        sent.len(),
        queue.len()
    );
}
