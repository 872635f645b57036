//! The Lua scripts that make each ledger operation one atomic step on one
//! hash slot. Every decision mirrors `transaction::machine` line by line (the
//! function each block follows is named above it); the contract suite and
//! `tests/api/redis_ledger.rs` check the two agree.
//!
//! Calling convention (see `Keys::shard_keys` / `Keys::transition_keys`):
//! KEYS[1] counts hash, KEYS[2] all-states index, KEYS[3..7] the state
//! indexes in `State::ALL` order, KEYS[8] the transaction's hash.
//! Times arrive as integer-microsecond strings and are written back as the
//! same strings: Lua would print a large double in exponent form.
//! Replies are `{code, HGETALL}` (the flat record, empty when there is none).

use redis::Script;
use std::sync::LazyLock;

const PRELUDE: &str = r#"
local STATES = {'pending', 'processing', 'success', 'failed', 'dead_letter'}
local COUNTS, ALL, TX = KEYS[1], KEYS[2], KEYS[8]

local function idx(state)
  for i, s in ipairs(STATES) do
    if s == state then return KEYS[2 + i] end
  end
  error('unknown state ' .. tostring(state))
end

local function terminal(state)
  return state == 'success' or state == 'dead_letter'
end

-- machine::holds, over HMGET status, attempts, lease_owner (first three).
local function holds(h, owner, attempt)
  return h[1] == 'processing' and tonumber(h[2]) == attempt and h[3] == owner
end

-- Moves id from state `before` (false: not indexed) to `after`, scored by
-- `score`, and moves the count in the same step.
local function reindex(id, before, after, score)
  if before ~= after then
    if before then
      redis.call('ZREM', idx(before), id)
      redis.call('HINCRBY', COUNTS, before, -1)
    end
    redis.call('HINCRBY', COUNTS, after, 1)
  end
  redis.call('ZADD', idx(after), score, id)
  redis.call('ZADD', ALL, score, id)
end

-- The record key is gone (retention expired it) but its index entries may
-- not have been trimmed yet: forget them before the id is used again.
local function forget_stale(id)
  for _, s in ipairs(STATES) do
    if redis.call('ZSCORE', idx(s), id) then
      redis.call('ZREM', idx(s), id)
      redis.call('HINCRBY', COUNTS, s, -1)
    end
  end
  redis.call('ZREM', ALL, id)
end

-- A time the caller computed on its own clock (`caller_now_us` there), moved
-- to the server's: as far from the server's now as it was from the caller's.
-- Claims compare due times with the server's clock (CLAIM); written as the
-- caller's, a retry or a restore's wait set by a process whose clock runs
-- behind came due early, and a retry after a call that timed out reached
-- the downstream while it still worked on that call.
local function on_server_clock(at_us, caller_now_us)
  local t = redis.call('TIME')
  local srv = tonumber(t[1]) * 1000000 + tonumber(t[2])
  return string.format('%.0f', tonumber(at_us) - tonumber(caller_now_us) + srv)
end

-- The record's next_retry_at, if still ahead of the caller's now, moved to
-- the server's clock (see on_server_clock).
local function retry_on_server_clock(caller_now_us)
  local at = redis.call('HGET', TX, 'next_retry_at')
  if at and tonumber(at) > tonumber(caller_now_us) then
    redis.call('HSET', TX, 'next_retry_at', on_server_clock(at, caller_now_us))
  end
end

-- Terminal records expire at `expire_at_ms` (empty: retention off);
-- anything else lives until it is terminal.
local function set_expiry(state, expire_at_ms)
  if terminal(state) and expire_at_ms ~= '' then
    redis.call('PEXPIREAT', TX, expire_at_ms)
  else
    redis.call('PERSIST', TX)
  end
end

-- Drops up to `n` terminal index entries older than `cutoff_us`: their
-- records expired (the TTL is updated_at + retention), so counts follow.
local function trim(cutoff_us, n)
  if cutoff_us == '' then return end
  for _, s in ipairs({'success', 'dead_letter'}) do
    local old = redis.call('ZRANGEBYSCORE', idx(s), '-inf', '(' .. cutoff_us,
                           'WITHSCORES', 'LIMIT', 0, n)
    for i = 1, #old, 2 do
      local id, score = old[i], old[i + 1]
      redis.call('ZREM', idx(s), id)
      redis.call('HINCRBY', COUNTS, s, -1)
      if redis.call('ZSCORE', ALL, id) == score then
        redis.call('ZREM', ALL, id)
      end
    end
  end
end
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}\n{body}"))
}

