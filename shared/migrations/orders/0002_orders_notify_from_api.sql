-- Long-poll wake-ups no longer come from a trigger on every insert and
-- update: each NOTIFY takes PostgreSQL's database-wide notification lock
-- until its transaction's commit is flushed, which serialised every write to
-- `orders`. The order API, which applies every change to this table through
-- its own consumer, wakes its own waiters in memory and tells other API
-- instances with one batched NOTIFY (payload: order id) on the same channel.
DROP TRIGGER IF EXISTS orders_changed ON orders;
DROP FUNCTION IF EXISTS orders_notify();
