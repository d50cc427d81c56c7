//! The outbound SMTP client (RFC 5321): one [`Connection`] to one next hop, over which the
//! scheduler sends one message after another. The same client speaks LMTP (RFC 2033) to a
//! local delivery agent over TCP or a Unix socket ([`Connection::connect_lmtp`]): LHLO
//! instead of EHLO, and after the final dot one reply per accepted recipient.
//!
//! Extensions used when offered: PIPELINING (RFC 2920: MAIL, every RCPT and DATA go out in
//! one write), SIZE (RFC 1870), 8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531), DSN (RFC 3461).
//! Replies are framed by our own small parser because every line goes to the transcript and
//! the EHLO lines are needed one by one; [`Reply::parse`] is its pure entry point.
//!
//! Invariants: a [`Connection`] owns one read buffer for its whole life, so bytes that arrive
//! behind a reply (the next pipelined reply) are never lost; every read and write has the
//! stage's timeout (RFC 5321 4.5.3.2); `send` settles every recipient or returns an error,
//! after which the connection is unusable.

use crate::spool::Message;
use std::fmt::{self, Write as _};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::{timeout, timeout_at, Instant};

use super::{Reply, Transcript};
use crate::envelope::{Body, Envelope, Notify, Recipient, Ret};
use crate::tls::client::{Connectors, TlsPolicy, Verified};
use crate::tls::TlsInfo;

/// A reply longer than this (all lines) is a protocol error.
const MAX_REPLY: usize = 64 * 1024;
/// The message body is written in pieces of about this size.
const BODY_CHUNK: usize = 64 * 1024;
/// QUIT waits at most this long for its 221 (or the `other` timeout, if shorter).
const QUIT_WAIT: Duration = Duration::from_secs(10);

/// How long to wait for each reply (RFC 5321 4.5.3.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub greeting: Duration,
    pub mail: Duration,
    pub rcpt: Duration,
    pub data_init: Duration,
    /// For each write of the message body.
    pub data_block: Duration,
    /// For the reply to the final dot.
    pub data_term: Duration,
    /// EHLO, HELO, RSET, QUIT.
    pub other: Duration,
}

impl Timeouts {
    /// The same limit for every step (tests, short-lived peers).
    pub fn all(t: Duration) -> Timeouts {
        Timeouts {
            greeting: t,
            mail: t,
            rcpt: t,
            data_init: t,
            data_block: t,
            data_term: t,
            other: t,
        }
    }
}

impl Default for Timeouts {
    fn default() -> Self {
        let min = |m: u64| Duration::from_secs(60 * m);
        Timeouts {
            greeting: min(5),
            mail: min(5),
            rcpt: min(5),
            data_init: min(2),
            data_block: min(3),
            data_term: min(10),
            other: min(5),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The name we give in EHLO/HELO.
    pub helo_name: String,
    pub connect_timeout: Duration,
    pub timeouts: Timeouts,
    /// The local address TCP connections come from (`[delivery] bind_address`).
    pub bind: Option<std::net::IpAddr>,
    /// The STARTTLS policy of this connection (`[delivery] tls`, a partner's `tls`).
    pub tls: TlsPolicy,
    /// The TLS client configurations; without them no STARTTLS is tried (and `encrypt`
    /// or `verify` fail).
    pub tls_connectors: Option<std::sync::Arc<Connectors>>,
    /// The usable DNSSEC-secure TLSA records of the host this connection goes to
    /// ([`crate::tls::dane`]): STARTTLS is then mandatory whatever `tls` says, and the
    /// certificate must match one of them.
    pub dane: Option<std::sync::Arc<Vec<crate::tls::dane::Tlsa>>>,
}

impl ClientConfig {
    /// RFC 5321 timeouts and a 30 s connect timeout.
    pub fn new(helo_name: impl Into<String>) -> ClientConfig {
        ClientConfig {
            helo_name: helo_name.into(),
            connect_timeout: Duration::from_secs(30),
            timeouts: Timeouts::default(),
            bind: None,
            tls: TlsPolicy::None,
            tls_connectors: None,
            dane: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect failed: {0}")]
    Connect(io::Error),
    #[error("I/O error: {0}")]
    Io(io::Error),
    #[error("timeout waiting for {0}")]
    Timeout(&'static str),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("greeting refused: {0}")]
    Greeting(Reply),
    #[error("EHLO and HELO refused: {0}")]
    Hello(Reply),
    #[error("LHLO refused: {0}")]
    Lhlo(Reply),
    /// The message could not be read from the spool while it was being sent.
    #[error("cannot read the message from the spool: {0}")]
    Spool(String),
    /// The TLS policy cannot be met (STARTTLS not offered or refused, a certificate that
    /// does not verify): a temporary failure, never a bounce.
    #[error("{0}")]
    TlsPolicy(String),
    /// The TLS handshake failed (under `may`, tried again in clear).
    #[error("{0}")]
    TlsHandshake(String),
}

impl ClientError {
    /// The status of a deferral for this error: `4.7.5` (a cryptographic failure, RFC 3463)
    /// when the TLS policy cannot be met, else `4.4.1` (no answer from host).
    pub fn dsn_status(&self) -> &'static str {
        match self {
            ClientError::TlsPolicy(_) | ClientError::TlsHandshake(_) => "4.7.5",
            _ => "4.4.1",
        }
    }

    /// A 5xx banner or HELO refusal: this host will not take mail from us (the recipients
    /// may still go to the next MX host).
    pub fn is_permanent(&self) -> bool {
        match self {
            ClientError::Greeting(r) | ClientError::Hello(r) | ClientError::Lhlo(r) => {
                r.is_permanent()
            }
            _ => false,
        }
    }
}

/// What the server offered in its EHLO reply.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extensions {
    /// The server answered EHLO; false after a fallback to HELO (then nothing else is set).
    pub esmtp: bool,
    pub pipelining: bool,
    /// SIZE (RFC 1870) with its limit; `Some(0)` when offered without one.
    pub size: Option<u64>,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
    pub dsn: bool,
    pub enhanced_status_codes: bool,
    /// STARTTLS (RFC 3207).
    pub starttls: bool,
}

impl Extensions {
    /// From the lines of a 250 EHLO reply (the first line is the server's name).
    fn from_ehlo(lines: &[String]) -> Extensions {
        let mut ext = Extensions {
            esmtp: true,
            ..Extensions::default()
        };
        for line in lines.iter().skip(1) {
            let mut words = line.get(4..).unwrap_or("").split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => ext.pipelining = true,
                "SIZE" => ext.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => ext.eight_bit_mime = true,
                "SMTPUTF8" => ext.smtputf8 = true,
                "DSN" => ext.dsn = true,
                "ENHANCEDSTATUSCODES" => ext.enhanced_status_codes = true,
                "STARTTLS" => ext.starttls = true,
                _ => {}
            }
        }
        ext
    }
}

/// One message to send now.
#[derive(Clone, Copy, Debug)]
pub struct Outgoing<'a> {
    pub envelope: &'a Envelope,
    /// The recipients to send to now (a subset of the envelope's).
    pub recipients: &'a [Recipient],
    /// The raw RFC 5322 message, CRLF line ends (read part by part as it is sent).
    pub message: &'a Message,
}

/// The outcome for one recipient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RcptResult {
    /// The server took responsibility for the message.
    Sent(Reply),
    /// 4xx: try again later.
    Deferred(Reply),
    /// 5xx: bounce.
    Failed(Reply),
    /// Not handed over, and nothing is known against sending it again at once: the session
    /// ended before the final dot (a `421`, a lost connection, a timeout, the server's cap
    /// of messages per session), or the server wants fewer recipients per transaction
    /// (`452 4.5.3`). The reply says why. Not an attempt: the caller sends it again, on this
    /// session if it is still usable, else on a new one.
    Unsent(Reply),
}

impl RcptResult {
    /// Sent for 2xx, Failed for 5xx, Unsent for a `421` (the server is closing the session
    /// and has taken nothing), Deferred for anything else.
    fn from_reply(reply: Reply) -> RcptResult {
        match reply.code / 100 {
            _ if reply.code == 421 => RcptResult::Unsent(reply),
            2 => RcptResult::Sent(reply),
            5 => RcptResult::Failed(reply),
            _ => RcptResult::Deferred(reply),
        }
    }

    pub fn reply(&self) -> &Reply {
        match self {
            RcptResult::Sent(r)
            | RcptResult::Deferred(r)
            | RcptResult::Failed(r)
            | RcptResult::Unsent(r) => r,
        }
    }
}

/// Where an LMTP server listens: a Unix socket or a TCP address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LmtpTarget {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl LmtpTarget {
    /// `/path/to/socket` (an absolute path: a Unix socket), `ip:port` or `[ipv6]:port`.
    /// Postfix's `unix:` and `inet:` prefixes are accepted too. Host names are not: the
    /// target must not depend on DNS.
    pub fn parse(s: &str) -> Result<LmtpTarget, String> {
        let t = s.trim();
        let bad = || {
            format!(
                "bad LMTP target {s:?}: expected a Unix socket path (/path/to/socket), \
                 ip:port or [ipv6]:port"
            )
        };
        if let Some(path) = t.strip_prefix("unix:") {
            return match path.starts_with('/') {
                true => Ok(LmtpTarget::Unix(PathBuf::from(path))),
                false => Err(bad()),
            };
        }
        if t.starts_with('/') {
            return Ok(LmtpTarget::Unix(PathBuf::from(t)));
        }
        let addr = t.strip_prefix("inet:").unwrap_or(t);
        match addr.parse::<SocketAddr>() {
            Ok(a) if a.port() != 0 => Ok(LmtpTarget::Tcp(a)),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for LmtpTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LmtpTarget::Tcp(a) => write!(f, "{a}"),
            LmtpTarget::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// The transport under a [`Connection`]. An enum rather than a boxed trait object: the
/// SMTP path keeps its direct calls on a `TcpStream`.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// After STARTTLS.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.write_all(bytes).await,
            Stream::Unix(s) => s.write_all(bytes).await,
            Stream::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
        }
    }

    async fn read_buf(&mut self, buf: &mut Vec<u8>) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read_buf(buf).await,
            Stream::Unix(s) => s.read_buf(buf).await,
            Stream::Tls(s) => s.read_buf(buf).await,
        }
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown().await,
            Stream::Unix(s) => s.shutdown().await,
            Stream::Tls(s) => s.shutdown().await,
        }
    }
}

/// A connection attempt within the configured connect timeout.
async fn dial<S>(
    cfg: &ClientConfig,
    connecting: impl std::future::Future<Output = io::Result<S>>,
) -> Result<S, ClientError> {
    match timeout(cfg.connect_timeout, connecting).await {
        Err(_) => Err(ClientError::Timeout("connect")),
        Ok(Err(e)) => Err(ClientError::Connect(e)),
        Ok(Ok(s)) => Ok(s),
    }
}

/// Which protocol a [`Connection`] speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    Smtp,
    Lmtp,
}

/// An SMTP connection after a successful EHLO/HELO, or an LMTP connection after LHLO.
pub struct Connection {
    stream: Stream,
    protocol: Protocol,
    /// Received bytes not yet consumed by a reply; kept across replies.
    buf: Vec<u8>,
    /// The TCP peer; `0.0.0.0:0` over a Unix socket.
    peer: SocketAddr,
    /// The Unix socket's path, for a connection over one.
    socket: Option<PathBuf>,
    host_name: String,
    ext: Extensions,
    timeouts: Timeouts,
    transcript: Option<Transcript>,
    /// MAIL was accepted and no final dot ended the transaction: RSET before the next MAIL.
    in_transaction: bool,
    /// An I/O error, a timeout, a garbled reply or a 421: nothing more can be said.
    broken: bool,
    /// Transactions this session brought to a reply after the final dot.
    completed: u32,
    /// The TLS session after STARTTLS, and how the certificate was checked.
    tls: Option<(TlsInfo, Verified)>,
}

/// A TCP connection to `addr`, from `bind` when given (any port).
async fn tcp_connect(addr: SocketAddr, bind: Option<std::net::IpAddr>) -> io::Result<TcpStream> {
    let Some(ip) = bind else {
        return TcpStream::connect(addr).await;
    };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(ip, 0))?;
    socket.connect(addr).await
}

