//! The coordinator: turns the command line into a [`Plan`], starts the workers (see
//! [`crate::procs`]), drives the scenario's phases, reads the system's memory, CPU and Redis
//! counters around them, and merges the workers' results into the [`Report`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};

use crate::chart;
use crate::cli::{BroadcastArgs, ChartArgs, Cli, Command, Common, TargetKind, Transport};
use crate::gateway::{Memory, Observer};
use crate::hist::Hist;
use crate::now_us;
use crate::plan::{BroadcastPlan, ChatPlan, Control, Plan, Progress, ScenarioPlan, ShardResult};
use crate::procs::{child, nofile_limit, pump, start_workers, Live};
use crate::progress::Display;
use crate::report::{
    connect_summary, merge, per_sec, secs_between, BroadcastSummary, ChatSummary, CpuSummary,
    LatencyCurve, LoadgenSummary, MemorySummary, Report,
};
use crate::targets::{check_http_url, from_alloc, parse_target};

/// Open files kept free in every worker process for everything but client sockets.
const FD_RESERVE: u64 = 200;

/// How a run is embedded.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// The binary started for child workers; this process's executable when `None`.
    pub exe: Option<PathBuf>,
    /// Print the Markdown table (and progress) — the binary does, tests do not.
    pub print: bool,
}

/// Runs the command; scenarios return their report.
pub async fn run(cli: Cli, opts: RunOptions) -> anyhow::Result<Option<Report>> {
    match cli.command {
        Command::Chart(args) => {
            chart_command(&args)?;
            Ok(None)
        }
        Command::Worker(args) => {
            child(args).await?;
            Ok(None)
        }
        Command::Soak(args) => {
            let report = crate::soak::run(&args).await?;
            if opts.print {
                println!("{}", report.markdown());
            }
            if let Some(out) = &args.out {
                std::fs::write(out, serde_json::to_vec_pretty(&report)?)?;
            }
            if !report.passed {
                bail!("soak failed: see the report above");
            }
            Ok(None)
        }
        command => scenario(command, &opts).await.map(Some),
    }
}

/// A finite number above zero.
fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

fn check_name(what: &str, s: &str) -> anyhow::Result<()> {
    if s.is_empty()
        || s.len() > 100
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:@".contains(c))
    {
        bail!("{what} {s:?}: use 1 to 100 of A-Z a-z 0-9 - _ . : @");
    }
    Ok(())
}

struct Setup {
    name: &'static str,
    common: Common,
    plan: Plan,
    parameters: serde_json::Value,
    settle: f64,
    hold: f64,
    broadcast: Option<BroadcastArgs>,
}

