-- create_run. ARGV[5..25]: id, workflow, input, idempotency key ('' for none),
-- delay (us; '' or 0 for none), deadline (us after now; '' for none),
-- priority, the limits: key1, max1, key2, max2, the rates: key1, max1,
-- period1 (us), key2, max2, period2, the debounce key ('' for none), the
-- headers (JSON text; '' for none), the version and the fingerprint ('' for
-- none).
return create_run(ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10], nil, lim_args(11))
