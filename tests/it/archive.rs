//! `mxspool export` / `import` and the archive they write (spool-tools/FORMAT.md), checked
//! with standard `tar`, with `spool-tools`, and by replaying an archive into a real Postfix
//! over SMTP and through its `sendmail`.
//!
//! The fixture: mxspool as the backup MX of `example.com`, whose primary (a [`Receiver`])
//! takes `bob@example.com` and answers `450` for everyone else, so the queue holds a
//! message with one recipient delivered and one pending, next to a null-sender message, an
//! 8-bit one with DSN parameters, and one with awkward lines; plus one message for
//! `example.org` that no export of `example.com` may carry.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;
use crate::receiver::{Behaviour, Receiver};

const SENDER: &str = "alice@sender.test";

/// A message handed to mxspool.
#[derive(Clone, Debug)]
struct Sent {
    id: String,
    sender: String,
    /// Every recipient given at RCPT.
    rcpts: Vec<String>,
    /// The recipients still pending after the first attempt.
    pending: Vec<String>,
    data: Vec<u8>,
}

struct Fixture {
    env: MxEnv,
    server: Option<Server>,
    _primary: Receiver,
    /// The four example.com messages.
    com: Vec<Sent>,
    /// The example.org message.
    org: Sent,
}

fn tail(primary: &str, org_port: u16) -> String {
    format!(
        "[queue]\nretry_interval = \"1h\"\n\n[delivery]\nconnect_timeout = \"2s\"\n\n\
         [[partner]]\ndomain = \"example.com\"\nroute = [\"{primary}\"]\n\n\
         [[partner]]\ndomain = \"example.org\"\nroute = [\"127.0.0.1:{org_port}\"]\n"
    )
}

