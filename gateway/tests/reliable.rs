//! Reliable delivery on one node, over the raw protocol: offline messages replayed in order at
//! login, flow control, retransmission of unacknowledged pushes, sessions (resume, expiry,
//! revocation, device binding), cursors that survive a restart, and retention.

mod common;

use std::time::Duration;

use common::{Client, TestNode};
use imgate_shared::protocol::Body;
use imgate_shared::{ClientFrame, ErrorCode, KickReason, MessageId, SendStatus, ServerFrame};
use serde_json::json;

/// Sends `n` messages `{"n": first..first+n}` from `sender` to `to`; each is stored or delivered.
async fn send_numbered(sender: &mut Client, to: &str, first: u64, n: u64) {
    for i in first..first + n {
        sender
            .send(ClientFrame::Send {
                to: to.into(),
                channel: None,
                client_msg_id: format!("m{i}"),
                body: Body::from_value(&json!({ "n": i })).unwrap(),
                retry: false,
            })
            .await;
        loop {
            match sender.recv().await {
                Some(ServerFrame::SendResult { status, .. }) => {
                    assert!(
                        matches!(status, SendStatus::Stored | SendStatus::Delivered),
                        "{status:?}"
                    );
                    break;
                }
                Some(ServerFrame::Push { .. }) => continue,
                other => panic!("{other:?}"),
            }
        }
    }
}

/// A raw connection that logged in as `user` on device `device`; returns it with the
/// `login_result`. `caught_up` frames are handed over.
async fn login_device(
    node: &TestNode,
    user: &str,
    device: &str,
    last_seq: Option<u64>,
) -> (Client, ServerFrame) {
    let mut c = Client::connect(&node.tcp()).await;
    c.see_caught_up = true;
    c.send(ClientFrame::Login {
        token: node.token(user),
        device_id: device.into(),
        channel: "app".into(),
        client_version: None,
        heartbeat: None,
        last_seq,
    })
    .await;
    let result = c.recv().await.expect("login_result");
    assert!(
        matches!(result, ServerFrame::LoginResult { .. }),
        "{result:?}"
    );
    (c, result)
}

/// Sends RESUME on a new connection; returns the connection and the first answer.
async fn resume(node: &TestNode, session_id: &str, device: &str) -> (Client, ServerFrame) {
    let mut c = Client::connect(&node.tcp()).await;
    c.see_caught_up = true;
    c.send(ClientFrame::Resume {
        session_id: session_id.into(),
        device_id: device.into(),
        last_seq: None,
        client_version: None,
        heartbeat: None,
    })
    .await;
    let first = c.recv().await.expect("an answer to resume");
    (c, first)
}

fn session_of(frame: &ServerFrame) -> (String, bool, u64) {
    match frame {
        ServerFrame::LoginResult {
            session_id,
            resumed,
            cursor,
            ..
        } => (session_id.clone(), *resumed, *cursor),
        other => panic!("expected login_result, got {other:?}"),
    }
}

/// The next push: (id, seq, body's "n").
async fn next_push(c: &mut Client) -> (MessageId, u64, u64) {
    match c.recv_skip_acks().await {
        Some(ServerFrame::Push { id, seq, body, .. }) => {
            let n = body.parse::<serde_json::Value>().unwrap()["n"]
                .as_u64()
                .unwrap_or(u64::MAX);
            (id, seq.expect("stream pushes carry seq"), n)
        }
        other => panic!("expected a push, got {other:?}"),
    }
}

async fn ack(c: &mut Client, seq: u64) {
    c.send(ClientFrame::Ack {
        seq: Some(seq),
        id: None,
    })
    .await;
}

