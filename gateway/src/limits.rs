//! Rate limits: token buckets for sends (per connection and per user) and for login attempts
//! (per source address). A bucket holds at most `burst` tokens and gains `rate` per second; an
//! action takes one token, and without one it is refused at once with the time until the next
//! token (the `retry_after_ms` of `RATE_LIMITED`).
//!
//! The tables are bounded: a user's entry exists while the user has a connection on this node
//! (the connection task acquires it at login and releases it at the end), and the address table
//! holds at most `client.login_rate_max_addresses` entries.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

/// A rate and a burst; a rate of 0 means no limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_sec: f64,
    pub burst: u32,
}

impl Rate {
    pub fn new(per_sec: f64, burst: u32) -> Self {
        Rate { per_sec, burst }
    }

    pub fn is_unlimited(self) -> bool {
        self.per_sec <= 0.0
    }
}

/// One token bucket.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: Rate, now: Instant) -> Self {
        TokenBucket {
            tokens: f64::from(rate.burst),
            at: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_sec).min(f64::from(rate.burst));
        self.at = now;
    }

    /// How long until a token is there; `None` when one is there now.
    pub fn wait(&mut self, rate: Rate, now: Instant) -> Option<Duration> {
        if rate.is_unlimited() {
            return None;
        }
        self.refill(rate, now);
        (self.tokens < 1.0).then(|| Duration::from_secs_f64((1.0 - self.tokens) / rate.per_sec))
    }

    /// Takes a token, or says how long until one is there.
    pub fn take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        match self.wait(rate, now) {
            Some(wait) => Err(wait),
            None => {
                if !rate.is_unlimited() {
                    self.tokens -= 1.0;
                }
                Ok(())
            }
        }
    }

    /// Whether the bucket is full again (an idle entry, safe to forget).
    fn is_full(&mut self, rate: Rate, now: Instant) -> bool {
        self.refill(rate, now);
        self.tokens >= f64::from(rate.burst)
    }
}

/// Milliseconds to put in `retry_after_ms`, at least 1.
pub fn retry_after_ms(wait: Duration) -> u64 {
    (wait.as_millis() as u64).max(1)
}

/// The send bucket of each user with a connection on this node.
pub struct UserSendLimits {
    rate: Rate,
    users: DashMap<Arc<str>, UserEntry>,
}

struct UserEntry {
    bucket: TokenBucket,
    /// The user's connections on this node that acquired the entry.
    connections: usize,
}

impl UserSendLimits {
    pub fn new(rate: Rate) -> Self {
        UserSendLimits {
            rate,
            users: DashMap::new(),
        }
    }

    /// A connection of `user` starts: the user's entry exists until its last one ends.
    pub fn acquire(&self, user: &Arc<str>) {
        if self.rate.is_unlimited() {
            return;
        }
        self.users
            .entry(user.clone())
            .or_insert_with(|| UserEntry {
                bucket: TokenBucket::new(self.rate, Instant::now()),
                connections: 0,
            })
            .connections += 1;
    }

    /// A connection of `user` that called [`acquire`](Self::acquire) ends.
    pub fn release(&self, user: &str) {
        if self.rate.is_unlimited() {
            return;
        }
        if let Some(mut entry) = self.users.get_mut(user) {
            entry.connections = entry.connections.saturating_sub(1);
        }
        self.users.remove_if(user, |_, e| e.connections == 0);
    }

    /// How long until `user` may send; `None` when now.
    pub fn wait(&self, user: &str, now: Instant) -> Option<Duration> {
        let mut entry = self.users.get_mut(user)?;
        entry.bucket.wait(self.rate, now)
    }

    /// Takes a token of `user` (call after [`wait`](Self::wait) said yes).
    pub fn take(&self, user: &str, now: Instant) {
        if let Some(mut entry) = self.users.get_mut(user) {
            let _ = entry.bucket.take(self.rate, now);
        }
    }

    /// Users with an entry.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// Why a login attempt was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginRefusal {
    /// The address used its burst: retry after this long.
    RateLimited(Duration),
    /// The table is full of addresses that are not idle.
    TableFull,
}

/// The login bucket of each source address, at most `max` of them.
pub struct LoginLimits {
    rate: Rate,
    max: usize,
    addresses: DashMap<IpAddr, Mutex<TokenBucket>>,
    /// When idle entries were last swept (ms since `epoch`): at most once a second.
    swept_ms: AtomicU64,
    epoch: Instant,
}

