//! The message store against real databases. Every behaviour test runs twice: on SQLite (a fresh
//! temporary file) and on MariaDB/MySQL (a fresh database on `TEST_MYSQL_URL`, default
//! `mysql://root@127.0.0.1:3306`, dropped afterwards). The outage test starts a private
//! `mariadbd` on a free port and kills it.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use futures_util::future::join_all;
use imgate::config::{Secret, StoreSettings};
use imgate::ids::IdGenerator;
use imgate::store::{
    DeliveryState, NewMessage, PendingWrite, Persisted, Store, StoreError, StoredMessage, MAX_PAGE,
};
use imgate_shared::MessageId;

use common::mysql_server_url;
use sqlx::mysql::{MySqlConnectOptions, MySqlConnection};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{ConnectOptions, Connection, Executor, Row};
use tokio::time::Instant;

/// Upper bound on waiting for something that should happen.
const WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    MySql,
}

/// Generates `name` as a test on each backend: `sqlite::name` and `mysql::name`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Sqlite).await
                }
            )*
        }
        mod mysql {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::MySql).await
                }
            )*
        }
    };
}

on_both_backends!(
    rows_keep_every_field_byte_for_byte,
    persist_resolves_only_after_the_commit,
    a_repeated_client_msg_id_is_stored_once,
    duplicates_within_one_large_batch_get_one_id,
    history_pages_are_complete_and_newest_first,
    acknowledged_comes_from_the_device_cursors,
    cursor_updates_wait_for_their_interval_and_close_writes_them,
    close_flushes_everything_queued,
    close_finishes_while_acknowledgements_keep_coming,
    a_full_queue_refuses_and_loses_nothing,
    close_gives_up_at_its_deadline_and_says_so,
    ids_compare_byte_for_byte,
    reopening_keeps_rows_and_migrates_once,
    refusals_happen_before_anything_is_queued,
    streams_and_cursors_are_read_back_in_order_and_in_batches,
);

// ---------------------------------------------------------------------------------------------
// Harness

fn random_name(prefix: &str) -> String {
    format!("{prefix}{:016x}", rand::random::<u64>())
}

/// A fresh, empty database, removed on drop (even when the test fails).
struct TestDb {
    backend: Backend,
    /// The store URL.
    url: String,
    /// MySQL: the server URL (no database) and the database name.
    server: String,
    name: String,
    /// SQLite: the file.
    path: Option<PathBuf>,
}

impl TestDb {
    async fn new(backend: Backend) -> TestDb {
        match backend {
            Backend::Sqlite => {
                let path = std::env::temp_dir().join(format!("{}.db", random_name("imgate_t_")));
                TestDb {
                    backend,
                    url: format!("sqlite://{}", path.display()),
                    server: String::new(),
                    name: String::new(),
                    path: Some(path),
                }
            }
            Backend::MySql => Self::mysql_on(&mysql_server_url()).await,
        }
    }

    /// A fresh database on the MySQL server at `server` (a URL without a database).
    async fn mysql_on(server: &str) -> TestDb {
        let name = random_name("imgate_t_");
        let mut conn = MySqlConnection::connect(server).await.unwrap_or_else(|e| {
            panic!("cannot connect to MariaDB/MySQL at {server} (set TEST_MYSQL_URL): {e}")
        });
        sweep_stale_databases(&mut conn).await;
        conn.execute(&*format!(
            "CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        ))
        .await
        .unwrap();
        let _ = conn.close().await;
        TestDb {
            backend: Backend::MySql,
            url: database_url(server, &name),
            server: server.to_owned(),
            name,
            path: None,
        }
    }

    fn settings(&self) -> StoreSettings {
        StoreSettings {
            url: Secret::new(self.url.clone()),
            pool_size: 4,
            batch_max_rows: 200,
            batch_max_delay_ms: 2,
            // With every batch, so that a row written after a cursor update is a barrier.
            cursor_flush_ms: 0,
            queue_capacity: 10_000,
            enqueue_timeout_ms: 1_000,
            // Off: these tests stall the database on purpose and expect rows to queue.
            max_queue_age_ms: 0,
            retry_initial_ms: 10,
            retry_max_ms: 200,
            connect_timeout_ms: 10_000,
        }
    }

    async fn open(&self) -> Store {
        self.open_with(|_| {}).await
    }

    async fn open_with(&self, configure: impl FnOnce(&mut StoreSettings)) -> Store {
        let mut settings = self.settings();
        configure(&mut settings);
        Store::open(&settings).await.expect("store opens")
    }

    /// A plain connection of its own, not the store's.
    async fn raw(&self) -> Raw {
        match self.backend {
            Backend::MySql => Raw::MySql(MySqlConnection::connect(&self.url).await.unwrap()),
            Backend::Sqlite => {
                let options = SqliteConnectOptions::from_str(&self.url).unwrap();
                Raw::Sqlite(options.connect().await.unwrap())
            }
        }
    }
}

/// Drops test databases left behind by test processes that were killed (a killed process
/// cannot run `Drop`): those whose tables are all more than an hour old. Once per process.
async fn sweep_stale_databases(conn: &mut MySqlConnection) {
    static SWEPT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if SWEPT.swap(true, std::sync::atomic::Ordering::Relaxed) {
        return;
    }
    let stale: Vec<String> = sqlx::query_scalar(
        "SELECT table_schema FROM information_schema.tables \
         WHERE table_schema LIKE 'imgate\\_t\\_%' \
         GROUP BY table_schema HAVING MAX(create_time) < NOW() - INTERVAL 1 HOUR",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap_or_default();
    for name in stale {
        let _ = conn
            .execute(&*format!("DROP DATABASE IF EXISTS `{name}`"))
            .await;
    }
}

fn database_url(server: &str, name: &str) -> String {
    match server.split_once('?') {
        Some((base, query)) => format!("{base}/{name}?{query}"),
        None => format!("{server}/{name}"),
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            for suffix in ["", "-wal", "-shm"] {
                let mut p = path.clone().into_os_string();
                p.push(suffix);
                let _ = std::fs::remove_file(p);
            }
            return;
        }
        let (server, name) = (self.server.clone(), self.name.clone());
        // Drop runs inside the test's runtime, which cannot be blocked on: use a thread with a
        // runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(mut conn) = MySqlConnection::connect(&server).await {
                    let _ = conn
                        .execute(&*format!("DROP DATABASE IF EXISTS `{name}`"))
                        .await;
                    let _ = conn.close().await;
                }
            });
        })
        .join();
    }
}

