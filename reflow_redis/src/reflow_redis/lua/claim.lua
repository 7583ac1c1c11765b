-- claim_runs. ARGV[5]: limit, ARGV[6]: lease (us), ARGV[7..]: workflows.
-- Lapsed leases first (oldest expiry first), then due runs by due time.
local limit = tonumber(ARGV[5])
local lease = tonumber(ARGV[6])
local wfs = {}
for i = 7, #ARGV do wfs[#wfs + 1] = ARGV[i] end

local stale = {}
for _, wf in ipairs(wfs) do
  local rows = redis.call('ZRANGE', k('running', wf), '-inf', num(NOW), 'BYSCORE', 'LIMIT', 0, limit,
    'WITHSCORES')
  for i = 1, #rows, 2 do
    local id = rows[i]
    -- The index says lapsed; the lease key (the server clock) must agree.
    if FAKE or redis.call('EXISTS', lease_key(id)) == 0 then
      stale[#stale + 1] = {id, wf, tonumber(rows[i + 1]), 1}
    end
  end
end
table.sort(stale, function(a, b) return a[3] < b[3] end)
local picked = {}
for i = 1, math.min(#stale, limit) do picked[#picked + 1] = stale[i] end

if #picked < limit then
  local due = {}
  local want = limit - #picked
  for _, wf in ipairs(wfs) do
    local rows = redis.call('ZRANGE', k('due', wf), '-inf', num(NOW), 'BYSCORE', 'LIMIT', 0, want,
      'WITHSCORES')
    for i = 1, #rows, 2 do due[#due + 1] = {rows[i], wf, tonumber(rows[i + 1]), 0} end
  end
  table.sort(due, function(a, b) return a[3] < b[3] end)
  for i = 1, math.min(#due, want) do picked[#picked + 1] = due[i] end
end

local out = {}
for _, c in ipairs(picked) do
  local id, wf, reclaim = c[1], c[2], c[4]
  local rk = run_key(id)
  local epoch = redis.call('HINCRBY', rk, 'ep', 1)
  redis.call('HINCRBY', rk, 'att', 1)
  if reclaim == 1 then redis.call('HINCRBY', rk, 'rec', 1) end
  redis.call('HSET', rk, 'st', 'running', 'w', '')
  redis.call('ZREM', k('due', wf), id)
  if reclaim == 0 then redis.call('ZREM', k('parked', wf), id) end
  set_lease(id, wf, num(epoch), lease)
  out[#out + 1] = {reclaim, redis.call('HGETALL', rk), redis.call('HGETALL', steps_key(id))}
end
return out
