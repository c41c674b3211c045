//! What the load test writes and reads on a connection, for both kinds of target:
//!
//! - imgate: the JSON frames of `docs/protocol.md` (login, heartbeat, send, ack; login_result,
//!   send_result, push, kick, error);
//! - Socket.IO v4 over Engine.IO v4 WebSocket: `0{open}`, `40{auth}` / `40{sid}` (connect),
//!   `2`/`3` (ping/pong), `42[event,data]`, `42<id>[...]` / `43<id>[...]` (event with ack).
//!
//! Message bodies are the load test's own: `{"s":sender,"q":seq,"t":sent_us,"p":"padding"}` for
//! chat and `{"b":number,"t":sent_us}` for broadcasts, where `t` is the send time in microseconds
//! since the Unix epoch. Parsing borrows from the received bytes; nothing is allocated per frame
//! unless a string needs unescaping.

use std::borrow::Cow;
use std::fmt::Write as _;

use imgate_shared::protocol::HeartbeatRange;
use imgate_shared::ClientFrame;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::cli::TargetKind;

pub const HEARTBEAT: &[u8] = br#"{"type":"heartbeat"}"#;
/// Engine.IO pong (answer to the server's ping `2`).
pub const EIO_PONG: &[u8] = b"3";

/// The marks a load-test message body carries.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
pub struct Mark {
    /// Sender (global user number).
    #[serde(default)]
    pub s: Option<u64>,
    /// The sender's sequence number.
    #[serde(default)]
    pub q: Option<u64>,
    /// Send time, microseconds since the Unix epoch.
    #[serde(default)]
    pub t: Option<u64>,
    /// Broadcast number.
    #[serde(default)]
    pub b: Option<u64>,
}

impl Mark {
    pub fn parse(body: &[u8]) -> Option<Mark> {
        serde_json::from_slice(body).ok()
    }
}

/// A chat body of about `payload` bytes.
pub fn chat_body(sender: u64, seq: u64, sent_us: u64, payload: usize) -> String {
    let mut body = String::with_capacity(payload.max(64));
    let _ = write!(body, r#"{{"s":{sender},"q":{seq},"t":{sent_us},"p":""#);
    let pad = payload.saturating_sub(body.len() + 2);
    body.extend(std::iter::repeat_n('x', pad));
    body.push_str("\"}");
    body
}

/// The login frame (imgate) or namespace connect with auth (Socket.IO: the peer trusts the
/// user id given as `token`).
pub fn login(
    kind: TargetKind,
    user: &str,
    token: String,
    channel: &str,
    heartbeat_ms: Option<u64>,
) -> Vec<u8> {
    match kind {
        TargetKind::Imgate => ClientFrame::Login {
            token,
            device_id: "loadtest".to_owned(),
            channel: channel.to_owned(),
            client_version: Some(concat!("imgate-loadtest/", env!("CARGO_PKG_VERSION")).into()),
            heartbeat: heartbeat_ms.map(|ms| HeartbeatRange {
                min_ms: ms,
                max_ms: ms,
            }),
            last_seq: None,
        }
        .encode()
        .to_vec(),
        TargetKind::Socketio => {
            format!(r#"40{{"token":{}}}"#, serde_json::Value::from(user)).into_bytes()
        }
    }
}

/// A chat message from the sender to `to` with sequence number `seq` (the imgate
/// `client_msg_id`, or the Socket.IO ack id).
pub fn chat_send(kind: TargetKind, to: &str, seq: u64, body: &str) -> Vec<u8> {
    let mut out = String::with_capacity(body.len() + to.len() + 64);
    match kind {
        TargetKind::Imgate => {
            let _ = write!(
                out,
                r#"{{"type":"send","to":"{to}","client_msg_id":"{seq}","body":{body}}}"#
            );
        }
        TargetKind::Socketio => {
            let _ = write!(out, r#"42{seq}["chat",{{"to":"{to}","body":{body}}}]"#);
        }
    }
    out.into_bytes()
}

/// The imgate ack of a push.
pub fn ack(id: &str) -> Vec<u8> {
    format!(r#"{{"type":"ack","id":"{id}"}}"#).into_bytes()
}

/// A cumulative acknowledgement: every message up to position `seq`.
pub fn ack_seq(seq: u64) -> Vec<u8> {
    format!(r#"{{"type":"ack","seq":{seq}}}"#).into_bytes()
}

/// A frame received, reduced to what the load test looks at.
#[derive(Debug, PartialEq, Eq)]
pub enum In<'a> {
    /// Engine.IO open packet (Socket.IO only).
    Open,
    /// Logged in; imgate says the heartbeat interval.
    LoginOk {
        heartbeat_ms: Option<u64>,
    },
    /// The server refused the login; the error name.
    LoginFailed(String),
    /// A pushed message: its id (imgate) and its body's JSON.
    Push {
        id: Option<Cow<'a, str>>,
        /// The position in the recipient's stream (imgate messages; broadcasts have none).
        seq: Option<u64>,
        body: &'a [u8],
    },
    /// The receipt of one of our messages.
    Receipt {
        seq: u64,
        status: Cow<'a, str>,
    },
    HeartbeatAck,
    /// Engine.IO ping: answer with [`EIO_PONG`].
    Ping,
    /// The server is closing the connection: kick reason, error name or Socket.IO disconnect.
    Closing(String),
    /// An error that does not close the connection.
    Error(String),
    /// Anything else (ignored).
    Other,
}

#[derive(Deserialize)]
struct ImgateFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default, borrow)]
    body: Option<&'a RawValue>,
    #[serde(default, borrow)]
    client_msg_id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    status: Option<Cow<'a, str>>,
    #[serde(default)]
    heartbeat_ms: Option<u64>,
    #[serde(default, borrow)]
    error: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    reason: Option<Cow<'a, str>>,
}

/// Errors after which the gateway closes the connection (docs/protocol.md §8).
fn closes(error: &str) -> bool {
    !matches!(error, "BAD_FRAME" | "ALREADY_LOGGED_IN")
}

pub fn parse(kind: TargetKind, frame: &[u8]) -> In<'_> {
    match kind {
        TargetKind::Imgate => parse_imgate(frame),
        TargetKind::Socketio => parse_socketio(frame),
    }
}

