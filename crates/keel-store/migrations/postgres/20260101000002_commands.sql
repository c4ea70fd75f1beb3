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
    -- The agent that holds the lease, or held it last, and when its claim was made.
    claimed_by         uuid,
    claimed_at         timestamptz,
    -- The number of the latest attempt: the one running while executing, else the last one
    -- (0: never claimed). Attempts are numbered on across requeues; `attempts` counts those
    -- since the last requeue.
    attempt_number     integer     NOT NULL DEFAULT 0,
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
    -- The label selector, as written.
    selector           text,
    online_only        boolean,
    max_concurrency    integer,
    -- The agents the selector matched at creation, a JSON array of ids, in child order.
    broadcast_agents   jsonb,
    CHECK ((target_agent_id IS NULL) <> (queue IS NULL)),
    CHECK ((status = 'executing') = (claim_token IS NOT NULL AND lease_expires_at IS NOT NULL)),
    -- Named: a violation of this one means the target agent is not in the organisation.
    CONSTRAINT commands_target_agent
        FOREIGN KEY (org_id, target_agent_id) REFERENCES agents (org_id, id),
    FOREIGN KEY (org_id, claimed_by) REFERENCES agents (org_id, id)
);

-- Every index below is written by each claim and each report (the status is in most of them,
-- and a row whose indexed columns change is written anew in every index): there are as few as
-- the queries need, and partial where most rows need no entry.

-- Idempotency keys, of the commands that have one.
CREATE UNIQUE INDEX commands_idempotency ON commands (org_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

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
-- Listing, newest first: one index per filter; a listing by two filters reads the index of
-- one of them and checks the other on the rows.
CREATE INDEX commands_list ON commands (org_id, id);
CREATE INDEX commands_list_status ON commands (org_id, status, id);
CREATE INDEX commands_list_agent ON commands (org_id, target_agent_id, id)
    WHERE target_agent_id IS NOT NULL;
CREATE INDEX commands_list_queue ON commands (org_id, queue, id) WHERE queue IS NOT NULL;
CREATE INDEX commands_list_type ON commands (org_id, command_type, id);
-- Retention: finished commands, oldest first.
CREATE INDEX commands_finished ON commands (finished_at)
    WHERE status IN ('completed', 'failed', 'cancelled', 'dead');
-- A parent's children by status.
CREATE INDEX commands_children ON commands (parent_id, status, id) WHERE parent_id IS NOT NULL;

-- One row per ended attempt: who ran it, when, how it ended. Deleted with its command. The
-- running attempt is on the command's row (`attempt_number`, `claimed_by`, `claimed_at`): a
-- claim writes only that row. The statement that ends the attempt (a report, a release, a
-- hand-back of a cancelled claim) adds its row here; a hand-back to pending takes the attempt
-- back.
CREATE TABLE command_attempts (
    command_id  uuid        NOT NULL REFERENCES commands (id) ON DELETE CASCADE,
    attempt     integer     NOT NULL,
    agent_id    uuid        NOT NULL,
    claimed_at  timestamptz NOT NULL,
    -- Always set: `keel store copy`, which reads SQLite's running attempts here, moves them
    -- onto their commands' rows before it commits.
    ended_at    timestamptz,
    -- completed, retry, failed, lease_expired or cancelled.
    outcome     text,
    error       jsonb,
    PRIMARY KEY (command_id, attempt)
);

-- Broadcasts (see the SQLite fleet migration for the design). A child that held a slot hands
-- it, when it finishes, to the next held sibling (unless the broadcast is being cancelled); the
-- sibling is claimable at once, or scheduled when it is not due yet. A held child that finishes
-- (cancelled on its own) had no slot to hand on. The last child to finish ends the parent.
--
-- The parent's row is locked first: children that finish in concurrent transactions take
-- turns, and the last one sees the others finished (each statement below reads anew).
CREATE FUNCTION keel_broadcast_child_finishes() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    cancelling boolean;
BEGIN
    SELECT cancel_requested INTO cancelling FROM commands WHERE id = NEW.parent_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF OLD.scheduled <> 2 AND NOT cancelling THEN
        UPDATE commands
        SET scheduled = CASE WHEN run_at > keel_now() THEN 1 ELSE 0 END,
            updated_at = keel_now()
        WHERE id = (SELECT id FROM commands
                    WHERE parent_id = NEW.parent_id AND status = 'pending' AND scheduled = 2
                    ORDER BY id LIMIT 1);
    END IF;
    UPDATE commands
    SET status = CASE
            WHEN cancel_requested THEN 'cancelled'
            WHEN EXISTS (SELECT 1 FROM commands
                         WHERE parent_id = NEW.parent_id
                           AND status IN ('failed', 'cancelled', 'dead')) THEN 'failed'
            ELSE 'completed' END,
        finished_at = keel_now(), updated_at = keel_now()
    WHERE id = NEW.parent_id AND status = 'pending'
      AND NOT EXISTS (SELECT 1 FROM commands
                      WHERE parent_id = NEW.parent_id AND status IN ('pending', 'executing'));
    RETURN NULL;
END $$;

CREATE TRIGGER broadcast_child_finishes AFTER UPDATE OF status ON commands
FOR EACH ROW
WHEN (NEW.parent_id IS NOT NULL
      AND NEW.status IN ('completed', 'failed', 'cancelled', 'dead')
      AND OLD.status IN ('pending', 'executing'))
EXECUTE FUNCTION keel_broadcast_child_finishes();

-- A finished child that is requeued reopens its finished parent.
CREATE FUNCTION keel_broadcast_child_requeued() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE commands
    SET status = 'pending', finished_at = NULL, cancel_requested = false,
        updated_at = keel_now()
    WHERE id = NEW.parent_id AND status IN ('completed', 'failed', 'cancelled');
    RETURN NULL;
END $$;

CREATE TRIGGER broadcast_child_requeued AFTER UPDATE OF status ON commands
FOR EACH ROW
WHEN (NEW.parent_id IS NOT NULL
      AND NEW.status = 'pending'
      AND OLD.status IN ('completed', 'failed', 'cancelled', 'dead'))
EXECUTE FUNCTION keel_broadcast_child_requeued();
