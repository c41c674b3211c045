//! Persistence through the whole gateway, on the real MariaDB (a fresh database per test): what is
//! sent over TCP, WebSocket and the admin API is stored with the right fields; receipts come only
//! after the commit; repeated client message ids are stored once; history pages are complete;
//! shutdown flushes; a stalled database makes senders wait or be refused, never lose messages.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{MysqlDb, TestNode};
use imgate::config::Secret;
use imgate_shared::protocol::Body;
use imgate_shared::{ClientFrame, ErrorCode, SendStatus, ServerFrame};
use reqwest::Method;
use serde_json::{json, Value};
use sqlx::Executor;

async fn node_on(db: &MysqlDb, configure: impl FnOnce(&mut imgate::Settings)) -> TestNode {
    let url = db.url.clone();
    TestNode::start_with(move |s| {
        s.store.url = Secret::new(url);
        configure(s);
    })
    .await
}

fn receipt(frame: &ServerFrame) -> (Option<String>, SendStatus) {
    match frame {
        ServerFrame::SendResult { id, status, .. } => (id.map(|i| i.to_string()), *status),
        other => panic!("expected send_result, got {other:?}"),
    }
}

#[tokio::test]
async fn messages_from_every_entry_point_are_stored_with_their_fields() {
    let db = MysqlDb::create().await;
    let node = node_on(&db, |_| {}).await;
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    let mut bob = node.login(&node.ws(), "bob", "web").await;

    // TCP → online WebSocket user; the body is kept byte for byte.
    let body = r#"{"text":"héllo","n":2.50}"#;
    alice
        .send(ClientFrame::Send {
            to: "bob".into(),
            channel: Some("web".into()),
            client_msg_id: "a-1".into(),
            body: Body::from_json(body).unwrap(),
            retry: false,
        })
        .await;
    let (id1, status) = receipt(&alice.recv().await.unwrap());
    assert_eq!(status, SendStatus::Delivered);
    bob.recv_push().await;
    // WebSocket → nobody online.
    let (id2, status) = receipt(&bob.send_text("carol", "are you there?").await);
    assert_eq!(status, SendStatus::Stored);
    // Admin API, a system message.
    let (code, reply) = node
        .admin_json(
            Method::POST,
            "/api/v1/messages",
            Some(json!({"to": "alice", "body": [1, "two"], "client_msg_id": "ops-7"})),
        )
        .await;
    assert_eq!(code, 200, "{reply}");
    let id3 = reply["results"][0]["id"].as_str().unwrap().to_owned();

    let get = |id: String| {
        let node = &node;
        async move {
            node.admin_json(Method::GET, &format!("/api/v1/messages/{id}"), None)
                .await
        }
    };
    let (code, m) = get(id1.clone().unwrap()).await;
    assert_eq!(code, 200);
    assert_eq!(m["sender"], "alice");
    assert_eq!(m["recipient"], "bob");
    assert_eq!(m["channel"], "web");
    assert_eq!(m["client_msg_id"], "a-1");
    assert_eq!(m["state"], "delivered");
    assert!(m["created_at_ms"].as_u64().unwrap() > 1_700_000_000_000);
    let (_, m2) = get(id2.unwrap()).await;
    assert_eq!(
        (
            m2["sender"].as_str(),
            m2["recipient"].as_str(),
            m2["state"].as_str()
        ),
        (Some("bob"), Some("carol"), Some("pending"))
    );
    assert_eq!(m2["channel"], Value::Null);
    let (_, m3) = get(id3).await;
    assert_eq!(
        (
            m3["sender"].clone(),
            m3["body"].clone(),
            m3["client_msg_id"].as_str()
        ),
        (Value::Null, json!([1, "two"]), Some("ops-7"))
    );

    // Byte for byte in the database itself.
    let mut c = db.connect().await;
    let stored: Vec<u8> =
        sqlx::query_scalar("SELECT body FROM messages WHERE client_msg_id = 'a-1'")
            .fetch_one(&mut c)
            .await
            .unwrap();
    assert_eq!(String::from_utf8(stored).unwrap(), body);
    assert_eq!(db.count().await, 3);
    let (code, _) = node
        .admin_json(Method::GET, "/api/v1/messages/12345", None)
        .await;
    assert_eq!(code, 404);
    let (code, _) = node
        .admin_json(Method::GET, "/api/v1/messages/abc", None)
        .await;
    assert_eq!(code, 400);
    node.stop().await;
    db.drop_database().await;
}

