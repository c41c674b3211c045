//! Reconnect-and-resume rate and catch-up throughput of one node, measured over real sockets
//! against a node started in this process (Redis for sessions and stream counters, MariaDB or
//! SQLite for messages and cursors). Prints a Markdown table.
//!
//! ```text
//! cargo run --release -p imgate --example resume_bench -- \
//!     [--sessions 5000] [--concurrency 200] [--backlog 50000] [--rounds 3] \
//!     [--mysql mysql://root@127.0.0.1:3306 | --sqlite] [--redis redis://127.0.0.1:6379 | --embedded]
//! ```
//!
//! - **Resume rate**: `sessions` devices log in once (the login rate is reported for
//!   comparison) and disconnect; then all of them reconnect with RESUME, `concurrency` at a time,
//!   each waiting for `login_result` and `caught_up`. Repeated `rounds` times (sessions rotate).
//! - **Catch-up**: `backlog` messages are sent to an offline user; then a new device of that user
//!   logs in and acknowledges as it reads (cumulatively, every 64 pushes), until `caught_up`.
//!   Throughput = messages / (login_result → caught_up). Repeated with a new device each round.
//!
//! The MySQL URL names a server: a database `imgate_bench_<random>` is created there and dropped
//! afterwards. The Redis keys live under a random prefix.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use imgate::config::{RoutingMode, Secret, Settings};
use imgate::{run, Listeners};
use imgate_shared::connection::{ClientConnection, Endpoint};
use imgate_shared::protocol::Body;
use imgate_shared::{ClientFrame, SendStatus, ServerFrame};
use sqlx::mysql::MySqlConnection;
use sqlx::{Connection, Executor};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

struct Options {
    sessions: usize,
    concurrency: usize,
    backlog: usize,
    rounds: usize,
    mysql: Option<String>,
    redis: Option<String>,
}

