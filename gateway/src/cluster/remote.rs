//! Requests to other nodes and what this node does with theirs: a request is published once (on
//! `{p}:bus:all` or on the addressed nodes' channels), every node that receives it acts through
//! [`LocalNode`](super::LocalNode) and answers on the sender's channel with a count, and the
//! sender sums the answers it was promised by PUBLISH's receiver count until its deadline.
//! Duplicate-login kicks name one connection and get no answer.

use crate::config::RoutingMode;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use dashmap::DashMap;
use futures_util::future::join_all;
use imgate_shared::KickReason;
use tokio::sync::mpsc;
use tokio::time::{timeout_at, Instant};
use tracing::{debug, error};

use super::bus::{split, BusError, BusMessage, Subscription};
use super::envelope::{push_bytes, raw_push, Envelope};
use super::metrics::Kind;
use super::presence::StoredEntry;
use super::{
    ClusterError, Inner, Redis, RemoteDelivery, Targets, MAX_OWED_KICKS, MAX_REPLIES_IN_FLIGHT,
};

/// Removes a pending request when its requester returns or is cancelled.
struct PendingGuard<'a> {
    pending: &'a DashMap<u64, mpsc::UnboundedSender<u64>>,
    req: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.pending.remove(&self.req);
    }
}

/// Removes a pending hole check when its requester returns or is cancelled.
struct HoldsGuard<'a> {
    holds: &'a DashMap<u64, mpsc::UnboundedSender<(String, u64)>>,
    req: u64,
}

impl Drop for HoldsGuard<'_> {
    fn drop(&mut self) {
        self.holds.remove(&self.req);
    }
}

impl Inner {
    pub(super) fn check_commands(&self, redis: &Redis) -> Result<(), ClusterError> {
        if self.left.load(Ordering::Acquire) || !redis.bus.commands_up() {
            Err(ClusterError::Unavailable)
        } else {
            Ok(())
        }
    }

