//! The Lua scripts of the cluster. Each runs atomically in Redis, so a read-decide-write on the
//! presence table or the node registry cannot interleave with another node's.
//!
//! Scripts that read presence share [`LIVENESS`]: an entry is live only while the registry key of
//! its node exists *and* names the entry's node instance (a restarted node has a new instance, so
//! its predecessor's entries are dead at once). Dead entries are deleted as they are met. These
//! scripts read node keys they are not given in `KEYS`: fine on one Redis server (what a pub/sub
//! bus needs anyway), not portable to Redis Cluster.

use std::sync::OnceLock;

use bytes::Bytes;
use fred::prelude::{Client, LuaInterface, Value};
use fred::types::Key;

/// Shared by the presence scripts. `ARGV[1]` must be the node key prefix (`{p}:node:`).
const LIVENESS: &str = r#"
local node_prefix = ARGV[1]
local live_cache = {}
local function is_live(node_id, instance)
  local cached = live_cache[node_id]
  if cached == nil then
    cached = false
    local rec = redis.call('GET', node_prefix .. node_id)
    if rec then
      local ok, r = pcall(cjson.decode, rec)
      if ok and type(r) == 'table' and type(r.instance) == 'string' then cached = r.instance end
    end
    live_cache[node_id] = cached
  end
  return cached == instance
