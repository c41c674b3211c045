//! One device's stream on one connection: what to push next, in order, and what to push again.
//!
//! Every message to a user has a position (`seq`) in the user's stream. A connection keeps the
//! next position it owes its device (`next`, starting after the device's cursor) and pushes
//! positions strictly in order, whatever order they arrive in:
//!
//! - **Live** pushes (from this node or over the bus) and **replayed** rows (read from the
//!   database) meet in one ordered buffer (`held`), keyed by position. Whatever is contiguous
//!   from `next` is pushed; so the seam between replay and live has neither gaps nor reordering,
//!   and a live push that overtook an older one waits for it.
//! - **Gaps**: a missing position (its push went elsewhere or has not arrived, or this node
//!   missed it while the device was connecting) is looked up in the database after
//!   `gap_timeout`, and again every `gap_timeout` while it is missing. A position is skipped
//!   only when it is certain that it will never be stored: the database does not have it, and
//!   then no live node holds it (its write failed, or the node that took it is gone; see
//!   `cluster/holds.rs`). Its sender got no receipt. Time alone never skips a position: a
//!   write that takes minutes is waited for.
//! - **Flow control**: at most `window` pushes await acknowledgement; the rest wait in `held`
//!   (bounded: beyond it they are dropped and read back from the database later).
//! - **Memory**: the payloads held and awaiting acknowledgement together stay within
//!   `max_bytes` (`client.max_queued_bytes`; at least one push is always allowed, whatever its
//!   size). A push beyond it is dropped from memory, as one the connection's outbox had no room
//!   for ([`Outbound::is_evicted`]); it is stored, and read back once acknowledgements make room.
//! - **Retransmission**: a push not acknowledged within `ack_timeout` is sent again, at most
//!   `max_retransmits` times; then the connection is closed ([`AckTimeout`]).
//! - **Retention**: replayed rows older than the retention are not pushed; the device is told
//!   with one `expired` frame per run of them.
//!
//! The state machine does no I/O: the connection task feeds it (`offer`, `fill`, `ack`, the
//! timer) and writes what [`DeviceStream::pump`] returns. An idle connection's stream holds no
//! allocation.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use imgate_shared::protocol::{encode_push, PushFields};
use imgate_shared::{MessageId, ServerFrame};
use serde_json::value::RawValue;
use tokio::time::Instant;

use crate::config::DeliverySettings;
use crate::registry::{Outbound, QueuedBytes};
use crate::store::StoredMessage;

/// Metric names of reliable delivery.
pub mod metric {
    /// Pushes sent from the database (catch-up and gap filling) (counter).
    pub const REPLAYED: &str = "imgate_delivery_replayed_total";
    /// Pushes sent again because they were not acknowledged in time (counter).
    pub const RETRANSMITS: &str = "imgate_delivery_retransmits_total";
    /// Stream positions skipped because their message was never stored (counter).
    pub const HOLES: &str = "imgate_delivery_holes_skipped_total";
    /// Stream positions reported `expired` (older than the retention) (counter).
    pub const EXPIRED: &str = "imgate_delivery_expired_total";
    /// Sessions by outcome: created, resumed, unknown, wrong_device (counter).
    pub const SESSIONS: &str = "imgate_sessions_total";
}

/// Every delivery metric with its kind, for the metrics catalog.
pub const CATALOG: &[(&str, &str)] = &[
    (metric::REPLAYED, "counter"),
    (metric::RETRANSMITS, "counter"),
    (metric::HOLES, "counter"),
    (crate::cluster::holds::metric::HOLE_CHECKS, "counter"),
    (crate::cluster::holds::metric::RESERVATIONS, "gauge"),
    (metric::EXPIRED, "counter"),
    (metric::SESSIONS, "counter"),
];

/// Describes the delivery metrics to the installed recorder.
pub fn describe_metrics() {
    use metrics::describe_counter;
    describe_counter!(
        metric::REPLAYED,
        "Pushes sent from the database: catch-up after login or resume, and gap filling."
    );
    describe_counter!(
        metric::RETRANSMITS,
        "Pushes sent again because they were not acknowledged within delivery.ack_timeout_ms."
    );
    describe_counter!(
        metric::HOLES,
        "Stream positions skipped because their message will never be stored: not in the database, and held by no live node (its write failed, or its node is gone)."
    );
    describe_counter!(
        crate::cluster::holds::metric::HOLE_CHECKS,
        "Checks of missing stream positions the database did not have, by outcome: held (a node still holds one for writing), none (no node does), unknown (a node did not answer)."
    );
    metrics::describe_gauge!(
        crate::cluster::holds::metric::RESERVATIONS,
        "Stream positions this node has taken for messages whose write has not yet succeeded or failed."
    );
    describe_counter!(
        metric::EXPIRED,
        "Stream positions reported to devices as expired (older than delivery.retention_secs)."
    );
    describe_counter!(
        metric::SESSIONS,
        "Sessions by outcome: created (login), resumed, unknown (SESSION_EXPIRED), wrong_device (INVALID_DEVICE)."
    );
}

