"""The auditor can fail: every check is fed a doctored history and must name
the violation (and a faithful history must pass). Runs in scripts/test.sh
before the quick campaign:

    .venv/bin/python -m unittest discover -s tests/chaos -p 'test_*.py'

A check that cannot fail would let the campaign pass whatever the pipeline
did; these tests are what stops that from happening unnoticed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import sys
import unittest
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from audit import check, verdict  # noqa: E402
from faults import Fault  # noqa: E402
from producer import make_transactions  # noqa: E402

T0 = 1_800_000_000.0  # a fixed epoch second: the world below is the same every run
SEG = "wal/v1/2027/01/15/seg-000001"


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def fault(seq: int, kind: str, target: str, started: float, ended: float) -> Fault:
    """A fault that ran from T0+started to T0+ended."""
    return Fault(seq=seq, kind=kind, target=target, planned_at=0, hold=ended - started,
                 started=T0 + started, ended=T0 + ended)


def final_at(w: "World", n: int, at: float):
    """Transaction n's last downstream call at T0+at."""
    w.by_key[f"chaos/{w.tx(n).id}"]["last_call_ms"] = int((T0 + at) * 1000)


class World:
    """A faithful history of a small run: 6 transactions, each acknowledged,
    in the WAL byte for byte, paid once by the downstream, journaled, and
    `success` in the ledger. Tests doctor one part and run the auditor."""

    def __init__(self):
        rng = random.Random("audit-self-check")
        self.txs = make_transactions(rng, "t", 6, 10.0, 5, plain_only=True)
        self.ledger: dict[str, dict] = {}
        self.by_key: dict[str, dict] = {}
        self.journal: dict[str, list[dict]] = {}
        seg = b""
        for i, t in enumerate(self.txs):
            line = json.dumps({"transaction_id": t.id, "sha256": t.sha256,
                               "payload": t.body.decode()}).encode()
            ref = f"{SEG}#{len(seg)}+{len(line)}"
            seg += line + b"\n"
            acked_at = T0 + i
            t.attempts = [{"t0": acked_at - 0.01, "t1": acked_at, "api": 0, "status": 202,
                           "body": {"wal": {"ref": ref, "sha256": t.sha256}}}]
            t.final = "acked"
            t.ack = {"t": acked_at, "status": 202, "wal_ref": ref, "sha256": t.sha256}
            self.ledger[t.id] = {"transaction_id": t.id, "status": "success", "sha256": t.sha256,
                                 "updated_at": iso(acked_at + 1), "error_message": None}
            self.by_key[f"chaos/{t.id}"] = {"calls": 1, "successes": 1, "concurrent_overlaps": 0,
                                            "success_sha256": [t.sha256],
                                            "last_call_ms": int((acked_at + 0.5) * 1000)}
            self.journal[t.id] = [{"transaction_id": f"chaos/{t.id}", "kind": "attempt", "attempt": 1,
                                   "state": "success", "at": iso(acked_at + 0.6)}]
        self.segments: dict[str, bytes | Exception] = {SEG: seg}
        self.calls_without_key = 0
        self.faults: list[Fault] = []

    def tx(self, n: int):
        return self.txs[n]

    def calls(self) -> dict:
        keys = self.by_key.values()
        return {"total_calls": sum(k["calls"] for k in keys), "keys": len(self.by_key),
                "calls_without_key": self.calls_without_key,
                "duplicate_successes": sum(max(0, k["successes"] - 1) for k in keys),
                "concurrent_overlaps": sum(k["concurrent_overlaps"] for k in keys),
                "by_key": copy.deepcopy(self.by_key)}

    def audit(self, acked_before: str = "start") -> dict:
        return check(self.txs, self.faults, ledger=copy.deepcopy(self.ledger), calls=self.calls(),
                     journal=copy.deepcopy(self.journal),
                     read_wal=lambda keys: {k: self.segments.get(k, FileNotFoundError(k)) for k in keys},
                     acked_before=acked_before)


