//! `[metrics] listen`: a minimal HTTP/1.1 responder for Prometheus. `GET /metrics` (and
//! `HEAD`) answers `200` with [`Metrics::scrape`]'s text; any other path `404`, any other
//! method `405`, a malformed request `400`. Every answer carries `Connection: close`: one
//! request per connection, which is all a scraper needs.
//!
//! The request head is read within [`HEAD_TIMEOUT`] and at most [`MAX_HEAD`] bytes; a body
//! is never read. At most [`MAX_CONNECTIONS`] connections are served at once (the next is
//! accepted when one ends). The socket is bound before the privilege drop, like the SMTP
//! listeners, and listens only once the server is ready.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tracing::{debug, error, info};

use super::metrics::{Metrics, CONTENT_TYPE};
use crate::spool::Spool;

/// The most bytes of request head read.
pub const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 8;

/// What a request head asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// `200` with the metrics; `head`: headers only.
    Metrics { head: bool },
    /// `404`: a path other than `/metrics`.
    NotFound,
    /// `405`: a method other than GET and HEAD.
    MethodNotAllowed,
    /// `400`: not an HTTP/1.x request head.
    BadRequest,
}

/// Where the request head ends (just after its blank line), if it is complete in `buf`.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The answer to a complete request head (request line, header fields, blank line).
pub fn answer(head: &[u8]) -> Answer {
    let Ok(text) = std::str::from_utf8(head) else {
        return Answer::BadRequest;
    };
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Answer::BadRequest;
    };
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    if !token(method)
        || !version.starts_with("HTTP/1.")
        || version.len() != 8
        || !version.as_bytes()[7].is_ascii_digit()
        || target.is_empty()
        || target.bytes().any(|b| b <= b' ' || b == 0x7f)
    {
        return Answer::BadRequest;
    }
    for field in lines.take_while(|l| !l.is_empty()) {
        // `name: value`, the name a token (obsolete line folding is refused, RFC 9112 5.2).
        match field.split_once(':') {
            Some((name, _)) if token(name) => {}
            _ => return Answer::BadRequest,
        }
    }
    // The origin form (`/metrics`) or the absolute form (`http://host/metrics`).
    let path = match target.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    let path = path.split(['?', '#']).next().unwrap_or("");
    if path != "/metrics" {
        return Answer::NotFound;
    }
    match method {
        "GET" => Answer::Metrics { head: false },
        "HEAD" => Answer::Metrics { head: true },
        _ => Answer::MethodNotAllowed,
    }
}

/// The `[metrics] listen` socket, bound but not listening.
pub struct Bound(SocketAddr, socket2::Socket);

/// Bind `addr` (before the privilege drop: any port works then).
pub fn bind(addr: SocketAddr) -> anyhow::Result<Bound> {
    crate::smtp::server::bind_socket(addr).map(|s| Bound(addr, s))
}

/// Start listening on the bound socket (inside the runtime).
pub fn listen(bound: Bound) -> anyhow::Result<TcpListener> {
    crate::smtp::server::listen_socket(bound.0, bound.1)
}