fn parse_args() -> Result<Options> {
    let mut o = Options {
        sessions: 5_000,
        concurrency: 200,
        backlog: 50_000,
        rounds: 3,
        mysql: Some(
            std::env::var("TEST_MYSQL_URL")
                .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into()),
        ),
        redis: Some(
            std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
        ),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--sessions" => o.sessions = value()?.parse()?,
            "--concurrency" => o.concurrency = value()?.parse()?,
            "--backlog" => o.backlog = value()?.parse()?,
            "--rounds" => o.rounds = value()?.parse()?,
            "--mysql" => o.mysql = Some(value()?),
            "--sqlite" => o.mysql = None,
            "--redis" => o.redis = Some(value()?),
            "--embedded" => o.redis = None,
            "-h" | "--help" => {
                println!("resume_bench [--sessions N] [--concurrency C] [--backlog N] [--rounds R] [--mysql URL | --sqlite] [--redis URL | --embedded]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if o.sessions == 0 || o.concurrency == 0 || o.rounds == 0 {
        bail!("--sessions, --concurrency and --rounds must be positive");
    }
    Ok(o)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Bench {
    endpoint: Endpoint,
    settings: Settings,
}

impl Bench {
    fn token(&self, user: &str) -> String {
        imgate::auth::Authenticator::new(&self.settings)
            .expect("valid auth settings")
            .mint(user, 3_600, &self.settings.auth)
            .expect("a token")
    }

    async fn connect(&self) -> Result<ClientConnection> {
        Ok(ClientConnection::connect(&self.endpoint).await?)
    }
}

/// Reads until `caught_up`, acknowledging pushes cumulatively every 64 (and at the end).
/// Returns how many pushes arrived.
async fn read_until_caught_up(conn: &mut ClientConnection) -> Result<usize> {
    let mut pushes = 0;
    let mut unacked = 0;
    loop {
        match conn.recv().await? {
            Some(ServerFrame::Push { seq: Some(seq), .. }) => {
                pushes += 1;
                unacked += 1;
                if unacked >= 64 {
                    conn.send(&ClientFrame::Ack {
                        seq: Some(seq),
                        id: None,
                    })
                    .await?;
                    unacked = 0;
                }
            }
            Some(ServerFrame::CaughtUp { seq }) => {
                if unacked > 0 {
                    conn.send(&ClientFrame::Ack {
                        seq: Some(seq),
                        id: None,
                    })
                    .await?;
                }
                return Ok(pushes);
            }
            Some(ServerFrame::Expired { .. }) | Some(ServerFrame::HeartbeatAck { .. }) => {}
            Some(other) => bail!("unexpected frame {other:?}"),
            None => bail!("the node closed the connection"),
        }
    }
}

async fn login(b: &Bench, user: &str, device: &str) -> Result<(ClientConnection, String)> {
    let mut conn = b.connect().await?;
    conn.send(&ClientFrame::Login {
        token: b.token(user),
        device_id: device.into(),
        channel: "app".into(),
        client_version: None,
        heartbeat: None,
        last_seq: None,
    })
    .await?;
    match conn.recv().await? {
        Some(ServerFrame::LoginResult { session_id, .. }) => Ok((conn, session_id)),
        other => bail!("login failed: {other:?}"),
    }
}

async fn resume(b: &Bench, session: &str, device: &str) -> Result<String> {
    let mut conn = b.connect().await?;
    conn.send(&ClientFrame::Resume {
        session_id: session.into(),
        device_id: device.into(),
        last_seq: None,
        client_version: None,
        heartbeat: None,
    })
    .await?;
    let id = match conn.recv().await? {
        Some(ServerFrame::LoginResult {
            session_id,
            resumed: true,
            ..
        }) => session_id,
        other => bail!("resume failed: {other:?}"),
    };
    read_until_caught_up(&mut conn).await?;
    Ok(id)
}

/// Runs `n` jobs, `concurrency` at a time; returns the wall time.
async fn concurrently<F, Fut, T>(n: usize, concurrency: usize, job: F) -> Result<(Duration, Vec<T>)>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let permits = Arc::new(Semaphore::new(concurrency));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let permit = permits.clone().acquire_owned().await?;
        let fut = job(i);
        tasks.push(tokio::spawn(async move {
            let r = fut.await;
            drop(permit);
            r
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await??);
    }
    Ok((started.elapsed(), out))
}

#[tokio::main]
async fn main() -> Result<()> {
    let o = parse_args()?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let suffix = format!("{:016x}", rand::random::<u64>());
    let mut settings = Settings::default();
    settings.auth.secret = Some(Secret::new("bench-secret"));
    settings.admin.token = Some(Secret::new("bench-admin-token"));
    settings.client.listen = "127.0.0.1:0".parse()?;
    settings.admin.listen = "127.0.0.1:0".parse()?;
    settings.client.max_connections = Some(100_000);
    let mysql_db = match &o.mysql {
        Some(server) => {
            let server = server.trim_end_matches('/').to_owned();
            let name = format!("imgate_bench_{suffix}");
            let mut conn = MySqlConnection::connect(&server)
                .await
                .with_context(|| format!("connecting to {server}"))?;
            conn.execute(&*format!(
                "CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
            ))
            .await?;
            settings.store.url = Secret::new(format!("{server}/{name}"));
            Some((server, name))
        }
        None => {
            let path = std::env::temp_dir().join(format!("imgate_bench_{suffix}.db"));
            settings.store.url = Secret::new(format!("sqlite://{}", path.display()));
            None
        }
    };
    if let Some(redis) = &o.redis {
        settings.cluster.redis_url = Some(Secret::new(redis.clone()));
        settings.cluster.key_prefix = format!("imgate-bench-{suffix}");
        settings.cluster.routing = RoutingMode::Routed;
    }
    let client = TcpListener::bind(settings.client.listen).await?;
    let admin = TcpListener::bind(settings.admin.listen).await?;
    let endpoint = Endpoint::tcp(client.local_addr()?);
    let shutdown = CancellationToken::new();
    let node = tokio::spawn(run(
        settings.clone(),
        Listeners { client, admin },
        shutdown.clone(),
    ));
    let b = Arc::new(Bench { endpoint, settings });
    // Wait until the node accepts logins.
    let mut tries = 0;
    while login(&b, "warm-up", "warm-up").await.is_err() {
        tries += 1;
        if tries > 600 {
            bail!("the node did not start");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Logins, then resumes.
    let (took, sessions) = concurrently(o.sessions, o.concurrency, |i| {
        let b = b.clone();
        async move {
            let (mut conn, session) = login(&b, &format!("u{i}"), &format!("d{i}")).await?;
            read_until_caught_up(&mut conn).await?;
            Ok(session)
        }
    })
    .await?;
    let login_rate = o.sessions as f64 / took.as_secs_f64();
    let mut sessions = sessions;
    let mut resume_rates = Vec::new();
    for _ in 0..o.rounds {
        let current = Arc::new(sessions);
        let (took, rotated) = concurrently(o.sessions, o.concurrency, |i| {
            let (b, current) = (b.clone(), current.clone());
            async move { resume(&b, &current[i], &format!("d{i}")).await }
        })
        .await?;
        resume_rates.push(o.sessions as f64 / took.as_secs_f64());
        sessions = rotated;
    }

    // Catch-up: a backlog for "reader", sent by 64 senders in turn.
    let senders = 64.min(o.backlog.max(1));
    let per_sender = o.backlog.div_ceil(senders);
    let (send_took, _) = concurrently(senders, senders, |s| {
        let b = b.clone();
        async move {
            let (mut conn, _) = login(&b, &format!("sender{s}"), "bench").await?;
            for i in 0..per_sender {
                conn.send(&ClientFrame::Send {
                    to: "reader".into(),
                    channel: None,
                    client_msg_id: format!("{s}-{i}"),
                    body: Body::from_value(
                        &serde_json::json!({"text": "a typical short chat line", "i": i}),
                    )?,
                    retry: false,
                })
                .await?;
                loop {
                    match conn.recv().await? {
                        Some(ServerFrame::SendResult {
                            status: SendStatus::Refused,
                            reason,
                            ..
                        }) => bail!("a message of the backlog was refused: {reason:?}"),
                        Some(ServerFrame::SendResult { .. }) => break,
                        Some(ServerFrame::CaughtUp { .. }) => continue,
                        other => bail!("unexpected {other:?}"),
                    }
                }
            }
            Ok(())
        }
    })
    .await?;
    let backlog = senders * per_sender;
    let mut catch_up_rates = Vec::new();
    for round in 0..o.rounds {
        let (mut conn, _) = login(&b, "reader", &format!("reader-device-{round}")).await?;
        let started = Instant::now();
        let got = read_until_caught_up(&mut conn).await?;
        let took = started.elapsed();
        if got != backlog {
            bail!("catch-up delivered {got} of {backlog}");
        }
        catch_up_rates.push(backlog as f64 / took.as_secs_f64());
    }

    println!();
    println!(
        "| store | sessions | {} devices login/s | resume/s (median of {}) | backlog | catch-up msg/s (median of {}) |",
        o.sessions, o.rounds, o.rounds
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {:.0} | {:.0} (runs: {}) | {} (sent in {:.1} s) | {:.0} (runs: {}) |",
        if o.mysql.is_some() {
            "MariaDB"
        } else {
            "SQLite"
        },
        if o.redis.is_some() {
            "Redis"
        } else {
            "in memory"
        },
        login_rate,
        median(resume_rates.clone()),
        resume_rates
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", "),
        backlog,
        send_took.as_secs_f64(),
        median(catch_up_rates.clone()),
        catch_up_rates
            .iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(", "),
    );

    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), node).await;
    if let Some((server, name)) = mysql_db {
        let mut conn = MySqlConnection::connect(&server).await?;
        conn.execute(&*format!("DROP DATABASE `{name}`")).await?;
    }
    Ok(())
}
