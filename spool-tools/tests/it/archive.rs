//! The archive format through the library: round trips, damage, versions.

use std::fs;
use std::io::Read;
use std::process::Command;

use spool_tools::{
    create_file, create_file_replacing, ArchiveReader, ArchiveWriter, Compression, Error,
    ReadOptions, RecipientState,
};

use crate::support::*;

#[test]
fn round_trip_keeps_envelopes_bytes_and_meta() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample_archive(dir.path(), "q.tar");
    let r = ArchiveReader::open(&path).unwrap();
    assert!(r.problems().is_empty(), "{:?}", r.problems());
    assert!(r.is_verified());
    assert_eq!(r.compression(), Compression::None);
    assert_eq!(r.meta(), Some(&meta()));
    assert_eq!(r.ids().collect::<Vec<_>>(), [ID_8BIT, ID_FROM]);
    assert_samples(&r);
    assert!(matches!(r.message("NOSUCHID"), Err(Error::NotFound(_))));
}

#[test]
fn gzip_archive_by_extension_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample_archive(dir.path(), "q.tar.gz");
    assert_eq!(&fs::read(&path).unwrap()[..2], &[0x1f, 0x8b]);
    let r = ArchiveReader::open(&path).unwrap();
    assert_eq!(r.compression(), Compression::Gzip);
    assert!(r.problems().is_empty());
    let all = read_all(&r);
    assert_eq!(all[0].message, eight_bit().1);
    assert_eq!(all[1].envelope, with_from_lines().0);
}

#[test]
fn system_tar_lists_the_members_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let expected = [
        "mxspool-archive/FORMAT".to_string(),
        format!("mxspool-archive/messages/{ID_8BIT}.json"),
        format!("mxspool-archive/messages/{ID_8BIT}.eml"),
        format!("mxspool-archive/messages/{ID_FROM}.json"),
        format!("mxspool-archive/messages/{ID_FROM}.eml"),
        "mxspool-archive/manifest.json".to_string(),
    ];
    for name in ["q.tar", "q.tgz"] {
        let path = sample_archive(dir.path(), name);
        let out = Command::new("tar")
            .arg("tf")
            .arg(&path)
            .output()
            .expect("the system tar is required");
        assert!(out.status.success(), "tar tf: {}", text(&out.stderr));
        let listed: Vec<String> = text(&out.stdout).lines().map(String::from).collect();
        assert_eq!(listed, expected, "{name}");
        let format = Command::new("tar")
            .arg("xOf")
            .arg(&path)
            .arg("mxspool-archive/FORMAT")
            .output()
            .expect("the system tar is required");
        assert_eq!(text(&format.stdout), "mxspool-archive 1\n");
        let eml = Command::new("tar")
            .arg("xOf")
            .arg(&path)
            .arg(format!("mxspool-archive/messages/{ID_8BIT}.eml"))
            .output()
            .unwrap();
        assert_eq!(eml.stdout, eight_bit().1);
    }
}

#[test]
fn corrupt_message_byte_spoils_only_that_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample_archive(dir.path(), "q.tar");
    let mut bytes = fs::read(&path).unwrap();
    let at = find(&bytes, "coração".as_bytes());
    bytes[at] ^= 0x20;
    fs::write(&path, &bytes).unwrap();

    let r = ArchiveReader::open(&path).unwrap();
    assert_eq!(r.problems().len(), 1, "{:?}", r.problems());
    let p = &r.problems()[0];
    assert_eq!(p.subject, ID_8BIT);
    assert!(p.what.contains("checksum"), "{p}");
    let all = read_all(&r);
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].envelope.id, ID_FROM);
    assert_eq!(all[0].message, with_from_lines().1);
    match r.message(ID_8BIT) {
        Err(e @ Error::BadMessage { .. }) => assert!(e.to_string().contains(ID_8BIT)),
        other => panic!("expected BadMessage, got {other:?}"),
    }
}

