-- save_step_result: the saves of concurrent calls (of many runs in flight)
-- in one script (group commit), a lone save too. ARGV[5]: n, how many; then
-- 7 fields per save, as batch_fields reads them: id, epoch, extend (us),
-- step name, status, wake (us or ''), body (json [output, error, attempts]).
-- Each save is fenced on its own, then renews its lease and writes its step.
-- Returns one character per save, in order: '1' saved, '0' refused.
local n = tonumber(ARGV[5])
local a = batch_fields(n * 7, 6)
local out = {}
for i = 0, n - 1 do
  local b = i * 7
  local id, epoch = a[b + 1], a[b + 2]
  local wf = fence(id, epoch)
  if wf then
    set_lease(id, wf, epoch, tonumber(a[b + 3]))
    put_step(id, a[b + 4], a[b + 5], a[b + 6], a[b + 7])
    out[i + 1] = '1'
  else
    out[i + 1] = '0'
  end
end
return table.concat(out)
