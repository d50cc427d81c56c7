//! `doctor`'s report of a partner's defences (issue 13): the recipients list, the callout,
//! the quota and what its queue uses of it, the rate limits and blocklists.

use std::fmt::Write as _;

use crate::config::Config;
use crate::delivery::mx::Resolver;

/// A partner's defences: its recipients list, the callout (tried now, for its postmaster),
/// its quota and what its queue uses of it (from the spool, read-only), the rate limits and
/// blocklists. Warns when the quota is reached or the callout gets no answer.
pub async fn report(
    config: &Config,
    resolver: &Resolver,
    domain: &str,
    out: &mut String,
    warnings: &mut Vec<String>,
) {
    let Some(p) = config.partner(domain) else {
        return;
    };
    let _ = writeln!(out, "Defences of partner {domain}:");
    match (&p.users, &p.recipients) {
        (Some(users), Some(path)) => {
            let _ = writeln!(
                out,
                "  recipients: {} entries from {} (others get 550 5.1.1)",
                users.len(),
                path.display()
            );
        }
        _ => {
            let _ = writeln!(out, "  recipients: no list (any local part)");
        }
    }
    if p.verify == Some(crate::config::Verify::Callout) {
        let address = format!("postmaster@{domain}");
        match crate::policy::callout::probe(config, resolver, &address).await {
            Ok(crate::policy::callout::Verdict::Accept) => {
                let _ = writeln!(out, "  callout: {address} accepted by the primary");
            }
            Ok(crate::policy::callout::Verdict::Refuse(reply)) => {
                let _ = writeln!(out, "  callout: {address} refused by the primary: {reply}");
                warnings.push(format!(
                    "the primary of {domain} refuses {address} to a callout ({reply}): every \
                     domain must accept its postmaster (RFC 5321 4.5.1)"
                ));
            }
            Err(why) => {
                let _ = writeln!(out, "  callout: no answer from the primary: {why}");
                warnings.push(format!(
                    "the callout to the primary of {domain} gets no answer ({why}): its \
                     recipients are accepted unverified meanwhile"
                ));
            }
        }
    } else {
        let _ = writeln!(out, "  callout: off (verify is not set)");
    }
    let quotas = crate::policy::quota::of_config(config);
    match quotas.get(domain) {
        Some(q) => match crate::spool::Spool::open_read_only(&config.spool) {
            Ok(spool) => {
                let used = spool.usage(domain);
                let _ = writeln!(out, "  quota: {} ({}%)", q.describe(used), q.percent(used));
                if q.percent(used) >= 100 {
                    warnings.push(format!(
                        "the queue of {domain} is at its quota ({}): its new mail gets 452 4.3.1",
                        q.describe(used)
                    ));
                }
            }
            Err(crate::spool::SpoolError::Missing { .. }) => {
                let used = Default::default();
                let _ = writeln!(
                    out,
                    "  quota: {} (0%) (nothing queued yet)",
                    q.describe(used)
                );
            }
            Err(e) => {
                let _ = writeln!(
                    out,
                    "  quota: {} (queue not read: {e})",
                    q.describe(Default::default())
                );
            }
        },
        None => {
            let _ = writeln!(out, "  quota: none (max_messages, max_bytes not set)");
        }
    }
    let smtp = &config.smtp;
    let rate = |r: &Option<crate::policy::rates::Rate>| {
        r.as_ref().map_or("off".to_string(), |r| r.to_string())
    };
    let _ = writeln!(
        out,
        "  rate limits per client: connections {}, messages {}",
        rate(&smtp.max_connection_rate),
        rate(&smtp.max_message_rate)
    );
    let _ = writeln!(
        out,
        "  DNS blocklists: {}",
        if smtp.dnsbl.is_empty() {
            "none".to_string()
        } else {
            smtp.dnsbl.join(", ")
        }
    );
    let _ = writeln!(out);
}