#[test]
fn corrupt_envelope_is_reported_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample_archive(dir.path(), "q.tar");
    let mut bytes = fs::read(&path).unwrap();
    let at = find(&bytes, b"erin@example.com\"");
    bytes[at] = b'E';
    fs::write(&path, &bytes).unwrap();
    let r = ArchiveReader::open(&path).unwrap();
    assert_eq!(r.problems().len(), 1);
    assert_eq!(r.problems()[0].subject, ID_FROM);
    assert!(
        r.problems()[0].what.contains(".json"),
        "{}",
        r.problems()[0]
    );
    assert_eq!(r.ids().collect::<Vec<_>>(), [ID_8BIT]);
}

#[test]
fn truncated_archive_is_refused_and_salvage_keeps_only_whole_messages() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample_archive(dir.path(), "q.tar");
    let bytes = fs::read(&path).unwrap();
    // Cut in the middle of the second message's bytes.
    let cut = find(&bytes, b"quoted twice");
    fs::write(&path, &bytes[..cut]).unwrap();

    match ArchiveReader::open(&path) {
        Err(e @ Error::Truncated { complete: 1 }) => {
            assert!(e.to_string().contains("truncated"), "{e}")
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
    let r = ArchiveReader::open_with(
        &path,
        ReadOptions {
            salvage: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(!r.is_verified());
    assert_eq!(r.meta(), None);
    assert_eq!(r.ids().collect::<Vec<_>>(), [ID_8BIT]);
    let subjects: Vec<&str> = r.problems().iter().map(|p| p.subject.as_str()).collect();
    assert_eq!(subjects, ["manifest.json", ID_FROM]);
    let all = read_all(&r);
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].message, eight_bit().1);

    // Cut right after a member (on a block boundary): still truncated, no manifest.
    let end_of_first = find(&bytes, format!("{ID_FROM}.json").as_bytes()) / 512 * 512;
    fs::write(&path, &bytes[..end_of_first]).unwrap();
    assert!(matches!(
        ArchiveReader::open(&path),
        Err(Error::Truncated { complete: 1 })
    ));
}

#[test]
fn truncated_gzip_archive_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample_archive(dir.path(), "q.tar.gz");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    match ArchiveReader::open(&path) {
        Err(Error::Truncated { .. }) => {}
        other => panic!("expected Truncated, got {other:?}"),
    }
    // Cut in the gzip trailer only: every message verifies, the cut is still reported.
    fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
    let r = ArchiveReader::open(&path).unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(r.problems().len(), 1);
    assert_eq!(r.problems()[0].subject, "archive");
    assert!(
        r.problems()[0].what.contains("cut short"),
        "{}",
        r.problems()[0]
    );
}

#[test]
fn other_format_version_is_refused_on_the_first_member() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v2.tar");
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_path("mxspool-archive/FORMAT").unwrap();
    h.set_size(18);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append(&h, &b"mxspool-archive 2\n"[..]).unwrap();
    let mut bytes = tar.into_inner().unwrap();
    // Whatever follows is never read: here, garbage instead of a tar header.
    bytes.extend(std::iter::repeat_n(0xa5u8, 4096));
    fs::write(&path, &bytes).unwrap();
    match ArchiveReader::open(&path) {
        Err(e @ Error::Version { found: 2 }) => {
            assert!(e.to_string().contains("version 2"), "{e}")
        }
        other => panic!("expected Version, got {other:?}"),
    }
    let out = spool_tools(&[path.to_str().unwrap(), "verify"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).starts_with("spool-tools: archive format version 2"));
}

#[test]
fn files_that_are_not_archives_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[u8], &str); 5] = [
        ("empty", b"", "empty"),
        ("text", b"hello, world\n", "not a tar archive"),
        ("zstd", b"\x28\xb5\x2f\xfd rest", "zstd"),
        ("xz", b"\xfd7zXZ\x00 rest", "xz"),
        ("garbage", &[0x5au8; 2048], "not a tar archive"),
    ];
    for (name, content, says) in cases {
        let path = dir.path().join(name);
        fs::write(&path, content).unwrap();
        match ArchiveReader::open(&path) {
            Err(e @ Error::Format(_)) => assert!(e.to_string().contains(says), "{name}: {e}"),
            other => panic!("{name}: expected Format, got {other:?}"),
        }
    }
    // A tar archive of something else.
    let path = dir.path().join("other.tar");
    let mut tar = tar::Builder::new(fs::File::create(&path).unwrap());
    let mut h = tar::Header::new_ustar();
    h.set_path("README").unwrap();
    h.set_size(2);
    h.set_cksum();
    tar.append(&h, &b"hi"[..]).unwrap();
    tar.into_inner().unwrap();
    let e = ArchiveReader::open(&path).unwrap_err();
    assert!(e.to_string().contains("first member is \"README\""), "{e}");
    assert!(matches!(
        ArchiveReader::open(dir.path().join("missing.tar")),
        Err(Error::Io { .. })
    ));
}

