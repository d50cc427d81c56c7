//! Delivery stops while the spool cannot record outcomes.
//!
//! A message whose delivery cannot be recorded is still "pending" in the spool; if it were
//! released it would be due again at once and go out again and again (a repeat storm).
//! Instead, the first failed record pauses every delivery: nothing new goes out, the
//! outcomes that could not be recorded are kept here (their entries stay claimed, so
//! nobody sends them again), and the queue runner retries them (or a probe commit) each
//! tick. The first commit that works records them and lifts the pause. Logged once when it
//! starts, once a minute while it lasts, and once when it ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::lock;
use super::settle::Outcome;
use crate::spool::QueueEntry;

/// How often a pause that goes on is logged again.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// A delivery whose outcome is not in the spool yet.
pub(super) struct Unrecorded {
    pub domain: String,
    pub id: String,
    pub entry: QueueEntry,
    pub message: crate::spool::Message,
    pub outcomes: Vec<Outcome>,
}

struct State {
    since: Instant,
    logged: Instant,
    error: String,
    unrecorded: Vec<Unrecorded>,
}

#[derive(Default)]
pub(super) struct Pause {
    paused: AtomicBool,
    state: Mutex<Option<State>>,
}

impl Pause {
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// A record failed with `error`; `unrecorded` is the delivery it was for, if any.
    pub fn enter(&self, error: &str, unrecorded: Option<Unrecorded>) {
        let mut state = lock(&self.state);
        let now = Instant::now();
        let s = state.get_or_insert_with(|| {
            error!(
                "the spool cannot record delivery outcomes ({error}): delivery paused until it can"
            );
            State {
                since: now,
                logged: now,
                error: error.to_string(),
                unrecorded: Vec::new(),
            }
        });
        s.error = error.to_string();
        s.unrecorded.extend(unrecorded);
        self.paused.store(true, Ordering::Release);
    }

    /// The outcomes waiting to be recorded (taken out; give back what still fails with
    /// [`Pause::enter`]). Logs, at most once a minute, that the pause goes on.
    pub fn take(&self) -> Vec<Unrecorded> {
        let mut state = lock(&self.state);
        let Some(s) = state.as_mut() else {
            return Vec::new();
        };
        if s.logged.elapsed() >= LOG_EVERY {
            s.logged = Instant::now();
            warn!(
                "delivery still paused after {}s: the spool cannot commit ({}); {} outcome(s) wait to be recorded",
                s.since.elapsed().as_secs(),
                s.error,
                s.unrecorded.len()
            );
        }
        std::mem::take(&mut s.unrecorded)
    }

    /// A commit worked and every waiting outcome is recorded (`recorded` of them): delivery
    /// goes on. Does nothing if another record failed meanwhile.
    pub fn leave(&self, recorded: usize) {
        let mut state = lock(&self.state);
        if state.as_ref().is_some_and(|s| !s.unrecorded.is_empty()) {
            return;
        }
        if let Some(s) = state.take() {
            info!(
                "the spool records again after {}s: {recorded} delivery outcome(s) recorded, delivery resumes",
                s.since.elapsed().as_secs()
            );
        }
        self.paused.store(false, Ordering::Release);
    }
}
