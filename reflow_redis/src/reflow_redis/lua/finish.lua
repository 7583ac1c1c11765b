-- finish_run. ARGV[5..9]: id, epoch, status, output ('' none), error ('' none);
-- ARGV[10] '1' if a step follows in ARGV[11..14]: name, status, wake, body.
local id = ARGV[5]
local wf = fence(id, ARGV[6])
if not wf then return 0 end
if ARGV[10] == '1' then put_step(id, ARGV[11], ARGV[12], ARGV[13], ARGV[14]) end
local rk = run_key(id)
redis.call('HSET', rk, 'st', ARGV[7], 'u', num(NOW), 'w', '', 'wt', '')
if ARGV[8] ~= '' then redis.call('HSET', rk, 'out', ARGV[8]) else redis.call('HDEL', rk, 'out') end
if ARGV[9] ~= '' then redis.call('HSET', rk, 'err', ARGV[9]) else redis.call('HDEL', rk, 'err') end
drop_lease(id, wf)
finished(id)
return 1
