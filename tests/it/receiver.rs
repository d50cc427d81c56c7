//! A scriptable SMTP receiver for the delivery tests: the next hop that mxspool delivers to.
//!
//! It listens on a given loopback address (all of 127.0.0.0/8 is local on Linux, so several
//! "MX hosts" can share one port), runs on its own thread with its own tokio runtime (so
//! plain `#[test]`s can use it), records every message it accepts, and stops on drop.
//! Its [`Behaviour`] can be changed while it runs; each command reads the current one.

use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// How the receiver answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Takes every message.
    Accept,
    /// `421` greeting, then closes: the host is "down" at the SMTP level.
    TempFailAll,
    /// These addresses get `550 5.1.1`; the others are accepted.
    RefuseRcpt(Vec<String>),
    /// These addresses get `450 4.2.0`; the others are accepted.
    TempFailRcpt(Vec<String>),
    /// The final dot gets this code (e.g. 451 or 554); the message is not recorded.
    DataFail(u16),
}

/// What the receiver offers in EHLO.
#[derive(Clone, Debug)]
pub struct Options {
    /// False: EHLO gets `502`, only HELO works.
    pub ehlo: bool,
    pub pipelining: bool,
    pub smtputf8: bool,
    /// The SIZE limit advertised (and enforced at MAIL).
    pub size: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ehlo: true,
            pipelining: true,
            smtputf8: true,
            size: 50 * 1024 * 1024,
        }
    }
}

/// A message the receiver accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// The reverse path without angle brackets (empty for `<>`).
    pub sender: String,
    /// The accepted recipients, without angle brackets.
    pub recipients: Vec<String>,
    /// The message as sent, dot-unstuffed, without the final dot line.
    pub data: Vec<u8>,
    /// Everything after `MAIL FROM:<...>`, trimmed (e.g. `SIZE=123 BODY=8BITMIME`).
    pub mail_params: String,
    /// Everything after each accepted `RCPT TO:<...>`, trimmed; one per recipient.
    pub rcpt_params: Vec<String>,
    /// The connection that carried it: 0 for the first accepted connection, and so on.
    pub connection: u64,
}

