-- update_run_status. ARGV[5..8]: id, target status, epoch ('' = unfenced), error ('' none).
local id, target, epoch, err = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local rk = run_key(id)
local wf
if epoch == '' then
  local r = redis.call('HMGET', rk, 'st', 'wf')
  if not r[1] or TERMINAL[r[1]] then return 0 end
  wf = r[2]
else
  wf = fence(id, epoch)
  if not wf then return 0 end
end
drop_lease(id, wf)
if target == 'pending' then
  redis.call('HSET', rk, 'st', 'pending', 'w', num(NOW), 'u', num(NOW))
  redis.call('ZADD', k('due', wf), num(NOW), id)
  wake(wf, 0)
  return 1
end
redis.call('HSET', rk, 'st', target, 'w', '', 'wt', '', 'u', num(NOW))
if err ~= '' then redis.call('HSET', rk, 'err', err) end
redis.call('ZREM', k('due', wf), id)
redis.call('ZREM', k('parked', wf), id)
drop_events(id)
finished(id)
return 1
