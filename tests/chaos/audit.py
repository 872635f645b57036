"""The auditor: reads what the vendor was told (the producer's history), what
the ledger says (the API), what the downstream saw (the mock's `/calls`) and
what the WAL holds (Azurite, read with Microsoft's SDK, not with rtpd), and
checks the guarantees against each other. Every violation names its check,
the transaction and the evidence.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime

from stack import CONTAINER, http_json



def vendor_id(key: str) -> str:
    """The vendor's own id of a ledger key / Idempotency-Key (`<vendor>/<id>`
    when authentication is on). The campaign has one vendor, so ids stay
    unique."""
    return key.split("/", 1)[-1]

def parse_ts(s: str | None) -> float | None:
    if not s:
        return None
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def ledger_records(stack) -> dict[str, dict]:
    out: dict[str, dict] = {}
    cursor = None
    base = stack.api_urls[0]
    while True:
        url = f"{base}/v1/transactions?limit=1000" + (f"&cursor={cursor}" if cursor else "")
        status, page = http_json("GET", url, headers=stack.admin_headers(), timeout=60)
        if status != 200:
            raise RuntimeError(f"listing the ledger: {status} {page}")
        for r in page["items"]:
            out[r["transaction_id"]] = r
        cursor = page.get("next_cursor")
        if not cursor:
            return out


def mock_calls(stack) -> dict:
    status, body = http_json("GET", f"{stack.mock_url}/calls", timeout=60)
    if status != 200:
        raise RuntimeError(f"mock /calls: {status}")
    return body


def read_segments(conn_str: str, keys: set[str]) -> dict[str, bytes | Exception]:
    from azure.storage.blob import BlobServiceClient

    svc = BlobServiceClient.from_connection_string(conn_str)
    container = svc.get_container_client(CONTAINER)

    def one(key):
        try:
            return key, container.download_blob(key).readall()
        except Exception as e:  # reported per record as unreadable
            return key, e

    with ThreadPoolExecutor(8) as pool:
        return dict(pool.map(one, sorted(keys)))


def journal_entries(conn_str: str, unreadable: dict[str, str] | None = None) -> dict[str, list[dict]]:
    """Every outcome-journal entry (outcomes/v1/), by transaction id, in time
    order. A segment Azurite will not return (after a restart it has been
    seen to answer 500 for good for one blob: an emulator's loss, not
    rtpd's) is read three times, then named in `unreadable` and left out:
    the checks that lean on the journal are the weaker for it, and the
    report says so rather than losing the whole audit."""
    from azure.storage.blob import BlobServiceClient

    container = BlobServiceClient.from_connection_string(conn_str).get_container_client(CONTAINER)
    keys = [b.name for b in container.list_blobs(name_starts_with="outcomes/v1/")]
    out: dict[str, list[dict]] = defaultdict(list)
    read = read_segments(conn_str, set(keys))
    for _ in range(2):
        failed = {k for k, d in read.items() if not isinstance(d, bytes)}
        if not failed:
            break
        time.sleep(1)
        read.update(read_segments(conn_str, failed))
    for key, data in read.items():
        if not isinstance(data, bytes):
            if unreadable is None:
                raise RuntimeError(f"journal segment {key} unreadable: {data}")
            unreadable[key] = str(data).splitlines()[0][:200]
            continue
        for line in data.splitlines():
            if line.strip():
                e = json.loads(line)
                out[vendor_id(e["transaction_id"])].append(e)
    for entries in out.values():
        entries.sort(key=lambda e: e["at"])
    return out


def verdict(violations: list[dict], known: list[str] | set[str] = ()) -> int:
    """The campaign's exit code: 1 if any violation is of a check not listed
    as known (`--known CHECK`), else 0."""
    return 1 if any(v["check"] not in set(known) for v in violations) else 0


def split_ref(ref: str) -> tuple[str, int, int]:
    seg, _, rng = ref.rpartition("#")
    off, _, ln = rng.partition("+")
    return seg, int(off), int(ln)


def dead_letter_reason(rec: dict) -> str:
    msg = (rec.get("error_message") or "").strip()
    return msg.split(":")[0][:60] if msg else ""


def audit(stack, txs: list, faults: list, t_start: float, acked_before: str = "start") -> dict:
    """Reads the evidence from the running stack and checks it."""
    conn = stack.conn["storage"]
    unreadable: dict[str, str] = {}
    result = check(txs, faults, ledger=ledger_records(stack), calls=mock_calls(stack),
                   journal=journal_entries(conn, unreadable),
                   read_wal=lambda keys: read_segments(conn, keys), acked_before=acked_before)
    result["summary"]["journal_segments_unreadable"] = unreadable
    return result


def check(txs: list, faults: list, ledger: dict[str, dict], calls: dict,
          journal: dict[str, list[dict]], read_wal, acked_before: str = "start") -> dict:
    """The checks, over evidence already read: the vendor's history (`txs`),
    the ledger's records by id, the mock's `/calls`, the outcome journal by
    id, and `read_wal(segment keys) -> {key: bytes | Exception}`. Pure, so a
    doctored history can be fed to it (tests/chaos/test_audit.py)."""
    violations: list[dict] = []
    notes: Counter = Counter()

    def violate(check: str, tid: str | None, **evidence):
        violations.append({"check": check, "transaction_id": tid, **evidence})

    by_key = {vendor_id(k): v for k, v in calls.get("by_key", {}).items()}
    losses = sorted(f.detail["flushed_at"] for f in faults if f.kind == "redis_loss" and "flushed_at" in f.detail)

    def accepted_after_loss(t) -> str | None:
        """The sha256 of other bytes this id was acknowledged for after a
        ledger loss (open defect N1, docs/reliability.md): a flush after the
        first POST of the acknowledged bytes began can have wiped its ledger
        record before the other bytes arrived."""
        first = t.attempts[0]["t0"] if t.attempts else t.ack["t"]
        for a in t.conflict:
            if a["status"] is not None and a["status"] < 300 and any(first < x < a["t0"] for x in losses):
                return t.conflict_sha256
        return None

    acked = [t for t in txs if t.final == "acked"]
    outcomes: Counter = Counter()
    reasons: Counter = Counter()
    by_fate: dict[str, Counter] = defaultdict(Counter)
    refs = {}
    for t in acked:
        if t.ack["sha256"] != t.sha256:
            violate("receipt_sha256_differs_from_bytes_sent", t.id, receipt=t.ack, sent=t.sha256)
        rec = ledger.get(t.id)
        state = rec["status"] if rec else "missing"
        outcomes[state] += 1
        by_fate[t.fate][state] += 1
        if rec is None:
            violate("acknowledged_but_missing_from_ledger", t.id, ack=t.ack)
            continue
        if state not in ("success", "dead_letter"):
            violate("acknowledged_but_not_terminal", t.id, record=rec)
        if state == "dead_letter":
            reason = dead_letter_reason(rec)
            reasons[reason or "(none)"] += 1
            if not reason:
                violate("dead_letter_without_reason", t.id, record=rec)
        after_loss = accepted_after_loss(t)
        if rec["sha256"] != t.sha256:
            if after_loss and rec["sha256"] == after_loss:
                violate("ledger_holds_bytes_accepted_after_ledger_loss", t.id, ledger=rec["sha256"],
                        acked=t.sha256)
            else:
                violate("ledger_sha256_differs_from_acknowledged", t.id, ledger=rec["sha256"], acked=t.sha256)
        if t.ack.get("wal_ref"):
            refs[t.id] = t.ack["wal_ref"]
        else:
            violate("acknowledgement_without_wal_ref", t.id, ack=t.ack)
        k = by_key.get(t.id, {})
        if state == "success" and k.get("successes", 0) == 0:
            violate("success_without_a_downstream_success", t.id, record=rec, calls=k)
        entries = journal.get(t.id, [])
        if state == "dead_letter" and k.get("successes", 0) > 0:
            violate("executed_but_dead_lettered", t.id, record=rec, calls=k,
                    success_journaled=any(e["state"] == "success" for e in entries), journal=entries)
        attempts = [e for e in entries if e["kind"] == "attempt"]
        done = next((e for e in attempts if e["state"] == "success"), None)
        if done is not None:
            later = [e for e in attempts if (e.get("attempt") or 0) > (done.get("attempt") or 0)]
            # A replay entry in a state other than pending withdraws the
            # replay it names (its ledger step did not take): that one did not
            # happen. Only a replay journaled after the success explains a
            # later attempt.
            withdrawn = {e.get("replay_nonce") for e in entries
                         if e["kind"] == "replay" and e["state"] != "pending" and e.get("replay_nonce")}
            # A replay without force of a lapsed claim names its attempt; a
            # success of that attempt or a later one leaves it standing
            # (rtpd's JournalIndex::known): it explains no later attempt.
            succeeded = [e.get("attempt") for e in attempts
                         if e["state"] == "success" and e.get("attempt") is not None]
            replayed = any(e["kind"] == "replay" and e["state"] == "pending"
                           and e.get("replay_nonce") not in withdrawn
                           and not (e.get("attempt") is not None
                                    and any(a >= e["attempt"] for a in succeeded))
                           and parse_ts(e["at"]) >= parse_ts(done["at"]) for e in entries)
            if later and not replayed:
                violate("attempt_after_journaled_success", t.id, journal=entries, calls=k)
        if attempts and state in ("success", "dead_letter") and attempts[-1]["state"] != state \
                and not any(e["state"] == state for e in attempts):
            violate("ledger_disagrees_with_journal", t.id, ledger=state, journal=entries)
        for sha in k.get("success_sha256", []):
            if sha != t.sha256:
                if after_loss and sha == after_loss:
                    violate("executed_bytes_accepted_after_ledger_loss", t.id, executed=sha, acked=t.sha256)
                else:
                    violate("executed_other_bytes", t.id, executed=sha, acked=t.sha256)

    # The WAL: every acknowledged record readable and byte-identical.
    segments = read_wal({split_ref(r)[0] for r in refs.values()})
    wal_ok = 0
    by_id = {t.id: t for t in acked}
    for tid, ref in refs.items():
        seg, off, ln = split_ref(ref)
        data = segments.get(seg)
        if not isinstance(data, bytes) or off + ln > len(data):
            violate("wal_record_unreadable", tid, ref=ref, error=str(data)[:200] if not isinstance(data, bytes) else "short segment")
            continue
        try:
            rec = json.loads(data[off:off + ln])
            payload = rec["payload"].encode()
        except (ValueError, KeyError, AttributeError) as e:
            violate("wal_record_unreadable", tid, ref=ref, error=str(e))
            continue
        t = by_id[tid]
        if rec.get("transaction_id") != tid or payload != t.body or rec.get("sha256") != t.sha256:
            violate("wal_record_differs_from_bytes_sent", tid, ref=ref,
                    wal_sha256=hashlib.sha256(payload).hexdigest(), sent=t.sha256)
            continue
        wal_ok += 1

    # The downstream.
    for key, k in by_key.items():
        if k.get("successes", 0) > 1:
            violate("duplicate_success", key, calls=k)
        if k.get("concurrent_overlaps", 0) > 0:
            violate("overlapping_calls", key, calls=k)
    if calls.get("calls_without_key", 0):
        violate("calls_without_idempotency_key", None, count=calls["calls_without_key"])

    # What the vendor was told.
    for t in txs:
        for a in t.attempts:
            if a["status"] is not None and 400 <= a["status"] < 500 and a["status"] not in (408, 429):
                violate("valid_first_post_refused", t.id, attempt=a)
        if any(a["status"] == 409 for a in t.dup):
            violate("same_bytes_refused_409", t.id, attempts=t.dup)
        if t.final == "acked" and accepted_after_loss(t):
            violate("conflicting_bytes_accepted_after_ledger_loss", t.id, attempts=t.conflict,
                    acked_sha256=t.sha256, losses=[x for x in losses if x > t.attempts[0]["t0"]][:3])
        else:
            for a in t.conflict:
                if a["status"] is not None and a["status"] < 300:
                    violate("conflicting_bytes_accepted", t.id, attempt=a, acked_sha256=t.sha256)
        if t.final != "acked":
            notes[f"not_acknowledged_{t.final}"] += 1
            if by_key.get(t.id, {}).get("successes", 0):
                notes["not_acknowledged_but_executed"] += 1
    acked_ids = {t.id for t in acked}
    notes["ledger_records_never_acknowledged"] = sum(1 for i in ledger if i not in acked_ids)
    notes["duplicate_probes"] = sum(1 for t in txs if t.dup)
    notes["conflict_probes"] = sum(1 for t in txs if t.conflict)

    recovery = recovery_times(acked, ledger, by_key, faults, journal, acked_before)
    summary = {
        "transactions_sent": len(txs),
        "acknowledged": len(acked),
        "outcomes": dict(outcomes),
        "dead_letter_reasons": dict(reasons),
        "by_fate": {f: dict(c) for f, c in sorted(by_fate.items())},
        "wal_records_checked": wal_ok,
        "wal_segments_read": len(segments),
        "journal_entries": sum(len(v) for v in journal.values()),
        "downstream": {k: calls.get(k) for k in ("total_calls", "keys", "calls_without_key",
                                                 "duplicate_successes", "concurrent_overlaps")},
        "notes": dict(notes),
    }
    return {"summary": summary, "violations": violations, "recovery": recovery}


def recovery_times(acked, ledger, by_key, faults, journal, acked_before: str = "start") -> dict:
    """Per fault: from its end until every plain transaction acknowledged
    before it started was final (`acked_before="end"`, for faults one at a
    time: first sent after the previous fault ended and before this one
    did, however late its acknowledgement came). A transaction is final at its last
    downstream call (the mock's clock; the processor only settles after
    it), or at the ledger's updated_at if the downstream never saw it."""
    rows = []
    for t in acked:
        if t.fate != "plain":
            continue  # scripted retries wait by design
        rec = ledger.get(t.id)
        if rec is None or rec["status"] not in ("success", "dead_letter"):
            continue  # reported as a violation already
        k = by_key.get(t.id)
        done = k["last_call_ms"] / 1000 if k and k.get("last_call_ms") else parse_ts(rec.get("updated_at"))
        sent = t.attempts[0]["t0"] if t.attempts else t.ack["t"]
        rows.append((t.ack["t"], done, t.id, sent))
    rows.sort()
    ack_times = [r[0] for r in rows]
    by_sent = sorted((r[3], r[1], r[2]) for r in rows if r[1] is not None)
    sent_times = [r[0] for r in by_sent]
    prefix, best = [], (0.0, None)
    for ack_t, done, tid, _ in rows:
        if done is not None and done > best[0]:
            best = (done, tid)
        prefix.append(best)
    import bisect

    per_kind: dict[str, list[float]] = defaultdict(list)
    in_flight: dict[str, list[float]] = defaultdict(list)
    worst: dict[str, tuple[float, int, str | None]] = {}
    prev_end = None
    for f in faults:
        if f.started is None or f.ended is None:
            continue
        i = bisect.bisect_left(ack_times, f.started)
        if acked_before == "end":
            # One fault at a time (the recovery mode): what the vendor sent
            # since the previous fault's return and before this one's, so a
            # straggler of one fault is not charged to the next, and one
            # acknowledged only after the return is still this fault's.
            lo = bisect.bisect_left(sent_times, prev_end) if prev_end is not None else 0
            hi = bisect.bisect_left(sent_times, f.ended)
            prev_end = f.ended
            if hi <= lo:
                continue
            _, done, tid = max(by_sent[lo:hi], key=lambda r: r[1])
        elif i == 0:
            continue
        else:
            done, tid = prefix[i - 1]
        r = max(0.0, done - f.ended)
        f.detail["recovery_secs"] = round(r, 3)
        per_kind[f.kind].append(r)
        if r >= worst.get(f.kind, (-1.0,))[0]:
            worst[f.kind] = (r, f.seq, tid)
        # Only what was acknowledged in the 5 s before the fault: less
        # inherited from earlier, overlapping faults.
        j = bisect.bisect_left(ack_times, f.started - 5.0)
        recent = [rows[x][1] for x in range(j, i) if rows[x][1] is not None]
        in_flight[f.kind].append(max([0.0] + [d - f.ended for d in recent]))
    out = {}
    for kind, rs in sorted(per_kind.items()):
        fl = in_flight[kind]
        out[kind] = {"faults": len(rs), "median_secs": round(statistics.median(rs), 2),
                     "max_secs": round(max(rs), 2), "worst_fault_seq": worst[kind][1],
                     "last_transaction_of_worst": worst[kind][2],
                     "in_flight_median_secs": round(statistics.median(fl), 2),
                     "in_flight_max_secs": round(max(fl), 2)}
    slow = sorted(((d - a, tid) for a, d, tid, _ in rows if d is not None), reverse=True)[:10]
    ack_of = {t.id: t.ack["t"] for t in acked}

    def first_attempt(tid):
        ts = [parse_ts(e["at"]) for e in journal.get(tid, []) if e["kind"] == "attempt"]
        return round(min(ts) - ack_of[tid], 2) if ts else None

    out["_slowest_plain_transactions"] = [
        {"transaction_id": tid, "ack_to_final_secs": round(s, 2),
         "ack_to_first_journaled_attempt_secs": first_attempt(tid),
         "journaled_attempts": sum(1 for e in journal.get(tid, []) if e["kind"] == "attempt")}
        for s, tid in slow]
    return out
