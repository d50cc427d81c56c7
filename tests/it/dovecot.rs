//! A private Dovecot LMTP server for the tests: `dovecot -F -c CONF` with everything (config,
//! base_dir, state, log, Maildirs) in one temp dir, an LMTP listener on
//! `127.0.20.1:PORT` and one on a Unix socket in the temp dir. Killed on drop.
//!
//! Any user is accepted (a static userdb), except [`UNKNOWN_USER`] (refused at RCPT, 550
//! 5.1.1) and [`FULL_USER`] (a 1 KiB quota: a larger message is refused after the final
//! dot, 552 5.2.2). Mail goes to `TMP/mail/DOMAIN/USER` (Maildir, Dovecot's `%d/%n`, lower
//! case, the `+detail` cut off).
//!
//! Dovecot refuses to deliver as uid 0, so when the tests run as root (in CI) the Maildirs
//! belong to `nobody` (65534:65534); otherwise to the user running the tests.
//!
//! Needs Debian's `dovecot-lmtpd` (which brings `dovecot-core`); without it the test fails.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::harness::{
    closed_port_at, group_name, maildir_files, public_tempdir, tool, user_name, wait_for,
};

/// The address the LMTP TCP listener is bound to.
pub const LMTP_IP: &str = "127.0.20.1";
/// Refused at RCPT: `550 5.1.1 <nosuchuser@example.org> User doesn't exist`.
pub const UNKNOWN_USER: &str = "nosuchuser@example.org";
/// Has a 1 KiB quota: a larger message is refused after DATA with `552 5.2.2`.
pub const FULL_USER: &str = "full@example.org";

/// The uid and gid of `nobody` on Debian.
const NOBODY: (u32, u32) = (65534, 65534);

pub struct Dovecot {
    dir: TempDir,
    child: Option<Child>,
    port: u16,
}

impl Dovecot {
    /// Writes the configuration and starts Dovecot; returns once both listeners answer.
    /// Panics (with the log) if Dovecot is missing or does not come up within 30 s.
    pub fn start() -> Dovecot {
        let bin = tool("dovecot");
        if !bin.is_file() {
            panic!(
                "dovecot is not installed (Debian: apt-get install dovecot-lmtpd); \
                 the LMTP tests need a real LMTP server"
            );
        }
        let dir = public_tempdir("mxspool-dovecot.");
        let root = dir.path().to_path_buf();
        // SAFETY: plain syscalls without arguments.
        let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let (mail_uid, mail_gid) = if euid == 0 { NOBODY } else { (euid, egid) };
        let internal_user = user_name(euid);
        for d in ["run", "state", "mail", "home"] {
            let p = root.join(d);
            fs::create_dir(&p).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        }
        for d in ["mail", "home"] {
            std::os::unix::fs::chown(root.join(d), Some(mail_uid), Some(mail_gid))
                .expect("chown the mail directories");
        }
        fs::write(
            root.join("refused-users"),
            format!("{UNKNOWN_USER}:::::::\n"),
        )
        .unwrap();
        fs::write(
            root.join("users"),
            format!("{FULL_USER}:::::::userdb_quota_rule=*:storage=1K\n"),
        )
        .unwrap();

        let port = closed_port_at(LMTP_IP);
        let conf = format!(
            "# mxspool test instance
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
instance_name = mxspool-test-{port}
protocols = lmtp
listen = {LMTP_IP}
ssl = no
default_login_user = {internal_user}
default_internal_user = {internal_user}
default_internal_group = {internal_group}
first_valid_uid = {mail_uid}
first_valid_gid = {mail_gid}
mail_location = maildir:{root}/mail/%d/%n
mail_plugins = $mail_plugins quota
lmtp_save_to_detail_mailbox = no
plugin {{
  quota = maildir:User quota
}}
passdb {{
  driver = static
  args = nopassword=y
}}
# Listed users do not exist (a successful lookup here is a failure).
userdb {{
  driver = passwd-file
  args = username_format=%u {root}/refused-users
  result_success = return-fail
}}
# Users with special settings (a tiny quota).
userdb {{
  driver = passwd-file
  args = username_format=%u {root}/users
  default_fields = uid={mail_uid} gid={mail_gid} home={root}/home/%d/%n
}}
# Everyone else.
userdb {{
  driver = static
  args = uid={mail_uid} gid={mail_gid} home={root}/home/%d/%n allow_all_users=yes
}}
service lmtp {{
  inet_listener lmtp {{
    address = {LMTP_IP}
    port = {port}
  }}
  unix_listener {socket} {{
    mode = 0666
  }}
}}
service anvil {{
  chroot =
}}
",
            root = root.display(),
            internal_group = group_name(if euid == 0 { 0 } else { egid }),
            socket = root.join("lmtp.sock").display(),
        );
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
        let mut d = Dovecot {
            dir,
            child: Some(child),
            port,
        };
        d.wait_ready();
        d
    }

    /// Until both listeners greet; panics after 30 s or when Dovecot exits.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr: SocketAddr = self.lmtp_addr().parse().unwrap();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!("dovecot exited at start ({status}):\n{}", self.log());
            }
            let limit = Some(Duration::from_secs(2));
            let tcp = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                .ok()
                .filter(|s| s.set_read_timeout(limit).is_ok())
                .is_some_and(greets);
            let unix = tcp
                && std::os::unix::net::UnixStream::connect(self.lmtp_socket())
                    .ok()
                    .filter(|s| s.set_read_timeout(limit).is_ok())
                    .is_some_and(greets);
            if unix {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "dovecot did not answer on {addr} within 30 s:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `127.0.20.1:PORT`.
    pub fn lmtp_addr(&self) -> String {
        format!("{LMTP_IP}:{}", self.port)
    }

    /// The Unix socket of the LMTP listener.
    pub fn lmtp_socket(&self) -> PathBuf {
        self.dir.path().join("lmtp.sock")
    }

    /// The Maildir of `user@domain` (lower case, without `+detail`).
    pub fn maildir(&self, domain: &str, user: &str) -> PathBuf {
        self.dir.path().join("mail").join(domain).join(user)
    }

    /// The messages in the Maildir of `user@domain` (see [`maildir_files`]).
    pub fn messages(&self, domain: &str, user: &str) -> Vec<Vec<u8>> {
        maildir_files(&self.maildir(domain, user))
            .into_iter()
            .map(|(_, bytes)| bytes)
            .collect()
    }

    /// Dovecot's log and what it wrote to stdout/stderr.
    pub fn log(&self) -> String {
        let read = |name: &str| fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        format!("{}{}", read("dovecot.log"), read("stderr"))
    }

    /// SIGTERM, then (after 10 s) SIGKILL; waits for the master in both cases.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = child.id() as i32;
        // SAFETY: plain syscall on the pid of the child we started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let gone = wait_for(Duration::from_secs(10), Duration::from_millis(50), || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        if !gone {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether the stream's first line (read with the stream's timeout) is a `220` greeting;
/// then says QUIT.
fn greets<S: std::io::Read + Write>(mut s: S) -> bool {
    let mut line = String::new();
    {
        let mut r = BufReader::new(&mut s);
        if r.read_line(&mut line).is_err() {
            return false;
        }
    }
    let _ = s.write_all(b"QUIT\r\n");
    line.starts_with("220")
}
