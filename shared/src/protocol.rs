//! The frames of the imgate wire protocol, version [`PROTOCOL_VERSION`].
//!
//! Every frame is one JSON object whose `type` field names the command. On TCP it travels behind a
//! 4-byte big-endian length prefix (see [`crate::codec`]); on WebSocket it is one text message.
//! `docs/protocol.md` is the reference for client authors.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// Version of the wire protocol described here and in `docs/protocol.md`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Default time a new connection has to send its LOGIN frame.
pub const DEFAULT_LOGIN_TIMEOUT_MS: u64 = 10_000;

/// Longest accepted user id, device id, channel type or client message id, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// A server-assigned message id: cluster-unique and time-ordered (milliseconds, node tag and a
/// per-node sequence packed into 64 bits). On the wire it is a decimal string, because JSON numbers
/// above 2^53 lose precision in JavaScript.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(pub u64);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for MessageId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(MessageId)
    }
}

impl Serialize for MessageId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for MessageId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A message body: any JSON value, passed through untouched and embedded verbatim in PUSH frames.
#[derive(Debug, Clone)]
pub struct Body(Box<RawValue>);

impl Body {
    /// A body from any serialisable value.
    pub fn from_value<T: Serialize + ?Sized>(value: &T) -> Result<Body, serde_json::Error> {
        serde_json::value::to_raw_value(value).map(Body)
    }

    /// A body from a JSON text; fails unless it is valid JSON.
    pub fn from_json(json: impl Into<String>) -> Result<Body, serde_json::Error> {
        RawValue::from_string(json.into()).map(Body)
    }

    /// The body's JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    pub fn as_raw(&self) -> &RawValue {
        &self.0
    }

    /// Parses the body as `T`.
    pub fn parse<'a, T: Deserialize<'a>>(&'a self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.0.get())
    }
}

impl Serialize for Body {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Body {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Inside the internally tagged frame enums serde hands fields over buffered, where RawValue
        // cannot be read; going through Value keeps the JSON's meaning (not its exact spelling).
        // `ClientFrame::decode` and `ServerFrame::decode` avoid this path for `send` and `push`.
        let value = serde_json::Value::deserialize(d)?;
        serde_json::value::to_raw_value(&value)
            .map(Body)
            .map_err(serde::de::Error::custom)
    }
}

/// The heartbeat intervals a client accepts, in milliseconds. The server picks the largest value
/// inside both this range and its own bounds (or its bound nearest to this range).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatRange {
    pub min_ms: u64,
    pub max_ms: u64,
}

/// Frames a client sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Handshake and bind in one round trip; must be the first frame of a connection.
    Login {
        /// A JWT whose `sub` is the user id.
        token: String,
        /// A stable id of the device (app install, browser profile).
        device_id: String,
        /// The channel type of this connection (`app`, `web`, `pc`, … as configured).
        channel: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_version: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        heartbeat: Option<HeartbeatRange>,
        /// The highest stream position (`seq`) this device already holds, every earlier one
        /// included; the server replays what follows it (or its own record, whichever is later).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_seq: Option<u64>,
    },
    /// Fast reconnect: restores a session from an earlier `login_result` on any node without a
    /// token, and replays what the device missed. Like `login`, only as the first frame.
    Resume {
        /// The `session_id` of the earlier `login_result` (or of the last `resume`).
        session_id: String,
        /// Must be the device id the session was created for.
        device_id: String,
        /// The highest stream position this device already holds, every earlier one included.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_seq: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_version: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        heartbeat: Option<HeartbeatRange>,
    },
    /// Keeps the connection alive; answered with `heartbeat_ack`.
    Heartbeat {},
    /// A message to another user.
    Send {
        /// Recipient user id.
        to: String,
        /// Deliver only to the recipient's connections of this channel type.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        channel: Option<String>,
        /// The sender's own id for this message, echoed in `send_result`.
        client_msg_id: String,
        /// Any JSON value; the gateway passes it through untouched.
        body: Body,
        /// This is a repetition of a send whose receipt never came: if a message with this
        /// `client_msg_id` (to the same recipient) is stored, it is answered from the store and
        /// not pushed again.
        #[serde(default, skip_serializing_if = "is_false")]
        retry: bool,
    },
    /// Acknowledges pushed messages: with `seq`, every message of the stream up to and including
    /// that position (cumulative); with `id` only, that one message.
    Ack {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<MessageId>,
    },
    /// Ends the session; the server closes the connection.
    Logout {},
}

