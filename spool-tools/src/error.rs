//! The one error type of the library. Every variant displays as one line.

use std::io;

/// Why an archive could not be written or read as a whole.
///
/// Damage confined to some messages is not an `Error`: the reader reports it as a
/// [`Problem`](crate::Problem) and still gives the good messages.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing failed; `context` names the file or the step.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The archive is of a format version this build does not read. Checked on the first
    /// member, before anything else is read.
    #[error(
        "archive format version {found} is not supported (this build reads version {})",
        crate::FORMAT_VERSION
    )]
    Version { found: u32 },
    /// Not an mxspool archive, or its manifest is unusable.
    #[error("not a valid mxspool archive: {0}")]
    Format(String),
    /// The archive ends before its manifest (an interrupted copy or a full disk): no message
    /// can be verified. `complete` messages were read whole before the cut.
    #[error(
        "archive is truncated: it ends before its manifest, so none of its messages can be \
         verified ({complete} complete before the cut)"
    )]
    Truncated { complete: usize },
    /// The tar or gzip stream is damaged at some point and nothing after it can be read,
    /// the manifest included.
    #[error(
        "archive is damaged ({detail}): nothing after the damage can be read, so none of its \
         messages can be verified ({complete} complete before it)"
    )]
    Damaged { complete: usize, detail: String },
    /// A message id that is not 1 to 64 ASCII letters and digits.
    #[error("invalid message id {0:?} (must be 1 to 64 ASCII letters and digits)")]
    InvalidId(String),
    /// The writer was given the same id twice.
    #[error("message {0} is already in the archive")]
    DuplicateId(String),
    /// The writer was given an envelope that would not read back as valid.
    #[error("message {id}: {what}")]
    Envelope { id: String, what: String },
    /// [`ArchiveReader::message`](crate::ArchiveReader::message) found no such message.
    #[error("no message {0} in the archive")]
    NotFound(String),
    /// A message is in the archive but damaged (see [`Problem`](crate::Problem)).
    #[error("message {id} is damaged: {what}")]
    BadMessage { id: String, what: String },
    /// The file changed between the verification pass and the reading pass.
    #[error("{0} changed while it was being read")]
    Changed(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `map_err` helper: an I/O error with the file's name (or the step) as context.
pub(crate) fn io_err(context: impl std::fmt::Display) -> impl FnOnce(io::Error) -> Error {
    let context = context.to_string();
    move |source| Error::Io { context, source }
}
