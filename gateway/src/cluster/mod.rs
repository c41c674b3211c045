//! The cluster: how a node reaches users connected to other nodes.
//!
//! - `bus.rs`: publish/subscribe between nodes, in-process ([`LocalBus`], the embedded single
//!   node) or Redis pub/sub ([`RedisBus`]). Everything else talks to the [`Bus`] trait.
//! - `presence.rs`: which node holds which user's connections, with the duplicate-login policy
//!   applied across nodes atomically by a Lua script at registration.
//! - `nodes.rs`: the node registry (what "live" means) and message-id tags.
//! - `remote.rs`: requests to other nodes and answers to theirs; `envelope.rs`: what travels on
//!   the bus; `upkeep.rs`: the maintenance loop; `scripts.rs`: the Lua scripts and their
//!   contracts; `metrics.rs`: metric names; `streams.rs`: per-user stream positions;
//!   `sessions.rs`: sessions for fast reconnect; `batch.rs`: coalescing of concurrent Redis calls;
//!   `holds.rs`: positions taken and not yet stored, and whether a missing one may still come.
//!
//! A delivery to a remote user is one request over the bus: `broadcast` routing publishes it on
//! `{p}:bus:all`, `routed` routing looks the user up in presence (in the same Redis call that
//! gives the message its stream position) and publishes it on the channels of the nodes holding
//! the user only. Every node that receives a request answers on the sender's channel with how many
//! of its connections took it (zero included), so the sender can tell "delivered" from "stored":
//! it waits for as many answers as PUBLISH reported receivers, up to `request_timeout_ms`, and
//! never counts a delivery that did not happen.
//!
//! Redis work per message does not grow with the rate: messages queued for one channel while a
//! PUBLISH to it is outstanding leave together in the next PUBLISH (answers included), and the
//! positions and routes of concurrent messages are read in one script call (`batch.rs`).
//!
//! Without `cluster.redis_url` the node runs alone: the bus is in-process, remote operations reach
//! nobody (zero, complete), presence and the node list come from the node itself.
//!
//! Redis keys and channels, all under `{p}` = `cluster.key_prefix`:
//!
//! | name                  | type    | what                                                       |
//! |-----------------------|---------|------------------------------------------------------------|
//! | `{p}:bus:all`         | channel | every node subscribes: broadcast routing, broadcasts       |
//! | `{p}:bus:node:{id}`   | channel | one node's own: routed deliveries, replies, kicks          |
//! | `{p}:node:{id}`       | string  | a node's registry record (JSON), TTL `node_ttl_ms`         |
//! | `{p}:nodes`           | zset    | node ids by start time, to list nodes without SCAN         |
//! | `{p}:tag:{n}`         | string  | the node instance holding message-id tag `n`, same TTL     |
//! | `{p}:presence:{user}` | hash    | the user's connections on every node (one field each)      |
//! | `{p}:seq:{user}`      | string  | the user's stream counter (`streams.rs`), TTL 30 days       |
//! | `{p}:epoch`           | string  | the stream epoch (`epochs.rs`), no TTL                      |

mod batch;
pub mod bus;
mod envelope;
pub mod epochs;
pub mod holds;
mod keys;
pub mod metrics;
mod nodes;
mod presence;
mod remote;
mod scripts;
mod sessions;
mod streams;
mod upkeep;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use dashmap::DashMap;
use imgate_shared::KickReason;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::{timeout_at, Instant};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{debug, info, warn};

pub use bus::{Bus, BusError, BusMessage, LocalBus, RedisBus, Subscription};
pub use sessions::{Resume, Session, SessionCheck, SessionTicket};
pub use streams::{Position, Route};

use crate::base::unix_millis;
use crate::config::{DuplicateLoginPolicy, RoutingMode, Settings};
use crate::ids::IdGenerator;
use bus::RedisOptions;
use envelope::Envelope;
use keys::Keys;
use metrics::{gauge_nodes, BusMetrics, Kind};
use nodes::{Identity, NodeRegistry};
use presence::{Presence, Registration};
use scripts::Scripts;

