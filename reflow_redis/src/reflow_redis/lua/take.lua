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
local ek = ev_key(id, event)
local payload = redis.call('LPOP', ek)
if not payload then return {0} end
-- The arrival list covers the newest part of the buffer: it drops its
-- first entry when it is now longer than the buffer (the event taken had
-- one), and is trimmed to the buffer's length whatever wrote it.
local mk = evmeta_key(id, event)
local extra = redis.call('LLEN', mk) - redis.call('LLEN', ek)
if extra > 0 then redis.call('LTRIM', mk, extra, -1) end
if redis.call('EXISTS', ek) == 0 then redis.call('SREM', evnames_key(id), event) end
put_step(id, name, 'completed', '', cjson.encode({payload, cjson.null, 1}))
redis.call('HSET', run_key(id), 'wt', '', 'u', num(NOW))
return {1, payload}
