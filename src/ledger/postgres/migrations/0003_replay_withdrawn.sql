-- replay_withdrawn: the nonce of a replay whose answer was lost and that
-- the replayer found not taken (Ledger::replay_fate). The replay's UPDATE
-- checks it, so a copy of that UPDATE still queued at the server (behind a
-- row lock, on a connection whose client gave up) never takes effect after
-- the replayer journaled its withdraw (issue 12).
ALTER TABLE transactions ADD COLUMN replay_withdrawn text;
