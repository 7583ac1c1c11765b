-- claim_runs. ARGV[5]: limit, ARGV[6]: lease (us), ARGV[7]: the versions
-- served, '' for any of every workflow, else one entry per workflow in
-- their order, joined by ';': '' for any version, else the versions joined
-- by ','. ARGV[8..]: workflows.
-- Lapsed leases first (oldest expiry first), taken over whatever the limits
-- (the run still holds its slots, which pass on); one of a version not
-- served is passed over and left as it is, however many of them lapsed.
-- Then due runs by priority (highest first), then due time: each
-- workflow's due sets of the versions served are walked from its highest
-- priority (P:prios and P:vprios, see due_sets) until it gave as many as
-- are wanted (each set of one priority read for as many as that priority
-- may still give, as its sets come in no order), and the candidates of
-- every workflow are merged. A run of a version not served is in none of
-- these sets, so it is never read, blocked or changed here, and never
-- keeps a served one from being taken. A candidate with a full limit
-- (its holders, runs taken earlier here included, number its max) is
-- blocked: out of its due set, so no later claim reads it until a run
-- holding the key stops. When blocked candidates left the batch short, the
-- due sets are read again; at most BLOCK_BUDGET runs are blocked per call
-- (the rest wait for the next claim), so one call stays short.
-- Rate limits: first the due rate waits are released (release_rates), then
-- a run with rates is taken only while each of its windows has room (claims
-- made earlier here count); a due run finding one full is blocked by it
-- (rate_block), a lapsed lease is left as it is (and read past). Each run
-- taken records a claim at now for each of its rate keys.
local BLOCK_BUDGET = 20000
local limit = tonumber(ARGV[5])
local lease = tonumber(ARGV[6])
local wfs = {}
for i = 8, #ARGV do wfs[#wfs + 1] = ARGV[i] end
-- served[i]: nil for any version of wfs[i], else {[version] = true, n = how many}.
local served = {}
if ARGV[7] ~= '' then
  local i = 0
  for entry in string.gmatch(ARGV[7] .. ';', '([^;]*);') do
    i = i + 1
    if entry ~= '' then
      local set = {n = 0}
      for v in string.gmatch(entry, '%d+') do
        set[v] = true
        set.n = set.n + 1
      end
      served[i] = set
    end
  end
end

release_rates()

local out = {}

-- A claimed run as the reply carries it: one string, reclaim, the number of
-- the run hash's fields and values, those, then the steps hash's, joined by
-- NUL characters (one reply item for the client to read rather than one per
-- field and value); when one of them holds a NUL, {reclaim, run, steps}.
local function claimed(reclaim, run, steps)
  if #run == 0 then return {reclaim, run, steps} end
  local text = table.concat(run, '\0')
  if #steps > 0 then text = text .. '\0' .. table.concat(steps, '\0') end
  -- One NUL between each two of the values: any other was in a value.
  local _, nuls = string.gsub(text, '%z', '')
  if nuls ~= #run + #steps - 1 then return {reclaim, run, steps} end
  return reclaim .. '\0' .. #run .. '\0' .. text
end

