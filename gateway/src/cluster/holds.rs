//! Positions taken and not yet settled, and the question a connection asks before it skips a
//! missing position: "may anyone still store it?"
//!
//! A message takes its position before its row is committed, and is pushed before the commit,
//! so a position can be missing from the database for as long as a write takes: a slow disk, a
//! lock wait, a backlog or an outage of the database. Such a position must never be skipped.
//! It may be skipped only when it is certain that it will never be stored: its write failed, or
//! the node that took it is gone. Every node therefore keeps a [`Reservation`] for each position
//! it has asked for (from before the request to Redis until its write has succeeded or failed),
//! and a connection that finds positions missing, after the database said it does not have them,
//! asks every live node (the node registry says which) for the lowest of them it still holds
//! ([`Cluster::lowest_held`]). A node answers once its reservations of that user made before the
//! question know their positions; those made later can only get later positions than the ones
//! asked about. Only the positions below every answer, which a read of the database made after
//! the answers still does not find, are skipped; the rest are waited for.
//!
//! A node that does not answer (its bus is down, it is busy, it just crashed) makes the answer
//! incomplete: the connection waits and asks again. A crashed node stops being asked once its
//! registration expires (`cluster.node_ttl_ms`): what it held is never stored.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;

use super::Cluster;

/// Metric names of hole checks.
pub mod metric {
    /// Checks of missing positions by outcome: `held` (a node still holds one: those below it
    /// may be skipped), `none` (no node does: the positions are skipped if the database still
    /// lacks them), `unknown` (a node did not answer) (counter).
    pub const HOLE_CHECKS: &str = "imgate_delivery_hole_checks_total";
    /// Positions this node has taken and not yet settled (written or failed) (gauge).
    pub const RESERVATIONS: &str = "imgate_stream_reservations";
}

/// This node's positions that are taken (or being taken) and not settled, per user.
pub(crate) struct Reservations {
    users: DashMap<Arc<str>, Vec<(u64, Option<u64>)>>,
    next_token: AtomicU64,
    /// Woken whenever a reservation gets its position or is settled.
    changed: tokio::sync::Notify,
    /// [`metric::RESERVATIONS`], resolved once: it moves twice per message.
    gauge: metrics::Gauge,
}

impl Default for Reservations {
    fn default() -> Self {
        Reservations {
            users: DashMap::new(),
            next_token: AtomicU64::new(0),
            changed: tokio::sync::Notify::new(),
            gauge: metrics::gauge!(metric::RESERVATIONS),
        }
    }
}

impl Reservations {
    /// The lowest of `user`'s positions in `from..=to` that this node holds, 0 when none. First
    /// waits until every reservation of `user` made before the question has its position (or
    /// is settled). Those made after it cannot get a
    /// position in `from..=to`: whoever asks has seen a later position of the stream, so it
    /// was handed out before they asked Redis for theirs. (Counting them would answer "held"
    /// nearly always for a busy user, whose next position is always being asked for.)
    pub(crate) async fn lowest_when_known(&self, user: &str, from: u64, to: u64) -> u64 {
        let asked = self.next_token.load(Ordering::Acquire);
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let (lowest, unknown) = self.users.get(user).map_or((0, 0), |held| {
                held.iter()
                    .fold((0, 0), |(low, u), &(token, seq)| match seq {
                        Some(s) if (from..=to).contains(&s) => (lowest_of(low, s), u),
                        None if token < asked => (low, u + 1),
                        _ => (low, u),
                    })
            });
            if unknown == 0 {
                return lowest;
            }
            changed.await;
        }
    }

    fn add(&self, user: &str) -> u64 {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        match self.users.get_mut(user) {
            Some(mut held) => held.push((token, None)),
            None => {
                self.users
                    .entry(Arc::from(user))
                    .or_default()
                    .push((token, None));
            }
        }
        self.gauge.increment(1.0);
        token
    }

    fn set(&self, user: &str, token: u64, seq: u64) {
        if let Some(mut held) = self.users.get_mut(user) {
            if let Some(entry) = held.iter_mut().find(|(t, _)| *t == token) {
                entry.1 = Some(seq);
            }
        }
        self.changed.notify_waiters();
    }

    fn remove(&self, user: &str, token: u64) {
        if let Some(mut held) = self.users.get_mut(user) {
            held.retain(|(t, _)| *t != token);
        }
        self.users.remove_if(user, |_, held| held.is_empty());
        self.gauge.decrement(1.0);
        self.changed.notify_waiters();
    }
}