impl Connection {
    /// Connects, reads the greeting and says EHLO (HELO if EHLO is refused with 5xx), then
    /// STARTTLS and EHLO again as `cfg.tls` says. Under `may` a failed handshake is tried
    /// again in clear on a new connection, as Postfix does.
    pub async fn connect(
        addr: SocketAddr,
        host_name: &str,
        cfg: &ClientConfig,
        transcript: Option<Transcript>,
    ) -> Result<Connection, ClientError> {
        match Connection::connect_with(addr, host_name, cfg, cfg.tls, transcript.clone()).await {
            Err(ClientError::TlsHandshake(e))
                if cfg.tls == TlsPolicy::May && cfg.dane.is_none() =>
            {
                let why = format!(
                    "{e}; trying {host_name}[{}]:{} again without TLS",
                    addr.ip(),
                    addr.port()
                );
                tracing::warn!("{why}");
                if let Some(t) = &transcript {
                    t(&why);
                }
                Connection::connect_with(addr, host_name, cfg, TlsPolicy::None, transcript).await
            }
            other => other,
        }
    }

    async fn connect_with(
        addr: SocketAddr,
        host_name: &str,
        cfg: &ClientConfig,
        tls: TlsPolicy,
        transcript: Option<Transcript>,
    ) -> Result<Connection, ClientError> {
        let stream = dial(cfg, tcp_connect(addr, cfg.bind)).await?;
        // We batch our own writes; Nagle would only delay the last piece of each.
        let _ = stream.set_nodelay(true);
        let c = Connection::new(Stream::Tcp(stream), Protocol::Smtp, cfg, transcript)
            .with_peer(addr, host_name);
        c.trace(
            "",
            &format!("connected to {}, waiting for the greeting", c.relay()),
        );
        c.hello(cfg).await?.starttls(cfg, tls).await
    }

    /// STARTTLS after EHLO as `policy` says, then EHLO again (RFC 3207 4.2).
    async fn starttls(
        mut self,
        cfg: &ClientConfig,
        policy: TlsPolicy,
    ) -> Result<Connection, ClientError> {
        let dane = cfg.dane.clone();
        if policy == TlsPolicy::None && dane.is_none() {
            return Ok(self);
        }
        let relay = self.relay();
        // DANE makes TLS mandatory whatever the policy (RFC 7672 2.2).
        let optional = policy.allows_clear() && dane.is_none();
        let why_required = match &dane {
            Some(_) => format!(
                "DANE: the host has DNSSEC-secure TLSA records at {}",
                crate::tls::dane::tlsa_name(&self.host_name, self.peer.port())
            ),
            None => format!("tls = \"{policy}\""),
        };
        let connectors = match (&cfg.tls_connectors, self.ext.starttls) {
            (Some(c), true) => c.clone(),
            _ if optional => return Ok(self),
            (None, _) => {
                self.say_quit().await;
                return Err(ClientError::TlsPolicy(format!(
                    "TLS is required ({why_required}), but no TLS client is configured"
                )));
            }
            (Some(_), false) => {
                self.say_quit().await;
                return Err(ClientError::TlsPolicy(format!(
                    "TLS is required ({why_required}), but was not offered by host {relay}"
                )));
            }
        };
        let other = self.timeouts.other;
        let (reply, _) = self.command("STARTTLS", "STARTTLS", other).await?;
        if reply.code != 220 {
            if optional && !self.broken {
                self.trace(
                    "",
                    &format!("STARTTLS refused by {relay}; going on in clear"),
                );
                return Ok(self);
            }
            self.say_quit().await;
            return Err(ClientError::TlsPolicy(format!(
                "TLS is required ({why_required}), but host {relay} refused STARTTLS: {reply}"
            )));
        }
        // Whatever came in clear behind the 220 is not the server's word over TLS.
        self.buf.clear();
        let (connector, verified, dane_verifier) = match &dane {
            Some(records) => {
                let (c, v) = crate::tls::dane::connector(records.clone())
                    .map_err(|e| ClientError::TlsPolicy(format!("DANE: {e}")))?;
                (c, Verified::Dane, Some(v))
            }
            None => {
                let (c, v) = connectors.for_policy(policy);
                (c.clone(), v, None)
            }
        };
        let name = crate::tls::client::server_name(&self.host_name, self.peer.ip());
        let Stream::Tcp(tcp) = self.stream else {
            return Err(ClientError::Protocol(
                "STARTTLS needs a TCP connection".into(),
            ));
        };
        let tls = match timeout(other, connector.connect(name, tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                let why = format!("TLS handshake with {relay} failed: {e}");
                if let Some(t) = &self.transcript {
                    t(&why);
                }
                let certificate = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .is_some_and(|r| {
                        matches!(
                            r,
                            rustls::Error::InvalidCertificate(_)
                                | rustls::Error::NoCertificatesPresented
                        )
                    });
                if let Some(v) = &dane_verifier {
                    // Never in clear, never a bounce: a deferral (RFC 7672 2.2).
                    let why = match v.failure() {
                        Some(f) => format!("{why}: {f}"),
                        None => why,
                    };
                    if let Some(t) = &self.transcript {
                        t(&why);
                    }
                    return Err(ClientError::TlsPolicy(format!("{why} (DANE)")));
                }
                return Err(if certificate && verified == Verified::Pkix {
                    ClientError::TlsPolicy(format!("{why} (tls = \"verify\")"))
                } else {
                    ClientError::TlsHandshake(why)
                });
            }
            Err(_) => {
                let why = format!("TLS handshake with {relay} timed out");
                if let Some(t) = &self.transcript {
                    t(&why);
                }
                if dane.is_some() {
                    return Err(ClientError::TlsPolicy(format!("{why} (DANE)")));
                }
                return Err(ClientError::TlsHandshake(why));
            }
        };
        let info = TlsInfo::of(tls.get_ref().1);
        self.stream = Stream::Tls(Box::new(tls));
        let line = format!(
            "{} TLS connection established to {relay}: {}{}",
            if verified == Verified::None {
                "Untrusted"
            } else {
                "Verified"
            },
            info.summary(),
            match dane_verifier.as_ref().and_then(|v| v.matched()) {
                Some(m) => format!(" (DANE: {m})"),
                None => String::new(),
            }
        );
        tracing::info!("{line}");
        self.trace("", &line);
        self.tls = Some((info, verified));
        let (ehlo, lines) = self
            .command(&format!("EHLO {}", cfg.helo_name), "EHLO", other)
            .await?;
        if ehlo.code / 100 != 2 {
            self.say_quit().await;
            return Err(ClientError::Hello(ehlo));
        }
        self.ext = Extensions::from_ehlo(&lines);
        Ok(self)
    }

    /// The session's TLS state (its `Display` is `tls=TLSv1.3 verified=pkix`, `tls=none`).
    pub fn tls_state(&self) -> crate::tls::TlsState {
        match &self.tls {
            Some((info, verified)) => crate::tls::TlsState::of(info, verified),
            None => crate::tls::TlsState::clear(),
        }
    }

    /// How this connection's TLS certificate was checked and the chain the server sent
    /// (its own certificate first); `None` in clear. For MTA-STS `testing`.
    pub fn tls_peer(&self) -> Option<(Verified, Vec<rustls::pki_types::CertificateDer<'static>>)> {
        let (_, verified) = self.tls.as_ref()?;
        let chain = match &self.stream {
            Stream::Tls(t) => t
                .get_ref()
                .1
                .peer_certificates()
                .unwrap_or_default()
                .to_vec(),
            _ => Vec::new(),
        };
        Some((*verified, chain))
    }

    /// Connects to an LMTP server (RFC 2033), reads the greeting and says LHLO (there is no
    /// fallback: an LMTP server that refuses LHLO is an error). Over TCP the host name is
    /// the address itself.
    pub async fn connect_lmtp(
        target: &LmtpTarget,
        cfg: &ClientConfig,
        transcript: Option<Transcript>,
    ) -> Result<Connection, ClientError> {
        match target {
            LmtpTarget::Tcp(addr) => {
                let stream = dial(cfg, tcp_connect(*addr, cfg.bind)).await?;
                let _ = stream.set_nodelay(true);
                let c = Connection::new(Stream::Tcp(stream), Protocol::Lmtp, cfg, transcript);
                c.with_peer(*addr, &addr.ip().to_string()).hello(cfg).await
            }
            LmtpTarget::Unix(path) => {
                let stream = dial(cfg, UnixStream::connect(path)).await?;
                let mut c = Connection::new(Stream::Unix(stream), Protocol::Lmtp, cfg, transcript);
                c.host_name = path.display().to_string();
                c.socket = Some(path.clone());
                c.hello(cfg).await
            }
        }
    }

    fn new(
        stream: Stream,
        protocol: Protocol,
        cfg: &ClientConfig,
        transcript: Option<Transcript>,
    ) -> Connection {
        Connection {
            stream,
            protocol,
            buf: Vec::with_capacity(4096),
            peer: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
            socket: None,
            host_name: String::new(),
            ext: Extensions::default(),
            timeouts: cfg.timeouts,
            transcript,
            in_transaction: false,
            broken: false,
            completed: 0,
            tls: None,
        }
    }

    fn with_peer(mut self, peer: SocketAddr, host_name: &str) -> Connection {
        self.peer = peer;
        self.host_name = host_name.to_string();
        self
    }

    /// The greeting, then EHLO (HELO if EHLO is refused with 5xx), or LHLO for LMTP.
    async fn hello(self, cfg: &ClientConfig) -> Result<Connection, ClientError> {
        let mut c = self;
        let greeting = c.read_reply("greeting", c.timeouts.greeting).await?;
        if greeting.code / 100 != 2 {
            c.say_quit().await;
            return Err(ClientError::Greeting(greeting));
        }
        let other = c.timeouts.other;
        if c.protocol == Protocol::Lmtp {
            let (lhlo, lines) = c
                .command(&format!("LHLO {}", cfg.helo_name), "LHLO", other)
                .await?;
            if lhlo.code / 100 != 2 {
                c.say_quit().await;
                return Err(ClientError::Lhlo(lhlo));
            }
            c.ext = Extensions::from_ehlo(&lines);
            return Ok(c);
        }
        let ehlo = c
            .command(&format!("EHLO {}", cfg.helo_name), "EHLO", other)
            .await?;
        if ehlo.0.code / 100 == 2 {
            c.ext = Extensions::from_ehlo(&ehlo.1);
            return Ok(c);
        }
        if !ehlo.0.is_permanent() {
            c.say_quit().await;
            return Err(ClientError::Hello(ehlo.0));
        }
        let (helo, _) = c
            .command(&format!("HELO {}", cfg.helo_name), "HELO", other)
            .await?;
        if helo.code / 100 != 2 {
            c.say_quit().await;
            return Err(ClientError::Hello(helo));
        }
        Ok(c)
    }

    /// The TCP peer; `0.0.0.0:0` for a connection over a Unix socket.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// The name of the host we connected to (for logs: `relay=host[ip]:port`); the socket
    /// path for a Unix socket.
    pub fn host_name(&self) -> &str {
        &self.host_name
    }

    /// For logs: `host[ip]:port` over TCP, the socket path over a Unix socket.
    pub fn relay(&self) -> String {
        match &self.socket {
            Some(path) => path.display().to_string(),
            None => format!(
                "{}[{}]:{}",
                self.host_name,
                self.peer.ip(),
                self.peer.port()
            ),
        }
    }

    /// True for an LMTP connection ([`Connection::connect_lmtp`]).
    pub fn is_lmtp(&self) -> bool {
        self.protocol == Protocol::Lmtp
    }

    pub fn extensions(&self) -> &Extensions {
        &self.ext
    }

    /// False after an error, a timeout or a 421: the caller must reconnect.
    pub fn is_usable(&self) -> bool {
        !self.broken
    }

