//! An async imgate client for apps, tests and the load test.
//!
//! [`Client::start`] runs a background task that connects (over TCP or WebSocket), logs in, keeps
//! heartbeats going and reconnects by itself with exponential backoff and jitter, choosing a node
//! from the gateway's `GET /api/v1/alloc` when an alloc URL is given. Incoming messages arrive as
//! [`Event`]s on a stream. [`Client::send`] resolves to the server's receipt; a send whose receipt
//! was lost to a disconnect is sent again, with the same client message id, after the reconnect.
//!
//! # Reliable delivery
//!
//! Every message addressed to the user has a position (`seq`) in the user's stream. The client
//! remembers the highest position it has handed to the application ([`Client::last_seq`]) and
//! the latest session id ([`Client::session_id`]), across reconnects:
//!
//! - **Reconnects resume.** With a session id in hand the client opens the new connection with
//!   `resume` (no token needed, any node); the server answers with a new session id, which the
//!   client keeps. If the session has expired or was revoked (`SESSION_EXPIRED`,
//!   `INVALID_DEVICE`), the client forgets it and logs in again with its token at once. Without a
//!   session (or with [`ClientConfig::resume`] off) it logs in. Both carry `last_seq`.
//! - **Catch-up.** After [`Event::Connected`] the server replays what the device missed, in order:
//!   perhaps [`Event::Expired`] (positions past the server's retention, never delivered), then the
//!   missed messages, then [`Event::CaughtUp`]; live messages follow.
//! - **Exactly once, in order.** A message whose `seq` is not above the last one handed over is a
//!   duplicate (a retransmission, or an overlap of replay and live delivery): it is dropped and
//!   acknowledged again. Positions may jump (messages addressed to another channel type of the
//!   user, positions the server gave up as never stored); that is not a loss.
//! - **Acknowledgements** are cumulative (`ack {seq}`: everything up to that position). A message
//!   counts as received once it is handed to the application, that is put on the event stream:
//!   events still queued there when the process dies may not be delivered again. Acks are
//!   coalesced: one goes out as soon as no further frame is waiting to be read, after at most
//!   32 messages, and before the client waits for a full event stream to drain, so the server's
//!   window of unacknowledged messages never stalls. Keep reading events: an application that
//!   stops reading stops the acks too, and the server eventually drops the connection
//!   (`ack_timeout`), after which the client resumes.
//! - An application that saves its messages can save [`Client::last_seq`] with them and pass it
//!   back in [`ClientConfig::last_seq`] after a restart.
//! - Broadcasts carry no `seq` and need no acknowledgement; duplicates of them (the same message
//!   id, among the last 10000 seen) are dropped.
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
//!     match event {
//!         Event::Connected { resumed, cursor, .. } => println!("connected (resumed {resumed}) at {cursor}"),
//!         Event::CaughtUp { seq } => println!("caught up at {seq}"),
//!         Event::Message(m) => println!("#{:?} {:?}: {}", m.seq, m.from, m.body.get()),
//!         _ => {}
//!     }
//! }
//! # Ok(()) }
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, Instant};

use crate::connection::{ClientConnection, ConnectionError, Endpoint};
use crate::protocol::{Body, ErrorCode, HeartbeatRange, KickReason, MessageId, SendStatus};
use crate::{ClientFrame, ServerFrame};

/// Stream messages handed to the application before an acknowledgement goes out even though
/// more frames are waiting.
const ACK_EVERY: u32 = 32;

/// Broadcast ids remembered to drop duplicates.
const SEEN_BROADCASTS: usize = 10_000;

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
    /// Reconnect with `resume` (the session id of the last `login_result`, no token) rather than
    /// a fresh `login`. Default `true`.
    pub resume: bool,
    /// The highest stream position the application already holds, e.g. saved from
    /// [`Client::last_seq`] by an earlier run; messages up to it are not handed over again.
    /// Default 0 (the server's record of this device decides).
    pub last_seq: u64,
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
            resume: true,
            last_seq: 0,
        }
    }
}

/// A message pushed to this client.
#[derive(Debug, Clone)]
pub struct Message {
    pub id: MessageId,
    /// The message's position in the user's stream; `None` for broadcasts.
    pub seq: Option<u64>,
    pub from: Option<String>,
    pub to: String,
    pub channel: Option<String>,
    /// The sender's id for the message, if it gave one.
    pub client_msg_id: Option<String>,
    pub body: Body,
    pub ts: u64,
}

