//! Start-up: connecting (with retries), the connection pools, schema migrations and the limits
//! that depend on the server.

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{AnyConnection, AnyPool, ConnectOptions, Connection, Executor};
use tokio::time::Instant;
use tracing::{info, warn};

use super::sql::Dialect;
use super::StoreError;

/// How long a read waits for a free connection before failing.
const READ_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the writer waits for its connection (connecting included) before the attempt counts
/// as failed and is retried.
const WRITE_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one `GET_LOCK` call waits for another node's migration before logging and waiting
/// again.
const MIGRATION_LOCK_WAIT_SECS: u32 = 60;
/// Largest body a MEDIUMTEXT holds.
const MEDIUMTEXT_MAX: usize = 16 * 1024 * 1024 - 1;
/// Room left in a MySQL packet for everything of a row but its body.
const ROW_OVERHEAD_BYTES: usize = 64 * 1024;

/// Limits of the connected database.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest body, in bytes, the database accepts in one row.
    pub max_body_len: usize,
    /// Most bytes of values the writer puts in one INSERT.
    pub max_statement_bytes: usize,
}

/// A database URL ready for sqlx: SQLite files are created when missing.
pub fn normalize_url(dialect: Dialect, url: &str) -> String {
    match dialect {
        Dialect::Sqlite if !url.contains("mode=") && !is_memory(url) => {
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}mode=rwc")
        }
        _ => url.to_owned(),
    }
}

/// Whether a SQLite URL names an in-memory database, which exists once per connection.
pub fn is_memory(url: &str) -> bool {
    url.contains(":memory:") || url.contains("mode=memory")
}

/// Checks what can be checked without connecting.
pub fn check_url(dialect: Dialect, url: &str) -> Result<(), StoreError> {
    if dialect == Dialect::MySql {
        // mysql://user:password@host:port/database?options
        let rest = url.split_once("://").map_or("", |(_, rest)| rest);
        let path = rest.split_once('/').map_or("", |(_, path)| path);
        let database = path.split(['?', '#']).next().unwrap_or("");
        if database.is_empty() {
            return Err(StoreError::Config(
                "a mysql:// store.url must name a database, e.g. mysql://user@host:3306/imgate"
                    .into(),
            ));
        }
    }
    Ok(())
}

/// Connection options for a URL.
pub fn options(url: &str) -> Result<AnyConnectOptions, StoreError> {
    let options = AnyConnectOptions::from_str(url)
        .map_err(|e| StoreError::Config(format!("invalid store.url: {e}")))?;
    // Inserts carry thousands of placeholders: keep them out of the logs. The writer logs slow
    // batches itself.
    Ok(options.disable_statement_logging())
}

/// Connects once, retrying with exponential backoff until `deadline`, and logs every failure.
pub async fn wait_for_database(
    url: &str,
    deadline: Instant,
    retry_initial: Duration,
    retry_max: Duration,
) -> Result<(), StoreError> {
    let options = options(url)?;
    let mut backoff = retry_initial.max(Duration::from_millis(1));
    let mut attempt = 1u32;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let error =
            match tokio::time::timeout(remaining, AnyConnection::connect_with(&options)).await {
                Ok(Ok(conn)) => {
                    let _ = conn.close().await;
                    if attempt > 1 {
                        info!(attempt, "database reachable");
                    }
                    return Ok(());
                }
                Ok(Err(e @ sqlx::Error::Configuration(_))) => return Err(StoreError::Connect(e)),
                Ok(Err(e)) => e,
                Err(_) => sqlx::Error::PoolTimedOut,
            };
        if Instant::now() + backoff >= deadline {
            warn!(attempt, error = %crate::logging::esc(&error), "cannot connect to the database; giving up");
            return Err(StoreError::Connect(error));
        }
        warn!(attempt, error = %crate::logging::esc(&error), retry_in_ms = backoff.as_millis() as u64, "cannot connect to the database");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(retry_max.max(backoff));
        attempt += 1;
    }
}

/// How many connections the writer uses: two concurrent transactions on MySQL, one on SQLite
/// (a single writer).
pub fn write_lanes(dialect: Dialect) -> usize {
    match dialect {
        Dialect::MySql => 2,
        Dialect::Sqlite => 1,
    }
}