    pub(super) fn checked_push<'p>(
        &self,
        push: &'p Bytes,
        kind: Kind,
    ) -> Option<&'p serde_json::value::RawValue> {
        match raw_push(push) {
            Ok(raw) => Some(raw),
            Err(e) => {
                error!(error = %crate::logging::esc(&e), "push frame is not JSON; not sent to other nodes");
                debug_assert!(false, "push frame is not JSON: {e}");
                self.metrics.incomplete(kind).increment(1);
                None
            }
        }
    }

    /// The other live nodes holding `user` (of `channel`), or `None` if presence cannot be read.
    pub(super) async fn route(
        &self,
        redis: &Redis,
        user: &str,
        channel: Option<&str>,
        deadline: Instant,
    ) -> Option<Vec<String>> {
        self.metrics.lookups_route.increment(1);
        match timeout_at(deadline, redis.presence.nodes_of(user, channel)).await {
            Ok(Ok(mut nodes)) => {
                nodes.retain(|n| *n != self.me.node_id);
                Some(nodes)
            }
            Ok(Err(e)) => {
                debug!(error = %crate::logging::esc(&e), "presence lookup failed");
                None
            }
            Err(_) => None,
        }
    }

    /// Where a request about `user` (of `channel`) goes under the routing mode: every node, or
    /// the other nodes holding the user. `Err` carries the answer when there is nobody to ask
    /// (no holder: complete) or presence cannot be read (incomplete, counted).
    pub(super) async fn targets(
        &self,
        redis: &Redis,
        user: &str,
        channel: Option<&str>,
        deadline: Instant,
        kind: Kind,
    ) -> Result<Targets, RemoteDelivery> {
        match self.routing {
            RoutingMode::Broadcast => Ok(Targets::All),
            RoutingMode::Routed => match self.route(redis, user, channel, deadline).await {
                Some(nodes) if nodes.is_empty() => Err(RemoteDelivery::NONE),
                Some(nodes) => Ok(Targets::Nodes(nodes)),
                None => {
                    self.metrics.incomplete(kind).increment(1);
                    Err(RemoteDelivery::UNAVAILABLE)
                }
            },
        }
    }

    pub(super) async fn publish(
        &self,
        kind: Kind,
        channel: &str,
        payload: Bytes,
    ) -> Result<usize, BusError> {
        let started = std::time::Instant::now();
        let r = self.bus.publish(channel, payload).await;
        if r.is_ok() {
            self.metrics.latency.record(started.elapsed().as_secs_f64());
            self.metrics.published(kind).increment(1);
        }
        r
    }

    /// Publishes a request and sums the replies' counts: as many replies as PUBLISH reported
    /// receivers (less this node on `{p}:bus:all`), until `request_timeout`.
    pub(super) async fn request(
        &self,
        kind: Kind,
        targets: Targets,
        deadline: Instant,
        encode: impl FnOnce(u64) -> Bytes,
    ) -> RemoteDelivery {
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.pending.insert(req, tx);
        let _pending = PendingGuard {
            pending: &self.pending,
            req,
        };
        let payload = encode(req);
        let mut complete = true;
        let expected = match targets {
            Targets::All => {
                match timeout_at(deadline, self.publish(kind, &self.keys.bus_all, payload)).await {
                    // This node receives its own message too, and ignores it.
                    Ok(Ok(n)) => n.saturating_sub(1),
                    _ => {
                        self.metrics.incomplete(kind).increment(1);
                        return RemoteDelivery::UNAVAILABLE;
                    }
                }
            }
            Targets::Nodes(nodes) => {
                let channels: Vec<String> =
                    nodes.iter().map(|n| self.keys.node_channel(n)).collect();
                let sent = join_all(
                    channels
                        .iter()
                        .map(|c| self.publish(kind, c, payload.clone())),
                );
                match timeout_at(deadline, sent).await {
                    Ok(results) => results
                        .into_iter()
                        .map(|r| match r {
                            Ok(n) if n > 0 => n,
                            // No subscriber: the node is gone or its bus is down; its
                            // connections (if any) were not reached.
                            _ => {
                                complete = false;
                                0
                            }
                        })
                        .sum(),
                    Err(_) => {
                        self.metrics.incomplete(kind).increment(1);
                        return RemoteDelivery::UNAVAILABLE;
                    }
                }
            }
        };
        let mut connections = 0u64;
        let mut replies = 0usize;
        while replies < expected {
            match timeout_at(deadline, rx.recv()).await {
                Ok(Some(n)) => {
                    replies += 1;
                    connections += n;
                }
                _ => {
                    complete = false;
                    break;
                }
            }
        }
        if !complete {
            self.metrics.incomplete(kind).increment(1);
        }
        RemoteDelivery {
            connections: connections.min(u64::from(u32::MAX)) as u32,
            complete,
        }
    }

    /// The lowest of `user`'s positions `from..=to` that the other live nodes hold, 0 when none
    /// (see `holds.rs`): `None` unless every node in the registry answered by the request
    /// timeout.
    pub(super) async fn holds_elsewhere(
        &self,
        redis: &Redis,
        user: &str,
        from: u64,
        to: u64,
    ) -> Option<u64> {
        let deadline = Instant::now() + self.request_timeout;
        if self.check_commands(redis).is_err() {
            return None;
        }
        // The nodes are listed before the question is published: a node that starts later
        // cannot hold a position that was taken before.
        let nodes = match timeout_at(deadline, redis.nodes.list()).await {
            Ok(Ok(nodes)) => nodes,
            _ => return None,
        };
        let mut waiting: std::collections::HashSet<String> = nodes
            .into_iter()
            .map(|n| n.id)
            .filter(|id| *id != self.me.node_id)
            .collect();
        if waiting.is_empty() {
            return Some(0);
        }
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.holds.insert(req, tx);
        let _pending = HoldsGuard {
            holds: &self.holds,
            req,
        };
        let payload = Envelope::Holds {
            req,
            from: self.me.node_id.as_str().into(),
            from_instance: self.me.instance.as_str().into(),
            user: user.into(),
            from_seq: from,
            to_seq: to,
        }
        .encode();
        match timeout_at(
            deadline,
            self.publish(Kind::Holds, &self.keys.bus_all, payload),
        )
        .await
        {
            Ok(Ok(_)) => {}
            _ => {
                self.metrics.incomplete(Kind::Holds).increment(1);
                return None;
            }
        }
        let mut held = 0;
        while !waiting.is_empty() {
            match timeout_at(deadline, rx.recv()).await {
                Ok(Some((node, lowest))) => {
                    if waiting.remove(&node) {
                        held = super::holds::lowest_of(held, lowest);
                    }
                }
                _ => {
                    self.metrics.incomplete(Kind::Holds).increment(1);
                    return None;
                }
            }
        }
        Some(held)
    }

    /// Kicks the connections a kick_old registration displaced, each on its own node.
    /// Kicks the connections a registration displaced; those of `keep_device` (the device of a
    /// RESUME, which takes their session over) keep their session.
    pub(super) async fn kick_displaced(
        &self,
        displaced: Vec<StoredEntry>,
        keep_device: Option<&str>,
        deadline: Instant,
    ) {
        let sends: Vec<(String, Bytes)> = displaced
            .into_iter()
            // Never returned by the script: between our own connections the local registry decides.
            .filter(|e| e.node_instance != self.me.instance)
            .map(|e| {
                let payload = Envelope::KickConn {
                    instance: e.node_instance.as_str().into(),
                    conn_id: e.conn_id,
                    user: e.user_id.as_str().into(),
                    generation: e.generation,
                    reason: KickReason::DuplicateLogin,
                    keep_session: keep_device == Some(e.device_id.as_str()),
                }
                .encode();
                (self.keys.node_channel(&e.node_id), payload)
            })
            .collect();
        if sends.is_empty() {
            return;
        }
        let published = join_all(
            sends
                .iter()
                .map(|(channel, payload)| self.publish(Kind::KickConn, channel, payload.clone())),
        );
        let results = match timeout_at(deadline, published).await {
            Ok(results) => results,
            Err(_) => sends.iter().map(|_| Err(BusError::Down)).collect(),
        };
        for (send, r) in sends.into_iter().zip(results) {
            match r {
                Ok(_) => self.metrics.kicks_sent.increment(1),
                Err(e) => {
                    crate::warn_limited!(error = %crate::logging::esc(&e), "publishing a duplicate-login kick failed; retrying");
                    self.owe_kick(send);
                }
            }
        }
    }

    /// Keeps a kick that could not be published, for the next maintenance round.
    fn owe_kick(&self, send: (String, Bytes)) {
        let mut owed = self.owed_kicks.lock().expect("not poisoned");
        if owed.len() >= MAX_OWED_KICKS {
            owed.remove(0);
        }
        owed.push(send);
    }

    /// Publishes the kicks owed. A kick is never lost for good even without this: the displaced
    /// node finds its entry gone at its next re-registration and kicks the connection itself.
    pub(super) async fn send_owed_kicks(&self) {
        let owed = std::mem::take(&mut *self.owed_kicks.lock().expect("not poisoned"));
        for (channel, payload) in owed {
            match self
                .publish(Kind::KickConn, &channel, payload.clone())
                .await
            {
                Ok(_) => self.metrics.kicks_sent.increment(1),
                Err(_) => self.owe_kick((channel, payload)),
            }
        }
    }

    /// Reads the bus until the cluster stops.
    pub(super) async fn receive(self: Arc<Self>, mut subscription: Subscription) {
        loop {
            let msg = tokio::select! {
                _ = self.stop.cancelled() => return,
                m = subscription.recv() => m,
            };
            match msg {
                Some(m) => self.dispatch(m),
                None => return,
            }
        }
    }

    /// Acts on every message of a received payload (one PUBLISH may carry several).
    fn dispatch(self: &Arc<Self>, msg: BusMessage) {
        for one in split(&msg.payload) {
            match one {
                Ok(payload) => self.dispatch_one(&msg.channel, payload),
                Err(e) => {
                    self.metrics.undecodable.increment(1);
                    debug!(error = %crate::logging::esc(&e), channel = ?msg.channel, "undecodable bus message");
                }
            }
        }
    }

    fn dispatch_one(self: &Arc<Self>, channel: &str, payload: Bytes) {
        let env = match Envelope::decode(&payload) {
            Ok(e) => e,
            Err(e) => {
                self.metrics.undecodable.increment(1);
                debug!(error = %crate::logging::esc(&e), ?channel, "undecodable bus message");
                return;
            }
        };
        self.metrics.received(env.kind()).increment(1);
        let mine = self.me.instance.as_str();
        match env {
            Envelope::Deliver {
                req,
                from,
                from_instance,
                user,
                channel,
                id,
                seq,
                push,
            } => {
                if from_instance == mine {
                    return;
                }
                let n = self.local.deliver_local(
                    &user,
                    channel.as_deref(),
                    crate::base::Stamp { id, seq },
                    push_bytes(&payload, push),
                );
                self.reply(&from, &from_instance, req, u64::from(n));
            }
            Envelope::Broadcast {
                req,
                from,
                from_instance,
                channel,
                push,
            } => {
                if from_instance == mine {
                    return;
                }
                let n = self
                    .local
                    .broadcast_local(channel.as_deref(), push_bytes(&payload, push));
                self.reply(&from, &from_instance, req, n as u64);
            }
            Envelope::KickUser {
                req,
                from,
                from_instance,
                user,
                channel,
                reason,
            } => {
                if from_instance == mine {
                    return;
                }
                let n = self.local.kick_user(&user, channel.as_deref(), reason);
                self.reply(&from, &from_instance, req, n as u64);
            }
            Envelope::KickConn {
                instance,
                conn_id,
                user,
                generation,
                reason,
                keep_session,
            } => {
                // A kick names one connection of one node instance: a restarted node (new
                // instance) or a newer connection (new conn id) is never closed by it.
                let kicked = instance == mine
                    && if keep_session {
                        self.local.kick_connection_keeping_session(&user, conn_id)
                    } else {
                        self.local.kick_connection(&user, conn_id, reason)
                    };
                if kicked {
                    self.metrics.kicks_applied.increment(1);
                    debug!(user = ?user, conn = conn_id, generation, "kicked: logged in on another node");
                } else {
                    self.metrics.kicks_stale.increment(1);
                }
            }
            Envelope::Reply {
                req,
                to_instance,
                node,
                count,
            } => {
                if to_instance == mine {
                    if let Some(tx) = self.pending.get(&req) {
                        let _ = tx.send(count);
                    } else if let Some(tx) = self.holds.get(&req) {
                        let _ = tx.send((node.into_owned(), count));
                    }
                }
            }
            Envelope::Holds {
                req,
                from,
                from_instance,
                user,
                from_seq,
                to_seq,
            } => {
                if from_instance == mine {
                    return;
                }
                // Answered once this node's reservations of the user made before the question
                // have their positions: in a task, not to hold up the receive loop.
                let (inner, user, from, from_instance) = (
                    self.clone(),
                    user.into_owned(),
                    from.into_owned(),
                    from_instance.into_owned(),
                );
                tokio::spawn(async move {
                    let lowest = inner
                        .reservations
                        .lowest_when_known(&user, from_seq, to_seq);
                    if let Ok(n) = tokio::time::timeout(inner.request_timeout, lowest).await {
                        inner.reply(&from, &from_instance, req, n);
                    }
                });
            }
            Envelope::Ping { .. } => {}
        }
    }

    /// Answers request `req` of `to_node` without holding up the receive loop: the answer joins
    /// the queue of the requester's channel.
    fn reply(&self, to_node: &str, to_instance: &str, req: u64, count: u64) {
        let payload = Envelope::Reply {
            req,
            to_instance: to_instance.into(),
            node: self.me.node_id.as_str().into(),
            count,
        }
        .encode();
        let channel = self.keys.node_channel(to_node);
        if self.bus.post(&channel, payload, MAX_REPLIES_IN_FLIGHT) {
            self.metrics.published(Kind::Reply).increment(1);
        } else {
            self.metrics.reply_backlog.increment(1);
        }
    }
}
