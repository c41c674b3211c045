//! The results of a run: the workers' results merged, summarised as the JSON report (`--out`) and
//! a Markdown table.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::cli::TargetKind;
use crate::hist::{Hist, Percentiles};
use crate::plan::ShardResult;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub target_kind: TargetKind,
    pub transport: String,
    pub targets: Vec<String>,
    pub procs: usize,
    pub started_at_unix_ms: u64,
    pub wall_secs: f64,
    /// The scenario's parameters as given.
    pub parameters: serde_json::Value,
    pub connections: ConnectSummary,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemorySummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_cpu: Option<CpuSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<crate::redis_info::RedisSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat: Option<ChatSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broadcast: Option<BroadcastSummary>,
    /// The load generator's own cost (all its processes).
    pub loadgen: LoadgenSummary,
    /// The latency the chart shows: (percentile, milliseconds).
    pub latency_curve: LatencyCurve,
    /// The machine's 1-minute load average at the start and at the end of the run (its other
    /// tenants included).
    #[serde(default)]
    pub load_average: (f64, f64),
    /// Things that went wrong or limit what the figures mean.
    pub warnings: Vec<String>,
}

/// The 1-minute load average (Linux), 0 when unknown.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|f| f.parse().ok()))
        .unwrap_or(0.0)
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectSummary {
    pub requested: u64,
    pub attempted: u64,
    pub ok: u64,
    pub failed: u64,
    /// Failed logins by error name.
    pub failures: BTreeMap<String, u64>,
    /// Connections closed by the server during the run, by reason.
    pub closed_by_server: BTreeMap<String, u64>,
    /// Errors that left the connection open, by name.
    pub errors: BTreeMap<String, u64>,
    /// From the first login started to the last one answered.
    pub login_secs: f64,
    pub login_rate_per_s: f64,
    pub login_latency: Percentiles,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemorySummary {
    pub source: String,
    pub before_bytes: u64,
    pub after_bytes: u64,
    /// Connections held when `after` was read (the gateway's count when known, else the tool's).
    pub connections: u64,
    pub per_connection_bytes: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CpuSummary {
    pub source: String,
    /// CPU seconds the observed processes used during the measured phase.
    pub cpu_secs: f64,
    pub phase_secs: f64,
    /// cpu_secs / phase_secs (1.0 = one core busy).
    pub cores_busy: f64,
    /// Time the processes' threads were ready to run but waited for a CPU during the phase
    /// (run-queue delay): how much the machine's other load held them back.
    #[serde(default)]
    pub runqueue_wait_secs: f64,
    /// What `per_unit_us` is counted per: login, message or delivery.
    pub unit: String,
    pub per_unit_us: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChatSummary {
    pub users: u64,
    pub requested_rate_per_s: f64,
    pub cross_node_share: f64,
    pub payload_bytes: usize,
    pub sent: u64,
    pub skipped: u64,
    pub receipts: BTreeMap<String, u64>,
    /// Messages sent that got no receipt before the end of the drain period.
    pub missing_receipts: u64,
    /// Receipts that promised delivery.
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    /// Messages received twice at different stream positions: a client hands them over twice.
    pub duplicated: u64,
    /// Pushes received again at a position already received (late acknowledgements); a client
    /// drops them by position.
    #[serde(default)]
    pub resent: u64,
    pub unexpected: u64,
    pub foreign: u64,
    pub send_secs: f64,
    pub send_rate_per_s: f64,
    /// Messages received per second, first send to last receive.
    pub throughput_per_s: f64,
    pub latency: Percentiles,
    /// Send → receipt (delivered, stored or refused).
    #[serde(default)]
    pub receipt_latency: Percentiles,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BroadcastSummary {
    pub clients: u64,
    pub broadcasts: u64,
    /// Connections the gateway said each broadcast reached, summed.
    pub reached: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// From the first POST to the last delivery.
    pub secs: f64,
    pub deliveries_per_s: f64,
    pub latency: Percentiles,
    /// Time the admin API took to answer a broadcast.
    pub post_latency: Percentiles,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadgenSummary {
    pub cpu_secs: f64,
    /// Run-queue delay of the load generator's threads (see `CpuSummary::runqueue_wait_secs`).
    #[serde(default)]
    pub runqueue_wait_secs: f64,
    /// Peak resident memory, summed over the load generator's processes.
    pub max_rss_bytes: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LatencyCurve {
    pub what: String,
    pub points: Vec<(f64, f64)>,
}

/// All workers' results added up.
#[derive(Debug, Default)]
pub struct Merged {
    pub r: ShardResult,
    pub login: Hist,
    pub chat: Option<Hist>,
    /// Send → receipt, chat only.
    pub receipts: Option<Hist>,
    pub broadcast: Option<Hist>,
}

fn add_map(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_insert(0) += v;
    }
}

fn min_nonzero(a: u64, b: u64) -> u64 {
    match (a, b) {
        (0, x) | (x, 0) => x,
        (a, b) => a.min(b),
    }
}

pub fn merge(results: &[ShardResult]) -> Merged {
    let mut m = Merged::default();
    for s in results {
        let r = &mut m.r;
        r.users += s.users;
        r.attempted += s.attempted;
        r.ok += s.ok;
        r.failed += s.failed;
        add_map(&mut r.failures, &s.failures);
        add_map(&mut r.closed, &s.closed);
        add_map(&mut r.errors, &s.errors);
        r.first_start_us = min_nonzero(r.first_start_us, s.first_start_us);
        r.last_ok_us = r.last_ok_us.max(s.last_ok_us);
        r.cpu_secs += s.cpu_secs;
        r.runqueue_wait_secs += s.runqueue_wait_secs;
        r.max_rss_bytes += s.max_rss_bytes;
        m.login.add(&Hist::from_data(&s.login_latency));
        if let Some(c) = &s.chat {
            let into = r.chat.get_or_insert_with(Default::default);
            into.sent += c.sent;
            into.skipped += c.skipped;
            add_map(&mut into.receipts, &c.receipts);
            into.expected += c.expected;
            into.received += c.received;
            into.duplicates += c.duplicates;
            into.resent += c.resent;
            into.lost += c.lost;
            into.unexpected += c.unexpected;
            into.foreign += c.foreign;
            into.first_send_us = min_nonzero(into.first_send_us, c.first_send_us);
            into.last_send_us = into.last_send_us.max(c.last_send_us);
            into.last_recv_us = into.last_recv_us.max(c.last_recv_us);
            m.chat
                .get_or_insert_with(Hist::default)
                .add(&Hist::from_data(&c.latency));
            m.receipts
                .get_or_insert_with(Hist::default)
                .add(&Hist::from_data(&c.receipt_latency));
        }
        if let Some(b) = &s.broadcast {
            let into = r.broadcast.get_or_insert_with(Default::default);
            into.received += b.received;
            into.duplicates += b.duplicates;
            into.foreign += b.foreign;
            into.first_recv_us = min_nonzero(into.first_recv_us, b.first_recv_us);
            into.last_recv_us = into.last_recv_us.max(b.last_recv_us);
            m.broadcast
                .get_or_insert_with(Hist::default)
                .add(&Hist::from_data(&b.latency));
        }
    }
    m
}

pub fn secs_between(from_us: u64, to_us: u64) -> f64 {
    if from_us == 0 || to_us <= from_us {
        0.0
    } else {
        (to_us - from_us) as f64 / 1e6
    }
}

pub fn per_sec(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        (n as f64 / secs * 10.0).round() / 10.0
    } else {
        0.0
    }
}

pub fn connect_summary(m: &Merged, requested: u64) -> ConnectSummary {
    let login_secs = secs_between(m.r.first_start_us, m.r.last_ok_us);
    ConnectSummary {
        requested,
        attempted: m.r.attempted,
        ok: m.r.ok,
        failed: m.r.failed,
        failures: m.r.failures.clone(),
        closed_by_server: m.r.closed.clone(),
        errors: m.r.errors.clone(),
        login_secs,
        login_rate_per_s: per_sec(m.r.ok, login_secs),
        login_latency: m.login.percentiles(),
    }
}

/// Bytes in a human unit.
pub fn bytes(n: f64) -> String {
    if n.abs() >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", n / (1024.0 * 1024.0 * 1024.0))
    } else if n.abs() >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", n / (1024.0 * 1024.0))
    } else if n.abs() >= 1024.0 {
        format!("{:.2} KiB", n / 1024.0)
    } else {
        format!("{n:.0} B")
    }
}

fn map_text(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn pct_text(p: &Percentiles) -> String {
    if p.count == 0 {
        return "no samples".into();
    }
    format!(
        "{:.2} / {:.2} / {:.2} / {:.2} / {:.2}",
        p.p50_ms, p.p90_ms, p.p99_ms, p.p999_ms, p.max_ms
    )
}

impl Report {
    /// The report as a Markdown table.
    pub fn markdown(&self) -> String {
        let mut rows: Vec<(String, String)> = Vec::new();
        let mut row = |k: &str, v: String| rows.push((k.to_owned(), v));
        row(
            "scenario",
            format!(
                "{} ({:?}, {}, {} target{}, {} process{})",
                self.scenario,
                self.target_kind,
                self.transport,
                self.targets.len(),
                if self.targets.len() == 1 { "" } else { "s" },
                self.procs,
                if self.procs == 1 { "" } else { "es" }
            )
            .to_lowercase(),
        );
        let c = &self.connections;
        row(
            "connections ok / requested",
            format!("{} / {}", c.ok, c.requested),
        );
        row("login failures", map_text(&c.failures));
        row(
            "login rate (logins/s)",
            format!("{:.0} (over {:.2} s)", c.login_rate_per_s, c.login_secs),
        );
        row(
            "login latency p50 / p90 / p99 / p99.9 / max (ms)",
            pct_text(&c.login_latency),
        );
        if !c.closed_by_server.is_empty() {
            row("closed by the server", map_text(&c.closed_by_server));
        }
        if !c.errors.is_empty() {
            row("errors (connection kept)", map_text(&c.errors));
        }
        if let Some(m) = &self.memory {
            row(
                "system memory before → after",
                format!(
                    "{} → {} ({})",
                    bytes(m.before_bytes as f64),
                    bytes(m.after_bytes as f64),
                    m.source
                ),
            );
            row(
                "memory per connection",
                format!(
                    "{} ({} connections)",
                    bytes(m.per_connection_bytes),
                    m.connections
                ),
            );
        }
        if let Some(ch) = &self.chat {
            row(
                "messages sent (skipped)",
                format!("{} ({})", ch.sent, ch.skipped),
            );
            row("receipts by status", map_text(&ch.receipts));
            row("messages without receipt", ch.missing_receipts.to_string());
            row(
                "delivered / lost / duplicated",
                format!("{} / {} / {}", ch.delivered, ch.lost, ch.duplicated),
            );
            row(
                "pushes resent at a position already received (dropped by a client)",
                ch.resent.to_string(),
            );
            if ch.unexpected > 0 || ch.foreign > 0 {
                row(
                    "received without promise / foreign",
                    format!("{} / {}", ch.unexpected, ch.foreign),
                );
            }
            row(
                "send rate (msg/s)",
                format!(
                    "{:.0} (asked {:.0}, over {:.2} s)",
                    ch.send_rate_per_s, ch.requested_rate_per_s, ch.send_secs
                ),
            );
            row(
                "throughput (received msg/s)",
                format!("{:.0}", ch.throughput_per_s),
            );
            row(
                "message latency p50 / p90 / p99 / p99.9 / max (ms)",
                pct_text(&ch.latency),
            );
            row(
                "receipt latency p50 / p90 / p99 / p99.9 / max (ms)",
                pct_text(&ch.receipt_latency),
            );
        }
        if let Some(b) = &self.broadcast {
            row(
                "broadcasts × clients reached",
                format!("{} × {} = {}", b.broadcasts, b.clients, b.reached),
            );
            row(
                "deliveries received / lost / duplicated",
                format!("{} / {} / {}", b.received, b.lost, b.duplicated),
            );
            row(
                "deliveries/s",
                format!("{:.0} (over {:.3} s)", b.deliveries_per_s, b.secs),
            );
            row(
                "delivery latency p50 / p90 / p99 / p99.9 / max (ms)",
                pct_text(&b.latency),
            );
            row(
                "broadcast POST latency p50 / p99 / max (ms)",
                format!(
                    "{:.2} / {:.2} / {:.2}",
                    b.post_latency.p50_ms, b.post_latency.p99_ms, b.post_latency.max_ms
                ),
            );
        }
        if let Some(cpu) = &self.system_cpu {
            row(
                "system CPU",
                format!(
                    "{:.2} s in {:.1} s = {:.2} cores; {:.1} µs per {}; waited {:.2} s for a CPU ({})",
                    cpu.cpu_secs,
                    cpu.phase_secs,
                    cpu.cores_busy,
                    cpu.per_unit_us,
                    cpu.unit,
                    cpu.runqueue_wait_secs,
                    cpu.source
                ),
            );
        }
        if let Some(r) = &self.redis {
            row(
                "Redis work",
                format!(
                    "{} commands ({:.2} per {}, {:.2} PUBLISH), {:.1} µs Redis CPU per {}",
                    r.commands,
                    r.commands_per_unit,
                    r.unit,
                    r.publish_per_unit,
                    r.cpu_us_per_unit,
                    r.unit
                ),
            );
        }
        row(
            "machine load average (1 min) at start / end",
            format!("{:.2} / {:.2}", self.load_average.0, self.load_average.1),
        );
        row(
            "load generator CPU / CPU wait / peak RSS",
            format!(
                "{:.2} s / {:.2} s / {}",
                self.loadgen.cpu_secs,
                self.loadgen.runqueue_wait_secs,
                bytes(self.loadgen.max_rss_bytes as f64)
            ),
        );
        let mut out = String::from("| metric | value |\n|---|---|\n");
        for (k, v) in rows {
            let _ = writeln!(out, "| {k} | {v} |");
        }
        for w in &self.warnings {
            let _ = writeln!(out, "\n> warning: {w}");
        }
        out
    }
}
