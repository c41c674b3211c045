//! Every resource a client can make the node spend has a limit: queued bytes per connection and
//! per node, send rates per connection and per user, connections per user, and login attempts
//! per source address.

mod common;

use common::{metric_value, Client, TestNode};
use imgate::config::{DuplicateLoginPolicy, RoutingMode};
use imgate_shared::{ClientFrame, ErrorCode, SendStatus, ServerFrame};
use reqwest::Method;
use serde_json::json;

/// Reads pushes (acknowledging each) until every position up to `last` has arrived; returns
/// the positions in the order they came, without repetitions.
async fn read_all(client: &mut Client, last: u64) -> Vec<u64> {
    let mut seen = Vec::new();
    while seen.last().copied().unwrap_or(0) < last {
        match client.recv_skip_acks().await {
            Some(ServerFrame::Push { seq: Some(seq), .. }) => {
                if seen.last().is_none_or(|&s| seq > s) {
                    seen.push(seq);
                }
                client
                    .send(ClientFrame::Ack {
                        seq: Some(seq),
                        id: None,
                    })
                    .await;
            }
            other => panic!("expected a push, got {other:?}"),
        }
    }
    seen
}

/// Two clients that stop reading while 60 KB messages keep coming: each holds at most
/// `client.max_queued_bytes` in the node's memory, the node at most
/// `client.max_queued_bytes_total`; what did not fit is read from the database once they read
/// again, and nothing is lost.
#[tokio::test]
async fn slow_consumers_hold_bounded_bytes_and_lose_nothing() {
    const PER_CONNECTION: usize = 192 * 1024;
    const NODE: usize = 256 * 1024;
    const MESSAGES: u64 = 60;
    let node = TestNode::start_with(|s| {
        s.client.max_queued_bytes = PER_CONNECTION;
        s.client.max_queued_bytes_total = NODE;
        // Neither the frame count nor the write timeout steps in first.
        s.client.outbox_capacity = 10_000;
        s.client.write_timeout_ms = 120_000;
    })
    .await;
    let mut slow = [
        node.login(&node.tcp(), "slow-1", "app").await,
        node.login(&node.ws(), "slow-2", "web").await,
    ];
    let body = json!({ "blob": "x".repeat(60_000) });
    let mut peak = 0.0f64;
    for _ in 0..MESSAGES {
        let (status, reply) = node
            .admin_json(
                Method::POST,
                "/api/v1/messages",
                Some(json!({"to": ["slow-1", "slow-2"], "body": body})),
            )
            .await;
        assert_eq!(status, 200, "{reply}");
        for r in reply["results"].as_array().unwrap() {
            assert_eq!(r["status"], "delivered", "{reply}");
        }
        let queued = metric_value(&node.metrics().await, "imgate_queued_bytes", &[]);
        peak = peak.max(queued);
    }
    let metrics = node.metrics().await;
    println!(
        "queued bytes with two non-reading clients: peak {peak}, limits {PER_CONNECTION} per connection, {NODE} per node"
    );
    // Pushes are queued before the commit the receipt waits for, so the peak is seen.
    assert!(
        peak <= NODE as f64 + 64.0 * 1024.0,
        "the node queued {peak} bytes"
    );
    assert!(peak > 0.0);
    assert!(
        metric_value(
            &metrics,
            "imgate_memory_limited_total",
            &["action=\"evict\""]
        ) > 0.0,
        "{metrics}"
    );
    // Nothing was lost: once they read, both get every message, in order.
    for client in &mut slow {
        let seen = read_all(client, MESSAGES).await;
        assert_eq!(seen, (1..=MESSAGES).collect::<Vec<_>>());
    }
    node.stop().await;
}

/// Sends `n` messages to `to` and returns the receipts' (status, reason, retry_after_ms).
async fn send_n(
    client: &mut Client,
    to: &str,
    n: usize,
) -> Vec<(SendStatus, Option<ErrorCode>, Option<u64>)> {
    let mut out = Vec::new();
    for _ in 0..n {
        match client.send_text(to, "hi").await {
            ServerFrame::SendResult {
                status,
                reason,
                retry_after_ms,
                ..
            } => out.push((status, reason, retry_after_ms)),
            other => panic!("{other:?}"),
        }
    }
    out
}

fn accepted(receipts: &[(SendStatus, Option<ErrorCode>, Option<u64>)]) -> usize {
    receipts
        .iter()
        .filter(|(s, _, _)| *s != SendStatus::Refused)
        .count()
}