/// Waits (bounded) until the store's writer is blocked on the table lock.
async fn writer_waits_for_lock(db: &MysqlDb) {
    let mut c = db.connect().await;
    for _ in 0..1_000 {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM information_schema.processlist WHERE db = DATABASE() AND info LIKE 'INSERT%messages%'",
        )
        .fetch_one(&mut c)
        .await
        .unwrap();
        if n > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the writer never reached the database");
}

#[tokio::test]
async fn the_receipt_waits_for_the_commit() {
    let db = MysqlDb::create().await;
    let node = node_on(&db, |_| {}).await;
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    let mut bob = node.login(&node.tcp(), "bob", "app").await;

    let mut lock = lock_messages(&db, "WRITE").await;
    alice
        .send(ClientFrame::Send {
            to: "bob".into(),
            channel: None,
            client_msg_id: "m".into(),
            body: Body::from_value(&"x").unwrap(),
            retry: false,
        })
        .await;
    // Delivery does not wait for the database...
    bob.recv_push().await;
    // ...but the receipt does: the writer is stuck on the lock and nothing has been answered.
    writer_waits_for_lock(&db).await;
    let early = tokio::time::timeout(Duration::from_millis(200), async {
        loop {
            match alice.conn.recv().await {
                Ok(Some(ServerFrame::CaughtUp { .. })) => continue,
                other => break other,
            }
        }
    })
    .await;
    assert!(early.is_err(), "a receipt before the commit: {early:?}");
    lock.execute("UNLOCK TABLES").await.unwrap();
    let (id, status) = receipt(&alice.recv().await.unwrap());
    assert_eq!(status, SendStatus::Delivered);
    let mut c = db.connect().await;
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM messages WHERE id = ?")
        .bind(id.unwrap().parse::<i64>().unwrap())
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(n, 1);
    node.stop().await;
    db.drop_database().await;
}

#[tokio::test]
async fn a_repeated_client_message_id_is_stored_once_across_reconnects() {
    let db = MysqlDb::create().await;
    let node = node_on(&db, |_| {}).await;
    let frame = || ClientFrame::Send {
        to: "bob".into(),
        channel: None,
        client_msg_id: "retry-me".into(),
        body: Body::from_value(&"once").unwrap(),
        retry: false,
    };
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    alice.send(frame()).await;
    let (first, status) = receipt(&alice.recv().await.unwrap());
    assert_eq!(status, SendStatus::Stored);
    drop(alice);
    let mut alice = node.login(&node.ws(), "alice", "web").await;
    alice.send(frame()).await;
    let (second, _) = receipt(&alice.recv().await.unwrap());
    assert_eq!(first, second, "the same id in both receipts");
    assert_eq!(db.count().await, 1);
    // Through the admin API too.
    let body = json!({"to": "bob", "body": 1, "client_msg_id": "ops", "from": "alice"});
    let (_, a) = node
        .admin_json(Method::POST, "/api/v1/messages", Some(body.clone()))
        .await;
    let (_, b) = node
        .admin_json(Method::POST, "/api/v1/messages", Some(body))
        .await;
    assert_eq!(a["results"][0]["id"], b["results"][0]["id"]);
    assert_eq!(db.count().await, 2);
    let metrics = node.metrics().await;
    assert_eq!(
        common::metric_value(&metrics, "imgate_store_duplicates_total", &[]),
        2.0
    );
    node.stop().await;
    db.drop_database().await;
}

