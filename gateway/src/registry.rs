//! The local map: user id → the live connections of that user on this node, each with its channel
//! type. Registration applies the duplicate-login policy atomically per user (under the map's
//! shard lock), so two logins racing on the same node cannot both win.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use dashmap::DashMap;
use futures_util::task::AtomicWaker;
use imgate_shared::{KickReason, MessageId};

use crate::base::{Stamp, TransportKind};
use crate::config::DuplicateLoginPolicy;

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
struct Queue {
    frames: VecDeque<Outbound>,
    /// Payload bytes in `frames`.
    bytes: usize,
    closed: bool,
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

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
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

    fn poll_recv(&self, cx: &mut Context<'_>, max: usize) -> Poll<VecDeque<Outbound>> {
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

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("user already connected on this channel type")]
    Duplicate,
    #[error("user holds the most connections allowed")]
    TooMany,
}

/// The local map of live connections.
#[derive(Default)]
pub struct Registry {
    users: DashMap<Arc<str>, Vec<Arc<ConnHandle>>>,
    connections: AtomicUsize,
    /// Payload bytes queued for the connections, and their limits.
    queued: Arc<QueuedBytes>,
    /// Most connections of one user (`channels.max_connections_per_user`); 0: no limit.
    max_per_user: usize,
}

impl Registry {
    pub fn new(queued: QueuedBytes) -> Self {
        Registry {
            queued: Arc::new(queued),
            ..Registry::default()
        }
    }

    /// Limits each user to `max` connections on this node (0: no limit).
    pub fn with_max_per_user(mut self, max: usize) -> Self {
        self.max_per_user = max;
        self
    }

    /// The node's queued bytes and their limits, shared with every connection.
    pub fn queued(&self) -> &Arc<QueuedBytes> {
        &self.queued
    }

    /// Adds `conn`, applying `policy` to connections of the same user and channel type. Returns the
    /// connections it displaced; the caller kicks them.
    pub fn register(
        &self,
        conn: Arc<ConnHandle>,
        policy: DuplicateLoginPolicy,
    ) -> Result<Vec<Arc<ConnHandle>>, RegisterError> {
        let mut entry = self.users.entry(conn.user.clone()).or_default();
        let conns = entry.value_mut();
        let same_channel = |c: &Arc<ConnHandle>| c.channel == conn.channel;
        let staying = match policy {
            DuplicateLoginPolicy::KickOld => conns.iter().filter(|c| !same_channel(c)).count(),
            _ => conns.len(),
        };
        if self.max_per_user > 0
            && staying >= self.max_per_user
            && !(policy == DuplicateLoginPolicy::RejectNew && conns.iter().any(same_channel))
        {
            return Err(RegisterError::TooMany);
        }
        let mut displaced = Vec::new();
        match policy {
            DuplicateLoginPolicy::AllowMultiple => {}
            DuplicateLoginPolicy::RejectNew => {
                if conns.iter().any(same_channel) {
                    return Err(RegisterError::Duplicate);
                }
            }
            DuplicateLoginPolicy::KickOld => {
                let (old, keep): (Vec<_>, Vec<_>) = conns.drain(..).partition(same_channel);
                *conns = keep;
                displaced = old;
            }
        }
        conns.push(conn);
        drop(entry);
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.connections
            .fetch_sub(displaced.len(), Ordering::Relaxed);
        Ok(displaced)
    }

    /// Removes connection `id` of `user`; `false` if it was no longer registered.
    pub fn unregister(&self, user: &str, id: u64) -> bool {
        let removed = match self.users.get_mut(user) {
            Some(mut conns) => match conns.iter().position(|c| c.id == id) {
                Some(pos) => {
                    conns.swap_remove(pos);
                    true
                }
                None => false,
            },
            None => false,
        };
        if removed {
            self.users.remove_if(user, |_, conns| conns.is_empty());
            self.connections.fetch_sub(1, Ordering::Relaxed);
        }
        removed
    }

