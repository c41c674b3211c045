//! The cluster layer against a real Redis (127.0.0.1:6379, or `TEST_REDIS_URL`): several
//! `Cluster`s in one process, each with a fake local node and its own node id, every test under its
//! own random key prefix. The Redis-restart test runs a private `redis-server` on a free port.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::prelude::{Builder, ClientLike, Config, KeysInterface, PubsubInterface};
use fred::types::CustomCommand;
use futures_util::TryStreamExt;
use imgate::base::Stamp;
use imgate::cluster::{
    Cluster, ClusterError, LocalConnection, LocalNode, RegisterOutcome, RemoteDelivery, Route,
};
use imgate::config::{DuplicateLoginPolicy, RoutingMode, Secret, Settings};
use imgate::ids::IdGenerator;
use imgate_loadtest::fault::PrivateRedis;
use imgate_shared::KickReason;

use common::{init_tracing, random_prefix, redis_url, wait_for};

const NODE_TTL_MS: u64 = 1_500;
const REFRESH_MS: u64 = 300;
/// Upper bound on waiting for something that should happen; generous for a loaded machine.
const WAIT: Duration = Duration::from_secs(15);

/// The stamp of the pushes these tests deliver (the cluster passes it through untouched).
const STAMP: Stamp = Stamp {
    id: imgate_shared::MessageId(1),
    seq: 1,
};

fn settings(url: &str, prefix: &str, node_id: &str, routing: RoutingMode) -> Settings {
    let mut s = Settings::default();
    s.node.id = node_id.into();
    s.client.advertise = Some(format!(
        "127.0.0.1:{}",
        7000 + IdGenerator::tag_for(node_id)
    ));
    s.cluster.redis_url = Some(Secret::new(url));
    s.cluster.key_prefix = prefix.into();
    s.cluster.routing = routing;
    s.cluster.node_ttl_ms = NODE_TTL_MS;
    s.cluster.refresh_interval_ms = REFRESH_MS;
    s.cluster.request_timeout_ms = 1_000;
    s.cluster.connect_timeout_ms = 5_000;
    s.validate().expect("valid test settings");
    s
}

/// A stand-in for a gateway node's local registry: a list of "connected" users, and a record of
/// what other nodes asked of it.
#[derive(Default)]
struct FakeNode {
    conns: Mutex<Vec<LocalConnection>>,
    /// (user, conn id, push) for each connection a push was queued on.
    delivered: Mutex<Vec<(String, u64, Bytes)>>,
    /// (conn id, user, reason) for each connection kicked.
    kicks: Mutex<Vec<(u64, String, KickReason)>>,
}

impl FakeNode {
    fn connect(&self, user: &str, channel: &str, conn_id: u64) -> LocalConnection {
        let c = LocalConnection {
            conn_id,
            user: user.into(),
            channel: channel.into(),
            device_id: format!("device-{conn_id}"),
            transport: "tcp".into(),
            connected_since_ms: imgate::base::unix_millis(),
        };
        self.conns.lock().unwrap().push(c.clone());
        c
    }

    fn disconnect(&self, conn_id: u64) {
        self.conns.lock().unwrap().retain(|c| c.conn_id != conn_id);
    }

    fn delivered(&self) -> Vec<(String, u64, Bytes)> {
        self.delivered.lock().unwrap().clone()
    }

    fn kicked(&self) -> Vec<(u64, String, KickReason)> {
        self.kicks.lock().unwrap().clone()
    }

    fn was_kicked(&self, user: &str, conn_id: u64) -> bool {
        self.kicks
            .lock()
            .unwrap()
            .iter()
            .any(|(id, u, _)| *id == conn_id && u == user)
    }
}

impl LocalNode for FakeNode {
    fn deliver_local(&self, user: &str, channel: Option<&str>, _stamp: Stamp, push: Bytes) -> u32 {
        let conns = self.conns.lock().unwrap();
        let mut n = 0;
        for c in conns.iter().filter(|c| c.user == user) {
            if channel.is_none_or(|ch| ch == c.channel) {
                self.delivered
                    .lock()
                    .unwrap()
                    .push((c.user.clone(), c.conn_id, push.clone()));
                n += 1;
            }
        }
        n
    }

    fn broadcast_local(&self, channel: Option<&str>, push: Bytes) -> usize {
        let conns = self.conns.lock().unwrap();
        let mut n = 0;
        for c in conns.iter() {
            if channel.is_none_or(|ch| ch == c.channel) {
                self.delivered
                    .lock()
                    .unwrap()
                    .push((c.user.clone(), c.conn_id, push.clone()));
                n += 1;
            }
        }
        n
    }

    fn kick_connection(&self, user: &str, conn_id: u64, reason: KickReason) -> bool {
        let mut conns = self.conns.lock().unwrap();
        match conns
            .iter()
            .position(|c| c.conn_id == conn_id && c.user == user)
        {
            Some(pos) => {
                conns.remove(pos);
                self.kicks
                    .lock()
                    .unwrap()
                    .push((conn_id, user.into(), reason));
                true
            }
            None => false,
        }
    }

    fn kick_user(&self, user: &str, channel: Option<&str>, reason: KickReason) -> usize {
        let mut conns = self.conns.lock().unwrap();
        let mut kicks = self.kicks.lock().unwrap();
        let before = conns.len();
        conns.retain(|c| {
            let hit = c.user == user && channel.is_none_or(|ch| ch == c.channel);
            if hit {
                kicks.push((c.conn_id, c.user.clone(), reason));
            }
            !hit
        });
        before - conns.len()
    }

    fn local_connections(&self) -> Vec<LocalConnection> {
        self.conns.lock().unwrap().clone()
    }

    fn connection_count(&self) -> usize {
        self.conns.lock().unwrap().len()
    }
}

struct TestNode {
    cluster: Cluster,
    fake: Arc<FakeNode>,
}

