//! The cluster a soak runs against, all of it its own: a `redis-server`, a fresh MariaDB
//! database, and gateway nodes as child processes; every link goes through a [`Proxy`] so that a
//! fault can cut, block or freeze it. Clients reach node `i` through `nodes[i].proxy`, the nodes
//! reach Redis through `redis_proxy` and the database through `db_proxy`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sqlx::{Connection, Executor, MySqlConnection};
use tokio::process::{Child, Command};

use crate::fault::{free_port, PrivateRedis, Proxy};

pub const SECRET: &str = "imgate-soak-secret";
const ADMIN_TOKEN: &str = "imgate-soak-admin-token";
/// The longest a node may take to answer `/readyz` after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub struct ClusterSpec {
    pub nodes: usize,
    pub gateway_bin: PathBuf,
    pub redis_server: String,
    /// `mysql://user[:password]@host:port`, an account that may create databases.
    pub mysql: String,
    pub routing: String,
    pub logs: PathBuf,
}

pub struct Node {
    pub id: String,
    client_port: u16,
    admin_port: u16,
    /// What clients connect to.
    pub proxy: Proxy,
    child: Option<Child>,
    log: PathBuf,
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    pub redis: PrivateRedis,
    pub redis_proxy: Proxy,
    pub db_proxy: Proxy,
    /// The test's own database: its name and a URL that may drop it.
    db_name: String,
    mysql_admin: String,
    node_env: Vec<(String, String)>,
    gateway_bin: PathBuf,
    http: reqwest::Client,
}

impl Cluster {
    pub async fn start(spec: &ClusterSpec) -> anyhow::Result<Cluster> {
        if !spec.gateway_bin.is_file() {
            bail!(
                "no gateway binary at {} (build it: cargo build --release -p imgate, or give --gateway-bin)",
                spec.gateway_bin.display()
            );
        }
        std::fs::create_dir_all(&spec.logs)
            .with_context(|| format!("create {}", spec.logs.display()))?;
        let redis = PrivateRedis::start_with(&spec.redis_server, free_port()).await?;
        let redis_proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], redis.port()))).await;

        let url = reqwest::Url::parse(&spec.mysql).context("--mysql is not a URL")?;
        if url.scheme() != "mysql" {
            bail!("--mysql must be a mysql:// URL");
        }
        let host = url.host_str().unwrap_or("127.0.0.1");
        let db_addr = tokio::net::lookup_host((host, url.port().unwrap_or(3306)))
            .await
            .with_context(|| format!("resolve {host}"))?
            .find(|a| a.ip().is_loopback())
            .with_context(|| format!("{host} is not a loopback address"))?;
        let db_proxy = Proxy::start(db_addr).await;
        let db_name = format!("imgate_soak_{:016x}", rand::random::<u64>());
        let userinfo = match url.password() {
            Some(p) => format!("{}:{p}", url.username()),
            None => url.username().to_owned(),
        };
        let mysql_admin = format!("mysql://{userinfo}@{db_addr}");
        let mut conn = MySqlConnection::connect(&mysql_admin)
            .await
            .with_context(|| format!("connect to MariaDB at {db_addr}"))?;
        conn.execute(&*format!("CREATE DATABASE {db_name} CHARACTER SET utf8mb4"))
            .await?;
        conn.close().await?;

        let prefix = format!("soak-{:08x}", rand::random::<u32>());
        let node_env = [
            ("IMGATE_AUTH__SECRET", SECRET.to_owned()),
            ("IMGATE_ADMIN__TOKEN", ADMIN_TOKEN.to_owned()),
            (
                "IMGATE_CLUSTER__REDIS_URL",
                format!("redis://{}", redis_proxy.addr()),
            ),
            ("IMGATE_CLUSTER__KEY_PREFIX", prefix),
            ("IMGATE_CLUSTER__ROUTING", spec.routing.clone()),
            ("IMGATE_CLUSTER__NODE_TTL_MS", "2000".to_owned()),
            ("IMGATE_CLUSTER__REFRESH_INTERVAL_MS", "300".to_owned()),
            ("IMGATE_CLUSTER__REQUEST_TIMEOUT_MS", "2000".to_owned()),
            (
                "IMGATE_STORE__URL",
                format!("mysql://{userinfo}@{}/{db_name}", db_proxy.addr()),
            ),
            ("IMGATE_LOG__LEVEL", "warn,fred=error".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();

        let mut cluster = Cluster {
            nodes: Vec::new(),
            redis,
            redis_proxy,
            db_proxy,
            db_name,
            mysql_admin,
            node_env,
            gateway_bin: spec.gateway_bin.clone(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .build()?,
        };
        for i in 0..spec.nodes {
            let client_port = free_port();
            let node = Node {
                id: format!("soak-{}", i + 1),
                client_port,
                admin_port: free_port(),
                proxy: Proxy::start(SocketAddr::from(([127, 0, 0, 1], client_port))).await,
                child: None,
                log: spec.logs.join(format!("node-{}.log", i + 1)),
            };
            cluster.nodes.push(node);
            cluster.start_node(i).await?;
        }
        Ok(cluster)
    }

    /// Starts node `i` (again) on its ports and waits until it is ready.
    pub async fn start_node(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        let child = Command::new(&self.gateway_bin)
            .args(["--node-id", &node.id])
            .args([
                "--client-listen",
                &format!("127.0.0.1:{}", node.client_port),
            ])
            .args(["--admin-listen", &format!("127.0.0.1:{}", node.admin_port)])
            .envs(self.node_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", self.gateway_bin.display()))?;
        node.child = Some(child);
        let ready = format!("http://127.0.0.1:{}/readyz", node.admin_port);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(r) = self.http.get(&ready).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if let Some(status) = self.nodes[i]
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "node {} exited while starting ({status}); see {}",
                    self.nodes[i].id,
                    self.nodes[i].log.display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} not ready after {READY_TIMEOUT:?}; see {}",
                    self.nodes[i].id,
                    self.nodes[i].log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills node `i` with SIGKILL: no goodbye to clients, Redis or the database.
    pub async fn kill_node(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Nodes that exited without being killed, with how they ended; they are left stopped.
    pub fn exited(&mut self) -> Vec<(usize, String)> {
        let mut gone = Vec::new();
        for (i, node) in self.nodes.iter_mut().enumerate() {
            if let Some(status) = node
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                node.child = None;
                gone.push((i, status.to_string()));
            }
        }
        gone
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// A connection of the soak's own to its database (for table locks).
    pub async fn db(&self) -> anyhow::Result<MySqlConnection> {
        let url = format!("{}/{}", self.mysql_admin, self.db_name);
        Ok(MySqlConnection::connect(&url).await?)
    }

    /// Stops every node (SIGTERM, then SIGKILL after 10 s) and drops the database.
    pub async fn stop(mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                if let Some(pid) = child.id() {
                    // SAFETY: kill(2) on the pid of a child this process still holds (not reaped).
                    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                }
                if tokio::time::timeout(Duration::from_secs(10), child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.kill().await;
                }
            }
        }
        if let Ok(mut conn) = MySqlConnection::connect(&self.mysql_admin).await {
            let _ = conn
                .execute(&*format!("DROP DATABASE IF EXISTS {}", self.db_name))
                .await;
        }
    }
}

/// The gateway binary beside this program (`target/release/imgate` for the load test,
/// `target/debug/imgate` for its tests, which run from `target/debug/deps/`).
pub fn default_gateway_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().unwrap_or(Path::new("."));
    let beside = dir.join("imgate");
    if beside.is_file() {
        return beside;
    }
    dir.parent().unwrap_or(dir).join("imgate")
}
