-- Notifications: settings, the events they classify and route, and the deliveries they give
-- (one per event, channel and recipient), leased to the delivery workers like commands to
-- agents. The meaning of every column is the SQLite schema's (20250501000003_notifications.sql):
-- throttles fold deliveries into digests, `scheduled` is 0 when claimable, 1 while waiting out a
-- backoff or a postponement (a claim takes it once due).

CREATE TABLE notification_settings (
    id             uuid        PRIMARY KEY,
    org_id         uuid        NOT NULL REFERENCES organisations (id),
    kind           text        NOT NULL CHECK (kind IN
                       ('rule', 'policy', 'channel', 'sender', 'template', 'route')),
    name           text        NOT NULL,
    unique_key     text,
    body           jsonb       NOT NULL,
    -- A sender's credentials, encrypted by the server: the store never sees them in clear.
    sealed_secret  bytea,
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL,
    UNIQUE (org_id, kind, unique_key)
);

CREATE INDEX notification_settings_list
    ON notification_settings (org_id, kind, created_at, id);

CREATE TABLE notification_events (
    id               uuid        PRIMARY KEY,
    org_id           uuid        NOT NULL REFERENCES organisations (id),
    event_type       text        NOT NULL,
    payload          jsonb       NOT NULL,
    domain           text        NOT NULL,
    severity         text        NOT NULL,
    idempotency_key  text,
    request_hash     text,
    created_at       timestamptz NOT NULL,
    UNIQUE (org_id, idempotency_key)
);

CREATE INDEX notification_events_created ON notification_events (created_at);

CREATE TABLE deliveries (
    id                 uuid        PRIMARY KEY,
    org_id             uuid        NOT NULL REFERENCES organisations (id),
    status             text        NOT NULL CHECK (status IN
                           ('pending', 'executing', 'completed', 'failed', 'cancelled', 'dead',
                            'throttled')),
    run_at             timestamptz NOT NULL,
    scheduled          smallint    NOT NULL DEFAULT 0,
    priority           integer     NOT NULL,
    attempts           integer     NOT NULL DEFAULT 0,
    max_attempts       integer     NOT NULL CHECK (max_attempts >= 1),
    lease_duration_ms  bigint      NOT NULL CHECK (lease_duration_ms >= 1),
    claim_token        text,
    lease_expires_at   timestamptz,
    -- The delivery worker holding the lease (a UUID per worker and keel process).
    claimed_by         uuid,
    progress           jsonb,
    result             jsonb,
    error              jsonb,
    dead_reason        text,
    cancel_requested   boolean     NOT NULL DEFAULT false,
    attempt_outcome    text,
    created_at         timestamptz NOT NULL,
    updated_at         timestamptz NOT NULL,
    finished_at        timestamptz,
    event_id           uuid        NOT NULL REFERENCES notification_events (id),
    event_type         text        NOT NULL,
    severity           text        NOT NULL,
    channel_id         uuid,
    channel_type       text        NOT NULL,
    recipient          text        NOT NULL,
    subject            text        NOT NULL,
    body               text        NOT NULL,
    dedupe_key         text        NOT NULL,
    throttle_key       text        NOT NULL,
    digest_of          uuid,
    digest_id          uuid,
    CHECK ((status = 'executing') = (claim_token IS NOT NULL AND lease_expires_at IS NOT NULL)),
    UNIQUE (org_id, dedupe_key)
);

-- Claims across organisations: due pending deliveries, best priority first, then earliest due,
-- then by id; `FOR UPDATE SKIP LOCKED` reads the first rows of it and stops.
CREATE INDEX deliveries_claim ON deliveries (priority DESC, run_at, id)
    WHERE status = 'pending' AND scheduled = 0;
-- Deliveries waiting out a backoff or a postponement, by due time (a claim takes the due ones).
CREATE INDEX deliveries_scheduled ON deliveries (run_at)
    WHERE status = 'pending' AND scheduled = 1;
-- Release of expired leases.
CREATE INDEX deliveries_lease ON deliveries (lease_expires_at) WHERE status = 'executing';
-- Retention.
CREATE INDEX deliveries_finished ON deliveries (finished_at)
    WHERE status IN ('completed', 'failed', 'cancelled', 'dead');
-- Listing, newest first, by status, by channel type, by event.
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

-- One row per attempt. The statement that changes a delivery's status writes its attempt in
-- the same statement (a data-modifying CTE): a claim opens one, a report or a release ends it,
-- a postponement (a hand-back) deletes it. `agent_id` is the worker.
CREATE TABLE delivery_attempts (
    delivery_id  uuid        NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    attempt      integer     NOT NULL,
    agent_id     uuid        NOT NULL,
    claimed_at   timestamptz NOT NULL,
    ended_at     timestamptz,
    outcome      text,
    -- What the channel reported: the error of a failed attempt, the result of a successful one.
    error        jsonb,
    PRIMARY KEY (delivery_id, attempt)
);
