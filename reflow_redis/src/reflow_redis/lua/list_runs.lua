-- list_runs. ARGV[5]: limit + 1, ARGV[6]: exclusive upper bound member ('' = newest),
-- ARGV[7]: workflow ('' = all), ARGV[8..]: statuses (none = all).
-- Walks the creation index newest first; returns each run's id and fields.
local want = tonumber(ARGV[5])
local idx = k('idx')
if ARGV[7] ~= '' then idx = k('idx', 'wf', ARGV[7]) end
local statuses = nil
if #ARGV >= 8 then
  statuses = {}
  for i = 8, #ARGV do statuses[ARGV[i]] = true end
end
local out = {}
local upper = '+'
if ARGV[6] ~= '' then upper = '(' .. ARGV[6] end
while #out < want do
  local members = redis.call('ZRANGE', idx, upper, '-', 'BYLEX', 'REV', 'LIMIT', 0, 200)
  if #members == 0 then break end
  for _, member in ipairs(members) do
    local id = string.sub(member, 19)
    local fields = redis.call('HGETALL', run_key(id))
    if #fields == 0 then
      redis.call('ZREM', idx, member)  -- a run expired by retention elsewhere
    else
      local keep = true
      if statuses then
        keep = false
        for i = 1, #fields, 2 do
          if fields[i] == 'st' then keep = statuses[fields[i + 1]] == true end
        end
      end
      if keep then
        out[#out + 1] = {id, fields}
        if #out >= want then break end
      end
    end
  end
  upper = '(' .. members[#members]
end
return out