async fn start_node(settings: &Settings) -> TestNode {
    let fake = Arc::new(FakeNode::default());
    let cluster = Cluster::start(settings, fake.clone())
        .await
        .unwrap_or_else(|e| panic!("node {} failed to start: {e}", settings.node.id));
    TestNode { cluster, fake }
}

/// Starts `ids.len()` nodes on Redis under a fresh prefix.
async fn start_nodes(ids: &[&str], routing: RoutingMode) -> (String, Vec<TestNode>) {
    init_tracing();
    let prefix = random_prefix();
    let mut nodes = Vec::new();
    for id in ids {
        nodes.push(start_node(&settings(&redis_url(), &prefix, id, routing)).await);
    }
    (prefix, nodes)
}

/// Leaves the cluster with every node still running, then deletes every key of the test's prefix
/// (they all have TTLs too, should a test fail first).
async fn cleanup<'a>(url: &str, prefix: &str, nodes: impl IntoIterator<Item = &'a TestNode>) {
    for n in nodes {
        n.cluster.leave().await;
    }
    let client = Builder::from_config(Config::from_url(url).unwrap())
        .build()
        .unwrap();
    if client.init().await.is_err() {
        return;
    }
    let keys: Vec<String> = client
        .scan_buffered(format!("{prefix}:*"), Some(1000), None)
        .try_collect::<Vec<_>>()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter_map(|k| k.into_string())
        .collect();
    if !keys.is_empty() {
        let _: Result<i64, _> = client.del(keys).await;
    }
    let _ = client.quit().await;
}

fn push(text: &str) -> Bytes {
    Bytes::from(format!(
        r#"{{"type":"push","id":"1","to":"x","body":{{"text":{}}},"ts":1}}"#,
        serde_json::to_string(text).unwrap()
    ))
}

const FULL: fn(u32) -> RemoteDelivery = |connections| RemoteDelivery {
    connections,
    complete: true,
};

