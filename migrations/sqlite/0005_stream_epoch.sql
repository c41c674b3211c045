-- The stream epoch: one row, raised each time a cluster finds that Redis lost its stream
-- counters. Positions handed out in epoch E start above E * 2^32, so that positions taken
-- before a loss of Redis's data and positions taken after it never collide.
CREATE TABLE stream_epoch (
    id    INTEGER NOT NULL PRIMARY KEY,
    epoch BIGINT  NOT NULL
);
