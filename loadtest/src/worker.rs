//! A worker: one process's (or the in-process) share of the connections. It ramps its users up at
//! its share of the login rate, holds them with heartbeats, and for `chat` sends and receives the
//! messages of its users (recipients are always among its own users, so every worker accounts for
//! its messages alone); for `broadcast` it counts what arrives.
//!
//! Every connection is one small task (see [`crate::conn`]); counters are atomics, histograms and
//! the per-message bitmaps sit behind one mutex per worker.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::{sleep, sleep_until, timeout, timeout_at, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::TargetKind;
use crate::conn::Conn;
use crate::hist::Hist;
use crate::now_us;
use crate::plan::{
    BroadcastResult, ChatPlan, ChatResult, Control, Event, Plan, Progress, ScenarioPlan, Shard,
    ShardResult,
};
use crate::token::Minter;
use crate::wire::{self, In, Mark};

/// How often a worker reports progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);
/// Queue of messages waiting for one sender's connection.
const SEND_QUEUE: usize = 64;
/// Stream messages received before an acknowledgement goes out even though more frames are
/// waiting (the Rust client's figure).
const ACK_EVERY: u32 = 32;
/// Receipt statuses that promise the message reaches the recipient.
const EXPECTED_STATUSES: &[&str] = &["delivered", "sent"];

/// A growable bitmap.
#[derive(Debug, Default, Clone)]
struct Bits(Vec<u64>);

impl Bits {
    /// Sets bit `i`; returns whether it was set before.
    fn set(&mut self, i: u64) -> bool {
        let (w, b) = ((i / 64) as usize, i % 64);
        if w >= self.0.len() {
            self.0.resize(w + 1, 0);
        }
        let was = self.0[w] & (1 << b) != 0;
        self.0[w] |= 1 << b;
        was
    }

    /// Bits set here and not in `other`.
    fn count_not_in(&self, other: &Bits) -> u64 {
        self.0
            .iter()
            .enumerate()
            .map(|(i, w)| (w & !other.0.get(i).copied().unwrap_or(0)).count_ones() as u64)
            .sum()
    }
}

#[derive(Default)]
struct ChatState {
    /// Per local sender: sequence numbers whose receipt promised delivery.
    expected: Vec<Bits>,
    /// Per local sender: sequence numbers received.
    received: Vec<Bits>,
    expected_n: u64,
    received_n: u64,
    duplicates: u64,
    resent: u64,
    foreign: u64,
    receipts: BTreeMap<String, u64>,
    hist: Hist,
    /// Send → receipt.
    receipt_hist: Hist,
    first_send_us: u64,
    last_send_us: u64,
    last_recv_us: u64,
}

#[derive(Default)]
struct BroadcastState {
    received: u64,
    duplicates: u64,
    foreign: u64,
    first_recv_us: u64,
    last_recv_us: u64,
    hist: Hist,
}

#[derive(Default)]
struct Counters {
    attempted: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
    closed: AtomicU64,
    /// Chat messages handed to a sender's queue.
    dispatched: AtomicU64,
    /// Chat messages the scheduler could not hand over (queue full or connection gone).
    skipped: AtomicU64,
    sent: AtomicU64,
    receipts: AtomicU64,
    received: AtomicU64,
    first_start_us: AtomicU64,
    last_ok_us: AtomicU64,
}

struct Ctx {
    plan: Arc<Plan>,
    chat: Option<ChatPlan>,
    broadcast_ack: bool,
    /// Global number of local user 0.
    first: u64,
    n: u64,
    login_timeout: Duration,
    c: Counters,
    failures: Mutex<BTreeMap<String, u64>>,
    closes: Mutex<BTreeMap<String, u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    login_hist: Mutex<Hist>,
    online: Mutex<Vec<u32>>,
    chat_state: Mutex<ChatState>,
    bcast: Mutex<BroadcastState>,
    /// Cancelled at the end: every connection task returns.
    stop: CancellationToken,
}

