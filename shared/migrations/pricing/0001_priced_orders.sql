-- generate-info's context: every order it priced, with a digest of the
-- content it priced (supplier, products, address) and the message that
-- carried it. An order is priced once: the same content again is a
-- duplicate; other content for a known order is refused (dead-lettered
-- with the reason), never priced again.
CREATE TABLE priced_orders (
    order_id       TEXT        PRIMARY KEY,
    content_digest TEXT        NOT NULL,
    message_id     TEXT        NOT NULL,
    priced_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
