//! The test harness: a throw-away mxspool (config and spool in a temp dir, a free loopback
//! port), a blocking SMTP client, and helpers for the queue commands and external tools.
//!
//! Everything is bounded: waits have deadlines, and a server or tool that outlives its test is
//! killed on drop.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tempfile::TempDir;

pub const BIN: &str = env!("CARGO_BIN_EXE_mxspool");

/// The hostname the test servers use in banner and `Received:`.
pub const HOSTNAME: &str = "mx2.test";

/// A port on 127.0.0.1 that is free now, never handed to another test of this run (a
/// process-wide counter picks it), and below the ephemeral range (see [`closed_port_at`]).
pub fn free_port() -> u16 {
    closed_port_at("127.0.0.1")
}

/// A temp dir that other users (Postfix's unprivileged daemons) may traverse.
pub fn public_tempdir(prefix: &str) -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create temp dir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Waits until `cond` is true, polling every `step`; false after `limit`.
pub fn wait_for(limit: Duration, step: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(step);
    }
}

/// Runs `cmd` with a wall-clock limit (the `timeout` tool), returning its output. Panics if
/// the program cannot be started at all (a missing tool fails the test, never skips it).
pub fn run(cmd: &mut Command, limit_secs: u32) -> Output {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let args: Vec<_> = cmd.get_args().map(|a| a.to_owned()).collect();
    let mut t = Command::new("timeout");
    t.arg("-k")
        .arg("5")
        .arg(limit_secs.to_string())
        .arg(&program)
        .args(&args);
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => t.env(k, v),
            None => t.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        t.current_dir(d);
    }
    let out = t
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    if out.status.code() == Some(127) {
        panic!(
            "{program} is not installed (needed by this test): {}",
            text(&out.stderr)
        );
    }
    out
}