impl LoginLimits {
    pub fn new(rate: Rate, max: usize) -> Self {
        LoginLimits {
            rate,
            max,
            addresses: DashMap::new(),
            swept_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Counts a login attempt from `ip`.
    pub fn attempt(&self, ip: IpAddr, now: Instant) -> Result<(), LoginRefusal> {
        if self.rate.is_unlimited() {
            return Ok(());
        }
        if let Some(bucket) = self.addresses.get(&ip) {
            let mut bucket = bucket.lock().unwrap_or_else(PoisonError::into_inner);
            return bucket
                .take(self.rate, now)
                .map_err(LoginRefusal::RateLimited);
        }
        if self.addresses.len() >= self.max && !self.sweep(now) {
            return Err(LoginRefusal::TableFull);
        }
        let mut bucket = TokenBucket::new(self.rate, now);
        let taken = bucket
            .take(self.rate, now)
            .map_err(LoginRefusal::RateLimited);
        self.addresses.entry(ip).or_insert(Mutex::new(bucket));
        taken
    }

    /// Forgets the addresses whose bucket is full again (nothing to remember about them), at
    /// most once a second; whether there is room now.
    fn sweep(&self, now: Instant) -> bool {
        let now_ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        let last = self.swept_ms.load(Ordering::Relaxed);
        if now_ms < last + 1_000
            || self
                .swept_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return self.addresses.len() < self.max;
        }
        self.addresses.retain(|_, bucket| {
            !bucket
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .is_full(self.rate, now)
        });
        self.addresses.len() < self.max
    }

    /// Addresses with an entry.
    pub fn len(&self) -> usize {
        self.addresses.len()
    }

    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_the_rate() {
        let rate = Rate::new(2.0, 3);
        let t = Instant::now();
        let mut b = TokenBucket::new(rate, t);
        for _ in 0..3 {
            assert!(b.take(rate, t).is_ok());
        }
        let wait = b.take(rate, t).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert!(b.take(rate, t + Duration::from_millis(499)).is_err());
        assert!(b.take(rate, t + Duration::from_millis(1_000)).is_ok());
        let unlimited = Rate::new(0.0, 0);
        assert!((0..100).all(|_| b.take(unlimited, t).is_ok()));
    }

    #[test]
    fn a_user_entry_lives_while_the_user_has_connections() {
        let limits = UserSendLimits::new(Rate::new(1.0, 1));
        let alice: Arc<str> = "alice".into();
        let t = Instant::now();
        limits.acquire(&alice);
        limits.acquire(&alice);
        assert!(limits.wait("alice", t).is_none());
        limits.take("alice", t);
        assert!(limits.wait("alice", t).is_some());
        limits.release("alice");
        assert_eq!(limits.len(), 1);
        limits.release("alice");
        assert!(limits.is_empty());
    }

    #[test]
    fn the_address_table_is_bounded() {
        let limits = LoginLimits::new(Rate::new(0.001, 1), 2);
        let t = limits.epoch + Duration::from_secs(10);
        let ip = |n: u8| IpAddr::from([10, 0, 0, n]);
        assert!(limits.attempt(ip(1), t).is_ok());
        assert!(matches!(
            limits.attempt(ip(1), t),
            Err(LoginRefusal::RateLimited(_))
        ));
        assert!(limits.attempt(ip(2), t).is_ok());
        assert_eq!(limits.attempt(ip(3), t), Err(LoginRefusal::TableFull));
        assert_eq!(limits.len(), 2);
        // Idle entries (full buckets) make room.
        let later = t + Duration::from_secs(10_000);
        assert!(limits.attempt(ip(3), later).is_ok());
        assert_eq!(limits.len(), 1);
    }
}

/// The node's sends taken and not yet answered, over all connections
/// (`client.max_unanswered_sends`): beyond the bound a send is refused at once, so that under
/// overload the node answers quickly and spends its time on the sends it took, instead of
/// queueing more than it can answer in time.
pub struct SendSlots {
    taken: Arc<AtomicUsize>,
    max: usize,
    gauge: metrics::Gauge,
}

/// One taken send; released when dropped (the send is answered, or its task ended).
pub struct SendSlot {
    taken: Arc<AtomicUsize>,
    gauge: metrics::Gauge,
}

impl SendSlots {
    pub fn new(max: usize) -> SendSlots {
        SendSlots {
            taken: Arc::new(AtomicUsize::new(0)),
            max,
            gauge: metrics::gauge!(crate::metrics::UNANSWERED_SENDS),
        }
    }

    /// A slot, or `None` when `max` are taken.
    pub fn try_take(&self) -> Option<SendSlot> {
        self.taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()?;
        self.gauge.increment(1.0);
        Some(SendSlot {
            taken: self.taken.clone(),
            gauge: self.gauge.clone(),
        })
    }

    pub fn taken(&self) -> usize {
        self.taken.load(Ordering::Acquire)
    }
}

impl Drop for SendSlot {
    fn drop(&mut self) {
        self.taken.fetch_sub(1, Ordering::AcqRel);
        self.gauge.decrement(1.0);
    }
}

#[cfg(test)]
mod send_slot_tests {
    use super::SendSlots;

    #[test]
    fn slots_are_bounded_and_come_back_when_dropped() {
        let slots = SendSlots::new(2);
        let a = slots.try_take().expect("first");
        let b = slots.try_take().expect("second");
        assert!(slots.try_take().is_none());
        drop(a);
        assert_eq!(slots.taken(), 1);
        let c = slots.try_take().expect("room again");
        assert!(slots.try_take().is_none());
        drop((b, c));
        assert_eq!(slots.taken(), 0);
    }
}
