//! Bad and hostile clients: oversized and malformed frames, clients that stop reading, a full
//! node — and graceful shutdown. Other connections must not notice.

mod common;

use bytes::Bytes;
use common::{metric_value, Client, TestNode};
use futures_util::SinkExt;
use imgate_shared::connection::ClientConnection;
use imgate_shared::{ClientFrame, ErrorCode, KickReason, SendStatus, ServerFrame};
use reqwest::Method;
use serde_json::json;
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn oversized_frames_get_an_error_and_close_without_disturbing_others() {
    let node = TestNode::start_with(|s| s.client.max_frame_len = 1024).await;
    let mut bystander = node.login(&node.tcp(), "bystander", "app").await;
    let mut alice = node.login(&node.tcp(), "alice", "app").await;

    // TCP: a length prefix above the maximum. Nothing after it can be trusted: ERROR, then close.
    let mut tcp = node.login(&node.tcp(), "big-tcp", "app").await;
    if let ClientConnection::Tcp(framed) = &mut tcp.conn {
        framed
            .get_mut()
            .write_all(&(1025u32).to_be_bytes())
            .await
            .unwrap();
        framed.get_mut().write_all(&[b' '; 1025]).await.unwrap();
    }
    let frames = tcp.until_closed().await;
    assert!(
        matches!(
            frames.as_slice(),
            [ServerFrame::Error {
                error: ErrorCode::FrameTooLarge,
                ..
            }]
        ),
        "{frames:?}"
    );

    // Before login too.
    let mut raw = tokio::net::TcpStream::connect(node.client_addr)
        .await
        .unwrap();
    raw.write_all(&(1_000_000u32).to_be_bytes()).await.unwrap();
    let framed = tokio_util::codec::Framed::new(raw, imgate_shared::codec::frame_codec(1 << 20));
    let mut early = Client::from_conn(ClientConnection::Tcp(Box::new(framed)));
    assert!(matches!(
        early.recv().await,
        Some(ServerFrame::Error {
            error: ErrorCode::FrameTooLarge,
            ..
        })
    ));

    // WebSocket: a text message above the maximum.
    let mut ws = node.login(&node.ws(), "big-ws", "web").await;
    let big = format!(
        r#"{{"type":"send","to":"alice","client_msg_id":"b","body":"{}"}}"#,
        "x".repeat(2000)
    );
    ws.conn.send_raw(Bytes::from(big)).await.unwrap();
    let frames = ws.until_closed().await;
    assert!(
        matches!(
            frames.as_slice(),
            [ServerFrame::Error {
                error: ErrorCode::FrameTooLarge,
                ..
            }]
        ),
        "{frames:?}"
    );

    assert_eq!(
        alice.send_text("bystander", "still fine").await.kind(),
        "send_result"
    );
    assert_eq!(bystander.recv_push().await.2, json!({"text": "still fine"}));
    // A send that just fits becomes a push a little longer than the limit: it is still delivered.
    let near_limit = "y".repeat(1024 - 120);
    assert_eq!(
        alice.send_text("bystander", &near_limit).await.kind(),
        "send_result"
    );
    assert_eq!(bystander.recv_push().await.2, json!({ "text": near_limit }));
    // The admin API refuses bodies that could not travel as a frame.
    let (status, reply) = node
        .admin_json(
            Method::POST,
            "/api/v1/messages",
            Some(json!({"to": "bystander", "body": "z".repeat(2000)})),
        )
        .await;
    assert_eq!(status, 400, "{reply}");
    let metrics = node.metrics().await;
    assert!(
        metric_value(
            &metrics,
            "imgate_protocol_errors_total",
            &["error=\"FRAME_TOO_LARGE\""]
        ) >= 3.0
    );
    node.stop().await;
}

