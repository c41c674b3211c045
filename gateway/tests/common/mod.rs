//! Test harness: a real gateway node on port 0, real sockets, real HTTP.
#![allow(dead_code)]

/// The proxy that cuts, blocks or freezes links, shared with the load test's soak.
#[allow(unused_imports)]
pub use imgate_loadtest::fault::proxy;
use std::net::SocketAddr;
use std::time::Duration;

use imgate::auth::Authenticator;
use imgate::config::Secret;
use imgate::{run, Listeners, RunError, Settings};
use imgate_shared::connection::{ClientConnection, Endpoint};
use imgate_shared::protocol::{Body, HeartbeatRange};
use imgate_shared::{ClientFrame, ServerFrame};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "test-secret";
pub const ADMIN_TOKEN: &str = "test-admin-token";
/// Upper bound on waiting for something that should happen; a test failing here hangs no longer.
pub const WAIT: Duration = Duration::from_secs(20);

pub struct TestNode {
    pub client_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub settings: Settings,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<Result<(), RunError>>,
    pub http: reqwest::Client,
}

/// Settings for a test node: a known secret and admin token, loopback on port 0.
pub fn test_settings() -> Settings {
    let mut s = Settings::default();
    s.auth.secret = Some(Secret::new(SECRET));
    s.admin.token = Some(Secret::new(ADMIN_TOKEN));
    s.client.listen = "127.0.0.1:0".parse().unwrap();
    s.admin.listen = "127.0.0.1:0".parse().unwrap();
    s.shutdown.grace_ms = 5_000;
    s.store.url = Secret::new(format!("sqlite://{}", temp_path("db").display()));
    // Many tests stall the database on purpose, for as long as a busy machine makes them; the
    // admission by queue age has a test of its own.
    s.store.max_queue_age_ms = 0;
    // Tests that send hundreds of messages in a row would meet the default send rates (100/s a
    // connection, 200/s a user) on a fast run, and get refusals they do not expect; the rate
    // limits have tests of their own (`quotas.rs`).
    s.client.send_rate = 0.0;
    s.client.user_send_rate = 0.0;
    s
}

/// A path in the temp directory that no other test uses.
pub fn temp_path(ext: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "imgate-test-{}-{}-{}.{ext}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        rand_suffix()
    ))
}

fn rand_suffix() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

impl TestNode {
    pub async fn start() -> TestNode {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(configure: impl FnOnce(&mut Settings)) -> TestNode {
        let mut settings = test_settings();
        configure(&mut settings);
        settings.validate().expect("valid test settings");
        let client = TcpListener::bind(settings.client.listen).await.unwrap();
        let admin = TcpListener::bind(settings.admin.listen).await.unwrap();
        let client_addr = client.local_addr().unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            settings.clone(),
            Listeners { client, admin },
            shutdown.clone(),
        ));
        let node = TestNode {
            client_addr,
            admin_addr,
            settings,
            shutdown,
            task,
            http: reqwest::Client::new(),
        };
        node.wait_ready().await;
        node
    }

    /// Waits until `/readyz` answers 200. The admin listener is bound before the node starts, so
    /// the first request simply waits for the server; the loop covers the moment between the
    /// admin API serving and the node declaring itself ready.
    pub async fn wait_ready(&self) {
        for _ in 0..2_000 {
            if let Ok(resp) = self.http.get(self.url("/readyz")).send().await {
                if resp.status() == 200 {
                    return;
                }
            }
            assert!(!self.task.is_finished(), "the node stopped while starting");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("node not ready after 20 s");
    }

    pub fn tcp(&self) -> Endpoint {
        Endpoint::tcp(self.client_addr)
    }

    pub fn ws(&self) -> Endpoint {
        Endpoint::ws(self.client_addr)
    }

    pub fn token(&self, user: &str) -> String {
        Authenticator::new(&self.settings)
            .unwrap()
            .mint(user, 3600, &self.settings.auth)
            .unwrap()
    }

    /// Connects over `endpoint` and logs in `user` on `channel`; panics unless it succeeds.
    pub async fn login(&self, endpoint: &Endpoint, user: &str, channel: &str) -> Client {
        let mut client = Client::connect(endpoint).await;
        let result = client.login(&self.token(user), channel, None).await;
        assert!(
            matches!(result, ServerFrame::LoginResult { .. }),
            "login failed: {result:?}"
        );
        client
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin_addr, path)
    }

    /// An admin request with the bearer token.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(ADMIN_TOKEN)
    }

    pub async fn admin_json(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self.admin(method, path);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let json = resp.json::<Value>().await.unwrap_or(Value::Null);
        (status, json)
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Cancels the node and waits for `run` to return.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("node stops within the bound")
            .unwrap()
            .unwrap();
    }
}

