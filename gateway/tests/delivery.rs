//! Delivery between clients on one node: across transports, to every channel type of a user, to
//! offline users, and with a sender that cannot be forged.

mod common;

use bytes::Bytes;
use common::{metric_value, TestNode};
use imgate_shared::protocol::Body;
use imgate_shared::{ClientFrame, ErrorCode, KickReason, SendStatus, ServerFrame};
use serde_json::json;

fn status(receipt: &ServerFrame) -> (SendStatus, u32) {
    match receipt {
        ServerFrame::SendResult {
            status,
            connections,
            id,
            ..
        } => {
            assert!(id.is_some(), "accepted messages have an id");
            (*status, *connections)
        }
        other => panic!("expected send_result, got {other:?}"),
    }
}

#[tokio::test]
async fn tcp_user_and_websocket_user_talk_both_ways() {
    let node = TestNode::start().await;
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    let mut bob = node.login(&node.ws(), "bob", "web").await;

    assert_eq!(
        status(&alice.send_text("bob", "hello bob").await),
        (SendStatus::Delivered, 1)
    );
    let (from, to, body) = bob.recv_push().await;
    assert_eq!((from.as_deref(), to.as_str()), (Some("alice"), "bob"));
    assert_eq!(body, json!({"text": "hello bob"}));

    assert_eq!(
        status(&bob.send_text("alice", "hi alice").await),
        (SendStatus::Delivered, 1)
    );
    let (from, _, body) = alice.recv_push().await;
    assert_eq!(from.as_deref(), Some("bob"));
    assert_eq!(body, json!({"text": "hi alice"}));

    let metrics = node.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "imgate_messages_total",
            &["outcome=\"delivered\""]
        ),
        2.0
    );
    assert!(metric_value(&metrics, "imgate_push_latency_seconds_count", &[]) >= 2.0);
    node.stop().await;
}

