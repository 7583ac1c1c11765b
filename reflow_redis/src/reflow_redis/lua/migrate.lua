-- initialize: bring the data under the prefix to the layout ARGV[5] (the
-- version the client writes), ARGV[6] runs at most per call. P:version holds
-- the layout's version; a prefix without it holds version 1 (every release
-- before the key) or nothing yet. Returns {0, version} when the layout is
-- the client's (now, or already), {1, version} when there is more to do
-- (call again), {-1, version} for a newer layout (nothing is changed),
-- {-2, value} for a P:version that is not a version.
--
-- Version 2 indexes what version 1 did not: P:bykey:<key> (the runs of an
-- idempotency key) and P:done:<status> (finished runs by status and finish
-- time). The runs are walked in P:idx order, ARGV[6] per call, the last one
-- done kept in P:migrating, so a call never holds Redis for long, several
-- processes starting at once share the walk, and a walk cut short resumes.
-- Each run is indexed from what it is when its batch runs, and the scripts
-- of version 2 keep the indexes of the runs they touch, so runs created,
-- finished, requeued or purged meanwhile end up indexed right either way.
--
-- Version 3 indexes each schedule's next slot in its workflow's
-- P:schedule-due:<workflow> too (beside P:schedule-due), paused ones left
-- out as there. The schedules are walked in P:schedule-keys order the same
-- way, after the runs when a store is at version 1; the scripts of version 3
-- keep the index of every schedule they touch.
local want, batch = tonumber(ARGV[5]), tonumber(ARGV[6])
local stored = redis.call('GET', k('version'))
local have = 1
if stored then
  have = tonumber(stored)
  if not have or have < 1 or have ~= math.floor(have) then return {-2, stored} end
end
if have > want then return {-1, num(have)} end
if have == want then return {0, num(have)} end
local lower = '-'
local cursor = redis.call('GET', k('migrating'))
if cursor then lower = '(' .. cursor end
-- The end of a step: the layout is version v; done when that is the one wanted.
local function reached(v)
  redis.call('SET', k('version'), num(v))
  redis.call('DEL', k('migrating'))
  if v == want then return {0, num(v)} end
  return {1, num(v)}
end
if have == 1 then
  local members = redis.call('ZRANGE', k('idx'), lower, '+', 'BYLEX', 'LIMIT', 0, batch)
  for _, member in ipairs(members) do
    local id = string.sub(member, 19)
    local r = redis.call('HMGET', run_key(id), 'st', 'idem', 'u')
    if r[1] then
      if r[2] and r[2] ~= '' then redis.call('ZADD', bykey_key(r[2]), 0, member) end
      if TERMINAL[r[1]] then
        -- When it finished, as purges judge it; a run no purge index holds
        -- (an early release's) by its last change.
        local at = redis.call('ZSCORE', k('finished'), id) or r[3]
        if at then redis.call('ZADD', done_key(r[1]), at, id) end
      end
    end
  end
  if #members < batch then return reached(2) end
  redis.call('SET', k('migrating'), members[#members])
  return {1, num(have)}
end
-- have == 2
local keys = redis.call('ZRANGE', k('schedule-keys'), lower, '+', 'BYLEX', 'LIMIT', 0, batch)
for _, key in ipairs(keys) do
  local s = redis.call('HMGET', k('sched', key), 'wf', 'next', 'p')
  if s[1] and s[2] then
    if s[3] == '1' then
      index_schedule(key, s[1], nil)
    else
      index_schedule(key, s[1], s[2])
    end
  end
end
if #keys < batch then return reached(3) end
redis.call('SET', k('migrating'), keys[#keys])
return {1, num(have)}
