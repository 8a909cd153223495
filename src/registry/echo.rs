//! Echoes: the change events this replica's own write-backs cause, recognised so that the
//! follower does not re-read a record it has just written.
//!
//! Both event sources ([`super::watch`]) report every write to a `tenant:` key, this
//! replica's too, and the follower re-reads each record they name. After a write-back the
//! engine already knows what the record holds (the write's fingerprint), so the event it
//! causes needs no read. A write-back is announced before it is sent ([`Echoes::expect`],
//! which returns an [`Expected`] guard) and resolved with its answer:
//! - an event for the record before the answer is held back; the answer then says whether
//!   it was the echo (written) or someone else's write (not written, or no answer), which is
//!   re-read ([`Echoes::take_rereads`]);
//! - written, with no event yet: the next event for the record within [`ECHO_WINDOW`] is
//!   the echo. The server sends events in the order of its writes, so a later write by the
//!   gateway comes as a second event, which is read.
//!
//! When an event source is lost or re-established, what was expected is forgotten (a full
//! read follows anyway). Only events are skipped, never a read that was asked for
//! otherwise: the full rescan still reads every record.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::keys::ProviderId;

/// How long after a written write-back its event is waited for.
pub const ECHO_WINDOW: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Echo {
    /// Sent, not answered: `held` events for the record came meanwhile.
    Pending { held: u32 },
    /// Written: the next event until `until` is its echo.
    Written { until: Instant },
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct Echoes {
    state: Mutex<State>,
    reread: Notify,
}

#[derive(Debug, Default)]
struct State {
    echoes: HashMap<ProviderId, Echo>,
    rereads: Vec<ProviderId>,
}

/// A write-back announced to [`Echoes`]: resolve it with [`Expected::written`]; dropped
/// unresolved, it counts as not written (what it held back is re-read).
#[must_use]
pub struct Expected<'a> {
    echoes: &'a Echoes,
    id: ProviderId,
    resolved: bool,
}

impl Echoes {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing here can be left half-updated by a panic: take the state as it is.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Announces a write-back of `id`'s record, before it is sent.
    pub fn expect(&self, id: &ProviderId) -> Expected<'_> {
        let mut st = self.lock();
        // A write-back left from before (its event never came) is replaced: its own events
        // were held back only while it was pending, and it is not pending any more.
        if let Some(Echo::Pending { held }) =
            st.echoes.insert(id.clone(), Echo::Pending { held: 0 })
        {
            if held > 0 {
                st.rereads.push(id.clone());
                self.reread.notify_one();
            }
        }
        Expected {
            echoes: self,
            id: id.clone(),
            resolved: false,
        }
    }

    /// An event names `id`'s record, at `now`: `true` if it is (or may be, until its
    /// write-back is answered) this replica's own write, which is not read.
    pub fn is_echo(&self, id: &ProviderId, now: Instant) -> bool {
        let mut st = self.lock();
        match st.echoes.get_mut(id) {
            Some(Echo::Pending { held }) => {
                *held = held.saturating_add(1);
                true
            }
            Some(Echo::Written { until }) => {
                let fresh = now <= *until;
                st.echoes.remove(id);
                fresh
            }
            None => false,
        }
    }

    /// Forgets what was expected (an event source lost or re-established: a full read
    /// follows). Pending write-backs stay pending, without held events.
    pub fn forget(&self) {
        let mut st = self.lock();
        st.echoes.retain(|_, e| matches!(e, Echo::Pending { .. }));
        for e in st.echoes.values_mut() {
            *e = Echo::Pending { held: 0 };
        }
    }

    /// Records whose held-back events turned out to be someone else's writes, to re-read.
    pub fn take_rereads(&self) -> Vec<ProviderId> {
        std::mem::take(&mut self.lock().rereads)
    }

    /// Resolves when [`Echoes::take_rereads`] has something.
    pub async fn rereads_wanted(&self) {
        loop {
            let notified = self.reread.notified();
            if !self.lock().rereads.is_empty() {
                return;
            }
            notified.await;
        }
    }

    /// How many write-backs are pending or waiting for their event (for tests).
    pub fn len(&self) -> usize {
        self.lock().echoes.len()
    }

    /// Whether nothing is expected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn resolve(&self, id: &ProviderId, written: bool, now: Instant) {
        let mut st = self.lock();
        let Some(Echo::Pending { held }) = st.echoes.get(id).copied() else {
            return;
        };
        // Written, the first held event was the echo; every other held event is a write by
        // someone else.
        let others = if written {
            held.saturating_sub(1)
        } else {
            held
        };
        if written && held == 0 {
            st.echoes.insert(
                id.clone(),
                Echo::Written {
                    until: now + ECHO_WINDOW,
                },
            );
        } else {
            st.echoes.remove(id);
        }
        if others > 0 {
            st.rereads.push(id.clone());
            drop(st);
            self.reread.notify_one();
        }
    }
}