class AuditSelfCheck(unittest.TestCase):
    def assert_violation(self, w: World, check_name: str, tid: str | None):
        result = w.audit()
        found = Counter(v["check"] for v in result["violations"])
        self.assertIn(check_name, found, f"the auditor missed {check_name}: {result['violations']}")
        self.assertTrue(any(v["check"] == check_name and v["transaction_id"] == tid
                            for v in result["violations"]),
                        f"{check_name} does not name {tid}: {result['violations']}")
        self.assertEqual(verdict(result["violations"]), 1, "a violation must fail the run")
        return result

    def test_a_faithful_history_passes(self):
        w = World()
        w.faults = [fault(0, "kill_processor", "processor-1", 2.5, 3.0)]
        r = w.audit()
        self.assertEqual(r["violations"], [])
        self.assertEqual(verdict(r["violations"]), 0)
        s = r["summary"]
        self.assertEqual(s["acknowledged"], 6)
        self.assertEqual(s["outcomes"], {"success": 6})
        self.assertEqual(s["wal_records_checked"], 6)
        # acknowledged at T0+0..2 before the fault; the last of them (T0+2)
        # was called at T0+2.5, the fault ended at T0+3: recovered at once.
        self.assertEqual(r["recovery"]["kill_processor"]["max_secs"], 0.0)

    def test_recovery_time_is_measured_from_the_fault_end(self):
        w = World()
        final_at(w, 1, 13.0)
        w.faults = [fault(0, "redis_restart", "redis", 2.5, 3.0)]
        r = w.audit()
        self.assertEqual(r["recovery"]["redis_restart"]["max_secs"], 10.0)
        self.assertEqual(r["recovery"]["redis_restart"]["last_transaction_of_worst"], w.tx(1).id)

    def test_recovery_mode_counts_what_was_acknowledged_during_the_outage(self):
        w = World()
        # acknowledged at T0+3, while Redis was down (T0+2.5 .. T0+4.5), final at T0+40
        final_at(w, 3, 40.0)
        w.faults = [fault(0, "redis_restart", "redis", 2.5, 4.5)]
        self.assertEqual(w.audit()["recovery"]["redis_restart"]["max_secs"], 0.0)
        r = w.audit(acked_before="end")["recovery"]["redis_restart"]
        self.assertEqual(r["max_secs"], 35.5)
        self.assertEqual(r["last_transaction_of_worst"], w.tx(3).id)
        # The next fault (T0+4.6 .. T0+5.2) is charged only with what was
        # acknowledged since the first ended (transaction 5: final at
        # T0+5.5), not with the first one's straggler — which the
        # overlapping campaign's measure does charge it with.
        w.faults.append(fault(1, "kill_api", "api-1", 4.6, 5.2))
        self.assertEqual(w.audit(acked_before="end")["recovery"]["kill_api"]["max_secs"], 0.3)
        self.assertEqual(w.audit()["recovery"]["kill_api"]["max_secs"], 34.8)

    def test_recovery_mode_charges_a_late_acknowledgement_to_the_fault_it_was_sent_in(self):
        w = World()
        # sent at T0+4.2 while Redis was down (T0+2.5 .. T0+4.5), acknowledged
        # only at T0+5, final at T0+50
        w.tx(5).attempts[0]["t0"] = T0 + 4.2
        final_at(w, 5, 50.0)
        w.faults = [fault(0, "redis_pause", "redis", 2.5, 4.5)]
        r = w.audit(acked_before="end")["recovery"]["redis_pause"]
        self.assertEqual((r["max_secs"], r["last_transaction_of_worst"]), (45.5, w.tx(5).id))

    def test_missing_from_ledger(self):
        w = World()
        del w.ledger[w.tx(0).id]
        r = self.assert_violation(w, "acknowledged_but_missing_from_ledger", w.tx(0).id)
        self.assertEqual(r["summary"]["outcomes"]["missing"], 1)

    def test_not_terminal(self):
        for state in ("pending", "processing", "failed"):
            w = World()
            w.ledger[w.tx(2).id]["status"] = state
            self.assert_violation(w, "acknowledged_but_not_terminal", w.tx(2).id)

    def test_dead_letter_without_reason(self):
        w = World()
        t = w.tx(3)
        w.ledger[t.id]["status"] = "dead_letter"
        w.by_key[f"chaos/{t.id}"].update(successes=0, success_sha256=[])
        w.journal[t.id][0]["state"] = "dead_letter"
        self.assert_violation(w, "dead_letter_without_reason", t.id)
        w.ledger[t.id]["error_message"] = "downstream answered 400: bad request"
        self.assertEqual(w.audit()["violations"], [])

    def test_executed_but_dead_lettered(self):
        w = World()
        t = w.tx(3)
        w.ledger[t.id].update(status="dead_letter", error_message="retries exhausted after 6 attempts")
        self.assert_violation(w, "executed_but_dead_lettered", t.id)

    def test_ledger_sha256_differs(self):
        w = World()
        w.ledger[w.tx(1).id]["sha256"] = hashlib.sha256(b"other").hexdigest()
        self.assert_violation(w, "ledger_sha256_differs_from_acknowledged", w.tx(1).id)

    def test_receipt_sha256_differs(self):
        w = World()
        w.tx(1).ack["sha256"] = "0" * 64
        self.assert_violation(w, "receipt_sha256_differs_from_bytes_sent", w.tx(1).id)

    def test_acknowledgement_without_wal_ref(self):
        w = World()
        w.tx(1).ack["wal_ref"] = None
        self.assert_violation(w, "acknowledgement_without_wal_ref", w.tx(1).id)

    def test_wal_record_one_byte_different(self):
        w = World()
        t = w.tx(4)
        seg = bytearray(w.segments[SEG])
        off = int(t.ack["wal_ref"].rpartition("#")[2].split("+")[0])
        i = seg.index(b'"payload": "', off) + len(b'"payload": "') + 1
        seg[i] = ord("X") if seg[i] != ord("X") else ord("Y")
        w.segments[SEG] = bytes(seg)
        self.assert_violation(w, "wal_record_differs_from_bytes_sent", t.id)

    def test_wal_record_of_another_transaction(self):
        w = World()
        w.tx(4).ack["wal_ref"] = w.tx(5).ack["wal_ref"]
        self.assert_violation(w, "wal_record_differs_from_bytes_sent", w.tx(4).id)

    def test_wal_segment_missing(self):
        w = World()
        del w.segments[SEG]
        r = self.assert_violation(w, "wal_record_unreadable", w.tx(0).id)
        self.assertEqual(sum(v["check"] == "wal_record_unreadable" for v in r["violations"]), 6)

    def test_wal_segment_short(self):
        w = World()
        w.segments[SEG] = w.segments[SEG][:-40]
        self.assert_violation(w, "wal_record_unreadable", w.tx(5).id)

    def test_wal_record_not_json(self):
        w = World()
        ref = w.tx(2).ack["wal_ref"]
        off, ln = (int(x) for x in ref.rpartition("#")[2].split("+"))
        seg = w.segments[SEG]
        w.segments[SEG] = seg[:off] + b"\0" * ln + seg[off + ln:]
        self.assert_violation(w, "wal_record_unreadable", w.tx(2).id)

    def test_duplicate_success(self):
        w = World()
        k = w.by_key[f"chaos/{w.tx(0).id}"]
        k.update(calls=2, successes=2, success_sha256=[w.tx(0).sha256] * 2)
        self.assert_violation(w, "duplicate_success", w.tx(0).id)

    def test_overlapping_calls(self):
        w = World()
        w.by_key[f"chaos/{w.tx(5).id}"].update(calls=2, concurrent_overlaps=1)
        self.assert_violation(w, "overlapping_calls", w.tx(5).id)

    def test_calls_without_key(self):
        w = World()
        w.calls_without_key = 3
        self.assert_violation(w, "calls_without_idempotency_key", None)

    def test_success_without_downstream_success(self):
        w = World()
        w.by_key[f"chaos/{w.tx(2).id}"].update(successes=0, success_sha256=[])
        self.assert_violation(w, "success_without_a_downstream_success", w.tx(2).id)

    def test_executed_other_bytes(self):
        w = World()
        w.by_key[f"chaos/{w.tx(2).id}"]["success_sha256"] = [hashlib.sha256(b"x").hexdigest()]
        self.assert_violation(w, "executed_other_bytes", w.tx(2).id)

    def test_attempt_after_journaled_success(self):
        w = World()
        t = w.tx(1)
        w.journal[t.id].append({"transaction_id": f"chaos/{t.id}", "kind": "attempt", "attempt": 2,
                                "state": "success", "at": iso(T0 + 30)})
        self.assert_violation(w, "attempt_after_journaled_success", t.id)
        # ... and a replay without force of the lapsed claim of attempt 1
        # (it names that attempt) does not explain it: attempt 1's success
        # leaves that replay standing (rtpd's JournalIndex::known)
        lapsed = {"transaction_id": f"chaos/{t.id}", "kind": "replay", "attempt": 1,
                  "state": "pending", "at": iso(T0 + 29)}
        w.journal[t.id].append(lapsed)
        self.assert_violation(w, "attempt_after_journaled_success", t.id)
        # ... unless an operator forced a replay (it names no attempt)
        w.journal[t.id].remove(lapsed)
        w.journal[t.id].append({"transaction_id": f"chaos/{t.id}", "kind": "replay",
                                "state": "pending", "at": iso(T0 + 29)})
        self.assertEqual(w.audit()["violations"], [])

    def test_ledger_disagrees_with_journal(self):
        w = World()
        t = w.tx(1)
        w.journal[t.id][0]["state"] = "dead_letter"
        self.assert_violation(w, "ledger_disagrees_with_journal", t.id)

    def test_valid_first_post_refused(self):
        w = World()
        t = w.tx(0)
        t.attempts.insert(0, {"t0": T0 - 1, "t1": T0 - 0.9, "api": 0, "status": 400, "body": {}})
        self.assert_violation(w, "valid_first_post_refused", t.id)

    def test_same_bytes_refused_409(self):
        w = World()
        t = w.tx(0)
        t.dup = [{"t0": T0 + 10, "t1": T0 + 10.1, "api": 1, "status": 409, "body": {}}]
        self.assert_violation(w, "same_bytes_refused_409", t.id)

    @staticmethod
    def accept_other_bytes(w: World, n: int, at: float, flush_at: float | None):
        """Tx n's other bytes answered 202 at `at`; a ledger loss at `flush_at`."""
        t = w.tx(n)
        t.conflict_sha256 = hashlib.sha256(b"other bytes").hexdigest()
        t.conflict = [{"t0": at, "t1": at + 0.1, "api": 1, "status": 202, "body": {}}]
        if flush_at is not None:
            loss = Fault(seq=0, kind="redis_loss", target="redis", planned_at=0, hold=0,
                         started=flush_at, ended=flush_at + 1)
            loss.detail["flushed_at"] = flush_at
            w.faults = [loss]
        return t

    def test_conflicting_bytes_accepted(self):
        w = World()
        t = self.accept_other_bytes(w, 0, T0 + 10, None)
        self.assert_violation(w, "conflicting_bytes_accepted", t.id)
        # a loss before the first POST of the acknowledged bytes explains nothing
        w = World()
        t = self.accept_other_bytes(w, 3, T0 + 10, T0 + 1)
        r = self.assert_violation(w, "conflicting_bytes_accepted", t.id)
        self.assertNotIn("conflicting_bytes_accepted_after_ledger_loss", {v["check"] for v in r["violations"]})

    def test_conflicting_bytes_accepted_after_ledger_loss(self):
        # the flush lands while the acknowledged POST is in flight (its
        # ledger write already done): still the ledger-loss gap, named apart
        w = World()
        t = self.accept_other_bytes(w, 0, T0 + 10, T0 - 0.005)
        r = self.assert_violation(w, "conflicting_bytes_accepted_after_ledger_loss", t.id)
        self.assertNotIn("conflicting_bytes_accepted", {v["check"] for v in r["violations"]})

    def test_bytes_accepted_after_ledger_loss_held_and_executed(self):
        w = World()
        t = self.accept_other_bytes(w, 2, T0 + 10, T0 + 5)
        w.ledger[t.id]["sha256"] = t.conflict_sha256
        w.by_key[f"chaos/{t.id}"]["success_sha256"] = [t.conflict_sha256]
        self.assert_violation(w, "ledger_holds_bytes_accepted_after_ledger_loss", t.id)
        r = self.assert_violation(w, "executed_bytes_accepted_after_ledger_loss", t.id)
        checks = {v["check"] for v in r["violations"]}
        self.assertNotIn("executed_other_bytes", checks)
        self.assertNotIn("ledger_sha256_differs_from_acknowledged", checks)
        # bytes nobody was acknowledged for are still executed_other_bytes
        w.by_key[f"chaos/{t.id}"]["success_sha256"] = [hashlib.sha256(b"third").hexdigest()]
        self.assert_violation(w, "executed_other_bytes", t.id)

    def test_known_checks_do_not_fail_the_run(self):
        w = World()
        w.by_key[f"chaos/{w.tx(5).id}"].update(calls=2, concurrent_overlaps=1)
        v = w.audit()["violations"]
        self.assertEqual(verdict(v, {"overlapping_calls"}), 0)
        self.assertEqual(verdict(v, {"duplicate_success"}), 1)


