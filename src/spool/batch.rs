//! A [`Batch`]: one atomic change of the spool as plain data (a list of puts and deletes per
//! column family). Building one needs no database, so what a change writes can be tested
//! directly; the writer thread turns batches into one `rocksdb::WriteBatch`.

use super::keys::{self, Cf};
use super::{QueueEntry, SpoolError, StoredEnvelope};
use crate::envelope::{domain_of, Envelope};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        cf: Cf,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        cf: Cf,
        key: Vec<u8>,
    },
    /// Combined with the stored value by the family's merge operator (only the `usage`
    /// counters of `meta`, see `usage.rs`).
    Merge {
        cf: Cf,
        key: Vec<u8>,
        value: Vec<u8>,
    },
}

/// Operations applied together, all or nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    ops: Vec<Op>,
    /// Needs no fsync ([`Batch::lazy`]).
    lazy: bool,
}

impl Batch {
    pub fn new() -> Batch {
        Batch::default()
    }

    pub fn put(&mut self, cf: Cf, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push(Op::Put { cf, key, value });
    }

    pub fn delete(&mut self, cf: Cf, key: Vec<u8>) {
        self.ops.push(Op::Delete { cf, key });
    }

    pub fn merge(&mut self, cf: Cf, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push(Op::Merge { cf, key, value });
    }

    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Bytes of keys and values, for the writer's cap on one commit.
    pub fn bytes(&self) -> usize {
        self.ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value, .. } | Op::Merge { key, value, .. } => {
                    key.len() + value.len()
                }
                Op::Delete { key, .. } => key.len(),
            })
            .sum()
    }

    /// Delete message `id`'s bytes: its first part and the `parts` that follow it.
    pub fn delete_message(&mut self, id: &str, parts: u32) {
        self.delete(Cf::Messages, keys::message(id));
        for n in 1..=parts {
            self.delete(Cf::Messages, keys::part(id, n));
        }
    }

    /// Append every operation of `other` (applied in the same atomic commit; lazy only if
    /// both are).
    pub fn append(&mut self, other: Batch) {
        self.lazy &= other.lazy;
        self.ops.extend(other.ops);
    }

    /// This batch needs no fsync: losing it in a power cut is harmless (the callout cache).
    /// The writer commits a group of lazy batches without syncing the log and without
    /// moving the commit mark (see `writer.rs`); in a group with any other batch it is
    /// synced with the rest.
    pub fn lazy(mut self) -> Batch {
        self.lazy = true;
        self
    }

    pub fn is_lazy(&self) -> bool {
        self.lazy
    }

    /// The new state of one queue entry after a delivery attempt. `current` is the entry as
    /// stored (its due key is replaced); `stored` is the message's envelope record. An
    /// entry with no pending recipient left is removed, and with the last domain's entry
    /// the message itself goes.
    pub fn settle(
        domain: &str,
        id: &str,
        current: &QueueEntry,
        new: &QueueEntry,
        stored: &StoredEnvelope,
    ) -> Batch {
        let mut b = Batch::new();
        b.delete(Cf::Due, keys::due(current.next_attempt_ms, domain, id));
        if new.has_pending() {
            b.put(Cf::Queue, keys::queue(domain, id), new.to_bytes());
            if !new.held {
                b.put(
                    Cf::Due,
                    keys::due(new.next_attempt_ms, domain, id),
                    Vec::new(),
                );
            }
            return b;
        }
        b.delete(Cf::Queue, keys::queue(domain, id));
        b.usage(domain, -1, -signed(stored.envelope.size));
        let rest: Vec<String> = stored
            .domains
            .iter()
            .filter(|d| d.as_str() != domain)
            .cloned()
            .collect();
        if rest.is_empty() {
            b.delete(Cf::Envelopes, keys::message(id));
            b.delete_message(id, stored.parts);
        } else {
            let kept = StoredEnvelope {
                envelope: stored.envelope.clone(),
                domains: rest,
                ..stored.clone()
            };
            b.put(Cf::Envelopes, keys::message(id), kept.to_bytes());
        }
        b
    }

    /// The puts of a new message: its bytes and envelope once, and one queue entry plus one
    /// due entry (due at arrival) for each recipient domain.
    pub fn enqueue(env: Envelope, message: Vec<u8>) -> Result<Batch, SpoolError> {
        Batch::enqueue_with(env, Parts::whole(message), |_| false)
    }

    /// [`Batch::enqueue`] where the entries of domains for which `held` is true arrive held
    /// (no due key: the scheduler does not see them).
    pub fn enqueue_with(
        env: Envelope,
        message: Parts,
        held: impl Fn(&str) -> bool,
    ) -> Result<Batch, SpoolError> {
        let id = env.id.clone();
        if id.is_empty() || !keys::valid_part(&id) {
            return Err(SpoolError::Invalid(format!("bad queue id {id:?}")));
        }
        if env.recipients.is_empty() {
            return Err(SpoolError::Invalid(format!("{id}: no recipients")));
        }
        // Domains in order of first appearance, each with only its own recipients.
        let mut domains: Vec<(String, Vec<crate::envelope::Recipient>)> = Vec::new();
        for r in &env.recipients {
            let d = domain_of(&r.address);
            if !keys::valid_part(&d) {
                return Err(SpoolError::Invalid(format!(
                    "{id}: bad recipient domain {d:?}"
                )));
            }
            match domains.iter_mut().find(|(x, _)| *x == d) {
                Some((_, rs)) => rs.push(r.clone()),
                None => domains.push((d, vec![r.clone()])),
            }
        }

        let mut b = Batch::new();
        let arrival = env.arrival_ms;
        for (domain, recipients) in &domains {
            let is_held = held(domain);
            let entry = QueueEntry {
                recipients: recipients.clone(),
                attempts: 0,
                next_attempt_ms: arrival,
                last_error: None,
                held: is_held,
                warned: false,
                held_since_ms: if is_held { arrival } else { 0 },
                held_ms: 0,
                last_tls: None,
            };
            b.put(Cf::Queue, keys::queue(domain, &id), entry.to_bytes());
            b.usage(domain, 1, signed(env.size));
            if !is_held {
                b.put(Cf::Due, keys::due(arrival, domain, &id), Vec::new());
            }
        }
        let stored = StoredEnvelope {
            envelope: env,
            domains: domains.into_iter().map(|(d, _)| d).collect(),
            parts: message.count(),
            length: if message.count() > 0 {
                message.len()
            } else {
                0
            },
        };
        b.put(Cf::Envelopes, keys::message(&id), stored.to_bytes());
        message.put(&mut b, &id);
        Ok(b)
    }
}