/// Copies the members of `src` to a new tar at `dst`, dropping those `keep` refuses and
/// appending `extra` (name, data) members before the manifest.
fn repack(
    src: &std::path::Path,
    dst: &std::path::Path,
    keep: impl Fn(&str) -> bool,
    extra: &[(&str, &[u8])],
) {
    let mut input = tar::Archive::new(fs::File::open(src).unwrap());
    let mut out = tar::Builder::new(fs::File::create(dst).unwrap());
    for e in input.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        if name.ends_with("manifest.json") {
            for (n, data) in extra {
                let mut h = tar::Header::new_ustar();
                h.set_path(n).unwrap();
                h.set_size(data.len() as u64);
                h.set_cksum();
                out.append(&h, *data).unwrap();
            }
        }
        if keep(&name) {
            let h = e.header().clone();
            out.append(&h, &mut e).unwrap();
        }
    }
    out.into_inner().unwrap();
}

#[test]
fn missing_and_extra_members_are_problems() {
    let dir = tempfile::tempdir().unwrap();
    let src = sample_archive(dir.path(), "q.tar");
    let dst = dir.path().join("r.tar");
    let eml = format!("{ID_FROM}.eml");
    repack(
        &src,
        &dst,
        |n| !n.ends_with(&eml),
        &[
            ("mxspool-archive/messages/ZZZ.eml", b"x"),
            ("mxspool-archive/notes.txt", b"hi"),
        ],
    );
    let r = ArchiveReader::open(&dst).unwrap();
    let problems: Vec<String> = r.problems().iter().map(|p| p.to_string()).collect();
    assert_eq!(r.ids().collect::<Vec<_>>(), [ID_8BIT], "{problems:?}");
    assert!(problems
        .iter()
        .any(|p| p.starts_with(ID_FROM) && p.contains(".eml is missing")));
    assert!(problems
        .iter()
        .any(|p| p.starts_with("ZZZ:") && p.contains("not listed")));
    assert!(problems
        .iter()
        .any(|p| p.starts_with("mxspool-archive/notes.txt:")));
    assert_eq!(problems.len(), 3, "{problems:?}");
}

#[test]
fn writer_refuses_bad_ids_duplicates_and_control_characters() {
    let mut w = ArchiveWriter::new(Vec::new(), meta()).unwrap();
    let (mut env, msg) = eight_bit();
    w.add(&env, &msg).unwrap();
    assert!(matches!(w.add(&env, &msg), Err(Error::DuplicateId(_))));
    env.id = "../evil".to_string();
    assert!(matches!(w.add(&env, &msg), Err(Error::InvalidId(_))));
    env.id = "abc123XYZ".to_string(); // another id style is fine
    env.recipients[0].address = "bob@example.com\r\nRCPT TO:<x@y>".to_string();
    assert!(matches!(w.add(&env, &msg), Err(Error::Envelope { .. })));
    env.recipients[0].address = "bob@example.com".to_string();
    w.add(&env, &msg).unwrap();
    assert_eq!(w.len(), 2);
    let bytes = w.finish().unwrap();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mem.tar");
    fs::write(&path, bytes).unwrap();
    let r = ArchiveReader::open(&path).unwrap();
    assert_eq!(r.ids().collect::<Vec<_>>(), [ID_8BIT, "abc123XYZ"]);
    assert!(r.problems().is_empty());
}