#[tokio::test]
async fn malformed_frames_get_an_error_and_the_connection_stays() {
    let node = TestNode::start().await;
    for endpoint in [node.tcp(), node.ws()] {
        let mut c = node.login(&endpoint, "alice", "app").await;
        for bad in [
            &b"{not json"[..],
            br#"{"type":"warp"}"#,
            br#"{"type":"send","to":"bob"}"#,
            b"[1,2,3]",
        ] {
            c.conn.send_raw(Bytes::copy_from_slice(bad)).await.unwrap();
            match c.recv().await {
                Some(ServerFrame::Error {
                    error: ErrorCode::BadFrame,
                    code: 1000,
                    message,
                    ..
                }) => assert!(!message.is_empty()),
                other => panic!("{other:?}"),
            }
        }
        c.send(ClientFrame::Heartbeat {}).await;
        assert!(
            matches!(c.recv().await, Some(ServerFrame::HeartbeatAck { .. })),
            "still open"
        );
    }
    node.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_while_others_keep_receiving() {
    let node = TestNode::start_with(|s| {
        s.client.outbox_capacity = 8;
        s.client.write_timeout_ms = 500;
        // The frame limits, not the byte limits (which drop stream pushes from memory rather
        // than kick; see tests/quotas.rs).
        s.client.max_queued_bytes = 1 << 30;
        s.client.max_queued_bytes_total = 1 << 30;
    })
    .await;
    // `slow` logs in and then never reads again.
    let _slow = node.login(&node.tcp(), "slow", "app").await;
    let mut fast = node.login(&node.ws(), "fast", "web").await;
    let body = json!({ "blob": "x".repeat(32 * 1024) });

    let mut sent = 0;
    let disconnected = loop {
        assert!(sent < 5_000, "the slow consumer was never disconnected");
        let (status, reply) = node
            .admin_json(
                Method::POST,
                "/api/v1/messages",
                Some(json!({"to": ["slow", "fast"], "body": body})),
            )
            .await;
        assert_eq!(status, 200, "{reply}");
        sent += 1;
        // The fast client keeps receiving every message.
        let (_, to, _) = fast.recv_push().await;
        assert_eq!(to, "fast");
        if reply["results"][0]["status"] == "stored" {
            break sent;
        }
    };
    assert!(
        disconnected > 8,
        "not before the outbox and socket buffers filled ({disconnected})"
    );
    // The kick takes effect once the blocked write gives up (write_timeout_ms); bounded wait.
    let mut polls = 0;
    loop {
        let (_, presence) = node
            .admin_json(Method::GET, "/api/v1/users/slow/presence", None)
            .await;
        if presence["online"] == false {
            break;
        }
        polls += 1;
        assert!(polls < 2_000, "the slow consumer stayed registered");
        let _ = fast.send_text("nobody", "tick").await;
    }
    let metrics = node.metrics().await;
    assert_eq!(
        metric_value(&metrics, "imgate_slow_consumer_kicks_total", &[]),
        1.0
    );
    assert_eq!(
        metric_value(
            &metrics,
            "imgate_kicks_total",
            &["reason=\"slow_consumer\""]
        ),
        1.0
    );
    node.stop().await;
}

#[tokio::test]
async fn connections_above_the_limit_are_refused() {
    let node = TestNode::start_with(|s| s.client.max_connections = Some(2)).await;
    let _a = node.login(&node.tcp(), "a", "app").await;
    let _b = node.login(&node.ws(), "b", "app").await;
    for endpoint in [node.tcp(), node.ws()] {
        let mut c = Client::connect(&endpoint).await;
        let reply = c.login(&node.token("c"), "app", None).await;
        assert!(
            matches!(
                reply,
                ServerFrame::Error {
                    error: ErrorCode::ServerFull,
                    ..
                }
            ),
            "{reply:?}"
        );
        assert!(c.recv().await.is_none());
    }
    node.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_kicks_every_client_and_stops_listening() {
    let node = TestNode::start().await;
    let mut tcp = node.login(&node.tcp(), "alice", "app").await;
    let mut ws = node.login(&node.ws(), "bob", "web").await;
    let addr = node.client_addr;
    let admin = node.admin_addr;
    node.shutdown.cancel();
    for c in [&mut tcp, &mut ws] {
        let frames = c.until_closed().await;
        assert!(
            matches!(frames.as_slice(), [ServerFrame::Kick { reason: KickReason::Shutdown, message }] if message.contains("reconnect")),
            "{frames:?}"
        );
    }
    tokio::time::timeout(common::WAIT, node.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "client port closed"
    );
    assert!(
        tokio::net::TcpStream::connect(admin).await.is_err(),
        "admin port closed"
    );
}

#[tokio::test]
async fn a_websocket_on_another_path_is_refused() {
    let node = TestNode::start().await;
    let url = format!("ws://{}/elsewhere", node.client_addr);
    let err = tokio_tungstenite::connect_async(url).await.unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
    // And a WebSocket client that closes politely leaves nothing behind.
    let mut c = node.login(&node.ws(), "alice", "web").await;
    if let ClientConnection::Ws(ws) = &mut c.conn {
        ws.close().await.unwrap();
    }
    let mut bob = node.login(&node.tcp(), "bob", "app").await;
    let mut delivered = SendStatus::Delivered;
    for _ in 0..200 {
        if let ServerFrame::SendResult { status, .. } = bob.send_text("alice", "gone?").await {
            delivered = status;
            if status == SendStatus::Stored {
                break;
            }
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(delivered, SendStatus::Stored);
    node.stop().await;
}

/// A client that streams large frames back to back must not take the node's worker for
/// itself: its reads yield to other tasks when the task's cooperative budget is spent. The node
/// runs on a runtime of its own with a single worker, so a task that never yields stops
/// everything else there: other clients' round trips, `/healthz` and the shutdown. (Whether a
/// given run hits the spent budget in the middle of a frame depends on timing; the TCP reader's
/// unit test `a_spent_budget_in_the_middle_of_a_frame_yields_instead_of_spinning` makes it
/// happen every time.)
#[test]
fn a_client_streaming_large_frames_does_not_hang_the_node() {
    let node_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let test_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    test_rt.block_on(async {
        let node = node_rt
            .spawn(TestNode::start_with(|s| {
                s.client.max_frame_len = 128 * 1024
            }))
            .await
            .unwrap();
        let mut bystander = node.login(&node.tcp(), "bystander", "app").await;
        for endpoint in [node.tcp(), node.ws()] {
            let mut streamer = node.login(&endpoint, "streamer", "app").await;
            // Acknowledgements padded with whitespace to 60 KB: valid, answered with nothing.
            // 30 MB of them, written as fast as the socket takes them, so that the node keeps
            // finding part of a frame to read, and more arriving.
            let frame = format!(r#"{{"type":"ack","seq":0{}}}"#, " ".repeat(60_000));
            let count = 500;
            let stream = tokio::spawn(async move {
                match &mut streamer.conn {
                    ClientConnection::Tcp(framed) => {
                        let mut bytes = Vec::with_capacity(count * (frame.len() + 4));
                        for _ in 0..count {
                            bytes.extend_from_slice(&(frame.len() as u32).to_be_bytes());
                            bytes.extend_from_slice(frame.as_bytes());
                        }
                        framed.get_mut().write_all(&bytes).await.unwrap();
                    }
                    ClientConnection::Ws(_) => {
                        let frame = Bytes::from(frame);
                        for _ in 0..count {
                            streamer.conn.send_raw(frame.clone()).await.unwrap();
                        }
                    }
                }
                streamer
            });
            // Meanwhile the node answers others, round trip after round trip.
            while !stream.is_finished() {
                bystander.send(ClientFrame::Heartbeat {}).await;
                let answer = tokio::time::timeout(common::WAIT, bystander.recv())
                    .await
                    .expect("the node answers while a client streams large frames");
                assert!(
                    matches!(answer, Some(ServerFrame::HeartbeatAck { .. })),
                    "{answer:?}"
                );
                let health =
                    tokio::time::timeout(common::WAIT, node.http.get(node.url("/healthz")).send())
                        .await
                        .expect("/healthz answers while a client streams large frames")
                        .unwrap();
                assert_eq!(health.status(), 200);
            }
            let mut streamer = stream.await.unwrap();
            // Every frame was read: the connection still answers, after them, in order.
            streamer.send(ClientFrame::Heartbeat {}).await;
            assert!(
                matches!(
                    streamer.recv().await,
                    Some(ServerFrame::HeartbeatAck { .. })
                ),
                "the streamed frames were all read"
            );
        }
        // And the shutdown completes.
        node.stop().await;
    });
    node_rt.shutdown_background();
}
