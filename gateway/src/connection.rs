//! One task per client connection: the login phase, then a loop that reads frames, writes what the
//! router queued in the connection's bounded outbox, and enforces heartbeats. Errors are logged once,
//! here, with the peer address (and, once logged in, the connection id and user) in the line.
//!
//! Thousands of connections spend their life idle in this task, so its state is kept small: no
//! tracing span is kept per connection (about 1 KiB each in the subscriber), and the large,
//! short-lived steps (the WebSocket upgrade, the login, a send, leaving the cluster) are boxed so
//! that they are not part of the task's size (a future is as large as its largest state; see
//! the test at the end).

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
    deferred: VecDeque<Deferred>,
}

/// A send waiting for its turn (see [`MAX_DEFERRED_SENDS`]).
struct Deferred {
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
    /// Reads LOGIN or RESUME and binds the connection: registration (locally and in the
    /// cluster), a session, the device's cursor, `login_result`, and the device stream that
    /// replays what follows the cursor.
    async fn login(
        &mut self,
        deadline: Instant,
        pending: PendingGuard,
    ) -> Result<Box<Bound>, Close> {
        let node = self.node.clone();
        let settings = &node.settings;
        let peer = self.peer;
        let first = tokio::select! {
            r = tokio::time::timeout_at(deadline, self.reader.next()) => r,
            _ = node.shutdown.cancelled() => {
                return Err(Close::Error(ErrorCode::ShuttingDown, "node is shutting down".into()))
            }
        };
        let bytes = match first {
            Err(_) => {
                return Err(login_failed(
                    ErrorCode::LoginTimeout,
                    "no LOGIN within the login timeout",
                ))
            }
            Ok(None) => return Err(Close::PeerClosed),
            Ok(Some(Err(ReadError::TooLarge))) => {
                return Err(login_failed(
                    ErrorCode::FrameTooLarge,
                    too_large_message(settings.client.max_frame_len),
                ))
            }
            Ok(Some(Err(e))) => return Err(Close::Io(e.to_string())),
            Ok(Some(Ok(bytes))) => bytes,
        };
        let frame = match ClientFrame::decode(&bytes) {
            Ok(frame) => frame,
            Err(e) => {
                return Err(login_failed(
                    ErrorCode::BadFrame,
                    format!("invalid frame: {e}"),
                ))
            }
        };
        metrics::counter_frame_in(frame.kind());
        if matches!(
            frame,
            ClientFrame::Login { .. } | ClientFrame::Resume { .. }
        ) {
            // Before the token is checked or a session looked up: that is what costs.
            if let Err(refusal) = node.logins.attempt(peer.ip(), Instant::now()) {
                metrics::counter_login(ErrorCode::RateLimited.name());
                metrics::counter_rate_limited("address");
                let (message, wait) = match refusal {
                    LoginRefusal::RateLimited(wait) => (
                        "too many logins from this address; retry later".to_owned(),
                        wait,
                    ),
                    LoginRefusal::TableFull => (
                        "too many addresses logging in; retry later".to_owned(),
                        Duration::from_secs(1),
                    ),
                };
                return Err(Close::RateLimited(message, retry_after_ms(wait)));
            }
        }
        let hello = match frame {
            ClientFrame::Login {
                token,
                device_id,
                channel,
                client_version: _,
                heartbeat,
                last_seq,
            } => {
                check_hello(&device_id, heartbeat)?;
                if !node.router.is_channel(&channel) {
                    return Err(login_failed(
                        ErrorCode::UnknownChannel,
                        format!(
                            "unknown channel type {channel:?}; accepted: {}",
                            settings.channels.types.join(", ")
                        ),
                    ));
                }
                let claims = match node.auth.verify(&token) {
                    Ok(c) => c,
                    Err(e) => return Err(login_failed(e.code(), e.to_string())),
                };
                Hello {
                    user: claims.sub,
                    device_id,
                    channel,
                    heartbeat,
                    last_seq: last_seq.unwrap_or(0),
                    resumed: None,
                }
            }
            ClientFrame::Resume {
                session_id,
                device_id,
                last_seq,
                client_version: _,
                heartbeat,
            } => {
                check_hello(&device_id, heartbeat)?;
                // Only read here: the session is replaced once the login can no longer be
                // refused, so that a refused RESUME leaves it to be presented again.
                let session = match node.cluster().check_session(&session_id, &device_id).await {
                    Ok(SessionCheck::Valid(session)) => session,
                    Ok(SessionCheck::Unknown) => {
                        count_session("unknown");
                        return Err(session_expired());
                    }
                    Ok(SessionCheck::WrongDevice) => {
                        count_session("wrong_device");
                        return Err(login_failed(
                            ErrorCode::InvalidDevice,
                            "the session belongs to another device; log in",
                        ));
                    }
                    Err(e) => {
                        crate::warn_limited!(%peer, error = %esc(&e), "cannot check a session");
                        return Err(sessions_unavailable());
                    }
                };
                if !node.router.is_channel(&session.channel) {
                    return Err(login_failed(
                        ErrorCode::UnknownChannel,
                        "the session's channel type is no longer accepted; log in",
                    ));
                }
                Hello {
                    user: session.user,
                    device_id,
                    channel: session.channel,
                    heartbeat,
                    last_seq: last_seq.unwrap_or(0),
                    resumed: Some(session_id),
                }
            }
            other => {
                return Err(login_failed(
                    ErrorCode::LoginRequired,
                    format!(
                        "the first frame must be login or resume, not {}",
                        other.kind()
                    ),
                ))
            }
        };

        let handle = Arc::new(ConnHandle::new(
            hello.user.into(),
            hello.channel.into(),
            hello.device_id.into(),
            self.kind,
            settings.client.outbox_capacity,
            node.registry().queued().clone(),
        ));
        let (conn, user) = (handle.id, &*handle.user);
        let policy = settings.channels.policy(&handle.channel);
        let resuming = hello.resumed.is_some();
        match node.router.registry().register(handle.clone(), policy) {
            Ok(displaced) => {
                for old in displaced {
                    // A RESUME takes the session of its own device's older connection over.
                    if resuming && old.device_id == handle.device_id {
                        old.control.kick_keeping_session();
                    } else {
                        old.control.kick(KickReason::DuplicateLogin);
                    }
                }
            }
            Err(RegisterError::Duplicate) => {
                debug_assert_eq!(policy, DuplicateLoginPolicy::RejectNew);
                return Err(login_failed(
                    ErrorCode::DuplicateLogin,
                    "already connected on this channel type",
                ));
            }
            Err(RegisterError::TooMany) => return Err(too_many_connections(settings)),
        }
        node.router.recipients().logged_in(&handle.user);
        // The same policy across the cluster: older connections on other nodes are kicked there.
        match node
            .cluster()
            .register_as(&handle.presence(), policy, resuming)
            .await
        {
            Ok(RegisterOutcome::Registered) => {}
            Ok(RegisterOutcome::Rejected) => {
                node.registry().unregister(&handle.user, handle.id);
                return Err(login_failed(
                    ErrorCode::DuplicateLogin,
                    "already connected on this channel type on another node",
                ));
            }
            Ok(RegisterOutcome::TooMany) => {
                node.registry().unregister(&handle.user, handle.id);
                return Err(too_many_connections(settings));
            }
            Err(e) => {
                crate::warn_limited!(%peer, conn, user, error = %esc(&e), "presence not registered; it is re-registered when the cluster recovers")
            }
        }
        // Released by `unregister`.
        node.user_sends.acquire(&handle.user);
        // From here on live pushes reach this connection (locally and from other nodes); what
        // was sent before is in the database, or on its way there, below the stream's head.
        let (stored_cursor, stored_head) = match node
            .store()
            .device_start(&handle.user, &handle.device_id)
            .await
        {
            Ok(start) => start,
            Err(e) => {
                crate::warn_limited!(%peer, conn, user, error = %esc(&e), "cannot read the device's cursor");
                self.unregister(&handle).await;
                return Err(login_failed(
                    ErrorCode::Unavailable,
                    "the message store is unavailable; retry later",
                ));
            }
        };
        // Nothing can refuse the login any more: the session is created, or the presented one
        // replaced (used up) now.
        let resumed = hello.resumed.is_some();
        let ticket = match &hello.resumed {
            Some(presented) => {
                match node
                    .cluster()
                    .resume_session(presented, &handle.device_id)
                    .await
                {
                    Ok(Resume::Resumed { ticket, .. }) => {
                        count_session("resumed");
                        ticket
                    }
                    Ok(Resume::Unknown | Resume::WrongDevice) => {
                        // Taken by a concurrent RESUME, revoked or expired since it was read.
                        count_session("unknown");
                        self.unregister(&handle).await;
                        return Err(session_expired());
                    }
                    Err(e) => {
                        crate::warn_limited!(%peer, conn, user, error = %esc(&e), "cannot resume a session");
                        self.unregister(&handle).await;
                        return Err(sessions_unavailable());
                    }
                }
            }
            None => {
                let session = Session {
                    user: handle.user.to_string(),
                    device: handle.device_id.to_string(),
                    channel: handle.channel.to_string(),
                };
                let (ticket, stored) = node.cluster().create_session(&session).await;
                if let Err(e) = stored {
                    crate::warn_limited!(%peer, conn, user, error = %esc(&e), "session not stored; a RESUME with it will be refused");
                }
                count_session("created");
                ticket
            }
        };
        let cursor = stored_cursor.max(hello.last_seq);
        // Embedded: the first connection of a user since the node started sets the user's
        // counter from the store, so that messages to the user need no database read.
        node.cluster().prime_seq(&handle.user, stored_head);
        // The last position taken, committed or not (the stored head lags it by the writes in
        // flight): replay waits for every position up to it. No counter means no position was
        // taken since the stored head, and any taken from now on is pushed here live.
        let head = match node.cluster().stream_head(&handle.user).await {
            Ok(head) => Some(head.unwrap_or(0).max(stored_head)),
            Err(e) => {
                debug!(%peer, conn, user, error = %esc(&e), "stream head unknown; replay reads the database");
                None
            }
        };

        metrics::gauge_connections(self.kind, &handle.channel, 1.0);
        metrics::counter_login(if resumed { "resumed" } else { "ok" });

        let interval_ms = negotiate_heartbeat(hello.heartbeat, &settings.heartbeat);
        let heartbeat = Heartbeat {
            interval: Duration::from_millis(interval_ms),
            idle_timeout: Duration::from_millis(interval_ms * u64::from(settings.heartbeat.missed)),
        };
        let result = ServerFrame::LoginResult {
            session_id: ticket.id.clone(),
            session_expires_at_ms: ticket.expires_at_ms,
            resumed,
            cursor,
            heartbeat_ms: interval_ms,
            idle_timeout_ms: heartbeat.idle_timeout.as_millis() as u64,
            node_id: node.node_id().to_owned(),
            user_id: handle.user.to_string(),
            server_time_ms: unix_millis(),
            protocol: PROTOCOL_VERSION,
        };
        let mut stream = DeviceStream::new(
            node.streams.clone(),
            handle.channel.clone(),
            cursor,
            head,
            Instant::now(),
        );
        // With nothing to replay, `caught_up` goes out in the same write as `login_result`.
        let mut first = vec![Outgoing {
            payload: result.encode(),
            accepted: None,
            push: false,
        }];
        metrics::counter_frame_out(result.kind());
        stream.pump(Instant::now(), &mut first);
        // Logged in: no longer pending (before the client can learn it).
        drop(pending);
        // Written even if a newer login displaced this one meanwhile: the client learns that it
        // logged in, then that it was kicked.
        if let Err(close) = self.write_out(None, &mut first).await {
            if let Some(presented) = &hello.resumed {
                // The client never learnt the new id: it still holds the one it presented.
                node.cluster()
                    .unresume_session(&ticket, presented, &handle.device_id)
                    .await;
            }
            self.unregister(&handle).await;
            metrics::gauge_connections(self.kind, &handle.channel, -1.0);
            return Err(close);
        }
        debug!(%peer, conn, user, transport = self.kind.as_str(), heartbeat_ms = interval_ms, channel = &*handle.channel, cursor, head, resumed, "logged in");
        Ok(Box::new(Bound {
            handle,
            heartbeat,
            session_id: ticket.id,
            stream,
        }))
    }

