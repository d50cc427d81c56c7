//! A small blocking SMTP client (std::net) for `replay --smtp`: one connection, one
//! transaction per message, the original envelope with the parameters the server offers.

use std::fmt::{self, Write as _};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use spool_tools::{ArchivedEnvelope, BodyType, MessageBytes, Ret};

use crate::lines::{Lines, SMTP};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const IO_TIMEOUT: Duration = Duration::from_secs(300);
/// The longest reply line we read; longer is a protocol error.
const MAX_LINE: u64 = 64 * 1024;

/// One SMTP reply: the code and the text of each line (without the code).
#[derive(Clone, Debug)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    fn positive(&self) -> bool {
        (200..400).contains(&self.code)
    }

    /// A reply made up here, for a refusal decided before sending.
    fn local(code: u16, text: &str) -> Reply {
        Reply {
            code,
            lines: vec![text.to_string()],
        }
    }
}

impl fmt::Display for Reply {
    /// The code and the last line's text: `250 2.0.0 Ok: queued as X`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.lines.last().filter(|l| !l.is_empty()) {
            Some(text) => write!(f, "{} {}", self.code, text),
            None => write!(f, "{}", self.code),
        }
    }
}

/// Why the connection is unusable.
#[derive(Debug)]
pub enum ConnError {
    Io(io::Error),
    /// The server closed the session (greeting refused, 421, or a garbled reply).
    Server(String),
    /// The message could not be read (the archive changed): the connection was left in
    /// the middle of DATA, without the final dot, and is not usable.
    Message(io::Error),
}

impl fmt::Display for ConnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnError::Io(e) => write!(f, "{e}"),
            ConnError::Server(s) => write!(f, "{s}"),
            ConnError::Message(e) => write!(f, "reading the message: {e}"),
        }
    }
}

impl From<io::Error> for ConnError {
    fn from(e: io::Error) -> Self {
        ConnError::Io(e)
    }
}

/// What became of one message.
pub enum Outcome {
    /// The server took the message (`reply` is the answer to the final dot) for every
    /// recipient except those in `refused`.
    Sent {
        reply: Reply,
        refused: Vec<(String, Reply)>,
    },
    /// The server refused the transaction at `stage`.
    Refused {
        stage: &'static str,
        reply: Reply,
        refused: Vec<(String, Reply)>,
    },
}

#[derive(Default, Debug)]
struct Extensions {
    eight_bit_mime: bool,
    smtputf8: bool,
    dsn: bool,
    size: bool,
}

pub struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    ext: Extensions,
}

impl Client {
    /// Connects to `addr` (`host:port`), reads the greeting, says EHLO (HELO if refused).
    pub fn connect(addr: &str, helo: &str) -> Result<Client, ConnError> {
        let mut last = None;
        let mut stream = None;
        for a in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let stream = match (stream, last) {
            (Some(s), _) => s,
            (None, Some(e)) => return Err(e.into()),
            (None, None) => return Err(ConnError::Server(format!("{addr}: no address"))),
        };
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        let mut c = Client {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            ext: Extensions::default(),
        };
        let greeting = c.read_reply()?;
        if greeting.code != 220 {
            return Err(ConnError::Server(format!("greeting: {greeting}")));
        }
        let ehlo = c.command(&format!("EHLO {helo}"))?;
        if ehlo.code == 250 {
            c.ext = parse_ehlo(&ehlo);
        } else {
            let r = c.command(&format!("HELO {helo}"))?;
            if r.code != 250 {
                return Err(ConnError::Server(format!("HELO refused: {r}")));
            }
        }
        Ok(c)
    }

