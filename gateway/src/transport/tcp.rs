//! TCP transport: 4-byte big-endian length prefix, then the JSON payload.
//!
//! Neither direction keeps a buffer while idle, so an idle connection costs no read or write
//! memory. Reading waits for the socket to be readable before it takes a buffer, and releases the
//! buffer once no partial frame is left in it.
//! Writing gathers a batch of frames, writes it and releases the buffer.

use std::pin::Pin;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use imgate_shared::codec::LENGTH_PREFIX_LEN;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::{ReadError, WriteError};

/// Bytes read at a time (more while a larger frame is being read).
const READ_CHUNK: usize = 512;

pub struct TcpReader {
    io: OwnedReadHalf,
    max_frame_len: usize,
    /// Bytes read and not yet returned: a partial frame (length prefix included), or frames
    /// that arrived together. Empty, with no allocation, between frames.
    pending: BytesMut,
}

pub struct TcpWriter {
    io: OwnedWriteHalf,
    /// Frames fed since the last flush; empty (no allocation) while idle.
    pending: BytesMut,
}

pub fn split(stream: TcpStream, max_frame_len: usize) -> (TcpReader, TcpWriter) {
    let (r, w) = stream.into_split();
    (
        TcpReader {
            io: r,
            max_frame_len,
            pending: BytesMut::new(),
        },
        TcpWriter {
            io: w,
            pending: BytesMut::new(),
        },
    )
}

impl TcpReader {
    /// The next frame's payload; `None` when the peer closed the connection between frames.
    /// Cancel safe: what was read stays in the reader.
    pub async fn next(&mut self) -> Option<Result<Bytes, ReadError>> {
        loop {
            match self.decode() {
                Ok(Some(frame)) => return Some(Ok(frame)),
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
            if self.pending.is_empty() && self.pending.capacity() > 0 {
                // Between frames: an idle connection keeps no read buffer.
                self.pending = BytesMut::new();
            }
            if let Err(e) = self.io.readable().await {
                return Some(Err(ReadError::Io(e)));
            }
            self.pending.reserve(READ_CHUNK);
            // One `poll_read` rather than `try_read_buf`: when it reads less than it asked for,
            // tokio takes the socket for drained and waits for the next readiness event, instead
            // of reporting it readable again and paying a recv that fails with WouldBlock after
            // every frame. `Pending` is passed on, never retried here: it means either that the
            // readiness was stale (the waker is registered for the next event) or that the task
            // has spent its cooperative budget (it is woken at once, after the other tasks of its
            // worker had their turn). Looping on `readable()` instead would spin forever in the
            // second case, since the socket stays readable while the budget stays spent.
            let read = std::future::poll_fn(|cx| {
                tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.pending)
            })
            .await;
            match read {
                Ok(0) if self.pending.is_empty() => return None,
                Ok(0) => return Some(Err(ReadError::Io(std::io::ErrorKind::UnexpectedEof.into()))),
                Ok(_) => {}
                Err(e) => return Some(Err(ReadError::Io(e))),
            }
        }
    }

    /// Takes a whole frame off `pending`; when only part of one is there, makes room for the
    /// rest of it.
    fn decode(&mut self) -> Result<Option<Bytes>, ReadError> {
        let Some(prefix) = self.pending.get(..LENGTH_PREFIX_LEN) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(prefix.try_into().expect("4 bytes")) as usize;
        if len > self.max_frame_len {
            return Err(ReadError::TooLarge);
        }
        let missing = (LENGTH_PREFIX_LEN + len).saturating_sub(self.pending.len());
        if missing > 0 {
            self.pending.reserve(missing);
            return Ok(None);
        }
        self.pending.advance(LENGTH_PREFIX_LEN);
        let frame = self.pending.split_to(len).freeze();
        if self.pending.is_empty() {
            // The frame keeps what it needs of the buffer; the reader keeps nothing.
            self.pending = BytesMut::new();
        }
        Ok(Some(frame))
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use tokio::net::TcpListener;

    #[tokio::test]
    async fn frames_are_read_whole_and_no_buffer_is_kept_between_them() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (mut reader, _writer) = split(server, 16);

        // Two frames in one write; then one frame in two writes.
        client
            .write_all(&[0, 0, 0, 2, b'{', b'}', 0, 0, 0, 1, b'1'])
            .await
            .unwrap();
        assert_eq!(&reader.next().await.unwrap().unwrap()[..], b"{}");
        assert_eq!(&reader.next().await.unwrap().unwrap()[..], b"1");
        assert_eq!(reader.pending.capacity(), 0);
        client.write_all(&[0, 0, 0, 3, b'a']).await.unwrap();
        client.write_all(b"bc").await.unwrap();
        assert_eq!(&reader.next().await.unwrap().unwrap()[..], b"abc");
        assert_eq!(reader.pending.capacity(), 0);

        client.write_all(&[0, 0, 0, 17]).await.unwrap();
        assert!(matches!(
            reader.next().await,
            Some(Err(ReadError::TooLarge))
        ));
    }

    #[tokio::test]
    async fn a_close_between_frames_ends_the_stream_and_inside_one_is_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (mut reader, _writer) = split(server, 16);
        drop(client);
        assert!(reader.next().await.is_none());

        let mut client = TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (mut reader, _writer) = split(server, 16);
        client.write_all(&[0, 0, 0, 5, b'a']).await.unwrap();
        drop(client);
        assert!(matches!(reader.next().await, Some(Err(ReadError::Io(_)))));
    }

    /// A reader whose task has spent its cooperative budget in the middle of a frame yields
    /// (tokio wakes the task at once) instead of spinning on a socket that stays readable.
    /// The frame is longer than one read chunk and wholly in the socket, so the first read
    /// leaves the socket readable; the task enters `next` with one unit of budget left, which
    /// that read spends. A reader that retried `Pending` itself would never return.
    #[test]
    fn a_spent_budget_in_the_middle_of_a_frame_yields_instead_of_spinning() {
        // Two workers: one may be taken by the reader, the other still runs the timer.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let read = rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut client = TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let payload = vec![b' '; 4 * READ_CHUNK];
            let mut frame = (payload.len() as u32).to_be_bytes().to_vec();
            frame.extend_from_slice(&payload);
            client.write_all(&frame).await.unwrap();
            // The whole frame has arrived before the reader starts.
            let mut peek = vec![0; frame.len()];
            while server.peek(&mut peek).await.unwrap() < frame.len() {
                tokio::task::yield_now().await;
            }
            let (mut reader, _writer) = split(server, frame.len());
            let task = tokio::spawn(async move {
                // A fresh poll has a budget of 128 units: leave one.
                for _ in 0..127 {
                    tokio::task::consume_budget().await;
                }
                reader.next().await.unwrap().unwrap().len()
            });
            tokio::time::timeout(Duration::from_secs(10), task).await
        });
        // A task that never yields cannot be shut down: leave it behind rather than wait.
        rt.shutdown_background();
        assert_eq!(
            read.expect("the reader yields and then reads the frame")
                .unwrap(),
            4 * READ_CHUNK
        );
    }
}