/// Replies waiting to be published; beyond this a reply is dropped (its requester times out and
/// reports an incomplete delivery) rather than letting them pile up while Redis is slow.
const MAX_REPLIES_IN_FLIGHT: usize = 10_000;
/// Duplicate-login kicks kept for retry while they cannot be published.
const MAX_OWED_KICKS: usize = 10_000;

/// What the cluster asks of the local node when another node addresses it.
pub trait LocalNode: Send + Sync + 'static {
    /// Queues `push` (an encoded push frame, at `stamp` in the user's stream) on every live
    /// local connection of `user` (of `channel` if Some); returns how many connections took it.
    fn deliver_local(
        &self,
        user: &str,
        channel: Option<&str>,
        stamp: crate::base::Stamp,
        push: Bytes,
    ) -> u32;
    /// Queues `push` on every live local connection (of `channel` if Some); returns how many.
    fn broadcast_local(&self, channel: Option<&str>, push: Bytes) -> usize;
    /// Kicks the local connection `conn_id` of `user` if it still exists; returns whether it did.
    fn kick_connection(&self, user: &str, conn_id: u64, reason: KickReason) -> bool;
    /// Kicks the local connection `conn_id` of `user` for a duplicate login by a RESUME of the
    /// same device, which takes its session over: the session is not revoked. Returns whether
    /// it did.
    fn kick_connection_keeping_session(&self, user: &str, conn_id: u64) -> bool {
        self.kick_connection(user, conn_id, KickReason::DuplicateLogin)
    }
    /// Kicks every local connection of `user` (of `channel` if Some); returns how many.
    fn kick_user(&self, user: &str, channel: Option<&str>, reason: KickReason) -> usize;
    /// Every live local connection, to re-register presence after Redis comes back.
    fn local_connections(&self) -> Vec<LocalConnection>;
    fn connection_count(&self) -> usize;
}

/// A connection of this node, as presence records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalConnection {
    pub conn_id: u64,
    pub user: String,
    pub channel: String,
    pub device_id: String,
    pub transport: String,
    pub connected_since_ms: u64,
}

/// A live connection somewhere in the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEntry {
    pub node_id: String,
    pub conn_id: u64,
    pub user_id: String,
    pub channel: String,
    pub device_id: String,
    pub transport: String,
    pub connected_since_ms: u64,
}

/// A live node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: String,
    /// TCP `host:port` clients connect to.
    pub client_addr: String,
    pub ws_url: String,
    pub connections: usize,
    pub started_at_ms: u64,
    /// When the node last refreshed its registration.
    pub last_seen_ms: u64,
}

/// How far a message (or kick) got on other nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteDelivery {
    /// Connections on other nodes that took it.
    pub connections: u32,
    /// Whether every node addressed answered in time. `false` when the bus is down, a publish
    /// failed, or an answer did not come within `request_timeout_ms`: then `connections` counts
    /// only the answers that came, and more connections may have been reached.
    pub complete: bool,
}

