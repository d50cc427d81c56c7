//! The TOML configuration file (see SPEC "Configuration").
//!
//! Parsing is strict: an unknown key or a bad value is an error that names the key and its
//! line. After parsing, [`Config::load`] validates what TOML cannot (address syntax, bounds)
//! and loads the partners' recipient lists, so a running server never reads a file it was
//! not started with.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::policy::rates::Rate;

/// Default configuration path.
pub const DEFAULT_PATH: &str = "/etc/mxspool/mxspool.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {}", path.display(), os_error(error))]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// A size in bytes: an integer, or a string such as `"50MiB"`, `"10MB"`, `"512KiB"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("invalid size {s:?} (expected e.g. 1048576 or \"50MiB\")"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            "t" | "tb" => 1_000_000_000_000,
            "tib" => 1 << 40,
            _ => {
                return Err(format!(
                    "invalid size unit in {s:?} (use B, KB, KiB, MB, MiB, GB, GiB)"
                ))
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) if n >= 0 => Ok(ByteSize(n as u64)),
            Raw::Int(n) => Err(serde::de::Error::custom(format!(
                "invalid size {n}: must not be negative"
            ))),
            Raw::Str(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

/// A duration written as a humantime string (`"1h"`, `"5d"`, `"30s"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(HumanDuration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {s:?}: {e} (expected e.g. \"30s\", \"1h\", \"5d\")"
                ))
            })
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

/// A list of networks in CIDR form; a bare address is a host network (/32, /128).
fn networks<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "{s:?} is not a network (e.g. \"192.0.2.0/24\", \"2001:db8::/32\")"
                    ))
                })
        })
        .collect()
}

/// A path or a list of paths.
fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PathBuf>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(PathBuf),
        Many(Vec<PathBuf>),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::One(p) if p.as_os_str().is_empty() => Vec::new(),
        Raw::One(p) => vec![p],
        Raw::Many(v) => v,
    })
}

/// A path, where `""` means none.
fn optional_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let p = PathBuf::deserialize(d)?;
    Ok((!p.as_os_str().is_empty()).then_some(p))
}

fn secs(n: u64) -> HumanDuration {
    HumanDuration(Duration::from_secs(n))
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Our name: banner, `Received:`, DSN Reporting-MTA, MX self-detection.
    pub hostname: String,
    /// The RocksDB spool directory (relative: from the configuration file's directory).
    pub spool: PathBuf,
    /// After binding the listeners, `serve` drops to this user and its groups for good.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default)]
    pub smtp: SmtpConfig,
    #[serde(default)]
    pub queue: QueueConfig,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub partner: Vec<Partner>,
    /// Primary-server mode: domains whose mail is delivered here (Maildir or LMTP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub local: Vec<LocalDomain>,
    /// Primary-server mode: sendmail's virtusertable.
    #[serde(default, rename = "virtual", skip_serializing_if = "Option::is_none")]
    pub virtual_table: Option<VirtualConfig>,
    /// Primary-server mode: per-domain next hops (mailertable, transport_maps).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route: Vec<RouteConfig>,
    /// Primary-server mode: trusted networks and the smart host.
    #[serde(default)]
    pub relay: RelayConfig,
    /// Primary-server mode: sender masquerading for mail from the relay networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masquerade: Option<MasqueradeConfig>,
    /// `[metrics]`: the Prometheus endpoint.
    #[serde(default, skip_serializing_if = "MetricsConfig::is_off")]
    pub metrics: MetricsConfig,
}

/// `[metrics]`: where `GET /metrics` is served (OpenMetrics text); no `listen`, no listener.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `address:port`, e.g. `"127.0.0.1:9125"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
}

impl MetricsConfig {
    fn is_off(&self) -> bool {
        self.listen.is_none()
    }
}

/// A domain whose mail ends here: in a Maildir per user, or handed to an LMTP server.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LocalDomain {
    pub domain: String,
    /// Maildir path template with `{domain}` and `{user}`, e.g. `/var/mail/{domain}/{user}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maildir: Option<String>,
    /// LMTP server: `host:port` or a Unix socket path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lmtp: Option<String>,
    /// Optional file of valid users (mailbox names or addresses), one per line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<PathBuf>,
    /// Deliveries to this domain at once (Maildir writers or LMTP connections), like
    /// Postfix's `default_destination_concurrency_limit`.
    #[serde(default = "default_local_concurrency")]
    pub concurrency: usize,
    /// The user Maildir files and directories belong to (Dovecot's mail user). mxspool
    /// writes them as itself, so this is the user `serve` runs as: it must equal `user`, and
    /// sets `user` when that is not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The user list, loaded by [`Config::load`]: lower-cased mailbox names.
    #[serde(skip)]
    pub user_set: Option<HashSet<String>>,
}

fn default_local_concurrency() -> usize {
    20
}

/// `[virtual]`: the virtusertable file, loaded with the configuration.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualConfig {
    pub file: PathBuf,
    #[serde(skip)]
    /// Shared with the policy (a table can have many thousand lines).
    pub table: std::sync::Arc<crate::virtual_table::VirtualTable>,
}

/// `[[route]]`: mail for `domain` goes to these hops, no MX lookup.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub domain: String,
    pub to: Vec<String>,
}

/// `[relay]`: who may relay to any domain, and where mail for other domains goes.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    #[serde(deserialize_with = "networks")]
    pub networks: Vec<IpNet>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smart_host: Option<String>,
}

/// `[masquerade]`: sendmail's MASQUERADE_AS, masquerade_entire_domain, masquerade_envelope.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MasqueradeConfig {
    #[serde(rename = "as")]
    pub as_domain: String,
    /// Hosts masqueraded (each with every host under it); empty: this server's `hostname`.
    #[serde(default)]
    pub domains: Vec<String>,
    #[serde(default)]
    pub envelope: bool,
}

