//! Third-party SMTP servers as primaries with their own per-session limits, for tests of
//! mxspool's outbound delivery: a private Exim 4.96, a private OpenSMTPD 6.8 and a scriptable
//! aiosmtpd server (`aiosmtpd_primary.py`). Each listens on a loopback `ip:port` the caller
//! picks, stores what it accepts where [`Primary::messages`] reads it back, and is stopped
//! (its whole process group killed and reaped) on drop.
//!
//! Exim and OpenSMTPD are not installed as packages (they conflict with Postfix): `.ci/peers`
//! unpacks them into `/opt/mxspool-peers`; it also installs `python3-aiosmtpd`. A missing peer
//! fails the test with a message naming `.ci/peers`. Exim and OpenSMTPD need root.
//!
//! What [`Delivered::data`] holds, per peer:
//! - Exim: the message as Exim wrote it (BSMTP, CRLF lines), less the one `Received:` header
//!   Exim put on top. Exim keeps messages with LF line ends, so a bare LF in the original
//!   comes back as CRLF; nothing else is changed (Exim adds no `Message-ID:`/`Date:` to mail
//!   from a remote host).
//! - OpenSMTPD: its Maildir file (one per recipient; the copies of one message are merged),
//!   less the `Return-Path:`, `Delivered-To:` and `Received: ... (OpenSMTPD) ...` headers it
//!   put on top, with its LF line ends turned back into CRLF (a bare LF in the original too).
//! - aiosmtpd: the exact bytes received (dot-unstuffed), nothing stripped.
//!
//! Only one OpenSMTPD can run on a machine (compiled-in queue `/var/spool/smtpd` and control
//! socket `/var/run/smtpd.sock`): [`OpenSmtpd::start`] waits for a machine-wide lock (flock),
//! so tests using it run one after the other, also across processes.

// An API for the delivery tests: not every item is used by the tests of this module.
#![allow(dead_code)]

use std::fs::{self, File};
use std::io::Read;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::harness::*;

/// Where `.ci/peers` unpacks Exim and OpenSMTPD.
pub const PEERS: &str = "/opt/mxspool-peers";

/// Debian's Python, where `python3-aiosmtpd` is installed (a `python3` first in `PATH`, such
/// as pyenv's, does not see it).
pub const PYTHON: &str = "/usr/bin/python3";

/// A peer's per-session limits; `None` is the peer's own default (Exim: 1000 messages a
/// session and 50000 recipients; OpenSMTPD: 100 and 1000; aiosmtpd: none).
#[derive(Clone, Copy, Debug, Default)]
pub struct Limits {
    /// Messages per SMTP session. Exim `smtp_accept_max_per_connection`, OpenSMTPD
    /// `smtp limit max-mails`, aiosmtpd `--max-messages-per-session`.
    pub messages_per_session: Option<u32>,
    /// Recipients per transaction. Exim `recipients_max`, OpenSMTPD `smtp limit max-rcpt`,
    /// aiosmtpd `--max-rcpt`.
    pub rcpts_per_message: Option<u32>,
}

impl Limits {
    /// No limit of ours (the peer's defaults).
    pub fn none() -> Limits {
        Limits::default()
    }

    /// At most `n` messages a session.
    pub fn messages(n: u32) -> Limits {
        Limits {
            messages_per_session: Some(n),
            ..Limits::default()
        }
    }

    /// At most `n` recipients a transaction.
    pub fn rcpts(n: u32) -> Limits {
        Limits {
            rcpts_per_message: Some(n),
            ..Limits::default()
        }
    }
}

/// One message as the peer stored it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivered {
    /// The envelope sender (`""` for `<>`).
    pub sender: String,
    /// The envelope recipients, in the order the client gave them.
    pub recipients: Vec<String>,
    /// The message bytes (see the module doc for what each peer strips).
    pub data: Vec<u8>,
}

/// What every peer offers.
pub trait Primary {
    /// `ip:port` it listens on.
    fn addr(&self) -> String;
    /// The messages stored so far (completely delivered ones only), oldest first.
    fn messages(&self) -> Vec<Delivered>;
    /// The peer's log so far.
    fn log(&self) -> String;
    /// The SMTP sessions (TCP connections) the peer has seen, from its log.
    fn sessions(&self) -> usize;

    /// Waits until at least `n` messages are stored; false after `limit`.
    fn wait_for_count(&self, n: usize, limit: Duration) -> bool {
        wait_for(limit, Duration::from_millis(50), || {
            self.messages().len() >= n
        })
    }
}

/// Panics with the `.ci/peers` hint unless `path` exists.
fn need(path: &Path, what: &str) {
    assert!(
        path.exists(),
        "{what}: {} is missing; run `bash .ci/peers` (as root) to install the test primaries",
        path.display()
    );
}

