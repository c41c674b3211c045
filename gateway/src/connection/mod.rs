//! One task per client connection: the login phase, then a loop that reads frames, writes what the
//! router queued in the connection's bounded outbox, and enforces heartbeats. Errors are logged once,
//! here, with the peer address (and, once logged in, the connection id and user) in the line.
//!
//! Thousands of connections spend their life idle in this task, so its state is kept small: no
//! tracing span is kept per connection (about 1 KiB each in the subscriber), and the large,
//! short-lived steps (the WebSocket upgrade, the login, a send, leaving the cluster) are boxed so
//! that they are not part of the task's size (a future is as large as its largest state; see
//! the test at the end).
//!
//! Here: the task's outline ([`serve`]: admission, login, run, goodbye) and what the phases share;
//! `login.rs`: the first frame, binding and greeting; `running.rs`: the logged-in loop.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use imgate_shared::protocol::{HeartbeatRange, PROTOCOL_VERSION};
use imgate_shared::{ClientFrame, ErrorCode, KickReason, ServerFrame};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tracing::debug;

use crate::base::unix_millis;
use crate::base::valid_id;
use crate::cluster::{RegisterOutcome, Resume, Session, SessionCheck};
use crate::config::{DuplicateLoginPolicy, HeartbeatSettings};
use crate::delivery::{DeviceStream, Fetch, Outgoing};
use crate::limits::{retry_after_ms, LoginRefusal, SendSlot, TokenBucket};
use crate::logging::esc;
use crate::metrics;
use crate::node::{Admission, Node, PendingGuard, Refusal, RefusalGuard};
use crate::registry::{ConnHandle, RegisterError};
use crate::store::{StoreError, StoredMessage};
use crate::transport::{self, FrameReader, FrameWriter, ReadError};

mod login;
mod running;

/// Most queued frames written in one batch before the socket is flushed.
const MAX_WRITE_BATCH: usize = 64;
/// Most sends of one connection being processed (awaiting their receipt) at once.
const MAX_SENDS_IN_FLIGHT: usize = 64;
/// Most sends of one connection read while [`MAX_SENDS_IN_FLIGHT`] are processed, waiting to
/// be begun in order. Beyond it a send is refused at once (`RATE_LIMITED`, with a retry hint),
/// so that the connection is always read: acknowledgements and heartbeats behind a burst of
/// sends are never held up by it.
const MAX_DEFERRED_SENDS: usize = 64;
/// The retry hint of a send refused because its connection has too many sends unanswered.
const BACKLOG_RETRY_MS: u64 = 100;
/// A database read of a device stream, running in a task of its own.
/// A database read of a device stream, and for a probe the lowest of its positions some node
/// still holds (see [`Fetch`]).
type PageFuture = JoinHandle<Result<(Vec<StoredMessage>, Option<u64>), StoreError>>;

/// Longest time spent writing a farewell frame (KICK or ERROR) before closing anyway.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest time a refused socket has to show its transport (a WebSocket upgrade, or silence
/// taken for TCP) before it is told `SERVER_FULL`: refused sockets must not hold descriptors
/// for a whole login timeout.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves one accepted socket until it closes. Its pending-login place is given back once it
/// logs in (or closes).
pub async fn serve(stream: TcpStream, peer: SocketAddr, node: Arc<Node>, admission: Admission) {
    let Admission {
        slot: _slot,
        pending,
    } = admission;
    let deadline = Instant::now() + Duration::from_millis(node.settings.client.login_timeout_ms);
    // A socket still silent when the node shuts down is closed at once.
    let accepted = tokio::select! {
        accepted = transport::accept(stream, &node.settings.client, deadline) => accepted,
        _ = node.shutdown.cancelled() => return,
    };
    let (reader, writer, kind) = match accepted {
        Ok(t) => t,
        Err(e) => {
            debug!(%peer, error = %esc(&e), "handshake failed");
            metrics::counter_rejected("bad_handshake");
            return;
        }
    };
    let mut conn = Connection {
        send_bucket: TokenBucket::new(node.connection_send_rate(), Instant::now()),
        node,
        peer,
        reader,
        writer,
        kind,
        receipts: VecDeque::new(),
        deferred: VecDeque::new(),
    };
    let close = match Box::pin(conn.login(deadline, pending)).await {
        Ok(bound) => conn.run(bound).await,
        Err(close) => {
            count_close(&close, &conn.node);
            close
        }
    };
    Box::pin(conn.finish(close)).await;
}

