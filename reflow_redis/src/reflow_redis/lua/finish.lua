-- finish_run: the finishes of concurrent calls (of many runs in flight) in
-- one script (group commit), a lone one too. ARGV[5]: n, how many; then 10
-- fields per run, as batch_fields reads them: id, epoch, status, output (''
-- none), error ('' none), '1' if a step follows (else '0'), and the step's
-- name, status, wake and body (empty when there is no step). Each finish is
-- fenced on its own (see finish_one). Returns one character per run, in
-- order: '1' finished, '0' refused. The runs finished are named in finish
-- hints on P:done, one message for the batch (publish_finished).
local n = tonumber(ARGV[5])
local a = batch_fields(n * 10, 6)
local out = {}
for i = 0, n - 1 do out[i + 1] = finish_one(a, i * 10) end
publish_finished()  -- last: see publish_finished
return table.concat(out)