pub fn parse_imgate(frame: &[u8]) -> In<'_> {
    let Ok(f) = serde_json::from_slice::<ImgateFrame>(frame) else {
        return In::Other;
    };
    match &*f.kind {
        "push" => match f.body {
            Some(body) => In::Push {
                id: f.id,
                seq: f.seq,
                body: body.get().as_bytes(),
            },
            None => In::Other,
        },
        "send_result" => match f.client_msg_id.as_deref().and_then(|c| c.parse().ok()) {
            Some(seq) => In::Receipt {
                seq,
                status: f.status.unwrap_or(Cow::Borrowed("unknown")),
            },
            None => In::Other,
        },
        "heartbeat_ack" => In::HeartbeatAck,
        "login_result" => In::LoginOk {
            heartbeat_ms: f.heartbeat_ms,
        },
        "kick" => In::Closing(format!(
            "KICK_{}",
            f.reason
                .as_deref()
                .unwrap_or("unknown")
                .to_ascii_uppercase()
        )),
        "error" => {
            let name = f.error.as_deref().unwrap_or("UNKNOWN_ERROR").to_owned();
            if closes(&name) {
                In::Closing(name)
            } else {
                In::Error(name)
            }
        }
        _ => In::Other,
    }
}

#[derive(Deserialize)]
struct SioChat<'a> {
    #[serde(borrow)]
    body: &'a RawValue,
}

#[derive(Deserialize)]
struct SioAck<'a> {
    #[serde(default, borrow)]
    status: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct SioError<'a> {
    #[serde(default, borrow)]
    message: Option<Cow<'a, str>>,
}

