//! WebSocket transport on `/ws`: one JSON text message per frame (binary messages are read as
//! JSON too). Read and write buffers are kept small: tungstenite's defaults (128 KiB each) would
//! cost about 130 KB per connection.

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::error::CapacityError;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use super::{HandshakeError, ReadError, WriteError};
use crate::config::ClientSettings;

/// The path WebSocket clients connect to.
pub const WS_PATH: &str = "/ws";

pub struct WsReader(SplitStream<WebSocketStream<TcpStream>>);
pub struct WsWriter(SplitSink<WebSocketStream<TcpStream>, Message>);

pub async fn handshake(
    stream: TcpStream,
    settings: &ClientSettings,
) -> Result<(WsReader, WsWriter), HandshakeError> {
    let config = WebSocketConfig::default()
        .read_buffer_size(settings.ws_read_buffer)
        .write_buffer_size(settings.ws_write_buffer)
        .max_message_size(Some(settings.max_frame_len))
        .max_frame_size(Some(settings.max_frame_len));
    #[allow(clippy::result_large_err)] // the signature tungstenite's callback requires
    let check_path = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() == WS_PATH {
            Ok(resp)
        } else {
            let mut not_found = ErrorResponse::new(Some(format!(
                "not found: WebSocket clients connect to {WS_PATH}"
            )));
            *not_found.status_mut() = StatusCode::NOT_FOUND;
            Err(not_found)
        }
    };
    let ws =
        tokio_tungstenite::accept_hdr_async_with_config(stream, check_path, Some(config)).await?;
    let (w, r) = ws.split();
    Ok((WsReader(r), WsWriter(w)))
}

impl WsReader {
    pub async fn next(&mut self) -> Option<Result<Bytes, ReadError>> {
        loop {
            return Some(match self.0.next().await? {
                Ok(Message::Text(text)) => Ok(Bytes::from(text)),
                Ok(Message::Binary(bytes)) => Ok(bytes),
                Ok(Message::Close(_)) => return None,
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
                Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => return None,
                Err(WsError::Capacity(
                    CapacityError::MessageTooLong { .. } | CapacityError::TooManyHeaders,
                )) => Err(ReadError::TooLarge),
                Err(e) => Err(ReadError::WebSocket(e)),
            });
        }
    }
}

impl WsWriter {
    pub async fn feed(&mut self, payload: Bytes) -> Result<(), WriteError> {
        // Payloads are JSON made by serde_json, so always UTF-8; the check is a cheap scan.
        let text = Utf8Bytes::try_from(payload).map_err(|_| {
            WriteError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "frame payload is not UTF-8",
            ))
        })?;
        Ok(self.0.feed(Message::Text(text)).await?)
    }

    pub async fn flush(&mut self) -> Result<(), WriteError> {
        Ok(self.0.flush().await?)
    }

    pub async fn close(&mut self) -> Result<(), WriteError> {
        match self.0.close().await {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
