//! Reliable delivery end to end: a receiver whose connection is cut mid-stream, whose node
//! crashes, or that has two devices (one of them away for a while) ends with every message of its
//! stream exactly once and in order; and RESUME on another node replays what was missed, rotates
//! the session id and refuses used-up ids and other devices.

mod common;

use std::time::Duration;

use common::proxy::Proxy;
use common::{
    cluster_settings, eventually, init_tracing, random_prefix, IsolatedNode, MysqlDb, TestNode,
    WAIT,
};
use imgate::config::RoutingMode;
use imgate_shared::client::{Backoff, Client, ClientConfig, Event};
use imgate_shared::connection::Endpoint;
use imgate_shared::protocol::Body;
use imgate_shared::{ClientFrame, ErrorCode, SendStatus, ServerFrame};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// Messages each stream test sends.
const TOTAL: usize = 1_000;

/// A Rust client's configuration with a short reconnect backoff.
fn config(endpoints: Vec<Endpoint>, token: String, device: &str, channel: &str) -> ClientConfig {
    let mut c = ClientConfig::new(endpoints, token, device, channel);
    c.backoff = Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
        jitter: 0.5,
    };
    c
}

/// Sends `body` to `to` over a raw test client and waits for its receipt.
async fn send_json(
    sender: &mut common::Client,
    to: &str,
    client_msg_id: String,
    body: Value,
) -> (SendStatus, Option<ErrorCode>) {
    sender
        .send(ClientFrame::Send {
            to: to.to_owned(),
            channel: None,
            client_msg_id: client_msg_id.clone(),
            body: Body::from_value(&body).unwrap(),
            retry: false,
        })
        .await;
    loop {
        match sender.recv_skip_acks().await {
            Some(ServerFrame::SendResult {
                client_msg_id: c,
                status,
                reason,
                ..
            }) => {
                assert_eq!(c, client_msg_id, "receipts come in the order of the sends");
                return (status, reason);
            }
            Some(ServerFrame::Push { .. }) => continue,
            other => panic!("expected the receipt of {client_msg_id}, got {other:?}"),
        }
    }
}

/// Sends `{"n": i}` for every `i` in `range`, one after the other (each after the receipt of
/// the previous one, so that they take their stream positions in this order).
async fn send_numbered(
    sender: &mut common::Client,
    to: &str,
    range: std::ops::Range<usize>,
) -> Vec<(usize, SendStatus, Option<ErrorCode>)> {
    let mut receipts = Vec::with_capacity(range.len());
    for i in range {
        let (status, reason) = send_json(sender, to, format!("n{i}"), json!({ "n": i })).await;
        receipts.push((i, status, reason));
    }
    receipts
}

/// Asserts that every receipt is `delivered` or `stored`.
fn assert_accepted(receipts: &[(usize, SendStatus, Option<ErrorCode>)]) {
    let refused: Vec<_> = receipts
        .iter()
        .filter(|(_, s, _)| !matches!(s, SendStatus::Delivered | SendStatus::Stored))
        .collect();
    assert!(
        refused.is_empty(),
        "{} sends refused, e.g. {:?}",
        refused.len(),
        &refused[..refused.len().min(5)]
    );
}

/// What one device's [`Client`] handed to the application.
#[derive(Default)]
struct Received {
    /// Stream messages: (body, seq).
    messages: Vec<(Value, u64)>,
    /// `Connected` events: (node, resumed, cursor, messages received before it).
    connects: Vec<(String, bool, u64, usize)>,
    /// `CaughtUp` events: (seq, messages received before it).
    caught_up: Vec<(u64, usize)>,
    /// Every event in short, for failure messages.
    log: Vec<String>,
}

impl Received {
    fn record(&mut self, event: Event) {
        match event {
            Event::Message(m) => {
                let seq = m
                    .seq
                    .unwrap_or_else(|| panic!("a stream message without seq: {m:?}"));
                self.messages.push((m.body.parse::<Value>().unwrap(), seq));
                self.log.push(format!("msg seq={seq} {}", m.body.get()));
            }
            Event::Connected {
                node_id,
                resumed,
                cursor,
                ..
            } => {
                self.log.push(format!(
                    "connected {node_id} resumed={resumed} cursor={cursor}"
                ));
                self.connects
                    .push((node_id, resumed, cursor, self.messages.len()));
            }
            Event::CaughtUp { seq } => {
                self.log.push(format!("caught_up {seq}"));
                self.caught_up.push((seq, self.messages.len()));
            }
            Event::Disconnected { reason } => self.log.push(format!("disconnected: {reason}")),
            Event::Kicked { reason } => self.log.push(format!("kicked: {reason:?}")),
            other => panic!("unexpected event {other:?}; so far: {}", self.tail()),
        }
    }