#[test]
fn unfinished_file_leaves_nothing_and_finished_one_leaves_no_temporary() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.tar.gz");
    {
        let mut w = create_file(&path, meta()).unwrap();
        w.add(&eight_bit().0, &eight_bit().1).unwrap();
        // dropped without finish: an export that failed half-way
    }
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    let mut w = create_file(&path, meta()).unwrap();
    assert!(w.is_empty());
    w.add(&eight_bit().0, &eight_bit().1).unwrap();
    w.finish().unwrap();
    let names: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["x.tar.gz"]);
    let empty = dir.path().join("empty.tar");
    create_file(&empty, meta()).unwrap().finish().unwrap();
    let r = ArchiveReader::open(&empty).unwrap();
    assert!(r.is_empty() && r.problems().is_empty());
}

#[test]
fn file_changed_after_open_is_noticed() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample_archive(dir.path(), "q.tar");
    let r = ArchiveReader::open(&path).unwrap();
    let (mut env, mut msg) = eight_bit();
    env.recipients[0].state = RecipientState::Failed;
    msg.extend_from_slice(b"more\r\n");
    let mut w = create_file_replacing(&path, meta()).unwrap();
    w.add(&env, &msg).unwrap();
    let (env2, msg2) = with_from_lines();
    w.add(&env2, &msg2).unwrap();
    w.finish().unwrap();
    let e = r.for_each_entry(|_| Ok::<(), Error>(())).unwrap_err();
    assert!(matches!(e, Error::Changed(_)), "{e}");
}

#[test]
fn an_existing_name_is_never_replaced_unless_asked() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = sample_archive(dir.path(), "a.tar");
    assert_eq!(
        fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let before = fs::read(&path).unwrap();
    let e = create_file(&path, meta()).err().expect("refused");
    assert!(e.to_string().contains("already exists"), "{e}");
    // A name that appears while the archive is written is not replaced either.
    let late = dir.path().join("late.tar");
    let w = create_file(&late, meta()).unwrap();
    fs::write(&late, b"someone else's").unwrap();
    let e = w.finish().unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    assert_eq!(fs::read(&late).unwrap(), b"someone else's");
    // A symbolic link at the name is a name: refused, its target untouched.
    let victim = dir.path().join("victim");
    fs::write(&victim, b"keep").unwrap();
    let link = dir.path().join("link.tar");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    assert!(create_file(&link, meta()).is_err());
    let mut w = create_file_replacing(&link, meta()).unwrap();
    w.add(&eight_bit().0, &eight_bit().1).unwrap();
    w.finish().unwrap();
    assert_eq!(fs::read(&victim).unwrap(), b"keep");
    assert!(fs::symlink_metadata(&link).unwrap().is_file());
    // --force replaces atomically; nothing temporary is left.
    create_file_replacing(&path, meta())
        .unwrap()
        .finish()
        .unwrap();
    assert_ne!(fs::read(&path).unwrap(), before);
    let names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(names.is_empty(), "{names:?}");
}

#[test]
fn manifest_lists_every_message_with_its_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample_archive(dir.path(), "q.tar");
    let out = Command::new("tar")
        .arg("xOf")
        .arg(&path)
        .arg("mxspool-archive/manifest.json")
        .output()
        .expect("the system tar is required");
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(m["format"], "mxspool-archive");
    assert_eq!(m["version"], 1);
    assert_eq!(m["created"], "2024-05-01T21:46:40.000Z");
    assert_eq!(m["source_host"], "backup.example.net");
    assert_eq!(m["domain"], "example.com");
    let msgs = m["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["id"], ID_8BIT);
    assert_eq!(msgs[0]["eml_size"], eight_bit().1.len());
    use sha2::Digest;
    let sha = sha2::Sha256::digest(&eight_bit().1);
    let hex: String = sha.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(msgs[0]["eml_sha256"], hex);
    assert_eq!(msgs[1]["json_sha256"].as_str().unwrap().len(), 64);
}

