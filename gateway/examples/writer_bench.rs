//! Writer throughput: N messages through `Store::persist` from many concurrent tasks, into a
//! fresh database per run, for several `batch_max_rows` values. Prints a Markdown table.
//!
//! ```text
//! cargo run --release -p imgate --example writer_bench -- \
//!     [--messages 200000] [--batches 100,500,1000,2000] [--concurrency 4000] \
//!     [--url mysql://root@127.0.0.1:3306 | --url sqlite]
//! ```
//!
//! The MySQL URL names a server (no database): each run creates `imgate_bench_<random>` there
//! and drops it afterwards. The default is `$TEST_MYSQL_URL`, else `mysql://root@127.0.0.1:3306`.
//! `--url sqlite` writes to a temporary SQLite file instead.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use imgate::config::{Secret, StoreSettings};
use imgate::ids::IdGenerator;
use imgate::store::{self, DeliveryState, NewMessage, Persisted, Store};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use sqlx::mysql::MySqlConnection;
use sqlx::{Connection, Executor};

struct Options {
    messages: usize,
    batches: Vec<usize>,
    concurrency: usize,
    url: String,
}

fn parse_args() -> Result<Options> {
    let mut options = Options {
        messages: 200_000,
        batches: vec![100, 500, 1_000, 2_000],
        concurrency: 4_000,
        url: std::env::var("TEST_MYSQL_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306".into()),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--messages" => options.messages = value()?.parse()?,
            "--concurrency" => options.concurrency = value()?.parse()?,
            "--url" => options.url = value()?,
            "--batches" => {
                options.batches = value()?
                    .split(',')
                    .map(|b| b.trim().parse())
                    .collect::<Result<_, _>>()?
            }
            "-h" | "--help" => {
                println!("writer_bench [--messages N] [--batches 100,500,1000,2000] [--concurrency C] [--url mysql://host:port | sqlite]");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    if options.messages == 0 || options.concurrency == 0 || options.batches.is_empty() {
        bail!("--messages, --concurrency and --batches must be positive");
    }
    Ok(options)
}

/// A fresh database for one run, and how to remove it.
enum Target {
    MySql { server: String, name: String },
    Sqlite { path: std::path::PathBuf },
}

impl Target {
    async fn create(url: &str) -> Result<Target> {
        let suffix = format!("{:016x}", rand::random::<u64>());
        if url == "sqlite" {
            let path = std::env::temp_dir().join(format!("imgate_bench_{suffix}.db"));
            return Ok(Target::Sqlite { path });
        }
        let server = url.trim_end_matches('/').to_owned();
        let name = format!("imgate_bench_{suffix}");
        let mut conn = MySqlConnection::connect(&server)
            .await
            .with_context(|| format!("connecting to {server}"))?;
        conn.execute(&*format!(
            "CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        ))
        .await?;
        conn.close().await?;
        Ok(Target::MySql { server, name })
    }

    fn url(&self) -> String {
        match self {
            Target::MySql { server, name } => format!("{server}/{name}"),
            Target::Sqlite { path } => format!("sqlite://{}", path.display()),
        }
    }

    async fn remove(self) -> Result<()> {
        match self {
            Target::MySql { server, name } => {
                let mut conn = MySqlConnection::connect(&server).await?;
                conn.execute(&*format!("DROP DATABASE `{name}`")).await?;
                conn.close().await?;
            }
            Target::Sqlite { path } => {
                for suffix in ["", "-wal", "-shm"] {
                    let mut p = path.clone().into_os_string();
                    p.push(suffix);
                    let _ = std::fs::remove_file(p);
                }
            }
        }
        Ok(())
    }
}

/// Sum and count of a histogram in the Prometheus text output.
fn histogram_totals(handle: &PrometheusHandle, name: &str) -> (f64, f64) {
    let text = handle.render();
    let value = |suffix: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name}{suffix} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    (value("_sum"), value("_count"))
}

fn message(ids: &IdGenerator, i: usize) -> NewMessage {
    NewMessage {
        id: ids.next(),
        sender: Some(format!("user-{}", i % 10_000)),
        recipient: format!("user-{}", (i * 7 + 1) % 10_000),
        channel: Some("app".into()),
        body: format!(
            r#"{{"type":"text","text":"message number {i}, a typical short chat line","seq":{i}}}"#
        ),
        client_msg_id: Some(format!("c-{i}")),
        created_at_ms: 1_700_000_000_000 + i as u64,
        seq: i as u64 + 1,
        state: if i % 3 == 0 {
            DeliveryState::Pending
        } else {
            DeliveryState::Delivered
        },
    }
}

struct RunResult {
    batch: usize,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
    avg_batch: f64,
    avg_flush_ms: f64,
}

async fn run(options: &Options, batch: usize, metrics: &PrometheusHandle) -> Result<RunResult> {
    let target = Target::create(&options.url).await?;
    let result = measure(options, batch, metrics, &target).await;
    // Remove the database whatever happened.
    let removed = target.remove().await;
    let result = result?;
    removed?;
    Ok(result)
}

async fn measure(
    options: &Options,
    batch: usize,
    metrics: &PrometheusHandle,
    target: &Target,
) -> Result<RunResult> {
    let settings = StoreSettings {
        url: Secret::new(target.url()),
        pool_size: 4,
        batch_max_rows: batch,
        batch_max_delay_ms: 5,
        queue_capacity: 100_000,
        enqueue_timeout_ms: 10_000,
        ..StoreSettings::default()
    };
    let store = Store::open(&settings).await?;
    let ids = Arc::new(IdGenerator::new(1));

    // Warm-up: connections and prepared statements.
    let warmup = (2 * batch).min(options.messages);
    let mut pending = Vec::with_capacity(warmup);
    for i in 0..warmup {
        pending.push(
            store
                .reserve()
                .await?
                .write(message(&ids, options.messages + i)),
        );
    }
    for p in pending {
        p.await?;
    }

    let (rows_before, batches_before) = histogram_totals(metrics, store::metric::BATCH_ROWS);
    let (flush_before, _) = histogram_totals(metrics, store::metric::FLUSH_SECONDS);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..options.concurrency)
        .map(|_| {
            let (store, ids, next) = (store.clone(), ids.clone(), next.clone());
            let total = options.messages;
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return Ok::<_, anyhow::Error>(latencies);
                    }
                    let m = message(&ids, i);
                    let sent = Instant::now();
                    match store.persist(m).await? {
                        Persisted::Stored => {}
                        Persisted::Duplicate { .. } => bail!("unexpected duplicate"),
                    }
                    latencies.push(sent.elapsed());
                }
            })
        })
        .collect();
    let mut latencies: Vec<Duration> = Vec::with_capacity(options.messages);
    for task in tasks {
        latencies.extend(task.await??);
    }
    let seconds = started.elapsed().as_secs_f64();
    let (rows_after, batches_after) = histogram_totals(metrics, store::metric::BATCH_ROWS);
    let (flush_after, _) = histogram_totals(metrics, store::metric::FLUSH_SECONDS);

    let unwritten = store.close_within(Duration::from_secs(60)).await;
    if unwritten > 0 {
        bail!("{unwritten} rows not written");
    }
    let count: i64 = match target {
        Target::MySql { .. } => {
            let mut conn = MySqlConnection::connect(&target.url()).await?;
            sqlx::query_scalar("SELECT COUNT(*) FROM messages")
                .fetch_one(&mut conn)
                .await?
        }
        Target::Sqlite { .. } => {
            let mut conn = sqlx::SqliteConnection::connect(&target.url()).await?;
            sqlx::query_scalar("SELECT COUNT(*) FROM messages")
                .fetch_one(&mut conn)
                .await?
        }
    };
    if count != (options.messages + warmup) as i64 {
        bail!("expected {} rows, found {count}", options.messages + warmup);
    }

    latencies.sort_unstable();
    let percentile = |p: f64| {
        let i = ((latencies.len() as f64 * p) as usize).min(latencies.len() - 1);
        latencies[i].as_secs_f64() * 1_000.0
    };
    let batches = (batches_after - batches_before).max(1.0);
    Ok(RunResult {
        batch,
        seconds,
        p50_ms: percentile(0.50),
        p99_ms: percentile(0.99),
        avg_batch: (rows_after - rows_before) / batches,
        avg_flush_ms: (flush_after - flush_before) / batches * 1_000.0,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let options = parse_args()?;
    let metrics = PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let backend = if options.url == "sqlite" {
        "SQLite (temporary file)"
    } else {
        "MySQL/MariaDB"
    };
    eprintln!(
        "writing {} messages per run, {} concurrent senders, into {backend}",
        options.messages, options.concurrency
    );
    let mut results = Vec::new();
    for &batch in &options.batches {
        eprintln!("batch_max_rows = {batch} ...");
        results.push(run(&options, batch, &metrics).await?);
    }
    println!();
    println!(
        "{} messages through `Store::persist`, {} concurrent senders, {backend}:",
        options.messages, options.concurrency
    );
    println!();
    println!("| batch_max_rows | messages/s | p50 persist | p99 persist | rows/batch (avg) | flush (avg) |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for r in &results {
        println!(
            "| {} | {:.0} | {:.1} ms | {:.1} ms | {:.0} | {:.1} ms |",
            r.batch,
            options.messages as f64 / r.seconds,
            r.p50_ms,
            r.p99_ms,
            r.avg_batch,
            r.avg_flush_ms
        );
    }
    Ok(())
}
