//! The state one gateway node shares between its connection tasks and its admin API.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{unix_millis, AuthSetupError, Authenticator};
use crate::cluster::{Cluster, ClusterError};
use crate::config::Settings;
use crate::limits::Rate;
use crate::metrics::HotMetrics;
use crate::registry::{Registry, TransportKind};
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
    /// Cancelled when the node starts shutting down.
    pub shutdown: CancellationToken,
    /// Connection tasks and the tasks processing messages; shutdown waits for them.
    pub tasks: TaskTracker,
    ready: AtomicBool,
    /// Open client sockets, logged in or not; bounded by `client.max_connections`.
    open: AtomicUsize,
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

    /// Claims a slot for a new client socket; `None` when the node is full.
    pub fn claim_slot(self: &Arc<Self>) -> Option<SlotGuard> {
        let max = self.settings.client.max_connections;
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
        ::metrics::gauge!(crate::metrics::RATE_LIMIT_ENTRIES, "table" => "user")
            .set(self.user_sends.len() as f64);
        ::metrics::gauge!(crate::metrics::RATE_LIMIT_ENTRIES, "table" => "address")
            .set(self.logins.len() as f64);
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
}

/// Holds one of the node's connection slots until dropped.
pub struct SlotGuard(Arc<Node>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}
