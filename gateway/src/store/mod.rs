//! Message persistence: one row per (message, recipient) in MySQL/MariaDB or SQLite (the
//! embedded default), written by one batching writer per node (group commit, on a thread of its
//! own so that database work and delivery never wait for each other), and read back for
//! history, offline (pending) delivery and idempotency.
//!
//! Sending a message:
//!
//! 1. [`Store::reserve`] takes a place in the writer's bounded queue, or refuses with
//!    [`StoreError::Overloaded`] after `store.enqueue_timeout_ms`, *before* anything is pushed.
//! 2. The gateway pushes the message to the recipient's live connections.
//! 3. [`WritePermit::write`] hands the row over (with its final [`DeliveryState`]) without
//!    waiting, and returns a [`PendingWrite`] that resolves once the row's batch is COMMITTED.
//!    Only then does the sender get its receipt.
//!
//! [`Store::persist`] does all three steps for callers that push nothing. Device cursors
//! ([`Store::save_cursor`]) travel through the same writer. [`Store::close`] flushes everything
//! queued. The writer and its retry policy are in `writer/` (the loop in `mod.rs`; `queue.rs`,
//! what the store shares with it; `plan.rs`, statement shaping; `lanes.rs`, the transactions and
//! duplicate resolution), the reads in `reads.rs`, the rare writes outside the writer (stream
//! epoch, known users) in `records.rs`, the SQL in `sql.rs`, start-up and migrations in
//! `setup.rs`; the schema is `migrations/{mysql,sqlite}`.

mod reads;
mod records;
mod setup;
mod sql;
mod starts;
mod writer;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use imgate_shared::protocol::MAX_ID_LEN;
use imgate_shared::MessageId;
use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use serde::{Deserialize, Serialize, Serializer};
use sqlx::{AnyPool, Row as _};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::StoreSettings;
pub use setup::Limits;
pub use sql::Dialect;
use sql::Queries;
use writer::{Row, Shared, WritePool, Writer, WriterConfig};

/// Most messages one history or pending page returns.
pub const MAX_PAGE: u32 = 1_000;
/// How long [`Store::close`] keeps trying to flush while the database is down.
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long closing waits for database connections to close.
const POOL_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Metric names of the store, all starting with `imgate_store_`.
pub mod metric {
    /// Rows queued for the writer, places reserved but not yet written included (gauge).
    pub const QUEUE_DEPTH: &str = "imgate_store_queue_depth";
    /// How long the oldest message not yet committed has waited (gauge, seconds).
    pub const QUEUE_AGE: &str = "imgate_store_queue_age_seconds";
    /// Rows per written batch (histogram; see [`super::BATCH_ROWS_BUCKETS`]).
    pub const BATCH_ROWS: &str = "imgate_store_batch_rows";
    /// Time to write and commit one batch (histogram, seconds).
    pub const FLUSH_SECONDS: &str = "imgate_store_flush_seconds";
    /// Rows inserted (counter).
    pub const ROWS_WRITTEN: &str = "imgate_store_rows_written_total";
    /// Failed write attempts; each is retried (counter).
    pub const WRITE_ERRORS: &str = "imgate_store_write_errors_total";
    /// Messages refused before being queued, by reason: overloaded, queue_age, closed, invalid
    /// (counter).
    pub const REFUSED: &str = "imgate_store_refused_total";
    /// Rows that repeated a stored (sender, recipient, client_msg_id) (counter).
    pub const DUPLICATES: &str = "imgate_store_duplicates_total";
    /// Queued rows that were not written, by reason: unwritten (the database stayed down until
    /// the close deadline), not_stored (ignored by the database) (counter).
    pub const ROWS_FAILED: &str = "imgate_store_rows_failed_total";
    /// Device-cursor updates dropped because too many devices were queued, or the store was
    /// closed (counter).
    pub const CURSORS_DROPPED: &str = "imgate_store_cursors_dropped_total";
}

/// Every store metric with its kind, for the metrics catalog (`docs/metrics.md`).
pub const CATALOG: &[(&str, &str)] = &[
    (metric::QUEUE_DEPTH, "gauge"),
    (metric::QUEUE_AGE, "gauge"),
    (metric::BATCH_ROWS, "histogram"),
    (metric::FLUSH_SECONDS, "histogram"),
    (metric::ROWS_WRITTEN, "counter"),
    (metric::WRITE_ERRORS, "counter"),
    (metric::REFUSED, "counter"),
    (metric::DUPLICATES, "counter"),
    (metric::ROWS_FAILED, "counter"),
    (metric::CURSORS_DROPPED, "counter"),
];

