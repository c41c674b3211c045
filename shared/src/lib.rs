//! The imgate wire protocol and client side, shared by the gateway, the load test and client apps.
//!
//! - [`protocol`]: the frames exchanged on a connection (serde enums), error codes and limits;
//!   documented in `docs/protocol.md`.
//! - [`codec`]: the TCP framing (4-byte big-endian length prefix, then a UTF-8 JSON object).
//! - [`claims`]: the JWT claims a login token carries.
//! - [`connection`]: a low-level client connection over TCP or WebSocket.
//! - [`client`]: the async client: login and resume, heartbeats, reconnects, cumulative
//!   acknowledgements, exactly-once in-order delivery to the application.

pub mod claims;
pub mod client;
pub mod codec;
pub mod connection;
pub mod protocol;

pub use protocol::{ClientFrame, ErrorCode, KickReason, MessageId, SendStatus, ServerFrame};
