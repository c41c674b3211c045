//! Configuration: one typed [`Settings`], layered defaults → TOML file → environment (`IMGATE_*`,
//! nested keys joined by `__`, e.g. `IMGATE_AUTH__SECRET`) → command-line flags. Unknown keys are
//! refused; secrets are masked in `Debug` output.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// The JWT secret used when none is configured. Only for development: a loud warning says so.
pub const DEV_JWT_SECRET: &str = "imgate-dev-secret-do-not-use-in-production";
/// The admin token used when none is configured. Only for development: a loud warning says so.
pub const DEV_ADMIN_TOKEN: &str = "imgate-dev-admin-token";

/// A string that never shows up in logs or `Debug` output.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub node: NodeSettings,
    pub client: ClientSettings,
    pub heartbeat: HeartbeatSettings,
    pub channels: ChannelSettings,
    pub auth: AuthSettings,
    pub admin: AdminSettings,
    pub log: LogSettings,
    pub shutdown: ShutdownSettings,
    pub store: StoreSettings,
    pub cluster: ClusterSettings,
    pub delivery: DeliverySettings,
}

/// Reliable delivery: per-device streams, acknowledgements, catch-up and sessions.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySettings {
    /// How long messages are replayed to devices that were away: older ones are reported as
    /// `expired` instead.
    pub retention_secs: u64,
    /// An unacknowledged push is sent again after this long.
    pub ack_timeout_ms: u64,
    /// Retransmissions of one push before the connection is closed (KICK `ack_timeout`).
    pub max_retransmits: u32,
    /// Most pushes of one connection awaiting acknowledgement; further ones wait.
    pub window: usize,
    /// A missing stream position is looked up in the database after this long, and again
    /// every this long while it is missing. It is skipped only when the database does not have
    /// it and no live node holds it (never because of time alone).
    pub gap_timeout_ms: u64,
    /// Sessions (for RESUME) expire after this long without a resume.
    pub session_ttl_secs: u64,
    /// Who may receive messages: `any` user id, or only users the cluster `known`s (who logged
    /// in once, or were registered through the admin API); others are refused with
    /// UNKNOWN_RECIPIENT and leave no state.
    pub recipients: RecipientPolicy,
}

/// Who may receive messages (`delivery.recipients`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RecipientPolicy {
    /// Any valid user id: a message to a user who never logged in is stored for them.
    #[default]
    Any,
    /// Only users who logged in once or were registered (`PUT /api/v1/users/{user}`).
    Known,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            retention_secs: 7 * 24 * 3600,
            ack_timeout_ms: 10_000,
            max_retransmits: 3,
            window: 256,
            gap_timeout_ms: 1_000,
            session_ttl_secs: 24 * 3600,
            recipients: RecipientPolicy::Any,
        }
    }
}

/// Where messages are kept: SQLite (a file; the embedded default) or MySQL/MariaDB.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// `sqlite://path/to/file.db` or `mysql://user:password@host:port/database`.
    pub url: Secret,
    /// Database connections of this node.
    pub pool_size: u32,
    /// Most rows the writer puts in one multi-row INSERT.
    pub batch_max_rows: usize,
    /// Longest time the writer waits to fill a batch.
    pub batch_max_delay_ms: u64,
    /// How often queued device cursors are written: acknowledgements of one device in that
    /// time cost one row update. 0 writes them with every batch.
    pub cursor_flush_ms: u64,
    /// Messages queued for the writer before new ones wait.
    pub queue_capacity: usize,
    /// Longest time a new message waits for room in a full queue before it is refused.
    pub enqueue_timeout_ms: u64,
    /// New messages are refused at once while the oldest message not yet committed has waited
    /// longer than this (the database is slower than the messages come): a queue that stays
    /// full would only make every receipt late. 0: no limit by age.
    pub max_queue_age_ms: u64,
    /// First and longest delay between retries while the database is down.
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// How long start-up keeps retrying an unreachable database before giving up.
    pub connect_timeout_ms: u64,
}

