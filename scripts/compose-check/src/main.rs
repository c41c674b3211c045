//! End-to-end checks of the three-node compose cluster, through its published ports, with the
//! shipped async client (`imgate_shared::client`). Run by `scripts/compose-test.sh`:
//!
//! - `exchange`: a user on node 1 (TCP) and one on node 3 (WebSocket) exchange messages; a message
//!   sent through node 2's admin API reaches the user on node 1; presence and history answer.
//! - `failover`: users on node 2 (one with a fixed endpoint list, one placed by `/api/v1/alloc`)
//!   keep receiving and sending while node 2 is stopped with SIGTERM (`--stop-cmd`). Every receipt
//!   is classified; "delivered" messages must arrive, "stored" ones must be kept (pending) in the
//!   store, and messages sent after the reconnect must arrive.
//!
//! Every message id is appended to `--ids-out` as `id recipient status`, so the script can check
//! the rows in MySQL. Exits non-zero, with the reason, when a check fails.

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand};
use imgate_shared::client::{Client, ClientConfig, Event, Message, Receipt};
use imgate_shared::connection::Endpoint;
use imgate_shared::protocol::{Body, KickReason, MessageId, SendStatus};
use serde_json::{json, Value};
use tokio::time::Instant;

#[derive(Parser)]
#[command(about = "End-to-end checks of the imgate compose cluster")]
struct Cli {
    /// A node as `id=client-host:port=admin-url`, e.g.
    /// `node-1=127.0.0.1:7411=http://127.0.0.1:7412`; give all three, in order.
    #[arg(long = "node", required = true)]
    nodes: Vec<String>,
    /// Bearer token of the admin API.
    #[arg(long, env = "IMGATE_ADMIN_TOKEN")]
    admin_token: String,
    /// File of `user token` lines (minted with `imgate token --user ...`).
    #[arg(long)]
    tokens: PathBuf,
    /// Prefix of the user ids, unique per run.
    #[arg(long)]
    prefix: String,
    /// `id recipient status` lines are appended here, one per message.
    #[arg(long)]
    ids_out: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Messages between node 1 and node 3, and from node 2's admin API to node 1.
    Exchange,
    /// Users on node 2 move to other nodes while node 2 stops; nothing is lost.
    Failover {
        /// Shell command that stops node 2 with SIGTERM (e.g. `docker compose stop imgate-2`).
        #[arg(long)]
        stop_cmd: String,
    },
}

#[derive(Clone)]
struct Node {
    id: String,
    client: String,
    admin: String,
}

impl Node {
    fn tcp(&self) -> Endpoint {
        Endpoint::tcp(&self.client)
    }
    fn ws(&self) -> Endpoint {
        Endpoint::ws(&self.client)
    }
}

/// Everything one client saw, with the time it saw it.
#[derive(Default)]
struct Log {
    connected: Vec<(Instant, String)>,
    /// When a connection resumed its session (fast reconnect) instead of logging in.
    resumed: Vec<Instant>,
    kicked: Vec<(Instant, KickReason)>,
    disconnected: Vec<(Instant, String)>,
    messages: HashMap<MessageId, (Instant, Message)>,
    errors: Vec<String>,
}

struct User {
    name: String,
    id: String,
    client: Client,
    log: Arc<Mutex<Log>>,
}