/// Limits of every stream of a node.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    pub window: usize,
    pub ack_timeout: Duration,
    pub max_retransmits: u32,
    pub gap_timeout: Duration,
    pub retention: Duration,
    /// Rows per database read.
    pub page: u32,
    /// Most positions buffered out of order or beyond the window.
    pub max_held: usize,
    /// Most payload bytes held and awaiting acknowledgement (`client.max_queued_bytes`).
    pub max_bytes: usize,
    /// The node's queued bytes: while they are above `client.max_queued_bytes_total`, only
    /// streams holding nothing read the database.
    pub node: Arc<QueuedBytes>,
}

impl StreamConfig {
    pub fn new(d: &DeliverySettings, node: Arc<QueuedBytes>) -> Self {
        StreamConfig {
            window: d.window,
            ack_timeout: Duration::from_millis(d.ack_timeout_ms),
            max_retransmits: d.max_retransmits,
            gap_timeout: Duration::from_millis(d.gap_timeout_ms),
            retention: Duration::from_secs(d.retention_secs),
            page: d.window.clamp(16, crate::store::MAX_PAGE as usize) as u32,
            max_held: (d.window * 4).max(1_024),
            max_bytes: node.per_connection(),
            node,
        }
    }
}

/// What is known of one position.
#[derive(Debug)]
enum Entry {
    Push {
        id: MessageId,
        payload: Bytes,
        accepted: Option<std::time::Instant>,
    },
    /// Addressed to another channel type: consumed without a push.
    Skip,
    /// Older than the retention: reported in an `expired` frame.
    Expired,
}

impl Entry {
    /// The payload bytes it holds.
    fn len(&self) -> usize {
        match self {
            Entry::Push { payload, .. } => payload.len(),
            Entry::Skip | Entry::Expired => 0,
        }
    }
}

/// A frame to write.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub payload: Bytes,
    /// For pushes of live messages: when the message was accepted (push latency).
    pub accepted: Option<std::time::Instant>,
    /// Whether it is a push (counted in the outgoing pushes metric).
    pub push: bool,
}

/// A push awaiting acknowledgement.
#[derive(Debug)]
struct Inflight {
    seq: u64,
    id: MessageId,
    payload: Bytes,
    due: Instant,
    sends: u32,
}

/// The connection must close: a push stayed unacknowledged after every retransmission.
#[derive(Debug, PartialEq, Eq)]
pub struct AckTimeout;

/// A database read the connection should start: positions from `from` on, at most `limit`.
/// With `probe`, a run of missing positions (`from..=to`) that the database did not have when
/// last read: before the read, the connection asks for the lowest of them that a node still
/// holds ([`Cluster::lowest_held`](crate::cluster::Cluster::lowest_held)), and hands the
/// answer to [`DeviceStream::fill`].
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct Fetch {
    pub from: u64,
    pub limit: u32,
    pub probe: Option<(u64, u64)>,
}

/// One device's stream on one connection.
#[derive(Debug)]
pub struct DeviceStream {
    cfg: Arc<StreamConfig>,
    /// The connection's channel type: replayed rows addressed to another one are skipped.
    channel: Arc<str>,
    /// The next position to push.
    next: u64,
    /// The highest position known to exist.
    head: u64,
    held: BTreeMap<u64, Entry>,
    inflight: VecDeque<Inflight>,
    /// Payload bytes in `held` and in `inflight`.
    held_bytes: usize,
    inflight_bytes: usize,
    /// Pushes were dropped for want of memory: they are read from the database once
    /// acknowledgements make room (not before, or the same rows would be read again and again).
    full: bool,
    /// Expired positions not yet reported.
    expired: Option<(u64, u64)>,
    /// Since when `next` has been missing while a later position exists.
    gap_since: Option<Instant>,
    /// When to read the database next.
    fetch_at: Option<Instant>,
    fetching: Option<Instant>,
    /// The last read reached the end of what the database holds.
    exhausted: bool,
    caught_up: bool,
    retransmit_at: Option<Instant>,
    /// The cursor last reported by [`ack`](Self::ack).
    cursor: u64,
}

impl DeviceStream {
    /// A stream for a device whose cursor is `cursor`, in a user stream whose last position is
    /// `head` when known. Unless the head is known to be at the cursor (nothing to replay), the
    /// first database read is due at once.
    pub fn new(
        cfg: Arc<StreamConfig>,
        channel: Arc<str>,
        cursor: u64,
        head: Option<u64>,
        now: Instant,
    ) -> Self {
        let nothing_to_replay = head.is_some_and(|h| h <= cursor);
        DeviceStream {
            cfg,
            channel,
            next: cursor + 1,
            head: head.unwrap_or(0).max(cursor),
            held: BTreeMap::new(),
            inflight: VecDeque::new(),
            held_bytes: 0,
            inflight_bytes: 0,
            full: false,
            expired: None,
            gap_since: None,
            fetch_at: (!nothing_to_replay).then_some(now),
            fetching: None,
            exhausted: nothing_to_replay,
            caught_up: false,
            retransmit_at: None,
            cursor,
        }
    }

