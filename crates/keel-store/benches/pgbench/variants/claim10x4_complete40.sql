-- jobs: 40
-- Grouped completions: four claims of 10 (each its own transaction), then one completion
-- of the 40, as keel's statements (keel_claim_complete.sql) write them.
WITH picked AS (
  SELECT c.id FROM (
    (SELECT id, priority, run_at FROM commands WHERE org_id = '00000000-0000-0000-0000-000000000001' AND target_agent_id = ('00000000-0000-0000-0000-0000000001'||lpad((:client_id+1)::text,2,'0'))::uuid AND status = 'pending' AND scheduled = 0 ORDER BY priority DESC, run_at, id)
    UNION ALL
    (SELECT id, priority, run_at FROM (SELECT id, priority, run_at FROM commands WHERE org_id = '00000000-0000-0000-0000-000000000001' AND target_agent_id = ('00000000-0000-0000-0000-0000000001'||lpad((:client_id+1)::text,2,'0'))::uuid AND status = 'pending' AND scheduled = 1 AND run_at <= keel_now() ORDER BY run_at LIMIT 1000) AS due ORDER BY priority DESC, run_at, id)
    UNION ALL
    (SELECT id, priority, run_at FROM commands WHERE org_id = '00000000-0000-0000-0000-000000000001' AND queue = 'work' AND target_agent_id IS NULL AND NOT EXISTS (SELECT 1 FROM paused_queues WHERE org_id = '00000000-0000-0000-0000-000000000001' AND queue = 'work') AND status = 'pending' AND scheduled = 0 ORDER BY priority DESC, run_at, id)
    UNION ALL
    (SELECT id, priority, run_at FROM (SELECT id, priority, run_at FROM commands WHERE org_id = '00000000-0000-0000-0000-000000000001' AND queue = 'work' AND target_agent_id IS NULL AND NOT EXISTS (SELECT 1 FROM paused_queues WHERE org_id = '00000000-0000-0000-0000-000000000001' AND queue = 'work') AND status = 'pending' AND scheduled = 1 AND run_at <= keel_now() ORDER BY run_at LIMIT 1000) AS due ORDER BY priority DESC, run_at, id)
    ORDER BY priority DESC, run_at, id) AS cand
  JOIN commands c ON c.id = cand.id
  WHERE c.status = 'pending' AND c.scheduled <> 2
    AND EXISTS (SELECT 1 FROM agents WHERE org_id = '00000000-0000-0000-0000-000000000001' AND id = ('00000000-0000-0000-0000-0000000001'||lpad((:client_id+1)::text,2,'0'))::uuid AND cordoned_at IS NULL)
  ORDER BY cand.priority DESC, cand.run_at, cand.id
  LIMIT 10 FOR UPDATE OF c SKIP LOCKED),
claimed AS (
  UPDATE commands SET status = 'executing', scheduled = 0, attempts = attempts + 1, attempt_number = attempt_number + 1, claimed_at = keel_now(),
    claim_token = replace(gen_random_uuid()::text, '-', ''),
    lease_expires_at = keel_now() + lease_duration_ms * interval '1 millisecond',
    claimed_by = ('00000000-0000-0000-0000-0000000001'||lpad((:client_id+1)::text,2,'0'))::uuid, updated_at = keel_now()
  FROM picked WHERE commands.id = picked.id AND commands.status = 'pending'
  RETURNING commands.*),