/// The `LD_LIBRARY_PATH` that `.ci/peers` wrote for an unpacked peer.
fn ld_path(name: &str) -> String {
    let f = Path::new(PEERS).join(name).join("ld-library-path");
    need(&f, name);
    fs::read_to_string(&f).unwrap().trim().to_string()
}

/// Whether something listens on TCP `ip:port` (from `/proc/net/tcp`, so that checking makes
/// no SMTP session).
pub fn listening(ip: &str, port: u16) -> bool {
    let ip: std::net::Ipv4Addr = ip.parse().expect("an IPv4 address");
    let want = format!("{:08X}:{port:04X}", u32::from_le_bytes(ip.octets()));
    let any = format!("00000000:{port:04X}");
    fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && (f[1] == want || f[1] == any) && f[3] == "0A"
        })
}

/// A daemon in its own process group, stopped (SIGTERM to the group, SIGKILL after 5 s) and
/// reaped on drop.
struct Daemon {
    child: Child,
    what: &'static str,
}

impl Daemon {
    fn spawn(what: &'static str, cmd: &mut Command, log: &Path) -> Daemon {
        let out = File::create(log).unwrap();
        let err = out.try_clone().unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {what} ({:?}): {e}; run `bash .ci/peers`",
                    cmd.get_program()
                )
            });
        Daemon { child, what }
    }

    /// Waits until `ip:port` listens; panics with `log()` if the daemon exits or 20 s pass.
    fn wait_listening(&mut self, ip: &str, port: u16, log: impl Fn() -> String) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("{} exited at start ({status}):\n{}", self.what, log());
            }
            if listening(ip, port) {
                return;
            }
            if Instant::now() >= deadline {
                panic!("{} does not listen on {ip}:{port}:\n{}", self.what, log());
            }
            std::thread::sleep(Duration::from_millis(30));
        }
    }

    fn stop(&mut self) {
        let pgid = self.child.id() as i32;
        if self.child.try_wait().ok().flatten().is_none() {
            // SAFETY: plain syscall on the process group of a child we started.
            unsafe { libc::kill(-pgid, libc::SIGTERM) };
            let gone = wait_for(Duration::from_secs(5), Duration::from_millis(20), || {
                matches!(self.child.try_wait(), Ok(Some(_)))
            });
            if !gone {
                let _ = self.child.kill();
            }
        }
        // Whatever the group still holds (delivery processes, privsep children).
        // SAFETY: as above.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

fn chown(owner: &str, paths: &[&Path]) {
    let out = run(Command::new("chown").arg(owner).args(paths), 10);
    assert!(
        out.status.success(),
        "chown {owner} failed (run `bash .ci/peers` as root, it creates the user): {}",
        text(&out.stderr)
    );
}

/// The header block of `msg` split off: (`headers` lines with their continuations, rest).
/// Each header is returned as its full text, line ends included.
fn top_headers(msg: &[u8]) -> (Vec<&[u8]>, &[u8]) {
    let mut headers = Vec::new();
    let mut rest = msg;
    loop {
        if rest.is_empty() || rest.starts_with(b"\r\n") || rest.starts_with(b"\n") {
            return (headers, rest);
        }
        let mut end = 0;
        loop {
            match rest[end..].iter().position(|&b| b == b'\n') {
                Some(i) => end += i + 1,
                None => {
                    end = rest.len();
                    break;
                }
            }
            if !matches!(rest.get(end), Some(b' ') | Some(b'\t')) {
                break;
            }
        }
        headers.push(&rest[..end]);
        rest = &rest[end..];
    }
}

/// Turns LF line ends into CRLF (leaving existing CRLFs alone).
fn lf_to_crlf(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len() + b.len() / 20);
    for (i, &c) in b.iter().enumerate() {
        if c == b'\n' && (i == 0 || b[i - 1] != b'\r') {
            out.push(b'\r');
        }
        out.push(c);
    }
    out
}

fn angle(s: &str) -> String {
    let s = s.trim();
    s.strip_prefix('<')
        .and_then(|s| s.split('>').next())
        .unwrap_or(s)
        .to_string()
}

// ---------------------------------------------------------------------------------------
// Exim

/// A private Exim 4.96 daemon (`exim4 -C CONF -bdf`, unprivileged as `Debian-exim`) with its
/// spool, logs and config in a temp dir. Accepts any recipient at any domain and delivers
/// each message at once (no queueing) to one BSMTP file per message in `out/`, with its
/// envelope. Replies at the limits (Exim 4.96):
/// - the MAIL past `messages_per_session`: `421 too many messages in this connection`, and
///   Exim does NOT close the connection (NOOP still gets `250 OK`);
/// - each RCPT past `rcpts_per_message`: `452 too many recipients` (the transaction goes on).
pub struct Exim {
    daemon: Daemon,
    dir: TempDir,
    pub ip: String,
    pub port: u16,
    pub conf: PathBuf,
}