async fn setup(command: Command) -> anyhow::Result<Setup> {
    let (name, common) = match &command {
        Command::Connect(a) => ("connect", a.common.clone()),
        Command::Chat(a) => ("chat", a.common.clone()),
        Command::Broadcast(a) => ("broadcast", a.common.clone()),
        _ => unreachable!("only scenarios are set up"),
    };
    let kind = common.target_kind;
    if kind == TargetKind::Socketio && common.transport == Some(Transport::Tcp) {
        bail!("Socket.IO targets speak WebSocket only");
    }
    if kind == TargetKind::Socketio && name == "broadcast" {
        bail!("the broadcast scenario needs the imgate admin API; Socket.IO is compared on connect and chat");
    }
    let targets = match (&common.alloc, common.targets.is_empty()) {
        (Some(alloc), _) => {
            from_alloc(alloc, common.transport, &crate::gateway::http_client()).await?
        }
        (None, false) => common
            .targets
            .iter()
            .map(|t| parse_target(t, kind, common.transport))
            .collect::<anyhow::Result<Vec<_>>>()?,
        (None, true) => {
            bail!("give the nodes with --targets (e.g. tcp://127.0.0.1:7400) or --alloc")
        }
    };
    check_name("--user-prefix", &format!("{}0", common.user_prefix))?;
    check_name("--channel", &common.channel)?;
    if common.connections == 0 {
        bail!("-n/--connections must be at least 1");
    }
    if !positive(common.duration) {
        bail!("--duration must be positive");
    }
    let mut parameters = serde_json::json!({
        "connections": common.connections,
        "duration_secs": common.duration,
        "channel": common.channel,
        "heartbeat_ms": common.heartbeat_ms,
        "max_inflight": common.max_inflight,
        "source_ips": common.source_ips,
        "redis": common.redis,
        "user_prefix": common.user_prefix,
        "user_offset": common.user_offset,
    });
    let (login_rate, scenario, settle, hold, broadcast) = match command {
        Command::Connect(a) => {
            parameters["rate"] = a.rate.into();
            parameters["hold_secs"] = a.hold.unwrap_or(common.duration).into();
            parameters["settle_secs"] = a.settle.into();
            (
                a.rate,
                ScenarioPlan::Connect,
                a.settle,
                a.hold.unwrap_or(common.duration),
                None,
            )
        }
        Command::Chat(a) => {
            if !positive(a.rate) {
                bail!("--rate must be positive");
            }
            if !(0.0..=1.0).contains(&a.cross_node_share) {
                bail!("--cross-node-share is a fraction from 0 to 1");
            }
            parameters["login_rate"] = a.login_rate.into();
            parameters["rate"] = a.rate.into();
            parameters["messages"] = a.messages.into();
            parameters["cross_node_share"] = a.cross_node_share.into();
            parameters["payload"] = a.payload.into();
            parameters["drain_secs"] = a.drain.into();
            parameters["ack"] = (!a.no_ack).into();
            (
                a.login_rate,
                ScenarioPlan::Chat(ChatPlan {
                    rate: a.rate,
                    messages: a.messages,
                    send_secs: common.duration,
                    cross_node_share: a.cross_node_share,
                    payload: a.payload,
                    drain_secs: a.drain,
                    ack: !a.no_ack,
                }),
                0.0,
                0.0,
                None,
            )
        }
        Command::Broadcast(a) => {
            parameters["login_rate"] = a.login_rate.into();
            parameters["count"] = a.count.into();
            parameters["rate"] = a.rate.into();
            parameters["drain_secs"] = a.drain.into();
            parameters["ack"] = a.ack.into();
            parameters["broadcast_channel"] = a.broadcast_channel.clone().into();
            if common.admin.is_empty() {
                bail!("broadcast needs --admin (the admin API base URL)");
            }
            (
                a.login_rate,
                ScenarioPlan::Broadcast(BroadcastPlan { ack: a.ack }),
                0.0,
                0.0,
                Some(a),
            )
        }
        _ => unreachable!(),
    };
    if !positive(login_rate) {
        bail!("the login rate must be positive");
    }
    let plan = Plan {
        kind,
        targets,
        secret: common.secret.clone(),
        token_ttl: common.token_ttl,
        user_prefix: common.user_prefix.clone(),
        user_offset: common.user_offset,
        channel: common.channel.clone(),
        total_users: common.connections,
        login_rate,
        max_inflight: common.max_inflight,
        login_timeout_secs: common.login_timeout,
        heartbeat_ms: common.heartbeat_ms,
        source_ips: common.source_ips,
        max_runtime_secs: common.max_runtime,
        scenario,
    };
    Ok(Setup {
        name,
        common,
        plan,
        parameters,
        settle,
        hold,
        broadcast,
    })
}

async fn read_redis(
    redis: &Option<(String, String)>,
    warnings: &mut Vec<String>,
) -> Option<crate::redis_info::RedisMark> {
    let (url, addr) = redis.as_ref()?;
    match crate::redis_info::read(addr).await {
        Ok(m) => Some(m),
        Err(e) => {
            warnings.push(format!("cannot read INFO from {url}: {e:#}"));
            None
        }
    }
}

async fn read_memory(observer: &Observer, warnings: &mut Vec<String>) -> Option<Memory> {
    match observer.memory().await {
        Ok(m) => m,
        Err(e) => {
            warnings.push(format!("cannot read the system's memory: {e:#}"));
            None
        }
    }
}

fn memory_summary(
    before: &Option<Memory>,
    after: &Option<Memory>,
    held: u64,
) -> Option<MemorySummary> {
    let (b, a) = (before.as_ref()?, after.as_ref()?);
    let connections = match (b.connections, a.connections) {
        (Some(cb), Some(ca)) if ca > cb => ca - cb,
        _ => held,
    };
    Some(MemorySummary {
        source: a.source.clone(),
        before_bytes: b.bytes,
        after_bytes: a.bytes,
        connections,
        per_connection_bytes: if connections > 0 {
            ((a.bytes as f64 - b.bytes as f64) / connections as f64).round()
        } else {
            0.0
        },
    })
}

