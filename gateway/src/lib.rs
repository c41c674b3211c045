//! imgate: an IM gateway node. Clients hold long connections over TCP or WebSocket; the node keeps
//! a local map of (user, channel type) → connection and pushes each message to every live
//! connection of its recipient. [`run`] serves one node until its shutdown token is cancelled;
//! `main.rs` only parses configuration, binds and calls it, and tests call it on port 0.
//!
//! Where things live: [`transport`] (TCP and WebSocket framing), [`connection`] (the per-connection
//! task: login, heartbeats, reading and writing), [`registry`] (the local map), [`router`] (where a
//! message goes), [`recipients`] (who may receive), [`api`] (the admin HTTP API), [`auth`] (JWT),
//! [`metrics`] and [`telemetry`], [`config`], and at the bottom [`base`], the shared vocabulary
//! that imports nothing of the crate. No two modules import each other (`tests/layout.rs`).
//!
//! Words, as the code uses them:
//! - **channel type** (`channel`): the kind of client connection (`app`, `web`, ...), part of the
//!   key of the local map; a Redis pub/sub channel is a **bus topic** (`cluster/bus.rs`).
//! - **user stream**: the positions (`seq`) a user's messages take, cluster-wide
//!   (`cluster/streams.rs`); **device stream**: one device's view of it on one connection, with its
//!   acknowledgement window (`delivery.rs`). A TCP stream is a socket; a store query is a page.
//! - **session**: what `resume` restores (`cluster/sessions.rs`); one socket is a **connection**.
//! - **position** (`seq`), **cursor** (the highest position a device acknowledged), **head** (the
//!   highest position stored), **hole** (a position taken and never stored), **reservation** (a
//!   position being taken and not yet settled), **epoch** (the range positions are taken from
//!   since Redis last lost its data).
//! - **receipt** (`send_result`): the answer to a send; **refused at once**: answered before the
//!   send was taken (limits, overload).

pub mod admin_port;
pub mod api;
pub mod auth;
pub mod base;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod delivery;
pub mod descriptors;
pub mod ids;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod recipients;
pub mod registry;
pub mod router;
pub mod store;
pub mod telemetry;
pub mod transport;

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use config::Settings;
pub use node::Node;

/// The sockets a node serves: client connections (TCP and WebSocket) and the admin API.
pub struct Listeners {
    pub client: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the addresses in `settings`.
    pub async fn bind(settings: &Settings) -> std::io::Result<Listeners> {
        Ok(Listeners {
            client: bind_with_backlog(settings.client.listen, CLIENT_BACKLOG)?,
            admin: TcpListener::bind(settings.admin.listen).await?,
        })
    }
}

/// Pending connections the kernel queues on the client port. The usual default (128) overflows
/// when many clients reconnect at once (a node restart), and dropped SYNs wait 1 s, then 3 s.
pub const CLIENT_BACKLOG: u32 = 4096;

