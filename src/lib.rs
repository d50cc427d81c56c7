//! mxspool: a secondary-MX store-and-forward mail server.
//!
//! Mail flows through the modules in this order:
//!
//! - [`config`]: the TOML configuration, parsed strictly and validated once at start-up.
//! - [`smtp`]: mail comes in. `smtp::session` is the SMTP protocol as a sans-IO state machine
//!   (bytes and time in, replies and actions out); `smtp::data` finds the end of DATA and
//!   refuses smuggling; `smtp::server` is the tokio driver with the connection limits.
//! - [`policy`]: whom we accept mail for (our domains; any domain only from `[relay]
//!   networks; never an open relay), with [`virtual_table`] and [`masquerade`].
//! - [`spool`]: the durable queue in RocksDB, the only module that names `rocksdb`. Its
//!   group-commit writer syncs the write-ahead log before any message is acknowledged.
//! - [`scheduler`] and [`delivery`]: mail goes out, to next hops over SMTP or to local
//!   Maildirs and LMTP servers.
//! - [`envelope`] and [`queue_id`]: the plain data that travels between them.
//! - [`cli`]: the administrator's commands; [`admin`], [`control`] and [`report`] are the
//!   queue operations, the control socket and the reports behind them.
//! - [`ops`]: the operator's surface around them: the live configuration snapshot and its
//!   reload, the privilege drop and the private spool, what reaches a terminal.
//! - [`tls`]: STARTTLS in (certificates, the acceptor) and out (the policy, the connectors).

pub mod admin;
pub mod cli;
pub mod config;
pub mod control;
pub mod delivery;
pub mod doctor;
pub mod dsn;
pub mod envelope;
pub mod masquerade;
pub mod ops;
pub mod policy;
pub mod queue_id;
pub mod report;
pub mod scheduler;
pub mod smtp;
pub mod spool;
pub mod tls;
pub mod virtual_table;