/// A tiny burst and a refill of one token in about 17 minutes: what is accepted does not depend
/// on timing.
#[tokio::test]
async fn sends_beyond_the_connection_rate_are_refused_and_the_connection_stays() {
    let node = TestNode::start_with(|s| {
        s.client.send_rate = 0.001;
        s.client.send_burst = 3;
    })
    .await;
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    let receipts = send_n(&mut alice, "bob", 5).await;
    assert_eq!(accepted(&receipts), 3, "{receipts:?}");
    for (status, reason, retry) in &receipts[3..] {
        assert_eq!(*status, SendStatus::Refused);
        assert_eq!(*reason, Some(ErrorCode::RateLimited));
        assert!(retry.is_some_and(|ms| ms > 1_000), "{retry:?}");
    }
    // The connection stays open, and a second connection has its own bucket.
    alice.send(ClientFrame::Heartbeat {}).await;
    assert!(matches!(
        alice.recv().await,
        Some(ServerFrame::HeartbeatAck { .. })
    ));
    let mut alice_web = node.login(&node.ws(), "alice", "web").await;
    assert_eq!(accepted(&send_n(&mut alice_web, "bob", 1).await), 1);
    // The admin API (the backend) is not limited by client send rates.
    for _ in 0..5 {
        let (status, reply) = node
            .admin_json(
                Method::POST,
                "/api/v1/messages",
                Some(json!({"to": "bob", "from": "alice", "body": {"text": "x"}})),
            )
            .await;
        assert_eq!(status, 200, "{reply}");
    }
    let metrics = node.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "imgate_rate_limited_total",
            &["limit=\"connection\""]
        ),
        2.0
    );
    node.stop().await;
}

#[tokio::test]
async fn the_user_rate_spans_the_users_connections_and_its_entry_goes_with_them() {
    let node = TestNode::start_with(|s| {
        s.client.user_send_rate = 0.001;
        s.client.user_send_burst = 4;
    })
    .await;
    let mut app = node.login(&node.tcp(), "alice", "app").await;
    let mut web = node.login(&node.ws(), "alice", "web").await;
    let mut bob = node.login(&node.tcp(), "bob", "app").await;
    assert_eq!(accepted(&send_n(&mut app, "carol", 3).await), 3);
    let receipts = send_n(&mut web, "carol", 3).await;
    assert_eq!(accepted(&receipts), 1, "{receipts:?}");
    assert_eq!(receipts[1].1, Some(ErrorCode::RateLimited));
    assert!(receipts[1].2.is_some());
    // Another user is not affected.
    assert_eq!(accepted(&send_n(&mut bob, "carol", 3).await), 3);
    let metrics = node.metrics().await;
    assert_eq!(
        metric_value(&metrics, "imgate_rate_limited_total", &["limit=\"user\""]),
        2.0
    );
    assert_eq!(
        metric_value(&metrics, "imgate_rate_limit_entries", &["table=\"user\""]),
        2.0
    );
    // The server leaves its tables before it closes the socket: once the client sees the
    // close, alice's entry is gone.
    for mut c in [app, web] {
        c.send(ClientFrame::Logout {}).await;
        c.until_closed().await;
    }
    let metrics = node.metrics().await;
    assert_eq!(
        metric_value(&metrics, "imgate_rate_limit_entries", &["table=\"user\""]),
        1.0
    );
    node.stop().await;
}

#[tokio::test]
async fn logins_beyond_the_address_rate_are_refused() {
    let node = TestNode::start_with(|s| {
        s.client.login_rate = 0.001;
        s.client.login_burst = 2;
    })
    .await;
    let _a = node.login(&node.tcp(), "a", "app").await;
    // A failed login counts too: attempts are limited, not successes.
    let mut bad = Client::connect(&node.ws()).await;
    let reply = bad.login("not-a-token", "app", None).await;
    assert!(
        matches!(
            reply,
            ServerFrame::Error {
                error: ErrorCode::TokenInvalid,
                ..
            }
        ),
        "{reply:?}"
    );
    let mut c = Client::connect(&node.tcp()).await;
    let reply = c.login(&node.token("c"), "app", None).await;
    match reply {
        ServerFrame::Error {
            error: ErrorCode::RateLimited,
            code: 4000,
            retry_after_ms: Some(ms),
            ..
        } => assert!(ms > 1_000, "{ms}"),
        other => panic!("{other:?}"),
    }
    assert!(c.recv().await.is_none(), "the connection is closed");
    let metrics = node.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "imgate_rate_limited_total",
            &["limit=\"address\""]
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "imgate_logins_total",
            &["result=\"RATE_LIMITED\""]
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "imgate_rate_limit_entries",
            &["table=\"address\""]
        ),
        1.0
    );
    node.stop().await;
}