impl RemoteDelivery {
    const NONE: RemoteDelivery = RemoteDelivery {
        connections: 0,
        complete: true,
    };
    const UNAVAILABLE: RemoteDelivery = RemoteDelivery {
        connections: 0,
        complete: false,
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegisterOutcome {
    Registered,
    /// reject_new: the user is connected on this channel type elsewhere.
    Rejected,
    /// The user holds `channels.max_connections_per_user` connections in the cluster.
    TooMany,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClusterError {
    /// Redis could not be reached within `cluster.connect_timeout_ms`, or the URL is invalid.
    #[error("cannot connect to Redis: {0}")]
    Connect(String),
    /// Another live node uses this node id; it stayed registered for longer than
    /// `cluster.node_ttl_ms`.
    #[error("node id {0:?} is in use by another live node: give this node another id (node.id), or stop the other node")]
    NodeIdTaken(String),
    /// The configured `node.tag` is held by another live node.
    #[error("message-id tag {0} (node.tag) is in use by another live node")]
    TagTaken(u16),
    #[error("no free message-id tag: all 1024 are held by live nodes")]
    NoFreeTag,
    /// Redis is down or did not answer in time, or this node has left the cluster.
    #[error("the cluster is unavailable (Redis is down or did not answer in time)")]
    Unavailable,
    #[error("Redis error: {0}")]
    Redis(String),
}

impl ClusterError {
    fn redis(e: fred::error::Error) -> Self {
        use fred::error::ErrorKind;
        match e.kind() {
            ErrorKind::Timeout | ErrorKind::IO | ErrorKind::Canceled | ErrorKind::Backpressure => {
                ClusterError::Unavailable
            }
            _ => ClusterError::Redis(e.to_string()),
        }
    }
}

/// This node's handle on the cluster. Cheap to clone. [`Cluster::leave`] leaves gracefully;
/// dropping the last handle without leaving stops the cluster tasks and closes the Redis
/// connections like a crash would (this node's registrations then expire after `node_ttl_ms`).
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
    _alive: Arc<DropGuard>,
}

struct Redis {
    bus: Arc<RedisBus>,
    presence: Presence,
    nodes: NodeRegistry,
    scripts: Arc<Scripts>,
}

struct Inner {
    me: Arc<Identity>,
    tag: u16,
    routing: RoutingMode,
    keys: Arc<Keys>,
    request_timeout: Duration,
    refresh_interval: Duration,
    local: Arc<dyn LocalNode>,
    bus: Arc<dyn Bus>,
    redis: Option<Redis>,
    /// Requests waiting for replies: request id → where replies' counts go.
    pending: DashMap<u64, mpsc::UnboundedSender<u64>>,
    /// Hole checks waiting for replies: request id → where (node, count) replies go.
    holds: DashMap<u64, mpsc::UnboundedSender<(String, u64)>>,
    /// Stream positions this node has taken and not settled (see `holds.rs`).
    reservations: Arc<holds::Reservations>,
    /// With Redis: the stream epoch this node names in position calls (see `epochs.rs`).
    epoch: Arc<epochs::EpochCell>,
    epoch_sync: tokio::sync::Mutex<()>,
    /// The epoch this node has recorded as used (`u64::MAX`: none yet).
    epoch_marked: AtomicU64,
    epoch_source: std::sync::OnceLock<Arc<dyn epochs::EpochSource>>,
    next_req: AtomicU64,
    metrics: BusMetrics,
    stop: CancellationToken,
    left: AtomicBool,
    /// Held by each maintenance round and by `leave`, so that a refresh never re-creates the
    /// registration `leave` just removed.
    upkeep: tokio::sync::Mutex<()>,
    tag_lost: AtomicBool,
    /// Duplicate-login kicks that could not be published: (channel, message).
    owed_kicks: std::sync::Mutex<Vec<(String, Bytes)>>,
    /// With Redis: stream positions (and routes) of concurrent messages, asked in batches.
    positions: Option<streams::Positions>,
    /// Embedded only: stream counters per user.
    seqs: DashMap<Arc<str>, u64>,
    /// Embedded only: sessions by id, with their expiry.
    sessions: DashMap<String, (Session, std::time::Instant)>,
    sessions_created: AtomicU64,
    session_ttl: Duration,
}

enum Targets {
    /// Every node, on `{p}:bus:all`.
    All,
    /// These nodes, on their own channels.
    Nodes(Vec<String>),
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("node_id", &self.inner.me.node_id)
            .field("instance", &self.inner.me.instance)
            .field("clustered", &self.is_clustered())
            .field("routing", &self.inner.routing)
            .field("tag", &self.inner.tag)
            .finish()
    }
}

impl Cluster {
    /// Joins the cluster (or starts the embedded bus when `cluster.redis_url` is absent): connects
    /// to Redis (retrying up to `connect_timeout_ms`), claims the node id (waiting up to
    /// `node_ttl_ms` for a crashed predecessor's registration to expire) and a message-id tag,
    /// subscribes to the bus and starts the receive and maintenance tasks.
    pub async fn start(
        settings: &Settings,
        local: Arc<dyn LocalNode>,
    ) -> Result<Cluster, ClusterError> {
        let c = &settings.cluster;
        let client_addr = settings.advertised_client_addr();
        let me = Arc::new(Identity {
            node_id: settings.node.id.clone(),
            instance: format!("{:016x}", rand::random::<u64>()),
            ws_url: format!("ws://{client_addr}/ws"),
            client_addr,
            started_at_ms: unix_millis(),
        });
        let keys = Arc::new(Keys::new(&c.key_prefix, &me.node_id));
        let metrics = BusMetrics::new(c.routing);
        let stop = CancellationToken::new();
        let node_ttl = Duration::from_millis(c.node_ttl_ms);
        let refresh_interval = Duration::from_millis(c.refresh_interval_ms);
        let request_timeout = Duration::from_millis(c.request_timeout_ms);
        let derived_tag = IdGenerator::tag_for(&me.node_id);

        let (bus, redis, tag): (Arc<dyn Bus>, Option<Redis>, u16) = match &c.redis_url {
            None => {
                metrics::gauge_bus_up(true);
                gauge_nodes(1);
                (
                    Arc::new(LocalBus::new()),
                    None,
                    settings.node.tag.unwrap_or(derived_tag),
                )
            }
            Some(url) => {
                let opts = RedisOptions {
                    url: url.expose().to_owned(),
                    command_timeout: request_timeout,
                    connect_timeout: Duration::from_millis(c.connect_timeout_ms),
                };
                let redis_bus = Arc::new(
                    RedisBus::connect(&opts, stop.clone(), metrics.clone())
                        .await
                        .map_err(ClusterError::Connect)?,
                );
                let scripts = Arc::new(Scripts::new());
                let nodes = NodeRegistry::new(
                    redis_bus.client.clone(),
                    scripts.clone(),
                    keys.clone(),
                    me.clone(),
                    node_ttl,
                );
                let joined = async {
                    scripts
                        .load_all(&redis_bus.client)
                        .await
                        .map_err(|e| ClusterError::Redis(format!("loading scripts: {e}")))?;
                    let connections = local.connection_count();
                    // A crashed predecessor's claims expire within node_ttl; a live node's never.
                    let wait = node_ttl + refresh_interval;
                    nodes.claim(connections, Instant::now() + wait).await?;
                    let tag = match nodes
                        .claim_tag(settings.node.tag, derived_tag, Instant::now() + wait)
                        .await
                    {
                        Ok(t) => t,
                        Err(e) => {
                            let _ = nodes.leave().await;
                            return Err(e);
                        }
                    };
                    nodes
                        .refresh(connections)
                        .await
                        .map_err(ClusterError::redis)?;
                    Ok(tag)
                }
                .await;
                let tag = match joined {
                    Ok(t) => t,
                    Err(e) => {
                        redis_bus.close().await;
                        stop.cancel();
                        return Err(e);
                    }
                };
                let presence = Presence::new(
                    redis_bus.client.clone(),
                    scripts.clone(),
                    keys.clone(),
                    me.node_id.clone(),
                    me.instance.clone(),
                    settings.channels.clone(),
                );
                let bus: Arc<dyn Bus> = redis_bus.clone();
                (
                    bus,
                    Some(Redis {
                        bus: redis_bus,
                        presence,
                        nodes,
                        scripts,
                    }),
                    tag,
                )
            }
        };

        let subscription = match bus
            .subscribe(vec![keys.bus_all.clone(), keys.my_channel.clone()])
            .await
        {
            Ok(s) => s,
            Err(e) => {
                if let Some(r) = &redis {
                    let _ = r.nodes.leave().await;
                    r.bus.close().await;
                }
                stop.cancel();
                return Err(ClusterError::Connect(format!(
                    "subscribing to the bus: {e}"
                )));
            }
        };

        let epoch = Arc::new(epochs::EpochCell::default());
        let positions = redis.as_ref().map(|r| {
            streams::positions(
                r.bus.client.clone(),
                r.scripts.clone(),
                keys.clone(),
                epoch.clone(),
                c.routing,
                stop.clone(),
            )
        });
        let inner = Arc::new(Inner {
            me,
            tag,
            routing: c.routing,
            keys,
            request_timeout,
            refresh_interval,
            local,
            bus,
            redis,
            pending: DashMap::new(),
            holds: DashMap::new(),
            reservations: Arc::default(),
            epoch,
            epoch_sync: tokio::sync::Mutex::new(()),
            epoch_marked: AtomicU64::new(u64::MAX),
            epoch_source: std::sync::OnceLock::new(),
            next_req: AtomicU64::new(1),
            metrics,
            stop: stop.clone(),
            left: AtomicBool::new(false),
            upkeep: tokio::sync::Mutex::new(()),
            tag_lost: AtomicBool::new(false),
            owed_kicks: std::sync::Mutex::new(Vec::new()),
            positions,
            seqs: DashMap::new(),
            sessions: DashMap::new(),
            sessions_created: AtomicU64::new(0),
            session_ttl: Duration::from_secs(settings.delivery.session_ttl_secs),
        });
        tokio::spawn(inner.clone().receive(subscription));
        if inner.redis.is_some() {
            tokio::spawn(inner.clone().maintain());
        }
        info!(
            node = %inner.me.node_id,
            instance = %inner.me.instance,
            tag,
            clustered = inner.redis.is_some(),
            routing = metrics::mode_label(inner.routing),
            "joined the cluster"
        );
        Ok(Cluster {
            inner,
            _alive: Arc::new(stop.drop_guard()),
        })
    }

