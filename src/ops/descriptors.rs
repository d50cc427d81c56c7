//! File descriptors: `serve` raises its soft `RLIMIT_NOFILE` to the hard limit, and shares
//! the limit out so that SMTP sessions can never take the descriptors the spool and the
//! deliveries need. A session beyond its share gets `421 4.7.0` before it is served; the
//! spool's RocksDB keeps at most [`crate::spool::Spool::descriptor_reserve`] files open, so a
//! flood of connections cannot make a memtable flush fail with "Too many open files" (a
//! background error RocksDB does not clear by itself).

/// Descriptors kept for everything that is neither a session nor the spool nor a delivery:
/// standard streams, listeners, the control socket and its clients, DNS, the metrics
/// listener, the logs.
pub const MARGIN: u64 = 64;

/// Descriptors one delivery may hold at once: its connection and a DNS query.
pub const PER_DELIVERY: u64 = 2;

/// `RLIMIT_NOFILE` as `(soft, hard)`, if it can be read.
fn get() -> Option<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes the struct it is given.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0)
        .then_some((r.rlim_cur, r.rlim_max))
}

/// The soft `RLIMIT_NOFILE` now.
pub fn limit() -> u64 {
    get().map_or(1024, |(soft, _)| soft)
}

/// Raises the soft `RLIMIT_NOFILE` to the hard one (as Postfix's master does); returns
/// `(before, after)`.
pub fn raise() -> (u64, u64) {
    let Some((soft, hard)) = get() else {
        return (1024, 1024);
    };
    let raised = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: setrlimit(2) reads the struct it is given.
    if soft < hard && unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return (soft, hard);
    }
    (soft, soft)
}

/// How many SMTP sessions the descriptors allow: the limit less the spool's reserve, each
/// delivery's, and the [`MARGIN`]; at least 1.
pub fn session_budget(limit: u64, spool_reserve: u64, max_deliveries: usize) -> usize {
    let reserved = spool_reserve + MARGIN + PER_DELIVERY * max_deliveries as u64;
    usize::try_from(limit.saturating_sub(reserved).max(1)).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_get_what_the_spool_and_deliveries_leave() {
        // LimitNOFILE=1024, a spool keeping 192, 100 deliveries: 1024 - 192 - 64 - 200.
        assert_eq!(session_budget(1024, 192, 100), 568);
        assert_eq!(session_budget(65536, 4160, 100), 65536 - 4160 - 64 - 200);
        // A limit too small for anything still serves one session at a time.
        assert_eq!(session_budget(100, 192, 100), 1);
    }

    #[test]
    fn raising_never_lowers_the_limit() {
        let before = limit();
        let (was, now) = raise();
        assert_eq!(was, before);
        assert!(now >= was);
        assert_eq!(limit(), now);
    }
}