impl Expected<'_> {
    /// The write-back's answer: `true` when it wrote the record.
    pub fn written(mut self, written: bool) {
        self.resolved = true;
        self.echoes.resolve(&self.id, written, Instant::now());
    }
}

impl Drop for Expected<'_> {
    fn drop(&mut self) {
        if !self.resolved {
            self.echoes.resolve(&self.id, false, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(p: &str) -> ProviderId {
        ProviderId::new("t1", p)
    }

    #[test]
    fn an_echo_after_the_answer_is_skipped_once_and_a_later_event_is_read() {
        let e = Echoes::default();
        let now = Instant::now();
        e.expect(&id("goto")).written(true);
        assert!(e.is_echo(&id("goto"), now), "the echo of the write-back");
        assert!(
            !e.is_echo(&id("goto"), now),
            "the next write is someone else's"
        );
        assert!(e.is_empty());
        assert!(e.take_rereads().is_empty());
    }

    #[test]
    fn an_echo_before_the_answer_is_held_then_dropped_when_written() {
        let e = Echoes::default();
        let now = Instant::now();
        let x = e.expect(&id("goto"));
        assert!(e.is_echo(&id("goto"), now));
        x.written(true);
        assert!(e.take_rereads().is_empty(), "it was the echo");
        assert!(!e.is_echo(&id("goto"), now), "nothing more is expected");
    }

    #[test]
    fn events_held_for_a_write_back_that_did_not_write_are_re_read() {
        for how in ["not written", "dropped"] {
            let e = Echoes::default();
            let now = Instant::now();
            let x = e.expect(&id("goto"));
            assert!(e.is_echo(&id("goto"), now));
            if how == "not written" {
                x.written(false);
            } else {
                drop(x);
            }
            assert_eq!(e.take_rereads(), vec![id("goto")], "{how}");
            assert!(e.is_empty(), "{how}");
        }
    }

    #[test]
    fn two_events_for_one_written_write_back_re_read_the_second() {
        let e = Echoes::default();
        let now = Instant::now();
        let x = e.expect(&id("goto"));
        assert!(e.is_echo(&id("goto"), now));
        assert!(e.is_echo(&id("goto"), now));
        x.written(true);
        assert_eq!(e.take_rereads(), vec![id("goto")]);
    }

    #[test]
    fn an_echo_that_never_came_expires() {
        let e = Echoes::default();
        e.expect(&id("goto")).written(true);
        let later = Instant::now() + ECHO_WINDOW + Duration::from_millis(1);
        assert!(!e.is_echo(&id("goto"), later), "past the window: read");
        assert!(e.is_empty());
    }

    #[test]
    fn forgetting_drops_what_was_expected_and_keeps_pending_write_backs() {
        let e = Echoes::default();
        let now = Instant::now();
        e.expect(&id("zoom")).written(true);
        let x = e.expect(&id("goto"));
        assert!(e.is_echo(&id("goto"), now));
        e.forget();
        assert!(!e.is_echo(&id("zoom"), now), "forgotten: read");
        x.written(false);
        assert!(
            e.take_rereads().is_empty(),
            "held events were forgotten with the source (a full read follows)"
        );
        assert!(!e.is_echo(&id("other"), now));
    }

    #[test]
    fn other_records_are_not_affected() {
        let e = Echoes::default();
        let now = Instant::now();
        let _x = e.expect(&id("goto"));
        assert!(!e.is_echo(&id("zoom"), now));
        assert!(!e.is_echo(&ProviderId::new("t2", "goto"), now));
    }
}
