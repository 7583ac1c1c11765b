-- create_run. ARGV[5..15]: id, workflow, input, idempotency key ('' for none),
-- delay (us; '' or 0 for none), deadline (us after now; '' for none),
-- priority, then the limits: key1, max1, key2, max2 ('' for none).
return create_run(ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10], nil,
  {ARGV[11], ARGV[12], ARGV[13], ARGV[14], ARGV[15]})
