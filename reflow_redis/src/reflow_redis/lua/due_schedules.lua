-- due_schedules. ARGV[5]: limit (at least 1); ARGV[6]: '1' for the due
-- schedules of every workflow (P:schedule-due), '0' for those of the
-- workflows ARGV[7..] (distinct), read from each one's
-- P:schedule-due:<workflow>, so the due schedules of other workflows are
-- never walked. Earliest first, then by key, at most the limit, each as
-- {key, fields}.
--
-- A workflow's index is checked against the hashes it names: an entry that
-- does not match its schedule (left by a client of layout 2 still running
-- beside this one: a slot fired, a pause or a move it did not index) is
-- indexed again from the hash and the page read again, so a schedule is
-- never given as due by a slot it no longer has.
local limit = tonumber(ARGV[5])
local now = num(NOW)
if ARGV[6] == '1' then
  local keys = redis.call('ZRANGE', k('schedule-due'), '-inf', now, 'BYSCORE', 'LIMIT', 0, limit)
  local out = {}
  for _, key in ipairs(keys) do out[#out + 1] = {key, redis.call('HGETALL', k('sched', key))} end
  return out
end

local rows = {}
local function field(flat, name)
  for i = 1, #flat, 2 do
    if flat[i] == name then return flat[i + 1] end
  end
  return nil
end
local function due_of(wf)
  local zk = sched_due_key(wf)
  while true do
    local page = redis.call('ZRANGE', zk, '-inf', now, 'BYSCORE', 'LIMIT', 0, limit, 'WITHSCORES')
    local found, stale = {}, false
    for j = 1, #page, 2 do
      local key, at = page[j], tonumber(page[j + 1])
      local flat = redis.call('HGETALL', k('sched', key))
      local owner, next_run = field(flat, 'wf'), field(flat, 'next')
      if owner == wf and field(flat, 'p') ~= '1' and tonumber(next_run) == at then
        found[#found + 1] = {at, key, flat}
      else
        stale = true
        if not (owner and next_run) then
          redis.call('ZREM', zk, key)  -- the schedule is gone
        elseif field(flat, 'p') == '1' then
          index_schedule(key, owner, nil, wf)
        else
          index_schedule(key, owner, next_run, wf)
        end
      end
    end
    if not stale then
      for _, row in ipairs(found) do rows[#rows + 1] = row end
      return
    end
  end
end
for i = 7, #ARGV do due_of(ARGV[i]) end
-- Keys of one slot in byte order, as a sorted set orders them (Lua's '<'
-- on strings follows the server's locale).
local function bytes_before(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
table.sort(rows, function(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] end
  return bytes_before(a[2], b[2])
end)
local out = {}
for i = 1, math.min(limit, #rows) do out[i] = {rows[i][2], rows[i][3]} end
return out
