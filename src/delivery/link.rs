//! One open way out for a domain's queue: an SMTP or LMTP connection, or the local Maildir
//! writer. The scheduler sends a domain's entries over one `Link` the same way whatever it
//! is, and gets one [`RcptResult`] per recipient back.

use crate::spool::Message;
use std::path::PathBuf;

use super::client::{Connection, Outgoing, RcptResult};
use super::maildir::{self, LocalError};
use super::Reply;
use crate::envelope::domain_of;

/// Where a local domain's Maildirs are and what to call ourselves in their file names.
#[derive(Clone, Debug)]
pub struct MaildirTarget {
    /// The `maildir` template (`{domain}`, `{user}`).
    pub template: String,
    /// Our hostname, for the unique file names.
    pub hostname: String,
}

pub enum Link {
    /// SMTP to a next hop, or LMTP to a local domain's mail store.
    Remote(Box<Connection>),
    /// Written into Maildirs here.
    Maildir(MaildirTarget),
}

impl Link {
    /// For logs and `relay=`: `host[ip]:port`, an LMTP socket path, or `local`.
    pub fn relay(&self) -> String {
        match self {
            Link::Remote(c) => c.relay(),
            Link::Maildir(_) => "local".to_string(),
        }
    }

    /// The TLS state of an SMTP connection, for the log (`tls=TLSv1.3 verified=pkix`,
    /// `tls=none`) and the queue entry's `last_tls`; `None` for LMTP and Maildir.
    pub fn tls_state(&self) -> Option<crate::tls::TlsState> {
        match self {
            Link::Remote(c) if !c.is_lmtp() => Some(c.tls_state()),
            _ => None,
        }
    }

    /// Whether replies come from another server (their text is quoted as `host said`).
    pub fn is_remote(&self) -> bool {
        matches!(self, Link::Remote(_))
    }

    /// Whether another message may go over this link.
    pub fn is_usable(&self) -> bool {
        match self {
            Link::Remote(c) => c.is_usable(),
            Link::Maildir(_) => true,
        }
    }

    /// Deliver one message to its recipients (all of this link's domain): one result per
    /// recipient (see [`Connection::send`] for `Unsent`).
    pub async fn send(&mut self, msg: &Outgoing<'_>) -> Vec<RcptResult> {
        match self {
            Link::Remote(c) => c.send(msg).await,
            Link::Maildir(target) => deliver_maildirs(target, msg).await,
        }
    }

    pub async fn quit(self) {
        if let Link::Remote(c) = self {
            c.quit().await;
        }
    }
}

/// Each recipient's copy, written in a blocking task (file I/O and fsync).
async fn deliver_maildirs(target: &MaildirTarget, msg: &Outgoing<'_>) -> Vec<RcptResult> {
    let message = msg.message.clone();
    let sender = msg.envelope.sender.clone();
    let rcpts: Vec<String> = msg.recipients.iter().map(|r| r.address.clone()).collect();
    let target = target.clone();
    let n = rcpts.len();
    let joined = tokio::task::spawn_blocking(move || {
        rcpts
            .iter()
            .map(|rcpt| deliver_one(&target, &sender, rcpt, &message))
            .collect::<Vec<_>>()
    })
    .await;
    match joined {
        Ok(results) => results,
        Err(e) => (0..n)
            .map(|_| {
                RcptResult::Deferred(local_reply(&LocalError {
                    permanent: false,
                    status: "4.3.0".into(),
                    text: format!("local delivery task failed: {e}"),
                }))
            })
            .collect(),
    }
}

fn deliver_one(target: &MaildirTarget, sender: &str, rcpt: &str, message: &Message) -> RcptResult {
    let local = rcpt.rsplit_once('@').map_or(rcpt, |(l, _)| l);
    let path: Result<PathBuf, LocalError> = maildir::mailbox_user(local).and_then(|user| {
        maildir::mailbox_path(&target.template, &domain_of(rcpt), &user).and_then(|dir| {
            maildir::deliver(&dir, &target.hostname, sender, rcpt, message.reader())
        })
    });
    match path {
        Ok(file) => RcptResult::Sent(Reply {
            code: 250,
            status: Some("2.0.0".into()),
            text: format!("delivered to maildir {}", file.display()),
        }),
        Err(e) if e.permanent => RcptResult::Failed(local_reply(&e)),
        Err(e) => RcptResult::Deferred(local_reply(&e)),
    }
}

/// A local failure in the shape of a reply (`451 4.3.0 text`, `550 5.1.3 text`).
fn local_reply(e: &LocalError) -> Reply {
    Reply {
        code: if e.permanent { 550 } else { 451 },
        status: Some(e.status.clone()),
        text: e.text.clone(),
    }
}
