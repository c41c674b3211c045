//! TCP framing: every frame is a 4-byte big-endian length `N`, then `N` bytes of UTF-8 JSON — the
//! same JSON object that a WebSocket client sends or receives as one text message.
//!
//! Keeping the payload identical on both transports lets the gateway encode a pushed frame once and
//! write the same bytes to every recipient, whatever its transport.

use tokio_util::codec::LengthDelimitedCodec;

/// Default maximum length of one frame's JSON payload (64 KiB).
pub const DEFAULT_MAX_FRAME_LEN: usize = 64 * 1024;

/// Length of the big-endian length prefix.
pub const LENGTH_PREFIX_LEN: usize = 4;

/// The TCP frame codec: 4-byte big-endian length prefix, payloads longer than `max_frame_len`
/// are refused with an error (the connection cannot be resynchronised after that).
pub fn frame_codec(max_frame_len: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(LENGTH_PREFIX_LEN)
        .big_endian()
        .max_frame_length(max_frame_len)
        .new_codec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{Bytes, BytesMut};
    use tokio_util::codec::{Decoder, Encoder};

    #[test]
    fn round_trip_and_limit() {
        let mut codec = frame_codec(8);
        let mut buf = BytesMut::new();
        codec
            .encode(Bytes::from_static(b"{\"a\":1}"), &mut buf)
            .unwrap();
        assert_eq!(&buf[..4], &[0, 0, 0, 7]);
        assert_eq!(&codec.decode(&mut buf).unwrap().unwrap()[..], b"{\"a\":1}");

        let mut big = BytesMut::from(&[0u8, 0, 0, 9][..]);
        big.extend_from_slice(b"123456789");
        assert!(codec.decode(&mut big).is_err());
    }
}
