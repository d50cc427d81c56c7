//! Every RocksDB key of the spool, built and taken apart in this one place.
//!
//! Numbers are big-endian so that byte order is numeric order, and a domain is always
//! followed by a `0x00` separator so that one domain's keys form one contiguous range that no
//! other domain shares (`a.com\0…` sorts before `a.com.evil\0…`, and the range
//! `[a.com\0, a.com\x01)` holds only `a.com`). Domains and ids never contain `0x00`
//! ([`valid_part`] is checked before any key is built).

/// Column families of the spool, in the order they are opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cf {
    /// `format` → the stored format version (u32 big-endian); `hold`, `partial`,
    /// `callout` and `sts` entries under their prefixes.
    Meta,
    /// id → raw message bytes.
    Messages,
    /// id → JSON `StoredEnvelope`.
    Envelopes,
    /// domain 0x00 id → JSON `QueueEntry`.
    Queue,
    /// next_attempt_ms (u64 BE) domain 0x00 id → empty.
    Due,
}

impl Cf {
    pub const ALL: [Cf; 5] = [Cf::Meta, Cf::Messages, Cf::Envelopes, Cf::Queue, Cf::Due];

    pub fn name(self) -> &'static str {
        match self {
            Cf::Meta => "meta",
            Cf::Messages => "messages",
            Cf::Envelopes => "envelopes",
            Cf::Queue => "queue",
            Cf::Due => "due",
        }
    }
}

/// Key of the format version in [`Cf::Meta`].
pub const META_FORMAT: &[u8] = b"format";
/// Rewritten by [`crate::spool::Spool::probe`] to see whether commits work again.
pub const META_PROBE: &[u8] = b"probe";

const SEP: u8 = 0x00;

/// Prefix of the held domains in [`Cf::Meta`]: `hold 0x00 domain` → held-since ms (u64 BE).
pub const HOLD_PREFIX: &[u8] = b"hold\x00";

/// Key of a held domain in [`Cf::Meta`].
pub fn hold(domain: &str) -> Vec<u8> {
    let mut k = HOLD_PREFIX.to_vec();
    k.extend_from_slice(domain.as_bytes());
    k
}

/// The domain of a [`hold`] key.
pub fn parse_hold(key: &[u8]) -> Option<&str> {
    std::str::from_utf8(key.strip_prefix(HOLD_PREFIX)?).ok()
}

/// Whether `s` may be a domain or id inside a key: no `0x00`, which is the separator.
/// (Ids must also be non-empty; that is checked where envelopes are accepted.)
pub fn valid_part(s: &str) -> bool {
    !s.as_bytes().contains(&SEP)
}

/// Key of [`Cf::Messages`] and [`Cf::Envelopes`].
pub fn message(id: &str) -> Vec<u8> {
    id.as_bytes().to_vec()
}

