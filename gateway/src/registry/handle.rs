//! A live connection as the rest of the node holds it: its handle (who, which device and
//! channel type, how to kick it), its bounded outbox of frames, and the payload bytes it holds
//! against the memory limits.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use imgate_shared::{KickReason, MessageId};

use crate::base::{Stamp, TransportKind};

/// One encoded frame queued for a connection.
#[derive(Debug, Clone)]
pub struct Outbound {
    /// The frame's JSON payload, shared by every recipient; empty for a skip.
    pub payload: Bytes,
    /// When the message was accepted, for the push-latency histogram; `None` for other frames.
    pub accepted: Option<Instant>,
    pub stamp: Stamp,
    /// The position is consumed but the message is not for this connection (it was addressed
    /// to another channel type): nothing is written.
    pub skip: bool,
}

impl Outbound {
    /// Whether the push was dropped from memory on its way (the connection held its
    /// `client.max_queued_bytes`, or the node its total): only its position travels, and the
    /// connection reads the message from the database.
    pub fn is_evicted(&self) -> bool {
        !self.skip && self.stamp.seq != 0 && self.payload.is_empty()
    }

    /// A push outside any stream.
    pub fn unsequenced(payload: Bytes, accepted: Option<Instant>) -> Self {
        Outbound {
            payload,
            accepted,
            stamp: Stamp {
                id: MessageId(0),
                seq: 0,
            },
            skip: false,
        }
    }
}

/// The kill switch of a connection: a reason, and the waker of the connection's task.
#[derive(Debug, Default)]
pub struct Control {
    reason: OnceLock<KickReason>,
    /// Set when the connection is displaced by a RESUME of its own device: its session is being
    /// resumed, so the kick must not revoke it.
    keep_session: AtomicBool,
    waker: AtomicWaker,
}

impl Control {
    /// Asks the connection to send KICK `reason` and close; the first reason wins.
    pub fn kick(&self, reason: KickReason) {
        let _ = self.reason.set(reason);
        self.waker.wake();
    }

    /// Kicks the connection for a duplicate login by a RESUME of the same device, which takes
    /// over the session: the session is not revoked when the connection ends.
    pub fn kick_keeping_session(&self) {
        self.keep_session.store(true, Ordering::Release);
        self.kick(KickReason::DuplicateLogin);
    }

    /// Whether a kick left the session to a resume of the same device.
    pub fn keeps_session(&self) -> bool {
        self.keep_session.load(Ordering::Acquire)
    }

    pub fn reason(&self) -> Option<KickReason> {
        self.reason.get().copied()
    }

    /// Waits until the connection is kicked. Awaited by the connection's own task only (one
    /// waker is kept).
    pub async fn kicked(&self) {
        poll_fn(|cx| {
            self.waker.register(cx.waker());
            match self.reason.get() {
                Some(_) => Poll::Ready(()),
                None => Poll::Pending,
            }
        })
        .await
    }
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OfferError {
    /// The outbox holds its capacity: the client does not read fast enough.
    Full,
    /// The connection is ending.
    Closed,
}

/// The payload bytes the node holds queued for its connections (outboxes, device streams,
/// frames being written), and their limits: `client.max_queued_bytes` per connection and
/// `client.max_queued_bytes_total` for the node.
#[derive(Debug)]
pub struct QueuedBytes {
    total: AtomicUsize,
    per_connection: usize,
    node: usize,
}

/// Which memory limit a push met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryLimit {
    Connection,
    Node,
}

impl MemoryLimit {
    pub fn as_str(self) -> &'static str {
        match self {
            MemoryLimit::Connection => "connection",
            MemoryLimit::Node => "node",
        }
    }
}

impl QueuedBytes {
    pub fn new(per_connection: usize, node: usize) -> Self {
        QueuedBytes {
            total: AtomicUsize::new(0),
            per_connection,
            node,
        }
    }

    /// Bytes queued on the node now.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// `client.max_queued_bytes`.
    pub fn per_connection(&self) -> usize {
        self.per_connection
    }

