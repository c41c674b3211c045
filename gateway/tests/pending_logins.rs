//! Sockets that have not logged in yet are bounded, node-wide and per source address, so that
//! silent sockets cannot use up the node's descriptors before its connection limit applies.

mod common;

use std::net::SocketAddr;

use common::{metric_value, Client, TestNode};
use imgate_shared::connection::ClientConnection;
use imgate_shared::{ErrorCode, ServerFrame};
use tokio::net::TcpSocket;
use tokio_util::codec::Framed;

fn is_server_full(frame: &ServerFrame) -> bool {
    matches!(
        frame,
        ServerFrame::Error {
            error: ErrorCode::ServerFull,
            ..
        }
    )
}

/// Logs in `user` on a new connection and returns the reply.
async fn try_login(node: &TestNode, user: &str, channel: &str) -> (Client, ServerFrame) {
    let mut c = Client::connect(&node.tcp()).await;
    let reply = c.login(&node.token(user), channel, None).await;
    (c, reply)
}

/// A TCP client connection from the local address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> Client {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let stream = socket.connect(to).await.unwrap();
    let codec = imgate_shared::codec::frame_codec(imgate_shared::codec::DEFAULT_MAX_FRAME_LEN);
    Client::from_conn(ClientConnection::Tcp(Box::new(Framed::new(stream, codec))))
}

#[tokio::test]
async fn silent_sockets_beyond_max_pending_logins_are_refused_until_they_time_out() {
    let node = TestNode::start_with(|s| {
        s.client.max_pending_logins = 2;
        s.client.login_timeout_ms = 500;
    })
    .await;
    // Two sockets that never log in take both places (accepted in order, before the third).
    let mut silent = [
        Client::connect(&node.tcp()).await,
        Client::connect(&node.tcp()).await,
    ];
    let (mut refused, reply) = try_login(&node, "alice", "app").await;
    assert!(is_server_full(&reply), "{reply:?}");
    assert!(refused.recv().await.is_none(), "closed after SERVER_FULL");

    // The login timeout closes the silent sockets, and their places are free again.
    for c in &mut silent {
        let frames = c.until_closed().await;
        assert!(
            matches!(
                frames.as_slice(),
                [ServerFrame::Error {
                    error: ErrorCode::LoginTimeout,
                    ..
                }]
            ),
            "{frames:?}"
        );
    }
    let (_alice, reply) = try_login(&node, "alice", "app").await;
    assert!(
        matches!(reply, ServerFrame::LoginResult { .. }),
        "{reply:?}"
    );

    let metrics = node.metrics().await;
    assert!(
        metric_value(
            &metrics,
            "imgate_connections_rejected_total",
            &["reason=\"pending_logins\""]
        ) >= 1.0,
        "{metrics}"
    );
    node.stop().await;
}

#[tokio::test]
async fn logged_in_connections_do_not_count_as_pending() {
    let node = TestNode::start_with(|s| s.client.max_pending_logins = 1).await;
    // One at a time, any number of clients log in.
    let _a = node.login(&node.tcp(), "a", "app").await;
    let _b = node.login(&node.ws(), "b", "app").await;
    let _c = node.login(&node.tcp(), "c", "app").await;
    // A socket that does not log in takes the only place.
    let _silent = Client::connect(&node.tcp()).await;
    let (_d, reply) = try_login(&node, "d", "app").await;
    assert!(is_server_full(&reply), "{reply:?}");
    node.stop().await;
}

#[tokio::test]
async fn pending_logins_are_bounded_per_source_address() {
    let node = TestNode::start_with(|s| s.client.max_pending_logins_per_ip = 2).await;
    let _silent = [
        connect_from("127.0.0.1", node.client_addr).await,
        connect_from("127.0.0.1", node.client_addr).await,
    ];
    // A third socket from the same address is refused...
    let mut same = connect_from("127.0.0.1", node.client_addr).await;
    let reply = same.login(&node.token("alice"), "app", None).await;
    assert!(is_server_full(&reply), "{reply:?}");
    assert!(same.recv().await.is_none(), "closed after SERVER_FULL");
    // ...and one from another address logs in.
    let mut other = connect_from("127.0.0.2", node.client_addr).await;
    let reply = other.login(&node.token("bob"), "app", None).await;
    assert!(
        matches!(reply, ServerFrame::LoginResult { .. }),
        "{reply:?}"
    );

    let metrics = node.metrics().await;
    assert!(
        metric_value(
            &metrics,
            "imgate_connections_rejected_total",
            &["reason=\"pending_logins_per_ip\""]
        ) >= 1.0,
        "{metrics}"
    );
    node.stop().await;
}
