-- sleep_run. ARGV[5..8]: id, epoch, step name, duration (us).
-- Returns the step's wake time (us, as a string), or false when the lease is
-- lost. The run itself is due at the earlier of that and its deadline.
local id, name = ARGV[5], ARGV[7]
local wf, _, _, p, k1, k2 = fence(id, ARGV[6])
if not wf then return false end
local old = redis.call('HGET', steps_key(id), name)
local wake_at
if old then
  local _, _, status, w = step_parts(old)
  if status == 'sleeping' and w and w ~= '' then wake_at = w end
end
local first = wake_at == nil
if first then wake_at = num(NOW + tonumber(ARGV[8])) end
local rk = run_key(id)
local due = due_by_deadline(wake_at, redis.call('HGET', rk, 'dl'))
redis.call('HSET', rk, 'st', 'sleeping', 'w', due, 'u', num(NOW))
drop_lease(id, wf)
release(id, k1, k2)
due_add(wf, p, due, id)
redis.call('ZADD', k('parked', wf), 0, id)
if first then put_step(id, name, 'sleeping', wake_at, '[null,null,1]') end
wake(wf, tonumber(due) - NOW)
return wake_at
