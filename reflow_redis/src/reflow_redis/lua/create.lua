-- create_run. ARGV[5..8]: id, workflow, input, idempotency key ('' for none).
return create_run(ARGV[5], ARGV[6], ARGV[7], ARGV[8])
