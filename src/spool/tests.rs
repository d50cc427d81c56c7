//! Feature tests of the spool against a real RocksDB in a temporary directory.

use super::*;
use crate::envelope::Recipient;

fn env(id: &str, arrival_ms: u64, rcpts: &[&str]) -> Envelope {
    Envelope {
        id: id.into(),
        sender: "alice@sender.org".into(),
        recipients: rcpts.iter().map(|r| Recipient::new(*r)).collect(),
        arrival_ms,
        size: 0,
        body: Default::default(),
        smtputf8: false,
        ret: None,
        envid: None,
        client_ip: "192.0.2.1".into(),
        helo: "client.example".into(),
    }
}

fn open_tmp() -> (tempfile::TempDir, Spool) {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    (dir, spool)
}

/// `(domain, id, recipient addresses)` of each listed entry.
fn listing(spool: &Spool, domain: Option<&str>) -> Vec<(String, String, Vec<String>)> {
    spool
        .list(domain)
        .unwrap()
        .into_iter()
        .map(|m| {
            let rcpts = m.recipients.into_iter().map(|r| r.address).collect();
            (m.domain, m.id, rcpts)
        })
        .collect()
}

fn keys_in(spool: &Spool, family: Cf) -> usize {
    let db = spool.db().unwrap();
    let db = &*db;
    db.iterator_cf(cf(db, family).unwrap(), IteratorMode::Start)
        .count()
}

/// Keys of `meta` other than the domains' counters (`usage.rs`).
fn meta_keys(spool: &Spool) -> usize {
    let db = spool.db().unwrap();
    let db = &*db;
    db.iterator_cf(cf(db, Cf::Meta).unwrap(), IteratorMode::Start)
        .filter(|kv| keys::parse_usage(&kv.as_ref().unwrap().0).is_none())
        .count()
}

/// A blocking spool call (a part written or discarded) from a multi-threaded test runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[tokio::test]
async fn enqueued_message_and_envelope_come_back_identical() {
    let (_dir, spool) = open_tmp();
    // Binary-safe: CRLF, bare CR, NUL, 8-bit, and a body large enough for a blob file.
    let mut body = b"Received: from x\r\nSubject: hi\r\n\r\nline\r\n\0\xff\r".to_vec();
    body.extend(std::iter::repeat_n(b'x', 10_000));
    let mut e = env("0000000000001", 1_700_000_000_000, &["Bob@Example.COM"]);
    e.size = body.len() as u64;
    spool.enqueue(e.clone(), body.clone()).await.unwrap();

    assert_eq!(spool.message("0000000000001").unwrap().unwrap(), body);
    assert_eq!(spool.envelope("0000000000001").unwrap().unwrap(), e);
    assert_eq!(spool.message("0000000000002").unwrap(), None);
    assert_eq!(spool.envelope("0000000000002").unwrap(), None);

    let list = spool.list(None).unwrap();
    assert_eq!(list.len(), 1);
    let m = &list[0];
    assert_eq!(
        (m.id.as_str(), m.domain.as_str()),
        ("0000000000001", "example.com")
    );
    assert_eq!(m.sender, "alice@sender.org");
    assert_eq!(
        (m.arrival_ms, m.size),
        (1_700_000_000_000, body.len() as u64)
    );
    assert_eq!((m.attempts, m.next_attempt_ms), (0, 1_700_000_000_000));
    assert_eq!((m.last_error.as_deref(), m.held), (None, false));
    assert_eq!(m.recipients, e.recipients);
    assert_eq!(spool.count_exact().unwrap(), 1);
    assert_eq!(spool.count().unwrap(), 1);
}

#[tokio::test]
async fn a_message_for_two_domains_is_stored_once_and_listed_under_each() {
    let (_dir, spool) = open_tmp();
    let e = env("ID2", 5, &["a1@one.org", "b@two.org", "a2@ONE.org"]);
    spool.enqueue(e, b"body".to_vec()).await.unwrap();

    assert_eq!(keys_in(&spool, Cf::Messages), 1);
    assert_eq!(keys_in(&spool, Cf::Envelopes), 1);
    assert_eq!(keys_in(&spool, Cf::Queue), 2);
    assert_eq!(keys_in(&spool, Cf::Due), 2);
    assert_eq!(
        spool.stored_envelope("ID2").unwrap().unwrap().domains,
        s(&["one.org", "two.org"])
    );
    assert_eq!(
        listing(&spool, Some("one.org")),
        vec![(
            "one.org".into(),
            "ID2".into(),
            s(&["a1@one.org", "a2@ONE.org"])
        )]
    );
    assert_eq!(
        listing(&spool, Some("two.org")),
        vec![("two.org".into(), "ID2".into(), s(&["b@two.org"]))]
    );
    let entry = spool.queue_entry("two.org", "ID2").unwrap().unwrap();
    assert_eq!(entry.recipients.len(), 1);
}

