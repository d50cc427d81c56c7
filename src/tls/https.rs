//! A small, bounded HTTPS GET client: what fetching an MTA-STS policy needs (RFC 8461 3.3)
//! and nothing more.
//!
//! One `GET` over HTTP/1.1 with `Connection: close`, over tokio-rustls with the verifying
//! configuration of [`super::client::Connectors`] (PKIX: the system's roots and
//! `[delivery] tls_ca_file`, the host's name). No redirects are followed: anything but `200`
//! is an error, and so is a `Content-Type` other than the one asked for. The response head
//! is at most [`MAX_HEAD`] bytes, the body at most the caller's limit, with a
//! `Content-Length`, chunked (RFC 9112 7.1) or ended by the close of the connection. The
//! caller bounds the total time.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The response head (status line and header fields), at most.
pub const MAX_HEAD: usize = 16 * 1024;

/// One line of a chunked body's framing (size line, trailer field), at most.
const MAX_LINE: usize = 1024;

/// How long one TCP connection may take to be set up, so that a dead first address
/// leaves time for the next.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET https://HOST:PORT/PATH` at the first of `addrs` that answers; the body of a `200`
/// whose media type is `content_type` (parameters such as `charset` ignored), at most
/// `limit` bytes. `Err` is one line saying what went wrong. Not bounded in time: the
/// caller wraps it in a timeout.
pub async fn get(
    connector: &TlsConnector,
    host: &str,
    addrs: &[IpAddr],
    port: u16,
    path: &str,
    content_type: &str,
    limit: usize,
) -> Result<Vec<u8>, String> {
    let name = rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|e| format!("{host:?} is not a host name: {e}"))?;
    let mut last = format!("{host} has no address");
    for ip in addrs {
        let addr = SocketAddr::new(*ip, port);
        let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => {
                last = format!("cannot connect to {host}[{ip}]:{port}: {e}");
                continue;
            }
            Err(_) => {
                last = format!("no connection to {host}[{ip}]:{port} in time");
                continue;
            }
        };
        let mut tls = connector
            .connect(name.clone(), tcp)
            .await
            .map_err(|e| format!("TLS with {host}[{ip}]:{port}: {e}"))?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: mxspool/{}\r\nAccept: {content_type}\r\nConnection: close\r\n\r\n",
            env!("CARGO_PKG_VERSION")
        );
        tls.write_all(request.as_bytes())
            .await
            .map_err(|e| format!("sending the request to {host}[{ip}]:{port}: {e}"))?;
        tls.flush()
            .await
            .map_err(|e| format!("sending the request to {host}[{ip}]:{port}: {e}"))?;
        return read_response(&mut tls, content_type, limit)
            .await
            .map_err(|e| format!("https://{host}{path}: {e}"));
    }
    Err(last)
}

/// Reads one HTTP/1.1 response from `r` and returns its body: only for status `200` with
/// media type `content_type`, and at most `limit` bytes.
pub async fn read_response<R: AsyncRead + Unpin>(
    r: &mut R,
    content_type: &str,
    limit: usize,
) -> Result<Vec<u8>, String> {
    let mut r = BufReader::new(r);
    let head = read_head(&mut r).await?;
    let head = std::str::from_utf8(&head).map_err(|_| "response head is not text".to_string())?;
    let mut lines = head.split("\r\n").flat_map(|l| l.split('\n'));
    let status_line = lines.next().unwrap_or("");
    let status = parse_status(status_line)?;
    if status != 200 {
        return Err(format!(
            "HTTP status {status}, not 200 ({})",
            if (300..400).contains(&status) {
                "redirects are not followed"
            } else {
                status_line.trim()
            }
        ));
    }
    let mut media = None;
    let mut length = None;
    let mut chunked = false;
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("malformed header line {:?}", truncate(line)));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-type" => {
                media.get_or_insert_with(|| {
                    value
                        .split(';')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_ascii_lowercase()
                });
            }
            "content-length" => {
                let n: u64 = value
                    .parse()
                    .map_err(|_| format!("bad Content-Length {:?}", truncate(value)))?;
                if length.is_some_and(|l| l != n) {
                    return Err("conflicting Content-Length fields".into());
                }
                length = Some(n);
            }
            "transfer-encoding" => {
                let last = value.rsplit(',').next().unwrap_or("").trim();
                if !last.eq_ignore_ascii_case("chunked") {
                    return Err(format!(
                        "unsupported Transfer-Encoding {:?}",
                        truncate(value)
                    ));
                }
                chunked = true;
            }
            _ => {}
        }
    }
    match media.as_deref() {
        Some(m) if m == content_type => {}
        Some(m) => {
            return Err(format!(
                "Content-Type {:?}, not {content_type}",
                truncate(m)
            ))
        }
        None => return Err(format!("no Content-Type (must be {content_type})")),
    }
    if chunked {
        read_chunked(&mut r, limit).await
    } else if let Some(n) = length {
        if n > limit as u64 {
            return Err(format!("body of {n} bytes is larger than {limit}"));
        }
        let mut body = vec![0; n as usize];
        r.read_exact(&mut body)
            .await
            .map_err(|e| format!("body cut short: {e}"))?;
        Ok(body)
    } else {
        // Ended by the close of the connection.
        let mut body = Vec::new();
        read_to_end_lenient(&mut (&mut r).take(limit as u64 + 1), &mut body).await?;
        if body.len() > limit {
            return Err(format!("body larger than {limit} bytes"));
        }
        Ok(body)
    }
}

