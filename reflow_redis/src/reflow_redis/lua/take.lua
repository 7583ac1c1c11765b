-- take_event. ARGV[5..8]: id, epoch, step name, event name.
-- Returns {found 0/1, payload}, or false when the lease is lost.
local id, name, event = ARGV[5], ARGV[7], ARGV[8]
local wf = fence(id, ARGV[6])
if not wf then return false end
local old = redis.call('HGET', steps_key(id), name)
if old then
  local _, _, status = step_parts(old)
  if status == 'completed' then return {2, old} end
end
local payload = redis.call('LPOP', ev_key(id, event))
if not payload then return {0} end
if redis.call('EXISTS', ev_key(id, event)) == 0 then redis.call('SREM', evnames_key(id), event) end
put_step(id, name, 'completed', '', cjson.encode({payload, cjson.null, 1}))
redis.call('HSET', run_key(id), 'wt', '', 'u', num(NOW))
return {1, payload}