/// Like [`run`], with `input` on standard input.
pub fn run_with_input(cmd: &mut Command, limit_secs: u32, input: &[u8]) -> Output {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut t = Command::new("timeout");
    t.arg("-k")
        .arg("5")
        .arg(limit_secs.to_string())
        .arg(&program);
    t.args(cmd.get_args());
    let mut child = t
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    if out.status.code() == Some(127) {
        panic!(
            "{program} is not installed (needed by this test): {}",
            text(&out.stderr)
        );
    }
    out
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Fails the test with the command's output unless it exited 0.
pub fn check_ok(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// One line of `mxspool queue --json`: one message for one domain. Every field of the
/// contract is parsed (so a missing or mistyped one fails), not all are used.
#[allow(dead_code)]
#[derive(Clone, Debug, Deserialize)]
pub struct QueueEntry {
    pub id: String,
    pub domain: String,
    pub sender: String,
    pub recipients: Vec<QueueRcpt>,
    pub arrival: String,
    pub size: u64,
    pub attempts: u64,
    #[serde(default)]
    pub next_attempt: Option<String>,
    #[serde(default)]
    pub last_error: Option<String>,
    pub held: bool,
}

#[derive(Clone, Debug, Deserialize)]
pub struct QueueRcpt {
    pub address: String,
    pub state: String,
}

/// A test installation of mxspool: a temp dir with the config, the spool and the server logs.
/// The server process itself is a [`Server`], so a test can kill and restart it on the same
/// spool.
pub struct MxEnv {
    pub dir: TempDir,
    /// The listen address (127.0.0.1 unless made with [`MxEnv::host`]).
    pub ip: String,
    pub port: u16,
    pub config: PathBuf,
    starts: u32,
}

impl MxEnv {
    /// Backup MX for `example.com`. Its next hop is 127.0.0.1:1 (nothing listens there), so
    /// mail stays queued: never looked up in DNS, never delivered, never bounced.
    pub fn new() -> MxEnv {
        MxEnv::with_config("")
    }

    /// Like [`MxEnv::new`], with `extra` TOML appended to the config.
    pub fn with_config(extra: &str) -> MxEnv {
        MxEnv::custom(&format!(
            "[queue]\nretry_interval = \"1h\"\n\n[[partner]]\ndomain = \"example.com\"\nroute = [\"127.0.0.1:1\"]\n{extra}"
        ))
    }

    /// An installation whose configuration is `hostname`, `spool`, `[smtp] listen` and then
    /// `tail` exactly (no partner or queue settings of its own).
    pub fn custom(tail: &str) -> MxEnv {
        MxEnv::host(HOSTNAME, "127.0.0.1", free_port(), tail)
    }

    /// A machine of a multi-server picture: `hostname`, listening on `ip:port` only, then
    /// `tail`. `{dir}` in `tail` is replaced by the installation's temp dir (for Maildirs
    /// and table files).
    pub fn host(hostname: &str, ip: &str, port: u16, tail: &str) -> MxEnv {
        let dir = public_tempdir("mxspool-it.");
        let spool = dir.path().join("spool");
        let config = dir.path().join("mxspool.toml");
        let tail = tail.replace("{dir}", &dir.path().display().to_string());
        let toml = format!(
            "hostname = \"{hostname}\"\nspool = \"{}\"\n\n[smtp]\nlisten = [\"{ip}:{port}\"]\n\n{tail}",
            spool.display()
        );
        fs::write(&config, toml).unwrap();
        MxEnv {
            dir,
            ip: ip.to_string(),
            port,
            config,
            starts: 0,
        }
    }

    pub fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    /// `mxspool --config CONFIG ARGS...`, bounded to 60 s.
    pub fn mxspool(&self, args: &[&str]) -> Output {
        run(
            Command::new(BIN)
                .arg("--config")
                .arg(&self.config)
                .args(args),
            60,
        )
    }

    /// Starts `mxspool serve` and waits (at most 20 s) until it accepts connections.
    pub fn start(&mut self) -> Server {
        self.starts += 1;
        let log = self.dir.path().join(format!("server-{}.log", self.starts));
        let child = Command::new(BIN)
            .arg("--config")
            .arg(&self.config)
            .arg("serve")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(
                File::create(self.dir.path().join(format!("server-{}.out", self.starts))).unwrap(),
            )
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("spawn mxspool serve");
        let mut server = Server {
            child,
            log,
            addr: self.addr(),
        };
        server.wait_ready(Duration::from_secs(20));
        server
    }

    /// The parsed `mxspool queue --json`, optionally for one domain.
    pub fn queue(&self, domain: Option<&str>) -> Vec<QueueEntry> {
        let mut args = vec!["queue", "--json"];
        if let Some(d) = domain {
            args.extend(["--domain", d]);
        }
        let out = self.mxspool(&args);
        check_ok("mxspool queue --json", &out);
        parse_queue(&text(&out.stdout))
    }

    /// The output of `mxspool show ID` (envelope and headers), if the command succeeds.
    pub fn show(&self, id: &str) -> Option<String> {
        let out = self.mxspool(&["show", id]);
        out.status.success().then(|| text(&out.stdout))
    }
}

pub fn parse_queue(json_lines: &str) -> Vec<QueueEntry> {
    json_lines
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("bad queue --json line {l:?}: {e}"))
        })
        .collect()
}

/// A running `mxspool serve`; killed (SIGKILL) on drop.
pub struct Server {
    pub child: Child,
    pub log: PathBuf,
    /// `ip:port` it listens on.
    pub addr: String,
}

impl Server {
    fn wait_ready(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("mxspool serve exited early ({status}):\n{}", self.log());
            }
            if TcpStream::connect(&self.addr).is_ok() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "mxspool serve does not accept on {} after {limit:?}:\n{}",
                    self.addr,
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `kill -9`, then reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL on Unix
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A minimal blocking SMTP client: lockstep commands, multi-line replies.
pub struct Smtp {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

/// A reply: the code and every line's text (after the code and separator).
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.lines.join(" / "))
    }
}

impl Smtp {
    pub fn connect(addr: &str) -> std::io::Result<(Smtp, Reply)> {
        Smtp::start(TcpStream::connect(addr)?)
    }

    /// Connects to `addr` from the local address `source` (a loopback address such as
    /// `127.0.40.9`), so the server sees that client address.
    pub fn connect_from(addr: &str, source: &str) -> std::io::Result<(Smtp, Reply)> {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        let src: std::net::SocketAddr = format!("{source}:0").parse().expect("source address");
        sock.bind(&src.into())?;
        let dst: std::net::SocketAddr = addr.parse().expect("server address");
        sock.connect_timeout(&dst.into(), Duration::from_secs(10))?;
        Smtp::start(sock.into())
    }

    fn start(s: TcpStream) -> std::io::Result<(Smtp, Reply)> {
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.set_write_timeout(Some(Duration::from_secs(30)))?;
        let mut c = Smtp {
            r: BufReader::new(s.try_clone()?),
            w: s,
        };
        let banner = c.reply()?;
        Ok((c, banner))
    }

