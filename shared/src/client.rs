//! An async imgate client for apps, tests and the load test.
//!
//! [`Client::start`] runs a background task that connects (over TCP or WebSocket), logs in, keeps
//! heartbeats going and reconnects by itself with exponential backoff and jitter, choosing a node
//! from the gateway's `GET /api/v1/alloc` when an alloc URL is given. Incoming messages arrive as
//! [`Event`]s on a stream; each is acknowledged to the server when it is handed to the
//! application, and duplicates (the same message id seen again, e.g. after a reconnect) are
//! dropped. [`Client::send`] resolves to the server's receipt; a send whose receipt was lost to a
//! disconnect is sent again, with the same client message id, after the reconnect.
//!
//! ```no_run
//! use imgate_shared::client::{Client, ClientConfig, Event};
//! use imgate_shared::connection::Endpoint;
//! use imgate_shared::protocol::Body;
//!
//! # async fn demo(token: String) -> Result<(), Box<dyn std::error::Error>> {
//! let config = ClientConfig::new(vec![Endpoint::tcp("127.0.0.1:7400")], token, "phone-1", "app");
//! let (client, mut events) = Client::start(config);
//! let receipt = client.send("bob", Body::from_value(&"hello")?).await?;
//! println!("{:?}", receipt.status);
//! while let Some(event) = events.recv().await {
//!     if let Event::Message(m) = event {
//!         println!("{:?}: {}", m.from, m.body.get());
//!     }
//! }
//! # Ok(()) }
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep, Instant};

use crate::connection::{ClientConnection, ConnectionError, Endpoint};
use crate::protocol::{Body, ErrorCode, HeartbeatRange, KickReason, MessageId, SendStatus};
use crate::{ClientFrame, ServerFrame};

/// Reconnect backoff: exponential from `initial` to `max`, each delay randomised by ±`jitter`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    /// Fraction of each delay that is random, 0.0 to 1.0.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
            jitter: 0.5,
        }
    }
}

/// How a [`Client`] finds and logs in to the gateway.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Nodes to try, in turn; used when `alloc_url` is absent or fails.
    pub endpoints: Vec<Endpoint>,
    /// `http://host:port/api/v1/alloc`: when set, nodes are taken from it, least loaded first.
    pub alloc_url: Option<String>,
    /// With `alloc_url`: connect over WebSocket instead of TCP.
    pub prefer_websocket: bool,
    pub token: String,
    pub device_id: String,
    pub channel: String,
    pub heartbeat: HeartbeatRange,
    pub backoff: Backoff,
    /// Longest wait for a receipt before the send fails with [`ClientError::Timeout`].
    pub send_timeout: Duration,
}

impl ClientConfig {
    pub fn new(
        endpoints: Vec<Endpoint>,
        token: impl Into<String>,
        device_id: impl Into<String>,
        channel: impl Into<String>,
    ) -> Self {
        ClientConfig {
            endpoints,
            alloc_url: None,
            prefer_websocket: false,
            token: token.into(),
            device_id: device_id.into(),
            channel: channel.into(),
            heartbeat: HeartbeatRange {
                min_ms: 10_000,
                max_ms: 60_000,
            },
            backoff: Backoff::default(),
            send_timeout: Duration::from_secs(30),
        }
    }
}

/// A message pushed to this client.
#[derive(Debug, Clone)]
pub struct Message {
    pub id: MessageId,
    pub from: Option<String>,
    pub to: String,
    pub channel: Option<String>,
    pub body: Body,
    pub ts: u64,
}

/// What happens on a client's connection, in order.
#[derive(Debug, Clone)]
pub enum Event {
    /// Logged in on `node_id`.
    Connected { node_id: String, session_id: String },
    /// A message, handed over once per id.
    Message(Message),
    /// The connection dropped; the client reconnects by itself.
    Disconnected { reason: String },
    /// The server kicked this client. After `duplicate_login` the client stops (another login of
    /// the same user and channel type took over); after other reasons it reconnects.
    Kicked { reason: KickReason },
    /// Login was refused with `code`; the client stops (a new token is needed).
    LoginFailed { code: ErrorCode, message: String },
    /// The server reported an error about one frame; the connection goes on.
    ServerError { code: ErrorCode, message: String },
}

