//! A node out of file descriptors still answers new connections (by closing them at once, with
//! its reserve descriptor) instead of leaving them in the backlog.
//!
//! This changes the open-file limit of the whole test process, so it is the only test in its
//! binary.

mod common;

use std::fs::File;

use common::{metric_value, TestNode, WAIT};
use imgate_shared::ServerFrame;
use tokio::io::AsyncReadExt;
use tokio::net::TcpSocket;

fn nofile() -> libc::rlimit {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0
    );
    limit
}

fn set_nofile(limit: &libc::rlimit) {
    // SAFETY: setrlimit reads the struct it is given.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, limit) }, 0);
}

/// The highest descriptor number open in this process.
fn highest_fd() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()
        .unwrap()
}

#[tokio::test]
async fn a_node_out_of_descriptors_closes_new_connections_at_once() {
    let node = TestNode::start().await;
    // The client's socket exists before the process runs out: connecting needs no descriptor.
    let socket = TcpSocket::new_v4().unwrap();

    // Run out: a limit just above the highest open descriptor, every free number below it taken.
    let original = nofile();
    set_nofile(&libc::rlimit {
        rlim_cur: highest_fd() + 1,
        rlim_max: original.rlim_max,
    });
    let mut fillers = Vec::new();
    while let Ok(f) = File::open("/dev/null") {
        fillers.push(f);
    }

    let mut stream = socket.connect(node.client_addr).await.unwrap();
    // The node cannot accept it normally; it must still close it, not leave it waiting.
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(WAIT, stream.read(&mut buf))
        .await
        .expect("the node closes the connection instead of leaving it in the backlog");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    drop(fillers);
    set_nofile(&original);

    // With descriptors again, clients log in, and the refusal was counted.
    let mut c = node.login(&node.tcp(), "alice", "app").await;
    c.send(imgate_shared::ClientFrame::Heartbeat {}).await;
    assert!(matches!(
        c.recv().await,
        Some(ServerFrame::HeartbeatAck { .. })
    ));
    let metrics = node.metrics().await;
    assert_eq!(
        metric_value(
            &metrics,
            "imgate_connections_rejected_total",
            &["reason=\"descriptors\""]
        ),
        1.0,
        "{metrics}"
    );
    node.stop().await;
}
