-- finish_run. ARGV[5]: how many; then 10 arguments per run: id, epoch, status,
-- output ('' none), error ('' none), '1' if a step follows (else '0'), and the
-- step's name, status, wake and body (empty when there is no step).
-- Returns one 0/1 per run. Several runs' finishes share one call (group commit).
local n = tonumber(ARGV[5])
local out = {}
for i = 0, n - 1 do out[#out + 1] = finish_one(6 + i * 10) end
return out
