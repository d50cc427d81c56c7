//! Client rate limits (Postfix's anvil): new connections and messages per client address
//! within a time window, `[smtp] max_connection_rate` and `max_message_rate`.
//!
//! A [`Rate`] is `"N/DURATION"` (`"60/1m"`, `"600/1h"`; a bare unit means one of it:
//! `"60/m"`). Each client address has a fixed window that opens at its first event and
//! lasts the rate's duration; within it at most N events are admitted, and refused events
//! are not counted (a client that keeps trying is admitted again when its window ends).
//! An IPv4-mapped IPv6 client counts as its IPv4 address.
//!
//! Memory is bounded however many clients come: a [`RateTable`] holds at most
//! [`MAX_CLIENTS`] windows. Expired windows are swept once per [`SWEEP_EVERY`] and whenever
//! the table is full; a new client that still finds it full (more than `MAX_CLIENTS`
//! clients active within one window) is admitted without being counted: the limit fails
//! open rather than refusing mail from clients it cannot track.
//!
//! The tables live in the SMTP server's shared state and take the rate from the caller (the
//! configuration snapshot in force), so a reload changes the limits without losing the
//! counts. Time is passed in (an [`Instant`]), so the arithmetic is tested without a clock.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Client windows one table keeps at most (about 40 bytes each).
pub const MAX_CLIENTS: usize = 100_000;
/// How often expired windows are swept out (besides when the table is full).
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// At most `count` events per `per`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    /// `"N/DURATION"`: N at least 1, the duration a humantime string of at least 1 s.
    pub fn parse(s: &str) -> Result<Rate, String> {
        let bad = || format!("invalid rate {s:?} (expected e.g. \"60/1m\": at most 60 per minute)");
        let (n, per) = s.split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        if count == 0 {
            return Err(format!("invalid rate {s:?}: the count must be at least 1"));
        }
        let per = per.trim();
        // "60/m" is "60/1m".
        let per = if per.starts_with(|c: char| c.is_ascii_alphabetic()) {
            format!("1{per}")
        } else {
            per.to_string()
        };
        let per = humantime::parse_duration(&per).map_err(|_| bad())?;
        if per < Duration::from_secs(1) {
            return Err(format!(
                "invalid rate {s:?}: the period must be at least 1s"
            ));
        }
        Ok(Rate { count, per })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, humantime::format_duration(self.per))
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Str(String),
            Int(i64),
        }
        match Raw::deserialize(d)? {
            Raw::Str(s) => Rate::parse(&s).map_err(serde::de::Error::custom),
            Raw::Int(n) => Err(serde::de::Error::custom(format!(
                "invalid rate {n} (expected a string such as \"60/1m\": at most 60 per minute)"
            ))),
        }
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// One client's current window.
#[derive(Clone, Copy, Debug)]
struct Window {
    start: Instant,
    count: u32,
}

#[derive(Debug)]
struct Table {
    windows: HashMap<IpAddr, Window>,
    last_sweep: Instant,
}

/// Per-client windows for one kind of event (connections, or messages).
#[derive(Debug)]
pub struct RateTable {
    inner: Mutex<Table>,
    capacity: usize,
}

impl Default for RateTable {
    fn default() -> Self {
        RateTable::with_capacity(MAX_CLIENTS)
    }
}

impl RateTable {
    /// A table that tracks at most `capacity` clients.
    pub fn with_capacity(capacity: usize) -> RateTable {
        RateTable {
            inner: Mutex::new(Table {
                windows: HashMap::new(),
                last_sweep: Instant::now(),
            }),
            capacity: capacity.max(1),
        }
    }

    /// Whether `client` may have one more event at `now` under `rate`; when it may, the
    /// event is counted.
    pub fn admit(&self, client: IpAddr, rate: Rate, now: Instant) -> bool {
        let client = canonical(client);
        let mut t = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let expired = |w: &Window| now.saturating_duration_since(w.start) >= rate.per;
        if now.saturating_duration_since(t.last_sweep) >= SWEEP_EVERY {
            t.windows.retain(|_, w| !expired(w));
            t.last_sweep = now;
        }
        if let Some(w) = t.windows.get_mut(&client) {
            if expired(w) {
                *w = Window {
                    start: now,
                    count: 0,
                };
            }
            if w.count >= rate.count {
                return false;
            }
            w.count += 1;
            return true;
        }
        if t.windows.len() >= self.capacity {
            t.windows.retain(|_, w| !expired(w));
            t.last_sweep = now;
            if t.windows.len() >= self.capacity {
                // Too many active clients to track: admitted, uncounted (fail open).
                return true;
            }
        }
        t.windows.insert(
            client,
            Window {
                start: now,
                count: 1,
            },
        );
        true
    }