/// Logs `user` in on `channel` and returns the error it gets (panics on success).
async fn login_error(node: &TestNode, user: &str, channel: &str) -> ErrorCode {
    let mut c = Client::connect(&node.tcp()).await;
    match c.login(&node.token(user), channel, None).await {
        ServerFrame::Error { error, .. } => {
            assert!(c.recv().await.is_none(), "the connection is closed");
            error
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn connections_per_user_are_limited() {
    let node = TestNode::start_with(|s| {
        s.channels.duplicate_login = DuplicateLoginPolicy::AllowMultiple;
        s.channels.max_connections_per_user = 2;
    })
    .await;
    let mut first = node.login(&node.tcp(), "alice", "app").await;
    let _second = node.login(&node.ws(), "alice", "app").await;
    assert_eq!(
        login_error(&node, "alice", "web").await,
        ErrorCode::TooManyConnections
    );
    let _bob = node.login(&node.tcp(), "bob", "app").await;
    // The server leaves the registry before it closes the socket.
    first.send(ClientFrame::Logout {}).await;
    first.until_closed().await;
    let _third = node.login(&node.tcp(), "alice", "web").await;
    let metrics = node.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "imgate_logins_total",
            &["result=\"TOO_MANY_CONNECTIONS\""]
        ),
        1.0
    );
    node.stop().await;
}

/// Two nodes on one Redis: the limit counts the user's connections on every node, in the same
/// atomic step that registers one.
#[tokio::test]
async fn connections_per_user_are_limited_across_the_cluster() {
    let prefix = common::random_prefix();
    let configure = |i: usize, prefix: String| {
        move |s: &mut imgate::Settings| {
            let db = format!("sqlite://{}", common::temp_path("db").display());
            common::cluster_settings(s, i, &prefix, &db, RoutingMode::Routed);
            s.channels.duplicate_login = DuplicateLoginPolicy::AllowMultiple;
            s.channels.max_connections_per_user = 2;
        }
    };
    let a = TestNode::start_with(configure(1, prefix.clone())).await;
    let b = TestNode::start_with(configure(2, prefix.clone())).await;
    let _on_a = a.login(&a.tcp(), "alice", "app").await;
    let mut on_b = b.login(&b.tcp(), "alice", "app").await;
    // Each node holds one: the refusal comes from the cluster-wide count.
    assert_eq!(
        login_error(&a, "alice", "web").await,
        ErrorCode::TooManyConnections
    );
    assert_eq!(
        login_error(&b, "alice", "pc").await,
        ErrorCode::TooManyConnections
    );
    // Closing one makes room (the server leaves presence before it closes the socket).
    on_b.send(ClientFrame::Logout {}).await;
    on_b.until_closed().await;
    let _again = a.login(&a.tcp(), "alice", "web").await;
    a.stop().await;
    b.stop().await;
}

fn refusal(frame: &ServerFrame) -> (SendStatus, Option<ErrorCode>) {
    match frame {
        ServerFrame::SendResult { status, reason, .. } => (*status, *reason),
        other => panic!("expected send_result, got {other:?}"),
    }
}

/// Under `delivery.recipients = "known"`, a message to a user id that never logged in and was
/// never registered is refused with UNKNOWN_RECIPIENT and leaves nothing behind: no row, no Redis
/// key. A user who logged in once on another node, or whom an operator registered, receives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_recipients_are_refused_and_leave_no_state_under_known_recipients() {
    let db = common::MysqlDb::create().await;
    let prefix = common::random_prefix();
    let mut nodes = Vec::new();
    for i in 1..=2 {
        let (prefix, url) = (prefix.clone(), db.url.clone());
        nodes.push(
            common::IsolatedNode::start_with(move |s| {
                common::cluster_settings(s, i, &prefix, &url, RoutingMode::Routed);
                s.delivery.recipients = imgate::config::RecipientPolicy::Known;
            })
            .await,
        );
    }
    let mut alice = nodes[0].login(&nodes[0].tcp(), "alice", "app").await;

    for ghost in ["ghost-1", "ghost-2", "ghost-1"] {
        assert_eq!(
            refusal(&alice.send_text(ghost, "anyone there?").await),
            (SendStatus::Refused, Some(ErrorCode::UnknownRecipient))
        );
    }
    assert_eq!(db.count().await, 0, "no row for a made-up recipient");
    let redis = redis_client().await;
    use fred::prelude::ClientLike;
    let keys: Vec<String> = redis
        .custom(
            fred::types::CustomCommand::new_static("KEYS", None::<u16>, false),
            vec![format!("{prefix}*ghost*")],
        )
        .await
        .unwrap();
    assert!(keys.is_empty(), "{keys:?}");

    // A user who logged in once (on the other node) is known to every node from then on.
    let mut bob = nodes[1].login(&nodes[1].tcp(), "bob", "app").await;
    bob.send(ClientFrame::Logout {}).await;
    let mut answer = alice.send_text("bob", "hi bob").await;
    for _ in 0..200 {
        if refusal(&answer).0 != SendStatus::Refused {
            break;
        }
        // Recorded in the background: the refusal until then is UNKNOWN_RECIPIENT.
        assert_eq!(refusal(&answer).1, Some(ErrorCode::UnknownRecipient));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        answer = alice.send_text("bob", "hi bob").await;
    }
    assert_eq!(refusal(&answer), (SendStatus::Stored, None));

    // An operator registers carol before her first login.
    let (status, body) = nodes[1]
        .admin_json(Method::PUT, "/api/v1/users/carol", None)
        .await;
    assert_eq!(
        (status, body),
        (200, json!({"user_id": "carol", "known": true}))
    );
    assert_eq!(
        refusal(&alice.send_text("carol", "welcome").await),
        (SendStatus::Stored, None)
    );
    let (status, _) = nodes[1]
        .admin_json(Method::PUT, "/api/v1/users/%0A", None)
        .await;
    assert_eq!(status, 400);

    let metrics = nodes[0].metrics().await;
    assert!(
        metric_value(
            &metrics,
            "imgate_recipient_checks_total",
            &["outcome=\"unknown\""]
        ) >= 2.0,
        "{metrics}"
    );
    drop((alice, bob));
    for n in nodes {
        n.stop().await;
    }
    db.drop_database().await;
}