    /// Calls `f` with every connection of `user` (of `channel` when given), under the map's read
    /// lock: `f` must not block.
    pub fn for_each_of_user(
        &self,
        user: &str,
        channel: Option<&str>,
        mut f: impl FnMut(&Arc<ConnHandle>),
    ) {
        if let Some(conns) = self.users.get(user) {
            for c in conns.iter() {
                if channel.is_none_or(|ch| *c.channel == *ch) {
                    f(c);
                }
            }
        }
    }

    /// The connections of `user` (of `channel` when given).
    pub fn connections_of(&self, user: &str, channel: Option<&str>) -> Vec<Arc<ConnHandle>> {
        let mut out = Vec::new();
        self.for_each_of_user(user, channel, |c| out.push(c.clone()));
        out
    }

    /// Calls `f` with every connection (of `channel` when given). Holds one shard lock at a time.
    pub fn for_each(&self, channel: Option<&str>, mut f: impl FnMut(&Arc<ConnHandle>)) {
        for entry in self.users.iter() {
            for c in entry.value() {
                if channel.is_none_or(|ch| *c.channel == *ch) {
                    f(c);
                }
            }
        }
    }

    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Queues `payload` (a push accepted at `accepted`, at `stamp` in the user's stream) on
    /// every connection of `user` (of `channel` when given); returns how many took it. The
    /// user's connections of other channel types learn that the position is taken, so that
    /// they do not wait for it.
    pub fn deliver(
        &self,
        user: &str,
        channel: Option<&str>,
        stamp: Stamp,
        payload: &Bytes,
        accepted: Instant,
    ) -> u32 {
        let mut connections = 0;
        self.for_each_of_user(user, None, |conn| {
            let wanted = channel.is_none_or(|ch| *conn.channel == *ch);
            if !wanted && stamp.seq == 0 {
                return;
            }
            let frame = Outbound {
                payload: if wanted {
                    payload.clone()
                } else {
                    Bytes::new()
                },
                accepted: Some(accepted),
                stamp,
                skip: !wanted,
            };
            if conn.offer(frame) && wanted {
                connections += 1;
            }
        });
        connections
    }

    /// Queues `payload` on every connection (of `channel` when given); returns how many took it.
    pub fn broadcast(&self, channel: Option<&str>, payload: &Bytes) -> usize {
        let accepted = Instant::now();
        let mut reached = 0;
        self.for_each(channel, |conn| {
            let frame = Outbound::unsequenced(payload.clone(), Some(accepted));
            if conn.offer(frame) {
                reached += 1;
            }
        });
        reached
    }

    /// Kicks every connection of `user` (of `channel` when given); returns how many.
    pub fn kick_user(&self, user: &str, channel: Option<&str>, reason: KickReason) -> usize {
        let mut kicked = 0;
        self.for_each_of_user(user, channel, |conn| {
            conn.control.kick(reason);
            kicked += 1;
        });
        kicked
    }

    pub fn user_count(&self) -> usize {
        self.users.len()
    }
}

/// What the cluster asks of this node when another node addresses it: the local map answers.
impl crate::cluster::LocalNode for Registry {
    fn deliver_local(&self, user: &str, channel: Option<&str>, stamp: Stamp, push: Bytes) -> u32 {
        self.deliver(user, channel, stamp, &push, Instant::now())
    }

    fn broadcast_local(&self, channel: Option<&str>, push: Bytes) -> usize {
        self.broadcast(channel, &push)
    }

    fn kick_connection(&self, user: &str, conn_id: u64, reason: KickReason) -> bool {
        let mut kicked = false;
        self.for_each_of_user(user, None, |conn| {
            if conn.id == conn_id {
                conn.control.kick(reason);
                kicked = true;
            }
        });
        kicked
    }

    fn kick_connection_keeping_session(&self, user: &str, conn_id: u64) -> bool {
        let mut kicked = false;
        self.for_each_of_user(user, None, |conn| {
            if conn.id == conn_id {
                conn.control.kick_keeping_session();
                kicked = true;
            }
        });
        kicked
    }

    fn kick_user(&self, user: &str, channel: Option<&str>, reason: KickReason) -> usize {
        Registry::kick_user(self, user, channel, reason)
    }