/// Histogram buckets for [`metric::BATCH_ROWS`] (rows, not seconds).
pub const BATCH_ROWS_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1_000.0, 2_000.0, 5_000.0,
];
/// Histogram buckets for [`metric::FLUSH_SECONDS`].
pub const FLUSH_SECONDS_BUCKETS: &[f64] = &[
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Describes the store metrics to the installed recorder.
pub fn describe_metrics() {
    describe_gauge!(
        metric::QUEUE_DEPTH,
        "Messages queued for the database writer, reserved places included."
    );
    describe_gauge!(
        metric::QUEUE_AGE,
        "How long the oldest message not yet committed has waited; above store.max_queue_age_ms new messages are refused."
    );
    describe_histogram!(
        metric::BATCH_ROWS,
        "Rows per batch written by the database writer."
    );
    describe_histogram!(
        metric::FLUSH_SECONDS,
        Unit::Seconds,
        "Time to write and commit one batch."
    );
    describe_counter!(
        metric::ROWS_WRITTEN,
        "Message rows inserted into the database."
    );
    describe_counter!(
        metric::WRITE_ERRORS,
        "Failed database write attempts; the writer retries each batch until it succeeds."
    );
    describe_counter!(
        metric::REFUSED,
        "Messages the store refused before queueing them, by reason: overloaded (queue full), closed, invalid."
    );
    describe_counter!(
        metric::DUPLICATES,
        "Messages repeating a stored (sender, recipient, client_msg_id); answered with the stored id."
    );
    describe_counter!(
        metric::ROWS_FAILED,
        "Queued messages that were not written, by reason: unwritten (database down until the close deadline), not_stored."
    );
    describe_counter!(
        metric::CURSORS_DROPPED,
        "Device-cursor updates dropped because too many devices were queued or the store was closed; the device then replays from its older cursor."
    );
}

fn count_refused(reason: &'static str) {
    metrics::counter!(metric::REFUSED, "reason" => reason).increment(1);
}

/// Where a message is in its delivery to one recipient. Only ever rises.
///
/// A row is written once, as `Pending` or `Delivered`; `Acknowledged` is not written to the row
/// but read from the recipient's device cursors (see [`Store::message`]), which every
/// acknowledgement raises anyway: one write per batch of acknowledgements instead of one per
/// message, and the same answer on every node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Nobody was online when it was sent.
    Pending,
    /// Pushed to at least one live connection when it was sent.
    Delivered,
    /// A device of the recipient acknowledged it: its cursor reached the message's position.
    Acknowledged,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Acknowledged => "acknowledged",
        }
    }

    fn to_db(self) -> i16 {
        match self {
            DeliveryState::Pending => 0,
            DeliveryState::Delivered => 1,
            DeliveryState::Acknowledged => 2,
        }
    }

    fn from_db(value: i64) -> Option<DeliveryState> {
        match value {
            0 => Some(DeliveryState::Pending),
            1 => Some(DeliveryState::Delivered),
            2 => Some(DeliveryState::Acknowledged),
            _ => None,
        }
    }
}

/// A message row to store: one recipient of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub id: MessageId,
    /// `None` for system messages (stored as '').
    pub sender: Option<String>,
    pub recipient: String,
    pub channel: Option<String>,
    /// JSON text, stored byte for byte.
    pub body: String,
    /// The sender's id for the message; `None` means no idempotency.
    pub client_msg_id: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    pub state: DeliveryState,
    /// The message's position in the recipient's stream (1, 2, 3, ...).
    pub seq: u64,
}

/// A message row as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredMessage {
    /// Serialised as a decimal string.
    pub id: MessageId,
    /// `None` for system messages.
    pub sender: Option<String>,
    pub recipient: String,
    pub channel: Option<String>,
    /// JSON text; serialised as the JSON value itself, byte for byte.
    #[serde(serialize_with = "body_as_json")]
    pub body: String,
    pub client_msg_id: Option<String>,
    pub created_at_ms: u64,
    pub state: DeliveryState,
    /// The message's position in the recipient's stream; 0 for rows stored before streams.
    pub seq: u64,
}

fn body_as_json<S: Serializer>(body: &str, s: S) -> Result<S::Ok, S::Error> {
    match serde_json::from_str::<&serde_json::value::RawValue>(body) {
        Ok(raw) => raw.serialize(s),
        // Not JSON (cannot come from the gateway): keep it readable as a string.
        Err(_) => s.serialize_str(body),
    }
}

