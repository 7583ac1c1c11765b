-- start_child. ARGV[5..27]: parent id, parent epoch, step, child id, workflow,
-- input, delay (us; '' or 0 none), deadline (us after now; '' none),
-- priority, key1, max1, key2, max2, rate key1, max1, period1 (us), rate
-- key2, max2, period2, debounce key ('' none: a child takes none), headers
-- (JSON text; '' none), version, fingerprint ('' none).
-- Fenced on the parent's lease. Returns false when the lease is lost, {0,
-- child} when the id is already this parent's child at this step (nothing
-- written), {-1} when it is taken otherwise, {1, child} when created as
-- create_run creates a run, with 'pa'/'ps', its deadline capped by the
-- parent's, listed in P:children:<parent> and open at the step.
local parent, step, id = ARGV[5], ARGV[7], ARGV[8]
local wf = fence(parent, ARGV[6])
if not wf then return false end
local found = redis.call('HGETALL', run_key(id))
if #found > 0 then
  local pa, ps
  for i = 1, #found, 2 do
    if found[i] == 'pa' then pa = found[i + 1] elseif found[i] == 'ps' then ps = found[i + 1] end
  end
  if pa == parent and ps == step then return {0, found} end
  return {-1}
end
local made = create_run(id, ARGV[9], ARGV[10], '', ARGV[11], ARGV[12],
  redis.call('HGET', run_key(parent), 'dl'), lim_args(13))
local rk = run_key(id)
redis.call('HSET', rk, 'pa', parent, 'ps', step)
redis.call('ZADD', children_key(parent), 0, idx_member(made[2], id))
redis.call('SADD', open_key(parent, step), id)
return {1, redis.call('HGETALL', rk)}