async fn redis_client() -> fred::prelude::Client {
    use fred::prelude::ClientLike;
    let client = fred::prelude::Builder::from_config(
        fred::prelude::Config::from_url(&common::redis_url()).unwrap(),
    )
    .build()
    .unwrap();
    client.init().await.unwrap();
    client
}

/// The same on one node with its SQLite store: a login makes a user known, a made-up id is not.
#[tokio::test]
async fn known_recipients_on_the_embedded_store() {
    let node = TestNode::start_with(|s| {
        s.delivery.recipients = imgate::config::RecipientPolicy::Known;
    })
    .await;
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    let mut bob = node.login(&node.tcp(), "bob", "app").await;
    bob.send(ClientFrame::Logout {}).await;
    assert_eq!(
        refusal(&alice.send_text("nobody", "?").await),
        (SendStatus::Refused, Some(ErrorCode::UnknownRecipient))
    );
    // bob is remembered on this node at once; the row is written in the background.
    assert_eq!(
        refusal(&alice.send_text("bob", "hi").await),
        (SendStatus::Stored, None)
    );
    let mut recorded = 0.0;
    for _ in 0..200 {
        let metrics = node.metrics().await;
        recorded = metric_value(
            &metrics,
            "imgate_known_users_recorded_total",
            &["outcome=\"written\""],
        );
        if recorded >= 2.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(recorded, 2.0, "alice and bob written once each");
    node.stop().await;
}

/// A node that switches to `delivery.recipients = "known"` knows the users who logged in and
/// acknowledged under `any` (they have a device cursor), although `any` records nothing.
#[tokio::test]
async fn switching_to_known_recipients_keeps_the_users_who_were_here() {
    let db = format!("sqlite://{}", common::temp_path("db").display());
    let url = db.clone();
    let node = TestNode::start_with(move |s| s.store.url = imgate::config::Secret::new(url)).await;
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    let mut bob = node.login(&node.tcp(), "bob", "app").await;
    assert_eq!(
        refusal(&alice.send_text("bob", "hi").await),
        (SendStatus::Delivered, None)
    );
    let seq = match bob.recv_skip_acks().await {
        Some(ServerFrame::Push { seq: Some(seq), .. }) => seq,
        other => panic!("expected a push, got {other:?}"),
    };
    bob.send(ClientFrame::Ack {
        seq: Some(seq),
        id: None,
    })
    .await;
    // The acknowledgement is taken before the node stops.
    common::eventually("the ack is taken", || async {
        metric_value(&node.metrics().await, "imgate_acks_total", &[]) >= 1.0
    })
    .await;
    drop(bob);
    let metrics = node.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "imgate_known_users_recorded_total",
            &["outcome=\"written\""]
        ),
        0.0,
        "nothing is recorded under any"
    );
    drop(alice);
    // A graceful stop writes the acknowledged cursor.
    node.stop().await;

    let url = db.clone();
    let node = TestNode::start_with(move |s| {
        s.store.url = imgate::config::Secret::new(url);
        s.delivery.recipients = imgate::config::RecipientPolicy::Known;
    })
    .await;
    let mut carol = node.login(&node.tcp(), "carol", "app").await;
    assert_eq!(
        refusal(&carol.send_text("bob", "still there?").await),
        (SendStatus::Stored, None)
    );
    assert_eq!(
        refusal(&carol.send_text("nobody", "?").await),
        (SendStatus::Refused, Some(ErrorCode::UnknownRecipient))
    );
    node.stop().await;
}
