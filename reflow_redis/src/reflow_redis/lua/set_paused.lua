-- set_schedule_paused. ARGV[5..7]: key, '1' to pause or '0' to resume, next run
-- (us, '' to keep). A paused schedule leaves the due indexes (so due_schedules
-- never sees it) and comes back on resume. Returns {key, fields}, or false
-- when there is no schedule with that key.
local key = ARGV[5]
local sk = k('sched', key)
local cur = redis.call('HMGET', sk, 'next', 'wf')
local next_run = cur[1]
if not next_run then return false end
if ARGV[7] ~= '' then next_run = ARGV[7] end
redis.call('HSET', sk, 'p', ARGV[6], 'next', next_run, 'u', num(NOW))
if ARGV[6] == '1' then
  index_schedule(key, cur[2] or nil, nil)
else
  index_schedule(key, cur[2] or nil, next_run)
end
return {key, redis.call('HGETALL', sk)}
