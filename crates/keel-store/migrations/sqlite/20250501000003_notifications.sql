-- Notifications: an organisation's notification settings, the events it triggers and the
-- deliveries they give (one per event, channel and recipient), leased to the delivery
-- processor's workers by the lease engine, like commands to agents.

-- Settings: classification rules, severity policies, channels, senders, templates and routing
-- rules. Each is a JSON document the server validates by kind; `unique_key` is what must be
-- unique per kind in the organisation (a policy's severity, a template's event type and
-- channel type), NULL when nothing is. A sender's credentials are in `sealed_secret`,
-- encrypted by the server (an AEAD): the store never sees them in clear.
CREATE TABLE notification_settings (
    id             BLOB    PRIMARY KEY NOT NULL,
    org_id         BLOB    NOT NULL REFERENCES organisations (id),
    kind           TEXT    NOT NULL CHECK (kind IN
                       ('rule', 'policy', 'channel', 'sender', 'template', 'route')),
    name           TEXT    NOT NULL,
    unique_key     TEXT,
    body           TEXT    NOT NULL,
    sealed_secret  BLOB,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    -- NULL keys are distinct, so settings without one never collide.
    UNIQUE (org_id, kind, unique_key)
);

-- Listing one kind of an organisation, oldest first.
CREATE INDEX notification_settings_list ON notification_settings (org_id, kind, created_at, id);

-- Events as triggered: what was classified and routed. The idempotency key makes a retried
-- trigger answer the first one and create nothing.
CREATE TABLE notification_events (
    id               BLOB    PRIMARY KEY NOT NULL,
    org_id           BLOB    NOT NULL REFERENCES organisations (id),
    event_type       TEXT    NOT NULL,
    payload          TEXT    NOT NULL,
    domain           TEXT    NOT NULL,
    severity         TEXT    NOT NULL,
    idempotency_key  TEXT,
    request_hash     TEXT,
    created_at       INTEGER NOT NULL,
    UNIQUE (org_id, idempotency_key)
);

-- Retention: events no delivery refers to any more, oldest first.
CREATE INDEX notification_events_created ON notification_events (created_at);

-- Deliveries: the lease engine's shared columns (see src/sqlite/lease.rs), then what a
-- delivery is. `claimed_by` is the processor worker that holds the lease (a UUID per worker
-- and keel process), not an agent: there is no foreign key on it.
CREATE TABLE deliveries (
    id                 BLOB    PRIMARY KEY NOT NULL,
    org_id             BLOB    NOT NULL REFERENCES organisations (id),
    -- `throttled`: folded into a digest (`digest_id`), never sent alone.
    status             TEXT    NOT NULL CHECK (status IN
                           ('pending', 'executing', 'completed', 'failed', 'cancelled', 'dead',
                            'throttled')),
    run_at             INTEGER NOT NULL,
    scheduled          INTEGER NOT NULL DEFAULT 0,
    priority           INTEGER NOT NULL,
    attempts           INTEGER NOT NULL DEFAULT 0,
    max_attempts       INTEGER NOT NULL CHECK (max_attempts >= 1),
    lease_duration_ms  INTEGER NOT NULL CHECK (lease_duration_ms >= 1),
    claim_token        TEXT,
    lease_expires_at   INTEGER,
    claimed_by         BLOB,
    progress           TEXT,
    result             TEXT,
    error              TEXT,
    dead_reason        TEXT,
    cancel_requested   INTEGER NOT NULL DEFAULT 0,
    attempt_outcome    TEXT,
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL,
    finished_at        INTEGER,
    -- What is delivered, where.
    event_id           BLOB    NOT NULL REFERENCES notification_events (id),
    event_type         TEXT    NOT NULL,
    severity           TEXT    NOT NULL,
    channel_id         BLOB,
    channel_type       TEXT    NOT NULL,
    recipient          TEXT    NOT NULL,
    subject            TEXT    NOT NULL,
    body               TEXT    NOT NULL,
    -- One delivery per (event, channel, recipient): the same key again creates nothing.
    dedupe_key         TEXT    NOT NULL,
    -- Throttles: (event type, channel, recipient). A delivery sent alone within its severity's
    -- window leads; the next ones of the window are throttled into one digest, a delivery of
    -- its own (`digest_of` = the lead) sent when the window closes.
    throttle_key       TEXT    NOT NULL,
    digest_of          BLOB,
    digest_id          BLOB,
    CHECK ((status = 'executing') = (claim_token IS NOT NULL AND lease_expires_at IS NOT NULL)),
    UNIQUE (org_id, dedupe_key)
);

