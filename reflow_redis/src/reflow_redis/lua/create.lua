-- create_run. ARGV[5..10]: id, workflow, input, idempotency key ('' for none),
-- delay (us; '' or 0 for none), deadline (us after now; '' for none).
return create_run(ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10])