    /// Serves a logged-in connection until it ends. `bound` comes boxed so that the task does
    /// not hold it twice (as the login's result and as this future's argument).
    async fn run(&mut self, bound: Box<Bound>) -> Close {
        let Bound {
            handle,
            heartbeat,
            session_id,
            mut stream,
        } = {
            // Unboxed in a block of its own, so that the box is freed now and not when this
            // function returns.
            let bound = bound;
            *bound
        };
        let node = self.node.clone();
        let mut last_activity = Instant::now();
        // When to look at the client's silence next (it is checked lazily: a frame moves
        // `last_activity`, not this).
        let mut idle_at = last_activity + heartbeat.idle_timeout;
        // One timer for the heartbeat check and the stream's deadlines (retransmissions,
        // database reads), re-armed when the earliest of them moves.
        let timer = tokio::time::sleep_until(idle_at);
        tokio::pin!(timer);
        let mut armed = Some(idle_at);
        let mut fetch: Option<(Fetch, PageFuture)> = None;
        let mut out: Vec<Outgoing> = Vec::new();
        // Payload bytes in `out` that the stream does not hold (broadcasts).
        let mut writing = 0;
        let close = loop {
            // What this connection holds in memory, against `client.max_queued_bytes`.
            handle.set_held_bytes(stream.queued_bytes(), writing);
            if !out.is_empty() {
                if let Err(close) = self.write_out(Some(&handle), &mut out).await {
                    break close;
                }
                writing = 0;
                handle.set_held_bytes(stream.queued_bytes(), 0);
            }
            if fetch.is_none() {
                if let Some(f) = stream.fetch(Instant::now()) {
                    let store = node.store().clone();
                    let cluster = node.cluster().clone();
                    let user = handle.user.clone();
                    // Its own task: a connection closing meanwhile does not cut the query off.
                    let read: PageFuture = tokio::spawn(async move {
                        // Asked before the read: a missing position that no node holds and
                        // that a later read does not find will never be stored.
                        let held = match f.probe {
                            Some((from, to)) => cluster.lowest_held(&user, from, to).await,
                            None => None,
                        };
                        let rows = store.stream(&user, f.from, f.limit).await?;
                        Ok((rows, held))
                    });
                    fetch = Some((f, read));
                }
            }
            let due = stream.deadline().map_or(idle_at, |at| at.min(idle_at));
            if armed != Some(due) {
                timer.as_mut().reset(due);
                armed = Some(due);
            }
            tokio::select! {
                biased;
                _ = node.shutdown.cancelled() => break Close::Kick(KickReason::Shutdown),
                _ = handle.control.kicked() => {
                    break Close::Kick(handle.control.reason().unwrap_or(KickReason::Admin))
                }
                batch = handle.outbox.recv(MAX_WRITE_BATCH) => {
                    let now = Instant::now();
                    for o in batch {
                        if o.stamp.seq == 0 {
                            writing += o.payload.len();
                            out.push(Outgoing { payload: o.payload, accepted: o.accepted, push: true });
                        } else {
                            stream.offer(o, now);
                        }
                    }
                    stream.pump(now, &mut out);
                }
                rows = async { (&mut fetch.as_mut().expect("guarded").1).await }, if fetch.is_some() => {
                    let (f, _) = fetch.take().expect("guarded");
                    let now = Instant::now();
                    match rows {
                        Ok(Ok((rows, held))) => stream.fill(f, rows, held, now, unix_millis()),
                        Ok(Err(e)) => {
                            debug!(peer = %self.peer, conn = handle.id, user = &*handle.user, error = %crate::logging::esc(&e), "cannot read the stream; trying again");
                            stream.fetch_failed(now);
                        }
                        Err(e) => {
                            debug!(peer = %self.peer, conn = handle.id, user = &*handle.user, error = %crate::logging::esc(&e), "cannot read the stream; trying again");
                            stream.fetch_failed(now);
                        }
                    }
                    stream.pump(now, &mut out);
                }
                () = &mut timer, if armed.is_some() => {
                    armed = None;
                    let now = Instant::now();
                    if stream.deadline().is_some_and(|at| at <= now) {
                        if stream.on_timer(now, &mut out).is_err() {
                            break Close::Kick(KickReason::AckTimeout);
                        }
                        stream.pump(now, &mut out);
                    }
                    if now >= idle_at {
                        if self.receipts.len() >= MAX_SENDS_IN_FLIGHT {
                            // Not reading is our doing (receipts are pending), not the client's
                            // silence: its frames wait in the socket.
                            last_activity = now;
                        }
                        idle_at = last_activity + heartbeat.idle_timeout;
                        if now >= idle_at {
                            break Close::HeartbeatTimeout;
                        }
                    }
                }
                receipt = next_receipt(&mut self.receipts), if !self.receipts.is_empty() => {
                    let frame = receipt.unwrap_or_else(|e| {
                        tracing::error!(peer = %self.peer, conn = handle.id, user = &*handle.user, error = %crate::logging::esc(&e), "send task failed");
                        ServerFrame::error(ErrorCode::Internal, "the message could not be processed")
                    });
                    reply(&mut out, &frame);
                    // Room for the next waiting sends, in the order they came.
                    while self.receipts.len() < MAX_SENDS_IN_FLIGHT {
                        let Some(d) = self.deferred.pop_front() else { break };
                        Box::pin(self.on_send(&handle, d)).await;
                    }
                }
                frame = self.reader.next() => {
                    last_activity = Instant::now();
                    match frame {
                        None => break Close::PeerClosed,
                        Some(Err(ReadError::TooLarge)) => {
                            break Close::Error(ErrorCode::FrameTooLarge, too_large_message(node.settings.client.max_frame_len))
                        }
                        Some(Err(e)) => break Close::Io(e.to_string()),
                        Some(Ok(bytes)) => {
                            if let Some(close) = self.on_frame(&handle, &mut stream, &mut out, bytes).await {
                                break close;
                            }
                        }
                    }
                }
            }
        };
        debug!(
            peer = %self.peer,
            conn = handle.id,
            user = &*handle.user,
            ?close,
            interval_ms = heartbeat.interval.as_millis() as u64,
            cursor = stream.cursor(),
            "connection ending"
        );
        // Counted before the connection leaves the registry: whoever sees it gone sees it counted.
        count_close(&close, &node);
        self.unregister(&handle).await;
        metrics::gauge_connections(self.kind, &handle.channel, -1.0);
        // The session ends with LOGOUT and with kicks that mean "do not come back as this
        // session"; a connection that merely broke (or a node going down) can be resumed.
        // A RESUME of this device that displaced this connection takes the session over.
        if matches!(
            close,
            Close::Logout | Close::Kick(KickReason::DuplicateLogin | KickReason::Admin)
        ) && !handle.control.keeps_session()
        {
            // Boxed, like every once-per-connection call into the cluster.
            Box::pin(node.cluster().revoke_session(&session_id)).await;
        }
        close
    }

