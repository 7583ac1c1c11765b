-- list_buffered_events. ARGV[5]: run id, ARGV[6]: limit. Returns {name,
-- payload, event id ('' none)} of the run's buffered events, in arrival
-- order, limit at most; nothing for a missing or finished run.
--
-- Each name's buffer P:ev is in arrival order, and P:evm holds the arrival
-- number (and event id) of each of its events, so the buffers are merged by
-- that number, reading at most limit events of each name. Events buffered
-- by a version that kept no P:evm come first (every one arrived before the
-- upgrade), by name then in their buffer's order, without an event id.
local id, want = ARGV[5], tonumber(ARGV[6])
local st = redis.call('HGET', run_key(id), 'st')
if not st or TERMINAL[st] then return {} end
local rows = {}
for _, name in ipairs(redis.call('SMEMBERS', evnames_key(id))) do
  local ek, mk = ev_key(id, name), evmeta_key(id, name)
  local payloads = redis.call('LRANGE', ek, 0, want - 1)
  -- The arrival of the buffer's i-th event (0-based) is P:evm's (i + shift)-th.
  local shift = redis.call('LLEN', mk) - redis.call('LLEN', ek)
  local from = math.max(0, shift)
  local arrivals = {}
  if #payloads + shift > 0 then
    arrivals = redis.call('LRANGE', mk, from, shift + #payloads - 1)
  end
  for i, payload in ipairs(payloads) do
    local seq, eid = -1, ''
    local arrival = arrivals[i - 1 + shift - from + 1]
    if arrival then
      local bar = string.find(arrival, '|', 1, true)
      if bar then
        seq, eid = tonumber(string.sub(arrival, 1, bar - 1)), string.sub(arrival, bar + 1)
      else
        seq = tonumber(arrival)
      end
    end
    rows[#rows + 1] = {seq or -1, name, i, eid, payload}
  end
end
table.sort(rows, function(a, b)
  if a[1] ~= b[1] then return a[1] < b[1] end
  if a[2] ~= b[2] then return a[2] < b[2] end
  return a[3] < b[3]
end)
local out = {}
for i = 1, math.min(want, #rows) do
  out[i] = {rows[i][2], rows[i][5], rows[i][4]}
end
return out