struct State {
    behaviour: Behaviour,
    options: Options,
    messages: Vec<ReceivedMessage>,
    connections: u64,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when a message is recorded.
    arrived: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct Receiver {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Receiver {
    /// Listens on `addr` (port 0: any free port, see [`Receiver::addr`]). Panics if it
    /// cannot bind.
    pub fn start(addr: SocketAddr, behaviour: Behaviour) -> Receiver {
        Receiver::start_with(addr, behaviour, Options::default())
    }

    pub fn start_with(addr: SocketAddr, behaviour: Behaviour, options: Options) -> Receiver {
        let listener = std::net::TcpListener::bind(addr)
            .unwrap_or_else(|e| panic!("receiver cannot bind {addr}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                behaviour,
                options,
                messages: Vec::new(),
                connections: 0,
            }),
            arrived: Condvar::new(),
        });
        let (stop, stopped) = oneshot::channel();
        let s = shared.clone();
        let thread = thread::Builder::new()
            .name(format!("receiver {addr}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async move {
                    let listener = TcpListener::from_std(listener).unwrap();
                    tokio::select! {
                        _ = stopped => {}
                        _ = accept(listener, s) => {}
                    }
                });
                // Dropping the runtime drops every connection task and closes its socket.
            })
            .unwrap();
        Receiver {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn messages(&self) -> Vec<ReceivedMessage> {
        self.shared.lock().messages.clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.lock().connections
    }

    pub fn set_behaviour(&self, b: Behaviour) {
        self.shared.lock().behaviour = b;
    }

    /// Takes effect for the next EHLO.
    pub fn set_options(&self, o: Options) {
        self.shared.lock().options = o;
    }

    /// Waits until `n` messages have arrived; false if `timeout` passed first.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        while state.messages.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state = self
                .shared
                .arrived
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let index = {
                    let mut s = shared.lock();
                    s.connections += 1;
                    s.connections - 1
                };
                tokio::spawn(serve(stream, index, shared.clone()));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// The transaction after MAIL.
struct Transaction {
    sender: String,
    mail_params: String,
    recipients: Vec<String>,
    rcpt_params: Vec<String>,
}

/// One connection. Input is kept in one buffer; every complete line in it is answered
/// before the replies go out in one write, so pipelined input works.
async fn serve(mut stream: TcpStream, connection: u64, shared: Arc<Shared>) {
    if shared.lock().behaviour == Behaviour::TempFailAll {
        let _ = stream
            .write_all(b"421 4.3.2 receiver.test Service not available, closing channel\r\n")
            .await;
        return;
    }
    let mut out = b"220 receiver.test ESMTP test receiver\r\n".to_vec();
    let mut buf: Vec<u8> = Vec::with_capacity(8192);
    let mut tx: Option<Transaction> = None;
    // Some(body so far) while reading DATA.
    let mut data: Option<Vec<u8>> = None;
    loop {
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            if let Some(body) = data.as_mut() {
                let content = line.strip_suffix(b"\n").unwrap_or(&line);
                let content = content.strip_suffix(b"\r").unwrap_or(content);
                if content == b"." {
                    let body = data.take().unwrap();
                    let t = tx.take().expect("DATA without a transaction");
                    reply(&mut out, &end_of_data(&shared, t, body, connection));
                } else {
                    body.extend_from_slice(line.strip_prefix(b".").unwrap_or(&line));
                }
                continue;
            }
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\r', '\n']);
            let verb = line.get(..4).unwrap_or(line).to_ascii_uppercase();
            match verb.as_str() {
                "EHLO" => {
                    let o = shared.lock().options.clone();
                    if !o.ehlo {
                        reply(&mut out, "502 5.5.2 Error: command not recognized");
                        continue;
                    }
                    let mut r = String::from("250-receiver.test\r\n");
                    if o.pipelining {
                        r.push_str("250-PIPELINING\r\n");
                    }
                    r.push_str(&format!(
                        "250-SIZE {}\r\n250-8BITMIME\r\n250-DSN\r\n",
                        o.size
                    ));
                    if o.smtputf8 {
                        r.push_str("250-SMTPUTF8\r\n");
                    }
                    r.push_str("250 ENHANCEDSTATUSCODES");
                    tx = None;
                    reply(&mut out, &r);
                }
                "HELO" => {
                    tx = None;
                    reply(&mut out, "250 receiver.test");
                }
                "MAIL" => match split_path(line, "MAIL FROM:") {
                    _ if tx.is_some() => reply(&mut out, "503 5.5.1 Error: nested MAIL command"),
                    Some((sender, params)) => {
                        tx = Some(Transaction {
                            sender,
                            mail_params: params,
                            recipients: Vec::new(),
                            rcpt_params: Vec::new(),
                        });
                        reply(&mut out, "250 2.1.0 Ok");
                    }
                    None => reply(&mut out, "501 5.5.4 Syntax: MAIL FROM:<address>"),
                },
                "RCPT" => {
                    let Some(t) = tx.as_mut() else {
                        reply(&mut out, "503 5.5.1 Error: need MAIL command");
                        continue;
                    };
                    let Some((addr, params)) = split_path(line, "RCPT TO:") else {
                        reply(&mut out, "501 5.5.4 Syntax: RCPT TO:<address>");
                        continue;
                    };
                    let listed =
                        |list: &[String]| list.iter().any(|a| a.eq_ignore_ascii_case(&addr));
                    let behaviour = shared.lock().behaviour.clone();
                    match behaviour {
                        Behaviour::RefuseRcpt(l) if listed(&l) => reply(
                            &mut out,
                            &format!(
                                "550 5.1.1 <{addr}>: Recipient address rejected: User unknown"
                            ),
                        ),
                        Behaviour::TempFailRcpt(l) if listed(&l) => reply(
                            &mut out,
                            &format!(
                                "450 4.2.0 <{addr}>: Recipient address rejected: try again later"
                            ),
                        ),
                        _ => {
                            t.recipients.push(addr);
                            t.rcpt_params.push(params);
                            reply(&mut out, "250 2.1.5 Ok");
                        }
                    }
                }
                "DATA" => match &tx {
                    None => reply(&mut out, "503 5.5.1 Error: need RCPT command"),
                    Some(t) if t.recipients.is_empty() => {
                        reply(&mut out, "554 5.5.1 Error: no valid recipients")
                    }
                    Some(_) => {
                        data = Some(Vec::new());
                        reply(&mut out, "354 End data with <CR><LF>.<CR><LF>");
                    }
                },
                "RSET" => {
                    tx = None;
                    reply(&mut out, "250 2.0.0 Ok");
                }
                "NOOP" => reply(&mut out, "250 2.0.0 Ok"),
                "QUIT" => {
                    reply(&mut out, "221 2.0.0 Bye");
                    let _ = stream.write_all(&out).await;
                    return;
                }
                _ => reply(&mut out, "502 5.5.2 Error: command not recognized"),
            }
        }
        if !out.is_empty() {
            if stream.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn reply(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The address between `<` and `>` after `prefix` (case-insensitive, a space after the
/// colon allowed) and the parameters after it.
fn split_path(line: &str, prefix: &str) -> Option<(String, String)> {
    let head = line.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = line[prefix.len()..].trim_start().strip_prefix('<')?;
    let end = rest.find('>')?;
    Some((rest[..end].to_string(), rest[end + 1..].trim().to_string()))
}

/// The final dot: record the message (or refuse it, if so told).
fn end_of_data(shared: &Shared, t: Transaction, data: Vec<u8>, connection: u64) -> String {
    let mut s = shared.lock();
    if let Behaviour::DataFail(code) = s.behaviour {
        return format!("{code} {}.0.0 Error: message refused", code / 100);
    }
    s.messages.push(ReceivedMessage {
        sender: t.sender,
        recipients: t.recipients,
        data,
        mail_params: t.mail_params,
        rcpt_params: t.rcpt_params,
        connection,
    });
    let n = s.messages.len();
    drop(s);
    shared.arrived.notify_all();
    format!("250 2.0.0 Ok: queued as R{n}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};

    /// Reads one reply (all its lines) from a blocking client.
    fn read_reply(r: &mut impl BufRead) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.len() >= 4, "short reply line {line:?}");
            all.push_str(&line);
            if line.as_bytes()[3] == b' ' {
                return all;
            }
        }
    }

    #[test]
    fn receiver_records_pipelined_messages_and_follows_its_behaviour() {
        let r = Receiver::start(
            "127.0.0.1:0".parse().unwrap(),
            Behaviour::RefuseRcpt(vec!["Bad@y.test".to_string()]),
        );
        let s = std::net::TcpStream::connect(r.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut rd = BufReader::new(s);
        assert!(read_reply(&mut rd).starts_with("220 "));
        w.write_all(b"EHLO c.test\r\n").unwrap();
        let ehlo = read_reply(&mut rd);
        for ext in [
            "PIPELINING",
            "SIZE",
            "8BITMIME",
            "DSN",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
        ] {
            assert!(ehlo.contains(ext), "{ehlo}");
        }
        w.write_all(
            b"MAIL FROM:<a@x.test> SIZE=20\r\nRCPT TO:<b@y.test> NOTIFY=NEVER\r\nRCPT TO:<bad@y.test>\r\nDATA\r\n",
        )
        .unwrap();
        let replies: Vec<String> = (0..4).map(|_| read_reply(&mut rd)).collect();
        assert!(replies[0].starts_with("250 "));
        assert!(replies[1].starts_with("250 "));
        assert!(replies[2].starts_with("550 5.1.1 "), "{}", replies[2]);
        assert!(replies[3].starts_with("354 "));
        w.write_all(b"Subject: hi\r\n\r\n..dot\r\n.\r\n").unwrap();
        assert!(read_reply(&mut rd).starts_with("250 "));
        assert!(r.wait_for(1, Duration::from_secs(5)));

        r.set_behaviour(Behaviour::DataFail(451));
        w.write_all(b"MAIL FROM:<>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n")
            .unwrap();
        for _ in 0..3 {
            read_reply(&mut rd);
        }
        w.write_all(b"x\r\n.\r\n").unwrap();
        assert!(read_reply(&mut rd).starts_with("451 4.0.0"));
        w.write_all(b"QUIT\r\n").unwrap();
        assert!(read_reply(&mut rd).starts_with("221 "));

        assert_eq!(
            r.messages(),
            [ReceivedMessage {
                sender: "a@x.test".to_string(),
                recipients: vec!["b@y.test".to_string()],
                data: b"Subject: hi\r\n\r\n.dot\r\n".to_vec(),
                mail_params: "SIZE=20".to_string(),
                rcpt_params: vec!["NOTIFY=NEVER".to_string()],
                connection: 0,
            }]
        );
        assert!(!r.wait_for(2, Duration::from_millis(50)));

        // Options and TempFailAll apply to new connections.
        r.set_options(Options {
            ehlo: false,
            ..Options::default()
        });
        r.set_behaviour(Behaviour::TempFailRcpt(vec!["d@y.test".to_string()]));
        let s = std::net::TcpStream::connect(r.addr()).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut rd = BufReader::new(s);
        read_reply(&mut rd);
        w.write_all(b"EHLO c.test\r\n").unwrap();
        assert!(read_reply(&mut rd).starts_with("502 "));
        w.write_all(b"HELO c.test\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<d@y.test>\r\n")
            .unwrap();
        read_reply(&mut rd);
        read_reply(&mut rd);
        assert!(read_reply(&mut rd).starts_with("450 4.2.0 "));

        r.set_behaviour(Behaviour::TempFailAll);
        let s = std::net::TcpStream::connect(r.addr()).unwrap();
        assert!(read_reply(&mut BufReader::new(s)).starts_with("421 "));
        assert_eq!(r.connections(), 3);
        r.set_behaviour(Behaviour::Accept);
    }
}