/// Key of part `n` (from 1) of a large message in [`Cf::Messages`]: `id 0x00 n (u32 BE)`.
/// Part 0, the first, is at [`message`]`(id)`; the parts of one message sort after it and
/// before any other id (ids hold no `0x00`).
pub fn part(id: &str, n: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(id.len() + 5);
    k.extend_from_slice(id.as_bytes());
    k.push(SEP);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

/// The id of a [`Cf::Messages`] key, a [`message`] or a [`part`] key.
pub fn message_of(key: &[u8]) -> &[u8] {
    match key.iter().position(|&b| b == SEP) {
        Some(i) => &key[..i],
        None => key,
    }
}

/// Exclusive end of every part key of `id`: `id 0x01`.
pub fn parts_end(id: &str) -> Vec<u8> {
    let mut k = id.as_bytes().to_vec();
    k.push(SEP + 1);
    k
}

/// Prefix in [`Cf::Meta`] of the messages being received in parts: `partial 0x00 id` →
/// empty, written with the first part and deleted by the commit that queues the message.
/// What is left at start belongs to a message that was never acknowledged.
pub const PARTIAL_PREFIX: &[u8] = b"partial\x00";

/// Key of a message being received, in [`Cf::Meta`].
pub fn partial(id: &str) -> Vec<u8> {
    let mut k = PARTIAL_PREFIX.to_vec();
    k.extend_from_slice(id.as_bytes());
    k
}

/// The id of a [`partial`] key.
pub fn parse_partial(key: &[u8]) -> Option<&str> {
    std::str::from_utf8(key.strip_prefix(PARTIAL_PREFIX)?).ok()
}

/// Prefix in [`Cf::Meta`] of each domain's queue counters: `usage 0x00 domain` → entries
/// and bytes (two i64 BE), changed only by merges in the commits that change the queue
/// (see `usage.rs`).
pub const USAGE_PREFIX: &[u8] = b"usage\x00";

/// Key of a domain's counters in [`Cf::Meta`].
pub fn usage(domain: &str) -> Vec<u8> {
    let mut k = USAGE_PREFIX.to_vec();
    k.extend_from_slice(domain.as_bytes());
    k
}

/// The domain of a [`usage`] key.
pub fn parse_usage(key: &[u8]) -> Option<&str> {
    std::str::from_utf8(key.strip_prefix(USAGE_PREFIX)?).ok()
}

/// Prefix in [`Cf::Meta`] of the recipient callout's cached answers: `callout 0x00 address`
/// (lower-cased) → JSON [`crate::spool::CalloutAnswer`]. A cache: nothing else refers to
/// these keys, and losing one costs one callout (see `cache.rs`).
pub const CALLOUT_PREFIX: &[u8] = b"callout\x00";

/// Key of the cached callout answer about `address`, in [`Cf::Meta`] (the address
/// lower-cased, so that `Alice@` and `alice@` share it).
pub fn callout(address: &str) -> Vec<u8> {
    let mut k = CALLOUT_PREFIX.to_vec();
    k.extend_from_slice(address.to_ascii_lowercase().as_bytes());
    k
}

/// The address of a [`callout`] key; `None` past the end of the prefix's range.
#[cfg(test)]
pub fn parse_callout(key: &[u8]) -> Option<&[u8]> {
    key.strip_prefix(CALLOUT_PREFIX)
}

/// Prefix in [`Cf::Meta`] of destination domains' cached MTA-STS policies: `sts 0x00
/// domain` (lower-cased) → JSON [`crate::spool::StsRecord`]. A cache like the callout's:
/// losing one costs one policy fetch (see `cache.rs`).
pub const STS_PREFIX: &[u8] = b"sts\x00";

/// Key of the cached MTA-STS policy of `domain`, in [`Cf::Meta`] (lower-cased, without a
/// trailing dot).
pub fn sts(domain: &str) -> Vec<u8> {
    let mut k = STS_PREFIX.to_vec();
    k.extend_from_slice(domain.trim_end_matches('.').to_ascii_lowercase().as_bytes());
    k
}

/// The domain of an [`sts`] key; `None` outside the prefix's range.
#[cfg(test)]
pub fn parse_sts(key: &[u8]) -> Option<&[u8]> {
    key.strip_prefix(STS_PREFIX)
}

/// Key of [`Cf::Queue`]: `domain 0x00 id`.
pub fn queue(domain: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(domain.len() + 1 + id.len());
    k.extend_from_slice(domain.as_bytes());
    k.push(SEP);
    k.extend_from_slice(id.as_bytes());
    k
}

/// First key of `domain`'s range in [`Cf::Queue`] (inclusive): `domain 0x00`.
pub fn queue_start(domain: &str) -> Vec<u8> {
    let mut k = domain.as_bytes().to_vec();
    k.push(SEP);
    k
}

/// End of `domain`'s range in [`Cf::Queue`] (exclusive): `domain 0x01`.
pub fn queue_end(domain: &str) -> Vec<u8> {
    let mut k = domain.as_bytes().to_vec();
    k.push(SEP + 1);
    k
}

/// `(domain, id)` of a [`Cf::Queue`] key.
pub fn parse_queue(key: &[u8]) -> Option<(&str, &str)> {
    let sep = key.iter().position(|&b| b == SEP)?;
    let domain = std::str::from_utf8(&key[..sep]).ok()?;
    let id = std::str::from_utf8(&key[sep + 1..]).ok()?;
    Some((domain, id))
}

/// Key of [`Cf::Due`]: `at_ms (u64 BE) domain 0x00 id`.
pub fn due(at_ms: u64, domain: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + domain.len() + 1 + id.len());
    k.extend_from_slice(&at_ms.to_be_bytes());
    k.extend_from_slice(domain.as_bytes());
    k.push(SEP);
    k.extend_from_slice(id.as_bytes());
    k
}

/// Exclusive end of the [`Cf::Due`] keys due at `now_ms` (those with `at_ms <= now_ms`);
/// `None` when every key is due (`now_ms == u64::MAX`).
pub fn due_end(now_ms: u64) -> Option<Vec<u8>> {
    now_ms.checked_add(1).map(|t| t.to_be_bytes().to_vec())
}