    pub fn reply(&mut self) -> std::io::Result<Reply> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line)? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if line.len() < 3 || !line.is_char_boundary(3) {
                return Err(std::io::Error::other(format!("bad reply line {line:?}")));
            }
            let code: u16 = line[..3]
                .parse()
                .map_err(|_| std::io::Error::other(format!("bad reply line {line:?}")))?;
            lines.push(line.get(4..).unwrap_or("").to_string());
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(Reply { code, lines });
            }
        }
    }

    pub fn cmd(&mut self, line: &str) -> std::io::Result<Reply> {
        self.w.write_all(format!("{line}\r\n").as_bytes())?;
        self.reply()
    }

    /// Sends `bytes` as they are, without waiting for a reply (part of a message in DATA).
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.w.write_all(bytes)
    }

    /// Sends DATA, the dot-stuffed `message` (CRLF lines) and the final dot; returns the
    /// reply to the final dot. `Ok(Err(reply))` if DATA itself was refused.
    pub fn data(&mut self, message: &[u8]) -> std::io::Result<Result<Reply, Reply>> {
        let r = self.cmd("DATA")?;
        if r.code != 354 {
            return Ok(Err(r));
        }
        self.w.write_all(&dot_stuff(message))?;
        self.w.write_all(b".\r\n")?;
        Ok(Ok(self.reply()?))
    }
}

