-- queue_stats. ARGV[5]: '1' for every workflow in P:workflows, '0' for the
-- names ARGV[6..]. Returns {workflow, pending, running, sleeping, waiting,
-- oldest pending wake (us or ''), delayed} per workflow, from indexes of
-- unfinished runs only:
--   P:running:<wf>  every running run (lapsed leases included): ZCARD;
--   P:parked:<wf>   sleeping runs (score 0), waiting runs in P:due (1: a
--                   timeout or a run deadline, or woken by an event), waiting
--                   runs with neither (2), delayed runs (3, in P:due too):
--                   ZCOUNT;
--   P:due:<wf>      pending, delayed, sleeping and score-1 waiting runs:
--                   pending is its ZCARD minus the parked ones in it.
-- The oldest pending run is the first pending one in P:due by score (its
-- wake_at); the walk passes only overdue parked runs ahead of it. Without
-- names, a workflow of P:workflows with nothing left in these indexes
-- leaves P:workflows (create and requeue add it again).
local all = ARGV[5] == '1'
local names = {}
if all then
  names = redis.call('SMEMBERS', k('workflows'))
else
  for i = 6, #ARGV do names[#names + 1] = ARGV[i] end
end
local out = {}
for _, wf in ipairs(names) do
  local due, parked = k('due', wf), k('parked', wf)
  local in_due = redis.call('ZCARD', due)
  local running = redis.call('ZCARD', k('running', wf))
  local sleeping = redis.call('ZCOUNT', parked, 0, 0)
  local waiting = redis.call('ZCOUNT', parked, 1, 2)
  local delayed = redis.call('ZCOUNT', parked, 3, 3)
  local pending = math.max(0, in_due - sleeping - delayed - redis.call('ZCOUNT', parked, 1, 1))
  local oldest = ''
  if pending > 0 then
    local start = 0
    while oldest == '' do
      local rows = redis.call('ZRANGE', due, start, start + 63, 'WITHSCORES')
      if #rows == 0 then break end
      for i = 1, #rows, 2 do
        if redis.call('HGET', run_key(rows[i]), 'st') == 'pending' then
          oldest = num(tonumber(rows[i + 1]))
          break
        end
      end
      start = start + 64
    end
    -- Every run in P:due was looked at and none is pending (runs parked by
    -- a version that kept no P:parked): none is.
    if oldest == '' then pending = 0 end
  end
  if all and in_due + running + sleeping + waiting == 0 then
    redis.call('SREM', k('workflows'), wf)
  else
    out[#out + 1] = {wf, pending, running, sleeping, waiting, oldest, delayed}
  end
end
return out
