//! Power loss: the spool on faultfs (the workspace member `faultfs`: a FUSE filesystem in
//! memory that keeps every write not yet fsynced apart and drops it on SIGUSR1). Rounds of
//! concurrent SMTP clients, `kill -9` of the server mid-load, a power cut, a restart on the
//! same spool: every message that got `250` after its final dot is queued, once and whole.
//! Also the first start, where `Spool::open` itself creates the spool directory (and its
//! missing parents) inside the mount. Needs root and /dev/fuse.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::harness::*;

const ROUNDS: usize = 20;
const CLIENTS: usize = 6;
/// At most this many messages per client and round.
const PER_CLIENT: u32 = 60;

/// A mounted `faultfs`; unmounted (SIGTERM) on drop.
pub struct FaultMount {
    child: Child,
    out: BufReader<ChildStdout>,
    pub dir: PathBuf,
}

impl FaultMount {
    /// Mounts faultfs on `dir` (created if missing) and waits for its `ready`.
    pub fn mount(dir: &Path) -> FaultMount {
        fs::create_dir_all(dir).unwrap();
        let mut child = Command::new(workspace_bin("faultfs", "faultfs"))
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start faultfs");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        let _ = out.read_line(&mut line);
        assert_eq!(
            line.trim(),
            "ready",
            "faultfs did not mount {} (needs root and /dev/fuse)",
            dir.display()
        );
        FaultMount {
            child,
            out,
            dir: dir.to_path_buf(),
        }
    }

    /// The power cut: afterwards the mount shows only what was durable.
    pub fn cut(&mut self) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGUSR1) };
        let mut line = String::new();
        let _ = self.out.read_line(&mut line);
        assert!(line.starts_with("cut "), "faultfs after SIGUSR1: {line:?}");
    }

    /// A failing disk on or off: while on, every change fails with EIO.
    pub fn failing(&mut self, on: bool) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGUSR2) };
        let mut line = String::new();
        let _ = self.out.read_line(&mut line);
        let want = if on { "failing on" } else { "failing off" };
        assert_eq!(line.trim(), want, "faultfs after SIGUSR2");
    }
}

