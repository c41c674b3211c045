//! The SQL of the store: the two dialects, the statement texts, and how rows are read back.
//!
//! Everything runs through sqlx's `Any` driver with runtime-checked queries; [`Dialect`] covers
//! the few places where MySQL and SQLite differ. Two quirks of `Any` shape the reading code:
//! MySQL `VARBINARY`/`MEDIUMTEXT` values arrive as blobs (SQLite's `TEXT` as text), so strings
//! are read with [`text`]; and `Any` cannot read MySQL `TINYINT`, so `state` is a `SMALLINT`.

use std::fmt::Write as _;

use imgate_shared::MessageId;
use sqlx::any::{AnyRow, AnyTypeInfoKind};
use sqlx::{Row, ValueRef as _};

use super::{DeliveryState, StoredMessage};

/// Which database a store talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    MySql,
    Sqlite,
}

impl Dialect {
    /// The dialect of a `sqlite:`, `mysql://` or `mariadb://` URL.
    pub fn from_url(url: &str) -> Option<Dialect> {
        if url.starts_with("sqlite:") {
            Some(Dialect::Sqlite)
        } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
            Some(Dialect::MySql)
        } else {
            None
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Dialect::MySql => "mysql",
            Dialect::Sqlite => "sqlite",
        }
    }

    /// Most bind parameters one statement may carry.
    pub fn max_bind_params(self) -> usize {
        match self {
            Dialect::MySql => 65_535,
            // SQLITE_MAX_VARIABLE_NUMBER of the bundled SQLite (3.32 and later).
            Dialect::Sqlite => 32_766,
        }
    }

    /// An INSERT that skips rows whose primary key or idempotency key already exists. On MySQL,
    /// IGNORE also turns data errors into warnings; the store validates every row before it is
    /// queued (see `NewMessage` checks in `mod.rs`), so no row can reach that path.
    pub(crate) fn insert_ignore(self) -> &'static str {
        match self {
            Dialect::MySql => "INSERT IGNORE INTO",
            Dialect::Sqlite => "INSERT OR IGNORE INTO",
        }
    }
}

/// The columns of `messages`, in the order [`stored_message`] reads them.
pub const COLUMNS: &str =
    "id, sender, recipient, channel, body, client_msg_id, created_at_ms, state, seq";
/// Bind parameters per inserted row.
pub const INSERT_PARAMS_PER_ROW: usize = 9;

/// `?, ?, ?` with `n` placeholders.
fn placeholders(sql: &mut String, n: usize) {
    for i in 0..n {
        sql.push_str(if i == 0 { "?" } else { ", ?" });
    }
}

/// A multi-row insert of `rows` rows.
pub fn insert(dialect: Dialect, rows: usize) -> String {
    let mut sql = String::with_capacity(80 + rows * 26);
    let _ = write!(
        sql,
        "{} messages ({COLUMNS}) VALUES ",
        dialect.insert_ignore()
    );
    for i in 0..rows {
        sql.push_str(if i == 0 { "(" } else { ", (" });
        placeholders(&mut sql, INSERT_PARAMS_PER_ROW);
        sql.push(')');
    }
    sql
}

/// Raises device cursors: a multi-row upsert of `rows` (user_id, device_id, acked_seq,
/// updated_at_ms) rows that never lowers a stored cursor.
pub fn upsert_cursors(dialect: Dialect, rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO device_cursors (user_id, device_id, acked_seq, updated_at_ms) VALUES ",
    );
    for i in 0..rows {
        sql.push_str(if i == 0 { "(" } else { ", (" });
        placeholders(&mut sql, 4);
        sql.push(')');
    }
    sql.push_str(match dialect {
        Dialect::MySql => {
            " ON DUPLICATE KEY UPDATE acked_seq = GREATEST(acked_seq, VALUES(acked_seq)), \
             updated_at_ms = VALUES(updated_at_ms)"
        }
        Dialect::Sqlite => {
            " ON CONFLICT (user_id, device_id) DO UPDATE SET \
             acked_seq = MAX(acked_seq, excluded.acked_seq), updated_at_ms = excluded.updated_at_ms"
        }
    });
    sql
}

/// Where `n` devices start, in one statement: binds (user_id, device_id) × n, then n users.
/// Rows (user_id, device_id, acked_seq) of the devices that have a cursor, then rows
/// (recipient, NULL, MAX(seq)) of the users that have messages (their stored heads).
pub fn device_starts(dialect: Dialect, n: usize) -> String {
    let mut sql = String::from("SELECT user_id, device_id, acked_seq FROM device_cursors WHERE ");
    for i in 0..n {
        if i > 0 {
            sql.push_str(" OR ");
        }
        sql.push_str("(user_id = ? AND device_id = ?)");
    }
    sql.push_str(" UNION ALL SELECT recipient, NULL, MAX(seq) FROM ");
    sql.push_str(&messages_by(dialect, "ix_messages_stream"));
    sql.push_str(" WHERE recipient IN (");
    placeholders(&mut sql, n);
    sql.push_str(") GROUP BY recipient");
    sql
}

