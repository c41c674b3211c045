//! The client's background task: connect, log in or resume, then frames, heartbeats, sends and
//! acknowledgements until the connection ends; then back off and reconnect.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, Instant};

use super::inbox::Inbox;
use super::*;
use crate::connection::{ClientConnection, ConnectionError, Endpoint};
use crate::protocol::{Body, ErrorCode, KickReason};
use crate::{ClientFrame, ServerFrame};

/// A send waiting for its receipt; kept across reconnects.
pub(super) struct PendingSend {
    frame: ClientFrame,
    reply: oneshot::Sender<Receipt>,
}

pub(super) struct State {
    config: ClientConfig,
    events: mpsc::Sender<Event>,
    shared: Arc<Shared>,
    pending: HashMap<String, PendingSend>,
    inbox: Inbox,
    /// The latest session id, presented by the next connection's `resume`.
    session: Option<String>,
    /// The server answered `resume` as an unknown frame: log in from now on.
    resume_unsupported: bool,
    next_msg: u64,
    instance: u64,
    rng: u64,
}

impl State {
    pub(super) fn set_session(&mut self, session: Option<String>) {
        *self
            .shared
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = session.clone();
        self.session = session;
    }

    pub(super) fn forget_session(&mut self) {
        self.set_session(None);
    }

    /// The session to resume on the next connection, if resuming is on. An expired one is
    /// presented too: the server decides, and a refusal costs one round trip.
    pub(super) fn session_to_resume(&self) -> Option<String> {
        if !self.config.resume || self.resume_unsupported {
            return None;
        }
        self.session.clone()
    }

    pub(super) fn publish_last_seq(&self) {
        self.shared
            .last_seq
            .store(self.inbox.last_seq, Ordering::Relaxed);
    }
}

/// Why a session ended.
pub(super) enum SessionEnd {
    /// Reconnect after a backoff.
    Retry(String),
    /// Reconnect at once (a little jitter only): the node is going away, not failing.
    RetrySoon(String),
    /// The session could not be resumed: log in at once, on a new connection.
    Relogin,
    /// Stop the client.
    Stop,
}

pub(super) async fn run(
    config: ClientConfig,
    mut commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    shared: Arc<Shared>,
) {
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    let mut state = State {
        inbox: Inbox::new(config.last_seq, SEEN_BROADCASTS),
        config,
        events,
        shared,
        pending: HashMap::new(),
        session: None,
        resume_unsupported: false,
        next_msg: 0,
        instance: seed,
        rng: seed,
    };
    let mut attempt = 0u32;
    let mut next_endpoint = 0usize;
    loop {
        let endpoints = candidates(&state.config).await;
        if endpoints.is_empty() {
            return;
        }
        let endpoint = &endpoints[next_endpoint % endpoints.len()];
        next_endpoint += 1;
        let end = match ClientConnection::connect(endpoint).await {
            Ok(conn) => session(&mut state, conn, &mut commands, &mut attempt).await,
            Err(e) => SessionEnd::Retry(format!("connect to {endpoint} failed: {e}")),
        };
        let soon = matches!(end, SessionEnd::RetrySoon(_));
        match end {
            SessionEnd::Stop => return,
            // Not a failure of the node: log in right away.
            SessionEnd::Relogin => continue,
            SessionEnd::Retry(reason) | SessionEnd::RetrySoon(reason) => {
                if state
                    .events
                    .send(Event::Disconnected { reason })
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        let delay = if soon {
            // The node is going away, not failing: come back at once, spread over a quarter of
            // the first backoff so that a node's clients do not all arrive together.
            backoff_delay(&state.config.backoff, 0, &mut state.rng) / 4
        } else {
            backoff_delay(&state.config.backoff, attempt, &mut state.rng)
        };
        attempt = attempt.saturating_add(1);
        // Keep taking sends while waiting, so callers are not blocked by a reconnect.
        let wake = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = sleep_until(wake) => break,
                cmd = commands.recv() => match cmd {
                    None | Some(Command::Close { .. }) => return,
                    Some(Command::Send { to, channel, body, reply }) => {
                        queue_send(&mut state, to, channel, body, reply);
                    }
                },
            }
        }
    }
}

