//! Where a message goes. It gets a cluster-unique id, takes a place in the store's write queue
//! (or is refused before anything happens), is encoded once as a PUSH frame, and the same bytes
//! are queued on every live local connection of the recipient; for connections on other nodes
//! the cluster carries it over the bus (`cluster`). Then the row is handed to the store with its
//! delivery state, and the sender's receipt waits for the commit.

use std::sync::Arc;
use std::time::Instant;

use imgate_shared::protocol::{encode_push, Body, ErrorCode, PushFields};

use crate::logging::esc;
use imgate_shared::{KickReason, MessageId, SendStatus};

use crate::base::unix_millis;
use crate::base::{valid_user_id, Stamp, BROADCAST_TO};
use crate::cluster::holds::Reservation;
use crate::cluster::{Cluster, Route};
use crate::config::Settings;
use crate::ids::IdGenerator;
use crate::metrics::HotMetrics;
use crate::recipients::Recipients;
use crate::registry::Registry;
use crate::store::{DeliveryState, NewMessage, Store, StoreError, WritePermit};

/// A message accepted by this node.
#[derive(Debug)]
pub struct Message {
    pub id: MessageId,
    /// The sending user; `None` for system messages.
    pub from: Option<Arc<str>>,
    pub to: String,
    pub channel: Option<String>,
    pub body: Body,
    /// The sender's id for the message (idempotency key with sender and recipient).
    pub client_msg_id: Option<String>,
    /// A repetition of a message whose receipt never came: answered from the store when its
    /// first attempt is stored (see [`Router::begin`]).
    pub retry: bool,
    /// Acceptance time, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    pub accepted: Instant,
}

/// What became of a message for one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// The id the message is stored under (an earlier one for a repeated client message id);
    /// `None` when refused.
    pub id: Option<MessageId>,
    pub status: SendStatus,
    /// Live connections, on any node, the PUSH was queued on.
    pub connections: u32,
    pub reason: Option<ErrorCode>,
}

impl Delivery {
    pub fn refused(reason: ErrorCode) -> Self {
        Delivery {
            id: None,
            status: SendStatus::Refused,
            connections: 0,
            reason: Some(reason),
        }
    }
}

/// A message between [`Router::begin`] and [`Router::finish`]: it has its place in the store's
/// queue and has been queued on local connections.
pub struct Submission {
    row: NewMessage,
    stamp: Stamp,
    permit: WritePermit,
    payload: bytes::Bytes,
    local: u32,
    route: Route,
    /// Held until the write has succeeded or failed: until then, no connection skips the
    /// message's position as never stored.
    reservation: Reservation,
}

pub struct Router {
    registry: Arc<Registry>,
    ids: IdGenerator,
    channels: Vec<String>,
    metrics: HotMetrics,
    store: Store,
    cluster: Cluster,
    recipients: Recipients,
}

/// Longest wait for the database when a stream counter must start from it (a user's first
/// message since the counter was created or expired); then the message is refused.
const FLOOR_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Longest wait for the database when a retried send looks for its stored original; then it is
/// taken as a new message (and still stored only once).
const REPEAT_LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The protocol error a store refusal is reported with.
fn store_error_code(e: &StoreError) -> ErrorCode {
    match e {
        StoreError::Invalid(_) => ErrorCode::InvalidField,
        StoreError::Closed => ErrorCode::ShuttingDown,
        _ => ErrorCode::Unavailable,
    }
}

impl Router {
    pub fn new(
        settings: &Settings,
        registry: Arc<Registry>,
        tag: u16,
        metrics: HotMetrics,
        store: Store,
        cluster: Cluster,
    ) -> Self {
        Router {
            registry,
            ids: IdGenerator::new(tag),
            channels: settings.channels.types.clone(),
            metrics,
            recipients: Recipients::new(settings.delivery.recipients, store.clone()),
            store,
            cluster,
        }
    }

