//! Where devices start, read in batches. Every login and resume needs its device's cursor and its
//! user's stored head; one query per login costs more than the rest of the login (SQLite hands
//! each query to a worker thread and back). So the lookups of logins that arrive together share
//! statements: a task takes whatever is queued (up to [`MAX_BATCH`]) and reads it with one
//! statement (the cursors, then the heads), a few batches at a time. An idle node answers a lone login at once.
//!
//! A statement's size is rounded up to a power of two (the last key repeated), so that there are
//! only a few distinct statements: each connection of the pool prepares and caches every distinct
//! statement it runs, and one for every batch size from 1 to 256 cost both the parsing and about
//! 10 MB of cached statements.

use std::collections::HashMap;
use std::sync::Arc;

use sqlx::{AnyPool, Row as _};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::sql::{self, Dialect};
use super::StoreError;

/// Most lookups one batch carries.
const MAX_BATCH: usize = 256;
/// Batches read at once.
const CONCURRENT_BATCHES: usize = 4;
/// Lookups waiting for a batch; beyond it callers wait for room.
const QUEUE: usize = 4_096;

/// A device's cursor and its user's stored head.
pub type Start = (u64, u64);

struct Lookup {
    user: Arc<str>,
    device: Arc<str>,
    reply: oneshot::Sender<Result<Start, StoreError>>,
}

/// The queue of lookups; the task reading it stops when every handle is dropped.
#[derive(Clone)]
pub(crate) struct StartReader {
    tx: mpsc::Sender<Lookup>,
}

impl StartReader {
    /// Starts the batching task on the current runtime.
    pub fn start(pool: AnyPool, dialect: Dialect) -> StartReader {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(rx, pool, dialect));
        StartReader { tx }
    }

    pub async fn get(&self, user: &Arc<str>, device: &Arc<str>) -> Result<Start, StoreError> {
        let (reply, answer) = oneshot::channel();
        let lookup = Lookup {
            user: user.clone(),
            device: device.clone(),
            reply,
        };
        self.tx.send(lookup).await.map_err(|_| StoreError::Closed)?;
        answer.await.unwrap_or(Err(StoreError::Closed))
    }
}

async fn run(mut rx: mpsc::Receiver<Lookup>, pool: AnyPool, dialect: Dialect) {
    let permits = Arc::new(Semaphore::new(CONCURRENT_BATCHES));
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        // While waiting for a permit more lookups may have queued: take them along.
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(l) => batch.push(l),
                Err(_) => break,
            }
        }
        let lookups = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH));
        let pool = pool.clone();
        tokio::spawn(async move {
            let result = read(&pool, dialect, &lookups).await;
            for (i, l) in lookups.into_iter().enumerate() {
                let _ = l.reply.send(match &result {
                    Ok(starts) => Ok(starts[i]),
                    Err(e) => Err(StoreError::ReadFailed(e.to_string())),
                });
            }
            drop(permit);
        });
    }
}

/// Cursors and heads of `lookups`, in their order, read with one statement.
async fn read(
    pool: &AnyPool,
    dialect: Dialect,
    lookups: &[Lookup],
) -> Result<Vec<Start>, sqlx::Error> {
    let mut users: Vec<&str> = lookups.iter().map(|l| &*l.user).collect();
    users.sort_unstable();
    users.dedup();
    // As many users as devices (or fewer): one size for both keeps the statements few.
    let n = statement_size(lookups.len());
    let statement = sql::device_starts(dialect, n);
    let mut query = sqlx::query(&statement);
    for l in padded(lookups, n) {
        query = query.bind(&*l.user).bind(&*l.device);
    }
    for u in padded(&users, n) {
        query = query.bind(*u);
    }
    // Per user (looked up by `&str`, without building keys): the stored head and the cursors
    // of its devices.
    let mut by_user: HashMap<String, (u64, Vec<(String, u64)>)> = HashMap::new();
    for row in query.fetch_all(pool).await? {
        let user = sql::text(&row, 0)?.unwrap_or_default();
        let seq: Option<i64> = row.try_get(2)?;
        let seq = seq.map_or(0, |s| u64::try_from(s).unwrap_or(0));
        let entry = by_user.entry(user).or_default();
        match sql::text(&row, 1)? {
            Some(device) => entry.1.push((device, seq)),
            None => entry.0 = seq,
        }
    }
    Ok(lookups
        .iter()
        .map(|l| match by_user.get(&*l.user) {
            Some((head, devices)) => {
                let cursor = devices
                    .iter()
                    .find(|(d, _)| **d == *l.device)
                    .map_or(0, |&(_, seq)| seq);
                (cursor, *head)
            }
            None => (0, 0),
        })
        .collect())
}

/// The number of keys a statement for `n` keys binds: `n` rounded up to a power of two.
fn statement_size(n: usize) -> usize {
    n.max(1).next_power_of_two()
}

/// `keys`, then its last key again until there are `n`.
fn padded<T>(keys: &[T], n: usize) -> impl Iterator<Item = &T> {
    let last = keys.last();
    keys.iter()
        .chain(std::iter::repeat_n(last, n.saturating_sub(keys.len())).flatten())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_come_in_few_sizes() {
        assert_eq!(statement_size(0), 1);
        assert_eq!(statement_size(1), 1);
        assert_eq!(statement_size(3), 4);
        assert_eq!(statement_size(129), 256);
        assert_eq!(statement_size(MAX_BATCH), MAX_BATCH);
        let keys = [1, 2, 3];
        assert_eq!(padded(&keys, 4).copied().collect::<Vec<_>>(), [1, 2, 3, 3]);
        assert_eq!(padded(&keys, 3).count(), 3);
    }
}
