"""Real-process fault campaign (Jepsen-style) and soak test for rtpd.

    campaign.py [--quick] [--seed N] [--faults N] [--rate R] [--out DIR]
    campaign.py --soak [--soak-minutes M]
    campaign.py --recovery [--reps N] [--settle SECS]

Campaign: starts the production-shaped stack (stack.py), posts transactions
at a steady rate (producer.py) while a seeded fault plan runs (faults.py),
then turns faults off, lets the pipeline drain, runs `rtpd reconcile`, and
audits the history (audit.py). Writes report.json and report.txt to --out and
exits 1 on any violation, 2 if the campaign itself could not run.

Recovery: one outage of Redis, Service Bus, Azurite (up to 10 s) or one
killed process at a time, each followed by a calm, under a steady load of
plain transactions and with the production timeouts; reports, per kind, how
long after the return everything acknowledged before it was final, and exits
1 if that is over 30 s for any fault.

Soak: the same stack without faults; measures the maximum sustained rate,
then runs at half of it for --soak-minutes, sampling the RSS of every rtpd
process every 10 s, and audits the result the same way.

Replay a seed: the same --seed (and the same mode flags) draws the same fault
plan and the same workload.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from audit import audit, verdict
from faults import KINDS, Fault, Injector, plan
from producer import Producer, make_transactions
from stack import REPO, Settings, Stack, http_json


def log(msg: str):
    print(f"[{datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def counts(stack) -> dict:
    for url in stack.api_urls:
        try:
            # /metrics is admin-only (RTPD_PUBLIC_METRICS is off, as in production)
            status, body = http_json("GET", f"{url}/metrics", headers=stack.admin_headers(), timeout=10)
            if status == 200 and isinstance(body, dict):
                return body
        except OSError:
            continue
    return {}


def wait_drained(stack, timeout: float) -> tuple[bool, dict]:
    """Until nothing is pending, processing or failed (twice in a row)."""
    deadline = time.time() + timeout
    calm, c = 0, {}
    while time.time() < deadline:
        c = counts(stack)
        busy = sum(c.get(k, 1) for k in ("pending", "processing", "failed"))
        calm = calm + 1 if busy == 0 and c else 0
        if calm >= 2:
            return True, c
        time.sleep(1)
    return False, c


def quiesce(stack, t_start: float, drain_secs: float) -> dict:
    log("quiescent phase: faults off, every process up, true clocks")
    stack.heal()
    drained, c = wait_drained(stack, drain_secs)
    log(f"drained={drained} {c}")
    log("rtpd reconcile over the whole run")
    try:
        r = stack.cli("reconcile", "--from", iso(t_start - 120),
                      "--pending-after-secs", str(stack.s.pending_after_secs), timeout=900)
        code, out = r.returncode, (r.stdout + r.stderr).strip().splitlines()
    except subprocess.TimeoutExpired as e:
        # Reported, and the audit still runs: losing the run's history to a
        # slow reconcile (a long run on a busy machine did) hides everything.
        code, out = "timeout after 900 s", [f"rtpd reconcile did not finish: {e}"]
    log(f"reconcile exit {code}: {out[-1] if out else ''}")
    drained2, c2 = wait_drained(stack, drain_secs)
    log(f"after reconcile drained={drained2} {c2}")
    return {"drained_before_reconcile": drained, "reconcile_exit": code,
            "reconcile_output": out[-3:], "drained_after_reconcile": drained2, "counts": c2}


def log_errors(stack) -> dict:
    """ERROR lines per rtpd process log (panics count too)."""
    out = {}
    for name in [*stack.rtpd_names, "mock"]:
        p = stack.logs / f"{name}.log"
        if p.exists():
            # Without colour escapes, which would hide the level from \b.
            text = re.sub(r"\x1b\[[0-9;]*m", "", p.read_text(errors="replace"))
            out[name] = {"error_lines": len(re.findall(r"\bERROR\b", text)),
                         "panics": text.count("panicked at")}
    return out


def table(report: dict) -> str:
    lines = []
    lines.append(f"rtpd fault campaign — seed {report['seed']} ({report['mode']}), "
                 f"{report['faults_injected']} faults in {report['fault_phase_secs']:.0f}s, "
                 f"{report['rate']} tx/s offered")
    lines.append("")
    lines.append(f"{'':28} {'':>6} {'not':>6} {'recovery s (all before)':>24} {'recovery s (in flight)':>23}")
    lines.append(f"{'fault kind':28} {'count':>6} {'done':>6} {'median':>11} {'max':>12} {'median':>11} {'max':>11}")
    rec = report["audit"]["recovery"]
    for kind, n in sorted(report["faults_by_kind"].items()):
        r = rec.get(kind, {})
        lines.append(f"{kind:28} {n:6d} {report['faults_not_carried_out'].get(kind, 0):6d} "
                     f"{r.get('median_secs', '-'):>11} {r.get('max_secs', '-'):>12} "
                     f"{r.get('in_flight_median_secs', '-'):>11} {r.get('in_flight_max_secs', '-'):>11}")
    lines.append("")
    return "\n".join(lines + outcome_lines(report))


def outcome_lines(report: dict) -> list[str]:
    """What happened to the transactions, the downstream, the WAL; the violations."""
    lines = []
    s = report["audit"]["summary"]
    o = s["outcomes"]
    lines.append(f"transactions sent {s['transactions_sent']}, acknowledged {s['acknowledged']}: "
                 f"success {o.get('success', 0)}, dead_letter {o.get('dead_letter', 0)}, "
                 f"missing {o.get('missing', 0)}, not terminal "
                 f"{sum(v for k, v in o.items() if k not in ('success', 'dead_letter', 'missing'))}")
    if s["dead_letter_reasons"]:
        lines.append("dead-letter reasons: " + ", ".join(f"{k} {v}" for k, v in s["dead_letter_reasons"].items()))
    d = s["downstream"]
    lines.append(f"downstream: {d['total_calls']} calls for {d['keys']} keys, duplicate successes "
                 f"{d['duplicate_successes']}, overlapping calls {d['concurrent_overlaps']}, "
                 f"calls without key {d['calls_without_key']}")
    lines.append(f"WAL: {s['wal_records_checked']} acknowledged records read back byte-identical "
                 f"from {s['wal_segments_read']} segments; {s['journal_entries']} journal entries read")
    accepted = [f for f in report.get("faults", []) if (f.get("detail") or {}).get("accepted_unreadable_segments")]
    if accepted:
        lines.append(f"rebuilds that accepted unreadable segments (named twice by rtpd rebuild-ledger): {len(accepted)}: "
                     + ", ".join(k for f in accepted for k in f["detail"]["accepted_unreadable_segments"]))
    if s.get("journal_segments_unreadable"):
        lines.append("journal segments the store would not return (left out of the checks; "
                     "an Azurite restart has lost a blob this way): "
                     + ", ".join(sorted(s["journal_segments_unreadable"])))
    if s["notes"]:
        lines.append("notes: " + ", ".join(f"{k} {v}" for k, v in sorted(s["notes"].items())))
    v = report["audit"]["violations"]
    by = Counter(x["check"] for x in v)
    lines.append(f"violations: {len(v)}" + (" — " + ", ".join(f"{k} {n}" for k, n in by.items()) if v else ""))
    return lines


def build_stack(args, settings) -> Stack:
    work = Path(tempfile.mkdtemp(prefix="rtpd-chaos."))
    stack = Stack(work, Path(args.bin_dir), settings, faketime=not args.no_skew)
    log(f"work dir {work}; libfaketime: {stack.libfaketime or 'not installed (no clock skew)'}")
    try:
        stack.start(log=log)
    except BaseException:
        # what did start (Azurite, Redis, ...) is stopped; the logs are kept
        log(f"the stack did not start; logs in {stack.logs}")
        stack.stop()
        raise
    return stack


@contextmanager
def running_stack(args, settings):
    """The stack, started; stopped (and its work directory removed unless
    --keep) however the mode ends."""
    stack = build_stack(args, settings)
    try:
        yield stack
    finally:
        stack.stop()
        if not args.keep:
            shutil.rmtree(stack.work, ignore_errors=True)


def campaign(args) -> int:
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    quick = args.quick
    n_faults = args.faults or (100 if quick else 1000)
    # 10 % more are planned: a fault whose target is still busy (a Redis
    # rebuild takes minutes) when the phase ends is not started.
    n_plan = int(n_faults * 1.1) + 1
    # quick: 10 tx/s keeps the WAL a rebuild and the audit read small enough
    # for a CI step of a few minutes on 2 cores
    rate = args.rate or (10.0 if quick else 20.0)
    gap = args.gap or (1.2 if quick else 1.3)
    settings = Settings()
    out = Path(args.out or REPO / "target/chaos" / f"{datetime.now():%Y%m%d-%H%M%S}-seed{seed}")
    out.mkdir(parents=True, exist_ok=True)
    log(f"seed {seed}: {n_faults} faults, mean gap {gap}s, {rate} tx/s; replay with: "
        f"scripts/chaos.sh {'--quick ' if quick else ''}--seed {seed}")
    with running_stack(args, settings) as stack:
        faults = plan(seed, n_plan, gap, with_skew=stack.libfaketime is not None)
        phase = faults[-1].planned_at + 10
        warmup = 5.0
        rng = random.Random(f"workload-{seed}")
        txs = make_transactions(rng, f"c{seed}", int((phase + warmup + 30) * rate), rate, settings.max_retries)
        producer = Producer(stack.api_urls, stack.vendor_key, txs, rng)
        t_start = time.time()
        producer.start()
        time.sleep(warmup)
        inj = Injector(stack, faults, rebuild_from=t_start - 120, log=log)
        log(f"fault phase: {n_plan} faults planned over ~{phase:.0f}s (at least {n_faults} to inject)")
        runner = threading.Thread(target=inj.run, daemon=True)
        runner.start()
        t_faults = time.time()
        while runner.is_alive():
            runner.join(30)
            done = sum(1 for f in faults if f.ended)
            log(f"faults started {inj.started}/{n_plan}, healed {done}; sent {producer.sent}, "
                f"answered {len(producer.done)}")
        inj.wait_healed(timeout=60)
        inj.stop.set()  # faults still waiting for a busy target are not started
        inj.wait_healed(timeout=900)
        fault_secs = time.time() - t_faults
        log("faults done; the producer stops sending and finishes what is in flight")
        producer.finish(timeout=120)
        try:
            q = quiesce(stack, t_start, drain_secs=60 if quick else 300)
        except Exception:
            postmortem(out, producer, faults, stack)
            raise
        log("auditing")
        with producer.lock:
            txs_done = list(producer.done)
        try:
            result = audit(stack, txs_done, faults, t_start)
        except Exception as e:  # keep the history and the fault record for a post-mortem
            postmortem(out, producer, faults, stack)
            log(f"the audit could not run: {type(e).__name__}: {e}; history and logs in {out}")
            return 2
        by_kind = Counter(f.kind for f in faults if f.started)
        if sum(by_kind.values()) < n_faults:
            log(f"only {sum(by_kind.values())} faults were injected, fewer than {n_faults}")
        failed = Counter(f.kind for f in faults if f.started and not f.ok)
        report = {
            "seed": seed, "mode": "quick" if quick else "long", "rate": rate,
            "replay": f"scripts/chaos.sh {'--quick ' if quick else ''}--seed {seed}",
            "settings": vars(settings), "clock_skew_injected": stack.libfaketime is not None,
            "faults_injected": sum(by_kind.values()), "faults_planned": len(faults),
            "faults_by_kind": dict(by_kind),
            "faults_not_carried_out": dict(failed), "fault_phase_secs": fault_secs,
            "quiescence": q, "restarts": {n: s.starts for n, s in stack.services.items()},
            "respawns": {n: s.respawns for n, s in stack.services.items() if s.respawns},
            "log_errors": log_errors(stack), "audit": result,
            "faults": [f.record() for f in faults],
            "known_checks": args.known,
        }
        return finish(report, out, stack, [t.record() for t in txs_done])


def postmortem(out: Path, producer, faults, stack):
    """History, fault record and logs of a run that could not be audited."""
    with producer.lock:
        txs_done = list(producer.done)
    (out / "history.jsonl").write_text("".join(json.dumps(t.record()) + "\n" for t in txs_done))
    (out / "faults.json").write_text(json.dumps([f.record() for f in faults], default=str))
    shutil.copytree(stack.logs, out / "logs", dirs_exist_ok=True)


def finish(report: dict, out: Path, stack: Stack, history: list) -> int:
    with open(out / "history.jsonl", "w") as f:
        for h in history:
            f.write(json.dumps(h) + "\n")
    shutil.copytree(stack.logs, out / "logs", dirs_exist_ok=True)
    # A panic is a defect whatever the mode; ERROR lines are only counted
    # (a Redis fault makes ingest log "ledger unavailable" by design).
    for name, e in report.get("log_errors", {}).items():
        if e["panics"]:
            report["audit"]["violations"].append(
                {"check": "panic", "transaction_id": None, "process": name, "count": e["panics"]})
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    text = {"soak": soak_table, "recovery": recovery_table}.get(report["mode"], table)(report)
    (out / "report.txt").write_text(text + "\n")
    print()
    print(text)
    print(f"\nreport: {out}/report.json")
    v = report["audit"]["violations"]
    for x in v[:20]:
        print("VIOLATION", json.dumps(x, default=str)[:400])
    known = set(report.get("known_checks", []))
    code = verdict(v, known)
    if v and code == 0:
        print(f"only known violations ({', '.join(sorted(known))}): exit 0")
    return code


def max_rate(stack, count: int) -> dict:
    """Ack rate of `rtpd produce` against both APIs at once, then the drain rate."""
    t0 = time.time()
    procs = [subprocess.Popen([str(stack.bin / "rtpd"), "produce", "--url", url, "--count", str(count),
                               "--concurrency", "32", "--quiet", "--prefix", f"max{i}",
                               "--api-key", stack.vendor_key],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, url in enumerate(stack.api_urls)]
    outs = [p.communicate()[0] for p in procs]
    acked_secs = time.time() - t0
    drained, _ = wait_drained(stack, 600)
    drain_secs = time.time() - t0
    total = 2 * count
    return {"ack_per_sec": round(total / acked_secs, 1), "drain_per_sec": round(total / drain_secs, 1),
            "drained": drained, "produce_output": [o.strip().splitlines()[:3] for o in outs]}


def soak_table(r: dict) -> str:
    lines = [f"rtpd soak — {r['minutes']} min at {r['rate']} tx/s (half of the measured maximum "
             f"{r['max']['sustained_per_sec']} tx/s), no faults", "",
             f"{'process':14} {'RSS first MiB':>14} {'RSS last MiB':>13} {'max MiB':>8} {'growth':>8}"]
    for name, g in r["rss"].items():
        lines.append(f"{name:14} {g['first_kib'] / 1024:14.1f} {g['last_kib'] / 1024:13.1f} "
                     f"{g['max_kib'] / 1024:8.1f} {g['growth_pct']:7.1f}%")
    s = r["audit"]["summary"]
    lines.append("")
    lines.append(f"transactions sent {s['transactions_sent']}, acknowledged {s['acknowledged']}, "
                 f"outcomes {s['outcomes']}; non-2xx answers {r['non_2xx']}; "
                 f"log errors {sum(v['error_lines'] for v in r['log_errors'].values())}")
    lines.append(f"violations: {len(r['audit']['violations'])}")
    return "\n".join(lines)


def soak(args) -> int:
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    settings = Settings()
    out = Path(args.out or REPO / "target/chaos" / f"{datetime.now():%Y%m%d-%H%M%S}-soak")
    out.mkdir(parents=True, exist_ok=True)
    args.no_skew = True
    with running_stack(args, settings) as stack:
        log("measuring the maximum rate (rtpd produce against both APIs, mock at 100% success)")
        m = max_rate(stack, args.max_count)
        m["sustained_per_sec"] = min(m["ack_per_sec"], m["drain_per_sec"])
        rate = args.rate or round(m["sustained_per_sec"] / 2, 1)
        log(f"max: {m}; soak at {rate} tx/s for {args.soak_minutes} min")
        rng = random.Random(f"soak-{seed}")
        secs = args.soak_minutes * 60
        txs = make_transactions(rng, f"s{seed}", int(secs * rate), rate, settings.max_retries, plain_only=True)
        producer = Producer(stack.api_urls, stack.vendor_key, txs, rng, workers=128, probe_rate=0.0)
        t_start = time.time()
        producer.start()
        samples = []
        with open(out / "rss.jsonl", "w") as rss_log:  # written as it goes: kept if the run is cut short
            while True:
                samples.append({"t": round(time.time() - t_start, 1), "rss_kib": stack.rss_kib(),
                                "sent": producer.sent, "answered": len(producer.done),
                                "ledger": counts(stack)})
                rss_log.write(json.dumps(samples[-1]) + "\n")
                rss_log.flush()
                if time.time() >= t_start + secs:
                    break
                time.sleep(10)
        producer.finish(timeout=120)
        achieved = producer.sent / secs
        q = quiesce(stack, t_start, drain_secs=300)
        with producer.lock:
            txs_done = list(producer.done)
        result = audit(stack, txs_done, [], t_start)
        rss = {}
        for name in samples[0]["rss_kib"]:
            series = [s["rss_kib"].get(name) for s in samples if s["rss_kib"].get(name)]
            # growth after warm-up: the second minute's mean against the last minute's
            early = series[6:12] or series[:6]
            late = series[-6:]
            e, l_ = sum(early) / len(early), sum(late) / len(late)
            rss[name] = {"first_kib": series[0], "last_kib": series[-1], "max_kib": max(series),
                         "growth_pct": round(100 * (l_ - e) / e, 1)}
        non2xx = sum(1 for t in txs_done for a in t.attempts if a["status"] is None or a["status"] >= 300)
        report = {"seed": seed, "mode": "soak", "minutes": args.soak_minutes, "rate": rate,
                  "achieved_rate": round(achieved, 1), "max": m, "rss": rss, "samples": samples,
                  "non_2xx": non2xx, "quiescence": q, "log_errors": log_errors(stack), "audit": result}
        return finish(report, out, stack, [t.record() for t in txs_done])


# Recovery mode: one outage at a time, each followed by a calm; the issue's
# target is that every acknowledged transaction is final within 30 s of the
# dependency's return.
RECOVERY_KINDS = ["redis_restart", "redis_pause", "servicebus_pause", "servicebus_restart_purge",
                  "azurite_restart", "azurite_pause", "kill_processor", "kill_api"]
RECOVERY_TARGET_SECS = 30.0


def production_settings() -> Settings:
    """The defaults a deployment runs with (docs/operations.md) for everything
    that sets how long a straggler can wait: the lease (lock + downstream
    timeout, 70 s), the reconciler's interval (60 s) and pending threshold
    (300 s), the retry back-off (60 s base)."""
    return Settings(lock_secs=60, downstream_timeout_secs=10.0, backoff_base_secs=60.0,
                    backoff_max_secs=3600.0, reconcile_interval_secs=60.0, pending_after_secs=300.0)


def recovery_plan(seed: int, reps: int) -> list[Fault]:
    rng = random.Random(f"recovery-{seed}")
    out = []
    for _ in range(reps):
        for kind in RECOVERY_KINDS:
            res = KINDS[kind][0]
            if res in ("api", "processor"):
                target, hold = f"{res}-{rng.randint(1, 2)}", rng.uniform(0.5, 3.0)
            else:
                target, hold = res, rng.uniform(5.0, 10.0)  # outages of up to 10 s
            out.append(Fault(seq=len(out), kind=kind, target=target, planned_at=0.0, hold=round(hold, 3)))
    return out


def recovery_table(report: dict) -> str:
    st = report["settings"]
    lines = [f"rtpd recovery campaign — seed {report['seed']}, {report['faults_injected']} isolated faults, "
             f"{report['rate']} tx/s offered, {report['settle_secs']:.0f} s calm after each; lock "
             f"{st['lock_secs']} s, downstream timeout {st['downstream_timeout_secs']} s, reconcile every "
             f"{st['reconcile_interval_secs']} s, pending after {st['pending_after_secs']} s", "",
             f"{'':28} {'':>6} {'':>9} {'recovery s (sent before the return)':>44}",
             f"{'fault kind':28} {'count':>6} {'max hold':>9} {'median':>11} {'max':>11} "
             f"{'target ' + str(int(RECOVERY_TARGET_SECS)) + ' s':>20}"]
    rec = report["audit"]["recovery"]
    for kind in RECOVERY_KINDS:
        fs = [f for f in report["faults"] if f["kind"] == kind]
        if not fs:
            continue
        r = rec.get(kind, {})
        met = "met" if r and r["max_secs"] <= RECOVERY_TARGET_SECS else "NOT MET"
        lines.append(f"{kind:28} {len(fs):6d} {max(f['hold'] for f in fs):9.1f} "
                     f"{r.get('median_secs', '-'):>11} {r.get('max_secs', '-'):>11} {met:>20}")
    lines.append("")
    return "\n".join(lines + outcome_lines(report))


def recovery(args) -> int:
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    rate = args.rate or 10.0
    faults = recovery_plan(seed, args.reps)
    settings = production_settings()
    out = Path(args.out or REPO / "target/chaos" / f"{datetime.now():%Y%m%d-%H%M%S}-recovery{seed}")
    out.mkdir(parents=True, exist_ok=True)
    log(f"recovery seed {seed}: {len(faults)} isolated faults, {args.settle} s calm after each, {rate} tx/s; "
        f"replay with: scripts/chaos.sh --recovery --reps {args.reps} --seed {seed}")
    args.no_skew = True
    with running_stack(args, settings) as stack:
        warmup = 10.0
        secs = warmup + sum(f.hold + args.settle + 15 for f in faults)
        rng = random.Random(f"workload-recovery-{seed}")
        txs = make_transactions(rng, f"r{seed}", int(secs * rate), rate, settings.max_retries, plain_only=True)
        producer = Producer(stack.api_urls, stack.vendor_key, txs, rng, probe_rate=0.0)
        t_start = time.time()
        producer.start()
        time.sleep(warmup)
        inj = Injector(stack, faults, rebuild_from=t_start - 120, log=log)
        t_faults = time.time()
        for f in faults:
            inj.inject(f)
            log(f"fault {f.seq} {f.kind} {f.target} held {f.hold} s"
                + ("" if f.ok else f", not carried out: {f.note}")
                + f"; sent {producer.sent}, answered {len(producer.done)}")
            time.sleep(args.settle)
        fault_secs = time.time() - t_faults
        producer.finish(timeout=120)
        q = quiesce(stack, t_start, drain_secs=300)
        log("auditing")
        with producer.lock:
            txs_done = list(producer.done)
        result = audit(stack, txs_done, faults, t_start, acked_before="end")
        slow = {f.seq: f.detail["recovery_secs"] for f in faults
                if f.detail.get("recovery_secs", 0.0) > RECOVERY_TARGET_SECS}
        report = {
            "seed": seed, "mode": "recovery", "rate": rate, "settle_secs": args.settle,
            "replay": f"scripts/chaos.sh --recovery --reps {args.reps} --seed {seed}",
            "settings": vars(settings), "target_secs": RECOVERY_TARGET_SECS,
            "faults_injected": sum(1 for f in faults if f.ok), "fault_phase_secs": fault_secs,
            "faults_not_carried_out": dict(Counter(f.kind for f in faults if not f.ok)),
            "over_target": slow, "quiescence": q,
            "restarts": {n: s.starts for n, s in stack.services.items()},
            "log_errors": log_errors(stack), "audit": result,
            "faults": [f.record() for f in faults], "known_checks": args.known,
        }
        code = finish(report, out, stack, [t.record() for t in txs_done])
        if slow:
            print(f"recovery over {RECOVERY_TARGET_SECS:.0f} s after faults {slow}: exit 1")
            code = max(code, 1)
        if any(not f.ok for f in faults):
            print("a fault could not be carried out: exit 2")
            code = 2
        return code


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI mode: 100 faults, a few minutes")
    p.add_argument("--soak", action="store_true", help="soak mode: no faults, RSS sampled")
    p.add_argument("--recovery", action="store_true",
                   help="recovery mode: one outage of up to 10 s at a time under load, production timeouts; "
                        "exit 1 if anything acknowledged is not final within 30 s of the return")
    p.add_argument("--reps", type=int, default=2, help="recovery: outages of each kind")
    p.add_argument("--settle", type=float, default=45.0, help="recovery: seconds of calm after each outage")
    p.add_argument("--seed", type=int)
    p.add_argument("--faults", type=int, help="faults to inject (default 100 quick, 1000 long)")
    p.add_argument("--rate", type=float, help="transactions per second offered (default 10 quick, 20 long)")
    p.add_argument("--gap", type=float, help="mean seconds between fault starts")
    p.add_argument("--soak-minutes", type=float, default=10)
    p.add_argument("--max-count", type=int, default=3000, help="soak: transactions per API to measure the maximum rate")
    p.add_argument("--bin-dir", default=os.environ.get("CHAOS_BIN_DIR", str(REPO / "target/release")))
    p.add_argument("--out", help="report directory (default target/chaos/<time>-seed<seed>)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (Redis AOF, logs)")
    p.add_argument("--no-skew", action="store_true", help="do not run rtpd under libfaketime")
    p.add_argument("--known", action="append", default=[], metavar="CHECK",
                   help="a check whose violations are reported but do not fail the run (repeatable; "
                        "for defects tracked in an open issue)")
    args = p.parse_args()
    for exe in ("rtpd", "sb-test-broker"):
        if not (Path(args.bin_dir) / exe).exists():
            print(f"campaign: {args.bin_dir}/{exe} is missing (cargo build --workspace --bins)", file=sys.stderr)
            return 2
    try:
        if args.soak:
            return soak(args)
        return recovery(args) if args.recovery else campaign(args)
    except Exception as e:
        import traceback

        traceback.print_exc()
        log(f"the campaign could not run: {type(e).__name__}: {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