-- Claims across organisations: due pending deliveries, best priority first, then oldest.
CREATE INDEX deliveries_claim ON deliveries (priority DESC, run_at, id)
    WHERE status = 'pending' AND scheduled = 0;
-- Deliveries waiting out a backoff, by due time.
CREATE INDEX deliveries_scheduled ON deliveries (run_at)
    WHERE status = 'pending' AND scheduled = 1;
-- Release of expired leases.
CREATE INDEX deliveries_lease ON deliveries (lease_expires_at) WHERE status = 'executing';
-- Retention.
CREATE INDEX deliveries_finished ON deliveries (finished_at)
    WHERE status IN ('completed', 'failed', 'cancelled', 'dead');
-- Listing, newest first (UUIDv7 ids), by status, by channel type, by event (an event's
-- deliveries are also read for an idempotent replay and by the cleanup).
CREATE INDEX deliveries_list ON deliveries (org_id, id);
CREATE INDEX deliveries_list_status ON deliveries (org_id, status, id);
CREATE INDEX deliveries_list_channel ON deliveries (org_id, channel_type, id);
CREATE INDEX deliveries_event ON deliveries (event_id, id);
-- Throttles: the latest lead of a key; the digest of a lead; the deliveries of a digest.
CREATE INDEX deliveries_throttle ON deliveries (org_id, throttle_key, created_at)
    WHERE status <> 'throttled' AND digest_of IS NULL;
CREATE UNIQUE INDEX deliveries_digest_of ON deliveries (digest_of) WHERE digest_of IS NOT NULL;
CREATE INDEX deliveries_digested ON deliveries (digest_id) WHERE digest_id IS NOT NULL;
-- Retention of throttled deliveries (finished when they were folded).
CREATE INDEX deliveries_throttled ON deliveries (finished_at) WHERE status = 'throttled';

-- One row per attempt, kept by the triggers below as for commands. `agent_id` is the worker.
-- `detail` is what the channel reported: the error of a failed attempt, the result of a
-- successful one (status, duration, response excerpt).
CREATE TABLE delivery_attempts (
    delivery_id  BLOB    NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    attempt      INTEGER NOT NULL,
    agent_id     BLOB    NOT NULL,
    claimed_at   INTEGER NOT NULL,
    ended_at     INTEGER,
    outcome      TEXT,
    error        TEXT,
    PRIMARY KEY (delivery_id, attempt)
) WITHOUT ROWID;

CREATE TRIGGER delivery_attempt_opens AFTER UPDATE OF status ON deliveries
WHEN OLD.status = 'pending' AND NEW.status = 'executing'
BEGIN
    INSERT INTO delivery_attempts (delivery_id, attempt, agent_id, claimed_at)
    VALUES (NEW.id,
            (SELECT COALESCE(MAX(attempt), 0) + 1 FROM delivery_attempts
             WHERE delivery_id = NEW.id),
            NEW.claimed_by, NEW.updated_at);
END;

CREATE TRIGGER delivery_attempt_ends AFTER UPDATE OF status ON deliveries
WHEN OLD.status = 'executing' AND NEW.status <> 'executing'
     AND NEW.attempt_outcome IS NOT 'handed_back'
BEGIN
    UPDATE delivery_attempts
    SET ended_at = NEW.updated_at,
        outcome = NEW.attempt_outcome,
        error = CASE WHEN NEW.attempt_outcome = 'completed' THEN NEW.result
                     WHEN NEW.attempt_outcome IN ('retry', 'failed')
                       OR NEW.error IS NOT OLD.error THEN NEW.error END
    WHERE delivery_id = NEW.id AND ended_at IS NULL;
END;

CREATE TRIGGER delivery_attempt_handed_back AFTER UPDATE OF status ON deliveries
WHEN OLD.status = 'executing' AND NEW.attempt_outcome IS 'handed_back'
BEGIN
    DELETE FROM delivery_attempts WHERE delivery_id = NEW.id AND ended_at IS NULL;
END;
