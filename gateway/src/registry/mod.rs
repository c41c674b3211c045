//! The local map: user id → the live connections of that user on this node, each with its channel
//! type. Registration applies the duplicate-login policy atomically per user (under the map's
//! shard lock), so two logins racing on the same node cannot both win.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use dashmap::DashMap;
use imgate_shared::KickReason;

use crate::base::Stamp;
use crate::config::DuplicateLoginPolicy;

mod handle;

pub use handle::{ConnHandle, Control, MemoryLimit, OfferError, Outbound, Outbox, QueuedBytes};

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
    use crate::base::TransportKind;
    use imgate_shared::MessageId;
    use std::collections::VecDeque;
    use std::future::Future;
    use std::task::{Context, Poll};

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
