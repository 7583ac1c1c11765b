-- wait_children. ARGV[5..10]: id, epoch, then the step (name, status, wake,
-- body) to upsert. Returns 1 when no child of the run at that step is
-- unfinished (the run keeps its lease), 0 when it parks the run waiting for
-- them, false when the lease is lost. A parked run is due at its deadline
-- ('dl', parked 1) or only when its last child ends (parked 2, out of P:due).
local id, name = ARGV[5], ARGV[7]
local wf, _, _, p, k1, k2 = fence(id, ARGV[6])
if not wf then return false end
put_step(id, name, ARGV[8], ARGV[9], ARGV[10])
local rk = run_key(id)
if redis.call('EXISTS', open_key(id, name)) == 0 then
  redis.call('HSET', rk, 'u', num(NOW))
  return 1
end
park_waiting(id, wf, CHILDREN .. name, redis.call('HGET', rk, 'dl') or '', p, k1, k2)
return 0
