//! Three gateway nodes on the real Redis (a key prefix of their own) and MariaDB (a fresh
//! database): users on different nodes talk as if on one node, in both routing modes; duplicate
//! logins are resolved cluster-wide; presence, the node list and alloc cover every node and heal
//! when a node crashes; broadcasts reach every node once.

mod common;

use common::{cluster_settings, eventually, random_prefix, IsolatedNode, MysqlDb};
use imgate::config::RoutingMode;
use imgate_loadtest::fault::PrivateRedis;
use imgate_shared::{ClientFrame, KickReason, SendStatus, ServerFrame};
use reqwest::Method;
use serde_json::{json, Value};

async fn start_cluster(n: usize, routing: RoutingMode, db: &MysqlDb) -> Vec<IsolatedNode> {
    let prefix = random_prefix();
    let mut nodes = Vec::new();
    for i in 1..=n {
        let (prefix, url) = (prefix.clone(), db.url.clone());
        nodes.push(
            IsolatedNode::start_with(move |s| cluster_settings(s, i, &prefix, &url, routing)).await,
        );
    }
    nodes
}

async fn stop_all(nodes: Vec<IsolatedNode>) {
    for n in nodes {
        n.stop().await;
    }
}

fn status(frame: &ServerFrame) -> (SendStatus, u32) {
    match frame {
        ServerFrame::SendResult {
            status,
            connections,
            ..
        } => (*status, *connections),
        other => panic!("expected send_result, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_on_different_nodes_talk_in_both_routing_modes() {
    for routing in [RoutingMode::Broadcast, RoutingMode::Routed] {
        let db = MysqlDb::create().await;
        let nodes = start_cluster(3, routing, &db).await;
        let mut alice = nodes[0].login(&nodes[0].tcp(), "alice", "app").await;
        let mut bob = nodes[2].login(&nodes[2].ws(), "bob", "web").await;
        assert_eq!(
            status(&alice.send_text("bob", "over tcp").await),
            (SendStatus::Delivered, 1),
            "{routing:?}"
        );
        let (from, to, body) = bob.recv_push().await;
        assert_eq!(
            (from.as_deref(), to.as_str(), body),
            (Some("alice"), "bob", json!({"text": "over tcp"}))
        );
        assert_eq!(
            status(&bob.send_text("alice", "over ws").await),
            (SendStatus::Delivered, 1)
        );
        assert_eq!(alice.recv_push().await.2, json!({"text": "over ws"}));
        // Nobody anywhere: stored, on whichever node.
        assert_eq!(
            status(&alice.send_text("nobody", "hello?").await),
            (SendStatus::Stored, 0)
        );
        // Two channel types of one user on two nodes: both receive. The app is a new device:
        // it first gets what bob was sent before (replayed from the store).
        let mut bob_app = nodes[1].login(&nodes[1].tcp(), "bob", "app").await;
        assert_eq!(bob_app.recv_push().await.2, json!({"text": "over tcp"}));
        assert_eq!(
            status(&alice.send_text("bob", "both").await),
            (SendStatus::Delivered, 2)
        );
        assert_eq!(bob.recv_push().await.2, json!({"text": "both"}));
        assert_eq!(bob_app.recv_push().await.2, json!({"text": "both"}));
        // The admin API of a third node reaches users elsewhere.
        let (code, reply) = nodes[1]
            .admin_json(
                Method::POST,
                "/api/v1/messages",
                Some(json!({"to": "alice", "body": "from node 2"})),
            )
            .await;
        assert_eq!(
            (code, reply["results"][0]["status"].as_str()),
            (200, Some("delivered"))
        );
        assert_eq!(alice.recv_push().await.2, json!("from node 2"));
        assert_eq!(db.count().await, 5, "every message stored once");
        stop_all(nodes).await;
        db.drop_database().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_on_another_node_kicks_the_older_connection_and_never_the_newer() {
    let db = MysqlDb::create().await;
    let nodes = start_cluster(2, RoutingMode::Routed, &db).await;
    let mut old = nodes[0].login(&nodes[0].tcp(), "bob", "app").await;
    let mut new = nodes[1].login(&nodes[1].tcp(), "bob", "app").await;
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
    new.send(ClientFrame::Heartbeat {}).await;
    assert!(
        matches!(new.recv().await, Some(ServerFrame::HeartbeatAck { .. })),
        "the newer one stays"
    );

    // Racing logins: whichever Redis orders last wins; exactly one survives each round.
    for round in 0..10 {
        let user = format!("racer-{round}");
        let (at_a, at_b) = (nodes[0].tcp(), nodes[1].ws());
        let (a, b) = tokio::join!(
            nodes[0].login(&at_a, &user, "app"),
            nodes[1].login(&at_b, &user, "app")
        );
        let mut clients = [a, b];
        // The loser is kicked; the winner keeps answering.
        let mut survivors = 0;
        for c in clients.iter_mut() {
            c.send(ClientFrame::Heartbeat {}).await;
            match c.recv().await {
                Some(ServerFrame::HeartbeatAck { .. }) => survivors += 1,
                Some(ServerFrame::Kick {
                    reason: KickReason::DuplicateLogin,
                    ..
                })
                | None => {}
                other => panic!("{other:?}"),
            }
        }
        // A kick may land after the heartbeat was answered: presence is the arbiter.
        let (_, p) = nodes[0]
            .admin_json(Method::GET, &format!("/api/v1/users/{user}/presence"), None)
            .await;
        let n = p["connections"].as_array().unwrap().len();
        eventually("one connection left in presence", || async {
            let (_, p) = nodes[1]
                .admin_json(Method::GET, &format!("/api/v1/users/{user}/presence"), None)
                .await;
            p["connections"].as_array().unwrap().len() == 1
        })
        .await;
        assert!(survivors >= 1 && n >= 1, "round {round}: nobody survived");
    }
    stop_all(nodes).await;
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_nodes_and_alloc_cover_the_cluster_and_heal_after_a_crash() {
    let db = MysqlDb::create().await;
    let mut nodes = start_cluster(3, RoutingMode::Routed, &db).await;
    let _a = nodes[0].login(&nodes[0].tcp(), "carol", "app").await;
    let _b = nodes[1].login(&nodes[1].ws(), "carol", "web").await;
    let mut c = nodes[2].login(&nodes[2].tcp(), "carol", "pc").await;

    let (code, p) = nodes[0]
        .admin_json(Method::GET, "/api/v1/users/carol/presence", None)
        .await;
    assert_eq!(code, 200);
    let mut where_: Vec<(String, String)> = p["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["node_id"].as_str().unwrap().into(),
                e["channel"].as_str().unwrap().into(),
            )
        })
        .collect();
    where_.sort();
    assert_eq!(
        where_,
        vec![
            ("node-1".into(), "app".into()),
            ("node-2".into(), "web".into()),
            ("node-3".into(), "pc".into())
        ]
    );

    let (code, n) = nodes[1]
        .admin_json(Method::GET, "/api/v1/nodes", None)
        .await;
    assert_eq!(code, 200);
    assert_eq!(n["nodes"].as_array().unwrap().len(), 3);
    // alloc is public and lists client addresses, least loaded first.
    let alloc: Value = nodes[0]
        .http
        .get(nodes[0].url("/api/v1/alloc"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed: Vec<&str> = alloc["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["client_addr"].as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), 3);
    assert!(
        listed.contains(&nodes[2].client_addr.to_string().as_str()),
        "{alloc}"
    );
    assert!(alloc["heartbeat"]["default_ms"].is_u64() && alloc["reconnect"]["max_ms"].is_u64());

    // Node 3 crashes: no KICK, no goodbye. Its client sees the socket close...
    let crashed = nodes.pop().unwrap();
    crashed.crash();
    assert!(c.until_closed().await.is_empty());
    // ...and within the TTL it is gone from the node list, alloc and presence.
    eventually("node-3 gone from /nodes", || async {
        let (_, n) = nodes[0]
            .admin_json(Method::GET, "/api/v1/nodes", None)
            .await;
        n["nodes"].as_array().map(|a| a.len()) == Some(2)
    })
    .await;
    let alloc: Value = nodes[1]
        .http
        .get(nodes[1].url("/api/v1/alloc"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(alloc["nodes"].as_array().unwrap().len(), 2);
    let (_, p) = nodes[1]
        .admin_json(Method::GET, "/api/v1/users/carol/presence", None)
        .await;
    assert_eq!(p["connections"].as_array().unwrap().len(), 2, "{p}");
    stop_all(nodes).await;
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_and_kick_through_one_node_reach_all() {
    let db = MysqlDb::create().await;
    let nodes = start_cluster(3, RoutingMode::Routed, &db).await;
    let mut clients = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        clients.push(node.login(&node.tcp(), &format!("user-{i}"), "app").await);
    }
    let (code, reply) = nodes[1]
        .admin_json(
            Method::POST,
            "/api/v1/broadcast",
            Some(json!({"body": {"notice": "hi all"}})),
        )
        .await;
    assert_eq!((code, reply["connections"].as_u64()), (200, Some(3)));
    for c in clients.iter_mut() {
        assert_eq!(c.recv_push().await.2, json!({"notice": "hi all"}));
    }
    // Exactly once each: the next frame after a heartbeat is its ack.
    for c in clients.iter_mut() {
        c.send(ClientFrame::Heartbeat {}).await;
        assert!(matches!(
            c.recv().await,
            Some(ServerFrame::HeartbeatAck { .. })
        ));
    }
    let (_, k) = nodes[0]
        .admin_json(Method::DELETE, "/api/v1/users/user-2/connections", None)
        .await;
    assert_eq!(k["kicked"], 1);
    let frames = clients[2].until_closed().await;
    assert!(
        matches!(
            frames.as_slice(),
            [ServerFrame::Kick {
                reason: KickReason::Admin,
                ..
            }]
        ),
        "{frames:?}"
    );
    stop_all(nodes).await;
    db.drop_database().await;
}

/// Two routed nodes on a Redis of the test's own and `db`, under a fresh key prefix.
async fn two_nodes_on(
    redis: &PrivateRedis,
    db: &MysqlDb,
    configure: fn(&mut imgate::Settings),
) -> Vec<IsolatedNode> {
    let prefix = random_prefix();
    let mut nodes = Vec::new();
    for i in 1..=2 {
        let (prefix, url, redis_url) = (prefix.clone(), db.url.clone(), redis.url());
        nodes.push(
            IsolatedNode::start_with(move |s| {
                cluster_settings(s, i, &prefix, &url, RoutingMode::Routed);
                s.cluster.redis_url = Some(imgate::config::Secret::new(redis_url));
                configure(s);
            })
            .await,
        );
    }
    nodes
}

async fn ready(node: &IsolatedNode) -> bool {
    node.http
        .get(node.url("/readyz"))
        .send()
        .await
        .map(|r| r.status() == 200)
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_loses_nothing() {
    let mut redis = PrivateRedis::start().await;
    let db = MysqlDb::create().await;
    let nodes = two_nodes_on(&redis, &db, |s| s.cluster.request_timeout_ms = 500).await;
    let mut alice = nodes[0].login(&nodes[0].tcp(), "alice", "app").await;
    let mut carol = nodes[0].login(&nodes[0].tcp(), "carol", "app").await;
    let mut bob = nodes[1].login(&nodes[1].tcp(), "bob", "app").await;
    assert_eq!(
        status(&alice.send_text("bob", "before").await),
        (SendStatus::Delivered, 1)
    );
    bob.recv_push().await;

    redis.kill();
    eventually("node 1 reports not ready", || async {
        !ready(&nodes[0]).await
    })
    .await;
    let (_, r) = nodes[0].admin_json(Method::GET, "/readyz", None).await;
    assert_eq!(r["reason"], "cluster bus down");
    // Without Redis no message can take its position in its recipient's stream: sends are
    // refused (the sender knows; nothing is half-delivered), local ones included.
    for (sender, to) in [(&mut carol, "alice"), (&mut alice, "bob")] {
        match sender.send_text(to, "during").await {
            ServerFrame::SendResult {
                status, id, reason, ..
            } => assert_eq!(
                (status, id, reason),
                (
                    SendStatus::Refused,
                    None,
                    Some(imgate_shared::ErrorCode::Unavailable)
                )
            ),
            other => panic!("{other:?}"),
        }
    }

    redis.restart().await.unwrap();
    for node in &nodes {
        eventually("ready again", || async { ready(node).await }).await;
    }
    // Presence was re-registered: node 1 finds bob on node 2 again.
    eventually("cross-node delivery again", || async {
        let (_, p) = nodes[0]
            .admin_json(Method::GET, "/api/v1/users/bob/presence", None)
            .await;
        p["connections"].as_array().is_some_and(|c| c.len() == 1)
    })
    .await;
    assert_eq!(
        status(&alice.send_text("bob", "after").await),
        (SendStatus::Delivered, 1)
    );
    // The restarted Redis lost every stream counter and the stream epoch: the nodes start
    // epoch 1, whose positions begin above 2^32, so that no position taken before the restart
    // (a message still being written, say) is ever handed out again. bob's connection skips
    // the positions in between once no node holds one of them.
    const EPOCH_1: i64 = 1 << 32;
    match bob.recv_skip_acks().await {
        Some(ServerFrame::Push { seq, body, .. }) => assert_eq!(
            (seq, body.get()),
            (Some(EPOCH_1 as u64 + 1), r#"{"text":"after"}"#)
        ),
        other => panic!("{other:?}"),
    }
    // Every accepted message is in the store, and nothing else.
    let mut c = db.connect().await;
    let states: Vec<(Vec<u8>, i8, i64)> =
        sqlx::query_as("SELECT body, state, seq FROM messages ORDER BY id")
            .fetch_all(&mut c)
            .await
            .unwrap();
    let states: Vec<(String, i8, i64)> = states
        .into_iter()
        .map(|(b, s, q)| (String::from_utf8(b).unwrap(), s, q))
        .collect();
    assert_eq!(
        states,
        vec![
            (r#"{"text":"before"}"#.into(), 1, 1),
            (r#"{"text":"after"}"#.into(), 1, EPOCH_1 + 1)
        ]
    );
    stop_all(nodes).await;
    db.drop_database().await;
}

/// Redis loses its data while a message is still being written: the stream counters restart,
/// and before, the next message took the position of the one in flight. The device already
/// held a push at that position and dropped the second message as a duplicate, although its
/// sender was told `delivered`. Now the positions after the loss belong to a new stream epoch,
/// above every position taken before it: both messages arrive, each once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_losing_its_data_while_a_write_is_in_flight_loses_nothing() {
    let redis = PrivateRedis::start().await;
    let db = MysqlDb::create().await;
    let nodes = two_nodes_on(&redis, &db, |s| s.delivery.gap_timeout_ms = 50).await;
    let mut alice = nodes[0].login(&nodes[0].tcp(), "alice", "app").await;
    let mut bob = nodes[1].login(&nodes[1].tcp(), "bob", "app").await;
    let send = |text: &str| ClientFrame::Send {
        to: "bob".into(),
        channel: None,
        client_msg_id: text.into(),
        body: imgate_shared::protocol::Body::from_value(&json!({ "text": text })).unwrap(),
        retry: false,
    };
    let push_of = |frame: Option<ServerFrame>| match frame {
        Some(ServerFrame::Push { seq, body, .. }) => (
            seq.unwrap(),
            body.get().parse::<Value>().unwrap()["text"].clone(),
        ),
        other => panic!("expected a push, got {other:?}"),
    };
    alice.send(send("one")).await;
    assert_eq!(
        status(&alice.recv().await.unwrap()).0,
        SendStatus::Delivered
    );
    assert_eq!(push_of(bob.recv_skip_acks().await), (1, json!("one")));

    // Writes wait (reads go on); "two" is pushed before its commit.
    use sqlx::Executor;
    let mut lock = db.connect().await;
    lock.execute("LOCK TABLES messages READ").await.unwrap();
    alice.send(send("two")).await;
    assert_eq!(push_of(bob.recv_skip_acks().await), (2, json!("two")));

    // Redis loses everything. The nodes register themselves and their connections again.
    let flusher =
        fred::prelude::Builder::from_config(fred::prelude::Config::from_url(&redis.url()).unwrap())
            .build()
            .unwrap();
    {
        use fred::prelude::ClientLike;
        flusher.init().await.unwrap();
        flusher.flushall::<()>(false).await.unwrap();
        let _ = flusher.quit().await;
    }
    eventually("bob's presence registered again", || async {
        let (_, p) = nodes[0]
            .admin_json(Method::GET, "/api/v1/users/bob/presence", None)
            .await;
        p["connections"].as_array().is_some_and(|c| c.len() == 1)
    })
    .await;

    alice.send(send("three")).await;
    const EPOCH_1: u64 = 1 << 32;
    assert_eq!(
        push_of(bob.recv_skip_acks().await),
        (EPOCH_1 + 1, json!("three")),
        "a position of the new epoch, pushed once no node holds the ones skipped"
    );
    lock.execute("UNLOCK TABLES").await.unwrap();
    for _ in 0..2 {
        assert_eq!(
            status(&alice.recv().await.unwrap()).0,
            SendStatus::Delivered
        );
    }
    let mut c = db.connect().await;
    let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as("SELECT seq, body FROM messages ORDER BY seq")
        .fetch_all(&mut c)
        .await
        .unwrap();
    let rows: Vec<(i64, String)> = rows
        .into_iter()
        .map(|(s, b)| (s, String::from_utf8(b).unwrap()))
        .collect();
    assert_eq!(
        rows,
        vec![
            (1, r#"{"text":"one"}"#.into()),
            (2, r#"{"text":"two"}"#.into()),
            (EPOCH_1 as i64 + 1, r#"{"text":"three"}"#.into()),
        ]
    );
    let metrics = nodes[0].metrics().await;
    assert_eq!(
        common::metric_value(&metrics, "imgate_stream_epoch", &[]),
        1.0
    );
    stop_all(nodes).await;
    db.drop_database().await;
}