#[test]
fn damaged_gzip_stream_is_refused_even_when_salvaging() {
    let dir = tempfile::tempdir().unwrap();
    // Enough poorly compressible messages that the damage lands well inside the stream.
    let messages: Vec<_> = (0..20)
        .map(|i| {
            let (mut env, _) = eight_bit();
            env.id = format!("M{i:02}");
            let body: String = (0..400)
                .map(|j| format!("{:x}", (i * 7919 + j * 104729) % 65521))
                .collect();
            (env, format!("Subject: {i}\r\n\r\n{body}\r\n").into_bytes())
        })
        .collect();
    let path = write_archive(dir.path(), "d.tar.gz", &messages);
    let mut bytes = fs::read(&path).unwrap();
    let at = bytes.len() * 3 / 4;
    bytes[at] ^= 0xff;
    fs::write(&path, &bytes).unwrap();
    for salvage in [false, true] {
        match ArchiveReader::open_with(
            &path,
            ReadOptions {
                salvage,
                ..Default::default()
            },
        ) {
            Err(e @ Error::Damaged { .. }) => assert!(e.to_string().contains("damaged"), "{e}"),
            other => panic!("salvage {salvage}: expected Damaged, got {other:?}"),
        }
    }
}

/// A manifest far bigger than the archive's messages can need (a small archive that
/// decompresses to a huge manifest) is refused from its tar header: never read into memory.
#[test]
fn an_oversized_manifest_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bomb.tar.gz");
    let file = fs::File::create(&path).unwrap();
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::best());
    let mut tar = tar::Builder::new(gz);
    let mut h = tar::Header::new_ustar();
    h.set_path("mxspool-archive/FORMAT").unwrap();
    h.set_size(18);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append(&h, &b"mxspool-archive 1\n"[..]).unwrap();
    let size = 256u64 << 20;
    let mut h = tar::Header::new_ustar();
    h.set_path("mxspool-archive/manifest.json").unwrap();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append(&h, std::io::repeat(b' ').take(size)).unwrap();
    tar.into_inner().unwrap().finish().unwrap();
    assert!(fs::metadata(&path).unwrap().len() < 2 << 20);
    match ArchiveReader::open(&path) {
        Err(e @ Error::Format(_)) => assert!(e.to_string().contains("manifest"), "{e}"),
        other => panic!("expected Format, got {other:?}"),
    }
}

/// With `max_message`, a message over the limit is a problem, never given out (import
/// passes its max_message_size); the others come through.
#[test]
fn messages_over_max_message_are_problems_not_entries() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample_archive(dir.path(), "q.tar");
    let sizes: Vec<usize> = {
        let r = ArchiveReader::open(&path).unwrap();
        read_all(&r).iter().map(|e| e.message.len()).collect()
    };
    let limit = *sizes.iter().min().unwrap() as u64;
    let r = ArchiveReader::open_with(
        &path,
        ReadOptions {
            max_message: Some(limit),
            ..Default::default()
        },
    )
    .unwrap();
    let all = read_all(&r);
    assert_eq!(
        all.len(),
        sizes.iter().filter(|&&s| s as u64 <= limit).count()
    );
    assert!(all.iter().all(|e| e.message.len() as u64 <= limit));
    assert_eq!(r.problems().len(), 2 - all.len(), "{:?}", r.problems());
    assert!(
        r.problems()[0].what.contains("allowed"),
        "{:?}",
        r.problems()
    );
}

/// A message of `len` bytes (several chunks of `MessageBytes`), lines of varied length.
fn long_message(len: usize) -> Vec<u8> {
    let mut m = b"Subject: long\r\n\r\n".to_vec();
    let mut n = 0;
    while m.len() < len {
        n += 1;
        m.extend_from_slice(format!("line {n} {:0w$}\r\n", n, w = n % 90).as_bytes());
    }
    m.truncate(len);
    m
}

/// Everything `for_each_message` hands out for `id`: the chunks read, and how the
/// reading ended.
fn stream(r: &ArchiveReader) -> (Vec<u8>, Option<std::io::ErrorKind>, Result<(), Error>) {
    let (mut got, mut failed) = (Vec::new(), None);
    let walk = r.for_each_message(|_, bytes| {
        loop {
            match bytes.next_chunk() {
                Ok(Some(c)) => {
                    assert!(c.len() <= spool_tools::CHUNK);
                    got.extend_from_slice(c);
                }
                Ok(None) => break,
                Err(e) => {
                    failed = Some(e.kind());
                    break;
                }
            }
        }
        // The consumer swallows the error: the walk reports it all the same.
        Ok::<(), Error>(())
    });
    (got, failed, walk)
}