    fn local_connections(&self) -> Vec<crate::cluster::LocalConnection> {
        let mut all = Vec::with_capacity(self.connection_count());
        self.for_each(None, |conn| all.push(conn.presence()));
        all
    }

    fn connection_count(&self) -> usize {
        Registry::connection_count(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    fn conn(user: &str, channel: &str) -> Arc<ConnHandle> {
        Arc::new(ConnHandle::new(
            user.into(),
            channel.into(),
            "d".into(),
            TransportKind::Tcp,
            1,
            Arc::default(),
        ))
    }

    #[test]
    fn policies() {
        let r = Registry::default();
        let a1 = conn("a", "app");
        let a2 = conn("a", "app");
        let a3 = conn("a", "web");
        assert!(r
            .register(a1.clone(), DuplicateLoginPolicy::KickOld)
            .unwrap()
            .is_empty());
        assert!(r
            .register(a3.clone(), DuplicateLoginPolicy::KickOld)
            .unwrap()
            .is_empty());
        let displaced = r
            .register(a2.clone(), DuplicateLoginPolicy::KickOld)
            .unwrap();
        assert_eq!(displaced.len(), 1);
        assert_eq!(displaced[0].id, a1.id);
        assert_eq!(r.connection_count(), 2);
        assert!(
            !r.unregister("a", a1.id),
            "a displaced connection is already gone"
        );

        let a4 = conn("a", "app");
        assert!(r
            .register(a4.clone(), DuplicateLoginPolicy::RejectNew)
            .is_err());
        assert!(r
            .register(a4.clone(), DuplicateLoginPolicy::AllowMultiple)
            .unwrap()
            .is_empty());
        assert_eq!(r.connections_of("a", Some("app")).len(), 2);
        assert_eq!(r.connections_of("a", None).len(), 3);

        for c in [&a2, &a3, &a4] {
            assert!(r.unregister("a", c.id));
        }
        assert_eq!(r.connection_count(), 0);
        assert_eq!(r.user_count(), 0);
    }

    #[test]
    fn connections_per_user_are_limited() {
        let r = Registry::default().with_max_per_user(2);
        let many = DuplicateLoginPolicy::AllowMultiple;
        r.register(conn("a", "app"), many).unwrap();
        r.register(conn("a", "web"), many).unwrap();
        assert!(matches!(
            r.register(conn("a", "pc"), many),
            Err(RegisterError::TooMany)
        ));
        // A login that displaces one of them stays within the limit.
        let displaced = r
            .register(conn("a", "web"), DuplicateLoginPolicy::KickOld)
            .unwrap();
        assert_eq!(displaced.len(), 1);
        assert_eq!(r.connections_of("a", None).len(), 2);
        r.register(conn("b", "app"), many).unwrap();
    }

    fn frame(seq: u64) -> Outbound {
        Outbound {
            payload: Bytes::from_static(b"{}"),
            accepted: None,
            stamp: Stamp {
                id: MessageId(seq),
                seq,
            },
            skip: false,
        }
    }

    /// Records whether it was woken.
    #[derive(Default)]
    struct Flag(std::sync::atomic::AtomicBool);

    impl futures_util::task::ArcWake for Flag {
        fn wake_by_ref(flag: &Arc<Self>) {
            flag.0.store(true, Ordering::SeqCst);
        }
    }

    impl Flag {
        fn take(&self) -> bool {
            self.0.swap(false, Ordering::SeqCst)
        }
    }

    #[test]
    fn outbox_drains_in_order_and_keeps_no_buffer_while_empty() {
        let outbox = Outbox::new(8, Arc::default());
        let flag = Arc::new(Flag::default());
        let waker = futures_util::task::waker(flag.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(outbox.poll_recv(&mut cx, 3).is_pending());
        for seq in 1..=5 {
            outbox.offer(frame(seq)).unwrap();
        }
        assert!(flag.take(), "the first frame wakes the task");
        let seqs = |batch: Poll<VecDeque<Outbound>>| match batch {
            Poll::Ready(frames) => frames.iter().map(|f| f.stamp.seq).collect::<Vec<_>>(),
            Poll::Pending => panic!("nothing received"),
        };
        assert_eq!(seqs(outbox.poll_recv(&mut cx, 3)), [1, 2, 3]);
        assert_eq!(seqs(outbox.poll_recv(&mut cx, 3)), [4, 5]);
        assert!(outbox.poll_recv(&mut cx, 3).is_pending());
        assert_eq!(outbox.lock().frames.capacity(), 0, "no buffer while empty");
        outbox.offer(frame(6)).unwrap();
        assert!(flag.take());
        outbox.close();
        assert_eq!(outbox.offer(frame(7)), Err(OfferError::Closed));
        assert!(outbox.is_empty(), "a closed outbox drops its frames");
    }

    #[test]
    fn a_kick_wakes_the_connection() {
        let c = conn("a", "app");
        let flag = Arc::new(Flag::default());
        let waker = futures_util::task::waker(flag.clone());
        let mut cx = Context::from_waker(&waker);
        let mut kicked = std::pin::pin!(c.control.kicked());
        assert!(kicked.as_mut().poll(&mut cx).is_pending());
        c.control.kick(KickReason::Admin);
        c.control.kick(KickReason::SlowConsumer);
        assert!(flag.take());
        assert!(kicked.as_mut().poll(&mut cx).is_ready());
        assert_eq!(
            c.control.reason(),
            Some(KickReason::Admin),
            "the first reason wins"
        );
    }

    #[test]
    fn memory_limits_drop_stream_pushes_and_kick_for_others() {
        let node = Arc::new(QueuedBytes::new(100, 150));
        let c = |user: &str| {
            ConnHandle::new(
                user.into(),
                "app".into(),
                "d".into(),
                TransportKind::Tcp,
                64,
                node.clone(),
            )
        };
        let push = |seq: u64, len: usize| Outbound {
            payload: Bytes::from(vec![b'x'; len]),
            accepted: None,
            stamp: Stamp {
                id: MessageId(seq),
                seq,
            },
            skip: false,
        };
        let a = c("a");
        // A connection holding nothing takes a push larger than its limit.
        assert!(a.offer(push(1, 120)));
        assert_eq!((a.queued_bytes(), node.total()), (120, 120));
        // Past it, a stream push keeps its place but not its payload.
        assert!(a.offer(push(2, 10)));
        assert_eq!(a.queued_bytes(), 120);
        let b = c("b");
        assert!(b.offer(push(1, 20)));
        // Past the node's limit, likewise for a connection that holds something.
        assert!(b.offer(push(2, 20)));
        assert_eq!((b.queued_bytes(), node.total()), (20, 140));
        let frames: Vec<_> = match b.outbox.poll_recv(
            &mut Context::from_waker(futures_util::task::noop_waker_ref()),
            8,
        ) {
            Poll::Ready(f) => f.into_iter().collect(),
            Poll::Pending => panic!(),
        };
        assert!(!frames[0].is_evicted() && frames[1].is_evicted());
        assert_eq!(node.total(), 120, "taken out: the task accounts for them");
        // A broadcast (its payload shared by every recipient) meets only the connection's limit.
        b.set_held_bytes(20, 0);
        assert!(node.node_over() || node.total() + 40 > 150);
        assert!(b.offer(Outbound::unsequenced(Bytes::from(vec![b'y'; 40]), None)));
        assert_eq!(b.control.reason(), None);
        // Any other push past a limit kicks.
        assert!(!b.offer(Outbound::unsequenced(Bytes::from(vec![b'y'; 90]), None)));
        assert_eq!(b.control.reason(), Some(KickReason::SlowConsumer));
        drop((a, b));
        assert_eq!(node.total(), 0, "everything is given back");
    }

    #[test]
    fn full_outbox_kicks_slow_consumer() {
        let c = conn("a", "app");
        let frame = || Outbound::unsequenced(Bytes::from_static(b"{}"), None);
        assert!(c.offer(frame()));
        assert!(!c.offer(frame()));
        assert_eq!(c.control.reason(), Some(KickReason::SlowConsumer));
    }
}
