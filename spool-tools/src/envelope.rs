//! The envelope of one archived message (`messages/ID.json`): plain serde data.
//!
//! The field names and values are the archive format (see FORMAT.md); they match the
//! spool's own envelope where they overlap, but this crate does not depend on the spool.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The longest message id the format accepts.
pub const MAX_ID_LEN: usize = 64;

/// Whether `id` is a valid message id of the format: 1 to 64 ASCII letters and digits.
/// (mxspool's own ids are 13 characters of `0-9A-Z`; other id styles import too.)
pub fn is_valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// Everything about one archived message except its bytes.
///
/// Unknown fields are ignored when reading, so later writers of format version 1 may add
/// fields; missing optional fields take their defaults.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedEnvelope {
    /// The queue id on the source host (see [`is_valid_id`]).
    pub id: String,
    /// The destination domain this entry was queued for.
    pub domain: String,
    /// Reverse path without angle brackets; `""` for the null sender `<>`.
    pub sender: String,
    pub recipients: Vec<ArchivedRecipient>,
    /// When the message arrived (RFC 3339, milliseconds, UTC in the file).
    #[serde(with = "rfc3339")]
    pub arrival: DateTime<Utc>,
    /// Delivery attempts so far.
    #[serde(default)]
    pub attempts: u32,
    /// The last temporary failure, as the spool recorded it.
    #[serde(default)]
    pub last_error: Option<String>,
    /// When the source host would have tried next.
    #[serde(default, with = "rfc3339_opt")]
    pub next_attempt: Option<DateTime<Utc>>,
    /// Whether the destination domain was on hold on the source host.
    #[serde(default)]
    pub held: bool,
    /// RFC 3461 parameters of MAIL FROM.
    #[serde(default)]
    pub dsn: ArchivedDsn,
    /// `BODY=` of MAIL FROM.
    #[serde(default)]
    pub body: BodyType,
    /// Whether the message came with `SMTPUTF8`.
    #[serde(default)]
    pub smtputf8: bool,
    /// The IP address of the client that sent it (`""` when made locally, e.g. a DSN).
    #[serde(default)]
    pub client_ip: String,
    /// The name the client gave in HELO/EHLO.
    #[serde(default)]
    pub helo: String,
}

/// One recipient and where it stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedRecipient {
    /// The address as given in RCPT TO, without angle brackets.
    pub address: String,
    #[serde(default)]
    pub state: RecipientState,
    /// `ORCPT=` with its address type, xtext decoded (`rfc822;user@example.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orcpt: Option<String>,
    /// `NOTIFY=`; absent means the parameter was not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<Notify>,
}

/// Where one recipient stands. Only `Pending` recipients are still to be delivered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecipientState {
    #[default]
    Pending,
    Delivered,
    Failed,
}

/// `NOTIFY=` of RCPT TO (RFC 3461 4.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notify {
    #[serde(default)]
    pub never: bool,
    #[serde(default)]
    pub success: bool,
    #[serde(default)]
    pub failure: bool,
    #[serde(default)]
    pub delay: bool,
}

impl Notify {
    /// The parameter's value as sent in RCPT TO (`NEVER`, `SUCCESS,FAILURE`, ...); `None`
    /// when no flag is set.
    pub fn to_param(&self) -> Option<String> {
        if self.never {
            return Some("NEVER".to_string());
        }
        let parts: Vec<&str> = [
            (self.success, "SUCCESS"),
            (self.failure, "FAILURE"),
            (self.delay, "DELAY"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, name)| *name)
        .collect();
        (!parts.is_empty()).then(|| parts.join(","))
    }
}

/// RFC 3461 parameters of MAIL FROM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedDsn {
    /// `RET=`.
    #[serde(default)]
    pub ret: Option<Ret>,
    /// `ENVID=`, xtext decoded.
    #[serde(default)]
    pub envid: Option<String>,
}

/// `RET=` of MAIL FROM (RFC 3461 4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ret {
    Full,
    Hdrs,
}