promoted AS (
  UPDATE commands SET scheduled = 0 WHERE id IN (
    SELECT c.id FROM (
      (SELECT id, priority, run_at FROM (SELECT id, priority, run_at FROM commands WHERE org_id = '00000000-0000-0000-0000-000000000001' AND target_agent_id = ('00000000-0000-0000-0000-0000000001'||lpad((:client_id+1)::text,2,'0'))::uuid AND status = 'pending' AND scheduled = 1 AND run_at <= keel_now() ORDER BY run_at LIMIT 1000) AS due ORDER BY priority DESC, run_at, id)
      UNION ALL
      (SELECT id, priority, run_at FROM (SELECT id, priority, run_at FROM commands WHERE org_id = '00000000-0000-0000-0000-000000000001' AND queue = 'work' AND target_agent_id IS NULL AND NOT EXISTS (SELECT 1 FROM paused_queues WHERE org_id = '00000000-0000-0000-0000-000000000001' AND queue = 'work') AND status = 'pending' AND scheduled = 1 AND run_at <= keel_now() ORDER BY run_at LIMIT 1000) AS due ORDER BY priority DESC, run_at, id)
    ) AS due JOIN commands c ON c.id = due.id
    WHERE c.status = 'pending' AND c.scheduled = 1 AND c.id NOT IN (SELECT id FROM picked)
    FOR UPDATE OF c SKIP LOCKED))
SELECT coalesce(array_agg(id), '{}') AS ids0, coalesce(array_agg(claim_token), '{}') AS tokens0 FROM claimed
\gset
WITH picked AS (
  SELECT c.id FROM (
    (SELECT id, priority, run_at FROM commands WHERE org_id = '00000000-0000-0000-0000-000000000001' AND target_agent_id = ('00000000-0000-0000-0000-0000000001'||lpad((:client_id+1)::text,2,'0'))::uuid AND status = 'pending' AND scheduled = 0 ORDER BY priority DESC, run_at, id)
    UNION ALL
    (SELECT id, priority, run_at FROM (SELECT id, priority, run_at FROM commands WHERE org_id = '00000000-0000-0000-0000-000000000001' AND target_agent_id = ('00000000-0000-0000-0000-0000000001'||lpad((:client_id+1)::text,2,'0'))::uuid AND status = 'pending' AND scheduled = 1 AND run_at <= keel_now() ORDER BY run_at LIMIT 1000) AS due ORDER BY priority DESC, run_at, id)
    UNION ALL
    (SELECT id, priority, run_at FROM commands WHERE org_id = '00000000-0000-0000-0000-000000000001' AND queue = 'work' AND target_agent_id IS NULL AND NOT EXISTS (SELECT 1 FROM paused_queues WHERE org_id = '00000000-0000-0000-0000-000000000001' AND queue = 'work') AND status = 'pending' AND scheduled = 0 ORDER BY priority DESC, run_at, id)
    UNION ALL
    (SELECT id, priority, run_at FROM (SELECT id, priority, run_at FROM commands WHERE org_id = '00000000-0000-0000-0000-000000000001' AND queue = 'work' AND target_agent_id IS NULL AND NOT EXISTS (SELECT 1 FROM paused_queues WHERE org_id = '00000000-0000-0000-0000-000000000001' AND queue = 'work') AND status = 'pending' AND scheduled = 1 AND run_at <= keel_now() ORDER BY run_at LIMIT 1000) AS due ORDER BY priority DESC, run_at, id)
    ORDER BY priority DESC, run_at, id) AS cand
  JOIN commands c ON c.id = cand.id
  WHERE c.status = 'pending' AND c.scheduled <> 2
    AND EXISTS (SELECT 1 FROM agents WHERE org_id = '00000000-0000-0000-0000-000000000001' AND id = ('00000000-0000-0000-0000-0000000001'||lpad((:client_id+1)::text,2,'0'))::uuid AND cordoned_at IS NULL)
  ORDER BY cand.priority DESC, cand.run_at, cand.id
  LIMIT 10 FOR UPDATE OF c SKIP LOCKED),
claimed AS (
  UPDATE commands SET status = 'executing', scheduled = 0, attempts = attempts + 1, attempt_number = attempt_number + 1, claimed_at = keel_now(),
    claim_token = replace(gen_random_uuid()::text, '-', ''),
    lease_expires_at = keel_now() + lease_duration_ms * interval '1 millisecond',
    claimed_by = ('00000000-0000-0000-0000-0000000001'||lpad((:client_id+1)::text,2,'0'))::uuid, updated_at = keel_now()
  FROM picked WHERE commands.id = picked.id AND commands.status = 'pending'
  RETURNING commands.*),
