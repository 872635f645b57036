-- replay_withdrawn: the nonces of replays whose answer was lost and that
-- the replayer found not taken (Ledger::replay_fate). The replay's UPDATE
-- checks them, so a copy of such an UPDATE still queued at the server
-- (behind a row lock, on a connection whose client gave up) never takes
-- effect after the replayer journaled its withdraw (issue 12). Every
-- withdrawn nonce is kept: a later replay's fence must not lift an earlier
-- one's. Only replays whose answer was lost add one.
ALTER TABLE transactions ADD COLUMN replay_withdrawn text[];
