-- Commands, leased to agents, and their attempts.

CREATE TABLE commands (
    id                 uuid        PRIMARY KEY,
    org_id             uuid        NOT NULL REFERENCES organisations (id),
    command_type       text        NOT NULL,
    -- Exactly one of the two is set: a targeted command names an agent, a pooled one a queue.
    -- A broadcast parent has no agent and the empty queue name, which no agent serves.
    target_agent_id    uuid,
    queue              text,
    params             jsonb       NOT NULL,
    priority           integer     NOT NULL,
    run_at             timestamptz NOT NULL,
    -- 0: claimable once due; 1: scheduled (not due when last written, out of the claim
    -- indexes until a claim finds it due); 2: held (a broadcast parent, or a child beyond its
    -- broadcast's max_concurrency).
    scheduled          smallint    NOT NULL DEFAULT 0,
    max_attempts       integer     NOT NULL CHECK (max_attempts >= 1),
    lease_duration_ms  bigint      NOT NULL CHECK (lease_duration_ms >= 1),
    status             text        NOT NULL CHECK (status IN
                           ('pending', 'executing', 'completed', 'failed', 'cancelled', 'dead')),
    attempts           integer     NOT NULL DEFAULT 0,
    -- Set while executing only: the fence for heartbeat, complete and fail.
    claim_token        text,
    lease_expires_at   timestamptz,
    -- The agent that holds the lease, or held it last.
    claimed_by         uuid,
    progress           jsonb,
    result             jsonb,
    error              jsonb,
    dead_reason        text,
    cancel_requested   boolean     NOT NULL DEFAULT false,
    -- How the last attempt ended: completed, retry, failed, lease_expired, cancelled or
    -- handed_back.
    attempt_outcome    text,
    idempotency_key    text,
    request_hash       text,
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    finished_at        timestamptz,
    -- Broadcasts: a parent (never claimed, told apart by its selector) and one child per agent.
    parent_id          uuid,
    selector           jsonb,
    online_only        boolean,
    max_concurrency    integer,
    -- The agents the selector matched at creation, a JSON array of ids, in child order.
    broadcast_agents   jsonb,
    CHECK ((target_agent_id IS NULL) <> (queue IS NULL)),
    CHECK ((status = 'executing') = (claim_token IS NOT NULL AND lease_expires_at IS NOT NULL)),
    FOREIGN KEY (org_id, target_agent_id) REFERENCES agents (org_id, id),
    FOREIGN KEY (org_id, claimed_by) REFERENCES agents (org_id, id),
    -- NULL keys are distinct, so commands without a key never collide.
    UNIQUE (org_id, idempotency_key)
);

-- Claims: due pending commands of one agent or one queue, best priority first, then earliest
-- due, then by id; `FOR UPDATE SKIP LOCKED` reads the first rows of one of these and stops.
CREATE INDEX commands_claim_agent
    ON commands (org_id, target_agent_id, priority DESC, run_at, id)
    WHERE status = 'pending' AND scheduled = 0 AND target_agent_id IS NOT NULL;
CREATE INDEX commands_claim_queue
    ON commands (org_id, queue, priority DESC, run_at, id)
    WHERE status = 'pending' AND scheduled = 0 AND target_agent_id IS NULL;
-- Scheduled commands by due time.
CREATE INDEX commands_scheduled_agent
    ON commands (org_id, target_agent_id, run_at)
    WHERE status = 'pending' AND scheduled = 1 AND target_agent_id IS NOT NULL;
CREATE INDEX commands_scheduled_queue
    ON commands (org_id, queue, run_at)
    WHERE status = 'pending' AND scheduled = 1 AND target_agent_id IS NULL;
-- Release of expired leases.
CREATE INDEX commands_lease ON commands (lease_expires_at) WHERE status = 'executing';
-- Listing, newest first.
CREATE INDEX commands_list ON commands (org_id, id);
CREATE INDEX commands_list_status ON commands (org_id, status, id);
CREATE INDEX commands_list_agent ON commands (org_id, target_agent_id, id)
    WHERE target_agent_id IS NOT NULL;
CREATE INDEX commands_list_agent_status ON commands (org_id, target_agent_id, status, id)
    WHERE target_agent_id IS NOT NULL;
CREATE INDEX commands_list_queue ON commands (org_id, queue, id) WHERE queue IS NOT NULL;
CREATE INDEX commands_list_queue_status ON commands (org_id, queue, status, id)
    WHERE queue IS NOT NULL;
CREATE INDEX commands_list_type ON commands (org_id, command_type, id);
CREATE INDEX commands_list_type_status ON commands (org_id, command_type, status, id);
-- Retention: finished commands, oldest first.
CREATE INDEX commands_finished ON commands (finished_at)
    WHERE status IN ('completed', 'failed', 'cancelled', 'dead');
-- A parent's children by status.
CREATE INDEX commands_children ON commands (parent_id, status, id) WHERE parent_id IS NOT NULL;

-- One row per attempt: who ran it, when, how it ended. Deleted with its command.
CREATE TABLE command_attempts (
    command_id  uuid        NOT NULL REFERENCES commands (id) ON DELETE CASCADE,
    attempt     integer     NOT NULL,
    agent_id    uuid        NOT NULL,
    claimed_at  timestamptz NOT NULL,
    ended_at    timestamptz,
    -- NULL while running; then completed, retry, failed, lease_expired or cancelled.
    outcome     text,
    error       jsonb,
    PRIMARY KEY (command_id, attempt)
);
