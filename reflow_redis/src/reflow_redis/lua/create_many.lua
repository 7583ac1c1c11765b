-- Many creates in one script, each as create_run makes it, in order (so an
-- idempotency or debounce key seen twice finds what the earlier item made):
-- create_runs, whose batch is written whole or not at all, and concurrent
-- create_run calls sharing one call (group commit), each on its own.
--
-- ARGV[5]: n, how many. ARGV[6]: '' for a group commit; for create_runs a
-- token naming the batch. The items' fields come as columns: n texts joined
-- by NUL characters (names, ids and keys hold none), '' for a column that
-- is empty for every item. ARGV[7]: the run ids; ARGV[8]: the workflows;
-- ARGV[9]: the idempotency keys; ARGV[10]: the headers (JSON text);
-- ARGV[11]: each item's shape, '' for none (no delay, deadline, priority,
-- limit, rate, debounce key, version other than 1 or fingerprint), else its
-- index in the shapes that follow: ARGV[12] how many, then 16 arguments
-- each: delay (us; '' none), deadline (us after now; '' none), priority,
-- key1, max1, key2, max2, rate key1, max1, period1 (us), rate key2, max2,
-- period2, debounce key ('' none), version, fingerprint ('' none).
-- Then the inputs: one column, or (when one holds a NUL) one argument each.
--
-- create_runs first makes sure no id is taken (none is written otherwise:
-- a script that fails halfway keeps what it wrote) and returns {-1, index}
-- (0-based) of the first that is. The wake-up hints go out once, at the end.
-- Returns {now, one reply per item}: 1 for a run created now, else
-- create_run's reply ({0, run}, {2, run}, or in a group commit {-1}).
--
-- create_runs leaves P:batch:<token> for a minute: the items that found a
-- run rather than made one, so a try again after a lost reply gets the
-- same reply and changes nothing.
local n = tonumber(ARGV[5])
local token = ARGV[6]
local marker = token ~= '' and k('batch', token)

if marker then
  local saved = redis.call('GET', marker)
  if saved then
    saved = cjson.decode(saved)
    local out = {saved[1]}
    for i = 1, n do out[i + 1] = 1 end
    for _, e in ipairs(saved[2]) do
      out[e[1] + 1] = {e[2], redis.call('HGETALL', run_key(e[3]))}
    end
    return out
  end
end

local function column(text)
  local out, pos = {}, 1
  for i = 1, n - 1 do
    local stop = string.find(text, '\0', pos, true)
    out[i] = string.sub(text, pos, stop - 1)
    pos = stop + 1
  end
  out[n] = string.sub(text, pos)
  return out
end
local function optional(text)
  if text == '' then return false end
  return column(text)
end

local ids = column(ARGV[7])
local batch = new_batch()
if marker then
  local keys, seen = {}, {}
  for i = 1, n do
    local id = ids[i]
    if seen[id] then return {-1, i - 1} end
    seen[id] = true
    keys[i] = run_key(id)
  end
  local taken = 0
  for i = 1, n, 1000 do
    taken = taken + redis.call('EXISTS', unpack(keys, i, math.min(i + 999, n)))
  end
  if taken > 0 then
    for i = 1, n do
      if redis.call('EXISTS', keys[i]) == 1 then return {-1, i - 1} end
    end
  end
  batch.checked = true
end

local wfs = column(ARGV[8])
local idems = optional(ARGV[9])
local heads = optional(ARGV[10])
local shapes = optional(ARGV[11])
local at = 13 + tonumber(ARGV[12]) * 16
local inputs
if #ARGV == at then
  inputs = column(ARGV[at])
else
  inputs = {}
  for i = 1, n do inputs[i] = ARGV[at + i - 1] end
end

hold_wakes()
local now = num(NOW)
local out = {now}
local found = {}
for i = 1, n do
  local delay, deadline, lim = '', '', nil
  local shape = shapes and shapes[i] or ''
  local head = heads and heads[i] or ''
  if shape ~= '' then
    local b = 13 + tonumber(shape) * 16
    delay, deadline = ARGV[b], ARGV[b + 1]
    lim = {}
    for j = 1, 12 do lim[j] = ARGV[b + 1 + j] end
    lim[13] = head
    lim[14], lim[15] = ARGV[b + 14], ARGV[b + 15]
  elseif head ~= '' then
    lim = {'0', '', '', '', '', '', '', '', '', '', '', '', head}
  end
  local made = create_run(ids[i], wfs[i], inputs[i], idems and idems[i] or '', delay, deadline,
    nil, lim, batch)
  if made[1] == 1 then
    out[i + 1] = 1
  else
    out[i + 1] = made
    if marker then
      local run, id = made[2], nil
      for j = 1, #run, 2 do
        if run[j] == 'id' then id = run[j + 1] end
      end
      found[#found + 1] = {i, made[1], id}
    end
  end
end
zadd_held(batch)
if marker then
  redis.call('SET', marker, cjson.encode({now, found}), 'PX', 60000)
end
publish_held()
return out
