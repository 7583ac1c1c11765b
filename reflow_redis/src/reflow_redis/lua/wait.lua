-- wait_run. ARGV[5..9]: id, epoch, step name, event name, timeout (us, '' none).
-- Returns {ready 0/1, the wait's deadline (us or '')}, or false when the
-- lease is lost. A waiting run is due at the earlier of the wait's deadline
-- and the run's ('dl'); with neither, only its event brings it back.
local id, name, event = ARGV[5], ARGV[7], ARGV[8]
local wf, _, _, p, k1, k2 = fence(id, ARGV[6])
if not wf then return false end
local old = redis.call('HGET', steps_key(id), name)
local deadline
if old then
  local _, _, status, w = step_parts(old)
  if status == 'waiting' then deadline = w or '' end
end
local first = deadline == nil
if first then
  if ARGV[9] ~= '' then deadline = num(NOW + tonumber(ARGV[9])) else deadline = '' end
end
local rk = run_key(id)
local ready = redis.call('LLEN', ev_key(id, event)) > 0
if ready then
  redis.call('HSET', rk, 'wt', '', 'u', num(NOW))
else
  park_waiting(id, wf, event, due_by_deadline(deadline, redis.call('HGET', rk, 'dl')), p, k1, k2)
end
if first then put_step(id, name, 'waiting', deadline, '[null,null,1]') end
return {ready and 1 or 0, deadline}
