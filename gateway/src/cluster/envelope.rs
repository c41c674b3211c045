//! What travels on the bus: one small JSON envelope per message, encoded once per publish. A push
//! frame (already-encoded JSON) is embedded verbatim, so the receiving node decodes the envelope
//! once and hands a zero-copy slice of the received bytes to every local connection.

use std::borrow::Cow;

use bytes::Bytes;
use imgate_shared::{KickReason, MessageId};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::metrics::Kind;

/// A bus message. Requests (`Deliver`, `Broadcast`, `KickUser`) carry a request id and the
/// sender's node id and instance; every node that acts on one answers with a `Reply` on the
/// sender's node channel, zero included.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Envelope<'a> {
    /// Queue `push` on the live connections of `user` (of `channel` if set).
    Deliver {
        req: u64,
        #[serde(borrow)]
        from: Cow<'a, str>,
        #[serde(borrow)]
        from_instance: Cow<'a, str>,
        #[serde(borrow)]
        user: Cow<'a, str>,
        #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
        channel: Option<Cow<'a, str>>,
        /// The message id and its position in the user's stream (also inside `push`; here so
        /// that the receiver need not parse it).
        id: MessageId,
        seq: u64,
        #[serde(borrow)]
        push: &'a RawValue,
    },
    /// Queue `push` on every live connection (of `channel` if set).
    Broadcast {
        req: u64,
        #[serde(borrow)]
        from: Cow<'a, str>,
        #[serde(borrow)]
        from_instance: Cow<'a, str>,
        #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
        channel: Option<Cow<'a, str>>,
        #[serde(borrow)]
        push: &'a RawValue,
    },
    /// Kick every connection of `user` (of `channel` if set).
    KickUser {
        req: u64,
        #[serde(borrow)]
        from: Cow<'a, str>,
        #[serde(borrow)]
        from_instance: Cow<'a, str>,
        #[serde(borrow)]
        user: Cow<'a, str>,
        #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
        channel: Option<Cow<'a, str>>,
        reason: KickReason,
    },
    /// Kick exactly one connection, displaced by a newer login: acted on only by the node
    /// instance named, and only while that connection still exists. No reply.
    KickConn {
        #[serde(borrow)]
        instance: Cow<'a, str>,
        conn_id: u64,
        #[serde(borrow)]
        user: Cow<'a, str>,
        generation: u64,
        reason: KickReason,
        /// The displacing login is a RESUME of the kicked connection's device: the session is
        /// taken over, not revoked.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        keep_session: bool,
    },
    /// The answer to request `req` of node instance `to_instance`: `count` local connections.
    Reply {
        req: u64,
        #[serde(borrow)]
        to_instance: Cow<'a, str>,
        #[serde(borrow)]
        node: Cow<'a, str>,
        count: u64,
    },
    /// The lowest of `user`'s stream positions `from_seq..=to_seq` that the receiving node has
    /// taken and not yet stored or given up: answered by every node with a `Reply` whose
    /// `count` is that position, 0 for none.
    Holds {
        req: u64,
        #[serde(borrow)]
        from: Cow<'a, str>,
        #[serde(borrow)]
        from_instance: Cow<'a, str>,
        #[serde(borrow)]
        user: Cow<'a, str>,
        from_seq: u64,
        to_seq: u64,
    },
    /// A node checking that its own subscription is alive; ignored.
    Ping {
        #[serde(borrow)]
        instance: Cow<'a, str>,
    },
}

impl Envelope<'_> {
    pub(crate) fn kind(&self) -> Kind {
        match self {
            Envelope::Deliver { .. } => Kind::Deliver,
            Envelope::Broadcast { .. } => Kind::Broadcast,
            Envelope::KickUser { .. } => Kind::KickUser,
            Envelope::KickConn { .. } => Kind::KickConn,
            Envelope::Reply { .. } => Kind::Reply,
            Envelope::Ping { .. } => Kind::Ping,
            Envelope::Holds { .. } => Kind::Holds,
        }
    }

    /// Encodes the envelope once, for every node it is published to.
    pub(crate) fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("an envelope always serialises"))
    }

    /// Decodes an envelope that borrows from `bytes`.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Envelope<'_>, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// Checks that `push` is one JSON value and borrows it for embedding verbatim.
pub(crate) fn raw_push(push: &[u8]) -> Result<&RawValue, serde_json::Error> {
    serde_json::from_slice(push)
}

/// The push frame embedded in a received envelope, as a slice of the received bytes (no copy).
pub(crate) fn push_bytes(received: &Bytes, push: &RawValue) -> Bytes {
    received.slice_ref(push.get().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_is_embedded_verbatim_and_sliced_without_copy() {
        let push = br#"{"type":"push","id":"1","to":"u \"q\"","body":{"a": [1, 2]}}"#;
        let env = Envelope::Deliver {
            req: 7,
            from: "n1".into(),
            from_instance: "abc".into(),
            user: "u \"q\"".into(),
            channel: None,
            id: MessageId(1),
            seq: 12,
            push: raw_push(push).unwrap(),
        };
        let bytes = env.encode();
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.contains(std::str::from_utf8(push).unwrap()), "{text}");
        match Envelope::decode(&bytes).unwrap() {
            Envelope::Deliver {
                req,
                user,
                seq,
                push: p,
                ..
            } => {
                assert_eq!((req, seq), (7, 12));
                assert_eq!(user, "u \"q\"");
                let sliced = push_bytes(&bytes, p);
                assert_eq!(&sliced[..], &push[..]);
                let base = bytes.as_ptr() as usize;
                let at = sliced.as_ptr() as usize;
                assert!(
                    at >= base && at < base + bytes.len(),
                    "a slice of the received buffer"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(raw_push(b"{not json").is_err());
    }

    #[test]
    fn a_kick_keeps_the_session_only_when_it_says_so() {
        let kick = |keep_session| Envelope::KickConn {
            instance: "i".into(),
            conn_id: 3,
            user: "u".into(),
            generation: 9,
            reason: KickReason::DuplicateLogin,
            keep_session,
        };
        let plain = kick(false).encode();
        assert!(
            !std::str::from_utf8(&plain)
                .unwrap()
                .contains("keep_session"),
            "older nodes read it unchanged"
        );
        for (bytes, want) in [(plain, false), (kick(true).encode(), true)] {
            match Envelope::decode(&bytes).unwrap() {
                Envelope::KickConn { keep_session, .. } => assert_eq!(keep_session, want),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}
