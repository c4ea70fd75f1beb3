-- Applied after the backlog is made for narrow_lease_table.sql: one lease row per command.
INSERT INTO leases (id, org_id, queue, target_agent_id, priority, run_at, lease_duration_ms)
SELECT id, org_id, queue, target_agent_id, priority, run_at, lease_duration_ms FROM commands;