/// Per-recipient outcome of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SendStatus {
    /// Stored, and written to the outbox of at least one live connection of the recipient.
    Delivered,
    /// Stored; the recipient has no live connection (it gets the message when it comes back).
    Stored,
    /// Not accepted; `reason` says why.
    Refused,
}

impl SendStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SendStatus::Delivered => "delivered",
            SendStatus::Stored => "stored",
            SendStatus::Refused => "refused",
        }
    }
}

/// Why the server closed a connection with a `kick` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KickReason {
    /// The same user logged in again on the same channel type.
    DuplicateLogin,
    /// The client did not read its frames fast enough.
    SlowConsumer,
    /// An operator kicked the user through the admin API.
    Admin,
    /// The node is shutting down; reconnect to another node.
    Shutdown,
    /// Pushed messages stayed unacknowledged after every retransmission.
    AckTimeout,
}

impl KickReason {
    pub fn as_str(self) -> &'static str {
        match self {
            KickReason::DuplicateLogin => "duplicate_login",
            KickReason::SlowConsumer => "slow_consumer",
            KickReason::Admin => "admin",
            KickReason::Shutdown => "shutdown",
            KickReason::AckTimeout => "ack_timeout",
        }
    }

    /// A human-readable explanation sent along with the reason.
    pub fn message(self) -> &'static str {
        match self {
            KickReason::DuplicateLogin => "logged in elsewhere on the same channel type",
            KickReason::SlowConsumer => "slow consumer: frames were not read fast enough",
            KickReason::Admin => "disconnected by an operator",
            KickReason::Shutdown => "shutdown, reconnect elsewhere",
            KickReason::AckTimeout => "pushed messages were not acknowledged; reconnect and resume",
        }
    }
}