impl Drop for FaultMount {
    fn drop(&mut self) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Ok(c) = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes()) {
            // SAFETY: a valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Points the config of `env` at `spool` instead of its own spool directory.
pub fn use_spool(env: &MxEnv, spool: &Path) {
    let old = format!("spool = \"{}\"", spool_dir(env).display());
    let config = fs::read_to_string(&env.config).unwrap();
    assert!(config.contains(&old), "{config}");
    let new = format!("spool = \"{}\"", spool.display());
    fs::write(&env.config, config.replacen(&old, &new, 1)).unwrap();
}

/// mkdir + fsync of the parent, for directories that are to exist before the test.
pub fn durable_dir(dir: &Path) {
    fs::create_dir(dir).unwrap();
    fs::File::open(dir.parent().unwrap())
        .unwrap()
        .sync_all()
        .unwrap();
}

/// A small deterministic PRNG (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// One message a client tried to send.
struct Sent {
    sender: String,
    message: Vec<u8>,
    /// The queue id of the `250` after the final dot, if it came.
    acked: Option<String>,
}

/// Message `seq` of `client` in `round`: a unique sender of fixed length, a body of random
/// length (some lines start with a dot); client 0's are large (0.6 to 2 MiB).
fn message(round: usize, client: usize, seq: u32, rcpt: &str, rng: &mut Rng) -> (String, Vec<u8>) {
    let sender = format!("r{round:02}c{client:02}-{seq:05}@sender.test");
    let mut body = String::new();
    for i in 0..1 + rng.next() % 120 {
        if rng.next().is_multiple_of(10) {
            body.push('.');
        }
        for _ in 0..rng.next() % 90 {
            body.push((b'!' + (rng.next() % 94) as u8) as char);
        }
        body.push_str(&format!(" {round}/{client}/{seq}/{i}\r\n"));
    }
    // Client 0 sends large messages: stored in parts during DATA (unsynced), made durable
    // only by the synced commit before the 250.
    if client == 0 {
        let want = (600 << 10) + (rng.next() % (1500 << 10)) as usize;
        let mut i = 0u64;
        while body.len() < want {
            i += 1;
            body.push_str(&format!(
                "{}part line {round}/{seq}/{i} {:060}\r\n",
                if i.is_multiple_of(9) { "." } else { "" },
                rng.next()
            ));
        }
    }
    let msg = format!(
        "From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: power loss {round}/{client}/{seq}\r\n\
         Message-ID: <{sender}>\r\n\r\n{body}"
    );
    (sender, msg.into_bytes())
}

/// One transaction on `c`; the message is recorded before DATA (from then on it may be in
/// the spool), with the queue id once the final dot got `250`.
fn send(
    c: &mut Smtp,
    sent: &mut Vec<Sent>,
    sender: String,
    rcpt: &str,
    msg: Vec<u8>,
) -> std::io::Result<()> {
    let r = c.cmd(&format!("MAIL FROM:<{sender}>"))?;
    if r.code != 250 {
        return Err(std::io::Error::other(format!("MAIL: {r}")));
    }
    let r = c.cmd(&format!("RCPT TO:<{rcpt}>"))?;
    if r.code != 250 {
        return Err(std::io::Error::other(format!("RCPT: {r}")));
    }
    sent.push(Sent {
        sender,
        message: msg.clone(),
        acked: None,
    });
    match c.data(&msg)? {
        Ok(r) if r.code == 250 => {
            let id = r.to_string().rsplit(' ').next().unwrap().to_string();
            sent.last_mut().unwrap().acked = Some(id);
            Ok(())
        }
        Ok(r) | Err(r) => Err(std::io::Error::other(format!("DATA: {r}"))),
    }
}

/// One client of one round: up to `PER_CLIENT` messages to `rcpt`, until `stop` or the
/// server is gone.
fn client(addr: String, round: usize, id: usize, rcpt: String, stop: Arc<AtomicBool>) -> Vec<Sent> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((round * 100 + id) as u64 + 1));
    let mut sent = Vec::new();
    let mut seq = 0;
    'outer: while seq < PER_CLIENT && !stop.load(Ordering::Relaxed) {
        let Ok((mut c, banner)) = Smtp::connect(&addr) else {
            break;
        };
        if banner.code != 220 || !c.cmd("EHLO client.test").is_ok_and(|r| r.code == 250) {
            break;
        }
        for _ in 0..10 {
            if seq >= PER_CLIENT || stop.load(Ordering::Relaxed) {
                break 'outer;
            }
            seq += 1;
            let (sender, msg) = message(round, id, seq, &rcpt, &mut rng);
            if send(&mut c, &mut sent, sender, &rcpt, msg).is_err() {
                break 'outer;
            }
        }
        let _ = c.cmd("QUIT");
    }
    sent
}

/// `bytes` with CRLF turned into LF (`show --body` may print LF line ends).
fn lf(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    for (i, &b) in bytes.iter().enumerate() {
        if !(b == b'\r' && bytes.get(i + 1) == Some(&b'\n')) {
            out.push(b);
        }
    }
    out
}

/// The message bytes of `id` as `show --body` prints them.
fn shown_body(env: &MxEnv, id: &str) -> Vec<u8> {
    let out = env.mxspool(&["show", id, "--body"]);
    check_ok("mxspool show --body", &out);
    let show = out.stdout;
    let start = format!("*** MESSAGE CONTENTS {id} ***\n");
    let end = format!("*** END OF MESSAGE {id} ***");
    let find = |h: &[u8], n: &[u8]| h.windows(n.len()).position(|w| w == n);
    let s = find(&show, start.as_bytes())
        .unwrap_or_else(|| panic!("no contents marker in show {id}:\n{}", text(&show)))
        + start.len();
    let e = find(&show[s..], end.as_bytes()).expect("end marker");
    show[s..s + e].to_vec()
}