fn bump(map: &Mutex<BTreeMap<String, u64>>, key: String) {
    *map.lock().unwrap().entry(key).or_insert(0) += 1;
}

impl Ctx {
    fn progress(&self) -> Progress {
        Progress {
            users: self.n,
            attempted: self.c.attempted.load(Relaxed),
            ok: self.c.ok.load(Relaxed),
            failed: self.c.failed.load(Relaxed),
            closed: self.c.closed.load(Relaxed),
            sent: self.c.sent.load(Relaxed),
            receipts: self.c.receipts.load(Relaxed),
            received: self.c.received.load(Relaxed),
        }
    }

    /// A push arrived; returns whether to acknowledge it. `resent`: its stream position was
    /// received before on this connection (a client drops it without looking at it).
    fn on_push(&self, body: &[u8], resent: bool, seen: &mut Bits) -> bool {
        let now = now_us();
        let mark = Mark::parse(body).unwrap_or_default();
        match &self.plan.scenario {
            ScenarioPlan::Chat(_) => {
                let mut st = self.chat_state.lock().unwrap();
                match (mark.s, mark.q, mark.t) {
                    (Some(s), Some(q), Some(t)) if s >= self.first && s < self.first + self.n => {
                        let local = (s - self.first) as usize;
                        if resent {
                            st.resent += 1;
                        } else if st.received[local].set(q) {
                            st.duplicates += 1;
                        } else {
                            st.received_n += 1;
                            st.hist.record_us(now.saturating_sub(t));
                        }
                        st.last_recv_us = st.last_recv_us.max(now);
                        self.c.received.fetch_add(1, Relaxed);
                    }
                    _ => st.foreign += 1,
                }
                self.chat.as_ref().is_some_and(|c| c.ack)
            }
            ScenarioPlan::Broadcast(_) => {
                let mut st = self.bcast.lock().unwrap();
                match (mark.b, mark.t) {
                    (Some(b), Some(t)) => {
                        if seen.set(b) {
                            st.duplicates += 1;
                        } else {
                            st.received += 1;
                            st.hist.record_us(now.saturating_sub(t));
                            if st.first_recv_us == 0 {
                                st.first_recv_us = now;
                            }
                            st.last_recv_us = st.last_recv_us.max(now);
                            self.c.received.fetch_add(1, Relaxed);
                        }
                    }
                    _ => st.foreign += 1,
                }
                self.broadcast_ack
            }
            ScenarioPlan::Connect => true,
        }
    }

    fn on_receipt(&self, local: u32, seq: u64, status: &str, waited_us: Option<u64>) {
        let mut st = self.chat_state.lock().unwrap();
        if let Some(us) = waited_us {
            st.receipt_hist.record_us(us);
        }
        match st.receipts.get_mut(status) {
            Some(n) => *n += 1,
            None => {
                st.receipts.insert(status.to_owned(), 1);
            }
        }
        if EXPECTED_STATUSES.contains(&status) && !st.expected[local as usize].set(seq) {
            st.expected_n += 1;
        }
        drop(st);
        self.c.receipts.fetch_add(1, Relaxed);
    }

    fn on_sent(&self, sent_us: u64) {
        self.c.sent.fetch_add(1, Relaxed);
        let mut st = self.chat_state.lock().unwrap();
        if st.first_send_us == 0 {
            st.first_send_us = sent_us;
        }
        st.last_send_us = st.last_send_us.max(sent_us);
    }
}