impl User {
    fn start(name: &str, id: &str, config: ClientConfig) -> User {
        let (client, mut events) = Client::start(config);
        let log = Arc::new(Mutex::new(Log::default()));
        let (log2, name2) = (log.clone(), name.to_owned());
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let now = Instant::now();
                let mut l = log2.lock().unwrap();
                match event {
                    Event::Connected {
                        node_id,
                        resumed,
                        cursor,
                        ..
                    } => {
                        let how = if resumed { "resumed its session" } else { "logged in" };
                        say(&format!("{name2}: connected to {node_id} ({how}, cursor {cursor})"));
                        if resumed {
                            l.resumed.push(now);
                        }
                        l.connected.push((now, node_id));
                    }
                    Event::CaughtUp { .. } => {}
                    Event::Expired { from_seq, to_seq } => {
                        l.errors.push(format!("positions {from_seq}..={to_seq} expired"));
                    }
                    Event::Message(m) => {
                        l.messages.insert(m.id, (now, m));
                    }
                    Event::Disconnected { reason } => {
                        say(&format!("{name2}: disconnected: {reason}"));
                        l.disconnected.push((now, reason));
                    }
                    Event::Kicked { reason } => {
                        say(&format!("{name2}: kicked: {}", reason.as_str()));
                        l.kicked.push((now, reason));
                    }
                    Event::LoginFailed { code, message } => {
                        say(&format!("{name2}: login failed: {code}: {message}"));
                        l.errors.push(format!("login failed: {code}: {message}"));
                    }
                    Event::ServerError { code, message } => {
                        say(&format!("{name2}: server error: {code}: {message}"));
                        l.errors.push(format!("server error: {code}: {message}"));
                    }
                }
            }
        });
        User {
            name: name.to_owned(),
            id: id.to_owned(),
            client,
            log,
        }
    }

    /// The node of the first connection after `since`.
    async fn connected_after(
        &self,
        since: Instant,
        timeout: Duration,
    ) -> Result<(Instant, String)> {
        let log = self.log.clone();
        wait_for(&format!("{} to connect", self.name), timeout, || {
            let l = log.lock().unwrap();
            if let Some(e) = l.errors.first() {
                return Some(Err(anyhow::anyhow!("{}: {e}", self.name)));
            }
            l.connected
                .iter()
                .find(|(t, _)| *t >= since)
                .cloned()
                .map(Ok)
        })
        .await?
    }

    async fn received(&self, id: MessageId, timeout: Duration) -> Result<Message> {
        let log = self.log.clone();
        wait_for(
            &format!("{} to receive message {id}", self.name),
            timeout,
            || {
                log.lock()
                    .unwrap()
                    .messages
                    .get(&id)
                    .map(|(_, m)| m.clone())
            },
        )
        .await
    }

    fn has(&self, id: MessageId) -> bool {
        self.log.lock().unwrap().messages.contains_key(&id)
    }
}

fn say(s: &str) {
    println!("    {s}");
}