    /// Writes `out` with one flush (bounded by the write timeout, cut short by a kick of
    /// `handle` when given), then clears it.
    async fn write_out(
        &mut self,
        handle: Option<&ConnHandle>,
        out: &mut Vec<Outgoing>,
    ) -> Result<(), Close> {
        let node = self.node.clone();
        let write_timeout = Duration::from_millis(node.settings.client.write_timeout_ms);
        let writer = &mut self.writer;
        let batch = async {
            for o in out.iter() {
                writer.feed(o.payload.clone()).await?;
            }
            writer.flush().await
        };
        // A write blocked on a client that does not read ends at the write timeout, or sooner
        // when the connection is kicked meanwhile.
        let kicked = async {
            match handle {
                Some(h) => {
                    h.control.kicked().await;
                    h.control.reason().unwrap_or(KickReason::Admin)
                }
                None => std::future::pending().await,
            }
        };
        let written = tokio::select! {
            written = timeout(write_timeout, batch) => written,
            reason = kicked => return Err(Close::Kick(reason)),
        };
        match written {
            Ok(Ok(())) => {
                let now = std::time::Instant::now();
                let mut pushes = 0;
                for o in out.drain(..) {
                    if o.push {
                        pushes += 1;
                    }
                    if let Some(accepted) = o.accepted {
                        node.metrics
                            .push_latency
                            .record(now.duration_since(accepted));
                    }
                }
                metrics::counter_pushes_out(pushes);
                Ok(())
            }
            Ok(Err(e)) => Err(Close::Io(e.to_string())),
            Err(_) => Err(Close::Kick(KickReason::SlowConsumer)),
        }
    }