/// What happens on a client's connection, in order.
#[derive(Debug, Clone)]
pub enum Event {
    /// Logged in on `node_id`, or resumed the previous session there when `resumed`.
    /// `session_id` is the session's new id; `cursor` is the stream position the server replays
    /// after (what follows is missed messages, then [`Event::CaughtUp`]).
    Connected {
        node_id: String,
        session_id: String,
        resumed: bool,
        cursor: u64,
    },
    /// A message, handed over once: stream messages in increasing `seq` order, broadcasts once
    /// per id.
    Message(Message),
    /// Stream positions `from_seq` to `to_seq` were past the server's retention and will never be
    /// delivered.
    Expired { from_seq: u64, to_seq: u64 },
    /// Every missed message up to `seq` has been handed over; what follows is live.
    CaughtUp { seq: u64 },
    /// The connection dropped; the client reconnects by itself.
    Disconnected { reason: String },
    /// The server kicked this client. After `duplicate_login` the client stops (another login of
    /// the same user and channel type took over); after other reasons it reconnects (after
    /// `admin`, with a fresh login: the session was revoked).
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
    /// With `reason` `RATE_LIMITED`: milliseconds until the server would accept a send.
    pub retry_after_ms: Option<u64>,
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

/// What the background task shows to the handles.
#[derive(Default)]
struct Shared {
    session: Mutex<Option<String>>,
    last_seq: AtomicU64,
}

/// A handle to a running client; dropping every handle stops it.
#[derive(Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    send_timeout: Duration,
    shared: Arc<Shared>,
}