/// A pool for writing (the writer's own, and the one that migrates), of [`write_lanes`]
/// connections. Connects lazily; must be created inside the runtime that will use it, because a
/// MySQL connection's socket belongs to the runtime it was opened on.
pub fn writer_pool(dialect: Dialect, options: AnyConnectOptions) -> AnyPool {
    AnyPoolOptions::new()
        .max_connections(write_lanes(dialect) as u32)
        .min_connections(0)
        .acquire_timeout(WRITE_ACQUIRE_TIMEOUT)
        // The writer keeps its connection between batches and closes it after any failed
        // attempt; a stale connection costs one quick retry instead of a ping before every batch.
        .test_before_acquire(false)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                for statement in session_setup(dialect, Role::Writer) {
                    conn.execute(*statement).await?;
                }
                Ok(())
            })
        })
        .connect_lazy_with(options)
}

/// The pool for reads (history, pending, lookups): `pool_size - 1` connections (at least one),
/// the writer having its own so that reads never starve it. Connects lazily.
pub fn reader_pool(dialect: Dialect, options: AnyConnectOptions, pool_size: u32) -> AnyPool {
    AnyPoolOptions::new()
        .max_connections(pool_size.saturating_sub(1).max(1))
        .min_connections(0)
        .acquire_timeout(READ_ACQUIRE_TIMEOUT)
        .after_connect(move |conn, _| {
            Box::pin(async move {
                for statement in session_setup(dialect, Role::Reader) {
                    conn.execute(*statement).await?;
                }
                Ok(())
            })
        })
        .connect_lazy_with(options)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Writer,
    Reader,
}

/// Statements run on every new connection.
fn session_setup(dialect: Dialect, role: Role) -> &'static [&'static str] {
    match (dialect, role) {
        // Read committed: the writer's duplicate lookups see the latest committed rows, and
        // InnoDB takes fewer gap locks when several nodes insert at once.
        (Dialect::MySql, Role::Writer) => {
            &["SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED"]
        }
        (Dialect::MySql, Role::Reader) => &[],
        // WAL: readers never block the writer, nor it them. synchronous=FULL: a commit is on
        // disk (the WAL is fsynced) before the writer reports it, so an acknowledged message
        // survives a power loss; NORMAL would only survive a process crash. One fsync per batch.
        // busy_timeout: wait up to 5 s for a lock held by another connection.
        // cache_size: 32 MiB of pages (SQLite's default is 2 MiB); with a table of five indexes
        // the default cache missed on most inserts and each miss was a pread of a page.
        (Dialect::Sqlite, Role::Writer) => &[
            "PRAGMA journal_mode = WAL",
            "PRAGMA synchronous = FULL",
            "PRAGMA busy_timeout = 5000",
            "PRAGMA cache_size = -32768",
            "PRAGMA wal_autocheckpoint = 16384",
        ],
        (Dialect::Sqlite, Role::Reader) => {
            &["PRAGMA busy_timeout = 5000", "PRAGMA query_only = ON"]
        }
    }
}

/// The embedded migrations (`migrations/{mysql,sqlite}`). `sqlx::migrate!` reads the directory
/// when this file is compiled: a new migration file is only picked up by a rebuild of the crate.
fn migrator(dialect: Dialect) -> Migrator {
    let mut migrator = match dialect {
        Dialect::MySql => sqlx::migrate!("../migrations/mysql"),
        Dialect::Sqlite => sqlx::migrate!("../migrations/sqlite"),
    };
    // sqlx's own MySQL lock is `GET_LOCK(?, -1)`, which MariaDB refuses (NULL, warning 1411), so
    // it silently locks nothing there; `migrate` takes a lock of its own instead.
    migrator.set_locking(false);
    // A node of an older release must still start after a newer one has migrated (rolling
    // upgrades), so migrations must stay backward compatible and unknown ones are tolerated.
    migrator.set_ignore_missing(true);
    migrator
}