/// Checks that `id` holds exactly `sent` under one `Received:` header of ours.
fn assert_whole(env: &MxEnv, id: &str, sent: &[u8]) {
    let shown = lf(&shown_body(env, id));
    let sent = lf(sent);
    assert!(
        shown.starts_with(b"Received: ") && shown.ends_with(&sent),
        "{id} is not the message sent:\n--- shown\n{}\n--- sent\n{}",
        text(&shown),
        text(&sent)
    );
    let received = &shown[..shown.len() - sent.len()];
    assert_eq!(
        received.iter().filter(|&&b| b == b'\n').count(),
        4,
        "{id}: not one Received: header before the message: {}",
        text(received)
    );
}

/// What the queue must hold after a restart: every acknowledged message, once, of the right
/// size; messages sent but never acknowledged may be there too (whole). Returns
/// (acknowledged, queued).
fn check_queue(env: &MxEnv, sent: &[Sent], overhead: i64, context: &str) -> (usize, usize) {
    let queue = env.queue(None);
    let by_sender: HashMap<&str, &Sent> = sent.iter().map(|s| (s.sender.as_str(), s)).collect();
    let mut seen = HashSet::new();
    for e in &queue {
        let s = by_sender
            .get(e.sender.as_str())
            .unwrap_or_else(|| panic!("queued message from a sender never used: {e:?}"));
        assert!(seen.insert(e.sender.as_str()), "queued twice: {}", e.sender);
        if let Some(id) = &s.acked {
            assert_eq!(&e.id, id, "{}: queued under another id", e.sender);
        }
        // The date in the Received: header may be a character longer or shorter.
        let extra = e.size as i64 - s.message.len() as i64;
        assert!(
            (extra - overhead).abs() <= 1,
            "{} ({}, acked: {:?}): size {} but the message sent has {} (+{overhead}): damaged?",
            e.id,
            e.sender,
            s.acked,
            e.size,
            s.message.len()
        );
    }
    let acked: Vec<&Sent> = sent.iter().filter(|s| s.acked.is_some()).collect();
    let lost: Vec<&str> = acked
        .iter()
        .filter(|s| !seen.contains(s.sender.as_str()))
        .map(|s| s.sender.as_str())
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged messages lost after kill -9 and a power cut: {:?}...\n{context}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(10)]
    );
    (acked.len(), queue.len())
}

/// The size of a stored message minus the size sent (our `Received:` header), measured on
/// one message, which is then checked byte for byte.
fn calibrate(env: &MxEnv, sent: &mut Vec<Sent>) -> i64 {
    let (mut c, _) = Smtp::connect(&env.addr()).unwrap();
    c.cmd("EHLO client.test").unwrap();
    let (sender, msg) = message(99, 0, 0, "u@example.com", &mut Rng(42));
    send(&mut c, sent, sender, "u@example.com", msg).unwrap();
    let _ = c.cmd("QUIT");
    let s = sent.last().unwrap();
    let id = s.acked.clone().expect("calibration message acknowledged");
    let q = env.queue(None);
    let e = q
        .iter()
        .find(|e| e.id == id)
        .expect("calibration message queued");
    assert_whole(env, &id, &s.message);
    e.size as i64 - s.message.len() as i64
}

