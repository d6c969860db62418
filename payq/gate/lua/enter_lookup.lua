-- A lookup's way in (LookupEnterArgs): a fleet slot, without the breaker. A lookup by
-- key charges nothing, and is the one question that can free a charge pinned to a
-- ledger group whose breaker is open. Returns the fleet's answer (3 values).
return fleet_acquire(now)
