//! Mail goes out: finding the next hops of a domain ([`mx`]) and speaking SMTP to them
//! ([`client`]). The scheduler (`crate::scheduler`) decides what to send when; this module
//! only knows how.

pub mod client;
pub mod link;
pub mod maildir;
pub mod mx;

use std::fmt;
use std::sync::Arc;

/// A reply of a remote SMTP server (all lines of a multi-line reply joined with a space).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// The enhanced status code (RFC 3463) if the server gave one, e.g. `5.1.1`.
    pub status: Option<String>,
    /// The text after the code (and after the enhanced status code, if any).
    pub text: String,
}

impl Reply {
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }
    /// The enhanced status code, or one derived from the reply's class (`4.0.0`, `5.0.0`).
    pub fn dsn_status(&self) -> String {
        self.status
            .clone()
            .unwrap_or_else(|| format!("{}.0.0", self.code / 100))
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.status {
            Some(s) => write!(f, "{} {} {}", self.code, s, self.text),
            None => write!(f, "{} {}", self.code, self.text),
        }
    }
}

/// Someone watching the SMTP conversation (`flush -v`): gets each line sent, prefixed with
/// `>>> `, and each line received, prefixed with `<<< `.
pub type Transcript = Arc<dyn Fn(&str) + Send + Sync>;