/// A row as a separate connection sees it.
#[derive(Debug, PartialEq, Eq)]
struct RawRow {
    id: u64,
    sender: String,
    recipient: String,
    channel: Option<String>,
    body: String,
    client_msg_id: Option<String>,
    created_at_ms: i64,
    state: i64,
}

enum Raw {
    MySql(MySqlConnection),
    Sqlite(SqliteConnection),
}

const RAW_SELECT: &str = "SELECT id, sender, recipient, channel, body, client_msg_id, created_at_ms, state FROM messages";

fn utf8(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).expect("stored text is UTF-8")
}

impl Raw {
    async fn count(&mut self) -> i64 {
        let sql = "SELECT COUNT(*) FROM messages";
        match self {
            Raw::MySql(c) => sqlx::query_scalar(sql).fetch_one(c).await.unwrap(),
            Raw::Sqlite(c) => sqlx::query_scalar(sql).fetch_one(c).await.unwrap(),
        }
    }

    async fn row(&mut self, id: MessageId) -> Option<RawRow> {
        let sql = format!("{RAW_SELECT} WHERE id = ?");
        match self {
            Raw::MySql(c) => {
                let row = sqlx::query(&sql)
                    .bind(id.0)
                    .fetch_optional(c)
                    .await
                    .unwrap()?;
                Some(RawRow {
                    id: row.get::<u64, _>(0),
                    sender: utf8(row.get(1)),
                    recipient: utf8(row.get(2)),
                    channel: row.get::<Option<Vec<u8>>, _>(3).map(utf8),
                    body: utf8(row.get(4)),
                    client_msg_id: row.get::<Option<Vec<u8>>, _>(5).map(utf8),
                    created_at_ms: row.get(6),
                    state: i64::from(row.get::<i16, _>(7)),
                })
            }
            Raw::Sqlite(c) => {
                let row = sqlx::query(&sql)
                    .bind(id.0 as i64)
                    .fetch_optional(c)
                    .await
                    .unwrap()?;
                Some(RawRow {
                    id: row.get::<i64, _>(0) as u64,
                    sender: row.get(1),
                    recipient: row.get(2),
                    channel: row.get(3),
                    body: row.get(4),
                    client_msg_id: row.get(5),
                    created_at_ms: row.get(6),
                    state: row.get(7),
                })
            }
        }
    }

    /// The stored cursor of one device, if it has one.
    async fn cursor(&mut self, user: &str, device: &str) -> Option<i64> {
        let sql = "SELECT acked_seq FROM device_cursors WHERE user_id = ? AND device_id = ?";
        match self {
            Raw::MySql(c) => sqlx::query_scalar(sql)
                .bind(user)
                .bind(device)
                .fetch_optional(c)
                .await
                .unwrap(),
            Raw::Sqlite(c) => sqlx::query_scalar(sql)
                .bind(user)
                .bind(device)
                .fetch_optional(c)
                .await
                .unwrap(),
        }
    }

    async fn cursor_count(&mut self) -> i64 {
        let sql = "SELECT COUNT(*) FROM device_cursors";
        match self {
            Raw::MySql(c) => sqlx::query_scalar(sql).fetch_one(c).await.unwrap(),
            Raw::Sqlite(c) => sqlx::query_scalar(sql).fetch_one(c).await.unwrap(),
        }
    }

    async fn exists(&mut self, id: MessageId) -> bool {
        self.row(id).await.is_some()
    }

    /// Makes the database hold every write until [`unblock`](Self::unblock): a table lock on
    /// MySQL, an exclusive transaction on SQLite.
    async fn block(&mut self) {
        match self {
            Raw::MySql(c) => {
                c.execute("LOCK TABLES messages WRITE").await.unwrap();
            }
            Raw::Sqlite(c) => {
                c.execute("BEGIN EXCLUSIVE").await.unwrap();
            }
        };
    }

    async fn unblock(&mut self) {
        match self {
            Raw::MySql(c) => {
                c.execute("UNLOCK TABLES").await.unwrap();
            }
            Raw::Sqlite(c) => {
                c.execute("COMMIT").await.unwrap();
            }
        };
    }

    /// Whether a write of the store is waiting for the lock (MySQL only; true on SQLite).
    async fn writer_is_waiting(&mut self) -> bool {
        match self {
            Raw::MySql(c) => {
                let n: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM information_schema.processlist \
                     WHERE db = DATABASE() AND info LIKE 'INSERT IGNORE INTO messages%'",
                )
                .fetch_one(c)
                .await
                .unwrap();
                n > 0
            }
            Raw::Sqlite(_) => true,
        }
    }
}

static IDS: LazyLock<IdGenerator> = LazyLock::new(|| IdGenerator::new(7));

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A pending message with a fresh id.
fn message(from: Option<&str>, to: &str, body: &str) -> NewMessage {
    NewMessage {
        id: IDS.next(),
        sender: from.map(str::to_owned),
        recipient: to.to_owned(),
        channel: None,
        body: body.to_owned(),
        client_msg_id: None,
        created_at_ms: now_ms(),
        state: DeliveryState::Pending,
        seq: SEQS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
    }
}

/// Stream positions for the rows these tests write (distinct, increasing).
static SEQS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn with_client_id(mut m: NewMessage, client_msg_id: &str) -> NewMessage {
    m.client_msg_id = Some(client_msg_id.to_owned());
    m
}

