-- imgate message store (MySQL 8 / MariaDB 10.11). Keep in step with ../sqlite/0001_messages.sql:
-- the two files describe the same table, and gateway/src/store relies on both behaving the same.
--
-- One row per (message, recipient): a message sent to N users is N rows with N server ids.
--
-- Ids (sender, recipient, channel, client_msg_id) are VARBINARY, so they compare byte for byte.
-- Every utf8mb4 collation, utf8mb4_bin included, is PAD SPACE on MariaDB and MySQL: it treats
-- 'bob' and 'bob ' as equal, which would merge two users' histories and idempotency keys.
-- 128 bytes is the protocol's MAX_ID_LEN.
CREATE TABLE messages (
    -- Server message id (ids.rs): time-ordered, cluster-unique. The store binds it as a signed
    -- 64-bit integer; ids stay below 2^63 for centuries.
    id            BIGINT UNSIGNED NOT NULL,
    -- The sending user, '' for system messages.
    sender        VARBINARY(128)  NOT NULL,
    recipient     VARBINARY(128)  NOT NULL,
    -- Channel type the message was addressed to, NULL for every channel.
    channel       VARBINARY(128)  NULL,
    -- The message body: JSON text, stored byte for byte.
    body          MEDIUMTEXT      CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL,
    -- The sender's own id for the message; NULL means no idempotency.
    client_msg_id VARBINARY(128)  NULL,
    -- Acceptance time, milliseconds since the Unix epoch.
    created_at_ms BIGINT          NOT NULL,
    -- 0 pending (nobody online when sent), 1 delivered (pushed to a live connection),
    -- 2 acknowledged. It only ever rises. SMALLINT because sqlx's Any driver cannot read TINYINT.
    state         SMALLINT        NOT NULL,
    PRIMARY KEY (id),
    -- Idempotency: a retried send is one row. NULL client_msg_id never conflicts.
    UNIQUE KEY uq_messages_client_msg_id (sender, recipient, client_msg_id),
    -- Pending messages of a user, oldest first.
    KEY ix_messages_pending (recipient, state, id),
    -- A conversation, newest first, in both directions (sender = a AND recipient = b, and the
    -- swapped pair): one index serves both.
    KEY ix_messages_conversation (sender, recipient, id),
    -- Everything a user received, newest first (history without a peer).
    KEY ix_messages_received (recipient, id),
    -- Everything a user sent, newest first (history without a peer).
    KEY ix_messages_sent (sender, id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