/// Runs one worker until its scenario is over (or it is told to stop, or its time is up).
pub async fn run(
    plan: Arc<Plan>,
    shard: Shard,
    mut control: mpsc::UnboundedReceiver<Control>,
    events: mpsc::UnboundedSender<(usize, Event)>,
) -> ShardResult {
    let (first, n) = shard.users(plan.total_users);
    let deadline = Instant::now() + Duration::from_secs_f64(plan.max_runtime_secs);
    let chat = match &plan.scenario {
        ScenarioPlan::Chat(c) => Some(c.clone()),
        _ => None,
    };
    let broadcast_ack = matches!(&plan.scenario, ScenarioPlan::Broadcast(b) if b.ack);
    let ctx = Arc::new(Ctx {
        plan: plan.clone(),
        chat: chat.clone(),
        broadcast_ack,
        first,
        n,
        login_timeout: Duration::from_secs_f64(plan.login_timeout_secs),
        c: Counters {
            first_start_us: AtomicU64::new(u64::MAX),
            ..Counters::default()
        },
        failures: Mutex::default(),
        closes: Mutex::default(),
        errors: Mutex::default(),
        login_hist: Mutex::default(),
        online: Mutex::new(Vec::with_capacity(n as usize)),
        chat_state: Mutex::new(ChatState {
            expected: if chat.is_some() {
                vec![Bits::default(); n as usize]
            } else {
                Vec::new()
            },
            received: if chat.is_some() {
                vec![Bits::default(); n as usize]
            } else {
                Vec::new()
            },
            ..ChatState::default()
        }),
        bcast: Mutex::default(),
        stop: CancellationToken::new(),
    });

    // Control messages become two tokens: `go` (start the measured phase) and `halt` (end).
    let go = CancellationToken::new();
    let halt = CancellationToken::new();
    let control_task = {
        let (go, halt) = (go.clone(), halt.clone());
        tokio::spawn(async move {
            while let Some(c) = control.recv().await {
                match c {
                    Control::Start => go.cancel(),
                    Control::Stop => halt.cancel(),
                }
            }
            halt.cancel();
        })
    };
    let reporter = {
        let (ctx, events) = (ctx.clone(), events.clone());
        tokio::spawn(async move {
            loop {
                sleep(PROGRESS_EVERY).await;
                if events
                    .send((shard.index, Event::Progress(ctx.progress())))
                    .is_err()
                {
                    return;
                }
            }
        })
    };

    // Ramp up.
    let tasks = TaskTracker::new();
    let minter = Minter::new(&plan.secret, plan.token_ttl);
    let inflight = Arc::new(Semaphore::new(plan.max_inflight.max(1)));
    let rate = (plan.login_rate * n as f64 / plan.total_users as f64).max(0.001);
    let mut queues: Vec<mpsc::Sender<u64>> = Vec::new();
    let ramp_start = Instant::now();
    let mut spawned = 0u64;
    for local in 0..n {
        let due = ramp_start + Duration::from_secs_f64(local as f64 / rate);
        if due > Instant::now() {
            tokio::select! {
                _ = sleep_until(due) => {}
                _ = halt.cancelled() => break,
                _ = sleep_until(deadline) => break,
            }
        }
        let permit = tokio::select! {
            p = inflight.clone().acquire_owned() => p.expect("the semaphore is never closed"),
            _ = halt.cancelled() => break,
            _ = sleep_until(deadline) => break,
        };
        let token = match plan.kind {
            TargetKind::Imgate => minter.mint(&plan.user(first + local)),
            TargetKind::Socketio => String::new(),
        };
        let queue = if chat.is_some() {
            let (tx, rx) = mpsc::channel(SEND_QUEUE);
            queues.push(tx);
            Some(rx)
        } else {
            None
        };
        tasks.spawn(connection(ctx.clone(), local as u32, token, permit, queue));
        spawned += 1;
    }
    // Wait for every login attempt to finish.
    loop {
        let done = ctx.c.ok.load(Relaxed) + ctx.c.failed.load(Relaxed);
        if done >= spawned || halt.is_cancelled() || Instant::now() >= deadline {
            break;
        }
        sleep(Duration::from_millis(10)).await;
    }
    let _ = events.send((shard.index, Event::Ready(ctx.progress())));

    match &chat {
        Some(chat) => {
            tokio::select! {
                _ = go.cancelled() => {
                    send_messages(&ctx, chat, &queues, &halt, deadline).await;
                    drain(&ctx, chat, &halt, deadline).await;
                }
                _ = halt.cancelled() => {}
                _ = sleep_until(deadline) => {}
            }
        }
        None => {
            tokio::select! {
                _ = halt.cancelled() => {}
                _ = sleep_until(deadline) => {}
            }
        }
    }

    // Close every connection.
    ctx.stop.cancel();
    drop(queues);
    tasks.close();
    let _ = timeout(Duration::from_secs(10), tasks.wait()).await;
    reporter.abort();
    control_task.abort();
    let result = result(&ctx);
    let _ = events.send((shard.index, Event::Progress(ctx.progress())));
    result
}

