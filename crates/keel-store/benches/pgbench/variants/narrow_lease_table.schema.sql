-- Applied after keel's migrations for narrow_lease_table.sql: the claim, scheduled and lease
-- indexes move from the commands table to a narrow table of the lease state.
DROP INDEX commands_claim_agent, commands_claim_queue, commands_scheduled_agent, commands_scheduled_queue, commands_lease;
CREATE TABLE leases (
  id uuid PRIMARY KEY REFERENCES commands (id) ON DELETE CASCADE,
  org_id uuid NOT NULL, queue text, target_agent_id uuid,
  priority int NOT NULL, run_at timestamptz NOT NULL, lease_duration_ms bigint NOT NULL,
  status smallint NOT NULL DEFAULT 0, claim_token text, lease_expires_at timestamptz,
  claimed_by uuid, claimed_at timestamptz, attempt_number int NOT NULL DEFAULT 0);
CREATE INDEX leases_claim_queue ON leases (org_id, queue, priority DESC, run_at, id) WHERE status = 0 AND target_agent_id IS NULL;
CREATE INDEX leases_claim_agent ON leases (org_id, target_agent_id, priority DESC, run_at, id) WHERE status = 0 AND target_agent_id IS NOT NULL;
CREATE INDEX leases_expiry ON leases (lease_expires_at) WHERE status = 1;
