-- Retention (shared/src/store/retention.rs) deletes inbox rows older than
-- ORDERFLOW_RETENTION_DAYS, oldest first, a batch at a time: it finds them by
-- age. (Building it locks writes to the inbox once, while it is built.)
CREATE INDEX inbox_received_at ON inbox (received_at);

-- How often sweeps had the broker refuse a row as unroutable (no queue bound
-- to its routing key), and the last refusal. Only such refusals count: a
-- broker that is away is never a reason to give up on a row.
ALTER TABLE outbox ADD COLUMN attempts INT NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN last_error TEXT;

-- Outbox rows the broker kept refusing as unroutable, moved here by the
-- relay (in the transaction that saw the last refusal) so sweeps stop
-- trying them. `orderflow dlq list` shows them; `orderflow dlq replay
-- --outbox --schema <schema> --id <id>` puts one back into the outbox once a
-- queue is bound to its routing key. Same id as the outbox row it was.
CREATE TABLE outbox_dead (
    id             BIGINT      PRIMARY KEY,
    message_id     TEXT        NOT NULL,
    routing_key    TEXT        NOT NULL,
    correlation_id TEXT        NOT NULL,
    causation_id   TEXT,
    traceparent    TEXT        NOT NULL,
    occurred_at    BIGINT      NOT NULL,
    body           BYTEA       NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL,
    attempts       INT         NOT NULL,
    last_error     TEXT,
    failed_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    reason         TEXT        NOT NULL
);
