//! The receiving side of the stream: which pushes reach the application (once, in order) and
//! what to acknowledge.

use std::collections::{HashSet, VecDeque};

use super::ACK_EVERY;
use crate::protocol::MessageId;

/// Remembers recently delivered message ids to drop duplicates.
pub(super) struct Seen<K> {
    pub(super) set: HashSet<K>,
    pub(super) order: VecDeque<K>,
    pub(super) cap: usize,
}

pub(super) type SeenIds = Seen<MessageId>;

impl<K: std::hash::Hash + Eq + Clone> Seen<K> {
    pub(super) fn new(cap: usize) -> Self {
        Seen {
            set: HashSet::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    pub(super) fn contains<Q>(&self, key: &Q) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.set.contains(key)
    }

    /// `true` the first time `id` is seen.
    pub(super) fn first_time(&mut self, id: K) -> bool {
        if !self.set.insert(id.clone()) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

/// The receiving side of the stream: decides which pushes reach the application and what to
/// acknowledge. Survives reconnects; [`Inbox::connected`] starts each connection.
pub(super) struct Inbox {
    /// The highest stream position handed to the application (or skipped as the server said).
    pub(super) last_seq: u64,
    /// Something to acknowledge on this connection: a new position, or a duplicate.
    pub(super) ack_pending: bool,
    /// Stream messages handed over since the last acknowledgement.
    pub(super) since_ack: u32,
    /// Broadcasts already handed over.
    pub(super) seen: SeenIds,
    /// (sender, client message id) of the stream messages handed over most recently: a message
    /// resent after its node crashed before storing it comes again under another id and
    /// position, and is not handed over twice.
    pub(super) sent: Seen<(String, String)>,
}

impl Inbox {
    pub(super) fn new(last_seq: u64, seen_cap: usize) -> Self {
        Inbox {
            last_seq,
            ack_pending: false,
            since_ack: 0,
            seen: SeenIds::new(seen_cap),
            sent: Seen::new(seen_cap),
        }
    }

    /// A new connection was accepted at `cursor`: the server counts everything up to it, and up to
    /// the `last_seq` the client presented, as received, so nothing is left to acknowledge.
    pub(super) fn connected(&mut self, cursor: u64) {
        self.last_seq = self.last_seq.max(cursor);
        self.ack_pending = false;
        self.since_ack = 0;
    }

    /// Whether a push is new to the application. A stream duplicate is to be acknowledged again
    /// (the server resent it because it missed the ack); a broadcast duplicate is just dropped.
    /// A stream message at a new position whose (sender, client message id) `sent_as` was
    /// handed over already is a resent copy (its first copy was pushed and never stored): its
    /// position is taken and acknowledged, and it is not handed over again.
    pub(super) fn is_new(
        &mut self,
        id: MessageId,
        seq: Option<u64>,
        sent_as: Option<(&str, &str)>,
    ) -> bool {
        match seq {
            Some(seq) if seq <= self.last_seq => {
                self.ack_pending |= self.last_seq > 0;
                false
            }
            Some(seq) => match sent_as {
                Some((from, cmid)) if self.sent.contains(&(from.to_owned(), cmid.to_owned())) => {
                    self.last_seq = seq;
                    self.ack_pending = true;
                    false
                }
                _ => true,
            },
            None => !self.seen.contains(&id),
        }
    }

    /// A push that [`Inbox::is_new`] accepted was handed to the application.
    pub(super) fn delivered(
        &mut self,
        id: MessageId,
        seq: Option<u64>,
        sent_as: Option<(&str, &str)>,
    ) {
        match seq {
            Some(seq) => {
                self.last_seq = self.last_seq.max(seq);
                self.ack_pending = true;
                self.since_ack += 1;
                if let Some((from, cmid)) = sent_as {
                    self.sent.first_time((from.to_owned(), cmid.to_owned()));
                }
            }
            None => {
                self.seen.first_time(id);
            }
        }
    }

    /// Positions up to `to_seq` will never come; the server has already moved past them.
    pub(super) fn expired(&mut self, to_seq: u64) {
        self.last_seq = self.last_seq.max(to_seq);
    }

    /// Whether an acknowledgement is waiting to go out.
    pub(super) fn ack_due(&self) -> bool {
        self.ack_pending
    }

    /// Whether enough messages were handed over to acknowledge without waiting for a pause.
    pub(super) fn ack_now(&self) -> bool {
        self.ack_pending && self.since_ack >= ACK_EVERY
    }

    /// The position to acknowledge (cumulatively), if any; counts it as sent.
    pub(super) fn take_ack(&mut self) -> Option<u64> {
        if !self.ack_pending {
            return None;
        }
        self.ack_pending = false;
        self.since_ack = 0;
        Some(self.last_seq)
    }
}