    /// Who may receive messages (`delivery.recipients`).
    pub fn recipients(&self) -> &Recipients {
        &self.recipients
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub fn is_channel(&self, channel: &str) -> bool {
        self.channels.iter().any(|c| c == channel)
    }

    /// Checks the addressing of a message before it is given an id.
    pub fn check(&self, to: &str, channel: Option<&str>) -> Result<(), ErrorCode> {
        if !valid_user_id(to) {
            return Err(ErrorCode::InvalidField);
        }
        if channel.is_some_and(|c| !self.is_channel(c)) {
            return Err(ErrorCode::UnknownChannel);
        }
        Ok(())
    }

    /// A new message id, time-ordered and unique in the cluster.
    pub fn next_id(&self) -> MessageId {
        self.ids.next()
    }

    /// Gives a message its id and acceptance time.
    pub fn accept(
        &self,
        from: Option<Arc<str>>,
        to: String,
        channel: Option<String>,
        body: Body,
        client_msg_id: Option<String>,
    ) -> Message {
        Message {
            id: self.next_id(),
            from,
            to,
            channel,
            body,
            client_msg_id,
            retry: false,
            ts_ms: unix_millis(),
            accepted: Instant::now(),
        }
    }

    /// For a retried send (one whose receipt never came): the stored message with the same
    /// sender, recipient and client message id, answered as a receipt without pushing it again.
    /// Its status is the original's: `delivered` if it reached a live connection (or a device has
    /// acknowledged it since), `stored` otherwise; `connections` is 0 (this attempt reached
    /// none). `None` when no such message is committed: then the retry is sent as a new message.
    /// (An original still in a writer's queue is not found: the retry is then pushed too, and
    /// stored once.)
    async fn repeat_of(&self, msg: &Message) -> Option<Delivery> {
        let client_msg_id = msg.client_msg_id.as_deref()?;
        let sender = msg.from.as_deref().unwrap_or("");
        let lookup = self
            .store
            .message_by_client_id(sender, &msg.to, client_msg_id);
        let stored = match tokio::time::timeout(REPEAT_LOOKUP_TIMEOUT, lookup).await {
            Ok(Ok(stored)) => stored?,
            failed => {
                crate::warn_limited!(
                    ?failed,
                    "cannot look up a retried message; taking it as new"
                );
                return None;
            }
        };
        self.metrics.repeated.increment(1);
        let status = match stored.state {
            DeliveryState::Pending => SendStatus::Stored,
            DeliveryState::Delivered | DeliveryState::Acknowledged => SendStatus::Delivered,
        };
        Some(Delivery {
            id: Some(stored.id),
            status,
            connections: 0,
            reason: None,
        })
    }

    /// Delivers an accepted message to its recipient wherever it is connected, stores it, and
    /// reports what became of it once the store has committed it.
    pub async fn submit(&self, msg: Message) -> Delivery {
        match self.begin(msg).await {
            Ok(submission) => self.finish(submission).await,
            Err(refused) => refused,
        }
    }

    /// The first half of [`submit`](Self::submit), which a connection runs in the order its
    /// sends arrive: answers a retry whose first attempt is stored (see `repeat_of`), checks
    /// the row against the store, takes a place in the store's queue (waiting up to
    /// `store.enqueue_timeout_ms`; a refusal here reaches nobody), and queues the PUSH on the
    /// recipient's local connections. `Err` is the answer when nothing more is to be done.
    pub async fn begin(&self, msg: Message) -> Result<Submission, Delivery> {
        if msg.retry {
            if let Some(answer) = self.repeat_of(&msg).await {
                return Err(answer);
            }
        }
        // Before anything is kept for the recipient: a refused one leaves no state.
        if let Err(code) = self.recipients.check(&msg.to).await {
            return Err(self.refused(code));
        }
        let row = NewMessage {
            id: msg.id,
            sender: msg.from.as_deref().map(str::to_owned),
            recipient: msg.to.clone(),
            channel: msg.channel.clone(),
            body: msg.body.get().to_owned(),
            client_msg_id: msg.client_msg_id.clone(),
            created_at_ms: msg.ts_ms,
            state: DeliveryState::Pending,
            seq: 0,
        };
        if let Err(e) = self.store.check(&row) {
            return Err(self.refused(store_error_code(&e)));
        }
        let permit = match self.store.reserve().await {
            Ok(permit) => permit,
            Err(e) => return Err(self.refused(store_error_code(&e))),
        };
        // The position is taken once the row is sure to be written (its place is reserved), so
        // that positions have no gaps unless the node crashes before the commit.
        let floor = || async {
            // Its own task: a read given up on is not cut off mid-query.
            let (store, to) = (self.store.clone(), msg.to.clone());
            let read = tokio::spawn(async move { store.stream_head(&to).await });
            match tokio::time::timeout(FLOOR_TIMEOUT, read).await {
                Ok(Ok(Ok(head))) => Ok(head),
                failed => {
                    crate::warn_limited!(?failed, "cannot read the stream head");
                    Err(crate::cluster::ClusterError::Unavailable)
                }
            }
        };
        let mut row = row;
        let reservation = self.cluster.reserve(&msg.to);
        let position = self
            .cluster
            .next_position(&msg.to, msg.channel.as_deref(), floor)
            .await;
        let route = match position {
            Ok(p) => {
                row.seq = p.seq;
                reservation.taken(p.seq);
                p.route
            }
            Err(e) => {
                crate::warn_limited!(error = %esc(&e), to = ?msg.to, "no stream position; message refused");
                return Err(self.refused(ErrorCode::Unavailable));
            }
        };
        let stamp = Stamp {
            id: msg.id,
            seq: row.seq,
        };
        let payload = encode_push(&PushFields {
            id: msg.id,
            seq: Some(row.seq),
            from: msg.from.as_deref(),
            to: &msg.to,
            channel: msg.channel.as_deref(),
            client_msg_id: msg.client_msg_id.as_deref(),
            body: msg.body.as_raw(),
            ts: msg.ts_ms,
        });
        let local = self.registry.deliver(
            &msg.to,
            msg.channel.as_deref(),
            stamp,
            &payload,
            msg.accepted,
        );
        Ok(Submission {
            row,
            stamp,
            permit,
            payload,
            local,
            route,
            reservation,
        })
    }

    /// The second half of [`submit`](Self::submit): delivery on other nodes, then the row goes
    /// to the store with its delivery state, and the result waits for the commit.
    pub async fn finish(&self, s: Submission) -> Delivery {
        let Submission {
            mut row,
            stamp,
            permit,
            payload,
            local,
            route,
            reservation,
        } = s;
        let mut connections = local;
        if self.cluster.is_clustered() {
            let remote = self
                .cluster
                .deliver_remote_via(
                    &row.recipient,
                    row.channel.as_deref(),
                    stamp,
                    payload,
                    route,
                )
                .await;
            connections += remote.connections;
        }
        if connections > 0 {
            row.state = DeliveryState::Delivered;
        }
        let id = row.id;
        let written = permit.write(row).await;
        // Written or given up: no longer a position that may still come.
        drop(reservation);
        match written {
            Ok(persisted) => {
                let status = if connections > 0 {
                    self.metrics.delivered.increment(1);
                    SendStatus::Delivered
                } else {
                    self.metrics.stored.increment(1);
                    SendStatus::Stored
                };
                Delivery {
                    id: Some(persisted.stored_id(id)),
                    status,
                    connections,
                    reason: None,
                }
            }
            Err(e) => {
                crate::warn_limited!(error = %esc(&e), %id, "message not stored");
                self.refused(store_error_code(&e))
            }
        }
    }

    /// Counts a refused message.
    pub fn refused(&self, reason: ErrorCode) -> Delivery {
        self.metrics.refused.increment(1);
        Delivery::refused(reason)
    }

    /// Queues one PUSH (addressed to `*`) on every live connection of `channel` (all when `None`)
    /// in the cluster; returns the message id and how many connections it reached.
    pub async fn broadcast(
        &self,
        from: Option<&str>,
        channel: Option<&str>,
        body: &Body,
    ) -> (MessageId, usize) {
        let id = self.next_id();
        let payload = encode_push(&PushFields {
            id,
            seq: None,
            from,
            to: BROADCAST_TO,
            channel,
            client_msg_id: None,
            body: body.as_raw(),
            ts: unix_millis(),
        });
        let mut reached = self.registry.broadcast(channel, &payload);
        if self.cluster.is_clustered() {
            reached += self
                .cluster
                .broadcast_remote(channel, payload)
                .await
                .connections as usize;
        }
        self.metrics.broadcast_deliveries.increment(reached as u64);
        (id, reached)
    }

    /// Kicks every connection of `user` (of `channel` when given) in the cluster; returns how many.
    pub async fn kick(&self, user: &str, channel: Option<&str>, reason: KickReason) -> usize {
        let mut kicked = self.registry.kick_user(user, channel, reason);
        if self.cluster.is_clustered() {
            kicked += self
                .cluster
                .kick_remote(user, channel, reason)
                .await
                .connections as usize;
        }
        kicked
    }
}
