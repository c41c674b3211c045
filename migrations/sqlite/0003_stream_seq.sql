-- Per-user streams: every message to a user takes the next position (seq) in that user's
-- stream. Keep in step with ../mysql/0003_stream_seq.sql. Rows written before this migration
-- keep seq 0 and are never replayed.
ALTER TABLE messages ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
CREATE INDEX ix_messages_stream ON messages (recipient, seq);
