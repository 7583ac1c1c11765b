-- finished_history. ARGV[5]: minutes (1 to 1440, checked by the client).
-- Returns {minute start (us), status, count} for each minute of the last
-- ARGV[5] (the current one included) and each terminal status with runs
-- that finished then, from the sets P:done:<status> (finish time -> id).
--
-- Why these sets and not counters per minute: a run is in the set of its
-- status exactly while it is stored and finished, written by the same
-- scripts that finish, requeue and purge it, so the count is of the runs
-- stored right now and cannot drift; ZADD and ZREM are idempotent, so a
-- retried script or the backfill of older data cannot count a run twice.
-- Counters would have to be decremented in the right minute by every
-- requeue and purge (retention's included), exactly once, and expired.
--
-- The cost: for each status, a ZRANGE ... LIMIT 0 1 finds the first run at
-- or after a minute and a ZCOUNT counts its minute, both O(log n), then the
-- walk jumps to the next minute. So a call costs at most two commands per
-- minute with runs and status, plus three: it grows with the minutes asked
-- for and never reads a run, nor anything older than the window.
local MINUTE = 60000000
local current = NOW - NOW % MINUTE
local stop = '(' .. num(current + MINUTE)
local out = {}
for _, status in ipairs({'completed', 'failed', 'cancelled'}) do
  local key = done_key(status)
  local from = current - (tonumber(ARGV[5]) - 1) * MINUTE
  while true do
    local row = redis.call('ZRANGE', key, num(from), stop, 'BYSCORE', 'LIMIT', 0, 1, 'WITHSCORES')
    if #row == 0 then break end
    local at = tonumber(row[2])
    local minute = at - at % MINUTE
    from = minute + MINUTE
    out[#out + 1] = {num(minute), status,
      redis.call('ZCOUNT', key, num(minute), '(' .. num(from))}
  end
end
return out