    /// The device's cursor: every position before the oldest unacknowledged push (or every
    /// position pushed or skipped, when none awaits acknowledgement).
    pub fn cursor(&self) -> u64 {
        self.inflight
            .front()
            .map_or(self.next - 1, |f| f.seq.saturating_sub(1))
    }

    /// Payload bytes this stream holds in memory: pushes waiting for their turn and pushes
    /// awaiting acknowledgement.
    pub fn queued_bytes(&self) -> usize {
        self.held_bytes + self.inflight_bytes
    }

    /// Takes a live push (or skip) of this user's stream.
    pub fn offer(&mut self, out: Outbound, now: Instant) {
        let seq = out.stamp.seq;
        if seq < self.next {
            return;
        }
        self.head = self.head.max(seq);
        if out.is_evicted() {
            // Dropped from memory on its way here: read it from the database.
            if !self.full {
                self.fetch_soon(now);
            }
            return;
        }
        let entry = if out.skip {
            Entry::Skip
        } else {
            Entry::Push {
                id: out.stamp.id,
                payload: out.payload,
                accepted: out.accepted,
            }
        };
        self.hold(seq, entry, now);
    }

    fn hold(&mut self, seq: u64, entry: Entry, now: Instant) {
        if self.held.contains_key(&seq) {
            return;
        }
        if self.held.len() >= self.cfg.max_held {
            // Keep the lowest positions; the rest are read back from the database later.
            match self.held.last_key_value() {
                Some((&last, _)) if last > seq => {
                    self.drop_held(last);
                }
                _ => {
                    self.fetch_soon(now);
                    return;
                }
            }
            self.fetch_soon(now);
        }
        // Within the memory budget, keep the lowest positions too. A stream holding nothing
        // takes any push, so that one larger than the budget still goes out.
        let len = entry.len();
        while len > 0
            && self.queued_bytes() > 0
            && (self.queued_bytes() + len > self.cfg.max_bytes
                || self.cfg.node.total() + len > self.cfg.node.node_limit())
        {
            match self.held.last_key_value() {
                Some((&last, _)) if last > seq => self.drop_held(last),
                _ => {
                    self.full = true;
                    return;
                }
            }
            self.full = true;
        }
        self.held_bytes += len;
        self.cfg.node.add(len);
        self.held.insert(seq, entry);
    }

    fn drop_held(&mut self, seq: u64) {
        if let Some(entry) = self.held.remove(&seq) {
            self.held_bytes -= entry.len();
            self.cfg.node.sub(entry.len());
        }
    }

    fn fetch_soon(&mut self, now: Instant) {
        self.fetch_at = Some(self.fetch_at.map_or(now, |at| at.min(now)));
    }

    /// A database read to start now, if one is due and there is room for what it returns.
    pub fn fetch(&mut self, now: Instant) -> Option<Fetch> {
        if self.fetching.is_some() || self.fetch_at.is_none_or(|at| at > now) || !self.can_fetch() {
            return None;
        }
        self.fetch_at = None;
        self.fetching = Some(now);
        // A run of missing positions that the last read (which reached the end of what the
        // database holds) did not find, missing for a gap timeout already.
        let probe = (self.exhausted
            && self.missing()
            && self
                .gap_since
                .is_some_and(|since| now >= since + self.cfg.gap_timeout))
        .then(|| (self.next, self.first_known() - 1));
        // Positions held from `next` on need no reading again.
        let mut from = self.next;
        for &seq in self.held.keys() {
            if seq != from {
                break;
            }
            from += 1;
        }
        Some(Fetch {
            from,
            limit: self.cfg.page,
            probe,
        })
    }

    /// Whether there is room for what a read returns: in the window, in the connection's
    /// memory budget and, unless the stream holds nothing, in the node's. A read for a missing
    /// `next` that later held positions wait for always finds room: it displaces them.
    fn can_fetch(&self) -> bool {
        let gap_before_held = self
            .held
            .first_key_value()
            .is_some_and(|(&seq, _)| seq > self.next);
        self.inflight.len() < self.cfg.window
            && self.inflight_bytes < self.cfg.max_bytes
            && (gap_before_held
                || (self.held.len() < self.cfg.max_held
                    && !self.full
                    && (self.queued_bytes() == 0 || !self.cfg.node.node_over())))
    }

