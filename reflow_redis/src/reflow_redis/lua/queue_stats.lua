-- queue_stats. ARGV[5]: '1' for every workflow in P:workflows, '0' for the
-- names ARGV[6..]. Returns {workflow, pending, running, sleeping, waiting,
-- oldest pending wake (us or ''), delayed} per workflow, from indexes of
-- unfinished runs only:
--   P:running:<wf>  every running run (lapsed leases included): ZCARD;
--   P:parked:<wf>   sleeping runs (score 0), waiting runs in a due set or
--                   blocked (1: a timeout or a run deadline, or woken by an
--                   event), waiting runs with neither (2), delayed runs (3,
--                   in a due set or blocked too): ZCOUNT;
--   P:due:<wf>, P:pdue:<pr>:<wf> (the priorities of P:prios:<wf>),
--   P:vdue:<v>:<pr>:<wf> (those of P:vprios:<wf>) and
--   P:blocked-wf:<wf>  pending, delayed, sleeping and score-1 waiting runs,
--                   due or blocked: pending is their ZCARDs minus the parked
--                   ones in them.
-- The oldest pending run is the first pending one by score (its wake_at) of
-- any of these sets; each walk passes only overdue parked runs ahead of it.
-- Without names, a workflow of P:workflows with nothing left in these
-- indexes leaves P:workflows (create and requeue add it again).
local all = ARGV[5] == '1'
local names = {}
if all then
  names = redis.call('SMEMBERS', k('workflows'))
else
  for i = 6, #ARGV do names[#names + 1] = ARGV[i] end
end

-- The score of the first pending run of zset key, or nil. A pending run
-- is due at or before now, so the walk stops there.
local function first_pending(key)
  local start = 0
  while true do
    local rows = redis.call('ZRANGE', key, '-inf', num(NOW), 'BYSCORE', 'LIMIT', start, 64,
      'WITHSCORES')
    if #rows == 0 then return nil end
    for i = 1, #rows, 2 do
      if redis.call('HGET', run_key(rows[i]), 'st') == 'pending' then
        return tonumber(rows[i + 1])
      end
    end
    start = start + 64
  end
end

local out = {}
for _, wf in ipairs(names) do
  local parked = k('parked', wf)
  local sets = {k('blocked-wf', wf)}
  for _, set in ipairs(due_sets(wf)) do sets[#sets + 1] = set[1] end
  local in_due = 0
  for _, key in ipairs(sets) do in_due = in_due + redis.call('ZCARD', key) end
  local running = redis.call('ZCARD', k('running', wf))
  local sleeping = redis.call('ZCOUNT', parked, 0, 0)
  local waiting = redis.call('ZCOUNT', parked, 1, 2)
  local delayed = redis.call('ZCOUNT', parked, 3, 3)
  local pending = math.max(0, in_due - sleeping - delayed - redis.call('ZCOUNT', parked, 1, 1))
  local oldest = ''
  if pending > 0 then
    local best = nil
    for _, key in ipairs(sets) do
      local score = first_pending(key)
      if score and (not best or score < best) then best = score end
    end
    -- Every run of these sets was looked at and none is pending (runs parked
    -- by a version that kept no P:parked): none is.
    if best then oldest = num(best) else pending = 0 end
  end
  if all and in_due + running + sleeping + waiting == 0 then
    redis.call('SREM', k('workflows'), wf)
  else
    out[#out + 1] = {wf, pending, running, sleeping, waiting, oldest, delayed}
  end
end
return out
