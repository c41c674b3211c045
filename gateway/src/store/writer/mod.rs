//! The writer: one task per store, on a thread of its own. It takes rows from the bounded queue
//! in batches (by size or age), writes each batch with multi-row INSERTs (group commit: one
//! transaction, or on MySQL two concurrent ones for large batches), finds out which rows were
//! duplicates, raises queued device cursors, and only after the COMMIT tells each row's sender
//! how it went. While the database fails it retries the same batch with exponential backoff,
//! forever, unless the store is closing and its deadline has passed. New rows keep queueing
//! meanwhile, so a long outage fills the queue and `Store::reserve` starts refusing: nothing is
//! ever dropped without its sender being told.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::future::join_all;
use imgate_shared::MessageId;
use sqlx::any::AnyConnectOptions;
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyPool, Connection, Row as _};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::{sleep_until, Instant};
use tracing::{debug, error, info, warn};

use super::setup::{self, Limits};
use super::sql::{self, Dialect, INSERT_PARAMS_PER_ROW};
use super::{metric, NewMessage, Persisted, StoreError};

/// Longest one write attempt may take before it is abandoned (and retried on a new connection).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);
/// Batches slower than this are logged.
const SLOW_BATCH: Duration = Duration::from_secs(1);
/// Most devices whose cursor updates wait for the writer; updates of more are dropped (and
/// counted).
pub(crate) const MAX_QUEUED_CURSORS: usize = 100_000;
/// Most bind parameters of one duplicate lookup.
const MAX_LOOKUP_PARAMS: usize = 4_096;
/// Idempotency keys looked up per query (OR-ed terms; SQLite's expression depth limit is 1,000).
const MAX_KEYS_PER_LOOKUP: usize = 200;
/// How often the queue-depth gauge is refreshed while the writer waits to retry.
const GAUGE_REFRESH: Duration = Duration::from_millis(500);
/// How long the stopping writer waits for its connection to close.
const POOL_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Batches of at least this many rows are split into concurrent transactions (see
/// [`WriterConfig::lanes`]); smaller ones are not worth a second commit.
const PARALLEL_MIN_ROWS: usize = 200;

/// A validated row on its way to the database.
pub(crate) struct Row {
    pub id: i64,
    pub created_at_ms: i64,
    /// The message's position in the recipient's stream.
    pub seq: i64,
    pub msg: NewMessage,
    pub done: oneshot::Sender<Result<Persisted, StoreError>>,
}

mod lanes;
mod plan;
mod queue;

use lanes::write_batch;
pub(crate) use plan::CursorRow;
use plan::Plan;
pub(crate) use queue::Shared;
use queue::StoppedGuard;

#[derive(Debug, Clone)]
pub(crate) struct WriterConfig {
    /// Concurrent transactions (on as many connections) a large batch is split into. One server
    /// connection inserts on one server thread, which caps a single connection at roughly 60k
    /// rows/s on a small machine; two let the server use two cores. 1 on SQLite (one writer).
    pub lanes: usize,
    pub batch_max_rows: usize,
    pub batch_max_delay: Duration,
    /// How often queued cursor updates are written (zero: with every batch).
    pub cursor_flush: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub limits: Limits,
}

/// Where the writer's connection comes from.
pub(crate) enum WritePool {
    /// A pool of its own, opened on the writer's runtime.
    Own(AnyConnectOptions),
    /// A pool shared with the readers (SQLite in memory: one connection is the database).
    Shared(AnyPool),
}

pub(crate) struct Writer {
    rx: mpsc::Receiver<Row>,
    shared: Arc<Shared>,
    pool: WritePool,
    dialect: Dialect,
    cfg: WriterConfig,
    close_rx: watch::Receiver<Option<Duration>>,
    closing: bool,
    deadline: Option<Instant>,
    /// When the writer first saw the cursor updates now queued.
    cursors_since: Option<Instant>,
    /// Set while writes fail: when the streak began and how many attempts failed.
    failing: Option<(Instant, u32)>,
    unwritten: usize,
}

impl Writer {
    pub fn new(
        rx: mpsc::Receiver<Row>,
        shared: Arc<Shared>,
        pool: WritePool,
        dialect: Dialect,
        cfg: WriterConfig,
    ) -> Writer {
        let close_rx = shared.close.subscribe();
        Writer {
            rx,
            shared,
            pool,
            dialect,
            cfg,
            close_rx,
            closing: false,
            deadline: None,
            cursors_since: None,
            failing: None,
            unwritten: 0,
        }
    }

    /// Runs the writer on a thread of its own, with a single-threaded runtime of its own: its
    /// database I/O never waits behind the gateway's tasks, and its CPU work (encoding
    /// thousands of parameters per batch) never holds up one of their worker threads.
    pub fn spawn(self, runtime: tokio::runtime::Runtime) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("imgate-store-writer".into())
            .spawn(move || runtime.block_on(self.run()))
            .map(|_| ())
    }

    async fn run(mut self) {
        let _stopped = StoppedGuard(self.shared.clone());
        let (pool, own) = match &self.pool {
            WritePool::Own(options) => (setup::writer_pool(self.dialect, options.clone()), true),
            WritePool::Shared(pool) => (pool.clone(), false),
        };
        // Connections are kept from batch to batch, unless shared with the readers.
        let mut conns: Vec<PoolConnection<Any>> = Vec::new();
        let mut rows = Vec::with_capacity(self.cfg.batch_max_rows.min(8_192));
        loop {
            let open = self.collect(&mut rows).await;
            let cursors = if self.cursors_due(Instant::now()) {
                self.take_cursors()
            } else {
                Vec::new()
            };
            if !rows.is_empty() || !cursors.is_empty() {
                let oldest = rows.iter().map(|r| r.created_at_ms).min().unwrap_or(0);
                self.shared.oldest_ms.store(
                    u64::try_from(oldest).unwrap_or(0),
                    std::sync::atomic::Ordering::Relaxed,
                );
                conns = self.flush(&pool, conns, &mut rows, cursors).await;
                self.shared
                    .oldest_ms
                    .store(0, std::sync::atomic::Ordering::Relaxed);
                self.shared.flushed();
                if !own {
                    conns.clear();
                }
            }
            if !open {
                break;
            }
        }
        // Cursor updates still queued, due or not.
        let cursors = self.take_cursors();
        if !cursors.is_empty() {
            conns = self.flush(&pool, conns, &mut rows, cursors).await;
            self.shared.flushed();
        }
        drop(conns);
        if own
            && tokio::time::timeout(POOL_CLOSE_TIMEOUT, pool.close())
                .await
                .is_err()
        {
            debug!("the writer's database connection did not close in time");
        }
        // Rows that were still being handed over when the writer gave up waiting for them:
        // their senders learn it from their dropped reply channels (StoreError::Closed).
        self.rx.close();
        metrics::gauge!(metric::QUEUE_DEPTH).set(0.0);
        debug!(unwritten = self.unwritten, "store writer stopped");
        self.shared.stopped.send_replace(Some(self.unwritten));
    }

    fn start_closing(&mut self) {
        if !self.closing {
            self.closing = true;
            self.deadline = self
                .close_rx
                .borrow_and_update()
                .map(|t| Instant::now() + t);
            // No new rows from now on; rows of permits already handed out still arrive.
            self.rx.close();
        }
    }

    fn deadline_or_far(&self) -> Instant {
        self.deadline
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365))
    }

    fn past_deadline(&self) -> bool {
        self.closing && self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// When the queued cursor updates are to be written, if any are queued: `cursor_flush`
    /// after the writer first saw one.
    fn cursor_deadline(&mut self, now: Instant) -> Option<Instant> {
        if !self.shared.has_cursors() {
            self.cursors_since = None;
            return None;
        }
        Some(*self.cursors_since.get_or_insert(now) + self.cfg.cursor_flush)
    }

    /// Whether queued cursor updates are to be written now (at once when closing).
    fn cursors_due(&mut self, now: Instant) -> bool {
        self.cursor_deadline(now)
            .is_some_and(|due| self.closing || due <= now)
    }

    fn take_cursors(&mut self) -> Vec<CursorRow> {
        self.cursors_since = None;
        self.shared.take_cursors()
    }

    fn set_depth_gauge(&self) {
        let depth = self.rx.max_capacity() - self.rx.capacity();
        metrics::gauge!(metric::QUEUE_DEPTH).set(depth as f64);
    }

    /// Waits for work and gathers a batch: up to `batch_max_rows` rows, waiting at most
    /// `batch_max_delay` after the first one; or returns when queued cursor updates are due.
    /// Returns false once no more rows can come.
    async fn collect(&mut self, rows: &mut Vec<Row>) -> bool {
        let max = self.cfg.batch_max_rows;
        loop {
            // Closing: done once nothing is queued and no permit is out (cursor updates still
            // queued are written once more by `run`), or once the deadline has passed: then
            // every row still queued fails, loudly.
            if self.closing && self.past_deadline() {
                let mut left = Vec::new();
                while let Ok(row) = self.rx.try_recv() {
                    left.push(row);
                }
                if !left.is_empty() {
                    self.give_up(&mut left, &AttemptError::Deadline);
                }
                return false;
            }
            if self.closing && self.rx.capacity() == self.rx.max_capacity() {
                return false;
            }
            let now = Instant::now();
            if self.cursors_due(now) {
                return true;
            }
            let deadline = self.deadline_or_far();
            let cursors_at = self.cursor_deadline(now);
            tokio::select! {
                biased;
                _ = self.close_rx.changed(), if !self.closing => self.start_closing(),
                n = self.rx.recv_many(rows, max) => {
                    if n == 0 {
                        return false;
                    }
                    break;
                }
                // Cursor updates were queued: note when they are due.
                _ = self.shared.wake.notified() => {}
                _ = sleep_until(cursors_at.unwrap_or(deadline)), if cursors_at.is_some() => {}
                // Closing, and a permit holder still has not written its row: stop waiting.
                _ = sleep_until(deadline), if self.closing => return false,
            }
        }
        if self.closing {
            // Flush promptly: take what is queued, do not wait for more.
            while rows.len() < max {
                match self.rx.try_recv() {
                    Ok(row) => rows.push(row),
                    Err(_) => break,
                }
            }
            return true;
        }
        let until = Instant::now() + self.cfg.batch_max_delay;
        while rows.len() < max {
            tokio::select! {
                biased;
                _ = self.close_rx.changed(), if !self.closing => {
                    self.start_closing();
                    break;
                }
                n = self.rx.recv_many(rows, max - rows.len()) => {
                    if n == 0 {
                        return false;
                    }
                }
                _ = sleep_until(until) => break,
            }
        }
        true
    }

    /// Writes one batch, retrying until it is committed or the close deadline has passed, and
    /// tells every row's sender. Takes the connections kept from the previous batch and returns
    /// the ones to keep.
    async fn flush(
        &mut self,
        pool: &AnyPool,
        mut conns: Vec<PoolConnection<Any>>,
        rows: &mut Vec<Row>,
        cursors: Vec<CursorRow>,
    ) -> Vec<PoolConnection<Any>> {
        let plan = Plan::new(rows, cursors, self.dialect, &self.cfg);
        let mut backoff = self.cfg.retry_initial.max(Duration::from_millis(1));
        let mut quick_retry = true;
        loop {
            self.set_depth_gauge();
            let started = Instant::now();
            let result = {
                let attempt = tokio::time::timeout(
                    ATTEMPT_TIMEOUT,
                    write_batch(pool, std::mem::take(&mut conns), self.dialect, rows, &plan),
                );
                tokio::pin!(attempt);
                loop {
                    let deadline = self.deadline_or_far();
                    tokio::select! {
                        biased;
                        result = &mut attempt => {
                            break result.unwrap_or(Err(AttemptError::TimedOut));
                        }
                        _ = self.close_rx.changed(), if !self.closing => self.start_closing(),
                        _ = sleep_until(deadline), if self.closing => break Err(AttemptError::Deadline),
                    }
                }
            };
            let error = match result {
                Ok((written, kept)) => {
                    self.finish(rows, written, started.elapsed());
                    return kept;
                }
                Err(error) => error,
            };
            if !matches!(error, AttemptError::Deadline) {
                metrics::counter!(metric::WRITE_ERRORS).increment(1);
            }
            if self.past_deadline() {
                self.give_up(rows, &error);
                // Cursors stay queued: the final round in `run` tries them once more.
                self.shared.restore_cursors(&plan.cursors);
                return Vec::new();
            }
            if quick_retry && self.failing.is_none() && error.is_connection() {
                // Most likely a connection the server closed while it was idle: try again at
                // once on a new one before calling it an outage.
                quick_retry = false;
                debug!(error = %crate::logging::esc(&error), "database write failed on a stale connection; retrying at once");
                continue;
            }
            quick_retry = false;
            match &mut self.failing {
                None => {
                    warn!(
                        error = %crate::logging::esc(&error),
                        rows = rows.len(),
                        retry_in_ms = backoff.as_millis() as u64,
                        "database write failed; retrying the batch until it succeeds"
                    );
                    self.failing = Some((started, 1));
                }
                Some((_, attempts)) => {
                    *attempts += 1;
                    debug!(error = %crate::logging::esc(&error), attempts = *attempts, "database write failed again");
                }
            }
            let wake_at = Instant::now() + backoff;
            loop {
                let until = wake_at.min(self.deadline_or_far());
                tokio::select! {
                    biased;
                    _ = self.close_rx.changed(), if !self.closing => self.start_closing(),
                    _ = sleep_until(until) => break,
                    _ = tokio::time::sleep(GAUGE_REFRESH) => self.set_depth_gauge(),
                }
            }
            backoff = (backoff * 2).min(self.cfg.retry_max.max(backoff));
        }
    }

    /// After a COMMIT: metrics, recovery log, and every sender learns its outcome.
    fn finish(&mut self, rows: &mut Vec<Row>, written: Written, elapsed: Duration) {
        // The queue's head is no longer these rows: reset before their senders hear of them.
        self.shared
            .oldest_ms
            .store(0, std::sync::atomic::Ordering::Relaxed);
        metrics::histogram!(metric::FLUSH_SECONDS).record(elapsed.as_secs_f64());
        if !rows.is_empty() {
            metrics::histogram!(metric::BATCH_ROWS).record(rows.len() as f64);
        }
        metrics::counter!(metric::ROWS_WRITTEN).increment(written.inserted);
        if elapsed >= SLOW_BATCH {
            warn!(
                rows = rows.len(),
                elapsed_ms = elapsed.as_millis() as u64,
                "slow database write"
            );
        }
        if let Some((since, attempts)) = self.failing.take() {
            info!(
                failed_attempts = attempts,
                outage_ms = since.elapsed().as_millis() as u64,
                "database writes recovered"
            );
        }
        let mut duplicates = 0;
        let mut missing = 0;
        for (row, outcome) in rows.drain(..).zip(written.outcomes) {
            let result = match outcome {
                Outcome::Stored => Ok(Persisted::Stored),
                Outcome::Duplicate(existing) => {
                    duplicates += 1;
                    Ok(Persisted::Duplicate { existing })
                }
                Outcome::Missing => {
                    missing += 1;
                    Err(StoreError::NotStored)
                }
            };
            let _ = row.done.send(result);
        }
        metrics::counter!(metric::DUPLICATES).increment(duplicates);
        if missing > 0 {
            error!(
                rows = missing,
                "the database ignored rows that are neither stored nor duplicates"
            );
            metrics::counter!(metric::ROWS_FAILED, "reason" => "not_stored").increment(missing);
        }
    }

    /// The close deadline passed with the database still failing: every row of the batch gets
    /// an error, loudly.
    fn give_up(&mut self, rows: &mut Vec<Row>, error: &AttemptError) {
        self.shared
            .oldest_ms
            .store(0, std::sync::atomic::Ordering::Relaxed);
        let n = rows.len();
        if n > 0 {
            error!(
                rows = n,
                error = %crate::logging::esc(&error),
                "store closing: the database stayed unavailable until the close deadline; these messages were NOT written"
            );
            metrics::counter!(metric::ROWS_FAILED, "reason" => "unwritten").increment(n as u64);
        } else {
            warn!(error = %crate::logging::esc(&error), "store closing: cursor updates not written");
        }
        self.unwritten += n;
        for row in rows.drain(..) {
            let _ = row.done.send(Err(StoreError::Unwritten));
        }
    }
}