/// The head up to and without the empty line that ends it.
async fn read_head<R: AsyncRead + Unpin>(r: &mut BufReader<R>) -> Result<Vec<u8>, String> {
    let mut head = Vec::new();
    loop {
        let before = head.len();
        let n = (&mut *r)
            .take((MAX_HEAD + 1 - before) as u64)
            .read_until(b'\n', &mut head)
            .await
            .map_err(|e| format!("reading the response: {e}"))?;
        if head.len() > MAX_HEAD {
            return Err(format!("response head larger than {MAX_HEAD} bytes"));
        }
        if n == 0 {
            return Err(if head.is_empty() {
                "connection closed without a response".into()
            } else {
                "connection closed inside the response head".into()
            });
        }
        let line = &head[before..];
        if line == b"\r\n" || line == b"\n" {
            head.truncate(before);
            return Ok(head);
        }
    }
}

/// `HTTP/1.x NNN reason` -> NNN.
fn parse_status(line: &str) -> Result<u16, String> {
    let mut parts = line.split_ascii_whitespace();
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(format!("not an HTTP/1 response: {:?}", truncate(line)));
    }
    parts
        .next()
        .filter(|c| c.len() == 3)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line {:?}", truncate(line)))
}

/// A chunked body (RFC 9112 7.1): size lines in hex (extensions ignored), the data, and
/// trailer fields (read and dropped) after the last chunk.
async fn read_chunked<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
    limit: usize,
) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line = read_line(r).await?;
        let size = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size, 16)
            .map_err(|_| format!("bad chunk size line {:?}", truncate(&line)))?;
        if size == 0 {
            // Trailers, up to the empty line; bounded like the head.
            for _ in 0..64 {
                if read_line(r).await?.is_empty() {
                    return Ok(body);
                }
            }
            return Err("too many trailer fields".into());
        }
        if size > limit.saturating_sub(body.len()) {
            return Err(format!("body larger than {limit} bytes"));
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..])
            .await
            .map_err(|e| format!("chunk cut short: {e}"))?;
        if !read_line(r).await?.is_empty() {
            return Err("chunk longer than its size".into());
        }
    }
}

/// One line of at most [`MAX_LINE`] bytes, without its CRLF (or LF).
async fn read_line<R: AsyncRead + Unpin>(r: &mut BufReader<R>) -> Result<String, String> {
    let mut line = Vec::new();
    let n = (&mut *r)
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|e| format!("reading the body: {e}"))?;
    if n == 0 {
        return Err("connection closed inside a chunked body".into());
    }
    if line.last() != Some(&b'\n') {
        return Err("chunk framing line too long".into());
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| "chunk framing line is not text".to_string())
}

