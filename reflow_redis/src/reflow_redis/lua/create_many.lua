-- Several create_run calls in one script (group commit). ARGV[5]: how many;
-- then 19 arguments per run: id, workflow, input, idempotency key ('' none),
-- delay (us; '' or 0 none), deadline (us after now; '' none), priority,
-- key1, max1, key2, max2, rate key1, max1, period1 (us), rate key2, max2,
-- period2, debounce key ('' none), headers (JSON text; '' none). Returns
-- create_run's reply for each, in order.
local n = tonumber(ARGV[5])
local out = {}
for i = 0, n - 1 do
  local b = 6 + i * 19
  out[#out + 1] = create_run(ARGV[b], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4],
    ARGV[b + 5], nil, lim_args(b + 6))
end
return out
