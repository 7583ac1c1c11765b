-- The storage clock every other script judges by (TIME, or the test clock),
-- in microseconds since the epoch.
return num(NOW)
