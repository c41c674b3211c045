//! A low-level client connection: one TCP or WebSocket connection to a gateway node that sends
//! [`ClientFrame`]s and receives [`ServerFrame`]s. It does no login, heartbeats or reconnects by
//! itself; it is the building block for clients, tests and the load test.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use crate::codec::{frame_codec, DEFAULT_MAX_FRAME_LEN};
use crate::protocol::{ClientFrame, ServerFrame};

/// Where a client connects: `tcp://host:port` or `ws://host:port/ws`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(String),
    Ws(String),
}

impl Endpoint {
    /// A TCP endpoint for `host:port`.
    pub fn tcp(addr: impl fmt::Display) -> Self {
        Endpoint::Tcp(addr.to_string())
    }

    /// A WebSocket endpoint for `host:port` with the gateway's `/ws` path.
    pub fn ws(addr: impl fmt::Display) -> Self {
        Endpoint::Ws(format!("ws://{addr}/ws"))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
            Endpoint::Ws(url) => f.write_str(url),
        }
    }
}

impl FromStr for Endpoint {
    type Err = ConnectionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("tcp://") {
            Ok(Endpoint::Tcp(rest.trim_end_matches('/').to_owned()))
        } else if s.starts_with("ws://") {
            Ok(Endpoint::Ws(s.to_owned()))
        } else {
            Err(ConnectionError::BadEndpoint(s.to_owned()))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("endpoint {0:?} is neither tcp://host:port nor ws://host:port/path")]
    BadEndpoint(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("websocket error: {0}")]
    WebSocket(#[from] tungstenite::Error),
    #[error("server sent a frame that is not valid protocol JSON: {0}")]
    BadFrame(#[from] serde_json::Error),
}

type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// One connection to a gateway node.
pub enum ClientConnection {
    Tcp(Box<Framed<TcpStream, LengthDelimitedCodec>>),
    Ws(Box<WsStream>),
}

impl ClientConnection {
    /// Opens a connection to `endpoint`.
    pub async fn connect(endpoint: &Endpoint) -> Result<Self, ConnectionError> {
        match endpoint {
            Endpoint::Tcp(addr) => {
                let stream = TcpStream::connect(addr.as_str()).await?;
                stream.set_nodelay(true)?;
                Ok(ClientConnection::Tcp(Box::new(Framed::new(
                    stream,
                    frame_codec(DEFAULT_MAX_FRAME_LEN * 16),
                ))))
            }
            Endpoint::Ws(url) => {
                let config = WebSocketConfig::default()
                    .read_buffer_size(4096)
                    .write_buffer_size(0);
                let (ws, _response) =
                    tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true)
                        .await?;
                Ok(ClientConnection::Ws(Box::new(ws)))
            }
        }
    }

    /// Sends one frame.
    pub async fn send(&mut self, frame: &ClientFrame) -> Result<(), ConnectionError> {
        self.send_raw(frame.encode()).await
    }

    /// Sends a raw payload as one frame (tests use this for malformed input).
    pub async fn send_raw(&mut self, payload: Bytes) -> Result<(), ConnectionError> {
        match self {
            ClientConnection::Tcp(framed) => framed.send(payload).await?,
            ClientConnection::Ws(ws) => {
                let text = tungstenite::Utf8Bytes::try_from(payload).map_err(|_| {
                    ConnectionError::Io(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "websocket text must be UTF-8",
                    ))
                })?;
                ws.send(Message::Text(text)).await?
            }
        }
        Ok(())
    }

    /// Receives the next frame's raw payload; `None` when the server closed the connection.
    pub async fn recv_raw(&mut self) -> Result<Option<Bytes>, ConnectionError> {
        match self {
            ClientConnection::Tcp(framed) => match framed.next().await {
                Some(Ok(bytes)) => Ok(Some(bytes.freeze())),
                Some(Err(e)) => Err(e.into()),
                None => Ok(None),
            },
            ClientConnection::Ws(ws) => loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => return Ok(Some(Bytes::from(t))),
                    Some(Ok(Message::Binary(b))) => return Ok(Some(b)),
                    Some(Ok(Message::Close(_))) | None => return Ok(None),
                    Some(Ok(_)) => continue,
                    Some(Err(tungstenite::Error::ConnectionClosed)) => return Ok(None),
                    Some(Err(e)) => return Err(e.into()),
                }
            },
        }
    }

    /// Receives the next frame; `None` when the server closed the connection.
    pub async fn recv(&mut self) -> Result<Option<ServerFrame>, ConnectionError> {
        match self.recv_raw().await? {
            Some(bytes) => Ok(Some(ServerFrame::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Closes the connection.
    pub async fn close(&mut self) -> Result<(), ConnectionError> {
        match self {
            ClientConnection::Tcp(framed) => {
                SinkExt::<Bytes>::close(framed.as_mut()).await?;
            }
            ClientConnection::Ws(ws) => match SinkExt::close(ws.as_mut()).await {
                Ok(()) | Err(tungstenite::Error::ConnectionClosed) => {}
                Err(e) => return Err(e.into()),
            },
        }
        Ok(())
    }
}
