//! Client transports. One client port serves both: a connection whose first byte is `G` (an HTTP
//! `GET`) is a WebSocket upgrade on `/ws`; anything else is TCP framing, whose first byte is the
//! high byte of a length prefix and so never `G` (that would be a frame of more than 1 GiB).
//!
//! Either way the connection task sees the same thing: a [`FrameReader`] of JSON payloads and a
//! [`FrameWriter`] that takes encoded payloads.

mod tcp;
mod ws;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::base::TransportKind;
use crate::config::ClientSettings;

pub use tcp::{TcpReader, TcpWriter};
pub use ws::{WsReader, WsWriter};

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("frame longer than the maximum frame length")]
    TooLarge,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("websocket error: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
}

/// Why writing a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("websocket error: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
}

/// Why a connection never became a transport.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("handshake not finished before the login timeout")]
    Timeout,
    #[error("connection closed before its first byte")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("websocket handshake failed: {0}")]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
}

pub enum FrameReader {
    Tcp(TcpReader),
    Ws(WsReader),
}

pub enum FrameWriter {
    Tcp(TcpWriter),
    Ws(WsWriter),
}

impl FrameReader {
    /// The next frame's payload; `None` when the peer closed the connection.
    pub async fn next(&mut self) -> Option<Result<Bytes, ReadError>> {
        match self {
            FrameReader::Tcp(r) => r.next().await,
            FrameReader::Ws(r) => r.next().await,
        }
    }
}

impl FrameWriter {
    /// Queues a payload; it is written by the next [`FrameWriter::flush`] (or sooner).
    pub async fn feed(&mut self, payload: Bytes) -> Result<(), WriteError> {
        match self {
            FrameWriter::Tcp(w) => w.feed(payload).await,
            FrameWriter::Ws(w) => w.feed(payload).await,
        }
    }

    pub async fn flush(&mut self) -> Result<(), WriteError> {
        match self {
            FrameWriter::Tcp(w) => w.flush().await,
            FrameWriter::Ws(w) => w.flush().await,
        }
    }

    /// Writes one payload now.
    pub async fn send(&mut self, payload: Bytes) -> Result<(), WriteError> {
        self.feed(payload).await?;
        self.flush().await
    }

    /// Closes the connection (a WebSocket close frame, or a TCP FIN).
    pub async fn close(&mut self) -> Result<(), WriteError> {
        match self {
            FrameWriter::Tcp(w) => w.close().await,
            FrameWriter::Ws(w) => w.close().await,
        }
    }
}

/// Waits for the first byte of a new connection and sets up the transport it announces. A socket
/// that stays silent until `deadline` is taken for TCP, so that it can be told `LOGIN_TIMEOUT`.
pub async fn accept(
    stream: TcpStream,
    settings: &ClientSettings,
    deadline: Instant,
) -> Result<(FrameReader, FrameWriter, TransportKind), HandshakeError> {
    let _ = stream.set_nodelay(true);
    let mut first = [0u8; 1];
    let first = match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
        Ok(Ok(0)) => return Err(HandshakeError::Closed),
        Ok(Ok(_)) => Some(first[0]),
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => None,
    };
    if first == Some(b'G') {
        // Boxed: the upgrade's state is large and short-lived; unboxed it would be part of the
        // connection task's size for the connection's whole life.
        let (r, w) = tokio::time::timeout_at(deadline, Box::pin(ws::handshake(stream, settings)))
            .await
            .map_err(|_| HandshakeError::Timeout)??;
        Ok((FrameReader::Ws(r), FrameWriter::Ws(w), TransportKind::Ws))
    } else {
        let (r, w) = tcp::split(stream, settings.max_frame_len);
        Ok((FrameReader::Tcp(r), FrameWriter::Tcp(w), TransportKind::Tcp))
    }
}
