-- delete_schedule. ARGV[5]: key.
local key = ARGV[5]
redis.call('ZREM', k('schedule-due'), key)
redis.call('ZREM', k('schedule-keys'), key)
return redis.call('DEL', k('sched', key))