/// KEYS[9]: the shard's intact mark, KEYS[10]: the WAL records refused
/// while it was missing.
/// ARGV: id, updated_at_us, the WAL record, then the new record's
/// field/value pairs.
/// Codes: `lost` (no intact mark: the shard lost its data and is not rebuilt
/// yet; the WAL record is remembered as refused, in the same step), `new`,
/// `exists` (with the stored record; the caller compares sha256).
pub static REGISTER: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local id, now = ARGV[1], ARGV[2]
if redis.call('EXISTS', KEYS[9]) == 0 then
  redis.call('SADD', KEYS[10], ARGV[3])
  return {'lost', {}}
end
if redis.call('EXISTS', TX) == 1 then
  return {'exists', redis.call('HGETALL', TX)}
end
forget_stale(id)
redis.call('HSET', TX, unpack(ARGV, 4))
reindex(id, false, 'pending', now)
return {'new', {}}
"#,
    )
});

/// ARGV: id, owner, lease_us.
/// Codes: `not_found`, `terminal`, `busy`, `not_due`, `claimed`.
/// "Now" is the Redis server's clock (`TIME`), the one clock every processor
/// shares: a processor whose clock runs behind cannot take over a live lease,
/// nor one running ahead claim a retry early.
pub static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local id, owner, lease_us = ARGV[1], ARGV[2], tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_s = string.format('%.0f', now)
local until_s = string.format('%.0f', now + lease_us)
local h = redis.call('HMGET', TX, 'status', 'lease_until', 'next_retry_at', 'attempts')
local status = h[1]
if not status then return {'not_found', {}} end
-- machine::decide_claim
if terminal(status) then
  return {'terminal', redis.call('HGETALL', TX)}
end
if status == 'processing' and h[2] and tonumber(h[2]) > now then
  return {'busy', redis.call('HGETALL', TX)}
end
if (status == 'failed' or status == 'pending') and h[3] and tonumber(h[3]) > now then
  return {'not_due', redis.call('HGETALL', TX)}
end
-- machine::apply_claim
redis.call('HSET', TX, 'attempts', tostring(tonumber(h[4]) + 1), 'status', 'processing',
           'lease_owner', owner, 'lease_until', until_s, 'updated_at', now_s)
reindex(id, status, 'processing', now_s)
return {'claimed', redis.call('HGETALL', TX)}
"#,
    )
});

/// ARGV: id, owner, attempt, now_us, outcome (`success` | `failed` |
/// `dead_letter`), error, next_retry_at_us, expire_at_ms, cutoff_us, trim_n.
/// `next_retry_at_us` is on the caller's clock (`now_us`); it is stored on
/// the server's, the one [`CLAIM`] compares it with.
/// Codes: `not_found`, `fenced`, `settled`.
pub static SETTLE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local id, owner, attempt, now_s = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local outcome, err, retry_at = ARGV[5], ARGV[6], ARGV[7]
local h = redis.call('HMGET', TX, 'status', 'attempts', 'lease_owner')
local status = h[1]
if not status then return {'not_found', {}} end
if not holds(h, owner, attempt) then return {'fenced', {}} end
-- machine::apply_settlement
redis.call('HSET', TX, 'status', outcome, 'updated_at', now_s)
redis.call('HDEL', TX, 'lease_owner', 'lease_until')
if outcome == 'success' then
  redis.call('HDEL', TX, 'next_retry_at')
elseif outcome == 'failed' then
  redis.call('HSET', TX, 'error_message', err, 'next_retry_at', on_server_clock(retry_at, now_s))
  redis.call('HINCRBY', TX, 'retry_count', 1)
elseif outcome == 'dead_letter' then
  redis.call('HSET', TX, 'error_message', err)
  redis.call('HDEL', TX, 'next_retry_at')
else
  error('unknown outcome ' .. outcome)
end
reindex(id, status, outcome, now_s)
set_expiry(outcome, ARGV[8])
trim(ARGV[9], tonumber(ARGV[10]))
return {'settled', redis.call('HGETALL', TX)}
"#,
    )
});

/// ARGV: id, owner, attempt, lease_us.
/// Codes: `not_found`, `fenced`, `extended`.
/// "Now" is the Redis server's clock, as in [`CLAIM`]: the lease is
/// compared with that clock.
pub static EXTEND_LEASE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local owner, attempt, lease_us = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local h = redis.call('HMGET', TX, 'status', 'attempts', 'lease_owner', 'lease_until')
local status = h[1]
if not status then return {'not_found', {}} end
if not holds(h, owner, attempt) then return {'fenced', {}} end
-- machine::apply_extension
local t = redis.call('TIME')
local until_us = tonumber(t[1]) * 1000000 + tonumber(t[2]) + lease_us
if not h[4] or tonumber(h[4]) < until_us then
  redis.call('HSET', TX, 'lease_until', string.format('%.0f', until_us))
