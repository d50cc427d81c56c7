//! `[metrics] listen`: the Prometheus endpoint of a running server, scraped over plain TCP
//! and parsed (OpenMetrics text: `# TYPE` before a family's samples, `# EOF` last). Its
//! figures are checked against `mxspool queue --json` and against what the test did: mail
//! queued for a domain whose primary is down, a relay attempt refused, the primary coming
//! back and the queue draining.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::harness::{check_ok, free_port, smtp_send, wait_for, MxEnv, Smtp};
use crate::receiver::{Behaviour, Receiver};

/// One sample line: `name{label="value",...} value`.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A parsed exposition: the declared family types and the samples.
#[derive(Debug)]
struct Exposition {
    types: HashMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    /// The value of the sample `name` with exactly `labels`, if there is one.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// Like [`Exposition::get`], 0 when absent (a counter or gauge never touched).
    fn or0(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }
}

/// Parse the OpenMetrics text format strictly enough to catch a broken exposition: every
/// line is a `# TYPE`/`# HELP`/`# UNIT` comment, a sample of a declared family (with the
/// suffixes its type allows), or the final `# EOF`.
fn parse_exposition(body: &str) -> Exposition {
    let lines: Vec<&str> = body.split('\n').collect();
    assert_eq!(lines.last(), Some(&""), "no final newline:\n{body}");
    let lines = &lines[..lines.len() - 1];
    assert_eq!(lines.last(), Some(&"# EOF"), "no # EOF at the end:\n{body}");
    let mut types = HashMap::new();
    let mut samples = Vec::new();
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name) = (parts.next().unwrap(), parts.next().unwrap_or(""));
            match kind {
                "TYPE" => {
                    let t = parts.next().unwrap_or("");
                    assert!(
                        [
                            "counter",
                            "gauge",
                            "histogram",
                            "info",
                            "stateset",
                            "summary",
                            "unknown"
                        ]
                        .contains(&t),
                        "bad type in {line:?}"
                    );
                    assert!(
                        types.insert(name.to_string(), t.to_string()).is_none(),
                        "family {name} declared twice"
                    );
                }
                "HELP" | "UNIT" => {}
                _ => panic!("unknown comment line {line:?}"),
            }
            continue;
        }
        assert!(!line.is_empty(), "empty line in the exposition:\n{body}");
        let sample = parse_sample(line);
        // The family the sample belongs to, and the suffixes its type allows.
        let family = types
            .iter()
            .find(|(f, t)| {
                let suffixes: &[&str] = match t.as_str() {
                    "counter" => &["_total", "_created"],
                    "histogram" => &["_bucket", "_sum", "_count", "_created"],
                    _ => &[""],
                };
                suffixes
                    .iter()
                    .any(|s| sample.name.strip_suffix(s) == Some(f.as_str()))
            })
            .map(|(f, _)| f.clone());
        assert!(family.is_some(), "sample {line:?} has no # TYPE before it");
        samples.push(sample);
    }
    Exposition { types, samples }
}

fn parse_sample(line: &str) -> Sample {
    let bad = || -> ! { panic!("malformed sample line {line:?}") };
    let name_end = line.find(['{', ' ']).unwrap_or_else(|| bad());
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
    {
        bad();
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(r) = rest.strip_prefix('{') {
        let mut r = r;
        loop {
            if let Some(after) = r.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = r.split_once("=\"").unwrap_or_else(|| bad());
            if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                bad();
            }
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next() {
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next().map(|(_, c)| c) {
                        Some('n') => value.push('\n'),
                        Some('"') => value.push('"'),
                        Some('\\') => value.push('\\'),
                        _ => bad(),
                    },
                    Some((_, c)) => value.push(c),
                    None => bad(),
                }
            };
            assert!(
                labels.insert(key.to_string(), value).is_none(),
                "label twice in {line:?}"
            );
            r = &after[end + 1..];
            if let Some(more) = r.strip_prefix(',') {
                r = more;
            } else if !r.starts_with('}') {
                bad();
            }
        }
    }
    let value = rest.strip_prefix(' ').unwrap_or_else(|| bad());
    // An optional timestamp follows the value; mxspool writes none.
    let value = value.split(' ').next().unwrap();
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().unwrap_or_else(|_| bad()),
    };
    Sample {
        name: name.to_string(),
        labels,
        value,
    }
}

