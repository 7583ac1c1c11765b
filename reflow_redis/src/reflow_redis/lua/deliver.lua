-- deliver_event. ARGV[5..9]: run id, event name, payload, event id ('' none),
-- cap on the run's buffered events ('' none). Returns 0 when the run is
-- missing or finished, 1 when the event is stored or its id was seen before,
-- 2 when the run already holds as many buffered events as the cap allows
-- (nothing is stored). The event's arrival (the run's 'es' counter, and its
-- id) goes to P:evm, for list_buffered_events.
local id, name, eid = ARGV[5], ARGV[6], ARGV[8]
local rk = run_key(id)
local r = redis.call('HMGET', rk, 'st', 'wt', 'wf', 'pr', 'bb', 'v')
if not r[1] or TERMINAL[r[1]] then return 0 end
if eid ~= '' and redis.call('SISMEMBER', evids_key(id), eid) == 1 then return 1 end
if ARGV[9] ~= '' and buffered(id) >= tonumber(ARGV[9]) then return 2 end
if eid ~= '' then redis.call('SADD', evids_key(id), eid) end
redis.call('RPUSH', ev_key(id, name), ARGV[7])
local arrival = num(redis.call('HINCRBY', rk, 'es', 1))
if eid ~= '' then arrival = arrival .. '|' .. eid end
redis.call('RPUSH', evmeta_key(id, name), arrival)
redis.call('SADD', evnames_key(id), name)
if r[1] == 'waiting' and r[2] == name and r[5] then
  -- Blocked: it stays so, ranked by its new due time.
  reblock(id, r[3], r[4], r[5], num(NOW))
  redis.call('ZADD', k('parked', r[3]), 1, id)
elseif r[1] == 'waiting' and r[2] == name then
  redis.call('HSET', rk, 'w', num(NOW), 'u', num(NOW))
  due_add(r[3], part(r[4], r[6]), num(NOW), id)
  redis.call('ZADD', k('parked', r[3]), 1, id)
  wake(r[3], 0)
end
return 1