/// The delay before reconnect attempt `attempt`: exponential, capped, with jitter.
pub(super) fn backoff_delay(b: &Backoff, attempt: u32, rng: &mut u64) -> Duration {
    let base = b.initial.as_secs_f64() * 2f64.powi(attempt.min(30) as i32);
    let capped = base.min(b.max.as_secs_f64());
    // xorshift64: enough randomness to spread reconnects of many clients.
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    let unit = (*rng >> 11) as f64 / (1u64 << 53) as f64;
    let jitter = b.jitter.clamp(0.0, 1.0);
    Duration::from_secs_f64(capped * (1.0 - jitter + 2.0 * jitter * unit).max(0.0))
}

pub(super) fn queue_send(
    state: &mut State,
    to: String,
    channel: Option<String>,
    body: Body,
    reply: oneshot::Sender<Receipt>,
) -> String {
    state.next_msg += 1;
    let client_msg_id = format!("{:x}-{}", state.instance, state.next_msg);
    let frame = ClientFrame::Send {
        to,
        channel,
        client_msg_id: client_msg_id.clone(),
        body,
        retry: false,
    };
    state
        .pending
        .insert(client_msg_id.clone(), PendingSend { frame, reply });
    client_msg_id
}

/// The nodes to try: from the alloc service when configured (falling back to the list).
pub(super) async fn candidates(config: &ClientConfig) -> Vec<Endpoint> {
    if let Some(url) = &config.alloc_url {
        if let Ok(nodes) = alloc(url, config.prefer_websocket).await {
            if !nodes.is_empty() {
                return nodes;
            }
        }
    }
    config.endpoints.clone()
}

/// What wakes a session up.
pub(super) enum Input {
    Frame(Result<Option<ServerFrame>, ConnectionError>),
    Command(Option<Command>),
    Heartbeat,
    /// Nothing else is ready: the acknowledgement that is due goes out before the client waits.
    Idle,
}

pub(super) async fn next_input(
    conn: &mut ClientConnection,
    commands: &mut mpsc::Receiver<Command>,
    heartbeat_at: Instant,
) -> Input {
    tokio::select! {
        frame = conn.recv() => Input::Frame(frame),
        cmd = commands.recv() => Input::Command(cmd),
        _ = sleep_until(heartbeat_at) => Input::Heartbeat,
    }
}

