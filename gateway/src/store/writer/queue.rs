//! What the store and its writer share: device cursors waiting to be written (coalesced per
//! device), the age of the queue's oldest row, and the writer's stop signal.

use super::*;

/// A device cursor to raise: (user, device) → acknowledged position.
pub(crate) type CursorKey = (Arc<str>, Arc<str>);

/// Cursor rows per upsert statement (4 parameters each).
pub(super) const CURSORS_PER_STATEMENT: usize = 1_000;

/// Device cursors not in the database yet, coalesced per device (the highest position wins).
#[derive(Default)]
pub(super) struct Cursors {
    /// Waiting for the writer.
    pub(super) queued: HashMap<CursorKey, u64>,
    /// Taken by the writer and not known to be committed yet.
    pub(super) flushing: HashMap<CursorKey, u64>,
}

/// What the store and its writer share.
pub(crate) struct Shared {
    pub(super) cursors: Mutex<Cursors>,
    pub(super) wake: Notify,
    /// Set when the store starts closing; `reserve` refuses from then on.
    pub closing: AtomicBool,
    /// How long the writer may keep trying once the store closes, sent to the writer. (A
    /// duration rather than a deadline: the writer's clock is its own runtime's.)
    pub close: watch::Sender<Option<Duration>>,
    /// `Some(rows not written)` once the writer has stopped.
    pub stopped: watch::Sender<Option<usize>>,
    /// When the oldest row the writer holds and has not committed was accepted (Unix ms), or 0
    /// when it holds none: the age of the queue's head.
    pub oldest_ms: std::sync::atomic::AtomicU64,
}

impl Shared {
    pub fn new() -> Shared {
        Shared {
            cursors: Mutex::new(Cursors::default()),
            wake: Notify::new(),
            closing: AtomicBool::new(false),
            close: watch::Sender::new(None),
            stopped: watch::Sender::new(None),
            oldest_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// How long the oldest row the writer holds has waited (0 when it holds none).
    pub fn queue_age_ms(&self, now_ms: u64) -> u64 {
        match self.oldest_ms.load(std::sync::atomic::Ordering::Relaxed) {
            0 => 0,
            oldest => now_ms.saturating_sub(oldest),
        }
    }

    pub(super) fn lock_cursors(&self) -> MutexGuard<'_, Cursors> {
        // A panic while holding the lock cannot leave the maps inconsistent.
        self.cursors.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The highest position queued for `key` and not known to be in the database yet. A
    /// lookup that reads this before it reads the database misses no acknowledgement made
    /// before it: a cursor leaves these maps only once it is committed.
    pub fn unwritten_cursor(&self, key: &CursorKey) -> Option<u64> {
        let cursors = self.lock_cursors();
        let queued = cursors.queued.get(key).copied();
        let flushing = cursors.flushing.get(key).copied();
        queued.max(flushing)
    }

    /// Queues a cursor update; `false` when too many devices are queued already. The writer
    /// is woken for the first update queued since its last flush; it writes them when they are
    /// due (`cursor_flush`).
    pub fn push_cursor(&self, key: CursorKey, seq: u64) -> bool {
        let mut cursors = self.lock_cursors();
        let queued = &mut cursors.queued;
        if queued.len() >= MAX_QUEUED_CURSORS && !queued.contains_key(&key) {
            return false;
        }
        let first = queued.is_empty();
        let entry = queued.entry(key).or_insert(0);
        *entry = (*entry).max(seq);
        drop(cursors);
        if first {
            self.wake.notify_one();
        }
        true
    }

    /// The queued cursor updates, in key order: every transaction locks the rows it upserts in
    /// the same order, so that two writers (of two nodes) cannot deadlock on them. They stay
    /// visible to [`unwritten_cursor`](Self::unwritten_cursor) until [`flushed`](Self::flushed).
    pub(super) fn take_cursors(&self) -> Vec<CursorRow> {
        let now = crate::base::unix_millis() as i64;
        let mut cursors = self.lock_cursors();
        let queued = std::mem::take(&mut cursors.queued);
        for (key, &seq) in &queued {
            let entry = cursors.flushing.entry(key.clone()).or_insert(0);
            *entry = (*entry).max(seq);
        }
        drop(cursors);
        let mut rows: Vec<CursorRow> = queued
            .into_iter()
            .map(|((user, device), seq)| CursorRow {
                user,
                device,
                seq: i64::try_from(seq).unwrap_or(i64::MAX),
                at_ms: now,
            })
            .collect();
        rows.sort_unstable_by(|a, b| (&a.user, &a.device).cmp(&(&b.user, &b.device)));
        rows
    }

    /// The cursors taken by the writer are committed, or put back in the queue.
    pub(super) fn flushed(&self) {
        self.lock_cursors().flushing.clear();
    }

    /// Puts back cursor updates of a batch that could not be written.
    pub(super) fn restore_cursors(&self, rows: &[CursorRow]) {
        let mut cursors = self.lock_cursors();
        for r in rows {
            let entry = cursors
                .queued
                .entry((r.user.clone(), r.device.clone()))
                .or_insert(0);
            *entry = (*entry).max(r.seq as u64);
        }
    }

    pub(super) fn has_cursors(&self) -> bool {
        !self.lock_cursors().queued.is_empty()
    }
}

/// Marks the writer stopped even if it panics, so that `close` never waits forever.
pub(super) struct StoppedGuard(pub(super) Arc<Shared>);

impl Drop for StoppedGuard {
    fn drop(&mut self) {
        self.0.stopped.send_if_modified(|stopped| {
            let first = stopped.is_none();
            if first {
                *stopped = Some(0);
            }
            first
        });
    }
}