impl Exim {
    pub fn start(ip: &str, port: u16, limits: Limits) -> Exim {
        let bin = Path::new(PEERS).join("exim/usr/sbin/exim4");
        need(&bin, "Exim");
        let ld = ld_path("exim");
        let dir = public_tempdir("mxspool-exim.");
        let root = dir.path();
        let (spool, logd, out) = (root.join("spool"), root.join("log"), root.join("out"));
        for d in [&spool, &logd, &out] {
            fs::create_dir(d).unwrap();
        }
        chown("Debian-exim:Debian-exim", &[&spool, &logd, &out]);
        let conf = root.join("exim.conf");
        let max_msgs = limits.messages_per_session.unwrap_or(1000);
        let max_rcpt = limits.rcpts_per_message.unwrap_or(50000);
        let config = format!(
            "primary_hostname = exim.test
exim_path = {bin}
exim_user = Debian-exim
exim_group = Debian-exim
deliver_drop_privilege = true
never_users =
keep_environment = LD_LIBRARY_PATH
spool_directory = {spool}
log_file_path = {logd}/%slog
pid_file_path = {root}/exim.pid
daemon_smtp_ports = {port}
local_interfaces = <; {ip}
smtp_accept_max = 100
smtp_accept_max_per_connection = {max_msgs}
recipients_max = {max_rcpt}
smtp_accept_queue_per_connection = 0
queue_only = false
host_lookup =
rfc1413_hosts =
tls_advertise_hosts =
timezone = UTC
log_selector = +smtp_connection +received_recipients +smtp_protocol_error \\
  +smtp_syntax_error +smtp_no_mail +incoming_port
acl_smtp_rcpt = acl_rcpt

begin acl
acl_rcpt:
  accept

begin routers
all:
  driver = accept
  transport = bsmtp_file

begin transports
bsmtp_file:
  driver = appendfile
  file = {out}/$message_exim_id
  use_bsmtp
  use_crlf
  batch_max = 100000
  user = Debian-exim
  group = Debian-exim
  mode = 0644
",
            bin = bin.display(),
            spool = spool.display(),
            logd = logd.display(),
            root = root.display(),
            out = out.display(),
        );
        fs::write(&conf, config).unwrap();
        fs::set_permissions(&conf, fs::Permissions::from_mode(0o644)).unwrap();
        let daemon = Daemon::spawn(
            "exim",
            Command::new(&bin)
                .arg("-C")
                .arg(&conf)
                .arg("-bdf")
                .env("LD_LIBRARY_PATH", &ld),
            &root.join("daemon.log"),
        );
        let mut exim = Exim {
            daemon,
            dir,
            ip: ip.to_string(),
            port,
            conf,
        };
        let root = exim.dir.path().to_path_buf();
        exim.daemon.wait_listening(ip, port, || exim_log(&root));
        exim
    }
}

fn exim_log_paths(root: &Path) -> Vec<PathBuf> {
    ["log/mainlog", "log/rejectlog", "log/paniclog", "daemon.log"]
        .iter()
        .map(|p| root.join(p))
        .collect()
}

fn exim_log(root: &Path) -> String {
    let mut s = String::new();
    for p in exim_log_paths(root) {
        if let Ok(t) = fs::read_to_string(&p) {
            s.push_str(&format!(
                "--- {}\n{t}",
                p.file_name().unwrap().to_string_lossy()
            ));
        }
    }
    s
}

/// Parses Exim's BSMTP file: one or more `MAIL FROM`, `RCPT TO`..., `DATA`, dot-stuffed
/// message, `.` blocks (more than one if Exim split the recipients into batches). `None`
/// while the file is still being written.
fn parse_bsmtp(b: &[u8]) -> Option<Delivered> {
    if !b.ends_with(b"\r\n.\r\n") {
        return None;
    }
    let mut d = Delivered {
        sender: String::new(),
        recipients: Vec::new(),
        data: Vec::new(),
    };
    let mut lines = b.split_inclusive(|&c| c == b'\n');
    let mut first = true;
    while let Some(l) = lines.next() {
        let l = String::from_utf8_lossy(l);
        let l = l.trim_end();
        if let Some(s) = l.strip_prefix("MAIL FROM:") {
            d.sender = angle(s);
        } else if let Some(r) = l.strip_prefix("RCPT TO:") {
            d.recipients.push(angle(r));
        } else if l == "DATA" {
            let mut data = Vec::new();
            for m in lines.by_ref() {
                if m == b".\r\n" {
                    break;
                }
                data.extend_from_slice(m.strip_prefix(b".").unwrap_or(m));
            }
            if first {
                let (headers, _) = top_headers(&data);
                let strip = match headers.first() {
                    Some(h) if h.starts_with(b"Received: ") => h.len(),
                    _ => 0,
                };
                d.data = data[strip..].to_vec();
                first = false;
            }
        }
    }
    Some(d)
}