class ReportSelfCheck(unittest.TestCase):
    def test_table_has_every_kind_and_the_worst_recovery(self):
        from campaign import table

        w = World()
        final_at(w, 1, 13.0)
        w.faults = [fault(0, "redis_restart", "redis", 2.5, 3.0),
                    fault(1, "kill_api", "api-1", 2.6, 4.0)]
        del w.ledger[w.tx(4).id]
        result = w.audit()
        report = {"seed": 7, "mode": "quick", "rate": 10.0, "faults_injected": 2,
                  "fault_phase_secs": 5.0, "faults_by_kind": {"redis_restart": 1, "kill_api": 1},
                  "faults_not_carried_out": {}, "audit": result}
        text = table(report)
        row = next(line for line in text.splitlines() if line.startswith("redis_restart"))
        self.assertIn("10.0", row)
        self.assertIn("kill_api", text)
        self.assertIn("missing 1", text)
        self.assertIn("violations: 1 — acknowledged_but_missing_from_ledger 1", text)

    def test_recovery_table_says_which_kinds_missed_the_target(self):
        from campaign import production_settings, recovery_table

        w = World()
        final_at(w, 3, 40.0)
        w.faults = [fault(0, "redis_restart", "redis", 2.5, 4.5),
                    fault(1, "kill_api", "api-1", 44.0, 45.0)]
        report = {"seed": 7, "mode": "recovery", "rate": 10.0, "faults_injected": 2, "settle_secs": 45.0,
                  "settings": vars(production_settings()), "audit": w.audit(acked_before="end"),
                  "faults": [f.record() for f in w.faults]}
        rows = {line.split()[0]: line for line in recovery_table(report).splitlines() if line.strip()}
        self.assertIn("35.5", rows["redis_restart"])
        self.assertTrue(rows["redis_restart"].endswith("NOT MET"), rows["redis_restart"])
        self.assertTrue(rows["kill_api"].endswith("met") and "NOT" not in rows["kill_api"], rows["kill_api"])
        self.assertNotIn("azurite_pause", rows)


if __name__ == "__main__":
    unittest.main()