-- Take run id; its rate fields are r[i..i+5] (see rate_full).
local function take(id, wf, reclaim, r, i)
  local rk = run_key(id)
  local epoch = redis.call('HINCRBY', rk, 'ep', 1)
  rate_claims(r, i, id, num(epoch))
  redis.call('HINCRBY', rk, 'att', 1)
  if reclaim == 1 then redis.call('HINCRBY', rk, 'rec', 1) end
  redis.call('HSET', rk, 'st', 'running', 'w', '')
  if reclaim == 0 then redis.call('ZREM', k('parked', wf), id) end
  set_lease(id, wf, num(epoch), lease)
  out[#out + 1] = claimed(reclaim, redis.call('HGETALL', rk), redis.call('HGETALL', steps_key(id)))
end

-- Lapsed leases, oldest expiry first. Each workflow's are read until as
-- many as are wanted could be taken (of a version served, and a rate not
-- full now), so neither runs of other versions nor runs over a full rate,
-- however many, hide one that can be. A run whose rate a take before it here
-- filled is passed over too; then the lapsed leases are read again (those
-- seen already left out) while the batch is short.
local seen = {}
while #out < limit do
  local want = limit - #out
  local stale = {}
  for w, wf in ipairs(wfs) do
    local only = served[w]
    local start, got = 0, 0
    while got < want do
      local rows = redis.call('ZRANGE', k('running', wf), '-inf', num(NOW), 'BYSCORE', 'LIMIT',
        start, want, 'WITHSCORES')
      for i = 1, #rows, 2 do
        local id = rows[i]
        -- The index says lapsed; the lease key (the server clock) must agree.
        if not seen[id] and (FAKE or redis.call('EXISTS', lease_key(id)) == 0) then
          local r = redis.call('HMGET', run_key(id), 'rk1', 'rm1', 'rp1', 'rk2', 'rm2', 'rp2', 'v')
          if not only or only[r[7] or '1'] then
            local free = not rate_full(r, 1)
            stale[#stale + 1] = {id, wf, tonumber(rows[i + 1]), r, free}
            if free then got = got + 1 end
          end
        end
      end
      if #rows < 2 * want then break end
      start = start + want
    end
  end
  if #stale == 0 then break end
  table.sort(stale, function(a, b) return a[3] < b[3] end)
  local again = false
  for _, run in ipairs(stale) do
    if #out >= limit then break end
    seen[run[1]] = true
    if not rate_full(run[4], 1) then
      take(run[1], run[2], 1, run[4], 1)
    elseif run[5] then
      again = true
    end
  end
  if not again then break end
end

-- The due sets runs left, to drop emptied ones from P:prios or P:vprios at the end.
local left = {}
local blocked = 0
while #out < limit and blocked < BLOCK_BUDGET do
  local want = limit - #out
  local due = {}
  for w, wf in ipairs(wfs) do
    -- got: the candidates read; before: those read before the sets of this priority.
    local got, before, level = 0, 0, nil
    for _, set in ipairs(due_sets(wf, served[w])) do
      if set[3] ~= level then
        if got >= want then break end
        level, before = set[3], got
      end
      local rows = redis.call('ZRANGE', set[1], '-inf', num(NOW), 'BYSCORE', 'LIMIT', 0,
        want - before, 'WITHSCORES')
      for i = 1, #rows, 2 do
        due[#due + 1] = {rows[i], wf, set[2], tonumber(rows[i + 1]), set[3], set[1]}
      end
      got = got + #rows / 2
    end
  end
  if #due == 0 then break end
  table.sort(due, function(a, b)
    if a[5] ~= b[5] then return a[5] > b[5] end
    if a[4] ~= b[4] then return a[4] < b[4] end
    return a[1] < b[1]
  end)
  local passed = 0
  for _, c in ipairs(due) do
    if #out >= limit then break end
    local id, wf, p, pr = c[1], c[2], c[3], c[5]
    redis.call('ZREM', c[6], id)
    if not plain(p) then left[wf .. '\0' .. p] = {wf, p} end
    local r = redis.call('HMGET', run_key(id), 'k1', 'm1', 'k2', 'm2', 'w', 'rk1', 'rm1', 'rp1',
      'rk2', 'rm2', 'rp2', 'pr', 'v')
    -- A run in a set other than its own (put there by a process that knew
    -- no versions) goes back to its own set, untouched otherwise.
    local own = part(r[12], r[13])
    if own ~= p and not (plain(own) and plain(p)) then
      due_add(wf, own, num(c[4]), id)
      passed = passed + 1
    else
      local full = false
      if r[1] then
        if redis.call('SCARD', k('holders', r[1])) >= tonumber(r[2]) then
          full = r[1]
        elseif r[3] and redis.call('SCARD', k('holders', r[3])) >= tonumber(r[4]) then
          full = r[3]
        end
      end
      local rate, room = false, nil
      if not full then rate, room = rate_full(r, 6) end
      if full then
        block(id, wf, pr, r[5] or num(c[4]), full)
        passed = passed + 1
      elseif rate then
        rate_block(id, wf, pr, r[5] or num(c[4]), rate, room)
        passed = passed + 1
      else
        if r[1] then redis.call('SADD', k('holders', r[1]), id) end
        if r[3] then redis.call('SADD', k('holders', r[3]), id) end
        take(id, wf, 0, r, 6)
      end
    end
  end
  blocked = blocked + passed
  if passed == 0 then break end
end
for _, set in pairs(left) do due_gone(set[1], set[2]) end
return out