#[test]
fn power_loss_rounds() {
    let mut env = MxEnv::new();
    let mut fs = FaultMount::mount(&env.dir.path().join("mnt"));
    // The spool directory exists (durably) before the first start: these rounds test what
    // mxspool writes inside it.
    let spool = fs.dir.join("spool");
    durable_dir(&spool);
    use_spool(&env, &spool);

    let mut server = env.start();
    let mut sent = Vec::new();
    let overhead = calibrate(&env, &mut sent);
    let mut rng = Rng(7);
    let mut acked_total = 0;
    for round in 0..ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|id| {
                let (addr, stop) = (env.addr(), stop.clone());
                thread::spawn(move || client(addr, round, id, "u@example.com".into(), stop))
            })
            .collect();
        thread::sleep(Duration::from_millis(200 + rng.next() % 1300));
        server.kill9();
        stop.store(true, Ordering::Relaxed);
        let mut this_round = Vec::new();
        for h in clients {
            this_round.extend(h.join().unwrap());
        }
        let log = server.log();
        fs.cut();
        let acked_now = this_round.iter().filter(|s| s.acked.is_some()).count();
        acked_total += acked_now;
        sent.extend(this_round);

        server = env.start();
        let context = format!(
            "round {round}\n--- log before the kill\n{log}\n--- log after the restart\n{}",
            server.log()
        );
        let (acked, queued) = check_queue(&env, &sent, overhead, &context);
        // Byte for byte: the last acknowledged message of each client (the nearest to the
        // kill) and a few more of this round.
        let round_prefix = format!("r{round:02}");
        let mut last: HashMap<&str, &Sent> = HashMap::new();
        let mut sample = Vec::new();
        for (i, s) in sent
            .iter()
            .filter(|s| s.acked.is_some() && s.sender.starts_with(&round_prefix))
            .enumerate()
        {
            last.insert(&s.sender[..6], s);
            if i % 15 == 0 {
                sample.push(s);
            }
        }
        sample.extend(last.into_values());
        for s in sample {
            assert_whole(&env, s.acked.as_deref().unwrap(), &s.message);
        }
        eprintln!(
            "power loss round {round}: {} attempted, {acked_now} acknowledged; {acked} \
             acknowledged in all, {queued} queued after the cut",
            sent.iter()
                .filter(|s| s.sender.starts_with(&round_prefix))
                .count()
        );
    }
    assert!(
        acked_total >= ROUNDS * CLIENTS,
        "only {acked_total} messages acknowledged in {ROUNDS} rounds\n{}",
        server.log()
    );
    eprintln!("power loss: {ROUNDS} rounds, {acked_total} acknowledged (+1 calibration), 0 lost");
}

/// The first start: the spool directory and two of its parents do not exist yet;
/// `Spool::open` creates them inside the mount. After kill -9 and a power cut, every message
/// acknowledged must still be there: the directories must have been made durable.
#[test]
fn power_loss_first_start() {
    let mut env = MxEnv::new();
    let mut fs = FaultMount::mount(&env.dir.path().join("mnt"));
    let spool = fs.dir.join("var/spool/mxspool");
    use_spool(&env, &spool);

    let mut server = env.start();
    let mut sent = Vec::new();
    let overhead = calibrate(&env, &mut sent);
    let addr = env.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..3)
        .map(|id| {
            let (addr, stop) = (addr.clone(), stop.clone());
            thread::spawn(move || client(addr, 0, id, "u@example.com".into(), stop))
        })
        .collect();
    for h in clients {
        sent.extend(h.join().unwrap());
    }
    server.kill9();
    let log = server.log();
    fs.cut();
    let server = env.start();
    let context = format!(
        "spool {} created by the first start\n--- log before the kill\n{log}\n--- log after \
         the restart\n{}",
        spool.display(),
        server.log()
    );
    let (acked, queued) = check_queue(&env, &sent, overhead, &context);
    assert!(acked > 3, "only {acked} messages acknowledged\n{context}");
    eprintln!("power loss, first start: {acked} acknowledged, {queued} queued after the cut");
}

/// Every message file in the Maildirs under `root` (one per user: `root/USER/{new,cur}`).
fn maildir_all(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(users) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut files = Vec::new();
    for u in users {
        files.extend(maildir_files(&u.unwrap().path()));
    }
    files
}

/// The sender of a delivered Maildir file (its `Return-Path:`), after checking that the
/// file holds the whole message sent: `Return-Path:`, `Delivered-To:`, our `Received:`
/// header, then the message with LF line ends.
fn check_delivered<'a>(path: &Path, bytes: &[u8], by_sender: &HashMap<&str, &'a Sent>) -> &'a Sent {
    let t = text(bytes);
    let sender = t
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("Return-Path: <"))
        .and_then(|l| l.strip_suffix('>'))
        .unwrap_or_else(|| panic!("{}: no Return-Path first:\n{t}", path.display()));
    let s = by_sender
        .get(sender)
        .unwrap_or_else(|| panic!("{}: from a sender never used: {sender}", path.display()));
    let sent = lf(&s.message);
    assert!(
        bytes.ends_with(&sent)
            && t.lines()
                .nth(2)
                .is_some_and(|l| l.starts_with("Received: ")),
        "{} is damaged: not the whole message sent:\n--- file\n{t}\n--- sent\n{}",
        path.display(),
        text(&sent)
    );
    assert_eq!(
        bytes.len() - sent.len(),
        t.lines().take(6).map(|l| l.len() + 1).sum::<usize>(),
        "{}: more than Return-Path, Delivered-To and one Received: header before the \
         message:\n{t}",
        path.display()
    );
    s
}