impl Primary for Exim {
    fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    fn messages(&self) -> Vec<Delivered> {
        let Ok(rd) = fs::read_dir(self.dir.path().join("out")) else {
            return Vec::new();
        };
        // Exim's ids (base 62 time, pid, fraction) sort by arrival for one daemon.
        let mut files: Vec<PathBuf> = rd.map(|e| e.unwrap().path()).collect();
        files.sort();
        files
            .iter()
            .filter_map(|p| parse_bsmtp(&fs::read(p).ok()?))
            .collect()
    }

    fn log(&self) -> String {
        exim_log(self.dir.path())
    }

    fn sessions(&self) -> usize {
        fs::read_to_string(self.dir.path().join("log/mainlog"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(" SMTP connection from ") && l.contains("connection count = "))
            .count()
    }
}

// ---------------------------------------------------------------------------------------
// OpenSMTPD

/// The machine-wide lock that serialises the OpenSMTPD instances.
const OPENSMTPD_LOCK: &str = "/run/mxspool-opensmtpd.lock";

/// A private OpenSMTPD 6.8 (`smtpd -d -f CONF`, foreground, logging to its stderr) with its
/// config and Maildir in a temp dir; its queue is the compiled-in `/var/spool/smtpd`, emptied
/// at start (one instance at a time, see the module doc). Accepts any recipient at any domain
/// (a catch-all virtual table to the user `nobody`) and delivers at once to one Maildir, one
/// file per recipient. Replies at the limits (OpenSMTPD 6.8.0p2):
/// - the MAIL past `messages_per_session`:
///   `452 4.5.3 Too many recipients: Too many messages sent` (the session stays open);
/// - each RCPT past `rcpts_per_message`: `451 4.5.3 Too many recipients: Too many recipients`
///   (451, not 452; the transaction goes on).
pub struct OpenSmtpd {
    daemon: Daemon,
    dir: TempDir,
    pub ip: String,
    pub port: u16,
    pub conf: PathBuf,
    /// Held (flock) while the instance runs; released after the daemon is stopped.
    _lock: File,
}

impl OpenSmtpd {
    pub fn start(ip: &str, port: u16, limits: Limits) -> OpenSmtpd {
        let bin = Path::new(PEERS).join("opensmtpd/usr/sbin/smtpd");
        need(&bin, "OpenSMTPD");
        need(
            Path::new("/usr/libexec/opensmtpd/mail.maildir"),
            "OpenSMTPD",
        );
        let ld = ld_path("opensmtpd");
        let lock = File::create(OPENSMTPD_LOCK).unwrap();
        // SAFETY: plain syscall on a descriptor we own; blocks until the lock is ours.
        let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(rc, 0, "flock {OPENSMTPD_LOCK}");
        // What an earlier instance left (it was killed, or its messages failed) must not be
        // delivered by this one. A system OpenSMTPD is never installed next to these.
        assert!(
            std::os::unix::net::UnixStream::connect("/var/run/smtpd.sock").is_err(),
            "an OpenSMTPD not started by these tests is running (/var/run/smtpd.sock answers)"
        );
        if !Path::new("/usr/sbin/smtpd").exists() {
            let _ = fs::remove_dir_all("/var/spool/smtpd");
            let _ = fs::remove_file("/var/run/smtpd.sock");
        }
        let dir = public_tempdir("mxspool-opensmtpd.");
        let root = dir.path();
        let maildir = root.join("maildir");
        fs::create_dir(&maildir).unwrap();
        chown("nobody", &[&maildir]);
        let mut config = String::new();
        if let Some(n) = limits.messages_per_session {
            config.push_str(&format!("smtp limit max-mails {n}\n"));
        }
        if let Some(n) = limits.rcpts_per_message {
            config.push_str(&format!("smtp limit max-rcpt {n}\n"));
        }
        config.push_str(&format!(
            "table vusers {{ \"@\" = \"nobody\" }}
listen on {ip} port {port} hostname opensmtpd.test
action \"local\" maildir \"{maildir}\" virtual <vusers> user nobody
match from any for any action \"local\"
",
            maildir = maildir.display()
        ));
        let conf = root.join("smtpd.conf");
        fs::write(&conf, config).unwrap();
        let log_path = root.join("smtpd.log");
        let daemon = Daemon::spawn(
            "smtpd",
            Command::new(&bin)
                .arg("-d")
                .arg("-f")
                .arg(&conf)
                .env("LD_LIBRARY_PATH", &ld),
            &log_path,
        );
        let mut o = OpenSmtpd {
            daemon,
            dir,
            ip: ip.to_string(),
            port,
            conf,
            _lock: lock,
        };
        o.daemon.wait_listening(ip, port, || {
            fs::read_to_string(&log_path).unwrap_or_default()
        });
        o
    }
}

impl Primary for OpenSmtpd {
    fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    fn messages(&self) -> Vec<Delivered> {
        // The log gives the order of messages (`smtp message msgid=M`) and of their
        // recipients (`smtp envelope evpid=M... to=<R>`).
        let log = self.log();
        let mut order: Vec<(String, Vec<String>)> = Vec::new();
        for l in log.lines() {
            if let Some(i) = l.find(" smtp envelope evpid=") {
                let rest = &l[i + " smtp envelope evpid=".len()..];
                let msgid: String = rest.chars().take(8).collect();
                let to = rest.split(" to=").nth(1).map(angle).unwrap_or_default();
                match order.iter_mut().find(|(m, _)| *m == msgid) {
                    Some((_, r)) => r.push(to),
                    None => order.push((msgid, vec![to])),
                }
            }
        }
        // The copies on disk, by message id (from the Received: OpenSMTPD added).
        let mut copies: Vec<(String, String, String, Vec<u8>)> = Vec::new(); // id, from, to, data
        for (_, bytes) in maildir_files(&self.dir.path().join("maildir")) {
            let (headers, _) = top_headers(&bytes);
            let (mut sender, mut rcpt, mut id) = (String::new(), String::new(), None);
            let mut skip = 0;
            for h in &headers {
                let t = String::from_utf8_lossy(h);
                if let Some(v) = t.strip_prefix("Return-Path:") {
                    sender = angle(v);
                } else if let Some(v) = t.strip_prefix("Delivered-To:") {
                    rcpt = v.trim().to_string();
                } else if t.starts_with("Received:") && t.contains("(OpenSMTPD)") {
                    id = t
                        .split(" id ")
                        .nth(1)
                        .and_then(|s| s.split([';', ' ', '\t', '\n']).next())
                        .map(|s| s.to_string());
                } else {
                    break;
                }
                skip += h.len();
                if id.is_some() {
                    break;
                }
            }
            let Some(id) = id else { continue };
            copies.push((id, sender, rcpt, lf_to_crlf(&bytes[skip..])));
        }
        let mut out = Vec::new();
        for (msgid, rcpts) in &order {
            let mine: Vec<_> = copies.iter().filter(|c| c.0 == *msgid).collect();
            if mine.is_empty() || mine.len() < rcpts.len() {
                continue; // not (completely) delivered yet
            }
            let recipients = rcpts
                .iter()
                .filter(|r| mine.iter().any(|c| c.2 == **r))
                .cloned()
                .collect();
            out.push(Delivered {
                sender: mine[0].1.clone(),
                recipients,
                data: mine[0].3.clone(),
            });
        }
        out
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("smtpd.log")).unwrap_or_default()
    }