    /// Whether the node runs with Redis (else it is alone with an in-process bus).
    pub fn is_clustered(&self) -> bool {
        self.inner.redis.is_some()
    }

    /// Whether other nodes can be reached now (for `/readyz`). Always true when embedded.
    pub fn bus_up(&self) -> bool {
        !self.inner.left.load(Ordering::Acquire) && self.inner.bus.is_up()
    }

    /// The message-id tag claimed for this node, unique among live nodes: build the node's
    /// `IdGenerator` with it.
    pub fn node_tag(&self) -> u16 {
        self.inner.tag
    }

    pub fn node_id(&self) -> &str {
        &self.inner.me.node_id
    }

    /// This process's random instance id: tells a restarted node from its predecessor.
    pub fn instance(&self) -> &str {
        &self.inner.me.instance
    }

    pub fn routing(&self) -> RoutingMode {
        self.inner.routing
    }

    /// Queues `push` (an encoded push frame) on the connections of `user` (of `channel` if Some)
    /// held by OTHER nodes; the caller delivers to this node's own connections.
    pub async fn deliver_remote(
        &self,
        user: &str,
        channel: Option<&str>,
        stamp: crate::base::Stamp,
        push: Bytes,
    ) -> RemoteDelivery {
        self.deliver_remote_via(user, channel, stamp, push, Route::UNKNOWN)
            .await
    }

