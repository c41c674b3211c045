//! What the store reads: one message, a user's history and stream pages, the head of a stream,
//! where a device starts, a retried message's original, whether a user is known.

use super::*;

impl Store {
    /// The row of message `id`, with its state as of now (acknowledged once a device cursor of
    /// the recipient reached its position).
    pub async fn message(&self, id: MessageId) -> Result<Option<StoredMessage>, StoreError> {
        let Some(id) = sql::id_to_db(id) else {
            return Ok(None);
        };
        let row = sqlx::query(&self.inner.queries.message_by_id)
            .bind(id)
            .fetch_optional(&self.inner.reads)
            .await?;
        let Some(message) = row.as_ref().map(sql::stored_message).transpose()? else {
            return Ok(None);
        };
        Ok(self.with_acknowledged(vec![message]).await?.pop())
    }

    /// Raises to `Acknowledged` the state of every message that a device of its recipient has
    /// acknowledged (the device's cursor is at or past the message's position).
    async fn with_acknowledged(
        &self,
        mut messages: Vec<StoredMessage>,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let mut recipients: Vec<&str> = messages
            .iter()
            .filter(|m| m.state < DeliveryState::Acknowledged)
            .map(|m| m.recipient.as_str())
            .collect();
        recipients.sort_unstable();
        recipients.dedup();
        if recipients.is_empty() {
            return Ok(messages);
        }
        let statement = sql::acknowledged_heads(recipients.len());
        let mut query = sqlx::query(&statement);
        for recipient in &recipients {
            query = query.bind(*recipient);
        }
        let mut heads = HashMap::new();
        for row in query.fetch_all(&self.inner.reads).await? {
            let user = sql::text(&row, 0)?.unwrap_or_default();
            let head: Option<i64> = row.try_get(1)?;
            heads.insert(user, head.map_or(0, |h| u64::try_from(h).unwrap_or(0)));
        }
        for m in &mut messages {
            if heads.get(&m.recipient).is_some_and(|&head| m.seq <= head) {
                m.state = DeliveryState::Acknowledged;
            }
        }
        Ok(messages)
    }

    /// The messages `user` sent or received (only those with `peer`, when given), newest first,
    /// older than `before` when given, at most `limit` (capped at [`MAX_PAGE`]). The next page
    /// is `before = last id of this page`.
    pub async fn history(
        &self,
        user: &str,
        peer: Option<&str>,
        before: Option<MessageId>,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let limit = i64::from(limit.min(MAX_PAGE));
        if limit == 0 {
            return Ok(Vec::new());
        }
        let before = before.map_or(i64::MAX, |id| sql::id_to_db(id).unwrap_or(i64::MAX));
        let queries = &self.inner.queries;
        let query = match peer {
            None => {
                let mut query = sqlx::query(&queries.history_all);
                for _ in 0..3 {
                    query = query.bind(user).bind(user).bind(before).bind(limit);
                }
                query.bind(user).bind(before).bind(limit).bind(limit)
            }
            Some(peer) if peer == user => sqlx::query(&queries.history_with_self)
                .bind(user)
                .bind(user)
                .bind(before)
                .bind(limit),
            Some(peer) => sqlx::query(&queries.history_with_peer)
                .bind(user)
                .bind(peer)
                .bind(before)
                .bind(limit)
                .bind(peer)
                .bind(user)
                .bind(before)
                .bind(limit)
                .bind(limit),
        };
        let rows = query.fetch_all(&self.inner.reads).await?;
        let messages = rows
            .iter()
            .map(sql::stored_message)
            .collect::<Result<_, _>>()?;
        self.with_acknowledged(messages).await
    }

    /// Runs a page query that binds (user, position, limit) and reads its rows.
    async fn page(
        &self,
        query: &str,
        user: &str,
        position: i64,
        limit: i64,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let rows = sqlx::query(query)
            .bind(user)
            .bind(position)
            .bind(limit)
            .fetch_all(&self.inner.reads)
            .await?;
        Ok(rows
            .iter()
            .map(sql::stored_message)
            .collect::<Result<_, _>>()?)
    }

    /// `user`'s stream from position `from` on (inclusive), in order, at most `limit` (capped
    /// at [`MAX_PAGE`]). Only committed rows: a position can be missing while its row is still
    /// on its way.
    pub async fn stream(
        &self,
        user: &str,
        from: u64,
        limit: u32,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let limit = i64::from(limit.min(MAX_PAGE));
        let Ok(from) = i64::try_from(from) else {
            return Ok(Vec::new());
        };
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.page(&self.inner.queries.stream, user, from, limit)
            .await
    }

    /// The highest committed position of `user`'s stream; 0 when the user has no message.
    pub async fn stream_head(&self, user: &str) -> Result<u64, StoreError> {
        let row = sqlx::query(&self.inner.queries.stream_head)
            .bind(user)
            .fetch_one(&self.inner.reads)
            .await?;
        let head: Option<i64> = row.try_get(0)?;
        Ok(head.map_or(0, |h| u64::try_from(h).unwrap_or(0)))
    }

    /// Where a device starts: the position `device` of `user` has acknowledged (0 when it
    /// never acknowledged any; acknowledgements made on this node count before they are
    /// written) and the highest committed position of the user's stream (0 when
    /// none). Lookups of concurrent logins share statements.
    pub async fn device_start(
        &self,
        user: &Arc<str>,
        device: &Arc<str>,
    ) -> Result<(u64, u64), StoreError> {
        // Read before the database: an acknowledgement this node has not written yet counts.
        let unwritten = self
            .inner
            .shared
            .unwritten_cursor(&(user.clone(), device.clone()));
        let (cursor, head) = self.inner.starts.get(user, device).await?;
        Ok((cursor.max(unwritten.unwrap_or(0)), head))
    }

    /// The committed message with this idempotency key, with its state as of now (see
    /// [`message`](Self::message)). `sender` is `""` for system messages.
    pub async fn message_by_client_id(
        &self,
        sender: &str,
        recipient: &str,
        client_msg_id: &str,
    ) -> Result<Option<StoredMessage>, StoreError> {
        let row = sqlx::query(&self.inner.queries.message_by_client_id)
            .bind(sender)
            .bind(recipient)
            .bind(client_msg_id)
            .fetch_optional(&self.inner.reads)
            .await?;
        let Some(message) = row.as_ref().map(sql::stored_message).transpose()? else {
            return Ok(None);
        };
        Ok(self.with_acknowledged(vec![message]).await?.pop())
    }

    /// Whether `user` is known (see [`register_users`](Self::register_users)).
    pub async fn is_known_user(&self, user: &str) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT 1 FROM known_users WHERE user_id = ?")
            .bind(user)
            .fetch_optional(&self.inner.reads)
            .await?;
        Ok(row.is_some())
    }
}