end
-- The live connection entries of a presence hash, as {field, value, entry}; deletes dead ones.
-- Fields starting with '#' are counters, not connections.
local function live_entries(key)
  local flat = redis.call('HGETALL', key)
  local out, dead = {}, {}
  for i = 1, #flat, 2 do
    local field, value = flat[i], flat[i + 1]
    if string.sub(field, 1, 1) ~= '#' then
      local ok, e = pcall(cjson.decode, value)
      if ok and type(e) == 'table' and type(e.node_id) == 'string'
          and is_live(e.node_id, e.node_instance) then
        out[#out + 1] = {field = field, value = value, entry = e}
      else
        dead[#dead + 1] = field
      end
    end
  end
  if #dead > 0 then redis.call('HDEL', key, unpack(dead)) end
  return out
end
"#;

/// Registers one connection, applying the duplicate-login policy atomically.
///
/// `KEYS[1]` the user's presence hash. `ARGV`: node key prefix, field (`{instance}:{conn_id}`),
/// entry JSON object without `generation`, channel type, policy (`kick_old` | `reject_new` |
/// `allow_multiple`), hash TTL in ms, this node's instance, the most connections of one user
/// (`0`: no limit).
///
/// Bumps the generation counter `#gen:{channel}`, stores the entry with it, and returns
/// `{generation, displaced entry JSON...}`: under `kick_old` the live entries of the same channel
/// type held by OTHER node instances are removed and returned, for the caller to kick. Under
/// `reject_new` returns `{-1}` and writes nothing when another instance holds a live entry of the
/// channel type. Entries of the registering instance are left alone: between connections of one
/// node its local registry decides (it already did, in the order the logins happened there).
/// Returns `{-2}` and writes nothing when the user's live connections that stay (under `kick_old`
/// those of other channel types: this instance's of the same type were displaced locally) number
/// the limit already; counted in the same step that registers, so racing logins on several
/// nodes cannot exceed it.
const REGISTER: &str = r#"
local key, field, json, channel, policy, ttl, instance =
  KEYS[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local max = tonumber(ARGV[8]) or 0
local same, staying = {}, 0
for _, x in ipairs(live_entries(key)) do
  if x.entry.channel == channel then
    if x.entry.node_instance ~= instance then same[#same + 1] = x end
    if policy ~= 'kick_old' then staying = staying + 1 end
  else
    staying = staying + 1
  end
end
if policy == 'reject_new' and #same > 0 then return {-1} end
if max > 0 and staying >= max then return {-2} end
local result = {0}
if policy == 'kick_old' then
  for _, x in ipairs(same) do
    redis.call('HDEL', key, x.field)
    result[#result + 1] = x.value
  end
end
local gen = redis.call('HINCRBY', key, '#gen:' .. channel, 1)
result[1] = gen
redis.call('HSET', key, field, '{"generation":' .. gen .. ',' .. string.sub(json, 2))
redis.call('PEXPIRE', key, ttl)
return result
"#;

/// Re-registers a batch of this node's connections (after Redis came back, after this node's
/// registry entry was found missing, and periodically).
///
/// `KEYS[i]` the presence hash of connection i. `ARGV`: node key prefix, hash TTL in ms, this
/// node's instance, then per connection: field, entry JSON without `generation`, channel type,
/// policy.
///
/// An entry still present is only kept alive (TTL). A missing one is written unless, under
/// `kick_old` or `reject_new`, another node instance holds a live connection of the same user and
/// channel type: the existing one wins (it registered while this one's entry was gone, so it is
/// the newer login, or its kick of this one was lost). Returns one status per connection:
/// 0 written or kept, 1 displaced (not written; the caller kicks its connection).
const RESTORE: &str = r#"
local ttl, instance = ARGV[2], ARGV[3]
local out = {}
for i, key in ipairs(KEYS) do
  local base = 3 + (i - 1) * 4
  local field, json, channel, policy = ARGV[base + 1], ARGV[base + 2], ARGV[base + 3], ARGV[base + 4]
  local status = 0
  if redis.call('HEXISTS', key, field) == 0 then
    if policy ~= 'allow_multiple' then
      for _, x in ipairs(live_entries(key)) do
        if x.entry.node_instance ~= instance and x.entry.channel == channel then
          status = 1
          break
        end
      end
    end
    if status == 0 then
      local gen = redis.call('HINCRBY', key, '#gen:' .. channel, 1)
      redis.call('HSET', key, field, '{"generation":' .. gen .. ',' .. string.sub(json, 2))
    end
  end
  if status == 0 then redis.call('PEXPIRE', key, ttl) end
  out[i] = status
end
return out
"#;

/// Reads a user's live presence. `KEYS[1]` the presence hash. `ARGV`: node key prefix, channel
/// type filter (`''` for any), `entries` (returns the entries' JSON) or `nodes` (returns the
/// distinct node ids).
const READ: &str = r#"
local channel, mode = ARGV[2], ARGV[3]
local out, seen = {}, {}
for _, x in ipairs(live_entries(KEYS[1])) do
  if channel == '' or x.entry.channel == channel then
    if mode == 'nodes' then
      if not seen[x.entry.node_id] then
        seen[x.entry.node_id] = true
        out[#out + 1] = x.entry.node_id
      end
    else
      out[#out + 1] = x.value
    end
  end
end
return out
"#;

/// Claims or refreshes this node's registry entry, never taking another instance's.
///
/// `KEYS`: node key, nodes sorted set, optionally the message-id tag key. `ARGV`: record JSON,
/// instance, TTL ms, node id, sorted-set score (start time), sorted-set TTL ms.
///
/// Returns `{node, tag}`. node: 0 the id is held by another live instance (nothing written),
/// 1 refreshed, 2 created (it was absent: first claim, Redis lost its data, or this node stalled
/// past its TTL). tag: -1 no tag key given, 0 held by another instance (not touched), 1 refreshed,
/// 2 created.
const NODE_REFRESH: &str = r#"
local cur = redis.call('GET', KEYS[1])
local node = 2
if cur then
  local ok, r = pcall(cjson.decode, cur)
  if not (ok and type(r) == 'table' and r.instance == ARGV[2]) then return {0, -1} end
  node = 1
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
local tag = -1
if KEYS[3] then
  local t = redis.call('GET', KEYS[3])
  if not t then
    redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
    tag = 2
  elseif t == ARGV[2] then
    redis.call('PEXPIRE', KEYS[3], ARGV[3])
    tag = 1
  else
    tag = 0
  end
end
return {node, tag}
"#;

/// Lists live nodes. `KEYS[1]` the nodes sorted set; `ARGV[1]` the node key prefix. Returns the
/// records' JSON in start order; members whose key expired are removed.
const NODES: &str = r#"
local out, gone = {}, {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local rec = redis.call('GET', ARGV[1] .. id)
  if rec then out[#out + 1] = rec else gone[#gone + 1] = id end
end
if #gone > 0 then redis.call('ZREM', KEYS[1], unpack(gone)) end
return out
"#;

/// Removes this node from the registry. `KEYS`: node key, nodes sorted set, tag key. `ARGV`:
/// instance, node id. Only this instance's entries are removed; returns 1 if the node key was.
const NODE_LEAVE: &str = r#"
local removed = 0
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, r = pcall(cjson.decode, cur)
  if ok and type(r) == 'table' and r.instance == ARGV[1] then
    redis.call('DEL', KEYS[1])
    redis.call('ZREM', KEYS[2], ARGV[2])
    removed = 1
  end
end
if redis.call('GET', KEYS[3]) == ARGV[1] then redis.call('DEL', KEYS[3]) end
return removed
"#;

/// A Lua script run by its SHA-1, loaded again if Redis forgot it (a restart empties the cache).
pub(crate) struct Script {
    source: String,
    sha: OnceLock<String>,
}

impl Script {
    fn new(source: String) -> Self {
        Script {
            source,
            sha: OnceLock::new(),
        }
    }

    async fn load(&self, client: &Client) -> Result<String, fred::error::Error> {
        let sha: String = client.script_load(self.source.as_str()).await?;
        let _ = self.sha.set(sha.clone());
        Ok(sha)
    }

    pub(crate) async fn run(
        &self,
        client: &Client,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Value, fred::error::Error> {
        let sha = match self.sha.get() {
            Some(sha) => sha.clone(),
            None => self.load(client).await?,
        };
        // As shared bytes, so that keeping them for a retry copies nothing.
        let keys: Vec<Key> = keys.into_iter().map(|k| Bytes::from(k).into()).collect();
        let args: Vec<Value> = args.into_iter().map(|a| Bytes::from(a).into()).collect();
        match client
            .evalsha::<Value, _, _, _>(sha, keys.clone(), args.clone())
            .await
        {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                let sha = self.load(client).await?;
                client.evalsha(sha, keys, args).await
            }
            other => other,
        }
    }
}

// Stream positions (`streams.rs`).

/// Advances a stream counter. `KEYS[1]` the counter, `KEYS[2]` the stream epoch. `ARGV`: TTL in
/// ms, the floor (highest stored position) or `''` when the caller has not read it, the epoch
/// the caller knows. Returns -2 when that is not the current epoch (the caller learns it and
/// calls again; see `epochs.rs`), -1 when the counter does not exist and no floor was given
/// (the caller reads the floor and calls again), else the new position. A counter is created
/// at the floor or at the epoch's first position, whichever is higher. Two nodes racing to
/// create a counter both end up incrementing the same one.
pub(crate) const SEQ_NEXT: &str = r#"
if redis.call('GET', KEYS[2]) ~= ARGV[3] then return -2 end
if redis.call('EXISTS', KEYS[1]) == 0 then
  if ARGV[2] == '' then return -1 end
  local start = math.max(tonumber(ARGV[2]), tonumber(ARGV[3]) * 4294967296)
  redis.call('SET', KEYS[1], string.format('%.0f', start))
end
local v = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return v
"#;

/// Advances the counters of a batch of messages and, under routed routing, reads where each
/// recipient is connected, in one call. `KEYS`: per message, the recipient's counter and presence
/// hash. `ARGV`: node key prefix, counter TTL in ms, `nodes` (read presence) or `''`, the stream
/// epoch's key, the epoch the caller knows, then per message its channel type filter (`''` for
/// any). Returns per message `{position, node id...}` with the distinct live nodes holding the
/// recipient (of the channel type), `{-1}` when the counter does not exist (the caller starts it
/// from the database with [`SEQ_NEXT`]), or `{-2}` for every message when the epoch is not the
/// current one (see `epochs.rs`).
pub(crate) const POSITIONS: &str = r#"
local ttl, want = ARGV[2], ARGV[3]
local out = {}
if redis.call('GET', ARGV[4]) ~= ARGV[5] then
  for i = 1, #KEYS / 2 do out[i] = {-2} end
  return out
end
for i = 1, #KEYS / 2 do
  local counter, presence = KEYS[2 * i - 1], KEYS[2 * i]
  local item = {-1}
  if redis.call('EXISTS', counter) == 1 then
    item[1] = redis.call('INCR', counter)
    redis.call('PEXPIRE', counter, ttl)
    if want == 'nodes' then
      local channel, seen = ARGV[5 + i], {}
      for _, x in ipairs(live_entries(presence)) do
        local node = x.entry.node_id
        if (channel == '' or x.entry.channel == channel) and not seen[node] then
          seen[node] = true
          item[#item + 1] = node
        end
      end
    end
  end
  out[i] = item
end
return out
"#;

/// Every script, loaded once per cluster.
pub(crate) struct Scripts {
    pub(crate) register: Script,
    pub(crate) restore: Script,
    pub(crate) read: Script,
    pub(crate) node_refresh: Script,
    pub(crate) nodes: Script,
    pub(crate) node_leave: Script,
    pub(crate) seq_next: Script,
    pub(crate) positions: Script,
    pub(crate) session_resume: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        let with_liveness = |s: &str| format!("{LIVENESS}{s}");
        Scripts {
            register: Script::new(with_liveness(REGISTER)),
            restore: Script::new(with_liveness(RESTORE)),
            read: Script::new(with_liveness(READ)),
            node_refresh: Script::new(NODE_REFRESH.to_owned()),
            nodes: Script::new(NODES.to_owned()),
            node_leave: Script::new(NODE_LEAVE.to_owned()),
            seq_next: Script::new(SEQ_NEXT.to_owned()),
            positions: Script::new(with_liveness(POSITIONS)),
            session_resume: Script::new(super::sessions::SESSION_RESUME.to_owned()),
        }
    }

    /// Loads every script, so that a syntax error shows at start-up.
    pub(crate) async fn load_all(&self, client: &Client) -> Result<(), fred::error::Error> {
        for s in [
            &self.register,
            &self.restore,
            &self.read,
            &self.node_refresh,
            &self.nodes,
            &self.node_leave,
            &self.seq_next,
            &self.positions,
            &self.session_resume,
        ] {
            s.load(client).await?;
        }
        Ok(())
    }
}