promoted AS (
  UPDATE commands SET scheduled = 0 WHERE id IN (
    SELECT c.id FROM (
      (SELECT id, priority, run_at FROM (SELECT id, priority, run_at FROM commands WHERE org_id = '00000000-0000-0000-0000-000000000001' AND target_agent_id = ('00000000-0000-0000-0000-0000000001'||lpad((:client_id+1)::text,2,'0'))::uuid AND status = 'pending' AND scheduled = 1 AND run_at <= keel_now() ORDER BY run_at LIMIT 1000) AS due ORDER BY priority DESC, run_at, id)
      UNION ALL
      (SELECT id, priority, run_at FROM (SELECT id, priority, run_at FROM commands WHERE org_id = '00000000-0000-0000-0000-000000000001' AND queue = 'work' AND target_agent_id IS NULL AND NOT EXISTS (SELECT 1 FROM paused_queues WHERE org_id = '00000000-0000-0000-0000-000000000001' AND queue = 'work') AND status = 'pending' AND scheduled = 1 AND run_at <= keel_now() ORDER BY run_at LIMIT 1000) AS due ORDER BY priority DESC, run_at, id)
    ) AS due JOIN commands c ON c.id = due.id
    WHERE c.status = 'pending' AND c.scheduled = 1 AND c.id NOT IN (SELECT id FROM picked)
    FOR UPDATE OF c SKIP LOCKED))
SELECT coalesce(array_agg(id), '{}') AS ids1, coalesce(array_agg(claim_token), '{}') AS tokens1 FROM claimed
\gset
WITH picked AS (
  SELECT c.id FROM (
    (SELECT id, priority, run_at FROM commands WHERE org_id = '00000000-0000-0000-0000-000000000001' AND target_agent_id = ('00000000-0000-0000-0000-0000000001'||lpad((:client_id+1)::text,2,'0'))::uuid AND status = 'pending' AND scheduled = 0 ORDER BY priority DESC, run_at, id)
    UNION ALL
    (SELECT id, priority, run_at FROM (SELECT id, priority, run_at FROM commands WHERE org_id = '00000000-0000-0000-0000-000000000001' AND target_agent_id = ('00000000-0000-0000-0000-0000000001'||lpad((:client_id+1)::text,2,'0'))::uuid AND status = 'pending' AND scheduled = 1 AND run_at <= keel_now() ORDER BY run_at LIMIT 1000) AS due ORDER BY priority DESC, run_at, id)
    UNION ALL
    (SELECT id, priority, run_at FROM commands WHERE org_id = '00000000-0000-0000-0000-000000000001' AND queue = 'work' AND target_agent_id IS NULL AND NOT EXISTS (SELECT 1 FROM paused_queues WHERE org_id = '00000000-0000-0000-0000-000000000001' AND queue = 'work') AND status = 'pending' AND scheduled = 0 ORDER BY priority DESC, run_at, id)
    UNION ALL
    (SELECT id, priority, run_at FROM (SELECT id, priority, run_at FROM commands WHERE org_id = '00000000-0000-0000-0000-000000000001' AND queue = 'work' AND target_agent_id IS NULL AND NOT EXISTS (SELECT 1 FROM paused_queues WHERE org_id = '00000000-0000-0000-0000-000000000001' AND queue = 'work') AND status = 'pending' AND scheduled = 1 AND run_at <= keel_now() ORDER BY run_at LIMIT 1000) AS due ORDER BY priority DESC, run_at, id)
    ORDER BY priority DESC, run_at, id) AS cand
  JOIN commands c ON c.id = cand.id
  WHERE c.status = 'pending' AND c.scheduled <> 2
    AND EXISTS (SELECT 1 FROM agents WHERE org_id = '00000000-0000-0000-0000-000000000001' AND id = ('00000000-0000-0000-0000-0000000001'||lpad((:client_id+1)::text,2,'0'))::uuid AND cordoned_at IS NULL)
  ORDER BY cand.priority DESC, cand.run_at, cand.id
  LIMIT 10 FOR UPDATE OF c SKIP LOCKED),