/// Error codes carried by `error` frames (and by refused `send_result`s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The frame is not a valid JSON object of a known `type` with the right fields.
    BadFrame,
    /// The frame is longer than the server's maximum frame length.
    FrameTooLarge,
    /// A frame other than LOGIN arrived before login.
    LoginRequired,
    /// No LOGIN arrived within the login timeout.
    LoginTimeout,
    /// LOGIN on a connection that is already logged in.
    AlreadyLoggedIn,
    /// The token is malformed, has a bad signature, an unaccepted algorithm, issuer or audience.
    TokenInvalid,
    /// The token's `exp` is past.
    TokenExpired,
    /// The token's `nbf` is in the future.
    TokenNotYetValid,
    /// The channel type is not one the server accepts.
    UnknownChannel,
    /// A field is empty, too long or otherwise invalid.
    InvalidField,
    /// Another connection of the same user and channel type exists and the policy is reject-new.
    DuplicateLogin,
    /// The node holds its maximum number of connections.
    ServerFull,
    /// The node is shutting down.
    ShuttingDown,
    /// An unexpected server error.
    Internal,
    /// The message store is overloaded or down; nothing was stored. Retry later.
    Unavailable,
    /// RESUME named a session that does not exist (expired, revoked, never issued): log in.
    SessionExpired,
    /// RESUME named a session that belongs to another device.
    InvalidDevice,
    /// Too many sends (of this connection or user) or logins (from this address) in a short
    /// time; `retry_after_ms` says when to try again.
    RateLimited,
    /// The user holds the most connections the cluster allows one user.
    TooManyConnections,
    /// The recipient is not a user the cluster knows (under `delivery.recipients = "known"`:
    /// one who never logged in and was not registered); nothing was stored.
    UnknownRecipient,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 20] = [
        ErrorCode::BadFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::LoginRequired,
        ErrorCode::LoginTimeout,
        ErrorCode::AlreadyLoggedIn,
        ErrorCode::TokenInvalid,
        ErrorCode::TokenExpired,
        ErrorCode::TokenNotYetValid,
        ErrorCode::UnknownChannel,
        ErrorCode::InvalidField,
        ErrorCode::DuplicateLogin,
        ErrorCode::ServerFull,
        ErrorCode::ShuttingDown,
        ErrorCode::Internal,
        ErrorCode::Unavailable,
        ErrorCode::SessionExpired,
        ErrorCode::InvalidDevice,
        ErrorCode::RateLimited,
        ErrorCode::TooManyConnections,
        ErrorCode::UnknownRecipient,
    ];

    /// The stable numeric code.
    pub fn code(self) -> u16 {
        match self {
            ErrorCode::BadFrame => 1000,
            ErrorCode::FrameTooLarge => 1001,
            ErrorCode::LoginRequired => 1002,
            ErrorCode::LoginTimeout => 1003,
            ErrorCode::AlreadyLoggedIn => 1004,
            ErrorCode::TokenInvalid => 2000,
            ErrorCode::TokenExpired => 2001,
            ErrorCode::TokenNotYetValid => 2002,
            ErrorCode::UnknownChannel => 2003,
            ErrorCode::InvalidField => 2004,
            ErrorCode::DuplicateLogin => 2005,
            ErrorCode::SessionExpired => 2006,
            ErrorCode::InvalidDevice => 2007,
            ErrorCode::UnknownRecipient => 2008,
            ErrorCode::RateLimited => 4000,
            ErrorCode::TooManyConnections => 4001,
            ErrorCode::ServerFull => 5000,
            ErrorCode::ShuttingDown => 5001,
            ErrorCode::Internal => 5002,
            ErrorCode::Unavailable => 5003,
        }
    }

    /// The stable name, e.g. `TOKEN_EXPIRED`.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "BAD_FRAME",
            ErrorCode::FrameTooLarge => "FRAME_TOO_LARGE",
            ErrorCode::LoginRequired => "LOGIN_REQUIRED",
            ErrorCode::LoginTimeout => "LOGIN_TIMEOUT",
            ErrorCode::AlreadyLoggedIn => "ALREADY_LOGGED_IN",
            ErrorCode::TokenInvalid => "TOKEN_INVALID",
            ErrorCode::TokenExpired => "TOKEN_EXPIRED",
            ErrorCode::TokenNotYetValid => "TOKEN_NOT_YET_VALID",
            ErrorCode::UnknownChannel => "UNKNOWN_CHANNEL",
            ErrorCode::InvalidField => "INVALID_FIELD",
            ErrorCode::DuplicateLogin => "DUPLICATE_LOGIN",
            ErrorCode::SessionExpired => "SESSION_EXPIRED",
            ErrorCode::InvalidDevice => "INVALID_DEVICE",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::TooManyConnections => "TOO_MANY_CONNECTIONS",
            ErrorCode::UnknownRecipient => "UNKNOWN_RECIPIENT",
            ErrorCode::ServerFull => "SERVER_FULL",
            ErrorCode::ShuttingDown => "SHUTTING_DOWN",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::Unavailable => "UNAVAILABLE",
        }
    }

    pub fn from_code(code: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.code() == code)
    }

    pub fn from_name(name: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.name() == name)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.code())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        ErrorCode::from_name(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown error name {s}")))
    }
}

