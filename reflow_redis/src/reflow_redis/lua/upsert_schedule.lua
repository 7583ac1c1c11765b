-- upsert_schedule. ARGV[5..9]: key, workflow, input, recurrence, next run (us).
-- A replaced schedule keeps its paused flag ('p'); a new one is not paused.
-- One moved to another workflow leaves the old workflow's due index.
local key = ARGV[5]
local sk = k('sched', key)
local old = redis.call('HMGET', sk, 'rec', 'next', 'c', 'p', 'wf')
local next_run, created = ARGV[9], num(NOW)
if old[1] then
  created = old[3]
  if old[1] == ARGV[8] then next_run = old[2] end
end
redis.call('HSET', sk, 'wf', ARGV[6], 'in', ARGV[7], 'rec', ARGV[8], 'next', next_run,
  'c', created, 'u', num(NOW))
if old[4] == '1' then
  index_schedule(key, ARGV[6], nil, old[5] or nil)  -- paused: kept out until resumed
else
  index_schedule(key, ARGV[6], next_run, old[5] or nil)
end
redis.call('ZADD', k('schedule-keys'), 0, key)
return {key, redis.call('HGETALL', sk)}