pub fn parse_socketio(frame: &[u8]) -> In<'_> {
    match frame {
        [b'0', ..] => In::Open,
        [b'2', ..] => In::Ping,
        [b'1', ..] => In::Closing("EIO_CLOSE".into()),
        [b'4', b'0', ..] => In::LoginOk { heartbeat_ms: None },
        [b'4', b'1', ..] => In::Closing("SIO_DISCONNECT".into()),
        [b'4', b'4', rest @ ..] => {
            let message = serde_json::from_slice::<SioError>(rest)
                .ok()
                .and_then(|e| e.message.map(|m| m.into_owned()))
                .unwrap_or_default();
            In::LoginFailed(if message.is_empty() {
                "SIO_CONNECT_ERROR".into()
            } else {
                format!("SIO_CONNECT_ERROR: {message}")
            })
        }
        [b'4', b'2', rest @ ..] => {
            // 42[<"chat">,{"from":..,"body":..}] (no ack id on pushes from the peer).
            let start = rest.iter().position(|&c| c == b'[').unwrap_or(rest.len());
            match serde_json::from_slice::<(Cow<str>, SioChat)>(&rest[start..]) {
                Ok((_, chat)) => In::Push {
                    id: None,
                    seq: None,
                    body: chat.body.get().as_bytes(),
                },
                Err(_) => In::Other,
            }
        }
        [b'4', b'3', rest @ ..] => {
            let digits = rest.iter().take_while(|c| c.is_ascii_digit()).count();
            let Some(seq) = std::str::from_utf8(&rest[..digits])
                .ok()
                .and_then(|d| d.parse().ok())
            else {
                return In::Other;
            };
            let status = serde_json::from_slice::<(SioAck,)>(&rest[digits..])
                .ok()
                .and_then(|(a,)| a.status)
                .unwrap_or(Cow::Borrowed("unknown"));
            In::Receipt { seq, status }
        }
        _ => In::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_body_has_the_requested_size_and_marks() {
        let b = chat_body(7, 42, 1_700_000_000_000_000, 200);
        assert_eq!(b.len(), 200);
        let m = Mark::parse(b.as_bytes()).unwrap();
        assert_eq!(
            (m.s, m.q, m.t),
            (Some(7), Some(42), Some(1_700_000_000_000_000))
        );
        // Smaller than the marks: no padding.
        assert!(Mark::parse(chat_body(1, 2, 3, 0).as_bytes()).is_some());
    }

    #[test]
    fn parses_imgate_frames() {
        let push =
            br#"{"type":"push","id":"123","seq":5,"from":"a","to":"b","body":{"s":1,"q":2,"t":3},"ts":4}"#;
        match parse_imgate(push) {
            In::Push { id, seq, body } => {
                assert_eq!(seq, Some(5));
                assert_eq!(id.as_deref(), Some("123"));
                assert_eq!(body, br#"{"s":1,"q":2,"t":3}"#);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_imgate(br#"{"type":"send_result","client_msg_id":"9","id":"1","status":"delivered","connections":1}"#),
            In::Receipt { seq: 9, status: "delivered".into() }
        );
        assert_eq!(
            parse_imgate(br#"{"type":"error","code":5000,"error":"SERVER_FULL","message":"x"}"#),
            In::Closing("SERVER_FULL".into())
        );
        assert_eq!(
            parse_imgate(br#"{"type":"kick","reason":"slow_consumer","message":"x"}"#),
            In::Closing("KICK_SLOW_CONSUMER".into())
        );
        assert!(matches!(
            parse_imgate(br#"{"type":"login_result","session_id":"s","heartbeat_ms":30000,"idle_timeout_ms":1,"node_id":"n","user_id":"u","server_time_ms":1,"protocol":1}"#),
            In::LoginOk { heartbeat_ms: Some(30000) }
        ));
        let send = chat_send(TargetKind::Imgate, "lt-1", 5, &chat_body(0, 5, 1, 0));
        let f = ClientFrame::decode(&send).unwrap();
        assert_eq!(f.kind(), "send");
        let ack = ack("18446744073709551615");
        assert_eq!(ClientFrame::decode(&ack).unwrap().kind(), "ack");
    }

    #[test]
    fn parses_socketio_packets() {
        assert_eq!(
            parse_socketio(br#"0{"sid":"x","pingInterval":25000}"#),
            In::Open
        );
        assert_eq!(parse_socketio(b"2"), In::Ping);
        assert!(matches!(
            parse_socketio(br#"40{"sid":"abc"}"#),
            In::LoginOk { .. }
        ));
        assert!(matches!(
            parse_socketio(br#"44{"message":"no user"}"#),
            In::LoginFailed(m) if m.contains("no user")
        ));
        match parse_socketio(br#"42["chat",{"from":"lt-1","body":{"s":1,"q":2,"t":3}}]"#) {
            In::Push { id: None, body, .. } => assert_eq!(body, br#"{"s":1,"q":2,"t":3}"#),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_socketio(br#"4317[{"status":"sent"}]"#),
            In::Receipt {
                seq: 17,
                status: "sent".into()
            }
        );
        assert_eq!(
            chat_send(TargetKind::Socketio, "lt-2", 3, "{}"),
            br#"423["chat",{"to":"lt-2","body":{}}]"#.to_vec()
        );
        assert_eq!(
            login(TargetKind::Socketio, "lt-2", String::new(), "app", None),
            br#"40{"token":"lt-2"}"#.to_vec()
        );
    }
}