/// How messages travel between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoutingMode {
    /// One topic every node subscribes to; nodes without the recipient ignore the message.
    Broadcast,
    /// A presence table says which nodes hold the recipient; only they are addressed.
    Routed,
}

/// The cluster: absent `redis_url` means a single node with an in-process bus.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSettings {
    /// `redis://host:port`; when absent the node runs alone.
    pub redis_url: Option<Secret>,
    /// Prefix of every Redis key and channel of this cluster.
    pub key_prefix: String,
    pub routing: RoutingMode,
    /// A node that stops refreshing its registry entry for this long is taken for dead.
    pub node_ttl_ms: u64,
    /// How often a node refreshes its registry entry.
    pub refresh_interval_ms: u64,
    /// Longest time a sender waits for other nodes to report a delivery.
    pub request_timeout_ms: u64,
    /// How long start-up keeps retrying an unreachable Redis before giving up.
    pub connect_timeout_ms: u64,
}

impl Default for StoreSettings {
    fn default() -> Self {
        StoreSettings {
            url: Secret::new("sqlite://imgate.db"),
            pool_size: 8,
            batch_max_rows: 1000,
            batch_max_delay_ms: 5,
            cursor_flush_ms: 1_000,
            queue_capacity: 100_000,
            enqueue_timeout_ms: 1_000,
            max_queue_age_ms: 2_000,
            retry_initial_ms: 100,
            retry_max_ms: 5_000,
            connect_timeout_ms: 60_000,
        }
    }
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            redis_url: None,
            key_prefix: "imgate".into(),
            routing: RoutingMode::Routed,
            node_ttl_ms: 10_000,
            refresh_interval_ms: 3_000,
            request_timeout_ms: 1_000,
            connect_timeout_ms: 60_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSettings {
    /// This node's id, unique in the cluster.
    pub id: String,
    /// 10-bit tag mixed into message ids; derived from `id` when absent.
    pub tag: Option<u16>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientSettings {
    /// Address for client connections: TCP frames and WebSocket (`/ws`) on the same port.
    pub listen: SocketAddr,
    /// The address clients are told to connect to (defaults to `listen`).
    pub advertise: Option<String>,
    /// Most connections this node holds; more are refused with `SERVER_FULL`. Absent: derived
    /// from the process's open-file limit (see [`resolve_max_connections`]).
    pub max_connections: Option<usize>,
    /// Most connections that have not logged in yet; more are refused with `SERVER_FULL`.
    pub max_pending_logins: usize,
    /// Most connections from one IP address (an IPv6 /64) that have not logged in yet.
    pub max_pending_logins_per_ip: usize,
    /// Longest frame payload accepted, in bytes.
    pub max_frame_len: usize,
    /// Time a new connection has to log in.
    pub login_timeout_ms: u64,
    /// Frames queued for one connection before it is disconnected as a slow consumer.
    pub outbox_capacity: usize,
    /// Longest time one write to a client may take before it is disconnected as a slow consumer.
    pub write_timeout_ms: u64,
    /// WebSocket read buffer per connection, in bytes.
    pub ws_read_buffer: usize,
    /// WebSocket write buffer per connection, in bytes.
    pub ws_write_buffer: usize,
    /// Most payload bytes one connection may hold queued in the node's memory: its outbox, its
    /// stream pushes awaiting acknowledgement or their turn, and frames being written. Beyond it
    /// a stream push is dropped from memory (it is stored, and read back from the database when
    /// the connection has room) and any other push kicks the connection as a slow consumer.
    pub max_queued_bytes: usize,
    /// Most payload bytes all connections of the node together may hold queued. Beyond it,
    /// only connections with nothing queued take new pushes in memory; the others are treated
    /// as if they were past `max_queued_bytes`.
    pub max_queued_bytes_total: usize,
    /// Sends per second one connection may make (a token bucket refilled at this rate); 0
    /// means no limit. A send beyond it is refused with `RATE_LIMITED`.
    pub send_rate: f64,
    /// Sends one connection may make at once, above the rate (the bucket's size).
    pub send_burst: u32,
    /// Most sends of all connections of the node taken and not yet answered. Beyond it a send is
    /// refused at once with `UNAVAILABLE` and `retry_after_ms`: under overload the node answers
    /// every send quickly instead of queueing more than it can process in time.
    pub max_unanswered_sends: usize,
    /// Sends per second one user may make over all its connections on this node; 0 means no
    /// limit.
    pub user_send_rate: f64,
    /// Sends one user may make at once over all its connections on this node.
    pub user_send_burst: u32,
    /// Logins (and resumes) per second accepted from one source IP address; 0 (the default)
    /// means no limit. An attempt beyond it is refused with `RATE_LIMITED` and the connection
    /// closed. Off by default: behind a proxy or load balancer that hides client addresses,
    /// every client has the proxy's address.
    pub login_rate: f64,
    /// Logins one source address may attempt at once, above the rate.
    pub login_burst: u32,
    /// Most source addresses whose login rate is tracked at once; when the table is full and
    /// none of its entries is idle, logins from new addresses are refused with `RATE_LIMITED`.
    pub login_rate_max_addresses: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeartbeatSettings {
    /// Shortest interval the server accepts.
    pub min_ms: u64,
    /// Longest interval the server accepts.
    pub max_ms: u64,
    /// Interval for clients that state no range.
    pub default_ms: u64,
    /// A connection silent for more than this many intervals is closed.
    pub missed: u32,
}

/// What happens when a user logs in again on a channel type where a connection exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DuplicateLoginPolicy {
    /// The new connection wins; the old one gets KICK `duplicate_login`.
    KickOld,
    /// The new connection is refused with `DUPLICATE_LOGIN`.
    RejectNew,
    /// Both stay connected.
    AllowMultiple,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChannelSettings {
    /// The channel types clients may log in with.
    pub types: Vec<String>,
    /// The duplicate-login policy of every channel type not in `duplicate_login_by_type`.
    pub duplicate_login: DuplicateLoginPolicy,
    /// Per-channel-type overrides of `duplicate_login`.
    pub duplicate_login_by_type: BTreeMap<String, DuplicateLoginPolicy>,
    /// Most live connections of one user in the whole cluster (all channel types); a login
    /// beyond it is refused with `TOO_MANY_CONNECTIONS`. 0 means no limit.
    pub max_connections_per_user: u32,
}

impl ChannelSettings {
    pub fn policy(&self, channel: &str) -> DuplicateLoginPolicy {
        self.duplicate_login_by_type
            .get(channel)
            .copied()
            .unwrap_or(self.duplicate_login)
    }
}

/// JWT algorithms accepted for login tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    HS256,
    RS256,
    ES256,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    pub algorithm: JwtAlgorithm,
    /// Shared secret for HS256.
    pub secret: Option<Secret>,
    /// PEM file with the public key for RS256/ES256.
    pub public_key_file: Option<PathBuf>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    /// Clock skew allowed when checking `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// Longest token lifetime accepted, in seconds, when set: `exp` at most this long after
    /// `iat` (when the token has one) and after now (plus the leeway).
    pub max_token_lifetime_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// Address of the admin API, `/metrics`, `/healthz` and `/readyz`.
    pub listen: SocketAddr,
    /// Bearer token required by the admin API.
    pub token: Option<Secret>,
    /// Most open admin connections; one more is answered 503 and closed.
    pub max_connections: usize,
    /// A connection with no request in progress (a new one too) is closed after this long.
    pub idle_timeout_ms: u64,
    /// Longest time from a request's first byte to the end of its head.
    pub header_timeout_ms: u64,
    /// Longest time from a request's head to the end of its body; then 408 and close.
    pub body_timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// A tracing filter, e.g. `info` or `imgate=debug,info`; `RUST_LOG` wins when set.
    pub level: String,
    pub format: LogFormat,
    /// Lines one rate-limited warning site (one a client can cause per message or connection)
    /// may log per `repeat_interval_ms`; the rest are counted and summarised.
    pub repeat_limit: u32,
    /// The interval of `repeat_limit`, in milliseconds.
    pub repeat_interval_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownSettings {
    /// Longest time a graceful shutdown waits for connections to close.
    pub grace_ms: u64,
}

impl Default for NodeSettings {
    fn default() -> Self {
        NodeSettings {
            id: "node-1".into(),
            tag: None,
        }
    }
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            listen: "0.0.0.0:7400".parse().expect("valid address"),
            advertise: None,
            max_connections: None,
            max_pending_logins: 4_096,
            max_pending_logins_per_ip: 256,
            max_frame_len: imgate_shared::codec::DEFAULT_MAX_FRAME_LEN,
            login_timeout_ms: imgate_shared::protocol::DEFAULT_LOGIN_TIMEOUT_MS,
            outbox_capacity: 256,
            write_timeout_ms: 10_000,
            ws_read_buffer: 1024,
            ws_write_buffer: 4096,
            max_queued_bytes: 1024 * 1024,
            max_queued_bytes_total: 1024 * 1024 * 1024,
            send_rate: 100.0,
            send_burst: 200,
            max_unanswered_sends: 1_024,
            user_send_rate: 200.0,
            user_send_burst: 400,
            login_rate: 0.0,
            login_burst: 100,
            login_rate_max_addresses: 100_000,
        }
    }
}

impl Default for HeartbeatSettings {
    fn default() -> Self {
        HeartbeatSettings {
            min_ms: 5_000,
            max_ms: 300_000,
            default_ms: 30_000,
            missed: 3,
        }
    }
}

impl Default for ChannelSettings {
    fn default() -> Self {
        ChannelSettings {
            types: ["app", "web", "pc"].map(String::from).to_vec(),
            duplicate_login: DuplicateLoginPolicy::KickOld,
            duplicate_login_by_type: BTreeMap::new(),
            max_connections_per_user: 32,
        }
    }
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            algorithm: JwtAlgorithm::HS256,
            secret: None,
            public_key_file: None,
            issuer: None,
            audience: None,
            leeway_secs: 5,
            max_token_lifetime_secs: None,
        }
    }
}

