-- Queue core at scale: every query shape has an index that serves it, and every attempt is kept.
--
-- Claims hand out due pending commands best priority first, then earliest due (`run_at`), then
-- by id. Each claim index is in exactly that order and holds only commands that are due, so a
-- claim reads the first rows of the index and stops: its cost does not grow with the backlog.

-- A pending command that was not yet due when it was last written (created for later, or
-- waiting out a retry's backoff) is `scheduled`: it stays out of the claim indexes until a
-- claim that could take it finds it due and clears the flag.
ALTER TABLE commands ADD COLUMN scheduled INTEGER NOT NULL DEFAULT 0;
UPDATE commands SET scheduled = 1
    WHERE status = 'pending' AND run_at > CAST(strftime('%s', 'now') AS INTEGER) * 1000000;

DROP INDEX commands_claim_agent;
DROP INDEX commands_claim_queue;
DROP INDEX commands_org_status;

CREATE INDEX commands_claim_agent
    ON commands (org_id, target_agent_id, priority DESC, run_at, id)
    WHERE status = 'pending' AND scheduled = 0 AND target_agent_id IS NOT NULL;
CREATE INDEX commands_claim_queue
    ON commands (org_id, queue, priority DESC, run_at, id)
    WHERE status = 'pending' AND scheduled = 0 AND target_agent_id IS NULL;

-- Scheduled commands by due time: "which have become due?" (a claim makes them claimable) and
-- "when is the next one due?" (the long poll).
CREATE INDEX commands_scheduled_agent
    ON commands (org_id, target_agent_id, run_at)
    WHERE status = 'pending' AND scheduled = 1 AND target_agent_id IS NOT NULL;
CREATE INDEX commands_scheduled_queue
    ON commands (org_id, queue, run_at)
    WHERE status = 'pending' AND scheduled = 1 AND target_agent_id IS NULL;

-- Listing, newest first (ids are UUIDv7, so id order is age order): one index per filter, and
-- one per filter together with the status. A listing with more filters reads the index of two
-- of them, in order, and checks the others on its rows.
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

-- One row per attempt: who ran it, when, how it ended. Deleted with its command.
CREATE TABLE command_attempts (
    command_id  BLOB    NOT NULL REFERENCES commands (id) ON DELETE CASCADE,
    attempt     INTEGER NOT NULL,
    agent_id    BLOB    NOT NULL,
    claimed_at  INTEGER NOT NULL,
    ended_at    INTEGER,
    -- NULL while running; then completed, retry, failed, lease_expired or cancelled.
    outcome     TEXT,
    error       TEXT,
    PRIMARY KEY (command_id, attempt)
) WITHOUT ROWID;

-- How the last attempt ended, as the statement that ended it says: completed, retry, failed,
-- lease_expired, cancelled, or handed_back (a claim nobody received). The triggers below keep
-- the attempts from it, so that every change of a command stays one statement.
ALTER TABLE commands ADD COLUMN attempt_outcome TEXT;

-- A claim opens an attempt.
CREATE TRIGGER command_attempt_opens AFTER UPDATE OF status ON commands
WHEN OLD.status = 'pending' AND NEW.status = 'executing'
BEGIN
    INSERT INTO command_attempts (command_id, attempt, agent_id, claimed_at)
    VALUES (NEW.id,
            (SELECT COALESCE(MAX(attempt), 0) + 1 FROM command_attempts
             WHERE command_id = NEW.id),
            NEW.claimed_by, NEW.updated_at);
END;

-- A report, a release or a cancel ends it, with the outcome and the reported error.
CREATE TRIGGER command_attempt_ends AFTER UPDATE OF status ON commands
WHEN OLD.status = 'executing' AND NEW.status <> 'executing'
     AND NEW.attempt_outcome IS NOT 'handed_back'
BEGIN
    UPDATE command_attempts
    SET ended_at = NEW.updated_at,
        outcome = NEW.attempt_outcome,
        error = CASE WHEN NEW.attempt_outcome IN ('retry', 'failed')
                       OR NEW.error IS NOT OLD.error THEN NEW.error END
    WHERE command_id = NEW.id AND ended_at IS NULL;
END;

-- A claim handed back unused was no attempt.
CREATE TRIGGER command_attempt_handed_back AFTER UPDATE OF status ON commands
WHEN OLD.status = 'executing' AND NEW.attempt_outcome IS 'handed_back'
BEGIN
    DELETE FROM command_attempts WHERE command_id = NEW.id AND ended_at IS NULL;
END;

-- Commands executing when this migration runs get their open attempt, so that their report
-- closes it and the numbering goes on from their attempt count.
INSERT INTO command_attempts (command_id, attempt, agent_id, claimed_at)
    SELECT id, attempts, claimed_by, updated_at FROM commands
    WHERE status = 'executing' AND claimed_by IS NOT NULL AND attempts >= 1;