/// Applies the migrations that are missing. On MySQL several nodes may start at once: each one
/// migrates while holding an advisory lock named after the database, on the connection that
/// migrates, so one applies the migrations and the others then find nothing to do.
pub async fn migrate(pool: &AnyPool, dialect: Dialect) -> Result<(), StoreError> {
    // sqlx's migrator future over `AnyConnection` is not provably `Send` (its `Acquire` bounds
    // are higher-ranked), and a node runs inside `tokio::spawn`. So it runs on a blocking thread,
    // driven by this runtime's handle; the pool's connections stay on this runtime's reactor.
    let pool = pool.clone();
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || handle.block_on(migrate_here(&pool, dialect)))
        .await
        .map_err(|e| StoreError::Config(format!("migration task failed: {e}")))?
}

async fn migrate_here(pool: &AnyPool, dialect: Dialect) -> Result<(), StoreError> {
    let migrator = migrator(dialect);
    let mut conn = pool.acquire().await.map_err(StoreError::Connect)?;
    if dialect == Dialect::Sqlite {
        return migrator.run(&mut *conn).await.map_err(StoreError::Migrate);
    }
    const LOCK: &str = "CONCAT('imgate_migrate_', MD5(DATABASE()))";
    let acquire = format!("SELECT GET_LOCK({LOCK}, {MIGRATION_LOCK_WAIT_SECS})");
    loop {
        let got: Option<i64> = sqlx::query_scalar(&acquire)
            .fetch_one(&mut *conn)
            .await
            .map_err(StoreError::Connect)?;
        match got {
            Some(1) => break,
            Some(_) => info!("another node is migrating the database; waiting"),
            None => {
                conn.close_on_drop();
                return Err(StoreError::Config(
                    "cannot take the migration lock (GET_LOCK returned NULL)".into(),
                ));
            }
        }
    }
    let result = migrator.run(&mut *conn).await;
    let release = format!("SELECT RELEASE_LOCK({LOCK})");
    if sqlx::query(&release).execute(&mut *conn).await.is_err() {
        // Closing the session releases the lock too.
        conn.close_on_drop();
    }
    result.map_err(StoreError::Migrate)
}

/// Reads the limits of the database.
pub async fn limits(pool: &AnyPool, dialect: Dialect) -> Result<Limits, StoreError> {
    match dialect {
        Dialect::MySql => {
            let packet: i64 = sqlx::query_scalar("SELECT @@max_allowed_packet")
                .fetch_one(pool)
                .await
                .map_err(StoreError::Connect)?;
            let packet = usize::try_from(packet).unwrap_or(MEDIUMTEXT_MAX);
            Ok(Limits {
                max_body_len: MEDIUMTEXT_MAX.min(packet.saturating_sub(ROW_OVERHEAD_BYTES)),
                max_statement_bytes: (packet / 2).max(64 * 1024),
            })
        }
        Dialect::Sqlite => Ok(Limits {
            max_body_len: MEDIUMTEXT_MAX,
            max_statement_bytes: 64 * 1024 * 1024,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_files_are_created_when_missing() {
        assert_eq!(
            normalize_url(Dialect::Sqlite, "sqlite://imgate.db"),
            "sqlite://imgate.db?mode=rwc"
        );
        assert_eq!(
            normalize_url(Dialect::Sqlite, "sqlite://imgate.db?cache=shared"),
            "sqlite://imgate.db?cache=shared&mode=rwc"
        );
        assert_eq!(
            normalize_url(Dialect::Sqlite, "sqlite://imgate.db?mode=ro"),
            "sqlite://imgate.db?mode=ro"
        );
        assert_eq!(
            normalize_url(Dialect::Sqlite, "sqlite::memory:"),
            "sqlite::memory:"
        );
        assert_eq!(
            normalize_url(Dialect::MySql, "mysql://h/db"),
            "mysql://h/db"
        );
    }

    #[test]
    fn mysql_urls_must_name_a_database() {
        assert!(check_url(Dialect::MySql, "mysql://root@127.0.0.1:3306/imgate").is_ok());
        assert!(check_url(
            Dialect::MySql,
            "mysql://root@127.0.0.1:3306/imgate?ssl-mode=disabled"
        )
        .is_ok());
        assert!(check_url(Dialect::MySql, "mysql://root@127.0.0.1:3306").is_err());
        assert!(check_url(Dialect::MySql, "mysql://root@127.0.0.1:3306/").is_err());
        assert!(check_url(Dialect::Sqlite, "sqlite://x.db").is_ok());
    }
}
