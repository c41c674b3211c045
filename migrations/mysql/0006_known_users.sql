-- Users the cluster knows: every user that has logged in once, and every user an operator
-- registered through the admin API. With `delivery.recipients = "known"`, messages to anyone else
-- are refused (UNKNOWN_RECIPIENT), so that made-up user ids leave no state behind.
CREATE TABLE known_users (
    user_id          VARBINARY(128) NOT NULL PRIMARY KEY,
    registered_at_ms BIGINT NOT NULL
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;
