-- Several save_step_result calls in one script (group commit). ARGV[5]: how
-- many; then 7 arguments per save, as in save_step.lua. Returns one 0/1 each.
local n = tonumber(ARGV[5])
local out = {}
for i = 0, n - 1 do
  local b = 6 + i * 7
  local id, epoch = ARGV[b], ARGV[b + 1]
  local wf = fence(id, epoch)
  if wf then
    set_lease(id, wf, epoch, tonumber(ARGV[b + 2]))
    put_step(id, ARGV[b + 3], ARGV[b + 4], ARGV[b + 5], ARGV[b + 6])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
