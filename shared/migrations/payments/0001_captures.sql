-- The payment providers' context: one capture per order (idempotent), and the
-- simulated gateway's own ledger of charges and refunds, keyed by idempotency key.
CREATE TABLE captures (
    order_id       TEXT        PRIMARY KEY,
    provider       TEXT        NOT NULL,
    amount_cents   BIGINT      NOT NULL,
    charged_cents  BIGINT,
    capture_id     TEXT,
    status         TEXT        NOT NULL
        CHECK (status IN ('pending', 'captured', 'failed', 'refunded', 'cancelled')),
    refunded_cents BIGINT,
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE gateway_ledger (
    idempotency_key TEXT        PRIMARY KEY,
    provider        TEXT        NOT NULL,
    order_id        TEXT        NOT NULL,
    kind            TEXT        NOT NULL CHECK (kind IN ('charge', 'refund')),
    amount_cents    BIGINT      NOT NULL,
    reference       TEXT        NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