/// Hands messages to random senders at the worker's share of the rate, for the send time or until
/// its share of the message count is reached.
async fn send_messages(
    ctx: &Arc<Ctx>,
    chat: &ChatPlan,
    queues: &[mpsc::Sender<u64>],
    halt: &CancellationToken,
    deadline: Instant,
) {
    let plan = &ctx.plan;
    let online = ctx.online.lock().unwrap().clone();
    if online.is_empty() {
        return;
    }
    let share = ctx.n as f64 / plan.total_users as f64;
    let rate = chat.rate * share;
    let limit = chat
        .messages
        .map(|m| (m as f64 * share).round() as u64)
        .unwrap_or(u64::MAX);
    let targets = plan.targets.len();
    let mut by_target: Vec<Vec<u32>> = vec![Vec::new(); targets];
    for &l in &online {
        by_target[plan.target_index(ctx.first + l as u64)].push(l);
    }
    let other_targets: Vec<usize> = (0..targets).filter(|&t| !by_target[t].is_empty()).collect();
    let mut rng = StdRng::from_os_rng();
    let pick = |rng: &mut StdRng| -> (u32, u32) {
        let sender = online[rng.random_range(0..online.len())];
        let t = plan.target_index(ctx.first + sender as u64);
        let cross =
            other_targets.len() > 1 && rng.random_bool(chat.cross_node_share.clamp(0.0, 1.0));
        let pool = if cross {
            let mut other = t;
            while other == t {
                other = other_targets[rng.random_range(0..other_targets.len())];
            }
            &by_target[other]
        } else {
            &by_target[t]
        };
        let mut to = pool[rng.random_range(0..pool.len())];
        if to == sender && pool.len() > 1 {
            while to == sender {
                to = pool[rng.random_range(0..pool.len())];
            }
        }
        (sender, to)
    };
    let start = Instant::now();
    let send_for = Duration::from_secs_f64(chat.send_secs);
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dispatched = 0u64;
    let mut skipped = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = halt.cancelled() => break,
        }
        let elapsed = start.elapsed();
        if elapsed >= send_for || Instant::now() >= deadline || dispatched + skipped >= limit {
            break;
        }
        let due = ((rate * elapsed.as_secs_f64()) as u64).min(limit);
        while dispatched + skipped < due {
            let (sender, to) = pick(&mut rng);
            match queues[sender as usize].try_send(ctx.first + to as u64) {
                Ok(()) => dispatched += 1,
                Err(_) => skipped += 1,
            }
        }
        ctx.c.dispatched.store(dispatched, Relaxed);
    }
    ctx.c.dispatched.store(dispatched, Relaxed);
    ctx.c.skipped.store(skipped, Relaxed);
}

/// Waits (at most the drain time) until every handed-over message is sent and has its receipt,
/// and every message promised delivery has arrived.
async fn drain(ctx: &Ctx, chat: &ChatPlan, halt: &CancellationToken, deadline: Instant) {
    let until = (Instant::now() + Duration::from_secs_f64(chat.drain_secs)).min(deadline);
    loop {
        let dispatched = ctx.c.dispatched.load(Relaxed);
        let sent = ctx.c.sent.load(Relaxed);
        let receipts = ctx.c.receipts.load(Relaxed);
        let settled = {
            let st = ctx.chat_state.lock().unwrap();
            st.received_n >= st.expected_n
        };
        if sent >= dispatched && receipts >= sent && settled {
            return;
        }
        if halt.is_cancelled() || Instant::now() >= until {
            return;
        }
        sleep(Duration::from_millis(10)).await;
    }
}