/// How mail for one domain leaves the queue.
#[derive(Clone, Copy, Debug)]
pub enum Transport<'a> {
    /// Delivered here (Maildir or LMTP).
    Local(&'a LocalDomain),
    /// To these `host[:port]` hops, in order, without MX lookup: a `[[route]]`, a partner's
    /// `route`, or the smart host.
    Hops(&'a [String]),
    /// To the domain's MX hosts.
    Mx,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmtpConfig {
    pub listen: Vec<String>,
    pub max_message_size: ByteSize,
    pub max_recipients: usize,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub command_timeout: HumanDuration,
    /// Clients (besides loopback) allowed to send ETRN: networks or single addresses.
    #[serde(deserialize_with = "networks")]
    pub etrn_clients: Vec<IpNet>,
    /// Errors a client may make before it is disconnected with 421.
    pub max_errors: usize,
    /// RCPTs past `max_recipients` that get `452 4.5.3` without counting as errors
    /// (Postfix's `smtpd_recipient_overshoot_limit`); beyond them each one is an error.
    pub recipient_overshoot: usize,
    /// STARTTLS certificate chains (PEM), one path or a list (chosen by SNI); relative:
    /// from the configuration file's directory. STARTTLS is offered when set.
    #[serde(
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub tls_certificate: Vec<PathBuf>,
    /// The private key of each `tls_certificate` (PEM), in the same order.
    #[serde(
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub tls_key: Vec<PathBuf>,
    /// The certificates, loaded by [`Config::load`] (re-read by every reload).
    #[serde(skip)]
    pub tls: Option<std::sync::Arc<crate::tls::server::Certificates>>,
    /// New connections per client address (`421 4.7.0` beyond); unset: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connection_rate: Option<Rate>,
    /// MAIL commands per client address (`450 4.7.1` beyond); unset: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_message_rate: Option<Rate>,
    /// DNS blocklists asked about each client at connect (`554 5.7.1` when listed).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dnsbl: Vec<String>,
}

impl Default for SmtpConfig {
    fn default() -> Self {
        SmtpConfig {
            listen: vec!["0.0.0.0:25".into(), "[::]:25".into()],
            max_message_size: ByteSize(50 << 20),
            max_recipients: 1000,
            max_connections: 1000,
            max_connections_per_ip: 50,
            command_timeout: secs(300),
            etrn_clients: Vec::new(),
            max_errors: 20,
            recipient_overshoot: 1000,
            tls_certificate: Vec::new(),
            tls_key: Vec::new(),
            tls: None,
            max_connection_rate: None,
            max_message_rate: None,
            dnsbl: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    pub retry_interval: HumanDuration,
    pub max_lifetime: HumanDuration,
    pub delay_warning: HumanDuration,
    pub max_deliveries: usize,
    pub max_connections_per_domain: usize,
    /// Free space the spool's file system must keep; below it MAIL gets `452 4.3.1`
    /// (Postfix's `queue_minfree`). At least [`crate::spool::SPACE_FOR_ROCKSDB`].
    pub min_free_space: ByteSize,
    /// A DSN returns at most this much of the message (Postfix's `bounce_size_limit`);
    /// with `RET=FULL` a longer message is returned cut at a line end.
    pub bounce_size_limit: ByteSize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            retry_interval: secs(3600),
            max_lifetime: secs(5 * 86400),
            delay_warning: secs(4 * 3600),
            max_deliveries: 100,
            max_connections_per_domain: 4,
            min_free_space: ByteSize(256 << 20),
            bounce_size_limit: ByteSize(50 << 10),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    pub port: u16,
    pub connect_timeout: HumanDuration,
    /// How long to wait for the next hop's 220 greeting (RFC 5321 4.5.3.2: 5 minutes; like
    /// Postfix's `smtp_helo_timeout`).
    pub helo_timeout: HumanDuration,
    pub nameservers: Vec<String>,
    /// The local address outbound connections come from (Postfix's `smtp_bind_address`);
    /// unset: the system chooses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bind_address: Option<IpAddr>,
    /// The outbound STARTTLS policy (Postfix's `smtp_tls_security_level`).
    pub tls: crate::tls::client::TlsPolicy,
    /// DANE (RFC 7672, [`crate::tls::dane`]): where a next hop has DNSSEC-secure TLSA
    /// records (the AD bit of the configured validating resolver), enforce them.
    pub dane: bool,
    /// Honour destination domains' MTA-STS policies (RFC 8461, [`crate::tls::mta_sts`]) for
    /// mail delivered by MX lookup (never for a `route` or the smart host).
    pub mta_sts: bool,
    /// Extra trust anchors (PEM) for `verify`, beside the system's roots; `""`: none.
    #[serde(
        deserialize_with = "optional_path",
        skip_serializing_if = "Option::is_none"
    )]
    pub tls_ca_file: Option<PathBuf>,
    /// The certificates of `tls_ca_file`, loaded by [`Config::load`].
    #[serde(skip)]
    pub tls_ca: Vec<rustls::pki_types::CertificateDer<'static>>,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            port: 25,
            connect_timeout: secs(30),
            helo_timeout: secs(300),
            nameservers: Vec::new(),
            bind_address: None,
            tls: Default::default(),
            dane: true,
            mta_sts: true,
            tls_ca_file: None,
            tls_ca: Vec::new(),
        }
    }
}

/// `[[partner]] verify`: how a partner's recipients are verified at RCPT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verify {
    /// Ask the partner's primary ([`crate::policy::callout`]).
    Callout,
}