/// Maildir delivery under power loss: the spool and the Maildirs on faultfs; rounds of
/// clients, kill -9 mid-load (deliveries running), a power cut. Before the restart every
/// acknowledged message is still queued (whole) or whole in its Maildir's `new/`, and every
/// file there is whole; after the restart the queue drains and every acknowledged message
/// is delivered.
#[test]
fn power_loss_maildir() {
    const MAILDIR_ROUNDS: usize = 5;
    let mut env = MxEnv::custom(
        "[queue]\nretry_interval = \"1h\"\n\n[[local]]\ndomain = \"inst.test\"\n\
         maildir = \"{dir}/mnt/mail/{domain}/{user}\"\n",
    );
    let mut fs = FaultMount::mount(&env.dir.path().join("mnt"));
    use_spool(&env, &fs.dir.join("spool"));
    let mail = fs.dir.join("mail/inst.test");
    let mut server = env.start();
    let mut sent: Vec<Sent> = Vec::new();
    let mut rng = Rng(11);
    let mut duplicates = 0;
    for round in 0..MAILDIR_ROUNDS {
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|id| {
                let (addr, stop) = (env.addr(), stop.clone());
                thread::spawn(move || client(addr, round, id, format!("u{id}@inst.test"), stop))
            })
            .collect();
        thread::sleep(Duration::from_millis(300 + rng.next() % 1000));
        server.kill9();
        stop.store(true, Ordering::Relaxed);
        for h in clients {
            sent.extend(h.join().unwrap());
        }
        let log = server.log();
        fs.cut();

        // Before the restart: queued, or delivered whole.
        let by_sender: HashMap<&str, &Sent> = sent.iter().map(|s| (s.sender.as_str(), s)).collect();
        let queue = env.queue(None);
        let queued: HashSet<&str> = queue.iter().map(|e| e.sender.as_str()).collect();
        for e in &queue {
            let s = by_sender
                .get(e.sender.as_str())
                .unwrap_or_else(|| panic!("queued from a sender never used: {e:?}"));
            assert_whole(&env, &e.id, &s.message);
        }
        let files = maildir_all(&mail);
        let mut delivered: HashMap<&str, usize> = HashMap::new();
        for (path, bytes) in &files {
            let s = check_delivered(path, bytes, &by_sender);
            *delivered.entry(s.sender.as_str()).or_default() += 1;
        }
        let acked: Vec<&Sent> = sent.iter().filter(|s| s.acked.is_some()).collect();
        let lost: Vec<&str> = acked
            .iter()
            .map(|s| s.sender.as_str())
            .filter(|s| !queued.contains(s) && !delivered.contains_key(s))
            .collect();
        assert!(
            lost.is_empty(),
            "round {round}: {} of {} acknowledged messages neither queued nor in a Maildir \
             after kill -9 and a power cut: {:?}\n--- log before the kill\n{log}",
            lost.len(),
            acked.len(),
            &lost[..lost.len().min(10)]
        );
        let in_both = queued.iter().filter(|s| delivered.contains_key(*s)).count();

        // After the restart the queue drains into the Maildirs.
        server = env.start();
        let drained = wait_for(Duration::from_secs(60), Duration::from_millis(200), || {
            env.queue(None).is_empty()
        });
        assert!(drained, "round {round}: queue not empty\n{}", server.log());
        let mut count: HashMap<&str, usize> = HashMap::new();
        for (path, bytes) in &maildir_all(&mail) {
            let s = check_delivered(path, bytes, &by_sender);
            *count.entry(s.sender.as_str()).or_default() += 1;
        }
        for s in &acked {
            assert!(
                count.contains_key(s.sender.as_str()),
                "round {round}: {} acknowledged, never delivered\n{}",
                s.sender,
                server.log()
            );
        }
        duplicates = count.values().filter(|&&c| c > 1).count();
        eprintln!(
            "power loss maildir round {round}: {} acknowledged in all; after the cut {} \
             queued, {} delivered ({in_both} both); {} delivered after the restart, \
             {duplicates} twice",
            acked.len(),
            queue.len(),
            delivered.len(),
            count.len()
        );
    }
    eprintln!("power loss maildir: 0 lost, 0 damaged, {duplicates} delivered twice");
}

