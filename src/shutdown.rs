//! One shutdown value, passed down to every thread that acts on it.
//!
//! SIGTERM/SIGINT begins it once ([`Shutdown::begin`]); from then on shards
//! stop accepting and close idle connections ([`Shutdown::signal`] is the
//! future they await, [`Shutdown::has_begun`] what a connection checks
//! between requests), writers stop retrying `ack = "queue"` batches at
//! [`Shutdown::deadline`], the spool drainer stops dispatching at
//! [`Shutdown::drain_deadline`] so that what it sent can still commit, and
//! `/health` says "shutting_down". Before this value existed the same state
//! lived in five places (per-shard trigger oneshots, a metrics flag, a
//! shard-local flag and two deadline cells polled by the drainer).

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use futures_util::FutureExt as _;
use futures_util::future::Shared;

/// The future a shard awaits: it resolves when shutdown begins.
pub type ShutdownSignal = Shared<oneshot::Receiver<()>>;

/// Cheap to clone; every clone is the same shutdown.
#[derive(Clone)]
pub struct Shutdown {
    inner: Arc<Inner>,
}

struct Inner {
    /// When it began, and the time allowed from then.
    begun: OnceLock<(Instant, Duration)>,
    trigger: parking_lot::Mutex<Option<oneshot::Sender<()>>>,
    signal: ShutdownSignal,
    /// Wakes the threads in [`Shutdown::pause`] when it begins.
    woken: parking_lot::Condvar,
}

/// The drainer stops dispatching at this share of the shutdown time.
const DRAIN_SHARE: f64 = 0.8;

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Shutdown {
        let (tx, rx) = oneshot::channel();
        Shutdown {
            inner: Arc::new(Inner {
                begun: OnceLock::new(),
                trigger: parking_lot::Mutex::new(Some(tx)),
                signal: rx.shared(),
                woken: parking_lot::Condvar::new(),
            }),
        }
    }

    /// Begins the shutdown, with `timeout` from now to finish; later calls
    /// change nothing. Returns when it began.
    pub fn begin(&self, timeout: Duration) -> Instant {
        let (at, _) = *self.inner.begun.get_or_init(|| (Instant::now(), timeout));
        let mut trigger = self.inner.trigger.lock();
        if let Some(tx) = trigger.take() {
            let _ = tx.send(());
        }
        self.inner.woken.notify_all();
        at
    }

    pub fn has_begun(&self) -> bool {
        self.inner.begun.get().is_some()
    }

    /// When everything must be done (begun + timeout).
    pub fn deadline(&self) -> Option<Instant> {
        self.inner.begun.get().map(|(at, timeout)| *at + *timeout)
    }

    /// When the spool drainer stops dispatching (begun + 0.8 × timeout).
    pub fn drain_deadline(&self) -> Option<Instant> {
        self.inner.begun.get().map(|(at, timeout)| *at + timeout.mul_f64(DRAIN_SHARE))
    }

    /// A blocking thread's pause (a retry backoff): `d` at most, less when
    /// shutdown begins meanwhile, and never past the drain deadline once it
    /// has begun, so that a thread in a backoff sees the shutdown at once
    /// instead of after its sleep.
    pub fn pause(&self, d: Duration) {
        let now = Instant::now();
        let mut until = now + d;
        let mut trigger = self.inner.trigger.lock();
        if let Some(drain) = self.drain_deadline() {
            until = until.min(drain);
        } else {
            let _ = self.inner.woken.wait_until(&mut trigger, until);
            return;
        }
        drop(trigger);
        if let Some(left) = until.checked_duration_since(now) {
            std::thread::sleep(left);
        }
    }

    /// Resolves when shutdown begins (for shard tasks).
    pub fn signal(&self) -> ShutdownSignal {
        self.inner.signal.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begins_once_and_wakes_every_waiter() {
        let s = Shutdown::new();
        let waiter = s.clone().signal();
        assert!(!s.has_begun() && s.deadline().is_none() && waiter.peek().is_none());
        let at = s.begin(Duration::from_secs(10));
        assert_eq!(s.begin(Duration::from_secs(99)), at, "a second begin changes nothing");
        assert_eq!(s.deadline(), Some(at + Duration::from_secs(10)));
        assert_eq!(s.drain_deadline(), Some(at + Duration::from_secs(8)));
        assert!(futures_util::FutureExt::now_or_never(waiter).is_some(), "waiters wake");
        assert!(s.signal().peek().is_some(), "and later ones see it at once");
    }

    #[test]
    fn a_pause_ends_when_shutdown_begins() {
        let s = Shutdown::new();
        let paused = {
            let s = s.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                s.pause(Duration::from_secs(60));
                t.elapsed()
            })
        };
        // begin() takes the lock the pause waits under, so it cannot fire
        // between the pause's check and its wait.
        while !paused.is_finished() {
            s.begin(Duration::ZERO);
            std::thread::yield_now();
        }
        assert!(paused.join().unwrap() < Duration::from_secs(30));
        let t = Instant::now();
        s.pause(Duration::from_secs(60));
        assert!(t.elapsed() < Duration::from_secs(1), "past the drain deadline a pause is none");
    }
}