/// A send marked `retry` whose original is stored gets the original's id and outcome, and its
/// recipient is not pushed the message a second time; a retry with nothing stored is a new
/// message. The same through the admin API.
#[tokio::test]
async fn a_retry_is_answered_from_the_store_and_not_pushed_again() {
    let db = MysqlDb::create().await;
    let node = node_on(&db, |_| {}).await;
    let send = |to: &str, client_msg_id: &str, text: &str, retry: bool| ClientFrame::Send {
        to: to.into(),
        channel: None,
        client_msg_id: client_msg_id.into(),
        body: Body::from_value(&json!({ "text": text })).unwrap(),
        retry,
    };
    let result = |frame: Option<ServerFrame>| match frame {
        Some(ServerFrame::SendResult {
            id,
            status,
            connections,
            ..
        }) => (id.unwrap().to_string(), status, connections),
        other => panic!("expected send_result, got {other:?}"),
    };
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    let mut bob = node.login(&node.tcp(), "bob", "app").await;

    // Delivered, then the receipt is "lost" and alice retries.
    alice.send(send("bob", "m-1", "first", false)).await;
    let (first, status, _) = result(alice.recv_skip_acks().await);
    assert_eq!(status, SendStatus::Delivered);
    assert_eq!(bob.recv_push().await.2["text"], "first");
    alice.send(send("bob", "m-1", "first", true)).await;
    assert_eq!(
        result(alice.recv_skip_acks().await),
        (first.clone(), SendStatus::Delivered, 0),
        "the original's id and outcome; no connection reached this time"
    );
    // A retry of something never stored is a new message.
    alice.send(send("bob", "m-2", "second", true)).await;
    let (second, status, connections) = result(alice.recv_skip_acks().await);
    assert_ne!(second, first);
    assert_eq!((status, connections), (SendStatus::Delivered, 1));
    // bob's next push is "second": "first" was not pushed again.
    assert_eq!(bob.recv_push().await.2["text"], "second");

    // An offline recipient: the retry reports the original's "stored".
    alice.send(send("carol", "m-3", "for carol", false)).await;
    let (third, status, _) = result(alice.recv_skip_acks().await);
    assert_eq!(status, SendStatus::Stored);
    alice.send(send("carol", "m-3", "for carol", true)).await;
    assert_eq!(
        result(alice.recv_skip_acks().await),
        (third, SendStatus::Stored, 0)
    );

    // The admin API: a retry without client_msg_id is refused; with it, answered from the store.
    let post = |body: serde_json::Value| {
        let node = &node;
        async move {
            node.admin_json(Method::POST, "/api/v1/messages", Some(body))
                .await
        }
    };
    let (code, _) = post(json!({"to": "bob", "body": 1, "retry": true})).await;
    assert_eq!(code, 400);
    let ops = json!({"to": "bob", "body": {"text": "ops"}, "client_msg_id": "ops-1"});
    let (_, a) = post(ops.clone()).await;
    assert_eq!(bob.recv_push().await.2["text"], "ops");
    let mut again = ops;
    again["retry"] = json!(true);
    let (code, b) = post(again).await;
    assert_eq!(code, 200, "{b}");
    assert_eq!(a["results"][0]["id"], b["results"][0]["id"]);
    assert_eq!(b["results"][0]["status"], "delivered");
    assert_eq!(b["results"][0]["connections"], 0);
    alice.send(send("bob", "m-4", "last", false)).await;
    result(alice.recv_skip_acks().await);
    assert_eq!(
        bob.recv_push().await.2["text"],
        "last",
        "no second ops push"
    );

    assert_eq!(db.count().await, 5);
    let metrics = node.metrics().await;
    assert_eq!(
        common::metric_value(&metrics, "imgate_messages_total", &["outcome=\"repeated\""]),
        3.0
    );
    node.stop().await;
    db.drop_database().await;
}

