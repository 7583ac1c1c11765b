-- Shared by every Reflow script (prepended when the scripts are loaded).
--
-- ARGV[1] is the key prefix with its hash tag, e.g. "{reflow}"; every key a
-- script touches starts with it, so all of them live in one cluster slot.
-- ARGV[2] is the clock: empty for the server's TIME (the default), or
-- microseconds since the epoch when a test clock is configured.
-- Times are integer microseconds, stored as decimal strings.
local P = ARGV[1]
local FAKE = ARGV[2] ~= ''
local NOW
if FAKE then
  NOW = tonumber(ARGV[2])
else
  local t = redis.call('TIME')
  NOW = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local RETENTION = tonumber(ARGV[3]) or 0
local NOTIFY = ARGV[4] == '1'

local function num(n) return string.format('%.0f', n) end

-- The count fields of a batch's items, from ARGV[at] on: the client joins
-- them with NUL characters into ARGV[at] alone (one argument is far cheaper
-- for it to send than one per field), or, when a field holds a NUL, sends
-- them one argument each. A batch that does not hold count fields is an error.
local function batch_fields(count, at)
  local out = {}
  if #ARGV ~= at or count == 1 then
    if #ARGV ~= at + count - 1 then error('reflow: a batch without the fields it announces') end
    for i = 1, count do out[i] = ARGV[at + i - 1] end
    return out
  end
  local text, pos = ARGV[at], 1
  for i = 1, count - 1 do
    local stop = string.find(text, '\0', pos, true)
    if not stop then error('reflow: a batch without the fields it announces') end
    out[i] = string.sub(text, pos, stop - 1)
    pos = stop + 1
  end
  if string.find(text, '\0', pos, true) then
    error('reflow: a batch without the fields it announces')
  end
  out[count] = string.sub(text, pos)
  return out
end
-- A key: the prefix and parts joined by ':' (concatenated directly for up
-- to three parts, the common case, which is several times faster than
-- building a table).
local function k(a, b, c, ...)
  if b == nil then return P .. ':' .. a end
  if c == nil then return P .. ':' .. a .. ':' .. b end
  if ... == nil then return P .. ':' .. a .. ':' .. b .. ':' .. c end
  return P .. ':' .. table.concat({a, b, c, ...}, ':')