#[tokio::test]
async fn push_id_matches_the_receipt_and_body_passes_through_untouched() {
    let node = TestNode::start().await;
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    let mut bob = node.login(&node.tcp(), "bob", "app").await;
    let body = r#"{"z":1,"a":[true,null,"\u00e9"],"nested":{"k":"v"}}"#;
    alice
        .send(ClientFrame::Send {
            to: "bob".into(),
            channel: None,
            client_msg_id: "m1".into(),
            body: Body::from_json(body).unwrap(),
            retry: false,
        })
        .await;
    let receipt_id = match alice.recv().await {
        Some(ServerFrame::SendResult {
            id, client_msg_id, ..
        }) => {
            assert_eq!(client_msg_id, "m1");
            id.unwrap()
        }
        other => panic!("{other:?}"),
    };
    match bob.recv().await {
        Some(ServerFrame::Push {
            id,
            body: pushed,
            client_msg_id,
            ..
        }) => {
            assert_eq!(id, receipt_id);
            // So that a client can tell a resent message from a new one (see protocol.md).
            assert_eq!(client_msg_id.as_deref(), Some("m1"));
            let (a, b): (serde_json::Value, serde_json::Value) = (
                serde_json::from_str(pushed.get()).unwrap(),
                serde_json::from_str(body).unwrap(),
            );
            assert_eq!(a, b);
            assert!(
                pushed.get().starts_with(r#"{"z":1"#),
                "key order kept: {}",
                pushed.get()
            );
        }
        other => panic!("{other:?}"),
    }
    node.stop().await;
}

#[tokio::test]
async fn a_user_on_two_channel_types_receives_on_both() {
    let node = TestNode::start().await;
    let mut bob_app = node.login(&node.tcp(), "bob", "app").await;
    let mut bob_web = node.login(&node.ws(), "bob", "web").await;
    let mut alice = node.login(&node.tcp(), "alice", "pc").await;

    assert_eq!(
        status(&alice.send_text("bob", "to all").await),
        (SendStatus::Delivered, 2)
    );
    assert_eq!(bob_app.recv_push().await.2, json!({"text": "to all"}));
    assert_eq!(bob_web.recv_push().await.2, json!({"text": "to all"}));

    // Addressed to one channel type only.
    alice
        .send(ClientFrame::Send {
            to: "bob".into(),
            channel: Some("web".into()),
            client_msg_id: "w".into(),
            body: Body::from_value(&json!("web only")).unwrap(),
            retry: false,
        })
        .await;
    assert_eq!(
        status(&alice.recv().await.unwrap()),
        (SendStatus::Delivered, 1)
    );
    match bob_web.recv().await {
        Some(ServerFrame::Push { channel, body, .. }) => {
            assert_eq!(channel.as_deref(), Some("web"));
            assert_eq!(body.get(), r#""web only""#);
        }
        other => panic!("{other:?}"),
    }
    // bob_app got nothing: the next thing it sees is the reply to its own heartbeat.
    bob_app.send(ClientFrame::Heartbeat {}).await;
    assert!(matches!(
        bob_app.recv().await,
        Some(ServerFrame::HeartbeatAck { .. })
    ));
    node.stop().await;
}

#[tokio::test]
async fn an_offline_recipient_is_reported_offline_and_bad_addressing_refused() {
    let node = TestNode::start().await;
    let mut alice = node.login(&node.ws(), "alice", "web").await;
    assert_eq!(
        status(&alice.send_text("nobody", "anyone?").await),
        (SendStatus::Stored, 0)
    );

    alice
        .send(ClientFrame::Send {
            to: "bob".into(),
            channel: Some("toaster".into()),
            client_msg_id: "x".into(),
            body: Body::from_value(&1).unwrap(),
            retry: false,
        })
        .await;
    match alice.recv().await {
        Some(ServerFrame::SendResult {
            status, id, reason, ..
        }) => {
            assert_eq!(
                (status, id, reason),
                (SendStatus::Refused, None, Some(ErrorCode::UnknownChannel))
            );
        }
        other => panic!("{other:?}"),
    }
    alice
        .send(ClientFrame::Send {
            to: String::new(),
            channel: None,
            client_msg_id: "y".into(),
            body: Body::from_value(&1).unwrap(),
            retry: false,
        })
        .await;
    assert!(matches!(
        alice.recv().await,
        Some(ServerFrame::SendResult {
            status: SendStatus::Refused,
            reason: Some(ErrorCode::InvalidField),
            ..
        })
    ));

    let metrics = node.metrics().await;
    assert_eq!(
        metric_value(&metrics, "imgate_messages_total", &["outcome=\"stored\""]),
        1.0
    );
    assert_eq!(
        metric_value(&metrics, "imgate_messages_total", &["outcome=\"refused\""]),
        2.0
    );
    node.stop().await;
}

#[tokio::test]
async fn the_sender_cannot_be_forged() {
    let node = TestNode::start().await;
    let mut mallory = node.login(&node.tcp(), "mallory", "app").await;
    let mut bob = node.login(&node.tcp(), "bob", "app").await;
    // A `from` field is not part of SEND: the frame is refused and nothing is delivered.
    let forged =
        br#"{"type":"send","to":"bob","from":"alice","client_msg_id":"f","body":"trust me"}"#;
    mallory
        .conn
        .send_raw(Bytes::from_static(forged))
        .await
        .unwrap();
    assert!(matches!(
        mallory.recv().await,
        Some(ServerFrame::Error {
            error: ErrorCode::BadFrame,
            ..
        })
    ));
    // What does get through carries the authenticated user.
    mallory.send_text("bob", "it's me").await;
    let (from, _, body) = bob.recv_push().await;
    assert_eq!(from.as_deref(), Some("mallory"));
    assert_eq!(body, json!({"text": "it's me"}));
    node.stop().await;
}

#[tokio::test]
async fn duplicate_login_kicks_the_older_connection() {
    let node = TestNode::start().await;
    let mut old = node.login(&node.tcp(), "bob", "app").await;
    let mut new = node.login(&node.ws(), "bob", "app").await;
    let frames = old.until_closed().await;
    assert!(
        matches!(
            frames.as_slice(),
            [ServerFrame::Kick {
                reason: KickReason::DuplicateLogin,
                ..
            }]
        ),
        "{frames:?}"
    );
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    assert_eq!(
        status(&alice.send_text("bob", "which one?").await),
        (SendStatus::Delivered, 1)
    );
    assert_eq!(new.recv_push().await.2, json!({"text": "which one?"}));
    // Another channel type is not a duplicate.
    let _web = node.login(&node.ws(), "bob", "web").await;
    assert_eq!(
        status(&alice.send_text("bob", "both").await),
        (SendStatus::Delivered, 2)
    );
    let metrics = node.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "imgate_kicks_total",
            &["reason=\"duplicate_login\""]
        ),
        1.0
    );
    node.stop().await;
}