fn bind_with_backlog(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Start(#[from] node::StartError),
    #[error("admin API failed: {0}")]
    Admin(std::io::Error),
}

/// Serves one node on `listeners` until `shutdown` is cancelled, then shuts down gracefully: stops
/// accepting, sends KICK `shutdown` to every client, and waits for connections to close within the
/// configured grace period.
pub async fn run(
    mut settings: Settings,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    if settings.client.advertise.is_none() {
        // What clients are told (alloc, the node registry): the address really bound, so that
        // port 0 resolves. Behind NAT or on 0.0.0.0, set client.advertise.
        if let Ok(addr) = listeners.client.local_addr() {
            settings.client.advertise = Some(addr.to_string());
        }
    }
    let prometheus = telemetry::install();
    logging::configure(
        settings.log.repeat_limit,
        Duration::from_millis(settings.log.repeat_interval_ms),
    );
    warn_about_development_secrets(&settings);
    let grace = Duration::from_millis(settings.shutdown.grace_ms);
    let admin_limits = admin_port::Limits::new(&settings.admin);
    let Listeners { client, admin } = listeners;

    // While the node connects to the database and Redis (which may take a while), the admin port
    // already answers: /healthz 200, /readyz 503 "starting". It serves on a clone of the socket,
    // so the real API takes over the same socket afterwards.
    let admin = admin.into_std().map_err(RunError::Admin)?;
    let starting_stop = CancellationToken::new();
    let starting = {
        let listener = TcpListener::from_std(admin.try_clone().map_err(RunError::Admin)?)
            .map_err(RunError::Admin)?;
        let stop = starting_stop.clone();
        tokio::spawn(admin_port::serve(
            listener,
            api::starting_router(),
            admin_limits,
            stop,
        ))
    };
    let started = tokio::select! {
        started = Node::start(settings, prometheus, shutdown.clone()) => Some(started),
        _ = shutdown.cancelled() => None,
    };
    starting_stop.cancel();
    let _ = starting.await;
    let Some(started) = started else {
        info!("shutdown requested while starting");
        return Ok(());
    };
    let node = Arc::new(started?);

    let admin_stop = CancellationToken::new();
    let admin = {
        let app = api::router(node.clone());
        let stop = admin_stop.clone();
        let listener = TcpListener::from_std(admin).map_err(RunError::Admin)?;
        tokio::spawn(admin_port::serve(listener, app, admin_limits, stop))
    };
    let upkeep = {
        let node = node.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = node.shutdown.cancelled() => break,
                    _ = tick.tick() => node.prometheus.run_upkeep(),
                }
            }
        })
    };

    node.set_ready(true);
    info!(node = %node.node_id(), "node ready");
    accept_loop(&client, &node).await;

    // Draining: no new connections, and other nodes stop routing here.
    drop(client);
    node.cluster().leave().await;
    info!("shutting down: kicking clients");
    node.set_ready(false);
    node.tasks.close();
    if tokio::time::timeout(grace, node.tasks.wait())
        .await
        .is_err()
    {
        warn!(
            remaining = node.tasks.len(),
            "grace period over with connections still open"
        );
    }
    node.store().close().await;
    admin_stop.cancel();
    upkeep.abort();
    match admin.await {
        Ok(()) => Ok(()),
        Err(e) => {
            error!(error = %crate::logging::esc(&e), "admin task failed");
            Ok(())
        }
    }
}

/// Accepts client sockets until shutdown, spawning a connection task for each admitted one and
/// a short refusal task (or none) for the others.
async fn accept_loop(listener: &TcpListener, node: &Arc<Node>) {
    let mut reserve = descriptors::Reserve::new();
    loop {
        let accepted = tokio::select! {
            _ = node.shutdown.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => match node.admit(peer.ip()) {
                Ok(admission) => {
                    node.tasks
                        .spawn(connection::serve(stream, peer, node.clone(), admission));
                }
                Err(refusal) => {
                    metrics::counter_rejected(refusal.reason());
                    // Too many refusals in flight: close without a word.
                    if let Some(place) = node.claim_refusal() {
                        node.tasks.spawn(connection::refuse(
                            stream,
                            peer,
                            node.clone(),
                            refusal,
                            place,
                        ));
                    }
                }
            },
            Err(e) if descriptors::is_out_of_descriptors(&e) && reserve.release() => {
                // The reserve descriptor is free now: take the waiting connection and close it
                // at once, so that its client fails fast instead of waiting in the backlog.
                if let Some(Ok((stream, _))) = listener.accept().now_or_never() {
                    drop(stream);
                    metrics::counter_rejected("descriptors");
                }
                if !reserve.refill() {
                    warn_limited!(error = %crate::logging::esc(&e), "out of file descriptors");
                    if backoff(node).await {
                        return;
                    }
                }
            }
            Err(e) => {
                // Out of file descriptors (and no reserve) or a similar transient failure: back
                // off briefly instead of spinning.
                warn_limited!(error = %crate::logging::esc(&e), "accept failed");
                if backoff(node).await {
                    return;
                }
            }
        }
    }
}

/// Waits a little after a failed accept; `true` when the node shuts down meanwhile.
async fn backoff(node: &Node) -> bool {
    tokio::select! {
        _ = node.shutdown.cancelled() => true,
        _ = tokio::time::sleep(ACCEPT_BACKOFF) => false,
    }
}

/// Pause after an `accept` that failed for want of descriptors (with none in reserve) or another
/// transient reason.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

fn warn_about_development_secrets(settings: &Settings) {
    if settings.auth.secret.is_none() && settings.auth.algorithm == config::JwtAlgorithm::HS256 {
        warn!(
            "!!! no auth.secret configured: using the PUBLIC DEVELOPMENT JWT SECRET. Anyone can mint tokens. Set IMGATE_AUTH__SECRET before exposing this node. !!!"
        );
    }
    if settings.admin.token.is_none() {
        warn!(
            "!!! no admin.token configured: the admin API accepts the PUBLIC DEVELOPMENT TOKEN {:?}. Set IMGATE_ADMIN__TOKEN before exposing this node. !!!",
            config::DEV_ADMIN_TOKEN
        );
    }
}