/// A domain we are backup MX for.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Partner {
    pub domain: String,
    /// Optional file of valid local parts or full addresses, one per line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipients: Option<PathBuf>,
    /// Optional next hops (`host:port`) used instead of an MX lookup.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route: Vec<String>,
    /// Whether the domain may be flushed with ETRN.
    #[serde(default)]
    pub etrn: bool,
    /// The outbound TLS policy toward this partner's next hops (else `[delivery] tls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<crate::tls::client::TlsPolicy>,
    /// How recipients are verified at RCPT beyond the recipients list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<Verify>,
    /// Quota: at most this many messages queued for the domain (else `452 4.3.1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_messages: Option<u64>,
    /// Quota: at most this many bytes queued for the domain (else `452 4.3.1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<ByteSize>,
    /// How long the primary's "it takes this address" is cached (with `verify`; default
    /// [`Partner::DEFAULT_POSITIVE_TTL`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_positive_ttl: Option<HumanDuration>,
    /// How long the primary's refusal of an address is cached (with `verify`; default
    /// [`Partner::DEFAULT_NEGATIVE_TTL`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_negative_ttl: Option<HumanDuration>,
    /// The recipient list, loaded by [`Config::load`]: lower-cased local parts.
    #[serde(skip)]
    pub users: Option<HashSet<String>>,
}

impl Partner {
    /// `verify_positive_ttl` unless set: Postfix's `address_verify_positive_expire_time`.
    pub const DEFAULT_POSITIVE_TTL: Duration = Duration::from_secs(7 * 86_400);
    /// `verify_negative_ttl` unless set (Postfix's `address_verify_negative_expire_time`
    /// is 3 days; a backup MX refusing a new user for that long would be worse).
    pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(3 * 3600);

    /// How long a callout's "known" answer holds.
    pub fn positive_ttl(&self) -> Duration {
        self.verify_positive_ttl
            .map_or(Partner::DEFAULT_POSITIVE_TTL, |d| d.0)
    }

    /// How long a callout's refusal holds.
    pub fn negative_ttl(&self) -> Duration {
        self.verify_negative_ttl
            .map_or(Partner::DEFAULT_NEGATIVE_TTL, |d| d.0)
    }
}