/// How a row was persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persisted {
    /// The row is committed under its own id.
    Stored,
    /// (sender, recipient, client_msg_id) was already stored under `existing`; this row was not
    /// written. Answer the sender with `existing`.
    Duplicate { existing: MessageId },
}

impl Persisted {
    /// The id the message is stored under, given the id the row was written with.
    pub fn stored_id(self, own: MessageId) -> MessageId {
        match self {
            Persisted::Stored => own,
            Persisted::Duplicate { existing } => existing,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid store configuration: {0}")]
    Config(String),
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
    /// The write queue stayed full for `store.enqueue_timeout_ms`: the database is down or too
    /// slow. Refuse the message; nothing was queued.
    #[error("message store overloaded: the write queue is full")]
    Overloaded,
    /// The store is closed (or closing); nothing was queued.
    #[error("message store closed")]
    Closed,
    /// The row breaks a limit of the schema; nothing was queued.
    #[error("message refused by the store: {0}")]
    Invalid(String),
    /// The row was queued, but the database stayed unavailable until the close deadline, so its
    /// write was never confirmed. It is not in the database, unless its statement was already on
    /// its way and the database carried it out after the store gave up. Treat the message as not
    /// sent: a retry with the same client_msg_id is stored once either way.
    #[error("message not written: the database was unavailable until the store closed")]
    Unwritten,
    /// The database ignored the row without it being a duplicate (cannot happen with the schema
    /// as designed).
    #[error("message not written: the database did not store it")]
    NotStored,
    /// A read failed.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// A read shared by several callers failed (the error, as text, for each of them).
    #[error("database read failed: {0}")]
    ReadFailed(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolClosed => StoreError::Closed,
            e => StoreError::Database(e),
        }
    }
}

/// A place in the write queue, taken by [`Store::reserve`]. Dropping it gives the place back.
pub struct WritePermit {
    permit: mpsc::OwnedPermit<Row>,
    limits: Limits,
}

impl fmt::Debug for WritePermit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WritePermit").finish_non_exhaustive()
    }
}

impl WritePermit {
    /// Hands the row to the writer at once, without waiting. The returned future resolves when
    /// the row's batch is committed (or the row is refused: [`StoreError::Invalid`] at once, or
    /// [`StoreError::Unwritten`]/[`StoreError::Closed`] if the store closes before it could be
    /// written). The row is written whether or not the future is awaited.
    pub fn write(self, msg: NewMessage) -> PendingWrite {
        let (id, created_at_ms, seq) = match check(&msg, &self.limits) {
            Ok(checked) => checked,
            Err(e) => {
                count_refused("invalid");
                return PendingWrite(PendingState::Ready(Some(Err(e))));
            }
        };
        let (done, rx) = oneshot::channel();
        self.permit.send(Row {
            id,
            created_at_ms,
            seq,
            msg,
            done,
        });
        PendingWrite(PendingState::Waiting(rx))
    }
}

/// The commit of one row; see [`WritePermit::write`].
#[must_use = "the row is written anyway; await this to learn when it is committed"]
pub struct PendingWrite(PendingState);

enum PendingState {
    Waiting(oneshot::Receiver<Result<Persisted, StoreError>>),
    Ready(Option<Result<Persisted, StoreError>>),
}

impl fmt::Debug for PendingWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PendingWrite").finish_non_exhaustive()
    }
}

impl Future for PendingWrite {
    type Output = Result<Persisted, StoreError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().0 {
            // A dropped reply channel: the writer stopped without writing the row.
            PendingState::Waiting(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(StoreError::Closed))),
            PendingState::Ready(result) => {
                Poll::Ready(result.take().unwrap_or(Err(StoreError::Closed)))
            }
        }
    }
}

