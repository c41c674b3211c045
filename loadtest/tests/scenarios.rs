//! Every scenario at tiny scale against a real gateway node started in this process on port 0
//! (`imgate::run`, as the gateway's own tests do): nothing may be lost and the numbers must add up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use imgate::config::Secret;
use imgate::{Listeners, RunError, Settings};
use imgate_loadtest::{Cli, Report, RunOptions};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "loadtest-test-secret";
const ADMIN_TOKEN: &str = "loadtest-test-admin-token";

struct Node {
    client: SocketAddr,
    admin: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), RunError>>,
    /// The node's SQLite store, a temp file of this test's own.
    db: PathBuf,
}

impl Node {
    async fn start() -> Node {
        Node::start_with(|_| {}).await
    }

    async fn start_with(configure: impl FnOnce(&mut Settings)) -> Node {
        let mut settings = Settings::default();
        settings.auth.secret = Some(Secret::new(SECRET));
        settings.admin.token = Some(Secret::new(ADMIN_TOKEN));
        settings.client.listen = "127.0.0.1:0".parse().unwrap();
        settings.admin.listen = "127.0.0.1:0".parse().unwrap();
        settings.shutdown.grace_ms = 5_000;
        let db = temp_file(&format!("{:016x}.db", rand_u64()));
        settings.store.url = Secret::new(format!("sqlite://{}", db.display()));
        configure(&mut settings);
        settings.validate().expect("valid settings");
        let client = TcpListener::bind(settings.client.listen).await.unwrap();
        let admin = TcpListener::bind(settings.admin.listen).await.unwrap();
        let (client_addr, admin_addr) = (client.local_addr().unwrap(), admin.local_addr().unwrap());
        // What the alloc endpoint tells clients: the port actually bound, not port 0.
        settings.client.advertise = Some(client_addr.to_string());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(imgate::run(
            settings,
            Listeners { client, admin },
            shutdown.clone(),
        ));
        let node = Node {
            client: client_addr,
            admin: admin_addr,
            shutdown,
            task,
            db,
        };
        node.wait_ready().await;
        node
    }

    /// Waits until `/readyz` answers 200: the node has opened its store and joined its cluster.
    async fn wait_ready(&self) {
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let url = format!("{}/readyz", self.admin());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http.get(&url).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the node is not ready within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn tcp(&self) -> String {
        format!("tcp://{}", self.client)
    }

    fn ws(&self) -> String {
        format!("ws://{}/ws", self.client)
    }

    fn admin(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// The scenario's command line with this node's secret and admin API.
    fn args(&self, scenario: &str, targets: &str, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "imgate-loadtest",
            scenario,
            "--targets",
            targets,
            "--secret",
            SECRET,
            "--admin",
            &self.admin(),
            "--admin-token",
            ADMIN_TOKEN,
            "--max-runtime",
            "60",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("the node stops")
            .unwrap()
            .unwrap();
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.db.display()));
        }
    }
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

async fn run(args: Vec<String>) -> Report {
    run_with(args, RunOptions::default()).await.unwrap()
}

async fn run_with(args: Vec<String>, opts: RunOptions) -> anyhow::Result<Report> {
    let cli = Cli::try_parse_from(args).expect("valid arguments");
    let report = tokio::time::timeout(Duration::from_secs(90), imgate_loadtest::run(cli, opts))
        .await
        .expect("the run ends by itself")?;
    Ok(report.expect("scenarios return a report"))
}