    /// The result of the read [`fetch`](Self::fetch) asked for: rows in position order, and
    /// for a probe, the lowest of its positions some node still holds (asked before the read;
    /// 0 for none, `None` when not every node answered). `now_ms` is the wall clock, for the
    /// retention.
    pub fn fill(
        &mut self,
        fetch: Fetch,
        rows: Vec<StoredMessage>,
        lowest_held: Option<u64>,
        now: Instant,
        now_ms: u64,
    ) {
        self.fetching = None;
        self.exhausted = rows.len() < fetch.limit as usize;
        let cutoff = now_ms.saturating_sub(self.cfg.retention.as_millis() as u64);
        // The first stored position from `next` on: what is below it is missing in the
        // database, what is from it on exists, even if the memory budget drops it below.
        let first_stored = rows.iter().map(|r| r.seq).find(|&seq| seq >= self.next);
        for row in rows {
            if row.seq < self.next {
                continue;
            }
            self.head = self.head.max(row.seq);
            let entry = if row.created_at_ms < cutoff {
                Entry::Expired
            } else if row.channel.as_deref().is_some_and(|c| c != &*self.channel) {
                Entry::Skip
            } else {
                Entry::Push {
                    id: row.id,
                    payload: encode_stored(&row),
                    accepted: None,
                }
            };
            self.hold(row.seq, entry, now);
        }
        if !self.exhausted {
            self.fetch_soon(now);
        }
        // Probed positions below the lowest one a node still holds, which a read started after
        // every node answered does not have either, will never be stored. Skip them (only
        // them: positions that became known meanwhile were not asked about).
        if let (Some((from, to)), Some(held)) = (fetch.probe, lowest_held) {
            let skip_to = self
                .first_known()
                .min(to + 1)
                .min(if held == 0 { u64::MAX } else { held })
                // What the read found exists, even if the memory budget did not keep it.
                .min(first_stored.unwrap_or(u64::MAX));
            if self.exhausted && self.missing() && self.next >= from && skip_to > self.next {
                metrics::counter!(metric::HOLES).increment(skip_to - self.next);
                crate::warn_limited!(
                    from = self.next,
                    to = skip_to - 1,
                    "stream positions skipped: never stored"
                );
                self.next = skip_to;
                self.gap_since = None;
            }
        }
    }

    /// The first position after `next` that is known to exist: the lowest held, or the one
    /// after the head.
    fn first_known(&self) -> u64 {
        self.held
            .first_key_value()
            .map_or(self.head + 1, |(&s, _)| s)
    }

    /// A database read failed: try again after the gap timeout.
    pub fn fetch_failed(&mut self, now: Instant) {
        self.fetching = None;
        self.fetch_at = Some(now + self.cfg.gap_timeout);
    }

    /// Whether position `next` is missing while a later one exists.
    fn missing(&self) -> bool {
        match self.held.first_key_value() {
            Some((&seq, _)) => seq > self.next,
            None => self.next <= self.head,
        }
    }

    /// Acknowledges every push up to `seq` (cumulative) and/or the push `id`. Returns the new
    /// cursor if it moved.
    pub fn ack(&mut self, seq: Option<u64>, id: Option<MessageId>) -> Option<u64> {
        let before = self.inflight_bytes;
        if let Some(seq) = seq {
            while self.inflight.front().is_some_and(|f| f.seq <= seq) {
                if let Some(f) = self.inflight.pop_front() {
                    self.inflight_bytes -= f.payload.len();
                    self.cfg.node.sub(f.payload.len());
                }
            }
        }
        if let Some(id) = id {
            if let Some(pos) = self.inflight.iter().position(|f| f.id == id) {
                if let Some(f) = self.inflight.remove(pos) {
                    self.inflight_bytes -= f.payload.len();
                    self.cfg.node.sub(f.payload.len());
                }
            }
        }
        if self.full && self.inflight_bytes < before {
            // Room again: read what was dropped.
            self.full = false;
            self.fetch_soon(Instant::now());
        }
        let cursor = self.cursor();
        (cursor > self.cursor).then(|| {
            self.cursor = cursor;
            cursor
        })
    }

