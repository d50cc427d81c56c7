//! The configuration in force, as one immutable [`Snapshot`] (the parsed [`Config`] with
//! every table it loads, and what the SMTP sessions derive from it) behind an `Arc` that
//! [`Live::reload`] swaps.
//!
//! Whoever starts a piece of work takes the snapshot once and keeps it to the end: an SMTP
//! session runs under the settings it started with, a delivery under those of its start. A
//! reload parses and validates everything first (configuration, users and recipients files,
//! virtual table) and swaps only when all of it is good; otherwise the old snapshot stays
//! and the error is the reply. Settings that only take effect at start (listen addresses,
//! spool, user, ...) keep their running values in the new snapshot and are named in the
//! reply, so the snapshot always says what is really in force.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::config::Config;
use crate::policy::Policy;
use crate::smtp::session::SessionConfig;

/// Everything the server decides with, loaded together.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub policy: Arc<Policy>,
    pub session: Arc<SessionConfig>,
    /// The STARTTLS acceptor, when `[smtp] tls_certificate` is set (its files were read
    /// with the configuration, so a reload re-reads them).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Snapshot {
    pub fn new(config: Config) -> Snapshot {
        let session = SessionConfig {
            hostname: config.hostname.clone(),
            max_message_size: config.smtp.max_message_size.0 as usize,
            max_recipients: config.smtp.max_recipients,
            max_errors: config.smtp.max_errors,
            recipient_overshoot: config.smtp.recipient_overshoot,
            min_free_space: config.queue.min_free_space.0,
            starttls: config.smtp.tls.is_some(),
        };
        let tls = config
            .smtp
            .tls
            .as_ref()
            .map(|certs| tokio_rustls::TlsAcceptor::from(certs.server_config()));
        Snapshot {
            tls,
            policy: Arc::new(Policy::new(&config)),
            session: Arc::new(session),
            config: Arc::new(config),
        }
    }
}

/// Where the configuration came from, to read it again.
#[derive(Clone, Debug)]
struct Source {
    path: PathBuf,
    spool: Option<PathBuf>,
}

/// The snapshot in force.
pub struct Live {
    current: RwLock<Arc<Snapshot>>,
    source: Option<Source>,
}

/// What a successful reload changed.
#[derive(Clone, Debug, Default)]
pub struct Reloaded {
    /// Settings that differ in the file but keep their running value until a restart.
    pub need_restart: Vec<&'static str>,
}

/// Reads the configuration at `path` (relative paths in it from its directory); `spool`
/// (the command line's `--spool`, relative to the working directory) replaces its spool.
pub fn load(path: &Path, spool: Option<&Path>) -> anyhow::Result<Config> {
    let mut config = Config::load(path)?;
    if let Some(s) = spool {
        config.spool = std::path::absolute(s).unwrap_or_else(|_| s.to_path_buf());
    }
    Ok(config)
}

impl Live {
    /// A configuration that [`reload`](Self::reload) reads again from `path`.
    pub fn from_file(config: Config, path: &Path, spool: Option<&Path>) -> Arc<Live> {
        Arc::new(Live {
            current: RwLock::new(Arc::new(Snapshot::new(config))),
            source: Some(Source {
                path: path.to_path_buf(),
                spool: spool.map(Path::to_path_buf),
            }),
        })
    }

    /// A configuration that is never reloaded (a command's own run, tests).
    pub fn fixed(config: Config) -> Arc<Live> {
        Arc::new(Live {
            current: RwLock::new(Arc::new(Snapshot::new(config))),
            source: None,
        })
    }

    /// The snapshot in force now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The configuration in force now.
    pub fn config(&self) -> Arc<Config> {
        self.snapshot().config.clone()
    }

    /// Read the configuration and all its tables again; swap them in if all of it is valid.
    /// The error is one line (the old configuration stays in force).
    pub fn reload(&self) -> Result<Reloaded, String> {
        let Some(source) = &self.source else {
            return Err("this configuration is not reloadable".into());
        };
        let mut new = load(&source.path, source.spool.as_deref())
            .map_err(|e| crate::ops::output::error_line(&e))?;
        let old = self.config();
        let need_restart = keep_running_values(&old, &mut new);
        let snapshot = Arc::new(Snapshot::new(new));
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = snapshot;
        Ok(Reloaded { need_restart })
    }
}

/// Copies into `new` every setting that takes effect only at start, naming those that
/// differ.
fn keep_running_values(old: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut named = Vec::new();
    fn same<T: serde::Serialize>(a: &T, b: &T) -> bool {
        serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
    }
    macro_rules! keep {
        ($name:literal, $($field:tt)+) => {
            if !same(&old.$($field)+, &new.$($field)+) {
                named.push($name);
                new.$($field)+ = old.$($field)+.clone();
            }
        };
    }
    keep!("hostname", hostname);
    keep!("spool", spool);
    keep!("user", user);
    keep!("[smtp] listen", smtp.listen);
    keep!("[smtp] max_connections", smtp.max_connections);
    keep!("[queue] max_deliveries", queue.max_deliveries);
    keep!("[delivery]", delivery);
    keep!("[metrics] listen", metrics.listen);
    named
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_swaps_valid_settings_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mxspool.toml");
        let base =
            "hostname = \"mx.test\"\nspool = \"spool\"\n[smtp]\nlisten = [\"127.0.0.1:2525\"]\n";
        std::fs::write(&path, base).unwrap();
        let live = Live::from_file(load(&path, None).unwrap(), &path, None);
        assert_eq!(live.config().spool, dir.path().join("spool"));
        let before = live.snapshot();

        std::fs::write(
            &path,
            format!("{base}[[partner]]\ndomain = \"new.test\"\n").replace("2525", "2526"),
        )
        .unwrap();
        let r = live.reload().unwrap();
        assert_eq!(r.need_restart, vec!["[smtp] listen"]);
        let now = live.config();
        assert!(now.partner("new.test").is_some());
        assert_eq!(now.smtp.listen, vec!["127.0.0.1:2525".to_string()]);
        // Work that started before keeps its snapshot.
        assert!(before.config.partner("new.test").is_none());

        std::fs::write(&path, "hostname = \"mx.test\"\ncolour = 1\n").unwrap();
        let err = live.reload().unwrap_err();
        assert!(err.contains("colour") && !err.contains('\n'), "{err}");
        assert!(live.config().partner("new.test").is_some());
    }
}