#[tokio::test]
async fn a_domain_listing_holds_only_that_domain() {
    let (_dir, spool) = open_tmp();
    // Neighbours on both sides, a prefix of the domain, and the domain as a prefix.
    for (id, rcpt) in [
        ("ID5", "x@a.com.evil"),
        ("ID4", "x@a.com"),
        ("ID3", "x@a.co"),
        ("ID1", "y@a.com"),
        ("ID6", "x@b.com"),
        ("ID0", "x@0.com"),
        ("ID7", "x@a.comx"),
    ] {
        spool.enqueue(env(id, 1, &[rcpt]), vec![]).await.unwrap();
    }
    assert_eq!(
        listing(&spool, Some("a.com")),
        vec![
            ("a.com".into(), "ID1".into(), s(&["y@a.com"])),
            ("a.com".into(), "ID4".into(), s(&["x@a.com"])),
        ]
    );
    assert!(listing(&spool, Some("nowhere.org")).is_empty());
    let all: Vec<_> = listing(&spool, None)
        .into_iter()
        .map(|(d, id, _)| format!("{d}/{id}"))
        .collect();
    assert_eq!(
        all,
        s(&[
            "0.com/ID0",
            "a.co/ID3",
            "a.com/ID1",
            "a.com/ID4",
            "a.com.evil/ID5",
            "a.comx/ID7",
            "b.com/ID6"
        ])
    );
}

#[tokio::test]
async fn due_returns_only_due_entries_earliest_first() {
    let (_dir, spool) = open_tmp();
    for (id, at) in [
        ("ID1", 300),
        ("ID2", 100),
        ("ID3", 70_000),
        ("ID4", 256),
        ("ID5", 1),
    ] {
        spool
            .enqueue(env(id, at, &["r@d.org"]), vec![])
            .await
            .unwrap();
    }
    let ids = |v: Vec<(String, String)>| v.into_iter().map(|(_, id)| id).collect::<Vec<_>>();
    assert_eq!(ids(spool.due(0, 10).unwrap()), Vec::<String>::new());
    assert_eq!(ids(spool.due(256, 10).unwrap()), s(&["ID5", "ID2", "ID4"]));
    assert_eq!(ids(spool.due(299, 10).unwrap()), s(&["ID5", "ID2", "ID4"]));
    assert_eq!(
        ids(spool.due(u64::MAX, 10).unwrap()),
        s(&["ID5", "ID2", "ID4", "ID1", "ID3"])
    );
    assert_eq!(ids(spool.due(u64::MAX, 2).unwrap()), s(&["ID5", "ID2"]));
    assert_eq!(
        spool.due(1, 10).unwrap(),
        vec![("d.org".to_string(), "ID5".to_string())]
    );
}

#[test]
fn everything_survives_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = Spool::open(dir.path()).unwrap();
        spool
            .enqueue_blocking(env("ID1", 9, &["a@one.org", "b@two.org"]), b"kept".to_vec())
            .unwrap();
        let clone = spool.clone();
        drop(spool);
        clone
            .enqueue_blocking(env("ID2", 10, &["c@one.org"]), b"also".to_vec())
            .unwrap();
    }
    let spool = Spool::open(dir.path()).unwrap();
    assert_eq!(spool.message("ID1").unwrap().unwrap(), b"kept");
    assert_eq!(spool.message("ID2").unwrap().unwrap(), b"also");
    let all: Vec<_> = listing(&spool, None)
        .into_iter()
        .map(|(d, id, _)| format!("{d}/{id}"))
        .collect();
    assert_eq!(all, s(&["one.org/ID1", "one.org/ID2", "two.org/ID1"]));
    assert_eq!(spool.due(100, 10).unwrap().len(), 3);
}

