//! The operator's surface that is not a queue operation: the live configuration and its
//! reload ([`live`]), running as an unprivileged user and keeping the spool private
//! ([`privilege`]), what reaches the administrator's terminal ([`output`]), the systemd
//! notifications ([`systemd`]), the Prometheus metrics ([`metrics`], served by
//! [`metrics_http`]) and the file descriptors' shares ([`descriptors`]).

pub mod descriptors;
pub mod live;
pub mod logging;
pub mod metrics;
pub mod metrics_http;
pub mod output;
pub mod privilege;
pub mod systemd;
