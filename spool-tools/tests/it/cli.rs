//! The `spool-tools` binary: list, verify, cat, mbox, replay.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::thread;

use crate::support::*;

#[test]
fn list_prints_aligned_rows_and_a_count() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample_archive(dir.path(), "q.tar.gz");
    let out = spool_tools(&[path.to_str().unwrap(), "list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert!(lines[0].starts_with("ID "), "{stdout}");
    assert!(lines[1].starts_with(ID_8BIT));
    assert!(lines[1].contains("2024-05-01 10:20:30"));
    assert!(
        lines[1].ends_with("alice@example.org  bob@example.com, dave@example.com"),
        "{stdout}"
    );
    assert!(
        !lines[1].contains("carol"),
        "delivered recipients are not pending"
    );
    assert!(lines[2].contains("  <>  "), "{stdout}");
    assert!(lines[2].ends_with("erin@example.com"));
    // Aligned: the sender column starts at the same place on every row.
    let col = lines[1].find("alice").unwrap();
    assert_eq!(lines[2].find("<>").unwrap(), col);
    assert_eq!(lines[0].find("SENDER").unwrap(), col);
    let bytes = eight_bit().1.len() + with_from_lines().1.len();
    assert_eq!(
        lines[3],
        format!("-- 2 messages, 3 pending recipients, {bytes} bytes")
    );
}

#[test]
fn verify_says_ok_or_names_the_damaged_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample_archive(dir.path(), "q.tar");
    let p = path.to_str().unwrap();
    let out = spool_tools(&[p, "verify"]);
    assert!(out.status.success());
    assert!(
        text(&out.stdout).starts_with("OK: 2 messages (domain example.com"),
        "{}",
        text(&out.stdout)
    );

    let mut bytes = fs::read(&path).unwrap();
    let at = find(&bytes, b"The end.");
    bytes[at] = b't';
    fs::write(&path, &bytes).unwrap();
    let out = spool_tools(&[p, "verify"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "{ID_FROM}: {ID_FROM}.eml does not match its checksum"
        )),
        "{stdout}"
    );
    assert!(!stdout.contains(ID_8BIT), "{stdout}");
    // The other commands still give the good message and say what they skipped.
    let out = spool_tools(&[p, "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains(ID_8BIT));
    assert!(text(&out.stderr).contains(&format!("spool-tools: skipped {ID_FROM}:")));
}

#[test]
fn errors_are_one_line_and_exit_nonzero() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample_archive(dir.path(), "q.tar");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let p = path.to_str().unwrap();
    for cmd in [&["verify"][..], &["list"], &["mbox"], &["cat", ID_8BIT]] {
        let mut args = vec![p];
        args.extend_from_slice(cmd);
        let out = spool_tools(&args);
        assert_eq!(out.status.code(), Some(1), "{cmd:?}");
        let stderr = text(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("spool-tools: archive is truncated"),
            "{stderr}"
        );
        assert!(out.stdout.is_empty());
    }
    // --salvage gives what was read whole, and still exits 1.
    let out = spool_tools(&[p, "--salvage", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains(ID_8BIT));
    assert!(text(&out.stderr).contains("manifest.json"));

    let out = spool_tools(&[dir.path().join("nope.tar").to_str().unwrap(), "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with("spool-tools: "),
        "{}",
        text(&out.stderr)
    );
    let out = spool_tools(&[p, "cat", "NOSUCH"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn cat_writes_the_raw_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample_archive(dir.path(), "q.tgz");
    let out = spool_tools(&[path.to_str().unwrap(), "cat", ID_8BIT]);
    assert!(out.status.success());
    assert_eq!(out.stdout, eight_bit().1);
    let out = spool_tools(&[path.to_str().unwrap(), "cat", "ZZZ"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "spool-tools: no message ZZZ in the archive\n"
    );
}

/// Reads an mbox with Python's `mailbox.mbox` and gives back (From_ line, bytes) pairs,
/// the mboxrd quoting undone.
fn python_mbox(path: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let script = r#"
import mailbox, re, sys, json
mb = mailbox.mbox(sys.argv[1], create=False)
res = []
for key in mb.keys():
    data = re.sub(rb'(?m)^>(>*From )', rb'\1', mb.get_bytes(key))
    res.append([mb.get_message(key).get_from(), data.hex()])
print(json.dumps(res))
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(path)
        .output()
        .expect("python3 is required");
    assert!(out.status.success(), "python: {}", text(&out.stderr));
    let v: Vec<(String, String)> = serde_json::from_slice(&out.stdout).unwrap();
    v.into_iter()
        .map(|(from, hex)| {
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            (from, bytes)
        })
        .collect()
}

fn lf(b: &[u8]) -> Vec<u8> {
    String::from_utf8(b.to_vec())
        .unwrap()
        .replace("\r\n", "\n")
        .into_bytes()
}

#[test]
fn mbox_reads_back_with_python_mailbox() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample_archive(dir.path(), "q.tar");
    let out = spool_tools(&[path.to_str().unwrap(), "mbox"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(
            "\n>From the start.\n>>From quoted once\n>>>From quoted twice\nFrom\n From indented\n"
        ),
        "{stdout}"
    );
    let mbox = dir.path().join("out.mbox");
    fs::write(&mbox, &out.stdout).unwrap();
    let got = python_mbox(&mbox);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].0, "alice@example.org Wed May  1 10:20:30 2024");
    assert_eq!(got[1].0, "MAILER-DAEMON Wed May  1 10:21:40 2024");
    for ((_, data), (_, original)) in got.iter().zip([eight_bit(), with_from_lines()]) {
        let trim = |v: &[u8]| v.strip_suffix(b"\n").unwrap_or(v).to_vec();
        assert_eq!(trim(data), trim(&lf(&original)), "{}", text(data));
    }
}

/// What the test SMTP server heard in one transaction.
#[derive(Debug, Default)]
struct Txn {
    mail: String,
    rcpts: Vec<String>,
    data: Vec<u8>,
}

/// A tiny SMTP server on loopback for one connection; refuses RCPT for addresses
/// containing "refuse". Returns the address and a handle giving the transactions.
fn smtp_server() -> (String, thread::JoinHandle<(String, Vec<Txn>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handle = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        serve(stream)
    });
    (addr, handle)
}

fn serve(stream: TcpStream) -> (String, Vec<Txn>) {
    let mut w = stream.try_clone().unwrap();
    let mut r = BufReader::new(stream);
    let mut txns = Vec::new();
    let mut cur = Txn::default();
    let mut helo = String::new();
    w.write_all(b"220 test ESMTP\r\n").unwrap();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap() == 0 {
            break;
        }
        let line = line.trim_end().to_string();
        let verb = line.split([' ', ':']).next().unwrap().to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" => {
                helo = line[5..].to_string();
                b"250-test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250-DSN\r\n250 SIZE 10000000\r\n"
            }
            "MAIL" => {
                cur = Txn {
                    mail: line,
                    ..Txn::default()
                };
                b"250 2.1.0 Ok\r\n"
            }
            "RCPT" if line.contains("refuse") => b"550 5.1.1 no such user\r\n",
            "RCPT" => {
                cur.rcpts.push(line);
                b"250 2.1.5 Ok\r\n"
            }
            "DATA" => {
                w.write_all(b"354 go ahead\r\n").unwrap();
                loop {
                    let mut l = Vec::new();
                    r.read_until(b'\n', &mut l).unwrap();
                    if l == b".\r\n" {
                        break;
                    }
                    let l = if l.starts_with(b".") { &l[1..] } else { &l[..] };
                    cur.data.extend_from_slice(l);
                }
                txns.push(std::mem::take(&mut cur));
                b"250 2.0.0 Ok: queued as Q1\r\n"
            }
            "RSET" => b"250 2.0.0 Ok\r\n",
            "QUIT" => {
                w.write_all(b"221 2.0.0 Bye\r\n").unwrap();
                break;
            }
            _ => b"502 5.5.2 unknown\r\n",
        };
        w.write_all(reply).unwrap();
    }
    (helo, txns)
}

