//! A lean client socket: TCP with imgate's 4-byte length prefix, or WebSocket text messages.
//!
//! Lighter than `imgate_shared::connection::ClientConnection` on purpose: a 512-byte read buffer
//! that grows only for a large frame, no write buffer (each frame is written at once), and many
//! frames taken out of one read. One of these lives in every load-test connection task, so that
//! tens of thousands fit in one process.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use crate::cli::Transport;
use crate::targets::Target;

/// Initial read buffer of a TCP connection.
const READ_BUFFER: usize = 512;
/// Largest frame accepted from a server (imgate's largest frame is 16 MiB + 1 KiB).
const MAX_FRAME: usize = 17 * 1024 * 1024;
/// WebSocket read buffer (tungstenite's default is 128 KiB).
const WS_READ_BUFFER: usize = 2048;

/// Why a connection failed; [`ConnError::code`] names it for the failure table.
#[derive(Debug)]
pub enum ConnError {
    Io(io::Error),
    Ws(tungstenite::Error),
    FrameTooLarge(usize),
}

impl ConnError {
    /// A short stable name, e.g. `CONNECT_REFUSED` or `WS_HANDSHAKE`.
    pub fn code(&self, phase: &str) -> String {
        match self {
            ConnError::Io(e) => format!("{phase}_{}", io_kind(e)),
            ConnError::Ws(tungstenite::Error::Io(e)) => format!("{phase}_{}", io_kind(e)),
            ConnError::Ws(tungstenite::Error::Http(r)) => {
                format!("WS_HTTP_{}", r.status().as_u16())
            }
            ConnError::Ws(tungstenite::Error::ConnectionClosed)
            | ConnError::Ws(tungstenite::Error::AlreadyClosed) => format!("{phase}_CLOSED"),
            ConnError::Ws(_) => format!("{phase}_WS_ERROR"),
            ConnError::FrameTooLarge(_) => "FRAME_TOO_LARGE_FROM_SERVER".into(),
        }
    }
}

fn io_kind(e: &io::Error) -> String {
    use io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "REFUSED".into(),
        ConnectionReset => "RESET".into(),
        ConnectionAborted => "ABORTED".into(),
        TimedOut => "TIMEOUT".into(),
        AddrNotAvailable => "ADDR_NOT_AVAILABLE".into(),
        BrokenPipe => "BROKEN_PIPE".into(),
        UnexpectedEof => "EOF".into(),
        _ => match e.raw_os_error() {
            Some(libc::EMFILE) | Some(libc::ENFILE) => "TOO_MANY_OPEN_FILES".into(),
            Some(n) => format!("ERRNO_{n}"),
            None => format!("{:?}", e.kind()).to_ascii_uppercase(),
        },
    }
}

impl std::fmt::Display for ConnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnError::Io(e) => write!(f, "{e}"),
            ConnError::Ws(e) => write!(f, "{e}"),
            ConnError::FrameTooLarge(n) => write!(f, "server frame of {n} bytes"),
        }
    }
}

impl From<io::Error> for ConnError {
    fn from(e: io::Error) -> Self {
        ConnError::Io(e)
    }
}

impl From<tungstenite::Error> for ConnError {
    fn from(e: tungstenite::Error) -> Self {
        ConnError::Ws(e)
    }
}

/// The local address connection number `n` connects from, spreading connections over `count`
/// loopback addresses 127.0.0.1 .. 127.0.0.count (all of 127/8 is loopback on Linux). The kernel
/// looks for a free local port per (source, destination) pair, and that search grows with the
/// ports already in use: with 15,000 connections from 127.0.0.1 to one port it took ~40% of the
/// load generator's CPU. `None` for one address or a target that is not IPv4.
pub fn source_ip(target: &Target, n: u64, count: u32) -> Option<Ipv4Addr> {
    if count <= 1 || !target.addr.is_ipv4() {
        return None;
    }
    let i = (n % count.min(250) as u64) as u8;
    Some(Ipv4Addr::new(127, 0, 0, 1 + i))
}