#[derive(Debug)]
enum AttemptError {
    Database(sqlx::Error),
    TimedOut,
    Deadline,
}

impl AttemptError {
    /// Errors of the connection rather than of the statement.
    fn is_connection(&self) -> bool {
        matches!(
            self,
            AttemptError::Database(
                sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::Tls(_)
            )
        )
    }
}

impl fmt::Display for AttemptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttemptError::Database(e) => e.fmt(f),
            AttemptError::TimedOut => {
                write!(f, "write attempt timed out after {ATTEMPT_TIMEOUT:?}")
            }
            AttemptError::Deadline => f.write_str("close deadline reached"),
        }
    }
}

impl From<sqlx::Error> for AttemptError {
    fn from(e: sqlx::Error) -> Self {
        AttemptError::Database(e)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Stored,
    Duplicate(MessageId),
    /// Neither inserted nor a duplicate; cannot happen with the schema as designed.
    Missing,
}

/// The result of a committed batch.
struct Written {
    outcomes: Vec<Outcome>,
    inserted: u64,
}

#[cfg(test)]
mod tests {
    use super::plan::{shape, Chunk};
    use super::*;
    use crate::store::DeliveryState;

    fn rows(n: usize, body: usize) -> Vec<Row> {
        (0..n)
            .map(|i| Row {
                id: i as i64,
                created_at_ms: 0,
                seq: i as i64,
                msg: NewMessage {
                    id: MessageId(i as u64),
                    sender: None,
                    recipient: "bob".into(),
                    channel: None,
                    body: "x".repeat(body),
                    client_msg_id: None,
                    created_at_ms: 0,
                    state: DeliveryState::Pending,
                    seq: i as u64,
                },
                done: oneshot::channel().0,
            })
            .collect()
    }

