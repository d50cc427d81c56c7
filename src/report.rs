//! The read-only reports: `queue` (mailq), `shape` (qshape) and `show` (postcat). They open
//! the spool read-only, which works whether or not a server is running, and see what was
//! committed when they started.

use std::collections::BTreeMap;
use std::io::Write;

use crate::envelope::{Body, Notify, RcptState, Ret};
use crate::policy::quota::Quota;
use crate::scheduler::now_ms;
use crate::spool::{QueuedMessage, Spool};

/// The partners' quotas, by domain ([`crate::policy::quota::of_config`]).
pub type Quotas = BTreeMap<String, Quota>;

/// `quota 1%: 12 of 200000 messages, 3 of 1000 bytes`.
fn quota_line(q: &Quota, used: crate::spool::Usage) -> String {
    format!("quota {}%: {}", q.percent(used), q.describe(used))
}

pub fn queue(
    spool: &Spool,
    domain: Option<&str>,
    json: bool,
    quotas: &Quotas,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let domain = domain.map(|d| d.trim_end_matches('.').to_ascii_lowercase());
    let mut n = 0usize;
    let mut failed: Option<std::io::Error> = None;
    let mut unreadable = Vec::new();
    spool.for_each_readable(
        domain.as_deref(),
        |m| {
            let r = if json {
                let mut line = m.to_json();
                if let Some(q) = quotas.get(&m.domain) {
                    line["quota"] = q.to_json(spool.usage(&m.domain));
                }
                writeln!(out, "{line}")
            } else {
                if n == 0 {
                    let _ = table_header(out);
                }
                table_row(out, &m)
            };
            n += 1;
            match r {
                Ok(()) => true,
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        },
        |u| unreadable.push(u),
    )?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    if !json {
        if n == 0 {
            writeln!(out, "Mail queue is empty")?;
        } else {
            writeln!(out, "-- {n} message(s)")?;
        }
        for (d, q) in quotas {
            if domain.as_deref().is_none_or(|x| x == d) {
                writeln!(out, "-- {d}: {}", quota_line(q, spool.usage(d)))?;
            }
        }
        for (d, since) in spool.held_domains() {
            if domain.as_deref().is_none_or(|x| x == d) {
                writeln!(
                    out,
                    "-- {d} is on hold since {} (mxspool release {d})",
                    time(since)
                )?;
            }
        }
        for u in &unreadable {
            writeln!(out, "-- {u}")?;
        }
    }
    out.flush()?;
    damaged(&unreadable)
}

/// After a listing that skipped entries it could not read: one error line naming them (so
/// the exit status says the queue is damaged), once everything else is printed.
fn damaged(unreadable: &[crate::spool::Unreadable]) -> anyhow::Result<()> {
    match unreadable {
        [] => Ok(()),
        [u] => anyhow::bail!("{u}"),
        [u, rest @ ..] => anyhow::bail!(
            "{} queue entries cannot be read and were skipped, the first: {u}",
            rest.len() + 1
        ),
    }
}

/// `hold --list`: every held domain, since when, and how many messages are held.
pub fn holds(spool: &Spool, out: &mut dyn Write) -> anyhow::Result<()> {
    let held = spool.held_domains();
    if held.is_empty() {
        writeln!(out, "No domain is on hold")?;
        out.flush()?;
        return Ok(());
    }
    let width = held.iter().map(|(d, _)| d.len()).max().unwrap_or(0).max(6);
    writeln!(out, "{:<width$}  {:<20}  Messages", "Domain", "Held since")?;
    for (d, since) in &held {
        let n = spool.held_count(d)?;
        writeln!(out, "{d:<width$}  {:<20}  {n}", time_short(*since))?;
    }
    out.flush()?;
    Ok(())
}

/// A time as `2026-12-01T20:30:00Z`.
pub fn time(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// A time as `2026-12-01 20:30:00` (UTC), for tables.
fn time_short(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

fn table_header(out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<13} {:>9} {:<20} {:<7} {:>3} Sender/Recipient",
        "Queue ID", "Size", "Arrival", "State", "Att"
    )
}

/// mailq's layout: a line per message, its recipients indented below.
fn table_row(out: &mut dyn Write, m: &QueuedMessage) -> std::io::Result<()> {
    let arrival = chrono::DateTime::from_timestamp_millis(m.arrival_ms as i64)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default();
    let state = if m.held { "held" } else { "queued" };
    let sender = if m.sender.is_empty() { "<>" } else { &m.sender };
    writeln!(
        out,
        "{:<13} {:>9} {:<20} {:<7} {:>3} {}",
        m.id, m.size, arrival, state, m.attempts, sender
    )?;
    if let Some(err) = &m.last_error {
        writeln!(out, "{:>56}({err})", "")?;
    }
    for r in &m.recipients {
        writeln!(out, "{:>56}{}", "", r.address)?;
    }
    Ok(())
}

/// qshape's age buckets, in minutes: a message is counted in the first bucket it is younger
/// than; the last column holds the rest.
const BUCKETS: [u64; 9] = [5, 10, 20, 40, 80, 160, 320, 640, 1280];

/// Messages per domain by age (qshape): a TOTAL row, then domains by count.
/// Partners with a quota are listed with what they use of it, even with nothing queued.
pub fn shape(
    spool: &Spool,
    json: bool,
    quotas: &Quotas,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let now = now_ms();
    let mut rows: BTreeMap<String, [u64; 10]> = BTreeMap::new();
    let mut unreadable = Vec::new();
    spool.for_each_readable(
        None,
        |m| {
            let age_min = now.saturating_sub(m.arrival_ms) / 60_000;
            let b = BUCKETS.iter().position(|&lim| age_min < lim).unwrap_or(9);
            rows.entry(m.domain).or_insert([0; 10])[b] += 1;
            true
        },
        |u| unreadable.push(u),
    )?;
    for d in quotas.keys() {
        rows.entry(d.clone()).or_insert([0; 10]);
    }
    let mut total = [0u64; 10];
    for r in rows.values() {
        for (t, v) in total.iter_mut().zip(r) {
            *t += v;
        }
    }
    let mut ordered: Vec<(String, [u64; 10])> = rows.into_iter().collect();
    ordered.sort_by(|a, b| {
        let (ta, tb): (u64, u64) = (a.1.iter().sum(), b.1.iter().sum());
        tb.cmp(&ta).then(a.0.cmp(&b.0))
    });
    ordered.insert(0, ("TOTAL".to_string(), total));
    let held = spool.held_domains();
    let is_held = |d: &str| d != "TOTAL" && held.iter().any(|(h, _)| h == d);
    if json {
        for (d, r) in &ordered {
            let mut buckets = serde_json::Map::new();
            for (i, lim) in BUCKETS.iter().enumerate() {
                buckets.insert(lim.to_string(), r[i].into());
            }
            buckets.insert(format!("{}+", BUCKETS[8]), r[9].into());
            let mut line = serde_json::json!({
                "domain": d,
                "total": r.iter().sum::<u64>(),
                "buckets": buckets,
                "held": is_held(d),
            });
            if let Some(q) = quotas.get(d) {
                line["quota"] = q.to_json(spool.usage(d));
            }
            writeln!(out, "{line}")?;
        }
    } else {
        let width = ordered
            .iter()
            .map(|(d, _)| d.len())
            .max()
            .unwrap_or(5)
            .max(6);
        write!(out, "{:>width$} {:>6}", "", "T")?;
        for lim in BUCKETS {
            write!(out, " {lim:>5}")?;
        }
        writeln!(out, " {:>5}", format!("{}+", BUCKETS[8]))?;
        for (d, r) in &ordered {
            write!(out, "{d:>width$} {:>6}", r.iter().sum::<u64>())?;
            for v in r {
                write!(out, " {v:>5}")?;
            }
            if is_held(d) {
                write!(out, "  (on hold)")?;
            }
            if let Some(q) = quotas.get(d) {
                write!(out, "  ({})", quota_line(q, spool.usage(d)))?;
            }
            writeln!(out)?;
        }
    }
    out.flush()?;
    damaged(&unreadable)
}

/// A message's envelope, its queue entries, and its headers (or the whole message).
pub fn show(spool: &Spool, id: &str, body: bool, out: &mut dyn Write) -> anyhow::Result<()> {
    let Some(stored) = spool.stored_envelope(id)? else {
        anyhow::bail!("{id}: no such message in the queue");
    };
    let message = spool
        .load_message(id)?
        .unwrap_or_else(|| crate::spool::Message::from(Vec::new()));
    let e = &stored.envelope;
    writeln!(out, "*** ENVELOPE RECORDS {id} ***")?;
    writeln!(out, "message_size: {}", e.size)?;
    writeln!(out, "message_arrival_time: {}", time(e.arrival_ms))?;
    writeln!(
        out,
        "sender: {}",
        if e.sender.is_empty() { "<>" } else { &e.sender }
    )?;
    writeln!(out, "client: {} [{}]", e.helo, e.client_ip)?;
    writeln!(
        out,
        "body_type: {}",
        match e.body {
            Body::SevenBit => "7BIT",
            Body::EightBitMime => "8BITMIME",
        }
    )?;
    writeln!(out, "smtputf8: {}", if e.smtputf8 { "yes" } else { "no" })?;
    if let Some(ret) = e.ret {
        let ret = match ret {
            Ret::Full => "FULL (the whole message)",
            Ret::Hdrs => "HDRS (headers only)",
        };
        writeln!(out, "dsn_ret: {ret}")?;
    }
    if let Some(envid) = &e.envid {
        writeln!(out, "dsn_envid: {envid}")?;
    }
    for d in &stored.domains {
        let Some(q) = spool.queue_entry(d, id)? else {
            continue;
        };
        let next = if q.held {
            "none while held".to_string()
        } else {
            time(q.next_attempt_ms)
        };
        writeln!(
            out,
            "domain: {d} ({}, {} attempt(s), next attempt {next})",
            if q.held { "on hold" } else { "queued" },
            q.attempts,
        )?;
        if let Some(err) = &q.last_error {
            writeln!(out, "last_error: {err}")?;
        }
        if let Some(t) = &q.last_tls {
            writeln!(out, "last_tls: {} {}", t.relay, t.state)?;
        }
        for r in &q.recipients {
            let state = match r.state {
                RcptState::Pending => "pending",
                RcptState::Delivered => "delivered",
                RcptState::Failed => "failed",
            };
            write!(out, "recipient: <{}> {state}", r.address)?;
            if let Some(o) = &r.orcpt {
                write!(out, ", original recipient {o}")?;
            }
            if let Some(n) = r.notify {
                write!(out, ", notify {}", notify_words(n))?;
            }
            writeln!(out)?;
        }
    }
    if body {
        writeln!(out, "*** MESSAGE CONTENTS {id} ***")?;
        // Part by part: a large message is never whole in memory.
        std::io::copy(&mut message.reader(), out)?;
    } else {
        writeln!(out, "*** MESSAGE HEADERS {id} ***")?;
        // The first part holds the header section.
        let first = message.first();
        let end = first
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|p| p + 2)
            .unwrap_or(first.len());
        out.write_all(&first[..end])?;
    }
    writeln!(out, "*** END OF MESSAGE {id} ***")?;
    out.flush()?;
    Ok(())
}

/// DSN NOTIFY as RFC 3461 writes it: `NEVER`, or a list of `SUCCESS`, `FAILURE`, `DELAY`.
fn notify_words(n: Notify) -> String {
    if n.never {
        return "NEVER".into();
    }
    let words: Vec<&str> = [
        (n.success, "SUCCESS"),
        (n.failure, "FAILURE"),
        (n.delay, "DELAY"),
    ]
    .iter()
    .filter(|(on, _)| *on)
    .map(|(_, w)| *w)
    .collect();
    if words.is_empty() {
        "NEVER".into()
    } else {
        words.join(",")
    }
}
