-- claim_schedule_slot. ARGV[5..28]: key, slot (us), next run (us), run id,
-- workflow, input, idempotency key, delay (us; '' or 0 none: schedules give
-- none), deadline (us after now; '' none), priority, key1, max1, key2, max2,
-- rate key1, max1, period1 (us), rate key2, max2, period2, debounce key
-- ('' none), headers (JSON text; '' none), version, fingerprint ('' none).
-- Returns {0} if the slot is gone or the schedule is paused, {-2, run} when
-- the key's run has other input (nothing changed), else create_run's reply.
local key = ARGV[5]
local sk = k('sched', key)
local cur = redis.call('HMGET', sk, 'next', 'p', 'wf')
if cur[1] ~= ARGV[6] or cur[2] == '1' then return {0} end
local wf, input, idem = ARGV[9], ARGV[10], ARGV[11]
local existing = redis.call('HGET', k('idem', wf), idem)
if existing then
  local found = redis.call('HGETALL', run_key(existing))
  if #found > 0 then
    for i = 1, #found, 2 do
      if found[i] == 'in' and found[i + 1] ~= input then return {-2, found} end
    end
  end
end
redis.call('HSET', sk, 'next', ARGV[7], 'u', num(NOW))
index_schedule(key, cur[3] or nil, ARGV[7])
return create_run(ARGV[8], wf, input, idem, ARGV[12], ARGV[13], nil, lim_args(14))
