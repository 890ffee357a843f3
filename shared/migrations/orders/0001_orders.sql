-- The order service's context: the orders table is the read model the API
-- serves and the single owner of the terminal state (docs/design.md §3.5 and §6).
CREATE TABLE orders (
    order_id         TEXT        PRIMARY KEY,
    -- Hash of the POST /orders body that created it (idempotency); NULL when
    -- the order arrived as an order.started event from elsewhere.
    request_hash     TEXT,
    supplier         TEXT,
    products         JSONB,
    address          TEXT,
    status           TEXT        NOT NULL DEFAULT 'started'
        CHECK (status IN ('started', 'awaiting_payment', 'paying', 'completed', 'cancelled')),
    payment_methods  TEXT[],
    amount_cents     BIGINT,
    payment_token    TEXT,
    token_expires_at TIMESTAMPTZ,
    method           TEXT,
    charged_cents    BIGINT,
    capture_id       TEXT,
    refunded_cents   BIGINT,
    cancel_reason    TEXT,
    last_rejection   TEXT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Every change to an order wakes long-polling readers (GET /orders/{id}?wait_for=),
-- whichever process made it.
CREATE FUNCTION orders_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('orderflow_orders', NEW.order_id);
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER orders_changed AFTER INSERT OR UPDATE ON orders
    FOR EACH ROW EXECUTE FUNCTION orders_notify();
