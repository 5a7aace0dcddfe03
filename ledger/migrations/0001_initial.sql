-- The integration guide's virtual_keys and key_usage, and each key's history (key_events).
-- Money is NUMERIC(20,9): exact to the nano-dollar, as Redis keeps it (the guide's
-- DECIMAL(10,2) / (10,4) would round). Text and counters are widened to the bounds the
-- server accepts (names 256, ids 128, models and request ids 256, providers 128; token
-- counts up to 1e12). Times are TIMESTAMPTZ: instants, whatever the session's time zone.
-- `extauthz ledger migrate` runs this file in one transaction; do not add BEGIN/COMMIT.

CREATE TABLE virtual_keys (
    id             VARCHAR(32) PRIMARY KEY,
    key_hash       VARCHAR(64) UNIQUE,  -- SHA-256 of the key; NULL only on a stub row
    name           VARCHAR(256) NOT NULL DEFAULT '',
    user_id        VARCHAR(128) NOT NULL DEFAULT '',
    team_id        VARCHAR(128),
    created_at     TIMESTAMPTZ NOT NULL,
    expires_at     TIMESTAMPTZ,
    is_active      BOOLEAN NOT NULL DEFAULT true,
    allowed_models JSONB NOT NULL DEFAULT '["*"]',
    max_budget     NUMERIC(20, 9) NOT NULL DEFAULT 0,  -- 0: no budget, as in the API
    spent          NUMERIC(20, 9) NOT NULL DEFAULT 0,  -- lifetime: the sum of key_usage.cost
    tpm_limit      INTEGER NOT NULL DEFAULT 0,
    rpm_limit      INTEGER NOT NULL DEFAULT 0,
    metadata       JSONB NOT NULL DEFAULT '{}',
    last_used      TIMESTAMPTZ,
    total_requests BIGINT NOT NULL DEFAULT 0,          -- charges in key_usage
    status         VARCHAR(16) NOT NULL DEFAULT 'active'
                   CHECK (status IN ('active', 'revoked', 'deleted')),
    deleted_at     TIMESTAMPTZ,
    version        BIGINT NOT NULL DEFAULT 0           -- the record's `ver` this row shows
);

CREATE TABLE key_usage (
    id                BIGSERIAL PRIMARY KEY,
    key_id            VARCHAR(32) NOT NULL REFERENCES virtual_keys (id),
    timestamp         TIMESTAMPTZ NOT NULL,
    tokens            BIGINT NOT NULL,
    cost              NUMERIC(20, 9) NOT NULL,
    model             VARCHAR(256) NOT NULL,
    provider          VARCHAR(128) NOT NULL,
    request_id        VARCHAR(256) NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    UNIQUE (key_id, request_id)  -- a replayed charge inserts nothing
);

CREATE TABLE key_events (
    id      BIGSERIAL PRIMARY KEY,
    key_id  VARCHAR(32) NOT NULL REFERENCES virtual_keys (id),
    version BIGINT NOT NULL,
    type    VARCHAR(16) NOT NULL
            CHECK (type IN ('created', 'updated', 'revoked', 'rotated', 'deleted')),
    at      TIMESTAMPTZ NOT NULL,
    record  JSONB NOT NULL,  -- the record's fields after the change (a digest, never a key)
    UNIQUE (key_id, version)
);

-- Stream entries the sink could not read: kept here, not dropped, so deleting them from
-- the stream loses nothing.
CREATE TABLE ledger_rejects (
    stream      TEXT NOT NULL,
    entry_id    TEXT NOT NULL,
    fields      JSONB NOT NULL,
    reason      TEXT NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, entry_id)
);

-- the guide's indexes
CREATE INDEX idx_keys_user ON virtual_keys (user_id);
CREATE INDEX idx_keys_team ON virtual_keys (team_id);
CREATE INDEX idx_keys_status ON virtual_keys (is_active, expires_at);
CREATE INDEX idx_usage_key ON key_usage (key_id, timestamp);
CREATE INDEX idx_usage_time ON key_usage (timestamp);
