-- keel store, SQLite schema.
--
-- Identifiers are UUIDs stored as 16-byte blobs (v7 for commands, so byte order is age order).
-- Instants are INTEGER microseconds since the Unix epoch, UTC: they compare as numbers, and
-- microseconds are what PostgreSQL's timestamptz keeps, so both backends round alike.
-- JSON values are TEXT.

CREATE TABLE organisations (
    id          BLOB    PRIMARY KEY NOT NULL,
    name        TEXT    NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL
);

CREATE TABLE agents (
    id            BLOB    PRIMARY KEY NOT NULL,
    org_id        BLOB    NOT NULL REFERENCES organisations (id),
    name          TEXT    NOT NULL,
    version       TEXT,
    metadata      TEXT    NOT NULL DEFAULT '{}',
    queues        TEXT    NOT NULL DEFAULT '[]',
    boot_id       BLOB,
    boot_count    INTEGER NOT NULL DEFAULT 0,
    booted_at     INTEGER,
    last_seen_at  INTEGER,
    created_at    INTEGER NOT NULL,
    UNIQUE (org_id, name),
    -- Target of the composite foreign keys below: a command can only name an agent of its own
    -- organisation.
    UNIQUE (org_id, id)
);

CREATE TABLE api_keys (
    id          BLOB    PRIMARY KEY NOT NULL,
    org_id      BLOB    NOT NULL REFERENCES organisations (id),
    name        TEXT    NOT NULL,
    -- The public part of the token, used to find the key; the secret is only kept hashed.
    prefix      TEXT    NOT NULL UNIQUE,
    -- Hex SHA-256 of the whole token.
    token_hash  TEXT    NOT NULL,
    -- JSON array of scope names.
    scopes      TEXT    NOT NULL,
    agent_id    BLOB,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER,
    FOREIGN KEY (org_id, agent_id) REFERENCES agents (org_id, id)
);

CREATE INDEX api_keys_org ON api_keys (org_id, created_at);

CREATE TABLE commands (
    id                 BLOB    PRIMARY KEY NOT NULL,
    org_id             BLOB    NOT NULL REFERENCES organisations (id),
    command_type       TEXT    NOT NULL,
    -- Exactly one of the two is set: a targeted command names an agent, a pooled one a queue.
    target_agent_id    BLOB,
    queue              TEXT,
    params             TEXT    NOT NULL,
    priority           INTEGER NOT NULL,
    run_at             INTEGER NOT NULL,
    max_attempts       INTEGER NOT NULL CHECK (max_attempts >= 1),
    lease_duration_ms  INTEGER NOT NULL CHECK (lease_duration_ms >= 1),
    status             TEXT    NOT NULL CHECK (status IN
                           ('pending', 'executing', 'completed', 'failed', 'cancelled', 'dead')),
    attempts           INTEGER NOT NULL DEFAULT 0,
    -- Set while executing only: the fence for heartbeat, complete and fail.
    claim_token        TEXT,
    lease_expires_at   INTEGER,
    -- The agent that holds the lease, or held it last.
    claimed_by         BLOB,
    progress           TEXT,
    result             TEXT,
    error              TEXT,
    dead_reason        TEXT,
    cancel_requested   INTEGER NOT NULL DEFAULT 0,
    idempotency_key    TEXT,
    request_hash       TEXT,
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL,
    finished_at        INTEGER,
    CHECK ((target_agent_id IS NULL) <> (queue IS NULL)),
    CHECK ((status = 'executing') = (claim_token IS NOT NULL AND lease_expires_at IS NOT NULL)),
    FOREIGN KEY (org_id, target_agent_id) REFERENCES agents (org_id, id),
    FOREIGN KEY (org_id, claimed_by) REFERENCES agents (org_id, id),
    -- NULL keys are distinct, so commands without a key never collide.
    UNIQUE (org_id, idempotency_key)
);

-- Claims: due pending commands of one agent or one queue, best priority first, oldest first.
CREATE INDEX commands_claim_agent ON commands (org_id, target_agent_id, priority DESC, created_at)
    WHERE status = 'pending';
CREATE INDEX commands_claim_queue ON commands (org_id, queue, priority DESC, created_at)
    WHERE status = 'pending';
-- Release of expired leases.
CREATE INDEX commands_lease ON commands (lease_expires_at) WHERE status = 'executing';
-- Listing, newest first, optionally by status.
CREATE INDEX commands_org_status ON commands (org_id, status, id);