/// Checks a row against the schema; returns its id, creation time and position as stored.
fn check(msg: &NewMessage, limits: &Limits) -> Result<(i64, i64, i64), StoreError> {
    let invalid = |m: String| Err(StoreError::Invalid(m));
    let id_field = |name: &str, value: &str| -> Result<(), StoreError> {
        if value.is_empty() || value.len() > MAX_ID_LEN {
            return Err(StoreError::Invalid(format!(
                "{name} must be 1 to {MAX_ID_LEN} bytes"
            )));
        }
        Ok(())
    };
    id_field("recipient", &msg.recipient)?;
    for (name, value) in [
        ("sender", &msg.sender),
        ("channel", &msg.channel),
        ("client_msg_id", &msg.client_msg_id),
    ] {
        if let Some(value) = value {
            id_field(name, value)?;
        }
    }
    if msg.body.len() > limits.max_body_len {
        return invalid(format!(
            "body is {} bytes; the database takes at most {}",
            msg.body.len(),
            limits.max_body_len
        ));
    }
    let Some(id) = sql::id_to_db(msg.id) else {
        return invalid(format!("message id {} is above 2^63", msg.id));
    };
    let Ok(created_at_ms) = i64::try_from(msg.created_at_ms) else {
        return invalid("created_at_ms is above 2^63".into());
    };
    let Ok(seq) = i64::try_from(msg.seq) else {
        return invalid("seq is above 2^63".into());
    };
    Ok((id, created_at_ms, seq))
}

