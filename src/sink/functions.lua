#!lua name=sluice_sink

-- The Redis sink's one write: a batch of stream entries and the sink's position, in one
-- atomic step (a function runs to completion, and AOF records its effects as one
-- transaction). The position is compared and set: a caller whose idea of the position is
-- stale writes nothing and learns the stored one, so two writers, or a writer and a
-- restored Redis, never produce a gap or a duplicate.
--
-- KEYS[1]  the position hash (fields seq, time_us)
-- ARGV     after, last_seq, last_time_us, maxlen (0 = none), minid (0 = none),
--          then per entry: key, seq, time_us, did, json, publish (1/0)
-- Returns  {1, written, duplicates} or {0, stored_seq} when `after` is not the stored seq.
local function write(keys, args)
  local stored = tonumber(redis.call('HGET', keys[1], 'seq') or '0')
  local after = tonumber(args[1])
  if stored ~= after then
    return {0, stored}
  end
  local maxlen = tonumber(args[4])
  local minid = tonumber(args[5])
  local written, duplicates = 0, 0
  local touched = {}
  for i = 6, #args - 5, 6 do
    local key, id = args[i], args[i + 1] .. '-0'
    local reply
    if maxlen > 0 then
      reply = redis.pcall('XADD', key, 'MAXLEN', '~', maxlen, id,
        'event', args[i + 4], 'time_us', args[i + 2], 'seq', args[i + 1], 'did', args[i + 3])
    else
      reply = redis.pcall('XADD', key, id,
        'event', args[i + 4], 'time_us', args[i + 2], 'seq', args[i + 1], 'did', args[i + 3])
    end
    if type(reply) == 'table' and reply.err then
      -- An id at or below the stream's top: the entry is already there.
      duplicates = duplicates + 1
    else
      written = written + 1
      touched[key] = true
      if args[i + 5] == '1' then
        redis.call('PUBLISH', key, args[i + 4])
      end
    end
  end
  if minid > 0 then
    for key in pairs(touched) do
      redis.call('XTRIM', key, 'MINID', '~', minid .. '-0')
    end
  end
  redis.call('HSET', keys[1], 'seq', args[2], 'time_us', args[3])
  return {1, written, duplicates}
end

redis.register_function('sluice_sink_write', write)
