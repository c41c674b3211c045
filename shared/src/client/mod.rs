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

mod alloc;
mod inbox;
mod session;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::connection::Endpoint;
use crate::protocol::{Body, ErrorCode, HeartbeatRange, KickReason, MessageId, SendStatus};

pub use alloc::alloc;
use session::run;

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
