//! The Prometheus metrics (issue 14, item 3), first part: the metric families and their
//! encoding in the OpenMetrics text format, through `prometheus-client`.
//!
//! Not yet wired: the `[metrics] listen` responder, the counting at the SMTP driver and in
//! the scheduler, the commit-latency observation in the spool writer and the scrape-time
//! queue summary still have to be built; nothing in the server uses this module yet.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

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
    /// Delivery outcomes per recipient, by `domain` and `status` (sent, deferred, bounced).
    pub deliveries: Family<Labels, Counter>,
    /// SMTP sessions open now.
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
            deliveries: Family::default(),
            connections: Gauge::default(),
            commit_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 16)),
            queued_messages: Family::default(),
            queued_bytes: Family::default(),
            oldest_age_seconds: Family::default(),
            held_domains: Gauge::default(),
            spool_free_bytes: Gauge::default(),
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
            "deliveries",
            "Delivery outcomes per recipient, by domain and status",
            m.deliveries.clone(),
        );
        registry.register(
            "smtp_connections",
            "SMTP sessions open now",
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
        Metrics { registry, ..m }
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String does not fail");
        out
    }
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
}