claimed AS (
  UPDATE commands SET status = 'executing', scheduled = 0, attempts = attempts + 1, attempt_number = attempt_number + 1, claimed_at = keel_now(),
    claim_token = replace(gen_random_uuid()::text, '-', ''),
    lease_expires_at = keel_now() + lease_duration_ms * interval '1 millisecond',
    claimed_by = ('00000000-0000-0000-0000-0000000001'||lpad((:client_id+1)::text,2,'0'))::uuid, updated_at = keel_now()
  FROM picked WHERE commands.id = picked.id AND commands.status = 'pending'
  RETURNING commands.*),
promoted AS (
  UPDATE commands SET scheduled = 0 WHERE id IN (
    SELECT c.id FROM (
      (SELECT id, priority, run_at FROM (SELECT id, priority, run_at FROM commands WHERE org_id = '00000000-0000-0000-0000-000000000001' AND target_agent_id = ('00000000-0000-0000-0000-0000000001'||lpad((:client_id+1)::text,2,'0'))::uuid AND status = 'pending' AND scheduled = 1 AND run_at <= keel_now() ORDER BY run_at LIMIT 1000) AS due ORDER BY priority DESC, run_at, id)
      UNION ALL
      (SELECT id, priority, run_at FROM (SELECT id, priority, run_at FROM commands WHERE org_id = '00000000-0000-0000-0000-000000000001' AND queue = 'work' AND target_agent_id IS NULL AND NOT EXISTS (SELECT 1 FROM paused_queues WHERE org_id = '00000000-0000-0000-0000-000000000001' AND queue = 'work') AND status = 'pending' AND scheduled = 1 AND run_at <= keel_now() ORDER BY run_at LIMIT 1000) AS due ORDER BY priority DESC, run_at, id)
    ) AS due JOIN commands c ON c.id = due.id
    WHERE c.status = 'pending' AND c.scheduled = 1 AND c.id NOT IN (SELECT id FROM picked)
    FOR UPDATE OF c SKIP LOCKED))
SELECT coalesce(array_agg(id), '{}') AS ids2, coalesce(array_agg(claim_token), '{}') AS tokens2 FROM claimed
\gset
WITH picked AS (
  SELECT c.id FROM (
    (SELECT id, priority, run_at FROM commands WHERE org_id = '00000000-0000-0000-0000-000000000001' AND target_agent_id = ('00000000-0000-0000-0000-0000000001'||lpad((:client_id+1)::text,2,'0'))::uuid AND status = 'pending' AND scheduled = 0 ORDER BY priority DESC, run_at, id)
    UNION ALL
    (SELECT id, priority, run_at FROM (SELECT id, priority, run_at FROM commands WHERE org_id = '00000000-0000-0000-0000-000000000001' AND target_agent_id = ('00000000-0000-0000-0000-0000000001'||lpad((:client_id+1)::text,2,'0'))::uuid AND status = 'pending' AND scheduled = 1 AND run_at <= keel_now() ORDER BY run_at LIMIT 1000) AS due ORDER BY priority DESC, run_at, id)
    UNION ALL
    (SELECT id, priority, run_at FROM commands WHERE org_id = '00000000-0000-0000-0000-000000000001' AND queue = 'work' AND target_agent_id IS NULL AND NOT EXISTS (SELECT 1 FROM paused_queues WHERE org_id = '00000000-0000-0000-0000-000000000001' AND queue = 'work') AND status = 'pending' AND scheduled = 0 ORDER BY priority DESC, run_at, id)
    UNION ALL
    (SELECT id, priority, run_at FROM (SELECT id, priority, run_at FROM commands WHERE org_id = '00000000-0000-0000-0000-000000000001' AND queue = 'work' AND target_agent_id IS NULL AND NOT EXISTS (SELECT 1 FROM paused_queues WHERE org_id = '00000000-0000-0000-0000-000000000001' AND queue = 'work') AND status = 'pending' AND scheduled = 1 AND run_at <= keel_now() ORDER BY run_at LIMIT 1000) AS due ORDER BY priority DESC, run_at, id)
    ORDER BY priority DESC, run_at, id) AS cand
  JOIN commands c ON c.id = cand.id
  WHERE c.status = 'pending' AND c.scheduled <> 2
    AND EXISTS (SELECT 1 FROM agents WHERE org_id = '00000000-0000-0000-0000-000000000001' AND id = ('00000000-0000-0000-0000-0000000001'||lpad((:client_id+1)::text,2,'0'))::uuid AND cordoned_at IS NULL)
  ORDER BY cand.priority DESC, cand.run_at, cand.id
  LIMIT 10 FOR UPDATE OF c SKIP LOCKED),