    /// Sends one message. Returns one result per recipient of `msg`, in order.
    ///
    /// When the session ends before the final dot was written (a `421`, a lost connection,
    /// a timeout, or the server's cap of messages per session), every recipient not yet
    /// settled is [`RcptResult::Unsent`]: the server has nothing. When it ends while the
    /// reply to the final dot is awaited, the outcome is unknown: those recipients are
    /// `Deferred` (the server may have the message; the retry is a duplicate at worst,
    /// never a loss).
    pub async fn send(&mut self, msg: &Outgoing<'_>) -> Vec<RcptResult> {
        let mut results: Vec<Option<RcptResult>> = vec![None; msg.recipients.len()];
        let mut dot_written = false;
        if let Err(e) = self.transaction(msg, &mut results, &mut dot_written).await {
            let relay = self.relay();
            let lost = if let ClientError::Spool(why) = &e {
                let text = format!("cannot read the message from the spool: {why}");
                RcptResult::Deferred(synthetic(451, "4.3.0", &text))
            } else if dot_written {
                let text = format!(
                    "lost connection with {relay} after end of data ({e}); the message may be delivered twice"
                );
                RcptResult::Deferred(synthetic(451, "4.4.2", &text))
            } else {
                let text = format!("lost connection with {relay}: {e}");
                RcptResult::Unsent(synthetic(421, "4.4.2", &text))
            };
            for r in results.iter_mut().filter(|r| r.is_none()) {
                *r = Some(lost.clone());
            }
        }
        settled(results)
    }

    /// One transaction: fills `results`; an error means the connection broke before every
    /// recipient was settled (`dot_written` says whether the server may have the message).
    async fn transaction(
        &mut self,
        msg: &Outgoing<'_>,
        results: &mut [Option<RcptResult>],
        dot_written: &mut bool,
    ) -> Result<(), ClientError> {
        self.check_usable()?;
        let n = msg.recipients.len();
        if n == 0 {
            return Ok(());
        }
        let utf8 = needs_smtputf8(msg);
        if let Some(refusal) = self.refuse_locally(msg, utf8) {
            results.fill(Some(RcptResult::Failed(refusal)));
            return Ok(());
        }
        // Recipients we cannot put on a command line fail here; the rest go out.
        for (r, rcpt) in results.iter_mut().zip(msg.recipients) {
            if has_control(&rcpt.address) {
                *r = Some(RcptResult::Failed(synthetic(
                    553,
                    "5.1.3",
                    "bad recipient address syntax",
                )));
            }
        }
        let wire: Vec<usize> = (0..n).filter(|&i| results[i].is_none()).collect();
        if wire.is_empty() {
            return Ok(());
        }
        if self.in_transaction {
            self.reset().await?;
        }
        let mail = self.mail_command(msg, utf8);
        let rcpts: Vec<String> = wire
            .iter()
            .map(|&i| self.rcpt_command(&msg.recipients[i]))
            .collect();
        let t = self.timeouts;

        // The envelope: MAIL, RCPTs, DATA.
        let mut accepted: Vec<usize> = Vec::new();
        let data_reply;
        if self.ext.pipelining {
            let mut group = String::with_capacity(64 * (rcpts.len() + 2));
            for line in std::iter::once(&mail).chain(&rcpts) {
                group.push_str(line);
                group.push_str("\r\n");
            }
            group.push_str("DATA\r\n");
            for line in std::iter::once(&mail).chain(&rcpts) {
                self.trace(">>> ", line);
            }
            self.trace(">>> ", "DATA");
            self.write(group.as_bytes(), "MAIL", t.mail).await?;

            let mail_reply = self.read_reply("MAIL", t.mail).await?;
            if mail_reply.code / 100 != 2 {
                if mail_reply.code != 421 {
                    // Every recipient is settled: what follows only tidies up.
                    self.drain_after_refusal(rcpts.len()).await;
                }
                self.mail_refused(results, &mail_reply).await;
                return Ok(());
            }
            self.in_transaction = true;
            for &i in &wire {
                let r = self.read_reply("RCPT", t.rcpt).await?;
                if take_rcpt_reply(results, &mut accepted, i, r) {
                    return Ok(());
                }
            }
            if accepted.is_empty() {
                // All settled; the pipelined DATA is refused (or, by a lax server, accepted).
                if let Ok(r) = self.read_reply("DATA", t.data_init).await {
                    if r.code == 354 {
                        self.end_empty_data().await;
                    }
                }
                return Ok(());
            }
            data_reply = self.read_reply("DATA", t.data_init).await?;
        } else {
            let (mail_reply, _) = self.command(&mail, "MAIL", t.mail).await?;
            if mail_reply.code / 100 != 2 {
                self.mail_refused(results, &mail_reply).await;
                return Ok(());
            }
            self.in_transaction = true;
            for (k, &i) in wire.iter().enumerate() {
                let (r, _) = self.command(&rcpts[k], "RCPT", t.rcpt).await?;
                if take_rcpt_reply(results, &mut accepted, i, r) {
                    return Ok(());
                }
            }
            if accepted.is_empty() {
                return Ok(());
            }
            data_reply = self.command("DATA", "DATA", t.data_init).await?.0;
        }

        if data_reply.code != 354 {
            for &i in &accepted {
                results[i] = Some(RcptResult::from_reply(data_reply.clone()));
            }
            return Ok(());
        }
        self.write_body(msg.message).await?;
        *dot_written = true;
        if self.protocol == Protocol::Lmtp {
            self.lmtp_replies(results, &accepted).await?;
            self.completed += 1;
            return Ok(());
        }
        let fin = self.read_reply("end of data", t.data_term).await?;
        self.in_transaction = false;
        self.completed += 1;
        for &i in &accepted {
            results[i] = Some(RcptResult::from_reply(fin.clone()));
        }
        Ok(())
    }

    /// MAIL was refused. A `421`, or a temporary refusal once this session has carried
    /// messages (the server's cap of messages per session): nothing was sent, and the
    /// session is over. Anything else is the message's verdict.
    async fn mail_refused(&mut self, results: &mut [Option<RcptResult>], reply: &Reply) {
        if reply.code != 421 && reply.is_transient() && self.completed > 0 {
            self.trace(
                "*** ",
                &format!(
                    "MAIL refused after {} message(s) on this session: a new session follows",
                    self.completed
                ),
            );
            for r in results.iter_mut().filter(|r| r.is_none()) {
                *r = Some(RcptResult::Unsent(reply.clone()));
            }
            self.say_quit().await;
            return;
        }
        settle(results, reply);
    }

    /// LMTP after the final dot (RFC 2033 4.2): one reply for each recipient accepted at
    /// RCPT, in RCPT order. A connection lost before the first reply is an error, as in
    /// SMTP; lost after some replies, the recipients still without one are deferred (the
    /// server may have delivered to them: a duplicate later, never a loss). A 421 settles
    /// every recipient still without a reply.
    async fn lmtp_replies(
        &mut self,
        results: &mut [Option<RcptResult>],
        accepted: &[usize],
    ) -> Result<(), ClientError> {
        let t = self.timeouts.data_term;
        for (k, &i) in accepted.iter().enumerate() {
            let reply = match self.read_reply("end of data", t).await {
                Ok(r) => r,
                Err(e) if k == 0 => return Err(e),
                Err(e) => {
                    let text = format!(
                        "lost connection with {} while reading the replies after end of data: {e}",
                        self.relay()
                    );
                    let lost = synthetic(451, "4.4.2", &text);
                    for &j in &accepted[k..] {
                        results[j] = Some(RcptResult::Deferred(lost.clone()));
                    }
                    return Ok(());
                }
            };
            if reply.code == 421 {
                for &j in &accepted[k..] {
                    results[j] = Some(RcptResult::from_reply(reply.clone()));
                }
                return Ok(());
            }
            results[i] = Some(RcptResult::from_reply(reply));
        }
        self.in_transaction = false;
        Ok(())
    }

    /// RSET: ends any transaction, between messages on one connection.
    pub async fn reset(&mut self) -> Result<(), ClientError> {
        self.check_usable()?;
        let (r, _) = self.command("RSET", "RSET", self.timeouts.other).await?;
        if r.code / 100 != 2 {
            self.broken = true;
            return Err(ClientError::Protocol(format!("RSET refused: {r}")));
        }
        self.in_transaction = false;
        Ok(())
    }

    /// QUIT, wait (briefly) for the 221, close. Never fails.
    pub async fn quit(mut self) {
        self.say_quit().await;
        let _ = self.stream.shutdown().await;
    }

    async fn say_quit(&mut self) {
        if self.broken {
            return;
        }
        let wait = self.timeouts.other.min(QUIT_WAIT);
        let _ = self.command("QUIT", "QUIT", wait).await;
        self.broken = true;
    }

    fn check_usable(&self) -> Result<(), ClientError> {
        if self.broken {
            return Err(ClientError::Io(io::Error::new(
                io::ErrorKind::NotConnected,
                "the connection is no longer usable",
            )));
        }
        Ok(())
    }

    /// A synthetic refusal for the whole message, before anything is sent.
    fn refuse_locally(&self, msg: &Outgoing<'_>, utf8: bool) -> Option<Reply> {
        if utf8 && !self.ext.smtputf8 {
            let text = format!(
                "SMTPUTF8 is required, but {} does not support SMTPUTF8",
                self.host_name
            );
            return Some(synthetic(550, "5.6.7", &text));
        }
        if let Some(limit) = self.ext.size.filter(|&l| l > 0) {
            if msg.message.len() > limit {
                let text = format!(
                    "message size {} exceeds size limit {} of {}",
                    msg.message.len(),
                    limit,
                    self.host_name
                );
                return Some(synthetic(552, "5.3.4", &text));
            }
        }
        if has_control(&msg.envelope.sender) {
            return Some(synthetic(553, "5.1.7", "bad sender address syntax"));
        }
        None
    }

    fn mail_command(&self, msg: &Outgoing<'_>, utf8: bool) -> String {
        let e = msg.envelope;
        let mut s = format!("MAIL FROM:{}", path(&e.sender));
        if self.ext.size.is_some() {
            let _ = write!(s, " SIZE={}", msg.message.len());
        }
        if e.body == Body::EightBitMime && self.ext.eight_bit_mime {
            s.push_str(" BODY=8BITMIME");
        }
        if utf8 && self.ext.smtputf8 {
            s.push_str(" SMTPUTF8");
        }
        if self.ext.dsn {
            match e.ret {
                Some(Ret::Full) => s.push_str(" RET=FULL"),
                Some(Ret::Hdrs) => s.push_str(" RET=HDRS"),
                None => {}
            }
            if let Some(envid) = &e.envid {
                let _ = write!(s, " ENVID={}", xtext(envid));
            }
        }
        s
    }

    fn rcpt_command(&self, r: &Recipient) -> String {
        let mut s = format!("RCPT TO:{}", path(&r.address));
        if self.ext.dsn {
            if let Some(notify) = r.notify.as_ref().and_then(notify_value) {
                let _ = write!(s, " NOTIFY={notify}");
            }
            if let Some(orcpt) = &r.orcpt {
                let (kind, addr) = orcpt.split_once(';').unwrap_or(("rfc822", orcpt));
                let _ = write!(s, " ORCPT={};{}", kind.trim(), xtext(addr.trim()));
            }
        }
        s
    }

    /// After a refused MAIL with pipelining: read the RCPT and DATA replies that follow.
    /// Failures here only mark the connection broken; every recipient is already settled.
    async fn drain_after_refusal(&mut self, rcpts: usize) {
        let t = self.timeouts;
        for _ in 0..rcpts {
            match self.read_reply("RCPT", t.rcpt).await {
                Ok(r) if r.code != 421 => {}
                _ => return,
            }
        }
        if let Ok(r) = self.read_reply("DATA", t.data_init).await {
            if r.code == 354 {
                self.end_empty_data().await;
            }
        }
    }

    /// A server said 354 to a DATA that had no accepted recipient: end it at once.
    async fn end_empty_data(&mut self) {
        self.trace(">>> ", ".");
        if self
            .write(b".\r\n", "end of data", self.timeouts.data_block)
            .await
            .is_ok()
            && self
                .read_reply("end of data", self.timeouts.data_term)
                .await
                .is_ok()
        {
            self.in_transaction = false;
        }
    }