    /// The events so far, long runs of messages folded.
    fn tail(&self) -> String {
        let mut out: Vec<String> = Vec::new();
        let mut i = 0;
        while i < self.log.len() {
            let run = self.log[i..]
                .iter()
                .take_while(|l| l.starts_with("msg "))
                .count();
            if run > 3 {
                out.push(self.log[i].clone());
                out.push(format!("... {} more", run - 2));
                out.push(self.log[i + run - 1].clone());
                i += run;
            } else {
                out.push(self.log[i].clone());
                i += 1;
            }
        }
        out.join("\n  ")
    }

    fn numbers(&self) -> Vec<i64> {
        self.messages
            .iter()
            .map(|(b, _)| b["n"].as_i64().unwrap_or(-1))
            .collect()
    }

    fn last_n(&self) -> Option<i64> {
        self.messages
            .last()
            .map(|(b, _)| b["n"].as_i64().unwrap_or(-1))
    }

    /// Asserts that the messages are exactly `{"n": i}` for `i` in `expected`, in order, with
    /// strictly increasing positions.
    fn assert_exactly(&self, who: &str, expected: std::ops::Range<usize>) {
        let want: Vec<i64> = expected.map(|i| i as i64).collect();
        let got = self.numbers();
        if got != want {
            let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
            panic!(
                "{who}: got {} messages, want {}; first difference at index {first_diff:?}\n  {}",
                got.len(),
                want.len(),
                self.tail()
            );
        }
        for pair in self.messages.windows(2) {
            assert!(
                pair[0].1 < pair[1].1,
                "{who}: seq not increasing: {} then {}",
                pair[0].1,
                pair[1].1
            );
        }
    }
}

/// The next event, failing the test (with what came so far) after [`WAIT`].
async fn next_event(events: &mut mpsc::Receiver<Event>, so_far: &Received) -> Event {
    match tokio::time::timeout(WAIT, events.recv()).await {
        Ok(Some(event)) => event,
        Ok(None) => panic!("the client stopped; so far:\n  {}", so_far.tail()),
        Err(_) => panic!("no event within {WAIT:?}; so far:\n  {}", so_far.tail()),
    }
}

/// Records events until `done` holds.
async fn until(
    events: &mut mpsc::Receiver<Event>,
    received: &mut Received,
    mut done: impl FnMut(&Received) -> bool,
) {
    while !done(received) {
        let event = next_event(events, received).await;
        received.record(event);
    }
}

