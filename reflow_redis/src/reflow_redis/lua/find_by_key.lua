-- find_runs_by_key. ARGV[5]: idempotency key, ARGV[6]: limit. Returns
-- {id, fields} of the runs created with the key, of every workflow, newest
-- first (creation time, then id), from P:bykey:<key>: a lookup, never a
-- scan. An entry whose run is gone or holds another key (written behind the
-- scripts' back) is dropped on the way, as list_runs drops its own.
local key, want = ARGV[5], tonumber(ARGV[6])
local bk = bykey_key(key)
local out = {}
local upper = '+'
while #out < want do
  local members = redis.call('ZRANGE', bk, upper, '-', 'BYLEX', 'REV', 'LIMIT', 0,
    math.min(want - #out, 200))
  if #members == 0 then break end
  for _, member in ipairs(members) do
    local id = string.sub(member, 19)
    local fields = redis.call('HGETALL', run_key(id))
    local held = false
    for i = 1, #fields, 2 do
      if fields[i] == 'idem' then held = fields[i + 1] == key end
    end
    if held then
      out[#out + 1] = {id, fields}
    else
      redis.call('ZREM', bk, member)
    end
  end
  upper = '(' .. members[#members]
end
return out
