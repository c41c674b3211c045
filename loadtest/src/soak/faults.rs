//! The faults a soak injects, one at a time, each healed before the next: which kinds there are,
//! how each is done and undone, and the loop that picks them at random moments.

use crate::lock;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::ValueEnum;
use rand::seq::SliceRandom;
use rand::Rng;
use serde::Serialize;
use sqlx::Executor;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::cluster::Cluster;

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// SIGKILL a random node; start it again 0.5–3 s later.
    NodeKill,
    /// SIGKILL Redis and start it again empty 0.2–1.5 s later: every key is lost.
    RedisRestart,
    /// FLUSHALL: every Redis key is lost while the connections stay up.
    RedisFlush,
    /// Cut every node's Redis connections and refuse new ones for 0.5–3 s.
    RedisCut,
    /// Freeze the database links (nothing moves, nothing closes) for 1–5 s.
    DbStall,
    /// Hold `LOCK TABLES messages WRITE` for 1–5 s: writes wait on the server.
    DbLock,
    /// Cut every database connection and refuse new ones for 0.5–3 s.
    DbCut,
    /// Cut every client connection (clients reconnect at once).
    ClientCut,
}

impl FaultKind {
    pub fn all() -> Vec<FaultKind> {
        FaultKind::value_variants().to_vec()
    }

    pub fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FaultEntry {
    /// Seconds since traffic started.
    pub at_secs: f64,
    pub kind: String,
    pub detail: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct FaultLog {
    pub counts: BTreeMap<String, u64>,
    pub entries: Vec<FaultEntry>,
    /// Nodes that exited without being killed (each was started again).
    pub unexpected_exits: Vec<String>,
    /// Faults that could not be applied or healed.
    pub errors: Vec<String>,
}

fn secs(range: std::ops::Range<f64>) -> Duration {
    Duration::from_secs_f64(rand::rng().random_range(range))
}

/// Until `stop`: waits 0.5–1.5 × `every`, applies the next fault of a shuffled deck of `kinds`
/// (each kind once before any repeats), heals it, and so on. Nodes that exit by themselves are
/// logged and started again.
pub async fn inject(
    cluster: Arc<tokio::sync::Mutex<Cluster>>,
    kinds: Vec<FaultKind>,
    every: Duration,
    started: Instant,
    log: Arc<Mutex<FaultLog>>,
    stop: CancellationToken,
) {
    let mut deck: Vec<FaultKind> = Vec::new();
    loop {
        let due = Instant::now() + every.mul_f64(rand::rng().random_range(0.5..1.5));
        while Instant::now() < due {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            restart_exited(&mut *cluster.lock().await, &log).await;
        }
        if kinds.is_empty() {
            continue;
        }
        if deck.is_empty() {
            deck = kinds.clone();
            deck.shuffle(&mut rand::rng());
        }
        let kind = deck.pop().expect("a refilled deck");
        let at_secs = started.elapsed().as_secs_f64();
        let mut c = cluster.lock().await;
        let detail = match apply(kind, &mut c).await {
            Ok(detail) => detail,
            Err(e) => {
                lock(&log)
                    .errors
                    .push(format!("{at_secs:.1}s {}: {e:#}", kind.name()));
                format!("failed: {e:#}")
            }
        };
        let mut l = lock(&log);
        *l.counts.entry(kind.name()).or_default() += 1;
        l.entries.push(FaultEntry {
            at_secs,
            kind: kind.name(),
            detail,
        });
    }
}

/// Logs every node that exited by itself, and starts again every node that is not running.
pub async fn restart_exited(cluster: &mut Cluster, log: &Mutex<FaultLog>) {
    for (i, status) in cluster.exited() {
        let id = &cluster.nodes[i].id;
        lock(log).unexpected_exits.push(format!("{id}: {status}"));
    }
    for i in 0..cluster.nodes.len() {
        if !cluster.is_running(i) {
            if let Err(e) = cluster.start_node(i).await {
                lock(log)
                    .errors
                    .push(format!("start {}: {e:#}", cluster.nodes[i].id));
            }
        }
    }
}

/// Does `kind` and undoes it; returns what was done.
async fn apply(kind: FaultKind, c: &mut Cluster) -> anyhow::Result<String> {
    Ok(match kind {
        FaultKind::NodeKill => {
            let i = rand::rng().random_range(0..c.nodes.len());
            let down = secs(0.5..3.0);
            c.kill_node(i).await;
            tokio::time::sleep(down).await;
            c.start_node(i).await?;
            format!("{} killed, started again after {down:.1?}", c.nodes[i].id)
        }
        FaultKind::RedisRestart => {
            let down = secs(0.2..1.5);
            c.redis.kill();
            tokio::time::sleep(down).await;
            c.redis.restart().await?;
            format!("down {down:.1?}, back empty")
        }
        FaultKind::RedisFlush => {
            let answer = c.redis.command(&["FLUSHALL"]).await?;
            anyhow::ensure!(answer == "+OK", "FLUSHALL answered {answer}");
            "every key dropped".to_owned()
        }
        FaultKind::RedisCut => {
            let down = secs(0.5..3.0);
            c.redis_proxy.block();
            tokio::time::sleep(down).await;
            c.redis_proxy.unblock();
            format!("Redis links cut for {down:.1?}")
        }
        FaultKind::DbStall => {
            let stall = secs(1.0..5.0);
            c.db_proxy.freeze();
            tokio::time::sleep(stall).await;
            c.db_proxy.thaw();
            format!("database links frozen for {stall:.1?}")
        }
        FaultKind::DbLock => {
            let stall = secs(1.0..5.0);
            let mut conn = c.db().await?;
            conn.execute("SET SESSION lock_wait_timeout = 10").await?;
            let asked = Instant::now();
            conn.execute("LOCK TABLES messages WRITE").await?;
            let waited = asked.elapsed();
            tokio::time::sleep(stall).await;
            conn.execute("UNLOCK TABLES").await?;
            format!("messages locked for {stall:.1?} (after waiting {waited:.1?} for the lock)")
        }
        FaultKind::DbCut => {
            let down = secs(0.5..3.0);
            c.db_proxy.block();
            tokio::time::sleep(down).await;
            c.db_proxy.unblock();
            format!("database links cut for {down:.1?}")
        }
        FaultKind::ClientCut => {
            let cut: usize = c.nodes.iter().map(|n| n.proxy.cut()).sum();
            format!("{cut} client connections cut")
        }
    })
}
