//! POP3 and IMAP for the Maildirs mxspool writes (the campus pictures' `pop.inst.uc.pt`):
//! mxspool delivers a message to a local Maildir as its `owner`, then a private Dovecot runs
//! `contrib/dovecot/dovecot.conf` itself (its paths, mail user, realm and ports replaced by
//! the test's, TLS off) and serves that Maildir: the message fetched over POP3 (`RETR`) and
//! over IMAP (`FETCH BODY[]`) is the file mxspool wrote, byte for byte but for CRLF.
//!
//! Everything on 127.0.21.0/24: mxspool on 127.0.21.1, Dovecot on 127.0.21.2. As root (CI)
//! the mail user is `nobody`, otherwise the user running the tests (Dovecot never serves
//! mail as uid 0). Needs Debian's `dovecot-pop3d` and `dovecot-imapd`: without them the test
//! fails.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::harness::{
    closed_port_at, group_name, maildir_files, public_tempdir, smtp_send, tool, user_name,
    wait_for, MxEnv,
};

const MX_IP: &str = "127.0.21.1";
const POP_IP: &str = "127.0.21.2";
const PASSWORD: &str = "s3cret-pop";

/// `path` within Dovecot's binaries (Debian: /usr/lib/dovecot).
fn dovecot_program(name: &str) -> PathBuf {
    Path::new("/usr/lib/dovecot").join(name)
}

/// The mail user: (name, uid, group name, gid).
fn mail_user() -> (String, u32, String, u32) {
    // SAFETY: plain syscalls without arguments.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if euid == 0 {
        ("nobody".into(), 65534, "nogroup".into(), 65534)
    } else {
        (user_name(euid), euid, group_name(egid), egid)
    }
}

