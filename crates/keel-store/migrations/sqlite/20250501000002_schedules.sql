-- Schedules: a cron pattern in a time zone that creates commands from a template, and the fire
-- times they handled. See docs/commands.md (Schedules).

CREATE TABLE schedules (
    id            BLOB    PRIMARY KEY NOT NULL,
    org_id        BLOB    NOT NULL REFERENCES organisations (id),
    name          TEXT,
    cron          TEXT    NOT NULL,
    timezone      TEXT    NOT NULL,
    -- The command template: a command create's JSON body.
    command       TEXT    NOT NULL,
    missed        TEXT    NOT NULL CHECK (missed IN ('skip', 'catch_up_one')),
    state         TEXT    NOT NULL CHECK (state IN ('active', 'paused')),
    -- The next fire time the scheduler handles; NULL when the pattern has none left.
    next_fire_at  INTEGER,
    last_fire_at  INTEGER,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);

-- The scheduler's "due now" read: active schedules, earliest next fire time first.
CREATE INDEX schedules_due ON schedules (next_fire_at)
    WHERE state = 'active' AND next_fire_at IS NOT NULL;

-- Listing an organisation's schedules, oldest first, from a cursor.
CREATE INDEX schedules_list ON schedules (org_id, id);

-- One row per handled fire time. The primary key is what makes a fire happen once: the row,
-- its commands and the schedule's next fire time are written in one transaction, and a second
-- row for the same (schedule, fire time) is refused.
CREATE TABLE schedule_fires (
    schedule_id  BLOB    NOT NULL REFERENCES schedules (id) ON DELETE CASCADE,
    fire_at      INTEGER NOT NULL,
    fired_at     INTEGER NOT NULL,
    -- JSON array of the ids of the commands created for it.
    command_ids  TEXT    NOT NULL,
    -- Why no command was created, when none could be.
    error        TEXT,
    PRIMARY KEY (schedule_id, fire_at)
) WITHOUT ROWID;
