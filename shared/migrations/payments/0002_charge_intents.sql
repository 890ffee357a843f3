-- A charge is recorded as an intent (`charging`, with the gateway's
-- idempotency key) and committed before the gateway is called: whatever
-- happens to the provider during the call, the intent is there for the next
-- attempt or for the compensation to resolve against the gateway (refund
-- what it charged, or close the key so nothing is charged later).
-- `pending` is the state older versions used while the call ran.
ALTER TABLE captures DROP CONSTRAINT captures_status_check;
ALTER TABLE captures ADD CONSTRAINT captures_status_check
    CHECK (status IN ('pending', 'charging', 'captured', 'failed', 'refunded', 'cancelled'));
ALTER TABLE captures ADD COLUMN charge_key TEXT;

-- The simulated gateway can close ("void") an idempotency key that has not
-- been charged, as real gateways close an unpaid trade: a later charge with
-- that key is declined.
ALTER TABLE gateway_ledger DROP CONSTRAINT gateway_ledger_kind_check;
ALTER TABLE gateway_ledger ADD CONSTRAINT gateway_ledger_kind_check
    CHECK (kind IN ('charge', 'refund', 'void'));