impl Config {
    /// Read, parse and validate the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let mut config = Config::parse(&text).map_err(invalid)?;
        let base = config_dir(path);
        config.spool = relative_to(&base, &config.spool);
        config.load_lists(&base).map_err(invalid)?;
        config.load_tls(&base).map_err(invalid)?;
        Ok(config)
    }

    /// Parse and validate configuration text (recipient files are not read).
    pub fn parse(text: &str) -> Result<Config, String> {
        let mut config: Config = toml::from_str(text).map_err(|e| one_line_toml_error(&e))?;
        config.validate(text)?;
        Ok(config)
    }

    fn validate(&mut self, text: &str) -> Result<(), String> {
        let at = |key: &str, msg: String| match line_of(text, key) {
            Some(line) => format!("line {line}: {key}: {msg}"),
            None => format!("{key}: {msg}"),
        };
        // A key that other tables have too: its line within `[table]`.
        let at_in = |table: &str, key: &str, msg: String| match line_in_table(text, table, key) {
            Some(line) => format!("line {line}: [{table}] {key}: {msg}"),
            None => format!("[{table}] {key}: {msg}"),
        };
        let host = self.hostname.trim_end_matches('.').to_ascii_lowercase();
        if !is_domain(&host) {
            return Err(at(
                "hostname",
                format!("{:?} is not a host name", self.hostname),
            ));
        }
        self.hostname = host;
        for l in &self.smtp.listen {
            parse_listen(l).map_err(|e| at("listen", e))?;
        }
        if let Some(l) = &self.metrics.listen {
            parse_listen(l).map_err(|e| at_in("metrics", "listen", e))?;
        }
        if self.smtp.max_recipients < 100 {
            return Err(at(
                "max_recipients",
                format!(
                    "{} is below 100, the minimum RFC 5321 4.5.3.1.8 requires",
                    self.smtp.max_recipients
                ),
            ));
        }
        for (key, v) in [
            ("max_connections", self.smtp.max_connections),
            ("max_connections_per_ip", self.smtp.max_connections_per_ip),
            ("max_errors", self.smtp.max_errors),
            ("max_deliveries", self.queue.max_deliveries),
            (
                "max_connections_per_domain",
                self.queue.max_connections_per_domain,
            ),
        ] {
            if v == 0 {
                return Err(at(key, "must be at least 1".into()));
            }
        }
        let (certs, keys) = (self.smtp.tls_certificate.len(), self.smtp.tls_key.len());
        if certs != keys {
            let (key, msg) = match (certs, keys) {
                (0, _) => ("tls_key", "is set without tls_certificate".to_string()),
                (_, 0) => ("tls_certificate", "is set without tls_key".to_string()),
                _ => (
                    "tls_key",
                    format!("{keys} key(s) for {certs} tls_certificate file(s): give one key per certificate"),
                ),
            };
            return Err(at_in("smtp", key, msg.to_string()));
        }
        if self.smtp.max_message_size.0 < 1024 {
            return Err(at("max_message_size", "must be at least 1024 bytes".into()));
        }
        if self.queue.min_free_space.0 < crate::spool::SPACE_FOR_ROCKSDB {
            return Err(at(
                "min_free_space",
                format!(
                    "{} is less than the {} MiB the spool's database needs free to flush and compact (below that it stops taking any write)",
                    self.queue.min_free_space.0,
                    crate::spool::SPACE_FOR_ROCKSDB >> 20
                ),
            ));
        }
        if self.smtp.command_timeout.0 < Duration::from_secs(1) {
            return Err(at("command_timeout", "must be at least 1s".into()));
        }
        if self.delivery.helo_timeout.0 < Duration::from_secs(1) {
            return Err(at("helo_timeout", "must be at least 1s".into()));
        }
        if self.queue.retry_interval.0 < Duration::from_secs(1) {
            return Err(at("retry_interval", "must be at least 1s".into()));
        }
        for ns in &self.delivery.nameservers {
            parse_listen(ns).map_err(|e| at("nameservers", e))?;
        }
        for list in &mut self.smtp.dnsbl {
            *list = normal_domain(list)
                .ok_or_else(|| at("dnsbl", format!("{list:?} is not a domain name")))?;
        }
        // A domain is a partner, a local domain or a route: once, in normal form.
        let mut seen = HashSet::new();
        let mut claim = |domain: &mut String| -> Result<(), String> {
            let d = normal_domain(domain)
                .ok_or_else(|| at("domain", format!("{domain:?} is not a domain name")))?;
            if !seen.insert(d.clone()) {
                return Err(at(
                    "domain",
                    format!("{d} is listed twice (partner, local or route)"),
                ));
            }
            *domain = d;
            Ok(())
        };
        for p in &mut self.partner {
            claim(&mut p.domain)?;
            if p.max_messages == Some(0) || p.max_bytes.is_some_and(|b| b.0 == 0) {
                let key = if p.max_messages == Some(0) {
                    "max_messages"
                } else {
                    "max_bytes"
                };
                return Err(at(
                    key,
                    format!(
                        "partner {}: a quota of 0 refuses all its mail; leave it out for no quota",
                        p.domain
                    ),
                ));
            }
            for hop in &p.route {
                parse_hop(hop).map_err(|e| at("route", e))?;
            }
            for (key, ttl) in [
                ("verify_positive_ttl", &mut p.verify_positive_ttl),
                ("verify_negative_ttl", &mut p.verify_negative_ttl),
            ] {
                if ttl.is_some_and(|t| t.0.is_zero()) {
                    return Err(at(
                        key,
                        "must be more than 0s (without a cache every RCPT is a callout)".into(),
                    ));
                }
            }
            // The effective values, for check-config, where they apply.
            if p.verify.is_some() {
                p.verify_positive_ttl = Some(HumanDuration(p.positive_ttl()));
                p.verify_negative_ttl = Some(HumanDuration(p.negative_ttl()));
            }
        }
        for l in &mut self.local {
            claim(&mut l.domain)?;
            if l.concurrency == 0 {
                return Err(at("concurrency", "must be at least 1".into()));
            }
            match (&l.maildir, &l.lmtp) {
                (Some(m), None) => {
                    if !m.starts_with('/') {
                        return Err(at(
                            "maildir",
                            format!("{m:?} must be an absolute path (e.g. \"/var/mail/{{domain}}/{{user}}\")"),
                        ));
                    }
                }
                (None, Some(t)) => {
                    crate::delivery::client::LmtpTarget::parse(t).map_err(|e| at("lmtp", e))?;
                }
                _ => {
                    return Err(at(
                        "domain",
                        format!(
                            "local domain {}: give exactly one of maildir or lmtp",
                            l.domain
                        ),
                    ))
                }
            }
        }
        for r in &mut self.route {
            claim(&mut r.domain)?;
            if r.to.is_empty() {
                return Err(at("to", format!("route {}: no next hop", r.domain)));
            }
            for hop in &r.to {
                parse_hop(hop).map_err(|e| at("to", e))?;
            }
        }
        if let Some(h) = &self.relay.smart_host {
            parse_hop(h).map_err(|e| at("smart_host", e))?;
        }
        if let Some(m) = &mut self.masquerade {
            m.as_domain = normal_domain(&m.as_domain)
                .ok_or_else(|| at("as", format!("{:?} is not a domain name", m.as_domain)))?;
            for d in &mut m.domains {
                *d = normal_domain(d)
                    .ok_or_else(|| at("domains", format!("{d:?} is not a domain name")))?;
            }
            if m.domains.is_empty() {
                m.domains.push(self.hostname.clone());
            }
        }
        if let Some(u) = &self.user {
            if !is_user_name(u) {
                return Err(at("user", format!("{u:?} is not a user name")));
            }
        }
        // Maildirs are written by the server itself: their owner is the user it runs as.
        let mut owners: Vec<&String> = self.local.iter().filter_map(|l| l.owner.as_ref()).collect();
        owners.dedup();
        if let Some(first) = owners.first() {
            if owners.iter().any(|o| o != first) {
                return Err(at(
                    "owner",
                    "every [[local]] owner must be the same user (the one mxspool runs as)".into(),
                ));
            }
            if !is_user_name(first) {
                return Err(at("owner", format!("{first:?} is not a user name")));
            }
            match &self.user {
                Some(u) if u != *first => {
                    return Err(at(
                        "owner",
                        format!(
                            "owner {first:?} differs from user {u:?}: mxspool writes Maildirs as \
                             the user it runs as, so give the same user (or leave user out)"
                        ),
                    ))
                }
                Some(_) => {}
                None => self.user = Some((*first).clone()),
            }
        }
        Ok(())
    }

    /// Reads the STARTTLS certificates and keys and the outbound trust anchors.
    fn load_tls(&mut self, base: &Path) -> Result<(), String> {
        let smtp = &mut self.smtp;
        if !smtp.tls_certificate.is_empty() {
            let pairs: Vec<(PathBuf, PathBuf)> = smtp
                .tls_certificate
                .iter()
                .zip(&smtp.tls_key)
                .map(|(c, k)| (relative_to(base, c), relative_to(base, k)))
                .collect();
            let certs = crate::tls::server::Certificates::load(&pairs)
                .map_err(|e| format!("[smtp] {e}"))?;
            smtp.tls = Some(std::sync::Arc::new(certs));
        }
        if let Some(file) = &self.delivery.tls_ca_file {
            let file = relative_to(base, file);
            self.delivery.tls_ca = crate::tls::server::load_chain(&file)
                .map_err(|e| format!("[delivery] tls_ca_file: {e}"))?;
        }
        Ok(())
    }

    fn load_lists(&mut self, base: &Path) -> Result<(), String> {
        for p in &mut self.partner {
            if let Some(file) = &p.recipients {
                let file = relative_to(base, file);
                let text = std::fs::read_to_string(&file).map_err(|e| {
                    format!(
                        "partner {}: cannot read recipients file {}: {}",
                        p.domain,
                        file.display(),
                        os_error(&e)
                    )
                })?;
                p.users = Some(
                    parse_user_list(&text, &p.domain)
                        .map_err(|e| format!("partner {}: {}{e}", p.domain, file.display()))?,
                );
            }
        }
        for l in &mut self.local {
            if let Some(file) = &l.users {
                let file = relative_to(base, file);
                let text = std::fs::read_to_string(&file).map_err(|e| {
                    format!(
                        "local domain {}: cannot read users file {}: {}",
                        l.domain,
                        file.display(),
                        os_error(&e)
                    )
                })?;
                l.user_set =
                    Some(parse_user_list(&text, &l.domain).map_err(|e| {
                        format!("local domain {}: {}{e}", l.domain, file.display())
                    })?);
            }
        }
        if let Some(v) = &mut self.virtual_table {
            v.table = crate::virtual_table::VirtualTable::load(&relative_to(base, &v.file))?.into();
        }
        Ok(())
    }

    /// How mail for `domain` (lower case) leaves the queue: local domains are delivered
    /// here; a `[[route]]` or a partner's `route` gives the hops; other partners go to their
    /// MX hosts; every other domain goes to the smart host if there is one, else its MX.
    pub fn transport(&self, domain: &str) -> Transport<'_> {
        if let Some(l) = self.local.iter().find(|l| l.domain == domain) {
            return Transport::Local(l);
        }
        if let Some(r) = self.route.iter().find(|r| r.domain == domain) {
            return Transport::Hops(&r.to);
        }
        if let Some(p) = self.partner(domain) {
            return if p.route.is_empty() {
                Transport::Mx
            } else {
                Transport::Hops(&p.route)
            };
        }
        match &self.relay.smart_host {
            Some(h) => Transport::Hops(std::slice::from_ref(h)),
            None => Transport::Mx,
        }
    }

    /// How many deliveries to `domain` may run at once: a local domain's `concurrency`,
    /// else `[queue] max_connections_per_domain` (what a remote server is asked to bear).
    pub fn domain_concurrency(&self, domain: &str) -> usize {
        match self.local_domain(domain) {
            Some(l) => l.concurrency,
            None => self.queue.max_connections_per_domain,
        }
    }

    /// The `[[local]]` entry for `domain` (lower case).
    pub fn local_domain(&self, domain: &str) -> Option<&LocalDomain> {
        self.local.iter().find(|l| l.domain == domain)
    }

    /// The listen addresses as socket addresses (validated at load).
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.smtp
            .listen
            .iter()
            .filter_map(|l| parse_listen(l).ok())
            .collect()
    }

    /// The `[metrics] listen` address (validated at load).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics
            .listen
            .as_deref()
            .and_then(|l| parse_listen(l).ok())
    }

    /// The effective settings as TOML, for `check-config`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print: {e}\n"))
    }

    /// The partner entry for `domain` (already lower case, no trailing dot).
    pub fn partner(&self, domain: &str) -> Option<&Partner> {
        self.partner.iter().find(|p| p.domain == domain)
    }

    /// Whether `ip` may send ETRN: loopback or a listed network.
    pub fn etrn_allowed(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || self.smtp.etrn_clients.iter().any(|n| n.contains(&ip))
    }
}