/// Dot-stuffs a message of CRLF lines (RFC 5321 4.5.2); adds a final CRLF if missing.
pub fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 16);
    let mut at_line_start = true;
    for &b in message {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A private Postfix instance (own config, queue and data directories in a temp dir),
/// started with `postfix -c DIR start` and stopped on drop. Needs root, like any Postfix.
///
/// The default `main.cf` need not list the directory in `alternate_config_directories`:
/// `postfix -c` and `sendmail -C` accept any config directory from the super-user.
pub struct Postfix {
    _dir: TempDir,
    pub conf: PathBuf,
    pub queue: PathBuf,
    pub maillog: PathBuf,
    running: bool,
}

/// The services every instance needs; nothing chrooted, no `inet` service unless added.
const POSTFIX_MASTER_CF: &str = "\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
";

impl Postfix {
    /// Writes the instance (main.cf = common settings + `main_extra`, master.cf = the
    /// services above + `master_extra`) and starts it.
    pub fn start(main_extra: &str, master_extra: &str) -> Postfix {
        let dir = public_tempdir("mxspool-postfix.");
        let root = dir.path().to_path_buf();
        let conf = root.join("conf");
        let queue = root.join("queue");
        let data = root.join("data");
        for d in [&conf, &queue, &data] {
            fs::create_dir(d).unwrap();
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).unwrap();
        }
        // master.lock and the other data files are written by the unprivileged mail_owner.
        check_ok(
            "chown postfix",
            &run(Command::new("chown").arg("postfix").arg(&data), 10),
        );
        let maillog = root.join("maillog");
        let main_cf = format!(
            "compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
maillog_file = {maillog}
maillog_file_prefixes = {root}
mail_owner = postfix
setgid_group = postdrop
myhostname = mta1.test
mydomain = test
myorigin = $myhostname
mydestination =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
inet_interfaces = loopback-only
inet_protocols = ipv4
smtp_dns_support_level = disabled
biff = no
{main_extra}
",
            queue = queue.display(),
            data = data.display(),
            maillog = maillog.display(),
            root = root.display(),
        );
        fs::write(conf.join("main.cf"), main_cf).unwrap();
        fs::write(
            conf.join("master.cf"),
            format!("{POSTFIX_MASTER_CF}{master_extra}"),
        )
        .unwrap();
        let mut pf = Postfix {
            _dir: dir,
            conf,
            queue,
            maillog,
            running: false,
        };
        let out = run(
            Command::new(tool("postfix"))
                .arg("-c")
                .arg(&pf.conf)
                .arg("start"),
            60,
        );
        if !out.status.success() {
            panic!(
                "postfix -c {} start failed ({}; must run as root):\n{}{}\n--- maillog\n{}",
                pf.conf.display(),
                out.status,
                text(&out.stdout),
                text(&out.stderr),
                pf.log()
            );
        }
        pf.running = true;
        pf
    }

    /// The instance's log (Postfix's `maillog_file`).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.maillog).unwrap_or_default()
    }

    /// `sendmail -C CONF -f SENDER -- RCPTS` with `message` on stdin.
    pub fn sendmail(&self, sender: &str, rcpts: &[&str], message: &[u8]) {
        let out = run_with_input(
            Command::new(tool("sendmail"))
                .arg("-C")
                .arg(&self.conf)
                .arg("-i")
                .arg("-f")
                .arg(sender)
                .arg("--")
                .args(rcpts),
            30,
            message,
        );
        check_ok("postfix sendmail", &out);
    }

    fn master_pid(&self) -> Option<i32> {
        fs::read_to_string(self.queue.join("pid/master.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// `postfix -c DIR stop`, then waits (at most 15 s) until the master is gone; SIGKILL
    /// as a last resort.
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        let pid = self.master_pid();
        let _ = run(
            Command::new(tool("postfix"))
                .arg("-c")
                .arg(&self.conf)
                .arg("stop"),
            30,
        );
        if let Some(pid) = pid {
            let gone = wait_for(Duration::from_secs(15), Duration::from_millis(100), || {
                !process_alive(pid)
            });
            if !gone {
                // SAFETY: plain syscall on a pid we started (the instance's master).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether `pid` is a live (not zombie) process.
pub fn process_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // pid (comm) STATE ...: the state follows the last ')'.
            let state = stat
                .rsplit_once(')')
                .map(|(_, r)| r.trim_start())
                .unwrap_or("");
            !state.starts_with('Z') && !state.starts_with('X')
        }
        Err(_) => false,
    }
}

/// The path of an external program: from `PATH`, else from the sbin directories where
/// Debian puts Postfix's tools (a non-root `PATH` often lacks them). A program found nowhere
/// is returned as its bare name, so running it fails with "not installed".
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Path of a file next to this harness (`tests/it/NAME`).
pub fn it_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/it")
        .join(name)
}

/// The `Received:` header (with its continuation lines, CRLF-terminated) that mxspool put on
/// top of a message, as printed by `mxspool show ID`; `None` if show printed none.
pub fn received_header(show: &str) -> Option<String> {
    let mut lines = show.lines().skip_while(|l| !l.starts_with("Received:"));
    let first = lines.next()?;
    let mut h = format!("{first}\r\n");
    for l in lines.take_while(|l| l.starts_with(' ') || l.starts_with('\t')) {
        h.push_str(l);
        h.push_str("\r\n");
    }
    Some(h)
}

/// Whether `mxspool --help` lists the subcommand `name`.
pub fn has_command(name: &str) -> bool {
    static HELP: OnceLock<String> = OnceLock::new();
    let help = HELP.get_or_init(|| {
        let out = run(Command::new(BIN).arg("--help"), 30);
        check_ok("mxspool --help", &out);
        text(&out.stdout)
    });
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .any(|l| l.split_whitespace().next() == Some(name))
}

/// Checks that the queued `entry` holds exactly `sent` (the message as given to DATA, before
/// dot-stuffing) under mxspool's `Received:` header.
///
/// With `mxspool show`: every header of `sent` shows, the `Received:` header names us, and
/// `size` is the size of `sent`, with or without that `Received:` header. Without it (not
/// written yet): `size` is the size of `sent` plus at most 1 KiB. Returns the show output
/// (empty without `show`).
pub fn assert_stored(env: &MxEnv, entry: &QueueEntry, sent: &[u8]) -> String {
    let len = sent.len() as u64;
    if !has_command("show") {
        eprintln!(
            "note: no `mxspool show` yet; checking {} by size only",
            entry.id
        );
        assert!(
            entry.size == len || (entry.size > len && entry.size <= len + 1024),
            "{}: size {} does not fit the {len} bytes sent (plus a Received: header)",
            entry.id,
            entry.size
        );
        return String::new();
    }
    let show = env
        .show(&entry.id)
        .unwrap_or_else(|| panic!("mxspool show {} failed", entry.id));
    let received = received_header(&show)
        .unwrap_or_else(|| panic!("no Received: header in mxspool show {}:\n{show}", entry.id));
    assert!(
        received.contains(HOSTNAME),
        "Received: header does not name {HOSTNAME}: {received}"
    );
    let sent_text = text(sent);
    let headers = sent_text.split("\r\n\r\n").next().unwrap();
    for h in headers.split("\r\n") {
        assert!(
            show.contains(h),
            "header line {h:?} of the sent message missing from mxspool show {}:\n{show}",
            entry.id
        );
    }
    let with_received = len + received.len() as u64;
    assert!(
        entry.size == len || entry.size == with_received,
        "{}: size {} is neither the sent size {len} nor that plus the Received: header \
         ({with_received})",
        entry.id,
        entry.size
    );
    show
}

/// A TCP port on `ip` (e.g. `"127.0.0.2"`) that was free a moment ago.
pub fn free_port_at(ip: &str) -> u16 {
    let l = TcpListener::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}:0: {e}"));
    l.local_addr().unwrap().port()
}