    /// Handles one frame of a logged-in connection; `Some` ends the connection.
    async fn on_frame(
        &mut self,
        handle: &Arc<ConnHandle>,
        stream: &mut DeviceStream,
        out: &mut Vec<Outgoing>,
        bytes: Bytes,
    ) -> Option<Close> {
        let frame = match ClientFrame::decode(&bytes) {
            Ok(frame) => frame,
            Err(e) => {
                metrics::counter_frame_in("invalid");
                let error = ServerFrame::error(ErrorCode::BadFrame, format!("invalid frame: {e}"));
                metrics::counter_protocol_error(ErrorCode::BadFrame);
                reply(out, &error);
                return None;
            }
        };
        metrics::counter_frame_in(frame.kind());
        let answer = match frame {
            ClientFrame::Heartbeat {} => ServerFrame::HeartbeatAck {
                server_time_ms: unix_millis(),
            },
            ClientFrame::Send {
                to,
                channel,
                client_msg_id,
                body,
                retry,
            } => {
                let now = self.receipts.len() < MAX_SENDS_IN_FLIGHT && self.deferred.is_empty();
                if now || self.deferred.len() < MAX_DEFERRED_SENDS {
                    let Some(slot) = self.node.send_slots.try_take() else {
                        // The node holds all the sends it can answer in time: say no at once.
                        ::metrics::counter!(metrics::SENDS_SHED).increment(1);
                        self.node.metrics.refused.increment(1);
                        let refusal = refused_at_once(
                            client_msg_id,
                            ErrorCode::Unavailable,
                            BACKLOG_RETRY_MS,
                        );
                        reply(out, &refusal);
                        return None;
                    };
                    let send = Deferred {
                        to,
                        channel,
                        client_msg_id,
                        body,
                        retry,
                        slot,
                    };
                    if now {
                        // Boxed: a send's state exists only while a send is being taken.
                        Box::pin(self.on_send(handle, send)).await;
                    } else {
                        self.deferred.push_back(send);
                    }
                } else {
                    // Too many sends unanswered: say no at once rather than stop reading.
                    ::metrics::counter!(metrics::RATE_LIMITED, "limit" => "backlog").increment(1);
                    let refusal =
                        refused_at_once(client_msg_id, ErrorCode::RateLimited, BACKLOG_RETRY_MS);
                    reply(out, &refusal);
                }
                return None;
            }
            ClientFrame::Ack {
                seq: None,
                id: None,
            } => {
                metrics::counter_protocol_error(ErrorCode::InvalidField);
                ServerFrame::error(ErrorCode::InvalidField, "ack needs seq or id")
            }
            ClientFrame::Ack { seq, id } => {
                metrics::counter_ack();
                if let Some(cursor) = stream.ack(seq, id) {
                    self.node
                        .store()
                        .save_cursor(&handle.user, &handle.device_id, cursor);
                }
                stream.pump(Instant::now(), out);
                return None;
            }
            ClientFrame::Logout {} => return Some(Close::Logout),
            ClientFrame::Login { .. } | ClientFrame::Resume { .. } => {
                metrics::counter_protocol_error(ErrorCode::AlreadyLoggedIn);
                ServerFrame::error(
                    ErrorCode::AlreadyLoggedIn,
                    "this connection is already logged in",
                )
            }
        };
        reply(out, &answer);
        None
    }