/// CPU time and run-queue delay of the observed processes at one moment.
#[derive(Debug, Clone, Copy)]
struct CpuMark {
    cpu: f64,
    wait: f64,
}

fn cpu_mark(observer: &Observer) -> Option<CpuMark> {
    Some(CpuMark {
        cpu: observer.cpu_secs()?,
        wait: observer.runqueue_wait_secs().unwrap_or(0.0),
    })
}

fn cpu_summary(
    observer: &Observer,
    before: Option<CpuMark>,
    after: Option<CpuMark>,
    phase_secs: f64,
    unit: &str,
    units: u64,
) -> Option<CpuSummary> {
    let (before, after) = (before?, after?);
    let cpu = after.cpu - before.cpu;
    let wait = after.wait - before.wait;
    Some(CpuSummary {
        source: format!(
            "/proc/PID/stat of pid {}",
            observer
                .pids()
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("+")
        ),
        cpu_secs: (cpu * 1000.0).round() / 1000.0,
        phase_secs: (phase_secs * 1000.0).round() / 1000.0,
        cores_busy: if phase_secs > 0.0 {
            ((cpu / phase_secs) * 100.0).round() / 100.0
        } else {
            0.0
        },
        runqueue_wait_secs: (wait.max(0.0) * 1000.0).round() / 1000.0,
        unit: unit.to_owned(),
        per_unit_us: if units > 0 {
            ((cpu * 1e6 / units as f64) * 10.0).round() / 10.0
        } else {
            0.0
        },
    })
}

/// Posts the broadcasts; returns (posted, reached, first post time in µs, POST latencies).
async fn post_broadcasts(
    observer: Arc<Observer>,
    args: BroadcastArgs,
    until: Instant,
) -> anyhow::Result<(u64, u64, u64, Hist)> {
    let mut posted = 0;
    let mut reached = 0;
    let mut first_us = 0;
    let mut latency = Hist::default();
    let start = Instant::now();
    for k in 0..args.count {
        if args.rate > 0.0 {
            sleep_until(start + Duration::from_secs_f64(k as f64 / args.rate)).await;
        }
        if Instant::now() >= until {
            break;
        }
        let t = now_us();
        if first_us == 0 {
            first_us = t;
        }
        let body = serde_json::json!({ "b": k, "t": t });
        let sent = std::time::Instant::now();
        reached += observer
            .broadcast(body, args.broadcast_channel.as_deref())
            .await?;
        latency.record_us(sent.elapsed().as_micros() as u64);
        posted += 1;
    }
    Ok((posted, reached, first_us, latency))
}