#[tokio::test]
async fn the_history_api_pages_are_complete_and_newest_first() {
    let db = MysqlDb::create().await;
    let node = node_on(&db, |_| {}).await;
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    let mut bob = node.login(&node.tcp(), "bob", "app").await;
    let mut sent = Vec::new();
    for i in 0..60 {
        let (id, _) = receipt(&alice.send_text("bob", &format!("a{i}")).await);
        sent.push(id.unwrap());
        let (id, _) = receipt(&bob.send_text("alice", &format!("b{i}")).await);
        sent.push(id.unwrap());
        receipt(&alice.send_text("carol", "noise").await);
    }
    let mut pages = 0;
    let mut seen: Vec<String> = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let mut path = "/api/v1/users/alice/messages?peer=bob&limit=25".to_owned();
        if let Some(b) = &before {
            path.push_str(&format!("&before={b}"));
        }
        let (code, page) = node.admin_json(Method::GET, &path, None).await;
        assert_eq!(code, 200, "{page}");
        pages += 1;
        for m in page["messages"].as_array().unwrap() {
            let peer_pair = (
                m["sender"].as_str().unwrap(),
                m["recipient"].as_str().unwrap(),
            );
            assert!(
                peer_pair == ("alice", "bob") || peer_pair == ("bob", "alice"),
                "{m}"
            );
            seen.push(m["id"].as_str().unwrap().to_owned());
        }
        match page["next_before"].as_str() {
            Some(b) => before = Some(b.to_owned()),
            None => break,
        }
        assert!(pages < 20);
    }
    let mut expected = sent.clone();
    expected.reverse();
    assert_eq!(seen, expected, "every message once, newest first");
    let (_, all) = node
        .admin_json(Method::GET, "/api/v1/users/alice/messages?limit=1000", None)
        .await;
    assert_eq!(all["messages"].as_array().unwrap().len(), 180);
    assert!(all.get("next_before").is_none());
    let (code, _) = node
        .admin_json(Method::GET, "/api/v1/users/alice/messages?limit=0", None)
        .await;
    assert_eq!(code, 400);
    node.stop().await;
    db.drop_database().await;
}

/// Sends one message from `sender` to `to` and waits for its receipt: afterwards the node knows
/// `to`'s stream position without reading the database (a stalled database then delays or
/// refuses messages at the writer, which is what these tests are about).
async fn warm_up(sender: &mut common::Client, to: &str) {
    let (_, status) = receipt(&sender.send_text(to, "warm-up").await);
    assert_eq!(status, SendStatus::Stored);
}

/// A `send` to bob with a JSON body.
fn to_bob(client_msg_id: String, body: impl serde::Serialize) -> ClientFrame {
    ClientFrame::Send {
        to: "bob".into(),
        channel: None,
        client_msg_id,
        body: Body::from_value(&body).unwrap(),
        retry: false,
    }
}

/// A connection of the test's own holding `LOCK TABLES messages <mode>` (`READ`: the node's
/// writes wait and its reads go on; `WRITE`: both wait).
async fn lock_messages(db: &MysqlDb, mode: &str) -> sqlx::MySqlConnection {
    let mut lock = db.connect().await;
    lock.execute(&*format!("LOCK TABLES messages {mode}"))
        .await
        .unwrap();
    lock
}