#[test]
fn replay_smtp_sends_the_original_envelope_to_pending_recipients() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample_archive(dir.path(), "q.tar");
    let (addr, server) = smtp_server();
    let out = spool_tools(&[
        path.to_str().unwrap(),
        "replay",
        "--smtp",
        &addr,
        "--helo",
        "replayer.example",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert_eq!(
        stdout,
        format!("{ID_8BIT}: sent (250 2.0.0 Ok: queued as Q1)\n{ID_FROM}: sent (250 2.0.0 Ok: queued as Q1)\n")
    );
    let (helo, txns) = server.join().unwrap();
    assert_eq!(helo, "replayer.example");
    assert_eq!(txns.len(), 2);
    let (_, msg) = eight_bit();
    assert_eq!(
        txns[0].mail,
        format!(
            "MAIL FROM:<alice@example.org> SIZE={} BODY=8BITMIME RET=HDRS ENVID=env+2B1+3Dx",
            msg.len()
        )
    );
    assert_eq!(
        txns[0].rcpts,
        [
            "RCPT TO:<bob@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob+2Btag@Example.COM",
            "RCPT TO:<dave@example.com>",
        ]
    );
    assert_eq!(txns[0].data, msg);
    let (_, msg2) = with_from_lines();
    assert_eq!(txns[1].mail, format!("MAIL FROM:<> SIZE={}", msg2.len()));
    assert_eq!(txns[1].rcpts, ["RCPT TO:<erin@example.com>"]);
    assert_eq!(txns[1].data, msg2);
}

#[test]
fn replay_smtp_streams_a_message_of_many_chunks_dot_stuffed() {
    let dir = tempfile::tempdir().unwrap();
    let (env, _) = eight_bit();
    // 1 MiB of lines that start with dots (some a lone dot, which would end the DATA if
    // left unstuffed), of every length, so that chunks end everywhere in them.
    let mut msg = b"Subject: dots\r\n\r\n".to_vec();
    let mut n = 0;
    while msg.len() < 1 << 20 {
        n += 1;
        let line = match n % 3 {
            0 => ".\r\n".to_string(),
            1 => format!("..{}\r\n", "x".repeat(n % 97)),
            _ => format!(".{n}\r\n"),
        };
        msg.extend_from_slice(line.as_bytes());
    }
    let path = write_archive(dir.path(), "q.tar", &[(env, msg.clone())]);
    let (addr, server) = smtp_server();
    let out = spool_tools(&[path.to_str().unwrap(), "replay", "--smtp", &addr]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (_, txns) = server.join().unwrap();
    assert_eq!(txns.len(), 1);
    assert!(txns[0].mail.contains(&format!("SIZE={}", msg.len())));
    assert!(txns[0].data == msg, "the message arrived changed");
}

#[test]
fn replay_smtp_reports_refused_recipients_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let (mut env, msg) = with_from_lines();
    env.recipients[0].address = "refuse-me@example.com".to_string();
    let path = write_archive(dir.path(), "r.tar", &[eight_bit(), (env, msg)]);
    let (addr, server) = smtp_server();
    let out = spool_tools(&[path.to_str().unwrap(), "replay", "--smtp", &addr]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!("{ID_8BIT}: sent (250")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "{ID_FROM}: refused at RCPT (550 5.1.1 no such user)"
        )),
        "{stdout}"
    );
    let (_, txns) = server.join().unwrap();
    assert_eq!(txns.len(), 1);

    // Nobody listening: every message fails, one line each.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = spool_tools(&[
        path.to_str().unwrap(),
        "replay",
        "--smtp",
        &port.to_string(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stdout)
            .lines()
            .filter(|l| l.contains(": failed ("))
            .count(),
        2
    );
}