claimed AS (
  UPDATE commands SET status = 'executing', scheduled = 0, attempts = attempts + 1, attempt_number = attempt_number + 1, claimed_at = keel_now(),
    claim_token = replace(gen_random_uuid()::text, '-', ''),
    lease_expires_at = keel_now() + lease_duration_ms * interval '1 millisecond',
    claimed_by = ('00000000-0000-0000-0000-0000000001'||lpad((:client_id+1)::text,2,'0'))::uuid, updated_at = keel_now()
  FROM picked WHERE commands.id = picked.id AND commands.status = 'pending'
  RETURNING commands.*),
promoted AS (
  UPDATE commands SET scheduled = 0 WHERE id IN (
    SELECT c.id FROM (
      (SELECT id, priority, run_at FROM (SELECT id, priority, run_at FROM commands WHERE org_id = '00000000-0000-0000-0000-000000000001' AND target_agent_id = ('00000000-0000-0000-0000-0000000001'||lpad((:client_id+1)::text,2,'0'))::uuid AND status = 'pending' AND scheduled = 1 AND run_at <= keel_now() ORDER BY run_at LIMIT 1000) AS due ORDER BY priority DESC, run_at, id)
      UNION ALL
      (SELECT id, priority, run_at FROM (SELECT id, priority, run_at FROM commands WHERE org_id = '00000000-0000-0000-0000-000000000001' AND queue = 'work' AND target_agent_id IS NULL AND NOT EXISTS (SELECT 1 FROM paused_queues WHERE org_id = '00000000-0000-0000-0000-000000000001' AND queue = 'work') AND status = 'pending' AND scheduled = 1 AND run_at <= keel_now() ORDER BY run_at LIMIT 1000) AS due ORDER BY priority DESC, run_at, id)
    ) AS due JOIN commands c ON c.id = due.id
    WHERE c.status = 'pending' AND c.scheduled = 1 AND c.id NOT IN (SELECT id FROM picked)
    FOR UPDATE OF c SKIP LOCKED))
SELECT coalesce(array_agg(id), '{}') AS ids3, coalesce(array_agg(claim_token), '{}') AS tokens3 FROM claimed
\gset
WITH reports AS (SELECT * FROM unnest((:ids0::uuid[] || :ids1::uuid[] || :ids2::uuid[] || :ids3::uuid[]), (:tokens0::text[] || :tokens1::text[] || :tokens2::text[] || :tokens3::text[])) AS r (id, token)),
done AS (
  UPDATE commands c SET status = 'completed', attempt_outcome = 'completed',
    result = 'null'::jsonb, claim_token = NULL, lease_expires_at = NULL,
    finished_at = keel_now(), updated_at = keel_now()
  FROM reports r
  WHERE c.org_id = '00000000-0000-0000-0000-000000000001' AND c.id = r.id AND c.status = 'executing'
    AND c.claim_token = r.token AND c.claimed_by = ('00000000-0000-0000-0000-0000000001'||lpad((:client_id+1)::text,2,'0'))::uuid
  RETURNING c.*),
ended AS (INSERT INTO command_attempts (command_id, attempt, agent_id, claimed_at, ended_at, outcome, error)
  SELECT id, attempt_number, claimed_by, claimed_at, keel_now(), attempt_outcome, NULL::jsonb FROM done)
SELECT count(*) FROM done;