fn stored(m: &NewMessage) -> StoredMessage {
    StoredMessage {
        id: m.id,
        sender: m.sender.clone(),
        recipient: m.recipient.clone(),
        channel: m.channel.clone(),
        body: m.body.clone(),
        client_msg_id: m.client_msg_id.clone(),
        created_at_ms: m.created_at_ms,
        state: m.state,
        seq: m.seq,
    }
}

/// Hands rows to the writer without waiting for their commits.
async fn write_all(store: &Store, messages: Vec<NewMessage>) -> Vec<PendingWrite> {
    let mut pending = Vec::with_capacity(messages.len());
    for m in messages {
        pending.push(store.reserve().await.unwrap().write(m));
    }
    pending
}

/// Waits until every cursor update queued so far is committed: the writer commits cursor
/// updates no later than a row handed over after them.
async fn settle(store: &Store) {
    let barrier = message(None, "zz-barrier", "{}");
    assert_eq!(store.persist(barrier).await.unwrap(), Persisted::Stored);
}

/// Polls a condition (an expression that may `.await`) until it holds, for at most [`WAIT`].
macro_rules! wait_until {
    ($what:expr, $condition:expr) => {{
        let deadline = Instant::now() + WAIT;
        while !$condition {
            assert!(
                Instant::now() < deadline,
                "timed out waiting until {}",
                $what
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }};
}

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

// ---------------------------------------------------------------------------------------------
// Behaviour, on both backends

async fn rows_keep_every_field_byte_for_byte(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.open().await;

    let mut full = message(
        Some("josé-😀"),
        "ünïcødé 用户",
        "{ \"text\" : \"héllo 😀 \\u00e9 \\\"quoted\\\" \\\\ back\\nslash\",\n  \"n\": 1.50, \"z\": null, \"a\": [3,2,1] }  \n",
    );
    full.channel = Some("app".into());
    full.client_msg_id = Some("c-1 ✓".into());
    full.state = DeliveryState::Delivered;
    let system = message(None, "bob", "\"just a string\"");
    let mut large = message(Some("alice"), "bob", "");
    large.body = format!("{{\"blob\":\"{}\"}}", "x€".repeat(100_000));
    large.state = DeliveryState::Acknowledged;

    for m in [&full, &system, &large] {
        assert_eq!(store.persist(m.clone()).await.unwrap(), Persisted::Stored);
        assert_eq!(store.message(m.id).await.unwrap(), Some(stored(m)));
    }

    // What another connection sees, column by column.
    let mut raw = db.raw().await;
    assert_eq!(
        raw.row(full.id).await.unwrap(),
        RawRow {
            id: full.id.0,
            sender: "josé-😀".into(),
            recipient: "ünïcødé 用户".into(),
            channel: Some("app".into()),
            body: full.body.clone(),
            client_msg_id: Some("c-1 ✓".into()),
            created_at_ms: full.created_at_ms as i64,
            state: 1,
        }
    );
    let raw_system = raw.row(system.id).await.unwrap();
    assert_eq!(
        raw_system.sender, "",
        "system messages are stored with sender ''"
    );
    assert_eq!((raw_system.channel, raw_system.client_msg_id), (None, None));
    assert_eq!(raw_system.state, 0);
    let raw_large = raw.row(large.id).await.unwrap();
    assert_eq!(raw_large.body.as_bytes(), large.body.as_bytes());
    assert_eq!(raw_large.state, 2);

    assert_eq!(store.message(MessageId(12345)).await.unwrap(), None);
    assert_eq!(store.message(MessageId(u64::MAX)).await.unwrap(), None);
    assert_eq!(store.close_within(WAIT).await, 0);
}

async fn persist_resolves_only_after_the_commit(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.open().await;

    // Many concurrent senders: each one, as soon as its persist returns, finds its row from a
    // connection of its own.
    let raw = Arc::new(tokio::sync::Mutex::new(db.raw().await));
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let store = store.clone();
            let raw = raw.clone();
            tokio::spawn(async move {
                let m = message(Some("alice"), &format!("user-{}", i % 7), "{\"i\":1}");
                assert_eq!(store.persist(m.clone()).await.unwrap(), Persisted::Stored);
                assert!(
                    raw.lock().await.exists(m.id).await,
                    "row {} not visible",
                    m.id
                );
            })
        })
        .collect();
    for task in join_all(tasks).await {
        task.unwrap();
    }

    // While the database holds the write, persist does not return.
    let mut blocker = db.raw().await;
    blocker.block().await;
    let m = message(Some("alice"), "bob", "{\"held\":true}");
    let id = m.id;
    let task = tokio::spawn({
        let store = store.clone();
        async move { store.persist(m).await }
    });
    wait_until!("the writer has taken the row", store.queue_depth() == 0);
    let mut observer = db.raw().await;
    if backend == Backend::MySql {
        wait_until!(
            "the INSERT waits for the lock",
            observer.writer_is_waiting().await
        );
    }
    assert!(!task.is_finished(), "persist returned before the commit");
    blocker.unblock().await;
    let result = within("persist after unblocking", task).await.unwrap();
    assert_eq!(result.unwrap(), Persisted::Stored);
    assert!(observer.exists(id).await);
    assert_eq!(store.close_within(WAIT).await, 0);
}

