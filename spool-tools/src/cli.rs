//! The `spool-tools` command line, in the library so that the packaging tool can render
//! its man page and shell completions from the same definitions.

use std::path::PathBuf;

use clap::{ArgGroup, Parser, Subcommand};

/// Look into, check and replay a portable mxspool spool archive (see FORMAT.md).
#[derive(Parser, Debug)]
#[command(name = "spool-tools", version)]
pub struct Cli {
    /// The archive: a tar file, plain or gzip-compressed, made by `mxspool export`.
    pub archive: PathBuf,
    /// Use what can be read of a truncated archive, whose manifest is lost: the messages
    /// read whole before the cut, unverified (exit status 1 all the same).
    #[arg(long, global = true)]
    pub salvage: bool,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// One line per message: id, arrival, size, sender, pending recipients.
    List,
    /// Check format version, checksums and completeness; exit 1 on any problem.
    Verify,
    /// Write the raw bytes of message ID to standard output.
    Cat {
        /// The message id.
        id: String,
    },
    /// Re-inject every message, to its pending recipients only, with its original envelope.
    #[command(group(ArgGroup::new("target").required(true).args(["smtp", "sendmail"])))]
    Replay {
        /// Send over SMTP to HOST:PORT (e.g. `localhost:25`).
        #[arg(long, value_name = "HOST:PORT")]
        smtp: Option<String>,
        /// The name to give in EHLO (default: this host's name).
        #[arg(long, value_name = "NAME", requires = "smtp")]
        helo: Option<String>,
        /// Pipe each message to `PATH -i -f SENDER -- RECIPIENTS...`.
        #[arg(long, value_name = "PATH")]
        sendmail: Option<PathBuf>,
    },
    /// Write all messages as an mboxrd mailbox to standard output.
    Mbox,
}