/// Lets `connect` pick the local port for the whole 4-tuple after an explicit `bind` to an
/// address (IP_BIND_ADDRESS_NO_PORT); without it `bind` reserves a port for every destination.
fn bind_address_no_port(socket: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and a c_int option value of the right size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            &one as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

pub enum Conn {
    Tcp { stream: TcpStream, buf: BytesMut },
    Ws(Box<WebSocketStream<TcpStream>>),
}

impl Conn {
    /// Connects to `target` (and does the WebSocket handshake), within `within`; from the local
    /// address `source` when given (see [`source_ip`]).
    pub async fn open(
        target: &Target,
        within: Duration,
        source: Option<Ipv4Addr>,
    ) -> Result<Conn, ConnError> {
        let open = async {
            let stream = match source {
                Some(ip) => {
                    let socket = TcpSocket::new_v4()?;
                    bind_address_no_port(&socket);
                    socket.bind(SocketAddr::new(ip.into(), 0))?;
                    socket.connect(target.addr).await?
                }
                None => TcpStream::connect(target.addr).await?,
            };
            stream.set_nodelay(true)?;
            match target.transport {
                Transport::Tcp => Ok(Conn::Tcp {
                    stream,
                    buf: BytesMut::with_capacity(READ_BUFFER),
                }),
                Transport::Ws => {
                    let url = target.url.as_deref().expect("WebSocket targets have a URL");
                    let config = WebSocketConfig::default()
                        .read_buffer_size(WS_READ_BUFFER)
                        .write_buffer_size(0)
                        .max_message_size(Some(MAX_FRAME))
                        .max_frame_size(Some(MAX_FRAME));
                    let (ws, _) =
                        tokio_tungstenite::client_async_with_config(url, stream, Some(config))
                            .await?;
                    Ok(Conn::Ws(Box::new(ws)))
                }
            }
        };
        match tokio::time::timeout(within, open).await {
            Ok(r) => r,
            Err(_) => Err(ConnError::Io(io::ErrorKind::TimedOut.into())),
        }
    }

    /// The next frame's payload (TCP) or text message (WebSocket); `None` once the server closed
    /// the connection. Cancel-safe: a partly read frame stays buffered.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, ConnError> {
        match self {
            Conn::Tcp { stream, buf } => loop {
                if buf.len() >= 4 {
                    let n = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
                    if n > MAX_FRAME {
                        return Err(ConnError::FrameTooLarge(n));
                    }
                    if buf.len() >= 4 + n {
                        buf.advance(4);
                        return Ok(Some(buf.split_to(n).freeze()));
                    }
                    buf.reserve(4 + n - buf.len());
                } else if buf.capacity() - buf.len() < 64 {
                    buf.reserve(READ_BUFFER);
                }
                if stream.read_buf(buf).await? == 0 {
                    return Ok(None);
                }
            },
            Conn::Ws(ws) => loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => return Ok(Some(Bytes::from(t))),
                    Some(Ok(Message::Binary(b))) => return Ok(Some(b)),
                    Some(Ok(Message::Close(_))) | None => return Ok(None),
                    Some(Ok(_)) => continue,
                    Some(Err(
                        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed,
                    )) => return Ok(None),
                    Some(Err(e)) => return Err(e.into()),
                }
            },
        }
    }

    /// Writes one frame (a length prefix and `payload` on TCP; a text message on WebSocket).
    pub async fn send(&mut self, payload: &[u8]) -> Result<(), ConnError> {
        match self {
            Conn::Tcp { stream, .. } => {
                let mut frame = Vec::with_capacity(4 + payload.len());
                frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                frame.extend_from_slice(payload);
                stream.write_all(&frame).await?;
                Ok(())
            }
            Conn::Ws(ws) => {
                let text = std::str::from_utf8(payload)
                    .map_err(|e| ConnError::Io(io::Error::new(io::ErrorKind::InvalidData, e)))?;
                ws.send(Message::text(text)).await?;
                Ok(())
            }
        }
    }
}