end
return {'extended', redis.call('HGETALL', TX)}
"#,
    )
});

/// ARGV: id, owner, attempt, now_us.
/// Codes: `not_found`, `fenced`, `released`.
pub static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local id, owner, attempt, now_s = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local h = redis.call('HMGET', TX, 'status', 'attempts', 'lease_owner', 'attempt_base')
local status = h[1]
if not status then return {'not_found', {}} end
if not holds(h, owner, attempt) then return {'fenced', {}} end
-- machine::apply_release
local base = math.min(tonumber(h[4] or '0') + 1, attempt)
redis.call('HSET', TX, 'status', 'pending', 'attempt_base', tostring(base), 'updated_at', now_s)
redis.call('HDEL', TX, 'lease_owner', 'lease_until', 'next_retry_at')
reindex(id, status, 'pending', now_s)
return {'released', redis.call('HGETALL', TX)}
"#,
    )
});

/// ARGV: id, nonce, force (`1`/`0`), now_us, quiet_us.
/// Codes: `not_found`, `refused`, `reset`.
pub static REPLAY: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local id, nonce, force, now_s, quiet_us = ARGV[1], ARGV[2], ARGV[3] == '1', ARGV[4], tonumber(ARGV[5])
local h = redis.call('HMGET', TX, 'status', 'lease_until', 'updated_at', 'next_retry_at')
local status = h[1]
if not status then return {'not_found', {}} end
-- leases and due times are on the server's clock (CLAIM): so is this now
local t = redis.call('TIME')
local srv = tonumber(t[1]) * 1000000 + tonumber(t[2])
-- machine::may_replay
local may
if status == 'success' then
  may = force
elseif status == 'processing' then
  may = (not h[2]) or tonumber(h[2]) <= srv
else
  may = true
end
if not may then return {'refused', redis.call('HGETALL', TX)} end
-- machine::apply_replay
-- a fresh retry budget: retries count from the attempts made so far, except
-- a lapsed claim's, whose outcome is unknown (it stays in the new budget)
local attempts = tonumber(redis.call('HGET', TX, 'attempts') or '0')
local base = attempts
if status == 'processing' and base > 0 then base = base - 1 end
redis.call('HSET', TX, 'status', 'pending', 'replay_nonce', nonce, 'updated_at', now_s,
           'attempt_base', tostring(base), 'retry_count', '0')
-- not due before the last attempt's call can have ended (see the machine)
local nb
local after = (tonumber(h[3]) or 0) + quiet_us
if status == 'failed' then
  nb = after
  if h[4] and tonumber(h[4]) < nb then nb = tonumber(h[4]) end
elseif status == 'dead_letter' then
  nb = after
elseif status == 'pending' and h[4] then
  nb = tonumber(h[4])
elseif status == 'processing' and h[2] then
  nb = tonumber(h[2]) + quiet_us
end
if nb and nb > srv then
  redis.call('HSET', TX, 'next_retry_at', string.format('%.0f', nb))
  redis.call('HDEL', TX, 'lease_owner', 'lease_until')
else
  redis.call('HDEL', TX, 'next_retry_at', 'lease_owner', 'lease_until')
end
redis.call('PERSIST', TX)
reindex(id, status, 'pending', now_s)
return {'reset', redis.call('HGETALL', TX)}
"#,
    )
});

/// ARGV: id, status, updated_at_us, expire_at_ms, the caller's now_us, then
/// field/value pairs. Replaces the record whatever was there; a
/// `next_retry_at` ahead of the caller's now is moved to the server's clock.
/// Code: `restored`.
pub static RESTORE: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local id, status, updated = ARGV[1], ARGV[2], ARGV[3]
local before = redis.call('HGET', TX, 'status')
if not before then forget_stale(id) end
redis.call('DEL', TX)
redis.call('HSET', TX, unpack(ARGV, 6))
retry_on_server_clock(ARGV[5])
reindex(id, before, status, updated)
set_expiry(status, ARGV[4])
return {'restored', {}}
"#,
    )
});

/// Like [`RESTORE`], but only when the id is absent. Codes: `restored`, `exists`.
pub static RESTORE_MISSING: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local id, status, updated = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', TX) == 1 then return {'exists', {}} end
forget_stale(id)
redis.call('HSET', TX, unpack(ARGV, 6))
retry_on_server_clock(ARGV[5])
reindex(id, false, status, updated)
set_expiry(status, ARGV[4])
return {'restored', {}}
"#,
    )
});