    fn config(lanes: usize, batch_max_rows: usize, max_statement_bytes: usize) -> WriterConfig {
        WriterConfig {
            lanes,
            batch_max_rows,
            batch_max_delay: Duration::ZERO,
            cursor_flush: Duration::ZERO,
            retry_initial: Duration::ZERO,
            retry_max: Duration::ZERO,
            limits: Limits {
                max_body_len: 1 << 20,
                max_statement_bytes,
            },
        }
    }

    /// Every row in exactly one statement, in order.
    fn covered(plan: &Plan) -> Vec<usize> {
        plan.lanes
            .iter()
            .flatten()
            .flat_map(|c| c.rows.clone())
            .collect()
    }

    /// The rows of each statement of each lane.
    fn ranges(plan: &Plan) -> Vec<Vec<Range<usize>>> {
        plan.lanes
            .iter()
            .map(|lane| lane.iter().map(|c| c.rows.clone()).collect())
            .collect()
    }

    #[test]
    fn statement_shapes_are_few_and_waste_at_most_a_third() {
        let shapes: Vec<usize> = (1..=1_000).map(|n| shape(n, 1_000)).collect();
        let mut distinct = shapes.clone();
        distinct.dedup();
        assert_eq!(
            distinct,
            vec![1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1000]
        );
        for (n, s) in (1..=1_000).zip(shapes) {
            assert!(s >= n && (s - n) * 3 <= s, "{n} -> {s}");
        }
        assert_eq!(
            shape(3_000, 1_000),
            3_000,
            "never fewer rows than there are"
        );
    }