    /// Whether the node holds more than `client.max_queued_bytes_total`.
    pub fn node_over(&self) -> bool {
        self.total() > self.node
    }

    /// `client.max_queued_bytes_total`.
    pub fn node_limit(&self) -> usize {
        self.node
    }

    pub(crate) fn add(&self, n: usize) {
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn sub(&self, n: usize) {
        self.total.fetch_sub(n, Ordering::Relaxed);
    }

    /// Whether `len` more bytes for a connection holding `mine` break a limit. A connection
    /// holding nothing always takes a frame, so that no frame is too large to go out.
    pub fn check(&self, mine: usize, len: usize) -> Option<MemoryLimit> {
        if mine == 0 || len == 0 {
            None
        } else if mine + len > self.per_connection {
            Some(MemoryLimit::Connection)
        } else if self.total() + len > self.node {
            Some(MemoryLimit::Node)
        } else {
            None
        }
    }
}

impl Default for QueuedBytes {
    fn default() -> Self {
        let c = crate::config::ClientSettings::default();
        QueuedBytes::new(c.max_queued_bytes, c.max_queued_bytes_total)
    }
}

/// The bounded queue of frames for one connection: filled without waiting by whoever delivers
/// to the connection, drained in batches by the connection's task. It holds no allocation while
/// empty, which is what an idle connection's outbox is.
#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<Queue>,
    waker: AtomicWaker,
    capacity: usize,
    node_bytes: Arc<QueuedBytes>,
}

#[derive(Debug, Default)]
pub(super) struct Queue {
    pub(super) frames: VecDeque<Outbound>,
    /// Payload bytes in `frames`.
    pub(super) bytes: usize,
    pub(super) closed: bool,
}

impl Outbox {
    pub fn new(capacity: usize, node_bytes: Arc<QueuedBytes>) -> Self {
        Outbox {
            queue: Mutex::default(),
            waker: AtomicWaker::new(),
            capacity,
            node_bytes,
        }
    }

    /// Payload bytes queued now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `frame` unless the outbox is full or closed.
    pub fn offer(&self, frame: Outbound) -> Result<(), OfferError> {
        let mut queue = self.lock();
        if queue.closed {
            return Err(OfferError::Closed);
        }
        if queue.frames.len() >= self.capacity {
            return Err(OfferError::Full);
        }
        let was_empty = queue.frames.is_empty();
        let len = frame.payload.len();
        queue.bytes += len;
        queue.frames.push_back(frame);
        drop(queue);
        self.node_bytes.add(len);
        // The task drains the whole queue each time it wakes: only the first frame wakes it.
        if was_empty {
            self.waker.wake();
        }
        Ok(())
    }

    /// The queued frames, oldest first, at most `max`; waits while there is none. Awaited by
    /// the connection's own task only (one waker is kept).
    pub async fn recv(&self, max: usize) -> VecDeque<Outbound> {
        poll_fn(|cx| self.poll_recv(cx, max)).await
    }

    pub(super) fn poll_recv(&self, cx: &mut Context<'_>, max: usize) -> Poll<VecDeque<Outbound>> {
        self.waker.register(cx.waker());
        let mut queue = self.lock();
        if queue.frames.is_empty() {
            return Poll::Pending;
        }
        let batch: VecDeque<Outbound> = if queue.frames.len() <= max {
            // The whole queue, allocation and all: the outbox is left with none.
            std::mem::take(&mut queue.frames)
        } else {
            queue.frames.drain(..max).collect()
        };
        // From here on the connection's task accounts for them.
        let len: usize = batch.iter().map(|f| f.payload.len()).sum();
        queue.bytes -= len;
        drop(queue);
        self.node_bytes.sub(len);
        Poll::Ready(batch)
    }

    /// Refuses further frames and drops the queued ones.
    pub fn close(&self) {
        let mut queue = self.lock();
        queue.closed = true;
        queue.frames = VecDeque::new();
        let len = std::mem::take(&mut queue.bytes);
        drop(queue);
        self.node_bytes.sub(len);
    }