/// One connection: login or resume, then frames, heartbeats and commands until it ends.
pub(super) async fn session(
    state: &mut State,
    mut conn: ClientConnection,
    commands: &mut mpsc::Receiver<Command>,
    attempt: &mut u32,
) -> SessionEnd {
    let client_version = Some(concat!("imgate-client-rs/", env!("CARGO_PKG_VERSION")).to_owned());
    let last_seq = state.inbox.last_seq;
    let resuming = state.session_to_resume();
    let hello = match &resuming {
        Some(session_id) => ClientFrame::Resume {
            session_id: session_id.clone(),
            device_id: state.config.device_id.clone(),
            last_seq: Some(last_seq),
            client_version,
            heartbeat: Some(state.config.heartbeat),
        },
        None => ClientFrame::Login {
            token: state.config.token.clone(),
            device_id: state.config.device_id.clone(),
            channel: state.config.channel.clone(),
            client_version,
            heartbeat: Some(state.config.heartbeat),
            last_seq: (last_seq > 0).then_some(last_seq),
        },
    };
    if let Err(e) = conn.send(&hello).await {
        return SessionEnd::Retry(e.to_string());
    }
    let heartbeat_ms = match tokio::time::timeout(Duration::from_secs(15), conn.recv()).await {
        Ok(Ok(Some(ServerFrame::LoginResult {
            session_id,
            resumed,
            cursor,
            heartbeat_ms,
            node_id,
            ..
        }))) => {
            *attempt = 0;
            state.set_session(Some(session_id.clone()));
            state.inbox.connected(cursor);
            state.publish_last_seq();
            let connected = Event::Connected {
                node_id,
                session_id,
                resumed,
                cursor,
            };
            if state.events.send(connected).await.is_err() {
                return SessionEnd::Stop;
            }
            heartbeat_ms
        }
        Ok(Ok(Some(ServerFrame::Error { error, message, .. }))) => {
            return match error {
                // Conditions of the node, not of this client: try again (perhaps elsewhere).
                ErrorCode::ServerFull
                | ErrorCode::ShuttingDown
                | ErrorCode::Internal
                | ErrorCode::Unavailable => SessionEnd::Retry(message),
                // The session is gone (expired, revoked, another device's): log in with the token.
                ErrorCode::SessionExpired | ErrorCode::InvalidDevice if resuming.is_some() => {
                    state.forget_session();
                    SessionEnd::Relogin
                }
                // A server that does not know `resume`: log in, now and from now on.
                ErrorCode::BadFrame | ErrorCode::LoginRequired if resuming.is_some() => {
                    state.forget_session();
                    state.resume_unsupported = true;
                    SessionEnd::Relogin
                }
                _ => {
                    let _ = state
                        .events
                        .send(Event::LoginFailed {
                            code: error,
                            message,
                        })
                        .await;
                    SessionEnd::Stop
                }
            };
        }
        Ok(Ok(other)) => return SessionEnd::Retry(format!("unexpected login reply {other:?}")),
        Ok(Err(e)) => return SessionEnd::Retry(e.to_string()),
        Err(_) => return SessionEnd::Retry("no login reply".into()),
    };
    // Sends still waiting for a receipt from an earlier connection go out again, same ids,
    // marked as retries: one that was stored is answered from the store and not pushed again.
    let resend: Vec<ClientFrame> = state
        .pending
        .values()
        .map(|p| {
            let mut frame = p.frame.clone();
            if let ClientFrame::Send { retry, .. } = &mut frame {
                *retry = true;
            }
            frame
        })
        .collect();
    for frame in resend {
        if let Err(e) = conn.send(&frame).await {
            return SessionEnd::Retry(e.to_string());
        }
    }
    let interval = Duration::from_millis(heartbeat_ms.saturating_sub(1_000).max(500));
    let mut next_heartbeat = Instant::now() + interval;
    loop {
        let ack_due = state.inbox.ack_due();
        let input = tokio::select! {
            biased;
            input = next_input(&mut conn, commands, next_heartbeat) => input,
            // Polled only when no frame, command or heartbeat is ready.
            () = std::future::ready(()), if ack_due => Input::Idle,
        };
        let step = match input {
            Input::Frame(Ok(Some(frame))) => on_frame(state, &mut conn, frame).await,
            Input::Frame(Ok(None)) => Err(SessionEnd::Retry("server closed the connection".into())),
            Input::Frame(Err(e)) => Err(SessionEnd::Retry(e.to_string())),
            Input::Idle => flush_ack(state, &mut conn).await,
            Input::Heartbeat => {
                next_heartbeat = Instant::now() + interval;
                send(&mut conn, &ClientFrame::Heartbeat {}).await
            }
            Input::Command(None) => {
                let _ = flush_ack(state, &mut conn).await;
                Err(SessionEnd::Stop)
            }
            Input::Command(Some(Command::Close { done })) => {
                let _ = flush_ack(state, &mut conn).await;
                // The server revokes the session on logout.
                state.forget_session();
                let _ = conn.send(&ClientFrame::Logout {}).await;
                let _ = conn.close().await;
                let _ = done.send(());
                Err(SessionEnd::Stop)
            }
            Input::Command(Some(Command::Send {
                to,
                channel,
                body,
                reply,
            })) => {
                let id = queue_send(state, to, channel, body, reply);
                let frame = state.pending[&id].frame.clone();
                send(&mut conn, &frame).await
            }
        };
        if let Err(end) = step {
            return end;
        }
    }
}