async fn scenario(command: Command, opts: &RunOptions) -> anyhow::Result<Report> {
    let setup = setup(command).await?;
    let common = &setup.common;
    let started_at_unix_ms = now_us() / 1000;
    let load_at_start = crate::report::load_average();
    let wall = Instant::now();
    let mut warnings = Vec::new();

    let admins = common
        .admin
        .iter()
        .map(|a| check_http_url(a))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let redis = match &common.redis {
        Some(url) => Some((url.clone(), crate::redis_info::check_url(url)?)),
        None => None,
    };
    let observer = Arc::new(Observer::new(
        admins,
        common.admin_token.clone(),
        common.gateway_pid.clone(),
    ));

    // Processes: each holds at most its open-file limit of sockets.
    let limit = nofile_limit();
    let per_proc = limit.saturating_sub(FD_RESERVE).max(1);
    let needed = common.connections.div_ceil(per_proc) as usize;
    let procs = match common.procs {
        Some(p) if p < needed => bail!(
            "{} connections need at least {needed} processes here (open-file limit {limit}); pass --procs {needed} or more",
            common.connections
        ),
        Some(p) => p.clamp(1, common.connections as usize),
        None => needed.max(1),
    };
    if setup.plan.targets.len() == 1 {
        if let ScenarioPlan::Chat(c) = &setup.plan.scenario {
            if c.cross_node_share > 0.0 {
                warnings.push("--cross-node-share ignored: there is only one target".into());
            }
        }
    }
    let plan = Arc::new(setup.plan.clone());
    let deadline = wall + Duration::from_secs_f64(common.max_runtime);

    let mem_before = read_memory(&observer, &mut warnings).await;
    let cpu_start = cpu_mark(&observer);
    let redis_start = read_redis(&redis, &mut warnings).await;
    let (ev_tx, mut events) = mpsc::unbounded_channel();
    let controls = start_workers(&plan, procs, opts.exe.as_deref(), &ev_tx)?;
    drop(ev_tx);
    let mut live = Live {
        progress: vec![Progress::default(); procs],
        ready: vec![false; procs],
        done: (0..procs).map(|_| None).collect(),
        failed: vec![None; procs],
        display: Display::new(opts.print, common.quiet, common.connections),
    };
    let stop_all = |controls: &[mpsc::UnboundedSender<Control>]| {
        for c in controls {
            let _ = c.send(Control::Stop);
        }
    };

    // Phase 1: every login attempted.
    pump(&mut events, &mut live, deadline, Live::all_ready).await;
    let ramp_secs = wall.elapsed().as_secs_f64();
    let cpu_ready = cpu_mark(&observer);
    let redis_ready = read_redis(&redis, &mut warnings).await;
    // Redis counters around the measured phase: (before, after, unit).
    let mut redis_phase: Option<(
        crate::redis_info::RedisMark,
        crate::redis_info::RedisMark,
        &str,
    )> = None;

    let mem_after;
    let mut system_cpu = None;
    let mut broadcast_summary = None;
    let mut chat_phase = None;
    match &plan.scenario {
        ScenarioPlan::Connect => {
            live.display.phase = "holding";
            let ready_at = Instant::now();
            pump(
                &mut events,
                &mut live,
                (ready_at + Duration::from_secs_f64(setup.settle)).min(deadline),
                |_| false,
            )
            .await;
            mem_after = read_memory(&observer, &mut warnings).await;
            pump(
                &mut events,
                &mut live,
                (ready_at + Duration::from_secs_f64(setup.hold.max(setup.settle))).min(deadline),
                |_| false,
            )
            .await;
            let ok = live.total().ok;
            system_cpu = cpu_summary(&observer, cpu_start, cpu_ready, ramp_secs, "login", ok);
            if let (Some(a), Some(b)) = (redis_start.clone(), redis_ready.clone()) {
                redis_phase = Some((a, b, "login"));
            }
        }
        ScenarioPlan::Chat(_) => {
            mem_after = read_memory(&observer, &mut warnings).await;
            live.display.phase = "sending";
            let cpu_before = cpu_mark(&observer);
            let t0 = Instant::now();
            for c in &controls {
                let _ = c.send(Control::Start);
            }
            pump(&mut events, &mut live, deadline, Live::all_done).await;
            chat_phase = Some((cpu_before, cpu_mark(&observer), t0.elapsed().as_secs_f64()));
            if let (Some(a), Some(b)) =
                (redis_ready.clone(), read_redis(&redis, &mut warnings).await)
            {
                redis_phase = Some((a, b, "message"));
            }
        }
        ScenarioPlan::Broadcast(_) => {
            mem_after = read_memory(&observer, &mut warnings).await;
            live.display.phase = "broadcasting";
            let args = setup.broadcast.clone().expect("broadcast arguments");
            let cpu_before = cpu_mark(&observer);
            let t0 = Instant::now();
            let until = (t0 + Duration::from_secs_f64(common.duration)).min(deadline);
            let poster = tokio::spawn(post_broadcasts(observer.clone(), args.clone(), until));
            pump(&mut events, &mut live, deadline, |_| poster.is_finished()).await;
            let posted = if poster.is_finished() {
                poster.await.context("broadcast task")??
            } else {
                poster.abort();
                bail!("broadcasting did not finish before --max-runtime");
            };
            let (_, reached, _, _) = &posted;
            let reached = *reached;
            live.display.phase = "draining";
            pump(
                &mut events,
                &mut live,
                (Instant::now() + Duration::from_secs_f64(args.drain)).min(deadline),
                |l| l.total().received >= reached,
            )
            .await;
            let cpu_after = cpu_mark(&observer);
            if let (Some(a), Some(b)) =
                (redis_ready.clone(), read_redis(&redis, &mut warnings).await)
            {
                redis_phase = Some((a, b, "delivery"));
            }
            broadcast_summary = Some((posted, cpu_before, cpu_after, t0.elapsed().as_secs_f64()));
        }
    }
    live.display.phase = "closing";
    stop_all(&controls);
    let grace = Instant::now() + Duration::from_secs(30);
    if !pump(&mut events, &mut live, grace.max(deadline), Live::all_done).await {
        warnings.push("some workers did not report before the deadline".into());
    }
    live.display.finish();

    let results: Vec<ShardResult> = live.done.iter().flatten().cloned().collect();
    for e in live.failed.iter().flatten() {
        warnings.push(e.clone());
    }
    let m = merge(&results);
    let connections = connect_summary(&m, common.connections);
    if connections.failed > 0 {
        warnings.push(format!("{} logins failed", connections.failed));
    }
    if !connections.closed_by_server.is_empty() {
        warnings.push("the server closed connections during the run".into());
    }
    let held = connections.ok;
    let memory = memory_summary(&mem_before, &mem_after, held);

    let mut chat = None;
    let mut broadcast = None;
    let curve;
    match &plan.scenario {
        ScenarioPlan::Connect => {
            curve = LatencyCurve {
                what: "login latency".into(),
                points: m.login.curve(),
            };
        }
        ScenarioPlan::Chat(c) => {
            let r = m.r.chat.clone().unwrap_or_default();
            let hist = m.chat.clone().unwrap_or_default();
            let send_secs = secs_between(r.first_send_us, r.last_send_us);
            let throughput_secs = secs_between(r.first_send_us, r.last_recv_us);
            if r.lost > 0 {
                warnings.push(format!("{} messages lost", r.lost));
            }
            let receipted: u64 = r.receipts.values().sum();
            let missing_receipts = r.sent.saturating_sub(receipted);
            if missing_receipts > 0 {
                warnings.push(format!(
                    "{missing_receipts} messages got no receipt within the drain period"
                ));
            }
            if r.unexpected > 0 {
                warnings.push(format!(
                    "{} messages were pushed to their recipient without a receipt promising delivery",
                    r.unexpected
                ));
            }
            if r.skipped > 0 {
                warnings.push(format!(
                    "{} messages skipped: their sender's queue was full (the load generator or the server could not keep up)",
                    r.skipped
                ));
            }
            if let Some((before, after, secs)) = chat_phase {
                system_cpu = cpu_summary(&observer, before, after, secs, "message", r.sent);
            }
            chat = Some(ChatSummary {
                users: m.r.users,
                requested_rate_per_s: c.rate,
                cross_node_share: c.cross_node_share,
                payload_bytes: c.payload,
                sent: r.sent,
                skipped: r.skipped,
                receipts: r.receipts.clone(),
                missing_receipts,
                expected: r.expected,
                delivered: r.received,
                lost: r.lost,
                duplicated: r.duplicates,
                resent: r.resent,
                unexpected: r.unexpected,
                foreign: r.foreign,
                send_secs,
                send_rate_per_s: per_sec(r.sent, send_secs),
                throughput_per_s: per_sec(r.received, throughput_secs),
                latency: hist.percentiles(),
                receipt_latency: m.receipts.clone().unwrap_or_default().percentiles(),
            });
            curve = LatencyCurve {
                what: "message latency (send → push received)".into(),
                points: hist.curve(),
            };
        }
        ScenarioPlan::Broadcast(_) => {
            let r = m.r.broadcast.clone().unwrap_or_default();
            let hist = m.broadcast.clone().unwrap_or_default();
            let ((posted, reached, first_post_us, post_latency), cpu_before, cpu_after, secs) =
                broadcast_summary.expect("the broadcast phase ran");
            let bsecs = secs_between(first_post_us, r.last_recv_us);
            system_cpu = cpu_summary(
                &observer, cpu_before, cpu_after, secs, "delivery", r.received,
            );
            let lost = reached.saturating_sub(r.received);
            if lost > 0 {
                warnings.push(format!("{lost} broadcast deliveries did not arrive"));
            }
            broadcast = Some(BroadcastSummary {
                clients: m.r.ok,
                broadcasts: posted,
                reached,
                received: r.received,
                lost,
                duplicated: r.duplicates,
                secs: bsecs,
                deliveries_per_s: per_sec(r.received, bsecs),
                latency: hist.percentiles(),
                post_latency: post_latency.percentiles(),
            });
            curve = LatencyCurve {
                what: "broadcast delivery latency (POST → push received)".into(),
                points: hist.curve(),
            };
        }
    }

    let redis_summary = redis_phase.map(|(before, after, unit)| {
        let units = match unit {
            "login" => connections.ok,
            "message" => chat.as_ref().map_or(0, |c| c.sent),
            _ => broadcast.as_ref().map_or(0, |b| b.received),
        };
        let url = redis.as_ref().map(|r| r.0.clone()).unwrap_or_default();
        crate::redis_info::summary(&url, &before, &after, unit, units)
    });
    let report = Report {
        scenario: setup.name.to_owned(),
        target_kind: plan.kind,
        transport: {
            let mut t: Vec<&str> = plan.targets.iter().map(|t| t.transport.as_str()).collect();
            t.dedup();
            t.join("+")
        },
        targets: plan.targets.iter().map(|t| t.label()).collect(),
        procs,
        started_at_unix_ms,
        wall_secs: (wall.elapsed().as_secs_f64() * 100.0).round() / 100.0,
        parameters: setup.parameters.clone(),
        connections,
        memory,
        system_cpu,
        redis: redis_summary,
        chat,
        broadcast,
        loadgen: LoadgenSummary {
            cpu_secs: (m.r.cpu_secs * 100.0).round() / 100.0,
            runqueue_wait_secs: (m.r.runqueue_wait_secs * 100.0).round() / 100.0,
            max_rss_bytes: m.r.max_rss_bytes,
        },
        latency_curve: curve,
        load_average: (load_at_start, crate::report::load_average()),
        warnings,
    };
    write_outputs(&report, common, opts)?;
    Ok(report)
}

