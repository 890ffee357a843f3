-- The payment step as the coordinator opened it, from the first genuine
-- payment.awaiting of the order: the amount, the methods and the digest of
-- the one token it will accept. A submission is decided against this row,
-- never against what a token claims; a second payment.awaiting with another
-- token does not replace it. `accepted_method` is set when the coordinator
-- accepts the payment: the payment providers charge exactly `amount_cents`
-- (their discount applied) for that method, and nothing without it.
CREATE TABLE payment_steps (
    order_id        TEXT        PRIMARY KEY,
    token_digest    TEXT        NOT NULL,
    amount_cents    BIGINT      NOT NULL CHECK (amount_cents > 0),
    methods         TEXT[]      NOT NULL,
    expires_at      TIMESTAMPTZ NOT NULL,
    opened_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    accepted_method TEXT,
    accepted_at     TIMESTAMPTZ
);

-- The content an order was started with (a digest of supplier, products and
-- address): an order is priced once; an order.started with other content for
-- a known order is recorded as a rejection.
ALTER TABLE sagas ADD COLUMN started_digest TEXT;