/// The server's receipt for a send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub id: Option<MessageId>,
    pub status: SendStatus,
    pub connections: u32,
    pub reason: Option<ErrorCode>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the client has stopped")]
    Stopped,
    #[error("no receipt within the send timeout")]
    Timeout,
}

enum Command {
    Send {
        to: String,
        channel: Option<String>,
        body: Body,
        reply: oneshot::Sender<Receipt>,
    },
    /// Log out; `done` is answered once the logout is written.
    Close { done: oneshot::Sender<()> },
}

/// A handle to a running client; dropping every handle stops it.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    send_timeout: Duration,
}

impl Client {
    /// Starts the client's background task; events arrive on the returned receiver.
    pub fn start(config: ClientConfig) -> (Client, mpsc::Receiver<Event>) {
        let (commands, rx) = mpsc::channel(256);
        let (events_tx, events) = mpsc::channel(1024);
        let send_timeout = config.send_timeout;
        tokio::spawn(run(config, rx, events_tx));
        (
            Client {
                commands,
                send_timeout,
            },
            events,
        )
    }

    /// Sends `body` to user `to` and waits for the receipt.
    pub async fn send(&self, to: impl Into<String>, body: Body) -> Result<Receipt, ClientError> {
        self.send_to_channel(to, None, body).await
    }

    /// Sends `body` to the connections of user `to` on `channel` only.
    pub async fn send_to_channel(
        &self,
        to: impl Into<String>,
        channel: Option<String>,
        body: Body,
    ) -> Result<Receipt, ClientError> {
        let (reply, receipt) = oneshot::channel();
        self.commands
            .send(Command::Send {
                to: to.into(),
                channel,
                body,
                reply,
            })
            .await
            .map_err(|_| ClientError::Stopped)?;
        match tokio::time::timeout(self.send_timeout, receipt).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(ClientError::Stopped),
            Err(_) => Err(ClientError::Timeout),
        }
    }

    /// Logs out, waits until the logout is written, and stops the client.
    pub async fn close(&self) {
        let (done, written) = oneshot::channel();
        if self.commands.send(Command::Close { done }).await.is_ok() {
            let _ = written.await;
        }
    }
}

/// A send waiting for its receipt; kept across reconnects.
struct PendingSend {
    frame: ClientFrame,
    reply: oneshot::Sender<Receipt>,
}

/// Remembers recently delivered message ids to drop duplicates.
struct SeenIds {
    set: HashSet<MessageId>,
    order: VecDeque<MessageId>,
    cap: usize,
}