/// ARGV: id, status, updated_at_us, expire_at_ms, the caller's now_us, then the version the
/// caller read (status, attempts, updated_at_us, replay_nonce or '',
/// lease_owner or ''), then field/value pairs. Replaces the record only if
/// it is still that version (`machine`-free: ledger::same_version). Codes:
/// `restored`, `changed` (another version, or no record).
pub static RESTORE_IF_UNCHANGED: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
local id, status, updated = ARGV[1], ARGV[2], ARGV[3]
local cur = redis.call('HMGET', TX, 'status', 'attempts', 'updated_at', 'replay_nonce', 'lease_owner')
if not cur[1] then return {'changed', {}} end
if cur[1] ~= ARGV[6] or cur[2] ~= ARGV[7] or cur[3] ~= ARGV[8]
   or (cur[4] or '') ~= ARGV[9] or (cur[5] or '') ~= ARGV[10] then
  return {'changed', {}}
end
redis.call('DEL', TX)
redis.call('HSET', TX, unpack(ARGV, 11))
retry_on_server_clock(ARGV[5])
reindex(id, cur[1], status, updated)
set_expiry(status, ARGV[4])
return {'restored', {}}
"#,
    )
});

/// One key (KEYS[1]). ARGV: owner, ttl_ms (0 releases). Returns 1 when the
/// owner holds (or released) the lease, 0 when another owner holds it.
pub static LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) == 0 then
  if holder then redis.call('DEL', KEYS[1]) end
  return 1
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"#,
    )
});

/// Shard-level (KEYS[1..7] only). ARGV: cutoff_us, trim_n.
/// Trims expired terminal entries, then returns the counts hash flat.
pub static COUNTS: LazyLock<Script> = LazyLock::new(|| {
    script(
        r#"
trim(ARGV[1], tonumber(ARGV[2]))
return redis.call('HGETALL', COUNTS)
"#,
    )
});

/// The server's data epoch: its `run_id` (`INFO server`: new after every
/// restart, and another node's after a failover) and its replication id
/// (`INFO replication`: new whenever the node is promoted, so also after it
/// was resynced from a peer, which replaces its data with the peer's and
/// keeps its `run_id`).
const RUN_ID: &str = r#"
local function run_id()
  local s = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)') or ''
  local r = string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)') or ''
  return s .. ':' .. r
end
"#;

/// KEYS[1] a shard's rebuild in progress. ARGV: the rebuild's token.
/// Records the token with the server's data epoch ([`RUN_ID`]), so that
/// [`MARK_INTACT`] can tell a server that restarted or was resynced since
/// (issue 12: a restart with an older copy of the data, or a resync from a
/// lagging peer, keeps the token and loses restores made after that copy;
/// the mark compared only the token).
pub static BEGIN_REBUILD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{RUN_ID}\n{}",
        r#"
redis.call('SET', KEYS[1], ARGV[1] .. '@' .. run_id())
return 1
"#
    ))
});

/// KEYS[1] a shard's intact mark, KEYS[2] its rebuild in progress, KEYS[3]
/// its WAL records refused while unmarked.
/// ARGV: the rebuild's token, how long (ms) the refusals are kept once
/// marked. Marks the shard intact if the token is still the rebuild in
/// progress on the same run of the server ([`BEGIN_REBUILD`]); answers
/// whether the shard is marked.
pub static MARK_INTACT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{RUN_ID}\n{}",
        r#"
if redis.call('GET', KEYS[2]) == ARGV[1] .. '@' .. run_id() then
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('DEL', KEYS[2])
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
end
return redis.call('EXISTS', KEYS[1])
"#
    ))
});

/// One index key (KEYS[1]). ARGV: max_score (`+inf` or the cursor's
/// microseconds), cursor id (empty: no cursor), n.
/// Returns up to n `id, score` pairs after the cursor, newest first, ties by
/// id descending (the order of `ZREVRANGEBYSCORE`).
pub static PAGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local max, cid, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local cu = tonumber(max)
local out, offset = {}, 0
while #out < 2 * n do
  local batch = redis.call('ZREVRANGEBYSCORE', KEYS[1], max, '-inf',
                           'WITHSCORES', 'LIMIT', offset, n)
  if #batch == 0 then break end
  for i = 1, #batch, 2 do
    local id, score = batch[i], batch[i + 1]
    if cid == '' or tonumber(score) < cu or id < cid then
      out[#out + 1] = id
      out[#out + 1] = score
      if #out >= 2 * n then break end
    end
  end
  offset = offset + #batch / 2
end
return out
"#,
    )
});
