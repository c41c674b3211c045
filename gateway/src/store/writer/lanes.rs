//! One attempt at writing a batch: its lanes run concurrently, each a transaction of INSERTs
//! (and cursor upserts) on a connection of its own; then the rows that were not inserted are
//! sorted into duplicates and missing.

use super::plan::{shape, Chunk};
use super::queue::CURSORS_PER_STATEMENT;
use super::*;

/// The connection of one attempt; closed, not returned to the pool, unless the attempt
/// succeeded and handed it back (a failed or abandoned attempt may leave it mid-statement).
pub(super) struct Checkout(Option<PoolConnection<Any>>);

impl Checkout {
    pub(super) fn conn(&mut self) -> &mut PoolConnection<Any> {
        self.0
            .as_mut()
            .expect("a checkout holds its connection until kept")
    }

    /// The attempt succeeded: keep the connection.
    pub(super) fn keep(mut self) -> PoolConnection<Any> {
        self.0
            .take()
            .expect("a checkout holds its connection until kept")
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Some(conn) = &mut self.0 {
            conn.close_on_drop();
        }
    }
}

/// One attempt at writing a batch: its transactions run concurrently, each on a connection of
/// its own (kept from the last batch, or new). Safe to repeat after any failure, even one that
/// hid a successful COMMIT, or after some transactions committed and others failed: a row whose
/// id is already there counts as stored.
pub(super) async fn write_batch(
    pool: &AnyPool,
    mut kept: Vec<PoolConnection<Any>>,
    dialect: Dialect,
    rows: &[Row],
    plan: &Plan,
) -> Result<(Written, Vec<PoolConnection<Any>>), AttemptError> {
    let lanes: Vec<_> = plan
        .lanes
        .iter()
        .enumerate()
        .map(|(i, chunks)| {
            let conn = kept.pop();
            let cursors: &[CursorRow] = if i == 0 { &plan.cursors } else { &[] };
            write_lane(pool, conn, dialect, rows, chunks, cursors)
        })
        .collect();
    // The connections of a batch that needs fewer transactions than the last one go back to
    // the pool.
    drop(kept);
    let mut written = Written {
        outcomes: vec![Outcome::Stored; rows.len()],
        inserted: 0,
    };
    let mut conns = Vec::with_capacity(plan.lanes.len());
    let mut failure = None;
    for result in join_all(lanes).await {
        match result {
            Ok((lane, conn)) => {
                for (i, outcome) in lane.outcomes {
                    written.outcomes[i] = outcome;
                }
                written.inserted += lane.inserted;
                conns.push(conn);
            }
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    match failure {
        None => Ok((written, conns)),
        Some(e) => Err(e),
    }
}

/// What one transaction of a batch did: outcomes of the rows that were not simply stored.
pub(super) struct LaneWritten {
    pub(super) outcomes: Vec<(usize, Outcome)>,
    pub(super) inserted: u64,
}

/// One transaction: INSERTs of some rows and cursor updates, then duplicate resolution. A
/// single statement runs on its own (autocommit: one round trip instead of three, and just as
/// durable); more run in an explicit transaction, so that they cost one commit.
pub(super) async fn write_lane(
    pool: &AnyPool,
    kept: Option<PoolConnection<Any>>,
    dialect: Dialect,
    rows: &[Row],
    chunks: &[Chunk],
    cursors: &[CursorRow],
) -> Result<(LaneWritten, PoolConnection<Any>), AttemptError> {
    let mut checkout = Checkout(Some(match kept {
        Some(conn) => conn,
        None => pool.acquire().await?,
    }));
    let conn: &mut sqlx::AnyConnection = checkout.conn();
    let statements = chunks.len() + cursors.len().div_ceil(CURSORS_PER_STATEMENT);
    let done = if statements > 1 {
        let mut tx = conn.begin().await?;
        let done = lane_statements(&mut tx, dialect, rows, chunks, cursors).await?;
        tx.commit().await?;
        done
    } else {
        lane_statements(conn, dialect, rows, chunks, cursors).await?
    };
    // Committed: the rows of this lane are there, and so are the ones they repeat (a
    // duplicate's INSERT waits for the transaction holding its key to end).
    let outcomes = if done.unsure.is_empty() {
        Vec::new()
    } else {
        resolve_duplicates(conn, dialect, rows, &done.unsure).await?
    };
    let written = LaneWritten {
        outcomes,
        inserted: done.inserted,
    };
    Ok((written, checkout.keep()))
}

pub(super) struct LaneDone {
    pub(super) inserted: u64,
    /// Rows of statements that inserted fewer rows than they carried: some are duplicates.
    pub(super) unsure: Vec<usize>,
}

/// The write statements of one transaction.
pub(super) async fn lane_statements(
    conn: &mut sqlx::AnyConnection,
    dialect: Dialect,
    rows: &[Row],
    chunks: &[Chunk],
    cursors: &[CursorRow],
) -> Result<LaneDone, sqlx::Error> {
    let mut done = LaneDone {
        inserted: 0,
        unsure: Vec::new(),
    };
    for chunk in chunks {
        let statement = sql::insert(dialect, chunk.statement_rows);
        let mut query = sqlx::query(&statement);
        let repeats =
            std::iter::repeat_n(chunk.rows.end - 1, chunk.statement_rows - chunk.rows.len());
        for i in chunk.rows.clone().chain(repeats) {
            let row = &rows[i];
            let msg = &row.msg;
            query = query
                .bind(row.id)
                .bind(msg.sender.as_deref().unwrap_or(""))
                .bind(msg.recipient.as_str())
                .bind(msg.channel.as_deref())
                .bind(msg.body.as_str())
                .bind(msg.client_msg_id.as_deref())
                .bind(row.created_at_ms)
                .bind(msg.state.to_db())
                .bind(row.seq);
        }
        // The repeats are never inserted: they carry the id of a row before them.
        let affected = query.execute(&mut *conn).await?.rows_affected();
        done.inserted += affected;
        if affected < chunk.rows.len() as u64 {
            done.unsure.extend(chunk.rows.clone());
        }
    }
    for chunk in cursors.chunks(CURSORS_PER_STATEMENT) {
        let rounded = shape(chunk.len(), CURSORS_PER_STATEMENT);
        let text = sql::upsert_cursors(dialect, rounded);
        let mut query = sqlx::query(&text);
        let last = chunk.last().expect("chunks are not empty");
        // A repeated cursor raises nothing more.
        let repeats = std::iter::repeat_n(last, rounded - chunk.len());
        for c in chunk.iter().chain(repeats) {
            query = query
                .bind(&*c.user)
                .bind(&*c.device)
                .bind(c.seq)
                .bind(c.at_ms);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(done)
}

/// Sorts the `unsure` rows (of a committed transaction) into stored (their id is there:
/// inserted now, or by an earlier attempt whose COMMIT went through unreported) and duplicates of an earlier message with the
/// same (sender, recipient, client_msg_id).
pub(super) async fn resolve_duplicates(
    conn: &mut sqlx::AnyConnection,
    dialect: Dialect,
    rows: &[Row],
    unsure: &[usize],
) -> Result<Vec<(usize, Outcome)>, sqlx::Error> {
    let max_params = dialect.max_bind_params().min(MAX_LOOKUP_PARAMS);
    let mut present = HashSet::new();
    for chunk in unsure.chunks(max_params) {
        let text = sql::existing_ids(chunk.len());
        let mut query = sqlx::query(&text);
        for &i in chunk {
            query = query.bind(rows[i].id);
        }
        for found in query.fetch_all(&mut *conn).await? {
            present.insert(found.try_get::<i64, _>(0)?);
        }
    }
    let missing: Vec<usize> = unsure
        .iter()
        .copied()
        .filter(|&i| !present.contains(&rows[i].id))
        .collect();
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    let keyed: Vec<usize> = missing
        .iter()
        .copied()
        .filter(|&i| rows[i].msg.client_msg_id.is_some())
        .collect();
    let mut existing: HashMap<(String, String, String), MessageId> = HashMap::new();
    // Each key is an OR-ed term; SQLite refuses expression trees deeper than 1,000.
    for chunk in keyed.chunks((max_params / 3).min(MAX_KEYS_PER_LOOKUP)) {
        let text = sql::by_client_ids(chunk.len());
        let mut query = sqlx::query(&text);
        for &i in chunk {
            let msg = &rows[i].msg;
            query = query
                .bind(msg.sender.as_deref().unwrap_or(""))
                .bind(msg.recipient.as_str())
                .bind(msg.client_msg_id.as_deref());
        }
        for found in query.fetch_all(&mut *conn).await? {
            let key = (
                sql::text(&found, 1)?.unwrap_or_default(),
                sql::text(&found, 2)?.unwrap_or_default(),
                sql::text(&found, 3)?.unwrap_or_default(),
            );
            existing.insert(key, sql::id(&found, 0)?);
        }
    }
    let outcomes = missing
        .into_iter()
        .map(|i| {
            let msg = &rows[i].msg;
            let key = (
                msg.sender.clone().unwrap_or_default(),
                msg.recipient.clone(),
                msg.client_msg_id.clone().unwrap_or_default(),
            );
            let outcome = match existing.get(&key) {
                Some(&id) if msg.client_msg_id.is_some() => Outcome::Duplicate(id),
                _ => Outcome::Missing,
            };
            (i, outcome)
        })
        .collect();
    Ok(outcomes)
}