async fn a_repeated_client_msg_id_is_stored_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.open().await;
    let mut raw = db.raw().await;

    let first = with_client_id(message(Some("alice"), "bob", "{\"n\":1}"), "k1");
    let retry = with_client_id(message(Some("alice"), "bob", "{\"n\":1}"), "k1");
    assert_eq!(
        store.persist(first.clone()).await.unwrap(),
        Persisted::Stored
    );
    let outcome = store.persist(retry.clone()).await.unwrap();
    assert_eq!(outcome, Persisted::Duplicate { existing: first.id });
    assert_eq!(outcome.stored_id(retry.id), first.id);
    assert!(!raw.exists(retry.id).await);
    assert_eq!(
        store
            .message_by_client_id("alice", "bob", "k1")
            .await
            .unwrap()
            .map(|m| m.id),
        Some(first.id)
    );
    assert_eq!(
        store
            .message_by_client_id("alice", "bob", "nope")
            .await
            .unwrap()
            .map(|m| m.id),
        None
    );

    // Twice in the same batch.
    let a = with_client_id(message(Some("alice"), "bob", "{}"), "k2");
    let b = with_client_id(message(Some("alice"), "bob", "{}"), "k2");
    let (a_id, b_id) = (a.id, b.id);
    let results = join_all(write_all(&store, vec![a, b]).await).await;
    assert_eq!(results[0].as_ref().unwrap(), &Persisted::Stored);
    assert_eq!(
        results[1].as_ref().unwrap(),
        &Persisted::Duplicate { existing: a_id }
    );
    assert!(!raw.exists(b_id).await);

    // Not duplicates: another recipient, another sender (system), no client id at all.
    let others = vec![
        with_client_id(message(Some("alice"), "carol", "{}"), "k1"),
        with_client_id(message(None, "bob", "{}"), "k1"),
        message(Some("alice"), "bob", "{}"),
        message(Some("alice"), "bob", "{}"),
    ];
    for result in join_all(write_all(&store, others).await).await {
        assert_eq!(result.unwrap(), Persisted::Stored);
    }
    assert!(store
        .message_by_client_id("", "bob", "k1")
        .await
        .unwrap()
        .is_some());
    assert_eq!(raw.count().await, 2 + 4);

    // Across a restart of the node.
    assert_eq!(store.close_within(WAIT).await, 0);
    let store = db.open().await;
    let again = with_client_id(message(Some("alice"), "bob", "{\"n\":1}"), "k1");
    assert_eq!(
        store.persist(again).await.unwrap(),
        Persisted::Duplicate { existing: first.id }
    );
    assert_eq!(raw.count().await, 6);
    assert_eq!(store.close_within(WAIT).await, 0);
}

async fn duplicates_within_one_large_batch_get_one_id(backend: Backend) {
    let db = TestDb::new(backend).await;
    // One batch of 400 rows: on MySQL it is written as two concurrent transactions of 200.
    let store = db
        .open_with(|s| {
            s.batch_max_rows = 400;
            s.batch_max_delay_ms = 10_000;
        })
        .await;
    // Rows 200..400 repeat the keys of rows 0..200, in reverse order, so that the two
    // transactions insert the same keys in opposite orders (on MySQL they may deadlock, and the
    // batch is then retried).
    let keys: Vec<String> = (0..200).map(|i| format!("k{i}")).collect();
    let mut messages: Vec<NewMessage> = keys
        .iter()
        .map(|k| with_client_id(message(Some("alice"), "bob", "{}"), k))
        .collect();
    messages.extend(
        keys.iter()
            .rev()
            .map(|k| with_client_id(message(Some("alice"), "bob", "{}"), k)),
    );
    let results = join_all(write_all(&store, messages.clone()).await).await;
    let mut stored_under = std::collections::HashMap::new();
    for (m, result) in messages.iter().zip(results) {
        let id = result.unwrap().stored_id(m.id);
        let key = m.client_msg_id.clone().unwrap();
        let first = *stored_under.entry(key.clone()).or_insert(id);
        assert_eq!(first, id, "both copies of {key} must answer the same id");
    }
    let mut raw = db.raw().await;
    assert_eq!(raw.count().await, 200);
    for (key, id) in &stored_under {
        assert!(raw.exists(*id).await, "{key} stored under {id}");
        assert_eq!(
            store
                .message_by_client_id("alice", "bob", key)
                .await
                .unwrap()
                .map(|m| m.id),
            Some(*id)
        );
    }
    assert_eq!(store.close_within(WAIT).await, 0);
}

/// Reads every page of a history, checking each page's order and size.
async fn all_pages(store: &Store, user: &str, peer: Option<&str>, limit: u32) -> Vec<MessageId> {
    let mut ids: Vec<MessageId> = Vec::new();
    let mut before = None;
    loop {
        let page = store.history(user, peer, before, limit).await.unwrap();
        assert!(page.len() <= limit as usize);
        assert!(
            page.windows(2).all(|w| w[0].id > w[1].id),
            "page not newest first"
        );
        if let (Some(last), Some(first)) = (ids.last(), page.first()) {
            assert!(first.id < *last, "pages overlap");
        }
        let Some(last) = page.last() else { break };
        before = Some(last.id);
        let full = page.len() == limit as usize;
        ids.extend(page.iter().map(|m| m.id));
        if !full {
            break;
        }
    }
    ids
}

