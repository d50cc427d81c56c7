//! Fixtures shared by the tests: two sample messages, archive writing, running the binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use chrono::{TimeZone, Utc};
use spool_tools::{
    create_file, ArchiveMeta, ArchiveReader, ArchivedDsn, ArchivedEnvelope, ArchivedRecipient,
    BodyType, Entry, Notify, RecipientState, Ret,
};

pub const ID_8BIT: &str = "01HZX3K9Q7M2A";
pub const ID_FROM: &str = "01HZX3K9Q7M2B";

/// An 8-bit message with one pending and one delivered recipient, full DSN parameters.
pub fn eight_bit() -> (ArchivedEnvelope, Vec<u8>) {
    let env = ArchivedEnvelope {
        id: ID_8BIT.to_string(),
        domain: "example.com".to_string(),
        sender: "alice@example.org".to_string(),
        recipients: vec![
            ArchivedRecipient {
                address: "bob@example.com".to_string(),
                state: RecipientState::Pending,
                orcpt: Some("rfc822;Bob+tag@Example.COM".to_string()),
                notify: Some(Notify {
                    success: true,
                    failure: true,
                    ..Notify::default()
                }),
            },
            ArchivedRecipient {
                address: "carol@example.com".to_string(),
                state: RecipientState::Delivered,
                orcpt: None,
                notify: None,
            },
            ArchivedRecipient {
                address: "dave@example.com".to_string(),
                state: RecipientState::Pending,
                orcpt: None,
                notify: None,
            },
        ],
        arrival: Utc.timestamp_millis_opt(1_714_558_830_123).unwrap(),
        attempts: 3,
        last_error: Some("connect to mail.example.com[192.0.2.5]:25: refused".to_string()),
        next_attempt: Some(Utc.timestamp_millis_opt(1_714_562_430_000).unwrap()),
        held: false,
        dsn: ArchivedDsn {
            ret: Some(Ret::Hdrs),
            envid: Some("env+1=x".to_string()),
        },
        body: BodyType::EightBitMime,
        smtputf8: false,
        client_ip: "192.0.2.7".to_string(),
        helo: "client.example.org".to_string(),
    };
    let msg = "Received: from client.example.org\r\nFrom: Alice <alice@example.org>\r\n\
               To: bob@example.com\r\nSubject: =?utf-8?q?ol=C3=A1?=\r\n\
               Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\
               Olá, coração! Ação.\r\n.\r\n..two dots\r\nend\r\n"
        .as_bytes()
        .to_vec();
    (env, msg)
}

/// A bounce (null sender) whose body has `From ` lines, quoted and not.
pub fn with_from_lines() -> (ArchivedEnvelope, Vec<u8>) {
    let env = ArchivedEnvelope {
        id: ID_FROM.to_string(),
        domain: "example.com".to_string(),
        sender: String::new(),
        recipients: vec![ArchivedRecipient {
            address: "erin@example.com".to_string(),
            state: RecipientState::Pending,
            orcpt: None,
            notify: None,
        }],
        arrival: Utc.timestamp_millis_opt(1_714_558_900_000).unwrap(),
        attempts: 0,
        last_error: None,
        next_attempt: None,
        held: true,
        dsn: ArchivedDsn::default(),
        body: BodyType::SevenBit,
        smtputf8: false,
        client_ip: String::new(),
        helo: String::new(),
    };
    let msg = b"From: MAILER-DAEMON@backup.example.net\r\nTo: erin@example.com\r\n\
                Subject: lines\r\n\r\nFrom the start.\r\n>From quoted once\r\n\
                >>From quoted twice\r\nFrom\r\n From indented\r\n.\r\nThe end.\r\n"
        .to_vec();
    (env, msg)
}

pub fn meta() -> ArchiveMeta {
    ArchiveMeta {
        created: Utc.timestamp_millis_opt(1_714_600_000_000).unwrap(),
        source_host: "backup.example.net".to_string(),
        domain: Some("example.com".to_string()),
    }
}

/// Writes `messages` to `dir/name` (gzip when the name says so).
pub fn write_archive(dir: &Path, name: &str, messages: &[(ArchivedEnvelope, Vec<u8>)]) -> PathBuf {
    let path = dir.join(name);
    let mut w = create_file(&path, meta()).unwrap();
    for (env, msg) in messages {
        w.add(env, msg).unwrap();
    }
    w.finish().unwrap();
    path
}

/// The two sample messages in `dir/name`.
pub fn sample_archive(dir: &Path, name: &str) -> PathBuf {
    write_archive(dir, name, &[eight_bit(), with_from_lines()])
}

pub fn read_all(r: &ArchiveReader) -> Vec<Entry> {
    let mut all = Vec::new();
    r.for_each_entry(|e| {
        all.push(e);
        Ok::<(), spool_tools::Error>(())
    })
    .unwrap();
    all
}

/// Checks that `r` gives the two sample messages, envelopes and bytes, in their order.
pub fn assert_samples(r: &ArchiveReader) {
    let all = read_all(r);
    let expected = [eight_bit(), with_from_lines()];
    assert_eq!(all.len(), 2);
    for (got, (env, msg)) in all.iter().zip(&expected) {
        assert_eq!(&got.envelope, env);
        assert_eq!(&got.message, msg);
    }
    assert_eq!(r.message(ID_FROM).unwrap(), with_from_lines().1);
}

/// Runs the binary with `args`; stdin is empty.
pub fn spool_tools(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_spool-tools"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run spool-tools")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Position of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("needle in file")
}