/// A test client: a [`ClientConnection`] with helpers that never wait forever.
pub struct Client {
    pub conn: ClientConnection,
    counter: u64,
    /// Whether `recv` hands over `caught_up` frames (skipped by default: most tests are
    /// about other frames).
    pub see_caught_up: bool,
}

impl Client {
    pub async fn connect(endpoint: &Endpoint) -> Client {
        Client::from_conn(ClientConnection::connect(endpoint).await.unwrap())
    }

    pub fn from_conn(conn: ClientConnection) -> Client {
        Client {
            conn,
            counter: 0,
            see_caught_up: false,
        }
    }

    pub async fn login(
        &mut self,
        token: &str,
        channel: &str,
        heartbeat: Option<HeartbeatRange>,
    ) -> ServerFrame {
        self.send(ClientFrame::Login {
            token: token.to_owned(),
            // One device per channel type: a user's app and web connections are two devices.
            device_id: format!("device-{channel}"),
            channel: channel.to_owned(),
            client_version: Some("test".into()),
            heartbeat,
            last_seq: None,
        })
        .await;
        self.recv().await.expect("a reply to login")
    }

    pub async fn send(&mut self, frame: ClientFrame) {
        self.conn.send(&frame).await.unwrap();
    }

    /// The next frame, `None` when the server closed the connection; panics after [`WAIT`].
    pub async fn recv(&mut self) -> Option<ServerFrame> {
        self.recv_within(WAIT).await
    }

    /// The next frame, `None` when the server closed the connection; panics after `bound`.
    pub async fn recv_within(&mut self, bound: Duration) -> Option<ServerFrame> {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            match tokio::time::timeout_at(deadline, self.conn.recv()).await {
                Ok(Ok(Some(ServerFrame::CaughtUp { .. }))) if !self.see_caught_up => continue,
                other => return Self::received(other, bound),
            }
        }
    }

    fn received(
        r: Result<
            Result<Option<ServerFrame>, imgate_shared::connection::ConnectionError>,
            tokio::time::error::Elapsed,
        >,
        bound: Duration,
    ) -> Option<ServerFrame> {
        match r {
            Ok(Ok(frame)) => frame,
            Ok(Err(e)) => {
                // A reset after the server closed counts as closed.
                eprintln!("recv error treated as close: {e}");
                None
            }
            Err(_) => panic!("no frame within {bound:?}"),
        }
    }

    /// The next frame that is not a heartbeat_ack.
    pub async fn recv_skip_acks(&mut self) -> Option<ServerFrame> {
        loop {
            match self.recv().await {
                Some(ServerFrame::HeartbeatAck { .. }) => continue,
                other => return other,
            }
        }
    }

    /// Sends a text message to `to` and returns the sender's receipt.
    pub async fn send_text(&mut self, to: &str, text: &str) -> ServerFrame {
        self.counter += 1;
        let client_msg_id = format!("c{}", self.counter);
        self.send(ClientFrame::Send {
            to: to.to_owned(),
            channel: None,
            client_msg_id: client_msg_id.clone(),
            body: Body::from_value(&serde_json::json!({ "text": text })).unwrap(),
            retry: false,
        })
        .await;
        loop {
            match self.recv().await {
                Some(f @ ServerFrame::SendResult { .. }) => {
                    if let ServerFrame::SendResult {
                        client_msg_id: c, ..
                    } = &f
                    {
                        assert_eq!(c, &client_msg_id);
                    }
                    return f;
                }
                Some(ServerFrame::Push { .. }) | Some(ServerFrame::HeartbeatAck { .. }) => continue,
                other => panic!("expected send_result, got {other:?}"),
            }
        }
    }

    /// Waits for the next push and returns (from, to, text of the body).
    pub async fn recv_push(&mut self) -> (Option<String>, String, Value) {
        match self.recv_skip_acks().await {
            Some(ServerFrame::Push { from, to, body, .. }) => {
                (from, to, body.parse::<Value>().unwrap())
            }
            other => panic!("expected push, got {other:?}"),
        }
    }

    /// Waits until the server closes the connection, returning the frames received meanwhile.
    pub async fn until_closed(&mut self) -> Vec<ServerFrame> {
        let mut frames = Vec::new();
        while let Some(f) = self.recv().await {
            frames.push(f);
        }
        frames
    }
}