/// `(at_ms, domain, id)` of a [`Cf::Due`] key.
pub fn parse_due(key: &[u8]) -> Option<(u64, &str, &str)> {
    let (at, rest) = key.split_first_chunk::<8>()?;
    let (domain, id) = parse_queue(rest)?;
    Some((u64::from_be_bytes(*at), domain, id))
}

/// The stored form of the format version.
pub fn format_value(version: u32) -> Vec<u8> {
    version.to_be_bytes().to_vec()
}

pub fn parse_format(value: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(value.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_keys_sort_by_time_then_domain_then_id() {
        // Little-endian would put 256 before 1; big-endian must not.
        let mut keys = [
            due(65_536, "a.com", "B"),
            due(256, "z.com", "A"),
            due(1, "z.com", "A"),
            due(256, "a.com", "C"),
            due(u64::MAX, "a.com", "A"),
            due(0, "b.com", "A"),
        ];
        keys.sort();
        let parsed: Vec<_> = keys.iter().map(|k| parse_due(k).unwrap()).collect();
        assert_eq!(
            parsed,
            vec![
                (0, "b.com", "A"),
                (1, "z.com", "A"),
                (256, "a.com", "C"),
                (256, "z.com", "A"),
                (65_536, "a.com", "B"),
                (u64::MAX, "a.com", "A"),
            ]
        );
    }

    #[test]
    fn due_end_bounds_exactly_the_due_keys() {
        let end = due_end(1000).unwrap();
        assert!(due(1000, "zzz", "ZZZZ").as_slice() < end.as_slice());
        assert!(due(1001, "", "").as_slice() >= end.as_slice());
        assert!(due_end(u64::MAX).is_none());
    }

    #[test]
    fn a_domain_range_holds_only_that_domain() {
        let mut keys = [
            queue("a.com.evil", "1"),
            queue("a.com", "2"),
            queue("a.co", "3"),
            queue("a.com", "1"),
            queue("b.com", "0"),
            queue("a.comx", "0"),
        ];
        keys.sort();
        let parsed: Vec<_> = keys.iter().map(|k| parse_queue(k).unwrap()).collect();
        assert_eq!(
            parsed,
            vec![
                ("a.co", "3"),
                ("a.com", "1"),
                ("a.com", "2"),
                ("a.com.evil", "1"),
                ("a.comx", "0"),
                ("b.com", "0"),
            ]
        );
        let (start, end) = (queue_start("a.com"), queue_end("a.com"));
        let inside: Vec<_> = keys
            .iter()
            .filter(|k| k.as_slice() >= start.as_slice() && k.as_slice() < end.as_slice())
            .map(|k| parse_queue(k).unwrap())
            .collect();
        assert_eq!(inside, vec![("a.com", "1"), ("a.com", "2")]);
    }

    #[test]
    fn callout_keys_are_case_blind_and_apart_from_the_others() {
        assert_eq!(callout("Alice@Example.COM"), callout("alice@example.com"));
        assert_eq!(
            parse_callout(&callout("Bob@x.test")),
            Some(&b"bob@x.test"[..])
        );
        for other in [
            hold("x.test"),
            partial("ID"),
            META_FORMAT.to_vec(),
            META_PROBE.to_vec(),
        ] {
            assert_eq!(parse_callout(&other), None);
        }
    }

    #[test]
    fn sts_keys_are_case_blind_and_apart_from_the_others() {
        assert_eq!(sts("Example.COM."), sts("example.com"));
        assert_eq!(parse_sts(&sts("X.test")), Some(&b"x.test"[..]));
        for other in [
            hold("x.test"),
            partial("ID"),
            callout("sts@x.test"),
            META_FORMAT.to_vec(),
            META_PROBE.to_vec(),
        ] {
            assert_eq!(parse_sts(&other), None);
        }
        assert_eq!(parse_callout(&sts("x.test")), None);
    }

    #[test]
    fn separators_are_refused_inside_parts() {
        assert!(valid_part("example.com"));
        assert!(!valid_part("a.com\0evil"));
    }

    #[test]
    fn format_round_trips_and_rejects_bad_lengths() {
        assert_eq!(parse_format(&format_value(7)), Some(7));
        assert_eq!(parse_format(b"\0\0\0\0\x01"), None);
    }
}
