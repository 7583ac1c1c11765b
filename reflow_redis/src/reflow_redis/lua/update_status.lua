-- update_run_status. ARGV[5..8]: id, target status, epoch ('' = unfenced), error ('' none).
-- Cancelling also cancels every unfinished run below (cancel_below); a child
-- that ends here wakes its parent if that waits for it (child_ended). A run
-- that was running releases its limit slots (release); a blocked run that
-- ends leaves the blocked indexes; any other run that ends passes its turn
-- on (pass_turn). The run and the runs cancelled below it are named in
-- finish hints on P:done (publish_finished).
local id, target, epoch, err = ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local rk = run_key(id)
local wf, pa, ps, p, k1, k2
local bb, w, turn = false, false, false
if epoch == '' then
  local r = redis.call('HMGET', rk, 'st', 'wf', 'pa', 'ps', 'pr', 'k1', 'k2', 'bb', 'w', 'm1', 'm2',
    'v')
  if not r[1] or TERMINAL[r[1]] then return 0 end
  wf, pa, ps, p = r[2], r[3], r[4], part(r[5], r[12])
  bb, w = r[8], r[9]
  if r[1] == 'running' then
    k1, k2 = r[6], r[7]
  elseif not bb and r[6] then
    turn = {r[6], r[10], r[7], r[11]}
  end
else
  wf, pa, ps, p, k1, k2 = fence(id, epoch)
  if not wf then return 0 end
end
drop_lease(id, wf)
if target == 'pending' then
  redis.call('HSET', rk, 'st', 'pending', 'w', num(NOW), 'u', num(NOW))
  release(id, k1, k2)
  due_add(wf, p, num(NOW), id)
  wake(wf, 0)
  return 1
end
if bb then unlist_blocked(id, wf, bb, w) end
redis.call('HSET', rk, 'st', target, 'w', '', 'wt', '', 'u', num(NOW))
if err ~= '' then redis.call('HSET', rk, 'err', err) end
release(id, k1, k2)
due_rem(wf, p, id)
if turn then pass_turn(turn[1], turn[2], turn[3], turn[4]) end
redis.call('ZREM', k('parked', wf), id)
drop_events(id)
-- Before finished(), whose retention purge could delete a long-finished
-- child's list of its own children.
if target == 'cancelled' then cancel_below(id) end
finished(id, target)
child_ended(id, pa, ps)
publish_finished()  -- last: see publish_finished
return 1