    /// Clients tracked now (for tests and the bound).
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .windows
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The server's two tables.
#[derive(Debug, Default)]
pub struct Rates {
    /// New connections (`max_connection_rate`).
    pub connections: RateTable,
    /// MAIL commands (`max_message_rate`).
    pub messages: RateTable,
}

/// An IPv4-mapped IPv6 client as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_rates_and_refuses_bad_ones() {
        assert_eq!(
            Rate::parse("60/1m").unwrap(),
            Rate {
                count: 60,
                per: Duration::from_secs(60)
            }
        );
        assert_eq!(
            Rate::parse(" 600 / 1h ").unwrap().per,
            Duration::from_secs(3600)
        );
        assert_eq!(Rate::parse("10/m").unwrap().per, Duration::from_secs(60));
        assert_eq!(Rate::parse("5/90s").unwrap().per, Duration::from_secs(90));
        for bad in [
            "", "60", "/1m", "0/1m", "-1/1m", "x/1m", "60/", "60/soon", "60/0s", "60/500ms",
        ] {
            let e = Rate::parse(bad).unwrap_err();
            assert!(!e.contains('\n') && e.contains("rate"), "{bad}: {e}");
        }
        assert_eq!(Rate::parse("60/1m").unwrap().to_string(), "60/1m");
    }

    #[test]
    fn configuration_keys() {
        use crate::config::Config;
        let base = "hostname = \"mx2.test\"\nspool = \"/x\"\n[smtp]\n";
        let c = Config::parse(base).unwrap();
        assert_eq!(c.smtp.max_connection_rate, None);
        assert_eq!(c.smtp.max_message_rate, None);
        let c = Config::parse(&format!(
            "{base}max_connection_rate = \"60/1m\"\nmax_message_rate = \"600/1h\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.smtp.max_connection_rate,
            Some(Rate::parse("60/1m").unwrap())
        );
        assert_eq!(c.smtp.max_message_rate.unwrap().count, 600);
        // Printed by check-config as it was written.
        assert!(c.to_toml().contains("max_connection_rate = \"60/1m\""));
        for bad in ["\"often\"", "\"0/1m\"", "60"] {
            let e = Config::parse(&format!("{base}max_message_rate = {bad}\n")).unwrap_err();
            assert!(!e.contains('\n'), "{e}");
            assert!(e.contains("line 4") && e.contains("invalid rate"), "{e}");
        }
    }

    #[test]
    fn a_fixed_window_per_client() {
        let t = RateTable::default();
        let rate = Rate::parse("3/1m").unwrap();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        let b = ip("192.0.2.2");
        assert!(t.admit(a, rate, t0));
        assert!(t.admit(a, rate, t0 + Duration::from_secs(1)));
        assert!(t.admit(a, rate, t0 + Duration::from_secs(2)));
        assert!(!t.admit(a, rate, t0 + Duration::from_secs(3)));
        // Refusals are not counted, and another client has its own window.
        assert!(!t.admit(a, rate, t0 + Duration::from_secs(59)));
        assert!(t.admit(b, rate, t0 + Duration::from_secs(59)));
        // The window opened at t0 ends at t0 + 60 s.
        assert!(t.admit(a, rate, t0 + Duration::from_secs(60)));
        assert!(t.admit(a, rate, t0 + Duration::from_secs(61)));
        assert!(t.admit(a, rate, t0 + Duration::from_secs(62)));
        assert!(!t.admit(a, rate, t0 + Duration::from_secs(63)));
        // A mapped address is the IPv4 client.
        assert!(!t.admit(ip("::ffff:192.0.2.1"), rate, t0 + Duration::from_secs(64)));
        // A stricter rate from a reload applies to the running window.
        let one = Rate::parse("1/1m").unwrap();
        assert!(!t.admit(b, one, t0 + Duration::from_secs(70)));
    }

    #[test]
    fn memory_is_bounded_and_expired_windows_are_swept() {
        let t = RateTable::with_capacity(100);
        let rate = Rate::parse("1/10s").unwrap();
        let t0 = Instant::now();
        for i in 0..100u32 {
            assert!(t.admit(IpAddr::from(i.to_be_bytes()), rate, t0));
        }
        assert_eq!(t.len(), 100);
        // Full, nothing expired: a new client is admitted but not tracked.
        let new = ip("198.51.100.1");
        assert!(t.admit(new, rate, t0 + Duration::from_secs(1)));
        assert!(t.admit(new, rate, t0 + Duration::from_secs(1)));
        assert_eq!(t.len(), 100);
        // Tracked clients keep their limit meanwhile.
        assert!(!t.admit(
            IpAddr::from(7u32.to_be_bytes()),
            rate,
            t0 + Duration::from_secs(2)
        ));
        // Once their windows ended, a full table is swept for the new client.
        assert!(t.admit(new, rate, t0 + Duration::from_secs(10)));
        assert_eq!(t.len(), 1);
        assert!(!t.admit(new, rate, t0 + Duration::from_secs(11)));
        // The periodic sweep empties a table of stale windows.
        let later = t0 + Duration::from_secs(10) + SWEEP_EVERY;
        assert!(t.admit(ip("198.51.100.2"), rate, later));
        assert_eq!(t.len(), 1);
    }
}