    #[test]
    fn statements_are_rounded_up_to_a_shape_within_the_byte_budget() {
        let plan = Plan::new(
            &rows(5, 10),
            Vec::new(),
            Dialect::MySql,
            &config(1, 1_000, 1 << 20),
        );
        assert_eq!(
            plan.lanes,
            vec![vec![Chunk {
                rows: 0..5,
                statement_rows: 6
            }]]
        );
        // 5 rows of ~1,070 bytes fit in 6,000 bytes; a sixth (the repeat) would not.
        let plan = Plan::new(
            &rows(5, 1_000),
            Vec::new(),
            Dialect::MySql,
            &config(1, 1_000, 6_000),
        );
        assert_eq!(plan.lanes[0][0].statement_rows, 5);
        // Capped at the largest statement: 1,000 rows.
        let plan = Plan::new(
            &rows(999, 1),
            Vec::new(),
            Dialect::MySql,
            &config(1, 1_000, 1 << 20),
        );
        assert_eq!(plan.lanes[0][0].statement_rows, 1_000);
    }

    #[test]
    fn large_batches_split_into_lanes_and_statements() {
        let batch = rows(1_000, 10);
        let plan = Plan::new(
            &batch,
            Vec::new(),
            Dialect::MySql,
            &config(2, 1_000, 1 << 20),
        );
        assert_eq!(ranges(&plan), vec![vec![0..500], vec![500..1_000]]);

        // Small batches are not split.
        let small = rows(PARALLEL_MIN_ROWS - 1, 10);
        let plan = Plan::new(
            &small,
            Vec::new(),
            Dialect::MySql,
            &config(2, 1_000, 1 << 20),
        );
        assert_eq!(ranges(&plan), vec![vec![0..PARALLEL_MIN_ROWS - 1]]);

        // SQLite's parameter limit: 32766 / 9 = 3640 rows per statement.
        let big = rows(9_000, 1);
        let plan = Plan::new(
            &big,
            Vec::new(),
            Dialect::Sqlite,
            &config(1, 10_000, 1 << 30),
        );
        assert_eq!(
            ranges(&plan),
            vec![vec![0..3_640, 3_640..7_280, 7_280..9_000]]
        );

        // The byte budget: bodies of 1000 bytes (+ 67 of the rest) in 4000-byte statements.
        let wide = rows(10, 1_000);
        let plan = Plan::new(&wide, Vec::new(), Dialect::MySql, &config(2, 1_000, 4_000));
        assert!(
            plan.lanes[0].iter().all(|c| c.statement_rows <= 3),
            "{:?}",
            plan.lanes
        );
        assert_eq!(covered(&plan), (0..10).collect::<Vec<_>>());

        // Cursor updates only.
        let plan = Plan::new(&[], Vec::new(), Dialect::MySql, &config(2, 1_000, 1 << 20));
        assert_eq!(ranges(&plan), vec![Vec::<Range<usize>>::new()]);
    }
}