    /// The message, dot-stuffed with CRLF line ends, and the final dot, in few writes; one
    /// part of it in memory at a time (a line cut between two parts is joined first).
    async fn write_body(&mut self, message: &Message) -> Result<(), ClientError> {
        let t = self.timeouts.data_block;
        let mut out =
            Vec::with_capacity((message.len() as usize).min(BODY_CHUNK) + BODY_CHUNK / 16);
        let mut carry: Vec<u8> = Vec::new();
        let mut n = 0;
        loop {
            let read;
            let part: &[u8] = if n == 0 {
                message.first()
            } else {
                read = match message.part_async(n).await {
                    Ok(p) => p,
                    Err(e) => {
                        // Mid-DATA: the server must not take what we have sent for a message.
                        self.broken = true;
                        return Err(ClientError::Spool(e.to_string()));
                    }
                };
                &read
            };
            let last = n == message.parts();
            let joined;
            let data: &[u8] = if carry.is_empty() {
                part
            } else {
                carry.extend_from_slice(part);
                joined = std::mem::take(&mut carry);
                &joined
            };
            let whole = if last {
                data.len()
            } else {
                data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)
            };
            for line in data[..whole].split_inclusive(|&b| b == b'\n') {
                encode_line(line, &mut out);
                if out.len() >= BODY_CHUNK {
                    self.write(&out, "message body", t).await?;
                    out.clear();
                }
            }
            if last {
                break;
            }
            carry = data[whole..].to_vec();
            n += 1;
        }
        out.extend_from_slice(b".\r\n");
        self.trace(">>> ", ".");
        self.write(&out, "message body", t).await
    }

    /// Sends one command line and reads its reply (with its raw lines).
    async fn command(
        &mut self,
        line: &str,
        stage: &'static str,
        limit: Duration,
    ) -> Result<(Reply, Vec<String>), ClientError> {
        self.trace(">>> ", line);
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        self.write(&bytes, stage, limit).await?;
        let lines = self.read_lines(stage, limit).await?;
        let reply = Reply::from_framed(&lines);
        if reply.code == 421 {
            self.broken = true;
        }
        Ok((reply, lines))
    }

    async fn write(
        &mut self,
        bytes: &[u8],
        stage: &'static str,
        limit: Duration,
    ) -> Result<(), ClientError> {
        match timeout(limit, self.stream.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.broken = true;
                Err(ClientError::Io(e))
            }
            Err(_) => {
                self.broken = true;
                Err(ClientError::Timeout(stage))
            }
        }
    }

    async fn read_reply(
        &mut self,
        stage: &'static str,
        limit: Duration,
    ) -> Result<Reply, ClientError> {
        let lines = self.read_lines(stage, limit).await?;
        let reply = Reply::from_framed(&lines);
        if reply.code == 421 {
            self.broken = true;
        }
        Ok(reply)
    }

    /// The lines of the next reply, reading until it is complete or `limit` has passed.
    async fn read_lines(
        &mut self,
        stage: &'static str,
        limit: Duration,
    ) -> Result<Vec<String>, ClientError> {
        let deadline = Instant::now() + limit;
        loop {
            match frame(&self.buf) {
                Ok(Some((used, lines))) => {
                    self.buf.drain(..used);
                    for line in &lines {
                        self.trace("<<< ", line);
                    }
                    return Ok(lines);
                }
                Ok(None) if self.buf.len() > MAX_REPLY => {
                    self.broken = true;
                    return Err(ClientError::Protocol(format!("reply to {stage} too long")));
                }
                Ok(None) => {}
                Err(e) => {
                    self.broken = true;
                    return Err(ClientError::Protocol(e));
                }
            }
            self.buf.reserve(4096);
            match timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) => {
                    self.broken = true;
                    return Err(ClientError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("connection closed by the server (waiting for {stage})"),
                    )));
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    self.broken = true;
                    return Err(ClientError::Io(e));
                }
                Err(_) => {
                    self.broken = true;
                    return Err(ClientError::Timeout(stage));
                }
            }
        }
    }

    fn trace(&self, prefix: &str, line: &str) {
        if let Some(t) = &self.transcript {
            t(&format!("{prefix}{line}"));
        }
    }
}

impl Reply {
    /// Parses one complete reply (`250-first\r\n250 last\r\n`); `None` if it is incomplete
    /// or malformed. Lines are joined with a space; the enhanced status code of the first
    /// line goes to `status` and is taken off every line that repeats it.
    pub fn parse(text: &str) -> Option<Reply> {
        match frame(text.as_bytes()) {
            Ok(Some((_, lines))) => Some(Reply::from_framed(&lines)),
            _ => None,
        }
    }

    /// From lines that [`frame`] accepted.
    fn from_framed(lines: &[String]) -> Reply {
        let code: u16 = lines[0][..3].parse().unwrap_or(0);
        let text_of = |line: &str| line.get(4..).unwrap_or("").to_string();
        let first = text_of(&lines[0]);
        let (status, first) = match split_status(code, &first) {
            Some((s, rest)) => (Some(s.to_string()), rest.to_string()),
            None => (None, first),
        };
        let mut text = first.trim().to_string();
        for line in &lines[1..] {
            let t = text_of(line);
            let t = match (&status, split_status(code, &t)) {
                (Some(s), Some((s2, rest))) if s == s2 => rest,
                _ => &t,
            };
            let t = t.trim();
            if !t.is_empty() {
                if !text.is_empty() {
                    text.push(' ');
                }
                text.push_str(t);
            }
        }
        Reply { code, status, text }
    }
}

/// Finds the first complete reply in `buf`: the bytes it used and its lines (without CRLF).
/// `Ok(None)`: more bytes needed.
fn frame(buf: &[u8]) -> Result<Option<(usize, Vec<String>)>, String> {
    let mut lines = Vec::new();
    let mut pos = 0;
    while let Some(nl) = buf[pos..].iter().position(|&b| b == b'\n') {
        let raw = &buf[pos..pos + nl];
        pos += nl + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let valid = raw.len() >= 3
            && (b'2'..=b'5').contains(&raw[0])
            && raw[1..3].iter().all(u8::is_ascii_digit)
            && (raw.len() == 3 || raw[3] == b' ' || raw[3] == b'-');
        if !valid {
            let shown: String = String::from_utf8_lossy(raw).chars().take(80).collect();
            return Err(format!("malformed reply line {shown:?}"));
        }
        lines.push(String::from_utf8_lossy(raw).into_owned());
        if raw.len() == 3 || raw[3] == b' ' {
            return Ok(Some((pos, lines)));
        }
    }
    Ok(None)
}

/// The enhanced status code (RFC 3463) at the start of `text`, if it has one of the reply's
/// class, and the text after it.
fn split_status(code: u16, text: &str) -> Option<(&str, &str)> {
    let class = (code / 100) as u8;
    let b = text.as_bytes();
    if !matches!(class, 2 | 4 | 5) || b.len() < 5 || b[0] != b'0' + class || b[1] != b'.' {
        return None;
    }
    let digits = |from: usize| {
        let n = b[from..].iter().take_while(|c| c.is_ascii_digit()).count();
        (1..=3).contains(&n).then_some(from + n)
    };
    let end = digits(2)?;
    if b.get(end) != Some(&b'.') {
        return None;
    }
    let end = digits(end + 1)?;
    match b.get(end) {
        None => Some((text, "")),
        Some(b' ') => Some((&text[..end], text[end + 1..].trim_start())),
        _ => None,
    }
}

fn synthetic(code: u16, status: &str, text: &str) -> Reply {
    Reply {
        code,
        status: Some(status.to_string()),
        text: text.to_string(),
    }
}

/// Settle recipient `i` by its RCPT reply: accepted (2xx) waits for DATA, a refusal is its
/// result. A 421 settles every recipient not yet settled; returns true then (the
/// connection is going away).
fn take_rcpt_reply(
    results: &mut [Option<RcptResult>],
    accepted: &mut Vec<usize>,
    i: usize,
    r: Reply,
) -> bool {
    if r.code == 421 {
        settle(results, &r);
        return true;
    }
    if r.code / 100 == 2 {
        accepted.push(i);
    } else if too_many_recipients(&r) {
        results[i] = Some(RcptResult::Unsent(r));
    } else {
        results[i] = Some(RcptResult::from_reply(r));
    }
    false
}

/// A temporary refusal of one RCPT as too many: `452 4.5.3` (RFC 5321 4.5.3.1.10), or any
/// 4xx with status 4.5.3 or saying "too many recipients" (Exim's plain `452 too many
/// recipients`, OpenSMTPD's `451 4.5.3`). The rest go in a further transaction.
fn too_many_recipients(r: &Reply) -> bool {
    r.is_transient()
        && r.code != 421
        && (r.status.as_deref() == Some("4.5.3")
            || r.text.to_ascii_lowercase().contains("too many recipients"))
}

/// Every unsettled recipient gets `reply`'s verdict.
fn settle(results: &mut [Option<RcptResult>], reply: &Reply) {
    for r in results.iter_mut().filter(|r| r.is_none()) {
        *r = Some(RcptResult::from_reply(reply.clone()));
    }
}

fn settled(results: Vec<Option<RcptResult>>) -> Vec<RcptResult> {
    results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                RcptResult::Deferred(synthetic(451, "4.4.0", "transaction ended unexpectedly"))
            })
        })
        .collect()
}

fn needs_smtputf8(msg: &Outgoing<'_>) -> bool {
    msg.envelope.smtputf8
        || !msg.envelope.sender.is_ascii()
        || msg.recipients.iter().any(|r| !r.address.is_ascii())
}

/// Control characters (CR, LF, ...) would break the command line.
fn has_control(address: &str) -> bool {
    address.chars().any(|c| c.is_control())
}

/// `<address>`, with the local part quoted if it is not a dot-atom; `<>` for the null path.
fn path(address: &str) -> String {
    if address.is_empty() {
        return "<>".to_string();
    }
    let (local, domain) = match address.rsplit_once('@') {
        Some((l, d)) => (l, Some(d)),
        None => (address, None),
    };
    let quoted = local.len() >= 2 && local.starts_with('"') && local.ends_with('"');
    let mut s = String::with_capacity(address.len() + 4);
    s.push('<');
    if is_dot_atom(local) || quoted {
        s.push_str(local);
    } else {
        s.push('"');
        for c in local.chars() {
            if c == '"' || c == '\\' {
                s.push('\\');
            }
            s.push(c);
        }
        s.push('"');
    }
    if let Some(d) = domain {
        s.push('@');
        s.push_str(d);
    }
    s.push('>');
    s
}

/// RFC 5321 dot-atom, with RFC 6531's UTF-8 in atext.
fn is_dot_atom(s: &str) -> bool {
    let atext =
        |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii();
    !s.is_empty()
        && s.split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(atext))
}

/// RFC 3461 4: xtext, with `+`, `=` and everything outside 33..=126 as `+XX`.
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

fn notify_value(n: &Notify) -> Option<String> {
    if n.never {
        return Some("NEVER".to_string());
    }
    let parts: Vec<&str> = [
        (n.success, "SUCCESS"),
        (n.failure, "FAILURE"),
        (n.delay, "DELAY"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, name)| *name)
    .collect();
    (!parts.is_empty()).then(|| parts.join(","))
}