    /// [`deliver_remote`](Self::deliver_remote) to the nodes `route` names when it was read
    /// with the message's position (see [`next_position`](Self::next_position)).
    pub async fn deliver_remote_via(
        &self,
        user: &str,
        channel: Option<&str>,
        stamp: crate::base::Stamp,
        push: Bytes,
        route: Route,
    ) -> RemoteDelivery {
        let inner = &self.inner;
        let Some(redis) = &inner.redis else {
            return RemoteDelivery::NONE;
        };
        let known = match route.0 {
            Some(nodes) if nodes.is_empty() => return RemoteDelivery::NONE,
            Some(nodes) => Some(Targets::Nodes(nodes)),
            None => None,
        };
        let deadline = Instant::now() + inner.request_timeout;
        if !self.bus_up() {
            inner.metrics.incomplete(Kind::Deliver).increment(1);
            return RemoteDelivery::UNAVAILABLE;
        }
        let Some(raw) = inner.checked_push(&push, Kind::Deliver) else {
            return RemoteDelivery::UNAVAILABLE;
        };
        let targets = match known {
            Some(targets) => targets,
            None => match inner
                .targets(redis, user, channel, deadline, Kind::Deliver)
                .await
            {
                Ok(targets) => targets,
                Err(nobody) => return nobody,
            },
        };
        let me = &inner.me;
        inner
            .request(Kind::Deliver, targets, deadline, |req| {
                Envelope::Deliver {
                    req,
                    from: me.node_id.as_str().into(),
                    from_instance: me.instance.as_str().into(),
                    user: user.into(),
                    channel: channel.map(Into::into),
                    id: stamp.id,
                    seq: stamp.seq,
                    push: raw,
                }
                .encode()
            })
            .await
    }

