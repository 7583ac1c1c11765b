-- save_step_result. ARGV[5..11]: id, epoch, extend (us), step name, status,
-- wake (us or ''), body (json [output, error, attempts]).
local id = ARGV[5]
local wf = fence(id, ARGV[6])
if not wf then return 0 end
set_lease(id, wf, ARGV[6], tonumber(ARGV[7]))
put_step(id, ARGV[8], ARGV[9], ARGV[10], ARGV[11])
return 1