end
local function run_key(id) return k('run', id) end
local function steps_key(id) return k('steps', id) end
local function lease_key(id) return k('lease', id) end
local function ev_key(id, name) return k('ev', #id .. '.' .. id, name) end
-- The arrival of each event of ev_key(id, name), in the same order: its
-- place in the run's arrival order (the run's 'es' counter), then '|' and
-- its event id when it has one. An event buffered by a version that kept no
-- such list has none: this list is as long as the newest part of the
-- buffer, so the buffer's first LLEN(ev) - LLEN(evm) events carry none.
local function evmeta_key(id, name) return k('evm', #id .. '.' .. id, name) end
local function evnames_key(id) return k('evnames', id) end
local function evids_key(id) return k('evids', id) end
-- A parent's children, score 0, members idx_member(created, child id): in
-- creation order, then by id.
local function children_key(id) return k('children', id) end
-- The unfinished children a parent started at one step (its wait_children set).
local function open_key(id, step) return k('open', #id .. '.' .. id, step) end
local TERMINAL = {completed = true, failed = true, cancelled = true}
-- The runs created with an idempotency key, of every workflow: score 0,
-- members idx_member(created, id), so the newest come first by lex order.
-- create_run adds a run, purge_one removes it.
local function bykey_key(key) return k('bykey', key) end
-- The finished runs of one terminal status by finish time (us): what
-- finished_history counts. A run is in the set of its status exactly while
-- it is stored and finished: finished() adds it, requeue and purge_one
-- remove it. P:finished holds the same runs, of every status, for purges.
local function done_key(status) return k('done', status) end
local function undone(id)
  redis.call('ZREM', done_key('completed'), id)
  redis.call('ZREM', done_key('failed'), id)
  redis.call('ZREM', done_key('cancelled'), id)
end
local CHILDREN = 'reflow:children:'  -- waiting_for of a run parked by wait_children

local function publish_wake(wf, ms)
  local name = wf
  if #name > 4000 then name = '' end
  redis.call('PUBLISH', P .. ':wake', num(ms) .. '|' .. name)
end
-- Hints held back by a script that makes many runs due at once (see
-- hold_wakes): per workflow, in the order first hinted, {now = whether one
-- is due now, later = the fewest ms until one of the others is}. nil: wake
-- publishes at once.
local held, held_order = nil, nil
local function wake(wf, delay_us)
  if NOTIFY then
    local ms = math.max(0, math.floor(delay_us / 1000))
    if not held then
      publish_wake(wf, ms)
      return
    end
    local h = held[wf]
    if not h then
      h = {}
      held[wf] = h
      held_order[#held_order + 1] = wf
    end
    if ms == 0 then
      h.now = true
    elseif not h.later or ms < h.later then
      h.later = ms
    end
  end
end
-- From here on wake only gathers its hints; publish_held sends them: one
-- per workflow due now and one for the nearest later due time of each
-- workflow, whatever the number of runs.
local function hold_wakes() held, held_order = {}, {} end
local function publish_held()
  local gathered, order = held, held_order
  held, held_order = nil, nil
  if not gathered then return end
  for _, wf in ipairs(order) do
    local h = gathered[wf]
    if h.now then publish_wake(wf, 0) end
    if h.later then publish_wake(wf, h.later) end
  end
end

-- Index member of a run for newest-first listing: zero-padded creation time, then the id.
local function idx_member(created, id) return string.rep('0', 17 - #created) .. created .. ':' .. id end

-- The due set of a run (see due_add) is named by its part: its priority
-- 'pr' for version 1 (false, '' or '0' for 0), '<v>:<pr>' for another
-- version v ('v'; absent for 1), pr '0' for 0.
local function plain(pr) return not pr or pr == '' or pr == '0' end
local function part(pr, v)
  if not v or v == '' or v == '1' then return pr end
  if plain(pr) then return v .. ':0' end
  return v .. ':' .. pr
end

-- The fence: running under this epoch with a live lease. Returns the
-- workflow, or nil; then the parent's id and step of a child run ('pa', 'ps';
-- false for a run without a parent), the part naming its due set (its
-- priority and version: part) and its limit keys ('k1', 'k2'; false
-- without), read in the same HMGET, so a run without limits pays nothing
-- more to release them. The lease is the PX key (the server clock expires
-- it); under a test clock its recorded expiry is compared instead.
local function fence(id, epoch)
  local r = redis.call('HMGET', run_key(id), 'st', 'ep', 'wf', 'l', 'pa', 'ps', 'pr', 'k1', 'k2',
    'v')
  if r[1] ~= 'running' or r[2] ~= epoch then return nil end
  if FAKE then
    if not r[4] or tonumber(r[4]) <= NOW then return nil end
  elseif redis.call('GET', lease_key(id)) ~= epoch then
    return nil
  end
  return r[3], r[5], r[6], part(r[7], r[10]), r[8], r[9]
end

local function set_lease(id, wf, epoch, span)
  local expires = NOW + span
  redis.call('SET', lease_key(id), epoch, 'PX', math.max(1, math.ceil(span / 1000)))
  redis.call('HSET', run_key(id), 'l', num(expires), 'u', num(NOW))
  redis.call('ZADD', k('running', wf), num(expires), id)
end

local function drop_lease(id, wf)
  redis.call('DEL', lease_key(id))
  redis.call('HDEL', run_key(id), 'l')
  redis.call('ZREM', k('running', wf), id)
end

-- Priorities and versions. A run's priority is its 'pr' (absent for 0), its
-- version its 'v' (absent for 1). A due run of version 1 and priority 0 is in
-- P:due:<wf>, one of version 1 and another priority in P:pdue:<pr>:<wf>;
-- P:prios:<wf> (member and score the priority) lists the priorities other
-- than 0 whose due set is not empty. A due run of another version v is in
-- P:vdue:<v>:<pr>:<wf> (pr '0' for 0), and P:vprios:<wf> (member '<v>:<pr>',
-- score the priority) lists those that are not empty. So a claim walks only
-- the sets that hold runs, and only those of the versions it serves. Runs
-- of version 1 live where they did before versions existed.
local function due_key(wf, p)
  if plain(p) then return k('due', wf) end
  if string.find(p, ':', 1, true) then return k('vdue', p, wf) end
  return k('pdue', p, wf)
end
-- The index listing the due set of part p (not P:due): its key and p's score there.
local function part_index(wf, p)
  local pr = string.match(p, '^%d+:(.*)$')
  if pr then return k('vprios', wf), pr end
  return k('prios', wf), p
end
local function due_add(wf, p, score, id)
  if plain(p) then
    redis.call('ZADD', k('due', wf), score, id)
  else
    redis.call('ZADD', due_key(wf, p), score, id)
    local index, pr = part_index(wf, p)
    redis.call('ZADD', index, pr, p)
  end
end
-- After runs left the due set of (wf, p): drop an emptied set from its index.
local function due_gone(wf, p)
  if not plain(p) and redis.call('EXISTS', due_key(wf, p)) == 0 then
    local index = part_index(wf, p)
    redis.call('ZREM', index, p)
  end
end
local function due_rem(wf, p, id)
  redis.call('ZREM', due_key(wf, p), id)
  due_gone(wf, p)
end
-- The due sets of a workflow, highest priority first: {key, part, priority}
-- (sets of one priority in no particular order). served: nil for every
-- version, else a table whose keys are the versions wanted (strings) and
-- whose n is how many there are.
local function due_sets(wf, served)
  local out = {}
  if not served or served['1'] then
    local zero = false
    for _, pr in ipairs(redis.call('ZRANGE', k('prios', wf), 0, -1, 'REV')) do
      local n = tonumber(pr)
      if not zero and n < 0 then
        out[#out + 1] = {k('due', wf), '0', 0}
        zero = true
      end
      out[#out + 1] = {k('pdue', pr, wf), pr, n}
    end
    if not zero then out[#out + 1] = {k('due', wf), '0', 0} end
    if served and served.n == 1 then return out end
  end
  local rows = redis.call('ZRANGE', k('vprios', wf), 0, -1, 'REV', 'WITHSCORES')
  if #rows == 0 then return out end
  local more = false
  for i = 1, #rows, 2 do
    local p = rows[i]
    if not served or served[string.match(p, '^(%d+):')] then
      out[#out + 1] = {k('vdue', p, wf), p, tonumber(rows[i + 1])}
      more = true
    end
  end
  if more then table.sort(out, function(a, b) return a[3] > b[3] end) end
  return out
end

-- Concurrency limits. A run's limits are 'k1'/'m1' and 'k2'/'m2' (key and
-- max; absent without). P:holders:<key> is the set of running runs holding
-- key (lapsed leases included): its SCARD is the count. A due run a claim
-- passes over because a limit is full is blocked: out of its due set, 'bb'
-- the key, in P:blocked:<key> (score minus its priority, member its due time
-- 'w' zero-padded to 20 digits, ':', its id: the order a claim takes runs)
-- and in P:blocked-wf:<wf> (by due time; what queue_stats counts).
local function blocked_member(w, id) return string.rep('0', 20 - #w) .. w .. ':' .. id end

local function block(id, wf, pr, w, key)
  redis.call('HSET', run_key(id), 'bb', key, 'u', num(NOW))
  redis.call('ZADD', k('blocked', key), -(tonumber(pr) or 0), blocked_member(w, id))
  redis.call('ZADD', k('blocked-wf', wf), w, id)
end

-- A blocked run leaves the blocked indexes (cancelled, or unblocked).
local function unlist_blocked(id, wf, key, w)
  redis.call('ZREM', k('blocked', key), blocked_member(w, id))
  redis.call('ZREM', k('blocked-wf', wf), id)
  redis.call('HDEL', run_key(id), 'bb')
end

-- A blocked run's due time changed (an event or its last child woke it):
-- it stays blocked, ranked by the new time. 'w' must still hold the old one.
local function reblock(id, wf, pr, key, w)
  local old = redis.call('HGET', run_key(id), 'w')
  if old then redis.call('ZREM', k('blocked', key), blocked_member(old, id)) end
  redis.call('HSET', run_key(id), 'w', w, 'u', num(NOW))
  redis.call('ZADD', k('blocked', key), -(tonumber(pr) or 0), blocked_member(w, id))
  redis.call('ZADD', k('blocked-wf', wf), w, id)
end

-- The run of P:blocked:<key> a claim would take first is due again.
-- Returns true, or nil when no run is blocked by key.
local function unblock(key)
  local bk = k('blocked', key)
  while true do
    local first = redis.call('ZRANGE', bk, 0, 0)
    if #first == 0 then return nil end
    redis.call('ZREM', bk, first[1])
    local id = string.match(first[1], '^%d+:(.*)$')
    if id then
      local rk = run_key(id)
      local r = redis.call('HMGET', rk, 'wf', 'pr', 'bb', 'w', 'v')
      if r[1] and r[3] == key then
        redis.call('HDEL', rk, 'bb')
        redis.call('HSET', rk, 'u', num(NOW))
        redis.call('ZREM', k('blocked-wf', r[1]), id)
        due_add(r[1], part(r[2], r[5]), r[4], id)
        wake(r[1], 0)
        return true
      end
    end
  end
end

-- Rate limits. A run's rates are 'rk1'/'rm1'/'rp1' and 'rk2'/'rm2'/'rp2'
-- (key, max, period in us; absent without). P:rate:<key> holds the claims of
-- runs holding key (score the claim time, member the time, run id and epoch),
-- trimmed to the period as claims are added and, by the server clock,
-- expiring once its newest claim left the window. A due run a claim passes
-- over because a rate is full is blocked like one of a full limit, its 'bb'
-- RATE and the key; P:rate-waits (member the key, score a time) holds when
-- each such key's window has room again: the first claim at or after it
-- unblocks as many of the key's first blocked runs as there is room for.
local RATE = 'reflow:rate:'
local function rate_key(key) return k('rate', key) end

-- When the window of key (max, period us) has room again, or nil if it has now.
local function rate_room(key, max, period)
  local rk = rate_key(key)
  local low = '(' .. num(NOW - period)
  local n = redis.call('ZCOUNT', rk, low, '+inf')
  if n < max then return nil end
  local row = redis.call('ZRANGE', rk, low, '+inf', 'BYSCORE', 'LIMIT', n - max, 1, 'WITHSCORES')
  return tonumber(row[2]) + period
end

-- The first full rate of a run whose fields rk1, rm1, rp1, rk2, rm2, rp2 are
-- r[i..i+5]: its key and when it has room; false when none is full.
local function rate_full(r, i)
  if not r[i] then return false end
  local at = rate_room(r[i], tonumber(r[i + 1]), tonumber(r[i + 2]))
  if at then return r[i], at end
  if r[i + 3] then
    at = rate_room(r[i + 3], tonumber(r[i + 4]), tonumber(r[i + 5]))
    if at then return r[i + 3], at end
  end
  return false
end

local function rate_claim(key, period, member)
  local rk = rate_key(key)
  redis.call('ZREMRANGEBYSCORE', rk, '-inf', num(NOW - period))
  redis.call('ZADD', rk, num(NOW), member)
  if not FAKE then
    local ms = math.ceil(period / 1000) + 1
    if redis.call('PTTL', rk) < ms then redis.call('PEXPIRE', rk, ms) end
  end
end

-- A claim of run id under epoch, whose rate fields are r[i..i+5] as for
-- rate_full: one claim at now for each of its rate keys.
local function rate_claims(r, i, id, epoch)
  if not r[i] then return end
  local member = num(NOW) .. ':' .. id .. ':' .. epoch
  rate_claim(r[i], tonumber(r[i + 2]), member)
  if r[i + 3] then rate_claim(r[i + 3], tonumber(r[i + 5]), member) end
end

-- A claim passed over a due run because the rate of key is full until at:
-- blocked, and the key's wait is at the latest then.
local function rate_block(id, wf, pr, w, key, at)
  block(id, wf, pr, w, RATE .. key)
  if redis.call('ZADD', k('rate-waits'), 'LT', 'CH', num(at), key) == 1 then wake(wf, at - NOW) end
end

-- The max and period of rate key, from the first run it blocks; nil when it
-- blocks none.
local function blocked_rate(key)
  local bb = RATE .. key
  local bk = k('blocked', bb)
  while true do
    local first = redis.call('ZRANGE', bk, 0, 0)
    if #first == 0 then return nil end
    local id = string.match(first[1], '^%d+:(.*)$')
    local r = {}
    if id then r = redis.call('HMGET', run_key(id), 'bb', 'rk1', 'rm1', 'rp1', 'rk2', 'rm2', 'rp2') end
    if r[1] == bb and r[2] == key then return tonumber(r[3]), tonumber(r[4]) end
    if r[1] == bb and r[5] == key then return tonumber(r[6]), tonumber(r[7]) end
    if r[1] == bb then
      unblock(bb)  -- blocked by a rate it no longer holds: free to go
    else
      redis.call('ZREM', bk, first[1])
    end
  end
end

-- What every claim does first: for each rate key whose wait is due, unblock
-- as many of its first blocked runs as its window has room for, and while
-- some stay blocked, wait again until the oldest claim in the window leaves it.
local function release_rates()
  local waits = k('rate-waits')
  local due = redis.call('ZRANGE', waits, '-inf', num(NOW), 'BYSCORE')
  for _, key in ipairs(due) do
    redis.call('ZREM', waits, key)
    local max, period = blocked_rate(key)
    if max then
      local rk = rate_key(key)
      local low = '(' .. num(NOW - period)
      for _ = 1, max - redis.call('ZCOUNT', rk, low, '+inf') do
        if not unblock(RATE .. key) then break end
      end
      if redis.call('EXISTS', k('blocked', RATE .. key)) == 1 then
        local oldest = redis.call('ZRANGE', rk, low, '+inf', 'BYSCORE', 'LIMIT', 0, 1, 'WITHSCORES')
        local at = NOW + period
        if #oldest > 0 then at = tonumber(oldest[2]) + period end
        redis.call('ZADD', waits, num(at), key)
        wake('', at - NOW)
      end
    end
  end
end

-- A run that was free to be claimed (neither running nor blocked) ended
-- without running, say one an unblock let go, cancelled before a claim took
-- it: it passes its turn on to the first blocked run of each of its keys
-- (k1/m1, k2/m2; false: none) that has room.
local function pass_turn(k1, m1, k2, m2)
  if not k1 then return end
  if redis.call('SCARD', k('holders', k1)) < tonumber(m1) then unblock(k1) end
  if k2 and redis.call('SCARD', k('holders', k2)) < tonumber(m2) then unblock(k2) end
end

-- A run holding limit keys k1, k2 (false: none) stopped running: it leaves
-- their holders, and each key's first blocked run is due again.
local function release(id, k1, k2)
  if not k1 then return end
  redis.call('SREM', k('holders', k1), id)
  unblock(k1)
  if k2 then
    redis.call('SREM', k('holders', k2), id)
    unblock(k2)
  end
end

-- A step is stored as "seq|completed_us|status|wake_us|json" where json is
-- [output, error, attempts] written by the client.
local function step_parts(value)
  return string.match(value, '^(%d+)|(%d+)|(%a+)|(%d*)|')
end

local function put_step(id, name, status, wake_at, body)
  local sk = steps_key(id)
  local old = redis.call('HGET', sk, name)
  local seq
  if old then seq = step_parts(old) end
  if not seq then seq = num(redis.call('HINCRBY', run_key(id), 'sq', 1)) end
  redis.call('HSET', sk, name, seq .. '|' .. num(NOW) .. '|' .. status .. '|' .. wake_at .. '|' .. body)
end

-- How many events the run holds that no wait has taken yet, of any name.
-- P:evnames lists only names with a non-empty buffer (take_event removes a
-- name whose buffer it empties), so this is bounded by what is buffered.
local function buffered(id)
  local n = 0
  for _, name in ipairs(redis.call('SMEMBERS', evnames_key(id))) do
    n = n + redis.call('LLEN', ev_key(id, name))
  end
  return n
end

-- A run that ended drops its buffered events. The event ids it has seen
-- (P:evids) stay, so a redelivery stays a no-op for as long as the run exists.
local function drop_events(id)
  local names = redis.call('SMEMBERS', evnames_key(id))
  if #names == 0 then return end
  for _, name in ipairs(names) do redis.call('DEL', ev_key(id, name), evmeta_key(id, name)) end
  redis.call('DEL', evnames_key(id))
end

-- Delete one finished run and everything that points at it. Its children
-- stay (keeping their 'pa'); its lists of them go.
local function purge_one(id)
  local rk = run_key(id)
  local r = redis.call('HMGET', rk, 'wf', 'c', 'idem', 'st', 'pa', 'k1', 'k2', 'db')
  if r[4] and not TERMINAL[r[4]] then
    redis.call('ZREM', k('finished'), id)
    undone(id)
    return 0
  end
  if r[1] then
    local member = idx_member(r[2], id)
    redis.call('ZREM', k('idx'), member)
    redis.call('ZREM', k('idx', 'wf', r[1]), member)
    if r[5] then redis.call('ZREM', children_key(r[5]), member) end
    local ck = children_key(id)
    if redis.call('EXISTS', ck) == 1 then
      local steps = {}
      for _, m in ipairs(redis.call('ZRANGE', ck, 0, -1)) do
        local ps = redis.call('HGET', run_key(string.sub(m, 19)), 'ps')
        if ps and not steps[ps] then
          steps[ps] = true
          redis.call('DEL', open_key(id, ps))
        end
      end
      redis.call('DEL', ck)
    end
    if r[3] and r[3] ~= '' then
      if redis.call('HGET', k('idem', r[1]), r[3]) == id then
        redis.call('HDEL', k('idem', r[1]), r[3])
      end
      redis.call('ZREM', bykey_key(r[3]), member)
    end
    if r[8] and redis.call('HGET', k('debounce', r[1]), r[8]) == id then
      redis.call('HDEL', k('debounce', r[1]), r[8])
    end
    -- Every end of a run left these already; a run of an older version may not have.
    if r[6] then redis.call('SREM', k('holders', r[6]), id) end
    if r[7] then redis.call('SREM', k('holders', r[7]), id) end
    drop_events(id)
    redis.call('DEL', evids_key(id), steps_key(id), rk)
  end
  redis.call('ZREM', k('finished'), id)
  undone(id)
  return 1
end

-- Finish hints. With NOTIFY, finished() gathers the ids of the runs a
-- script ended and publish_finished() sends them on P:done: the ids joined
-- by "\n", as few messages as fit MAX_FINISH_PAYLOAD bytes (never one per
-- run), an id longer than MAX_FINISH_ID bytes or holding "\n" sent as an
-- empty entry, which tells listeners to look at every run they wait for
-- (the format of reflow_core.wakeups.finish_payloads).
--
-- Every script that can end runs (finish.lua, update_status.lua) calls
-- publish_finished() last, after its final write. A script that fails
-- midway is not rolled back, but whatever it published is delivered all
-- the same: publishing as each run ends would tell waiters of runs while
-- the script could still fail after them, with the caller told the
-- operation failed. Published at the end, a hint leaves only once every
-- write of the script took place; a script that fails sends none (the
-- runs it did end are seen by the waiters' next poll).
--
-- The PUBLISH is a pcall: a hint is never worth failing the script for,
-- and an ACL user allowed the wake channel alone (&P:wake, as deployments
-- set up before finish hints were) may not publish on P:done. The runs
-- still end; their waiters poll.
local MAX_FINISH_ID, MAX_FINISH_PAYLOAD = 1000, 7900
local ended = nil
if NOTIFY then ended = {} end
local function publish_finished()
  local ids = ended
  if not ids or #ids == 0 then return end
  ended = {}
  local channel = P .. ':done'
  local chunk, size = {}, 0
  for _, id in ipairs(ids) do
    local len = #id
    if len > MAX_FINISH_ID or string.find(id, '\n', 1, true) then id, len = '', 0 end
    if #chunk > 0 and size + len + 1 > MAX_FINISH_PAYLOAD then
      redis.pcall('PUBLISH', channel, table.concat(chunk, '\n'))
      chunk, size = {}, 0
    end
    chunk[#chunk + 1] = id
    size = size + len + 1
  end
  redis.pcall('PUBLISH', channel, table.concat(chunk, '\n'))
end

-- A run reached terminal status: index it by finish time, for purges and
-- in the set of its status, and with a retention set, expire up to two runs
-- that finished long enough ago. With NOTIFY its id waits for
-- publish_finished().
local function finished(id, status)
  if ended then ended[#ended + 1] = id end
  redis.call('ZADD', k('finished'), num(NOW), id)
  redis.call('ZADD', done_key(status), num(NOW), id)
  if RETENTION > 0 then
    local old = redis.call('ZRANGE', k('finished'), '-inf', '(' .. num(NOW - RETENTION),
      'BYSCORE', 'LIMIT', 0, 2)
    for _, victim in ipairs(old) do purge_one(victim) end
  end
end

-- When a delayed, sleeping or waiting run becomes claimable: at its own due
-- time w ('' = only an event wakes it), or at its deadline dl ('' or nil =
-- none) if that comes first, so the engine can fail it then. Returns the
-- time as a string ('' = none).
local function due_by_deadline(w, dl)
  if not dl or dl == '' then return w end
  if w == '' or tonumber(dl) < tonumber(w) then return dl end
  return w
end

-- Park a running run waiting: for wt (an event's name, or CHILDREN and the
-- step), due at due (us as a string; '' = only what it waits for brings it
-- back). Its lease goes, and its limit slots (p, the part of its due set,
-- k1, k2 as fence returns them); it is in its due set at that time with
-- parked 1, or kept out of the due sets with parked 2.
local function park_waiting(id, wf, wt, due, p, k1, k2)
  redis.call('HSET', run_key(id), 'st', 'waiting', 'wt', wt, 'w', due, 'u', num(NOW))
  drop_lease(id, wf)
  release(id, k1, k2)
  if due ~= '' then
    due_add(wf, p, due, id)
    redis.call('ZADD', k('parked', wf), 1, id)
    wake(wf, tonumber(due) - NOW)
  else
    redis.call('ZADD', k('parked', wf), 2, id)
  end
end

-- The fields of a run's priority, limits, rates, headers ('hd', the
-- headers' JSON text, absent without), version ('v', absent for 1) and
-- fingerprint ('fp', absent without), from lim (see create_run), appended
-- to the HSET arguments f. Returns the part of its due set (see part).
local function limit_fields(f, lim)
  local pr, v = '', lim[14]
  if not plain(lim[1]) then
    pr = lim[1]
    f[#f + 1] = 'pr'; f[#f + 1] = pr
  end
  if v and v ~= '' and v ~= '1' then
    f[#f + 1] = 'v'; f[#f + 1] = v
  else
    v = nil
  end
  if lim[15] and lim[15] ~= '' then f[#f + 1] = 'fp'; f[#f + 1] = lim[15] end
  if lim[2] ~= '' then
    f[#f + 1] = 'k1'; f[#f + 1] = lim[2]; f[#f + 1] = 'm1'; f[#f + 1] = lim[3]
    if lim[4] ~= '' then
      f[#f + 1] = 'k2'; f[#f + 1] = lim[4]; f[#f + 1] = 'm2'; f[#f + 1] = lim[5]
    end
  end
  if lim[6] and lim[6] ~= '' then
    f[#f + 1] = 'rk1'; f[#f + 1] = lim[6]; f[#f + 1] = 'rm1'; f[#f + 1] = lim[7]
    f[#f + 1] = 'rp1'; f[#f + 1] = lim[8]
    if lim[9] ~= '' then
      f[#f + 1] = 'rk2'; f[#f + 1] = lim[9]; f[#f + 1] = 'rm2'; f[#f + 1] = lim[10]
      f[#f + 1] = 'rp2'; f[#f + 1] = lim[11]
    end
  end
  if lim[13] and lim[13] ~= '' then f[#f + 1] = 'hd'; f[#f + 1] = lim[13] end
  return part(pr, v)
end

-- Debounce: P:debounce:<wf> maps a debounce key to the run last created
-- with it. If that run is open (pending or delayed, never claimed), it takes
-- the new input, priority, limits, rates, headers, version and fingerprint,
-- leaves the blocked indexes, and is due delay (us, 0 none) from now, never
-- after its deadline, in the due set of its new priority and version:
-- returns its fields. Else nil.
local function debounce(wf, key, input, delay, lim)
  local id = redis.call('HGET', k('debounce', wf), key)
  if not id then return nil end
  local rk = run_key(id)
  local r = redis.call('HMGET', rk, 'st', 'att', 'pr', 'bb', 'w', 'dl', 'v')
  if (r[1] ~= 'pending' and r[1] ~= 'delayed') or r[2] ~= '0' then return nil end
  if r[4] then unlist_blocked(id, wf, r[4], r[5]) else due_rem(wf, part(r[3], r[7]), id) end
  redis.call('HDEL', rk, 'pr', 'k1', 'm1', 'k2', 'm2', 'rk1', 'rm1', 'rp1', 'rk2', 'rm2', 'rp2',
    'hd', 'v', 'fp')
  local status, due = 'pending', num(NOW)
  if delay > 0 then status, due = 'delayed', num(NOW + delay) end
  due = due_by_deadline(due, r[6])
  local f = {'st', status, 'in', input, 'w', due, 'u', num(NOW)}
  local p = limit_fields(f, lim)
  redis.call('HSET', rk, unpack(f))
  due_add(wf, p, due, id)
  if delay > 0 then
    redis.call('ZADD', k('parked', wf), 3, id)
  else
    redis.call('ZREM', k('parked', wf), id)
  end
  wake(wf, tonumber(due) - NOW)
  return redis.call('HGETALL', rk)
end

-- The creates of one script (create_many.lua) share a batch (new_batch):
-- batch.wfs holds the workflows already added to P:workflows, and the sorted
-- set entries of the runs made (listing indexes, due sets, P:prios,
-- P:vprios, P:parked) wait in batch.z, one list per key, until zadd_held writes them
-- with one ZADD per key: at the end, and before anything reads those sets
-- (a debounced create does). With batch.checked the script has made sure
-- that every id it creates is free, so create_run does not look again.
local function new_batch() return {wfs = {}, z = {}, z_order = {}} end
local function zadd_later(batch, key, score, member)
  local entries = batch.z[key]
  if not entries then
    entries = {}
    batch.z[key] = entries
    batch.z_order[#batch.z_order + 1] = key
  end
  entries[#entries + 1] = score
  entries[#entries + 1] = member
end
local function zadd_held(batch)
  for _, key in ipairs(batch.z_order) do
    local entries = batch.z[key]
    for i = 1, #entries, 4000 do  -- unpack takes a few thousand values at most
      redis.call('ZADD', key, unpack(entries, i, math.min(i + 3999, #entries)))
    end
  end
  batch.z, batch.z_order = {}, {}
end

-- Create a pending run, or with a positive delay (us) a delayed one, due
-- then; or find the run holding the idempotency key (whatever the delay).
-- With a deadline (us after now; '' none) the run's 'dl' is now plus it, or
-- cap (us, a child's parent's deadline; nil or '' none) if that is earlier,
-- and a delayed run is due at the earlier of its delay's end and that.
-- lim is {priority, key1, max1, key2, max2, rate key1, max1, period1 (us),
-- rate key2, max2, period2, debounce key, headers (JSON text), version,
-- fingerprint} ('' for 0 / none / version 1; nil: none; the last two may be
-- missing).
-- Returns {1, now} when created (the client knows every other field),
-- {0, run} for an existing one, {2, run} for the open run a debounce key
-- updated instead (debounce), {-1} when the id is taken. A delayed run is
-- in its due set at its due time, like a sleeping run, and in P:parked with
-- score 3.
-- batch: see new_batch (nil for a create of its own).
local function create_run(id, wf, input, idem, delay, deadline, cap, lim, batch)
  if idem ~= '' then
    local existing = redis.call('HGET', k('idem', wf), idem)
    if existing then
      local found = redis.call('HGETALL', run_key(existing))
      if #found > 0 then return {0, found} end
    end
  end
  delay = tonumber(delay) or 0
  local db = lim and lim[12] or ''
  if db ~= '' then
    if batch then zadd_held(batch) end
    local found = debounce(wf, db, input, delay, lim)
    if found then return {2, found} end
  end
  local rk = run_key(id)
  if not (batch and batch.checked) and redis.call('EXISTS', rk) == 1 then return {-1} end
  local now = num(NOW)
  local dl = ''
  if deadline and deadline ~= '' then dl = num(NOW + tonumber(deadline)) end
  if cap and cap ~= '' and (dl == '' or tonumber(cap) < tonumber(dl)) then dl = cap end
  local status, due = 'pending', now
  if delay > 0 then status, due = 'delayed', due_by_deadline(num(NOW + delay), dl) end
  local f = {'id', id, 'wf', wf, 'st', status, 'in', input, 'idem', idem, 'att', 0,
    'rec', 0, 'ep', 0, 'c', now, 'u', now, 'w', due, 'sq', 0}
  if dl ~= '' then f[#f + 1] = 'dl'; f[#f + 1] = dl end
  local p = ''
  if lim then p = limit_fields(f, lim) end
  if db ~= '' then f[#f + 1] = 'db'; f[#f + 1] = db end
  redis.call('HSET', rk, unpack(f))
  local member = idx_member(now, id)
  if batch then
    if plain(p) then
      zadd_later(batch, k('due', wf), due, id)
    else
      local set = due_key(wf, p)
      if not batch.z[set] then
        local index, pr = part_index(wf, p)
        zadd_later(batch, index, pr, p)
      end
      zadd_later(batch, set, due, id)
    end
    if delay > 0 then zadd_later(batch, k('parked', wf), 3, id) end
    zadd_later(batch, k('idx'), 0, member)
    zadd_later(batch, k('idx', 'wf', wf), 0, member)
  else
    due_add(wf, p, due, id)
    if delay > 0 then redis.call('ZADD', k('parked', wf), 3, id) end
    redis.call('ZADD', k('idx'), 0, member)
    redis.call('ZADD', k('idx', 'wf', wf), 0, member)
  end
  if idem ~= '' then
    redis.call('HSET', k('idem', wf), idem, id)
    redis.call('ZADD', bykey_key(idem), 0, member)
  end
  if db ~= '' then redis.call('HSET', k('debounce', wf), db, id) end
  if not batch then
    redis.call('SADD', k('workflows'), wf)
  elseif not batch.wfs[wf] then
    redis.call('SADD', k('workflows'), wf)
    batch.wfs[wf] = true
  end
  wake(wf, tonumber(due) - NOW)
  return {1, now}
end

-- The lim table of create_run from ARGV[b..b+14].
local function lim_args(b)
  local lim = {}
  for i = 0, 14 do lim[i + 1] = ARGV[b + i] end
  return lim
end

-- A child run ended (its 'pa' and 'ps'; pa false or nil for a run without a
-- parent, which costs nothing more): it leaves its parent's open set at its
-- step, and when that empties while the parent waits for the step
-- (wait_children), the parent is due now, as deliver_event wakes a waiting run.
local function child_ended(id, pa, ps)
  if not pa or pa == '' or not ps then return end
  local open = open_key(pa, ps)
  redis.call('SREM', open, id)
  if redis.call('EXISTS', open) == 1 then return end
  local prk = run_key(pa)
  local p = redis.call('HMGET', prk, 'st', 'wt', 'wf', 'pr', 'bb', 'v')
  if p[1] ~= 'waiting' or p[2] ~= CHILDREN .. ps then return end
  if p[5] then
    reblock(pa, p[3], p[4], p[5], num(NOW))
    return
  end
  redis.call('HSET', prk, 'w', num(NOW), 'u', num(NOW))
  due_add(p[3], part(p[4], p[6]), num(NOW), pa)
  redis.call('ZADD', k('parked', p[3]), 1, pa)
  wake(p[3], 0)
end

-- Cancel every unfinished run below run id, as a cancel of each would:
-- lease broken, out of the due and parked indexes, buffered events dropped,
-- indexed as finished, out of its parent's open set. The descendants are
-- found first (depth first, each once), then cancelled, so nothing a
-- retention purge does meanwhile hides one. Their parents are the cancelled
-- run or runs below it, so no parent wakes.
local function cancel_below(id)
  local doomed, seen, stack = {}, {[id] = true}, {id}
  while #stack > 0 do
    local top = table.remove(stack)
    local members = redis.call('ZRANGE', children_key(top), 0, -1)
    for i = #members, 1, -1 do
      local cid = string.sub(members[i], 19)
      if not seen[cid] then
        seen[cid] = true
        stack[#stack + 1] = cid
      end
    end
    if top ~= id then doomed[#doomed + 1] = top end
  end
  for _, cid in ipairs(doomed) do
    local crk = run_key(cid)
    local c = redis.call('HMGET', crk, 'st', 'wf', 'pa', 'ps', 'pr', 'k1', 'k2', 'bb', 'w', 'm1',
      'm2', 'v')
    if c[1] and not TERMINAL[c[1]] then
      drop_lease(cid, c[2])
      if c[8] then unlist_blocked(cid, c[2], c[8], c[9]) end
      redis.call('HSET', crk, 'st', 'cancelled', 'w', '', 'wt', '', 'u', num(NOW))
      due_rem(c[2], part(c[5], c[12]), cid)
      if c[1] == 'running' then
        release(cid, c[6], c[7])
      elseif not c[8] then
        pass_turn(c[6], c[10], c[7], c[11])
      end
      redis.call('ZREM', k('parked', c[2]), cid)
      drop_events(cid)
      finished(cid, 'cancelled')
      if c[3] and c[4] then redis.call('SREM', open_key(c[3], c[4]), cid) end
    end
  end
end

-- finish_run of the run whose fields are a[b + 1..b + 10]: id, epoch,
-- status, output ('' none), error ('' none), '1' if a step follows, then
-- its name, status, wake and body. Returns '1', or '0' when the fence refused it.
local function finish_one(a, b)
  local id = a[b + 1]
  local wf, pa, ps, _, k1, k2 = fence(id, a[b + 2])
  if not wf then return '0' end
  if a[b + 6] == '1' then
    put_step(id, a[b + 7], a[b + 8], a[b + 9], a[b + 10])
  end
  local rk = run_key(id)
  local status = a[b + 3]
  redis.call('HSET', rk, 'st', status, 'u', num(NOW), 'w', '', 'wt', '')
  if a[b + 4] ~= '' then redis.call('HSET', rk, 'out', a[b + 4]) else redis.call('HDEL', rk, 'out') end
  if a[b + 5] ~= '' then redis.call('HSET', rk, 'err', a[b + 5]) else redis.call('HDEL', rk, 'err') end
  drop_lease(id, wf)
  release(id, k1, k2)
  drop_events(id)
  finished(id, status)
  child_ended(id, pa, ps)
  return '1'
end
-- A schedule's due indexes, both by next slot (us), a paused schedule in
-- neither: P:schedule-due (every workflow's, for due_schedules without
-- workflows) and P:schedule-due:<workflow> (its workflow's, so a read for
-- some workflows never walks the due schedules of others). index_schedule
-- puts schedule key of workflow wf at next_run in both, or, with next_run
-- nil, takes it out of both; old_wf (nil or wf: none) is a workflow whose
-- index it leaves.
local function sched_due_key(wf) return k('schedule-due', wf) end
local function index_schedule(key, wf, next_run, old_wf)
  if old_wf and old_wf ~= wf then redis.call('ZREM', sched_due_key(old_wf), key) end
  if next_run then
    redis.call('ZADD', k('schedule-due'), next_run, key)
    if wf then redis.call('ZADD', sched_due_key(wf), next_run, key) end
  else
    redis.call('ZREM', k('schedule-due'), key)
    if wf then redis.call('ZREM', sched_due_key(wf), key) end
  end
end