#[test]
fn a_message_is_streamed_in_chunks_and_a_changed_one_fails_at_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let (env, _) = eight_bit();
    let msg = long_message(5 * spool_tools::CHUNK + 123);
    let path = write_archive(dir.path(), "q.tar", &[(env.clone(), msg.clone())]);
    let r = ArchiveReader::open(&path).unwrap();
    let (got, failed, walk) = stream(&r);
    assert_eq!((failed, walk.is_ok()), (None, true));
    assert!(got == msg, "the streamed bytes differ");
    r.with_message(&env.id, |e, bytes| {
        assert_eq!(e, env);
        assert_eq!(bytes.size(), msg.len() as u64);
        Ok::<(), Error>(())
    })
    .unwrap();

    // Same size, last byte changed after the verification: every chunk comes, and the
    // read that reaches the end fails.
    let mut other = msg.clone();
    *other.last_mut().unwrap() ^= 1;
    let mut w = create_file_replacing(&path, meta()).unwrap();
    w.add(&env, &other).unwrap();
    w.finish().unwrap();
    let (got, failed, walk) = stream(&r);
    assert_eq!(got.len(), msg.len(), "all bytes before the end were given");
    assert_eq!(failed, Some(std::io::ErrorKind::InvalidData));
    assert!(matches!(walk, Err(Error::Changed(_))), "{walk:?}");
    let mut kind = None;
    let e = r
        .with_message(&env.id, |_, bytes| {
            kind = bytes.to_vec().err().map(|e| e.kind());
            Ok::<(), Error>(())
        })
        .unwrap_err();
    assert_eq!(kind, Some(std::io::ErrorKind::InvalidData));
    assert!(matches!(e, Error::Changed(_)), "{e}");
    let e = r.message(&env.id).unwrap_err();
    assert!(matches!(e, Error::Changed(_)), "{e}");
}

#[test]
fn a_member_cut_short_after_the_verification_fails_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let (env, _) = eight_bit();
    let msg = long_message(3 * spool_tools::CHUNK);
    let path = write_archive(dir.path(), "q.tar", &[(env, msg.clone())]);
    let r = ArchiveReader::open(&path).unwrap();
    // The file cut in the middle of the .eml member.
    let at = find(&fs::read(&path).unwrap(), &msg[..64]) + msg.len() / 2;
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(at as u64)
        .unwrap();
    let (got, failed, walk) = stream(&r);
    assert!(
        got.len() < msg.len(),
        "{} bytes of {}",
        got.len(),
        msg.len()
    );
    assert!(failed.is_some());
    assert!(matches!(walk, Err(Error::Changed(_))), "{walk:?}");
}

#[test]
fn a_message_whose_eml_comes_before_its_json_is_still_given() {
    let dir = tempfile::tempdir().unwrap();
    let path = sample_archive(dir.path(), "q.tar");
    // Packed again with each .eml before its .json (as a careless repack might).
    let mut members: Vec<(tar::Header, Vec<u8>)> = Vec::new();
    let mut a = tar::Archive::new(fs::File::open(&path).unwrap());
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        members.push((e.header().clone(), data));
    }
    for i in 0..members.len() - 1 {
        let name = |m: &(tar::Header, Vec<u8>)| m.0.path().unwrap().display().to_string();
        if name(&members[i]).ends_with(".json") && name(&members[i + 1]).ends_with(".eml") {
            members.swap(i, i + 1);
        }
    }
    let swapped = dir.path().join("swapped.tar");
    let mut b = tar::Builder::new(fs::File::create(&swapped).unwrap());
    for (h, data) in &members {
        b.append(h, &data[..]).unwrap();
    }
    b.finish().unwrap();
    drop(b);
    let r = ArchiveReader::open(&swapped).unwrap();
    assert!(r.problems().is_empty(), "{:?}", r.problems());
    assert_samples(&r);
}