    /// Pushes what is due, in order, into `out`: contiguous positions while the window has
    /// room, an `expired` frame for expired runs, `caught_up` once replay is complete.
    pub fn pump(&mut self, now: Instant, out: &mut Vec<Outgoing>) {
        while self.inflight.len() < self.cfg.window {
            let Some(entry) = self.held.first_entry() else {
                break;
            };
            let seq = *entry.key();
            if seq < self.next {
                let len = entry.remove().len();
                self.held_bytes -= len;
                self.cfg.node.sub(len);
                continue;
            }
            if seq > self.next {
                break;
            }
            let len = entry.get().len();
            if len > 0
                && !self.inflight.is_empty()
                && self.inflight_bytes + len > self.cfg.max_bytes
            {
                // Awaiting acknowledgement already takes the memory budget.
                break;
            }
            let entry = entry.remove();
            self.held_bytes -= len;
            match entry {
                Entry::Push {
                    id,
                    payload,
                    accepted,
                } => {
                    self.report_expired(out);
                    if accepted.is_none() {
                        metrics::counter!(metric::REPLAYED).increment(1);
                    }
                    out.push(Outgoing {
                        payload: payload.clone(),
                        accepted,
                        push: true,
                    });
                    let due = now + self.cfg.ack_timeout;
                    self.retransmit_at = Some(self.retransmit_at.map_or(due, |at| at.min(due)));
                    self.inflight_bytes += payload.len();
                    self.inflight.push_back(Inflight {
                        seq,
                        id,
                        payload,
                        due,
                        sends: 1,
                    });
                }
                Entry::Skip => {}
                Entry::Expired => {
                    self.expired = Some(match self.expired {
                        Some((from, _)) => (from, seq),
                        None => (seq, seq),
                    });
                }
            }
            self.next = seq + 1;
            self.gap_since = None;
        }
        self.report_expired(out);
        if self.missing() {
            let since = *self.gap_since.get_or_insert(now);
            if self.fetching.is_none() {
                let at = since + self.cfg.gap_timeout;
                // While a hole is awaited, look again every gap timeout.
                let at = if at <= now {
                    now + self.cfg.gap_timeout
                } else {
                    at
                };
                if self.fetch_at.is_none_or(|f| f > at) {
                    self.fetch_at = Some(at);
                }
            }
        } else {
            self.gap_since = None;
        }
        if !self.caught_up
            && self.exhausted
            && self.fetching.is_none()
            && self.fetch_at.is_none()
            && self.held.is_empty()
            && self.next > self.head
        {
            self.caught_up = true;
            out.push(Outgoing {
                payload: ServerFrame::CaughtUp { seq: self.next - 1 }.encode(),
                accepted: None,
                push: false,
            });
        }
    }

    fn report_expired(&mut self, out: &mut Vec<Outgoing>) {
        if let Some((from_seq, to_seq)) = self.expired.take() {
            metrics::counter!(metric::EXPIRED).increment(to_seq - from_seq + 1);
            out.push(Outgoing {
                payload: ServerFrame::Expired { from_seq, to_seq }.encode(),
                accepted: None,
                push: false,
            });
        }
    }

