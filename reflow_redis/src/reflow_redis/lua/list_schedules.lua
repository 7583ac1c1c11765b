-- list_schedules (ARGV[5] = '') or due_schedules (ARGV[5] = limit).
local keys
if ARGV[5] == '' then
  keys = redis.call('ZRANGE', k('schedule-keys'), 0, -1)
else
  keys = redis.call('ZRANGE', k('schedule-due'), '-inf', num(NOW), 'BYSCORE', 'LIMIT', 0,
    tonumber(ARGV[5]))
end
local out = {}
for _, key in ipairs(keys) do out[#out + 1] = {key, redis.call('HGETALL', k('sched', key))} end
return out