impl Fixture {
    fn new() -> Fixture {
        let primary = Receiver::start(
            "127.0.0.1:0".parse().unwrap(),
            Behaviour::TempFailRcpt(
                ["carol", "dave", "erin", "frank"]
                    .iter()
                    .map(|u| format!("{u}@example.com"))
                    .collect(),
            ),
        );
        let org_port = free_port();
        let mut env = MxEnv::custom(&tail(&primary.addr().to_string(), org_port));
        let server = env.start();
        let addr = env.addr();
        let mut com = Vec::new();

        // 1. Two recipients, DSN parameters; bob is delivered at once, carol stays.
        let data = b"From: Alice <alice@sender.test>\r\nTo: bob@example.com, carol@example.com\r\n\
Subject: archive-one\r\nMessage-ID: <archive-one@sender.test>\r\n\r\nFirst message.\r\n"
            .to_vec();
        let id = smtp_send_with(
            &addr,
            &format!("MAIL FROM:<{SENDER}> RET=HDRS ENVID=env-1"),
            &["bob@example.com", "carol@example.com"],
            &["", "NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;carol@example.com"],
            &data,
        );
        com.push(Sent {
            id,
            sender: SENDER.into(),
            rcpts: vec!["bob@example.com".into(), "carol@example.com".into()],
            pending: vec!["carol@example.com".into()],
            data,
        });
        // 2. A bounce: the null sender.
        let data = b"From: MAILER-DAEMON@elsewhere.test\r\nTo: dave@example.com\r\n\
Subject: archive-two\r\n\r\nA bounce, kept for the primary.\r\n"
            .to_vec();
        let id = smtp_send(&addr, "", &["dave@example.com"], &data);
        com.push(Sent {
            id,
            sender: String::new(),
            rcpts: vec!["dave@example.com".into()],
            pending: vec!["dave@example.com".into()],
            data,
        });
        // 3. 8-bit body.
        let data =
            "From: <alice@sender.test>\r\nTo: erin@example.com\r\nSubject: archive-three\r\n\
MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\
Content-Transfer-Encoding: 8bit\r\n\r\nOlá, coração! Ação.\r\n"
                .as_bytes()
                .to_vec();
        let id = smtp_send_with(
            &addr,
            &format!("MAIL FROM:<{SENDER}> BODY=8BITMIME"),
            &["erin@example.com"],
            &[],
            &data,
        );
        com.push(Sent {
            id,
            sender: SENDER.into(),
            rcpts: vec!["erin@example.com".into()],
            pending: vec!["erin@example.com".into()],
            data,
        });
        // 4. Dots and `From ` lines in the body.
        let data =
            b"From: <alice@sender.test>\r\nTo: frank@example.com\r\nSubject: archive-four\r\n\r\n\
From the start of a line.\r\n.\r\n..two dots\r\n>From quoted\r\nend\r\n"
                .to_vec();
        let id = smtp_send(&addr, SENDER, &["frank@example.com"], &data);
        com.push(Sent {
            id,
            sender: SENDER.into(),
            rcpts: vec!["frank@example.com".into()],
            pending: vec!["frank@example.com".into()],
            data,
        });
        // Another domain's mail.
        let data = b"From: <alice@sender.test>\r\nTo: gina@example.org\r\nSubject: not-exported\r\n\r\nx\r\n"
            .to_vec();
        let id = smtp_send(&addr, SENDER, &["gina@example.org"], &data);
        let org = Sent {
            id,
            sender: SENDER.into(),
            rcpts: vec!["gina@example.org".into()],
            pending: vec!["gina@example.org".into()],
            data,
        };

        let f = Fixture {
            env,
            server: Some(server),
            _primary: primary,
            com,
            org,
        };
        let mut q = Vec::new();
        let settled = wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
            q = f.env.queue(None);
            q.len() == 5
                && q.iter().all(|e| e.attempts >= 1)
                && q.iter().all(|e| {
                    e.recipients
                        .iter()
                        .all(|r| (r.state == "delivered") == (r.address == "bob@example.com"))
                })
        });
        assert!(
            settled,
            "fixture queue not as expected: {q:#?}\n{}",
            f.server.as_ref().unwrap().log()
        );
        f
    }

    fn file(&self, name: &str) -> PathBuf {
        self.env.dir.path().join(name)
    }

    fn export(&self, name: &str, extra: &[&str]) -> PathBuf {
        let path = self.file(name);
        let mut args = vec!["export", "example.com", "-o", path.to_str().unwrap()];
        args.extend(extra);
        let out = self.env.mxspool(&args);
        check_ok(&format!("mxspool {}", args.join(" ")), &out);
        assert!(path.is_file(), "export wrote no {}", path.display());
        path
    }

    fn ids(&self) -> BTreeSet<String> {
        self.com.iter().map(|s| s.id.clone()).collect()
    }

    fn sent(&self, id: &str) -> &Sent {
        self.com.iter().find(|s| s.id == id).unwrap()
    }
}

/// A second, empty spool made by a server of its own (started once, then stopped), with
/// the same partners; its primaries are down.
fn second_spool() -> MxEnv {
    let mut env = MxEnv::custom(&tail(&format!("127.0.0.1:{}", free_port()), free_port()));
    let mut server = env.start();
    assert!(stop_server(&mut server));
    env
}

fn tar_list(path: &Path, z: bool) -> Vec<String> {
    let out = run(
        Command::new("tar")
            .arg(if z { "tzf" } else { "tf" })
            .arg(path),
        30,
    );
    check_ok("tar tf", &out);
    text(&out.stdout).lines().map(str::to_string).collect()
}

fn tar_member(path: &Path, member: &str) -> Vec<u8> {
    let out = run(Command::new("tar").arg("xOf").arg(path).arg(member), 30);
    check_ok(&format!("tar xOf {member}"), &out);
    out.stdout
}

fn envelope(path: &Path, id: &str) -> Value {
    let raw = tar_member(path, &format!("mxspool-archive/messages/{id}.json"));
    serde_json::from_slice(&raw).unwrap_or_else(|e| panic!("{id}.json: {e}: {}", text(&raw)))
}

