#!lua name=sluice
-- sluice's cluster functions, loaded with FUNCTION LOAD REPLACE at every node's start.
--
-- Keys (one hash tag per cluster, so they live together on one Redis shard):
--   lease  hash {node, epoch} with a TTL: who may append, and with which fencing epoch
--   epoch  counter that only grows: every grant of the lease takes the next value
--   state  hash {next_seq, last_time_us, upstream_cursor, epoch}: where ingest resumes
--   stream the events, one entry per appended batch, entry id = "<last seq of batch>-0",
--          fields b (the batch, see src/cluster/entry.rs) and e (the appender's epoch);
--          the leader appends with WATCH + MULTI/EXEC (link.rs), checked by append_check
--          below: a function that wrote the entry itself would copy every payload into a
--          Lua string and back
--   fence:<node>  a counter append_check raises when it refuses one of <node>'s batches:
--          the batch's transaction watches it, so its EXEC is refused too
--   nodes  hash node -> "position ms role subscribers": what every node reported last
--   seed   when the state went missing (a new cluster, or Redis lost its data)
--   lease:<name>, epoch:<name>  a named lease and its epoch counter (src/cluster/lease.rs)
--
-- Every check that decides whether a lease is granted is made here, in one server-side
-- step, so two callers can never both pass it. An append's checks are made here too
-- (append_check), after the caller's WATCH of the state, the stream and its fence key and
-- before its MULTI/EXEC: the EXEC fails if a check failed (the fence key was raised) or
-- anything changed the state or the stream in between (every grant of the lease writes the
-- state). The checks run when the batch reaches Redis, not when it was sent, so a leader
-- may have several batches in flight.

-- grant(lease, epoch_key, node, ttl, min_epoch): gives the lease to node under a new epoch,
-- one above both the last epoch granted and min_epoch (the highest the caller has seen), so a
-- fencing number never repeats, even after Redis lost the epoch key.
local function grant(lease, epoch_key, node, ttl, min_epoch)
  local epoch = redis.call('INCR', epoch_key)
  if epoch <= min_epoch then
    epoch = min_epoch + 1
    redis.call('SET', epoch_key, epoch)
  end
  redis.call('HSET', lease, 'node', node, 'epoch', epoch)
  redis.call('PEXPIRE', lease, ttl)
  return epoch
end

local function num(v)
  if v == false or v == nil then return nil end
  return tonumber(v)
end

-- acquire(keys: lease, epoch, state, nodes, seed; args: node, ttl_ms, min_epoch, now_ms,
--         local_next_seq, local_last_time_us, local_upstream_cursor|'')
-- Returns {1, epoch, next_seq, last_time_us, upstream_cursor|'', seeded} when granted,
-- {0, holder, pttl} when another node holds the lease, {0, '', 0, why} when the resume
-- state is missing and either the live nodes have not all reported since (one TTL, three
-- reports) or one of them holds more of the log than the caller.
local function acquire(keys, args)
  local lease, epoch_key, state, nodes, seed = keys[1], keys[2], keys[3], keys[4], keys[5]
  local node, ttl, min_epoch, now = args[1], tonumber(args[2]), tonumber(args[3]), tonumber(args[4])
  local holder = redis.call('HGET', lease, 'node')
  if holder and holder ~= node then
    return {0, holder, redis.call('PTTL', lease)}
  end
  local seeded = 0
  if redis.call('EXISTS', state) == 0 then
    -- Redis lost its data (or this is a new cluster). Only the live node holding the most
    -- of the log may re-seed, so no node ever sees a seq it holds reused for another event.
    local mine = tonumber(args[5])
    local since = num(redis.call('GET', seed))
    if since == nil then
      redis.call('SET', seed, now, 'PX', 10 * ttl)
      return {0, '', 0, 'waiting one lease TTL for every live node to report'}
    end
    if now - since < ttl then
      return {0, '', 0, 'waiting one lease TTL for every live node to report'}
    end
    local reports = redis.call('HGETALL', nodes)
    for i = 1, #reports, 2 do
      local other, report = reports[i], reports[i + 1]
      if other ~= node then
        local pos, ms = string.match(report, '^(%d+) (%d+)')
        if pos and tonumber(ms) + 3 * ttl >= now and tonumber(pos) >= mine then
          return {0, '', 0, other}
        end
      end
    end
    redis.call('HSET', state, 'next_seq', args[5], 'last_time_us', args[6], 'upstream_cursor', args[7])
    redis.call('DEL', seed)
    seeded = 1
  end
  local epoch = grant(lease, epoch_key, node, ttl, min_epoch)
  redis.call('HSET', state, 'epoch', epoch)
  local s = redis.call('HMGET', state, 'next_seq', 'last_time_us', 'upstream_cursor')
  return {1, epoch, s[1] or '1', s[2] or '0', s[3] or '', seeded}
end

-- lease_acquire(keys: lease, epoch; args: node, ttl_ms, min_epoch)
-- A named lease for work other than ingest (the Redis sink): at most one node holds it.
-- Returns {1, epoch} when granted (always a new epoch, also to the node that held it), or
-- {0, holder, pttl} when another node holds it. Renewed and released with sluice_renew
-- and sluice_release, like the ingest lease.
local function lease_acquire(keys, args)
  local lease, epoch_key = keys[1], keys[2]
  local node, ttl, min_epoch = args[1], tonumber(args[2]), tonumber(args[3])
  local holder = redis.call('HGET', lease, 'node')
  if holder and holder ~= node then
    return {0, holder, redis.call('PTTL', lease)}
  end
  local epoch = grant(lease, epoch_key, node, ttl, min_epoch)
  return {1, epoch}
end

local function holds(lease, node, epoch)
  local h = redis.call('HMGET', lease, 'node', 'epoch')
  return h[1] == node and h[2] == epoch, h[1], h[2]
end

-- renew(keys: lease; args: node, epoch, ttl_ms) -> 1, or an error FENCED.
local function renew(keys, args)
  local ok, holder, epoch = holds(keys[1], args[1], args[2])
  if not ok then
    return redis.error_reply('FENCED lease is held by ' .. tostring(holder) .. ' epoch ' .. tostring(epoch))
  end
  redis.call('PEXPIRE', keys[1], tonumber(args[3]))
  return 1
end

-- release(keys: lease; args: node, epoch) -> 1 if released, 0 if not held.
local function release(keys, args)
  if holds(keys[1], args[1], args[2]) then
    redis.call('DEL', keys[1])
    return 1
  end
  return 0
end

-- append_check(keys: lease, state, stream, fence; args: node, epoch, first_seq, last_seq,
--              upstream_cursor, '<first_seq - 1>-0')
-- The checks of one append, in this order: the caller holds the lease under epoch
-- (FENCED), the resume state exists (NOSTATE), the batch is not already in (a resend after
-- a lost reply: the state was written under this epoch past the batch's last seq, answered
-- ALREADY), the batch continues the stream (GAP), the upstream cursor advances (CURSOR),
-- and the stream holds no entry past the state (GAP). Passing, it writes nothing and
-- returns {1, last_time_us, upstream_cursor} (the state before the batch); otherwise it
-- raises the caller's fence key, so the caller's EXEC that follows writes nothing, and
-- returns the error (or {2} for ALREADY).
local function append_check(keys, args)
  local lease, state, stream, fence = keys[1], keys[2], keys[3], keys[4]
  local node, epoch = args[1], args[2]
  local first, last, up = tonumber(args[3]), tonumber(args[4]), tonumber(args[5])
  local function refuse(msg)
    redis.call('INCR', fence)
    redis.call('PEXPIRE', fence, 86400000)
    if msg == nil then return {2} end
    return redis.error_reply(msg)
  end
  local h = redis.call('HMGET', lease, 'node', 'epoch')
  if h[1] ~= node or h[2] ~= epoch then
    return refuse('FENCED lease is held by ' .. tostring(h[1]) .. ' epoch ' .. tostring(h[2]))
  end
  local s = redis.call('HMGET', state, 'next_seq', 'last_time_us', 'upstream_cursor', 'epoch')
  local next_seq = num(s[1])
  if next_seq == nil then
    return refuse('NOSTATE the resume state is missing')
  end
  if last < next_seq and s[4] == epoch then
    return refuse(nil)
  end
  if first ~= next_seq or last < first then
    return refuse('GAP expected ' .. s[1] .. ' got ' .. args[3])
  end
  local cursor = num(s[3])
  if cursor ~= nil and up <= cursor then
    return refuse('CURSOR stored ' .. s[3] .. ' got ' .. args[5])
  end
  local later = redis.call('XREAD', 'COUNT', 1, 'STREAMS', stream, args[6])
  if later then
    return refuse('GAP the stream holds an entry past its resume state next seq ' .. s[1])
  end
  return {1, s[2] or '0', s[3] or ''}
end

redis.register_function('sluice_acquire', acquire)
redis.register_function('sluice_append_check', append_check)
redis.register_function('sluice_lease_acquire', lease_acquire)
redis.register_function('sluice_renew', renew)
redis.register_function('sluice_release', release)