fn temp_file(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("imgate-loadtest-{}-{name}", std::process::id()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_holds_every_connection_and_reads_memory() {
    let node = Node::start().await;
    let out = temp_file("connect.json");
    let chart = temp_file("connect.svg");
    let report = run(node.args(
        "connect",
        &node.tcp(),
        &[
            "-n",
            "20",
            "--rate",
            "1000",
            "--hold",
            "1",
            "--settle",
            "0.3",
            "--heartbeat-ms",
            "5000",
            "--out",
            out.to_str().unwrap(),
            "--chart",
            chart.to_str().unwrap(),
        ],
    ))
    .await;
    let c = &report.connections;
    assert_eq!((c.requested, c.attempted, c.ok, c.failed), (20, 20, 20, 0));
    assert!(
        c.failures.is_empty() && c.closed_by_server.is_empty(),
        "{c:?}"
    );
    assert_eq!(c.login_latency.count, 20);
    assert!(c.login_rate_per_s > 0.0);
    let memory = report.memory.as_ref().expect("memory from the admin stats");
    assert_eq!(
        memory.connections, 20,
        "the gateway counted the connections"
    );
    assert!(memory.after_bytes > 0);
    // The JSON file holds the same report, and the chart is an SVG.
    let written: Report = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(written.connections.ok, 20);
    assert!(std::fs::read_to_string(&chart).unwrap().starts_with("<svg"));
    assert!(report
        .markdown()
        .contains("| connections ok / requested | 20 / 20 |"));
    let _ = std::fs::remove_file(out);
    let _ = std::fs::remove_file(chart);
    node.stop().await;
}

fn assert_chat_adds_up(report: &Report, messages: u64) {
    let chat = report.chat.as_ref().expect("a chat summary");
    assert_eq!(report.connections.ok, 20, "{:?}", report.connections);
    assert_eq!(chat.sent, messages, "{chat:?}");
    assert_eq!(chat.skipped, 0);
    assert_eq!(chat.receipts.get("delivered"), Some(&messages), "{chat:?}");
    assert_eq!(chat.receipts.values().sum::<u64>(), chat.sent);
    assert_eq!(chat.missing_receipts, 0);
    assert_eq!(chat.expected, messages);
    assert_eq!(chat.delivered, messages);
    assert_eq!((chat.lost, chat.duplicated, chat.unexpected), (0, 0, 0));
    assert_eq!(chat.latency.count, messages);
    assert_eq!(chat.receipt_latency.count, messages, "every receipt timed");
    assert!(chat.receipt_latency.p50_ms <= chat.receipt_latency.max_ms);
    assert!(
        chat.latency.p50_ms <= chat.latency.p99_ms && chat.latency.p99_ms <= chat.latency.max_ms
    );
    assert!(chat.throughput_per_s > 0.0);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_over_tcp_loses_nothing() {
    let node = Node::start().await;
    let report = run(node.args(
        "chat",
        &node.tcp(),
        &[
            "-n",
            "20",
            "--rate",
            "1000",
            "--messages",
            "200",
            "--duration",
            "10",
            "--payload",
            "300",
        ],
    ))
    .await;
    assert_chat_adds_up(&report, 200);
    node.stop().await;
}

/// Pushes that are never acknowledged come again at the same stream position: counted as
/// `resent` (a client drops them), not as duplicates handed to the application.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retransmissions_are_resent_not_duplicated() {
    let node = Node::start_with(|s| {
        s.delivery.ack_timeout_ms = 100;
        s.delivery.max_retransmits = 1_000;
    })
    .await;
    let report = run(node.args(
        "chat",
        &node.tcp(),
        &[
            "-n",
            "4",
            "--rate",
            "200",
            "--messages",
            "40",
            "--no-ack",
            "--drain",
            "1",
        ],
    ))
    .await;
    let ch = report.chat.as_ref().expect("chat results");
    assert_eq!((ch.delivered, ch.lost, ch.duplicated), (40, 0, 0), "{ch:?}");
    assert!(ch.resent > 0, "{ch:?}");
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_over_websocket_loses_nothing() {
    let node = Node::start().await;
    let report = run(node.args(
        "chat",
        &node.ws(),
        &[
            "-n",
            "20",
            "--rate",
            "1000",
            "--messages",
            "200",
            "--duration",
            "10",
        ],
    ))
    .await;
    assert_eq!(report.transport, "ws");
    assert_chat_adds_up(&report, 200);
    node.stop().await;
}

/// Two worker processes (this crate's binary) and two "targets" (the node's TCP and WebSocket
/// endpoints), half the messages addressed across them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_in_two_processes_across_two_targets() {
    let node = Node::start().await;
    let targets = format!("{},{}", node.tcp(), node.ws());
    let report = run_with(
        node.args(
            "chat",
            &targets,
            &[
                "-n",
                "20",
                "--procs",
                "2",
                "--rate",
                "1000",
                "--messages",
                "200",
                "--cross-node-share",
                "0.5",
                "--duration",
                "10",
            ],
        ),
        RunOptions {
            exe: Some(PathBuf::from(env!("CARGO_BIN_EXE_imgate-loadtest"))),
            print: false,
        },
    )
    .await
    .unwrap();
    assert_eq!(report.procs, 2);
    assert_eq!(report.transport, "tcp+ws");
    assert_chat_adds_up(&report, 200);
    node.stop().await;
}

/// The nodes come from the gateway's public alloc endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_finds_the_nodes_through_alloc() {
    let node = Node::start().await;
    let alloc = format!("{}/api/v1/alloc", node.admin());
    let mut args = node.args(
        "chat",
        "unused",
        &[
            "-n",
            "20",
            "--rate",
            "1000",
            "--messages",
            "200",
            "--transport",
            "ws",
        ],
    );
    let at = args.iter().position(|a| a == "--targets").unwrap();
    args.splice(at..at + 2, ["--alloc".to_owned(), alloc]);
    let report = run(args).await;
    assert_eq!(report.targets, vec![node.ws()]);
    assert_chat_adds_up(&report, 200);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reaches_every_client() {
    let node = Node::start().await;
    let report = run(node.args(
        "broadcast",
        &node.tcp(),
        &["-n", "20", "--count", "10", "--ack"],
    ))
    .await;
    let b = report.broadcast.as_ref().expect("a broadcast summary");
    assert_eq!(b.broadcasts, 10);
    assert_eq!(b.clients, 20);
    assert_eq!(b.reached, 200, "{b:?}");
    assert_eq!(b.received, 200);
    assert_eq!((b.lost, b.duplicated), (0, 0));
    assert_eq!(b.latency.count, 200);
    assert_eq!(b.post_latency.count, 10);
    assert!(b.deliveries_per_s > 0.0);
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_counted_by_error_code() {
    let node = Node::start().await;
    let mut args = node.args(
        "connect",
        &node.tcp(),
        &["-n", "5", "--hold", "0.2", "--settle", "0.1"],
    );
    let secret = args.iter().position(|a| a == SECRET).unwrap();
    args[secret] = "not-the-secret".into();
    let report = run(args).await;
    assert_eq!(report.connections.ok, 0);
    assert_eq!(report.connections.failures.get("TOKEN_INVALID"), Some(&5));
    node.stop().await;
}

#[tokio::test]
async fn refuses_targets_that_are_not_loopback() {
    for args in [
        vec![
            "imgate-loadtest",
            "connect",
            "--targets",
            "tcp://192.0.2.1:7400",
        ],
        vec![
            "imgate-loadtest",
            "broadcast",
            "--targets",
            "tcp://127.0.0.1:7400",
            "--admin",
            "http://192.0.2.1:7401",
        ],
    ] {
        let err = run_with(
            args.iter().map(|s| s.to_string()).collect(),
            RunOptions::default(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("loopback"), "{err:#}");
    }
}
