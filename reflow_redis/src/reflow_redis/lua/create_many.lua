-- Several create_run calls in one script (group commit). ARGV[5]: how many;
-- then 11 arguments per run: id, workflow, input, idempotency key ('' none),
-- delay (us; '' or 0 none), deadline (us after now; '' none), priority,
-- key1, max1, key2, max2 ('' none). Returns create_run's reply for each, in
-- order.
local n = tonumber(ARGV[5])
local out = {}
for i = 0, n - 1 do
  local b = 6 + i * 11
  out[#out + 1] = create_run(ARGV[b], ARGV[b + 1], ARGV[b + 2], ARGV[b + 3], ARGV[b + 4],
    ARGV[b + 5], nil, {ARGV[b + 6], ARGV[b + 7], ARGV[b + 8], ARGV[b + 9], ARGV[b + 10]})
end
return out