fn cat(path: &Path, id: &str) -> Vec<u8> {
    let out = spool_tools_run(path, &["cat", id]);
    check_ok(&format!("spool-tools cat {id}"), &out);
    out.stdout
}

/// `python3 -c FLIP_BYTE ARCHIVE MEMBER`: flips one bit in the middle of MEMBER's data in a
/// plain tar file (the tar header and its checksum stay valid).
const FLIP_BYTE: &str = r#"
import sys, tarfile
path, name = sys.argv[1], sys.argv[2]
with tarfile.open(path) as t:
    m = t.getmember(name)
off = m.offset_data + m.size // 2
with open(path, 'r+b') as fh:
    fh.seek(off)
    b = fh.read(1)
    fh.seek(off)
    fh.write(bytes([b[0] ^ 0x20]))
"#;

/// `python3 -c TRUNCATE_IN ARCHIVE MEMBER`: cuts the file in the middle of MEMBER's data.
const TRUNCATE_IN: &str = r#"
import sys, os, tarfile
path, name = sys.argv[1], sys.argv[2]
with tarfile.open(path) as t:
    m = t.getmember(name)
os.truncate(path, m.offset_data + m.size // 2)
"#;

/// `python3 -c TO_VERSION_2 SRC DST`: the same archive claiming format version 2 (FORMAT
/// member and manifest), otherwise unchanged.
const TO_VERSION_2: &str = r#"
import sys, io, json, tarfile
src, dst = sys.argv[1], sys.argv[2]
with tarfile.open(src) as t, tarfile.open(dst, 'w', format=tarfile.USTAR_FORMAT) as o:
    for m in t.getmembers():
        if not m.isfile():
            o.addfile(m)
            continue
        data = t.extractfile(m).read()
        if m.name.endswith('/FORMAT'):
            data = b'mxspool-archive 2\n'
        if m.name.endswith('/manifest.json'):
            j = json.loads(data)
            j['version'] = 2
            data = json.dumps(j).encode()
        m.size = len(data)
        o.addfile(m, io.BytesIO(data))
"#;

fn python(script: &str, args: &[&str]) {
    let out = run(Command::new("python3").arg("-c").arg(script).args(args), 60);
    check_ok("python3", &out);
}

/// The message bytes of `id` in the spool (`show --body` of `env`, on `spool`).
fn spooled_message(env: &MxEnv, spool: &Path, id: &str) -> Vec<u8> {
    let out = mxspool_on(env, spool, &["show", id, "--body"]);
    check_ok("show --body", &out);
    let show = out.stdout;
    let start = format!("*** MESSAGE CONTENTS {id} ***\n");
    let end = format!("*** END OF MESSAGE {id} ***");
    let s = find(&show, start.as_bytes()).expect("contents marker") + start.len();
    let e = find(&show[s..], end.as_bytes()).expect("end marker");
    show[s..s + e].to_vec()
}

/// `bytes` with every CRLF turned into LF (`show` may print the message with LF line ends,
/// like postcat).
fn lf(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\r' && bytes.get(i + 1) == Some(&b'\n') {
            continue;
        }
        out.push(b);
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn all_output(out: &std::process::Output) -> String {
    format!("{}{}", text(&out.stdout), text(&out.stderr))
}

fn queue_ids(env: &MxEnv, spool: &Path) -> BTreeSet<String> {
    queue_on(env, spool).into_iter().map(|e| e.id).collect()
}

// ---------------------------------------------------------------------------------------

#[test]
fn export_writes_a_tar_that_tar_and_spool_tools_read() {
    let f = Fixture::new();
    let before = f.env.queue(None);
    let archive = f.export("example.com.tar", &[]);
    // Without --remove the queue is unchanged.
    let after = f.env.queue(None);
    assert_eq!(after.len(), before.len());

    // Standard tar lists FORMAT first, a .json/.eml pair per message, the manifest last.
    let members = tar_list(&archive, false);
    let files: Vec<&String> = members.iter().filter(|m| !m.ends_with('/')).collect();
    assert_eq!(
        files.first().map(|s| s.as_str()),
        Some("mxspool-archive/FORMAT"),
        "{members:?}"
    );
    assert_eq!(
        files.last().map(|s| s.as_str()),
        Some("mxspool-archive/manifest.json"),
        "{members:?}"
    );
    let mut want: BTreeSet<String> = ["mxspool-archive/FORMAT", "mxspool-archive/manifest.json"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for id in f.ids() {
        want.insert(format!("mxspool-archive/messages/{id}.json"));
        want.insert(format!("mxspool-archive/messages/{id}.eml"));
    }
    let got: BTreeSet<String> = files.iter().map(|s| s.to_string()).collect();
    assert_eq!(got, want, "members");
    assert!(
        !members.iter().any(|m| m.contains(&f.org.id)),
        "example.org mail exported"
    );
    assert_eq!(
        text(&tar_member(&archive, "mxspool-archive/FORMAT")),
        "mxspool-archive 1\n"
    );
    let manifest: Value =
        serde_json::from_slice(&tar_member(&archive, "mxspool-archive/manifest.json")).unwrap();
    assert_eq!(manifest["format"], "mxspool-archive");
    assert_eq!(manifest["version"], 1);
    assert_eq!(manifest["domain"], "example.com");
    assert_eq!(manifest["source_host"], HOSTNAME);
    assert_eq!(manifest["messages"].as_array().unwrap().len(), 4);

    // Each envelope carries what `queue --json` shows, and the .eml is the spooled message.
    let spool = spool_dir(&f.env);
    for q in after.iter().filter(|e| e.domain == "example.com") {
        let s = f.sent(&q.id);
        let env = envelope(&archive, &q.id);
        assert_eq!(env["id"], q.id.as_str());
        assert_eq!(env["domain"], "example.com");
        assert_eq!(env["sender"], s.sender.as_str());
        let rc: Vec<(String, String)> = env["recipients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["address"].as_str().unwrap().to_string(),
                    r["state"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let qrc: Vec<(String, String)> = q
            .recipients
            .iter()
            .map(|r| (r.address.clone(), r.state.clone()))
            .collect();
        assert_eq!(rc, qrc, "{}: recipients", q.id);
        let addrs: Vec<String> = rc.iter().map(|(a, _)| a.clone()).collect();
        assert_eq!(addrs, s.rcpts, "{}: recipients", q.id);
        let arrival = chrono::DateTime::parse_from_rfc3339(env["arrival"].as_str().unwrap())
            .unwrap()
            .timestamp();
        let q_arrival = chrono::DateTime::parse_from_rfc3339(&q.arrival)
            .unwrap()
            .timestamp();
        assert_eq!(arrival, q_arrival, "{}: arrival", q.id);
        assert_eq!(env["attempts"], q.attempts, "{}", q.id);
        assert_eq!(
            env["last_error"].as_str(),
            q.last_error.as_deref(),
            "{}",
            q.id
        );
        assert_eq!(env["client_ip"], "127.0.0.1");
        assert_eq!(env["helo"], "client.sender.test");
        let eml = tar_member(&archive, &format!("mxspool-archive/messages/{}.eml", q.id));
        assert_eq!(
            lf(&eml),
            lf(&spooled_message(&f.env, &spool, &q.id)),
            "{}: .eml",
            q.id
        );
        assert!(
            eml.ends_with(&s.data),
            "{}: .eml does not end with the message sent",
            q.id
        );
        assert_eq!(cat(&archive, &q.id), eml, "spool-tools cat {}", q.id);
    }
    let e1 = envelope(&archive, &f.com[0].id);
    assert_eq!(e1["dsn"]["ret"], "hdrs", "{e1}");
    assert_eq!(e1["dsn"]["envid"], "env-1", "{e1}");
    let carol = &e1["recipients"][1];
    assert_eq!(carol["orcpt"], "rfc822;carol@example.com", "{e1}");
    assert_eq!(carol["notify"]["success"], true, "{e1}");
    assert_eq!(carol["notify"]["failure"], true, "{e1}");
    assert_eq!(envelope(&archive, &f.com[2].id)["body"], "8bitmime");
    assert_eq!(envelope(&archive, &f.com[1].id)["body"], "7bit");

    // spool-tools verify and list.
    let out = spool_tools_run(&archive, &["verify"]);
    check_ok("spool-tools verify", &out);
    assert!(
        text(&out.stdout).starts_with("OK: 4 messages"),
        "{}",
        text(&out.stdout)
    );
    let out = spool_tools_run(&archive, &["list"]);
    check_ok("spool-tools list", &out);
    let list = text(&out.stdout);
    for s in &f.com {
        let line = list
            .lines()
            .find(|l| l.starts_with(&s.id))
            .unwrap_or_else(|| panic!("{} not listed:\n{list}", s.id));
        for p in &s.pending {
            assert!(line.contains(p.as_str()), "{line}");
        }
        let sender = if s.sender.is_empty() { "<>" } else { &s.sender };
        assert!(line.contains(sender), "{line}");
    }
    let row1 = list.lines().find(|l| l.starts_with(&f.com[0].id)).unwrap();
    assert!(
        !row1.contains("bob@example.com"),
        "a delivered recipient listed as pending: {row1}"
    );
    assert!(
        list.contains("-- 4 messages, 4 pending recipients"),
        "{list}"
    );
    // mbox: four messages, `From ` lines quoted.
    let out = spool_tools_run(&archive, &["mbox"]);
    check_ok("spool-tools mbox", &out);
    let mbox = text(&out.stdout);
    assert_eq!(
        mbox.lines().filter(|l| l.starts_with("From ")).count(),
        4,
        "{mbox}"
    );
    assert!(mbox.contains("\n>From the start of a line.\n") && mbox.contains("\n>>From quoted\n"));

    // Compressed by name.
    let gz = f.export("example.com.tar.gz", &[]);
    assert_eq!(&fs::read(&gz).unwrap()[..2], &[0x1f, 0x8b], "not gzip");
    let zfiles: BTreeSet<String> = tar_list(&gz, true)
        .into_iter()
        .filter(|m| !m.ends_with('/'))
        .collect();
    assert_eq!(zfiles, want);
    let out = spool_tools_run(&gz, &["verify"]);
    check_ok("spool-tools verify .tar.gz", &out);
    assert!(text(&out.stdout).starts_with("OK: 4 messages"));
    assert_eq!(f.env.queue(None).len(), 5);
}

/// The fields of an archived envelope that must survive export → import → export.
fn kept_fields(v: &Value) -> Value {
    let mut o = v.as_object().unwrap().clone();
    o.remove("next_attempt");
    o.remove("held");
    Value::Object(o)
}

#[test]
fn export_import_export_round_trips_and_import_is_idempotent() {
    let f = Fixture::new();
    let a1 = f.export("first.tar", &[]);

    let second = second_spool();
    let s2 = spool_dir(&second);
    let out = second.mxspool(&["import", a1.to_str().unwrap()]);
    check_ok("import into a stopped spool", &out);
    assert_eq!(queue_ids(&second, &s2), f.ids());
    // Recipient states came along: bob stays delivered and is not sent again.
    let q2 = second.queue(None);
    let one = q2.iter().find(|e| e.id == f.com[0].id).unwrap();
    let states: Vec<(&str, &str)> = one
        .recipients
        .iter()
        .map(|r| (r.address.as_str(), r.state.as_str()))
        .collect();
    assert_eq!(
        states,
        [
            ("bob@example.com", "delivered"),
            ("carol@example.com", "pending")
        ]
    );
    for e in &q2 {
        assert_eq!(e.domain, "example.com");
        assert_eq!(
            lf(&spooled_message(&second, &s2, &e.id)),
            lf(&cat(&a1, &e.id)),
            "{}",
            e.id
        );
    }

    let a2 = second.dir.path().join("second.tar");
    let out = second.mxspool(&["export", "example.com", "-o", a2.to_str().unwrap()]);
    check_ok("export from the second spool", &out);
    let names = |p: &Path| -> BTreeSet<String> {
        tar_list(p, false)
            .into_iter()
            .filter(|m| !m.ends_with('/'))
            .collect()
    };
    assert_eq!(names(&a1), names(&a2));
    for id in f.ids() {
        assert_eq!(
            kept_fields(&envelope(&a1, &id)),
            kept_fields(&envelope(&a2, &id)),
            "{id}: envelope changed on the round trip"
        );
        assert_eq!(
            cat(&a1, &id),
            cat(&a2, &id),
            "{id}: bytes changed on the round trip"
        );
    }

    // Importing again adds nothing: stopped spool, then the live one (which still has them).
    let out = second.mxspool(&["import", a1.to_str().unwrap()]);
    check_ok("second import", &out);
    assert!(all_output(&out).contains("already"), "{}", all_output(&out));
    assert_eq!(second.queue(None).len(), 4);
    let out = f.env.mxspool(&["import", a1.to_str().unwrap()]);
    check_ok("import into the live spool that has them", &out);
    assert!(all_output(&out).contains("already"), "{}", all_output(&out));
    assert_eq!(f.env.queue(None).len(), 5);

    // Import through the control socket into a live server, then export --remove there.
    let mut third = MxEnv::custom(&tail(&format!("127.0.0.1:{}", free_port()), free_port()));
    let server3 = third.start();
    let out = third.mxspool(&["import", a2.to_str().unwrap()]);
    check_ok("import into a live server", &out);
    let q3: BTreeSet<String> = third.queue(None).into_iter().map(|e| e.id).collect();
    assert_eq!(q3, f.ids(), "{}", server3.log());
    let a3 = third.dir.path().join("third.tar.gz");
    let out = third.mxspool(&[
        "export",
        "example.com",
        "-o",
        a3.to_str().unwrap(),
        "--remove",
    ]);
    check_ok("export --remove from a live server", &out);
    assert!(third.queue(None).is_empty());
    for id in f.ids() {
        assert_eq!(cat(&a1, &id), cat(&a3, &id));
    }
}

#[test]
fn a_corrupt_message_is_reported_and_the_good_ones_import() {
    let f = Fixture::new();
    let archive = f.export("corrupt.tar", &[]);
    let bad = f.com[2].id.clone();
    // Flip one bit in the middle of the .eml's data (the tar header stays valid).
    python(
        FLIP_BYTE,
        &[
            archive.to_str().unwrap(),
            &format!("mxspool-archive/messages/{bad}.eml"),
        ],
    );
    // tar still lists it; verify names the message.
    assert!(tar_list(&archive, false).iter().any(|m| m.contains(&bad)));
    let out = spool_tools_run(&archive, &["verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", all_output(&out));
    assert!(text(&out.stdout).contains(&bad), "{}", all_output(&out));

    let second = second_spool();
    let s2 = spool_dir(&second);
    let out = second.mxspool(&["import", archive.to_str().unwrap()]);
    let said = assert_clean_failure("import of a corrupt archive", &out);
    assert!(
        all_output(&out).contains(&bad),
        "import does not name {bad}: {said}"
    );
    let mut good = f.ids();
    good.remove(&bad);
    assert_eq!(
        queue_ids(&second, &s2),
        good,
        "import did not take exactly the good ones"
    );
    for id in &good {
        assert!(
            lf(&spooled_message(&second, &s2, id)).ends_with(&lf(&f.sent(id).data)),
            "{id} imported with other bytes"
        );
    }
}

#[test]
fn a_truncated_archive_is_refused() {
    let f = Fixture::new();
    let archive = f.export("cut.tar", &[]);
    let cut_in = f.com[2].id.clone();
    // Cut the file in the middle of the third message (as a copy that stopped).
    python(
        TRUNCATE_IN,
        &[
            archive.to_str().unwrap(),
            &format!("mxspool-archive/messages/{cut_in}.eml"),
        ],
    );
    let out = spool_tools_run(&archive, &["verify"]);
    let err = assert_clean_failure("spool-tools verify of a cut archive", &out);
    assert!(all_output(&out).contains("truncated"), "{err}");

    let second = second_spool();
    let out = second.mxspool(&["import", archive.to_str().unwrap()]);
    let err = assert_clean_failure("import of a truncated archive", &out);
    assert!(
        err.contains("truncated"),
        "import does not say the archive is truncated: {}",
        all_output(&out)
    );
    // FORMAT.md: a truncated archive is refused as a whole (nothing can be verified).
    assert!(
        second.queue(None).is_empty(),
        "a truncated archive was (partly) imported: {:?}",
        second.queue(None)
    );
}

#[test]
fn an_archive_of_another_format_version_is_refused_before_anything_is_imported() {
    let f = Fixture::new();
    let archive = f.export("v1.tar", &[]);
    let v2 = f.file("v2.tar");
    python(
        TO_VERSION_2,
        &[archive.to_str().unwrap(), v2.to_str().unwrap()],
    );
    assert_eq!(
        text(&tar_member(&v2, "mxspool-archive/FORMAT")),
        "mxspool-archive 2\n"
    );
    let out = spool_tools_run(&v2, &["verify"]);
    let err = assert_clean_failure("spool-tools verify of version 2", &out);
    assert!(err.contains("version 2"), "{err}");

    let second = second_spool();
    let out = second.mxspool(&["import", v2.to_str().unwrap()]);
    let err = assert_clean_failure("import of a version 2 archive", &out);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(err.contains("version"), "{err}");
    assert!(
        second.queue(None).is_empty(),
        "imported from a version 2 archive"
    );
    // Into the live spool too: nothing changes.
    let out = f.env.mxspool(&["import", v2.to_str().unwrap()]);
    assert_clean_failure("import of version 2 into the live server", &out);
    assert_eq!(f.env.queue(None).len(), 5);
}

// ---------------------------------------------------------------------------------------
// replay into a real Postfix

/// `postqueue -c CONF -j`: (sender, sorted recipients) -> queue id.
fn postfix_queue(pf: &Postfix) -> BTreeMap<(String, Vec<String>), String> {
    let out = run(
        Command::new(tool("postqueue"))
            .arg("-c")
            .arg(&pf.conf)
            .arg("-j"),
        30,
    );
    check_ok("postqueue -j", &out);
    let mut m = BTreeMap::new();
    for l in text(&out.stdout).lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"));
        let mut rc: Vec<String> = v["recipients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["address"].as_str().unwrap().to_string())
            .collect();
        rc.sort();
        // showq prints the null sender as MAILER-DAEMON; check_replayed looks at the
        // queue file's own sender record.
        let sender = match v["sender"].as_str().unwrap() {
            "MAILER-DAEMON" => "",
            s => s,
        };
        m.insert(
            (sender.to_string(), rc),
            v["queue_id"].as_str().unwrap().to_string(),
        );
    }
    m
}

fn postcat(pf: &Postfix, qid: &str) -> String {
    let out = run(
        Command::new(tool("postcat"))
            .arg("-c")
            .arg(&pf.conf)
            .arg("-e")
            .arg("-h")
            .arg("-b")
            .arg("-q")
            .arg(qid),
        30,
    );
    check_ok("postcat", &out);
    text(&out.stdout)
}

/// Every message arrived in Postfix's queue with its original envelope (pending
/// recipients only) and its text.
fn check_replayed(pf: &Postfix, f: &Fixture) {
    let want: BTreeSet<(String, Vec<String>)> = f
        .com
        .iter()
        .map(|s| {
            let mut p = s.pending.clone();
            p.sort();
            (s.sender.clone(), p)
        })
        .collect();
    let mut got = BTreeMap::new();
    let ok = wait_for(Duration::from_secs(20), Duration::from_millis(250), || {
        got = postfix_queue(pf);
        got.len() >= want.len()
    });
    assert!(ok, "Postfix queue: {got:#?}\n--- postfix log\n{}", pf.log());
    let keys: BTreeSet<(String, Vec<String>)> = got.keys().cloned().collect();
    assert_eq!(keys, want, "envelopes in Postfix\n{}", pf.log());
    for s in &f.com {
        let mut p = s.pending.clone();
        p.sort();
        let qid = &got[&(s.sender.clone(), p)];
        let content = postcat(pf, qid);
        let subject = text(&s.data)
            .lines()
            .find(|l| l.starts_with("Subject: "))
            .unwrap()
            .to_string();
        assert!(content.contains(&subject), "{subject} missing:\n{content}");
        let last_body_line = text(&s.data).trim_end().lines().last().unwrap().to_string();
        assert!(
            content.contains(&last_body_line),
            "{last_body_line:?} missing:\n{content}"
        );
        let sender_record = content
            .lines()
            .find_map(|l| l.strip_prefix("sender:"))
            .unwrap_or_else(|| panic!("no sender record:\n{content}"));
        assert_eq!(
            sender_record.trim(),
            s.sender,
            "sender in Postfix's queue file"
        );
    }
}

/// main.cf for a Postfix that takes mail for example.com and keeps it queued.
const KEEP_QUEUED: &str = "mynetworks = 127.0.0.0/8\n\
    relay_domains = example.com\n\
    smtpd_recipient_restrictions = permit_mynetworks, reject\n\
    defer_transports = smtp relay\n";

#[test]
fn replay_over_smtp_into_postfix_keeps_the_envelopes() {
    let f = Fixture::new();
    let archive = f.export("replay.tar", &[]);
    let port = free_port();
    let pf = Postfix::start(
        KEEP_QUEUED,
        &format!("127.0.0.1:{port} inet n - n - - smtpd\n"),
    );
    let ready = wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
        !port_closed(port)
    });
    assert!(ready, "Postfix smtpd not listening\n{}", pf.log());
    let out = spool_tools_run(
        &archive,
        &[
            "replay",
            "--smtp",
            &format!("127.0.0.1:{port}"),
            "--helo",
            "mx2.test",
        ],
    );
    check_ok("spool-tools replay --smtp", &out);
    let said = text(&out.stdout);
    for s in &f.com {
        assert!(
            said.lines()
                .any(|l| l.starts_with(&format!("{}: sent", s.id))),
            "{}: {said}",
            s.id
        );
    }
    check_replayed(&pf, &f);
    // The DSN parameters went along (Postfix keeps ENVID and ORCPT in the queue file).
    let q = postfix_queue(&pf);
    let qid = &q[&(SENDER.to_string(), vec!["carol@example.com".to_string()])];
    let content = postcat(&pf, qid);
    assert!(content.contains("env-1"), "ENVID lost:\n{content}");
    assert!(
        content.contains("rfc822;carol@example.com"),
        "ORCPT lost:\n{content}"
    );
    // And the mxspool queue is untouched (replay reads the archive only).
    assert_eq!(f.env.queue(None).len(), 5);
}

#[test]
fn replay_through_postfix_sendmail_queues_every_message() {
    let f = Fixture::new();
    let archive = f.export("replay-sendmail.tar.gz", &[]);
    let pf = Postfix::start(KEEP_QUEUED, "");
    // Postfix's sendmail with this instance's config directory.
    let wrapper = f.file("sendmail-wrapper");
    fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nexec {} -C {} \"$@\"\n",
            tool("sendmail").display(),
            pf.conf.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
    let out = spool_tools_run(
        &archive,
        &["replay", "--sendmail", wrapper.to_str().unwrap()],
    );
    check_ok("spool-tools replay --sendmail", &out);
    let said = text(&out.stdout);
    assert_eq!(
        said.lines().filter(|l| l.contains(": sent")).count(),
        4,
        "{said}"
    );
    check_replayed(&pf, &f);
}
