//! Heartbeats: the interval is negotiated from the client's range and the server's bounds, and a
//! connection silent for more than `heartbeat.missed` intervals is closed. Runs on paused time.

mod common;

use std::time::Duration;

use common::{Client, TestNode};
use imgate_shared::protocol::HeartbeatRange;
use imgate_shared::{ClientFrame, ServerFrame};
use tokio::time::Instant;

/// Logs in and waits until the device has caught up (its replay reads the store, real I/O
/// that must happen before the test pauses time). Returns the client, the negotiated interval
/// and idle timeout, and when the login was answered.
async fn login_with_range(
    node: &TestNode,
    min_ms: u64,
    max_ms: u64,
) -> (Client, u64, u64, Instant) {
    let mut c = Client::connect(&node.tcp()).await;
    let (hb, idle) = match c
        .login(
            &node.token("alice"),
            "app",
            Some(HeartbeatRange { min_ms, max_ms }),
        )
        .await
    {
        ServerFrame::LoginResult {
            heartbeat_ms,
            idle_timeout_ms,
            ..
        } => (heartbeat_ms, idle_timeout_ms),
        other => panic!("{other:?}"),
    };
    let answered = Instant::now();
    c.see_caught_up = true;
    assert!(matches!(c.recv().await, Some(ServerFrame::CaughtUp { .. })));
    c.see_caught_up = false;
    (c, hb, idle, answered)
}

#[tokio::test]
async fn interval_is_negotiated_within_both_ranges() {
    let node = TestNode::start_with(|s| {
        s.heartbeat.min_ms = 5_000;
        s.heartbeat.max_ms = 60_000;
        s.heartbeat.default_ms = 30_000;
        s.heartbeat.missed = 3;
    })
    .await;
    assert_eq!(login_with_range(&node, 10_000, 20_000).await.1, 20_000);
    assert_eq!(login_with_range(&node, 1_000, 600_000).await.1, 60_000);
    assert_eq!(login_with_range(&node, 1_000, 2_000).await.1, 5_000);
    let (_, hb, idle, _) = login_with_range(&node, 120_000, 240_000).await;
    assert_eq!((hb, idle), (60_000, 180_000));
    node.stop().await;
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_missed_intervals() {
    let node = TestNode::start_with(|s| s.heartbeat.missed = 3).await;
    // The node starts and the client logs in on the real clock (the store does real I/O); the
    // test then runs on paused time, which jumps ahead whenever everything waits.
    let (mut c, hb, idle, logged_in) = login_with_range(&node, 10_000, 10_000).await;
    tokio::time::pause();
    assert_eq!((hb, idle), (10_000, 30_000));
    let bound = Duration::from_millis(2 * idle);
    assert!(c.recv_within(bound).await.is_none(), "closed by the server");
    let silent_for = logged_in.elapsed();
    assert!(
        silent_for >= Duration::from_millis(idle),
        "closed too early: {silent_for:?}"
    );
    assert!(
        silent_for < Duration::from_millis(idle + hb),
        "closed too late: {silent_for:?}"
    );
    let metrics = node.metrics().await;
    assert_eq!(
        common::metric_value(&metrics, "imgate_heartbeat_timeouts_total", &[]),
        1.0
    );
    tokio::time::resume();
    node.stop().await;
}

#[tokio::test]
async fn heartbeats_keep_a_connection_alive() {
    let node = TestNode::start().await;
    // The node starts and the client logs in on the real clock (the store does real I/O); the
    // test then runs on paused time, which jumps ahead whenever everything waits.
    let (mut c, hb, idle, _) = login_with_range(&node, 10_000, 10_000).await;
    tokio::time::pause();
    let started = Instant::now();
    // Heartbeat at interval - 1 s, as clients should, for twice the idle timeout.
    while started.elapsed() < Duration::from_millis(2 * idle) {
        tokio::time::sleep(Duration::from_millis(hb - 1_000)).await;
        c.send(ClientFrame::Heartbeat {}).await;
        assert!(matches!(
            c.recv().await,
            Some(ServerFrame::HeartbeatAck { .. })
        ));
    }
    // Any frame counts as activity, not only heartbeats (here: a LOGIN, answered with an error).
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(hb)).await;
        c.send(ClientFrame::Login {
            token: node.token("alice"),
            device_id: "d".into(),
            channel: "app".into(),
            client_version: None,
            heartbeat: None,
            last_seq: None,
        })
        .await;
        assert!(matches!(c.recv().await, Some(ServerFrame::Error { .. })));
    }
    tokio::time::resume();
    node.stop().await;
}
