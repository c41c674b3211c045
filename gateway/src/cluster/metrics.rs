//! Metrics of the cluster layer: the bus, presence and the node registry. Names start with
//! `imgate_bus_`, `imgate_presence_` or `imgate_cluster_`; [`CATALOG`] lists them for
//! `docs/metrics.md` and [`describe`] gives them their help texts.

use metrics::{describe_counter, describe_gauge, describe_histogram, Counter, Histogram, Unit};

use crate::config::RoutingMode;

pub const BUS_PUBLISHED: &str = "imgate_bus_messages_published_total";
pub const BUS_RECEIVED: &str = "imgate_bus_messages_received_total";
pub const BUS_PUBLISHES: &str = "imgate_bus_publishes_total";
pub const BUS_PUBLISH_LATENCY: &str = "imgate_bus_publish_latency_seconds";
pub const BUS_INCOMPLETE: &str = "imgate_bus_requests_incomplete_total";
pub const BUS_DROPPED: &str = "imgate_bus_messages_dropped_total";
pub const BUS_UP: &str = "imgate_bus_up";
pub const BUS_RECONNECTS: &str = "imgate_bus_reconnects_total";
pub const PRESENCE_LOOKUPS: &str = "imgate_presence_lookups_total";
pub const CLUSTER_KICKS: &str = "imgate_cluster_kicks_total";
pub const CLUSTER_NODES: &str = "imgate_cluster_nodes";

/// Every cluster metric with its kind, for `docs/metrics.md`.
pub const CATALOG: &[(&str, &str)] = &[
    (BUS_PUBLISHED, "counter"),
    (BUS_RECEIVED, "counter"),
    (BUS_PUBLISHES, "counter"),
    (BUS_PUBLISH_LATENCY, "histogram"),
    (BUS_INCOMPLETE, "counter"),
    (BUS_DROPPED, "counter"),
    (BUS_UP, "gauge"),
    (BUS_RECONNECTS, "counter"),
    (PRESENCE_LOOKUPS, "counter"),
    (CLUSTER_KICKS, "counter"),
    (CLUSTER_NODES, "gauge"),
    (super::epochs::metric::EPOCH, "gauge"),
    (super::epochs::metric::EPOCHS_STARTED, "counter"),
];

/// Registers the help texts; call once after installing the recorder.
pub fn describe() {
    describe_counter!(
        BUS_PUBLISHED,
        "Messages this node published on the cluster bus, by routing mode and kind (deliver, broadcast, kick_user, kick_conn, reply, ping)."
    );
    describe_counter!(
        BUS_RECEIVED,
        "Messages this node received from the cluster bus, by routing mode and kind."
    );
    describe_counter!(
        BUS_PUBLISHES,
        "Redis PUBLISH commands this node sent, by routing mode; each carries one or more bus messages (those queued for the channel while the previous PUBLISH was outstanding)."
    );
    describe_histogram!(
        BUS_PUBLISH_LATENCY,
        Unit::Seconds,
        "Time from queueing a bus message to Redis's answer to the PUBLISH that carried it, by routing mode."
    );
    describe_counter!(
        BUS_INCOMPLETE,
        "Cross-node requests (deliver, broadcast, kick_user) that ended without every addressed node's answer: the bus was down, a publish failed or a reply did not come in time."
    );
    describe_counter!(
        BUS_DROPPED,
        "Bus messages dropped, by reason (lagged: the receive loop fell behind; undecodable; reply_backlog: too many replies waiting to be published)."
    );
    describe_gauge!(
        BUS_UP,
        "1 while this node's Redis connections (commands and subscriber) are up, else 0."
    );
    describe_counter!(
        BUS_RECONNECTS,
        "Reconnections to Redis, by client (commands, subscriber)."
    );
    describe_counter!(
        PRESENCE_LOOKUPS,
        "Reads of the cluster presence table, by purpose (route: finding the nodes of a recipient; query: listing a user's connections)."
    );
    describe_counter!(
        CLUSTER_KICKS,
        "Cross-node kicks of one connection (duplicate login), by result: sent (published to the other node), kicked (applied here), stale (named a connection no longer here)."
    );
    describe_gauge!(
        CLUSTER_NODES,
        "Live nodes in the cluster registry, as last seen by this node."
    );
    describe_gauge!(
        super::epochs::metric::EPOCH,
        "The stream epoch this node uses: raised when Redis lost its stream counters."
    );
    describe_counter!(
        super::epochs::metric::EPOCHS_STARTED,
        "Stream epochs this node started (the first of a new cluster, or after Redis lost its data)."
    );
}