    fn sessions(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains(" smtp connected "))
            .count()
    }
}

// ---------------------------------------------------------------------------------------
// aiosmtpd

/// What an [`AioSmtpd`] does with the MAIL past its messages-per-session limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CapAction {
    /// `421 4.7.0 Error: too many messages in this session`, then it closes the connection.
    #[default]
    Reply421,
    /// `452 4.5.3 Error: too many messages in this session`; the session goes on.
    Reply452,
    /// Closes the TCP connection without a reply.
    Close,
}

/// The script of an [`AioSmtpd`].
#[derive(Clone, Debug, Default)]
pub struct AioOptions {
    /// Messages per session (then `cap_action`) and recipients per transaction (past it:
    /// `452 4.5.3 Error: too many recipients`).
    pub limits: Limits,
    pub cap_action: CapAction,
    /// The end of DATA of message N+1 in a session gets
    /// `421 4.3.2 Error: too many messages in this session` (not stored), then close.
    pub data_421_after: Option<u32>,
    /// Wait before the 220 greeting.
    pub greeting_delay: Option<Duration>,
    /// Accept TCP and never greet.
    pub no_greeting: bool,
    /// Known recipients (local parts or addresses): any other RCPT gets `550 5.1.1`.
    pub users: Option<Vec<String>>,
}

impl AioOptions {
    pub fn limits(limits: Limits) -> AioOptions {
        AioOptions {
            limits,
            ..AioOptions::default()
        }
    }
}

/// A scriptable primary: `aiosmtpd_primary.py` (see its doc for every reply) run by Debian's
/// Python 3 with `python3-aiosmtpd`. Stores each accepted message with its envelope, bytes
/// exactly as received.
pub struct AioSmtpd {
    daemon: Daemon,
    dir: TempDir,
    pub ip: String,
    pub port: u16,
}