    /// Queues `push` on every connection (of `channel` if Some) of every OTHER node; returns the
    /// connections reached there.
    pub async fn broadcast_remote(&self, channel: Option<&str>, push: Bytes) -> RemoteDelivery {
        let inner = &self.inner;
        if inner.redis.is_none() {
            return RemoteDelivery::NONE;
        }
        let deadline = Instant::now() + inner.request_timeout;
        if !self.bus_up() {
            inner.metrics.incomplete(Kind::Broadcast).increment(1);
            return RemoteDelivery::UNAVAILABLE;
        }
        let Some(raw) = inner.checked_push(&push, Kind::Broadcast) else {
            return RemoteDelivery::UNAVAILABLE;
        };
        let me = &inner.me;
        inner
            .request(Kind::Broadcast, Targets::All, deadline, |req| {
                Envelope::Broadcast {
                    req,
                    from: me.node_id.as_str().into(),
                    from_instance: me.instance.as_str().into(),
                    channel: channel.map(Into::into),
                    push: raw,
                }
                .encode()
            })
            .await
    }

    /// Kicks the connections of `user` (of `channel` if Some) on OTHER nodes; returns how many
    /// were kicked there.
    pub async fn kick_remote(
        &self,
        user: &str,
        channel: Option<&str>,
        reason: KickReason,
    ) -> RemoteDelivery {
        let inner = &self.inner;
        let Some(redis) = &inner.redis else {
            return RemoteDelivery::NONE;
        };
        let deadline = Instant::now() + inner.request_timeout;
        if !self.bus_up() {
            inner.metrics.incomplete(Kind::KickUser).increment(1);
            return RemoteDelivery::UNAVAILABLE;
        }
        let targets = match inner
            .targets(redis, user, channel, deadline, Kind::KickUser)
            .await
        {
            Ok(targets) => targets,
            Err(nobody) => return nobody,
        };
        let me = &inner.me;
        inner
            .request(Kind::KickUser, targets, deadline, |req| {
                Envelope::KickUser {
                    req,
                    from: me.node_id.as_str().into(),
                    from_instance: me.instance.as_str().into(),
                    user: user.into(),
                    channel: channel.map(Into::into),
                    reason,
                }
                .encode()
            })
            .await
    }

    /// Records a new connection in cluster presence, applying `policy` across nodes, atomically:
    /// under kick_old the user's connections of the same channel type on OTHER nodes are removed
    /// from presence and kicked there (each by node instance and connection id, so a late kick
    /// never closes a newer connection); under reject_new the login is refused if another node
    /// holds one. Between connections of this node the local registry decides.
    ///
    /// Call it after the connection is in the local registry (which already applied the policy
    /// locally), and on `Rejected` remove it again and refuse the login. If Redis is down the
    /// login proceeds (`Registered`) and the entry is written when Redis is back. Embedded:
    /// always `Registered`. `Err(Unavailable)` only after [`Cluster::leave`].
    pub async fn register(
        &self,
        conn: &LocalConnection,
        policy: DuplicateLoginPolicy,
    ) -> Result<RegisterOutcome, ClusterError> {
        self.register_as(conn, policy, false).await
    }

    /// [`register`](Self::register) for a login that is a RESUME when `resuming`: connections of
    /// the same device it displaces keep their session (the RESUME takes it over).
    pub async fn register_as(
        &self,
        conn: &LocalConnection,
        policy: DuplicateLoginPolicy,
        resuming: bool,
    ) -> Result<RegisterOutcome, ClusterError> {
        let inner = &self.inner;
        let Some(redis) = &inner.redis else {
            return Ok(RegisterOutcome::Registered);
        };
        if inner.left.load(Ordering::Acquire) {
            return Err(ClusterError::Unavailable);
        }
        if !redis.bus.commands_up() {
            redis.presence.owe(conn);
            return Ok(RegisterOutcome::Registered);
        }
        let deadline = Instant::now() + inner.request_timeout;
        match timeout_at(deadline, redis.presence.register(conn, policy)).await {
            Ok(Ok(Registration::Rejected)) => Ok(RegisterOutcome::Rejected),
            Ok(Ok(Registration::TooMany)) => Ok(RegisterOutcome::TooMany),
            Ok(Ok(Registration::Registered {
                generation,
                displaced,
            })) => {
                debug!(user = ?conn.user, conn = conn.conn_id, generation, displaced = displaced.len(), "registered in presence");
                let keep_device = resuming.then_some(conn.device_id.as_str());
                inner.kick_displaced(displaced, keep_device, deadline).await;
                Ok(RegisterOutcome::Registered)
            }
            failed => {
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".to_owned(),
                };
                crate::warn_limited!(error = %crate::logging::esc(&error), user = ?conn.user, "presence registration failed; it is written when Redis answers");
                redis.presence.owe(conn);
                Ok(RegisterOutcome::Registered)
            }
        }
    }

