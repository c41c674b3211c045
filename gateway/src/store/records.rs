//! The store's rare writes outside the writer: the stream epoch and the known users.

use super::*;

impl Store {
    /// Records as known every user that has a device cursor; users already known are left as
    /// they are.
    pub async fn backfill_known_users(&self, now_ms: u64) -> Result<(), StoreError> {
        let sql = format!(
            "{} known_users (user_id, registered_at_ms) SELECT DISTINCT user_id, ? FROM device_cursors",
            self.inner.dialect.insert_ignore()
        );
        sqlx::query(&sql)
            .bind(now_ms as i64)
            .execute(&self.inner.rare_writes)
            .await?;
        Ok(())
    }

    /// The stream epoch for a Redis that has none: the current one if no stream counter was
    /// created in it yet (0 for a new cluster), else the next one (marked unused). Concurrent
    /// callers raise it once. See `cluster::epochs`.
    pub async fn stream_epoch_for_redis(&self) -> Result<u64, StoreError> {
        let pool = &self.inner.rare_writes;
        let insert = match self.inner.dialect {
            Dialect::MySql => "INSERT IGNORE INTO stream_epoch (id, epoch, used) VALUES (1, 0, 0)",
            Dialect::Sqlite => {
                "INSERT OR IGNORE INTO stream_epoch (id, epoch, used) VALUES (1, 0, 0)"
            }
        };
        sqlx::query(insert).execute(pool).await?;
        let read = || async {
            let row = sqlx::query("SELECT epoch, used FROM stream_epoch WHERE id = 1")
                .fetch_one(pool)
                .await?;
            let (epoch, used): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
            let epoch = u64::try_from(epoch)
                .map_err(|_| StoreError::Config(format!("bad stream epoch {epoch}")))?;
            Ok::<_, StoreError>((epoch, used != 0))
        };
        let (epoch, used) = read().await?;
        if !used {
            return Ok(epoch);
        }
        // Raised once however many nodes ask: only from the epoch that was read.
        sqlx::query(
            "UPDATE stream_epoch SET epoch = epoch + 1, used = 0 WHERE id = 1 AND epoch = ?",
        )
        .bind(epoch as i64)
        .execute(pool)
        .await?;
        Ok(read().await?.0)
    }

    /// Records that stream counters are created in `epoch`: from now on, a Redis found without
    /// an epoch gets the next one.
    pub async fn mark_stream_epoch_used(&self, epoch: u64) -> Result<(), StoreError> {
        sqlx::query("UPDATE stream_epoch SET used = 1 WHERE id = 1 AND epoch = ?")
            .bind(epoch as i64)
            .execute(&self.inner.rare_writes)
            .await?;
        Ok(())
    }

    /// Records `users` as known (they logged in, or an operator registered them); users already
    /// known are left as they are.
    pub async fn register_users(&self, users: &[&str], now_ms: u64) -> Result<(), StoreError> {
        if users.is_empty() {
            return Ok(());
        }
        let mut sql = format!(
            "{} known_users (user_id, registered_at_ms) VALUES ",
            self.inner.dialect.insert_ignore()
        );
        for i in 0..users.len() {
            sql.push_str(if i == 0 { "(?, ?)" } else { ", (?, ?)" });
        }
        let mut query = sqlx::query(&sql);
        for user in users {
            query = query.bind(*user).bind(now_ms as i64);
        }
        query.execute(&self.inner.rare_writes).await?;
        Ok(())
    }
}
