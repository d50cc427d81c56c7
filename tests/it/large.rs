//! Large messages: streamed into the spool in parts as DATA arrives, and out again part by
//! part (delivery to a real primary, `show --body`, export), byte for byte; the parts of a
//! message whose sender vanished mid-DATA are removed, at once or at the next start.

use std::fs;
use std::time::Duration;

use crate::harness::*;

/// A message of `mib` MiB starting with `X-Test: NAME`: 8-bit text lines (some with a
/// leading dot, stuffed on the wire), CRLF line ends.
fn big(name: &str, mib: usize) -> Vec<u8> {
    let mut m = format!(
        "X-Test: {name}\r\nFrom: <alice@sender.test>\r\nTo: <bob@example.com>\r\n\
         Subject: {mib} MiB\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    )
    .into_bytes();
    let mut n = 0u64;
    while m.len() < mib << 20 {
        n += 1;
        let line = match n % 5 {
            0 => format!(".dot-stuffed line {n}, and more after it {:040}\r\n", n * 7),
            1 => format!("ação número {n} — {:060}\r\n", n * 3),
            _ => format!("line {n} {:0width$}\r\n", n, width = (n % 70) as usize),
        };
        m.extend_from_slice(line.as_bytes());
    }
    m
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The server's peak resident memory (VmHWM), in MiB.
fn peak_rss_mib(server: &Server) -> u64 {
    let status = fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kb / 1024
}

#[test]
fn a_large_message_is_streamed_in_shown_exported_and_delivered_byte_exact() {
    let primary_port = free_port_at("127.0.0.3");
    let mut backup = MxEnv::custom(&format!(
        "[queue]\nretry_interval = \"1h\"\n\n[delivery]\nconnect_timeout = \"2s\"\n\n\
         [[partner]]\ndomain = \"example.com\"\nroute = [\"127.0.0.3:{primary_port}\"]\n"
    ));
    let server = backup.start();

    let message = big("forty", 40);
    let id = smtp_send(
        &backup.addr(),
        "alice@sender.test",
        &["bob@example.com"],
        &message,
    );
    let peak = peak_rss_mib(&server);
    eprintln!("backup MX peak RSS after a 40 MiB message: {peak} MiB");
    assert!(
        peak < 80,
        "a 40 MiB message pushed the server's peak RSS to {peak} MiB: it was held whole"
    );

    // show --body: the Received: line, then the message exactly.
    let out = backup.mxspool(&["show", "--body", &id]);
    check_ok("mxspool show --body", &out);
    let at = find(&out.stdout[..4096.min(out.stdout.len())], b"X-Test: forty")
        .expect("the message in show --body");
    assert!(
        out.stdout[at..].starts_with(&message),
        "show --body differs from what was sent"
    );
    assert_eq!(
        &out.stdout[at + message.len()..],
        format!("*** END OF MESSAGE {id} ***\n").as_bytes()
    );

    // export: a whole archive that verifies, with the message exactly.
    let archive = backup.dir.path().join("q.tar");
    let out = backup.mxspool(&[
        "export",
        "example.com",
        "--output",
        archive.to_str().unwrap(),
    ]);
    check_ok("mxspool export", &out);
    check_ok(
        "spool-tools verify",
        &spool_tools_run(&archive, &["verify"]),
    );
    let cat = spool_tools_run(&archive, &["cat", &id]);
    check_ok("spool-tools cat", &cat);
    let at = find(&cat.stdout[..4096], b"X-Test: forty").expect("the message in the archive");
    assert_eq!(&cat.stdout[at..], &message[..]);

    // The primary comes up (an mxspool delivering to Maildir): the message arrives whole.
    let mut primary = MxEnv::host(
        "primary.example.com",
        "127.0.0.3",
        primary_port,
        "[[local]]\ndomain = \"example.com\"\nmaildir = \"{dir}/mail/{user}\"\n",
    );
    let primary_server = primary.start();
    let out = backup.mxspool(&["flush", "example.com"]);
    check_ok("mxspool flush example.com", &out);
    let maildir = primary.dir.path().join("mail/bob");
    let delivered = wait_for(Duration::from_secs(60), Duration::from_millis(200), || {
        !maildir_files(&maildir).is_empty()
    });
    assert!(
        delivered,
        "nothing in {}\n--- backup\n{}\n--- primary\n{}",
        maildir.display(),
        server.log(),
        primary_server.log()
    );
    let files = maildir_files(&maildir);
    assert_eq!(files.len(), 1);
    let file = &files[0].1;
    let at = find(&file[..8192], b"X-Test: forty").expect("the message in the Maildir file");
    let lf: Vec<u8> = String::from_utf8(message.clone())
        .unwrap()
        .replace("\r\n", "\n")
        .into_bytes();
    assert!(file[at..] == lf[..], "the delivered message differs");
    assert!(
        backup.queue(None).is_empty(),
        "delivered mail left the queue"
    );
}

#[test]
fn parts_of_a_message_whose_sender_vanished_are_removed() {
    let mut env = MxEnv::new();
    let mut server = env.start();
    let message = big("gone", 6);

    // One client goes away mid-DATA: its parts go at once (the server lives on).
    let (mut c, _) = Smtp::connect(&env.addr()).unwrap();
    c.cmd("EHLO client.test").unwrap();
    c.cmd("MAIL FROM:<a@sender.test>").unwrap();
    c.cmd("RCPT TO:<bob@example.com>").unwrap();
    assert_eq!(c.cmd("DATA").unwrap().code, 354);
    c.send_raw(&dot_stuff(&message)[..4 << 20]).unwrap();
    drop(c);
    // A second one is cut by kill -9 mid-DATA: the next start removes its parts.
    let (mut c, _) = Smtp::connect(&env.addr()).unwrap();
    c.cmd("EHLO client.test").unwrap();
    c.cmd("MAIL FROM:<a@sender.test>").unwrap();
    c.cmd("RCPT TO:<bob@example.com>").unwrap();
    assert_eq!(c.cmd("DATA").unwrap().code, 354);
    c.send_raw(&dot_stuff(&message)[..3 << 20]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    server.kill9();
    drop(c);

    let server = env.start();
    assert!(
        wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
            server
                .log()
                .contains("removed the parts of 1 message(s) whose DATA never ended")
        }),
        "no sweep at start:\n{}",
        server.log()
    );
    assert!(env.queue(None).is_empty());
    // And the spool still takes mail, large and small.
    smtp_send(&env.addr(), "a@sender.test", &["bob@example.com"], &message);
    smtp_send(
        &env.addr(),
        "a@sender.test",
        &["bob@example.com"],
        b"Subject: small\r\n\r\nx\r\n",
    );
    assert_eq!(env.queue(None).len(), 2);
}

#[test]
fn a_bounce_returns_at_most_bounce_size_limit_of_a_large_message() {
    let mut env = MxEnv::custom(
        "[queue]\nretry_interval = \"1h\"\nbounce_size_limit = \"20KiB\"\n\n\
         [[partner]]\ndomain = \"example.com\"\nroute = [\"127.0.0.1:1\"]\n",
    );
    let _server = env.start();
    let message = big("returned", 2);
    let id = smtp_send_with(
        &env.addr(),
        "MAIL FROM:<alice@sender.test> RET=FULL",
        &["bob@example.com"],
        &[],
        &message,
    );
    // The DSN is kept where it can be read: its domain held.
    check_ok(
        "mxspool hold sender.test",
        &env.mxspool(&["hold", "--force", "sender.test"]),
    );
    check_ok("mxspool bounce", &env.mxspool(&["bounce", &id]));
    let q = env.queue(None);
    let dsn = q
        .iter()
        .find(|e| e.domain == "sender.test")
        .unwrap_or_else(|| panic!("no DSN queued for the sender: {q:?}"));
    assert!(
        dsn.size < 40 << 10,
        "the DSN of a 2 MiB message is {} bytes (bounce_size_limit 20 KiB)",
        dsn.size
    );
    let out = env.mxspool(&["show", "--body", &dsn.id]);
    check_ok("mxspool show --body DSN", &out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("message/rfc822"), "{text}");
    // The returned part is the start of the message, cut after a whole line.
    let at = find(&out.stdout, b"X-Test: returned").expect("the original in the DSN");
    let returned_end = find(&out.stdout[at..], b"\r\n--").expect("the end of the returned part");
    let returned = &out.stdout[at..at + returned_end];
    assert!(
        returned.len() <= 20 << 10,
        "{} bytes returned",
        returned.len()
    );
    assert!(
        returned.len() > 10 << 10,
        "{} bytes returned",
        returned.len()
    );
    let same = returned
        .iter()
        .zip(&message)
        .take_while(|(a, b)| a == b)
        .count();
    assert!(
        message.starts_with(returned),
        "the returned part ({} bytes) differs from the message after {same} bytes: {:?} / {:?}",
        returned.len(),
        String::from_utf8_lossy(
            &returned[same.saturating_sub(40)..(same + 40).min(returned.len())]
        ),
        String::from_utf8_lossy(&message[same.saturating_sub(40)..same + 40])
    );
    assert!(returned.ends_with(b"\r\n"));
}