impl AioSmtpd {
    pub fn start(ip: &str, port: u16, opts: AioOptions) -> AioSmtpd {
        need(Path::new(PYTHON), "aiosmtpd");
        let check = run(
            Command::new(PYTHON).arg("-c").arg("import aiosmtpd.smtp"),
            30,
        );
        assert!(
            check.status.success(),
            "{PYTHON} cannot import aiosmtpd; run `bash .ci/peers` (installs python3-aiosmtpd): {}",
            text(&check.stderr)
        );
        let dir = public_tempdir("mxspool-aiosmtpd.");
        let out = dir.path().join("out");
        fs::create_dir(&out).unwrap();
        let mut cmd = Command::new(PYTHON);
        cmd.arg(it_file("aiosmtpd_primary.py"))
            .arg("--listen")
            .arg(format!("{ip}:{port}"))
            .arg("--out")
            .arg(&out);
        if let Some(n) = opts.limits.messages_per_session {
            cmd.arg("--max-messages-per-session").arg(n.to_string());
            cmd.arg("--cap-action").arg(match opts.cap_action {
                CapAction::Reply421 => "421",
                CapAction::Reply452 => "452",
                CapAction::Close => "close",
            });
        }
        if let Some(n) = opts.limits.rcpts_per_message {
            cmd.arg("--max-rcpt").arg(n.to_string());
        }
        if let Some(n) = opts.data_421_after {
            cmd.arg("--data-421-after").arg(n.to_string());
        }
        if let Some(d) = opts.greeting_delay {
            cmd.arg("--greeting-delay").arg(d.as_secs_f64().to_string());
        }
        if opts.no_greeting {
            cmd.arg("--no-greeting");
        }
        if let Some(users) = &opts.users {
            let file = dir.path().join("users");
            fs::write(&file, users.join("\n")).unwrap();
            cmd.arg("--users").arg(file);
        }
        cmd.env("PYTHONUNBUFFERED", "1");
        let log_path = dir.path().join("aiosmtpd.log");
        let daemon = Daemon::spawn("aiosmtpd_primary.py", &mut cmd, &log_path);
        let mut a = AioSmtpd {
            daemon,
            dir,
            ip: ip.to_string(),
            port,
        };
        a.daemon.wait_listening(ip, port, || {
            fs::read_to_string(&log_path).unwrap_or_default()
        });
        a
    }
}

impl Primary for AioSmtpd {
    fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    fn messages(&self) -> Vec<Delivered> {
        let Ok(rd) = fs::read_dir(self.dir.path().join("out")) else {
            return Vec::new();
        };
        let mut files: Vec<PathBuf> = rd
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let n = p.file_name().unwrap().to_string_lossy();
                n.starts_with("msg-") && n.ends_with(".eml")
            })
            .collect();
        files.sort();
        files
            .iter()
            .map(|p| {
                let b = fs::read(p).unwrap();
                let nl = b.iter().position(|&c| c == b'\n').expect("envelope line");
                let env: serde_json::Value =
                    serde_json::from_slice(&b[..nl]).expect("envelope JSON");
                Delivered {
                    sender: env["mail_from"].as_str().unwrap_or_default().to_string(),
                    recipients: env["rcpt_tos"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|r| r.as_str().unwrap_or_default().to_string())
                                .collect()
                        })
                        .unwrap_or_default(),
                    data: b[nl + 1..].to_vec(),
                }
            })
            .collect()
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("aiosmtpd.log")).unwrap_or_default()
    }

    fn sessions(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.starts_with("session ") && l.contains(" connect "))
            .count()
    }
}

// ---------------------------------------------------------------------------------------
// Tests: each peer really enforces its limits, and stores messages exactly.

/// A message of CRLF lines with a dot line (stuffed on the wire) and no header a peer would
/// add itself.
fn sample(n: usize) -> Vec<u8> {
    format!(
        "From: <a@sender.test>\r\nTo: <r@primary.test>\r\nSubject: peers {n}\r\n\
         Message-ID: <peers-{n}@sender.test>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n\
         line one\r\n.leading dot\r\n..two dots\r\n\r\nlast line\r\n"
    )
    .into_bytes()
}

/// Connects and says EHLO.
fn session(addr: &str) -> Smtp {
    let (mut c, banner) = Smtp::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    assert_eq!(banner.code, 220, "banner: {banner}");
    let r = c.cmd("EHLO client.test").unwrap();
    assert_eq!(r.code, 250, "EHLO: {r}");
    c
}