/// The highest acknowledged position of each of `n` users, over all their devices: binds the
/// user ids; rows (user_id, MAX(acked_seq)) of the users that have a cursor.
pub fn acknowledged_heads(n: usize) -> String {
    let mut sql =
        String::from("SELECT user_id, MAX(acked_seq) FROM device_cursors WHERE user_id IN (");
    placeholders(&mut sql, n);
    sql.push_str(") GROUP BY user_id");
    sql
}

/// Which of `n` ids exist.
pub fn existing_ids(n: usize) -> String {
    let mut sql = String::from("SELECT id FROM messages WHERE id IN (");
    placeholders(&mut sql, n);
    sql.push(')');
    sql
}

/// Rows matching any of `n` idempotency keys: binds (sender, recipient, client_msg_id) × n.
pub fn by_client_ids(n: usize) -> String {
    let mut sql = String::from("SELECT id, sender, recipient, client_msg_id FROM messages WHERE ");
    for i in 0..n {
        if i > 0 {
            sql.push_str(" OR ");
        }
        sql.push_str("(sender = ? AND recipient = ? AND client_msg_id = ?)");
    }
    sql
}

/// `messages`, read through the named index: `FORCE INDEX` on MySQL, `INDEXED BY` on SQLite
/// (which refuses the query rather than scanning). Each read below has exactly one good plan;
/// left to itself, MariaDB picks the idempotency key for a conversation (same prefix) and then
/// sorts every message of the two users on every page.
fn messages_by(dialect: Dialect, index: &str) -> String {
    match dialect {
        Dialect::MySql => format!("messages FORCE INDEX ({index})"),
        Dialect::Sqlite => format!("messages INDEXED BY {index}"),
    }
}

/// The read statements of one dialect, built once.
#[derive(Debug)]
pub struct Queries {
    /// Binds id.
    pub message_by_id: String,
    /// Binds sender, recipient, client_msg_id.
    pub message_by_client_id: String,
    /// A user's stream from a position on, in order: binds recipient, first seq, limit.
    pub stream: String,
    /// The highest position of a user's stream that is stored: binds recipient.
    pub stream_head: String,

    /// Everything a user sent or received before a cursor, newest first: binds, three times
    /// (one per state) user, user, before, limit; then user, before, limit; then limit.
    pub history_all: String,
    /// The conversation of two different users before a cursor, newest first: binds user,
    /// peer, before, limit, peer, user, before, limit, limit.
    pub history_with_peer: String,
    /// What a user sent to themselves before a cursor, newest first: binds user, user, before,
    /// limit.
    pub history_with_self: String,
}

/// The delivery states, as stored.
const STATES: [i16; 3] = [0, 1, 2];

impl Queries {
    pub fn new(dialect: Dialect) -> Queries {
        let pending_index = messages_by(dialect, "ix_messages_pending");
        let conversation = messages_by(dialect, "ix_messages_conversation");
        let sent = messages_by(dialect, "ix_messages_sent");
        let stream = messages_by(dialect, "ix_messages_stream");
        // Each branch is an index-ordered scan that stops after `limit` rows; the merge sorts at
        // most 4 × limit rows. What a user received comes from ix_messages_pending, one scan per
        // state (an IN list could not be read in id order). A message to oneself counts as sent.
        let mut branches: Vec<String> = STATES
            .iter()
            .map(|state| {
                format!(
                    "SELECT {COLUMNS} FROM (SELECT {COLUMNS} FROM {pending_index} \
                     WHERE recipient = ? AND state = {state} AND sender <> ? AND id < ? \
                     ORDER BY id DESC LIMIT ?) AS received_{state}"
                )
            })
            .collect();
        branches.push(format!(
            "SELECT {COLUMNS} FROM (SELECT {COLUMNS} FROM {sent} \
             WHERE sender = ? AND id < ? ORDER BY id DESC LIMIT ?) AS sent"
        ));
        let history_all = format!("{} ORDER BY id DESC LIMIT ?", branches.join(" UNION ALL "));
        let history_with_peer = format!(
            "SELECT {COLUMNS} FROM (SELECT {COLUMNS} FROM {conversation} \
               WHERE sender = ? AND recipient = ? AND id < ? ORDER BY id DESC LIMIT ?) AS sent \
             UNION ALL \
             SELECT {COLUMNS} FROM (SELECT {COLUMNS} FROM {conversation} \
               WHERE sender = ? AND recipient = ? AND id < ? ORDER BY id DESC LIMIT ?) AS received \
             ORDER BY id DESC LIMIT ?"
        );
        Queries {
            message_by_id: format!("SELECT {COLUMNS} FROM messages WHERE id = ?"),
            message_by_client_id: format!(
                "SELECT {COLUMNS} FROM messages \
                 WHERE sender = ? AND recipient = ? AND client_msg_id = ?"
            ),
            stream: format!(
                "SELECT {COLUMNS} FROM {stream} WHERE recipient = ? AND seq >= ? ORDER BY seq LIMIT ?"
            ),
            stream_head: format!("SELECT MAX(seq) FROM {stream} WHERE recipient = ?"),

            history_all,
            history_with_peer,
            history_with_self: format!(
                "SELECT {COLUMNS} FROM {conversation} \
                 WHERE sender = ? AND recipient = ? AND id < ? ORDER BY id DESC LIMIT ?"
            ),
        }
    }
}