/// Frames the server sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// Answer to a successful LOGIN or RESUME.
    LoginResult {
        /// Random id of this session (128 bits, hex), bound to the device: RESUME presents it.
        session_id: String,
        /// When the session expires if not resumed before, milliseconds since the Unix epoch.
        #[serde(default)]
        session_expires_at_ms: u64,
        /// `true` when this answers a RESUME that restored the session.
        #[serde(default)]
        resumed: bool,
        /// The device's position in its stream: every message up to it counts as received;
        /// the server now replays what follows, then `caught_up`, then live messages.
        #[serde(default)]
        cursor: u64,
        /// The negotiated heartbeat interval.
        heartbeat_ms: u64,
        /// The connection is closed after this long without any frame from the client.
        idle_timeout_ms: u64,
        /// The node that holds the connection.
        node_id: String,
        /// The authenticated user id (the token's `sub`).
        user_id: String,
        /// Server clock, milliseconds since the Unix epoch.
        server_time_ms: u64,
        /// The protocol version the server speaks.
        protocol: u32,
    },
    /// Answer to a heartbeat.
    HeartbeatAck { server_time_ms: u64 },
    /// The sender's receipt for a `send`.
    SendResult {
        client_msg_id: String,
        /// The server message id; absent when the message was refused before it got one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<MessageId>,
        status: SendStatus,
        /// How many live connections the message was written to.
        connections: u32,
        /// Why a message was refused.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<ErrorCode>,
        /// For a refusal `RATE_LIMITED`: milliseconds until a send would be accepted.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    /// A message for this connection's user.
    Push {
        id: MessageId,
        /// The message's position in the user's stream (1, 2, 3, … without gaps); absent for
        /// broadcasts, which are not part of any stream and need no acknowledgement.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
        /// The sending user; absent for system messages.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<String>,
        to: String,
        /// The channel type the sender addressed, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        channel: Option<String>,
        /// The sender's id for the message (its `send`'s `client_msg_id`), if it gave one. A
        /// message resent after its node crashed before storing it can reach a device twice
        /// under two ids and positions: a client hands a push to its application only if it has
        /// not handed one with the same `from` and `client_msg_id` already.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<String>,
        body: Body,
        /// When the server accepted the message, milliseconds since the Unix epoch.
        ts: u64,
    },
    /// Replay is complete: every message of the stream up to `seq` has been sent; what
    /// follows is live.
    CaughtUp { seq: u64 },
    /// Positions `from_seq` to `to_seq` (inclusive) were older than the retention and will never
    /// be delivered; the device's cursor moves past them.
    Expired { from_seq: u64, to_seq: u64 },
    /// The server is closing the connection for `reason`.
    Kick { reason: KickReason, message: String },
    /// Something went wrong; `error` names it and `code` is its number.
    Error {
        code: u16,
        error: ErrorCode,
        message: String,
        /// For `RATE_LIMITED`: milliseconds until an attempt would be accepted.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

impl ServerFrame {
    /// Parses a frame's JSON payload. A `push` body is kept byte for byte as the server sent it.
    pub fn decode(json: &[u8]) -> Result<ServerFrame, serde_json::Error> {
        if frame_type(json)? != "push" {
            return serde_json::from_slice(json);
        }
        #[derive(Deserialize)]
        struct Push {
            id: MessageId,
            #[serde(default)]
            seq: Option<u64>,
            #[serde(default)]
            from: Option<String>,
            to: String,
            #[serde(default)]
            channel: Option<String>,
            #[serde(default)]
            client_msg_id: Option<String>,
            body: Box<RawValue>,
            ts: u64,
        }
        let f: Push = serde_json::from_slice(json)?;
        Ok(ServerFrame::Push {
            id: f.id,
            seq: f.seq,
            from: f.from,
            to: f.to,
            channel: f.channel,
            client_msg_id: f.client_msg_id,
            body: Body(f.body),
            ts: f.ts,
        })
    }

    /// An `error` frame for `code` with a human-readable message.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        ServerFrame::Error {
            code: code.code(),
            error: code,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    /// A `RATE_LIMITED` error frame: try again after `retry_after_ms`.
    pub fn rate_limited(message: impl Into<String>, retry_after_ms: u64) -> Self {
        ServerFrame::Error {
            code: ErrorCode::RateLimited.code(),
            error: ErrorCode::RateLimited,
            message: message.into(),
            retry_after_ms: Some(retry_after_ms),
        }
    }

    /// A `kick` frame for `reason`.
    pub fn kick(reason: KickReason) -> Self {
        ServerFrame::Kick {
            reason,
            message: reason.message().to_owned(),
        }
    }

    /// The `type` of this frame, as on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerFrame::LoginResult { .. } => "login_result",
            ServerFrame::HeartbeatAck { .. } => "heartbeat_ack",
            ServerFrame::SendResult { .. } => "send_result",
            ServerFrame::Push { .. } => "push",
            ServerFrame::CaughtUp { .. } => "caught_up",
            ServerFrame::Expired { .. } => "expired",
            ServerFrame::Kick { .. } => "kick",
            ServerFrame::Error { .. } => "error",
        }
    }

    /// Serialises the frame to its JSON payload.
    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("server frames always serialise"))
    }
}

