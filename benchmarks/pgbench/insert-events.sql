-- pgbench script of benchmarks/ingest.py: one transaction writes :rows event-shaped rows
-- (pgbench -D rows=1000) into a copy of usage_events with its indexes, the database's own
-- ceiling for the rows a batch writes.
\set run random(1, 1000000000000)
INSERT INTO bench_usage_events (id, account_id, license_id, meter, quantity, member_hash,
    occurred_at, received_at, period_start, idempotency_key, idempotency_expires_at,
    request_hash, actor, response)
SELECT gen_random_uuid()::text, 'pgbench-account-' || :client_id, NULL, 'api_calls', 1, NULL,
    now(), now(), date_trunc('month', now()), 'pg-' || :run || '-' || g,
    now() + interval '72 hours', md5(g::text) || md5(:run::text), 'license:pgbench',
    jsonb_build_object('id', gen_random_uuid()::text, 'account_id', 'pgbench-account',
        'license_id', 'pgbench-license', 'meter', 'api_calls', 'quantity', 1, 'counted', 1,
        'occurred_at', now()::text, 'received_at', now()::text,
        'period', jsonb_build_object('start', now()::text, 'end', now()::text),
        'used', g, 'included', 1000000000000, 'remaining', 1000000000000 - g,
        'policy', 'allow', 'over', false, 'overage_flagged', false, 'notices', '[]'::jsonb)
FROM generate_series(1, :rows) AS g
ON CONFLICT (account_id, idempotency_key) DO NOTHING;