/// Waits (bounded) until `metric` (with `labels`) reaches at least `value`.
async fn metric_reaches(node: &TestNode, metric: &str, labels: &[&str], value: f64) {
    for _ in 0..2_000 {
        if common::metric_value(&node.metrics().await, metric, labels) >= value {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{metric} never reached {value}");
}

#[tokio::test]
async fn graceful_shutdown_writes_everything_queued() {
    let db = MysqlDb::create().await;
    let node = node_on(&db, |_| {}).await;
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    warm_up(&mut alice, "bob").await;
    let mut lock = lock_messages(&db, "WRITE").await;
    for i in 0..50 {
        alice.send(to_bob(format!("q{i}"), i)).await;
    }
    // Once the node has read all 50, each is in a task that shutdown waits for; the writer is
    // stuck on the lock, so nothing is written yet.
    metric_reaches(&node, "imgate_frames_in_total", &["cmd=\"send\""], 51.0).await;
    writer_waits_for_lock(&db).await;
    node.shutdown.cancel();
    // Clients are kicked at once; the node waits for its writer.
    let frames = alice.until_closed().await;
    assert!(
        frames.iter().any(|f| matches!(f, ServerFrame::Kick { .. })),
        "{frames:?}"
    );
    lock.execute("UNLOCK TABLES").await.unwrap();
    tokio::time::timeout(common::WAIT, node.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(db.count().await, 51);
    db.drop_database().await;
}

#[tokio::test]
async fn a_stalled_database_delays_or_refuses_but_loses_nothing() {
    let db = MysqlDb::create().await;
    let node = node_on(&db, |s| {
        s.store.queue_capacity = 20;
        s.store.enqueue_timeout_ms = 200;
        s.store.batch_max_rows = 5;
    })
    .await;
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    warm_up(&mut alice, "bob").await;
    let mut lock = lock_messages(&db, "WRITE").await;
    const SENT: usize = 60;
    for i in 0..SENT {
        alice.send(to_bob(format!("s{i}"), i)).await;
    }
    // At most 25 fit (20 queued, 5 in the writer's blocked batch); the rest are refused after
    // waiting 200 ms for room. Receipts come back in send order, so they wait for the lock too.
    metric_reaches(
        &node,
        "imgate_store_refused_total",
        &["reason=\"overloaded\""],
        (SENT - 25) as f64,
    )
    .await;
    lock.execute("UNLOCK TABLES").await.unwrap();
    let mut refused = HashSet::new();
    let mut stored = HashSet::new();
    for _ in 0..SENT {
        match alice.recv().await.unwrap() {
            ServerFrame::SendResult {
                client_msg_id,
                status,
                reason,
                ..
            } => {
                match status {
                    SendStatus::Stored => stored.insert(client_msg_id),
                    SendStatus::Refused => {
                        assert_eq!(reason, Some(ErrorCode::Unavailable));
                        refused.insert(client_msg_id)
                    }
                    other => panic!("{other:?}"),
                };
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        stored.len() + refused.len(),
        SENT,
        "every message accounted for"
    );
    assert!(
        stored.len() >= 20,
        "the queued ones are stored after the stall: {}",
        stored.len()
    );
    assert_eq!(
        db.count().await as usize,
        stored.len() + 1,
        "and the warm-up"
    );
    let metrics = node.metrics().await;
    assert_eq!(
        common::metric_value(
            &metrics,
            "imgate_store_refused_total",
            &["reason=\"overloaded\""]
        ) as usize,
        refused.len()
    );
    // The connection was never at risk: still answering.
    alice.send(ClientFrame::Heartbeat {}).await;
    assert!(matches!(
        alice.recv().await,
        Some(ServerFrame::HeartbeatAck { .. })
    ));
    node.stop().await;
    db.drop_database().await;
}

/// The next push of `c`: (seq, body).
async fn next_seq_push(c: &mut common::Client) -> (u64, Value) {
    loop {
        match c.recv().await {
            Some(ServerFrame::Push { seq, body, .. }) => {
                return (seq.expect("a stream push"), body.parse().unwrap())
            }
            Some(ServerFrame::CaughtUp { .. }) => continue,
            other => panic!("expected a push, got {other:?}"),
        }
    }
}

/// A device that logs in while an earlier position of its stream is still uncommitted waits
/// for it, however long the write takes: the position is held by the node whose write is
/// pending, so it is never skipped as "never stored". (Before, it was skipped after
/// `delivery.hole_timeout_ms`, and the message, committed later and confirmed to its sender,
/// never reached the device.)
#[tokio::test]
async fn a_position_whose_commit_is_slow_is_waited_for_not_skipped() {
    let db = MysqlDb::create().await;
    // Missing positions are looked up every 20 ms: a skip by time would come at once.
    let node = node_on(&db, |s| s.delivery.gap_timeout_ms = 20).await;
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    warm_up(&mut alice, "bob").await;
    let mut bob = node.login(&node.tcp(), "bob", "app").await;
    assert_eq!(next_seq_push(&mut bob).await.0, 1);
    bob.send(ClientFrame::Ack {
        seq: Some(1),
        id: None,
    })
    .await;

    // Writes wait; reads go on.
    let mut lock = lock_messages(&db, "READ").await;
    let send = |n: u64| to_bob(format!("slow-{n}"), json!({ "n": n }));
    alice.send(send(2)).await;
    // Pushed before its commit; the device goes away before acknowledging it.
    assert_eq!(next_seq_push(&mut bob).await.0, 2);
    drop(bob);
    writer_waits_for_lock(&db).await;
    // Back on the same device: the database knows nothing after 1.
    let mut bob = node.login(&node.tcp(), "bob", "app").await;
    // 3 arrives live; 2 is missing, and looked up again and again while its write waits.
    alice.send(send(3)).await;
    metric_reaches(
        &node,
        "imgate_delivery_hole_checks_total",
        &["outcome=\"held\""],
        5.0,
    )
    .await;
    lock.execute("UNLOCK TABLES").await.unwrap();
    // Both commit; both receipts come; the device gets 2, then 3.
    for _ in 0..2 {
        let frame = alice.recv().await.unwrap();
        assert!(
            matches!(
                frame,
                ServerFrame::SendResult {
                    status: SendStatus::Delivered,
                    ..
                }
            ),
            "{frame:?}"
        );
    }
    assert_eq!(next_seq_push(&mut bob).await, (2, json!({"n": 2})));
    assert_eq!(next_seq_push(&mut bob).await, (3, json!({"n": 3})));
    let metrics = node.metrics().await;
    assert_eq!(
        common::metric_value(&metrics, "imgate_delivery_holes_skipped_total", &[]),
        0.0
    );
    node.stop().await;
    db.drop_database().await;
}

/// A connection with many sends unanswered (the database is stalled) is still read: its
/// heartbeats are answered at once, and sends beyond 128 unanswered are refused at once with
/// a retry hint instead of stopping the reading. The 128 are stored once the stall ends.
#[tokio::test]
async fn a_connection_with_many_sends_unanswered_is_still_read() {
    let db = MysqlDb::create().await;
    let node = node_on(&db, |_| {}).await;
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    warm_up(&mut alice, "bob").await;
    let mut lock = lock_messages(&db, "WRITE").await;
    for i in 0..138 {
        alice.send(to_bob(format!("burst-{i}"), i)).await;
    }
    alice.send(ClientFrame::Heartbeat {}).await;
    // The last 10 are refused at once, in order; then the heartbeat is answered, while the
    // first 128 still wait for the database.
    for i in 128..138 {
        match alice.recv().await {
            Some(ServerFrame::SendResult {
                client_msg_id,
                status: SendStatus::Refused,
                reason: Some(ErrorCode::RateLimited),
                retry_after_ms: Some(hint),
                ..
            }) => {
                assert_eq!(client_msg_id, format!("burst-{i}"));
                assert!(hint > 0);
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    assert!(
        matches!(alice.recv().await, Some(ServerFrame::HeartbeatAck { .. })),
        "the heartbeat is read and answered behind 128 unanswered sends"
    );
    lock.execute("UNLOCK TABLES").await.unwrap();
    for i in 0..128 {
        match alice.recv().await {
            Some(ServerFrame::SendResult {
                client_msg_id,
                status: SendStatus::Stored,
                ..
            }) => assert_eq!(client_msg_id, format!("burst-{i}")),
            other => panic!("expected the receipt of burst-{i}, got {other:?}"),
        }
    }
    assert_eq!(db.count().await, 129);
    let metrics = node.metrics().await;
    assert_eq!(
        common::metric_value(
            &metrics,
            "imgate_rate_limited_total",
            &["limit=\"backlog\""]
        ),
        10.0
    );
    node.stop().await;
    db.drop_database().await;
}

/// A database slower than the messages: once the oldest message not yet committed has waited
/// longer than `store.max_queue_age_ms`, new messages are refused at once (`UNAVAILABLE`)
/// instead of joining a queue whose receipts would all be late. What was queued is stored.
#[tokio::test]
async fn new_messages_are_refused_while_the_store_queue_is_too_old() {
    let db = MysqlDb::create().await;
    let node = node_on(&db, |s| s.store.max_queue_age_ms = 200).await;
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    warm_up(&mut alice, "bob").await;
    let mut lock = lock_messages(&db, "READ").await;
    let send = |n: u32| to_bob(format!("old-{n}"), n);
    alice.send(send(1)).await;
    writer_waits_for_lock(&db).await;
    metric_reaches(&node, "imgate_store_queue_age_seconds", &[], 0.2).await;
    // From another connection (receipts of one connection come in the order of its sends).
    let mut carol = node.login(&node.tcp(), "carol", "app").await;
    carol.send(send(2)).await;
    match carol.recv().await {
        Some(ServerFrame::SendResult {
            client_msg_id,
            status: SendStatus::Refused,
            reason: Some(ErrorCode::Unavailable),
            ..
        }) => assert_eq!(client_msg_id, "old-2"),
        other => panic!("expected an immediate refusal, got {other:?}"),
    }
    lock.execute("UNLOCK TABLES").await.unwrap();
    let (_, status) = receipt(&alice.recv().await.unwrap());
    assert_eq!(status, SendStatus::Stored, "the queued message is stored");
    let (_, status) = receipt(&alice.send_text("bob", "after").await);
    assert_eq!(
        status,
        SendStatus::Stored,
        "taken again once the queue is young"
    );
    let metrics = node.metrics().await;
    assert_eq!(
        common::metric_value(
            &metrics,
            "imgate_store_refused_total",
            &["reason=\"queue_age\""]
        ),
        1.0
    );
    node.stop().await;
    db.drop_database().await;
}

/// `client.max_unanswered_sends` bounds the sends the node holds unanswered over all its
/// connections: while commits wait on a lock, sends beyond it are refused at once with
/// UNAVAILABLE and a retry hint, nothing of them is stored, and the slots come back once the
/// held sends are answered.
#[tokio::test]
async fn sends_beyond_the_node_bound_are_refused_at_once_and_slots_come_back() {
    let db = MysqlDb::create().await;
    let node = node_on(&db, |s| s.client.max_unanswered_sends = 4).await;
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    let mut carol = node.login(&node.tcp(), "carol", "app").await;
    warm_up(&mut alice, "bob").await;
    let mut lock = lock_messages(&db, "READ").await;
    // Three from alice, three from carol: two connections share the node's four slots.
    for i in 0..3 {
        alice.send(to_bob(format!("a{i}"), i)).await;
        carol.send(to_bob(format!("c{i}"), i)).await;
    }
    metric_reaches(&node, "imgate_sends_shed_total", &[], 2.0).await;
    let metrics = node.metrics().await;
    assert_eq!(
        common::metric_value(&metrics, "imgate_sends_shed_total", &[]),
        2.0
    );
    assert_eq!(
        common::metric_value(&metrics, "imgate_unanswered_sends", &[]),
        4.0
    );

    lock.execute("UNLOCK TABLES").await.unwrap();
    let (mut refused, mut stored) = (0, 0);
    for client in [&mut alice, &mut carol] {
        for _ in 0..3 {
            match client.recv().await {
                Some(ServerFrame::SendResult {
                    status: SendStatus::Refused,
                    reason: Some(ErrorCode::Unavailable),
                    retry_after_ms: Some(100),
                    ..
                }) => refused += 1,
                Some(ServerFrame::SendResult {
                    status: SendStatus::Stored,
                    ..
                }) => stored += 1,
                other => panic!("expected a receipt, got {other:?}"),
            }
        }
    }
    assert_eq!((refused, stored), (2, 4));
    // 1 warm-up + the 4 taken; none of the refused.
    assert_eq!(db.count().await, 5);
    // A slot is released before its receipt leaves the node.
    assert_eq!(
        common::metric_value(&node.metrics().await, "imgate_unanswered_sends", &[]),
        0.0
    );
    warm_up(&mut alice, "bob").await;
    node.stop().await;
    db.drop_database().await;
}