/// Hands messages to the SMTP server at `addr` over one connection: for each `(sender,
/// recipient, message)` one MAIL/RCPT/DATA transaction, each of which must get `250`.
/// Returns the queue ids (the last word of each final `250`).
pub fn smtp_send_all(addr: &str, messages: &[(String, String, Vec<u8>)]) -> Vec<String> {
    let (mut c, banner) = Smtp::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    assert_eq!(banner.code, 220, "banner: {banner}");
    let ehlo = c.cmd("EHLO client.test").unwrap();
    assert_eq!(ehlo.code, 250, "EHLO: {ehlo}");
    let mut ids = Vec::with_capacity(messages.len());
    for (from, to, msg) in messages {
        let r = c.cmd(&format!("MAIL FROM:<{from}>")).unwrap();
        assert_eq!(r.code, 250, "MAIL FROM:<{from}>: {r}");
        let r = c.cmd(&format!("RCPT TO:<{to}>")).unwrap();
        assert_eq!(r.code, 250, "RCPT TO:<{to}>: {r}");
        let r = c.data(msg).unwrap().expect("DATA accepted");
        assert_eq!(r.code, 250, "end of DATA: {r}");
        ids.push(r.to_string().rsplit(' ').next().unwrap().to_string());
    }
    let _ = c.cmd("QUIT");
    ids
}

// ---------------------------------------------------------------------------------------
// Helpers for the queue-operation tests (queue_ops, etrn, archive).

/// The spool directory of `env` (as written into its config by [`MxEnv::custom`] and
/// [`MxEnv::with_config`]).
pub fn spool_dir(env: &MxEnv) -> PathBuf {
    env.dir.path().join("spool")
}

/// `mxspool --config CONFIG --spool SPOOL ARGS...`, bounded to 60 s: the command run on
/// another spool, like sendmail's `-OQueueDirectory=DIR`.
pub fn mxspool_on(env: &MxEnv, spool: &Path, args: &[&str]) -> Output {
    run(
        Command::new(BIN)
            .arg("--config")
            .arg(&env.config)
            .arg("--spool")
            .arg(spool)
            .args(args),
        60,
    )
}

/// The parsed `mxspool --spool SPOOL queue --json`.
pub fn queue_on(env: &MxEnv, spool: &Path) -> Vec<QueueEntry> {
    let out = mxspool_on(env, spool, &["queue", "--json"]);
    check_ok("mxspool --spool queue --json", &out);
    parse_queue(&text(&out.stdout))
}