/// Replaces the one line of `conf` that is exactly `from` (after trimming) by `to`; panics
/// when there is not exactly one, so a change to contrib's file is noticed here.
fn replace_line(conf: &str, from: &str, to: &str) -> String {
    let hits = conf.lines().filter(|l| l.trim() == from).count();
    assert_eq!(
        hits, 1,
        "contrib/dovecot/dovecot.conf: expected one line `{from}`, found {hits}"
    );
    conf.lines()
        .map(|l| if l.trim() == from { to } else { l })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// A private Dovecot on contrib's configuration; killed on drop.
struct PopServer {
    dir: TempDir,
    child: Option<Child>,
    pop3_port: u16,
    imap_port: u16,
}

impl PopServer {
    /// `mail` is the directory holding `DOMAIN/USER` Maildirs; `users` the passwd-file lines.
    fn start(mail: &Path, realm: &str, users: &str) -> PopServer {
        let bin = tool("dovecot");
        for (what, p) in [
            ("dovecot-core", bin.clone()),
            ("dovecot-pop3d", dovecot_program("pop3")),
            ("dovecot-imapd", dovecot_program("imap")),
        ] {
            assert!(
                p.is_file(),
                "{} is missing (Debian: apt-get install {what} dovecot-pop3d dovecot-imapd); \
                 the POP3 test needs Dovecot's real POP3 and IMAP servers",
                p.display()
            );
        }
        let dir = public_tempdir("mxspool-pop3.");
        let root = dir.path().to_path_buf();
        for d in ["run", "state"] {
            fs::create_dir(root.join(d)).unwrap();
        }
        let users_file = root.join("users");
        fs::write(&users_file, users).unwrap();

        let (user, uid, group, gid) = mail_user();
        let pop3_port = closed_port_at(POP_IP);
        let imap_port = closed_port_at(POP_IP);
        let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/dovecot/dovecot.conf");
        let mut conf =
            fs::read_to_string(&contrib).unwrap_or_else(|e| panic!("{}: {e}", contrib.display()));
        let users_path = users_file.display().to_string();
        for (from, to) in [
            ("listen = *, ::", format!("listen = {POP_IP}")),
            (
                "mail_location = maildir:/var/mail/%d/%n",
                format!("mail_location = maildir:{}/%d/%n", mail.display()),
            ),
            (
                "default_fields = uid=vmail gid=vmail",
                format!("default_fields = uid={user} gid={group}"),
            ),
            ("first_valid_uid = 100", format!("first_valid_uid = {uid}")),
            ("first_valid_gid = 100", format!("first_valid_gid = {gid}")),
            (
                "auth_default_realm = inst.uc.pt",
                format!("auth_default_realm = {realm}"),
            ),
            (
                "args = scheme=SHA512-CRYPT username_format=%u /etc/dovecot/users",
                format!("args = scheme=SHA512-CRYPT username_format=%u {users_path}"),
            ),
            (
                "args = username_format=%u /etc/dovecot/users",
                format!("args = username_format=%u {users_path}"),
            ),
            // No certificate in the test: plain text, and passwords allowed over it.
            ("ssl = required", "ssl = no".into()),
            ("ssl_cert = </etc/mxspool/tls/fullchain.pem", String::new()),
            ("ssl_key = </etc/mxspool/tls/privkey.pem", String::new()),
            (
                "disable_plaintext_auth = yes",
                "disable_plaintext_auth = no".into(),
            ),
            ("port = 110", format!("port = {pop3_port}")),
            ("port = 143", format!("port = {imap_port}")),
            ("port = 995", "port = 0".into()),
            ("port = 993", "port = 0".into()),
            (
                "log_path = syslog",
                format!("log_path = {}/dovecot.log", root.display()),
            ),
            // Login processes unchrooted (the test's base_dir is not root's to chroot into
            // when the tests do not run as root).
            (
                "service pop3-login {",
                "service pop3-login {\n  chroot =".into(),
            ),
            (
                "service imap-login {",
                "service imap-login {\n  chroot =".into(),
            ),
        ] {
            conf = replace_line(&conf, from, &to);
        }
        // A private instance: its own directories, and as a non-root user its own users.
        // SAFETY: plain syscall without arguments.
        let euid = unsafe { libc::geteuid() };
        let mut head = format!(
            "# tests/it/pop3.rs: contrib/dovecot/dovecot.conf with the test's paths\n\
             base_dir = {root}/run\nstate_dir = {root}/state\ninstance_name = mxspool-pop3-{pop3_port}\n",
            root = root.display()
        );
        if euid != 0 {
            let me = user_name(euid);
            head.push_str(&format!(
                "default_login_user = {me}\ndefault_internal_user = {me}\ndefault_internal_group = {group}\n"
            ));
        }
        conf = format!("{head}{conf}service anvil {{\n  chroot =\n}}\n");
        let conf_path = root.join("dovecot.conf");
        fs::write(&conf_path, conf).unwrap();

        let out = File::create(root.join("stderr")).unwrap();
        let err = out.try_clone().unwrap();
        let child = Command::new(&bin)
            .arg("-F")
            .arg("-c")
            .arg(&conf_path)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let mut s = PopServer {
            dir,
            child: Some(child),
            pop3_port,
            imap_port,
        };
        s.wait_ready();
        s
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!("dovecot exited at start ({status}):\n{}", self.log());
            }
            let greets = |port: u16, ok: &str| {
                TcpStream::connect((POP_IP, port))
                    .ok()
                    .filter(|s| s.set_read_timeout(Some(Duration::from_secs(2))).is_ok())
                    .is_some_and(|s| {
                        let mut line = String::new();
                        BufReader::new(s).read_line(&mut line).is_ok() && line.starts_with(ok)
                    })
            };
            if greets(self.pop3_port, "+OK") && greets(self.imap_port, "* OK") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "dovecot did not answer POP3 and IMAP within 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        let read = |name: &str| fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!("{}{}", read("dovecot.log"), read("stderr"))
    }
}

impl Drop for PopServer {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: a signal to the child we started and have not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let gone = wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        if !gone {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A lockstep text-protocol client (POP3 or IMAP) with a 10 s read timeout.
struct Client {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl Client {
    fn connect(port: u16) -> (Client, String) {
        let s = TcpStream::connect((POP_IP, port)).expect("connect to dovecot");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = Client {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        };
        let greeting = c.line();
        (c, greeting)
    }

