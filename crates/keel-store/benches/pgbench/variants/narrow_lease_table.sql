-- jobs: 10
-- The lease state in a narrow table of its own (narrow_lease_table.schema.sql): a claim
-- writes only its row; the completion deletes it and writes the command's row and attempt.
WITH picked AS (
  SELECT l.id FROM (
    (SELECT id, priority, run_at FROM leases WHERE org_id = '00000000-0000-0000-0000-000000000001' AND target_agent_id = ('00000000-0000-0000-0000-0000000001'||lpad((:client_id+1)::text,2,'0'))::uuid AND status = 0 ORDER BY priority DESC, run_at, id)
    UNION ALL
    (SELECT id, priority, run_at FROM leases WHERE org_id = '00000000-0000-0000-0000-000000000001' AND queue = 'work' AND target_agent_id IS NULL AND NOT EXISTS (SELECT 1 FROM paused_queues WHERE org_id = '00000000-0000-0000-0000-000000000001' AND queue = 'work') AND status = 0 ORDER BY priority DESC, run_at, id)
    ORDER BY priority DESC, run_at, id) AS cand
  JOIN leases l ON l.id = cand.id
  WHERE l.status = 0 AND l.run_at <= keel_now()
    AND EXISTS (SELECT 1 FROM agents WHERE org_id = '00000000-0000-0000-0000-000000000001' AND id = ('00000000-0000-0000-0000-0000000001'||lpad((:client_id+1)::text,2,'0'))::uuid AND cordoned_at IS NULL)
  ORDER BY cand.priority DESC, cand.run_at, cand.id
  LIMIT 10 FOR UPDATE OF l SKIP LOCKED),
claimed AS (
  UPDATE leases SET status = 1, attempt_number = attempt_number + 1, claimed_at = keel_now(),
    claim_token = replace(gen_random_uuid()::text, '-', ''),
    lease_expires_at = keel_now() + lease_duration_ms * interval '1 millisecond', claimed_by = ('00000000-0000-0000-0000-0000000001'||lpad((:client_id+1)::text,2,'0'))::uuid
  FROM picked WHERE leases.id = picked.id RETURNING leases.*)
SELECT coalesce(array_agg(c.id), '{}') AS ids, coalesce(array_agg(claimed.claim_token), '{}') AS tokens, count(c.params) AS n
FROM claimed JOIN commands c ON c.id = claimed.id
\gset
WITH reports AS (SELECT * FROM unnest(:ids::uuid[], :tokens::text[]) AS r (id, token)),
gone AS (
  DELETE FROM leases l USING reports r
  WHERE l.id = r.id AND l.status = 1 AND l.claim_token = r.token AND l.claimed_by = ('00000000-0000-0000-0000-0000000001'||lpad((:client_id+1)::text,2,'0'))::uuid
  RETURNING l.*),
done AS (
  UPDATE commands c SET status = 'completed', attempt_outcome = 'completed', attempts = c.attempts + 1,
    attempt_number = g.attempt_number, claimed_by = g.claimed_by, claimed_at = g.claimed_at,
    result = 'null'::jsonb, finished_at = keel_now(), updated_at = keel_now()
  FROM gone g WHERE c.id = g.id
  RETURNING c.*),
ended AS (INSERT INTO command_attempts (command_id, attempt, agent_id, claimed_at, ended_at, outcome, error)
  SELECT id, attempt_number, claimed_by, claimed_at, keel_now(), attempt_outcome, NULL::jsonb FROM done)
SELECT count(*) FROM done;
