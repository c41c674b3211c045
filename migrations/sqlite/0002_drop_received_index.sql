-- Drops ix_messages_received (recipient, id): what a user received, newest first, is now read
-- from ix_messages_pending (recipient, state, id), one index-ordered scan per state. One index
-- less to maintain on every insert. Keep in step with ../mysql/0002_drop_received_index.sql.
DROP INDEX ix_messages_received;