fn chart_title(r: &Report) -> (String, String) {
    let who = match r.target_kind {
        TargetKind::Imgate => "imgate",
        TargetKind::Socketio => "Socket.IO",
    };
    let title = format!("{who} {} — {}", r.scenario, r.latency_curve.what);
    let mut sub = format!(
        "{} connections over {} target(s), {}",
        r.connections.ok,
        r.targets.len(),
        r.transport
    );
    if let Some(c) = &r.chat {
        sub += &format!(
            ", {:.0} msg/s asked, {:.0} received/s, {} B payload, {:.0}% cross-node",
            c.requested_rate_per_s,
            c.throughput_per_s,
            c.payload_bytes,
            c.cross_node_share * 100.0
        );
    }
    if let Some(b) = &r.broadcast {
        sub += &format!(
            ", {} broadcasts, {:.0} deliveries/s",
            b.broadcasts, b.deliveries_per_s
        );
    }
    (title, sub)
}

fn write_outputs(report: &Report, common: &Common, opts: &RunOptions) -> anyhow::Result<()> {
    if opts.print {
        println!("{}", report.markdown());
    }
    if let Some(out) = &common.out {
        let json = serde_json::to_string_pretty(report)?;
        std::fs::write(out, json + "\n")
            .with_context(|| format!("cannot write {}", out.display()))?;
        if opts.print {
            eprintln!("results written to {}", out.display());
        }
    }
    let chart_path = common
        .chart
        .clone()
        .or_else(|| common.out.as_ref().map(|o| o.with_extension("svg")));
    if let Some(path) = chart_path {
        let (title, sub) = chart_title(report);
        let svg = chart::render(
            &title,
            &sub,
            &[chart::Series {
                label: format!("{:?} {}", report.target_kind, report.transport).to_lowercase(),
                points: report.latency_curve.points.clone(),
            }],
        );
        std::fs::write(&path, svg).with_context(|| format!("cannot write {}", path.display()))?;
        if opts.print {
            eprintln!("latency chart written to {}", path.display());
        }
    }
    Ok(())
}

fn chart_command(args: &ChartArgs) -> anyhow::Result<()> {
    let mut series = Vec::new();
    let mut whats = Vec::new();
    for (i, path) in args.inputs.iter().enumerate() {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let r: Report = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a result file", path.display()))?;
        let label = args.labels.get(i).cloned().unwrap_or_else(|| {
            format!("{:?} {} {}", r.target_kind, r.scenario, r.transport).to_lowercase()
        });
        whats.push(r.latency_curve.what.clone());
        series.push(chart::Series {
            label,
            points: r.latency_curve.points,
        });
    }
    whats.dedup();
    let title = args
        .title
        .clone()
        .unwrap_or_else(|| "latency by percentile".to_owned());
    std::fs::write(
        &args.out,
        chart::render(&title, &whats.join(" / "), &series),
    )
    .with_context(|| format!("cannot write {}", args.out.display()))?;
    Ok(())
}