#[tokio::test]
async fn reject_new_and_allow_multiple_policies() {
    use imgate::config::DuplicateLoginPolicy;
    let node = TestNode::start_with(|s| {
        s.channels.duplicate_login = DuplicateLoginPolicy::RejectNew;
        s.channels
            .duplicate_login_by_type
            .insert("web".into(), DuplicateLoginPolicy::AllowMultiple);
    })
    .await;
    let mut first = node.login(&node.tcp(), "bob", "app").await;
    let mut second = common::Client::connect(&node.tcp()).await;
    let reply = second.login(&node.token("bob"), "app", None).await;
    assert!(
        matches!(
            reply,
            ServerFrame::Error {
                error: ErrorCode::DuplicateLogin,
                ..
            }
        ),
        "{reply:?}"
    );
    assert!(second.recv().await.is_none());
    first.send(ClientFrame::Heartbeat {}).await;
    assert!(
        matches!(first.recv().await, Some(ServerFrame::HeartbeatAck { .. })),
        "the first one stays"
    );

    let mut w1 = node.login(&node.ws(), "bob", "web").await;
    let mut w2 = node.login(&node.ws(), "bob", "web").await;
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    assert_eq!(
        status(&alice.send_text("bob", "all three").await),
        (SendStatus::Delivered, 3)
    );
    for c in [&mut first, &mut w1, &mut w2] {
        assert_eq!(c.recv_push().await.2, json!({"text": "all three"}));
    }
    node.stop().await;
}

/// A `send` whose `to` or `client_msg_id` holds a control, format or white-space character is
/// refused with INVALID_FIELD before it gets an id; nothing is stored.
#[tokio::test]
async fn a_send_to_an_unprintable_user_id_is_refused() {
    let node = TestNode::start().await;
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    let cases = [
        ("bob\n2026-01-01 WARN forged line", "a1"),
        ("bob\u{202e}", "a2"),
        ("bob\0", "a3"),
        ("bob", "id\nwith newline"),
        ("bob", "id\u{2066}"),
    ];
    for (to, client_msg_id) in cases {
        alice
            .send(ClientFrame::Send {
                to: to.into(),
                channel: None,
                client_msg_id: client_msg_id.into(),
                body: Body::from_value(&1).unwrap(),
                retry: false,
            })
            .await;
        match alice.recv().await {
            Some(ServerFrame::SendResult {
                status, id, reason, ..
            }) => assert_eq!(
                (status, id, reason),
                (SendStatus::Refused, None, Some(ErrorCode::InvalidField)),
                "{to:?} {client_msg_id:?}"
            ),
            other => panic!("{other:?}"),
        }
    }
    let metrics = node.metrics().await;
    assert_eq!(
        metric_value(&metrics, "imgate_messages_total", &["outcome=\"refused\""]),
        cases.len() as f64
    );
    node.stop().await;
}
