//! Every resource a client can make the node spend has a limit: queued bytes per connection and
//! per node, send rates per connection and per user, connections per user, and login attempts
//! per source address.

mod common;

use common::{metric_value, Client, TestNode};
use imgate_shared::{ClientFrame, ServerFrame};
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