async fn history_pages_are_complete_and_newest_first(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.open().await;

    // 250 messages between alice and bob in both directions, with noise around them; ids are
    // made in this order, so newest first is reverse order.
    let mut messages = Vec::new();
    for i in 0..250 {
        let (from, to) = if i % 3 == 0 {
            ("bob", "alice")
        } else {
            ("alice", "bob")
        };
        messages.push(message(Some(from), to, &format!("{{\"i\":{i}}}")));
        if i % 4 == 0 {
            messages.push(message(Some("alice"), "carol", "{}"));
        }
        if i % 5 == 0 {
            messages.push(message(Some("carol"), "bob", "{}"));
        }
        if i % 25 == 0 {
            messages.push(message(Some("alice"), "alice", "{\"note\":\"to self\"}"));
            messages.push(message(None, "alice", "{\"system\":true}"));
        }
    }
    let expect = |keep: &dyn Fn(&NewMessage) -> bool| -> Vec<MessageId> {
        messages
            .iter()
            .rev()
            .filter(|m| keep(m))
            .map(|m| m.id)
            .collect()
    };
    let is = |m: &NewMessage, from: &str, to: &str| {
        m.sender.as_deref() == Some(from) && m.recipient == to
    };
    let alice_bob = expect(&|m| is(m, "alice", "bob") || is(m, "bob", "alice"));
    let alice_all = expect(&|m| m.sender.as_deref() == Some("alice") || m.recipient == "alice");
    let alice_self = expect(&|m| is(m, "alice", "alice"));
    let bob_carol = expect(&|m| is(m, "carol", "bob") || is(m, "bob", "carol"));
    assert_eq!(alice_bob.len(), 250);
    for result in join_all(write_all(&store, messages.clone()).await).await {
        assert_eq!(result.unwrap(), Persisted::Stored);
    }

    let pages = all_pages(&store, "alice", Some("bob"), 40).await;
    assert_eq!(pages, alice_bob, "alice with bob, by pages of 40");
    assert_eq!(all_pages(&store, "bob", Some("alice"), 40).await, alice_bob);
    let unique: HashSet<_> = pages.iter().collect();
    assert_eq!(unique.len(), 250);
    assert_eq!(
        all_pages(&store, "alice", None, 40).await,
        alice_all,
        "everything of alice"
    );
    assert_eq!(
        all_pages(&store, "alice", Some("alice"), 3).await,
        alice_self
    );
    assert_eq!(all_pages(&store, "bob", Some("carol"), 7).await, bob_carol);
    assert!(all_pages(&store, "dave", None, 40).await.is_empty());

    // Rows come back whole; the cursor is exclusive; limits are capped.
    let page = store.history("alice", Some("bob"), None, 1).await.unwrap();
    let newest = messages.iter().find(|m| m.id == alice_bob[0]).unwrap();
    assert_eq!(page, vec![stored(newest)]);
    let page = store
        .history("alice", Some("bob"), Some(alice_bob[10]), 2)
        .await
        .unwrap();
    assert_eq!(
        page.iter().map(|m| m.id).collect::<Vec<_>>(),
        alice_bob[11..13]
    );
    assert!(store
        .history("alice", None, None, 0)
        .await
        .unwrap()
        .is_empty());
    let capped = store.history("alice", None, None, u32::MAX).await.unwrap();
    assert_eq!(capped.len(), alice_all.len().min(MAX_PAGE as usize));
    assert_eq!(store.close_within(WAIT).await, 0);
}

async fn acknowledged_comes_from_the_device_cursors(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.open().await;

    // bob: positions 1..=20 pending, 21..=25 delivered; carol: 1..=10 pending.
    let mut to_bob = Vec::new();
    for seq in 1..=25u64 {
        let mut m = message(Some("alice"), "bob", &format!("{{\"seq\":{seq}}}"));
        m.seq = seq;
        if seq > 20 {
            m.state = DeliveryState::Delivered;
        }
        to_bob.push(m);
    }
    let to_carol: Vec<NewMessage> = (1..=10u64)
        .map(|seq| {
            let mut m = message(Some("alice"), "carol", "{}");
            m.seq = seq;
            m
        })
        .collect();
    let all: Vec<NewMessage> = to_bob.iter().chain(&to_carol).cloned().collect();
    for result in join_all(write_all(&store, all).await).await {
        assert_eq!(result.unwrap(), Persisted::Stored);
    }
    let state = |id| {
        let store = store.clone();
        async move { store.message(id).await.unwrap().unwrap().state }
    };
    assert_eq!(state(to_bob[0].id).await, DeliveryState::Pending);
    assert_eq!(state(to_bob[22].id).await, DeliveryState::Delivered);

    // Two devices of bob: the furthest cursor counts. Cursors never go down.
    let bob: Arc<str> = "bob".into();
    store.save_cursor(&bob, &"phone".into(), 8);
    store.save_cursor(&bob, &"laptop".into(), 22);
    store.save_cursor(&bob, &"laptop".into(), 3);
    settle(&store).await;
    for (i, m) in to_bob.iter().enumerate() {
        let expected = match m.seq {
            1..=22 => DeliveryState::Acknowledged,
            _ => DeliveryState::Delivered,
        };
        assert_eq!(state(m.id).await, expected, "bob's message #{}", i + 1);
    }
    // Nobody else's messages: carol's positions 1..=10 stay pending.
    for m in &to_carol {
        assert_eq!(state(m.id).await, DeliveryState::Pending);
    }
    // The history shows the same states, to the recipient and to the sender.
    let received = store.history("bob", None, None, 100).await.unwrap();
    let sent = store.history("alice", None, None, 100).await.unwrap();
    for page in [&received, &sent] {
        for m in page.iter().filter(|m| m.recipient == "bob") {
            let acknowledged = m.state == DeliveryState::Acknowledged;
            assert_eq!(acknowledged, m.seq <= 22, "position {}", m.seq);
        }
    }
    assert_eq!(sent.len(), 35);
    assert!(sent
        .iter()
        .filter(|m| m.recipient == "carol")
        .all(|m| m.state == DeliveryState::Pending));
    assert_eq!(store.close_within(WAIT).await, 0);
}

async fn cursor_updates_wait_for_their_interval_and_close_writes_them(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.open_with(|s| s.cursor_flush_ms = 60_000).await;
    let (bob, phone): (Arc<str>, Arc<str>) = ("bob".into(), "phone".into());
    for seq in 1..=50 {
        store.save_cursor(&bob, &phone, seq);
    }
    // Rows are written at once; the cursor waits for its interval (a minute here).
    settle(&store).await;
    let mut raw = db.raw().await;
    assert_eq!(raw.cursor("bob", "phone").await, None);
    // A login on this node starts after it all the same; other devices are not affected.
    assert_eq!(store.device_start(&bob, &phone).await.unwrap().0, 50);
    assert_eq!(
        store.device_start(&bob, &"laptop".into()).await.unwrap().0,
        0
    );
    // Closing writes what is queued: the highest position, once.
    assert_eq!(within("close", store.close_within(WAIT)).await, 0);
    assert_eq!(raw.cursor("bob", "phone").await, Some(50));
}