/// One line of the message (with its LF, if any) for DATA: a leading dot doubled, the line
/// end made CRLF (a last line without one gets one).
fn encode_line(line: &[u8], out: &mut Vec<u8>) {
    if line.first() == Some(&b'.') {
        out.push(b'.');
    }
    let content = line.strip_suffix(b"\n").unwrap_or(line);
    let content = content.strip_suffix(b"\r").unwrap_or(content);
    out.extend_from_slice(content);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncRead, AsyncWrite};
    use tokio::net::{TcpListener, UnixListener};

    /// One step of a scripted server.
    enum Step {
        /// Write these bytes.
        Say(&'static str),
        /// Read until this many more lines have come from the client.
        Hear(usize),
        /// Read until the client's bytes end with the final dot.
        HearDot,
        /// Sleep this many milliseconds.
        Pause(u64),
        /// Stop answering (until the test ends).
        Stall,
        /// Close the connection now.
        Close,
    }
    use Step::*;

    /// A server on 127.0.0.1 that plays a script to one client and records what it saw.
    struct Peer {
        addr: SocketAddr,
        task: tokio::task::JoinHandle<(Vec<String>, Vec<u8>)>,
    }

    impl Peer {
        async fn start(script: Vec<Step>) -> Peer {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let task = tokio::spawn(play(listener, script));
            Peer { addr, task }
        }

        /// The same on a Unix socket at `path` (`addr` is unspecified).
        fn start_unix(path: &std::path::Path, script: Vec<Step>) -> Peer {
            let listener = UnixListener::bind(path).unwrap();
            let task = tokio::spawn(async move {
                let (s, _) = listener.accept().await.unwrap();
                play_on(s, script).await
            });
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
            Peer { addr, task }
        }

        /// The peer's log (`C: line` for each client line, placed where it had arrived when
        /// the peer next spoke; `S: line` for each line said) and every byte received.
        async fn finish(self) -> (Vec<String>, Vec<u8>) {
            timeout(Duration::from_secs(10), self.task)
                .await
                .expect("peer did not finish")
                .expect("peer failed")
        }
    }

    async fn play(listener: TcpListener, script: Vec<Step>) -> (Vec<String>, Vec<u8>) {
        let (s, _) = listener.accept().await.unwrap();
        s.set_nodelay(true).unwrap();
        play_on(s, script).await
    }

    async fn play_on<S: AsyncRead + AsyncWrite + Unpin>(
        mut s: S,
        script: Vec<Step>,
    ) -> (Vec<String>, Vec<u8>) {
        let (mut got, mut log, mut logged, mut want) = (Vec::new(), Vec::new(), 0, 0);
        let lines = |got: &[u8]| got.iter().filter(|&&b| b == b'\n').count();
        async fn more<S: AsyncRead + Unpin>(s: &mut S, got: &mut Vec<u8>) {
            let n = timeout(Duration::from_secs(5), s.read_buf(got))
                .await
                .expect("peer: client went silent")
                .unwrap();
            assert!(n > 0, "peer: client closed early");
        }
        for step in script {
            match step {
                Say(text) => {
                    log_lines(&got, &mut logged, &mut log);
                    log.extend(text.lines().map(|l| format!("S: {l}")));
                    s.write_all(text.as_bytes()).await.unwrap();
                }
                Hear(n) => {
                    want += n;
                    while lines(&got) < want {
                        more(&mut s, &mut got).await;
                    }
                }
                HearDot => {
                    while !got.ends_with(b"\r\n.\r\n") {
                        more(&mut s, &mut got).await;
                    }
                    want = lines(&got);
                }
                Pause(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                Stall => tokio::time::sleep(Duration::from_secs(60)).await,
                Close => {
                    log_lines(&got, &mut logged, &mut log);
                    return (log, got);
                }
            }
        }
        while let Ok(Ok(n)) = timeout(Duration::from_secs(3), s.read_buf(&mut got)).await {
            if n == 0 {
                break;
            }
        }
        log_lines(&got, &mut logged, &mut log);
        (log, got)
    }

    fn log_lines(got: &[u8], logged: &mut usize, log: &mut Vec<String>) {
        while let Some(nl) = got[*logged..].iter().position(|&b| b == b'\n') {
            let line = &got[*logged..*logged + nl];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            log.push(format!("C: {}", String::from_utf8_lossy(line)));
            *logged += nl + 1;
        }
    }

    const GREET: &str = "220 mx.test ESMTP\r\n";
    const EHLO_ALL: &str = "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250-8BITMIME\r\n250-DSN\r\n250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n";
    const EHLO_PLAIN: &str = "250-mx.test\r\n250 8BITMIME\r\n";
    const BYE: &str = "221 2.0.0 Bye\r\n";

    fn cfg(t: Duration) -> ClientConfig {
        ClientConfig {
            helo_name: "mx2.test".to_string(),
            connect_timeout: Duration::from_secs(5),
            timeouts: Timeouts::all(t),
            bind: None,
            tls: TlsPolicy::None,
            tls_connectors: None,
            dane: None,
        }
    }

    fn envelope(sender: &str, rcpts: &[&str]) -> Envelope {
        Envelope {
            id: "ID1".to_string(),
            sender: sender.to_string(),
            recipients: rcpts.iter().map(|r| Recipient::new(*r)).collect(),
            arrival_ms: 0,
            size: 0,
            body: Body::SevenBit,
            smtputf8: false,
            ret: None,
            envid: None,
            client_ip: String::new(),
            helo: String::new(),
        }
    }

    fn reply(code: u16, status: Option<&str>, text: &str) -> Reply {
        Reply {
            code,
            status: status.map(str::to_string),
            text: text.to_string(),
        }
    }

    struct Outcome {
        results: Vec<RcptResult>,
        ext: Extensions,
        log: Vec<String>,
        got: String,
    }

    /// Connects to a peer playing `script`, sends one message, quits.
    async fn deliver(script: Vec<Step>, env: &Envelope, message: &[u8]) -> Outcome {
        let peer = Peer::start(script).await;
        let cfg = cfg(Duration::from_secs(5));
        let mut c = Connection::connect(peer.addr, "mx.test", &cfg, None)
            .await
            .unwrap();
        let ext = c.extensions().clone();
        let msg = Outgoing {
            envelope: env,
            recipients: &env.recipients,
            message: &Message::from(message.to_vec()),
        };
        let results = c.send(&msg).await;
        c.quit().await;
        let (log, got) = peer.finish().await;
        Outcome {
            results,
            ext,
            log,
            got: String::from_utf8(got).unwrap(),
        }
    }

    #[tokio::test]
    async fn pipelined_transaction_is_byte_exact() {
        let mut env = envelope("a@x.org", &[]);
        env.body = Body::EightBitMime;
        env.ret = Some(Ret::Hdrs);
        env.envid = Some("id+1=2 x".to_string());
        let mut r1 = Recipient::new("b@y.org");
        r1.notify = Some(Notify {
            success: true,
            failure: true,
            ..Notify::default()
        });
        r1.orcpt = Some("rfc822;b+x=@y.org".to_string());
        env.recipients = vec![r1, Recipient::new("john doe@y.org")];
        let message = b"Subject: t\n\n.line\r\n..two\nend";
        let script = vec![
            Say(GREET),
            Hear(1),
            Say(EHLO_ALL),
            Hear(4),
            // All four replies in one segment: the buffer must keep the ones not yet read.
            Say("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n"),
            HearDot,
            Say("250 2.0.0 Ok: queued as X\r\n"),
            Hear(1),
            Say(BYE),
        ];
        let lines = Arc::new(Mutex::new(Vec::new()));
        let seen = lines.clone();
        let transcript: Transcript =
            Arc::new(move |l: &str| seen.lock().unwrap().push(l.to_string()));
        let peer = Peer::start(script).await;
        let cfg = cfg(Duration::from_secs(5));
        let mut c = Connection::connect(peer.addr, "mx.test", &cfg, Some(transcript))
            .await
            .unwrap();
        let ext = c.extensions().clone();
        assert_eq!(
            ext,
            Extensions {
                esmtp: true,
                pipelining: true,
                size: Some(1_000_000),
                eight_bit_mime: true,
                smtputf8: true,
                dsn: true,
                enhanced_status_codes: true,
                starttls: false,
            }
        );
        let msg = Outgoing {
            envelope: &env,
            recipients: &env.recipients,
            message: &Message::from(message.to_vec()),
        };
        let results = c.send(&msg).await;
        c.quit().await;
        let (_, got) = peer.finish().await;

        let sent = reply(250, Some("2.0.0"), "Ok: queued as X");
        assert_eq!(
            results,
            vec![RcptResult::Sent(sent.clone()), RcptResult::Sent(sent)]
        );
        let expected = format!(
            "EHLO mx2.test\r\n\
             MAIL FROM:<a@x.org> SIZE={} BODY=8BITMIME RET=HDRS ENVID=id+2B1+3D2+20x\r\n\
             RCPT TO:<b@y.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b+2Bx+3D@y.org\r\n\
             RCPT TO:<\"john doe\"@y.org>\r\n\
             DATA\r\n\
             Subject: t\r\n\r\n..line\r\n...two\r\nend\r\n.\r\n\
             QUIT\r\n",
            message.len()
        );
        assert_eq!(String::from_utf8(got).unwrap(), expected);
        let lines = lines.lock().unwrap();
        assert!(
            lines[0].starts_with("connected to mx.test[127.0.0.1]:")
                && lines[0].ends_with(", waiting for the greeting"),
            "{}",
            lines[0]
        );
        assert_eq!(lines[1], "<<< 220 mx.test ESMTP");
        assert_eq!(lines[2], ">>> EHLO mx2.test");
        assert!(lines.contains(&">>> RCPT TO:<\"john doe\"@y.org>".to_string()));
        assert!(lines.contains(&">>> DATA".to_string()));
        assert!(lines.contains(&"<<< 354 go".to_string()));
        assert!(lines.contains(&">>> .".to_string()));
        assert!(lines.contains(&"<<< 250 2.0.0 Ok: queued as X".to_string()));
        assert!(
            !lines.iter().any(|l| l.contains("Subject")),
            "no body lines"
        );
    }

    #[tokio::test]
    async fn without_pipelining_commands_go_one_at_a_time() {
        let env = envelope("a@x.org", &["b@y.org"]);
        let script = vec![
            Say(GREET),
            Hear(1),
            Say(EHLO_PLAIN),
            Hear(1),
            Pause(50),
            Say("250 2.1.0 Ok\r\n"),
            Hear(1),
            Pause(50),
            Say("250 2.1.5 Ok\r\n"),
            Hear(1),
            Pause(50),
            Say("354 go\r\n"),
            HearDot,
            Say("250 2.0.0 Ok\r\n"),
            Hear(1),
            Say(BYE),
        ];
        let out = deliver(script, &env, b"hello\r\n").await;
        assert_eq!(
            out.log,
            [
                "S: 220 mx.test ESMTP",
                "C: EHLO mx2.test",
                "S: 250-mx.test",
                "S: 250 8BITMIME",
                "C: MAIL FROM:<a@x.org>",
                "S: 250 2.1.0 Ok",
                "C: RCPT TO:<b@y.org>",
                "S: 250 2.1.5 Ok",
                "C: DATA",
                "S: 354 go",
                "C: hello",
                "C: .",
                "S: 250 2.0.0 Ok",
                "C: QUIT",
                "S: 221 2.0.0 Bye",
            ]
        );
        assert!(matches!(out.results[..], [RcptResult::Sent(_)]));
    }

    #[tokio::test]
    async fn helo_when_ehlo_is_not_implemented() {
        let mut env = envelope("a@x.org", &[]);
        env.ret = Some(Ret::Full);
        let mut r = Recipient::new("b@y.org");
        r.notify = Some(Notify {
            never: true,
            ..Notify::default()
        });
        env.recipients = vec![r];
        let script = vec![
            Say(GREET),
            Hear(1),
            Say("502 5.5.1 Error: command not implemented\r\n"),
            Hear(1),
            Say("250 mx.test\r\n"),
            Hear(1),
            Say("250 Ok\r\n"),
            Hear(1),
            Say("250 Ok\r\n"),
            Hear(1),
            Say("354 go\r\n"),
            HearDot,
            Say("250 Ok\r\n"),
            Hear(1),
            Say(BYE),
        ];
        let out = deliver(script, &env, b"hi\r\n").await;
        assert_eq!(out.ext, Extensions::default());
        assert_eq!(
            out.got,
            "EHLO mx2.test\r\nHELO mx2.test\r\nMAIL FROM:<a@x.org>\r\nRCPT TO:<b@y.org>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n"
        );
        assert_eq!(out.results, [RcptResult::Sent(reply(250, None, "Ok"))]);
    }

    #[tokio::test]
    async fn one_recipient_refused_the_other_sent() {
        let env = envelope("a@x.org", &["b@y.org", "c@y.org"]);
        let script = vec![
            Say(GREET),
            Hear(1),
            Say(EHLO_ALL),
            Hear(4),
            Say("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 <c@y.org>: User unknown\r\n354 go\r\n"),
            HearDot,
            Say("250 2.0.0 Ok\r\n"),
            Hear(1),
            Say(BYE),
        ];
        let out = deliver(script, &env, b"hi\r\n").await;
        assert_eq!(
            out.results,
            [
                RcptResult::Sent(reply(250, Some("2.0.0"), "Ok")),
                RcptResult::Failed(reply(550, Some("5.1.1"), "<c@y.org>: User unknown")),
            ]
        );
    }

    #[tokio::test]
    async fn rcpt_451_defers_and_the_next_message_starts_with_rset() {
        let env = envelope("a@x.org", &["b@y.org"]);
        let script = vec![
            Say(GREET),
            Hear(1),
            Say(EHLO_ALL),
            Hear(3),
            Say("250 2.1.0 Ok\r\n451 4.3.0 try later\r\n554 5.5.1 Error: no valid recipients\r\n"),
            // The transaction is still open on the server: RSET before the next MAIL.
            Hear(1),
            Say("250 2.0.0 Ok\r\n"),
            Hear(3),
            Say("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n"),
            HearDot,
            Say("250 2.0.0 Ok\r\n"),
            Hear(1),
            Say(BYE),
        ];
        let peer = Peer::start(script).await;
        let cfg = cfg(Duration::from_secs(5));
        let mut c = Connection::connect(peer.addr, "mx.test", &cfg, None)
            .await
            .unwrap();
        let msg = Outgoing {
            envelope: &env,
            recipients: &env.recipients,
            message: &Message::from(b"hi\r\n".to_vec()),
        };
        let first = c.send(&msg).await;
        assert_eq!(
            first,
            [RcptResult::Deferred(reply(451, Some("4.3.0"), "try later"))]
        );
        let second = c.send(&msg).await;
        assert!(matches!(second[..], [RcptResult::Sent(_)]));
        c.quit().await;
        let (_, got) = peer.finish().await;
        let got = String::from_utf8(got).unwrap();
        let mail = "MAIL FROM:<a@x.org> SIZE=4\r\nRCPT TO:<b@y.org>\r\nDATA\r\n";
        assert_eq!(
            got,
            format!("EHLO mx2.test\r\n{mail}RSET\r\n{mail}hi\r\n.\r\nQUIT\r\n")
        );
    }

    #[tokio::test]
    async fn data_accepted_without_recipients_is_ended_at_once() {
        let env = envelope("a@x.org", &["b@y.org"]);
        let script = vec![
            Say(GREET),
            Hear(1),
            Say(EHLO_ALL),
            Hear(3),
            Say("250 2.1.0 Ok\r\n550 5.1.1 no such user\r\n354 go\r\n"),
            Hear(1),
            Say("503 5.5.1 no recipients\r\n"),
            Hear(1),
            Say(BYE),
        ];
        let out = deliver(script, &env, b"hi\r\n").await;
        assert!(out.got.ends_with("DATA\r\n.\r\nQUIT\r\n"), "{}", out.got);
        assert_eq!(
            out.results,
            [RcptResult::Failed(reply(
                550,
                Some("5.1.1"),
                "no such user"
            ))]
        );
    }

    #[tokio::test]
    async fn mail_452_defers_everyone_and_sends_no_data() {
        let env = envelope("a@x.org", &["b@y.org", "c@y.org"]);
        let script = vec![
            Say(GREET),
            Hear(1),
            Say(EHLO_ALL),
            Hear(4),
            Say("452 4.3.1 Insufficient system storage\r\n503 5.5.1 Error: need MAIL command\r\n503 5.5.1 Error: need MAIL command\r\n503 5.5.1 Error: need RCPT command\r\n"),
            Hear(1),
            Say(BYE),
        ];
        let out = deliver(script, &env, b"hi\r\n").await;
        let full = reply(452, Some("4.3.1"), "Insufficient system storage");
        assert_eq!(
            out.results,
            [
                RcptResult::Deferred(full.clone()),
                RcptResult::Deferred(full)
            ]
        );
        assert!(out.got.ends_with("DATA\r\nQUIT\r\n"), "{}", out.got);

        // Without pipelining nothing follows the refused MAIL.
        let script = vec![
            Say(GREET),
            Hear(1),
            Say(EHLO_PLAIN),
            Hear(1),
            Say("452 4.3.1 Insufficient system storage\r\n"),
            Hear(1),
            Say(BYE),
        ];
        let out = deliver(script, &env, b"hi\r\n").await;
        assert_eq!(out.got, "EHLO mx2.test\r\nMAIL FROM:<a@x.org>\r\nQUIT\r\n");
        assert!(out
            .results
            .iter()
            .all(|r| matches!(r, RcptResult::Deferred(r) if r.code == 452)));
    }

    #[tokio::test]
    async fn final_dot_554_fails_everyone() {
        let env = envelope("a@x.org", &["b@y.org", "c@y.org"]);
        let script = vec![
            Say(GREET),
            Hear(1),
            Say(EHLO_ALL),
            Hear(4),
            Say("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n"),
            HearDot,
            Say("554 5.7.1 rejected: spam\r\n"),
            Hear(1),
            Say(BYE),
        ];
        let out = deliver(script, &env, b"hi\r\n").await;
        let spam = reply(554, Some("5.7.1"), "rejected: spam");
        assert_eq!(
            out.results,
            [RcptResult::Failed(spam.clone()), RcptResult::Failed(spam)]
        );
    }

    #[tokio::test]
    async fn smtputf8_needed_but_not_offered_fails_without_a_word() {
        let ehlo = "250-mx.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 DSN\r\n";
        let script = vec![Say(GREET), Hear(1), Say(ehlo), Hear(1), Say(BYE)];
        let env = envelope("a@x.org", &["jöran@y.org"]);
        let out = deliver(script, &env, b"hi\r\n").await;
        assert_eq!(out.got, "EHLO mx2.test\r\nQUIT\r\n");
        let [RcptResult::Failed(r)] = &out.results[..] else {
            panic!("{:?}", out.results)
        };
        assert_eq!((r.code, r.status.as_deref()), (550, Some("5.6.7")));
        assert!(r.text.ends_with("does not support SMTPUTF8"), "{r}");

        // The envelope's own SMTPUTF8 flag is enough.
        let script = vec![Say(GREET), Hear(1), Say(ehlo), Hear(1), Say(BYE)];
        let mut env = envelope("a@x.org", &["b@y.org"]);
        env.smtputf8 = true;
        let out = deliver(script, &env, b"hi\r\n").await;
        assert_eq!(out.got, "EHLO mx2.test\r\nQUIT\r\n");
        assert!(matches!(&out.results[..], [RcptResult::Failed(r)] if r.dsn_status() == "5.6.7"));
    }

    #[tokio::test]
    async fn smtputf8_parameter_when_needed_and_offered() {
        let script = vec![
            Say(GREET),
            Hear(1),
            Say(EHLO_ALL),
            Hear(3),
            Say("250 Ok\r\n250 Ok\r\n354 go\r\n"),
            HearDot,
            Say("250 Ok\r\n"),
            Hear(1),
            Say(BYE),
        ];
        let env = envelope("a@x.org", &["jöran@y.org"]);
        let out = deliver(script, &env, b"hi\r\n").await;
        assert!(out
            .got
            .contains("MAIL FROM:<a@x.org> SIZE=4 SMTPUTF8\r\nRCPT TO:<jöran@y.org>\r\n"));
        assert!(matches!(out.results[..], [RcptResult::Sent(_)]));
    }

    #[tokio::test]
    async fn message_over_the_size_limit_fails_without_a_word() {
        let ehlo = "250-mx.test\r\n250-PIPELINING\r\n250 SIZE 10\r\n";
        let script = vec![Say(GREET), Hear(1), Say(ehlo), Hear(1), Say(BYE)];
        let env = envelope("a@x.org", &["b@y.org", "c@y.org"]);
        let out = deliver(script, &env, b"01234567890123456789\r\n").await;
        assert_eq!(out.ext.size, Some(10));
        assert_eq!(out.got, "EHLO mx2.test\r\nQUIT\r\n");
        assert_eq!(out.results.len(), 2);
        assert!(out.results.iter().all(
            |r| matches!(r, RcptResult::Failed(r) if r.code == 552 && r.dsn_status() == "5.3.4")
        ));
    }

    #[tokio::test]
    async fn two_messages_over_one_connection() {
        let env1 = envelope("a@x.org", &["b@y.org"]);
        let env2 = envelope("", &["c@y.org"]);
        let script = vec![
            Say(GREET),
            Hear(1),
            Say(EHLO_ALL),
            Hear(3),
            Say("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n"),
            HearDot,
            Say("250 2.0.0 Ok: queued as 1\r\n"),
            Hear(1),
            Say("250 2.0.0 Ok\r\n"),
            Hear(3),
            Say("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n"),
            HearDot,
            Say("250 2.0.0 Ok: queued as 2\r\n"),
            Hear(1),
            Say(BYE),
        ];
        let peer = Peer::start(script).await;
        let cfg = cfg(Duration::from_secs(5));
        let mut c = Connection::connect(peer.addr, "mx.test", &cfg, None)
            .await
            .unwrap();
        assert_eq!(c.peer(), peer.addr);
        assert_eq!(c.host_name(), "mx.test");
        for (env, body, n) in [(&env1, &b"one\r\n"[..], "1"), (&env2, &b"two\r\n"[..], "2")] {
            let msg = Outgoing {
                envelope: env,
                recipients: &env.recipients,
                message: &Message::from(body.to_vec()),
            };
            let r = c.send(&msg).await;
            assert_eq!(
                r,
                [RcptResult::Sent(reply(
                    250,
                    Some("2.0.0"),
                    &format!("Ok: queued as {n}")
                ))]
            );
            if n == "1" {
                c.reset().await.unwrap();
            }
        }
        c.quit().await;
        let (_, got) = peer.finish().await;
        assert_eq!(
            String::from_utf8(got).unwrap(),
            "EHLO mx2.test\r\n\
             MAIL FROM:<a@x.org> SIZE=5\r\nRCPT TO:<b@y.org>\r\nDATA\r\none\r\n.\r\n\
             RSET\r\n\
             MAIL FROM:<> SIZE=5\r\nRCPT TO:<c@y.org>\r\nDATA\r\ntwo\r\n.\r\n\
             QUIT\r\n"
        );
    }

    #[tokio::test]
    async fn a_stalled_server_times_out() {
        let script = vec![
            Say(GREET),
            Hear(1),
            Say(EHLO_ALL),
            Hear(3),
            Say("250 Ok\r\n250 Ok\r\n354 go\r\n"),
            HearDot,
            Stall,
        ];
        let peer = Peer::start(script).await;
        // Only the stage under test is short, so a busy machine cannot time out another.
        let mut cfg = cfg(Duration::from_secs(5));
        cfg.timeouts.data_term = Duration::from_millis(300);
        let mut c = Connection::connect(peer.addr, "mx.test", &cfg, None)
            .await
            .unwrap();
        let env = envelope("a@x.org", &["b@y.org"]);
        let msg = Outgoing {
            envelope: &env,
            recipients: &env.recipients,
            message: &Message::from(b"hi\r\n".to_vec()),
        };
        let started = std::time::Instant::now();
        // Waiting for the reply to the dot: sent, outcome unknown (a deferral, not Unsent).
        let r = c.send(&msg).await;
        assert!(
            matches!(&r[..], [RcptResult::Deferred(d)] if d.text.contains("timeout waiting for end of data") && d.text.contains("delivered twice")),
            "{r:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(!c.is_usable());
        assert!(c.reset().await.is_err());
        c.quit().await;

        // A server that never greets.
        let peer = Peer::start(vec![Stall]).await;
        cfg.timeouts.greeting = Duration::from_millis(300);
        let err = Connection::connect(peer.addr, "mx.test", &cfg, None)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, ClientError::Timeout("greeting")), "{err}");
    }

    #[tokio::test]
    async fn refused_greeting_is_an_error() {
        let script = vec![Say("554 5.7.1 go away\r\n"), Hear(1), Say(BYE)];
        let peer = Peer::start(script).await;
        let cfg = cfg(Duration::from_secs(5));
        let err = Connection::connect(peer.addr, "mx.test", &cfg, None)
            .await
            .err()
            .unwrap();
        assert!(err.is_permanent());
        assert_eq!(err.to_string(), "greeting refused: 554 5.7.1 go away");
        let (_, got) = peer.finish().await;
        assert_eq!(got, b"QUIT\r\n");

        let script = vec![Say(GREET), Hear(1), Say("421 4.3.2 busy\r\n")];
        let peer = Peer::start(script).await;
        let err = Connection::connect(peer.addr, "mx.test", &cfg, None)
            .await
            .err()
            .unwrap();
        assert!(matches!(&err, ClientError::Hello(r) if r.code == 421));
        assert!(!err.is_permanent());
    }

    #[tokio::test]
    async fn replies_split_across_segments() {
        let env = envelope("a@x.org", &["b@y.org"]);
        let script = vec![
            Say("22"),
            Pause(30),
            Say("0-mx.test ESMTP\r"),
            Pause(30),
            Say("\n220 welcome\r\n"),
            Hear(1),
            Say("250-mx.test\r\n250-PIPE"),
            Pause(30),
            Say("LINING\r\n250 DSN\r\n"),
            Hear(3),
            Say("250 2.1.0 Ok\r\n25"),
            Pause(30),
            Say("0 2.1.5 Ok\r\n354 go\r\n"),
            HearDot,
            Say("250-2.0.0 Ok\r\n"),
            Pause(30),
            Say("250 2.0.0 queued\r\n"),
            Hear(1),
            Say(BYE),
        ];
        let out = deliver(script, &env, b"hi\r\n").await;
        assert!(out.ext.pipelining && out.ext.dsn);
        assert_eq!(
            out.results,
            [RcptResult::Sent(reply(250, Some("2.0.0"), "Ok queued"))]
        );
    }

    #[tokio::test]
    async fn a_large_body_arrives_whole() {
        let mut message = Vec::new();
        let mut expected = Vec::new();
        for i in 0..20_000 {
            let line = if i % 7 == 0 {
                format!(".dot {i}\n")
            } else {
                format!("line {i} {}\r\n", "x".repeat(i % 50))
            };
            message.extend_from_slice(line.as_bytes());
            encode_line(line.as_bytes(), &mut expected);
        }
        expected.extend_from_slice(b".\r\n");
        assert!(message.len() > 4 * BODY_CHUNK);
        let env = envelope("a@x.org", &["b@y.org"]);
        let script = vec![
            Say(GREET),
            Hear(1),
            Say(EHLO_ALL),
            Hear(3),
            Say("250 Ok\r\n250 Ok\r\n354 go\r\n"),
            HearDot,
            Say("250 Ok\r\n"),
            Hear(1),
            Say(BYE),
        ];
        let out = deliver(script, &env, &message).await;
        let start = out.got.find("DATA\r\n").unwrap() + 6;
        let end = out.got.len() - "QUIT\r\n".len();
        assert_eq!(&out.got.as_bytes()[start..end], &expected[..]);
        assert!(matches!(out.results[..], [RcptResult::Sent(_)]));
    }

    const LHLO_REPLY: &str =
        "250-lmtp.test\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 PIPELINING\r\n";
    const LMTP_GREET: &str = "220 lmtp.test LMTP ready\r\n";

    /// Connects over LMTP to a TCP peer playing `script`, sends one message (or fails).
    async fn deliver_lmtp(
        script: Vec<Step>,
        env: &Envelope,
        message: &[u8],
    ) -> (Vec<RcptResult>, bool, Outcome) {
        let peer = Peer::start(script).await;
        let cfg = cfg(Duration::from_secs(5));
        let target = LmtpTarget::Tcp(peer.addr);
        let mut c = Connection::connect_lmtp(&target, &cfg, None).await.unwrap();
        assert!(c.is_lmtp());
        let ext = c.extensions().clone();
        let msg = Outgoing {
            envelope: env,
            recipients: &env.recipients,
            message: &Message::from(message.to_vec()),
        };
        let results = c.send(&msg).await;
        let usable = c.is_usable();
        c.quit().await;
        let (log, got) = peer.finish().await;
        let out = Outcome {
            results: results.clone(),
            ext,
            log,
            got: String::from_utf8(got).unwrap(),
        };
        (results, usable, out)
    }

    #[tokio::test]
    async fn lmtp_one_reply_per_recipient_after_the_dot() {
        let env = envelope("a@x.org", &["b@y.org", "c@y.org", "d@y.org"]);
        let script = vec![
            Say(LMTP_GREET),
            Hear(1),
            Say(LHLO_REPLY),
            Hear(5),
            Say("250 2.1.0 OK\r\n250 2.1.5 OK\r\n250 2.1.5 OK\r\n250 2.1.5 OK\r\n354 OK\r\n"),
            HearDot,
            // The replies arrive one by one, as an LMTP server delivers.
            Say("250 2.0.0 <b@y.org> Saved\r\n"),
            Pause(30),
            Say("452 4.2.2 <c@y.org> Mailbox is full\r\n"),
            Pause(30),
            Say("550 5.1.1 <d@y.org> No such user\r\n"),
            Hear(1),
            Say(BYE),
        ];
        let (results, usable, out) = deliver_lmtp(script, &env, b"hi\r\n.x\r\n").await;
        assert!(usable);
        assert_eq!(
            results,
            [
                RcptResult::Sent(reply(250, Some("2.0.0"), "<b@y.org> Saved")),
                RcptResult::Deferred(reply(452, Some("4.2.2"), "<c@y.org> Mailbox is full")),
                RcptResult::Failed(reply(550, Some("5.1.1"), "<d@y.org> No such user")),
            ]
        );
        assert!(out.ext.esmtp && out.ext.pipelining && out.ext.enhanced_status_codes);
        assert_eq!(
            out.got,
            "LHLO mx2.test\r\n\
             MAIL FROM:<a@x.org>\r\n\
             RCPT TO:<b@y.org>\r\nRCPT TO:<c@y.org>\r\nRCPT TO:<d@y.org>\r\n\
             DATA\r\nhi\r\n..x\r\n.\r\nQUIT\r\n"
        );
    }

    #[tokio::test]
    async fn lmtp_recipients_refused_at_rcpt_keep_their_result() {
        let env = envelope("a@x.org", &["b@y.org", "c@y.org", "d@y.org"]);
        let script = vec![
            Say(LMTP_GREET),
            Hear(1),
            Say(LHLO_REPLY),
            Hear(5),
            Say("250 2.1.0 OK\r\n250 2.1.5 OK\r\n550 5.1.1 <c@y.org> unknown\r\n250 2.1.5 OK\r\n354 OK\r\n"),
            HearDot,
            // Two replies: for b and d, the recipients accepted at RCPT.
            Say("250 2.0.0 <b@y.org> Saved\r\n452 4.3.1 <d@y.org> no space\r\n"),
            Hear(1),
            Say(BYE),
        ];
        let (results, usable, _) = deliver_lmtp(script, &env, b"hi\r\n").await;
        assert!(usable);
        assert_eq!(
            results,
            [
                RcptResult::Sent(reply(250, Some("2.0.0"), "<b@y.org> Saved")),
                RcptResult::Failed(reply(550, Some("5.1.1"), "<c@y.org> unknown")),
                RcptResult::Deferred(reply(452, Some("4.3.1"), "<d@y.org> no space")),
            ]
        );
    }

    #[tokio::test]
    async fn lmtp_connection_lost_among_the_replies_defers_the_rest() {
        let env = envelope("a@x.org", &["b@y.org", "c@y.org", "d@y.org"]);
        let script = vec![
            Say(LMTP_GREET),
            Hear(1),
            Say(LHLO_REPLY),
            Hear(5),
            Say("250 OK\r\n250 OK\r\n250 OK\r\n250 OK\r\n354 OK\r\n"),
            HearDot,
            Say("250 2.0.0 <b@y.org> Saved\r\n"),
            Close,
        ];
        let (results, usable, _) = deliver_lmtp(script, &env, b"hi\r\n").await;
        assert!(!usable);

        assert_eq!(
            results[0],
            RcptResult::Sent(reply(250, Some("2.0.0"), "<b@y.org> Saved"))
        );
        for r in &results[1..] {
            let RcptResult::Deferred(r) = r else {
                panic!("{results:?}")
            };
            assert_eq!((r.code, r.dsn_status().as_str()), (451, "4.4.2"));
            assert!(r.text.starts_with("lost connection with 127.0.0.1["), "{r}");
        }

        // Lost before the first reply: outcome unknown, as in SMTP (everyone is retried).
        let script = vec![
            Say(LMTP_GREET),
            Hear(1),
            Say(LHLO_REPLY),
            Hear(4),
            Say("250 OK\r\n250 OK\r\n250 OK\r\n354 OK\r\n"),
            HearDot,
            Close,
        ];
        let env = envelope("a@x.org", &["b@y.org", "c@y.org"]);
        let (results, usable, _) = deliver_lmtp(script, &env, b"hi\r\n").await;
        assert!(!usable);
        assert!(
            results.iter().all(
                |r| matches!(r, RcptResult::Deferred(d) if d.text.contains("delivered twice"))
            ),
            "{results:?}"
        );

        // A 421 among the replies: the rest were not delivered (sent again on a new session).
        let script = vec![
            Say(LMTP_GREET),
            Hear(1),
            Say(LHLO_REPLY),
            Hear(5),
            Say("250 OK\r\n250 OK\r\n250 OK\r\n250 OK\r\n354 OK\r\n"),
            HearDot,
            Say("250 2.0.0 Saved\r\n421 4.3.2 shutting down\r\n"),
            Close,
        ];
        let env = envelope("a@x.org", &["b@y.org", "c@y.org", "d@y.org"]);
        let (results, usable, _) = deliver_lmtp(script, &env, b"hi\r\n").await;
        assert!(!usable);
        let bye = reply(421, Some("4.3.2"), "shutting down");
        assert_eq!(
            results,
            [
                RcptResult::Sent(reply(250, Some("2.0.0"), "Saved")),
                RcptResult::Unsent(bye.clone()),
                RcptResult::Unsent(bye),
            ]
        );
    }

    #[tokio::test]
    async fn lmtp_two_messages_and_a_refused_data() {
        let env = envelope("a@x.org", &["b@y.org", "c@y.org"]);
        let script = vec![
            Say(LMTP_GREET),
            Hear(1),
            Say(LHLO_REPLY),
            Hear(4),
            Say("250 OK\r\n250 OK\r\n250 OK\r\n354 OK\r\n"),
            HearDot,
            Say("250 2.0.0 one\r\n250 2.0.0 two\r\n"),
            // The second message: DATA refused, which settles both accepted recipients.
            Hear(4),
            Say("250 OK\r\n250 OK\r\n250 OK\r\n554 5.3.0 no\r\n"),
            Hear(1),
            Say("250 2.0.0 OK\r\n"),
            Hear(1),
            Say(BYE),
        ];
        let peer = Peer::start(script).await;
        let cfg = cfg(Duration::from_secs(5));
        let mut c = Connection::connect_lmtp(&LmtpTarget::Tcp(peer.addr), &cfg, None)
            .await
            .unwrap();
        let msg = Outgoing {
            envelope: &env,
            recipients: &env.recipients,
            message: &Message::from(b"hi\r\n".to_vec()),
        };
        let first = c.send(&msg).await;
        assert!(first.iter().all(|r| matches!(r, RcptResult::Sent(_))));
        let second = c.send(&msg).await;
        let no = reply(554, Some("5.3.0"), "no");
        assert_eq!(
            second,
            [RcptResult::Failed(no.clone()), RcptResult::Failed(no)]
        );
        c.reset().await.unwrap();
        c.quit().await;
        let (_, got) = peer.finish().await;
        let tx = "MAIL FROM:<a@x.org>\r\nRCPT TO:<b@y.org>\r\nRCPT TO:<c@y.org>\r\nDATA\r\n";
        assert_eq!(
            String::from_utf8(got).unwrap(),
            format!("LHLO mx2.test\r\n{tx}hi\r\n.\r\n{tx}RSET\r\nQUIT\r\n")
        );
    }

    #[tokio::test]
    async fn lhlo_refused_is_an_error_without_helo() {
        let script = vec![
            Say(LMTP_GREET),
            Hear(1),
            Say("500 5.5.1 Unknown command\r\n"),
            Hear(1),
            Say(BYE),
        ];
        let peer = Peer::start(script).await;
        let cfg = cfg(Duration::from_secs(5));
        let err = Connection::connect_lmtp(&LmtpTarget::Tcp(peer.addr), &cfg, None)
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&err, ClientError::Lhlo(r) if r.code == 500),
            "{err}"
        );
        assert!(err.is_permanent());
        assert_eq!(err.to_string(), "LHLO refused: 500 5.5.1 Unknown command");
        let (_, got) = peer.finish().await;
        assert_eq!(got, b"LHLO mx2.test\r\nQUIT\r\n");
    }

    #[tokio::test]
    async fn lmtp_over_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lmtp.sock");
        let script = vec![
            Say(LMTP_GREET),
            Hear(1),
            Say(LHLO_REPLY),
            Hear(3),
            Say("250 2.1.0 OK\r\n250 2.1.5 OK\r\n354 OK\r\n"),
            HearDot,
            Say("250 2.0.0 <b@y.org> Saved\r\n"),
            Hear(1),
            Say(BYE),
        ];
        let peer = Peer::start_unix(&path, script);
        let cfg = cfg(Duration::from_secs(5));
        let target = LmtpTarget::parse(path.to_str().unwrap()).unwrap();
        let mut c = Connection::connect_lmtp(&target, &cfg, None).await.unwrap();
        assert_eq!(c.relay(), path.display().to_string());
        assert_eq!(c.peer(), SocketAddr::from(([0, 0, 0, 0], 0)));
        assert_eq!(c.host_name(), path.display().to_string());
        let env = envelope("", &["b@y.org"]);
        let msg = Outgoing {
            envelope: &env,
            recipients: &env.recipients,
            message: &Message::from(b"Subject: x\r\n\r\nbody\r\n".to_vec()),
        };
        let r = c.send(&msg).await;
        assert_eq!(
            r,
            [RcptResult::Sent(reply(
                250,
                Some("2.0.0"),
                "<b@y.org> Saved"
            ))]
        );
        c.quit().await;
        let (_, got) = peer.finish().await;
        assert_eq!(
            String::from_utf8(got).unwrap(),
            "LHLO mx2.test\r\nMAIL FROM:<>\r\nRCPT TO:<b@y.org>\r\nDATA\r\n\
             Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n"
        );
    }

    #[tokio::test]
    async fn relay_names_the_peer() {
        let peer = Peer::start(vec![
            Say(GREET),
            Hear(1),
            Say(EHLO_PLAIN),
            Hear(1),
            Say(BYE),
        ])
        .await;
        let cfg = cfg(Duration::from_secs(5));
        let c = Connection::connect(peer.addr, "mx.test", &cfg, None)
            .await
            .unwrap();
        assert!(!c.is_lmtp());
        assert_eq!(
            c.relay(),
            format!("mx.test[127.0.0.1]:{}", peer.addr.port())
        );
        c.quit().await;
        peer.finish().await;
    }

    #[test]
    fn lmtp_targets() {
        let tcp = |s: &str| LmtpTarget::Tcp(s.parse().unwrap());
        assert_eq!(LmtpTarget::parse("127.0.0.1:24"), Ok(tcp("127.0.0.1:24")));
        assert_eq!(LmtpTarget::parse("[::1]:2424"), Ok(tcp("[::1]:2424")));
        assert_eq!(
            LmtpTarget::parse("inet:10.0.0.1:24"),
            Ok(tcp("10.0.0.1:24"))
        );
        assert_eq!(
            LmtpTarget::parse("/run/dovecot/lmtp"),
            Ok(LmtpTarget::Unix(PathBuf::from("/run/dovecot/lmtp")))
        );
        assert_eq!(
            LmtpTarget::parse("unix:/run/dovecot/lmtp"),
            Ok(LmtpTarget::Unix(PathBuf::from("/run/dovecot/lmtp")))
        );
        for bad in [
            "",
            "127.0.0.1",
            "127.0.0.1:0",
            "::1:24",
            "mail.example.org:24",
            "run/dovecot/lmtp",
            "unix:relative",
            "127.0.0.1:99999",
        ] {
            let e = LmtpTarget::parse(bad).unwrap_err();
            assert!(e.starts_with("bad LMTP target"), "{bad:?}: {e}");
        }
        assert_eq!(tcp("[::1]:24").to_string(), "[::1]:24");
        assert_eq!(LmtpTarget::Unix(PathBuf::from("/s")).to_string(), "/s");
    }

    #[test]
    fn reply_parsing() {
        let check = |text: &str, expected: Option<(u16, Option<&str>, &str)>| {
            let got = Reply::parse(text);
            let expected = expected.map(|(c, s, t)| reply(c, s, t));
            assert_eq!(got, expected, "{text:?}");
        };
        check("250 Ok\r\n", Some((250, None, "Ok")));
        check("250 2.1.0 Ok\r\n", Some((250, Some("2.1.0"), "Ok")));
        check("250 2.1.0\r\n", Some((250, Some("2.1.0"), "")));
        check("250\r\n", Some((250, None, "")));
        check(
            "354 End data with <CR><LF>.<CR><LF>\r\n",
            Some((354, None, "End data with <CR><LF>.<CR><LF>")),
        );
        check(
            "550-5.1.1 The email account\r\n550-5.1.1 does not exist.\r\n550 5.1.1 https://x\r\n",
            Some((
                550,
                Some("5.1.1"),
                "The email account does not exist. https://x",
            )),
        );
        check(
            "250-mx.test\r\n250-PIPELINING\r\n250 SIZE 10\r\n",
            Some((250, None, "mx.test PIPELINING SIZE 10")),
        );
        check(
            "452 4.5.3 too many\n",
            Some((452, Some("4.5.3"), "too many")),
        );
        check(
            "421 4.4.2 x.test closing\r\n",
            Some((421, Some("4.4.2"), "x.test closing")),
        );
        check("550 5.1.10 no\r\n", Some((550, Some("5.1.10"), "no")));
        // The enhanced code must be of the reply's class and well formed.
        check("250 5.0.0 odd\r\n", Some((250, None, "5.0.0 odd")));
        check("550 5.1.1.1 x\r\n", Some((550, None, "5.1.1.1 x")));
        check("550 5.1 x\r\n", Some((550, None, "5.1 x")));
        check("550 5.1.1234 x\r\n", Some((550, None, "5.1.1234 x")));
        // Incomplete or malformed.
        check("250-first\r\n", None);
        check("250 Ok", None);
        check("hello\r\n", None);
        check("25 x\r\n", None);
        check("250xOk\r\n", None);
        check("650 no such class\r\n", None);
        // Only the first reply counts.
        check("250 one\r\n250 two\r\n", Some((250, None, "one")));
    }

    #[test]
    fn body_encoding() {
        let encode = |m: &[u8]| {
            let mut out = Vec::new();
            for line in m.split_inclusive(|&b| b == b'\n') {
                encode_line(line, &mut out);
            }
            out.extend_from_slice(b".\r\n");
            String::from_utf8(out).unwrap()
        };
        assert_eq!(encode(b""), ".\r\n");
        assert_eq!(encode(b"a"), "a\r\n.\r\n");
        assert_eq!(encode(b"a\nb\r\n"), "a\r\nb\r\n.\r\n");
        assert_eq!(encode(b".\n..x\r\n.y"), "..\r\n...x\r\n..y\r\n.\r\n");
        assert_eq!(encode(b"x\r"), "x\r\n.\r\n");
        assert_eq!(encode(b"\n\n"), "\r\n\r\n.\r\n");
        assert_eq!(encode(b"a.b\r\n"), "a.b\r\n.\r\n");
    }

    #[test]
    fn parameters_and_paths() {
        assert_eq!(xtext("a+b=c d\u{e9}"), "a+2Bb+3Dc+20d+C3+A9");
        assert_eq!(xtext("plain@x.org"), "plain@x.org");
        assert_eq!(path(""), "<>");
        assert_eq!(path("a.b@x.org"), "<a.b@x.org>");
        assert_eq!(path("postmaster"), "<postmaster>");
        assert_eq!(path("john doe@x.org"), "<\"john doe\"@x.org>");
        assert_eq!(path("a..b@x.org"), "<\"a..b\"@x.org>");
        assert_eq!(path("a\"b\\c@x.org"), "<\"a\\\"b\\\\c\"@x.org>");
        assert_eq!(
            path("\"already quoted\"@x.org"),
            "<\"already quoted\"@x.org>"
        );
        assert_eq!(path("a@b@x.org"), "<\"a@b\"@x.org>");
        assert_eq!(path("jöran@x.org"), "<jöran@x.org>");
        let n = |never, success, failure, delay| {
            notify_value(&Notify {
                never,
                success,
                failure,
                delay,
            })
        };
        assert_eq!(n(true, false, false, false).as_deref(), Some("NEVER"));
        assert_eq!(
            n(false, true, true, true).as_deref(),
            Some("SUCCESS,FAILURE,DELAY")
        );
        assert_eq!(n(false, false, false, true).as_deref(), Some("DELAY"));
        assert_eq!(n(false, false, false, false), None);
    }

    /// Connects to a peer playing `script` and sends `env` to all its recipients, `times`
    /// times over the one session; the results of each send and whether the session is
    /// still usable.
    async fn sends(
        script: Vec<Step>,
        env: &Envelope,
        times: usize,
    ) -> (Vec<Vec<RcptResult>>, bool) {
        let peer = Peer::start(script).await;
        let cfg = cfg(Duration::from_secs(5));
        let mut c = Connection::connect(peer.addr, "mx.test", &cfg, None)
            .await
            .unwrap();
        let msg = Outgoing {
            envelope: env,
            recipients: &env.recipients,
            message: &Message::from(b"hi\r\n".to_vec()),
        };
        let mut all = Vec::new();
        for _ in 0..times {
            all.push(c.send(&msg).await);
        }
        let usable = c.is_usable();
        c.quit().await;
        let _ = peer.finish().await;
        (all, usable)
    }

    #[tokio::test]
    async fn too_many_recipients_are_unsent_and_the_session_goes_on() {
        let env = envelope("a@x.org", &["b@y.org", "c@y.org", "d@y.org"]);
        let script = vec![
            Say(GREET),
            Hear(1),
            Say(EHLO_ALL),
            Hear(5),
            Say("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n452 4.5.3 Error: too many recipients\r\n452 too many recipients\r\n354 go\r\n"),
            HearDot,
            Say("250 2.0.0 Ok: queued\r\n"),
            Hear(1),
            Say(BYE),
        ];
        let (r, usable) = sends(script, &env, 1).await;
        assert!(usable);
        assert!(
            matches!(&r[0][..], [RcptResult::Sent(_), RcptResult::Unsent(a), RcptResult::Unsent(b)]
            if a.code == 452 && b.code == 452),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn a_421_at_mail_is_unsent_and_ends_the_session() {
        let env = envelope("a@x.org", &["b@y.org", "c@y.org"]);
        let script = vec![
            Say(GREET),
            Hear(1),
            Say(EHLO_ALL),
            Hear(4),
            Say("421 4.7.0 mx.test Error: too many messages, closing\r\n"),
            Close,
        ];
        let (r, usable) = sends(script, &env, 1).await;
        assert!(!usable);
        assert!(
            r[0].iter()
                .all(|x| matches!(x, RcptResult::Unsent(x) if x.code == 421)),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn a_temporary_mail_refusal_after_messages_is_the_session_cap() {
        let env = envelope("a@x.org", &["b@y.org"]);
        let script = vec![
            Say(GREET),
            Hear(1),
            Say(EHLO_ALL),
            Hear(3),
            Say("250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n"),
            HearDot,
            Say("250 2.0.0 Ok\r\n"),
            Hear(3),
            Say("452 4.3.2 too many messages in this session\r\n503 5.5.1 no MAIL\r\n503 5.5.1 no MAIL\r\n"),
            Hear(1),
            Say(BYE),
        ];
        let (r, usable) = sends(script, &env, 2).await;
        assert!(matches!(&r[0][..], [RcptResult::Sent(_)]), "{r:?}");
        assert!(
            matches!(&r[1][..], [RcptResult::Unsent(x)] if x.code == 452),
            "{r:?}"
        );
        assert!(!usable, "the capped session is ended");

        // On a fresh session the same refusal is the server's verdict for the message.
        let script = vec![
            Say(GREET),
            Hear(1),
            Say(EHLO_ALL),
            Hear(3),
            Say("452 4.3.1 Insufficient system storage\r\n503 5.5.1 no MAIL\r\n503 5.5.1 no MAIL\r\n"),
            Hear(1),
            Say(BYE),
        ];
        let (r, usable) = sends(script, &env, 1).await;
        assert!(
            matches!(&r[0][..], [RcptResult::Deferred(x)] if x.code == 452),
            "{r:?}"
        );
        assert!(usable);
    }

    #[tokio::test]
    async fn a_connection_lost_before_the_dot_is_unsent() {
        let env = envelope("a@x.org", &["b@y.org"]);
        let script = vec![Say(GREET), Hear(1), Say(EHLO_ALL), Hear(3), Close];
        let (r, usable) = sends(script, &env, 1).await;
        assert!(!usable);
        assert!(
            matches!(&r[0][..], [RcptResult::Unsent(x)] if x.text.contains("lost connection")),
            "{r:?}"
        );
    }
}
