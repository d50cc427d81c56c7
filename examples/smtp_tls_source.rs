//! A load generator for `contrib/bench/tls`: like Postfix's `smtp-source`, over STARTTLS.
//!
//! ```text
//! smtp_tls_source [-s SESSIONS] [-m MESSAGES] [-l SIZE] [-d] HOST:PORT
//! ```
//!
//! `SESSIONS` workers (default 20) share `MESSAGES` messages (default 1000) of about `SIZE`
//! bytes (default 4096), each `MAIL FROM:<s@sender.test>` to `<u@example.com>`. Every
//! session says EHLO, STARTTLS, EHLO again inside TLS, then one message and QUIT; with `-d`
//! a session keeps its connection and sends message after message over it. The TLS client
//! is rustls with the ring provider, TLS 1.2 and 1.3, no certificate check, and the client
//! session cache rustls keeps by default, so later sessions resume as a sending MTA with a
//! TLS session cache does (Postfix's `smtp_tls_session_cache_database`). Any reply other
//! than the expected one ends the run with a one-line error and exit status 1. Prints one
//! line: messages, seconds, messages per second, handshakes and how many resumed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use mxspool::tls::client::{server_name, Connectors, TlsPolicy};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

struct Args {
    sessions: usize,
    messages: usize,
    size: usize,
    keep: bool,
    addr: String,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        sessions: 20,
        messages: 1000,
        size: 4096,
        keep: false,
        addr: String::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut number = |what: &str| -> Result<usize, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or(format!("{what} needs a number"))
        };
        match arg.as_str() {
            "-s" => a.sessions = number("-s")?.max(1),
            "-m" => a.messages = number("-m")?,
            "-l" => a.size = number("-l")?,
            "-d" => a.keep = true,
            _ if a.addr.is_empty() && !arg.starts_with('-') => a.addr = arg,
            _ => return Err(format!("unexpected argument {arg:?}")),
        }
    }
    if a.addr.is_empty() {
        return Err(
            "usage: smtp_tls_source [-s SESSIONS] [-m MESSAGES] [-l SIZE] [-d] HOST:PORT".into(),
        );
    }
    Ok(a)
}

/// Reads one (possibly multi-line) reply; `Err` unless its code is `want`.
async fn expect<R: AsyncBufRead + Unpin>(
    r: &mut R,
    want: &str,
    line: &mut String,
) -> Result<(), String> {
    loop {
        line.clear();
        if r.read_line(line).await.map_err(|e| e.to_string())? == 0 {
            return Err(format!("connection closed while waiting for {want}"));
        }
        if !line.starts_with(want) {
            return Err(format!("expected {want}, got {:?}", line.trim_end()));
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok(());
        }
    }
}

async fn command<S: AsyncBufRead + AsyncWrite + Unpin>(
    s: &mut S,
    cmd: &[u8],
    want: &str,
    line: &mut String,
) -> Result<(), String> {
    s.write_all(cmd).await.map_err(|e| e.to_string())?;
    s.flush().await.map_err(|e| e.to_string())?;
    expect(s, want, line).await
}

#[derive(Default)]
struct Counts {
    sent: AtomicUsize,
    handshakes: AtomicUsize,
    resumed: AtomicUsize,
}

async fn worker(
    a: Arc<Args>,
    next: Arc<AtomicUsize>,
    counts: Arc<Counts>,
    connector: tokio_rustls::TlsConnector,
    message: Arc<Vec<u8>>,
) -> Result<(), String> {
    let mut line = String::new();
    let host = a.addr.rsplit_once(':').map_or("localhost", |(h, _)| h);
    let ip = host
        .trim_matches(['[', ']'])
        .parse()
        .map_err(|_| format!("{host} is not an IP address"))?;
    'sessions: while next.load(Ordering::Relaxed) < a.messages {
        let tcp = TcpStream::connect(&a.addr)
            .await
            .map_err(|e| format!("connect {}: {e}", a.addr))?;
        let _ = tcp.set_nodelay(true);
        let mut clear = BufReader::new(tcp);
        expect(&mut clear, "220", &mut line).await?;
        command(&mut clear, b"EHLO client.test\r\n", "250", &mut line).await?;
        command(&mut clear, b"STARTTLS\r\n", "220", &mut line).await?;
        let tls = connector
            .connect(server_name(host, ip), clear.into_inner())
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        counts.handshakes.fetch_add(1, Ordering::Relaxed);
        if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            counts.resumed.fetch_add(1, Ordering::Relaxed);
        }
        let mut s = BufReader::new(tls);
        command(&mut s, b"EHLO client.test\r\n", "250", &mut line).await?;
        loop {
            if next.fetch_add(1, Ordering::Relaxed) >= a.messages {
                let _ = command(&mut s, b"QUIT\r\n", "221", &mut line).await;
                break 'sessions;
            }
            command(&mut s, b"MAIL FROM:<s@sender.test>\r\n", "250", &mut line).await?;
            command(&mut s, b"RCPT TO:<u@example.com>\r\n", "250", &mut line).await?;
            command(&mut s, b"DATA\r\n", "354", &mut line).await?;
            command(&mut s, &message, "250", &mut line).await?;
            counts.sent.fetch_add(1, Ordering::Relaxed);
            if !a.keep {
                command(&mut s, b"QUIT\r\n", "221", &mut line).await?;
                break;
            }
        }
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let a = match args() {
        Ok(a) => Arc::new(a),
        Err(e) => {
            eprintln!("smtp_tls_source: {e}");
            std::process::exit(2);
        }
    };
    let connectors = match Connectors::new(&[], false) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("smtp_tls_source: {e}");
            std::process::exit(1);
        }
    };
    let connector = connectors.for_policy(TlsPolicy::Encrypt).0.clone();
    let mut message =
        b"From: <s@sender.test>\r\nTo: <u@example.com>\r\nSubject: tls bench\r\n\r\n".to_vec();
    while message.len() + 80 <= a.size {
        message.extend_from_slice(&[b'x'; 78]);
        message.extend_from_slice(b"\r\n");
    }
    message.extend_from_slice(b".\r\n");
    let message = Arc::new(message);
    let (next, counts) = (Arc::new(AtomicUsize::new(0)), Arc::new(Counts::default()));
    let started = Instant::now();
    let workers: Vec<_> = (0..a.sessions)
        .map(|_| {
            tokio::spawn(worker(
                a.clone(),
                next.clone(),
                counts.clone(),
                connector.clone(),
                message.clone(),
            ))
        })
        .collect();
    for w in workers {
        match w.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                eprintln!("smtp_tls_source: {e}");
                std::process::exit(1);
            }
            Err(e) => {
                eprintln!("smtp_tls_source: a session failed: {e}");
                std::process::exit(1);
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let sent = counts.sent.load(Ordering::Relaxed);
    println!(
        "{sent} messages in {secs:.2} s: {:.0} msg/s, {} TLS handshakes ({} resumed)",
        sent as f64 / secs,
        counts.handshakes.load(Ordering::Relaxed),
        counts.resumed.load(Ordering::Relaxed)
    );
}
