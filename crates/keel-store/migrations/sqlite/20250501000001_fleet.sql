-- Fleet operations: agent labels, cordoned agents, paused queues and broadcast commands.

-- Labels an agent reports at check-in, and labels assigned to it over the API; on a key both
-- have, the assigned value wins. JSON objects of strings.
ALTER TABLE agents ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
ALTER TABLE agents ADD COLUMN assigned_labels TEXT NOT NULL DEFAULT '{}';
-- Set while the agent is cordoned: it claims nothing new.
ALTER TABLE agents ADD COLUMN cordoned_at INTEGER;

-- The paused queues of each organisation: their pooled commands are not claimed.
CREATE TABLE paused_queues (
    org_id     BLOB    NOT NULL REFERENCES organisations (id),
    queue      TEXT    NOT NULL,
    paused_at  INTEGER NOT NULL,
    PRIMARY KEY (org_id, queue)
) WITHOUT ROWID;

-- A broadcast is a parent command and one child command per agent its selector matched.
--
-- The parent is never claimed. It has no agent and the empty queue name (which no agent can
-- serve: a queue name has 1 to 64 characters), so that it meets the table's one-target check;
-- its `selector` tells it apart. It is `pending` until its last child finishes, then
-- `completed` (every child completed), `cancelled` (it was cancelled) or `failed`.
--
-- `scheduled` gains a third value: 2, held. A held command is in no claim index. The parent is
-- held for good; a child beyond its broadcast's `max_concurrency` is held until a sibling
-- finishes and hands it the slot.
ALTER TABLE commands ADD COLUMN parent_id BLOB;
ALTER TABLE commands ADD COLUMN selector TEXT;
ALTER TABLE commands ADD COLUMN online_only INTEGER;
ALTER TABLE commands ADD COLUMN max_concurrency INTEGER;
-- The agents the selector matched at creation, a JSON array of ids, in child order.
ALTER TABLE commands ADD COLUMN broadcast_agents TEXT;

-- A parent's children by status: its summary, its end, and the next held child.
CREATE INDEX commands_children ON commands (parent_id, status, id) WHERE parent_id IS NOT NULL;

-- A child that held a slot hands it, when it finishes, to the next held sibling (unless the
-- broadcast is being cancelled); the sibling is claimable at once, or scheduled when it is not
-- due yet. A held child that finishes (cancelled on its own) had no slot to hand on. The last
-- child to finish ends the parent.
CREATE TRIGGER broadcast_child_finishes AFTER UPDATE OF status ON commands
WHEN NEW.parent_id IS NOT NULL
     AND NEW.status IN ('completed', 'failed', 'cancelled', 'dead')
     AND OLD.status IN ('pending', 'executing')
BEGIN
    UPDATE commands
    SET scheduled = CASE WHEN run_at > NEW.updated_at THEN 1 ELSE 0 END,
        updated_at = NEW.updated_at
    WHERE id = (SELECT id FROM commands INDEXED BY commands_children
                WHERE parent_id = NEW.parent_id AND status = 'pending' AND scheduled = 2
                ORDER BY id LIMIT 1)
      AND OLD.scheduled <> 2
      AND NOT (SELECT cancel_requested FROM commands WHERE id = NEW.parent_id);
    UPDATE commands
    SET status = CASE
            WHEN cancel_requested THEN 'cancelled'
            WHEN EXISTS (SELECT 1 FROM commands INDEXED BY commands_children
                         WHERE parent_id = NEW.parent_id
                           AND status IN ('failed', 'cancelled', 'dead')) THEN 'failed'
            ELSE 'completed' END,
        finished_at = NEW.updated_at, updated_at = NEW.updated_at
    WHERE id = NEW.parent_id AND status = 'pending'
      AND NOT EXISTS (SELECT 1 FROM commands INDEXED BY commands_children
                      WHERE parent_id = NEW.parent_id AND status IN ('pending', 'executing'));
END;

-- A finished child that is requeued reopens its finished parent.
CREATE TRIGGER broadcast_child_requeued AFTER UPDATE OF status ON commands
WHEN NEW.parent_id IS NOT NULL
     AND NEW.status = 'pending'
     AND OLD.status IN ('completed', 'failed', 'cancelled', 'dead')
BEGIN
    UPDATE commands
    SET status = 'pending', finished_at = NULL, cancel_requested = 0,
        updated_at = NEW.updated_at
    WHERE id = NEW.parent_id AND status IN ('completed', 'failed', 'cancelled');
END;