/// A recipients file: one local part or full address per line; `#` starts a comment.
/// Full addresses of other domains are ignored. Entries are lower-cased local parts.
///
/// A line that is neither a local part nor an address is an error (`line N: ...`, for the
/// caller to put after the file name), and so is a file without a single entry: an empty
/// list would refuse every recipient.
pub fn parse_user_list(text: &str, domain: &str) -> Result<HashSet<String>, String> {
    let mut users = HashSet::new();
    let mut entries = 0;
    for (n, line) in text.lines().enumerate() {
        let l = line.split('#').next().unwrap_or("").trim();
        if l.is_empty() {
            continue;
        }
        let bad = |why: &str| {
            format!(
                " line {}: {:?} {why} (expected a local part such as alice, or alice@{domain})",
                n + 1,
                l
            )
        };
        let (local, d) = match l.rsplit_once('@') {
            Some((local, d)) => (local, Some(d.trim_end_matches('.'))),
            None => (l, None),
        };
        if !is_local_part(local) {
            return Err(bad("is not a valid local part"));
        }
        if let Some(d) = d {
            if !is_domain(&d.to_ascii_lowercase()) {
                return Err(bad("has no valid domain after the @"));
            }
        }
        entries += 1;
        if d.is_none_or(|d| d.eq_ignore_ascii_case(domain)) {
            users.insert(local.to_ascii_lowercase());
        }
    }
    if entries == 0 {
        return Err(
            ": no user listed (an empty list would refuse every recipient; remove the setting \
             to accept any)"
                .to_string(),
        );
    }
    Ok(users)
}

/// A plausible Unix user name (what `useradd` takes).
fn is_user_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// A dot-atom local part (RFC 5321 4.1.2): atext characters and single inner dots.
pub fn is_local_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && !s.ends_with('.')
        && !s.contains("..")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~.".contains(&b) || b >= 0x80)
}

/// An I/O error's text without the "(os error N)" that the kind already says.
pub fn os_error(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// A relative path in the configuration is taken from the configuration file's directory
/// (never from the working directory: the server and the commands must agree).
pub fn relative_to(base: &Path, file: &Path) -> PathBuf {
    if file.is_absolute() {
        file.to_path_buf()
    } else {
        base.join(file)
    }
}

/// The absolute directory of the configuration file at `path`.
fn config_dir(path: &Path) -> PathBuf {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::path::absolute(&dir).unwrap_or(dir)
}

/// A domain name lower-cased, without its trailing dot; `None` if it is not one.
fn normal_domain(s: &str) -> Option<String> {
    let d = s.trim_end_matches('.').to_ascii_lowercase();
    is_domain(&d).then_some(d)
}

/// `"127.0.0.1:25"`, `"[::1]:25"`.
pub fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .map_err(|_| format!("{s:?} is not an address:port (e.g. \"0.0.0.0:25\", \"[::]:25\")"))
}

