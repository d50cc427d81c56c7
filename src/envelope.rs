//! The envelope of a queued message: who sent it, to whom, and the RFC 3461 (DSN)
//! parameters that travel with it. Plain data, shared by the SMTP server (which builds it),
//! the spool (which stores it) and the queue commands (which print it).

use serde::{Deserialize, Serialize};

/// `BODY=` of MAIL FROM (RFC 6152).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Body {
    #[default]
    #[serde(rename = "7bit")]
    SevenBit,
    #[serde(rename = "8bitmime")]
    EightBitMime,
}

/// `RET=` of MAIL FROM (RFC 3461 4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ret {
    Full,
    Hdrs,
}

/// `NOTIFY=` of RCPT TO (RFC 3461 4.1). `None` in [`Recipient::notify`] means the parameter
/// was absent (the default: failure and delay).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notify {
    pub never: bool,
    pub success: bool,
    pub failure: bool,
    pub delay: bool,
}

/// Where one recipient stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RcptState {
    #[default]
    Pending,
    Delivered,
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// The address as given in RCPT TO, without angle brackets.
    pub address: String,
    /// `ORCPT=` with its address type and the xtext decoded (e.g. `rfc822;user@example.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orcpt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<Notify>,
    #[serde(default)]
    pub state: RcptState,
}

impl Recipient {
    pub fn new(address: impl Into<String>) -> Self {
        Recipient {
            address: address.into(),
            orcpt: None,
            notify: None,
            state: RcptState::Pending,
        }
    }

    /// The routing domain of the recipient: lower case, without a trailing dot.
    pub fn domain(&self) -> String {
        domain_of(&self.address)
    }
}

/// The lower-cased domain part of `address` (after the last `@`), trailing dot removed.
pub fn domain_of(address: &str) -> String {
    let d = address.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
    d.trim_end_matches('.').to_ascii_lowercase()
}

/// Everything about a message except its bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Queue id (see `queue_id`).
    pub id: String,
    /// Reverse path without angle brackets; empty for the null sender `<>`.
    pub sender: String,
    pub recipients: Vec<Recipient>,
    /// Arrival time, milliseconds since the Unix epoch.
    pub arrival_ms: u64,
    /// Size of the stored message bytes (with our `Received:` header).
    pub size: u64,
    #[serde(default)]
    pub body: Body,
    #[serde(default)]
    pub smtputf8: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<Ret>,
    /// `ENVID=`, the xtext decoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envid: Option<String>,
    /// The client's IP address and the name it gave in HELO/EHLO.
    #[serde(default)]
    pub client_ip: String,
    #[serde(default)]
    pub helo: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_is_lowercased_and_loses_trailing_dot() {
        assert_eq!(domain_of("User@Example.COM."), "example.com");
        assert_eq!(domain_of("a@b@c.org"), "c.org");
        assert_eq!(domain_of("postmaster"), "");
    }
}