/// A size as the counters' signed number.
pub(super) fn signed(size: u64) -> i64 {
    size.min(i64::MAX as u64) as i64
}

/// A new message's bytes, as parts of [`Cf::Messages`]: the first (at the id's own key),
/// the parts `1..=written` already stored ahead of the commit ([`super::Spool::write_part`],
/// for a message streamed in as it arrives), and the rest, stored by the commit itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parts {
    pub first: Vec<u8>,
    /// Parts stored ahead, and their bytes.
    pub written: u32,
    pub written_len: u64,
    /// Parts `written + 1 ..` to store with the commit.
    pub rest: Vec<Vec<u8>>,
}

impl Parts {
    /// A whole message held in memory, cut into parts of [`super::PART_SIZE`] so that
    /// whoever reads it later reads it part by part.
    pub fn whole(bytes: Vec<u8>) -> Parts {
        if bytes.len() <= super::PART_SIZE {
            return Parts {
                first: bytes,
                ..Parts::default()
            };
        }
        // Copied part by part (each with its own exact allocation), then the whole goes.
        let mut chunks = bytes.chunks(super::PART_SIZE).map(<[u8]>::to_vec);
        let first = chunks.next().unwrap_or_default();
        let rest = chunks.collect();
        Parts {
            first,
            written: 0,
            written_len: 0,
            rest,
        }
    }

