//! `soak`: a cluster of its own under steady traffic for a chosen time while faults are injected
//! at random moments (nodes killed, Redis restarted empty or flushed or cut off, database links
//! frozen or cut, the messages table locked, client links cut), with clients that resume and
//! resend as the Rust client does. At the end every message whose receipt said `stored` or
//! `delivered` must have reached its recipient's application exactly once, in the order its sender
//! sent it.
//!
//! Where things live: [`cluster`] (Redis, database, nodes, proxies), [`faults`] (what is injected
//! and how it heals), [`traffic`] (the users and the ledger of what was sent and received).

pub mod cluster;
pub mod faults;
pub mod traffic;

use crate::lock;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cli::SoakArgs;
use crate::token::Minter;
use cluster::{Cluster, ClusterSpec};
use faults::FaultLog;
use traffic::{Ledger, UserSpec, Users, Verdict};

#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub nodes: usize,
    pub users: u32,
    pub rate: f64,
    pub routing: String,
    pub traffic_secs: f64,
    /// From the end of traffic until every promised message arrived (or the drain limit).
    pub drain_secs: f64,
    pub faults: FaultLog,
    pub verdict: Verdict,
    /// Clean verdict, no node exited by itself, every fault applied and healed.
    pub passed: bool,
    pub logs: PathBuf,
}

pub async fn run(args: &SoakArgs) -> anyhow::Result<SoakReport> {
    if args.nodes == 0 || args.users < 2 {
        bail!("a soak needs at least 1 node and 2 users");
    }
    let positive = |x: f64| x.is_finite() && x > 0.0;
    if !positive(args.rate) || !positive(args.duration) || !positive(args.fault_every) {
        bail!("--rate, --duration and --fault-every must be positive");
    }
    if !args.drain.is_finite() || args.drain < 0.0 {
        bail!("--drain must be 0 or more");
    }
    let logs = args.logs.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("imgate-soak-{:08x}", rand::random::<u32>()))
    });
    let spec = ClusterSpec {
        nodes: args.nodes,
        gateway_bin: args
            .gateway_bin
            .clone()
            .unwrap_or_else(cluster::default_gateway_bin),
        redis_server: args.redis_server.clone(),
        mysql: args.mysql.clone(),
        routing: args.routing.clone(),
        logs: logs.clone(),
    };
    let say = |line: String| {
        if !args.quiet {
            eprintln!("{line}");
        }
    };
    say(format!(
        "soak: {} nodes, {} users, {} msg/s for {} s, a fault every ~{} s; node logs in {}",
        args.nodes,
        args.users,
        args.rate,
        args.duration,
        args.fault_every,
        logs.display()
    ));
    let cluster = Cluster::start(&spec).await?;

    let minter = Minter::new(cluster::SECRET, (args.duration + args.drain) as u64 + 3600);
    let tokens = (0..args.users)
        .map(|u| minter.mint(&format!("soak-{u}")))
        .collect();
    let nodes = cluster
        .nodes
        .iter()
        .map(|n| (n.proxy.endpoint(), n.proxy.ws_endpoint()))
        .collect();
    let cluster = Arc::new(tokio::sync::Mutex::new(cluster));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let fault_log = Arc::new(Mutex::new(FaultLog::default()));
    let stop_sending = CancellationToken::new();
    let stop_faults = CancellationToken::new();
    let started = Instant::now();
    let mut users = Users::start(
        UserSpec {
            users: args.users,
            rate: args.rate,
            nodes,
            tokens,
        },
        ledger.clone(),
        stop_sending.clone(),
    );
    let injector = tokio::spawn(faults::inject(
        cluster.clone(),
        args.faults.clone(),
        Duration::from_secs_f64(args.fault_every),
        started,
        fault_log.clone(),
        stop_faults.clone(),
    ));

    let end = started + Duration::from_secs_f64(args.duration);
    let mut next_report = started + Duration::from_secs(10);
    while Instant::now() < end {
        tokio::time::sleep_until(end.min(next_report)).await;
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(10);
            let (sent, promised, received) = lock(&ledger).progress();
            let faults: u64 = lock(&fault_log).counts.values().sum();
            say(format!(
                "{:>6.0} s: sent {sent}, stored or delivered {promised}, received {received}, faults {faults}",
                started.elapsed().as_secs_f64()
            ));
        }
    }
    stop_faults.cancel();
    stop_sending.cancel();
    let _ = injector.await;
    users.senders_done().await;
    faults::restart_exited(&mut *cluster.lock().await, &fault_log).await;
    let traffic_secs = started.elapsed().as_secs_f64();

    let drained = Instant::now();
    let drain_end = drained + Duration::from_secs_f64(args.drain);
    while lock(&ledger).unreceived() > 0 && Instant::now() < drain_end {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drain_secs = drained.elapsed().as_secs_f64();
    let verdict = lock(&ledger).verdict();
    users.close().await;
    faults::restart_exited(&mut *cluster.lock().await, &fault_log).await;
    let faults = lock(&fault_log).clone();
    match Arc::try_unwrap(cluster) {
        Ok(c) => c.into_inner().stop().await,
        Err(_) => bail!("the fault injector still holds the cluster"),
    }
    let passed = verdict.clean() && faults.unexpected_exits.is_empty() && faults.errors.is_empty();
    Ok(SoakReport {
        nodes: args.nodes,
        users: args.users,
        rate: args.rate,
        routing: args.routing.clone(),
        traffic_secs,
        drain_secs,
        faults,
        verdict,
        passed,
        logs,
    })
}

impl SoakReport {
    /// The report as Markdown.
    pub fn markdown(&self) -> String {
        let v = &self.verdict;
        let mut s = format!(
            "## soak: {} nodes ({}), {} users, {} msg/s, {:.0} s of traffic\n\n",
            self.nodes, self.routing, self.users, self.rate, self.traffic_secs
        );
        s += &format!(
            "| faults | {} |\n|---|---|\n",
            self.faults.counts.values().sum::<u64>()
        );
        for (k, n) in &self.faults.counts {
            s += &format!("| {k} | {n} |\n");
        }
        s += "\n| messages | |\n|---|---|\n";
        let rows: [(&str, u64); 11] = [
            ("sent", v.sent),
            ("stored or delivered (promised)", v.promised),
            ("refused", v.refused_by_reason.values().sum()),
            ("no receipt in 30 s", v.unanswered),
            ("received (distinct)", v.received),
            ("**lost**", v.lost),
            ("**duplicates handed to the application**", v.duplicates),
            ("**out of order**", v.out_of_order),
            ("**misdelivered**", v.misdelivered),
            ("**refused but received**", v.refused_but_received),
            ("received without a receipt", v.received_unanswered),
        ];
        for (k, n) in rows {
            s += &format!("| {k} | {n} |\n");
        }
        s += &format!(
            "\nrefused by reason: {:?}\nclient events: {:?}\ndrain: {:.1} s\n",
            v.refused_by_reason, v.client_events, self.drain_secs
        );
        for e in &self.faults.unexpected_exits {
            s += &format!("UNEXPECTED NODE EXIT: {e}\n");
        }
        for e in &self.faults.errors {
            s += &format!("FAULT ERROR: {e}\n");
        }
        s += &format!(
            "\n**{}**; node logs in {}\n",
            if self.passed { "PASSED" } else { "FAILED" },
            self.logs.display()
        );
        s
    }
}