#[test]
fn a_second_open_is_locked_and_names_the_path() {
    let (dir, _first) = open_tmp();
    let err = Spool::open(dir.path())
        .err()
        .expect("second open must fail");
    assert!(matches!(err, SpoolError::Locked { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    assert!(msg.contains("in use by another process"), "{msg}");
}

#[test]
fn another_format_version_is_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = Spool::open(dir.path()).unwrap();
        let mut b = Batch::new();
        b.put(Cf::Meta, keys::META_FORMAT.to_vec(), keys::format_value(4));
        spool.commit_blocking(b).unwrap();
    }
    for result in [Spool::open(dir.path()), Spool::open_read_only(dir.path())] {
        let err = result.err().expect("format 4 must be refused");
        assert!(
            matches!(
                err,
                SpoolError::Format {
                    found: 4,
                    expected: 3
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("version 4"), "{err}");
    }
}

#[tokio::test]
async fn a_read_only_open_sees_what_a_running_writer_committed() {
    let (dir, spool) = open_tmp();
    spool
        .enqueue(env("ID1", 1, &["a@one.org"]), b"committed".to_vec())
        .await
        .unwrap();
    let ro = Spool::open_read_only(dir.path()).unwrap();
    assert_eq!(ro.message("ID1").unwrap().unwrap(), b"committed");
    assert_eq!(listing(&ro, Some("one.org")).len(), 1);
    assert!(matches!(
        ro.enqueue(env("ID2", 1, &["a@one.org"]), vec![]).await,
        Err(SpoolError::ReadOnly)
    ));
    // The writer is unaffected by the reader.
    spool
        .enqueue(env("ID3", 1, &["a@one.org"]), vec![])
        .await
        .unwrap();
}

#[test]
fn a_read_only_open_of_a_missing_spool_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope");
    let err = Spool::open_read_only(&path).err().unwrap();
    assert!(matches!(err, SpoolError::Missing { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("spool {} does not exist", path.display())
    );
    assert!(!path.exists(), "a read-only open must not create the spool");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_enqueues_share_synced_commits() {
    let (_dir, spool) = open_tmp();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let spool = spool.clone();
            tokio::spawn(async move {
                let id = format!("ID{i:02}");
                let body = format!("message {i}").into_bytes();
                spool.enqueue(env(&id, i, &["r@d.org"]), body).await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let (commits, batches) = spool.stats();
    assert_eq!(batches, 50);
    assert!(
        commits < 50,
        "{commits} commits for {batches} batches: no grouping"
    );
    assert_eq!(spool.list(Some("d.org")).unwrap().len(), 50);
    assert_eq!(spool.message("ID07").unwrap().unwrap(), b"message 7");
}

#[test]
fn queue_json_has_the_postqueue_fields() {
    let mut rcpts = vec![Recipient::new("a@d.org"), Recipient::new("b@d.org")];
    rcpts[1].state = RcptState::Failed;
    let m = QueuedMessage {
        id: "ID1".into(),
        domain: "d.org".into(),
        sender: "".into(),
        recipients: rcpts,
        arrival_ms: 1_700_000_000_123,
        size: 42,
        attempts: 3,
        next_attempt_ms: 1_700_003_600_000,
        last_error: Some("421 try later".into()),
        last_tls: Some(crate::spool::LastTls {
            relay: "mx.d.org[192.0.2.1]:25".into(),
            state: crate::tls::TlsState {
                version: Some("TLSv1.3".into()),
                cipher: Some("TLS13_AES_256_GCM_SHA384".into()),
                verified: "pkix".into(),
            },
        }),
        held: true,
    };
    assert_eq!(
        m.to_json(),
        serde_json::json!({
            "id": "ID1",
            "domain": "d.org",
            "sender": "",
            "recipients": [
                {"address": "a@d.org", "state": "pending"},
                {"address": "b@d.org", "state": "failed"},
            ],
            "arrival": "2023-11-14T22:13:20Z",
            "size": 42,
            "attempts": 3,
            "next_attempt": "2023-11-14T23:13:20Z",
            "last_error": "421 try later",
            "last_tls": {"relay": "mx.d.org[192.0.2.1]:25", "version": "TLSv1.3",
                "cipher": "TLS13_AES_256_GCM_SHA384", "verified": "pkix"},
            "held": true,
        })
    );
}

#[test]
fn rocksdb_errors_are_sorted_into_what_callers_act_on() {
    let p = Path::new("/var/spool/mxspool");
    let check = |msg: &str| map_db_message(msg.to_string(), p);
    assert!(check("IO error: No space left on device: While appending to file").is_no_space());
    assert!(matches!(
        check(
            "IO error: While lock file: /var/spool/mxspool/LOCK: Resource temporarily unavailable"
        ),
        SpoolError::Locked { .. }
    ));
    assert!(matches!(
        check("IO error: lock hold by current process, acquire time 1 acquiring thread 2: /var/spool/mxspool/LOCK: No locks available"),
        SpoolError::Locked { .. }
    ));
    assert!(matches!(
        check("Corruption: block checksum mismatch"),
        SpoolError::Corrupt(_)
    ));
    assert!(matches!(
        check("Invalid argument: whatever"),
        SpoolError::Db(_)
    ));
    assert!(SpoolError::Io(std::io::Error::from_raw_os_error(libc::ENOSPC)).is_no_space());
    assert!(!SpoolError::Closed.is_no_space());
    let dup = SpoolError::Io(std::io::Error::from_raw_os_error(libc::ENOSPC)).duplicate();
    assert!(dup.is_no_space());
}

#[test]
fn free_bytes_reports_the_file_system() {
    let (_dir, spool) = open_tmp();
    assert!(spool.free_bytes().unwrap() > 0);
}

#[tokio::test]
async fn settling_two_domains_concurrently_deletes_the_message_exactly_when_both_are_done() {
    use crate::envelope::RcptState;
    let (_dir, spool) = open_tmp();
    spool
        .enqueue(env("ID1", 10, &["a@one.org", "b@two.org"]), b"msg".to_vec())
        .await
        .unwrap();
    let deliver = |e: &QueueEntry, _: &StoredEnvelope| {
        let mut n = e.clone();
        n.recipients
            .iter_mut()
            .for_each(|r| r.state = RcptState::Delivered);
        Some((n, None))
    };
    // Both domains finish at once: the per-message lock keeps the envelope's domain list
    // right, so the message goes with the second and not before.
    let (a, b) = tokio::join!(
        spool.settle("one.org", "ID1", deliver),
        spool.settle("two.org", "ID1", deliver)
    );
    assert!(a.unwrap() && b.unwrap());
    assert_eq!(spool.message("ID1").unwrap(), None);
    assert_eq!(spool.envelope("ID1").unwrap(), None);
    assert_eq!(keys_in(&spool, Cf::Queue), 0);
    assert_eq!(keys_in(&spool, Cf::Due), 0);
    // Settling what is gone does nothing.
    assert!(!spool.settle("one.org", "ID1", deliver).await.unwrap());
}

#[tokio::test]
async fn a_deferred_entry_moves_in_the_due_index_and_a_dsn_rides_along() {
    let (_dir, spool) = open_tmp();
    spool
        .enqueue(env("ID1", 10, &["a@one.org"]), b"msg".to_vec())
        .await
        .unwrap();
    assert_eq!(
        spool.due(10, 10).unwrap(),
        vec![("one.org".into(), "ID1".into())]
    );
    let dsn = Batch::enqueue(env("ID2", 20, &["alice@sender.org"]), b"dsn".to_vec()).unwrap();
    spool
        .settle("one.org", "ID1", |e, _| {
            let mut n = e.clone();
            n.attempts += 1;
            n.next_attempt_ms = 5000;
            n.last_error = Some("421 try later".into());
            Some((n, Some(dsn)))
        })
        .await
        .unwrap();
    assert_eq!(
        spool.due(4999, 10).unwrap(),
        vec![("sender.org".into(), "ID2".into())]
    );
    assert_eq!(spool.next_due().unwrap(), Some(20));
    let e = spool.queue_entry("one.org", "ID1").unwrap().unwrap();
    assert_eq!((e.attempts, e.next_attempt_ms), (1, 5000));
    assert_eq!(spool.message("ID2").unwrap().unwrap(), b"dsn");
    let chunk = spool.domain_entries("one.org", None, 10).unwrap();
    assert_eq!(chunk.len(), 1);
    assert!(spool
        .domain_entries("one.org", Some("ID1"), 10)
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn a_due_scan_continues_after_its_cursor() {
    let (_dir, spool) = open_tmp();
    for (id, t) in [("A1", 10), ("A2", 20), ("A3", 30)] {
        spool
            .enqueue(env(id, t, &["x@one.org"]), b"m".to_vec())
            .await
            .unwrap();
    }
    let (first, cursor) = spool.due_after(25, None, 10).unwrap();
    assert_eq!(
        first,
        vec![
            ("one.org".into(), "A1".into()),
            ("one.org".into(), "A2".into())
        ]
    );
    let (none, same) = spool.due_after(25, cursor.as_ref(), 10).unwrap();
    assert!(none.is_empty() && same.is_none(), "nothing new before 25");
    let (later, _) = spool.due_after(35, cursor.as_ref(), 10).unwrap();
    assert_eq!(later, vec![("one.org".into(), "A3".into())]);
    let (limited, c1) = spool.due_after(35, None, 1).unwrap();
    assert_eq!(limited.len(), 1);
    let (rest, _) = spool.due_after(35, c1.as_ref(), 10).unwrap();
    assert_eq!(rest.len(), 2);
}

#[tokio::test]
async fn an_unreadable_entry_is_skipped_by_listings_and_delivery_and_removed_by_recover() {
    let (dir, spool) = open_tmp();
    for (i, id) in ["0000000000001", "0000000000002", "0000000000003"]
        .iter()
        .enumerate()
    {
        let e = env(id, 1_700_000_000_000 + i as u64, &["bob@example.com"]);
        spool
            .enqueue(e, b"Subject: x\r\n\r\nhi\r\n".to_vec())
            .await
            .unwrap();
    }
    // Damage: the second entry's record is not JSON any more.
    {
        let db = spool.db().unwrap();
        let db = &*db;
        let mut o = WriteOptions::default();
        o.set_sync(true);
        db.put_cf_opt(
            cf(db, Cf::Queue).unwrap(),
            keys::queue("example.com", "0000000000002"),
            b"{not json",
            &o,
        )
        .unwrap();
    }
    let mut seen = Vec::new();
    let mut bad = Vec::new();
    spool
        .for_each_readable(
            Some("example.com"),
            |m| {
                seen.push(m.id);
                true
            },
            |u| bad.push(u),
        )
        .unwrap();
    assert_eq!(seen, s(&["0000000000001", "0000000000003"]));
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].id, "0000000000002");
    assert!(bad[0].to_string().contains("mxspool recover"), "{}", bad[0]);
    // Delivery's reader skips it too, instead of failing the domain's whole queue.
    let ids: Vec<String> = spool
        .domain_entries("example.com", None, 10)
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ids, s(&["0000000000001", "0000000000003"]));
    drop(spool);

    let r = recover(dir.path()).unwrap();
    assert_eq!(r.repaired, None);
    assert_eq!(r.commits_lost, 0);
    assert_eq!(r.entries_lost.len(), 1, "{r:?}");
    assert_eq!(r.entries_lost[0].1, "0000000000002");
    assert_eq!((r.messages, r.entries, r.domains), (2, 2, 1));
    // Its envelope and message went with it; the due index holds the two kept.
    assert_eq!(r.orphans_removed, 2);
    let spool = Spool::open(dir.path()).unwrap();
    assert_eq!(
        listing(&spool, None)
            .into_iter()
            .map(|(_, id, _)| id)
            .collect::<Vec<_>>(),
        s(&["0000000000001", "0000000000003"])
    );
    assert_eq!(keys_in(&spool, Cf::Due), 2);
    assert_eq!(keys_in(&spool, Cf::Envelopes), 2);
    assert_eq!(keys_in(&spool, Cf::Messages), 2);
}

#[tokio::test]
async fn a_spool_behind_its_commit_mark_is_refused_until_recovered() {
    let (dir, spool) = open_tmp();
    spool
        .enqueue(
            env("0000000000001", 1_700_000_000_000, &["bob@example.com"]),
            b"x".to_vec(),
        )
        .await
        .unwrap();
    let acknowledged = spool.db().unwrap().latest_sequence_number();
    drop(spool);
    assert_eq!(mark::read(dir.path()).unwrap(), Some(acknowledged));
    // As if the log's last commits had been cut off: the mark is ahead of the database.
    drop(mark::Mark::open(dir.path(), acknowledged + 5).unwrap());
    let e = Spool::open(dir.path()).err().expect("refused");
    assert!(
        matches!(&e, SpoolError::Damaged { what, .. } if what.contains("5 commit(s)")),
        "{e}"
    );
    let e = Spool::open_read_only(dir.path()).err().expect("refused");
    assert!(matches!(e, SpoolError::Damaged { .. }), "{e}");
    let r = recover(dir.path()).unwrap();
    assert_eq!(r.commits_lost, 5);
    assert_eq!(r.entries, 1);
    let spool = Spool::open(dir.path()).unwrap();
    assert_eq!(listing(&spool, None).len(), 1);
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_written_in_parts_reads_back_exact_and_goes_whole() {
    let (dir, spool) = open_tmp();
    let id = "0000000000P01";
    let first = b"Received: x\r\nSubject: big\r\n\r\n".to_vec();
    let (p1, p2, tail) = (
        pattern(PART_SIZE, 1),
        pattern(PART_SIZE + 7, 2),
        pattern(99, 3),
    );
    blocking(|| spool.write_part(id, 1, &p1)).unwrap();
    blocking(|| spool.write_part(id, 2, &p2)).unwrap();
    let parts = Parts {
        first: first.clone(),
        written: 2,
        written_len: (p1.len() + p2.len()) as u64,
        rest: vec![tail.clone()],
    };
    let mut e = env(id, 1, &["a@one.org", "b@two.org"]);
    e.size = parts.len();
    spool.enqueue_parts(e, parts).await.unwrap();
    let whole: Vec<u8> = [&first[..], &p1, &p2, &tail].concat();

    let m = spool.load_message(id).unwrap().unwrap();
    assert_eq!(m.parts(), 3);
    assert_eq!(m.len(), whole.len() as u64);
    assert_eq!(m.first(), &first[..]);
    let mut read = Vec::new();
    std::io::Read::read_to_end(&mut m.reader(), &mut read).unwrap();
    assert_eq!(read, whole);
    assert_eq!(m.prefix(100).unwrap(), whole[..100]);
    assert_eq!(spool.message(id).unwrap().unwrap(), whole);
    // Queued: the partial mark is gone, so a restart keeps every part.
    drop(m);
    drop(spool);
    let spool = Spool::open(dir.path()).unwrap();
    assert_eq!(spool.message(id).unwrap().unwrap(), whole);
    assert_eq!(keys_in(&spool, Cf::Messages), 4);

    // Delivered to both domains: every part goes with the message.
    for d in ["one.org", "two.org"] {
        spool
            .settle(d, id, |current, _| {
                let mut next = current.clone();
                for r in &mut next.recipients {
                    r.state = crate::envelope::RcptState::Delivered;
                }
                Some((next, None))
            })
            .await
            .unwrap();
    }
    assert!(spool.load_message(id).unwrap().is_none());
    assert_eq!(keys_in(&spool, Cf::Messages), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn parts_of_a_message_never_queued_are_removed_at_the_next_start() {
    let (dir, spool) = open_tmp();
    blocking(|| spool.write_part("0000000000P02", 1, &pattern(1000, 1))).unwrap();
    blocking(|| spool.write_part("0000000000P02", 2, &pattern(1000, 2))).unwrap();
    // A refused one is discarded at once.
    blocking(|| spool.write_part("0000000000P03", 1, &pattern(1000, 3))).unwrap();
    blocking(|| spool.discard_parts("0000000000P03", 1)).unwrap();
    spool
        .enqueue(env("0000000000004", 1, &["a@one.org"]), b"small".to_vec())
        .await
        .unwrap();
    assert_eq!(keys_in(&spool, Cf::Messages), 3);
    drop(spool);
    let spool = Spool::open(dir.path()).unwrap();
    assert_eq!(
        keys_in(&spool, Cf::Messages),
        1,
        "only the queued message is left"
    );
    let db = spool.db().unwrap();
    let meta: Vec<Vec<u8>> = db
        .iterator_cf(cf(&db, Cf::Meta).unwrap(), IteratorMode::Start)
        .map(|kv| kv.unwrap().0.to_vec())
        .filter(|k| keys::parse_usage(k).is_none())
        .collect();
    assert_eq!(
        meta,
        vec![keys::META_FORMAT.to_vec()],
        "only the format version is left"
    );
    drop(db);
    assert_eq!(spool.message("0000000000004").unwrap().unwrap(), b"small");
}

#[tokio::test]
async fn a_whole_message_over_the_part_size_is_stored_in_parts() {
    let (_dir, spool) = open_tmp();
    let body = pattern(3 * PART_SIZE + 5, 9);
    spool
        .enqueue(env("0000000000P05", 1, &["a@one.org"]), body.clone())
        .await
        .unwrap();
    let m = spool.load_message("0000000000P05").unwrap().unwrap();
    assert_eq!(m.parts(), 3);
    assert_eq!(m.first().len(), PART_SIZE);
    assert_eq!(m.to_vec().unwrap(), body);
}

#[test]
fn a_version_1_spool_is_read_and_marked_version_2() {
    let dir = tempfile::tempdir().unwrap();
    drop(Spool::open(dir.path()).unwrap());
    {
        let db = DB::open_cf_descriptors(&db_options(false), dir.path(), cf_descriptors()).unwrap();
        db.put_cf(
            cf(&db, Cf::Meta).unwrap(),
            keys::META_FORMAT,
            keys::format_value(1),
        )
        .unwrap();
    }
    drop(Spool::open_read_only(dir.path()).unwrap());
    let spool = Spool::open(dir.path()).unwrap();
    let db = spool.db().unwrap();
    let db = &*db;
    let v = db
        .get_cf(cf(db, Cf::Meta).unwrap(), keys::META_FORMAT)
        .unwrap()
        .unwrap();
    assert_eq!(keys::parse_format(&v), Some(FORMAT_VERSION));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reopened_spool_keeps_everything_and_takes_mail_again() {
    let (_dir, spool) = open_tmp();
    spool
        .enqueue(env("0000000000R01", 1, &["a@one.org"]), b"before".to_vec())
        .await
        .unwrap();
    blocking(|| spool.write_part("0000000000R02", 1, b"a part in DATA")).unwrap();
    let s2 = spool.clone();
    tokio::task::spawn_blocking(move || s2.inner.db.reopen())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(spool.message("0000000000R01").unwrap().unwrap(), b"before");
    spool
        .enqueue(env("0000000000R03", 2, &["a@one.org"]), b"after".to_vec())
        .await
        .unwrap();
    assert_eq!(listing(&spool, None).len(), 2);
    // A message in DATA during the reopen keeps its parts (no sweep on reopen).
    assert_eq!(keys_in(&spool, Cf::Messages), 3);
}

fn sized(id: &str, rcpts: &[&str], size: u64) -> Envelope {
    let mut e = env(id, 1, rcpts);
    e.size = size;
    e
}

fn used(messages: u64, bytes: u64) -> Usage {
    Usage { messages, bytes }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_counters_follow_every_change_of_the_queue_and_survive_a_reopen() {
    let (dir, spool) = open_tmp();
    spool
        .enqueue(
            sized("ID1", &["a@one.org", "b@one.org", "c@two.org"], 100),
            vec![b'x'; 100],
        )
        .await
        .unwrap();
    spool
        .enqueue(sized("ID2", &["a@one.org"], 30), vec![b'y'; 30])
        .await
        .unwrap();
    assert_eq!(spool.usage("one.org"), used(2, 130));
    assert_eq!(spool.usage("two.org"), used(1, 100));
    assert_eq!(spool.usage("three.org"), Usage::default());
    // A hold changes entries, not what is queued.
    spool.hold("one.org", 5).await.unwrap();
    assert_eq!(spool.usage("one.org"), used(2, 130));
    // Delivered for one domain: only its counter goes down.
    assert!(spool.remove("one.org", "ID1").await.unwrap());
    assert_eq!(spool.usage("one.org"), used(1, 30));
    assert_eq!(spool.usage("two.org"), used(1, 100));
    assert!(!spool.remove("one.org", "ID1").await.unwrap());
    assert_eq!(spool.usage("one.org"), used(1, 30));
    drop(spool);

    // From the spool itself, after a reopen, read-only and read-write.
    let ro = Spool::open_read_only(dir.path()).unwrap();
    assert_eq!(
        ro.usages(),
        vec![
            ("one.org".into(), used(1, 30)),
            ("two.org".into(), used(1, 100))
        ]
    );
    drop(ro);
    let spool = Spool::open(dir.path()).unwrap();
    assert_eq!(spool.usage("one.org"), used(1, 30));
    assert!(spool.remove("one.org", "ID2").await.unwrap());
    assert!(spool.remove("two.org", "ID1").await.unwrap());
    assert!(spool.usages().is_empty(), "{:?}", spool.usages());
    assert!(tokio::task::block_in_place(|| spool.import_blocking(
        "one.org",
        sized("ID3", &["z@one.org"], 7),
        QueueEntry {
            recipients: vec![Recipient::new("z@one.org")],
            attempts: 0,
            next_attempt_ms: 0,
            last_error: None,
            held: false,
            warned: false,
            held_since_ms: 0,
            held_ms: 0,
            last_tls: None,
        },
        &mut &[b'z'; 7][..],
        9,
    ))
    .unwrap());
    assert_eq!(spool.usage("one.org"), used(1, 7));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_older_spool_is_counted_once_and_recover_recounts() {
    let (dir, spool) = open_tmp();
    spool
        .enqueue(
            sized("ID1", &["a@one.org", "c@two.org"], 100),
            vec![b'x'; 100],
        )
        .await
        .unwrap();
    spool
        .enqueue(sized("ID2", &["a@one.org"], 30), vec![b'y'; 30])
        .await
        .unwrap();
    // As a version 2 spool had it: no counters.
    let mut b = Batch::new();
    b.put(Cf::Meta, keys::META_FORMAT.to_vec(), keys::format_value(2));
    b.delete(Cf::Meta, keys::usage("one.org"));
    b.delete(Cf::Meta, keys::usage("two.org"));
    spool.commit(b).await.unwrap();
    drop(spool);
    // Read-only: counted in memory, nothing written.
    let ro = Spool::open_read_only(dir.path()).unwrap();
    assert_eq!(ro.usage("one.org"), used(2, 130));
    drop(ro);
    let spool = Spool::open(dir.path()).unwrap();
    assert_eq!(spool.usage("one.org"), used(2, 130));
    assert_eq!(spool.usage("two.org"), used(1, 100));
    // Stored, with the new format.
    drop(spool);
    let spool = Spool::open(dir.path()).unwrap();
    assert_eq!(spool.usage("two.org"), used(1, 100));
    // Counters gone wrong (they cannot, but recover does not trust them): recounted.
    let mut b = Batch::new();
    b.usage("one.org", 40, 4000);
    b.usage("ghost.org", 1, 1);
    spool.commit(b).await.unwrap();
    drop(spool);
    recover(dir.path()).unwrap();
    let spool = Spool::open(dir.path()).unwrap();
    assert_eq!(
        spool.usages(),
        vec![
            ("one.org".into(), used(2, 130)),
            ("two.org".into(), used(1, 100))
        ]
    );
}

/// What an archive member gives `import_blocking`: its bytes, then at the end either
/// nothing more (`Ok(0)`) or the failure of a digest that does not match; or a crash
/// (a panic) once `crash_after` bytes were given.
struct Member {
    bytes: std::io::Cursor<Vec<u8>>,
    bad_digest: bool,
    crash_after: Option<u64>,
}

impl Member {
    fn new(bytes: Vec<u8>) -> Member {
        Member {
            bytes: std::io::Cursor::new(bytes),
            bad_digest: false,
            crash_after: None,
        }
    }
}

impl std::io::Read for Member {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self
            .crash_after
            .is_some_and(|at| self.bytes.position() >= at)
        {
            panic!("the import crashes here");
        }
        let n = self.bytes.read(buf)?;
        if n == 0 && !buf.is_empty() && self.bad_digest {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "digest mismatch",
            ));
        }
        Ok(n)
    }
}

fn import(spool: &Spool, id: &str, member: &mut Member) -> Result<bool, ImportError> {
    let e = env(id, 1, &["a@one.org"]);
    let entry = QueueEntry {
        recipients: e.recipients.clone(),
        attempts: 2,
        next_attempt_ms: 0,
        last_error: None,
        held: false,
        warned: false,
        held_since_ms: 0,
        held_ms: 0,
        last_tls: None,
    };
    spool.import_blocking("one.org", e, entry, member, 1000)
}

#[test]
fn an_import_is_stored_part_by_part_and_reads_back_exact() {
    let (dir, spool) = open_tmp();
    // Parts as Parts::whole cuts them: a short last part, or none.
    for (id, len, keys) in [
        ("0000000000I01", 3 * PART_SIZE + 5, 4),
        ("0000000000I02", 2 * PART_SIZE, 2),
        ("0000000000I03", PART_SIZE - 1, 1),
    ] {
        let body = pattern(len, 7);
        let before = keys_in(&spool, Cf::Messages);
        assert!(import(&spool, id, &mut Member::new(body.clone())).unwrap());
        assert_eq!(keys_in(&spool, Cf::Messages) - before, keys, "{id}");
        let m = spool.load_message(id).unwrap().unwrap();
        assert_eq!(m.len(), len as u64);
        assert!(m.to_vec().unwrap() == body, "{id} reads back other bytes");
        assert_eq!(
            spool.queue_entry("one.org", id).unwrap().unwrap().attempts,
            2
        );
    }
    // Imported twice: nothing added, and the member not even read.
    let mut again = Member::new(pattern(10, 1));
    again.bad_digest = true;
    assert!(!import(&spool, "0000000000I01", &mut again).unwrap());
    assert_eq!(again.bytes.position(), 0);
    // No partial mark stays: a restart keeps every part.
    assert_eq!(meta_keys(&spool), 1);
    drop(spool);
    let spool = Spool::open(dir.path()).unwrap();
    assert_eq!(keys_in(&spool, Cf::Messages), 7);
    assert_eq!(listing(&spool, None).len(), 3);
}

#[test]
fn an_import_whose_member_fails_at_its_end_or_crashes_leaves_nothing() {
    let (dir, spool) = open_tmp();
    let body = pattern(4 * PART_SIZE + 3, 5);
    // The digest is found wrong only at the end, after the parts were written ahead.
    let mut bad = Member::new(body.clone());
    bad.bad_digest = true;
    let e = import(&spool, "0000000000I04", &mut bad).unwrap_err();
    assert!(matches!(e, ImportError::Read(_)), "{e}");
    assert_eq!(bad.bytes.position(), body.len() as u64, "read to the end");
    assert!(spool.load_message("0000000000I04").unwrap().is_none());
    assert!(listing(&spool, None).is_empty());
    assert_eq!(keys_in(&spool, Cf::Messages), 0, "its parts are removed");
    assert_eq!(meta_keys(&spool), 1, "and its partial mark");

    // A crash mid-import: what it wrote goes at the next open.
    let mut crash = Member::new(body.clone());
    crash.crash_after = Some(3 * PART_SIZE as u64);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        import(&spool, "0000000000I05", &mut crash)
    }));
    assert!(r.is_err());
    assert!(
        keys_in(&spool, Cf::Messages) >= 2,
        "parts were written ahead"
    );
    drop(spool);
    let spool = Spool::open(dir.path()).unwrap();
    assert_eq!(keys_in(&spool, Cf::Messages), 0);
    assert_eq!(meta_keys(&spool), 1);
    // And the same message imports whole afterwards.
    assert!(import(&spool, "0000000000I05", &mut Member::new(body.clone())).unwrap());
    assert!(spool.message("0000000000I05").unwrap().unwrap() == body);
}

#[test]
fn callout_answers_persist_lazily_expire_and_are_swept() {
    let (dir, spool) = open_tmp();
    let known = CalloutAnswer {
        answered_ms: 1_000,
        expires_ms: 10_000,
        refused: None,
    };
    let unknown = CalloutAnswer {
        answered_ms: 1_000,
        expires_ms: 5_000,
        refused: Some(CalloutRefusal {
            code: 550,
            status: Some("5.1.1".into()),
            text: "User unknown".into(),
        }),
    };
    let before = mark::read(dir.path()).unwrap();
    assert!(spool.callout_put("Alice@Example.com", &known));
    assert!(spool.callout_put("bob@example.com", &unknown));
    assert!(!spool.callout_put(&format!("{}@example.com", "x".repeat(600)), &known));
    // Something unreadable under the prefix (a future format, a torn value).
    let mut junk = Batch::new();
    junk.put(Cf::Meta, keys::callout("junk@example.com"), b"{".to_vec());
    spool.commit_blocking(junk.lazy()).unwrap();
    // Lazy commits: written, but the commit mark stays (their log is not synced).
    assert_eq!(mark::read(dir.path()).unwrap(), before);
    assert_eq!(
        spool.callout_get("alice@example.com", 2_000).unwrap(),
        Some(known.clone())
    );
    assert_eq!(
        spool.callout_get("BOB@example.com", 2_000).unwrap(),
        Some(unknown.clone())
    );
    assert_eq!(spool.callout_get("bob@example.com", 5_000).unwrap(), None);
    assert_eq!(spool.callout_get("junk@example.com", 2_000).unwrap(), None);
    assert_eq!(spool.callout_get("carol@example.com", 2_000).unwrap(), None);

    // Mail is untouched by them, and a synced commit moves the mark past them.
    spool
        .enqueue_blocking(
            env("0000000000001", 1_700_000_000_000, &["bob@example.com"]),
            b"x".to_vec(),
        )
        .unwrap();
    let acknowledged = spool.db().unwrap().latest_sequence_number();
    assert_eq!(mark::read(dir.path()).unwrap(), Some(acknowledged));

    // A reopen keeps them; recover leaves them alone and keeps the mail.
    drop(spool);
    let spool = Spool::open(dir.path()).unwrap();
    assert_eq!(
        spool.callout_get("bob@example.com", 2_000).unwrap(),
        Some(unknown.clone())
    );
    drop(spool);
    let r = recover(dir.path()).unwrap();
    assert_eq!((r.entries, r.orphans_removed), (1, 0));
    let ro = Spool::open_read_only(dir.path()).unwrap();
    assert_eq!(
        ro.callout_get("alice@example.com", 2_000).unwrap(),
        Some(known.clone())
    );
    assert!(!ro.callout_put("carol@example.com", &known));
    assert!(matches!(ro.callout_sweep(0), Err(SpoolError::ReadOnly)));
    drop(ro);

    // At 6 s: bob's answer has expired, the junk cannot be read; alice's stays.
    let spool = Spool::open(dir.path()).unwrap();
    assert_eq!(spool.callout_sweep(6_000).unwrap(), (2, 1));
    assert_eq!(meta_keys(&spool), 2, "format and alice's answer");
    assert_eq!(
        spool.callout_get("alice@example.com", 6_000).unwrap(),
        Some(known)
    );
    assert_eq!(listing(&spool, None).len(), 1);
    assert_eq!(spool.callout_sweep(20_000).unwrap(), (1, 0));
}

#[test]
fn sts_policies_persist_lazily_expire_and_are_swept_apart_from_callouts() {
    let (_dir, spool) = open_tmp();
    let policy = |id: &str, expires_ms| StsRecord {
        id: id.into(),
        policy: "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmax_age: 10\r\n".into(),
        fetched_ms: 1_000,
        expires_ms,
    };
    assert!(spool.sts_put("Example.COM", &policy("a1", 10_000)));
    assert!(spool.sts_put("short.example", &policy("b1", 5_000)));
    assert!(!spool.sts_put(&format!("{}.example", "x".repeat(300)), &policy("c", 9)));
    let answer = CalloutAnswer {
        answered_ms: 1_000,
        expires_ms: 5_000,
        refused: None,
    };
    assert!(spool.callout_put("bob@example.com", &answer));
    let mut junk = Batch::new();
    junk.put(Cf::Meta, keys::sts("junk.example"), b"[".to_vec());
    spool.commit_blocking(junk.lazy()).unwrap();
    assert_eq!(
        spool.sts_get("example.com.", 2_000).unwrap(),
        Some(policy("a1", 10_000))
    );
    assert_eq!(spool.sts_get("short.example", 5_000).unwrap(), None);
    assert_eq!(spool.sts_get("junk.example", 2_000).unwrap(), None);
    // A newer policy replaces the old one (a synced commit after it: the put is not
    // waited for).
    assert!(spool.sts_put("example.com", &policy("a2", 12_000)));
    spool
        .commit_blocking({
            let mut b = Batch::new();
            b.put(Cf::Meta, keys::sts("junk2.example"), b"]".to_vec());
            b
        })
        .unwrap();
    assert_eq!(
        spool.sts_get("example.com", 11_000).unwrap().unwrap().id,
        "a2"
    );
    // The sweep at 6 s: the expired policy and the junk go; the callout answer (expired
    // too) is the callout sweep's.
    assert_eq!(spool.sts_sweep(6_000).unwrap(), (3, 1));
    assert!(spool
        .callout_get("bob@example.com", 2_000)
        .unwrap()
        .is_some());
    assert_eq!(spool.callout_sweep(6_000).unwrap(), (1, 0));
    assert_eq!(meta_keys(&spool), 2, "format and example.com's policy");
    assert_eq!(spool.sts_sweep(20_000).unwrap(), (1, 0));
    assert_eq!(meta_keys(&spool), 1);
}
