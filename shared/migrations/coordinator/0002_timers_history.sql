-- Durable timers: one per (order, step). A step is open while its timer is
-- armed; the timer firing and the step completing are both conditional
-- updates of this row, so only one of them can win.
CREATE TABLE timers (
    order_id   TEXT        NOT NULL,
    step       TEXT        NOT NULL CHECK (step IN ('generate-info', 'payment', 'flow')),
    due_at     TIMESTAMPTZ NOT NULL,
    state      TEXT        NOT NULL DEFAULT 'armed' CHECK (state IN ('armed', 'fired', 'disarmed')),
    armed_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    settled_at TIMESTAMPTZ,
    PRIMARY KEY (order_id, step)
);

CREATE INDEX timers_due ON timers (due_at) WHERE state = 'armed';

-- The execution history of each order: every event the coordinator saw,
-- classified, in the order it saw them.
CREATE TABLE history (
    id           BIGSERIAL   PRIMARY KEY,
    order_id     TEXT        NOT NULL,
    recorded_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    kind         TEXT        NOT NULL CHECK (kind IN ('event', 'rejection', 'timer', 'late', 'compensation')),
    name         TEXT        NOT NULL,
    message_id   TEXT        NOT NULL,
    causation_id TEXT,
    detail       JSONB       NOT NULL DEFAULT '{}'
);

CREATE INDEX history_order ON history (order_id, id);
CREATE UNIQUE INDEX history_message ON history (order_id, message_id);
CREATE INDEX sagas_running ON sagas (updated_at) WHERE status = 'running';