/// Sends the end marker `{"end": true}` and records `received`'s events up to it: whatever the
/// client hands over after the last numbered message (a duplicate, say) comes before it.
async fn end_marker(
    sender: &mut common::Client,
    events: &mut mpsc::Receiver<Event>,
    received: &mut Received,
) {
    let (status, reason) = send_json(sender, "bob", "end".into(), json!({"end": true})).await;
    assert!(
        matches!(status, SendStatus::Delivered | SendStatus::Stored),
        "end marker: {status:?} {reason:?}"
    );
    until(events, received, |r| {
        r.messages.last().is_some_and(|(b, _)| b["end"] == true)
    })
    .await;
    received.messages.pop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_cut_off_mid_stream_gets_all_1000_once_in_order() {
    init_tracing();
    let started = std::time::Instant::now();
    let node = TestNode::start().await;
    let proxy = Proxy::start(node.client_addr).await;
    let (bob, mut events) = Client::start(config(
        vec![proxy.endpoint()],
        node.token("bob"),
        "bob-phone",
        "app",
    ));
    let mut rx = Received::default();
    until(&mut events, &mut rx, |r| !r.caught_up.is_empty()).await;
    assert_eq!(rx.connects.len(), 1);

    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    let sender = tokio::spawn(async move {
        let receipts = send_numbered(&mut alice, "bob", 0..TOTAL).await;
        (alice, receipts)
    });

    // Cut bob's connection when he holds about 300 messages, and again at about 700.
    let mut cuts = Vec::new();
    for at in [300, 700] {
        until(&mut events, &mut rx, |r| r.messages.len() >= at).await;
        assert!(
            !sender.is_finished(),
            "the sender finished before the cut at {at}: the test would not cut mid-stream"
        );
        let cut = proxy.cut();
        assert_eq!(cut, 1, "one connection open through the proxy at {at}");
        rx.log.push(format!("-- cut at {at}"));
        cuts.push(rx.messages.len());
    }
    until(&mut events, &mut rx, |r| {
        r.last_n() == Some(TOTAL as i64 - 1)
    })
    .await;
    let (mut alice, receipts) = tokio::time::timeout(WAIT, sender)
        .await
        .expect("the sender finishes")
        .unwrap();
    end_marker(&mut alice, &mut events, &mut rx).await;

    rx.assert_exactly("bob", 0..TOTAL);
    // One stream, one sender: the positions are 1 to 1000, none skipped.
    let seqs: Vec<u64> = rx.messages.iter().map(|(_, s)| *s).collect();
    assert_eq!(seqs, (1..=TOTAL as u64).collect::<Vec<_>>());
    assert_accepted(&receipts);
    // Each cut was followed by a resume (through the proxy, on the same node).
    for (i, &at) in cuts.iter().enumerate() {
        let until_next = cuts.get(i + 1).copied().unwrap_or(usize::MAX);
        assert!(
            rx.connects
                .iter()
                .any(|&(_, resumed, _, before)| resumed && before >= at && before <= until_next),
            "no resume after the cut at {at}:\n  {}",
            rx.tail()
        );
    }
    assert!(proxy.accepted() >= 3, "bob reconnected through the proxy");
    assert_eq!(bob.last_seq(), TOTAL as u64 + 1);
    eprintln!(
        "{} connects, {} messages, {:?}",
        rx.connects.len(),
        rx.messages.len(),
        started.elapsed()
    );
    drop(bob);
    node.stop().await;
}

/// Two routed nodes sharing a fresh database and a Redis key prefix; nodes `node-1`, `node-2`.
async fn two_nodes(db: &MysqlDb) -> (IsolatedNode, IsolatedNode) {
    let prefix = random_prefix();
    let mut nodes = Vec::new();
    for i in 1..=2 {
        let (prefix, url) = (prefix.clone(), db.url.clone());
        nodes.push(
            IsolatedNode::start_with(move |s| {
                cluster_settings(s, i, &prefix, &url, RoutingMode::Routed)
            })
            .await,
        );
    }
    let second = nodes.pop().unwrap();
    (nodes.pop().unwrap(), second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_whose_node_crashes_moves_to_another_node_and_misses_nothing() {
    init_tracing();
    let started = std::time::Instant::now();
    let db = MysqlDb::create().await;
    let (node1, node2) = two_nodes(&db).await;
    let (bob, mut events) = Client::start(config(
        vec![node1.tcp(), node2.tcp()],
        node1.token("bob"),
        "bob-phone",
        "app",
    ));
    let mut rx = Received::default();
    until(&mut events, &mut rx, |r| !r.caught_up.is_empty()).await;
    assert_eq!(rx.connects[0].0, "node-1", "bob starts on node 1");

    let mut alice = node2.login(&node2.tcp(), "alice", "app").await;
    let sender = tokio::spawn(async move {
        let receipts = send_numbered(&mut alice, "bob", 0..TOTAL).await;
        (alice, receipts)
    });
    until(&mut events, &mut rx, |r| r.messages.len() >= 300).await;
    assert!(!sender.is_finished(), "the crash comes mid-stream");
    let crashed_at = rx.messages.len();
    rx.log.push(format!("-- node-1 crashed at {crashed_at}"));
    node1.crash();

    until(&mut events, &mut rx, |r| {
        r.last_n() == Some(TOTAL as i64 - 1)
    })
    .await;
    let (mut alice, receipts) = tokio::time::timeout(WAIT, sender)
        .await
        .expect("the sender finishes")
        .unwrap();
    end_marker(&mut alice, &mut events, &mut rx).await;

    rx.assert_exactly("bob", 0..TOTAL);
    assert_accepted(&receipts);
    let last = rx.connects.last().unwrap();
    assert!(
        last.0 == "node-2" && last.1 && last.3 >= crashed_at,
        "bob ends resumed on node 2:\n  {}",
        rx.tail()
    );
    eprintln!(
        "{} connects, receipts: {} delivered / {} stored, {:?}",
        rx.connects.len(),
        receipts
            .iter()
            .filter(|r| r.1 == SendStatus::Delivered)
            .count(),
        receipts
            .iter()
            .filter(|r| r.1 == SendStatus::Stored)
            .count(),
        started.elapsed()
    );
    drop(bob);
    drop(alice);
    node2.stop().await;
    db.drop_database().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_devices_of_one_user_both_end_with_every_message() {
    init_tracing();
    let node = TestNode::start().await;
    let (_phone, mut phone_events) = Client::start(config(
        vec![node.tcp()],
        node.token("bob"),
        "bob-phone",
        "app",
    ));
    let mut phone = Received::default();
    until(&mut phone_events, &mut phone, |r| !r.caught_up.is_empty()).await;
    let mut alice = node.login(&node.tcp(), "alice", "app").await;

    // The laptop is away for the first 100: they reach the phone only.
    let receipts = send_numbered(&mut alice, "bob", 0..100).await;
    assert!(
        receipts.iter().all(|r| r.1 == SendStatus::Delivered),
        "the phone is online: {:?}",
        receipts.iter().find(|r| r.1 != SendStatus::Delivered)
    );
    // The laptop logs in; the next 100 go out at once, while its replay of the first 100 runs.
    let (laptop, mut laptop_events) = Client::start(config(
        vec![node.tcp()],
        node.token("bob"),
        "bob-laptop",
        "pc",
    ));
    let mut lap = Received::default();
    until(&mut laptop_events, &mut lap, |r| !r.connects.is_empty()).await;
    assert_eq!(
        (lap.connects[0].1, lap.connects[0].2),
        (false, 0),
        "a new device starts at 0"
    );
    assert_accepted(&send_numbered(&mut alice, "bob", 100..200).await);
    until(&mut phone_events, &mut phone, |r| r.messages.len() >= 200).await;
    until(&mut laptop_events, &mut lap, |r| r.messages.len() >= 200).await;
    phone.assert_exactly("phone", 0..200);
    lap.assert_exactly("laptop", 0..200);
    // The laptop caught up after the first 100 at the earliest, and only once.
    assert!(
        matches!(lap.caught_up.as_slice(), [(seq, before)] if *seq >= 100 && *before >= 100),
        "laptop: {:?}",
        lap.caught_up
    );

    // The laptop logs out (its session ends; its cursor stays), misses 50, and logs in again.
    laptop.close().await;
    drop(laptop_events);
    assert_accepted(&send_numbered(&mut alice, "bob", 200..250).await);
    until(&mut phone_events, &mut phone, |r| r.messages.len() >= 250).await;
    let (_laptop, mut laptop_events) = Client::start(config(
        vec![node.tcp()],
        node.token("bob"),
        "bob-laptop",
        "pc",
    ));
    let mut again = Received::default();
    until(&mut laptop_events, &mut again, |r| !r.caught_up.is_empty()).await;
    assert_eq!(
        again
            .connects
            .iter()
            .map(|c| (c.1, c.2, c.3))
            .collect::<Vec<_>>(),
        vec![(false, 200, 0)],
        "a fresh login from the device's cursor:\n  {}",
        again.tail()
    );
    again.assert_exactly("laptop again", 200..250);
    assert_eq!(again.caught_up, vec![(250, 50)], "{}", again.tail());
    // Nothing else is replayed: the next message is the next one sent.
    end_marker(&mut alice, &mut laptop_events, &mut again).await;
    again.assert_exactly("laptop again", 200..250);
    end_marker_seen_by(&mut phone_events, &mut phone).await;
    phone.assert_exactly("phone", 0..250);
    node.stop().await;
}

/// Records events up to the end marker that was already sent.
async fn end_marker_seen_by(events: &mut mpsc::Receiver<Event>, received: &mut Received) {
    until(events, received, |r| {
        r.messages.last().is_some_and(|(b, _)| b["end"] == true)
    })
    .await;
    received.messages.pop();
}

/// A raw `resume` on a new connection to `endpoint`.
async fn resume(
    endpoint: &Endpoint,
    session_id: &str,
    device_id: &str,
    last_seq: Option<u64>,
) -> common::Client {
    let mut c = common::Client::connect(endpoint).await;
    c.see_caught_up = true;
    c.send(ClientFrame::Resume {
        session_id: session_id.to_owned(),
        device_id: device_id.to_owned(),
        last_seq,
        client_version: None,
        heartbeat: None,
    })
    .await;
    c
}

/// Expects an `error` with `code` and then the end of the connection.
async fn expect_refused(mut c: common::Client, code: ErrorCode, what: &str) {
    match c.recv().await {
        Some(ServerFrame::Error { error, .. }) if error == code => {}
        other => panic!("{what}: expected {code:?}, got {other:?}"),
    }
    assert!(c.recv().await.is_none(), "{what}: the connection closes");
}

/// Expects a stream push at `seq` with text `text` and acknowledges it.
async fn expect_push(c: &mut common::Client, want_seq: u64, text: &str) {
    match c.recv().await {
        Some(ServerFrame::Push { seq, body, .. }) => {
            assert_eq!(
                (seq, body.parse::<Value>().unwrap()),
                (Some(want_seq), json!({ "text": text }))
            );
        }
        other => panic!("expected push {want_seq}, got {other:?}"),
    }
    c.send(ClientFrame::Ack {
        seq: Some(want_seq),
        id: None,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_on_another_node_replays_what_was_missed() {
    init_tracing();
    let db = MysqlDb::create().await;
    let (node1, node2) = two_nodes(&db).await;
    let mut alice = node2.login(&node2.tcp(), "alice", "app").await;

    let mut bob = common::Client::connect(&node1.tcp()).await;
    bob.see_caught_up = true;
    bob.send(ClientFrame::Login {
        token: node1.token("bob"),
        device_id: "bob-phone".into(),
        channel: "app".into(),
        client_version: None,
        heartbeat: None,
        last_seq: None,
    })
    .await;
    let old_session = match bob.recv().await {
        Some(ServerFrame::LoginResult {
            session_id,
            resumed: false,
            cursor: 0,
            node_id,
            ..
        }) if node_id == "node-1" => session_id,
        other => panic!("{other:?}"),
    };
    assert!(matches!(
        bob.recv().await,
        Some(ServerFrame::CaughtUp { seq: 0 })
    ));
    for i in 1..=3 {
        let status = alice.send_text("bob", &format!("m{i}")).await;
        assert!(
            matches!(
                status,
                ServerFrame::SendResult {
                    status: SendStatus::Delivered,
                    ..
                }
            ),
            "{status:?}"
        );
        expect_push(&mut bob, i, &format!("m{i}")).await;
    }
    bob.conn.close().await.unwrap();
    drop(bob);
    eventually("bob's connection gone from presence", || async {
        let (_, p) = node2
            .admin_json(Method::GET, "/api/v1/users/bob/presence", None)
            .await;
        p["connections"].as_array().is_some_and(|c| c.is_empty())
    })
    .await;
    for i in 4..=8 {
        let status = alice.send_text("bob", &format!("m{i}")).await;
        assert!(
            matches!(
                status,
                ServerFrame::SendResult {
                    status: SendStatus::Stored,
                    ..
                }
            ),
            "{status:?}"
        );
    }

    // Resume on the other node: what bob missed, in order, then caught_up.
    let mut bob = resume(&node2.tcp(), &old_session, "bob-phone", Some(3)).await;
    let new_session = match bob.recv().await {
        Some(ServerFrame::LoginResult {
            session_id,
            resumed: true,
            cursor: 3,
            node_id,
            user_id,
            ..
        }) if node_id == "node-2" && user_id == "bob" => session_id,
        other => panic!("{other:?}"),
    };
    assert_ne!(new_session, old_session, "the session id rotates");
    for i in 4..=8 {
        expect_push(&mut bob, i, &format!("m{i}")).await;
    }
    match bob.recv().await {
        Some(ServerFrame::CaughtUp { seq: 8 }) => {}
        other => panic!("expected caught_up 8, got {other:?}"),
    }
    // The connection is live: a heartbeat is answered, and nothing else came meanwhile.
    bob.send(ClientFrame::Heartbeat {}).await;
    assert!(
        matches!(bob.recv().await, Some(ServerFrame::HeartbeatAck { .. })),
        "nothing after caught_up"
    );
    bob.conn.close().await.unwrap();
    drop(bob);

    // The presented id was used up, on every node.
    for node in [&node1, &node2] {
        let c = resume(&node.tcp(), &old_session, "bob-phone", Some(8)).await;
        expect_refused(c, ErrorCode::SessionExpired, "the old session id").await;
    }
    // The new id belongs to bob-phone only.
    let c = resume(&node1.tcp(), &new_session, "bob-laptop", Some(8)).await;
    expect_refused(c, ErrorCode::InvalidDevice, "another device").await;
    // ...and the refusal left it as it was: bob-phone still resumes with it.
    let mut bob = resume(&node1.tcp(), &new_session, "bob-phone", Some(8)).await;
    match bob.recv().await {
        Some(ServerFrame::LoginResult {
            session_id,
            resumed: true,
            cursor: 8,
            ..
        }) => assert!(session_id != new_session && session_id != old_session),
        other => panic!("{other:?}"),
    }
    match bob.recv().await {
        Some(ServerFrame::CaughtUp { seq: 8 }) => {}
        other => panic!("expected caught_up 8, got {other:?}"),
    }
    drop(bob);
    drop(alice);
    node1.stop().await;
    node2.stop().await;
    db.drop_database().await;
}

/// Logs `user` in as `device` on `app` with a raw `login`; returns the client (past its
/// `caught_up`) and its session id.
async fn login_device(node: &TestNode, user: &str, device: &str) -> (common::Client, String) {
    let mut c = common::Client::connect(&node.tcp()).await;
    c.send(ClientFrame::Login {
        token: node.token(user),
        device_id: device.into(),
        channel: "app".into(),
        client_version: None,
        heartbeat: None,
        last_seq: None,
    })
    .await;
    match c.recv().await {
        Some(ServerFrame::LoginResult { session_id, .. }) => (c, session_id),
        other => panic!("login failed: {other:?}"),
    }
}

/// Expects a `login_result` of a resumed session; returns its new id.
async fn expect_resumed(c: &mut common::Client, presented: &str) -> String {
    match c.recv().await {
        Some(ServerFrame::LoginResult {
            session_id,
            resumed: true,
            ..
        }) => {
            assert_ne!(session_id, presented, "the session id rotates");
            session_id
        }
        other => panic!("expected a resumed login_result, got {other:?}"),
    }
}

/// Waits until `user` has no connection in `node`'s view of presence.
async fn until_offline(node: &TestNode, user: &str) {
    eventually("the user's connections gone from presence", || async {
        let (_, p) = node
            .admin_json(Method::GET, &format!("/api/v1/users/{user}/presence"), None)
            .await;
        p["connections"].as_array().is_some_and(|c| c.is_empty())
    })
    .await;
}

/// A RESUME that the node refuses after it found the session (here: `reject_new`, the device's
/// old connection still being there) uses nothing up: the same session resumes afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_resume_leaves_the_session_resumable() {
    init_tracing();
    let node = TestNode::start_with(|s| {
        s.channels.duplicate_login = imgate::config::DuplicateLoginPolicy::RejectNew;
    })
    .await;
    let (mut old, session) = login_device(&node, "bob", "bob-phone").await;

    for attempt in 0..3 {
        let c = resume(&node.tcp(), &session, "bob-phone", None).await;
        expect_refused(c, ErrorCode::DuplicateLogin, &format!("attempt {attempt}")).await;
    }
    old.conn.close().await.unwrap();
    drop(old);
    until_offline(&node, "bob").await;

    let mut bob = resume(&node.tcp(), &session, "bob-phone", None).await;
    expect_resumed(&mut bob, &session).await;
    drop(bob);
    node.stop().await;
}

/// The same across nodes, with sessions in Redis: node 2 refuses the RESUME because node 1 holds
/// the device's connection, and resumes it once that connection is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_refused_on_one_node_resumes_later_on_it() {
    init_tracing();
    let db = MysqlDb::create().await;
    let prefix = random_prefix();
    let mut nodes = Vec::new();
    for i in 1..=2 {
        let (prefix, url) = (prefix.clone(), db.url.clone());
        nodes.push(
            IsolatedNode::start_with(move |s| {
                cluster_settings(s, i, &prefix, &url, RoutingMode::Routed);
                s.channels.duplicate_login = imgate::config::DuplicateLoginPolicy::RejectNew;
            })
            .await,
        );
    }
    let (node1, node2) = (&nodes[0], &nodes[1]);
    let (mut old, session) = login_device(node1, "bob", "bob-phone").await;

    let c = resume(&node2.tcp(), &session, "bob-phone", None).await;
    expect_refused(c, ErrorCode::DuplicateLogin, "held on node 1").await;
    old.conn.close().await.unwrap();
    drop(old);
    until_offline(node2, "bob").await;

    let mut bob = resume(&node2.tcp(), &session, "bob-phone", None).await;
    let new = expect_resumed(&mut bob, &session).await;
    drop(bob);
    // Used up now, and only now.
    until_offline(node1, "bob").await;
    let c = resume(&node1.tcp(), &session, "bob-phone", None).await;
    expect_refused(c, ErrorCode::SessionExpired, "the used-up id").await;
    let mut bob = resume(&node1.tcp(), &new, "bob-phone", None).await;
    expect_resumed(&mut bob, &new).await;
    drop(bob);
    for node in nodes {
        node.stop().await;
    }
    db.drop_database().await;
}

/// Under `kick_old`, a RESUME while the device's old connection is still open (the client saw
/// the network go before the server did) kicks that connection and takes its session over: the
/// kick does not revoke the session being resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_that_displaces_its_own_old_connection_keeps_the_session() {
    init_tracing();
    let node = TestNode::start().await;
    for round in 0..5 {
        let user = format!("carol{round}");
        let (mut old, session) = login_device(&node, &user, "carol-phone").await;
        let mut carol = resume(&node.tcp(), &session, "carol-phone", None).await;
        let new = expect_resumed(&mut carol, &session).await;
        let kicked = old.until_closed().await;
        assert!(
            kicked.iter().any(|f| matches!(
                f,
                ServerFrame::Kick {
                    reason: imgate_shared::KickReason::DuplicateLogin,
                    ..
                }
            )),
            "{kicked:?}"
        );
        // The new session is live: the broken connection resumes with it.
        drop(carol);
        until_offline(&node, &user).await;
        let mut carol = resume(&node.tcp(), &new, "carol-phone", None).await;
        expect_resumed(&mut carol, &new).await;
    }
    node.stop().await;
}

/// The same across nodes: node 2's kick of node 1's connection leaves the session to the RESUME.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_on_another_node_that_displaces_the_old_connection_keeps_the_session() {
    init_tracing();
    let db = MysqlDb::create().await;
    let (node1, node2) = two_nodes(&db).await;
    for round in 0..3 {
        let user = format!("dave{round}");
        let (mut old, session) = login_device(&node1, &user, "dave-phone").await;
        let mut dave = resume(&node2.tcp(), &session, "dave-phone", None).await;
        let new = expect_resumed(&mut dave, &session).await;
        old.until_closed().await;
        drop(dave);
        until_offline(&node1, &user).await;
        let mut dave = resume(&node1.tcp(), &new, "dave-phone", None).await;
        expect_resumed(&mut dave, &new).await;
    }
    node1.stop().await;
    node2.stop().await;
    db.drop_database().await;
}

/// A RESUME refused `UNAVAILABLE` because the message store cannot be reached (after the session
/// was found) leaves the session as it was: once the database is back, the same id resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_refused_while_the_store_is_down_resumes_once_it_is_back() {
    init_tracing();
    let db = MysqlDb::create().await;
    let server: std::net::SocketAddr = common::mysql_server_url()
        .rsplit('@')
        .next()
        .unwrap()
        .parse()
        .expect("TEST_MYSQL_URL is mysql://user@ip:port");
    let proxy = Proxy::start(server).await;
    let url = db
        .url
        .replace(&server.to_string(), &proxy.addr().to_string());
    let node = TestNode::start_with(|s| s.store.url = imgate::config::Secret::new(url)).await;
    let (mut old, session) = login_device(&node, "bob", "bob-phone").await;
    old.conn.close().await.unwrap();
    drop(old);
    until_offline(&node, "bob").await;

    proxy.block();
    for attempt in 0..2 {
        let c = resume(&node.tcp(), &session, "bob-phone", None).await;
        expect_refused(c, ErrorCode::Unavailable, &format!("attempt {attempt}")).await;
    }
    proxy.unblock();
    let mut bob = resume(&node.tcp(), &session, "bob-phone", None).await;
    expect_resumed(&mut bob, &session).await;
    drop(bob);
    node.stop().await;
    db.drop_database().await;
}
