-- The messaging runtime's tables, created in each stateful service's schema
-- (the pool's search_path selects the schema).

-- Inbox: one row per message a consumer has applied; a duplicate delivery
-- finds its row and is skipped.
CREATE TABLE inbox (
    consumer    TEXT        NOT NULL,
    message_id  TEXT        NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, message_id)
);

-- Outbox: events written in the same transaction as the state change that
-- caused them; a relay publishes them with confirms and marks them sent.
CREATE TABLE outbox (
    id             BIGSERIAL   PRIMARY KEY,
    message_id     TEXT        NOT NULL,
    routing_key    TEXT        NOT NULL,
    correlation_id TEXT        NOT NULL,
    causation_id   TEXT,
    traceparent    TEXT        NOT NULL,
    occurred_at    BIGINT      NOT NULL,
    body           BYTEA       NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at        TIMESTAMPTZ
);

CREATE INDEX outbox_unsent ON outbox (id) WHERE sent_at IS NULL;
CREATE INDEX outbox_sent_at ON outbox (sent_at) WHERE sent_at IS NOT NULL;
