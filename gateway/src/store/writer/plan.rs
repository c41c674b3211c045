//! A batch shaped for the database: rows split into concurrent transactions (lanes) and
//! multi-row INSERT statements of a few fixed sizes, so that statements are prepared once.

use super::*;

/// A batch ready to be written, the same on every attempt.
pub(super) struct Plan {
    /// For each concurrent transaction, its INSERT statements.
    pub(super) lanes: Vec<Vec<Chunk>>,
    /// Device cursors to raise, by the first transaction.
    pub(super) cursors: Vec<CursorRow>,
}

/// One INSERT: some rows of the batch, and how many rows the statement holds. The statement
/// holds more rows than the chunk when its size is rounded up to a [`shape`], the extra rows
/// repeating the chunk's last one (a repeated id is ignored by `INSERT IGNORE`), so that the
/// connection's prepared statements are reused instead of a new one being prepared for almost
/// every batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Chunk {
    pub(super) rows: Range<usize>,
    pub(super) statement_rows: usize,
}

/// The size a statement of `n` rows (or pairs) is rounded up to: 1, 2, 3, 4, 6, 8, 12, 16,
/// 24, 32, 48… (powers of two and their halfway points), at most `cap`. A writer therefore
/// prepares about 2·log2(cap) shapes of each statement and keeps them, at the cost of at most
/// a third of the rows being repeats.
pub(super) fn shape(n: usize, cap: usize) -> usize {
    let rounded = if n <= 4 {
        n
    } else {
        let p = n.next_power_of_two();
        if p / 4 * 3 >= n {
            p / 4 * 3
        } else {
            p
        }
    };
    rounded.min(cap).max(n)
}

/// One device cursor to raise.
pub(crate) struct CursorRow {
    pub(super) user: Arc<str>,
    pub(super) device: Arc<str>,
    pub(super) seq: i64,
    pub(super) at_ms: i64,
}

impl Plan {
    pub(super) fn new(
        rows: &[Row],
        cursors: Vec<CursorRow>,
        dialect: Dialect,
        cfg: &WriterConfig,
    ) -> Plan {
        let lanes = if rows.len() >= PARALLEL_MIN_ROWS {
            cfg.lanes.max(1)
        } else {
            1
        };
        let rows_per_lane = rows.len().div_ceil(lanes).max(1);
        // The largest statement, whatever the batch (so that it is one shape).
        let max_statement_rows = (dialect.max_bind_params() / INSERT_PARAMS_PER_ROW)
            .min(cfg.batch_max_rows)
            .max(1);
        let rows_per_statement = max_statement_rows.min(rows_per_lane);
        let chunk = |range: Range<usize>, bytes: usize| {
            let n = range.len();
            let last = row_bytes(&rows[range.end - 1].msg);
            let rounded = shape(n, max_statement_rows);
            let fits = bytes + (rounded - n) * last <= cfg.limits.max_statement_bytes;
            Chunk {
                statement_rows: if fits { rounded } else { n },
                rows: range,
            }
        };
        let mut plan_lanes = Vec::with_capacity(lanes);
        for lane_start in (0..rows.len()).step_by(rows_per_lane) {
            let lane_end = (lane_start + rows_per_lane).min(rows.len());
            let mut chunks = Vec::new();
            let mut start = lane_start;
            let mut bytes = 0;
            for (i, row) in rows.iter().enumerate().take(lane_end).skip(lane_start) {
                let size = row_bytes(&row.msg);
                let full = i - start >= rows_per_statement
                    || (i > start && bytes + size > cfg.limits.max_statement_bytes);
                if full {
                    chunks.push(chunk(start..i, bytes));
                    start = i;
                    bytes = 0;
                }
                bytes += size;
            }
            chunks.push(chunk(start..lane_end, bytes));
            plan_lanes.push(chunks);
        }
        if plan_lanes.is_empty() {
            // Cursor updates only.
            plan_lanes.push(Vec::new());
        }
        Plan {
            lanes: plan_lanes,
            cursors,
        }
    }
}

/// Bytes a row adds to an INSERT, roughly.
pub(super) fn row_bytes(msg: &NewMessage) -> usize {
    let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    64 + msg.body.len()
        + msg.recipient.len()
        + opt(&msg.sender)
        + opt(&msg.channel)
        + opt(&msg.client_msg_id)
}