/// The lower of two positions where 0 means none.
pub(crate) fn lowest_of(a: u64, b: u64) -> u64 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        (a, b) => a.min(b),
    }
}

/// A position this node takes for a message: held from before it is asked for until the
/// message's write has succeeded or failed (the guard is dropped).
pub struct Reservation {
    table: Arc<Reservations>,
    user: Arc<str>,
    token: u64,
}

impl Reservation {
    /// Records the position the reservation got.
    pub fn taken(&self, seq: u64) {
        self.table.set(&self.user, self.token, seq);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.table.remove(&self.user, self.token);
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Holds a position of `user`'s stream for a message, before it is asked for.
    pub fn reserve(&self, user: &str) -> Reservation {
        let table = self.inner.reservations.clone();
        let token = table.add(user);
        Reservation {
            table,
            user: Arc::from(user),
            token,
        }
    }

    /// The lowest of `user`'s positions `from..=to` that this node or any other live node holds:
    /// `Some(0)` when it is certain that no node may still store any of them (so a position
    /// below the answer that the database does not have will never be stored), `None` when a
    /// live node did not answer (within `cluster.request_timeout_ms`) or the node list could not
    /// be read.
    pub async fn lowest_held(&self, user: &str, from: u64, to: u64) -> Option<u64> {
        let inner = &self.inner;
        let local = tokio::time::timeout(
            inner.request_timeout,
            inner.reservations.lowest_when_known(user, from, to),
        )
        .await
        .ok();
        let answer = match (&inner.redis, local) {
            (_, None) => None,
            (None, local) => local,
            (Some(redis), Some(local)) => inner
                .holds_elsewhere(redis, user, from, to)
                .await
                .map(|remote| lowest_of(local, remote)),
        };
        let outcome = match answer {
            Some(0) => "none",
            Some(_) => "held",
            None => "unknown",
        };
        metrics::counter!(metric::HOLE_CHECKS, "outcome" => outcome).increment(1);
        answer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reservation_counts_until_it_is_settled_and_questions_wait_for_earlier_ones() {
        let table = Arc::new(Reservations::default());
        let make = |user: &str| Reservation {
            table: table.clone(),
            user: Arc::from(user),
            token: table.add(user),
        };
        let a = make("u");
        a.taken(7);
        assert_eq!(table.lowest_when_known("u", 5, 6).await, 0);
        assert_eq!(table.lowest_when_known("u", 7, 9).await, 7);
        assert_eq!(table.lowest_when_known("v", 1, 100).await, 0);
        // A reservation still asking for its position, made before the question: the answer
        // waits for its position.
        let b = make("u");
        let question = tokio::spawn({
            let table = table.clone();
            async move { table.lowest_when_known("u", 1, 10).await }
        });
        tokio::task::yield_now().await;
        assert!(!question.is_finished(), "waits for b's position");
        // One made after the question does not hold it up.
        let c = make("u");
        b.taken(4);
        assert_eq!(question.await.unwrap(), 4, "the lower of 7 and 4");
        c.taken(11);
        drop((a, b));
        assert_eq!(table.lowest_when_known("u", 1, 10).await, 0);
        assert_eq!(table.lowest_when_known("u", 1, 11).await, 11);
        drop(c);
        assert!(
            table.users.is_empty(),
            "nothing kept for a user with no reservation"
        );
    }
}