pub(super) async fn send(
    conn: &mut ClientConnection,
    frame: &ClientFrame,
) -> Result<(), SessionEnd> {
    conn.send(frame)
        .await
        .map_err(|e| SessionEnd::Retry(e.to_string()))
}

/// Sends the cumulative acknowledgement that is due, if any.
pub(super) async fn flush_ack(
    state: &mut State,
    conn: &mut ClientConnection,
) -> Result<(), SessionEnd> {
    match state.inbox.take_ack() {
        Some(seq) => {
            let ack = ClientFrame::Ack {
                seq: Some(seq),
                id: None,
            };
            send(conn, &ack).await
        }
        None => Ok(()),
    }
}

/// Hands an event to the application. When the application is behind (its event stream is
/// full), the acknowledgement due goes out before waiting, so the server is not left waiting for
/// acks of messages that were already handed over.
pub(super) async fn emit(
    state: &mut State,
    conn: &mut ClientConnection,
    event: Event,
) -> Result<(), SessionEnd> {
    let event = match state.events.try_send(event) {
        Ok(()) => return Ok(()),
        Err(TrySendError::Closed(_)) => return Err(SessionEnd::Stop),
        Err(TrySendError::Full(event)) => event,
    };
    flush_ack(state, conn).await?;
    state.events.send(event).await.map_err(|_| SessionEnd::Stop)
}

pub(super) async fn on_frame(
    state: &mut State,
    conn: &mut ClientConnection,
    frame: ServerFrame,
) -> Result<(), SessionEnd> {
    match frame {
        ServerFrame::Push {
            id,
            seq,
            from,
            to,
            channel,
            client_msg_id,
            body,
            ts,
        } => {
            let sent_as = from.clone().zip(client_msg_id.clone());
            let sent_as_ref = sent_as.as_ref().map(|(f, c)| (f.as_str(), c.as_str()));
            if !state.inbox.is_new(id, seq, sent_as_ref) {
                return Ok(());
            }
            let message = Message {
                id,
                seq,
                from,
                to,
                channel,
                client_msg_id,
                body,
                ts,
            };
            emit(state, conn, Event::Message(message)).await?;
            let sent_as_ref = sent_as.as_ref().map(|(f, c)| (f.as_str(), c.as_str()));
            state.inbox.delivered(id, seq, sent_as_ref);
            state.publish_last_seq();
            if state.inbox.ack_now() {
                flush_ack(state, conn).await?;
            }
            Ok(())
        }
        ServerFrame::Expired { from_seq, to_seq } => {
            emit(state, conn, Event::Expired { from_seq, to_seq }).await?;
            state.inbox.expired(to_seq);
            state.publish_last_seq();
            Ok(())
        }
        ServerFrame::CaughtUp { seq } => emit(state, conn, Event::CaughtUp { seq }).await,
        ServerFrame::SendResult {
            client_msg_id,
            id,
            status,
            connections,
            reason,
            retry_after_ms,
        } => {
            if let Some(p) = state.pending.remove(&client_msg_id) {
                let _ = p.reply.send(Receipt {
                    id,
                    status,
                    connections,
                    reason,
                    retry_after_ms,
                });
            }
            Ok(())
        }
        ServerFrame::Kick { reason, .. } => {
            // The server revokes the session for these; the next connection logs in.
            if matches!(reason, KickReason::DuplicateLogin | KickReason::Admin) {
                state.forget_session();
            }
            let _ = state.events.send(Event::Kicked { reason }).await;
            Err(match reason {
                KickReason::DuplicateLogin => SessionEnd::Stop,
                KickReason::Shutdown => SessionEnd::RetrySoon("kicked: shutdown".into()),
                other => SessionEnd::Retry(format!("kicked: {}", other.as_str())),
            })
        }
        ServerFrame::Error { error, message, .. } => {
            // Errors after login concern one frame; the connection stays unless the server closes it.
            let event = Event::ServerError {
                code: error,
                message,
            };
            emit(state, conn, event).await
        }
        ServerFrame::HeartbeatAck { .. } | ServerFrame::LoginResult { .. } => Ok(()),
    }
}
