-- Microseconds until the next delayed, sleeping or waiting run of ARGV[5..]
-- falls due (in any of its workflow's due sets), or false. Blocked runs
-- need no timer: the write that unblocks one publishes a wake-up hint.
local best = nil
for i = 5, #ARGV do
  for _, set in ipairs(due_sets(ARGV[i])) do
    local rows = redis.call('ZRANGE', set[1], '(' .. num(NOW), '+inf', 'BYSCORE', 'LIMIT', 0, 1,
      'WITHSCORES')
    if #rows > 0 then
      local score = tonumber(rows[2])
      if not best or score < best then best = score end
    end
  end
end
if not best then return false end
return num(best - NOW)
