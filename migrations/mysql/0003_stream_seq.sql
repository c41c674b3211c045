-- Per-user streams: every message to a user takes the next position (seq) in that user's
-- stream, 1, 2, 3, ... A device's progress is a cursor in it (device_cursors, 0004), and
-- catch-up reads "the user's messages after position n, in order" through ix_messages_stream.
-- Rows written before this migration keep seq 0 and are never replayed.
ALTER TABLE messages
    ADD COLUMN seq BIGINT NOT NULL DEFAULT 0,
    ADD KEY ix_messages_stream (recipient, seq);
