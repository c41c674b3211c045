-- The position each device has acknowledged in its user's stream. Keep in step with
-- ../mysql/0004_device_cursors.sql.
CREATE TABLE device_cursors (
    user_id       TEXT    NOT NULL,
    device_id     TEXT    NOT NULL,
    acked_seq     INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (user_id, device_id)
);
