-- list_schedules: every schedule, by key, each as {key, fields}.
local keys = redis.call('ZRANGE', k('schedule-keys'), 0, -1)
local out = {}
for _, key in ipairs(keys) do out[#out + 1] = {key, redis.call('HGETALL', k('sched', key))} end
return out