/// Stops a server the way an administrator does (SIGTERM), waiting at most 15 s for it to
/// exit; SIGKILL as a last resort. Returns whether it exited on its own.
pub fn stop_server(server: &mut Server) -> bool {
    let pid = server.child.id() as i32;
    // SAFETY: plain syscall on the pid of a child we started and have not reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(Some(_)) = server.child.try_wait() {
            return true;
        }
        if Instant::now() >= deadline {
            server.kill9();
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// One MAIL/RCPT.../DATA transaction on a fresh connection to `addr`; every reply must be
/// positive. Returns the queue id (the last word of the final `250`).
pub fn smtp_send(addr: &str, from: &str, rcpts: &[&str], message: &[u8]) -> String {
    smtp_send_with(addr, &format!("MAIL FROM:<{from}>"), rcpts, &[], message)
}

/// Like [`smtp_send`] with the whole MAIL command given (for DSN parameters) and per
/// recipient RCPT parameters (`rcpt_params[i]` for `rcpts[i]`, may be shorter).
pub fn smtp_send_with(
    addr: &str,
    mail_cmd: &str,
    rcpts: &[&str],
    rcpt_params: &[&str],
    message: &[u8],
) -> String {
    let (mut c, banner) = Smtp::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    assert_eq!(banner.code, 220, "banner: {banner}");
    let r = c.cmd("EHLO client.sender.test").unwrap();
    assert_eq!(r.code, 250, "EHLO: {r}");
    let r = c.cmd(mail_cmd).unwrap();
    assert_eq!(r.code, 250, "{mail_cmd}: {r}");
    for (i, rcpt) in rcpts.iter().enumerate() {
        let params = rcpt_params.get(i).copied().unwrap_or("");
        let line = if params.is_empty() {
            format!("RCPT TO:<{rcpt}>")
        } else {
            format!("RCPT TO:<{rcpt}> {params}")
        };
        let r = c.cmd(&line).unwrap();
        assert_eq!(r.code, 250, "{line}: {r}");
    }
    let r = c.data(message).unwrap().expect("DATA accepted");
    assert_eq!(r.code, 250, "end of DATA: {r}");
    let _ = c.cmd("QUIT");
    r.to_string().rsplit(' ').next().unwrap().to_string()
}

/// The `spool-tools` binary, next to `mxspool` in the same target directory (see
/// [`workspace_bin`]). Panics when there is none.
pub fn spool_tools() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| workspace_bin("spool-tools", "spool-tools"))
        .clone()
}

/// A binary of another workspace member, next to `mxspool` in the same target directory:
/// built with `cargo build [--release] -p PACKAGE --bin BIN` (quick when up to date; the `it`
/// tests alone do not build the other workspace members). Panics when there is none.
pub fn workspace_bin(package: &str, bin_name: &str) -> PathBuf {
    let bin = Path::new(BIN);
    let path = bin.with_file_name(bin_name);
    // BIN is TARGET/PROFILE/mxspool.
    let profile_dir = bin.parent().expect("mxspool has a directory");
    let target = profile_dir.parent().expect("target directory");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("-p")
        .arg(package)
        .arg("--bin")
        .arg(bin_name)
        .env("CARGO_TARGET_DIR", target)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile_dir.file_name().and_then(|n| n.to_str()) == Some("release") {
        cmd.arg("--release");
    }
    let out = run(&mut cmd, 1800);
    if !out.status.success() {
        eprintln!(
            "note: cargo build -p {package} failed ({}); using {} if present:\n{}",
            out.status,
            path.display(),
            text(&out.stderr)
        );
    }
    assert!(
        path.is_file(),
        "no {bin_name} binary at {} (cargo build --release -p {package})",
        path.display()
    );
    path
}

/// The target directory the binaries under test were built in (`TARGET` of
/// `TARGET/PROFILE/mxspool`).
pub fn target_dir() -> PathBuf {
    Path::new(BIN)
        .parent()
        .and_then(Path::parent)
        .expect("TARGET/PROFILE/mxspool")
        .to_path_buf()
}

/// `spool-tools ARCHIVE ARGS...`, bounded to 120 s.
pub fn spool_tools_run(archive: &Path, args: &[&str]) -> Output {
    run(Command::new(spool_tools()).arg(archive).args(args), 120)
}

/// Fails the test unless `out` failed (non-zero exit) with a readable error: no panic, no
/// backtrace, and some line of stderr (the first not empty) that says what is wrong.
/// Returns stderr.
pub fn assert_clean_failure(what: &str, out: &Output) -> String {
    let err = text(&out.stderr);
    assert!(
        !out.status.success(),
        "{what}: expected failure, got {}:\n--- stdout\n{}\n--- stderr\n{err}",
        out.status,
        text(&out.stdout)
    );
    assert_ne!(
        out.status.code(),
        Some(101),
        "{what}: exit 101 is a Rust panic:\n{err}"
    );
    for bad in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
        assert!(!err.contains(bad), "{what}: {bad:?} on stderr:\n{err}");
    }
    assert!(
        err.lines().any(|l| !l.trim().is_empty()),
        "{what}: failed without saying why"
    );
    err
}

/// A `Receiver`-free check that nothing listens on `127.0.0.1:port` (a "down" primary).
pub fn port_closed(port: u16) -> bool {
    TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .is_err()
}

/// A port on `ip` that is free now and outside the kernel's ephemeral range (32768 and
/// up by default), so no outgoing connection can ever get it as its own source port: a
/// connection to it is refused (a port from [`free_port_at`] can, rarely, be connected to
/// itself by TCP's simultaneous open).
pub fn closed_port_at(ip: &str) -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let seed = (std::process::id() as u16).wrapping_mul(7919);
    for _ in 0..5000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20000 + (seed.wrapping_add(n.wrapping_mul(13)) % 12000);
        if TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below the ephemeral range on {ip}");
}