async fn register(
    node: &TestNode,
    c: &LocalConnection,
    policy: DuplicateLoginPolicy,
) -> RegisterOutcome {
    node.cluster.register(c, policy).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_delivery_reaches_only_the_nodes_holding_the_user() {
    let (prefix, nodes) = start_nodes(&["a", "b", "c"], RoutingMode::Routed).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let kick = DuplicateLoginPolicy::KickOld;
    register(b, &b.fake.connect("bob", "app", 1), kick).await;
    register(b, &b.fake.connect("bob", "web", 2), kick).await;
    register(c, &c.fake.connect("carol", "app", 1), kick).await;

    let p = push("hello bob");
    assert_eq!(
        a.cluster
            .deliver_remote("bob", None, STAMP, p.clone())
            .await,
        FULL(2)
    );
    let got = b.fake.delivered();
    assert_eq!(got.len(), 2);
    assert!(
        got.iter().all(|(u, _, bytes)| u == "bob" && *bytes == p),
        "the push bytes arrive verbatim"
    );
    assert!(
        c.fake.delivered().is_empty(),
        "routed mode addresses only the nodes holding the user"
    );

    assert_eq!(
        a.cluster
            .deliver_remote("bob", Some("web"), STAMP, push("web only"))
            .await,
        FULL(1)
    );
    assert_eq!(
        a.cluster
            .deliver_remote("bob", Some("pc"), STAMP, push("nobody"))
            .await,
        FULL(0)
    );
    assert_eq!(
        a.cluster
            .deliver_remote("nobody", None, STAMP, push("x"))
            .await,
        FULL(0)
    );
    assert_eq!(
        c.cluster
            .deliver_remote("carol", None, STAMP, push("own node"))
            .await,
        FULL(0),
        "the caller's own node is skipped"
    );

    // The user left node c between the presence lookup and the message's arrival: c answers 0.
    c.fake.disconnect(1);
    assert_eq!(
        a.cluster
            .deliver_remote("carol", None, STAMP, push("gone"))
            .await,
        FULL(0)
    );
    cleanup(&redis_url(), &prefix, &nodes).await;
}

/// Concurrent messages share Redis calls for their positions and routes (and their PUBLISHes):
/// every message still gets its own position, the routes are right, and the deliveries all
/// arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_messages_get_distinct_positions_and_their_routes() {
    let (prefix, nodes) = start_nodes(&["a", "b"], RoutingMode::Routed).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let kick = DuplicateLoginPolicy::KickOld;
    register(b, &b.fake.connect("bob", "web", 1), kick).await;
    register(a, &a.fake.connect("alice", "app", 1), kick).await;

    let no_floor = || async { Ok::<u64, ClusterError>(0) };
    // The counter starts (from the floor) on the first message.
    let first = a
        .cluster
        .next_position("bob", None, no_floor)
        .await
        .unwrap();
    assert_eq!(first.seq, 1);
    let n: u64 = 500;
    let positions = futures_util::future::join_all((0..n).map(|i| {
        let cluster = a.cluster.clone();
        async move {
            let channel = ["web", "app"][i as usize % 2];
            let p = cluster
                .next_position("bob", Some(channel), no_floor)
                .await
                .unwrap();
            (channel, p)
        }
    }))
    .await;
    let mut seqs: Vec<u64> = positions.iter().map(|(_, p)| p.seq).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (2..=n + 1).collect::<Vec<_>>(), "each position once");
    for (channel, p) in &positions {
        let expected = if *channel == "web" { vec!["b"] } else { vec![] };
        assert_eq!(
            p.route,
            Route::to(&expected),
            "route of a {channel} message"
        );
    }
    // A user on the caller's own node only: no other node to ask. (A counter's first position
    // comes from the floor, and its route is looked up at delivery.)
    let start = a.cluster.next_position("alice", None, no_floor).await;
    assert_eq!(start.unwrap().route, Route::UNKNOWN);
    let own = a
        .cluster
        .next_position("alice", None, no_floor)
        .await
        .unwrap();
    assert_eq!((own.seq, own.route), (2, Route::to(&[])));

    // Many concurrent deliveries through the batched bus all arrive, each answered.
    let results = futures_util::future::join_all(positions.iter().map(|(channel, p)| {
        let cluster = a.cluster.clone();
        let stamp = Stamp {
            id: imgate_shared::MessageId(p.seq),
            seq: p.seq,
        };
        let body = push(&format!("m{}", p.seq));
        let channel = Some(*channel);
        let route = p.route.clone();
        async move {
            cluster
                .deliver_remote_via("bob", channel, stamp, body, route)
                .await
        }
    }))
    .await;
    let reached = results.iter().filter(|r| **r == FULL(1)).count();
    assert_eq!(
        reached,
        positions.iter().filter(|(c, _)| *c == "web").count()
    );
    assert!(results.iter().all(|r| r.complete));
    assert_eq!(b.fake.delivered().len(), reached);
    cleanup(&redis_url(), &prefix, &nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_mode_delivery_reaches_the_node_holding_the_user() {
    let (prefix, nodes) = start_nodes(&["a", "b", "c"], RoutingMode::Broadcast).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    // Broadcast mode needs no presence: every node checks its own connections.
    b.fake.connect("bob", "app", 1);
    b.fake.connect("bob", "web", 2);
    c.fake.connect("carol", "app", 1);

    let p = push("hello bob");
    assert_eq!(
        a.cluster
            .deliver_remote("bob", None, STAMP, p.clone())
            .await,
        FULL(2)
    );
    assert_eq!(b.fake.delivered().len(), 2);
    assert!(c.fake.delivered().is_empty());
    assert!(
        a.fake.delivered().is_empty(),
        "the sender ignores its own message"
    );
    assert_eq!(
        a.cluster
            .deliver_remote("bob", Some("app"), STAMP, push("app"))
            .await,
        FULL(1)
    );
    assert_eq!(
        a.cluster
            .deliver_remote("nobody", None, STAMP, push("x"))
            .await,
        FULL(0)
    );
    assert_eq!(
        b.cluster
            .deliver_remote("carol", None, STAMP, push("to c"))
            .await,
        FULL(1)
    );
    cleanup(&redis_url(), &prefix, &nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reaches_every_other_node_once() {
    for routing in [RoutingMode::Routed, RoutingMode::Broadcast] {
        let (prefix, nodes) = start_nodes(&["a", "b", "c"], routing).await;
        let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
        a.fake.connect("alice", "app", 1);
        b.fake.connect("bob", "app", 1);
        b.fake.connect("bob", "web", 2);
        c.fake.connect("carol", "web", 1);

        let p = push("to everyone");
        assert_eq!(a.cluster.broadcast_remote(None, p.clone()).await, FULL(3));
        assert!(
            a.fake.delivered().is_empty(),
            "the caller delivers locally itself"
        );
        assert_eq!(b.fake.delivered().len(), 2);
        assert_eq!(c.fake.delivered().len(), 1);
        assert!(b.fake.delivered().iter().all(|(_, _, bytes)| *bytes == p));

        assert_eq!(
            a.cluster.broadcast_remote(Some("web"), push("web")).await,
            FULL(2)
        );
        assert_eq!(b.fake.delivered().len(), 3);
        assert_eq!(c.fake.delivered().len(), 2);
        for n in &nodes {
            n.cluster.leave().await;
        }
        cleanup(&redis_url(), &prefix, &nodes).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_does_not_answer_makes_the_delivery_incomplete() {
    init_tracing();
    let prefix = random_prefix();
    let url = redis_url();
    let mut nodes = Vec::new();
    for id in ["a", "b"] {
        let mut s = settings(&url, &prefix, id, RoutingMode::Broadcast);
        s.cluster.request_timeout_ms = 500;
        nodes.push(start_node(&s).await);
    }
    let (a, b) = (&nodes[0], &nodes[1]);
    b.fake.connect("bob", "app", 1);
    assert_eq!(
        a.cluster
            .deliver_remote("bob", None, STAMP, push("x"))
            .await,
        FULL(1)
    );

    // Once started, a node is subscribed: the server counts it at once.
    let topic = format!("{prefix}:bus:all");
    let counter = Builder::from_config(Config::from_url(&url).unwrap())
        .build()
        .unwrap();
    counter.init().await.unwrap();
    let subscribers = || async {
        let v: Vec<fred::prelude::Value> = counter.pubsub_numsub(topic.as_str()).await.unwrap();
        v[1].as_i64().unwrap()
    };
    assert_eq!(subscribers().await, 2);

    // Something else listens on the broadcast topic and never answers (a third node that hangs).
    let silent = Builder::from_config(Config::from_url(&url).unwrap())
        .build_subscriber_client()
        .unwrap();
    silent.init().await.unwrap();
    silent.subscribe(topic.as_str()).await.unwrap();
    // SUBSCRIBE resolves once written; a PING after it is answered once it took effect.
    let _: fred::prelude::Value = silent.ping(None).await.unwrap();
    assert_eq!(subscribers().await, 3);
    let t = Instant::now();
    let r = a
        .cluster
        .deliver_remote("bob", None, STAMP, push("y"))
        .await;
    let waited = t.elapsed();
    assert_eq!(
        r,
        RemoteDelivery {
            connections: 1,
            complete: false
        },
        "counts the answers that came"
    );
    assert!(
        waited >= Duration::from_millis(450),
        "waited for the missing answer: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(3),
        "bounded by request_timeout_ms: {waited:?}"
    );
    let _ = silent.quit().await;
    let _ = counter.quit().await;
    cleanup(&url, &prefix, &nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kick_reaches_other_nodes_in_both_modes() {
    for routing in [RoutingMode::Routed, RoutingMode::Broadcast] {
        let (prefix, nodes) = start_nodes(&["a", "b"], routing).await;
        let (a, b) = (&nodes[0], &nodes[1]);
        let allow = DuplicateLoginPolicy::AllowMultiple;
        register(b, &b.fake.connect("bob", "app", 1), allow).await;
        register(b, &b.fake.connect("bob", "web", 2), allow).await;
        register(b, &b.fake.connect("bob", "web", 3), allow).await;

        let r = a
            .cluster
            .kick_remote("bob", Some("web"), KickReason::Admin)
            .await;
        assert_eq!(r, FULL(2), "{routing:?}");
        let kicked: HashSet<u64> = b.fake.kicked().iter().map(|k| k.0).collect();
        assert_eq!(kicked, HashSet::from([2, 3]));
        assert!(b.fake.kicked().iter().all(|k| k.2 == KickReason::Admin));
        assert_eq!(
            a.cluster.kick_remote("bob", None, KickReason::Admin).await,
            FULL(1)
        );
        assert_eq!(
            a.cluster
                .kick_remote("nobody", None, KickReason::Admin)
                .await,
            FULL(0)
        );
        for n in &nodes {
            n.cluster.leave().await;
        }
        cleanup(&redis_url(), &prefix, &nodes).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_login_on_another_node_kicks_the_older_connection() {
    let (prefix, nodes) = start_nodes(&["a", "b"], RoutingMode::Routed).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let kick = DuplicateLoginPolicy::KickOld;
    let old = a.fake.connect("bob", "app", 7);
    let other_channel = a.fake.connect("bob", "web", 8);
    assert_eq!(register(a, &old, kick).await, RegisterOutcome::Registered);
    assert_eq!(
        register(a, &other_channel, kick).await,
        RegisterOutcome::Registered
    );

    // Same conn id on the other node: connections are told apart by node instance, not id.
    let new = b.fake.connect("bob", "app", 7);
    assert_eq!(register(b, &new, kick).await, RegisterOutcome::Registered);

    wait_for(
        "the older connection on node a to be kicked",
        WAIT,
        || async { a.fake.was_kicked("bob", 7).then_some(()) },
    )
    .await;
    assert_eq!(
        a.fake.kicked(),
        vec![(7, "bob".to_string(), KickReason::DuplicateLogin)]
    );
    assert!(
        b.fake.kicked().is_empty(),
        "the newer connection is never kicked"
    );
    assert_eq!(a.fake.connection_count(), 1, "the web connection stays");

    let presence = b.cluster.presence("bob").await.unwrap();
    let mut seen: Vec<(&str, &str, u64)> = presence
        .iter()
        .map(|e| (e.node_id.as_str(), e.channel.as_str(), e.conn_id))
        .collect();
    seen.sort();
    assert_eq!(seen, vec![("a", "web", 8), ("b", "app", 7)]);

    // Between two connections of one node its local registry decides (here: both stay, as if
    // their logins raced on that node); the cluster only arbitrates between nodes.
    let x1 = b.fake.connect("xavier", "app", 20);
    let x2 = b.fake.connect("xavier", "app", 21);
    let (k1, k2) = (b.cluster.clone(), b.cluster.clone());
    let (r1, r2) = tokio::join!(
        k1.register(&x1, DuplicateLoginPolicy::KickOld),
        k2.register(&x2, DuplicateLoginPolicy::KickOld)
    );
    assert_eq!(
        (r1.unwrap(), r2.unwrap()),
        (RegisterOutcome::Registered, RegisterOutcome::Registered)
    );
    assert_eq!(a.cluster.presence("xavier").await.unwrap().len(), 2);
    assert!(b.fake.kicked().is_empty());
    // A login on another node displaces both.
    let x3 = a.fake.connect("xavier", "app", 22);
    register(a, &x3, kick).await;
    wait_for("both of b's connections to be kicked", WAIT, || async {
        (b.fake.was_kicked("xavier", 20) && b.fake.was_kicked("xavier", 21)).then_some(())
    })
    .await;
    let p = a.cluster.presence("xavier").await.unwrap();
    assert_eq!((p.len(), p[0].node_id.as_str(), p[0].conn_id), (1, "a", 22));
    cleanup(&redis_url(), &prefix, &nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kick_naming_another_instance_or_connection_is_ignored() {
    let (prefix, nodes) = start_nodes(&["a"], RoutingMode::Routed).await;
    let a = &nodes[0];
    register(
        a,
        &a.fake.connect("bob", "app", 7),
        DuplicateLoginPolicy::KickOld,
    )
    .await;
    register(
        a,
        &a.fake.connect("bob", "web", 8),
        DuplicateLoginPolicy::KickOld,
    )
    .await;
    let client = Builder::from_config(Config::from_url(&redis_url()).unwrap())
        .build()
        .unwrap();
    client.init().await.unwrap();
    let channel = format!("{prefix}:bus:node:a");
    let kick = |instance: &str, conn_id: u64| {
        serde_json::json!({"kick_conn": {
            "instance": instance, "conn_id": conn_id, "user": "bob",
            "generation": 1, "reason": "duplicate_login"
        }})
        .to_string()
    };
    // A late kick from before a restart (another instance), one for a connection that is gone,
    // then a valid one: published in this order by one connection, so handled in this order.
    for (instance, conn) in [
        ("0123456789abcdef", 7),
        (a.cluster.instance(), 99),
        (a.cluster.instance(), 8),
    ] {
        let _: i64 = client
            .publish(&channel, kick(instance, conn))
            .await
            .unwrap();
    }
    wait_for("the valid kick", WAIT, || async {
        a.fake.was_kicked("bob", 8).then_some(())
    })
    .await;
    assert_eq!(
        a.fake.kicked().len(),
        1,
        "only the connection named with this instance"
    );
    assert_eq!(a.fake.connection_count(), 1);
    let _ = client.quit().await;
    cleanup(&redis_url(), &prefix, &nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_duplicate_logins_leave_exactly_one_connection() {
    let (prefix, nodes) = start_nodes(&["a", "b"], RoutingMode::Routed).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    const ROUNDS: u64 = 100;
    let mut survivors = Vec::new();
    for i in 0..ROUNDS {
        let user = format!("racer-{i}");
        // The same conn id on both nodes, to show kicks name (instance, conn id).
        let ca = a.fake.connect(&user, "app", i);
        let cb = b.fake.connect(&user, "app", i);
        let (ka, kb) = (a.cluster.clone(), b.cluster.clone());
        let ta = tokio::spawn(async move { ka.register(&ca, DuplicateLoginPolicy::KickOld).await });
        let tb = tokio::spawn(async move { kb.register(&cb, DuplicateLoginPolicy::KickOld).await });
        assert_eq!(ta.await.unwrap().unwrap(), RegisterOutcome::Registered);
        assert_eq!(tb.await.unwrap().unwrap(), RegisterOutcome::Registered);

        let presence = a.cluster.presence(&user).await.unwrap();
        assert_eq!(presence.len(), 1, "exactly one survives: {presence:?}");
        let (winner, loser) = if presence[0].node_id == "a" {
            (a, b)
        } else {
            (b, a)
        };
        assert_eq!(presence[0].conn_id, i);
        wait_for("the loser's node to kick its connection", WAIT, || async {
            loser.fake.was_kicked(&user, i).then_some(())
        })
        .await;
        survivors.push((winner, user));
    }
    // Barrier: a routed request from each node to the other is published after every kick on
    // the same channel by the same connection, so once answered, every kick has been handled.
    a.fake.connect("barrier-a", "app", 10_000);
    b.fake.connect("barrier-b", "app", 10_000);
    register(
        a,
        &a.fake
            .local_connections()
            .into_iter()
            .find(|c| c.user == "barrier-a")
            .unwrap(),
        DuplicateLoginPolicy::KickOld,
    )
    .await;
    register(
        b,
        &b.fake
            .local_connections()
            .into_iter()
            .find(|c| c.user == "barrier-b")
            .unwrap(),
        DuplicateLoginPolicy::KickOld,
    )
    .await;
    assert_eq!(
        a.cluster
            .deliver_remote("barrier-b", None, STAMP, push("x"))
            .await,
        FULL(1)
    );
    assert_eq!(
        b.cluster
            .deliver_remote("barrier-a", None, STAMP, push("x"))
            .await,
        FULL(1)
    );
    for (winner, user) in &survivors {
        assert!(
            !winner.fake.kicked().iter().any(|(_, u, _)| u == user),
            "the surviving connection of {user} was kicked"
        );
    }
    let wins_a = survivors
        .iter()
        .filter(|(w, _)| std::ptr::eq(*w, a))
        .count();
    assert_eq!(
        a.fake.kicked().len() + b.fake.kicked().len(),
        ROUNDS as usize
    );
    eprintln!("node a won {wins_a} of {ROUNDS} races");
    cleanup(&redis_url(), &prefix, &nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_new_refuses_a_login_held_on_another_node() {
    let (prefix, nodes) = start_nodes(&["a", "b"], RoutingMode::Routed).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    let reject = DuplicateLoginPolicy::RejectNew;
    let first = a.fake.connect("bob", "app", 1);
    assert_eq!(
        register(a, &first, reject).await,
        RegisterOutcome::Registered
    );
    let second = b.fake.connect("bob", "app", 1);
    assert_eq!(
        register(b, &second, reject).await,
        RegisterOutcome::Rejected
    );
    b.fake.disconnect(1);
    assert!(a.fake.kicked().is_empty());
    let presence = b.cluster.presence("bob").await.unwrap();
    assert_eq!(presence.len(), 1);
    assert_eq!(presence[0].node_id, "a");

    // Another channel type is another slot.
    let web = b.fake.connect("bob", "web", 2);
    assert_eq!(register(b, &web, reject).await, RegisterOutcome::Registered);

    // Once the first one is gone the login is accepted.
    a.cluster.unregister("bob", 1).await;
    a.fake.disconnect(1);
    let third = b.fake.connect("bob", "app", 3);
    assert_eq!(
        register(b, &third, reject).await,
        RegisterOutcome::Registered
    );

    // allow_multiple keeps both.
    let many = DuplicateLoginPolicy::AllowMultiple;
    assert_eq!(
        register(a, &a.fake.connect("eve", "app", 4), many).await,
        RegisterOutcome::Registered
    );
    assert_eq!(
        register(b, &b.fake.connect("eve", "app", 5), many).await,
        RegisterOutcome::Registered
    );
    assert_eq!(a.cluster.presence("eve").await.unwrap().len(), 2);
    assert!(a.fake.kicked().is_empty() && b.fake.kicked().is_empty());
    cleanup(&redis_url(), &prefix, &nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_lists_the_connections_of_every_node() {
    let (prefix, nodes) = start_nodes(&["a", "b", "c"], RoutingMode::Routed).await;
    let kick = DuplicateLoginPolicy::KickOld;
    for (n, ch) in nodes.iter().zip(["app", "web", "pc"]) {
        register(n, &n.fake.connect("bob", ch, 42), kick).await;
    }
    for n in &nodes {
        let p = n.cluster.presence("bob").await.unwrap();
        let mut seen: Vec<(String, String, u64, String)> = p
            .into_iter()
            .map(|e| {
                assert_eq!(e.user_id, "bob");
                assert_eq!(e.transport, "tcp");
                (e.node_id, e.channel, e.conn_id, e.device_id)
            })
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            vec![
                ("a".into(), "app".into(), 42, "device-42".into()),
                ("b".into(), "web".into(), 42, "device-42".into()),
                ("c".into(), "pc".into(), 42, "device-42".into()),
            ]
        );
    }
    nodes[1].cluster.unregister("bob", 42).await;
    assert_eq!(nodes[0].cluster.presence("bob").await.unwrap().len(), 2);
    assert!(nodes[0]
        .cluster
        .presence("nobody")
        .await
        .unwrap()
        .is_empty());
    cleanup(&redis_url(), &prefix, &nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_dies_vanishes_from_nodes_and_presence_within_the_ttl() {
    let (prefix, mut nodes) = start_nodes(&["a", "b", "c"], RoutingMode::Routed).await;
    let c = nodes.pop().unwrap();
    let a = &nodes[0];
    register(
        &c,
        &c.fake.connect("dave", "app", 1),
        DuplicateLoginPolicy::KickOld,
    )
    .await;
    let ids: Vec<String> = a
        .cluster
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.id)
        .collect();
    assert_eq!(ids, vec!["a", "b", "c"]);
    // The record carries the connection count as of the node's last refresh.
    let info = wait_for("c's record to count its connection", WAIT, || async {
        let c = a.cluster.nodes().await.unwrap().remove(2);
        (c.connections == 1).then_some(c)
    })
    .await;
    assert_eq!(
        info.client_addr,
        format!("127.0.0.1:{}", 7000 + IdGenerator::tag_for("c"))
    );
    assert_eq!(info.ws_url, format!("ws://{}/ws", info.client_addr));
    assert_eq!(a.cluster.presence("dave").await.unwrap()[0].node_id, "c");

    // Node c dies: no leave, its tasks stop and its connections close; nothing refreshes it.
    drop(c);
    let died = Instant::now();
    let bound = Duration::from_millis(NODE_TTL_MS) + Duration::from_secs(5);
    wait_for("node c to drop out of the node list", bound, || async {
        (a.cluster.nodes().await.unwrap().len() == 2).then_some(())
    })
    .await;
    wait_for("dave's presence on c to vanish", bound, || async {
        a.cluster
            .presence("dave")
            .await
            .unwrap()
            .is_empty()
            .then_some(())
    })
    .await;
    let gone_after = died.elapsed();
    eprintln!("node c vanished after {gone_after:?} (TTL {NODE_TTL_MS} ms)");
    assert_eq!(
        a.cluster
            .deliver_remote("dave", None, STAMP, push("x"))
            .await,
        FULL(0)
    );
    let ids: Vec<String> = nodes[1]
        .cluster
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.id)
        .collect();
    assert_eq!(ids, vec!["a", "b"]);
    cleanup(&redis_url(), &prefix, &nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_registration_vanished_registers_itself_and_its_presence_again() {
    let (prefix, nodes) = start_nodes(&["a", "b"], RoutingMode::Routed).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    register(
        b,
        &b.fake.connect("bob", "app", 1),
        DuplicateLoginPolicy::KickOld,
    )
    .await;
    // As if b had stalled past its TTL: its record expired and a read deleted its (then dead)
    // entry. b notices at its next refresh and registers itself and its connections again.
    let client = Builder::from_config(Config::from_url(&redis_url()).unwrap())
        .build()
        .unwrap();
    client.init().await.unwrap();
    let _: i64 = client
        .del(vec![
            format!("{prefix}:node:b"),
            format!("{prefix}:presence:bob"),
        ])
        .await
        .unwrap();
    wait_for("b's presence to come back", WAIT, || async {
        (a.cluster.presence("bob").await.unwrap().len() == 1).then_some(())
    })
    .await;
    assert_eq!(a.cluster.nodes().await.unwrap().len(), 2);
    assert_eq!(
        a.cluster
            .deliver_remote("bob", None, STAMP, push("y"))
            .await,
        FULL(1)
    );
    let _ = client.quit().await;
    cleanup(&redis_url(), &prefix, &nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_with_a_live_nodes_id_refuses_to_start() {
    let (prefix, nodes) = start_nodes(&["dup"], RoutingMode::Routed).await;
    let s = settings(&redis_url(), &prefix, "dup", RoutingMode::Routed);
    let started = Instant::now();
    let err = Cluster::start(&s, Arc::new(FakeNode::default()))
        .await
        .expect_err("the id is taken");
    assert!(
        matches!(&err, ClusterError::NodeIdTaken(id) if id == "dup"),
        "{err}"
    );
    assert!(err.to_string().contains("dup"), "{err}");
    assert!(
        started.elapsed() >= Duration::from_millis(NODE_TTL_MS),
        "it waits out a possibly crashed predecessor first"
    );
    assert_eq!(
        nodes[0].cluster.nodes().await.unwrap().len(),
        1,
        "the live node keeps its registration"
    );

    // After a graceful leave the id is free at once.
    nodes[0].cluster.leave().await;
    let started = Instant::now();
    let again = start_node(&s).await;
    assert!(started.elapsed() < Duration::from_millis(NODE_TTL_MS));
    assert_eq!(again.cluster.nodes().await.unwrap().len(), 1);
    cleanup(&redis_url(), &prefix, [&again]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_id_tags_are_unique_among_live_nodes() {
    init_tracing();
    // Two node ids whose derived tags collide.
    let mut by_tag = std::collections::HashMap::new();
    let (first, second) = (0..)
        .find_map(|i| {
            let id = format!("n{i}");
            by_tag
                .insert(IdGenerator::tag_for(&id), id.clone())
                .map(|other| (other, id))
        })
        .unwrap();
    let tag = IdGenerator::tag_for(&first);
    let prefix = random_prefix();
    let url = redis_url();
    let a = start_node(&settings(&url, &prefix, &first, RoutingMode::Routed)).await;
    let b = start_node(&settings(&url, &prefix, &second, RoutingMode::Routed)).await;
    assert_eq!(a.cluster.node_tag(), tag);
    assert_eq!(
        b.cluster.node_tag(),
        (tag + 1) % 1024,
        "probed upward to the next free tag"
    );

    // A configured tag held by a live node is refused.
    let mut s = settings(&url, &prefix, "n-explicit", RoutingMode::Routed);
    s.node.tag = Some(tag);
    let err = Cluster::start(&s, Arc::new(FakeNode::default()))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClusterError::TagTaken(t) if t == tag),
        "{err}"
    );
    assert_eq!(
        a.cluster.nodes().await.unwrap().len(),
        2,
        "the refused node removed its registration"
    );
    s.node.tag = Some(1000);
    let c = start_node(&s).await;
    assert_eq!(c.cluster.node_tag(), 1000);
    cleanup(&url, &prefix, [&a, &b, &c]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_removes_the_node_and_its_presence_at_once() {
    let (prefix, nodes) = start_nodes(&["a", "b"], RoutingMode::Routed).await;
    let (a, b) = (&nodes[0], &nodes[1]);
    register(
        b,
        &b.fake.connect("bob", "app", 1),
        DuplicateLoginPolicy::KickOld,
    )
    .await;
    assert_eq!(a.cluster.presence("bob").await.unwrap().len(), 1);
    b.cluster.leave().await;
    assert!(!b.cluster.bus_up());
    assert!(a.cluster.presence("bob").await.unwrap().is_empty());
    let ids: Vec<String> = a
        .cluster
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.id)
        .collect();
    assert_eq!(ids, vec!["a"]);
    assert!(matches!(
        b.cluster
            .register(
                &b.fake.connect("bob", "web", 2),
                DuplicateLoginPolicy::KickOld
            )
            .await,
        Err(ClusterError::Unavailable)
    ));
    assert!(matches!(
        b.cluster.presence("bob").await,
        Err(ClusterError::Unavailable)
    ));
    assert_eq!(
        b.cluster.deliver_remote("x", None, STAMP, push("x")).await,
        RemoteDelivery {
            connections: 0,
            complete: false
        }
    );
    cleanup(&redis_url(), &prefix, &nodes).await;
}

/// Every async operation can run in a spawned task (compile-time check).
#[allow(dead_code, clippy::let_underscore_future)]
fn operations_are_send(c: &Cluster, conn: &LocalConnection, s: &Settings) {
    fn send<T: Send>(_: T) {}
    send(Cluster::start(s, Arc::new(FakeNode::default())));
    send(c.deliver_remote("u", None, STAMP, Bytes::new()));
    send(c.broadcast_remote(None, Bytes::new()));
    send(c.kick_remote("u", None, KickReason::Admin));
    send(c.register(conn, DuplicateLoginPolicy::KickOld));
    send(c.unregister("u", 1));
    send(c.presence("u"));
    send(c.nodes());
    send(c.leave());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_mode_needs_no_redis() {
    init_tracing();
    let mut s = Settings::default();
    s.node.id = "solo".into();
    let fake = Arc::new(FakeNode::default());
    let cluster = Cluster::start(&s, fake.clone()).await.unwrap();
    assert!(!cluster.is_clustered());
    assert!(cluster.bus_up());
    assert_eq!(cluster.node_tag(), IdGenerator::tag_for("solo"));
    let c = fake.connect("bob", "app", 1);
    assert_eq!(
        register_embedded(&cluster, &c).await,
        RegisterOutcome::Registered
    );
    assert_eq!(
        cluster.deliver_remote("bob", None, STAMP, push("x")).await,
        FULL(0)
    );
    assert_eq!(cluster.broadcast_remote(None, push("x")).await, FULL(0));
    assert_eq!(
        cluster.kick_remote("bob", None, KickReason::Admin).await,
        FULL(0)
    );
    assert!(fake.delivered().is_empty() && fake.kicked().is_empty());
    let p = cluster.presence("bob").await.unwrap();
    assert_eq!(
        (p.len(), p[0].node_id.as_str(), p[0].conn_id),
        (1, "solo", 1)
    );
    let n = cluster.nodes().await.unwrap();
    assert_eq!(
        (n.len(), n[0].id.as_str(), n[0].connections),
        (1, "solo", 1)
    );
    cluster.unregister("bob", 1).await;
    cluster.leave().await;

    s.node.tag = Some(5);
    let tagged = Cluster::start(&s, fake).await.unwrap();
    assert_eq!(tagged.node_tag(), 5);
}

async fn register_embedded(cluster: &Cluster, c: &LocalConnection) -> RegisterOutcome {
    cluster
        .register(c, DuplicateLoginPolicy::RejectNew)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_gives_up_on_an_unreachable_redis() {
    init_tracing();
    let port = imgate_loadtest::fault::free_port();
    let mut s = settings(
        &format!("redis://127.0.0.1:{port}"),
        &random_prefix(),
        "a",
        RoutingMode::Routed,
    );
    s.cluster.connect_timeout_ms = 600;
    let started = Instant::now();
    let err = Cluster::start(&s, Arc::new(FakeNode::default()))
        .await
        .unwrap_err();
    assert!(matches!(err, ClusterError::Connect(_)), "{err}");
    assert!(
        started.elapsed() >= Duration::from_millis(600),
        "it retried"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_recover_after_a_redis_restart() {
    init_tracing();
    let mut redis = PrivateRedis::start().await;
    let prefix = random_prefix();
    let a = start_node(&settings(&redis.url(), &prefix, "a", RoutingMode::Routed)).await;
    let b = start_node(&settings(&redis.url(), &prefix, "b", RoutingMode::Routed)).await;
    register(
        &b,
        &b.fake.connect("bob", "app", 1),
        DuplicateLoginPolicy::KickOld,
    )
    .await;
    assert_eq!(
        a.cluster
            .deliver_remote("bob", None, STAMP, push("before"))
            .await,
        FULL(1)
    );

    // The server drops the subscribers' connections: they reconnect and subscribe again.
    let admin = Builder::from_config(Config::from_url(&redis.url()).unwrap())
        .build()
        .unwrap();
    admin.init().await.unwrap();
    let killed: i64 = admin
        .custom(
            CustomCommand::new_static("CLIENT", None::<u16>, false),
            vec!["KILL", "TYPE", "pubsub"],
        )
        .await
        .unwrap();
    assert_eq!(killed, 2);
    let _ = admin.quit().await;
    wait_for("cross-node delivery to work again", WAIT, || async {
        let r = a
            .cluster
            .deliver_remote("bob", None, STAMP, push("resubscribed"))
            .await;
        (r == FULL(1)).then_some(())
    })
    .await;
    let delivered_before = b.fake.delivered().len();

    redis.kill();
    wait_for("both nodes to see the bus down", WAIT, || async {
        (!a.cluster.bus_up() && !b.cluster.bus_up()).then_some(())
    })
    .await;
    let t = Instant::now();
    let r = a
        .cluster
        .deliver_remote("bob", None, STAMP, push("during"))
        .await;
    assert_eq!(
        r,
        RemoteDelivery {
            connections: 0,
            complete: false
        },
        "never reported delivered"
    );
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "fails fast: {:?}",
        t.elapsed()
    );
    // A command sent in the instant before a node noticed may wait out request_timeout_ms;
    // once both of its connections are known down, everything fails fast.
    for n in [&a, &b] {
        wait_for("presence reads to fail fast", WAIT, || async {
            let t = Instant::now();
            let r = n.cluster.presence("bob").await;
            (matches!(r, Err(ClusterError::Unavailable))
                && t.elapsed() < Duration::from_millis(100))
            .then_some(())
        })
        .await;
    }
    let t = Instant::now();
    assert!(matches!(
        a.cluster.nodes().await,
        Err(ClusterError::Unavailable)
    ));
    // A login while Redis is down proceeds, and is registered once Redis is back.
    let rita = b.fake.connect("rita", "web", 2);
    assert_eq!(
        register(&b, &rita, DuplicateLoginPolicy::KickOld).await,
        RegisterOutcome::Registered
    );
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "fails fast: {:?}",
        t.elapsed()
    );
    // The same user logs in on both nodes while Redis is down: once it is back, one survives.
    let twin_a = a.fake.connect("twin", "app", 5);
    let twin_b = b.fake.connect("twin", "app", 6);
    register(&a, &twin_a, DuplicateLoginPolicy::KickOld).await;
    register(&b, &twin_b, DuplicateLoginPolicy::KickOld).await;
    // A logout while Redis is down is applied once Redis is back.
    let gone = b.fake.connect("gone", "app", 3);
    register(&b, &gone, DuplicateLoginPolicy::KickOld).await;
    b.fake.disconnect(3);
    b.cluster.unregister("gone", 3).await;

    // Same port, empty data set.
    redis.restart().await.unwrap();
    wait_for("both nodes to see the bus up again", WAIT, || async {
        (a.cluster.bus_up() && b.cluster.bus_up()).then_some(())
    })
    .await;
    wait_for("b's presence to be registered again", WAIT, || async {
        let bob = a.cluster.presence("bob").await.ok()?;
        let rita = a.cluster.presence("rita").await.ok()?;
        (bob.len() == 1 && rita.len() == 1 && rita[0].node_id == "b").then_some(())
    })
    .await;
    assert!(a.cluster.presence("gone").await.unwrap().is_empty());
    wait_for("one twin to be kicked", WAIT, || async {
        (a.fake.was_kicked("twin", 5) || b.fake.was_kicked("twin", 6)).then_some(())
    })
    .await;
    let p = a.cluster.presence("twin").await.unwrap();
    assert_eq!(p.len(), 1, "{p:?}");
    let (survivor, loser) = if p[0].node_id == "a" {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert_eq!(loser.fake.kicked().len(), 1);
    assert!(survivor.fake.kicked().is_empty());
    let ids: Vec<String> = a
        .cluster
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.id)
        .collect();
    assert_eq!(ids, vec!["a", "b"]);
    assert_eq!(
        a.cluster
            .deliver_remote("bob", None, STAMP, push("after"))
            .await,
        FULL(1)
    );
    assert_eq!(
        a.cluster
            .deliver_remote("rita", Some("web"), STAMP, push("after"))
            .await,
        FULL(1)
    );
    assert_eq!(
        b.fake.delivered().len(),
        delivered_before + 2,
        "nothing from while it was down"
    );
}

/// Whether a missing position may still be stored: the node that took it holds it until its
/// write is settled; every live node is asked; a registered node that does not answer makes
/// the answer unknown (never "nobody"), until its registration expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_is_held_by_the_node_that_took_it_until_settled_or_gone() {
    init_tracing();
    let prefix = random_prefix();
    let url = redis_url();
    let mut nodes = Vec::new();
    for id in ["a", "b", "c"] {
        let mut s = settings(&url, &prefix, id, RoutingMode::Routed);
        s.cluster.request_timeout_ms = 500;
        nodes.push(start_node(&s).await);
    }
    let c = nodes.pop().unwrap();
    let (a, b) = (&nodes[0], &nodes[1]);
    assert_eq!(a.cluster.lowest_held("u", 1, 10).await, Some(0), "none");

    // b asks for a position. A question asked meanwhile waits for b to know its position
    // (whichever comes first, the answer is the same), then counts it while its write is
    // pending.
    let pending = b.cluster.reserve("u");
    let asked = tokio::spawn({
        let cluster = a.cluster.clone();
        async move { cluster.lowest_held("u", 1, 5).await }
    });
    pending.taken(5);
    assert_eq!(asked.await.unwrap(), Some(5));
    assert_eq!(a.cluster.lowest_held("u", 1, 4).await, Some(0));
    assert_eq!(a.cluster.lowest_held("u", 5, 9).await, Some(5));
    assert_eq!(a.cluster.lowest_held("v", 5, 5).await, Some(0));
    assert_eq!(b.cluster.lowest_held("u", 1, 9).await, Some(5), "its own");
    // Written (or failed): settled.
    drop(pending);
    assert_eq!(a.cluster.lowest_held("u", 5, 5).await, Some(0));

    // c takes position 6 and crashes before writing it: while c is registered, nobody can
    // say that 6 will never come; once its registration expires, it never will.
    let lost = c.cluster.reserve("u");
    lost.taken(6);
    assert_eq!(a.cluster.lowest_held("u", 1, 6).await, Some(6));
    drop(c);
    assert_eq!(
        a.cluster.lowest_held("u", 6, 6).await,
        None,
        "c does not answer"
    );
    wait_for(
        "c's registration to expire",
        Duration::from_millis(NODE_TTL_MS * 4),
        || async { (a.cluster.lowest_held("u", 6, 6).await == Some(0)).then_some(()) },
    )
    .await;
    drop(lost);
    cleanup(&url, &prefix, &nodes).await;
}