async fn close_flushes_everything_queued(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.open_with(|s| s.batch_max_rows = 1_000).await;
    let messages: Vec<_> = (0..5_000)
        .map(|i| message(Some("alice"), &format!("user-{}", i % 50), "{\"n\":42}"))
        .collect();
    let pending = write_all(&store, messages).await;
    // Cursor updates of many devices at once, queued while the rows are being written.
    let users: Vec<Arc<str>> = (0..3_000).map(|i| format!("user-{i}").into()).collect();
    let phone: Arc<str> = "phone".into();
    for (i, user) in users.iter().enumerate() {
        store.save_cursor(user, &phone, i as u64 + 1);
    }
    assert_eq!(within("close", store.close_within(WAIT)).await, 0);

    let mut raw = db.raw().await;
    assert_eq!(raw.count().await, 5_000);
    assert_eq!(raw.cursor_count().await, 3_000);
    assert_eq!(raw.cursor("user-2999", "phone").await, Some(3_000));
    for result in join_all(pending).await {
        assert_eq!(result.unwrap(), Persisted::Stored);
    }
    // Closed means closed.
    assert!(matches!(store.reserve().await, Err(StoreError::Closed)));
    let refused = store.persist(message(Some("alice"), "bob", "{}")).await;
    assert!(matches!(refused, Err(StoreError::Closed)));
    store.save_cursor(&users[0], &phone, 10_000);
    assert_eq!(
        store.close_within(WAIT).await,
        0,
        "closing twice is harmless"
    );
}

async fn streams_and_cursors_are_read_back_in_order_and_in_batches(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.open().await;
    // 20 users, user-i with i * 3 messages at positions 1..=i*3, written out of order.
    let mut messages = Vec::new();
    for i in 0..20u64 {
        for seq in (1..=i * 3).rev() {
            let mut m = message(
                Some("alice"),
                &format!("user-{i}"),
                &format!("{{\"seq\":{seq}}}"),
            );
            m.seq = seq;
            messages.push(m);
        }
    }
    for result in join_all(write_all(&store, messages).await).await {
        assert_eq!(result.unwrap(), Persisted::Stored);
    }
    // Cursors only rise; the device of user-i acknowledged i.
    let user = |i: u64| -> std::sync::Arc<str> { format!("user-{i}").into() };
    let device: std::sync::Arc<str> = "phone".into();
    for i in 0..20 {
        store.save_cursor(&user(i), &device, i);
        store.save_cursor(&user(i), &device, i / 2);
    }
    settle(&store).await;
    // Many logins at once share statements; each gets its own device's answer.
    let starts = join_all((0..20).flat_map(|i| {
        let store = store.clone();
        let (u, d) = (user(i), device.clone());
        let other: std::sync::Arc<str> = "laptop".into();
        let store2 = store.clone();
        let u2 = u.clone();
        [
            Box::pin(async move { (i, false, store.device_start(&u, &d).await.unwrap()) })
                as std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>,
            Box::pin(async move { (i, true, store2.device_start(&u2, &other).await.unwrap()) }),
        ]
    }))
    .await;
    for (i, other_device, (cursor, head)) in starts {
        assert_eq!(head, i * 3, "user-{i}'s stored head");
        assert_eq!(
            cursor,
            if other_device { 0 } else { i },
            "user-{i}'s cursor"
        );
    }
    // A stream page: positions from a point on, in order, at most `limit`.
    let page = store.stream("user-19", 10, 5).await.unwrap();
    let seqs: Vec<u64> = page.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![10, 11, 12, 13, 14]);
    assert_eq!(page[0].body, "{\"seq\":10}");
    assert_eq!(store.stream_head("user-19").await.unwrap(), 57);
    assert_eq!(store.stream_head("nobody").await.unwrap(), 0);
    assert!(store.stream("user-1", 4, 10).await.unwrap().is_empty());
}

async fn close_finishes_while_acknowledgements_keep_coming(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.open().await;
    let messages: Vec<_> = (0..100)
        .map(|_| message(Some("alice"), "bob", "{}"))
        .collect();
    let pending = write_all(&store, messages).await;
    // A connection that keeps acknowledging while the node shuts down.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acks = tokio::spawn({
        let (store, stop) = (store.clone(), stop.clone());
        let (bob, phone): (Arc<str>, Arc<str>) = ("bob".into(), "phone".into());
        async move {
            let mut seq = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                seq += 1;
                store.save_cursor(&bob, &phone, seq);
                tokio::task::yield_now().await;
            }
        }
    });
    let started = Instant::now();
    assert_eq!(within("close", store.close_within(WAIT)).await, 0);
    assert!(
        started.elapsed() < WAIT / 2,
        "close took {:?}",
        started.elapsed()
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    acks.await.unwrap();
    for result in join_all(pending).await {
        assert_eq!(result.unwrap(), Persisted::Stored);
    }
    let mut raw = db.raw().await;
    assert_eq!(raw.count().await, 100);
    assert!(raw.cursor("bob", "phone").await.is_some_and(|c| c >= 1));
}

async fn a_full_queue_refuses_and_loses_nothing(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db
        .open_with(|s| {
            s.queue_capacity = 20;
            s.batch_max_rows = 5;
            s.enqueue_timeout_ms = 50;
        })
        .await;
    let mut blocker = db.raw().await;
    blocker.block().await;

    // While the database holds every write, at most a batch (5) plus the queue (20) are
    // accepted; everyone else is refused, after waiting enqueue_timeout_ms.
    const SENT: usize = 100;
    let sends: Vec<_> = (0..SENT)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let m = message(Some("alice"), "bob", &format!("{{\"i\":{i}}}"));
                let id = m.id;
                (id, store.reserve().await.map(|permit| permit.write(m)))
            })
        })
        .collect();
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for send in join_all(sends).await {
        match send.unwrap() {
            (id, Ok(pending)) => accepted.push((id, pending)),
            (id, Err(StoreError::Overloaded)) => refused.push(id),
            (_, Err(e)) => panic!("unexpected refusal: {e}"),
        }
    }
    assert_eq!(accepted.len() + refused.len(), SENT);
    assert!(accepted.len() <= 25, "accepted {}", accepted.len());
    assert!(refused.len() >= SENT - 25);
    assert!(matches!(store.try_reserve(), Err(StoreError::Overloaded)));

    blocker.unblock().await;
    let mut raw = db.raw().await;
    for (id, pending) in accepted.iter_mut() {
        assert_eq!(
            within("accepted write", pending).await.unwrap(),
            Persisted::Stored
        );
        assert!(raw.exists(*id).await);
    }
    for id in &refused {
        assert!(!raw.exists(*id).await, "refused message {id} was stored");
    }
    assert_eq!(raw.count().await, accepted.len() as i64);
    assert_eq!(store.close_within(WAIT).await, 0);
}

