//! The admin port's limits: idle, header and body timeouts, and the connection cap.

mod common;

use std::time::Duration;

use common::{TestNode, ADMIN_TOKEN, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

/// Writes `request` and reads one response (head and `content-length` body) as text.
async fn exchange(stream: &mut TcpStream, request: &str) -> String {
    stream.write_all(request.as_bytes()).await.unwrap();
    read_response(stream).await
}

async fn read_response(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    timeout(WAIT, async {
        loop {
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let len = text[..end]
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().unwrap())
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    return text;
                }
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before a whole response: {text:?}");
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("a response within the bound")
}

/// One response, or what came before the server closed the connection.
async fn until_response_or_closed(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    timeout(WAIT, async {
        let mut chunk = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&buf);
            if text.starts_with("HTTP/1.1 200") && text.ends_with("}") {
                return;
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("a response or a close within the bound");
    String::from_utf8_lossy(&buf).into_owned()
}

fn healthz() -> &'static str {
    "GET /healthz HTTP/1.1\r\nhost: imgate\r\n\r\n"
}

/// Waits for the server to close `stream`; returns what it sent before (a reset counts as a close).
async fn until_closed(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    timeout(WAIT, async {
        let mut chunk = [0u8; 4096];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("the server closes the connection within the bound");
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test]
async fn idle_admin_connections_are_closed_after_the_idle_timeout() {
    let node = TestNode::start_with(|s| s.admin.idle_timeout_ms = 200).await;
    // A connection that never sends a byte.
    let started = Instant::now();
    let mut silent = TcpStream::connect(node.admin_addr).await.unwrap();
    assert_eq!(until_closed(&mut silent).await, "");
    assert!(started.elapsed() >= Duration::from_millis(200));

    // A keep-alive connection after its request.
    let mut used = TcpStream::connect(node.admin_addr).await.unwrap();
    let response = exchange(&mut used, healthz()).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let answered = Instant::now();
    assert_eq!(until_closed(&mut used).await, "");
    assert!(answered.elapsed() >= Duration::from_millis(150));

    let metrics = node.metrics().await;
    assert!(
        common::metric_value(&metrics, "imgate_admin_timeouts_total", &["phase=\"idle\""]) >= 2.0,
        "{metrics}"
    );
    node.stop().await;
}

#[tokio::test]
async fn a_request_head_that_never_ends_is_cut_off_after_the_header_timeout() {
    let node = TestNode::start_with(|s| s.admin.header_timeout_ms = 200).await;
    let mut slow = TcpStream::connect(node.admin_addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nhost: im")
        .await
        .unwrap();
    let started = Instant::now();
    until_closed(&mut slow).await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    // The idle timeout (a minute by default) does not apply to it: this was the header timeout.
    assert!(started.elapsed() < Duration::from_secs(30));
    node.stop().await;
}

#[tokio::test]
async fn a_declared_body_that_never_comes_gets_408_within_the_body_timeout() {
    let node = TestNode::start_with(|s| s.admin.body_timeout_ms = 300).await;
    let mut stream = TcpStream::connect(node.admin_addr).await.unwrap();
    let started = Instant::now();
    let request = format!(
        "POST /api/v1/messages HTTP/1.1\r\nhost: imgate\r\nauthorization: Bearer {ADMIN_TOKEN}\r\ncontent-type: application/json\r\ncontent-length: 1000000\r\n\r\n{{\"to\":"
    );
    let response = exchange(&mut stream, &request).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    assert!(response.contains("body_timeout"), "{response}");
    // And the connection is closed: the rest of the body would be taken for a request.
    until_closed(&mut stream).await;

    let metrics = node.metrics().await;
    assert!(
        common::metric_value(&metrics, "imgate_admin_timeouts_total", &["phase=\"body\""]) >= 1.0,
        "{metrics}"
    );
    assert!(
        common::metric_value(
            &metrics,
            "imgate_admin_requests_total",
            &["route=\"/api/v1/messages\"", "status=\"408\""]
        ) >= 1.0,
        "{metrics}"
    );
    node.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_are_refused_and_open_ones_keep_working() {
    const MAX: usize = 3;
    let node = TestNode::start_with(|s| s.admin.max_connections = MAX).await;
    // The harness's HTTP client may hold a pooled connection too: open connections (each
    // proven accepted by a request) until one is refused.
    let mut open = Vec::new();
    let refused = loop {
        let mut stream = TcpStream::connect(node.admin_addr).await.unwrap();
        stream.write_all(healthz().as_bytes()).await.unwrap();
        // A refused connection is answered 503 and closed (or only closed, if the close won).
        let response = until_response_or_closed(&mut stream).await;
        if !response.starts_with("HTTP/1.1 200") {
            break response;
        }
        open.push(stream);
        assert!(
            open.len() <= MAX,
            "more than {MAX} admin connections accepted"
        );
    };
    assert!(
        refused.is_empty() || refused.starts_with("HTTP/1.1 503"),
        "{refused}"
    );
    assert!(
        refused.is_empty() || refused.contains("too_many_connections"),
        "{refused}"
    );
    assert!(!open.is_empty());

    // The connections already open still serve.
    for stream in &mut open {
        let response = exchange(stream, healthz()).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }
    let metrics = exchange(
        &mut open[0],
        "GET /metrics HTTP/1.1\r\nhost: imgate\r\n\r\n",
    )
    .await;
    assert!(
        common::metric_value(&metrics, "imgate_admin_connections_rejected_total", &[]) >= 1.0,
        "{metrics}"
    );

    // A closed connection frees its slot.
    drop(open.pop());
    let deadline = Instant::now() + WAIT;
    loop {
        let mut stream = TcpStream::connect(node.admin_addr).await.unwrap();
        stream.write_all(healthz().as_bytes()).await.unwrap();
        let response = until_response_or_closed(&mut stream).await;
        if response.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "no slot freed: {response}");
        tokio::task::yield_now().await;
    }
    node.stop().await;
}
