//! TCP transport: 4-byte big-endian length prefix, then the JSON payload.
//!
//! Reading uses the shared codec with a small initial buffer that grows only while a large frame
//! is read. Writing keeps no buffer while idle: a batch of frames is gathered, written and the
//! buffer released, so an idle connection costs no write memory.

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use imgate_shared::codec::{frame_codec, LENGTH_PREFIX_LEN};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec, LengthDelimitedCodecError};

use super::{ReadError, WriteError};

/// Initial read buffer of a connection; it grows only while a larger frame is being read.
const READ_BUFFER: usize = 512;

pub struct TcpReader(FramedRead<OwnedReadHalf, LengthDelimitedCodec>);

pub struct TcpWriter {
    io: OwnedWriteHalf,
    /// Frames fed since the last flush; empty (no allocation) while idle.
    pending: BytesMut,
}

pub fn split(stream: TcpStream, max_frame_len: usize) -> (TcpReader, TcpWriter) {
    let (r, w) = stream.into_split();
    (
        TcpReader(FramedRead::with_capacity(
            r,
            frame_codec(max_frame_len),
            READ_BUFFER,
        )),
        TcpWriter {
            io: w,
            pending: BytesMut::new(),
        },
    )
}

impl TcpReader {
    pub async fn next(&mut self) -> Option<Result<Bytes, ReadError>> {
        Some(match self.0.next().await? {
            Ok(frame) => Ok(frame.freeze()),
            Err(e)
                if e.get_ref()
                    .is_some_and(|inner| inner.is::<LengthDelimitedCodecError>()) =>
            {
                Err(ReadError::TooLarge)
            }
            Err(e) => Err(ReadError::Io(e)),
        })
    }
}

impl TcpWriter {
    /// Appends one frame (length prefix and payload) to the pending batch.
    pub async fn feed(&mut self, payload: Bytes) -> Result<(), WriteError> {
        let len = u32::try_from(payload.len()).map_err(|_| {
            WriteError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "frame longer than 4 GiB",
            ))
        })?;
        self.pending.reserve(LENGTH_PREFIX_LEN + payload.len());
        self.pending.put_u32(len);
        self.pending.extend_from_slice(&payload);
        Ok(())
    }

    /// Writes the pending batch and releases its buffer.
    pub async fn flush(&mut self) -> Result<(), WriteError> {
        if !self.pending.is_empty() {
            self.io.write_all_buf(&mut self.pending).await?;
        }
        self.pending = BytesMut::new();
        Ok(self.io.flush().await?)
    }

    pub async fn close(&mut self) -> Result<(), WriteError> {
        self.flush().await?;
        Ok(self.io.shutdown().await?)
    }
}