    /// Frames queued now.
    pub fn len(&self) -> usize {
        self.lock().frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        self.set_held_bytes(0, 0);
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let len = self.lock().bytes;
        self.node_bytes.sub(len);
    }
}

/// What the rest of the node holds of a live connection.
#[derive(Debug)]
pub struct ConnHandle {
    pub id: u64,
    pub user: Arc<str>,
    pub channel: Arc<str>,
    pub device_id: Arc<str>,
    pub transport: TransportKind,
    pub connected_at_ms: u64,
    /// Frames for the connection's task to write.
    pub outbox: Outbox,
    pub control: Control,
    /// Payload bytes the connection's task holds (its device stream, frames being written),
    /// as it last said.
    held: AtomicUsize,
    /// Of these, the bytes of frames being written that no stream holds (the stream counts
    /// its own in the node's total).
    writing: AtomicUsize,
}

impl ConnHandle {
    pub fn new(
        user: Arc<str>,
        channel: Arc<str>,
        device_id: Arc<str>,
        transport: TransportKind,
        outbox_capacity: usize,
        node_bytes: Arc<QueuedBytes>,
    ) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        ConnHandle {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            user,
            channel,
            device_id,
            transport,
            connected_at_ms: crate::base::unix_millis(),
            outbox: Outbox::new(outbox_capacity, node_bytes),
            control: Control::default(),
            held: AtomicUsize::new(0),
            writing: AtomicUsize::new(0),
        }
    }

    /// Payload bytes queued for this connection: in its outbox and held by its task.
    pub fn queued_bytes(&self) -> usize {
        self.outbox.bytes() + self.held.load(Ordering::Relaxed)
    }

    /// The connection's task says how many payload bytes it holds now: in its device stream
    /// (which counts them in the node's total itself) and in frames being written.
    pub fn set_held_bytes(&self, stream: usize, writing: usize) {
        self.held.store(stream + writing, Ordering::Relaxed);
        let old = self.writing.swap(writing, Ordering::Relaxed);
        if writing > old {
            self.outbox.node_bytes.add(writing - old);
        } else if old > writing {
            self.outbox.node_bytes.sub(old - writing);
        }
    }

    /// How presence records this connection.
    pub fn presence(&self) -> crate::cluster::LocalConnection {
        crate::cluster::LocalConnection {
            conn_id: self.id,
            user: self.user.to_string(),
            channel: self.channel.to_string(),
            device_id: self.device_id.to_string(),
            transport: self.transport.as_str().to_owned(),
            connected_since_ms: self.connected_at_ms,
        }
    }

    /// Queues a frame without waiting. A full outbox means the client does not read fast enough:
    /// the connection is kicked as a slow consumer and `false` returned. So does a push past the
    /// memory limits (`client.max_queued_bytes`, `client.max_queued_bytes_total`), unless it is
    /// a stream push: that one is stored, so it is dropped from memory, and the connection reads
    /// it from the database when it has room.
    pub fn offer(&self, mut frame: Outbound) -> bool {
        let limited = self
            .outbox
            .node_bytes
            .check(self.queued_bytes(), frame.payload.len())
            // A broadcast's payload is one allocation shared by all its recipients: counted per
            // connection, it would make a large broadcast look like the node's memory filling
            // up, and kick connections for it. Only its connection's own limit applies.
            .filter(|&limit| !(limit == MemoryLimit::Node && frame.stamp.seq == 0));
        if let Some(limit) = limited {
            if frame.stamp.seq == 0 {
                metrics::counter!(crate::metrics::MEMORY_LIMITED, "limit" => limit.as_str(), "action" => "kick")
                    .increment(1);
                self.control.kick(KickReason::SlowConsumer);
                return false;
            }
            metrics::counter!(crate::metrics::MEMORY_LIMITED, "limit" => limit.as_str(), "action" => "evict")
                .increment(1);
            frame.payload = Bytes::new();
        }
        match self.outbox.offer(frame) {
            Ok(()) => true,
            Err(OfferError::Full) => {
                self.control.kick(KickReason::SlowConsumer);
                false
            }
            Err(OfferError::Closed) => false,
        }
    }
}