impl Client {
    /// Starts the client's background task; events arrive on the returned receiver.
    pub fn start(config: ClientConfig) -> (Client, mpsc::Receiver<Event>) {
        let (commands, rx) = mpsc::channel(256);
        let (events_tx, events) = mpsc::channel(1024);
        let send_timeout = config.send_timeout;
        let shared = Arc::new(Shared::default());
        shared.last_seq.store(config.last_seq, Ordering::Relaxed);
        tokio::spawn(run(config, rx, events_tx, shared.clone()));
        (
            Client {
                commands,
                send_timeout,
                shared,
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

    /// The id of the current session (the one a reconnect would resume), if any.
    pub fn session_id(&self) -> Option<String> {
        self.shared
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The highest stream position handed to the application (or known to be past).
    pub fn last_seq(&self) -> u64 {
        self.shared.last_seq.load(Ordering::Relaxed)
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
struct Seen<K> {
    set: HashSet<K>,
    order: VecDeque<K>,
    cap: usize,
}

type SeenIds = Seen<MessageId>;

impl<K: std::hash::Hash + Eq + Clone> Seen<K> {
    fn new(cap: usize) -> Self {
        Seen {
            set: HashSet::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    fn contains<Q>(&self, key: &Q) -> bool
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.set.contains(key)
    }

    /// `true` the first time `id` is seen.
    fn first_time(&mut self, id: K) -> bool {
        if !self.set.insert(id.clone()) {
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

/// The receiving side of the stream: decides which pushes reach the application and what to
/// acknowledge. Survives reconnects; [`Inbox::connected`] starts each connection.
struct Inbox {
    /// The highest stream position handed to the application (or skipped as the server said).
    last_seq: u64,
    /// Something to acknowledge on this connection: a new position, or a duplicate.
    ack_pending: bool,
    /// Stream messages handed over since the last acknowledgement.
    since_ack: u32,
    /// Broadcasts already handed over.
    seen: SeenIds,
    /// (sender, client message id) of the stream messages handed over most recently: a message
    /// resent after its node crashed before storing it comes again under another id and
    /// position, and is not handed over twice.
    sent: Seen<(String, String)>,
}

impl Inbox {
    fn new(last_seq: u64, seen_cap: usize) -> Self {
        Inbox {
            last_seq,
            ack_pending: false,
            since_ack: 0,
            seen: SeenIds::new(seen_cap),
            sent: Seen::new(seen_cap),
        }
    }

    /// A new connection was accepted at `cursor`: the server counts everything up to it, and up to
    /// the `last_seq` the client presented, as received, so nothing is left to acknowledge.
    fn connected(&mut self, cursor: u64) {
        self.last_seq = self.last_seq.max(cursor);
        self.ack_pending = false;
        self.since_ack = 0;
    }

    /// Whether a push is new to the application. A stream duplicate is to be acknowledged again
    /// (the server resent it because it missed the ack); a broadcast duplicate is just dropped.
    /// A stream message at a new position whose (sender, client message id) `sent_as` was
    /// handed over already is a resent copy (its first copy was pushed and never stored): its
    /// position is taken and acknowledged, and it is not handed over again.
    fn is_new(&mut self, id: MessageId, seq: Option<u64>, sent_as: Option<(&str, &str)>) -> bool {
        match seq {
            Some(seq) if seq <= self.last_seq => {
                self.ack_pending |= self.last_seq > 0;
                false
            }
            Some(seq) => match sent_as {
                Some((from, cmid)) if self.sent.contains(&(from.to_owned(), cmid.to_owned())) => {
                    self.last_seq = seq;
                    self.ack_pending = true;
                    false
                }
                _ => true,
            },
            None => !self.seen.contains(&id),
        }
    }

    /// A push that [`Inbox::is_new`] accepted was handed to the application.
    fn delivered(&mut self, id: MessageId, seq: Option<u64>, sent_as: Option<(&str, &str)>) {
        match seq {
            Some(seq) => {
                self.last_seq = self.last_seq.max(seq);
                self.ack_pending = true;
                self.since_ack += 1;
                if let Some((from, cmid)) = sent_as {
                    self.sent.first_time((from.to_owned(), cmid.to_owned()));
                }
            }
            None => {
                self.seen.first_time(id);
            }
        }
    }

    /// Positions up to `to_seq` will never come; the server has already moved past them.
    fn expired(&mut self, to_seq: u64) {
        self.last_seq = self.last_seq.max(to_seq);
    }

    /// Whether an acknowledgement is waiting to go out.
    fn ack_due(&self) -> bool {
        self.ack_pending
    }

    /// Whether enough messages were handed over to acknowledge without waiting for a pause.
    fn ack_now(&self) -> bool {
        self.ack_pending && self.since_ack >= ACK_EVERY
    }

    /// The position to acknowledge (cumulatively), if any; counts it as sent.
    fn take_ack(&mut self) -> Option<u64> {
        if !self.ack_pending {
            return None;
        }
        self.ack_pending = false;
        self.since_ack = 0;
        Some(self.last_seq)
    }
}

struct State {
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
    fn set_session(&mut self, session: Option<String>) {
        *self
            .shared
            .session
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = session.clone();
        self.session = session;
    }

    fn forget_session(&mut self) {
        self.set_session(None);
    }

    /// The session to resume on the next connection, if resuming is on. An expired one is
    /// presented too: the server decides, and a refusal costs one round trip.
    fn session_to_resume(&self) -> Option<String> {
        if !self.config.resume || self.resume_unsupported {
            return None;
        }
        self.session.clone()
    }

    fn publish_last_seq(&self) {
        self.shared
            .last_seq
            .store(self.inbox.last_seq, Ordering::Relaxed);
    }
}

/// Why a session ended.
enum SessionEnd {
    /// Reconnect after a backoff.
    Retry(String),
    /// Reconnect at once (a little jitter only): the node is going away, not failing.
    RetrySoon(String),
    /// The session could not be resumed: log in at once, on a new connection.
    Relogin,
    /// Stop the client.
    Stop,
}

async fn run(
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
        retry: false,
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

/// What wakes a session up.
enum Input {
    Frame(Result<Option<ServerFrame>, ConnectionError>),
    Command(Option<Command>),
    Heartbeat,
    /// Nothing else is ready: the acknowledgement that is due goes out before the client waits.
    Idle,
}

async fn next_input(
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
async fn session(
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

async fn send(conn: &mut ClientConnection, frame: &ClientFrame) -> Result<(), SessionEnd> {
    conn.send(frame)
        .await
        .map_err(|e| SessionEnd::Retry(e.to_string()))
}

/// Sends the cumulative acknowledgement that is due, if any.
async fn flush_ack(state: &mut State, conn: &mut ClientConnection) -> Result<(), SessionEnd> {
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
async fn emit(
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

async fn on_frame(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{frame_codec, DEFAULT_MAX_FRAME_LEN};
    use futures_util::{SinkExt, StreamExt};
    use tokio::net::TcpListener;
    use tokio_util::codec::{Framed, LengthDelimitedCodec};

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

    /// Runs one push through the inbox as the session does; `true` if it reached the application.
    fn receive(inbox: &mut Inbox, id: u64, seq: Option<u64>) -> bool {
        receive_sent(inbox, id, seq, None)
    }

    fn receive_sent(
        inbox: &mut Inbox,
        id: u64,
        seq: Option<u64>,
        sent_as: Option<(&str, &str)>,
    ) -> bool {
        let new = inbox.is_new(MessageId(id), seq, sent_as);
        if new {
            inbox.delivered(MessageId(id), seq, sent_as);
        }
        new
    }

    /// A message pushed before its commit whose node then crashed is resent by its sender
    /// and stored under a new id and position: the application gets it once, and the second
    /// position is acknowledged all the same.
    #[test]
    fn a_resent_message_under_a_new_id_and_position_is_handed_over_once() {
        let mut inbox = Inbox::new(0, 100);
        inbox.connected(0);
        assert!(receive_sent(&mut inbox, 1, Some(1), Some(("alice", "m-1"))));
        assert!(receive_sent(&mut inbox, 2, Some(2), Some(("alice", "m-2"))));
        assert!(!receive_sent(
            &mut inbox,
            9,
            Some(5),
            Some(("alice", "m-1"))
        ));
        assert_eq!(
            inbox.take_ack(),
            Some(5),
            "its position is taken and acknowledged"
        );
        // Same client message id from someone else, or with no sender: a message of its own.
        assert!(receive_sent(&mut inbox, 10, Some(6), Some(("bob", "m-1"))));
        assert!(receive_sent(&mut inbox, 11, Some(7), None));
    }

    #[test]
    fn inbox_delivers_increasing_positions_once_and_acks_cumulatively() {
        let mut inbox = Inbox::new(0, 100);
        inbox.connected(0);
        assert_eq!(inbox.take_ack(), None, "nothing to acknowledge yet");
        assert!(receive(&mut inbox, 1, Some(1)));
        assert!(receive(&mut inbox, 2, Some(2)));
        // A jump (a message for another channel type, a hole the server gave up) is accepted.
        assert!(receive(&mut inbox, 5, Some(5)));
        assert_eq!(inbox.last_seq, 5);
        assert_eq!(
            inbox.take_ack(),
            Some(5),
            "one cumulative ack covers all three"
        );
        assert_eq!(inbox.take_ack(), None);

        // Retransmissions and replay overlaps are dropped but acknowledged again, at the highest
        // position held, even though that was acknowledged before.
        assert!(!receive(&mut inbox, 2, Some(2)));
        assert!(!receive(&mut inbox, 5, Some(5)));
        assert_eq!(inbox.take_ack(), Some(5));
        assert_eq!(inbox.last_seq, 5);

        // An older position arriving late is a duplicate as well: order is never broken.
        assert!(receive(&mut inbox, 9, Some(9)));
        assert!(!receive(&mut inbox, 7, Some(7)));
        assert_eq!(inbox.take_ack(), Some(9));
    }

    #[test]
    fn inbox_acks_every_32_messages_at_the_latest() {
        let mut inbox = Inbox::new(0, 100);
        for seq in 1..ACK_EVERY as u64 {
            assert!(receive(&mut inbox, seq, Some(seq)));
            assert!(inbox.ack_due());
            assert!(!inbox.ack_now(), "{seq}: may still wait for a pause");
        }
        assert!(receive(&mut inbox, 32, Some(32)));
        assert!(inbox.ack_now());
        assert_eq!(inbox.take_ack(), Some(32));
        assert!(
            !inbox.ack_due() && !inbox.ack_now(),
            "the count starts again"
        );
        assert!(receive(&mut inbox, 33, Some(33)));
        assert!(!inbox.ack_now());
    }

    #[test]
    fn inbox_follows_the_cursor_and_expired_ranges_without_acking_them() {
        let mut inbox = Inbox::new(3, 100);
        assert!(receive(&mut inbox, 4, Some(4)));
        // The connection drops before the ack; the next one presents last_seq = 4, and the server
        // counts it received: no ack is owed on the new connection.
        inbox.connected(4);
        assert!(!inbox.ack_due());
        assert_eq!(inbox.last_seq, 4);
        // The server's own record is ahead (another run of this device acknowledged more).
        inbox.connected(10);
        assert_eq!(inbox.last_seq, 10);
        assert!(!receive(&mut inbox, 8, Some(8)), "before the cursor");
        assert_eq!(inbox.take_ack(), Some(10));
        // A cursor behind what the client holds never moves it back.
        inbox.connected(2);
        assert_eq!(inbox.last_seq, 10);

        inbox.expired(15);
        assert_eq!(inbox.last_seq, 15);
        assert!(
            !inbox.ack_due(),
            "the server moved past expired positions itself"
        );
        assert!(!receive(&mut inbox, 14, Some(14)));
        assert!(receive(&mut inbox, 16, Some(16)));
        inbox.expired(12);
        assert_eq!(inbox.last_seq, 16, "an older range changes nothing");
        assert_eq!(inbox.take_ack(), Some(16));
    }

    #[test]
    fn inbox_dedups_broadcasts_by_id_without_acks_and_stays_bounded() {
        let mut inbox = Inbox::new(0, 2);
        assert!(receive(&mut inbox, 100, None));
        assert!(!receive(&mut inbox, 100, None));
        assert!(!inbox.ack_due(), "broadcasts are not acknowledged");
        assert_eq!(inbox.last_seq, 0, "broadcasts are not part of the stream");
        assert!(receive(&mut inbox, 101, None));
        assert!(receive(&mut inbox, 102, None));
        assert!(
            receive(&mut inbox, 100, None),
            "the oldest id was forgotten"
        );
        assert!(inbox.seen.set.len() <= 2);
        // A stream message never counts as a broadcast duplicate, whatever its id.
        assert!(receive(&mut inbox, 102, Some(1)));
        assert_eq!(inbox.take_ack(), Some(1));
    }

    const WAIT: Duration = Duration::from_secs(5);

    /// A scripted server: accepts the client's connections one by one over TCP.
    struct FakeServer {
        listener: TcpListener,
    }

    struct Peer {
        framed: Framed<TcpStream, LengthDelimitedCodec>,
    }

    impl FakeServer {
        async fn start() -> (FakeServer, Endpoint) {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let endpoint = Endpoint::tcp(listener.local_addr().unwrap());
            (FakeServer { listener }, endpoint)
        }

        async fn accept(&self) -> Peer {
            let (stream, _) = tokio::time::timeout(WAIT, self.listener.accept())
                .await
                .expect("a connection in time")
                .unwrap();
            Peer {
                framed: Framed::new(stream, frame_codec(DEFAULT_MAX_FRAME_LEN)),
            }
        }
    }

    impl Peer {
        /// The client's next frame other than a heartbeat.
        async fn recv(&mut self) -> ClientFrame {
            next_frame(&mut self.framed).await
        }

        async fn ack(&mut self) -> u64 {
            next_ack(&mut self.framed).await
        }

        async fn acks_up_to(&mut self, seq: u64) {
            acks_up_to(&mut self.framed, seq).await
        }

        async fn send(&mut self, frame: ServerFrame) {
            self.framed.send(frame.encode()).await.unwrap();
        }

        async fn push(&mut self, id: u64, seq: Option<u64>) {
            self.send(push_frame(id, seq)).await;
        }
    }

    type Frames = dyn futures_util::Stream<Item = Result<bytes::BytesMut, std::io::Error>> + Unpin;

    /// The client's next frame other than a heartbeat.
    async fn next_frame(frames: &mut Frames) -> ClientFrame {
        loop {
            let bytes = tokio::time::timeout(WAIT, frames.next())
                .await
                .expect("a frame in time")
                .expect("connection open")
                .unwrap();
            match ClientFrame::decode(&bytes).unwrap() {
                ClientFrame::Heartbeat {} => continue,
                frame => return frame,
            }
        }
    }

    /// The position of the client's next frame, which must be a cumulative ack.
    async fn next_ack(frames: &mut Frames) -> u64 {
        match next_frame(frames).await {
            ClientFrame::Ack {
                seq: Some(seq),
                id: None,
            } => seq,
            other => panic!("expected an ack, got {other:?}"),
        }
    }

    /// Reads acks until one reaches `seq`; they must not decrease nor pass it.
    async fn acks_up_to(frames: &mut Frames, seq: u64) {
        let mut last = 0;
        loop {
            let ack = next_ack(frames).await;
            assert!(
                ack >= last && ack <= seq,
                "ack {ack} after {last}, up to {seq}"
            );
            if ack == seq {
                return;
            }
            last = ack;
        }
    }

    fn push_frame(id: u64, seq: Option<u64>) -> ServerFrame {
        ServerFrame::Push {
            id: MessageId(id),
            seq,
            from: Some("bob".into()),
            to: if seq.is_some() { "alice" } else { "*" }.into(),
            channel: None,
            client_msg_id: None,
            body: Body::from_json(id.to_string()).unwrap(),
            ts: 1,
        }
    }

    fn login_result(session: &str, resumed: bool, cursor: u64) -> ServerFrame {
        ServerFrame::LoginResult {
            session_id: session.into(),
            session_expires_at_ms: 0,
            resumed,
            cursor,
            heartbeat_ms: 60_000,
            idle_timeout_ms: 180_000,
            node_id: "node-1".into(),
            user_id: "alice".into(),
            server_time_ms: 0,
            protocol: 1,
        }
    }

    async fn next_event(events: &mut mpsc::Receiver<Event>) -> Event {
        tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("an event in time")
            .expect("client running")
    }

    async fn expect_message(events: &mut mpsc::Receiver<Event>, id: u64, seq: Option<u64>) {
        match next_event(events).await {
            Event::Message(m) => {
                assert_eq!((m.id, m.seq), (MessageId(id), seq));
                assert_eq!(m.body.get(), id.to_string());
            }
            other => panic!("expected message {id}, got {other:?}"),
        }
    }

    async fn expect_connected(
        events: &mut mpsc::Receiver<Event>,
        session: &str,
        was_resumed: bool,
        at: u64,
    ) {
        match next_event(events).await {
            Event::Connected {
                session_id,
                resumed,
                cursor,
                node_id,
            } => {
                assert_eq!(
                    (session_id.as_str(), resumed, cursor, node_id.as_str()),
                    (session, was_resumed, at, "node-1")
                );
            }
            other => panic!("expected connected, got {other:?}"),
        }
    }

    fn config(endpoint: Endpoint, initial_backoff: Duration) -> ClientConfig {
        let mut config = ClientConfig::new(vec![endpoint], "token-1", "phone-1", "app");
        config.backoff = Backoff {
            initial: initial_backoff,
            max: initial_backoff * 4,
            jitter: 0.0,
        };
        config
    }

    /// A client logged in to a fake server as session "s1" (10 ms reconnect backoff).
    async fn logged_in() -> (FakeServer, Client, mpsc::Receiver<Event>, Peer) {
        let (server, endpoint) = FakeServer::start().await;
        let (client, mut events) = Client::start(config(endpoint, Duration::from_millis(10)));
        let mut peer = server.accept().await;
        assert!(matches!(peer.recv().await, ClientFrame::Login { .. }));
        peer.send(login_result("s1", false, 0)).await;
        expect_connected(&mut events, "s1", false, 0).await;
        (server, client, events, peer)
    }

    #[tokio::test]
    async fn resumes_replays_in_order_and_falls_back_to_login() {
        let (server, endpoint) = FakeServer::start().await;
        let (client, mut events) = Client::start(config(endpoint, Duration::from_millis(800)));

        // A fresh client logs in with its token and no position.
        let mut peer = server.accept().await;
        match peer.recv().await {
            ClientFrame::Login {
                token,
                device_id,
                channel,
                last_seq,
                ..
            } => assert_eq!(
                (
                    token.as_str(),
                    device_id.as_str(),
                    channel.as_str(),
                    last_seq
                ),
                ("token-1", "phone-1", "app", None)
            ),
            other => panic!("{other:?}"),
        }
        peer.send(login_result("s1", false, 0)).await;
        expect_connected(&mut events, "s1", false, 0).await;
        peer.push(101, Some(1)).await;
        peer.push(102, Some(2)).await;
        peer.send(ServerFrame::CaughtUp { seq: 2 }).await;
        expect_message(&mut events, 101, Some(1)).await;
        expect_message(&mut events, 102, Some(2)).await;
        assert!(matches!(
            next_event(&mut events).await,
            Event::CaughtUp { seq: 2 }
        ));
        peer.acks_up_to(2).await;
        assert_eq!(client.last_seq(), 2);
        assert_eq!(client.session_id().as_deref(), Some("s1"));

        // A retransmission is not handed over again, but acknowledged again.
        peer.push(102, Some(2)).await;
        assert_eq!(peer.ack().await, 2);
        // A broadcast twice reaches the application once and is not acknowledged.
        peer.push(900, None).await;
        peer.push(900, None).await;
        peer.push(103, Some(3)).await;
        expect_message(&mut events, 900, None).await;
        expect_message(&mut events, 103, Some(3)).await;
        assert_eq!(peer.ack().await, 3);

        // The node shuts down: the client comes back soon and resumes with what it holds.
        peer.send(ServerFrame::kick(KickReason::Shutdown)).await;
        drop(peer);
        assert!(matches!(
            next_event(&mut events).await,
            Event::Kicked {
                reason: KickReason::Shutdown
            }
        ));
        assert!(matches!(
            next_event(&mut events).await,
            Event::Disconnected { .. }
        ));
        let mut peer = server.accept().await;
        match peer.recv().await {
            ClientFrame::Resume {
                session_id,
                device_id,
                last_seq,
                ..
            } => assert_eq!(
                (session_id.as_str(), device_id.as_str(), last_seq),
                ("s1", "phone-1", Some(3))
            ),
            other => panic!("{other:?}"),
        }
        peer.send(login_result("s2", true, 3)).await;
        expect_connected(&mut events, "s2", true, 3).await;
        assert_eq!(client.session_id().as_deref(), Some("s2"), "rotated");
        peer.push(105, Some(5)).await;
        peer.send(ServerFrame::CaughtUp { seq: 5 }).await;
        expect_message(&mut events, 105, Some(5)).await;
        assert!(matches!(
            next_event(&mut events).await,
            Event::CaughtUp { seq: 5 }
        ));
        assert_eq!(peer.ack().await, 5);

        // Kicked for missing acks: resume with the rotated id, which the server no longer knows.
        peer.send(ServerFrame::kick(KickReason::AckTimeout)).await;
        drop(peer);
        assert!(matches!(
            next_event(&mut events).await,
            Event::Kicked {
                reason: KickReason::AckTimeout
            }
        ));
        assert!(matches!(
            next_event(&mut events).await,
            Event::Disconnected { .. }
        ));
        let mut peer = server.accept().await;
        match peer.recv().await {
            ClientFrame::Resume {
                session_id,
                last_seq,
                ..
            } => assert_eq!((session_id.as_str(), last_seq), ("s2", Some(5))),
            other => panic!("{other:?}"),
        }
        peer.send(ServerFrame::error(
            ErrorCode::SessionExpired,
            "no such session",
        ))
        .await;
        drop(peer);
        // At once (the backoff would be 1.6 s now), with the token and the position.
        let refused = Instant::now();
        let mut peer = server.accept().await;
        assert!(refused.elapsed() < Duration::from_millis(500));
        match peer.recv().await {
            ClientFrame::Login {
                token, last_seq, ..
            } => assert_eq!((token.as_str(), last_seq), ("token-1", Some(5))),
            other => panic!("{other:?}"),
        }
        // The server's record of the device is ahead; some positions expired meanwhile.
        peer.send(login_result("s3", false, 9)).await;
        expect_connected(&mut events, "s3", false, 9).await;
        assert_eq!(client.last_seq(), 9);
        peer.send(ServerFrame::Expired {
            from_seq: 10,
            to_seq: 12,
        })
        .await;
        peer.push(113, Some(13)).await;
        peer.push(111, Some(11)).await;
        peer.send(ServerFrame::CaughtUp { seq: 13 }).await;
        assert!(matches!(
            next_event(&mut events).await,
            Event::Expired {
                from_seq: 10,
                to_seq: 12
            }
        ));
        expect_message(&mut events, 113, Some(13)).await;
        assert!(matches!(
            next_event(&mut events).await,
            Event::CaughtUp { seq: 13 }
        ));
        // Acked once for 13, then again for the stale 11 (perhaps coalesced into one).
        assert_eq!(peer.ack().await, 13);
        assert_eq!(client.last_seq(), 13);

        // Another login of the user took over: the session is revoked and the client stops.
        peer.send(ServerFrame::kick(KickReason::DuplicateLogin))
            .await;
        assert!(matches!(
            next_event(&mut events).await,
            Event::Kicked {
                reason: KickReason::DuplicateLogin
            }
        ));
        assert!(tokio::time::timeout(WAIT, events.recv())
            .await
            .unwrap()
            .is_none());
        assert_eq!(client.session_id(), None);
    }

    #[tokio::test]
    async fn without_resume_every_connection_logs_in_with_its_position() {
        let (server, endpoint) = FakeServer::start().await;
        let mut config = config(endpoint, Duration::from_millis(10));
        config.resume = false;
        let (client, mut events) = Client::start(config);
        let mut peer = server.accept().await;
        assert!(matches!(
            peer.recv().await,
            ClientFrame::Login { last_seq: None, .. }
        ));
        peer.send(login_result("s1", false, 0)).await;
        expect_connected(&mut events, "s1", false, 0).await;
        peer.push(104, Some(4)).await;
        expect_message(&mut events, 104, Some(4)).await;
        assert_eq!(peer.ack().await, 4);
        drop(peer);
        assert!(matches!(
            next_event(&mut events).await,
            Event::Disconnected { .. }
        ));
        let mut peer = server.accept().await;
        assert!(matches!(
            peer.recv().await,
            ClientFrame::Login {
                last_seq: Some(4),
                ..
            }
        ));
        // Kicked by an operator: the session is revoked.
        peer.send(login_result("s2", false, 4)).await;
        expect_connected(&mut events, "s2", false, 4).await;
        peer.send(ServerFrame::kick(KickReason::Admin)).await;
        drop(peer);
        assert!(matches!(
            next_event(&mut events).await,
            Event::Kicked {
                reason: KickReason::Admin
            }
        ));
        assert!(matches!(
            next_event(&mut events).await,
            Event::Disconnected { .. }
        ));
        let mut peer = server.accept().await;
        assert!(matches!(peer.recv().await, ClientFrame::Login { .. }));
        assert_eq!(client.session_id(), None);
        // Logging out sends what is owed, then `logout`.
        peer.send(login_result("s3", false, 4)).await;
        expect_connected(&mut events, "s3", false, 4).await;
        assert_eq!(client.session_id().as_deref(), Some("s3"));
        client.close().await;
        assert!(matches!(peer.recv().await, ClientFrame::Logout {}));
        assert_eq!(client.session_id(), None);
    }

    #[tokio::test]
    async fn admin_kick_revokes_the_session_so_the_next_connection_logs_in() {
        let (server, client, mut events, mut peer) = logged_in().await;
        peer.push(101, Some(1)).await;
        expect_message(&mut events, 101, Some(1)).await;
        assert_eq!(peer.ack().await, 1);
        peer.send(ServerFrame::kick(KickReason::Admin)).await;
        drop(peer);
        let mut peer = server.accept().await;
        assert!(matches!(
            peer.recv().await,
            ClientFrame::Login {
                last_seq: Some(1),
                ..
            }
        ));
        assert_eq!(client.session_id(), None);
    }

    #[tokio::test]
    async fn another_devices_session_falls_back_to_login_and_server_errors_retry() {
        let (server, client, mut events, peer) = logged_in().await;
        drop(peer);
        assert!(matches!(
            next_event(&mut events).await,
            Event::Disconnected { .. }
        ));
        let mut peer = server.accept().await;
        assert!(matches!(peer.recv().await, ClientFrame::Resume { .. }));
        peer.send(ServerFrame::error(ErrorCode::InvalidDevice, "other device"))
            .await;
        drop(peer);
        // A transient server error while logging in is retried, not taken as a refusal.
        let mut peer = server.accept().await;
        assert!(matches!(peer.recv().await, ClientFrame::Login { .. }));
        assert_eq!(client.session_id(), None);
        peer.send(ServerFrame::error(ErrorCode::Internal, "oops"))
            .await;
        drop(peer);
        assert!(matches!(
            next_event(&mut events).await,
            Event::Disconnected { .. }
        ));
        let mut peer = server.accept().await;
        assert!(matches!(peer.recv().await, ClientFrame::Login { .. }));
        peer.send(login_result("s2", false, 0)).await;
        expect_connected(&mut events, "s2", false, 0).await;
    }

    #[tokio::test]
    async fn a_send_without_receipt_is_sent_again_as_a_retry_after_reconnecting() {
        let (server, client, _events, mut peer) = logged_in().await;
        let sending = tokio::spawn({
            let client = client.clone();
            async move {
                client
                    .send("bob", Body::from_json("1".to_owned()).unwrap())
                    .await
            }
        });
        let first_id = match peer.recv().await {
            ClientFrame::Send {
                client_msg_id,
                retry,
                ..
            } => {
                assert!(!retry, "a first attempt is not a retry");
                client_msg_id
            }
            other => panic!("expected a send, got {other:?}"),
        };
        // The connection drops before the receipt.
        drop(peer);
        let mut peer = server.accept().await;
        assert!(matches!(peer.recv().await, ClientFrame::Resume { .. }));
        peer.send(login_result("s2", true, 0)).await;
        match peer.recv().await {
            ClientFrame::Send {
                client_msg_id,
                retry,
                ..
            } => assert_eq!((client_msg_id.as_str(), retry), (first_id.as_str(), true)),
            other => panic!("expected the send again, got {other:?}"),
        }
        peer.send(ServerFrame::SendResult {
            client_msg_id: first_id,
            id: Some(MessageId(7)),
            status: SendStatus::Delivered,
            connections: 0,
            reason: None,
            retry_after_ms: None,
        })
        .await;
        let receipt = tokio::time::timeout(WAIT, sending)
            .await
            .expect("a receipt in time")
            .unwrap()
            .unwrap();
        assert_eq!(receipt.id, Some(MessageId(7)));
    }

    #[tokio::test]
    async fn a_burst_is_acknowledged_at_least_every_32_messages() {
        let (server, endpoint) = FakeServer::start().await;
        let (_client, mut events) = Client::start(config(endpoint, Duration::from_millis(10)));
        let mut peer = server.accept().await;
        peer.recv().await;
        peer.send(login_result("s1", false, 0)).await;
        expect_connected(&mut events, "s1", false, 0).await;
        // Written in one go, so that most of them wait in the client's buffer together.
        for seq in 1..=200u64 {
            let frame = push_frame(1000 + seq, Some(seq)).encode();
            peer.framed.feed(frame).await.unwrap();
        }
        SinkExt::<bytes::Bytes>::flush(&mut peer.framed)
            .await
            .unwrap();
        let reader = tokio::spawn(async move {
            for seq in 1..=200u64 {
                match next_event(&mut events).await {
                    Event::Message(m) => {
                        assert_eq!((m.id, m.seq), (MessageId(1000 + seq), Some(seq)))
                    }
                    other => panic!("{other:?}"),
                }
            }
        });
        let mut last = 0;
        while last < 200 {
            let ack = peer.ack().await;
            assert!(
                ack > last && ack - last <= u64::from(ACK_EVERY),
                "{last} → {ack}"
            );
            last = ack;
        }
        reader.await.unwrap();
    }

    #[tokio::test]
    async fn a_slow_application_does_not_hold_back_acks_of_what_it_was_given() {
        let (server, endpoint) = FakeServer::start().await;
        let (_client, mut events) = Client::start(config(endpoint, Duration::from_millis(10)));
        let mut peer = server.accept().await;
        peer.recv().await;
        peer.send(login_result("s1", false, 0)).await;
        // Nobody reads events: `connected` and 1023 messages fill the stream (1024), the 1024th
        // message waits. The last handed-over one, 1023, is not a multiple of 32, so only the
        // ack before waiting can acknowledge it.
        let total = 1100u64;
        let (mut sink, mut stream) = peer.framed.split();
        let writer = tokio::spawn(async move {
            for seq in 1..=total {
                sink.send(push_frame(seq, Some(seq)).encode())
                    .await
                    .unwrap();
            }
            sink
        });
        acks_up_to(&mut stream, 1023).await;
        // Once the application reads again, the rest follows.
        expect_connected(&mut events, "s1", false, 0).await;
        for seq in 1..=total {
            expect_message(&mut events, seq, Some(seq)).await;
        }
        acks_up_to(&mut stream, total).await;
        let _sink = writer.await.unwrap();
    }
}