/// One raw HTTP exchange: `request` sent as is, the answer read to the end (the server
/// closes). Returns the status code, the header fields (names lower-cased) and the body.
fn http(addr: &str, request: &[u8]) -> (u16, HashMap<String, String>, String) {
    let mut c = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(request).unwrap();
    let mut raw = Vec::new();
    c.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8(raw).expect("the answer is UTF-8");
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {raw:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let code = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .map(|l| {
            let (k, v) = l
                .split_once(':')
                .unwrap_or_else(|| panic!("bad field {l:?}"));
            (k.trim().to_ascii_lowercase(), v.trim().to_string())
        })
        .collect::<HashMap<_, _>>();
    if let Some(len) = headers.get("content-length") {
        if !request.starts_with(b"HEAD") {
            assert_eq!(len.parse::<usize>().unwrap(), body.len(), "Content-Length");
        }
    }
    (code, headers, body.to_string())
}

/// `GET /metrics`, checked and parsed.
fn scrape(addr: &str) -> Exposition {
    let (code, headers, body) = http(
        addr,
        b"GET /metrics HTTP/1.1\r\nHost: prometheus\r\nAccept: application/openmetrics-text\r\n\r\n",
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        headers.get("content-type").map(String::as_str),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    assert_eq!(headers.get("connection").map(String::as_str), Some("close"));
    parse_exposition(&body)
}

/// The families and their types: first those without labels, then those with.
const FAMILIES: [(&str, &str); 11] = [
    ("mxspool_smtp_accepted_messages", "counter"),
    ("mxspool_smtp_connections", "gauge"),
    ("mxspool_spool_commit_seconds", "histogram"),
    ("mxspool_held_domains", "gauge"),
    ("mxspool_spool_free_bytes", "gauge"),
    ("mxspool_smtp_refused_recipients", "counter"),
    ("mxspool_deliveries", "counter"),
    ("mxspool_queue_messages", "gauge"),
    ("mxspool_queue_bytes", "gauge"),
    ("mxspool_queue_oldest_age_seconds", "gauge"),
    ("mxspool_smtp_refused_messages", "counter"),
];

#[test]
fn metrics_match_the_queue_and_follow_a_drain() {
    let primary = free_port();
    let metrics_port = free_port();
    let mut env = MxEnv::custom(&format!(
        "[queue]\nretry_interval = \"1h\"\n\n[delivery]\nconnect_timeout = \"2s\"\n\n\
         [[partner]]\ndomain = \"example.com\"\nroute = [\"127.0.0.1:{primary}\"]\n\n\
         [metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"
    ));
    let server = env.start();
    let maddr = format!("127.0.0.1:{metrics_port}");

    // Before any mail: the families without labels are there, nothing is queued (a family
    // with labels is written once it has a sample).
    let m = scrape(&maddr);
    for (family, kind) in &FAMILIES[..5] {
        assert_eq!(
            m.types.get(*family).map(String::as_str),
            Some(*kind),
            "{family}: {:?}",
            m.types
        );
    }
    assert_eq!(
        m.get("mxspool_smtp_accepted_messages_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        m.get("mxspool_queue_messages", &[("domain", "example.com")]),
        None
    );
    assert!(m.or0("mxspool_spool_free_bytes", &[]) > 0.0);

    // Two messages for example.com, whose primary is down; one relay attempt refused.
    let msg = b"Subject: metrics\r\n\r\nqueued while the primary is down\r\n";
    smtp_send(&env.addr(), "alice@sender.test", &["bob@example.com"], msg);
    smtp_send(
        &env.addr(),
        "alice@sender.test",
        &["carol@example.com"],
        b"Subject: metrics 2\r\n\r\na second, longer message so the sizes differ\r\n",
    );
    let (mut c, banner) = Smtp::connect(&env.addr()).unwrap();
    assert_eq!(banner.code, 220);
    assert_eq!(c.cmd("EHLO client.test").unwrap().code, 250);
    assert_eq!(c.cmd("MAIL FROM:<spammer@sender.test>").unwrap().code, 250);
    let r = c.cmd("RCPT TO:<victim@elsewhere.test>").unwrap();
    assert_eq!(r.code, 550, "{r}");
    let _ = c.cmd("QUIT");
    drop(c);

    // Both were tried once and deferred (connection refused).
    assert!(
        wait_for(Duration::from_secs(20), Duration::from_millis(200), || {
            let q = env.queue(Some("example.com"));
            q.len() == 2 && q.iter().all(|e| e.attempts >= 1)
        }),
        "not deferred:\n{}",
        server.log()
    );
    let queue = env.queue(Some("example.com"));
    let bytes: u64 = queue.iter().map(|e| e.size).sum();
    // The deferrals are counted once they are in the spool, which `queue` already sees;
    // the session gauge falls when the server has closed its side.
    let mut m = scrape(&maddr);
    assert!(
        wait_for(Duration::from_secs(10), Duration::from_millis(100), || {
            m = scrape(&maddr);
            m.or0("mxspool_smtp_connections", &[]) == 0.0
                && m.or0(
                    "mxspool_deliveries_total",
                    &[("domain", "example.com"), ("status", "deferred")],
                ) == 2.0
        }),
        "connections or deferrals: {m:?}"
    );
    for (family, kind) in &FAMILIES[..10] {
        assert_eq!(
            m.types.get(*family).map(String::as_str),
            Some(*kind),
            "{family}"
        );
    }
    let dom = [("domain", "example.com")];
    assert_eq!(
        m.get("mxspool_queue_messages", &dom),
        Some(queue.len() as f64)
    );
    assert_eq!(m.get("mxspool_queue_bytes", &dom), Some(bytes as f64));
    let age = m.get("mxspool_queue_oldest_age_seconds", &dom).unwrap();
    assert!((0.0..120.0).contains(&age), "age {age}");
    assert_eq!(
        m.get("mxspool_smtp_accepted_messages_total", &[]),
        Some(2.0)
    );
    assert_eq!(
        m.get(
            "mxspool_smtp_refused_recipients_total",
            &[("reason", "relay")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.or0(
            "mxspool_deliveries_total",
            &[("domain", "example.com"), ("status", "sent")]
        ),
        0.0
    );
    assert_eq!(m.get("mxspool_held_domains", &[]), Some(0.0));
    // Timed: the two messages' commits, one after the other, and at least the second
    // message's deferral after them (the first's may have shared a commit).
    assert!(
        m.or0("mxspool_spool_commit_seconds_count", &[]) >= 3.0,
        "{m:?}"
    );
    assert_eq!(
        m.get("mxspool_spool_commit_seconds_bucket", &[("le", "+Inf")]),
        m.get("mxspool_spool_commit_seconds_count", &[])
    );

    // Held domains are counted; holding keeps the mail queued.
    check_ok("hold", &env.mxspool(&["hold", "example.com"]));
    let m = scrape(&maddr);
    assert_eq!(m.get("mxspool_held_domains", &[]), Some(1.0));
    assert_eq!(m.get("mxspool_queue_messages", &dom), Some(2.0));
    check_ok("release", &env.mxspool(&["release", "example.com"]));
    // Released mail is due at once: tried again (the primary is still down), counted again.
    assert!(
        wait_for(Duration::from_secs(20), Duration::from_millis(200), || {
            scrape(&maddr).or0(
                "mxspool_deliveries_total",
                &[("domain", "example.com"), ("status", "deferred")],
            ) == 4.0
        }),
        "no second deferral:\n{}",
        server.log()
    );

    // Other requests.
    let (code, h, body) = http(&maddr, b"HEAD /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(code, 200);
    assert!(body.is_empty(), "HEAD has a body: {body:?}");
    assert!(h.get("content-length").unwrap().parse::<usize>().unwrap() > 0);
    assert_eq!(http(&maddr, b"GET / HTTP/1.1\r\n\r\n").0, 404);
    let (code, _, body) = http(&maddr, b"HEAD /other HTTP/1.1\r\n\r\n");
    assert_eq!((code, body.as_str()), (404, ""));
    let (code, h, _) = http(
        &maddr,
        b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(code, 405);
    assert_eq!(h.get("allow").map(String::as_str), Some("GET, HEAD"));
    assert_eq!(http(&maddr, b"hello\r\n\r\n").0, 400);

    // The primary comes back: the queue drains, the deliveries are counted as sent and the
    // domain leaves the queue gauges.
    let receiver = Receiver::start(
        format!("127.0.0.1:{primary}").parse().unwrap(),
        Behaviour::Accept,
    );
    let out = env.mxspool(&["flush", "example.com"]);
    check_ok("flush", &out);
    assert!(
        receiver.wait_for(2, Duration::from_secs(30)),
        "not delivered"
    );
    assert!(
        wait_for(Duration::from_secs(20), Duration::from_millis(200), || {
            env.queue(None).is_empty()
        }),
        "queue not empty:\n{}",
        server.log()
    );
    let m = scrape(&maddr);
    assert_eq!(
        m.get(
            "mxspool_deliveries_total",
            &[("domain", "example.com"), ("status", "sent")]
        ),
        Some(2.0),
        "{m:?}"
    );
    assert_eq!(m.get("mxspool_queue_messages", &dom), None, "{m:?}");
    assert_eq!(m.get("mxspool_queue_bytes", &dom), None);
    assert_eq!(
        m.get("mxspool_smtp_accepted_messages_total", &[]),
        Some(2.0)
    );
}

#[test]
fn the_exposition_parser_catches_broken_text() {
    let good =
        "# TYPE a counter\na_total 1\n# TYPE b gauge\nb{domain=\"x\\\"y\",s=\"z\"} 2\n# EOF\n";
    let e = parse_exposition(good);
    assert_eq!(e.get("b", &[("domain", "x\"y"), ("s", "z")]), Some(2.0));
    assert_eq!(e.get("a_total", &[]), Some(1.0));
    for bad in [
        "# TYPE a counter\na_total 1\n",     // no EOF
        "a 1\n# EOF\n",                      // no TYPE
        "# TYPE a counter\na 1\n# EOF\n",    // counter without _total
        "# TYPE b gauge\nb{x=1} 2\n# EOF\n", // unquoted label
        "# TYPE b gauge\nb 2\n# EOF",        // no final newline
    ] {
        assert!(
            std::panic::catch_unwind(|| parse_exposition(bad)).is_err(),
            "accepted {bad:?}"
        );
    }
}