/// A next hop `host`, `host:port`, `[ip]` or `[ip]:port`; without a port, `[delivery] port`
/// applies (`None`).
pub fn parse_hop(s: &str) -> Result<(String, Option<u16>), String> {
    let bad =
        || format!("{s:?} is not host[:port] (e.g. \"mail.example.com:25\", \"[2001:db8::1]:25\")");
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(bad)?),
        };
        (host, port)
    } else {
        match s.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (s, None),
        }
    };
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(bad)?),
        None => None,
    };
    let host_ok = host.parse::<IpAddr>().is_ok() || is_domain(host.trim_end_matches('.'));
    if !host_ok {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

/// A plausible DNS name: labels of letters, digits and hyphens, at most 253 octets.
pub fn is_domain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The 1-based line on which `key` is assigned, for error messages.
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map(|i| i + 1)
}

/// The 1-based line on which `key` is assigned inside `[table]`.
fn line_in_table(text: &str, table: &str, key: &str) -> Option<usize> {
    let header = format!("[{table}]");
    let start = text.lines().position(|l| l.trim() == header)?;
    let rest: Vec<&str> = text.lines().skip(start + 1).collect();
    let end = rest
        .iter()
        .position(|l| l.trim_start().starts_with('['))
        .unwrap_or(rest.len());
    line_of(&rest[..end].join("\n"), key).map(|n| n + start + 1)
}

