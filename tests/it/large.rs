//! Large messages: streamed into the spool in parts as DATA arrives, and out again part by
//! part (delivery to a real primary, `show --body`, export), byte for byte; the parts of a
//! message whose sender vanished mid-DATA are removed, at once or at the next start.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::*;

/// A message of `mib` MiB starting with `X-Test: NAME`: 8-bit text lines (some with a
/// leading dot, stuffed on the wire; some starting `From `, quoted in an mbox), CRLF line
/// ends.
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
            _ if n.is_multiple_of(97) => format!("From line {n}, quoted in an mbox\r\n"),
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

/// `python3 -c PEAK FILE PROGRAM ARGS...`: runs the program and writes its peak resident
/// memory (KiB, `ru_maxrss` of the child alone) to FILE; exits with its status. A wrapper
/// of its own because the `ru_maxrss` of a child spawned by the test itself would count the
/// test process's memory at the fork.
const PEAK: &str = r#"
import resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
with open(sys.argv[1], "w") as f:
    f.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(code)
"#;

/// Runs `program args` (at most 300 s) with standard output into the file `stdout`;
/// returns whether it exited 0, its standard error, and its peak resident memory in MiB.
fn run_peak(program: &Path, args: &[&str], stdout: &Path) -> (bool, String, u64) {
    let rss = stdout.with_extension("rss");
    let out = Command::new("timeout")
        .args(["-k", "5", "300", "python3", "-c", PEAK])
        .arg(&rss)
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(fs::File::create(stdout).unwrap())
        .output()
        .expect("run timeout python3");
    let kib: u64 = fs::read_to_string(&rss)
        .unwrap_or_else(|e| panic!("no peak RSS ({e}): {}", text(&out.stderr)))
        .parse()
        .unwrap();
    (out.status.success(), text(&out.stderr), kib / 1024)
}

/// `message` as mboxrd writes it: LF line ends, `From ` lines quoted (the message has no
/// `>From ` lines, no bare CR and no `From ` on its first line).
fn mboxrd_body(message: &[u8]) -> Vec<u8> {
    let lf = String::from_utf8(message.to_vec())
        .unwrap()
        .replace("\r\n", "\n")
        .replace("\nFrom ", "\n>From ");
    lf.into_bytes()
}

#[test]
fn a_large_archived_message_is_imported_catted_and_mboxed_in_bounded_memory() {
    const MIB: usize = 100;
    let mut env = MxEnv::new();
    let mut server = env.start();
    assert!(stop_server(&mut server));
    // Held here: the import must still arrive held, large or not.
    check_ok("mxspool hold", &env.mxspool(&["hold", "example.com"]));

    let message = big("imported", MIB);
    let id = "1K1KC7P0X5B00";
    let archived: spool_tools::ArchivedEnvelope = serde_json::from_value(serde_json::json!({
        "id": id, "domain": "example.com", "sender": "alice@sender.test",
        "recipients": [{"address": "bob@example.com", "state": "pending"}],
        "arrival": "2026-12-01T10:20:30.000Z", "attempts": 1, "body": "8bitmime"
    }))
    .unwrap();
    let archive = env.dir.path().join("big.tar");
    let mut w = spool_tools::create_file(
        &archive,
        spool_tools::ArchiveMeta::new("elsewhere.test", Some("example.com".into())),
    )
    .unwrap();
    w.add(&archived, &message).unwrap();
    w.finish().unwrap();

    // import, as its own process (no server runs). Over max_message_size (50 MiB by
    // default): refused by its size in the manifest, never read.
    let bin = Path::new(BIN);
    let config = env.config.to_str().unwrap().to_string();
    let out = env.dir.path().join("import.out");
    let args = ["--config", &config, "import", archive.to_str().unwrap()];
    let (ok, err, peak) = run_peak(bin, &args, &out);
    assert!(!ok, "a {MIB} MiB message imported over max_message_size");
    assert!(err.contains("more than the 52428800 allowed"), "{err}");
    assert!(peak < 64, "refusing a {MIB} MiB member took {peak} MiB");
    assert!(env.queue(None).is_empty());
    // Allowed: the member is stored part by part.
    let toml = fs::read_to_string(&env.config).unwrap();
    let toml = toml.replacen("[queue]", "max_message_size = \"128MiB\"\n\n[queue]", 1);
    fs::write(&env.config, toml).unwrap();
    let (ok, err, peak) = run_peak(bin, &args, &out);
    assert!(ok, "mxspool import failed: {err}");
    eprintln!("mxspool import of a {MIB} MiB member: peak RSS {peak} MiB");
    assert!(
        peak < 128,
        "importing a {MIB} MiB member took {peak} MiB: it was held whole"
    );
    let said = fs::read_to_string(&out).unwrap();
    assert!(said.contains("1 message(s) imported"), "{said}\n{err}");
    let q = env.queue(None);
    assert_eq!(q.len(), 1, "{q:?}");
    assert!(q[0].held, "imported for a held domain, but not held: {q:?}");
    assert_eq!(q[0].size, message.len() as u64);

    // Byte for byte in the spool.
    let shown = env.mxspool(&["show", "--body", id]);
    check_ok("mxspool show --body", &shown);
    let start = format!("*** MESSAGE CONTENTS {id} ***\n");
    let end = format!("*** END OF MESSAGE {id} ***\n");
    let at = find(&shown.stdout[..4096], start.as_bytes()).expect("contents marker") + start.len();
    assert!(
        shown.stdout[at..] == [&message[..], end.as_bytes()].concat()[..],
        "show --body differs from the archived message"
    );

    // Importing again adds nothing.
    let again = env.mxspool(&["import", archive.to_str().unwrap()]);
    check_ok("second import", &again);
    assert!(text(&again.stdout).contains("0 message(s) imported, 1 already"));
    assert_eq!(env.queue(None).len(), 1);

    // spool-tools cat and mbox write it chunk by chunk.
    let tools = spool_tools();
    let cat = env.dir.path().join("cat.out");
    let archive = archive.to_str().unwrap();
    let (ok, err, peak) = run_peak(&tools, &[archive, "cat", id], &cat);
    assert!(ok, "spool-tools cat failed: {err}");
    eprintln!("spool-tools cat of a {MIB} MiB member: peak RSS {peak} MiB");
    assert!(peak < 32, "spool-tools cat took {peak} MiB");
    assert!(
        fs::read(&cat).unwrap() == message,
        "cat differs from the message"
    );

    let mbox = env.dir.path().join("mbox.out");
    let (ok, err, peak) = run_peak(&tools, &[archive, "mbox"], &mbox);
    assert!(ok, "spool-tools mbox failed: {err}");
    eprintln!("spool-tools mbox of a {MIB} MiB member: peak RSS {peak} MiB");
    assert!(peak < 32, "spool-tools mbox took {peak} MiB");
    let got = fs::read(&mbox).unwrap();
    let from = b"From alice@sender.test Tue Dec  1 10:20:30 2026\n";
    assert!(got.starts_with(from), "{:?}", text(&got[..100]));
    let body = mboxrd_body(&message);
    assert!(
        body.windows(8).any(|w| w == b"\n>From l"),
        "the test has From_ lines"
    );
    assert!(
        got[from.len()..] == [&body[..], b"\n"].concat()[..],
        "the mbox differs from the message"
    );
}