    /// One transaction: MAIL, RCPT for each pending recipient, DATA with the message sent
    /// chunk by chunk as it is read. A refusal leaves the connection usable (after RSET);
    /// an `Err` means it is not.
    pub fn send(
        &mut self,
        env: &ArchivedEnvelope,
        message: &mut MessageBytes<'_>,
    ) -> Result<Outcome, ConnError> {
        let pending: Vec<_> = env.pending().collect();
        let needs_utf8 = !env.sender.is_ascii() || pending.iter().any(|r| !r.address.is_ascii());
        if needs_utf8 && !self.ext.smtputf8 {
            return Ok(Outcome::Refused {
                stage: "MAIL",
                reply: Reply::local(
                    550,
                    "5.6.7 the addresses need SMTPUTF8, which the server does not offer",
                ),
                refused: Vec::new(),
            });
        }

        let mail = self.mail_command(env, message.size());
        let r = self.command(&mail)?;
        if !r.positive() {
            self.rset()?;
            return Ok(Outcome::Refused {
                stage: "MAIL",
                reply: r,
                refused: Vec::new(),
            });
        }

        let mut refused = Vec::new();
        let mut accepted = 0;
        for rcpt in &pending {
            let mut cmd = format!("RCPT TO:<{}>", rcpt.address);
            if self.ext.dsn {
                if let Some(n) = rcpt.notify.as_ref().and_then(|n| n.to_param()) {
                    let _ = write!(cmd, " NOTIFY={n}");
                }
                if let Some(orcpt) = &rcpt.orcpt {
                    let (kind, addr) = orcpt.split_once(';').unwrap_or(("rfc822", orcpt));
                    let _ = write!(cmd, " ORCPT={};{}", kind.trim(), xtext(addr.trim()));
                }
            }
            let r = self.command(&cmd)?;
            if r.positive() {
                accepted += 1;
            } else {
                refused.push((rcpt.address.clone(), r));
            }
        }
        if accepted == 0 {
            self.rset()?;
            let reply = refused
                .last()
                .map(|(_, r)| r.clone())
                .unwrap_or_else(|| Reply::local(554, "no pending recipients"));
            return Ok(Outcome::Refused {
                stage: "RCPT",
                reply,
                refused,
            });
        }

        let r = self.command("DATA")?;
        if r.code != 354 {
            self.rset()?;
            return Ok(Outcome::Refused {
                stage: "DATA",
                reply: r,
                refused,
            });
        }
        let mut data = Lines::new(io::BufWriter::new(&mut self.writer), SMTP);
        while let Some(chunk) = message.next_chunk().map_err(ConnError::Message)? {
            data.write(chunk)?;
        }
        let mut data = data.finish()?;
        data.write_all(b".\r\n")?;
        data.flush()?;
        drop(data);
        let r = self.read_reply()?;
        if r.code == 421 {
            return Err(ConnError::Server(format!("after the message: {r}")));
        }
        Ok(if r.positive() {
            Outcome::Sent { reply: r, refused }
        } else {
            Outcome::Refused {
                stage: "end of data",
                reply: r,
                refused,
            }
        })
    }

    /// QUIT; errors do not matter any more.
    pub fn quit(mut self) {
        let _ = self.command("QUIT");
    }

    fn mail_command(&self, env: &ArchivedEnvelope, size: u64) -> String {
        let mut s = format!("MAIL FROM:<{}>", env.sender);
        if self.ext.size {
            let _ = write!(s, " SIZE={size}");
        }
        if env.body == BodyType::EightBitMime && self.ext.eight_bit_mime {
            s.push_str(" BODY=8BITMIME");
        }
        if env.smtputf8 && self.ext.smtputf8 {
            s.push_str(" SMTPUTF8");
        }
        if self.ext.dsn {
            match env.dsn.ret {
                Some(Ret::Full) => s.push_str(" RET=FULL"),
                Some(Ret::Hdrs) => s.push_str(" RET=HDRS"),
                None => {}
            }
            if let Some(envid) = &env.dsn.envid {
                let _ = write!(s, " ENVID={}", xtext(envid));
            }
        }
        s
    }

    fn rset(&mut self) -> Result<(), ConnError> {
        self.command("RSET").map(drop)
    }

    /// Sends one command line, reads its reply; 421 ends the session.
    fn command(&mut self, line: &str) -> Result<Reply, ConnError> {
        self.writer.write_all(format!("{line}\r\n").as_bytes())?;
        self.writer.flush()?;
        let r = self.read_reply()?;
        if r.code == 421 {
            let verb = line.split(' ').next().unwrap_or(line);
            return Err(ConnError::Server(format!("{verb}: {r}")));
        }
        Ok(r)
    }

    fn read_reply(&mut self) -> Result<Reply, ConnError> {
        let mut lines = Vec::new();
        loop {
            let mut raw = Vec::new();
            (&mut self.reader)
                .take(MAX_LINE)
                .read_until(b'\n', &mut raw)?;
            if raw.is_empty() {
                return Err(ConnError::Server("the server closed the connection".into()));
            }
            if raw.last() != Some(&b'\n') {
                return Err(ConnError::Server("reply line too long or cut".into()));
            }
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\r', '\n']);
            let bytes = line.as_bytes();
            let code = line
                .get(..3)
                .filter(|c| c.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|c| c.parse::<u16>().ok())
                .ok_or_else(|| ConnError::Server(format!("garbled reply {line:?}")))?;
            let more = bytes.get(3) == Some(&b'-');
            lines.push(line.get(4..).unwrap_or("").to_string());
            if !more {
                return Ok(Reply { code, lines });
            }
        }
    }
}

fn parse_ehlo(r: &Reply) -> Extensions {
    let mut ext = Extensions::default();
    for line in r.lines.iter().skip(1) {
        let keyword = line
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_uppercase();
        match keyword.as_str() {
            "8BITMIME" => ext.eight_bit_mime = true,
            "SMTPUTF8" => ext.smtputf8 = true,
            "DSN" => ext.dsn = true,
            "SIZE" => ext.size = true,
            _ => {}
        }
    }
    ext
}

/// RFC 3461 xtext: printable ASCII except `+` and `=` as is, the rest as `+HH`.
pub fn xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (33..=126).contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            let _ = write!(out, "+{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xtext_encodes_plus_equals_and_non_printables() {
        assert_eq!(xtext("a+b=c d\u{e9}"), "a+2Bb+3Dc+20d+C3+A9");
    }
}
