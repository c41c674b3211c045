//! The gateway's own metrics (connections, frames, messages, limits): their names, descriptions
//! and the handles of the hot path. The store, the cluster, delivery, logging and recipients name
//! theirs; `telemetry.rs` installs the recorder and lists them all, and a test keeps that list
//! and `docs/metrics.md` in step.

use imgate_shared::{ErrorCode, KickReason};
use metrics::{describe_counter, describe_gauge, describe_histogram, Counter, Histogram, Unit};

use crate::base::TransportKind;

pub const CONNECTIONS: &str = "imgate_connections";
pub const CONNECTIONS_REJECTED: &str = "imgate_connections_rejected_total";
pub const PENDING_LOGINS: &str = "imgate_pending_logins";
pub const LOGINS: &str = "imgate_logins_total";
pub const FRAMES_IN: &str = "imgate_frames_in_total";
pub const FRAMES_OUT: &str = "imgate_frames_out_total";
pub const MESSAGES: &str = "imgate_messages_total";
pub const BROADCAST_DELIVERIES: &str = "imgate_broadcast_deliveries_total";
pub const ACKS: &str = "imgate_acks_total";
pub const KICKS: &str = "imgate_kicks_total";
pub const SLOW_CONSUMER_KICKS: &str = "imgate_slow_consumer_kicks_total";
pub const HEARTBEAT_TIMEOUTS: &str = "imgate_heartbeat_timeouts_total";
pub const PROTOCOL_ERRORS: &str = "imgate_protocol_errors_total";
pub const ADMIN_REQUESTS: &str = "imgate_admin_requests_total";
pub const ADMIN_CONNECTIONS: &str = "imgate_admin_connections";
pub const ADMIN_CONNECTIONS_REJECTED: &str = "imgate_admin_connections_rejected_total";
pub const ADMIN_TIMEOUTS: &str = "imgate_admin_timeouts_total";
pub const PUSH_LATENCY: &str = "imgate_push_latency_seconds";
pub const QUEUED_BYTES: &str = "imgate_queued_bytes";
pub const MEMORY_LIMITED: &str = "imgate_memory_limited_total";
pub const RATE_LIMITED: &str = "imgate_rate_limited_total";
pub const RATE_LIMIT_ENTRIES: &str = "imgate_rate_limit_entries";
pub const UNANSWERED_SENDS: &str = "imgate_unanswered_sends";
pub const SENDS_SHED: &str = "imgate_sends_shed_total";

/// The gateway's own metrics with their kinds (`telemetry.rs` lists every metric).
pub const CATALOG: &[(&str, &str)] = &[
    (CONNECTIONS, "gauge"),
    (CONNECTIONS_REJECTED, "counter"),
    (PENDING_LOGINS, "gauge"),
    (LOGINS, "counter"),
    (FRAMES_IN, "counter"),
    (FRAMES_OUT, "counter"),
    (MESSAGES, "counter"),
    (BROADCAST_DELIVERIES, "counter"),
    (ACKS, "counter"),
    (KICKS, "counter"),
    (SLOW_CONSUMER_KICKS, "counter"),
    (HEARTBEAT_TIMEOUTS, "counter"),
    (PROTOCOL_ERRORS, "counter"),
    (ADMIN_REQUESTS, "counter"),
    (ADMIN_CONNECTIONS, "gauge"),
    (ADMIN_CONNECTIONS_REJECTED, "counter"),
    (ADMIN_TIMEOUTS, "counter"),
    (PUSH_LATENCY, "histogram"),
    (QUEUED_BYTES, "gauge"),
    (MEMORY_LIMITED, "counter"),
    (RATE_LIMITED, "counter"),
    (UNANSWERED_SENDS, "gauge"),
    (SENDS_SHED, "counter"),
    (RATE_LIMIT_ENTRIES, "gauge"),
];