/// Reads to the end; a TLS peer that closes without `close_notify` ends the body too
/// (many servers do; a body cut short then fails to parse rather than being trusted more).
async fn read_to_end_lenient<R: AsyncRead + Unpin>(
    r: &mut R,
    out: &mut Vec<u8>,
) -> Result<(), String> {
    match r.read_to_end(out).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(()),
        Err(e) => Err(format!("reading the body: {e}")),
    }
}

/// At most 100 characters of `s`, for error messages.
fn truncate(s: &str) -> String {
    s.chars().take(100).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8], limit: usize) -> Result<Vec<u8>, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut r = raw;
        rt.block_on(read_response(&mut r, "text/plain", limit))
    }

    #[test]
    fn a_200_with_content_length() {
        let body = parse(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 5\r\n\r\nhelloEXTRA",
            100,
        );
        assert_eq!(body.unwrap(), b"hello");
        // Bare LF line ends, header names in any case.
        let body = parse(
            b"HTTP/1.0 200 OK\ncontent-type: TEXT/PLAIN\nCONTENT-LENGTH: 2\n\nok",
            100,
        );
        assert_eq!(body.unwrap(), b"ok");
    }

    #[test]
    fn a_body_ended_by_the_close() {
        let body = parse(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nversion: STSv1\r\n",
            100,
        );
        assert_eq!(body.unwrap(), b"version: STSv1\r\n");
    }

    #[test]
    fn a_chunked_body() {
        let body = parse(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: y\r\n\r\n",
            100,
        );
        assert_eq!(body.unwrap(), b"hello, world");
        // Too large in total, cut short, bad framing.
        let big = parse(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n\
              8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n",
            10,
        );
        assert!(big.unwrap_err().contains("larger than 10"));
        let short = parse(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n\
              8\r\n1234",
            100,
        );
        assert!(short.unwrap_err().contains("cut short"));
        let bad = parse(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            100,
        );
        assert!(bad.unwrap_err().contains("bad chunk size"));
        let gzip = parse(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: gzip\r\n\r\n",
            100,
        );
        assert!(gzip.unwrap_err().contains("Transfer-Encoding"));
    }

    #[test]
    fn only_200_counts_and_redirects_are_not_followed() {
        let e = parse(
            b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 0\r\n\r\n",
            100,
        )
        .unwrap_err();
        assert!(e.contains("HTTP status 404"), "{e}");
        let e = parse(
            b"HTTP/1.1 301 Moved\r\nLocation: https://evil.test/\r\nContent-Length: 0\r\n\r\n",
            100,
        )
        .unwrap_err();
        assert!(e.contains("redirects are not followed"), "{e}");
        assert!(parse(b"SMTP/1.0 220 hello\r\n\r\n", 100)
            .unwrap_err()
            .contains("not an HTTP/1 response"));
        assert!(parse(b"HTTP/1.1 2000 OK\r\n\r\n", 100)
            .unwrap_err()
            .contains("bad status line"));
        assert!(parse(b"", 100).unwrap_err().contains("without a response"));
        assert!(
            parse(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n", 100)
                .unwrap_err()
                .contains("inside the response head")
        );
    }

    #[test]
    fn the_content_type_must_be_text_plain() {
        let e = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 100).unwrap_err();
        assert!(e.contains("no Content-Type"), "{e}");
        let e = parse(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 2\r\n\r\nok",
            100,
        )
        .unwrap_err();
        assert!(e.contains("\"text/html\", not text/plain"), "{e}");
    }

    #[test]
    fn bodies_and_heads_are_bounded() {
        let e = parse(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 65537\r\n\r\n",
            65536,
        )
        .unwrap_err();
        assert!(e.contains("larger than 65536"), "{e}");
        let mut raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n".to_vec();
        raw.extend(std::iter::repeat_n(b'x', 101));
        assert!(parse(&raw, 100).unwrap_err().contains("larger than 100"));
        raw.truncate(raw.len() - 1);
        assert_eq!(parse(&raw, 100).unwrap().len(), 100);
        let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
        for _ in 0..2000 {
            head.extend_from_slice(b"X-Padding: 0123456789\r\n");
        }
        assert!(parse(&head, 100)
            .unwrap_err()
            .contains("response head larger"));
        let e = parse(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
            100,
        )
        .unwrap_err();
        assert!(e.contains("conflicting"), "{e}");
    }
}