/// The messages of a Maildir (its `new/` and `cur/`), ordered by file name, with their
/// paths. A missing directory counts as empty.
pub fn maildir_files(maildir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    for sub in ["new", "cur"] {
        let Ok(entries) = fs::read_dir(maildir.join(sub)) else {
            continue;
        };
        for e in entries {
            let e = e.unwrap();
            if e.file_type().unwrap().is_file() {
                files.push(e.path());
            }
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    files
        .into_iter()
        .map(|p| {
            let bytes = fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

/// The messages of a Maildir as text (see [`maildir_files`]).
pub fn maildir_messages(dir: &Path) -> Vec<String> {
    maildir_files(dir)
        .into_iter()
        .map(|(_, bytes)| String::from_utf8_lossy(&bytes).into_owned())
        .collect()
}

/// The name of user `uid` (the number itself if it has none).
pub fn user_name(uid: u32) -> String {
    // SAFETY: getpwuid returns a pointer into static storage or null; read at once.
    unsafe {
        let pw = libc::getpwuid(uid);
        if pw.is_null() {
            return uid.to_string();
        }
        std::ffi::CStr::from_ptr((*pw).pw_name)
            .to_string_lossy()
            .into_owned()
    }
}

/// The name of group `gid` (the number itself if it has none).
pub fn group_name(gid: u32) -> String {
    // SAFETY: getgrgid returns a pointer into static storage or null; read at once.
    unsafe {
        let gr = libc::getgrgid(gid);
        if gr.is_null() {
            return gid.to_string();
        }
        std::ffi::CStr::from_ptr((*gr).gr_name)
            .to_string_lossy()
            .into_owned()
    }
}

/// A tmpfs mounted at `dir` for one test; unmounted on drop.
pub struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        check_ok(
            "mount tmpfs",
            &run(
                Command::new("mount")
                    .args([
                        "-t",
                        "tmpfs",
                        "-o",
                        &format!("size={size},mode=0755"),
                        "tmpfs",
                    ])
                    .arg(dir),
                30,
            ),
        );
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = run(Command::new("umount").arg("-l").arg(&self.0), 30);
    }
}

/// Postfix's TLS session cache and entropy service, which its smtpd needs for STARTTLS.
pub const TLSMGR: &str = "tlsmgr    unix  -       -       n       1000?   1       tlsmgr\n";

/// Postfix as a primary on `ip:port` taking mail for `domains` (comma-separated) into
/// `mailbase/mail/` (made writable by nobody, its virtual user), with STARTTLS when `tls`
/// gives a certificate and key (`smtpd_tls_security_level = may`, the TLS details in its
/// `Received:` header), without it otherwise.
pub fn postfix_primary(
    ip: &str,
    port: u16,
    domains: &str,
    tls: Option<(&Path, &Path)>,
    mailbase: &Path,
) -> Postfix {
    check_ok(
        "chown nobody maildir base",
        &run(
            Command::new("chown").arg("nobody:nogroup").arg(mailbase),
            10,
        ),
    );
    let tls = match tls {
        Some((cert, key)) => format!(
            "smtpd_tls_cert_file = {}\nsmtpd_tls_key_file = {}\nsmtpd_tls_security_level = may\n\
             smtpd_tls_received_header = yes\nsmtpd_tls_loglevel = 1\n",
            cert.display(),
            key.display()
        ),
        None => "smtpd_tls_security_level = none\n".to_string(),
    };
    Postfix::start(
        &format!(
            "mynetworks = 127.0.0.0/8\n\
             smtpd_recipient_restrictions = permit_mynetworks, reject\n\
             virtual_mailbox_domains = {domains}\n\
             virtual_mailbox_base = {base}\n\
             virtual_mailbox_maps = static:mail/\n\
             virtual_uid_maps = static:65534\n\
             virtual_gid_maps = static:65534\n\
             virtual_transport = virtual\n{tls}",
            base = mailbase.display(),
        ),
        &format!(
            "{ip}:{port} inet n - n - - smtpd\n\
             virtual   unix  -       n       n       -       -       virtual\n{TLSMGR}"
        ),
    )
}