    /// Removes a closed connection from cluster presence (retried later if Redis is down).
    pub async fn unregister(&self, user: &str, conn_id: u64) {
        if let Some(redis) = &self.inner.redis {
            let send = redis.bus.commands_up() && !self.inner.left.load(Ordering::Acquire);
            redis.presence.unregister(user, conn_id, send).await;
        }
    }

    /// Every live connection of `user` in the cluster (embedded: this node's).
    pub async fn presence(&self, user: &str) -> Result<Vec<PresenceEntry>, ClusterError> {
        let inner = &self.inner;
        let Some(redis) = &inner.redis else {
            let mut out: Vec<PresenceEntry> = inner
                .local
                .local_connections()
                .into_iter()
                .filter(|c| c.user == user)
                .map(|c| PresenceEntry {
                    node_id: inner.me.node_id.clone(),
                    conn_id: c.conn_id,
                    user_id: c.user,
                    channel: c.channel,
                    device_id: c.device_id,
                    transport: c.transport,
                    connected_since_ms: c.connected_since_ms,
                })
                .collect();
            sort_entries(&mut out);
            return Ok(out);
        };
        inner.check_commands(redis)?;
        inner.metrics.lookups_query.increment(1);
        let entries = redis
            .presence
            .entries(user)
            .await
            .map_err(ClusterError::redis)?;
        let mut out: Vec<PresenceEntry> = entries.into_iter().map(Into::into).collect();
        sort_entries(&mut out);
        Ok(out)
    }

    /// The live nodes, in start order (embedded: this one).
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, ClusterError> {
        let inner = &self.inner;
        let Some(redis) = &inner.redis else {
            let me = &inner.me;
            return Ok(vec![NodeInfo {
                id: me.node_id.clone(),
                client_addr: me.client_addr.clone(),
                ws_url: me.ws_url.clone(),
                connections: inner.local.connection_count(),
                started_at_ms: me.started_at_ms,
                last_seen_ms: unix_millis(),
            }]);
        };
        inner.check_commands(redis)?;
        redis.nodes.list().await.map_err(ClusterError::redis)
    }

    /// Leaves gracefully: removes this node's presence entries and registry entry, stops the
    /// cluster tasks and closes the Redis connections. Call it after the node's clients are gone.
    pub async fn leave(&self) {
        let inner = &self.inner;
        if inner.left.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(redis) = &inner.redis {
            let _one = inner.upkeep.lock().await;
            if redis.bus.commands_up() {
                let bound = inner.request_timeout * 5;
                let cleanup = async {
                    redis.presence.remove_all().await;
                    if let Err(e) = redis.nodes.leave().await {
                        warn!(error = %crate::logging::esc(&e), "removing this node from the registry failed; it expires after node_ttl_ms");
                    }
                };
                if tokio::time::timeout(bound, cleanup).await.is_err() {
                    warn!("leaving the cluster timed out; this node's entries expire after node_ttl_ms");
                }
            }
            inner.stop.cancel();
            redis.bus.close().await;
        }
        inner.stop.cancel();
        info!(node = %inner.me.node_id, "left the cluster");
    }
}

fn sort_entries(v: &mut [PresenceEntry]) {
    v.sort_by(|a, b| {
        (a.connected_since_ms, &a.node_id, a.conn_id).cmp(&(
            b.connected_since_ms,
            &b.node_id,
            b.conn_id,
        ))
    });
}