/// Kinds of bus message, as labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Deliver = 0,
    Broadcast,
    KickUser,
    KickConn,
    Reply,
    Ping,
    Holds,
}

impl Kind {
    const ALL: [Kind; 7] = [
        Kind::Deliver,
        Kind::Broadcast,
        Kind::KickUser,
        Kind::KickConn,
        Kind::Reply,
        Kind::Ping,
        Kind::Holds,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Deliver => "deliver",
            Kind::Broadcast => "broadcast",
            Kind::KickUser => "kick_user",
            Kind::KickConn => "kick_conn",
            Kind::Reply => "reply",
            Kind::Ping => "ping",
            Kind::Holds => "holds",
        }
    }
}

pub(crate) fn mode_label(mode: RoutingMode) -> &'static str {
    match mode {
        RoutingMode::Broadcast => "broadcast",
        RoutingMode::Routed => "routed",
    }
}

/// Handles of the metrics touched per message, registered once per cluster.
#[derive(Clone)]
pub(crate) struct BusMetrics {
    published: Vec<Counter>,
    received: Vec<Counter>,
    incomplete: Vec<Counter>,
    pub(crate) latency: Histogram,
    pub(crate) publishes: Counter,
    pub(crate) lagged: Counter,
    pub(crate) undecodable: Counter,
    pub(crate) reply_backlog: Counter,
    pub(crate) lookups_route: Counter,
    pub(crate) lookups_query: Counter,
    pub(crate) kicks_sent: Counter,
    pub(crate) kicks_applied: Counter,
    pub(crate) kicks_stale: Counter,
}

impl BusMetrics {
    pub(crate) fn new(mode: RoutingMode) -> Self {
        let mode = mode_label(mode);
        let per_kind = |name: &'static str| {
            Kind::ALL
                .iter()
                .map(|k| metrics::counter!(name, "mode" => mode, "kind" => k.as_str()))
                .collect::<Vec<_>>()
        };
        BusMetrics {
            published: per_kind(BUS_PUBLISHED),
            received: per_kind(BUS_RECEIVED),
            incomplete: Kind::ALL
                .iter()
                .map(|k| metrics::counter!(BUS_INCOMPLETE, "mode" => mode, "kind" => k.as_str()))
                .collect(),
            latency: metrics::histogram!(BUS_PUBLISH_LATENCY, "mode" => mode),
            publishes: metrics::counter!(BUS_PUBLISHES, "mode" => mode),
            lagged: metrics::counter!(BUS_DROPPED, "reason" => "lagged"),
            undecodable: metrics::counter!(BUS_DROPPED, "reason" => "undecodable"),
            reply_backlog: metrics::counter!(BUS_DROPPED, "reason" => "reply_backlog"),
            lookups_route: metrics::counter!(PRESENCE_LOOKUPS, "purpose" => "route"),
            lookups_query: metrics::counter!(PRESENCE_LOOKUPS, "purpose" => "query"),
            kicks_sent: metrics::counter!(CLUSTER_KICKS, "result" => "sent"),
            kicks_applied: metrics::counter!(CLUSTER_KICKS, "result" => "kicked"),
            kicks_stale: metrics::counter!(CLUSTER_KICKS, "result" => "stale"),
        }
    }

    pub(crate) fn published(&self, kind: Kind) -> &Counter {
        &self.published[kind as usize]
    }

    pub(crate) fn received(&self, kind: Kind) -> &Counter {
        &self.received[kind as usize]
    }

    pub(crate) fn incomplete(&self, kind: Kind) -> &Counter {
        &self.incomplete[kind as usize]
    }
}

pub(crate) fn gauge_bus_up(up: bool) {
    metrics::gauge!(BUS_UP).set(if up { 1.0 } else { 0.0 });
}

pub(crate) fn gauge_nodes(n: usize) {
    metrics::gauge!(CLUSTER_NODES).set(n as f64);
}

pub(crate) fn counter_reconnect(client: &'static str) {
    metrics::counter!(BUS_RECONNECTS, "client" => client).increment(1);
}