    /// Parts after the first.
    pub fn count(&self) -> u32 {
        self.written + self.rest.len() as u32
    }

    /// Bytes of the whole message.
    pub fn len(&self) -> u64 {
        self.first.len() as u64
            + self.written_len
            + self.rest.iter().map(|p| p.len() as u64).sum::<u64>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The puts of the parts not yet stored, and the end of the message's `partial` mark.
    pub fn into_batch(self, id: &str) -> Batch {
        let mut b = Batch::new();
        self.put(&mut b, id);
        b
    }

    fn put(self, b: &mut Batch, id: &str) {
        b.put(Cf::Messages, keys::message(id), self.first);
        for (i, p) in self.rest.into_iter().enumerate() {
            b.put(Cf::Messages, keys::part(id, self.written + 1 + i as u32), p);
        }
        if self.written > 0 {
            b.delete(Cf::Meta, keys::partial(id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::Recipient;

    fn env(id: &str, rcpts: &[&str]) -> Envelope {
        Envelope {
            id: id.into(),
            sender: "s@x.org".into(),
            recipients: rcpts.iter().map(|r| Recipient::new(*r)).collect(),
            arrival_ms: 42,
            size: 3,
            body: Default::default(),
            smtputf8: false,
            ret: None,
            envid: None,
            client_ip: String::new(),
            helo: String::new(),
        }
    }

    fn puts(b: &Batch, cf: Cf) -> Vec<(Vec<u8>, Vec<u8>)> {
        b.ops()
            .iter()
            .filter_map(|op| match op {
                Op::Put { cf: c, key, value } if *c == cf => Some((key.clone(), value.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn two_domains_store_the_message_once_and_queue_it_twice() {
        let b = Batch::enqueue(
            env("ID1", &["a@one.org", "b@TWO.org", "c@one.org"]),
            b"hi\n".to_vec(),
        )
        .unwrap();
        assert_eq!(
            puts(&b, Cf::Messages),
            vec![(b"ID1".to_vec(), b"hi\n".to_vec())]
        );
        assert_eq!(puts(&b, Cf::Envelopes).len(), 1);
        let stored = StoredEnvelope::from_bytes(&puts(&b, Cf::Envelopes)[0].1).unwrap();
        assert_eq!(stored.domains, vec!["one.org", "two.org"]);

        let queue = puts(&b, Cf::Queue);
        assert_eq!(queue.len(), 2);
        assert_eq!(queue[0].0, keys::queue("one.org", "ID1"));
        let one = QueueEntry::from_bytes(&queue[0].1).unwrap();
        let addrs: Vec<_> = one.recipients.iter().map(|r| r.address.as_str()).collect();
        assert_eq!(addrs, vec!["a@one.org", "c@one.org"]);
        assert_eq!(
            (one.attempts, one.next_attempt_ms, one.held),
            (0, 42, false)
        );
        assert_eq!(one.last_error, None);
        let two = QueueEntry::from_bytes(&queue[1].1).unwrap();
        assert_eq!(two.recipients[0].address, "b@TWO.org");

        let due: Vec<_> = puts(&b, Cf::Due).into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            due,
            vec![
                keys::due(42, "one.org", "ID1"),
                keys::due(42, "two.org", "ID1")
            ]
        );
        assert_eq!(b.bytes(), b.ops().iter().map(op_bytes).sum::<usize>());
        // Each domain's counters: one more entry, of the envelope's size.
        let merged: Vec<_> = b
            .ops()
            .iter()
            .filter_map(|op| match op {
                Op::Merge {
                    cf: Cf::Meta,
                    key,
                    value,
                } => Some((key.clone(), value.clone())),
                _ => None,
            })
            .collect();
        let one = [1i64.to_be_bytes(), 3i64.to_be_bytes()].concat();
        assert_eq!(
            merged,
            vec![
                (keys::usage("one.org"), one.clone()),
                (keys::usage("two.org"), one)
            ]
        );
    }

    fn op_bytes(op: &Op) -> usize {
        match op {
            Op::Put { key, value, .. } | Op::Merge { key, value, .. } => key.len() + value.len(),
            Op::Delete { key, .. } => key.len(),
        }
    }

    #[test]
    fn settling_moves_the_due_key_or_removes_what_is_done() {
        use crate::envelope::RcptState;
        let env = env("ID1", &["a@one.org", "b@two.org"]);
        let stored = StoredEnvelope {
            envelope: env.clone(),
            domains: vec!["one.org".into(), "two.org".into()],
            ..Default::default()
        };
        let current = QueueEntry {
            recipients: vec![Recipient::new("a@one.org")],
            attempts: 0,
            next_attempt_ms: 42,
            last_error: None,
            held: false,
            warned: false,
            held_since_ms: 0,
            held_ms: 0,
            last_tls: None,
        };
        // Still pending: the entry is rewritten and due again later.
        let mut later = current.clone();
        later.attempts = 1;
        later.next_attempt_ms = 1000;
        let b = Batch::settle("one.org", "ID1", &current, &later, &stored);
        assert_eq!(
            b.ops(),
            &[
                Op::Delete {
                    cf: Cf::Due,
                    key: keys::due(42, "one.org", "ID1")
                },
                Op::Put {
                    cf: Cf::Queue,
                    key: keys::queue("one.org", "ID1"),
                    value: later.to_bytes()
                },
                Op::Put {
                    cf: Cf::Due,
                    key: keys::due(1000, "one.org", "ID1"),
                    value: vec![]
                },
            ]
        );
        // Done for one.org while two.org still waits: the message stays.
        let mut done = current.clone();
        done.recipients[0].state = RcptState::Delivered;
        let b = Batch::settle("one.org", "ID1", &current, &done, &stored);
        let kept = StoredEnvelope {
            envelope: env.clone(),
            domains: vec!["two.org".into()],
            ..Default::default()
        };
        assert_eq!(
            b.ops(),
            &[
                Op::Delete {
                    cf: Cf::Due,
                    key: keys::due(42, "one.org", "ID1")
                },
                Op::Delete {
                    cf: Cf::Queue,
                    key: keys::queue("one.org", "ID1")
                },
                Op::Merge {
                    cf: Cf::Meta,
                    key: keys::usage("one.org"),
                    value: [(-1i64).to_be_bytes(), (-3i64).to_be_bytes()].concat()
                },
                Op::Put {
                    cf: Cf::Envelopes,
                    key: keys::message("ID1"),
                    value: kept.to_bytes()
                },
            ]
        );
        // Done for the last domain: the message goes.
        let b = Batch::settle("two.org", "ID1", &current, &done, &kept);
        assert!(b.ops().contains(&Op::Delete {
            cf: Cf::Messages,
            key: keys::message("ID1")
        }));
        assert!(b.ops().contains(&Op::Delete {
            cf: Cf::Envelopes,
            key: keys::message("ID1")
        }));
    }

    #[test]
    fn ids_and_domains_with_separators_are_refused() {
        assert!(matches!(
            Batch::enqueue(env("A\0B", &["a@b.c"]), vec![]),
            Err(SpoolError::Invalid(_))
        ));
        assert!(matches!(
            Batch::enqueue(env("", &["a@b.c"]), vec![]),
            Err(SpoolError::Invalid(_))
        ));
        assert!(matches!(
            Batch::enqueue(env("ID", &["a@b.c\0x"]), vec![]),
            Err(SpoolError::Invalid(_))
        ));
        assert!(matches!(
            Batch::enqueue(env("ID", &[]), vec![]),
            Err(SpoolError::Invalid(_))
        ));
    }
}
