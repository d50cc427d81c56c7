//! The Prometheus metrics: the metric families and their encoding in the OpenMetrics text
//! format, through `prometheus-client`.
//!
//! `serve` makes one [`Metrics`] and shares it: the SMTP driver counts connections,
//! accepted messages and refusals (the session names each refusal's reason from a fixed
//! set, [`crate::smtp::session::Event`]), the scheduler counts delivery outcomes where it
//! logs them, the spool writer times each group commit. Counters and gauges are atomics.
//! The queue figures are not kept up to date as mail comes and goes: [`Metrics::scrape`]
//! reads them from the spool at each scrape (what `shape` reads), in a blocking task; the
//! per-domain gauges are cleared first, so a drained domain disappears from the exposition.
//! `[metrics] listen` serves the text over HTTP ([`super::metrics_http`]).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::spool::{Spool, SpoolError};

/// A metric's labels: `(name, value)` pairs.
pub type Labels = Vec<(&'static str, String)>;

/// Every metric mxspool exposes, registered in one [`Registry`].
pub struct Metrics {
    registry: Registry,
    /// Messages stored and acknowledged `250`.
    pub accepted_messages: Counter,
    /// RCPTs refused, by `reason`.
    pub refused_recipients: Family<Labels, Counter>,
    /// Messages refused at MAIL or after DATA, by `reason`.
    pub refused_messages: Family<Labels, Counter>,
    /// Connections refused before the greeting, by `reason` (`max_connections`,
    /// `max_connections_per_ip`, `rate`, `dnsbl`).
    pub refused_connections: Family<Labels, Counter>,
    /// Delivery outcomes per recipient, by `domain` and `status` (sent, deferred, bounced).
    pub deliveries: Family<Labels, Counter>,
    /// SMTP connections open now (a drop guard per accepted connection).
    pub connections: Gauge,
    /// Seconds each group commit of the spool writer took (write and fsync).
    pub commit_seconds: Histogram,
    /// Per `domain`: queued messages, their bytes, the oldest one's age (set at scrape).
    pub queued_messages: Family<Labels, Gauge>,
    pub queued_bytes: Family<Labels, Gauge>,
    pub oldest_age_seconds: Family<Labels, Gauge>,
    /// Domains on hold (set at scrape).
    pub held_domains: Gauge,
    /// Bytes free on the spool's file system (set at scrape).
    pub spool_free_bytes: Gauge,
    /// Per partner `domain` with a quota: its limits and what its queue uses of them, from
    /// the spool's counters (set at scrape).
    pub quota_max_messages: Family<Labels, Gauge>,
    pub quota_max_bytes: Family<Labels, Gauge>,
    pub quota_used_messages: Family<Labels, Gauge>,
    pub quota_used_bytes: Family<Labels, Gauge>,
    /// One scrape at a time: the per-domain gauges are cleared, set and encoded together.
    scrape: std::sync::Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("mxspool");
        let m = Metrics {
            registry: Registry::default(),
            accepted_messages: Counter::default(),
            refused_recipients: Family::default(),
            refused_messages: Family::default(),
            refused_connections: Family::default(),
            deliveries: Family::default(),
            connections: Gauge::default(),
            commit_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 16)),
            queued_messages: Family::default(),
            queued_bytes: Family::default(),
            oldest_age_seconds: Family::default(),
            held_domains: Gauge::default(),
            spool_free_bytes: Gauge::default(),
            quota_max_messages: Family::default(),
            quota_max_bytes: Family::default(),
            quota_used_messages: Family::default(),
            quota_used_bytes: Family::default(),
            scrape: std::sync::Mutex::new(()),
        };
        registry.register(
            "smtp_accepted_messages",
            "Messages stored and acknowledged",
            m.accepted_messages.clone(),
        );
        registry.register(
            "smtp_refused_recipients",
            "Recipients refused, by reason",
            m.refused_recipients.clone(),
        );
        registry.register(
            "smtp_refused_messages",
            "Messages refused, by reason",
            m.refused_messages.clone(),
        );
        registry.register(
            "smtp_refused_connections",
            "Connections refused before the greeting, by reason",
            m.refused_connections.clone(),
        );
        registry.register(
            "deliveries",
            "Delivery outcomes per recipient, by domain and status",
            m.deliveries.clone(),
        );
        registry.register(
            "smtp_connections",
            "SMTP connections open now",
            m.connections.clone(),
        );
        registry.register(
            "spool_commit_seconds",
            "Duration of each synced group commit of the spool",
            m.commit_seconds.clone(),
        );
        registry.register(
            "queue_messages",
            "Queued messages per domain",
            m.queued_messages.clone(),
        );
        registry.register(
            "queue_bytes",
            "Bytes of the queued messages per domain",
            m.queued_bytes.clone(),
        );
        registry.register(
            "queue_oldest_age_seconds",
            "Age of the oldest queued message per domain",
            m.oldest_age_seconds.clone(),
        );
        registry.register("held_domains", "Domains on hold", m.held_domains.clone());
        registry.register(
            "spool_free_bytes",
            "Bytes free on the spool's file system",
            m.spool_free_bytes.clone(),
        );
        for (name, help, family) in [
            (
                "quota_max_messages",
                "A partner's max_messages quota",
                &m.quota_max_messages,
            ),
            (
                "quota_max_bytes",
                "A partner's max_bytes quota",
                &m.quota_max_bytes,
            ),
            (
                "quota_used_messages",
                "Messages queued for a partner with a quota",
                &m.quota_used_messages,
            ),
            (
                "quota_used_bytes",
                "Bytes queued for a partner with a quota",
                &m.quota_used_bytes,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        Metrics { registry, ..m }
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String does not fail");
        out
    }

    /// Set the scrape-time gauges from `spool` (queued messages, bytes and oldest age per
    /// domain, held domains, free space), then encode everything. Reads the whole queue
    /// (like `shape`): call it from a blocking task. A domain with nothing queued is not
    /// listed.
    pub fn scrape(
        &self,
        spool: &Spool,
        quotas: &crate::report::Quotas,
        now_ms: u64,
    ) -> Result<String, SpoolError> {
        let _one = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        let mut domains: std::collections::HashMap<String, QueueFigures> = Default::default();
        spool.for_each(None, |m| {
            let f = domains.entry(m.domain).or_insert(QueueFigures {
                messages: 0,
                bytes: 0,
                oldest_ms: u64::MAX,
            });
            f.messages += 1;
            f.bytes += m.size;
            f.oldest_ms = f.oldest_ms.min(m.arrival_ms);
            true
        })?;
        self.queued_messages.clear();
        self.queued_bytes.clear();
        self.oldest_age_seconds.clear();
        for (domain, f) in &domains {
            let l = label("domain", domain);
            self.queued_messages
                .get_or_create(&l)
                .set(f.messages as i64);
            self.queued_bytes.get_or_create(&l).set(f.bytes as i64);
            let age = now_ms.saturating_sub(f.oldest_ms) / 1000;
            self.oldest_age_seconds.get_or_create(&l).set(age as i64);
        }
        for family in [
            &self.quota_max_messages,
            &self.quota_max_bytes,
            &self.quota_used_messages,
            &self.quota_used_bytes,
        ] {
            family.clear();
        }
        let gauge = |n: u64| n.min(i64::MAX as u64) as i64;
        for (domain, q) in quotas {
            let (l, used) = (label("domain", domain), spool.usage(domain));
            if let Some(m) = q.max_messages {
                self.quota_max_messages.get_or_create(&l).set(gauge(m));
            }
            if let Some(b) = q.max_bytes {
                self.quota_max_bytes.get_or_create(&l).set(gauge(b));
            }
            self.quota_used_messages
                .get_or_create(&l)
                .set(gauge(used.messages));
            self.quota_used_bytes
                .get_or_create(&l)
                .set(gauge(used.bytes));
        }
        self.held_domains.set(spool.held_domains().len() as i64);
        match spool.free_bytes() {
            Ok(free) => {
                self.spool_free_bytes.set(free.min(i64::MAX as u64) as i64);
            }
            Err(e) => tracing::warn!("metrics: free space of the spool: {e}"),
        }
        Ok(self.encode())
    }
}

