-- Retention (services/saga-coordinator/src/retention.rs) deletes finished
-- sagas that ended longer ago than ORDERFLOW_RETENTION_DAYS, with their
-- timers, history, used tokens and payment step, a batch of sagas at a
-- time, and settled timers of sagas that no longer run. These indexes let
-- it find them without scanning the tables. (Timers, history and payment
-- steps are already found by order id.)
CREATE INDEX sagas_finished ON sagas (updated_at) WHERE status IN ('completed', 'cancelled');
CREATE INDEX used_tokens_order ON used_tokens (order_id);
CREATE INDEX timers_settled ON timers (settled_at) WHERE state <> 'armed';