/// toml's errors span several lines with a source excerpt; keep one readable line.
fn one_line_toml_error(e: &toml::de::Error) -> String {
    let msg = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(_) => {
            // toml's Display starts with "TOML parse error at line L, column C".
            let full = e.to_string();
            let head = full.lines().next().unwrap_or("").trim();
            let loc = head.strip_prefix("TOML parse error at ").unwrap_or(head);
            format!("{loc}: {msg}")
        }
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "hostname = \"mx2.example.net\"\nspool = \"/tmp/x\"\n";

    fn check_err(text: &str, expect: &[&str]) {
        let err = Config::parse(text).expect_err("config should be refused");
        assert!(!err.contains('\n'), "error spans lines: {err}");
        for e in expect {
            assert!(err.contains(e), "error {err:?} lacks {e:?}");
        }
    }

    #[test]
    fn the_example_configuration_is_valid() {
        let c = Config::load(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/contrib/mxspool.toml"
        )))
        .unwrap();
        assert_eq!(c.listen_addrs(), vec!["127.0.0.1:2525".parse().unwrap()]);
        assert_eq!(c.partner.len(), 2);
        let org = c.partner("example.org").unwrap();
        assert!(org.users.as_ref().unwrap().contains("alice"));
        assert!(org.users.as_ref().unwrap().contains("bob"));
    }

    #[test]
    fn defaults_follow_the_spec() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.smtp.max_message_size, ByteSize(50 << 20));
        assert_eq!(c.queue.retry_interval.0, Duration::from_secs(3600));
        assert_eq!(c.queue.max_lifetime.0, Duration::from_secs(432_000));
        assert_eq!(c.smtp.max_recipients, 1000);
        assert_eq!(c.delivery.port, 25);
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(ByteSize::parse("50MiB").unwrap(), ByteSize(52_428_800));
        assert_eq!(ByteSize::parse("10MB").unwrap(), ByteSize(10_000_000));
        assert_eq!(ByteSize::parse("4096").unwrap(), ByteSize(4096));
        assert!(ByteSize::parse("12XB").is_err());
        assert!(ByteSize::parse("-1").is_err());
        let c = Config::parse(&format!(
            "{MINIMAL}[smtp]\nmax_message_size = 2048\ncommand_timeout = \"90s\"\n[queue]\nmax_lifetime = \"2d 12h\"\n"
        ))
        .unwrap();
        assert_eq!(c.smtp.max_message_size, ByteSize(2048));
        assert_eq!(c.smtp.command_timeout.0, Duration::from_secs(90));
        assert_eq!(c.queue.max_lifetime.0, Duration::from_secs(216_000));
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key_and_line() {
        check_err(
            &format!("{MINIMAL}[smtp]\nlisten_on = []\n"),
            &["line 4", "listen_on"],
        );
        check_err(&format!("{MINIMAL}colour = 1\n"), &["line 3", "colour"]);
        check_err(
            &format!("{MINIMAL}[queue]\nretry_interval = \"often\"\n"),
            &["line 4", "often"],
        );
        check_err(
            &format!("{MINIMAL}[smtp]\nmax_message_size = \"5 parsecs\"\n"),
            &["line 4", "size"],
        );
        check_err(
            &format!("{MINIMAL}[smtp]\nmax_recipients = 10\n"),
            &["line 4", "max_recipients", "100"],
        );
        check_err(
            &format!("{MINIMAL}[smtp]\nlisten = [\"localhost\"]\n"),
            &["line 4", "listen"],
        );
        check_err(
            &format!("{MINIMAL}[[partner]]\ndomain = \"ex ample.com\"\n"),
            &["line 4", "domain"],
        );
        check_err(
            &format!(
                "{MINIMAL}[[partner]]\ndomain = \"a.com\"\n[[partner]]\ndomain = \"A.com.\"\n"
            ),
            &["twice"],
        );
        check_err("spool = \"/x\"\n", &["hostname"]);
    }

    #[test]
    fn callout_ttls_default_are_effective_and_never_zero() {
        let c = Config::parse(&format!(
            "{MINIMAL}[[partner]]\ndomain = \"a.test\"\nverify = \"callout\"\n\
             verify_negative_ttl = \"10m\"\n[[partner]]\ndomain = \"b.test\"\n"
        ))
        .unwrap();
        let (a, b) = (c.partner("a.test").unwrap(), c.partner("b.test").unwrap());
        assert_eq!(a.positive_ttl(), Duration::from_secs(7 * 86_400));
        assert_eq!(a.negative_ttl(), Duration::from_secs(600));
        assert_eq!(b.negative_ttl(), Duration::from_secs(3 * 3600));
        let shown = c.to_toml();
        assert!(
            shown.contains("verify_positive_ttl = \"7days\"")
                && shown.contains("verify_negative_ttl = \"10m\""),
            "{shown}"
        );
        // Shown only where they apply.
        assert_eq!(shown.matches("verify_positive_ttl").count(), 1, "{shown}");
        check_err(
            &format!(
                "{MINIMAL}[[partner]]\ndomain = \"a.test\"\nverify = \"callout\"\nverify_positive_ttl = \"0s\"\n"
            ),
            &["line 6", "verify_positive_ttl", "more than 0s"],
        );
        check_err(
            &format!("{MINIMAL}[[partner]]\ndomain = \"a.test\"\nverify_negative_ttl = \"soon\"\n"),
            &["line 5", "invalid duration \"soon\""],
        );
    }

    #[test]
    fn partner_domains_are_normalised() {
        let c = Config::parse(&format!(
            "{MINIMAL}[[partner]]\ndomain = \"Example.COM.\"\nroute = [\"[127.0.0.2]:25\"]\netrn = true\n"
        ))
        .unwrap();
        assert_eq!(c.partner[0].domain, "example.com");
        assert!(c.partner("example.com").unwrap().etrn);
        assert_eq!(
            parse_hop("[127.0.0.2]:25").unwrap(),
            ("127.0.0.2".into(), Some(25))
        );
        assert_eq!(
            parse_hop("mail.example.com").unwrap(),
            ("mail.example.com".into(), None)
        );
        assert_eq!(parse_hop("[::1]:2525").unwrap(), ("::1".into(), Some(2525)));
        for bad in [
            "::1:25",
            "mail.example.com:x",
            "a b:25",
            "[::1",
            ":25",
            "h:0",
        ] {
            assert!(parse_hop(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn user_lists_take_local_parts_and_own_addresses() {
        let u = parse_user_list(
            "# staff\nAlice\nbob@example.org # note\ncarol@other.org\n\n",
            "example.org",
        )
        .unwrap();
        assert!(u.contains("alice") && u.contains("bob"));
        assert!(!u.contains("carol"));
        assert_eq!(u.len(), 2);
    }

    #[test]
    fn bad_user_lists_are_refused_with_their_line() {
        for (text, line) in [
            ("alice\nfoo bar\n", "line 2"),
            ("@@@\n", "line 1"),
            ("# c\n\nbob@\n", "line 3"),
            ("a..b\n", "line 1"),
            ("x@not a domain\n", "line 1"),
        ] {
            let err = parse_user_list(text, "example.org").unwrap_err();
            assert!(err.contains(line), "{text:?}: {err}");
        }
        for empty in ["", "# only a comment\n\n"] {
            let err = parse_user_list(empty, "example.org").unwrap_err();
            assert!(err.contains("no user listed"), "{err}");
        }
    }

    #[test]
    fn relative_paths_follow_the_config_file_and_owner_sets_user() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mxspool.toml");
        std::fs::write(
            &path,
            "hostname = \"mx.test\"\nspool = \"q/spool\"\n[[local]]\ndomain = \"a.test\"\nmaildir = \"/m/{user}\"\nowner = \"vmail\"\n",
        )
        .unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.spool, dir.path().join("q/spool"));
        assert_eq!(c.user.as_deref(), Some("vmail"));
        let other = format!(
            "{MINIMAL}user = \"mxspool\"\n[[local]]\ndomain = \"a.test\"\nmaildir = \"/m/{{user}}\"\nowner = \"vmail\"\n"
        );
        check_err(&other, &["owner", "user"]);
    }

    #[test]
    fn effective_settings_print_as_toml_that_parses_again() {
        let c = Config::parse(MINIMAL).unwrap();
        let printed = c.to_toml();
        assert!(printed.contains("retry_interval = \"1h\""), "{printed}");
        Config::parse(&printed).unwrap();
    }

    #[test]
    fn metrics_listen_is_an_address_checked_with_its_line() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.metrics_addr(), None);
        assert!(!c.to_toml().contains("[metrics]"), "{}", c.to_toml());
        let c = Config::parse(&format!(
            "{MINIMAL}[smtp]\nlisten = [\"127.0.0.1:25\"]\n[metrics]\nlisten = \"127.0.0.1:9125\"\n"
        ))
        .unwrap();
        assert_eq!(c.metrics_addr(), Some("127.0.0.1:9125".parse().unwrap()));
        let printed = c.to_toml();
        assert!(printed.contains("[metrics]"), "{printed}");
        assert_eq!(
            Config::parse(&printed).unwrap().metrics_addr(),
            c.metrics_addr()
        );
        check_err(
            &format!(
                "{MINIMAL}[smtp]\nlisten = [\"127.0.0.1:25\"]\n[metrics]\nlisten = \"localhost\"\n"
            ),
            &["line 6", "[metrics] listen", "localhost"],
        );
        check_err(
            &format!("{MINIMAL}[metrics]\nport = 9125\n"),
            &["line 4", "port"],
        );
        check_err(
            &format!("{MINIMAL}[metrics]\nlisten = 9125\n"),
            &["line 4", "expected a string"],
        );
    }

    #[test]
    fn etrn_clients() {
        let c = Config::parse(&format!(
            "{MINIMAL}[smtp]\netrn_clients = [\"192.0.2.0/24\"]\n"
        ))
        .unwrap();
        assert!(c.etrn_allowed("192.0.2.10".parse().unwrap()));
        assert!(c.etrn_allowed("::1".parse().unwrap()));
        assert!(!c.etrn_allowed("198.51.100.1".parse().unwrap()));
    }

    const PRIMARY: &str = "[[local]]\ndomain = \"Inst.UC.pt.\"\nmaildir = \"/var/mail/{domain}/{user}\"\n\
        [[local]]\ndomain = \"lmtp.uc.pt\"\nlmtp = \"127.0.0.1:24\"\n\
        [[route]]\ndomain = \"depart.uc.pt\"\nto = [\"mail-server1.inst.uc.pt\", \"[192.0.2.7]:2525\"]\n\
        [[partner]]\ndomain = \"partner.org\"\n\
        [[partner]]\ndomain = \"routed-partner.org\"\nroute = [\"mx.routed-partner.org:25\"]\n\
        [relay]\nnetworks = [\"192.168.0.0/24\", \"2001:db8::/32\", \"192.0.2.1\"]\nsmart_host = \"smtpout.inst.uc.pt\"\n\
        [masquerade]\nas = \"Inst.UC.pt\"\nenvelope = true\n";

    #[test]
    fn primary_server_keys() {
        let c = Config::parse(&format!("{MINIMAL}{PRIMARY}")).unwrap();
        assert_eq!(c.local[0].domain, "inst.uc.pt");
        assert_eq!(c.local[0].concurrency, 20);
        assert_eq!(c.domain_concurrency("inst.uc.pt"), 20);
        assert_eq!(c.domain_concurrency("partner.org"), 4);
        assert_eq!(c.relay.networks.len(), 3);
        let m = c.masquerade.as_ref().unwrap();
        assert_eq!(m.as_domain, "inst.uc.pt");
        // No domains given: this server's own name is masqueraded.
        assert_eq!(m.domains, vec!["mx2.example.net".to_string()]);
        let hops = |d: &str| match c.transport(d) {
            Transport::Hops(h) => h.to_vec(),
            other => panic!("{d}: {other:?}"),
        };
        assert!(matches!(c.transport("inst.uc.pt"), Transport::Local(l) if l.maildir.is_some()));
        assert!(matches!(c.transport("lmtp.uc.pt"), Transport::Local(l) if l.lmtp.is_some()));
        assert_eq!(hops("depart.uc.pt").len(), 2);
        assert!(matches!(c.transport("partner.org"), Transport::Mx));
        assert_eq!(hops("routed-partner.org"), vec!["mx.routed-partner.org:25"]);
        assert_eq!(hops("gmail.example"), vec!["smtpout.inst.uc.pt"]);
        // Without a smart host, other domains go by MX.
        let plain = Config::parse(MINIMAL).unwrap();
        assert!(matches!(plain.transport("gmail.example"), Transport::Mx));
        let printed = c.to_toml();
        Config::parse(&printed).unwrap_or_else(|e| panic!("{e}\n{printed}"));
    }

    #[test]
    fn primary_server_keys_are_checked() {
        let local = "[[local]]\ndomain = \"a.org\"\n";
        check_err(
            &format!("{MINIMAL}{local}"),
            &["line 4", "exactly one of maildir or lmtp"],
        );
        check_err(
            &format!("{MINIMAL}{local}maildir = \"/m/{{user}}\"\nlmtp = \"127.0.0.1:24\"\n"),
            &["exactly one"],
        );
        check_err(
            &format!("{MINIMAL}{local}maildir = \"mail/{{user}}\"\n"),
            &["line 5", "absolute"],
        );
        check_err(
            &format!("{MINIMAL}{local}lmtp = \"nowhere\"\n"),
            &["line 5", "lmtp"],
        );
        check_err(
            &format!("{MINIMAL}{local}maildir = \"/m\"\nconcurrency = 0\n"),
            &["line 6", "concurrency", "at least 1"],
        );
        check_err(
            &format!("{MINIMAL}{local}maildir = \"/m\"\n[[partner]]\ndomain = \"A.org\"\n"),
            &["a.org", "twice"],
        );
        check_err(
            &format!("{MINIMAL}[[route]]\ndomain = \"r.org\"\nto = []\n"),
            &["line 5", "no next hop"],
        );
        check_err(
            &format!("{MINIMAL}[[route]]\ndomain = \"r.org\"\nto = [\"a b\"]\n"),
            &["line 5", "to"],
        );
        check_err(
            &format!("{MINIMAL}[relay]\nnetworks = [\"192.168.0.0/33\"]\n"),
            &["line 4", "not a network"],
        );
        check_err(
            &format!("{MINIMAL}[relay]\nsmart_host = \"::1:25\"\n"),
            &["line 4", "smart_host"],
        );
        check_err(
            &format!("{MINIMAL}[masquerade]\nas = \"not a domain\"\n"),
            &["line 4", "as"],
        );
        check_err(
            &format!("{MINIMAL}[virtual]\nfiles = \"x\"\n"),
            &["line 4", "files"],
        );
        check_err(
            &format!("{MINIMAL}[delivery]\nbind_address = \"host\"\n"),
            &["line 4"],
        );
    }

    #[test]
    fn tables_and_user_files_are_read_relative_to_the_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("inst.users"), "alice\nBob@inst.uc.pt\n").unwrap();
        std::fs::write(
            dir.path().join("virtusertable"),
            "@depart.uc.pt %1@mail-server1.inst.uc.pt\n",
        )
        .unwrap();
        let path = dir.path().join("mxspool.toml");
        std::fs::write(
            &path,
            format!("{MINIMAL}[[local]]\ndomain = \"inst.uc.pt\"\nmaildir = \"/m/{{user}}\"\nusers = \"inst.users\"\n[virtual]\nfile = \"virtusertable\"\n"),
        )
        .unwrap();
        let c = Config::load(&path).unwrap();
        let users = c.local[0].user_set.as_ref().unwrap();
        assert!(users.contains("alice") && users.contains("bob"));
        assert!(c
            .virtual_table
            .as_ref()
            .unwrap()
            .table
            .has_domain("depart.uc.pt"));
        // A bad table line is named with the file and line.
        std::fs::write(dir.path().join("virtusertable"), "# ok\nnot-a-key target\n").unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("virtusertable") && err.contains("line 2"),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");
    }
}
