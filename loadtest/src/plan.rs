//! What a worker does, decided once by the coordinator and handed to every worker (in process, or
//! to a child process as one JSON line on its stdin), plus the messages between the two.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cli::TargetKind;
use crate::hist::HistData;
use crate::targets::Target;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub kind: TargetKind,
    pub targets: Vec<Target>,
    pub secret: String,
    pub token_ttl: u64,
    pub user_prefix: String,
    pub user_offset: u64,
    pub channel: String,
    /// Users (connections) over all workers.
    pub total_users: u64,
    /// Logins started per second, over all workers.
    pub login_rate: f64,
    /// Logins in flight at once, per worker.
    pub max_inflight: usize,
    pub login_timeout_secs: f64,
    pub heartbeat_ms: Option<u64>,
    /// Loopback source addresses to spread the connections over (see `conn::source_ip`).
    pub source_ips: u32,
    /// Hard bound on a worker's life.
    pub max_runtime_secs: f64,
    pub scenario: ScenarioPlan,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScenarioPlan {
    Connect,
    Chat(ChatPlan),
    Broadcast(BroadcastPlan),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatPlan {
    /// Messages per second over all workers.
    pub rate: f64,
    /// Messages over all workers; unbounded (but for the duration) when absent.
    pub messages: Option<u64>,
    pub send_secs: f64,
    pub cross_node_share: f64,
    pub payload: usize,
    pub drain_secs: f64,
    pub ack: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BroadcastPlan {
    pub ack: bool,
}

impl Plan {
    /// The name of user number `n`.
    pub fn user(&self, n: u64) -> String {
        format!("{}{}", self.user_prefix, self.user_offset + n)
    }

    /// The target of user number `n` (users are dealt round-robin over the targets).
    pub fn target_index(&self, n: u64) -> usize {
        (n % self.targets.len() as u64) as usize
    }
}

/// One worker's share: users `first .. first + count` (numbers relative to `user_offset`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub fn users(&self, total: u64) -> (u64, u64) {
        let count = self.count as u64;
        let index = self.index as u64;
        let first = total * index / count;
        let end = total * (index + 1) / count;
        (first, end - first)
    }
}

/// Coordinator → worker.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Control {
    /// Start the measured phase (chat: start sending).
    Start,
    /// End the run: close the connections and report.
    Stop,
}

/// Worker → coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    Progress(Progress),
    /// Every login attempt of the worker has finished.
    Ready(Progress),
    Done(Box<ShardResult>),
    /// The worker died (child process exited without a result).
    Failed(String),
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Progress {
    pub users: u64,
    pub attempted: u64,
    pub ok: u64,
    pub failed: u64,
    pub closed: u64,
    pub sent: u64,
    pub receipts: u64,
    pub received: u64,
}

impl Progress {
    pub fn add(&mut self, o: &Progress) {
        self.users += o.users;
        self.attempted += o.attempted;
        self.ok += o.ok;
        self.failed += o.failed;
        self.closed += o.closed;
        self.sent += o.sent;
        self.receipts += o.receipts;
        self.received += o.received;
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ShardResult {
    pub users: u64,
    pub attempted: u64,
    pub ok: u64,
    pub failed: u64,
    /// Failed logins by error name (a server error, or CONNECT_*, LOGIN_* client-side failures).
    pub failures: BTreeMap<String, u64>,
    /// Connections the server closed after login (before the run ended), by reason.
    pub closed: BTreeMap<String, u64>,
    /// Errors that did not close the connection, by name.
    pub errors: BTreeMap<String, u64>,
    /// First login started, microseconds since the Unix epoch.
    pub first_start_us: u64,
    /// Last login answered.
    pub last_ok_us: u64,
    pub login_latency: HistData,
    pub chat: Option<ChatResult>,
    pub broadcast: Option<BroadcastResult>,
    /// CPU time of the worker's process (user + system), seconds.
    pub cpu_secs: f64,
    /// Run-queue delay of the worker's process, seconds.
    #[serde(default)]
    pub runqueue_wait_secs: f64,
    /// Peak resident memory of the worker's process.
    pub max_rss_bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChatResult {
    pub sent: u64,
    /// Messages the scheduler could not hand to their sender (its queue was full or it was gone).
    pub skipped: u64,
    pub receipts: BTreeMap<String, u64>,
    /// Messages whose receipt promised delivery (`delivered`, or Socket.IO's `sent`).
    pub expected: u64,
    /// Distinct messages received.
    pub received: u64,
    /// Messages received again at a new stream position: a client would hand them over twice.
    pub duplicates: u64,
    /// Pushes received again at a position already received (retransmissions whose
    /// acknowledgement was late): a client drops them.
    #[serde(default)]
    pub resent: u64,
    /// Promised but never received.
    pub lost: u64,
    /// Received without a receipt that promised it.
    pub unexpected: u64,
    /// Pushes that were not this run's messages.
    pub foreign: u64,
    pub first_send_us: u64,
    pub last_send_us: u64,
    pub last_recv_us: u64,
    pub latency: HistData,
    /// Time from a send to its receipt (or refusal).
    #[serde(default)]
    pub receipt_latency: HistData,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BroadcastResult {
    pub received: u64,
    pub duplicates: u64,
    pub foreign: u64,
    pub first_recv_us: u64,
    pub last_recv_us: u64,
    pub latency: HistData,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_all_users_once() {
        for total in [1u64, 7, 100, 100_001] {
            for count in 1..=5usize {
                let mut next = 0;
                for index in 0..count {
                    let (first, n) = Shard { index, count }.users(total);
                    assert_eq!(first, next);
                    next += n;
                }
                assert_eq!(next, total);
            }
        }
    }
}