/// One domain's queue at a scrape.
struct QueueFigures {
    messages: u64,
    bytes: u64,
    oldest_ms: u64,
}

/// The `Content-Type` of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One label set of one label.
pub fn label(name: &'static str, value: &str) -> Labels {
    vec![(name, value.to_string())]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_encode_in_the_text_format() {
        let m = Metrics::new();
        m.accepted_messages.inc();
        m.refused_recipients
            .get_or_create(&label("reason", "relay"))
            .inc_by(2);
        m.deliveries
            .get_or_create(&vec![
                ("domain", "a.test".to_string()),
                ("status", "sent".to_string()),
            ])
            .inc();
        m.queued_bytes
            .get_or_create(&label("domain", "b.test"))
            .set(1234);
        m.commit_seconds.observe(0.002);
        let text = m.encode();
        for line in [
            "# TYPE mxspool_smtp_accepted_messages counter",
            "mxspool_smtp_accepted_messages_total 1",
            "mxspool_smtp_refused_recipients_total{reason=\"relay\"} 2",
            "mxspool_deliveries_total{domain=\"a.test\",status=\"sent\"} 1",
            "# TYPE mxspool_queue_bytes gauge",
            "mxspool_queue_bytes{domain=\"b.test\"} 1234",
            "# TYPE mxspool_spool_commit_seconds histogram",
            "mxspool_spool_commit_seconds_count 1",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }

    fn envelope(id: &str, arrival_ms: u64, size: u64, rcpts: &[&str]) -> crate::envelope::Envelope {
        crate::envelope::Envelope {
            id: id.into(),
            sender: "alice@sender.test".into(),
            recipients: rcpts
                .iter()
                .map(|r| crate::envelope::Recipient::new(*r))
                .collect(),
            arrival_ms,
            size,
            body: Default::default(),
            smtputf8: false,
            ret: None,
            envid: None,
            client_ip: "192.0.2.1".into(),
            helo: "client.test".into(),
        }
    }

    fn value(text: &str, sample: &str) -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
            .map(str::to_string)
    }

    #[test]
    fn a_scrape_reads_the_queue_per_domain_and_forgets_drained_domains() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool")).unwrap();
        let now = 1_000_000_000;
        spool
            .enqueue_blocking(
                envelope(
                    "0000000000001",
                    now - 90_000,
                    100,
                    &["u@a.test", "v@b.test"],
                ),
                vec![b'x'; 100],
            )
            .unwrap();
        spool
            .enqueue_blocking(
                envelope("0000000000002", now - 5_000, 50, &["w@a.test"]),
                vec![b'y'; 50],
            )
            .unwrap();
        let m = Metrics::new();
        let quotas: crate::report::Quotas = [(
            "a.test".to_string(),
            crate::policy::quota::Quota {
                max_messages: Some(10),
                max_bytes: None,
            },
        )]
        .into();
        let text = m.scrape(&spool, &quotas, now).unwrap();
        assert_eq!(
            value(&text, "mxspool_quota_max_bytes{domain=\"a.test\"}"),
            None
        );
        for (sample, want) in [
            ("mxspool_quota_max_messages{domain=\"a.test\"}", "10"),
            ("mxspool_quota_used_messages{domain=\"a.test\"}", "2"),
            ("mxspool_quota_used_bytes{domain=\"a.test\"}", "150"),
            ("mxspool_queue_messages{domain=\"a.test\"}", "2"),
            ("mxspool_queue_bytes{domain=\"a.test\"}", "150"),
            ("mxspool_queue_oldest_age_seconds{domain=\"a.test\"}", "90"),
            ("mxspool_queue_messages{domain=\"b.test\"}", "1"),
            ("mxspool_queue_bytes{domain=\"b.test\"}", "100"),
            ("mxspool_held_domains", "0"),
        ] {
            assert_eq!(
                value(&text, sample).as_deref(),
                Some(want),
                "{sample} in\n{text}"
            );
        }
        assert!(value(&text, "mxspool_spool_free_bytes").is_some_and(|v| v != "0"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert!(rt
            .block_on(spool.remove("b.test", "0000000000001"))
            .unwrap());
        rt.block_on(spool.hold("a.test", now)).unwrap();
        let text = m.scrape(&spool, &Default::default(), now).unwrap();
        assert_eq!(
            value(&text, "mxspool_queue_messages{domain=\"b.test\"}"),
            None,
            "{text}"
        );
        assert_eq!(value(&text, "mxspool_queue_bytes{domain=\"b.test\"}"), None);
        assert_eq!(
            value(&text, "mxspool_queue_messages{domain=\"a.test\"}").as_deref(),
            Some("2")
        );
        assert_eq!(value(&text, "mxspool_held_domains").as_deref(), Some("1"));
    }
}
