-- deliver_event. ARGV[5..8]: run id, event name, payload, event id ('' none).
local id, name = ARGV[5], ARGV[6]
local rk = run_key(id)
local r = redis.call('HMGET', rk, 'st', 'wt', 'wf')
if not r[1] or TERMINAL[r[1]] then return 0 end
if ARGV[8] ~= '' and redis.call('SADD', evids_key(id), ARGV[8]) == 0 then return 1 end
redis.call('RPUSH', ev_key(id, name), ARGV[7])
redis.call('SADD', evnames_key(id), name)
if r[1] == 'waiting' and r[2] == name then
  redis.call('HSET', rk, 'w', num(NOW), 'u', num(NOW))
  redis.call('ZADD', k('due', r[3]), num(NOW), id)
  wake(r[3], 0)
end
return 1