/// `BODY=` of MAIL FROM (RFC 6152).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BodyType {
    #[default]
    #[serde(rename = "7bit")]
    SevenBit,
    #[serde(rename = "8bitmime")]
    EightBitMime,
}

impl ArchivedEnvelope {
    /// The recipients still to be delivered.
    pub fn pending(&self) -> impl Iterator<Item = &ArchivedRecipient> {
        self.recipients
            .iter()
            .filter(|r| r.state == RecipientState::Pending)
    }

    /// Checks what the format requires of an envelope: a valid id, a domain, at least one
    /// recipient, and no control characters in anything that goes into an SMTP command or
    /// a command line. The error says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if !is_valid_id(&self.id) {
            return Err(format!(
                "invalid id {:?} (must be 1 to {MAX_ID_LEN} ASCII letters and digits)",
                self.id
            ));
        }
        if self.domain.is_empty() || has_control(&self.domain) {
            return Err(format!("invalid domain {:?}", self.domain));
        }
        if has_control(&self.sender) {
            return Err(format!("invalid sender {:?}", self.sender));
        }
        if self.recipients.is_empty() {
            return Err("no recipients".to_string());
        }
        for r in &self.recipients {
            if r.address.is_empty() || has_control(&r.address) {
                return Err(format!("invalid recipient {:?}", r.address));
            }
            if r.orcpt.as_deref().is_some_and(has_control) {
                return Err(format!("invalid ORCPT of recipient {:?}", r.address));
            }
        }
        if self.dsn.envid.as_deref().is_some_and(has_control) {
            return Err("invalid ENVID".to_string());
        }
        Ok(())
    }
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// RFC 3339 with milliseconds in UTC (`2024-05-01T10:20:30.123Z`); any offset on read.
pub fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn parse_time<E: serde::de::Error>(s: &str) -> Result<DateTime<Utc>, E> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| E::custom(format!("invalid RFC 3339 time {s:?}: {e}")))
}

pub(crate) mod rfc3339 {
    use super::*;

    pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_time(t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let s = String::deserialize(d)?;
        parse_time(&s)
    }
}

pub(crate) mod rfc3339_opt {
    use super::*;

    pub fn serialize<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_some(&format_time(t)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| parse_time(&s))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_ascii_alphanumerics_up_to_64() {
        assert!(is_valid_id("01HZX3K9Q7M2A"));
        assert!(is_valid_id("4VbQz1"));
        assert!(is_valid_id(&"a".repeat(64)));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id(&"a".repeat(65)));
        assert!(!is_valid_id("../etc"));
        assert!(!is_valid_id("AB-12"));
        assert!(!is_valid_id("ÄB"));
    }

    #[test]
    fn minimal_envelope_reads_with_defaults_and_ignores_unknown_fields() {
        let json = r#"{"id":"A1","domain":"example.com","sender":"",
            "recipients":[{"address":"u@example.com"}],
            "arrival":"2024-05-01T12:20:30.5+02:00","future_field":[1,2]}"#;
        let e: ArchivedEnvelope = serde_json::from_str(json).unwrap();
        assert_eq!(e.recipients[0].state, RecipientState::Pending);
        assert_eq!(format_time(&e.arrival), "2024-05-01T10:20:30.500Z");
        assert_eq!(e.body, BodyType::SevenBit);
        assert_eq!(e.dsn, ArchivedDsn::default());
        assert_eq!(e.next_attempt, None);
        e.validate().unwrap();
    }

    #[test]
    fn notify_param() {
        let n = Notify {
            success: true,
            delay: true,
            ..Notify::default()
        };
        assert_eq!(n.to_param().as_deref(), Some("SUCCESS,DELAY"));
        let never = Notify {
            never: true,
            ..Notify::default()
        };
        assert_eq!(never.to_param().as_deref(), Some("NEVER"));
        assert_eq!(Notify::default().to_param(), None);
    }
}