/// The raw reply line(s) as on the wire (`CODE TEXT`, one per line).
fn wire(r: &Reply) -> String {
    r.lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let sep = if i + 1 == r.lines.len() { ' ' } else { '-' };
            format!("{}{sep}{l}", r.code)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Sends up to 5 messages on one session, each to one recipient; returns the reply to the
/// MAIL that failed (the session left open) and how many were accepted.
fn send_five(c: &mut Smtp) -> (usize, Option<Reply>) {
    for i in 0..5 {
        let r = c.cmd("MAIL FROM:<a@sender.test>").unwrap();
        if r.code != 250 {
            return (i, Some(r));
        }
        let r = c.cmd(&format!("RCPT TO:<r{i}@primary.test>")).unwrap();
        assert_eq!(r.code, 250, "RCPT: {r}");
        let r = c.data(&sample(i)).unwrap().expect("DATA accepted");
        assert_eq!(r.code, 250, "end of DATA: {r}");
    }
    (5, None)
}

/// A message with none of the headers a relay might add when missing (no `From:`, `Date:`,
/// `Message-ID:`), a dot line and a long line.
fn bare() -> Vec<u8> {
    format!("Subject: bare\r\n\r\n.\r\n{}\r\nend\r\n", "x".repeat(990)).into_bytes()
}

/// One transaction with 150 recipients and [`bare`]: the replies to RCPT (as wire lines) and
/// the reply to the end of DATA.
fn send_150(c: &mut Smtp) -> (Vec<String>, Reply) {
    let r = c.cmd("MAIL FROM:<a@sender.test>").unwrap();
    assert_eq!(r.code, 250, "MAIL: {r}");
    let replies = (0..150)
        .map(|i| wire(&c.cmd(&format!("RCPT TO:<r{i}@primary.test>")).unwrap()))
        .collect();
    let r = c.data(&bare()).unwrap().expect("DATA accepted");
    (replies, r)
}

fn rcpt_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("r{i}@primary.test")).collect()
}

/// Asserts 100 `ok` replies then 50 `refused` ones.
fn assert_100_then(replies: &[String], ok: &str, refused: &str) {
    for (i, r) in replies.iter().enumerate() {
        let want = if i < 100 { ok } else { refused };
        assert_eq!(r, want, "reply to RCPT #{}", i + 1);
    }
}

fn assert_two_stored(p: &impl Primary) {
    assert!(
        p.wait_for_count(2, Duration::from_secs(20)),
        "messages not delivered:\n{}",
        p.log()
    );
    std::thread::sleep(Duration::from_millis(300));
    let got = p.messages();
    assert_eq!(got.len(), 2, "{got:#?}");
    for (i, d) in got.iter().enumerate() {
        assert_eq!(d.sender, "a@sender.test");
        assert_eq!(d.recipients, vec![format!("r{i}@primary.test")]);
        assert_eq!(text(&d.data), text(&sample(i)), "message {i} bytes");
    }
    assert_eq!(p.sessions(), 1, "{}", p.log());
}

#[test]
fn exim_answers_421_to_the_third_mail_and_keeps_the_session() {
    let exim = Exim::start(
        "127.0.60.1",
        free_port_at("127.0.60.1"),
        Limits::messages(2),
    );
    let mut c = session(&exim.addr());
    let (accepted, refused) = send_five(&mut c);
    assert_eq!(accepted, 2, "{}", exim.log());
    let r = refused.unwrap();
    assert_eq!(wire(&r), "421 too many messages in this connection");
    // Exim 4.96 keeps the connection after this 421: the client must end it.
    assert_eq!(wire(&c.cmd("NOOP").unwrap()), "250 OK");
    assert_eq!(
        wire(&c.cmd("QUIT").unwrap()),
        "221 exim.test closing connection"
    );
    assert_two_stored(&exim);
}

#[test]
fn exim_refuses_recipients_past_recipients_max() {
    let exim = Exim::start("127.0.60.2", free_port_at("127.0.60.2"), Limits::rcpts(100));
    let mut c = session(&exim.addr());
    let (replies, end) = send_150(&mut c);
    assert_100_then(&replies, "250 Accepted", "452 too many recipients");
    assert_eq!(end.code, 250, "{end}");
    let _ = c.cmd("QUIT");
    assert!(
        exim.wait_for_count(1, Duration::from_secs(20)),
        "{}",
        exim.log()
    );
    let got = exim.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].recipients, rcpt_names(100));
    assert_eq!(text(&got[0].data), text(&bare()));
}

#[test]
fn opensmtpd_refuses_the_third_mail_with_452() {
    let ip = "127.0.60.3";
    let o = OpenSmtpd::start(ip, free_port_at(ip), Limits::messages(2));
    let mut c = session(&o.addr());
    let (accepted, refused) = send_five(&mut c);
    assert_eq!(accepted, 2, "{}", o.log());
    assert_eq!(
        wire(&refused.unwrap()),
        "452 4.5.3 Too many recipients: Too many messages sent"
    );
    assert_eq!(wire(&c.cmd("NOOP").unwrap()), "250 2.0.0 Ok");
    let _ = c.cmd("QUIT");
    assert_two_stored(&o);
}

#[test]
fn opensmtpd_refuses_recipients_past_max_rcpt_with_451() {
    let ip = "127.0.60.4";
    let o = OpenSmtpd::start(ip, free_port_at(ip), Limits::rcpts(100));
    let mut c = session(&o.addr());
    let (replies, end) = send_150(&mut c);
    assert_100_then(
        &replies,
        "250 2.1.5 Destination address valid: Recipient ok",
        "451 4.5.3 Too many recipients: Too many recipients",
    );
    assert_eq!(end.code, 250, "{end}");
    let _ = c.cmd("QUIT");
    assert!(o.wait_for_count(1, Duration::from_secs(30)), "{}", o.log());
    let got = o.messages();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].recipients, rcpt_names(100));
    assert_eq!(text(&got[0].data), text(&bare()));
}

