//! The other instances as this one hears them: per instance, the last
//! message taken and the count of events it has accounted for, so that a
//! message tells whether it is new, repeated, or comes after a gap, and how
//! many events that gap held. Pure; the clock is passed in.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// An instance not heard from this long is forgotten: it stopped, or was
/// restarted under a new id.
const FORGET: Duration = Duration::from_secs(600);
/// An instance counts as a peer while heard from within this.
pub const RECENT: Duration = Duration::from_secs(60);
/// Most instances tracked at once; messages of any more are taken as they come.
const MAX_PEERS: usize = 4096;

/// What to do with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Take its events; `missed` events of this instance were lost before it.
    Take { missed: u64 },
    /// Already taken (or older than what was): leave it.
    Repeat,
}

struct Peer {
    seq: u64,
    /// Events of this instance accounted for: taken or reported missed.
    events: u64,
    heard: Instant,
}

#[derive(Default)]
pub struct Peers {
    peers: HashMap<String, Peer>,
}

impl Peers {
    /// Accounts for a message of `instance` numbered `seq` that holds
    /// `events` events after `events_before` earlier ones.
    pub fn observe(&mut self, instance: &str, seq: u64, events_before: u64, events: u64, now: Instant) -> Verdict {
        let end = events_before.saturating_add(events);
        let Some(peer) = self.peers.get_mut(instance) else {
            if self.peers.len() >= MAX_PEERS {
                self.forget(now);
            }
            if self.peers.len() < MAX_PEERS {
                self.peers.insert(instance.to_string(), Peer { seq, events: end, heard: now });
            }
            // Before its first message here there is nothing to miss: this
            // instance (or that one) just joined.
            return Verdict::Take { missed: 0 };
        };
        if seq <= peer.seq {
            return Verdict::Repeat;
        }
        let missed = events_before.saturating_sub(peer.events);
        peer.seq = seq;
        peer.events = peer.events.max(end);
        peer.heard = now;
        Verdict::Take { missed }
    }

    /// Instances heard from within [`RECENT`].
    pub fn recent(&self, now: Instant) -> usize {
        self.peers.values().filter(|p| now.saturating_duration_since(p.heard) < RECENT).count()
    }

    /// Drops instances not heard from within `FORGET`.
    pub fn forget(&mut self, now: Instant) {
        self.peers.retain(|_, p| now.saturating_duration_since(p.heard) < FORGET);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_counted_exactly_and_repeats_left() {
        let mut p = Peers::default();
        let t = Instant::now();
        assert_eq!(p.observe("a", 5, 100, 10, t), Verdict::Take { missed: 0 }, "joining mid-stream misses nothing");
        assert_eq!(p.observe("a", 6, 110, 5, t), Verdict::Take { missed: 0 });
        assert_eq!(p.observe("a", 6, 110, 5, t), Verdict::Repeat);
        assert_eq!(p.observe("a", 4, 90, 5, t), Verdict::Repeat);
        assert_eq!(p.observe("a", 9, 140, 0, t), Verdict::Take { missed: 25 }, "a heartbeat reveals the gap");
        assert_eq!(p.observe("a", 10, 140, 3, t), Verdict::Take { missed: 0 });
        assert_eq!(p.observe("b", 1, 0, 1, t), Verdict::Take { missed: 0 });
        assert_eq!(p.recent(t), 2);
        assert_eq!(p.recent(t + RECENT), 0);
        p.forget(t + FORGET);
        assert_eq!(p.observe("a", 11, 500, 1, t + FORGET), Verdict::Take { missed: 0 }, "forgotten: starts over");
    }
}
