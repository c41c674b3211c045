-- The stream epoch: one row. Positions handed out in epoch E start above E * 2^32, so that
-- positions taken before a loss of Redis's data and positions taken after it never collide.
-- `used` is set before the first stream counter of the epoch is created: only a used epoch is
-- raised when Redis is found without one (nodes starting a new cluster together all find none).
CREATE TABLE stream_epoch (
    id    INTEGER NOT NULL PRIMARY KEY,
    epoch BIGINT  NOT NULL,
    used  INTEGER NOT NULL
);