fn aio(ip: &str, opts: AioOptions) -> AioSmtpd {
    AioSmtpd::start(ip, free_port_at(ip), opts)
}

#[test]
fn aiosmtpd_caps_messages_per_session_421_452_and_close() {
    let ip = "127.0.60.5";
    let a = aio(
        ip,
        AioOptions {
            limits: Limits::messages(2),
            cap_action: CapAction::Reply421,
            ..AioOptions::default()
        },
    );
    let mut c = session(&a.addr());
    let (accepted, refused) = send_five(&mut c);
    assert_eq!(accepted, 2);
    assert_eq!(
        wire(&refused.unwrap()),
        "421 4.7.0 Error: too many messages in this session"
    );
    assert!(c.cmd("NOOP").is_err(), "connection still open after 421");
    assert_two_stored(&a);

    let a = aio(
        ip,
        AioOptions {
            limits: Limits::messages(2),
            cap_action: CapAction::Reply452,
            ..AioOptions::default()
        },
    );
    let mut c = session(&a.addr());
    let (accepted, refused) = send_five(&mut c);
    assert_eq!(accepted, 2);
    assert_eq!(
        wire(&refused.unwrap()),
        "452 4.5.3 Error: too many messages in this session"
    );
    assert_eq!(wire(&c.cmd("NOOP").unwrap()), "250 OK");
    let _ = c.cmd("QUIT");
    assert_two_stored(&a);

    let a = aio(
        ip,
        AioOptions {
            limits: Limits::messages(2),
            cap_action: CapAction::Close,
            ..AioOptions::default()
        },
    );
    let mut c = session(&a.addr());
    for i in 0..2 {
        assert_eq!(c.cmd("MAIL FROM:<a@sender.test>").unwrap().code, 250);
        let r = c.cmd(&format!("RCPT TO:<r{i}@primary.test>")).unwrap();
        assert_eq!(r.code, 250);
        assert_eq!(c.data(&sample(i)).unwrap().unwrap().code, 250);
    }
    let e = c.cmd("MAIL FROM:<a@sender.test>").unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    assert_two_stored(&a);
}

#[test]
fn aiosmtpd_refuses_recipients_past_max_rcpt() {
    let a = aio("127.0.60.6", AioOptions::limits(Limits::rcpts(100)));
    let mut c = session(&a.addr());
    let (replies, end) = send_150(&mut c);
    assert_100_then(
        &replies,
        "250 2.1.5 Ok",
        "452 4.5.3 Error: too many recipients",
    );
    assert_eq!(wire(&end), "250 2.0.0 Ok: queued as 000001");
    let _ = c.cmd("QUIT");
    assert!(a.wait_for_count(1, Duration::from_secs(10)));
    let got = a.messages();
    assert_eq!(got[0].recipients, rcpt_names(100));
    assert_eq!(got[0].data, bare());
}

#[test]
fn aiosmtpd_421_at_end_of_data_and_greetings() {
    let ip = "127.0.60.7";
    let a = aio(
        ip,
        AioOptions {
            data_421_after: Some(1),
            ..AioOptions::default()
        },
    );
    let mut c = session(&a.addr());
    let mut accepted = 0;
    for i in 0..2 {
        assert_eq!(c.cmd("MAIL FROM:<a@sender.test>").unwrap().code, 250);
        assert_eq!(c.cmd("RCPT TO:<r@primary.test>").unwrap().code, 250);
        let r = c.data(&sample(i)).unwrap().unwrap();
        if r.code != 250 {
            assert_eq!(
                wire(&r),
                "421 4.3.2 Error: too many messages in this session"
            );
            break;
        }
        accepted += 1;
    }
    assert_eq!(accepted, 1);
    assert!(c.cmd("NOOP").is_err(), "connection still open after 421");
    assert!(a.wait_for_count(1, Duration::from_secs(10)));
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(a.messages().len(), 1);

    // A greeting that never comes: the TCP connection is accepted, no byte is sent.
    let a = aio(
        ip,
        AioOptions {
            no_greeting: true,
            ..AioOptions::default()
        },
    );
    let mut s = TcpStream::connect(a.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut buf = [0u8; 64];
    let e = s.read(&mut buf).unwrap_err();
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{e}"
    );
    drop(s);
    assert!(wait_for(
        Duration::from_secs(5),
        Duration::from_millis(50),
        || a.sessions() == 1
    ));

    // A slow greeting.
    let a = aio(
        ip,
        AioOptions {
            greeting_delay: Some(Duration::from_millis(800)),
            ..AioOptions::default()
        },
    );
    let t = Instant::now();
    let (_c, banner) = Smtp::connect(&a.addr()).unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(750),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(wire(&banner), "220 aiosmtpd.test ESMTP aiosmtpd primary");
}
