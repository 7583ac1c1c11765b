-- heartbeat_run. ARGV[5..7]: id, epoch, extend (us).
local wf = fence(ARGV[5], ARGV[6])
if not wf then return 0 end
set_lease(ARGV[5], wf, ARGV[6], tonumber(ARGV[7]))
return 1
