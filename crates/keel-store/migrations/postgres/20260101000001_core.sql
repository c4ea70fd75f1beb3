-- keel store, PostgreSQL schema: organisations, keys, agents, paused queues and schedules.
--
-- Identifiers are UUIDs (v7 for commands and deliveries, so id order is age order). Instants
-- are timestamptz (microseconds, as SQLite's integer instants). JSON values are jsonb.

-- "Now" for every instant the store writes: the database's clock (`now()`, the start of the
-- transaction), so that instances on several machines agree on leases and due times. A test
-- injects its own clock by setting `keel.now` on the connection.
CREATE FUNCTION keel_now() RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT COALESCE(NULLIF(current_setting('keel.now', true), '')::timestamptz, now()) $$;

CREATE TABLE organisations (
    id          uuid        PRIMARY KEY,
    name        text        NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL
);

CREATE TABLE agents (
    id               uuid        PRIMARY KEY,
    org_id           uuid        NOT NULL REFERENCES organisations (id),
    name             text        NOT NULL,
    version          text,
    metadata         jsonb       NOT NULL DEFAULT '{}',
    queues           jsonb       NOT NULL DEFAULT '[]',
    boot_id          uuid,
    boot_count       bigint      NOT NULL DEFAULT 0,
    booted_at        timestamptz,
    last_seen_at     timestamptz,
    created_at       timestamptz NOT NULL,
    -- Labels the agent reports at check-in, and labels assigned over the API (the assigned
    -- value wins on a key both have). JSON objects of strings.
    labels           jsonb       NOT NULL DEFAULT '{}',
    assigned_labels  jsonb       NOT NULL DEFAULT '{}',
    -- Set while the agent is cordoned: it claims nothing new.
    cordoned_at      timestamptz,
    UNIQUE (org_id, name),
    -- Target of the composite foreign keys: a command can only name an agent of its own
    -- organisation.
    UNIQUE (org_id, id)
);

CREATE TABLE api_keys (
    id          uuid        PRIMARY KEY,
    org_id      uuid        NOT NULL REFERENCES organisations (id),
    name        text        NOT NULL,
    -- The public part of the token, used to find the key; the secret is only kept hashed.
    prefix      text        NOT NULL UNIQUE,
    -- Hex SHA-256 of the whole token.
    token_hash  text        NOT NULL,
    -- JSON array of scope names.
    scopes      jsonb       NOT NULL,
    agent_id    uuid,
    created_at  timestamptz NOT NULL,
    revoked_at  timestamptz,
    FOREIGN KEY (org_id, agent_id) REFERENCES agents (org_id, id)
);

CREATE INDEX api_keys_org ON api_keys (org_id, created_at);

-- Operators' keys, outside every organisation: same token format and hashing as `api_keys`.
CREATE TABLE operator_keys (
    id          uuid        PRIMARY KEY,
    name        text        NOT NULL,
    prefix      text        NOT NULL UNIQUE,
    token_hash  text        NOT NULL,
    created_at  timestamptz NOT NULL,
    revoked_at  timestamptz
);

-- The paused queues of each organisation: their pooled commands are not claimed.
CREATE TABLE paused_queues (
    org_id     uuid        NOT NULL REFERENCES organisations (id),
    queue      text        NOT NULL,
    paused_at  timestamptz NOT NULL,
    PRIMARY KEY (org_id, queue)
);

-- Schedules: a cron pattern in a time zone that creates commands from a template.
CREATE TABLE schedules (
    id            uuid        PRIMARY KEY,
    org_id        uuid        NOT NULL REFERENCES organisations (id),
    name          text,
    cron          text        NOT NULL,
    timezone      text        NOT NULL,
    -- The command template: a command create's JSON body.
    command       jsonb       NOT NULL,
    missed        text        NOT NULL CHECK (missed IN ('skip', 'catch_up_one')),
    state         text        NOT NULL CHECK (state IN ('active', 'paused')),
    -- The next fire time the scheduler handles; NULL when the pattern has none left.
    next_fire_at  timestamptz,
    last_fire_at  timestamptz,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL
);

-- The scheduler's "due now" read: active schedules, earliest next fire time first.
CREATE INDEX schedules_due ON schedules (next_fire_at)
    WHERE state = 'active' AND next_fire_at IS NOT NULL;
-- Listing an organisation's schedules, oldest first, from a cursor.
CREATE INDEX schedules_list ON schedules (org_id, id);

-- One row per handled fire time; its primary key makes a fire happen once, whatever the
-- restarts and instances.
CREATE TABLE schedule_fires (
    schedule_id  uuid        NOT NULL REFERENCES schedules (id) ON DELETE CASCADE,
    fire_at      timestamptz NOT NULL,
    fired_at     timestamptz NOT NULL,
    -- JSON array of the ids of the commands created for it.
    command_ids  jsonb       NOT NULL,
    -- Why no command was created, when none could be.
    error        text,
    PRIMARY KEY (schedule_id, fire_at)
);