/// A message id as stored: a signed 64-bit integer. `None` for ids at or above 2^63, which no
/// generator makes for centuries and which can therefore match no row.
pub fn id_to_db(id: MessageId) -> Option<i64> {
    i64::try_from(id.0).ok()
}

fn decode_error(index: usize, message: impl Into<String>) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: index.to_string(),
        source: message.into().into(),
    }
}

/// A string column, whichever way `Any` hands it over (text on SQLite, blob on MySQL).
pub fn text(row: &AnyRow, index: usize) -> Result<Option<String>, sqlx::Error> {
    let raw = row.try_get_raw(index)?;
    if raw.is_null() {
        return Ok(None);
    }
    if raw.type_info().kind() == AnyTypeInfoKind::Blob {
        let bytes: Vec<u8> = row.try_get(index)?;
        String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| decode_error(index, "column is not valid UTF-8"))
    } else {
        row.try_get::<String, _>(index).map(Some)
    }
}

fn required_text(row: &AnyRow, index: usize) -> Result<String, sqlx::Error> {
    text(row, index)?.ok_or_else(|| decode_error(index, "unexpected NULL"))
}

/// A message id column.
pub fn id(row: &AnyRow, index: usize) -> Result<MessageId, sqlx::Error> {
    let id: i64 = row.try_get(index)?;
    u64::try_from(id)
        .map(MessageId)
        .map_err(|_| decode_error(index, "negative message id"))
}

/// A row selected with [`COLUMNS`].
pub fn stored_message(row: &AnyRow) -> Result<StoredMessage, sqlx::Error> {
    let sender = required_text(row, 1)?;
    let created_at_ms: i64 = row.try_get(6)?;
    let state: i64 = row.try_get(7)?;
    let seq: i64 = row.try_get(8)?;
    Ok(StoredMessage {
        id: id(row, 0)?,
        sender: (!sender.is_empty()).then_some(sender),
        recipient: required_text(row, 2)?,
        channel: text(row, 3)?,
        body: required_text(row, 4)?,
        client_msg_id: text(row, 5)?,
        created_at_ms: u64::try_from(created_at_ms)
            .map_err(|_| decode_error(6, "negative created_at_ms"))?,
        state: DeliveryState::from_db(state)
            .ok_or_else(|| decode_error(7, format!("unknown delivery state {state}")))?,
        seq: u64::try_from(seq).map_err(|_| decode_error(8, "negative seq"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_have_one_placeholder_per_bind() {
        let count = |s: &str| s.matches('?').count();
        assert_eq!(count(&insert(Dialect::MySql, 3)), 27);
        for dialect in [Dialect::MySql, Dialect::Sqlite] {
            assert_eq!(count(&upsert_cursors(dialect, 3)), 12);
        }
        assert!(insert(Dialect::MySql, 1).starts_with("INSERT IGNORE INTO messages"));
        assert!(insert(Dialect::Sqlite, 1).starts_with("INSERT OR IGNORE INTO messages"));
        assert_eq!(count(&existing_ids(5)), 5);
        assert_eq!(count(&by_client_ids(4)), 12);
        assert_eq!(count(&acknowledged_heads(3)), 3);
        for dialect in [Dialect::MySql, Dialect::Sqlite] {
            let q = Queries::new(dialect);
            assert_eq!(count(&q.message_by_id), 1);
            assert_eq!(count(&q.message_by_client_id), 3);
            assert_eq!(count(&q.history_all), 3 * 4 + 3 + 1);
            assert_eq!(count(&q.history_with_peer), 9);
            assert_eq!(count(&q.history_with_self), 4);
            assert_eq!(count(&q.stream), 3);
            assert_eq!(count(&q.stream_head), 1);
            assert_eq!(count(&device_starts(dialect, 3)), 2 * 3 + 3);
        }
        assert!(Queries::new(Dialect::MySql)
            .history_all
            .contains("FORCE INDEX (ix_messages_pending)"));
        assert!(Queries::new(Dialect::Sqlite)
            .history_all
            .contains("INDEXED BY ix_messages_pending"));
    }

    #[test]
    fn dialect_from_url() {
        assert_eq!(Dialect::from_url("sqlite://x.db"), Some(Dialect::Sqlite));
        assert_eq!(Dialect::from_url("sqlite::memory:"), Some(Dialect::Sqlite));
        assert_eq!(Dialect::from_url("mysql://u@h/db"), Some(Dialect::MySql));
        assert_eq!(Dialect::from_url("mariadb://u@h/db"), Some(Dialect::MySql));
        assert_eq!(Dialect::from_url("postgres://u@h/db"), None);
    }
}
