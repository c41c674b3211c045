//! The async Rust client against a real node: login, send → receipt, receive with acks, and
//! reconnecting by itself after the server drops it.

mod common;

use common::TestNode;
use imgate_shared::client::{Backoff, Client, ClientConfig, Event};
use imgate_shared::protocol::Body;
use imgate_shared::{KickReason, SendStatus};
use reqwest::Method;
use serde_json::json;
use std::time::Duration;
use tokio::sync::mpsc;

fn config(node: &TestNode, user: &str, ws: bool) -> ClientConfig {
    let endpoint = if ws { node.ws() } else { node.tcp() };
    let mut c = ClientConfig::new(
        vec![endpoint],
        node.token(user),
        format!("{user}-device"),
        if ws { "web" } else { "app" },
    );
    c.backoff = Backoff {
        initial: Duration::from_millis(10),
        max: Duration::from_millis(100),
        jitter: 0.5,
    };
    c
}

async fn next_event(events: &mut mpsc::Receiver<Event>) -> Event {
    tokio::time::timeout(common::WAIT, events.recv())
        .await
        .expect("an event in time")
        .expect("client running")
}

async fn connected(events: &mut mpsc::Receiver<Event>) {
    loop {
        match next_event(events).await {
            Event::Connected { node_id, .. } => {
                assert_eq!(node_id, "node-1");
                return;
            }
            Event::Disconnected { .. } | Event::Kicked { .. } => continue,
            other => panic!("{other:?}"),
        }
    }
}

async fn message_text(events: &mut mpsc::Receiver<Event>) -> String {
    loop {
        if let Event::Message(m) = next_event(events).await {
            return m.body.parse::<serde_json::Value>().unwrap()["text"]
                .as_str()
                .unwrap()
                .to_owned();
        }
    }
}

#[tokio::test]
async fn two_clients_chat_and_reconnect_after_being_dropped() {
    let node = TestNode::start().await;
    let (alice, mut alice_events) = Client::start(config(&node, "alice", false));
    let (bob, mut bob_events) = Client::start(config(&node, "bob", true));
    connected(&mut alice_events).await;
    connected(&mut bob_events).await;

    let receipt = alice
        .send("bob", Body::from_value(&json!({"text": "hi"})).unwrap())
        .await
        .unwrap();
    assert_eq!(receipt.status, SendStatus::Delivered);
    assert!(receipt.id.is_some());
    assert_eq!(message_text(&mut bob_events).await, "hi");
    let receipt = bob
        .send(
            "alice",
            Body::from_value(&json!({"text": "hello"})).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(receipt.status, SendStatus::Delivered);
    assert_eq!(message_text(&mut alice_events).await, "hello");

    // The client acknowledged what it handed over.
    let metrics = node.metrics().await;
    assert_eq!(
        common::metric_value(&metrics, "imgate_acks_total", &[]),
        2.0
    );

    // An operator kicks bob: the client reports it and comes back by itself.
    let (status, _) = node
        .admin_json(Method::DELETE, "/api/v1/users/bob/connections", None)
        .await;
    assert_eq!(status, 200);
    match next_event(&mut bob_events).await {
        Event::Kicked { reason } => assert_eq!(reason, KickReason::Admin),
        other => panic!("{other:?}"),
    }
    connected(&mut bob_events).await;
    let receipt = alice
        .send(
            "bob",
            Body::from_value(&json!({"text": "welcome back"})).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(receipt.status, SendStatus::Delivered);
    assert_eq!(message_text(&mut bob_events).await, "welcome back");

    alice.close().await;
    bob.close().await;
    node.stop().await;
}

#[tokio::test]
async fn a_bad_token_stops_the_client_with_the_error() {
    let node = TestNode::start().await;
    let mut c = config(&node, "alice", false);
    c.token = "garbage".into();
    let (_client, mut events) = Client::start(c);
    match next_event(&mut events).await {
        Event::LoginFailed { code, .. } => assert_eq!(code, imgate_shared::ErrorCode::TokenInvalid),
        other => panic!("{other:?}"),
    }
    node.stop().await;
}