/// Describes this module's metrics to the recorder.
pub fn describe() {
    describe_gauge!(
        CONNECTIONS,
        "Live authenticated connections, by transport and channel type."
    );
    describe_counter!(
        CONNECTIONS_REJECTED,
        "Sockets dropped before login, by reason: limit (node full), pending_logins or pending_logins_per_ip (too many sockets not logged in yet, on the node or from one address), descriptors (accept failed: out of file descriptors) or bad_handshake (closed or failed before its first frame, e.g. a TCP health check)."
    );
    describe_gauge!(
        PENDING_LOGINS,
        "Client sockets accepted that have not logged in yet."
    );
    describe_counter!(LOGINS, "Login attempts by result (ok or an error name).");
    describe_counter!(FRAMES_IN, "Frames received from clients, by command.");
    describe_counter!(FRAMES_OUT, "Frames written to clients, by command.");
    describe_counter!(
        MESSAGES,
        "Messages by per-recipient outcome (delivered, stored, refused)."
    );
    describe_counter!(
        BROADCAST_DELIVERIES,
        "Connections a broadcast was written to."
    );
    describe_counter!(ACKS, "Acknowledgements received from clients.");
    describe_counter!(
        KICKS,
        "Connections closed by the server with KICK, by reason."
    );
    describe_counter!(
        SLOW_CONSUMER_KICKS,
        "Connections disconnected because their outbox was full or a write timed out."
    );
    describe_counter!(
        HEARTBEAT_TIMEOUTS,
        "Connections closed because they were silent for too many heartbeat intervals."
    );
    describe_counter!(
        PROTOCOL_ERRORS,
        "ERROR frames sent to clients, by error name."
    );
    describe_counter!(
        ADMIN_REQUESTS,
        "Admin API requests, by route and status code."
    );
    describe_gauge!(ADMIN_CONNECTIONS, "Open connections to the admin port.");
    describe_counter!(
        ADMIN_CONNECTIONS_REJECTED,
        "Admin connections refused (503, closed) because admin.max_connections were open."
    );
    describe_counter!(
        ADMIN_TIMEOUTS,
        "Admin connections closed by a timeout, by phase: idle (no request), header (a request head too slow) or body (a request body too slow; answered 408)."
    );
    describe_histogram!(
        PUSH_LATENCY,
        Unit::Seconds,
        "Time from a message being accepted to its PUSH frame being written to a connection."
    );
    describe_gauge!(
        QUEUED_BYTES,
        Unit::Bytes,
        "Payload bytes queued in memory for the node's connections: outboxes, device streams (pushes waiting or awaiting acknowledgement) and frames being written."
    );
    describe_counter!(
        MEMORY_LIMITED,
        "Pushes that met a memory limit, by limit (connection: client.max_queued_bytes, node: client.max_queued_bytes_total) and action (evict: a stored push dropped from memory and read from the database later; kick: the connection was kicked as a slow consumer)."
    );
    describe_counter!(
        RATE_LIMITED,
        "Sends and logins refused with RATE_LIMITED, by limit: connection, user, backlog (sends) or address (logins)."
    );
    describe_gauge!(
        UNANSWERED_SENDS,
        "Sends of all connections taken and not answered yet, bounded by client.max_unanswered_sends."
    );
    describe_counter!(
        SENDS_SHED,
        "Sends refused at once with UNAVAILABLE (and retry_after_ms) because the node held client.max_unanswered_sends unanswered sends."
    );
    describe_gauge!(
        RATE_LIMIT_ENTRIES,
        "Entries in the node's rate-limit tables, by table: user (users with a connection on the node) or address (login source addresses)."
    );
}

/// Handles of the metrics on the hot path, registered once.
#[derive(Clone)]
pub struct HotMetrics {
    pub push_latency: Histogram,
    pub slow_consumer_kicks: Counter,
    pub delivered: Counter,
    pub stored: Counter,
    pub refused: Counter,
    pub repeated: Counter,
    pub broadcast_deliveries: Counter,
}

impl HotMetrics {
    pub fn new() -> Self {
        HotMetrics {
            push_latency: metrics::histogram!(PUSH_LATENCY),
            slow_consumer_kicks: metrics::counter!(SLOW_CONSUMER_KICKS),
            delivered: metrics::counter!(MESSAGES, "outcome" => "delivered"),
            stored: metrics::counter!(MESSAGES, "outcome" => "stored"),
            refused: metrics::counter!(MESSAGES, "outcome" => "refused"),
            repeated: metrics::counter!(MESSAGES, "outcome" => "repeated"),
            broadcast_deliveries: metrics::counter!(BROADCAST_DELIVERIES),
        }
    }
}

impl Default for HotMetrics {
    fn default() -> Self {
        Self::new()
    }
}

pub fn counter_rejected(reason: &'static str) {
    metrics::counter!(CONNECTIONS_REJECTED, "reason" => reason).increment(1);
}

pub fn gauge_pending_logins(delta: f64) {
    metrics::gauge!(PENDING_LOGINS).increment(delta);
}

pub fn counter_login(result: &'static str) {
    metrics::counter!(LOGINS, "result" => result).increment(1);
}

pub fn counter_frame_in(cmd: &'static str) {
    metrics::counter!(FRAMES_IN, "cmd" => cmd).increment(1);
}

pub fn counter_frame_out(cmd: &'static str) {
    metrics::counter!(FRAMES_OUT, "cmd" => cmd).increment(1);
}

pub fn counter_pushes_out(n: u64) {
    metrics::counter!(FRAMES_OUT, "cmd" => "push").increment(n);
}

pub fn counter_protocol_error(code: ErrorCode) {
    metrics::counter!(PROTOCOL_ERRORS, "error" => code.name()).increment(1);
}

pub fn counter_ack() {
    metrics::counter!(ACKS).increment(1);
}

pub fn counter_kick(reason: KickReason) {
    metrics::counter!(KICKS, "reason" => reason.as_str()).increment(1);
}

pub fn counter_rate_limited(limit: &'static str) {
    metrics::counter!(RATE_LIMITED, "limit" => limit).increment(1);
}

pub fn counter_heartbeat_timeout() {
    metrics::counter!(HEARTBEAT_TIMEOUTS).increment(1);
}

pub fn gauge_connections(transport: TransportKind, channel: &str, delta: f64) {
    metrics::gauge!(CONNECTIONS, "transport" => transport.as_str(), "channel" => channel.to_owned())
        .increment(delta);
}