async fn close_gives_up_at_its_deadline_and_says_so(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.open_with(|s| s.batch_max_rows = 4).await;
    let mut blocker = db.raw().await;
    blocker.block().await;

    let pending = write_all(
        &store,
        (0..10)
            .map(|_| message(Some("alice"), "bob", "{}"))
            .collect(),
    )
    .await;
    let unwritten = within("close", store.close_within(Duration::from_millis(300))).await;
    assert_eq!(unwritten, 10);
    for result in join_all(pending).await {
        assert!(matches!(result, Err(StoreError::Unwritten)), "{result:?}");
    }
    blocker.unblock().await;
    // Rows whose statement had not been sent are not there. (The statement of the batch that was
    // waiting for the lock may still be carried out by the database after the store gave up:
    // that is why Unwritten means "not confirmed", and why a retry must reuse its client id.)
    let mut raw = db.raw().await;
    assert!(
        raw.count().await <= 4,
        "only the batch in flight (4 rows) may have gone through"
    );
}

async fn ids_compare_byte_for_byte(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.open().await;
    // With a PAD SPACE collation (every utf8mb4 collation, utf8mb4_bin included) 'bob' and
    // 'bob ' would be the same user.
    for to in ["bob", "bob ", "Bob"] {
        let m = with_client_id(message(Some("alice"), to, "{}"), "same");
        assert_eq!(
            store.persist(m).await.unwrap(),
            Persisted::Stored,
            "to {to:?}"
        );
    }
    for user in ["bob", "bob ", "Bob"] {
        let history = store.history(user, None, None, 10).await.unwrap();
        assert_eq!(history.len(), 1, "history of {user:?}");
        assert_eq!(history[0].recipient, user);
    }
    assert_eq!(
        store
            .history("alice", Some("bob "), None, 10)
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(store
        .message_by_client_id("alice", "BOB", "same")
        .await
        .unwrap()
        .is_none());
    assert_eq!(store.close_within(WAIT).await, 0);
}

async fn reopening_keeps_rows_and_migrates_once(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.open().await;
    let m = message(Some("alice"), "bob", "{}");
    store.persist(m.clone()).await.unwrap();
    assert_eq!(store.close_within(WAIT).await, 0);

    let store = db.open().await;
    assert_eq!(store.message(m.id).await.unwrap(), Some(stored(&m)));
    assert_eq!(store.close_within(WAIT).await, 0);
    assert_eq!(migrations_applied(&db).await, migrations_available(backend));
    if backend == Backend::Sqlite {
        let mut raw = db.raw().await;
        let Raw::Sqlite(conn) = &mut raw else {
            unreachable!()
        };
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(conn)
            .await
            .unwrap();
        assert_eq!(mode, "wal");
    }
}

async fn refusals_happen_before_anything_is_queued(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.open_with(|s| s.queue_capacity = 1).await;

    let mut too_big = message(Some("alice"), "bob", "");
    too_big.body = "x".repeat(store.limits().max_body_len + 1);
    assert!(matches!(store.check(&too_big), Err(StoreError::Invalid(_))));
    let result = store.persist(too_big.clone()).await;
    assert!(matches!(result, Err(StoreError::Invalid(_))), "{result:?}");
    let long_id = message(Some("alice"), &"b".repeat(129), "{}");
    assert!(matches!(
        store.persist(long_id).await,
        Err(StoreError::Invalid(_))
    ));

    // A permit holds its place until it is used or dropped.
    let permit = store.reserve().await.unwrap();
    assert_eq!(store.queue_depth(), 1);
    assert!(matches!(store.try_reserve(), Err(StoreError::Overloaded)));
    drop(permit);
    assert_eq!(store.queue_depth(), 0);
    let m = message(Some("alice"), "bob", "{}");
    assert_eq!(
        store.try_reserve().unwrap().write(m.clone()).await.unwrap(),
        Persisted::Stored
    );

    assert_eq!(store.close_within(WAIT).await, 0);
    assert_eq!(db.raw().await.count().await, 1);
    assert!(!db.raw().await.exists(too_big.id).await);
}

/// How many migrations the store has for `backend`.
fn migrations_available(backend: Backend) -> i64 {
    let dir = match backend {
        Backend::MySql => "mysql",
        Backend::Sqlite => "sqlite",
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../migrations")
        .join(dir);
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension() == Some("sql".as_ref()))
        .count() as i64
}

async fn migrations_applied(db: &TestDb) -> i64 {
    let sql = "SELECT COUNT(*) FROM _sqlx_migrations WHERE success";
    match db.raw().await {
        Raw::MySql(mut c) => sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap(),
        Raw::Sqlite(mut c) => sqlx::query_scalar(sql).fetch_one(&mut c).await.unwrap(),
    }
}

// ---------------------------------------------------------------------------------------------
// MySQL only

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_nodes_starting_at_once_migrate_once() {
    for _ in 0..3 {
        let db = TestDb::new(Backend::MySql).await;
        let settings = db.settings();
        let opens = (0..3).map(|_| Store::open(&settings));
        let stores: Vec<Store> = join_all(opens)
            .await
            .into_iter()
            .map(|r| r.expect("every node starts"))
            .collect();
        assert_eq!(
            migrations_applied(&db).await,
            migrations_available(Backend::MySql)
        );
        // Every node works on the one schema.
        for (i, store) in stores.iter().enumerate() {
            let m = message(Some("alice"), &format!("bob-{i}"), "{}");
            assert_eq!(store.persist(m).await.unwrap(), Persisted::Stored);
        }
        assert_eq!(db.raw().await.count().await, 3);
        for store in stores {
            assert_eq!(store.close_within(WAIT).await, 0);
        }
    }
}

/// A MariaDB server of the test's own, in a temporary data directory, on a free port.
struct PrivateMariaDb {
    dir: PathBuf,
    port: u16,
    server: Option<Child>,
}

fn find_program(names: &[&str]) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin"].map(PathBuf::from));
    for dir in dirs {
        for name in names {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!("none of {names:?} found: install mariadb-server (scripts/test.sh does)");
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

impl PrivateMariaDb {
    /// Creates a data directory (takes a few seconds) and starts the server.
    async fn start() -> PrivateMariaDb {
        let dir = std::env::temp_dir().join(random_name("imgate_mariadb_"));
        std::fs::create_dir_all(&dir).unwrap();
        let install = find_program(&["mariadb-install-db", "mysql_install_db"]);
        let datadir = dir.join("data");
        let mut command = Command::new(install);
        command
            .arg("--no-defaults")
            .arg(format!("--datadir={}", datadir.display()))
            .arg("--auth-root-authentication-method=normal")
            .arg("--skip-test-db")
            .arg("--innodb-log-file-size=4M")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if running_as_root() {
            command.arg("--user=root");
        }
        let status = tokio::task::spawn_blocking(move || command.status())
            .await
            .unwrap()
            .expect("mariadb-install-db runs");
        assert!(status.success(), "mariadb-install-db failed");
        // Any free port: the OS picks one, and the server takes it over.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut db = PrivateMariaDb {
            dir,
            port,
            server: None,
        };
        db.restart().await;
        db
    }

    fn server_url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}", self.port)
    }

    /// Starts the server and waits until it answers.
    async fn restart(&mut self) {
        assert!(self.server.is_none());
        let daemon = find_program(&["mariadbd", "mysqld"]);
        let mut command = Command::new(daemon);
        command
            .arg("--no-defaults")
            .arg(format!("--datadir={}", self.dir.join("data").display()))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", self.dir.join("sock").display()))
            .arg(format!("--pid-file={}", self.dir.join("pid").display()))
            .arg(format!(
                "--log-error={}",
                self.dir.join("error.log").display()
            ))
            .arg("--skip-log-bin")
            .arg("--skip-name-resolve")
            .arg("--innodb-buffer-pool-size=16M")
            .arg("--innodb-log-file-size=4M")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if running_as_root() {
            command.arg("--user=root");
        }
        self.server = Some(command.spawn().expect("mariadbd starts"));
        let url = self.server_url();
        let log = self.dir.join("error.log");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(conn) = MySqlConnectOptions::from_str(&url).unwrap().connect().await {
                let _ = conn.close().await;
                return;
            }
            if Instant::now() >= deadline {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                panic!(
                    "private mariadbd did not come up on port {}:\n{log}",
                    self.port
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the server (SIGKILL: no clean shutdown, connections drop at once).
    fn kill(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}

impl Drop for PrivateMariaDb {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_outage_every_message_is_stored_after_it_or_refused() {
    let mut server = PrivateMariaDb::start().await;
    let db = TestDb::mysql_on(&server.server_url()).await;
    let store = db
        .open_with(|s| {
            s.queue_capacity = 20;
            s.batch_max_rows = 5;
            s.enqueue_timeout_ms = 100;
            s.retry_initial_ms = 20;
            s.retry_max_ms = 200;
        })
        .await;
    let before: Vec<NewMessage> = (0..10)
        .map(|_| message(Some("alice"), "bob", "{}"))
        .collect();
    for m in &before {
        assert_eq!(store.persist(m.clone()).await.unwrap(), Persisted::Stored);
    }

    server.kill();

    // During the outage: the writer holds one batch (5) and the queue (20) fills; every other
    // send is refused. Nothing is written, nothing is dropped.
    const SENT: usize = 100;
    let sends: Vec<_> = (0..SENT)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let m = message(Some("alice"), "bob", &format!("{{\"during\":{i}}}"));
                let id = m.id;
                (id, store.reserve().await.map(|permit| permit.write(m)))
            })
        })
        .collect();
    let mut accepted = Vec::new();
    let mut refused = Vec::new();
    for send in join_all(sends).await {
        match send.unwrap() {
            (id, Ok(pending)) => accepted.push((id, pending)),
            (id, Err(StoreError::Overloaded)) => refused.push(id),
            (_, Err(e)) => panic!("unexpected refusal: {e}"),
        }
    }
    assert_eq!(accepted.len() + refused.len(), SENT);
    assert!(accepted.len() <= 25, "accepted {}", accepted.len());
    for (_, pending) in accepted.iter_mut() {
        assert!(
            futures_util::FutureExt::now_or_never(pending).is_none(),
            "resolved during the outage"
        );
    }

    server.restart().await;

    for (id, pending) in accepted.iter_mut() {
        let result = within("a write accepted during the outage", pending).await;
        assert_eq!(result.unwrap(), Persisted::Stored, "message {id}");
    }
    let mut raw = db.raw().await;
    assert_eq!(raw.count().await, (before.len() + accepted.len()) as i64);
    for (id, _) in &accepted {
        assert!(raw.exists(*id).await);
    }
    for id in &refused {
        assert!(!raw.exists(*id).await, "refused message {id} was stored");
    }
    // And the store carries on.
    let after = message(Some("alice"), "bob", "{}");
    assert_eq!(store.persist(after).await.unwrap(), Persisted::Stored);
    assert_eq!(store.close_within(WAIT).await, 0);
    drop(raw);
    drop(db);
}
