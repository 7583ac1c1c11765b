-- requeue_run. ARGV[5]: id. A requeued run has no deadline ('dl' goes). A
-- requeued child is unfinished again: back in its parent's open set (while
-- the parent lists it: a purged parent's list is gone). A run never claimed
-- with a debounce key is open again: the key's pointer names it, unless it
-- names another open run, and then the requeued run lets go of its key.
local id = ARGV[5]
local rk = run_key(id)
local r = redis.call('HMGET', rk, 'st', 'wf', 'pa', 'ps', 'c', 'pr', 'db', 'att', 'v')
if r[1] ~= 'failed' and r[1] ~= 'cancelled' then return 0 end
if r[7] and r[8] == '0' then
  local holder = redis.call('HGET', k('debounce', r[2]), r[7])
  local open = false
  if holder and holder ~= id then
    local o = redis.call('HMGET', run_key(holder), 'st', 'att')
    open = (o[1] == 'pending' or o[1] == 'delayed') and o[2] == '0'
  end
  if open then
    redis.call('HDEL', rk, 'db')
  else
    redis.call('HSET', k('debounce', r[2]), r[7], id)
  end
end
redis.call('HSET', rk, 'st', 'pending', 'rec', 0, 'w', num(NOW), 'wt', '', 'u', num(NOW))
redis.call('HDEL', rk, 'err', 'l', 'dl', 'bb')
local sk = steps_key(id)
local all = redis.call('HGETALL', sk)
for i = 1, #all, 2 do
  local _, _, status = step_parts(all[i + 1])
  if status == 'failed' then redis.call('HDEL', sk, all[i]) end
end
redis.call('ZREM', k('finished'), id)
undone(id)
due_add(r[2], part(r[6], r[9]), num(NOW), id)
redis.call('SADD', k('workflows'), r[2])
if r[3] and r[4] and redis.call('ZSCORE', children_key(r[3]), idx_member(r[5], id)) then
  redis.call('SADD', open_key(r[3], r[4]), id)
end
wake(r[2], 0)
return 1