    fn line(&mut self) -> String {
        let mut buf = Vec::new();
        self.r.read_until(b'\n', &mut buf).expect("read a line");
        String::from_utf8_lossy(&buf).into_owned()
    }

    fn send(&mut self, line: &str) {
        self.w.write_all(format!("{line}\r\n").as_bytes()).unwrap();
    }

    /// A POP3 command with a one-line `+OK` reply.
    fn pop_ok(&mut self, line: &str) -> String {
        self.send(line);
        let r = self.line();
        assert!(r.starts_with("+OK"), "{line}: {r}");
        r
    }

    /// A POP3 multi-line reply after `+OK`: the bytes up to the terminating `.` line, with
    /// the byte-stuffing undone (RFC 1939 3), CRLF line ends kept.
    fn pop_multiline(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let mut buf = Vec::new();
            let n = self.r.read_until(b'\n', &mut buf).expect("read");
            assert!(n > 0, "connection closed inside a multi-line reply");
            if buf == b".\r\n" {
                return out;
            }
            let body = if buf.starts_with(b"..") {
                &buf[1..]
            } else {
                &buf[..]
            };
            out.extend_from_slice(body);
        }
    }

    /// An IMAP command under `tag`: the untagged lines (literals included), then the tagged
    /// reply, which must be OK.
    fn imap(&mut self, tag: &str, cmd: &str) -> Vec<u8> {
        self.send(&format!("{tag} {cmd}"));
        let mut out = Vec::new();
        loop {
            let mut buf = Vec::new();
            self.r.read_until(b'\n', &mut buf).expect("read");
            assert!(!buf.is_empty(), "connection closed during {cmd}");
            if buf.starts_with(format!("{tag} ").as_bytes()) {
                let l = String::from_utf8_lossy(&buf).into_owned();
                assert!(l.starts_with(&format!("{tag} OK")), "{cmd}: {l}");
                return out;
            }
            // `{N}` at the end of a line: N bytes of literal follow.
            let literal = std::str::from_utf8(&buf)
                .ok()
                .and_then(|l| l.trim_end().strip_suffix('}'))
                .and_then(|l| l.rsplit_once('{'))
                .and_then(|(_, n)| n.parse::<usize>().ok());
            out.extend_from_slice(&buf);
            if let Some(n) = literal {
                let mut lit = vec![0; n];
                self.r.read_exact(&mut lit).expect("read the literal");
                out.extend_from_slice(&lit);
            }
        }
    }
}

#[test]
fn dovecot_serves_over_pop3_and_imap_the_maildir_mxspool_delivered() {
    let (user, uid, _, gid) = mail_user();
    let port = closed_port_at(MX_IP);
    let mut env = MxEnv::host(
        "mail-server.inst.test",
        MX_IP,
        port,
        &format!(
            "[queue]\nretry_interval = \"1h\"\n\n\
             [[local]]\ndomain = \"inst.test\"\nmaildir = \"{{dir}}/mail/{{domain}}/{{user}}\"\n\
             users = \"inst.users\"\nowner = \"{user}\"\n"
        ),
    );
    fs::write(env.dir.path().join("inst.users"), "ana\nbruno\n").unwrap();
    let mail = env.dir.path().join("mail");
    fs::create_dir(&mail).unwrap();
    std::os::unix::fs::chown(&mail, Some(uid), Some(gid)).unwrap();
    let server = env.start();

    // A body with a line that starts with a dot (stuffed in SMTP and again in POP3) and
    // 8-bit text.
    let body = "Olá Ana,\r\n.a line that starts with a dot\r\n..and two\r\n\r\nthe end\r\n";
    let message = format!(
        "From: Bruno <bruno@outside.test>\r\nTo: ana@inst.test\r\nSubject: fetched by POP3\r\n\
         Message-ID: <pop3-test@outside.test>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{body}"
    );
    smtp_send(
        &env.addr(),
        "bruno@outside.test",
        &["Ana+pop@inst.test"],
        message.as_bytes(),
    );
    let maildir = mail.join("inst.test/ana");
    assert!(
        wait_for(Duration::from_secs(20), Duration::from_millis(50), || {
            maildir_files(&maildir).len() == 1
        }),
        "mxspool did not deliver to {}:\n{}",
        maildir.display(),
        server.log()
    );
    let (path, file) = maildir_files(&maildir).remove(0);
    {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(&path).unwrap();
        assert_eq!(
            (m.uid(), m.gid()),
            (uid, gid),
            "{} not the owner's",
            path.display()
        );
    }
    let expected = String::from_utf8(file)
        .unwrap()
        .replace('\n', "\r\n")
        .into_bytes();
    assert!(
        expected.ends_with(body.as_bytes()),
        "{}",
        String::from_utf8_lossy(&expected)
    );

    // The users file in contrib's format; `ana` logs in without a domain (the realm).
    let pop = PopServer::start(
        &mail,
        "inst.test",
        &format!("ana@inst.test:{{PLAIN}}{PASSWORD}::::::\nbruno@inst.test:{{PLAIN}}other::::::\n"),
    );

    // POP3: USER/PASS, STAT, LIST, RETR 1 is exactly the file mxspool wrote.
    let (mut c, greeting) = Client::connect(pop.pop3_port);
    assert!(greeting.starts_with("+OK"), "{greeting}");
    c.pop_ok("USER ana");
    c.send(&format!("PASS {PASSWORD}"));
    let r = c.line();
    assert!(r.starts_with("+OK"), "PASS: {r}\n{}", pop.log());
    let stat = c.pop_ok("STAT");
    assert_eq!(
        stat.trim_end(),
        format!("+OK 1 {}", expected.len()),
        "STAT counts the message in CRLF octets"
    );
    c.pop_ok("RETR 1");
    let got = c.pop_multiline();
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&expected),
        "RETR 1 differs from the Maildir file"
    );
    assert!(
        got.windows(b"Subject: fetched by POP3\r\n".len())
            .any(|w| w == b"Subject: fetched by POP3\r\n"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    c.pop_ok("QUIT");

    // A wrong password is refused.
    let (mut bad, _) = Client::connect(pop.pop3_port);
    bad.pop_ok("USER ana");
    bad.send("PASS wrong");
    let r = bad.line();
    assert!(r.starts_with("-ERR"), "a wrong password: {r}");

    // IMAP: the same message in INBOX, the same bytes.
    let (mut i, greeting) = Client::connect(pop.imap_port);
    assert!(greeting.starts_with("* OK"), "{greeting}");
    i.imap("a1", &format!("LOGIN ana@inst.test {PASSWORD}"));
    let select = String::from_utf8_lossy(&i.imap("a2", "SELECT INBOX")).into_owned();
    assert!(select.contains("* 1 EXISTS"), "{select}");
    let fetched = i.imap("a3", "FETCH 1 BODY.PEEK[]");
    assert!(
        fetched.ends_with(format!("{})\r\n", String::from_utf8_lossy(&expected)).as_bytes()),
        "FETCH BODY[] differs from the Maildir file:\n{}",
        String::from_utf8_lossy(&fetched)
    );
    i.imap("a4", "LOGOUT");

    // Dovecot took the message from new/ into cur/, as the mail user: the Maildir stays
    // the owner's, so mxspool keeps delivering into it.
    assert!(
        fs::read_dir(maildir.join("new")).unwrap().next().is_none(),
        "new/ not emptied by Dovecot"
    );
    smtp_send(
        &env.addr(),
        "bruno@outside.test",
        &["ana@inst.test"],
        b"Subject: second\r\n\r\nagain\r\n",
    );
    assert!(
        wait_for(Duration::from_secs(20), Duration::from_millis(50), || {
            maildir_files(&maildir).len() == 2
        }),
        "second delivery after Dovecot read the Maildir:\n{}",
        server.log()
    );
    let (mut c, _) = Client::connect(pop.pop3_port);
    c.pop_ok("USER ana");
    c.pop_ok(&format!("PASS {PASSWORD}"));
    let stat = c.pop_ok("STAT");
    assert!(stat.starts_with("+OK 2 "), "{stat}");
    c.pop_ok("QUIT");
    drop(server);
}