impl Default for AdminSettings {
    fn default() -> Self {
        AdminSettings {
            listen: "127.0.0.1:7401".parse().expect("valid address"),
            token: None,
            max_connections: 256,
            idle_timeout_ms: 60_000,
            header_timeout_ms: 5_000,
            body_timeout_ms: 10_000,
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: "info".into(),
            format: LogFormat::Text,
            repeat_limit: 10,
            repeat_interval_ms: 10_000,
        }
    }
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        ShutdownSettings { grace_ms: 10_000 }
    }
}

/// Descriptors a node keeps besides client sockets and the pools counted separately: standard
/// streams, listeners, log files, the reserve descriptor, Redis connections, DNS and spares.
pub const BASE_DESCRIPTORS: u64 = 64;

/// `client.max_connections` when the open-file limit is unknown or unlimited.
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;

/// The client connection limit: the configured one, or what the open-file limit `nofile` leaves
/// after `headroom` descriptors (see [`Settings::descriptor_headroom`]). A configured value above
/// what the limit leaves is lowered to it (the second value is then the configured one, for a
/// warning): past it, `accept` would fail with EMFILE before `SERVER_FULL` could apply.
pub fn resolve_max_connections(
    configured: Option<usize>,
    nofile: Option<u64>,
    headroom: u64,
) -> (usize, Option<usize>) {
    let Some(nofile) = nofile else {
        return (configured.unwrap_or(DEFAULT_MAX_CONNECTIONS), None);
    };
    let room = usize::try_from(nofile.saturating_sub(headroom).max(1)).unwrap_or(usize::MAX);
    match configured {
        None => (room, None),
        Some(n) if n > room => (room, Some(n)),
        Some(n) => (n, None),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error(transparent)]
    Figment(#[from] Box<figment::Error>),
}

impl Settings {
    /// Loads settings: defaults, then `file` (TOML) when given, then `IMGATE_*` environment
    /// variables, then `overrides` (command-line flags, as a partial settings tree).
    pub fn load(file: Option<&Path>, overrides: impl Serialize) -> Result<Settings, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::Invalid(format!(
                    "config file {} does not exist",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file(file));
        }
        figment = figment
            .merge(Env::prefixed("IMGATE_").split("__").ignore(&["config"]))
            .merge(Serialized::defaults(overrides));
        let settings: Settings = figment.extract().map_err(Box::new)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what serde cannot: ranges and consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        let hb = &self.heartbeat;
        if self.node.id.is_empty() || self.node.id.len() > imgate_shared::protocol::MAX_ID_LEN {
            return invalid("node.id must be 1 to 128 bytes");
        }
        if matches!(self.node.tag, Some(t) if t >= 1024) {
            return invalid("node.tag must be below 1024");
        }
        if hb.min_ms == 0
            || hb.min_ms > hb.max_ms
            || !(hb.min_ms..=hb.max_ms).contains(&hb.default_ms)
        {
            return invalid("heartbeat needs 0 < min_ms <= default_ms <= max_ms");
        }
        if hb.missed == 0 {
            return invalid("heartbeat.missed must be at least 1");
        }
        if self.channels.types.is_empty() {
            return invalid("channels.types must name at least one channel type");
        }
        if let Some(t) = self
            .channels
            .types
            .iter()
            .find(|t| !crate::base::valid_id(t))
        {
            return Err(ConfigError::Invalid(format!(
                "channel type {t:?} in channels.types must be {}",
                crate::base::ID_RULE
            )));
        }
        for t in self.channels.duplicate_login_by_type.keys() {
            if !self.channels.types.contains(t) {
                return Err(ConfigError::Invalid(format!(
                    "channels.duplicate_login_by_type names unknown channel type {t:?}"
                )));
            }
        }
        if self.client.max_frame_len < 256 || self.client.max_frame_len > 16 * 1024 * 1024 {
            return invalid("client.max_frame_len must be between 256 bytes and 16 MiB");
        }
        let c = &self.client;
        if c.outbox_capacity == 0
            || c.max_connections == Some(0)
            || c.max_pending_logins == 0
            || c.max_unanswered_sends == 0
            || c.max_pending_logins_per_ip == 0
        {
            return invalid("client.outbox_capacity, client.max_connections, client.max_pending_logins, client.max_unanswered_sends and client.max_pending_logins_per_ip must be positive");
        }
        let a = &self.admin;
        if a.max_connections == 0
            || a.idle_timeout_ms == 0
            || a.header_timeout_ms == 0
            || a.body_timeout_ms == 0
        {
            return invalid(
                "admin.max_connections, admin.idle_timeout_ms, admin.header_timeout_ms and admin.body_timeout_ms must be positive",
            );
        }
        let c = &self.client;
        if c.max_queued_bytes < 64 * 1024 || c.max_queued_bytes_total < c.max_queued_bytes {
            return invalid(
                "client.max_queued_bytes must be at least 65536 and at most client.max_queued_bytes_total",
            );
        }
        for (name, rate, burst) in [
            ("client.send_rate", c.send_rate, c.send_burst),
            ("client.user_send_rate", c.user_send_rate, c.user_send_burst),
            ("client.login_rate", c.login_rate, c.login_burst),
        ] {
            if !rate.is_finite() || rate < 0.0 || (rate > 0.0 && burst == 0) {
                return Err(ConfigError::Invalid(format!(
                    "{name} must be 0 (no limit) or positive with a positive burst"
                )));
            }
        }
        if c.login_rate_max_addresses == 0 {
            return invalid("client.login_rate_max_addresses must be positive");
        }
        let url = self.store.url.expose();
        if !(url.starts_with("sqlite:")
            || url.starts_with("mysql://")
            || url.starts_with("mariadb://"))
        {
            return invalid("store.url must start with sqlite: or mysql://");
        }
        if self.store.batch_max_rows == 0
            || self.store.queue_capacity == 0
            || self.store.pool_size == 0
        {
            return invalid(
                "store.batch_max_rows, store.queue_capacity and store.pool_size must be positive",
            );
        }
        if self.store.cursor_flush_ms > 60_000 {
            return invalid("store.cursor_flush_ms must be at most 60000");
        }
        let d = &self.delivery;
        if d.window == 0 || d.window > 65_536 {
            return invalid("delivery.window must be between 1 and 65536");
        }
        if d.ack_timeout_ms == 0 || d.gap_timeout_ms == 0 || d.session_ttl_secs == 0 {
            return invalid(
                "delivery.ack_timeout_ms, delivery.gap_timeout_ms and delivery.session_ttl_secs must be positive",
            );
        }
        if d.retention_secs == 0 {
            return invalid("delivery.retention_secs must be positive");
        }
        let c = &self.cluster;
        if c.refresh_interval_ms == 0 || c.refresh_interval_ms * 2 > c.node_ttl_ms {
            return invalid("cluster.refresh_interval_ms must be positive and at most half of cluster.node_ttl_ms");
        }
        if c.key_prefix.is_empty() {
            return invalid("cluster.key_prefix must not be empty");
        }
        if self.log.repeat_limit == 0 || self.log.repeat_interval_ms == 0 {
            return invalid("log.repeat_limit and log.repeat_interval_ms must be positive");
        }
        if self.auth.max_token_lifetime_secs == Some(0) {
            return invalid("auth.max_token_lifetime_secs must be positive when set");
        }
        match self.auth.algorithm {
            JwtAlgorithm::HS256 if self.auth.public_key_file.is_some() => {
                invalid("auth.public_key_file needs algorithm RS256 or ES256")
            }
            JwtAlgorithm::RS256 | JwtAlgorithm::ES256 if self.auth.public_key_file.is_none() => {
                invalid("algorithms RS256 and ES256 need auth.public_key_file")
            }
            _ => Ok(()),
        }
    }

    /// Descriptors the node needs besides client sockets: [`BASE_DESCRIPTORS`], the database
    /// pool and the admin port's connections.
    pub fn descriptor_headroom(&self) -> u64 {
        BASE_DESCRIPTORS + u64::from(self.store.pool_size) + self.admin.max_connections as u64
    }

    /// The address clients are told to connect to.
    pub fn advertised_client_addr(&self) -> String {
        self.client
            .advertise
            .clone()
            .unwrap_or_else(|| self.client.listen.to_string())
    }

    /// The admin token, or the development default.
    pub fn admin_token(&self) -> &str {
        self.admin
            .token
            .as_ref()
            .map(Secret::expose)
            .unwrap_or(DEV_ADMIN_TOKEN)
    }

    /// The HS256 secret, or the development default.
    pub fn jwt_secret(&self) -> &str {
        self.auth
            .secret
            .as_ref()
            .map(Secret::expose)
            .unwrap_or(DEV_JWT_SECRET)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_secrets_are_masked() {
        let mut s = Settings::default();
        s.validate().unwrap();
        s.auth.secret = Some(Secret::new("hunter2"));
        let debug = format!("{s:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("***"));
    }

    #[test]
    fn max_connections_default_to_what_the_open_file_limit_leaves() {
        // Not configured: the limit less the headroom.
        assert_eq!(
            resolve_max_connections(None, Some(20_000), 400),
            (19_600, None)
        );
        // Configured within the limit: as configured.
        assert_eq!(
            resolve_max_connections(Some(5_000), Some(20_000), 400),
            (5_000, None)
        );
        // Configured above it: lowered, and the configured value returned for a warning.
        assert_eq!(
            resolve_max_connections(Some(100_000), Some(20_000), 400),
            (19_600, Some(100_000))
        );
        // A limit below the headroom still leaves one connection.
        assert_eq!(resolve_max_connections(None, Some(100), 400), (1, None));
        // Unlimited or unknown: the configured value, or the fixed default.
        assert_eq!(
            resolve_max_connections(None, None, 400),
            (DEFAULT_MAX_CONNECTIONS, None)
        );
        assert_eq!(resolve_max_connections(Some(7), None, 400), (7, None));
        // The headroom counts the database pool and the admin port.
        let s = Settings::default();
        assert_eq!(
            s.descriptor_headroom(),
            BASE_DESCRIPTORS + 8 + s.admin.max_connections as u64
        );
    }

    #[test]
    fn connection_limits_must_be_positive() {
        let mut s = Settings::default();
        s.client.max_pending_logins_per_ip = 0;
        assert!(s.validate().is_err());
        let mut s = Settings::default();
        s.client.max_connections = Some(0);
        assert!(s.validate().is_err());
        let mut s = Settings::default();
        s.admin.body_timeout_ms = 0;
        assert!(s.validate().is_err());
    }

    #[test]
    fn limits_are_validated() {
        let check = |f: fn(&mut Settings)| {
            let mut s = Settings::default();
            f(&mut s);
            s.validate()
        };
        assert!(check(|s| s.client.max_queued_bytes = 1024).is_err());
        assert!(check(|s| s.client.max_queued_bytes_total = 1024 * 1024 - 1).is_err());
        assert!(check(|s| s.client.send_rate = -1.0).is_err());
        assert!(check(|s| s.client.user_send_rate = f64::NAN).is_err());
        assert!(
            check(|s| s.client.login_burst = 0).is_ok(),
            "no limit: no burst needed"
        );
        assert!(check(|s| {
            s.client.login_rate = 5.0;
            s.client.login_burst = 0;
        })
        .is_err());
        assert!(check(|s| s.client.login_rate_max_addresses = 0).is_err());
        assert!(check(|s| s.channels.max_connections_per_user = 0).is_ok());
    }

    #[test]
    fn file_env_and_overrides_layer_and_unknown_keys_are_refused() {
        let dir = std::env::temp_dir().join(format!("imgate-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("imgate.toml");
        std::fs::write(
            &file,
            "[node]\nid = \"from-file\"\n[heartbeat]\nmissed = 5\n",
        )
        .unwrap();
        let s = Settings::load(Some(&file), serde_json::json!({})).unwrap();
        assert_eq!(s.node.id, "from-file");
        assert_eq!(s.heartbeat.missed, 5);

        let s = Settings::load(
            Some(&file),
            serde_json::json!({"node": {"id": "from-flag"}}),
        )
        .unwrap();
        assert_eq!(s.node.id, "from-flag");
        assert_eq!(s.heartbeat.missed, 5);

        std::fs::write(&file, "[node]\nid = \"x\"\nbogus = 1\n").unwrap();
        let err = Settings::load(Some(&file), serde_json::json!({})).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");

        std::fs::write(&file, "[heartbeat]\nmin_ms = 10\nmax_ms = 5\n").unwrap();
        assert!(Settings::load(Some(&file), serde_json::json!({})).is_err());
        for bad in [
            "[auth]\nmax_token_lifetime_secs = 0\n",
            "[channels]\ntypes = [\"app\", \"we b\"]\n",
        ] {
            std::fs::write(&file, bad).unwrap();
            assert!(
                Settings::load(Some(&file), serde_json::json!({})).is_err(),
                "{bad}"
            );
        }
        std::fs::write(&file, "[auth]\nmax_token_lifetime_secs = 600\n").unwrap();
        let s = Settings::load(Some(&file), serde_json::json!({})).unwrap();
        assert_eq!(s.auth.max_token_lifetime_secs, Some(600));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's closure signature
    fn environment_overrides_file_and_unknown_variables_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("imgate.toml", "[node]\nid = \"from-file\"\n")?;
            jail.set_env("IMGATE_NODE__ID", "from-env");
            jail.set_env("IMGATE_AUTH__SECRET", "env-secret");
            jail.set_env("IMGATE_CHANNELS__TYPES", "[app, watch]");
            let s = Settings::load(Some(Path::new("imgate.toml")), serde_json::json!({})).unwrap();
            assert_eq!(s.node.id, "from-env");
            assert_eq!(s.jwt_secret(), "env-secret");
            assert_eq!(s.channels.types, vec!["app", "watch"]);
            let s = Settings::load(None, serde_json::json!({"node": {"id": "flag"}})).unwrap();
            assert_eq!(s.node.id, "flag");

            jail.set_env("IMGATE_NODE__COLOR", "blue");
            let err = Settings::load(None, serde_json::json!({})).unwrap_err();
            assert!(err.to_string().contains("color"), "{err}");
            Ok(())
        });
    }
}