/// Polls `f` every 20 ms until it answers, for at most `timeout`.
async fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= end {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn body(v: Value) -> Body {
    Body::from_value(&v).expect("a JSON value is a body")
}

struct Ctx {
    nodes: Vec<Node>,
    tokens: HashMap<String, String>,
    http: reqwest::Client,
    admin_token: String,
    prefix: String,
    ids_out: PathBuf,
}

impl Ctx {
    fn user_id(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    fn config(
        &self,
        name: &str,
        endpoints: Vec<Endpoint>,
        device: &str,
        channel: &str,
    ) -> Result<ClientConfig> {
        let id = self.user_id(name);
        let token = self
            .tokens
            .get(&id)
            .with_context(|| format!("no token for {id} in --tokens"))?;
        let mut c = ClientConfig::new(endpoints, token.clone(), device, channel);
        c.send_timeout = Duration::from_secs(45);
        Ok(c)
    }

    fn user(
        &self,
        name: &str,
        endpoints: Vec<Endpoint>,
        device: &str,
        channel: &str,
    ) -> Result<User> {
        Ok(User::start(
            name,
            &self.user_id(name),
            self.config(name, endpoints, device, channel)?,
        ))
    }

    async fn admin_get(&self, node: &Node, path: &str) -> Result<Value> {
        let url = format!("{}{path}", node.admin);
        let r = self
            .http
            .get(&url)
            .bearer_auth(&self.admin_token)
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = r.status();
        let v: Value = r.json().await.with_context(|| format!("GET {url}: body"))?;
        ensure!(status.is_success(), "GET {url}: {status}: {v}");
        Ok(v)
    }

    async fn admin_post(&self, node: &Node, path: &str, req: Value) -> Result<Value> {
        let url = format!("{}{path}", node.admin);
        let r = self
            .http
            .post(&url)
            .bearer_auth(&self.admin_token)
            .json(&req)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = r.status();
        let v: Value = r
            .json()
            .await
            .with_context(|| format!("POST {url}: body"))?;
        ensure!(status.is_success(), "POST {url}: {status}: {v}");
        Ok(v)
    }

    fn record(&self, lines: &[(MessageId, String, SendStatus)]) -> Result<()> {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.ids_out)
            .with_context(|| format!("cannot open {}", self.ids_out.display()))?;
        for (id, to, status) in lines {
            writeln!(f, "{id} {to} {}", status.as_str())?;
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() {
    if let Err(e) = real_main().await {
        eprintln!("FAILED: {e:#}");
        std::process::exit(1);
    }
}

async fn real_main() -> Result<()> {
    let cli = Cli::parse();
    let nodes = cli
        .nodes
        .iter()
        .map(|s| {
            let mut parts = s.splitn(3, '=');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(id), Some(client), Some(admin)) => Ok(Node {
                    id: id.into(),
                    client: client.into(),
                    admin: admin.trim_end_matches('/').into(),
                }),
                _ => bail!("--node {s:?} is not id=host:port=admin-url"),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    ensure!(nodes.len() == 3, "give exactly three --node");
    let tokens = std::fs::read_to_string(&cli.tokens)
        .with_context(|| format!("cannot read {}", cli.tokens.display()))?
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(u, t)| (u.trim().to_owned(), t.trim().to_owned()))
        .collect();
    let ctx = Ctx {
        nodes,
        tokens,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?,
        admin_token: cli.admin_token,
        prefix: cli.prefix,
        ids_out: cli.ids_out,
    };
    match cli.cmd {
        Cmd::Exchange => exchange(&ctx).await,
        Cmd::Failover { stop_cmd } => failover(&ctx, &stop_cmd).await,
    }
}

/// A user on node 1 and one on node 3 exchange messages; node 2's admin API reaches node 1.
async fn exchange(ctx: &Ctx) -> Result<()> {
    let [n1, n2, n3] = [&ctx.nodes[0], &ctx.nodes[1], &ctx.nodes[2]];
    let t0 = Instant::now();
    let alice = ctx.user("alice", vec![n1.tcp()], "alice-laptop", "pc")?;
    let bob = ctx.user("bob", vec![n3.ws()], "bob-phone", "app")?;
    let (_, a_node) = alice.connected_after(t0, Duration::from_secs(20)).await?;
    let (_, b_node) = bob.connected_after(t0, Duration::from_secs(20)).await?;
    ensure!(
        a_node == n1.id,
        "alice connected to {a_node}, not {}",
        n1.id
    );
    ensure!(b_node == n3.id, "bob connected to {b_node}, not {}", n3.id);
    println!("  ok: alice on {a_node} over TCP, bob on {b_node} over WebSocket");

    let mut ids = Vec::new();
    for i in 1..=3 {
        for (from, to) in [(&alice, &bob), (&bob, &alice)] {
            let text = format!("{} to {} #{i}", from.name, to.name);
            let sent = Instant::now();
            let r = from
                .client
                .send(&to.id, body(json!({ "text": text })))
                .await?;
            ensure!(
                r.status == SendStatus::Delivered && r.connections == 1,
                "{text}: receipt {r:?}, expected delivered to 1 connection"
            );
            let id = r.id.context("a delivered message has an id")?;
            let m = to.received(id, Duration::from_secs(10)).await?;
            ensure!(
                m.from.as_deref() == Some(from.id.as_str()),
                "{text}: from {:?}",
                m.from
            );
            ensure!(
                m.body.get().contains(&text),
                "{text}: body {}",
                m.body.get()
            );
            println!(
                "  ok: {text}: delivered, id {id}, arrived in {} ms",
                sent.elapsed().as_millis()
            );
            ids.push((id, to.id.clone(), r.status));
        }
    }

    // A backend message through node 2's admin API, to alice on node 1.
    let text = "from the admin API of node 2";
    let sent = Instant::now();
    let v = ctx
        .admin_post(
            n2,
            "/api/v1/messages",
            json!({ "to": alice.id, "body": { "text": text },
                    "client_msg_id": format!("{}-admin-1", ctx.prefix) }),
        )
        .await?;
    let result = &v["results"][0];
    ensure!(
        result["status"] == "delivered" && result["connections"] == 1,
        "admin send: {v}"
    );
    let id: MessageId = result["id"]
        .as_str()
        .context("admin send: no id")?
        .parse()?;
    let m = alice.received(id, Duration::from_secs(10)).await?;
    ensure!(
        m.body.get().contains(text),
        "admin message body {}",
        m.body.get()
    );
    println!(
        "  ok: POST {}/api/v1/messages to alice: delivered, id {id}, arrived on {a_node} in {} ms",
        n2.admin,
        sent.elapsed().as_millis()
    );
    ids.push((id, alice.id.clone(), SendStatus::Delivered));

    // Presence and history, asked of the node that holds neither user.
    let p = ctx
        .admin_get(n2, &format!("/api/v1/users/{}/presence", alice.id))
        .await?;
    let where_: Vec<&str> = p["connections"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["node_id"].as_str()).collect())
        .unwrap_or_default();
    ensure!(
        p["online"] == true && where_ == [n1.id.as_str()],
        "presence of alice: {p}"
    );
    println!("  ok: node 2 sees alice's presence on {}", n1.id);
    let h = ctx
        .admin_get(
            n2,
            &format!("/api/v1/users/{}/messages?peer={}", bob.id, alice.id),
        )
        .await?;
    let n = h["messages"].as_array().map_or(0, Vec::len);
    ensure!(
        n == 6,
        "history of bob with alice has {n} messages, expected 6: {h}"
    );
    println!("  ok: node 2's history API lists the 6 messages between alice and bob");

    alice.client.close().await;
    bob.client.close().await;
    ctx.record(&ids)?;
    println!("  exchange checks passed ({} messages)", ids.len());
    Ok(())
}

/// One send and its outcome.
struct Sent {
    from: String,
    to: String,
    seq: u32,
    at: Instant,
    outcome: Option<(Instant, Result<Receipt, String>)>,
}

type Sends = Arc<Mutex<Vec<Sent>>>;

/// Sends `from` → `to` every `every` until `stop`, each send in its own task.
fn traffic(
    from: Client,
    from_id: String,
    to: String,
    every: Duration,
    sends: Sends,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Vec<tokio::task::JoinHandle<()>>> {
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        let mut tick = tokio::time::interval(every);
        for seq in 1.. {
            // `wait_for` sees a stop that happened while this loop was busy between ticks
            // (a `Notify::notify_waiters` would be lost then, and the loop would never end).
            tokio::select! {
                _ = stop.wait_for(|stopped| *stopped) => break,
                _ = tick.tick() => {}
            }
            let i = {
                let mut s = sends.lock().unwrap();
                s.push(Sent {
                    from: from_id.clone(),
                    to: to.clone(),
                    seq,
                    at: Instant::now(),
                    outcome: None,
                });
                s.len() - 1
            };
            let (client, to2, sends2) = (from.clone(), to.clone(), sends.clone());
            tasks.push(tokio::spawn(async move {
                let b = body(json!({ "text": format!("{to2} #{seq}"), "seq": seq }));
                let r = client.send(&to2, b).await.map_err(|e| e.to_string());
                sends2.lock().unwrap()[i].outcome = Some((Instant::now(), r));
            }));
        }
        tasks
    })
}

/// Users on node 2 move to other nodes while node 2 stops (SIGTERM); nothing is lost.
async fn failover(ctx: &Ctx, stop_cmd: &str) -> Result<()> {
    let [n1, n2, n3] = [&ctx.nodes[0], &ctx.nodes[1], &ctx.nodes[2]];
    let t0 = Instant::now();
    // Senders and receivers that stay put, and a second connection each (channel web) so that
    // node 2 is the least loaded node and /api/v1/alloc hands it out first.
    let alice = ctx.user("alice", vec![n1.tcp()], "alice-laptop", "pc")?;
    let alice_web = ctx.user("alice", vec![n1.ws()], "alice-browser", "web")?;
    let bob = ctx.user("bob", vec![n3.tcp()], "bob-phone", "app")?;
    let bob_web = ctx.user("bob", vec![n3.ws()], "bob-browser", "web")?;
    // carol knows the nodes from a fixed list, node 2 first; she reconnects to the next one.
    let carol = ctx.user(
        "carol",
        vec![n2.tcp(), n3.tcp(), n1.tcp()],
        "carol-phone",
        "app",
    )?;
    for (u, n) in [
        (&alice, n1),
        (&alice_web, n1),
        (&bob, n3),
        (&bob_web, n3),
        (&carol, n2),
    ] {
        let (_, at) = u.connected_after(t0, Duration::from_secs(20)).await?;
        ensure!(at == n.id, "{} connected to {at}, not {}", u.name, n.id);
    }
    // erin asks node 1's /api/v1/alloc for a node (least loaded first): wait until that is node 2.
    let alloc_url = format!("{}/api/v1/alloc", n1.admin);
    let first = {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let v: Value = match ctx.http.get(&alloc_url).send().await {
                Ok(r) => r.json().await.unwrap_or(Value::Null),
                Err(e) => json!({ "error": e.to_string() }),
            };
            let n = v["nodes"].as_array().map_or(0, Vec::len);
            if v["nodes"][0]["id"] == n2.id.as_str() && n == 3 {
                break v;
            }
            ensure!(
                Instant::now() < end,
                "alloc did not rank {} first within 20 s; last answer: {v}",
                n2.id
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    println!(
        "  alloc ranks the nodes: {}",
        first["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| format!(
                "{} {} ({} connections)",
                n["id"].as_str().unwrap_or("?"),
                n["client_addr"].as_str().unwrap_or("?"),
                n["connections"]
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut erin_cfg = ctx.config("erin", vec![n2.tcp()], "erin-phone", "app")?;
    erin_cfg.alloc_url = Some(alloc_url.clone());
    let erin = User::start("erin", &ctx.user_id("erin"), erin_cfg);
    let (_, at) = erin.connected_after(t0, Duration::from_secs(20)).await?;
    ensure!(
        at == n2.id,
        "erin was placed on {at} by alloc, not {}",
        n2.id
    );
    println!(
        "  ok: carol (endpoint list) and erin (alloc) on {}, alice on {}, bob on {}",
        n2.id, n1.id, n3.id
    );

    // Traffic: alice → carol, alice → erin, carol → bob, every 100 ms each.
    let sends: Sends = Arc::default();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let every = Duration::from_millis(100);
    let loops = vec![
        traffic(
            alice.client.clone(),
            alice.id.clone(),
            carol.id.clone(),
            every,
            sends.clone(),
            stopped.clone(),
        ),
        traffic(
            alice.client.clone(),
            alice.id.clone(),
            erin.id.clone(),
            every,
            sends.clone(),
            stopped.clone(),
        ),
        traffic(
            carol.client.clone(),
            carol.id.clone(),
            bob.id.clone(),
            every,
            sends.clone(),
            stopped.clone(),
        ),
    ];
    tokio::time::sleep(Duration::from_millis(1500)).await;

    println!("  stopping {} (SIGTERM): {stop_cmd}", n2.id);
    let stop_at = Instant::now();
    let mut stopper = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(stop_cmd)
        .kill_on_drop(true)
        .spawn()
        .context("cannot run --stop-cmd")?;
    // What /api/v1/alloc says while node 2 drains (informational).
    let kicked = {
        let (c, e) = (carol.log.clone(), erin.log.clone());
        wait_for("the first kick", Duration::from_secs(30), move || {
            let any = !c.lock().unwrap().kicked.is_empty() || !e.lock().unwrap().kicked.is_empty();
            any.then(Instant::now)
        })
        .await?
    };
    println!(
        "  first kick {} ms after the stop command started",
        (kicked - stop_at).as_millis()
    );
    if let Ok(r) = ctx.http.get(&alloc_url).send().await {
        if let Ok(v) = r.json::<Value>().await {
            let list: Vec<String> = v["nodes"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|n| {
                            format!("{} ({})", n["id"].as_str().unwrap_or("?"), n["connections"])
                        })
                        .collect()
                })
                .unwrap_or_default();
            println!(
                "  alloc during the drain ({} ms after the stop): {list:?}",
                stop_at.elapsed().as_millis()
            );
        }
    }
    let (carol_at, carol_node) = carol
        .connected_after(stop_at, Duration::from_secs(60))
        .await?;
    let (erin_at, erin_node) = erin
        .connected_after(stop_at, Duration::from_secs(60))
        .await?;
    println!(
        "  carol reconnected to {carol_node} after {} ms, erin to {erin_node} after {} ms",
        (carol_at - stop_at).as_millis(),
        (erin_at - stop_at).as_millis()
    );
    // Keep sending for a while on the new nodes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.send_replace(true);
    // Every send ends within the client's send timeout (30 s); bound the wait anyway.
    tokio::time::timeout(Duration::from_secs(60), async {
        let mut tasks = Vec::new();
        for l in loops {
            tasks.extend(l.await?);
        }
        for t in tasks {
            t.await?;
        }
        anyhow::Ok(())
    })
    .await
    .context("the traffic loops did not end within 60 s of the stop")??;
    let status = tokio::time::timeout(Duration::from_secs(90), stopper.wait())
        .await
        .context("the stop command did not finish within 90 s")??;
    let stop_took = stop_at.elapsed();
    ensure!(status.success(), "the stop command failed: {status}");
    println!(
        "  the stop command returned after {} ms",
        stop_took.as_millis()
    );

    let mut failures = Vec::new();
    for (u, n) in [(&carol, &carol_node), (&erin, &erin_node)] {
        if *n == n2.id {
            failures.push(format!("{} reconnected to the stopped node {n}", u.name));
        }
        if !u.log.lock().unwrap().resumed.iter().any(|t| *t >= stop_at) {
            failures.push(format!(
                "{} logged in again on {n} instead of resuming its session",
                u.name
            ));
        }
        let kicks: Vec<_> = u
            .log
            .lock()
            .unwrap()
            .kicked
            .iter()
            .map(|(_, r)| r.as_str())
            .collect();
        if kicks != ["shutdown"] {
            failures.push(format!(
                "{} was kicked {kicks:?}, expected [\"shutdown\"]",
                u.name
            ));
        }
        let disconnects: Vec<String> = u
            .log
            .lock()
            .unwrap()
            .disconnected
            .iter()
            .map(|(_, r)| r.clone())
            .collect();
        println!("  {} reconnect path: {}", u.name, disconnects.join(" | "));
    }

    // Wait (up to 5 s) for the last pushes (stored ones included: a reconnect replays them),
    // then classify every send.
    let users: HashMap<&str, &User> = [&alice, &bob, &carol, &erin]
        .into_iter()
        .map(|u| (u.id.as_str(), u))
        .collect();
    let reconnected: HashMap<&str, Instant> =
        [(carol.id.as_str(), carol_at), (erin.id.as_str(), erin_at)].into();
    let _ = wait_for("the last pushes", Duration::from_secs(5), || {
        let s = sends.lock().unwrap();
        s.iter()
            .all(|x| match &x.outcome {
                Some((_, Ok(r))) if r.status != SendStatus::Refused => {
                    r.id.is_some_and(|id| users[x.to.as_str()].has(id))
                }
                _ => true,
            })
            .then_some(())
    })
    .await;

    let sends = std::mem::take(&mut *sends.lock().unwrap());
    let mut ids = Vec::new();
    let mut table: BTreeMap<(String, String), BTreeMap<&str, u32>> = BTreeMap::new();
    let mut stored = Vec::new();
    for s in &sends {
        let key = (s.from.clone(), s.to.clone());
        let ms = if s.at >= stop_at {
            (s.at - stop_at).as_millis() as i64
        } else {
            -((stop_at - s.at).as_millis() as i64)
        };
        let what = |k: &str| {
            format!(
                "{} -> {} #{} (sent {ms:+} ms from the stop){k}",
                s.from, s.to, s.seq
            )
        };
        let counts = table.entry(key).or_default();
        match &s.outcome {
            None => failures.push(what(": no outcome")),
            Some((_, Err(e))) => {
                *counts.entry("error").or_default() += 1;
                failures.push(what(&format!(": {e}")));
            }
            Some((got, Ok(r))) => {
                *counts.entry(r.status.as_str()).or_default() += 1;
                let Some(id) = r.id else {
                    failures.push(what(&format!(": receipt without id {r:?}")));
                    continue;
                };
                ids.push((id, s.to.clone(), r.status));
                let received = users[s.to.as_str()].has(id);
                let after_reconnect = reconnected.get(s.to.as_str()).is_some_and(|t| s.at > *t);
                match r.status {
                    SendStatus::Refused => failures.push(what(&format!(": refused {r:?}"))),
                    SendStatus::Delivered if !received => failures.push(what(&format!(
                        ": receipt delivered (id {id}) but never received: LOST"
                    ))),
                    SendStatus::Delivered => {}
                    SendStatus::Stored => {
                        if after_reconnect {
                            failures.push(what(&format!(
                                ": stored (id {id}) although the recipient had reconnected"
                            )));
                        }
                        if !received {
                            failures.push(what(&format!(
                                ": stored (id {id}) but not replayed after the reconnect: LOST"
                            )));
                        }
                        stored.push((id, what(""), received, (*got - s.at).as_millis()));
                    }
                }
            }
        }
    }
    println!("  receipts by sender -> recipient:");
    for ((from, to), counts) in &table {
        println!("    {from} -> {to}: {counts:?}");
    }
    let after: usize = sends
        .iter()
        .filter(|s| reconnected.get(s.to.as_str()).is_some_and(|t| s.at > *t))
        .count();
    println!("  {after} messages were sent to carol and erin after they reconnected; all must be delivered");
    // carol's sends that were waiting for a receipt when she was kicked: the client sent them
    // again after the reconnect, with the same client_msg_id.
    let carol_kicked = carol.log.lock().unwrap().kicked.first().map(|(t, _)| *t);
    if let Some(k) = carol_kicked {
        let spanning: Vec<String> = sends
            .iter()
            .filter(|s| s.from == carol.id && s.at < k)
            .filter_map(|s| match &s.outcome {
                Some((got, Ok(r))) if *got > carol_at => Some(format!(
                    "#{} {} after {} ms",
                    s.seq,
                    r.status.as_str(),
                    (*got - s.at).as_millis()
                )),
                _ => None,
            })
            .collect();
        println!(
            "  carol's sends still without a receipt at the kick, answered after her reconnect: {}",
            if spanning.is_empty() {
                "none".to_owned()
            } else {
                spanning.join(", ")
            }
        );
    }
    // Stored messages must be kept, pending, and readable from any node.
    for (id, what, received, took) in &stored {
        let m = ctx.admin_get(n1, &format!("/api/v1/messages/{id}")).await;
        match m {
            Ok(m) => println!(
                "    stored: {what}: id {id}, receipt after {took} ms, received (replayed after the reconnect): {received}, state in the store: {}",
                m["state"]
            ),
            Err(e) => failures.push(format!("stored message {id} ({what}) is not in the store: {e:#}")),
        }
    }
    if stored.is_empty() {
        println!("  no message was answered \"stored\": the reconnect was faster than the 100 ms send interval");
    }

    // The stopped node left the registry; carol's presence moved.
    let nodes_left = wait_for_async(
        "node 2 to leave the registry",
        Duration::from_secs(20),
        || async {
            let v = ctx.admin_get(n1, "/api/v1/nodes").await.ok()?;
            let ids: Vec<String> = v["nodes"]
                .as_array()?
                .iter()
                .filter_map(|n| n["id"].as_str().map(String::from))
                .collect();
            (!ids.contains(&n2.id)).then_some(ids)
        },
    )
    .await;
    match nodes_left {
        Ok(ids) => println!("  ok: node registry after the stop: {ids:?}"),
        Err(e) => failures.push(format!("{e:#}")),
    }
    let p = ctx
        .admin_get(n3, &format!("/api/v1/users/{}/presence", carol.id))
        .await?;
    let at: Vec<&str> = p["connections"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["node_id"].as_str()).collect())
        .unwrap_or_default();
    if at != [carol_node.as_str()] {
        failures.push(format!("carol's presence after the move: {p}"));
    } else {
        println!("  ok: carol's presence is {at:?}");
    }

    for u in [&alice, &alice_web, &bob, &bob_web, &carol, &erin] {
        u.client.close().await;
    }
    ctx.record(&ids)?;
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("  FAIL: {f}");
        }
        bail!("{} failover check(s) failed", failures.len());
    }
    println!("  failover checks passed ({} messages)", ids.len());
    Ok(())
}

/// Like [`wait_for`], with an async probe.
async fn wait_for_async<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() >= end {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