impl SeenIds {
    fn new(cap: usize) -> Self {
        SeenIds {
            set: HashSet::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    /// `true` the first time `id` is seen.
    fn first_time(&mut self, id: MessageId) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

struct State {
    config: ClientConfig,
    events: mpsc::Sender<Event>,
    pending: HashMap<String, PendingSend>,
    seen: SeenIds,
    next_msg: u64,
    instance: u64,
    rng: u64,
}

/// Why a session ended.
enum SessionEnd {
    /// Reconnect after a backoff.
    Retry(String),
    /// Reconnect at once (a little jitter only): the node is going away, not failing.
    RetrySoon(String),
    /// Stop the client.
    Stop,
}

async fn run(
    config: ClientConfig,
    mut commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
) {
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    let mut state = State {
        config,
        events,
        pending: HashMap::new(),
        seen: SeenIds::new(10_000),
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
                _ = tokio::time::sleep_until(wake) => break,
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
fn backoff_delay(b: &Backoff, attempt: u32, rng: &mut u64) -> Duration {
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

fn queue_send(
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
    };
    state
        .pending
        .insert(client_msg_id.clone(), PendingSend { frame, reply });
    client_msg_id
}

/// The nodes to try: from the alloc service when configured (falling back to the list).
async fn candidates(config: &ClientConfig) -> Vec<Endpoint> {
    if let Some(url) = &config.alloc_url {
        if let Ok(nodes) = alloc(url, config.prefer_websocket).await {
            if !nodes.is_empty() {
                return nodes;
            }
        }
    }
    config.endpoints.clone()
}

/// Reads node addresses from `GET /api/v1/alloc` (plain HTTP/1.1, loopback or a trusted network).
pub async fn alloc(url: &str, websocket: bool) -> Result<Vec<Endpoint>, ConnectionError> {
    let bad = || ConnectionError::BadEndpoint(url.to_owned());
    let rest = url.strip_prefix("http://").ok_or_else(bad)?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/api/v1/alloc"),
    };
    let mut stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(host))
        .await
        .map_err(|_| bad())??;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .map_err(|_| bad())??;
    let text = String::from_utf8_lossy(&response);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .ok_or_else(bad)?;
    if !text.starts_with("HTTP/1.1 200") {
        return Err(bad());
    }
    #[derive(serde::Deserialize)]
    struct Node {
        client_addr: String,
        ws_url: String,
    }
    #[derive(serde::Deserialize)]
    struct Alloc {
        nodes: Vec<Node>,
    }
    let alloc: Alloc = serde_json::from_str(body)?;
    Ok(alloc
        .nodes
        .into_iter()
        .map(|n| {
            if websocket {
                Endpoint::Ws(n.ws_url)
            } else {
                Endpoint::Tcp(n.client_addr)
            }
        })
        .collect())
}

/// One connection: login, then frames, heartbeats and commands until it ends.
async fn session(
    state: &mut State,
    mut conn: ClientConnection,
    commands: &mut mpsc::Receiver<Command>,
    attempt: &mut u32,
) -> SessionEnd {
    let login = ClientFrame::Login {
        token: state.config.token.clone(),
        device_id: state.config.device_id.clone(),
        channel: state.config.channel.clone(),
        client_version: Some(concat!("imgate-client-rs/", env!("CARGO_PKG_VERSION")).into()),
        heartbeat: Some(state.config.heartbeat),
    };
    if let Err(e) = conn.send(&login).await {
        return SessionEnd::Retry(e.to_string());
    }
    let heartbeat_ms = match tokio::time::timeout(Duration::from_secs(15), conn.recv()).await {
        Ok(Ok(Some(ServerFrame::LoginResult {
            heartbeat_ms,
            node_id,
            session_id,
            ..
        }))) => {
            *attempt = 0;
            if state
                .events
                .send(Event::Connected {
                    node_id,
                    session_id,
                })
                .await
                .is_err()
            {
                return SessionEnd::Stop;
            }
            heartbeat_ms
        }
        Ok(Ok(Some(ServerFrame::Error { error, message, .. }))) => {
            return if matches!(error, ErrorCode::ServerFull | ErrorCode::ShuttingDown) {
                SessionEnd::Retry(message)
            } else {
                let _ = state
                    .events
                    .send(Event::LoginFailed {
                        code: error,
                        message,
                    })
                    .await;
                SessionEnd::Stop
            };
        }
        Ok(Ok(other)) => return SessionEnd::Retry(format!("unexpected login reply {other:?}")),
        Ok(Err(e)) => return SessionEnd::Retry(e.to_string()),
        Err(_) => return SessionEnd::Retry("no login reply".into()),
    };
    // Sends still waiting for a receipt from an earlier connection go out again, same ids.
    let resend: Vec<ClientFrame> = state.pending.values().map(|p| p.frame.clone()).collect();
    for frame in resend {
        if let Err(e) = conn.send(&frame).await {
            return SessionEnd::Retry(e.to_string());
        }
    }
    let interval = Duration::from_millis(heartbeat_ms.saturating_sub(1_000).max(500));
    let mut next_heartbeat = Instant::now() + interval;
    loop {
        tokio::select! {
            frame = conn.recv() => match frame {
                Ok(Some(frame)) => {
                    if let Some(end) = on_frame(state, &mut conn, frame).await {
                        return end;
                    }
                }
                Ok(None) => return SessionEnd::Retry("server closed the connection".into()),
                Err(e) => return SessionEnd::Retry(e.to_string()),
            },
            cmd = commands.recv() => match cmd {
                None => return SessionEnd::Stop,
                Some(Command::Close { done }) => {
                    let _ = conn.send(&ClientFrame::Logout {}).await;
                    let _ = conn.close().await;
                    let _ = done.send(());
                    return SessionEnd::Stop;
                }
                Some(Command::Send { to, channel, body, reply }) => {
                    let id = queue_send(state, to, channel, body, reply);
                    let frame = state.pending[&id].frame.clone();
                    if let Err(e) = conn.send(&frame).await {
                        return SessionEnd::Retry(e.to_string());
                    }
                }
            },
            _ = sleep(next_heartbeat.saturating_duration_since(Instant::now())) => {
                next_heartbeat = Instant::now() + interval;
                if let Err(e) = conn.send(&ClientFrame::Heartbeat {}).await {
                    return SessionEnd::Retry(e.to_string());
                }
            }
        }
    }
}

async fn on_frame(
    state: &mut State,
    conn: &mut ClientConnection,
    frame: ServerFrame,
) -> Option<SessionEnd> {
    match frame {
        ServerFrame::Push {
            id,
            from,
            to,
            channel,
            body,
            ts,
        } => {
            if state.seen.first_time(id) {
                let message = Message {
                    id,
                    from,
                    to,
                    channel,
                    body,
                    ts,
                };
                if state.events.send(Event::Message(message)).await.is_err() {
                    return Some(SessionEnd::Stop);
                }
            }
            if let Err(e) = conn.send(&ClientFrame::Ack { id }).await {
                return Some(SessionEnd::Retry(e.to_string()));
            }
            None
        }
        ServerFrame::SendResult {
            client_msg_id,
            id,
            status,
            connections,
            reason,
        } => {
            if let Some(p) = state.pending.remove(&client_msg_id) {
                let _ = p.reply.send(Receipt {
                    id,
                    status,
                    connections,
                    reason,
                });
            }
            None
        }
        ServerFrame::Kick { reason, .. } => {
            let _ = state.events.send(Event::Kicked { reason }).await;
            Some(match reason {
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
            state
                .events
                .send(event)
                .await
                .err()
                .map(|_| SessionEnd::Stop)
        }
        ServerFrame::HeartbeatAck { .. } | ServerFrame::LoginResult { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
            jitter: 0.5,
        };
        let mut rng = 12345;
        for attempt in 0..10 {
            let d = backoff_delay(&b, attempt, &mut rng).as_secs_f64();
            let nominal = (0.1 * 2f64.powi(attempt as i32)).min(2.0);
            assert!(
                d >= nominal * 0.5 - 1e-9 && d <= nominal * 1.5 + 1e-9,
                "{attempt}: {d}"
            );
        }
        let no_jitter = Backoff { jitter: 0.0, ..b };
        assert_eq!(
            backoff_delay(&no_jitter, 3, &mut rng),
            Duration::from_millis(800)
        );
    }

    #[test]
    fn seen_ids_drop_duplicates_and_stay_bounded() {
        let mut seen = SeenIds::new(3);
        assert!(seen.first_time(MessageId(1)));
        assert!(!seen.first_time(MessageId(1)));
        for i in 2..10 {
            assert!(seen.first_time(MessageId(i)));
        }
        assert_eq!(seen.set.len(), 3);
        assert!(seen.first_time(MessageId(1)), "forgotten after the cap");
    }
}