    /// When [`on_timer`](Self::on_timer) or [`fetch`](Self::fetch) has something to do.
    pub fn deadline(&self) -> Option<Instant> {
        // A read that cannot start (one is under way, or no room for what it returns) is no
        // deadline: an ack or the read's end makes room, and the connection looks again then.
        let can_fetch = self.fetching.is_none() && self.can_fetch();
        let fetch = self.fetch_at.filter(|_| can_fetch);
        match (fetch, self.retransmit_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Sends again, into `out`, every push whose acknowledgement is overdue.
    pub fn on_timer(&mut self, now: Instant, out: &mut Vec<Outgoing>) -> Result<(), AckTimeout> {
        if self.retransmit_at.is_none_or(|at| at > now) {
            return Ok(());
        }
        let mut earliest: Option<Instant> = None;
        for f in self.inflight.iter_mut() {
            if f.due <= now {
                if f.sends > self.cfg.max_retransmits {
                    return Err(AckTimeout);
                }
                f.sends += 1;
                f.due = now + self.cfg.ack_timeout;
                metrics::counter!(metric::RETRANSMITS).increment(1);
                out.push(Outgoing {
                    payload: f.payload.clone(),
                    accepted: None,
                    push: true,
                });
            }
            earliest = Some(earliest.map_or(f.due, |e| e.min(f.due)));
        }
        self.retransmit_at = earliest;
        Ok(())
    }
}

impl Drop for DeviceStream {
    fn drop(&mut self) {
        self.cfg.node.sub(self.queued_bytes());
    }
}

/// The push frame of a stored message.
fn encode_stored(row: &StoredMessage) -> Bytes {
    let body: Box<RawValue> = RawValue::from_string(row.body.clone()).unwrap_or_else(|_| {
        // Not JSON (cannot come from the gateway): deliver it as a JSON string.
        serde_json::value::to_raw_value(&row.body).expect("a string serialises")
    });
    encode_push(&PushFields {
        id: row.id,
        seq: Some(row.seq),
        from: row.sender.as_deref(),
        to: &row.recipient,
        channel: row.channel.as_deref(),
        client_msg_id: row.client_msg_id.as_deref(),
        body: &body,
        ts: row.created_at_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::Stamp;
    use crate::store::DeliveryState;

    fn cfg(window: usize) -> Arc<StreamConfig> {
        Arc::new(StreamConfig {
            window,
            ack_timeout: Duration::from_secs(10),
            max_retransmits: 2,
            gap_timeout: Duration::from_secs(1),
            retention: Duration::from_secs(3600),
            page: 100,
            max_held: 8,
            max_bytes: 1 << 20,
            node: Arc::default(),
        })
    }

    fn live(seq: u64) -> Outbound {
        Outbound {
            payload: Bytes::from(format!("p{seq}")),
            accepted: None,
            stamp: Stamp {
                id: MessageId(1000 + seq),
                seq,
            },
            skip: false,
        }
    }

    fn row(seq: u64, created_at_ms: u64, channel: Option<&str>) -> StoredMessage {
        StoredMessage {
            id: MessageId(1000 + seq),
            sender: Some("a".into()),
            recipient: "b".into(),
            channel: channel.map(Into::into),
            body: "{}".into(),
            client_msg_id: None,
            created_at_ms,
            state: DeliveryState::Pending,
            seq,
        }
    }

    /// The positions pushed (live payloads `p{seq}`, replayed ones parsed) and other frames.
    fn frames(out: &mut Vec<Outgoing>) -> Vec<String> {
        out.drain(..)
            .map(|o| {
                if o.payload.starts_with(b"p") {
                    String::from_utf8(o.payload.to_vec()).unwrap()
                } else {
                    match ServerFrame::decode(&o.payload).unwrap() {
                        ServerFrame::Push { seq, .. } => format!("r{}", seq.unwrap()),
                        ServerFrame::CaughtUp { seq } => format!("caught_up {seq}"),
                        ServerFrame::Expired { from_seq, to_seq } => {
                            format!("expired {from_seq}-{to_seq}")
                        }
                        other => panic!("{other:?}"),
                    }
                }
            })
            .collect()
    }

    #[test]
    fn replay_and_live_meet_without_gap_or_reordering() {
        let t = Instant::now();
        let mut s = DeviceStream::new(cfg(64), "app".into(), 2, Some(5), t);
        let f = s.fetch(t).unwrap();
        assert_eq!(
            f,
            Fetch {
                from: 3,
                limit: 100,
                probe: None
            }
        );
        // Live 6 and 7 arrive while the database read runs; 7 before 6.
        s.offer(live(7), t);
        s.offer(live(6), t);
        let mut out = Vec::new();
        s.pump(t, &mut out);
        assert!(out.is_empty(), "nothing before position 3");
        // The read returns 3..=5 and a copy of 6.
        s.fill(
            f,
            vec![
                row(3, u64::MAX / 2, None),
                row(4, u64::MAX / 2, None),
                row(5, u64::MAX / 2, None),
                row(6, u64::MAX / 2, None),
            ],
            None,
            t,
            u64::MAX / 2,
        );
        s.pump(t, &mut out);
        assert_eq!(
            frames(&mut out),
            ["r3", "r4", "r5", "p6", "p7", "caught_up 7"]
        );
        s.offer(live(8), t);
        s.offer(live(7), t);
        s.pump(t, &mut out);
        assert_eq!(frames(&mut out), ["p8"], "7 again is a duplicate");
    }

    #[test]
    fn a_device_at_the_head_needs_no_database_read() {
        let t = Instant::now();
        let mut s = DeviceStream::new(cfg(8), "app".into(), 7, Some(7), t);
        assert_eq!(s.fetch(t), None);
        let mut out = Vec::new();
        s.pump(t, &mut out);
        assert_eq!(frames(&mut out), ["caught_up 7"]);
        s.offer(live(8), t);
        s.pump(t, &mut out);
        assert_eq!(frames(&mut out), ["p8"]);
    }

    #[test]
    fn a_read_blocked_by_the_window_sets_no_deadline() {
        let t = Instant::now();
        let mut s = DeviceStream::new(cfg(2), "app".into(), 0, None, t);
        let f = s.fetch(t).unwrap();
        s.fill(
            f,
            (1..=100).map(|seq| row(seq, 5, None)).collect(),
            None,
            t,
            10,
        );
        let mut out = Vec::new();
        s.pump(t, &mut out);
        assert_eq!(frames(&mut out), ["r1", "r2"]);
        assert_eq!(s.fetch(t), None, "the window is full");
        // Only the retransmission timer is left; a past read deadline would spin the caller.
        assert_eq!(s.deadline(), Some(t + Duration::from_secs(10)));
        s.ack(Some(2), None);
        s.pump(t, &mut out);
        assert_eq!(frames(&mut out), ["r3", "r4"]);
    }

    #[test]
    fn window_holds_back_until_acknowledged() {
        let t = Instant::now();
        let mut s = DeviceStream::new(cfg(2), "app".into(), 0, None, t);
        let f = s.fetch(t).unwrap();
        s.fill(f, vec![], None, t, 10);
        let mut out = Vec::new();
        s.pump(t, &mut out);
        assert_eq!(frames(&mut out), ["caught_up 0"]);
        for seq in 1..=4 {
            s.offer(live(seq), t);
        }
        s.pump(t, &mut out);
        assert_eq!(frames(&mut out), ["p1", "p2"]);
        assert_eq!(s.ack(Some(1), None), Some(1));
        s.pump(t, &mut out);
        assert_eq!(frames(&mut out), ["p3"]);
        // An ack by id of a later push does not move the cursor past an unacknowledged one.
        assert_eq!(s.ack(None, Some(MessageId(1003))), None);
        assert_eq!(s.cursor(), 1);
        s.pump(t, &mut out);
        assert_eq!(frames(&mut out), ["p4"]);
        assert_eq!(s.ack(Some(4), None), Some(4));
    }

    #[test]
    fn unacknowledged_pushes_are_sent_again_then_the_connection_closes() {
        let t = Instant::now();
        let mut s = DeviceStream::new(cfg(8), "app".into(), 0, None, t);
        s.offer(live(1), t);
        let mut out = Vec::new();
        s.pump(t, &mut out);
        assert_eq!(frames(&mut out), ["p1"]);
        let due = s.deadline().unwrap();
        assert_eq!(due, t, "the first database read is due at once");
        let f = s.fetch(t).unwrap();
        s.fill(f, vec![], None, t, 10);
        s.pump(t, &mut out);
        assert_eq!(frames(&mut out), ["caught_up 1"]);
        let first = s.deadline().unwrap();
        assert_eq!(first, t + Duration::from_secs(10));
        s.on_timer(first, &mut out).unwrap();
        assert_eq!(frames(&mut out), ["p1"]);
        let second = s.deadline().unwrap();
        s.on_timer(second, &mut out).unwrap();
        assert_eq!(frames(&mut out), ["p1"]);
        let third = s.deadline().unwrap();
        assert_eq!(s.on_timer(third, &mut out), Err(AckTimeout));
    }

    #[test]
    fn a_gap_is_looked_up_and_a_hole_is_skipped_only_when_no_node_holds_it() {
        let t = Instant::now();
        let mut s = DeviceStream::new(cfg(8), "app".into(), 0, None, t);
        let f = s.fetch(t).unwrap();
        assert_eq!(f.probe, None, "nothing is missing yet");
        s.fill(f, vec![], None, t, 10);
        let mut out = Vec::new();
        s.pump(t, &mut out);
        assert_eq!(frames(&mut out), ["caught_up 0"]);
        // 1 is late (its write is slow, or it will never come); 2 arrives.
        s.offer(live(2), t);
        s.pump(t, &mut out);
        assert!(out.is_empty());
        let at = s.deadline().unwrap();
        assert_eq!(
            at,
            t + Duration::from_secs(1),
            "looked up after the gap timeout"
        );
        let f = s.fetch(at).unwrap();
        assert_eq!((f.from, f.probe), (1, Some((1, 1))));
        // A node holds position 1 (or one did not answer): however long that lasts, it is
        // waited for, and looked up again every gap timeout.
        s.fill(f, vec![row(2, 5, None)], Some(1), at, 10);
        s.pump(at, &mut out);
        let mut now = at;
        for round in 0..1_000 {
            assert!(out.is_empty(), "skipped while held");
            let due = s.deadline().unwrap();
            assert_eq!(due, now + Duration::from_secs(1));
            now = due;
            let f = s.fetch(now).unwrap();
            assert_eq!(f.probe, Some((1, 1)));
            let holders = if round % 2 == 0 { Some(1) } else { None };
            s.fill(f, vec![row(2, 5, None)], holders, now, 10);
            s.pump(now, &mut out);
        }
        assert!(out.is_empty(), "skipped while held");
        // Nobody holds it and the database still does not have it: never stored. Skipped.
        now = s.deadline().unwrap();
        let f = s.fetch(now).unwrap();
        s.fill(f, vec![row(2, 5, None)], Some(0), now, 10);
        s.pump(now, &mut out);
        assert_eq!(frames(&mut out), ["p2"]);
        assert_eq!(s.cursor(), 1, "1 skipped, 2 awaiting its acknowledgement");

        // A position that nobody holds any more because its write has just succeeded is
        // found by the read that follows the question: pushed, not skipped.
        s.offer(live(4), now);
        s.pump(now, &mut out);
        let now = s.deadline().unwrap().min(now + Duration::from_secs(1));
        let f = s.fetch(now).unwrap();
        assert_eq!(f.probe, Some((3, 3)));
        s.fill(f, vec![row(3, 5, None), row(4, 5, None)], Some(0), now, 10);
        s.pump(now, &mut out);
        assert_eq!(frames(&mut out), ["r3", "p4"]);

        // 5 and 6 never come, 7 is being written (a busy stream always has something in
        // flight), 8 arrived: 5 and 6 are skipped, 7 is waited for.
        s.offer(live(8), now);
        s.pump(now, &mut out);
        let now = s.deadline().unwrap().min(now + Duration::from_secs(1));
        let f = s.fetch(now).unwrap();
        assert_eq!(f.probe, Some((5, 7)));
        s.fill(f, vec![row(8, 5, None)], Some(7), now, 10);
        s.pump(now, &mut out);
        assert!(out.is_empty(), "7 is waited for");
        assert_eq!(s.next, 7, "5 and 6 skipped");
    }

    #[test]
    fn old_rows_are_reported_expired_and_other_channels_skipped() {
        let t = Instant::now();
        let mut s = DeviceStream::new(cfg(8), "app".into(), 0, None, t);
        let f = s.fetch(t).unwrap();
        let now_ms = 10_000_000;
        let old = now_ms - 3_600_001;
        s.fill(
            f,
            vec![
                row(1, old, None),
                row(2, old, None),
                row(3, now_ms, Some("web")),
                row(4, now_ms, Some("app")),
            ],
            None,
            t,
            now_ms,
        );
        let mut out = Vec::new();
        s.pump(t, &mut out);
        assert_eq!(frames(&mut out), ["expired 1-2", "r4", "caught_up 4"]);
        // A live skip (a message for the web connection) consumes the position.
        s.offer(
            Outbound {
                skip: true,
                payload: Bytes::new(),
                ..live(5)
            },
            t,
        );
        s.offer(live(6), t);
        s.pump(t, &mut out);
        assert_eq!(frames(&mut out), ["p6"]);
    }

    #[test]
    fn held_and_unacknowledged_bytes_are_bounded_and_dropped_ones_are_read_back() {
        let t = Instant::now();
        let node = Arc::new(QueuedBytes::new(1 << 20, 1 << 30));
        let cfg = Arc::new(StreamConfig {
            max_bytes: 10,
            node: node.clone(),
            ..(*cfg(64)).clone()
        });
        let mut s = DeviceStream::new(cfg, "app".into(), 0, Some(0), t);
        let mut out = Vec::new();
        // Payloads `p1`..`p9` are 2 bytes each: five fit.
        for seq in 1..=9 {
            s.offer(live(seq), t);
        }
        s.pump(t, &mut out);
        assert_eq!(frames(&mut out), ["p1", "p2", "p3", "p4", "p5"]);
        assert_eq!((s.queued_bytes(), node.total()), (10, 10));
        // A push dropped on its way only moves the head; no read while there is no room.
        let mut evicted = live(10);
        evicted.payload = Bytes::new();
        assert!(evicted.is_evicted());
        s.offer(evicted, t);
        assert_eq!(s.fetch(t), None);
        // Acknowledgements make room: what was dropped is read from the database.
        s.ack(Some(3), None);
        assert_eq!(s.queued_bytes(), 4);
        // (An acknowledgement has no `now` of its own: it asks for a read at the clock's now.)
        let t = Instant::now();
        let f = s.fetch(t).expect("a read once there is room");
        assert_eq!(f.from, 6);
        // Stored pushes are larger than the room left: dropped again, and not read again
        // before more room is made.
        s.fill(
            f,
            (6..=10).map(|seq| row(seq, 10, None)).collect(),
            None,
            t,
            10,
        );
        assert_eq!(s.queued_bytes(), 4);
        assert_eq!(s.fetch(t), None);
        // Long after the gap was first seen, and with no node holding a position, a read
        // whose rows find no room is no hole.
        let later = Instant::now() + Duration::from_secs(60);
        s.ack(Some(4), None);
        let f = s.fetch(later).expect("a read once there is room");
        s.fill(
            f,
            (6..=10).map(|seq| row(seq, 10, None)).collect(),
            Some(0),
            later,
            10,
        );
        assert_eq!(s.next, 6, "stored positions are not skipped as holes");
        s.ack(Some(5), None);
        let t = Instant::now() + Duration::from_secs(61);
        let f = s.fetch(t).expect("a read once there is room");
        assert_eq!(f.from, 6);
        // An empty stream takes one push, whatever its size.
        s.fill(
            f,
            (6..=10).map(|seq| row(seq, 10, None)).collect(),
            None,
            t,
            10,
        );
        s.pump(t, &mut out);
        assert_eq!(frames(&mut out), ["r6"]);
        drop(s);
        assert_eq!(node.total(), 0);
    }

    #[test]
    fn held_positions_are_bounded() {
        let t = Instant::now();
        let mut s = DeviceStream::new(cfg(1), "app".into(), 0, None, t);
        let f = s.fetch(t).unwrap();
        s.fill(f, vec![], None, t, 10);
        let mut out = Vec::new();
        s.pump(t, &mut out);
        out.clear();
        for seq in 1..=20 {
            s.offer(live(seq), t);
        }
        s.pump(t, &mut out);
        assert_eq!(frames(&mut out), ["p1"]);
        assert!(s.held.len() <= 8);
        // The dropped ones are read back once the window has room.
        s.ack(Some(1), None);
        s.pump(t, &mut out);
        assert_eq!(frames(&mut out), ["p2"]);
        assert!(s.fetch_at.is_some());
    }
}