/// Encodes a `push` frame from borrowed parts — the same JSON as [`ServerFrame::Push`] without
/// copying the body. The gateway encodes each message once and shares the bytes.
pub fn encode_push(push: &PushFields<'_>) -> Bytes {
    #[derive(Serialize)]
    struct Push<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        id: MessageId,
        #[serde(skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        from: Option<&'a str>,
        to: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<&'a str>,
        body: &'a RawValue,
        ts: u64,
    }
    let p = Push {
        kind: "push",
        id: push.id,
        seq: push.seq,
        from: push.from,
        to: push.to,
        channel: push.channel,
        client_msg_id: push.client_msg_id,
        body: push.body,
        ts: push.ts,
    };
    Bytes::from(serde_json::to_vec(&p).expect("push frames always serialise"))
}

/// The fields of a `push` frame, for [`encode_push`].
#[derive(Debug, Clone, Copy)]
pub struct PushFields<'a> {
    pub id: MessageId,
    pub seq: Option<u64>,
    pub from: Option<&'a str>,
    pub to: &'a str,
    pub channel: Option<&'a str>,
    pub client_msg_id: Option<&'a str>,
    pub body: &'a RawValue,
    pub ts: u64,
}

/// The `type` of a frame, read without parsing the rest.
fn frame_type(json: &[u8]) -> Result<std::borrow::Cow<'_, str>, serde_json::Error> {
    #[derive(Deserialize)]
    struct Tag<'a> {
        #[serde(rename = "type", borrow)]
        kind: std::borrow::Cow<'a, str>,
    }
    Ok(serde_json::from_slice::<Tag>(json)?.kind)
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl ClientFrame {
    /// Parses a frame's JSON payload. A `send` body is kept byte for byte as the client wrote it.
    pub fn decode(json: &[u8]) -> Result<ClientFrame, serde_json::Error> {
        if frame_type(json)? != "send" {
            return serde_json::from_slice(json);
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Send {
            #[serde(rename = "type")]
            _kind: serde::de::IgnoredAny,
            to: String,
            #[serde(default)]
            channel: Option<String>,
            client_msg_id: String,
            body: Box<RawValue>,
            #[serde(default)]
            retry: bool,
        }
        let f: Send = serde_json::from_slice(json)?;
        Ok(ClientFrame::Send {
            to: f.to,
            channel: f.channel,
            client_msg_id: f.client_msg_id,
            body: Body(f.body),
            retry: f.retry,
        })
    }

    /// The `type` of this frame, as on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientFrame::Login { .. } => "login",
            ClientFrame::Resume { .. } => "resume",
            ClientFrame::Heartbeat {} => "heartbeat",
            ClientFrame::Send { .. } => "send",
            ClientFrame::Ack { .. } => "ack",
            ClientFrame::Logout {} => "logout",
        }
    }

    /// Serialises the frame to its JSON payload.
    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("client frames always serialise"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames_parse_from_documented_json() {
        let f: ClientFrame = serde_json::from_str(
            r#"{"type":"login","token":"t","device_id":"d","channel":"app","heartbeat":{"min_ms":1000,"max_ms":5000}}"#,
        )
        .unwrap();
        assert!(matches!(
            f,
            ClientFrame::Login {
                heartbeat: Some(HeartbeatRange {
                    min_ms: 1000,
                    max_ms: 5000
                }),
                ..
            }
        ));
        let f: ClientFrame = serde_json::from_str(
            r#"{"type":"send","to":"bob","client_msg_id":"c1","body":{"text":"hi","n":[1,2]}}"#,
        )
        .unwrap();
        match f {
            ClientFrame::Send { body, .. } => assert_eq!(body.get(), r#"{"text":"hi","n":[1,2]}"#),
            other => panic!("unexpected {other:?}"),
        }
        let f: ClientFrame =
            serde_json::from_str(r#"{"type":"ack","id":"18446744073709551615"}"#).unwrap();
        assert!(matches!(
            f,
            ClientFrame::Ack {
                id: Some(MessageId(u64::MAX)),
                seq: None
            }
        ));
        let f: ClientFrame = serde_json::from_str(r#"{"type":"ack","seq":7}"#).unwrap();
        assert!(matches!(
            f,
            ClientFrame::Ack {
                id: None,
                seq: Some(7)
            }
        ));
        let f: ClientFrame = serde_json::from_str(
            r#"{"type":"resume","session_id":"s","device_id":"d","last_seq":12}"#,
        )
        .unwrap();
        assert!(matches!(
            f,
            ClientFrame::Resume {
                last_seq: Some(12),
                ..
            }
        ));
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"send","to":"b"}"#).is_err());
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"heartbeat","x":1}"#).is_err());
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"nope"}"#).is_err());
    }

    #[test]
    fn server_frames_round_trip() {
        let e = ServerFrame::error(ErrorCode::TokenExpired, "expired");
        let json = String::from_utf8(e.encode().to_vec()).unwrap();
        assert_eq!(
            json,
            r#"{"type":"error","code":2001,"error":"TOKEN_EXPIRED","message":"expired"}"#
        );
        let back: ServerFrame = serde_json::from_str(&json).unwrap();
        assert!(matches!(
            back,
            ServerFrame::Error {
                error: ErrorCode::TokenExpired,
                code: 2001,
                ..
            }
        ));
        let k = ServerFrame::kick(KickReason::SlowConsumer).encode();
        assert!(std::str::from_utf8(&k)
            .unwrap()
            .contains(r#""reason":"slow_consumer""#));
    }

    #[test]
    fn decode_keeps_bodies_exactly() {
        let json = br#"{"type":"send","to":"b","client_msg_id":"c","body":{"z":2.50,"a":1e2,"big":123456789012345678901234567890}}"#;
        match ClientFrame::decode(json).unwrap() {
            ClientFrame::Send { body, .. } => {
                assert_eq!(
                    body.get(),
                    r#"{"z":2.50,"a":1e2,"big":123456789012345678901234567890}"#
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(ClientFrame::decode(
            br#"{"type":"send","to":"b","client_msg_id":"c","body":1,"from":"x"}"#
        )
        .is_err());
        assert!(ClientFrame::decode(br#"{"type":"send","to":"b","body":1}"#).is_err());
        // `retry` is optional, false when absent, and written only when true.
        let retry = |json: &[u8]| match ClientFrame::decode(json).unwrap() {
            ClientFrame::Send { retry, .. } => retry,
            other => panic!("{other:?}"),
        };
        assert!(!retry(
            br#"{"type":"send","to":"b","client_msg_id":"c","body":1}"#
        ));
        assert!(retry(
            br#"{"type":"send","to":"b","client_msg_id":"c","body":1,"retry":true}"#
        ));
        let mut frame =
            ClientFrame::decode(br#"{"type":"send","to":"b","client_msg_id":"c","body":1}"#)
                .unwrap();
        assert!(!String::from_utf8(frame.encode().to_vec())
            .unwrap()
            .contains("retry"));
        if let ClientFrame::Send { retry, .. } = &mut frame {
            *retry = true;
        }
        assert!(String::from_utf8(frame.encode().to_vec())
            .unwrap()
            .contains(r#""retry":true"#));
        assert!(matches!(
            ClientFrame::decode(br#"{"type":"heartbeat"}"#).unwrap(),
            ClientFrame::Heartbeat {}
        ));
        let body = RawValue::from_string("[1.50]".into()).unwrap();
        let push = encode_push(&PushFields {
            id: MessageId(1),
            seq: Some(4),
            from: None,
            to: "b",
            channel: None,
            client_msg_id: None,
            body: &body,
            ts: 3,
        });
        match ServerFrame::decode(&push).unwrap() {
            ServerFrame::Push { body, .. } => assert_eq!(body.get(), "[1.50]"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn encode_push_matches_server_frame() {
        let body = RawValue::from_string(r#"{"text":"hi"}"#.into()).unwrap();
        let bytes = encode_push(&PushFields {
            id: MessageId(42),
            seq: Some(9),
            from: Some("alice"),
            to: "bob",
            channel: None,
            client_msg_id: Some("c-1"),
            body: &body,
            ts: 7,
        });
        let frame: ServerFrame = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            format!("{frame:?}"),
            format!("{:?}", ServerFrame::decode(&bytes).unwrap()),
            "the fast decoder reads the same frame"
        );
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
                assert_eq!(
                    (id, seq, from.as_deref(), to.as_str(), channel, ts),
                    (MessageId(42), Some(9), Some("alice"), "bob", None, 7)
                );
                assert_eq!(client_msg_id.as_deref(), Some("c-1"));
                assert_eq!(body.get(), r#"{"text":"hi"}"#);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn error_codes_are_unique() {
        for a in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_code(a.code()), Some(a));
            assert_eq!(ErrorCode::from_name(a.name()), Some(a));
        }
    }
}
