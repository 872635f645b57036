-- attempt_base: the attempt count when the current retry budget began (an
-- operator replay sets it to `attempts`), so retries are counted from there
-- while `attempts`, the fencing token, keeps growing.
-- expires_at: the vendor's deadline; no downstream call starts after it.
ALTER TABLE transactions
    ADD COLUMN attempt_base integer NOT NULL DEFAULT 0 CHECK (attempt_base >= 0),
    ADD COLUMN expires_at   timestamptz;
