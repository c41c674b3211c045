//! Positions taken and not yet settled, and the question a connection asks before it skips a
//! missing position: "may anyone still store it?"
//!
//! A message takes its position before its row is committed, and is pushed before the commit,
//! so a position can be missing from the database for as long as a write takes: a slow disk, a
//! lock wait, a backlog or an outage of the database. Such a position must never be skipped.
//! It may be skipped only when it is certain that it will never be stored: its write failed, or
//! the node that took it is gone. Every node therefore keeps a [`Reservation`] for each position
//! it has asked for (from before the request to Redis until its write has succeeded or failed),
//! and a connection that finds a position missing, after the database said it does not have it,
//! asks every live node (the node registry says which) how many of the positions are still held
//! ([`Cluster::holders`]). Only a complete answer of zero, followed by a read of the database
//! that still does not find the position, lets the connection skip it.
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
    /// Checks of missing positions by outcome: `held` (a node still holds one),
    /// `none` (no node does: the positions are skipped if the database still lacks them),
    /// `unknown` (a node did not answer) (counter).
    pub const HOLE_CHECKS: &str = "imgate_delivery_hole_checks_total";
    /// Positions this node has taken and not yet settled (written or failed) (gauge).
    pub const RESERVATIONS: &str = "imgate_stream_reservations";
}

/// This node's positions that are taken (or being taken) and not settled, per user.
pub(crate) struct Reservations {
    users: DashMap<Arc<str>, Vec<(u64, Option<u64>)>>,
    next_token: AtomicU64,
    /// [`metric::RESERVATIONS`], resolved once: it moves twice per message.
    gauge: metrics::Gauge,
}

impl Default for Reservations {
    fn default() -> Self {
        Reservations {
            users: DashMap::new(),
            next_token: AtomicU64::new(0),
            gauge: metrics::gauge!(metric::RESERVATIONS),
        }
    }
}

impl Reservations {
    /// How many of `user`'s positions in `from..=to` this node holds; a reservation whose
    /// position is not known yet counts, since it may be any of them.
    pub(crate) fn count(&self, user: &str, from: u64, to: u64) -> u64 {
        self.users.get(user).map_or(0, |held| {
            held.iter()
                .filter(|(_, seq)| seq.is_none_or(|s| (from..=to).contains(&s)))
                .count() as u64
        })
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
    }

    fn remove(&self, user: &str, token: u64) {
        if let Some(mut held) = self.users.get_mut(user) {
            held.retain(|(t, _)| *t != token);
        }
        self.users.remove_if(user, |_, held| held.is_empty());
        self.gauge.decrement(1.0);
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

    /// How many of `user`'s positions `from..=to` are held, on this node and every other live
    /// node: `Some(0)` when it is certain that no node may still store one of them, `None` when
    /// a live node did not answer (within `cluster.request_timeout_ms`) or the node list could
    /// not be read.
    pub async fn holders(&self, user: &str, from: u64, to: u64) -> Option<u64> {
        let inner = &self.inner;
        let local = inner.reservations.count(user, from, to);
        let answer = match (&inner.redis, local) {
            (_, n) if n > 0 => Some(n),
            (None, _) => Some(0),
            (Some(redis), _) => inner.holds_elsewhere(redis, user, from, to).await,
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

    #[test]
    fn a_reservation_counts_until_it_is_dropped_and_unknown_positions_count_everywhere() {
        let table = Arc::new(Reservations::default());
        let make = |user: &str| Reservation {
            table: table.clone(),
            user: Arc::from(user),
            token: table.add(user),
        };
        let a = make("u");
        assert_eq!(
            table.count("u", 5, 5),
            1,
            "not taken yet: may be any position"
        );
        a.taken(7);
        assert_eq!(table.count("u", 5, 6), 0);
        assert_eq!(table.count("u", 7, 9), 1);
        let b = make("u");
        b.taken(8);
        assert_eq!(table.count("u", 1, 100), 2);
        assert_eq!(table.count("v", 1, 100), 0);
        drop(a);
        assert_eq!(table.count("u", 7, 7), 0);
        assert_eq!(table.count("u", 8, 8), 1);
        drop(b);
        assert!(
            table.users.is_empty(),
            "nothing kept for a user with no reservation"
        );
    }
}
