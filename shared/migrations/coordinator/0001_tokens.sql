-- The saga coordinator's context: sagas and the task-token ledger.
CREATE TABLE sagas (
    order_id   TEXT        PRIMARY KEY,
    status     TEXT        NOT NULL DEFAULT 'running'
        CHECK (status IN ('running', 'completed', 'cancelled')),
    step       TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- A token is accepted once: its row is written in the transaction that accepts it.
CREATE TABLE used_tokens (
    token_digest TEXT        PRIMARY KEY,
    order_id     TEXT        NOT NULL,
    method       TEXT        NOT NULL,
    used_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