/// Tells a refused socket `SERVER_FULL` (in the transport it speaks, which it has
/// `REFUSAL_TIMEOUT` to show) and closes it.
pub async fn refuse(
    stream: TcpStream,
    peer: SocketAddr,
    node: Arc<Node>,
    refusal: Refusal,
    _place: RefusalGuard,
) {
    let login_timeout = Duration::from_millis(node.settings.client.login_timeout_ms);
    let deadline = Instant::now() + REFUSAL_TIMEOUT.min(login_timeout);
    let mut writer = match transport::accept(stream, &node.settings.client, deadline).await {
        Ok((_, writer, _)) => writer,
        Err(e) => {
            debug!(%peer, error = %e, "refused socket closed before its handshake");
            return;
        }
    };
    metrics::counter_protocol_error(ErrorCode::ServerFull);
    Box::pin(farewell(
        &mut writer,
        ServerFrame::error(ErrorCode::ServerFull, refusal.message()),
    ))
    .await;
}

/// Why a connection ends.
#[derive(Debug)]
enum Close {
    /// The client closed the socket.
    PeerClosed,
    /// The client sent LOGOUT.
    Logout,
    /// The server sends KICK with this reason.
    Kick(KickReason),
    /// The client was silent for too long.
    HeartbeatTimeout,
    /// The server sends ERROR with this code and message.
    Error(ErrorCode, String),
    /// The server sends ERROR `RATE_LIMITED` with this message and `retry_after_ms`.
    RateLimited(String, u64),
    /// The socket failed.
    Io(String),
}

struct Connection {
    node: Arc<Node>,
    peer: SocketAddr,
    reader: FrameReader,
    writer: FrameWriter,
    kind: crate::base::TransportKind,
    /// Receipts of accepted sends, in the order the sends arrived. Each send runs in its own task,
    /// so it completes (delivered and persisted) even if this connection goes away meanwhile.
    receipts: VecDeque<JoinHandle<ServerFrame>>,
    /// This connection's sends (`client.send_rate`).
    send_bucket: TokenBucket,
    /// Sends read while [`MAX_SENDS_IN_FLIGHT`] were being processed, in arrival order.
    deferred: VecDeque<TakenSend>,
}

/// A send taken by the node (it holds a slot among the node's unanswered sends): processed at
/// once, or waiting for its turn (see [`MAX_DEFERRED_SENDS`]).
struct TakenSend {
    to: String,
    channel: Option<String>,
    client_msg_id: String,
    body: imgate_shared::protocol::Body,
    retry: bool,
    /// Its place among the node's unanswered sends.
    slot: SendSlot,
}

/// The negotiated heartbeat of a session.
#[derive(Debug, Clone, Copy)]
struct Heartbeat {
    interval: Duration,
    idle_timeout: Duration,
}

/// Picks the heartbeat interval: the largest value inside both the client's range and the server's
/// bounds; when they do not overlap, the server bound nearest to the client's range.
pub fn negotiate_heartbeat(client: Option<HeartbeatRange>, server: &HeartbeatSettings) -> u64 {
    match client {
        None => server.default_ms,
        Some(c) => {
            let lo = c.min_ms.max(server.min_ms);
            let hi = c.max_ms.min(server.max_ms);
            if lo <= hi {
                hi
            } else if c.max_ms < server.min_ms {
                server.min_ms
            } else {
                server.max_ms
            }
        }
    }
}

/// What a connection is bound to after LOGIN or RESUME.
struct Bound {
    handle: Arc<ConnHandle>,
    heartbeat: Heartbeat,
    /// The session the client resumes with.
    session_id: String,
    stream: DeviceStream,
}

/// Who the first frame says the client is.
struct Hello {
    user: String,
    device_id: String,
    channel: String,
    heartbeat: Option<HeartbeatRange>,
    last_seq: u64,
    /// Set for a RESUME: the session presented, replaced once the login is certain.
    resumed: Option<String>,
}

impl Connection {
    /// Takes the connection out of the registry and the cluster; its outbox takes no more.
    async fn unregister(&self, handle: &ConnHandle) {
        let node = &self.node;
        handle.outbox.close();
        node.user_sends.release(&handle.user);
        if node.registry().unregister(&handle.user, handle.id) {
            // Boxed: leaving the cluster (a Redis script) has a large state, needed once.
            Box::pin(node.cluster().unregister(&handle.user, handle.id)).await;
        }
    }