/// One user's connection: login, then the session until the end of the run.
async fn connection(
    ctx: Arc<Ctx>,
    local: u32,
    token: String,
    permit: OwnedSemaphorePermit,
    queue: Option<mpsc::Receiver<u64>>,
) {
    let global = ctx.first + local as u64;
    let target = &ctx.plan.targets[ctx.plan.target_index(global)];
    ctx.c.attempted.fetch_add(1, Relaxed);
    ctx.c.first_start_us.fetch_min(now_us(), Relaxed);
    let started = Instant::now();
    let login = tokio::select! {
        r = login(&ctx, target, global, token) => r,
        _ = ctx.stop.cancelled() => Err("STOPPED_DURING_LOGIN".to_owned()),
    };
    drop(permit);
    let (mut conn, heartbeat_ms) = match login {
        Ok(ok) => ok,
        Err(code) => {
            bump(&ctx.failures, code);
            ctx.c.failed.fetch_add(1, Relaxed);
            return;
        }
    };
    ctx.login_hist
        .lock()
        .unwrap()
        .record_us(started.elapsed().as_micros() as u64);
    ctx.online.lock().unwrap().push(local);
    ctx.c.last_ok_us.fetch_max(now_us(), Relaxed);
    ctx.c.ok.fetch_add(1, Relaxed);
    match session(&ctx, &mut conn, local, heartbeat_ms, queue).await {
        Some(reason) => {
            bump(&ctx.closes, reason);
            ctx.c.closed.fetch_add(1, Relaxed);
        }
        None => goodbye(ctx.plan.kind, &mut conn).await,
    }
}