    /// Takes a send: the id, the place in the store's queue and the local delivery happen here,
    /// in the order sends arrive; the rest (other nodes, the commit) runs in a task of its own
    /// whose result is the receipt.
    async fn on_send(&mut self, handle: &Arc<ConnHandle>, send: Deferred) {
        let Deferred {
            to,
            channel,
            client_msg_id,
            body,
            retry,
            slot,
        } = send;
        let node = self.node.clone();
        let router = &node.router;
        // Rate limits first: a refused send costs nothing more.
        let now = Instant::now();
        let rate = node.connection_send_rate();
        let limited = match self.send_bucket.wait(rate, now) {
            Some(wait) => Some(("connection", wait)),
            None => node.user_sends.wait(&handle.user, now).map(|w| ("user", w)),
        };
        if let Some((limit, wait)) = limited {
            metrics::counter_rate_limited(limit);
            node.metrics.refused.increment(1);
            let frame =
                refused_at_once(client_msg_id, ErrorCode::RateLimited, retry_after_ms(wait));
            self.receipts
                .push_back(node.tasks.spawn(async move { frame }));
            return;
        }
        let _ = self.send_bucket.take(rate, now);
        node.user_sends.take(&handle.user, now);
        let checked = if valid_id(&client_msg_id) {
            router.check(&to, channel.as_deref())
        } else {
            Err(ErrorCode::InvalidField)
        };
        let begun = match checked {
            Err(reason) => Err(router.refused(reason)),
            Ok(()) => {
                let from = Some(handle.user.clone());
                let mut msg = router.accept(from, to, channel, body, Some(client_msg_id.clone()));
                msg.retry = retry;
                router.begin(msg).await
            }
        };
        let receipt = |delivery: crate::router::Delivery| ServerFrame::SendResult {
            client_msg_id,
            id: delivery.id,
            status: delivery.status,
            connections: delivery.connections,
            reason: delivery.reason,
            retry_after_ms: None,
        };
        let task = match begun {
            // Refused, or a retry answered from the store.
            Err(answer) => {
                let frame = receipt(answer);
                node.tasks.spawn(async move { frame })
            }
            Ok(submission) => {
                let node = node.clone();
                node.clone().tasks.spawn(async move {
                    // Released when the send is answered (or the node shuts down).
                    let _slot = slot;
                    receipt(node.router.finish(submission).await)
                })
            }
        };
        self.receipts.push_back(task);
    }

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

/// The receipt of the oldest send, once its task is done. Cancel safe: the receipt is taken
/// off the queue only when it is returned.
async fn next_receipt(
    receipts: &mut VecDeque<JoinHandle<ServerFrame>>,
) -> Result<ServerFrame, tokio::task::JoinError> {
    let Some(oldest) = receipts.front_mut() else {
        return std::future::pending().await;
    };
    let receipt = oldest.await;
    receipts.pop_front();
    receipt
}

/// The receipt of a send refused before it was taken: nothing was stored; the client may send
/// it again after `retry_after_ms`.
fn refused_at_once(client_msg_id: String, reason: ErrorCode, retry_after_ms: u64) -> ServerFrame {
    ServerFrame::SendResult {
        client_msg_id,
        id: None,
        status: imgate_shared::SendStatus::Refused,
        connections: 0,
        reason: Some(reason),
        retry_after_ms: Some(retry_after_ms),
    }
}

/// Queues a reply frame; it leaves with the next write.
fn reply(out: &mut Vec<Outgoing>, frame: &ServerFrame) {
    metrics::counter_frame_out(frame.kind());
    out.push(Outgoing {
        payload: frame.encode(),
        accepted: None,
        push: false,
    });
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
