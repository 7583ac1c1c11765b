-- delete_schedule. ARGV[5]: key.
local key = ARGV[5]
local wf = redis.call('HGET', k('sched', key), 'wf')
index_schedule(key, wf or nil, nil)
redis.call('ZREM', k('schedule-keys'), key)
return redis.call('DEL', k('sched', key))
