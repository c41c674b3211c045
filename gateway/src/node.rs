//! The state one gateway node shares between its connection tasks and its admin API.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use dashmap::DashMap;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{AuthSetupError, Authenticator};
use crate::base::unix_millis;
use crate::base::TransportKind;
use crate::cluster::{Cluster, ClusterError};
use crate::config::Settings;
use crate::limits::Rate;
use crate::metrics::HotMetrics;
use crate::registry::Registry;
use crate::router::Router;
use crate::store::{Store, StoreError};

pub struct Node {
    pub settings: Settings,
    pub auth: Authenticator,
    pub router: Router,
    pub metrics: HotMetrics,
    /// The limits of every connection's device stream (`delivery` settings).
    pub streams: Arc<crate::delivery::StreamConfig>,
    pub prometheus: PrometheusHandle,
    pub started_at: Instant,
    pub started_at_ms: u64,
    /// Send-rate buckets of the users connected here (`client.user_send_rate`).
    pub user_sends: crate::limits::UserSendLimits,
    /// Login-rate buckets of source addresses (`client.login_rate`).
    pub logins: crate::limits::LoginLimits,
    /// Sends taken and not yet answered, over all connections (`client.max_unanswered_sends`).
    pub send_slots: crate::limits::SendSlots,
    /// Cancelled when the node starts shutting down.
    pub shutdown: CancellationToken,
    /// Connection tasks and the tasks processing messages; shutdown waits for them.
    pub tasks: TaskTracker,
    ready: AtomicBool,
    /// Open client sockets, logged in or not; bounded by [`Node::max_connections`].
    open: AtomicUsize,
    /// `client.max_connections`, or what the open-file limit allows.
    max_connections: usize,
    /// Sockets not logged in yet; bounded by `client.max_pending_logins`.
    pending: AtomicUsize,
    /// Sockets not logged in yet by source address (IPv6: by /64); bounded by
    /// `client.max_pending_logins_per_ip`. Holds only addresses with such sockets.
    pending_by_ip: DashMap<IpAddr, usize>,
    /// Refused sockets still being told `SERVER_FULL`.
    refusing: AtomicUsize,
}

/// Most refused sockets being told `SERVER_FULL` at once; beyond, refused sockets are closed
/// without a word, so that refusing cannot itself use up descriptors.
pub const MAX_REFUSALS_IN_FLIGHT: usize = 1024;

/// Why a new socket is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `client.max_connections` sockets are open.
    Full,
    /// `client.max_pending_logins` sockets have not logged in yet.
    PendingLogins,
    /// `client.max_pending_logins_per_ip` sockets from this address have not logged in yet.
    PendingPerIp,
}

impl Refusal {
    /// The `reason` label of `imgate_connections_rejected_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Full => "limit",
            Refusal::PendingLogins => "pending_logins",
            Refusal::PendingPerIp => "pending_logins_per_ip",
        }
    }

    /// What the client is told with `SERVER_FULL`.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Full => "node is full, try another node",
            Refusal::PendingLogins => "too many connections are logging in, try another node",
            Refusal::PendingPerIp => {
                "too many connections from your address are logging in; retry later"
            }
        }
    }
}

/// What an accepted socket holds: its connection slot, and a pending-login place until it
/// logs in.
pub struct Admission {
    pub slot: SlotGuard,
    pub pending: PendingGuard,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Auth(#[from] AuthSetupError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

impl Node {
    /// Opens the store (migrating it), joins the cluster, and builds the node's state.
    pub async fn start(
        settings: Settings,
        prometheus: PrometheusHandle,
        shutdown: CancellationToken,
    ) -> Result<Self, StartError> {
        let auth = Authenticator::new(&settings)?;
        let max_connections = resolve_max_connections(&settings);
        let metrics = HotMetrics::new();
        // Export every connection series from the start, at zero.
        for transport in [TransportKind::Tcp, TransportKind::Ws] {
            for channel in &settings.channels.types {
                crate::metrics::gauge_connections(transport, channel, 0.0);
            }
        }
        let registry = Arc::new(
            Registry::new(crate::registry::QueuedBytes::new(
                settings.client.max_queued_bytes,
                settings.client.max_queued_bytes_total,
            ))
            .with_max_per_user(settings.channels.max_connections_per_user as usize),
        );
        let store = Store::open(&settings.store).await?;
        let cluster = match Cluster::start(&settings, registry.clone()).await {
            Ok(cluster) => cluster,
            Err(e) => {
                store.close().await;
                return Err(e.into());
            }
        };
        cluster.set_epoch_source(Arc::new(store.clone()));
        let tag = cluster.node_tag();
        let streams = Arc::new(crate::delivery::StreamConfig::new(
            &settings.delivery,
            registry.queued().clone(),
        ));
        let router = Router::new(&settings, registry, tag, metrics.clone(), store, cluster);
        let c = &settings.client;
        let user_sends =
            crate::limits::UserSendLimits::new(Rate::new(c.user_send_rate, c.user_send_burst));
        let logins = crate::limits::LoginLimits::new(
            Rate::new(c.login_rate, c.login_burst),
            c.login_rate_max_addresses,
        );
        Ok(Node {
            streams,
            user_sends,
            logins,
            send_slots: crate::limits::SendSlots::new(c.max_unanswered_sends),
            settings,
            auth,
            router,
            metrics,
            prometheus,
            started_at: Instant::now(),
            started_at_ms: unix_millis(),
            shutdown,
            tasks: TaskTracker::new(),
            ready: AtomicBool::new(false),
            open: AtomicUsize::new(0),
            max_connections,
            pending: AtomicUsize::new(0),
            pending_by_ip: DashMap::new(),
            refusing: AtomicUsize::new(0),
        })
    }

    pub fn node_id(&self) -> &str {
        &self.settings.node.id
    }

    pub fn registry(&self) -> &Registry {
        self.router.registry()
    }

    pub fn store(&self) -> &Store {
        self.router.store()
    }

    pub fn cluster(&self) -> &Cluster {
        self.router.cluster()
    }

    /// Why the node is not ready, or `None` when it is.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if self.shutdown.is_cancelled() {
            Some("shutting down")
        } else if !self.ready.load(Ordering::Relaxed) {
            Some("starting")
        } else if self.cluster().is_clustered() && !self.cluster().bus_up() {
            Some("cluster bus down")
        } else {
            None
        }
    }