/// Ends a session politely, so that the server closes first and the TIME_WAIT state lands on
/// its side (on ours it would hold local ports that the next run needs): imgate `logout`;
/// Socket.IO namespace disconnect and Engine.IO close. Waits a little for the server's close.
async fn goodbye(kind: TargetKind, conn: &mut Conn) {
    let bye: &[&[u8]] = match kind {
        TargetKind::Imgate => &[br#"{"type":"logout"}"#],
        TargetKind::Socketio => &[b"41", b"1"],
    };
    for frame in bye {
        if conn.send(frame).await.is_err() {
            return;
        }
    }
    let _ = timeout(Duration::from_secs(2), async {
        while let Ok(Some(_)) = conn.recv().await {}
    })
    .await;
}

/// Connects and logs in; the error name when that fails.
async fn login(
    ctx: &Ctx,
    target: &crate::targets::Target,
    global: u64,
    token: String,
) -> Result<(Conn, Option<u64>), String> {
    let deadline = Instant::now() + ctx.login_timeout;
    let kind = ctx.plan.kind;
    let source = crate::conn::source_ip(target, global, ctx.plan.source_ips);
    let mut conn = Conn::open(target, ctx.login_timeout, source)
        .await
        .map_err(|e| e.code("CONNECT"))?;
    let user = ctx.plan.user(global);
    let frame = wire::login(kind, &user, token, &ctx.plan.channel, ctx.plan.heartbeat_ms);
    if kind == TargetKind::Imgate {
        conn.send(&frame).await.map_err(|e| e.code("LOGIN"))?;
    }
    loop {
        let bytes = match timeout_at(deadline, conn.recv()).await {
            Err(_) => return Err("LOGIN_TIMEOUT_CLIENT".into()),
            Ok(Ok(Some(bytes))) => bytes,
            Ok(Ok(None)) => return Err("CLOSED_DURING_LOGIN".into()),
            Ok(Err(e)) => return Err(e.code("LOGIN")),
        };
        match wire::parse(kind, &bytes) {
            In::Open => conn.send(&frame).await.map_err(|e| e.code("LOGIN"))?,
            In::Ping => conn
                .send(wire::EIO_PONG)
                .await
                .map_err(|e| e.code("LOGIN"))?,
            In::LoginOk { heartbeat_ms } => return Ok((conn, heartbeat_ms)),
            In::LoginFailed(code) | In::Closing(code) | In::Error(code) => return Err(code),
            _ => {}
        }
    }
}

async fn next_message(queue: &mut Option<mpsc::Receiver<u64>>) -> Option<u64> {
    match queue {
        Some(q) => q.recv().await,
        None => std::future::pending().await,
    }
}

/// A logged-in connection until the run ends (`None`) or the server closes it (the reason).
async fn session(
    ctx: &Ctx,
    conn: &mut Conn,
    local: u32,
    heartbeat_ms: Option<u64>,
    mut queue: Option<mpsc::Receiver<u64>>,
) -> Option<String> {
    let kind = ctx.plan.kind;
    let global = ctx.first + local as u64;
    // imgate: heartbeat at the negotiated interval - 1 s (docs/protocol.md §4); Socket.IO: the
    // server pings and the client answers.
    let every = match kind {
        TargetKind::Imgate => Some(Duration::from_millis(
            heartbeat_ms
                .unwrap_or(30_000)
                .saturating_sub(1000)
                .max(1000),
        )),
        TargetKind::Socketio => None,
    };
    let heartbeat = sleep(every.unwrap_or(Duration::from_secs(86_400)));
    tokio::pin!(heartbeat);
    let mut seq = 0u64;
    // Send times of the sends without a receipt yet, by sequence number.
    let mut sent_at: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    let mut seen = Bits::default();
    // The highest stream position received on this connection.
    let mut highest = 0u64;
    // Stream messages are acknowledged cumulatively, like the Rust client does: `ack {seq}` once
    // no more frames are waiting, or after ACK_EVERY of them.
    let mut ack_upto: Option<u64> = None;
    let mut unacked = 0u32;
    let payload = ctx.chat.as_ref().map_or(0, |c| c.payload);
    loop {
        tokio::select! {
            biased;
            _ = ctx.stop.cancelled() => return None,
            frame = conn.recv() => {
                let bytes = match frame {
                    Ok(Some(bytes)) => bytes,
                    Ok(None) => return Some("CLOSED_BY_SERVER".into()),
                    Err(e) => return Some(e.code("IO")),
                };
                let reply = match wire::parse(kind, &bytes) {
                    In::Push { id, seq, body } => {
                        let resent = seq.is_some_and(|s| s <= highest);
                        highest = highest.max(seq.unwrap_or(0));
                        let ack = ctx.on_push(body, resent, &mut seen);
                        match (kind, seq, id) {
                            (TargetKind::Imgate, Some(seq), _) if ack => {
                                ack_upto = Some(seq);
                                unacked += 1;
                                if unacked >= ACK_EVERY {
                                    unacked = 0;
                                    ack_upto.take().map(wire::ack_seq)
                                } else {
                                    None
                                }
                            }
                            (TargetKind::Imgate, None, Some(id)) if ack => Some(wire::ack(&id)),
                            _ => None,
                        }
                    }
                    In::Receipt { seq, status } => {
                        let waited = sent_at.remove(&seq).map(|at| now_us().saturating_sub(at));
                        ctx.on_receipt(local, seq, &status, waited);
                        None
                    }
                    In::Ping => Some(wire::EIO_PONG.to_vec()),
                    In::Closing(reason) => return Some(reason),
                    In::Error(name) => {
                        bump(&ctx.errors, name);
                        None
                    }
                    _ => None,
                };
                if let Some(reply) = reply {
                    if let Err(e) = conn.send(&reply).await {
                        return Some(e.code("IO"));
                    }
                }
            }
            Some(to) = next_message(&mut queue) => {
                let sent_us = now_us();
                let body = wire::chat_body(global, seq, sent_us, payload);
                let frame = wire::chat_send(kind, &ctx.plan.user(to), seq, &body);
                sent_at.insert(seq, sent_us);
                seq += 1;
                if let Err(e) = conn.send(&frame).await {
                    return Some(e.code("IO"));
                }
                ctx.on_sent(sent_us);
            }
            () = &mut heartbeat, if every.is_some() => {
                if let Err(e) = conn.send(wire::HEARTBEAT).await {
                    return Some(e.code("IO"));
                }
                let every = every.unwrap_or_default();
                heartbeat.as_mut().reset(Instant::now() + every);
            }
            // Last: taken only when no frame is waiting (`biased`).
            () = std::future::ready(()), if ack_upto.is_some() => {
                unacked = 0;
                if let Some(seq) = ack_upto.take() {
                    if let Err(e) = conn.send(&wire::ack_seq(seq)).await {
                        return Some(e.code("IO"));
                    }
                }
            }
        }
    }
}

/// CPU time (user + system, seconds) and peak resident memory (bytes) of this process.
pub fn own_usage() -> (f64, u64) {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return (0.0, 0);
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (
        secs(ru.ru_utime) + secs(ru.ru_stime),
        ru.ru_maxrss as u64 * 1024,
    )
}

fn result(ctx: &Ctx) -> ShardResult {
    let (cpu_secs, max_rss_bytes) = own_usage();
    let first_start_us = ctx.c.first_start_us.load(Relaxed);
    let chat = ctx.chat.as_ref().map(|_| {
        let st = ctx.chat_state.lock().unwrap();
        let lost = st
            .expected
            .iter()
            .zip(&st.received)
            .map(|(e, r)| e.count_not_in(r))
            .sum();
        let unexpected = st
            .received
            .iter()
            .zip(&st.expected)
            .map(|(r, e)| r.count_not_in(e))
            .sum();
        ChatResult {
            sent: ctx.c.sent.load(Relaxed),
            skipped: ctx.c.skipped.load(Relaxed),
            receipts: st.receipts.clone(),
            expected: st.expected_n,
            received: st.received_n,
            duplicates: st.duplicates,
            resent: st.resent,
            lost,
            unexpected,
            foreign: st.foreign,
            first_send_us: st.first_send_us,
            last_send_us: st.last_send_us,
            last_recv_us: st.last_recv_us,
            latency: st.hist.to_data(),
            receipt_latency: st.receipt_hist.to_data(),
        }
    });
    let broadcast = matches!(ctx.plan.scenario, ScenarioPlan::Broadcast(_)).then(|| {
        let st = ctx.bcast.lock().unwrap();
        BroadcastResult {
            received: st.received,
            duplicates: st.duplicates,
            foreign: st.foreign,
            first_recv_us: st.first_recv_us,
            last_recv_us: st.last_recv_us,
            latency: st.hist.to_data(),
        }
    });
    ShardResult {
        users: ctx.n,
        attempted: ctx.c.attempted.load(Relaxed),
        ok: ctx.c.ok.load(Relaxed),
        failed: ctx.c.failed.load(Relaxed),
        failures: ctx.failures.lock().unwrap().clone(),
        closed: ctx.closes.lock().unwrap().clone(),
        errors: ctx.errors.lock().unwrap().clone(),
        first_start_us: if first_start_us == u64::MAX {
            0
        } else {
            first_start_us
        },
        last_ok_us: ctx.c.last_ok_us.load(Relaxed),
        login_latency: ctx.login_hist.lock().unwrap().to_data(),
        chat,
        broadcast,
        cpu_secs,
        runqueue_wait_secs: crate::gateway::runqueue_wait_of(std::process::id()).unwrap_or(0.0),
        max_rss_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits() {
        let mut a = Bits::default();
        assert!(!a.set(3));
        assert!(a.set(3));
        assert!(!a.set(200));
        let mut b = Bits::default();
        b.set(3);
        assert_eq!(a.count_not_in(&b), 1);
        assert_eq!(b.count_not_in(&a), 0);
    }
}
