-- update_run_status. ARGV[5..8]: id, target status, epoch ('' = unfenced), error ('' none).
-- Cancelling also cancels every unfinished run below (cancel_below); a child
-- that ends here wakes its parent if that waits for it (child_ended).
local id, target, epoch, err = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local rk = run_key(id)
local wf, pa, ps
if epoch == '' then
  local r = redis.call('HMGET', rk, 'st', 'wf', 'pa', 'ps')
  if not r[1] or TERMINAL[r[1]] then return 0 end
  wf, pa, ps = r[2], r[3], r[4]
else
  wf, pa, ps = fence(id, epoch)
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
-- Before finished(), whose retention purge could delete a long-finished
-- child's list of its own children.
if target == 'cancelled' then cancel_below(id) end
finished(id)
child_ended(id, pa, ps)
return 1
