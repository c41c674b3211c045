-- Users the cluster knows. Keep in step with ../mysql/0006_known_users.sql.
CREATE TABLE known_users (
    user_id          TEXT    NOT NULL PRIMARY KEY,
    registered_at_ms INTEGER NOT NULL
);