/// `mxspool export`: an archive reported written is whole after a power cut (spool-tools
/// verify passes and lists every message), also with `--remove` (then the removal is
/// durable too: nothing comes back) and `--force` (the new archive, never the old or a mix).
#[test]
fn power_loss_export() {
    let mut env = MxEnv::new();
    let mut fs = FaultMount::mount(&env.dir.path().join("mnt"));
    use_spool(&env, &fs.dir.join("spool"));
    let mut server = env.start();
    let send_n = |env: &MxEnv, tag: &str, n: usize| -> Vec<String> {
        (0..n)
            .map(|i| {
                let msg = format!(
                    "From: <{tag}{i}@sender.test>\r\nTo: <u@example.com>\r\nSubject: export \
                     {tag} {i}\r\n\r\n{}\r\n",
                    "body line\r\n".repeat(i * 7)
                );
                smtp_send(
                    &env.addr(),
                    &format!("{tag}{i}@sender.test"),
                    &["u@example.com"],
                    msg.as_bytes(),
                )
            })
            .collect()
    };
    let verify = |archive: &Path, ids: &[String], what: &str| {
        let out = spool_tools_run(archive, &["verify"]);
        check_ok(&format!("spool-tools verify ({what})"), &out);
        let want = format!("OK: {} messages", ids.len());
        assert!(
            text(&out.stdout).starts_with(&want),
            "{what}: {}",
            text(&out.stdout)
        );
        let out = spool_tools_run(archive, &["list"]);
        check_ok("spool-tools list", &out);
        let list = text(&out.stdout);
        for id in ids {
            assert!(
                list.lines().any(|l| l.starts_with(id.as_str())),
                "{what}: {id} not in the archive:\n{list}"
            );
        }
    };
    let export = |env: &MxEnv, path: &Path, extra: &[&str]| {
        let mut args = vec!["export", "example.com", "-o", path.to_str().unwrap()];
        args.extend(extra);
        let out = env.mxspool(&args);
        check_ok(&format!("mxspool {}", args.join(" ")), &out);
        text(&out.stdout)
    };

    // 1: a plain export, through the running server; then kill -9 and the cut.
    let ids = send_n(&env, "a", 30);
    let a1 = fs.dir.join("a1.mxspool");
    export(&env, &a1, &[]);
    server.kill9();
    fs.cut();
    verify(&a1, &ids, "export");
    let queued: HashSet<String> = env.queue(None).into_iter().map(|e| e.id).collect();
    assert_eq!(queued, ids.iter().cloned().collect::<HashSet<_>>());

    // 2: --remove: the archive holds everything, and what was reported removed stays so.
    server = env.start();
    let a2 = fs.dir.join("a2.mxspool");
    let out = export(&env, &a2, &["--remove"]);
    assert!(out.contains("30 message(s) removed"), "{out}");
    server.kill9();
    fs.cut();
    verify(&a2, &ids, "export --remove");
    let left = env.queue(None);
    assert!(
        left.is_empty(),
        "reported removed, back after the cut: {left:?}"
    );

    // 3: --force over a1: after the cut a1 is the new archive, whole.
    server = env.start();
    let new_ids = send_n(&env, "b", 5);
    export(&env, &a1, &["--force"]);
    server.kill9();
    fs.cut();
    verify(&a1, &new_ids, "export --force");
    drop(server);
    eprintln!("power loss export: 3 archives whole after the cut");
}
