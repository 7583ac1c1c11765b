-- purge_finished. ARGV[5]: age (us), ARGV[6]: batch. Returns how many runs were deleted.
local old = redis.call('ZRANGE', k('finished'), '-inf', '(' .. num(NOW - tonumber(ARGV[5])),
  'BYSCORE', 'LIMIT', 0, tonumber(ARGV[6]))
local n = 0
for _, id in ipairs(old) do n = n + purge_one(id) end
return {n, #old}
