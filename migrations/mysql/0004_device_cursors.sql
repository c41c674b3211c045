-- The position each device (user + device id) has acknowledged in its user's stream. Raised
-- (never lowered) by batched upserts as acknowledgements arrive; read at login and resume.
CREATE TABLE device_cursors (
    user_id       VARBINARY(128) NOT NULL,
    device_id     VARBINARY(128) NOT NULL,
    acked_seq     BIGINT         NOT NULL,
    updated_at_ms BIGINT         NOT NULL,
    PRIMARY KEY (user_id, device_id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
