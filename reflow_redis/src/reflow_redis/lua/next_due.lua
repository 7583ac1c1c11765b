-- Microseconds until the next delayed, sleeping or waiting run of ARGV[5..]
-- falls due, or false.
local best = nil
for i = 5, #ARGV do
  local rows = redis.call('ZRANGE', k('due', ARGV[i]), '(' .. num(NOW), '+inf', 'BYSCORE',
    'LIMIT', 0, 1, 'WITHSCORES')
  if #rows > 0 then
    local score = tonumber(rows[2])
    if not best or score < best then best = score end
  end
end
if not best then return false end
return num(best - NOW)