    /// Says goodbye as `close` requires and closes the socket.
    async fn finish(mut self, close: Close) {
        match close {
            Close::PeerClosed | Close::Logout | Close::HeartbeatTimeout => {}
            Close::Kick(reason) => farewell(&mut self.writer, ServerFrame::kick(reason)).await,
            Close::Error(code, message) => {
                farewell(&mut self.writer, ServerFrame::error(code, message)).await
            }
            Close::RateLimited(message, retry_after_ms) => {
                farewell(
                    &mut self.writer,
                    ServerFrame::rate_limited(message, retry_after_ms),
                )
                .await
            }
            Close::Io(error) => debug!(peer = %self.peer, error = %esc(error), "connection failed"),
        }
        let _ = timeout(FAREWELL_TIMEOUT, self.writer.close()).await;
    }
}
/// Counts why a connection ends.
fn count_close(close: &Close, node: &Node) {
    match close {
        Close::Kick(reason) => {
            metrics::counter_kick(*reason);
            if *reason == KickReason::SlowConsumer {
                node.metrics.slow_consumer_kicks.increment(1);
            }
        }
        Close::HeartbeatTimeout => metrics::counter_heartbeat_timeout(),
        Close::Error(code, _) => metrics::counter_protocol_error(*code),
        Close::RateLimited(..) => metrics::counter_protocol_error(ErrorCode::RateLimited),
        Close::PeerClosed | Close::Logout | Close::Io(_) => {}
    }
}

/// Counts a failed login and turns it into the ERROR that closes the connection.
fn login_failed(code: ErrorCode, message: impl Into<String>) -> Close {
    metrics::counter_login(code.name());
    Close::Error(code, message.into())
}

fn session_expired() -> Close {
    login_failed(
        ErrorCode::SessionExpired,
        "unknown or expired session; log in",
    )
}

fn sessions_unavailable() -> Close {
    login_failed(
        ErrorCode::Unavailable,
        "sessions cannot be checked now; retry, or log in",
    )
}

fn too_many_connections(settings: &crate::config::Settings) -> Close {
    login_failed(
        ErrorCode::TooManyConnections,
        format!(
            "the user holds the most connections allowed ({}); close one first",
            settings.channels.max_connections_per_user
        ),
    )
}

fn too_large_message(max: usize) -> String {
    format!("frame longer than the maximum of {max} bytes")
}

/// Writes a last frame, waiting at most [`FAREWELL_TIMEOUT`].
async fn farewell(writer: &mut FrameWriter, frame: ServerFrame) {
    metrics::counter_frame_out(frame.kind());
    let _ = timeout(FAREWELL_TIMEOUT, writer.send(frame.encode())).await;
}

/// Checks the fields LOGIN and RESUME share.
fn check_hello(device_id: &str, heartbeat: Option<HeartbeatRange>) -> Result<(), Close> {
    if !valid_id(device_id) {
        return Err(login_failed(
            ErrorCode::InvalidField,
            format!("device_id must be {}", crate::base::ID_RULE),
        ));
    }
    if heartbeat.is_some_and(|hb| hb.min_ms > hb.max_ms) {
        return Err(login_failed(
            ErrorCode::InvalidField,
            "heartbeat.min_ms exceeds heartbeat.max_ms",
        ));
    }
    Ok(())
}

fn count_session(outcome: &'static str) {
    ::metrics::counter!(crate::delivery::metric::SESSIONS, "outcome" => outcome).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn returns, without calling it.
    fn future_size<F, Fut>(_: F) -> usize
    where
        F: FnOnce(TcpStream, SocketAddr, Arc<Node>, Admission) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// Every connection's task is as large as the largest state of [`serve`], for the
    /// connection's whole life: what 15,000 idle connections spend their time in. 1,504 bytes in
    /// debug builds and 1,496 in release builds at the time of writing (6.9 KiB before the
    /// one-off steps were boxed).
    #[test]
    fn the_connection_task_stays_small() {
        let size = future_size(serve);
        println!("connection task future: {size} bytes");
        assert!(
            size <= 2_048,
            "the connection task's future is {size} bytes"
        );
    }

    #[test]
    fn heartbeat_negotiation() {
        let s = HeartbeatSettings {
            min_ms: 5_000,
            max_ms: 60_000,
            default_ms: 30_000,
            missed: 3,
        };
        let r = |min_ms, max_ms| Some(HeartbeatRange { min_ms, max_ms });
        assert_eq!(negotiate_heartbeat(None, &s), 30_000);
        assert_eq!(negotiate_heartbeat(r(10_000, 20_000), &s), 20_000);
        assert_eq!(negotiate_heartbeat(r(1_000, 100_000), &s), 60_000);
        assert_eq!(negotiate_heartbeat(r(1_000, 2_000), &s), 5_000);
        assert_eq!(negotiate_heartbeat(r(90_000, 120_000), &s), 60_000);
    }
}