    pub fn is_ready(&self) -> bool {
        self.not_ready_reason().is_none()
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// The most client sockets this node holds.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// Admits a new client socket from `ip`: a connection slot and a pending-login place.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Admission, Refusal> {
        let slot = self.claim_slot().ok_or(Refusal::Full)?;
        let pending = self.claim_pending(ip)?;
        Ok(Admission { slot, pending })
    }

    /// Claims a slot for a new client socket; `None` when the node is full.
    pub fn claim_slot(self: &Arc<Self>) -> Option<SlotGuard> {
        let max = self.max_connections;
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| SlotGuard(self.clone()))
    }

    /// Sets the gauges read from the node's state, before `/metrics` renders them.
    pub fn refresh_gauges(&self) {
        ::metrics::gauge!(crate::metrics::QUEUED_BYTES)
            .set(self.registry().queued().total() as f64);
        ::metrics::gauge!(crate::store::metric::QUEUE_AGE)
            .set(self.store().queue_age_ms() as f64 / 1000.0);
        ::metrics::gauge!(crate::metrics::RATE_LIMIT_ENTRIES, "table" => "user")
            .set(self.user_sends.len() as f64);
        ::metrics::gauge!(crate::metrics::RATE_LIMIT_ENTRIES, "table" => "address")
            .set(self.logins.len() as f64);
    }

    fn claim_pending(self: &Arc<Self>, ip: IpAddr) -> Result<PendingGuard, Refusal> {
        let client = &self.settings.client;
        self.pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < client.max_pending_logins).then_some(n + 1)
            })
            .map_err(|_| Refusal::PendingLogins)?;
        let key = pending_key(ip);
        {
            let mut count = self.pending_by_ip.entry(key).or_insert(0);
            if *count < client.max_pending_logins_per_ip {
                *count += 1;
                crate::metrics::gauge_pending_logins(1.0);
                return Ok(PendingGuard {
                    node: self.clone(),
                    key,
                });
            }
        }
        self.pending.fetch_sub(1, Ordering::AcqRel);
        self.pending_by_ip.remove_if(&key, |_, n| *n == 0);
        Err(Refusal::PendingPerIp)
    }

    /// Claims a place to tell a refused socket `SERVER_FULL`; `None` when too many are in flight.
    pub fn claim_refusal(self: &Arc<Self>) -> Option<RefusalGuard> {
        self.refusing
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_REFUSALS_IN_FLIGHT).then_some(n + 1)
            })
            .ok()
            .map(|_| RefusalGuard(self.clone()))
    }

    /// The per-connection send rate (`client.send_rate`, `client.send_burst`).
    pub fn connection_send_rate(&self) -> Rate {
        Rate::new(
            self.settings.client.send_rate,
            self.settings.client.send_burst,
        )
    }

    pub fn open_sockets(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Client sockets that have not logged in yet.
    pub fn pending_logins(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }
}

/// `client.max_connections`, or what the open-file limit leaves; a warning when a configured
/// value had to be lowered.
fn resolve_max_connections(settings: &Settings) -> usize {
    let nofile = crate::descriptors::nofile_limit();
    let headroom = settings.descriptor_headroom();
    let (max, lowered) =
        crate::config::resolve_max_connections(settings.client.max_connections, nofile, headroom);
    if let Some(configured) = lowered {
        tracing::warn!(
            configured,
            used = max,
            open_file_limit = nofile,
            headroom,
            "client.max_connections is above what the open-file limit allows; lowered (raise ulimit -n)"
        );
    }
    max
}

/// The per-address key of pending logins: the address, or for IPv6 its /64 (one subscriber's
/// network); IPv4-mapped IPv6 addresses count as IPv4.
pub fn pending_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// Holds one of the node's connection slots until dropped.
pub struct SlotGuard(Arc<Node>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Holds a pending-login place (node-wide and for the source address) until the socket logs in
/// or closes.
pub struct PendingGuard {
    node: Arc<Node>,
    key: IpAddr,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let node = &self.node;
        node.pending.fetch_sub(1, Ordering::AcqRel);
        if let dashmap::Entry::Occupied(mut e) = node.pending_by_ip.entry(self.key) {
            *e.get_mut() -= 1;
            if *e.get() == 0 {
                e.remove();
            }
        }
        crate::metrics::gauge_pending_logins(-1.0);
    }
}

/// Holds a place among the refused sockets being told `SERVER_FULL`.
pub struct RefusalGuard(Arc<Node>);

impl Drop for RefusalGuard {
    fn drop(&mut self) {
        self.0.refusing.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_logins_are_keyed_by_ipv4_address_and_ipv6_64() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(pending_key(v4), v4);
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(pending_key(mapped), v4);
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(pending_key(a), pending_key(b));
        assert_ne!(pending_key(a), pending_key(c));
    }
}
