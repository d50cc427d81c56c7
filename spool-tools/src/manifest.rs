//! The archive's names and its manifest (`manifest.json`, the last member).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::envelope::{rfc3339, MAX_ID_LEN};

/// Value of the manifest's `format` field and first word of the `FORMAT` member.
pub const FORMAT_NAME: &str = "mxspool-archive";
/// The directory every member lives in.
pub(crate) const TOP: &str = "mxspool-archive/";
/// The first member: `FORMAT_NAME VERSION\n`.
pub(crate) const FORMAT_MEMBER: &str = "mxspool-archive/FORMAT";
/// The last member.
pub(crate) const MANIFEST_MEMBER: &str = "mxspool-archive/manifest.json";
pub(crate) const MESSAGES_DIR: &str = "mxspool-archive/messages/";

/// Who made an archive, when, and of what: the manifest's header fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveMeta {
    /// When the archive was made.
    pub created: DateTime<Utc>,
    /// The host name of the spool the messages came from.
    pub source_host: String,
    /// The destination domain the archive holds, when it holds one domain's queue.
    pub domain: Option<String>,
}

impl ArchiveMeta {
    /// Made now, by `source_host`, of `domain`'s queue (or of several domains: `None`).
    pub fn new(source_host: impl Into<String>, domain: Option<String>) -> Self {
        ArchiveMeta {
            created: Utc::now(),
            source_host: source_host.into(),
            domain,
        }
    }
}

/// `manifest.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Manifest {
    pub format: String,
    pub version: u32,
    #[serde(with = "rfc3339")]
    pub created: DateTime<Utc>,
    #[serde(default)]
    pub source_host: String,
    #[serde(default)]
    pub domain: Option<String>,
    /// The program that wrote the archive (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generator: Option<String>,
    pub messages: Vec<ManifestEntry>,
}

/// One message in the manifest.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct ManifestEntry {
    pub id: String,
    /// SHA-256 of `messages/ID.eml`, lower-case hex.
    pub eml_sha256: String,
    /// SHA-256 of `messages/ID.json`, lower-case hex.
    pub json_sha256: String,
    /// Size of `messages/ID.eml` in bytes.
    pub eml_size: u64,
}

/// The two members of one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Half {
    Eml,
    Json,
}

impl Half {
    pub fn ext(self) -> &'static str {
        match self {
            Half::Eml => "eml",
            Half::Json => "json",
        }
    }
}

pub(crate) fn member_name(id: &str, half: Half) -> String {
    format!("{MESSAGES_DIR}{id}.{}", half.ext())
}

/// What a member name is, for the reader.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Member<'a> {
    Format,
    Manifest,
    Message(&'a str, Half),
    /// A directory entry (`mxspool-archive/`, `.../messages/`): allowed and ignored.
    Directory,
    Unknown,
}

pub(crate) fn classify(name: &str) -> Member<'_> {
    let name = name.strip_prefix("./").unwrap_or(name);
    if name == FORMAT_MEMBER {
        return Member::Format;
    }
    if name == MANIFEST_MEMBER {
        return Member::Manifest;
    }
    if name == TOP || name == MESSAGES_DIR || name == TOP.trim_end_matches('/') {
        return Member::Directory;
    }
    if let Some(file) = name.strip_prefix(MESSAGES_DIR) {
        let half = if let Some(id) = file.strip_suffix(".eml") {
            Some((id, Half::Eml))
        } else {
            file.strip_suffix(".json").map(|id| (id, Half::Json))
        };
        if let Some((id, half)) = half {
            if id.len() <= MAX_ID_LEN && !id.is_empty() {
                return Member::Message(id, half);
            }
        }
    }
    Member::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names() {
        assert_eq!(classify("mxspool-archive/FORMAT"), Member::Format);
        assert_eq!(
            classify("./mxspool-archive/manifest.json"),
            Member::Manifest
        );
        assert_eq!(
            classify(&member_name("01ABC", Half::Eml)),
            Member::Message("01ABC", Half::Eml)
        );
        assert_eq!(
            classify("mxspool-archive/messages/X.json"),
            Member::Message("X", Half::Json)
        );
        assert_eq!(classify("mxspool-archive/messages/"), Member::Directory);
        assert_eq!(classify("mxspool-archive/messages/.eml"), Member::Unknown);
        assert_eq!(classify("other/FORMAT"), Member::Unknown);
    }
}
