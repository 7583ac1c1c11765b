-- The worker registry: announce_worker (ARGV[5] = 'announce'), list_workers
-- ('list') and remove_worker ('remove'). P:workers scores worker ids by expiry
-- (us); P:worker:<id> holds an entry's fields. Lapsed entries (expiry at or
-- before now) are deleted first, so none is ever returned or refreshed.
-- announce: ARGV[6..12] id, host, pid, workflows (JSON), concurrency,
-- in flight, ttl (us); returns {id, fields}. list: returns {{id, fields}...}.
-- remove: ARGV[6] id; returns 1 if a live entry was deleted, else 0.
local reg = k('workers')
local lapsed = redis.call('ZRANGE', reg, '-inf', num(NOW), 'BYSCORE')
if #lapsed > 0 then
  for _, id in ipairs(lapsed) do redis.call('DEL', k('worker', id)) end
  redis.call('ZREMRANGEBYSCORE', reg, '-inf', num(NOW))
end
local op = ARGV[5]
if op == 'announce' then
  local id = ARGV[6]
  local wk = k('worker', id)
  local started = num(NOW)
  if redis.call('ZSCORE', reg, id) then
    started = redis.call('HGET', wk, 's') or started
  end
  local expires = num(NOW + tonumber(ARGV[12]))
  redis.call('DEL', wk)
  redis.call('HSET', wk, 'host', ARGV[7], 'pid', ARGV[8], 'wfs', ARGV[9], 'conc', ARGV[10],
    'inf', ARGV[11], 's', started, 'seen', num(NOW), 'exp', expires)
  redis.call('ZADD', reg, expires, id)
  return {id, redis.call('HGETALL', wk)}
elseif op == 'list' then
  local out = {}
  for _, id in ipairs(redis.call('ZRANGE', reg, 0, -1)) do
    local fields = redis.call('HGETALL', k('worker', id))
    if #fields == 0 then
      redis.call('ZREM', reg, id)  -- its hash went missing: not an entry
    else
      out[#out + 1] = {id, fields}
    end
  end
  return out
elseif op == 'remove' then
  local id = ARGV[6]
  redis.call('DEL', k('worker', id))
  return redis.call('ZREM', reg, id)
end
return redis.error_reply('unknown worker operation')
