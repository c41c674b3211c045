-- imgate message store (SQLite, the embedded default). Keep in step with
-- ../mysql/0001_messages.sql: the two files describe the same table.
--
-- One row per (message, recipient): a message sent to N users is N rows with N server ids.
-- TEXT compares with the BINARY collation (byte for byte), like VARBINARY on MySQL.
CREATE TABLE messages (
    -- Server message id, stored as a signed 64-bit integer (ids stay below 2^63 for centuries).
    -- INTEGER PRIMARY KEY makes it the rowid: no separate primary-key index.
    id            INTEGER PRIMARY KEY,
    -- The sending user, '' for system messages.
    sender        TEXT    NOT NULL,
    recipient     TEXT    NOT NULL,
    -- Channel type the message was addressed to, NULL for every channel.
    channel       TEXT,
    -- The message body: JSON text, stored byte for byte.
    body          TEXT    NOT NULL,
    -- The sender's own id for the message; NULL means no idempotency.
    client_msg_id TEXT,
    -- Acceptance time, milliseconds since the Unix epoch.
    created_at_ms INTEGER NOT NULL,
    -- 0 pending, 1 delivered, 2 acknowledged. It only ever rises.
    state         INTEGER NOT NULL
);

-- Idempotency: a retried send is one row. NULL client_msg_id never conflicts.
CREATE UNIQUE INDEX uq_messages_client_msg_id ON messages (sender, recipient, client_msg_id);
-- Pending messages of a user, oldest first.
CREATE INDEX ix_messages_pending ON messages (recipient, state, id);
-- A conversation, newest first, in both directions.
CREATE INDEX ix_messages_conversation ON messages (sender, recipient, id);
-- Everything a user received, newest first.
CREATE INDEX ix_messages_received ON messages (recipient, id);
-- Everything a user sent, newest first.
CREATE INDEX ix_messages_sent ON messages (sender, id);