/// Sum of the samples of `name` whose labels contain every `label="value"` in `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let (metric, rest) = match key.split_once('{') {
                Some((m, rest)) => (m, rest),
                None => (key, ""),
            };
            (metric == name && labels.iter().all(|lbl| rest.contains(lbl)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// The MariaDB/MySQL server the tests use (no database in the URL).
pub fn mysql_server_url() -> String {
    std::env::var("TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into())
        .trim_end_matches('/')
        .to_owned()
}

/// The Redis server the tests use.
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A fresh, empty MySQL database for one test, dropped by [`MysqlDb::drop_database`].
pub struct MysqlDb {
    pub url: String,
    pub name: String,
    server: String,
}

impl MysqlDb {
    pub async fn create() -> MysqlDb {
        use sqlx::{Connection, Executor};
        let server = mysql_server_url();
        let name = format!("imgate_t_{:016x}", rand::random::<u64>());
        let mut conn = sqlx::MySqlConnection::connect(&server)
            .await
            .unwrap_or_else(|e| {
                panic!("cannot connect to MariaDB at {server} (set TEST_MYSQL_URL): {e}")
            });
        conn.execute(&*format!(
            "CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        ))
        .await
        .unwrap();
        let _ = conn.close().await;
        MysqlDb {
            url: format!("{server}/{name}"),
            name,
            server,
        }
    }

    /// A connection of the test's own to the database.
    pub async fn connect(&self) -> sqlx::MySqlConnection {
        use sqlx::Connection;
        sqlx::MySqlConnection::connect(&self.url).await.unwrap()
    }

    /// Rows in `messages`.
    pub async fn count(&self) -> i64 {
        let mut c = self.connect().await;
        sqlx::query_scalar("SELECT COUNT(*) FROM messages")
            .fetch_one(&mut c)
            .await
            .unwrap()
    }

    pub async fn drop_database(self) {
        use sqlx::{Connection, Executor};
        if let Ok(mut conn) = sqlx::MySqlConnection::connect(&self.server).await {
            let _ = conn
                .execute(&*format!("DROP DATABASE IF EXISTS `{}`", self.name))
                .await;
            let _ = conn.close().await;
        }
    }
}

/// A node on a runtime of its own, so that the test can crash it (drop the runtime without any
/// graceful shutdown) while the test's clients live on.
pub struct IsolatedNode {
    pub node: TestNode,
    runtime: Option<tokio::runtime::Runtime>,
}

impl IsolatedNode {
    pub async fn start_with(
        configure: impl FnOnce(&mut Settings) + Send + 'static,
    ) -> IsolatedNode {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut node = runtime
            .spawn(async move { TestNode::start_with(configure).await })
            .await
            .unwrap();
        // A client of the test's runtime: pooled connections belong to the runtime that made them.
        node.http = reqwest::Client::new();
        IsolatedNode {
            node,
            runtime: Some(runtime),
        }
    }

    /// Stops every task of the node at once, like a crash: no KICK, no deregistration.
    pub fn crash(mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }

    /// Graceful stop.
    pub async fn stop(mut self) {
        let rt = self.runtime.take().unwrap();
        let node = std::mem::replace(&mut self.node, unreachable_node());
        rt.spawn(node.stop()).await.unwrap();
        rt.shutdown_background();
    }
}

fn unreachable_node() -> TestNode {
    TestNode {
        client_addr: "127.0.0.1:9".parse().unwrap(),
        admin_addr: "127.0.0.1:9".parse().unwrap(),
        settings: test_settings(),
        shutdown: CancellationToken::new(),
        task: tokio::spawn(async { Ok(()) }),
        http: reqwest::Client::new(),
    }
}

impl Drop for IsolatedNode {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl std::ops::Deref for IsolatedNode {
    type Target = TestNode;
    fn deref(&self) -> &TestNode {
        &self.node
    }
}

/// Settings for node `i` of a test cluster sharing `prefix` on Redis and the database `db_url`.
pub fn cluster_settings(
    s: &mut Settings,
    i: usize,
    prefix: &str,
    db_url: &str,
    routing: imgate::config::RoutingMode,
) {
    s.node.id = format!("node-{i}");
    s.cluster.redis_url = Some(Secret::new(redis_url()));
    s.cluster.key_prefix = prefix.to_owned();
    s.cluster.routing = routing;
    s.cluster.node_ttl_ms = 2_000;
    s.cluster.refresh_interval_ms = 300;
    s.cluster.request_timeout_ms = 2_000;
    s.store.url = Secret::new(db_url.to_owned());
}

/// A random Redis key prefix for one test.
pub fn random_prefix() -> String {
    format!("imgate-test-{:016x}", rand::random::<u64>())
}

/// Test log output: `RUST_LOG`, else warnings; once per test binary.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Polls `check` until it yields `Some`, failing the test after `bound`.
pub async fn wait_for<T, F, Fut>(what: &str, bound: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = tokio::time::Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            started.elapsed() < bound,
            "timed out after {bound:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `check` until it holds, failing the test after [`WAIT`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = tokio::time::Instant::now();
    while !check().await {
        assert!(started.elapsed() < WAIT, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
