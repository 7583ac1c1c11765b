-- get_runs. ARGV[5]: how many ids, ARGV[6..]: the ids, as batch_fields reads
-- them. Returns each run's fields (HGETALL, as get_run reads them) in the
-- order of the ids, an empty list for a run that does not exist. Reads only.
local n = tonumber(ARGV[5])
local ids = batch_fields(n, 6)
local out = {}
for i = 1, n do out[i] = redis.call('HGETALL', run_key(ids[i])) end
return out
