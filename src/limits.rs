//! Abuse limits that span shards: connections per client IP, and request
//! rates per client IP and per token (answered 429 with `Retry-After`).
//!
//! SO_REUSEPORT spreads one client's connections over every shard, so these
//! counts cannot be shard-local. The per-IP table is touched only when a
//! connection opens or closes (a striped lock, never on the request path);
//! each connection keeps an `Arc` of its IP's entry, so a request's rate
//! check is one lock-free compare-and-swap on that entry ([`Rate`]). A
//! token's rate lives in its [`crate::auth::Grant`] the same way.
//!
//! Rates use GCRA (the generic cell rate algorithm): one atomic "theoretical
//! arrival time" per client, a steady `requests_per_s` and room for `burst`
//! requests at once. An IP's entry outlives its last connection while its
//! rate is still spent, so reconnecting does not refill it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

pub use crate::config::LimitsConfig;

/// A GCRA limiter's state: the theoretical arrival time of the next
/// request, in nanoseconds since the [`Limits`] epoch.
#[derive(Debug, Default)]
pub struct Rate {
    tat: AtomicU64,
}

impl Rate {
    /// Takes one request at `now` under `per_s` and `burst`, or says how long
    /// until one would be allowed. `per_s == 0` allows everything.
    pub fn take(&self, now: u64, per_s: u32, burst: u32) -> Result<(), Duration> {
        if per_s == 0 {
            return Ok(());
        }
        let interval = 1_000_000_000 / u64::from(per_s);
        let room = interval * u64::from(burst.max(1));
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now) + interval;
            if next - now > room {
                return Err(Duration::from_nanos(next - now - room));
            }
            match self.tat.compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(seen) => tat = seen,
            }
        }
    }

    /// Whether the full burst is available again at `now`.
    fn is_rested(&self, now: u64) -> bool {
        self.tat.load(Ordering::Relaxed) <= now
    }
}

/// One client IP's shared state.
#[derive(Debug, Default)]
struct IpState {
    connections: AtomicUsize,
    rate: Rate,
}

/// Stripes of the per-IP table; a power of two.
const STRIPES: usize = 64;
/// A stripe with more entries than this drops the ones with no connection
/// and a rested rate when a connection closes.
const SWEEP_ABOVE: usize = 256;

/// One stripe of the per-IP table.
type Stripe = Mutex<HashMap<IpAddr, Arc<IpState>>>;

/// The process-wide table of client IPs.
pub struct Limits {
    epoch: Instant,
    stripes: Box<[Stripe]>,
}

/// Why a connection is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooManyConnections;

impl Limits {
    pub fn new() -> Arc<Limits> {
        Arc::new(Limits { epoch: Instant::now(), stripes: (0..STRIPES).map(|_| Mutex::default()).collect() })
    }

    /// Nanoseconds since the epoch, the clock of every [`Rate`].
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn stripe(&self, ip: &IpAddr) -> &Mutex<HashMap<IpAddr, Arc<IpState>>> {
        use std::hash::BuildHasher;
        let hash = foldhash::fast::FixedState::with_seed(0x1e57d).hash_one(ip);
        &self.stripes[hash as usize & (STRIPES - 1)]
    }

    /// Registers one more connection from `ip`, within `max_per_ip` (0 = no
    /// limit). Called once per accepted connection.
    pub fn connect(self: &Arc<Self>, ip: IpAddr, max_per_ip: usize) -> Result<IpPass, TooManyConnections> {
        let mut stripe = self.stripe(&ip).lock();
        let state = stripe.entry(ip).or_default().clone();
        if max_per_ip > 0 && state.connections.load(Ordering::Relaxed) >= max_per_ip {
            return Err(TooManyConnections);
        }
        state.connections.fetch_add(1, Ordering::Relaxed);
        drop(stripe);
        Ok(IpPass { limits: self.clone(), ip, state })
    }

    /// Client IPs known now (with a connection, or a rate still spent).
    pub fn tracked_ips(&self) -> usize {
        self.stripes.iter().map(|s| s.lock().len()).sum()
    }
}

/// Held by a connection for its whole life: its place in the per-IP count,
/// and its IP's rate.
pub struct IpPass {
    limits: Arc<Limits>,
    ip: IpAddr,
    state: Arc<IpState>,
}

impl IpPass {
    /// Takes one request from this IP's rate (see [`Rate::take`]).
    pub fn take(&self, per_s: u32, burst: u32) -> Result<(), Duration> {
        self.state.rate.take(self.limits.now(), per_s, burst)
    }

    /// Takes one request from `rate` (a token's) on the same clock.
    pub fn take_from(&self, rate: &Rate, per_s: u32, burst: u32) -> Result<(), Duration> {
        rate.take(self.limits.now(), per_s, burst)
    }

    pub fn ip(&self) -> IpAddr {
        self.ip
    }
}

impl Drop for IpPass {
    fn drop(&mut self) {
        let now = self.limits.now();
        let mut stripe = self.limits.stripe(&self.ip).lock();
        let left = self.state.connections.fetch_sub(1, Ordering::Relaxed) - 1;
        if left == 0 && self.state.rate.is_rested(now) {
            stripe.remove(&self.ip);
        }
        if stripe.len() > SWEEP_ABOVE {
            stripe.retain(|_, s| s.connections.load(Ordering::Relaxed) > 0 || !s.rate.is_rested(now));
        }
    }
}

/// `Retry-After` seconds for a wait: at least 1, rounded up.
pub fn retry_after_secs(wait: Duration) -> u32 {
    (wait.as_millis().div_ceil(1000) as u32).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn rate_allows_a_burst_then_the_steady_rate() {
        let r = Rate::default();
        let t0 = 10 * S;
        for _ in 0..5 {
            r.take(t0, 5, 5).unwrap();
        }
        let wait = r.take(t0, 5, 5).unwrap_err();
        assert_eq!(wait, Duration::from_millis(200));
        r.take(t0 + S / 5, 5, 5).unwrap();
        assert!(r.take(t0 + S / 5, 5, 5).is_err());
        // After a rest the whole burst is back.
        for _ in 0..5 {
            r.take(t0 + 3 * S, 5, 5).unwrap();
        }
        assert!(r.take(0, 0, 0).is_ok(), "0 = no limit");
    }

    #[test]
    fn connections_per_ip_are_counted_and_freed() {
        let limits = Limits::new();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let a = limits.connect(ip, 2).unwrap();
        let b = limits.connect(ip, 2).unwrap();
        assert_eq!(limits.connect(ip, 2).err(), Some(TooManyConnections));
        assert!(limits.connect("192.0.2.2".parse().unwrap(), 2).is_ok());
        drop(a);
        let c = limits.connect(ip, 2).unwrap();
        drop((b, c));
        assert_eq!(limits.tracked_ips(), 0, "entries go with their last connection");
    }

    #[test]
    fn a_spent_rate_survives_reconnecting() {
        let limits = Limits::new();
        let ip: IpAddr = "192.0.2.3".parse().unwrap();
        let pass = limits.connect(ip, 0).unwrap();
        pass.take(1, 1).unwrap();
        drop(pass);
        let pass = limits.connect(ip, 0).unwrap();
        assert!(pass.take(1, 1).is_err());
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