fn error_of(frame: &ServerFrame) -> ErrorCode {
    match frame {
        ServerFrame::Error { error, .. } => *error,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn an_offline_user_gets_200_messages_in_order_at_login_within_the_window() {
    let node = TestNode::start_with(|s| s.delivery.window = 16).await;
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    send_numbered(&mut alice, "bob", 0, 200).await;

    let (mut bob, result) = login_device(&node, "bob", "phone", None).await;
    assert_eq!(session_of(&result).2, 0, "a new device starts at 0");
    // Replayed pushes carry the sender's client message id, as live ones do.
    match bob.recv_skip_acks().await {
        Some(ServerFrame::Push {
            seq, client_msg_id, ..
        }) => assert_eq!((seq, client_msg_id.as_deref()), (Some(1), Some("m0"))),
        other => panic!("expected a push, got {other:?}"),
    }
    // Without acknowledgements the server stops at the window.
    for expected in 2..=16 {
        let (_, seq, n) = next_push(&mut bob).await;
        assert_eq!((seq, n), (expected, expected - 1));
    }
    bob.send(ClientFrame::Heartbeat {}).await;
    assert!(
        matches!(bob.recv().await, Some(ServerFrame::HeartbeatAck { .. })),
        "nothing beyond the window of 16 before an ack"
    );
    // Acknowledging opens the window; the rest follows in order, then caught_up.
    ack(&mut bob, 16).await;
    for expected in 17..=200 {
        let (_, seq, n) = next_push(&mut bob).await;
        assert_eq!((seq, n), (expected, expected - 1));
        ack(&mut bob, seq).await;
    }
    assert!(matches!(
        bob.recv_skip_acks().await,
        Some(ServerFrame::CaughtUp { seq: 200 })
    ));
    // Live messages follow the replay.
    send_numbered(&mut alice, "bob", 200, 1).await;
    assert_eq!(next_push(&mut bob).await.1, 201);
    let metrics = node.metrics().await;
    assert_eq!(
        common::metric_value(&metrics, "imgate_delivery_replayed_total", &[]),
        200.0
    );
    node.stop().await;
}

#[tokio::test]
async fn a_withheld_ack_is_retransmitted_then_the_connection_is_closed() {
    let node = TestNode::start_with(|s| {
        s.delivery.ack_timeout_ms = 200;
        s.delivery.max_retransmits = 2;
    })
    .await;
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    let (mut bob, _) = login_device(&node, "bob", "phone", None).await;
    assert!(matches!(
        bob.recv().await,
        Some(ServerFrame::CaughtUp { seq: 0 })
    ));
    send_numbered(&mut alice, "bob", 0, 1).await;
    let first = next_push(&mut bob).await;
    // Not acknowledged: the same push again, twice, then the connection is closed.
    assert_eq!(next_push(&mut bob).await, first);
    assert_eq!(next_push(&mut bob).await, first);
    match bob.recv_skip_acks().await {
        Some(ServerFrame::Kick { reason, .. }) => assert_eq!(reason, KickReason::AckTimeout),
        other => panic!("expected kick ack_timeout, got {other:?}"),
    }
    assert!(bob.recv().await.is_none(), "closed");
    let metrics = node.metrics().await;
    assert_eq!(
        common::metric_value(&metrics, "imgate_delivery_retransmits_total", &[]),
        2.0
    );

    // The device comes back: the unacknowledged message is replayed; once acknowledged it is
    // not sent again, and the next one follows.
    let (mut bob, result) = login_device(&node, "bob", "phone", None).await;
    assert_eq!(session_of(&result).2, 0);
    assert_eq!(next_push(&mut bob).await, first);
    ack(&mut bob, first.1).await;
    assert!(matches!(
        bob.recv().await,
        Some(ServerFrame::CaughtUp { seq: 1 })
    ));
    send_numbered(&mut alice, "bob", 1, 1).await;
    let second = next_push(&mut bob).await;
    assert_eq!((second.1, second.2), (2, 1), "not the first one again");
    node.stop().await;
}

#[tokio::test]
async fn sessions_resume_rotate_expire_and_are_bound_to_their_device() {
    let node = TestNode::start_with(|s| s.delivery.session_ttl_secs = 1).await;
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    let (mut bob, result) = login_device(&node, "bob", "phone", None).await;
    let (session, resumed, _) = session_of(&result);
    assert!(!resumed);
    drop(bob.recv().await); // caught_up
    send_numbered(&mut alice, "bob", 0, 2).await;
    let first = next_push(&mut bob).await.1;
    ack(&mut bob, first).await;
    drop(bob);

    // Another device cannot use the session; an id never issued is unknown.
    let (_, answer) = resume(&node, &session, "laptop").await;
    assert_eq!(error_of(&answer), ErrorCode::InvalidDevice);
    let (_, answer) = resume(&node, &"0".repeat(32), "phone").await;
    assert_eq!(error_of(&answer), ErrorCode::SessionExpired);

    // The right device resumes without a token: a new session id, replay after the cursor.
    let (mut bob, answer) = resume(&node, &session, "phone").await;
    let (rotated, resumed, cursor) = session_of(&answer);
    assert!(resumed);
    assert_ne!(rotated, session, "session ids are single-use");
    assert!(
        cursor <= 1,
        "acknowledged 1 (its cursor may still be on its way): {cursor}"
    );
    let mut last = cursor;
    loop {
        match bob.recv_skip_acks().await {
            Some(ServerFrame::Push { seq: Some(seq), .. }) => {
                assert_eq!(seq, last + 1);
                last = seq;
                ack(&mut bob, seq).await;
            }
            Some(ServerFrame::CaughtUp { seq }) => {
                assert_eq!((seq, last), (2, 2));
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    drop(bob);
    // The presented id is gone.
    let (_, answer) = resume(&node, &session, "phone").await;
    assert_eq!(error_of(&answer), ErrorCode::SessionExpired);

    // Sessions expire (1 s here): resuming ends in SESSION_EXPIRED within a bound.
    send_numbered(&mut alice, "bob", 2, 3).await;
    let mut id = rotated;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, answer) = resume(&node, &id, "phone").await;
        match answer {
            ServerFrame::LoginResult { session_id, .. } => id = session_id,
            other => {
                assert_eq!(error_of(&other), ErrorCode::SessionExpired);
                break;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A full login then catches up on what was sent meanwhile.
    let (mut bob, result) = login_device(&node, "bob", "phone", None).await;
    let cursor = session_of(&result).2;
    assert_eq!(
        cursor, 2,
        "both acknowledged messages are behind the cursor"
    );
    for expected in 3..=5 {
        let (_, seq, n) = next_push(&mut bob).await;
        assert_eq!((seq, n), (expected, expected - 1));
        ack(&mut bob, seq).await;
    }
    assert!(matches!(
        bob.recv().await,
        Some(ServerFrame::CaughtUp { seq: 5 })
    ));

    // LOGOUT revokes the session.
    let (session, _, _) = session_of(&result);
    bob.send(ClientFrame::Logout {}).await;
    assert!(bob.until_closed().await.is_empty());
    let (_, answer) = resume(&node, &session, "phone").await;
    assert_eq!(error_of(&answer), ErrorCode::SessionExpired);
    let metrics = node.metrics().await;
    for (outcome, at_least) in [("created", 2.0), ("resumed", 1.0), ("unknown", 3.0)] {
        let label = format!("outcome=\"{outcome}\"");
        let v = common::metric_value(&metrics, "imgate_sessions_total", &[&label]);
        assert!(v >= at_least, "{outcome}: {v}");
    }
    node.stop().await;
}

#[tokio::test]
async fn the_cursor_survives_a_node_restart() {
    let settings = common::test_settings();
    let store_url = settings.store.url.clone();
    let node = TestNode::start_with(|s| s.store.url = store_url.clone()).await;
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    send_numbered(&mut alice, "bob", 0, 5).await;
    let (mut bob, _) = login_device(&node, "bob", "phone", None).await;
    for expected in 1..=5 {
        assert_eq!(next_push(&mut bob).await.1, expected);
    }
    ack(&mut bob, 5).await;
    assert!(matches!(
        bob.recv().await,
        Some(ServerFrame::CaughtUp { seq: 5 })
    ));
    // Frames are handled in order: once the heartbeat is answered, the ack has been taken.
    // The store's writer has it queued; a graceful stop flushes it.
    bob.send(ClientFrame::Heartbeat {}).await;
    assert!(matches!(
        bob.recv().await,
        Some(ServerFrame::HeartbeatAck { .. })
    ));
    drop(bob);
    drop(alice);
    node.stop().await;

    let node = TestNode::start_with(|s| s.store.url = store_url.clone()).await;
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    send_numbered(&mut alice, "bob", 5, 1).await;
    let (mut bob, result) = login_device(&node, "bob", "phone", None).await;
    assert_eq!(session_of(&result).2, 5);
    let (_, seq, n) = next_push(&mut bob).await;
    assert_eq!((seq, n), (6, 5), "positions continue after the restart");
    assert!(matches!(
        bob.recv().await,
        Some(ServerFrame::CaughtUp { seq: 6 })
    ));
    // A client's own last_seq counts too, when it is ahead of the server's record.
    drop(bob);
    let (mut bob, result) = login_device(&node, "bob", "phone", Some(6)).await;
    assert_eq!(session_of(&result).2, 6);
    assert!(matches!(
        bob.recv().await,
        Some(ServerFrame::CaughtUp { seq: 6 })
    ));
    node.stop().await;
}

#[tokio::test]
async fn a_device_away_longer_than_the_retention_is_told_what_expired() {
    let node = TestNode::start_with(|s| s.delivery.retention_secs = 3_600).await;
    // Three messages to bob from two hours ago, written straight into the store's database.
    let path = node
        .settings
        .store
        .url
        .expose()
        .trim_start_matches("sqlite://");
    let mut db = <sqlx::SqliteConnection as sqlx::Connection>::connect(&format!("sqlite://{path}"))
        .await
        .unwrap();
    let old = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 2 * 3_600_000;
    for seq in 1..=3i64 {
        sqlx::query(
            "INSERT INTO messages (id, sender, recipient, channel, body, client_msg_id, \
             created_at_ms, state, seq) VALUES (?, 'alice', 'bob', NULL, '{}', NULL, ?, 0, ?)",
        )
        .bind(seq)
        .bind(old + seq)
        .bind(seq)
        .execute(&mut db)
        .await
        .unwrap();
    }
    drop(db);
    // Two recent ones take the next positions.
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    send_numbered(&mut alice, "bob", 100, 2).await;

    let (mut bob, _) = login_device(&node, "bob", "phone", None).await;
    match bob.recv().await {
        Some(ServerFrame::Expired { from_seq, to_seq }) => assert_eq!((from_seq, to_seq), (1, 3)),
        other => panic!("expected expired, got {other:?}"),
    }
    assert_eq!(next_push(&mut bob).await.1, 4);
    assert_eq!(next_push(&mut bob).await.1, 5);
    assert!(matches!(
        bob.recv().await,
        Some(ServerFrame::CaughtUp { seq: 5 })
    ));
    let metrics = node.metrics().await;
    assert_eq!(
        common::metric_value(&metrics, "imgate_delivery_expired_total", &[]),
        3.0
    );
    node.stop().await;
}

#[tokio::test]
async fn a_message_for_another_channel_type_is_skipped_without_waiting_for_it() {
    // Gap lookups only after a minute: the skipped position must be known at once.
    let node = TestNode::start_with(|s| {
        s.delivery.gap_timeout_ms = 60_000;
    })
    .await;
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    let (mut bob, _) = login_device(&node, "bob", "phone", None).await;
    assert!(matches!(
        bob.recv().await,
        Some(ServerFrame::CaughtUp { seq: 0 })
    ));
    // Position 1 is addressed to bob's web connections; the app connection gets position 2.
    alice
        .send(ClientFrame::Send {
            to: "bob".into(),
            channel: Some("web".into()),
            client_msg_id: "web-only".into(),
            body: Body::from_value(&json!({"n": 0})).unwrap(),
            retry: false,
        })
        .await;
    assert!(matches!(
        alice.recv().await,
        Some(ServerFrame::SendResult {
            status: SendStatus::Stored,
            ..
        })
    ));
    send_numbered(&mut alice, "bob", 1, 1).await;
    let (_, seq, n) = next_push(&mut bob).await;
    assert_eq!((seq, n), (2, 1));
    node.stop().await;
}
