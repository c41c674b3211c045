//! Log hygiene: a warning that every refused message would cause is limited per call site, and
//! what it leaves out is counted in `imgate_log_lines_suppressed_total`.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::proxy::Proxy;
use common::{metric_value, random_prefix, TestNode};
use imgate::config::Secret;
use imgate_shared::{ErrorCode, SendStatus, ServerFrame};

/// Log output captured in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn lines_with(&self, needle: &str) -> Vec<String> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

fn refused_unavailable(receipt: &ServerFrame) -> bool {
    matches!(
        receipt,
        ServerFrame::SendResult {
            status: SendStatus::Refused,
            reason: Some(ErrorCode::Unavailable),
            ..
        }
    )
}

/// With Redis gone, every message is refused `UNAVAILABLE` and the router would log one WARN line
/// for each: the site logs `log.repeat_limit` lines, and counts the rest.
// One thread: the node's tasks run where the test's subscriber is the default.
#[tokio::test(flavor = "current_thread")]
async fn a_warning_per_refused_message_is_limited_and_counted() {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_writer(captured.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let redis: std::net::SocketAddr = common::redis_url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .parse()
        .expect("TEST_REDIS_URL is redis://host:port with an IP address");
    let proxy = Proxy::start(redis).await;
    let url = format!("redis://{}", proxy.addr());
    let node = TestNode::start_with(|s| {
        s.cluster.redis_url = Some(Secret::new(url));
        s.cluster.key_prefix = random_prefix();
        s.cluster.request_timeout_ms = 2_000;
        s.log.repeat_limit = 5;
        // Longer than the test: no new interval starts while it runs.
        s.log.repeat_interval_ms = 3_600_000;
    })
    .await;
    let mut alice = node.login(&node.tcp(), "alice", "app").await;
    assert!(!refused_unavailable(
        &alice.send_text("bob", "before").await
    ));

    proxy.block();
    // The node notices the closed connection; from then on every message is refused.
    let mut attempts = 0;
    while !refused_unavailable(&alice.send_text("bob", "during").await) {
        attempts += 1;
        assert!(attempts < 1_000, "messages still accepted with Redis gone");
    }
    const MORE: usize = 200;
    for _ in 0..MORE {
        let receipt = alice.send_text("bob", "during").await;
        assert!(refused_unavailable(&receipt), "{receipt:?}");
    }

    let lines = captured.lines_with("no stream position; message refused");
    assert_eq!(lines.len(), 5, "{lines:#?}");
    let suppressed = metric_value(
        &node.metrics().await,
        "imgate_log_lines_suppressed_total",
        &["router.rs:"],
    );
    assert!(
        suppressed >= (MORE + 1 - 5) as f64,
        "suppressed {suppressed}"
    );
    proxy.unblock();
    drop(alice);
    node.stop().await;
}

/// The binary's log written to a pipe (a file, a collector) is plain text: no colour escapes.
#[test]
fn the_log_has_no_colour_escapes_when_not_on_a_terminal() {
    use std::io::{BufRead, BufReader};
    let dir = std::env::temp_dir().join(format!("imgate-log-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_imgate"))
        .args([
            "--client-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .env(
            "IMGATE_STORE__URL",
            format!("sqlite://{}/imgate.db", dir.display()),
        )
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        let ready = line.contains("node ready");
        lines.push(line);
        if ready {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(lines.iter().any(|l| l.contains("INFO")), "{lines:?}");
    assert!(!lines.iter().any(|l| l.contains('\u{1b}')), "{lines:?}");
}