#[test]
fn replay_sendmail_passes_sender_pending_recipients_and_the_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample_archive(dir.path(), "q.tar");
    let log = dir.path().join("log");
    fs::create_dir(&log).unwrap();
    let script = dir.path().join("fake-sendmail");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\nn=$(ls {log} | wc -l)\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done > {log}/$n.argv\ncat > {log}/$n.stdin\nexit 0\n",
            log = log.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();

    let out = spool_tools(&[
        path.to_str().unwrap(),
        "replay",
        "--sendmail",
        script.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).starts_with(&format!("{ID_8BIT}: sent (")));
    let argv = |n: usize| fs::read_to_string(log.join(format!("{n}.argv"))).unwrap();
    assert_eq!(
        argv(0),
        "-i\n-f\nalice@example.org\n--\nbob@example.com\ndave@example.com\n"
    );
    assert_eq!(argv(2), "-i\n-f\n<>\n--\nerin@example.com\n");
    assert_eq!(fs::read(log.join("0.stdin")).unwrap(), lf(&eight_bit().1));
    assert_eq!(
        fs::read(log.join("2.stdin")).unwrap(),
        lf(&with_from_lines().1)
    );

    // A failing sendmail: exit 1, one line per message.
    let failing = dir.path().join("failing-sendmail");
    fs::write(&failing, "#!/bin/sh\ncat >/dev/null\nexit 75\n").unwrap();
    fs::set_permissions(&failing, fs::Permissions::from_mode(0o755)).unwrap();
    let out = spool_tools(&[
        path.to_str().unwrap(),
        "replay",
        "--sendmail",
        failing.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("exited with status 75"));
    // A sendmail that does not exist: one error line.
    let out = spool_tools(&[
        path.to_str().unwrap(),
        "replay",
        "--sendmail",
        "/nonexistent/sendmail",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).starts_with("spool-tools: cannot run /nonexistent/sendmail"));
}

#[test]
fn replay_needs_a_target() {
    let out = spool_tools(&["x.tar", "replay"]);
    assert_eq!(out.status.code(), Some(2));
    let out = spool_tools(&[
        "x.tar",
        "replay",
        "--smtp",
        "a:1",
        "--sendmail",
        "/bin/true",
    ]);
    assert_eq!(out.status.code(), Some(2));
}
