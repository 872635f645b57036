-- The ledger: one row per transaction, per-state counters kept by a trigger
-- in the same transaction as the row change, named leases and checkpoints,
-- and the seed's `messages` view.

CREATE TABLE transactions (
    -- "C": byte order, the order of the other ledgers' list cursors.
    transaction_id text COLLATE "C" PRIMARY KEY,
    status         text NOT NULL
                   CHECK (status IN ('pending', 'processing', 'success', 'failed', 'dead_letter')),
    sha256         text NOT NULL,
    wal_ref        text NOT NULL,
    attempts       integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    retry_count    integer NOT NULL DEFAULT 0 CHECK (retry_count >= 0),
    error_message  text,
    next_retry_at  timestamptz,
    lease_owner    text,
    lease_until    timestamptz,
    vendor         text,
    replay_nonce   text,
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL,
    -- A copy of the payload for SQL queries; NULL unless configured (the WAL
    -- holds the exact bytes).
    payload        jsonb
);

-- list(): newest update first, all states or one; retention: terminal rows
-- by age (status + updated_at prefix).
CREATE INDEX transactions_by_update ON transactions (updated_at, transaction_id);
CREATE INDEX transactions_by_status ON transactions (status, updated_at, transaction_id);

-- Counts by state without scanning: each row is one slot; a statement
-- updates the slot of its server process, so concurrent writers rarely
-- queue on the same row. The count of a state is the sum over slots.
CREATE TABLE state_counts (
    slot        smallint PRIMARY KEY,
    pending     bigint NOT NULL DEFAULT 0,
    processing  bigint NOT NULL DEFAULT 0,
    success     bigint NOT NULL DEFAULT 0,
    failed      bigint NOT NULL DEFAULT 0,
    dead_letter bigint NOT NULL DEFAULT 0
);
INSERT INTO state_counts (slot) SELECT generate_series(0, 63);

CREATE FUNCTION rtpd_count_states() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    gone  text;
    added text;
BEGIN
    IF TG_OP <> 'INSERT' THEN gone := OLD.status; END IF;
    IF TG_OP <> 'DELETE' THEN added := NEW.status; END IF;
    IF gone IS NOT DISTINCT FROM added THEN
        RETURN NULL;
    END IF;
    UPDATE state_counts SET
        pending     = pending     + (CASE WHEN added = 'pending'     THEN 1 ELSE 0 END)
                                  - (CASE WHEN gone  = 'pending'     THEN 1 ELSE 0 END),
        processing  = processing  + (CASE WHEN added = 'processing'  THEN 1 ELSE 0 END)
                                  - (CASE WHEN gone  = 'processing'  THEN 1 ELSE 0 END),
        success     = success     + (CASE WHEN added = 'success'     THEN 1 ELSE 0 END)
                                  - (CASE WHEN gone  = 'success'     THEN 1 ELSE 0 END),
        failed      = failed      + (CASE WHEN added = 'failed'      THEN 1 ELSE 0 END)
                                  - (CASE WHEN gone  = 'failed'      THEN 1 ELSE 0 END),
        dead_letter = dead_letter + (CASE WHEN added = 'dead_letter' THEN 1 ELSE 0 END)
                                  - (CASE WHEN gone  = 'dead_letter' THEN 1 ELSE 0 END)
    WHERE slot = pg_backend_pid() % 64;
    RETURN NULL;
END
$$;

CREATE TRIGGER transactions_count_states
    AFTER INSERT OR DELETE OR UPDATE OF status ON transactions
    FOR EACH ROW EXECUTE FUNCTION rtpd_count_states();

-- TRUNCATE fires no row triggers: an emptied table has zero of everything.
CREATE FUNCTION rtpd_zero_counts() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE state_counts
    SET pending = 0, processing = 0, success = 0, failed = 0, dead_letter = 0;
    RETURN NULL;
END
$$;

CREATE TRIGGER transactions_truncate_counts
    AFTER TRUNCATE ON transactions
    FOR EACH STATEMENT EXECUTE FUNCTION rtpd_zero_counts();

CREATE TABLE leases (
    name       text PRIMARY KEY,
    owner      text NOT NULL,
    held_until timestamptz NOT NULL
);

CREATE TABLE checkpoints (
    name  text PRIMARY KEY,
    value text NOT NULL
);

-- The seed's table, as a view with its column names, so its queries
-- ("SELECT transaction_id, status, error_message FROM messages ORDER BY
-- created_at DESC LIMIT 10") run unchanged.
CREATE VIEW messages AS
SELECT transaction_id, payload, status, retry_count, error_message,
       next_retry_at, created_at, updated_at
FROM transactions;