/// The message store of a node. Cheap to clone; every clone is the same store.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    dialect: Dialect,
    reads: AnyPool,
    /// For writes outside the writer's batches, which happen rarely (stream epochs).
    rare_writes: AnyPool,
    queries: Queries,
    queue: mpsc::Sender<Row>,
    shared: Arc<Shared>,
    enqueue_timeout: Duration,
    max_queue_age_ms: u64,
    limits: Limits,
    starts: starts::StartReader,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("dialect", &self.inner.dialect)
            .field("queue_depth", &self.queue_depth())
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Connects (retrying with backoff for up to `connect_timeout_ms`, logging each failure),
    /// creates a missing SQLite file, applies missing migrations (safely when several nodes
    /// start at once) and starts the writer thread. Must run inside a Tokio runtime.
    pub async fn open(settings: &StoreSettings) -> Result<Store, StoreError> {
        sqlx::any::install_default_drivers();
        let url = settings.url.expose();
        let dialect = Dialect::from_url(url).ok_or_else(|| {
            StoreError::Config("store.url must start with sqlite: or mysql://".into())
        })?;
        setup::check_url(dialect, url)?;
        if settings.batch_max_rows == 0 || settings.queue_capacity == 0 {
            return Err(StoreError::Config(
                "store.batch_max_rows and store.queue_capacity must be positive".into(),
            ));
        }
        let url = setup::normalize_url(dialect, url);
        let retry_initial = Duration::from_millis(settings.retry_initial_ms);
        let retry_max = Duration::from_millis(settings.retry_max_ms);
        let deadline = Instant::now() + Duration::from_millis(settings.connect_timeout_ms);
        setup::wait_for_database(&url, deadline, retry_initial, retry_max).await?;
        let options = setup::options(&url)?;
        // An in-memory SQLite database exists once per connection: readers and the writer share
        // its one connection.
        let memory = dialect == Dialect::Sqlite && setup::is_memory(&url);
        let (reads, write_pool, migration_pool) = if memory {
            let pool = setup::writer_pool(dialect, options);
            (pool.clone(), WritePool::Shared(pool.clone()), pool)
        } else {
            let reads = setup::reader_pool(dialect, options.clone(), settings.pool_size);
            let migration_pool = setup::writer_pool(dialect, options.clone());
            (reads, WritePool::Own(options), migration_pool)
        };
        setup::migrate(&migration_pool, dialect).await?;
        let limits = setup::limits(&migration_pool, dialect).await?;
        // Kept for the rare writes outside the writer (stream epochs); its connection closes
        // when idle.
        let rare_writes = migration_pool;

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Config(format!("cannot start the writer's runtime: {e}")))?;
        let (queue, rx) = mpsc::channel(settings.queue_capacity);
        let shared = Arc::new(Shared::new());
        let writer = Writer::new(
            rx,
            shared.clone(),
            write_pool,
            dialect,
            WriterConfig {
                lanes: if memory {
                    1
                } else {
                    setup::write_lanes(dialect)
                },
                batch_max_rows: settings.batch_max_rows,
                batch_max_delay: Duration::from_millis(settings.batch_max_delay_ms),
                cursor_flush: Duration::from_millis(settings.cursor_flush_ms),
                retry_initial,
                retry_max,
                limits,
            },
        );
        writer
            .spawn(runtime)
            .map_err(|e| StoreError::Config(format!("cannot start the writer thread: {e}")))?;
        info!(backend = dialect.name(), "message store open");
        let starts = starts::StartReader::start(reads.clone(), dialect);
        Ok(Store {
            inner: Arc::new(Inner {
                dialect,
                reads,
                rare_writes,
                queries: Queries::new(dialect),
                queue,
                shared,
                enqueue_timeout: Duration::from_millis(settings.enqueue_timeout_ms),
                max_queue_age_ms: settings.max_queue_age_ms,
                limits,
                starts,
            }),
        })
    }

    pub fn dialect(&self) -> Dialect {
        self.inner.dialect
    }

    pub fn limits(&self) -> Limits {
        self.inner.limits
    }

    /// Checks a row against the schema's limits without queueing it; [`WritePermit::write`]
    /// refuses the same rows with [`StoreError::Invalid`].
    pub fn check(&self, msg: &NewMessage) -> Result<(), StoreError> {
        check(msg, &self.inner.limits).map(|_| ())
    }

    /// Takes a place in the write queue, waiting up to `store.enqueue_timeout_ms` for one.
    /// [`StoreError::Overloaded`] when the queue stayed full, [`StoreError::Closed`] after
    /// [`close`](Self::close). Both are counted in [`metric::REFUSED`].
    pub async fn reserve(&self) -> Result<WritePermit, StoreError> {
        let inner = &*self.inner;
        if inner.max_queue_age_ms > 0
            && inner.shared.queue_age_ms(crate::base::unix_millis()) > inner.max_queue_age_ms
        {
            // Say no early: what is queued already will be late.
            count_refused("queue_age");
            return Err(StoreError::Overloaded);
        }
        let sender = match self.try_reserve_inner() {
            Ok(permit) => return Ok(permit),
            Err(Some(sender)) => sender,
            Err(None) => {
                count_refused("closed");
                return Err(StoreError::Closed);
            }
        };
        match tokio::time::timeout(inner.enqueue_timeout, sender.reserve_owned()).await {
            Ok(Ok(permit)) => Ok(WritePermit {
                permit,
                limits: inner.limits,
            }),
            Ok(Err(_)) => {
                count_refused("closed");
                Err(StoreError::Closed)
            }
            Err(_) => {
                count_refused("overloaded");
                metrics::gauge!(metric::QUEUE_DEPTH).set(self.queue_depth() as f64);
                Err(StoreError::Overloaded)
            }
        }
    }

    /// Like [`reserve`](Self::reserve), without waiting: [`StoreError::Overloaded`] at once when
    /// the queue is full.
    pub fn try_reserve(&self) -> Result<WritePermit, StoreError> {
        match self.try_reserve_inner() {
            Ok(permit) => Ok(permit),
            Err(Some(_)) => {
                count_refused("overloaded");
                Err(StoreError::Overloaded)
            }
            Err(None) => {
                count_refused("closed");
                Err(StoreError::Closed)
            }
        }
    }

    /// A permit, or `Err(Some(sender))` when the queue is full, `Err(None)` when closed.
    fn try_reserve_inner(&self) -> Result<WritePermit, Option<mpsc::Sender<Row>>> {
        let inner = &*self.inner;
        if inner.shared.closing.load(Ordering::Acquire) {
            return Err(None);
        }
        match inner.queue.clone().try_reserve_owned() {
            Ok(permit) => Ok(WritePermit {
                permit,
                limits: inner.limits,
            }),
            Err(TrySendError::Full(sender)) => Err(Some(sender)),
            Err(TrySendError::Closed(_)) => Err(None),
        }
    }

    /// Reserves, writes and waits for the commit.
    pub async fn persist(&self, msg: NewMessage) -> Result<Persisted, StoreError> {
        self.reserve().await?.write(msg).await
    }

    /// Raises the cursor of `device` of `user` to `seq` in the writer's next batch (never
    /// lowers it). Fire and forget: dropped (counted in [`metric::CURSORS_DROPPED`]) when the
    /// store is closed or too many devices are queued; the device then replays from its older
    /// cursor, and its client drops what it already has.
    pub fn save_cursor(&self, user: &Arc<str>, device: &Arc<str>, seq: u64) {
        let shared = &self.inner.shared;
        let queued = shared.stopped.borrow().is_none()
            && shared.push_cursor((user.clone(), device.clone()), seq);
        if !queued {
            metrics::counter!(metric::CURSORS_DROPPED).increment(1);
        }
    }

    /// Checks that the database answers (for readiness probes).
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.inner.reads)
            .await
            .map(|_| ())
            .map_err(StoreError::from)
    }

    /// Rows queued for the writer, places reserved but not yet written included.
    /// How long the oldest message not yet committed has waited, in milliseconds.
    pub fn queue_age_ms(&self) -> u64 {
        self.inner.shared.queue_age_ms(crate::base::unix_millis())
    }

    pub fn queue_depth(&self) -> usize {
        let queue = &self.inner.queue;
        queue.max_capacity() - queue.capacity()
    }

    pub fn queue_capacity(&self) -> usize {
        self.inner.queue.max_capacity()
    }

    /// [`close_within`](Self::close_within) [`DEFAULT_CLOSE_TIMEOUT`].
    pub async fn close(&self) {
        self.close_within(DEFAULT_CLOSE_TIMEOUT).await;
    }

    /// Stops accepting rows ([`reserve`](Self::reserve) refuses with [`StoreError::Closed`]),
    /// writes everything queued (rows of permits already handed out included), retrying while
    /// the database fails until `timeout` has passed, then stops the writer and closes the
    /// connections. Returns how many queued rows could not be written (0: everything queued is
    /// committed); each of their senders got [`StoreError::Unwritten`]. Every clone of the store is closed; calling it again waits for
    /// the first call to finish.
    pub async fn close_within(&self, timeout: Duration) -> usize {
        let inner = &*self.inner;
        if !inner.shared.closing.swap(true, Ordering::AcqRel) {
            inner.shared.close.send_replace(Some(timeout));
        }
        // The writer honours the timeout on its own clock and reports when it has stopped, also
        // when it panics; no timer here, so a caller with paused time cannot cut it short.
        let mut stopped = inner.shared.stopped.subscribe();
        let unwritten = match stopped.wait_for(Option::is_some).await {
            Ok(stopped) => stopped.unwrap_or(0),
            Err(_) => 0,
        };
        // Closing waits for connections to finish what they are doing; do not let a stuck one
        // hold up shutdown.
        if tokio::time::timeout(POOL_CLOSE_TIMEOUT, inner.reads.close())
            .await
            .is_err()
        {
            warn!("database connections did not close in time");
        }
        if unwritten == 0 {
            info!("message store closed; everything queued was written");
        }
        unwritten
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> NewMessage {
        NewMessage {
            id: MessageId(1),
            sender: Some("alice".into()),
            recipient: "bob".into(),
            channel: None,
            body: "{}".into(),
            client_msg_id: None,
            created_at_ms: 1,
            state: DeliveryState::Pending,
            seq: 1,
        }
    }

    const LIMITS: Limits = Limits {
        max_body_len: 10,
        max_statement_bytes: 1_000,
    };

    #[test]
    fn rows_breaking_the_schema_are_refused() {
        assert!(check(&msg(), &LIMITS).is_ok());
        let refused = |f: fn(&mut NewMessage)| {
            let mut m = msg();
            f(&mut m);
            matches!(check(&m, &LIMITS), Err(StoreError::Invalid(_)))
        };
        assert!(refused(|m| m.recipient.clear()));
        assert!(refused(|m| m.recipient = "x".repeat(MAX_ID_LEN + 1)));
        assert!(refused(|m| m.sender = Some(String::new())));
        assert!(refused(|m| m.channel = Some("c".repeat(MAX_ID_LEN + 1))));
        assert!(refused(
            |m| m.client_msg_id = Some("c".repeat(MAX_ID_LEN + 1))
        ));
        assert!(refused(|m| m.body = "12345678901".into()));
        assert!(refused(|m| m.id = MessageId(1 << 63)));
        assert!(refused(|m| m.created_at_ms = u64::MAX));
        let mut m = msg();
        m.recipient = "é".repeat(MAX_ID_LEN / 2);
        assert!(check(&m, &LIMITS).is_ok());
    }

    #[test]
    fn stored_messages_serialise_ids_as_strings_and_bodies_as_json() {
        let stored = StoredMessage {
            id: MessageId(u64::from(u32::MAX) << 20),
            sender: None,
            recipient: "bob".into(),
            channel: Some("app".into()),
            body: r#"{"b": [1, 2],  "a":"é"}"#.into(),
            client_msg_id: None,
            created_at_ms: 5,
            state: DeliveryState::Acknowledged,
            seq: 3,
        };
        let json = serde_json::to_string(&stored).unwrap();
        assert_eq!(
            json,
            r#"{"id":"4503599626321920","sender":null,"recipient":"bob","channel":"app","body":{"b": [1, 2],  "a":"é"},"client_msg_id":null,"created_at_ms":5,"state":"acknowledged","seq":3}"#
        );
    }
}