/// Serve `/metrics` on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    spool: Spool,
    live: Arc<crate::ops::live::Live>,
    mut shutdown: watch::Receiver<bool>,
) {
    if let Ok(addr) = listener.local_addr() {
        info!("metrics on http://{addr}/metrics");
    }
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let (metrics, spool) = (metrics.clone(), spool.clone());
                let quotas = crate::policy::quota::of_config(&live.config());
                tokio::spawn(async move {
                    if let Err(e) = respond(stream, &metrics, spool, quotas).await {
                        debug!("metrics request from {peer}: {e}");
                    }
                    drop(permit);
                });
            }
            Err(e) => {
                debug!("metrics accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Read one request head and answer it.
async fn respond(
    mut stream: TcpStream,
    metrics: &Arc<Metrics>,
    spool: Spool,
    quotas: crate::report::Quotas,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let head = tokio::time::timeout(HEAD_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(end) = head_end(&buf) {
                return Ok(Some(end));
            }
            if buf.len() >= MAX_HEAD {
                return Ok(None);
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    let answer = match head {
        Err(_) => return Ok(()), // too slow: closed without a word
        Ok(Err(e)) => return Err(e),
        Ok(Ok(Some(end))) if end <= MAX_HEAD => answer(&buf[..end]),
        Ok(Ok(_)) => Answer::BadRequest, // a head over MAX_HEAD
    };
    let (status, content_type, body, head_only) = match answer {
        Answer::Metrics { head } => {
            let (m, now) = (metrics.clone(), crate::scheduler::now_ms());
            match tokio::task::spawn_blocking(move || m.scrape(&spool, &quotas, now)).await {
                Ok(Ok(text)) => ("200 OK", CONTENT_TYPE, text, head),
                Ok(Err(e)) => {
                    error!("metrics: cannot read the spool: {e}");
                    error_answer("500 Internal Server Error", head)
                }
                Err(e) => {
                    error!("metrics: scrape failed: {e}");
                    error_answer("500 Internal Server Error", head)
                }
            }
        }
        // No body in the answer to a HEAD, whatever its status (RFC 9110 9.3.2).
        Answer::NotFound => error_answer("404 Not Found", buf.starts_with(b"HEAD ")),
        Answer::MethodNotAllowed => error_answer("405 Method Not Allowed", false),
        Answer::BadRequest => error_answer("400 Bad Request", buf.starts_with(b"HEAD ")),
    };
    let allow = if answer == Answer::MethodNotAllowed {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    tokio::time::timeout(HEAD_TIMEOUT, async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await
    .unwrap_or(Ok(()))
}

fn error_answer(status: &'static str, head: bool) -> (&'static str, &'static str, String, bool) {
    (
        status,
        "text/plain; charset=utf-8",
        format!("{status}\n"),
        head,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_and_head_of_metrics() {
        for (req, want) in [
            (
                "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
                Answer::Metrics { head: false },
            ),
            (
                "HEAD /metrics HTTP/1.0\r\n\r\n",
                Answer::Metrics { head: true },
            ),
            (
                "GET /metrics?name[]=up HTTP/1.1\r\nAccept: */*\r\n\r\n",
                Answer::Metrics { head: false },
            ),
            (
                "GET http://127.0.0.1:9125/metrics HTTP/1.1\r\n\r\n",
                Answer::Metrics { head: false },
            ),
            // Bare LF line ends, as some hand-made clients send.
            (
                "GET /metrics HTTP/1.1\nHost: x\n\n",
                Answer::Metrics { head: false },
            ),
        ] {
            assert_eq!(answer(req.as_bytes()), want, "{req:?}");
        }
    }

    #[test]
    fn other_paths_methods_and_malformed_heads() {
        for (req, want) in [
            ("GET / HTTP/1.1\r\n\r\n", Answer::NotFound),
            ("GET /metrics/ HTTP/1.1\r\n\r\n", Answer::NotFound),
            ("GET /metricsx HTTP/1.1\r\n\r\n", Answer::NotFound),
            ("GET http://host HTTP/1.1\r\n\r\n", Answer::NotFound),
            (
                "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                Answer::MethodNotAllowed,
            ),
            ("DELETE /metrics HTTP/1.1\r\n\r\n", Answer::MethodNotAllowed),
            ("get /metrics HTTP/1.1\r\n\r\n", Answer::MethodNotAllowed),
            ("GET /metrics\r\n\r\n", Answer::BadRequest),
            ("GET  /metrics HTTP/1.1\r\n\r\n", Answer::BadRequest),
            ("GET /metrics HTTP/2.0\r\n\r\n", Answer::BadRequest),
            ("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Answer::BadRequest),
            ("GET /metrics HTTP/1.1 extra\r\n\r\n", Answer::BadRequest),
            (
                "GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
                Answer::BadRequest,
            ),
            (
                "GET /metrics HTTP/1.1\r\n folded: x\r\n\r\n",
                Answer::BadRequest,
            ),
            ("G(T /metrics HTTP/1.1\r\n\r\n", Answer::BadRequest),
            ("\r\n\r\n", Answer::BadRequest),
            ("GET /m\u{e9}trics HTTP/1.1\r\n\r\n", Answer::NotFound),
        ] {
            assert_eq!(answer(req.as_bytes()), want, "{req:?}");
        }
        assert_eq!(
            answer(b"GET /metrics HTTP/1.1\r\nX: \xff\r\n\r\n"),
            Answer::BadRequest
        );
        assert_eq!(answer(b"GET /\x01 HTTP/1.1\r\n\r\n"), Answer::BadRequest);
    }

    #[test]
    fn the_head_ends_at_the_first_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\nbody"), Some(16));
        assert_eq!(head_end(b""), None);
    }
}
