-- Microseconds until the next delayed, sleeping or waiting run of ARGV[5..]
-- falls due (in any of its workflow's due sets, of every version), or a rate key's window has
-- room for its blocked runs again (P:rate-waits, whatever their workflows:
-- any claim releases them), or false. Runs blocked by a concurrency limit
-- need no timer: the write that unblocks one publishes a wake-up hint.
local best = nil
local function consider(key)
  local rows = redis.call('ZRANGE', key, '(' .. num(NOW), '+inf', 'BYSCORE', 'LIMIT', 0, 1,
    'WITHSCORES')
  if #rows > 0 then
    local score = tonumber(rows[2])
    if not best or score < best then best = score end
  end
end
for i = 5, #ARGV do
  for _, set in ipairs(due_sets(ARGV[i])) do consider(set[1]) end
end
consider(k('rate-waits'))
if not best then return false end
return num(best - NOW)
