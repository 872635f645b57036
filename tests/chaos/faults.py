"""Fault plans drawn from a seed, and the injector that carries them out.

A plan is fixed before the run starts: the n-th fault's kind, target, planned
start and durations come from the seed alone, so `--seed S` replays the same
schedule against the same workload. What the real processes do in between
(thread timing, restart times) is not deterministic; a fault whose target is
still busy with an earlier fault starts when the target is free, in plan order.
"""

from __future__ import annotations

import random
import re
import signal
import threading
import time
from dataclasses import dataclass, field

# kind -> (resource it holds, weight)
KINDS: dict[str, tuple[str, int]] = {
    "kill_api": ("api", 12),
    "kill_processor": ("processor", 14),
    "redis_restart": ("redis", 6),
    "redis_pause": ("redis", 5),
    "redis_loss": ("redis", 2),
    "servicebus_restart_purge": ("broker", 5),
    "servicebus_pause": ("broker", 5),
    "azurite_restart": ("azurite", 5),
    "azurite_pause": ("azurite", 5),
    "downstream_5xx_storm": ("downstream", 7),
    "downstream_429_storm": ("downstream", 6),
    "downstream_hang_storm": ("downstream", 5),
    "clock_skew": ("clock", 8),
}

INFRA = {"redis", "broker", "azurite"}

# A WAL or journal segment's key, as rtpd names it in its errors and logs.
SEGMENT_KEY = re.compile(r"(?:wal|outcomes)/v1/[0-9/]+/[^\s\"',;)]+\.ndjson")


@dataclass
class Fault:
    seq: int
    kind: str
    target: str
    planned_at: float  # seconds after the fault phase starts
    hold: float  # how long the fault lasts (down time, pause, storm, skew)
    skew: int = 0
    started: float | None = None  # time.time()
    ended: float | None = None  # healed and answering again
    ok: bool = True
    note: str = ""
    detail: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {k: getattr(self, k) for k in (
            "seq", "kind", "target", "planned_at", "hold", "skew", "started", "ended", "ok", "note",
            "detail")}


def plan(seed: int, count: int, mean_gap: float, with_skew: bool) -> list[Fault]:
    rng = random.Random(f"faults-{seed}")
    kinds = [k for k in KINDS if with_skew or k != "clock_skew"]
    weights = [KINDS[k][1] for k in kinds]
    out, t = [], 0.0
    for seq in range(count):
        t += rng.expovariate(1 / mean_gap)
        kind = rng.choices(kinds, weights)[0]
        res = KINDS[kind][0]
        skew = 0
        if res == "api":
            target, hold = f"api-{rng.randint(1, 2)}", rng.uniform(0.2, 3.0)
        elif res == "processor":
            target, hold = f"processor-{rng.randint(1, 2)}", rng.uniform(0.2, 3.0)
        elif res == "clock":
            target = rng.choice(["api-1", "api-2", "processor-1", "processor-2"])
            hold = rng.uniform(3.0, 10.0)
            skew = rng.choice([-1, 1]) * rng.randint(1, 3)
        elif kind == "redis_loss":
            target, hold = res, 0.0
        elif kind.startswith("downstream"):
            target, hold = res, rng.uniform(1.0, 5.0)
        else:
            target, hold = res, rng.uniform(0.5, 4.0)
        out.append(Fault(seq=seq, kind=kind, target=target, planned_at=round(t, 3),
                         hold=round(hold, 3), skew=skew))
    return out


class Injector:
    """Runs a plan against a Stack; each fault in its own thread, one fault
    per target at a time, at most `max_infra` of Redis / broker / Azurite
    down at once."""

    def __init__(self, stack, faults: list[Fault], rebuild_from: float, log, max_infra: int = 2,
                 rebuild_window_secs: float = 600):
        self.stack = stack
        self.faults = faults
        self.rebuild_from = rebuild_from
        self.rebuild_window = rebuild_window_secs
        self.log = log
        self.max_infra = max_infra
        self.busy: set[str] = set()
        self.cv = threading.Condition()
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.started = 0
        # (time.time() a rebuild started, its fault's seq): a rebuild that
        # started after a flush covers it
        self.rebuilds: list[tuple[float, int]] = []

    def _resource(self, f: Fault) -> str:
        return f"clock-{f.target}" if f.kind == "clock_skew" else f.target

    def _free(self, f: Fault) -> bool:
        r = self._resource(f)
        if r in self.busy:
            return False
        if f.target in INFRA and len(self.busy & INFRA) >= self.max_infra:
            return False
        return True

    def run(self):
        """Starts each fault at its planned time; a fault whose target is
        still busy waits for it without holding back faults on other targets."""
        t0 = time.time()
        for f in self.faults:
            delay = t0 + f.planned_at - time.time()
            if delay > 0 and self.stop.wait(delay):
                break
            th = threading.Thread(target=self._when_free, args=(f,), daemon=True)
            th.start()
            self.threads.append(th)

    def _when_free(self, f: Fault):
        with self.cv:
            while not self._free(f):
                if self.stop.is_set():
                    f.note = "not started: its target was still busy when the fault phase ended"
                    return
                self.cv.wait(0.2)
            self.busy.add(self._resource(f))
            self.started += 1
        self._one(f)

    def _hold(self, resource: str):
        with self.cv:
            while resource in self.busy:
                self.cv.wait(0.2)
            self.busy.add(resource)

    def _release(self, resource: str):
        with self.cv:
            self.busy.discard(resource)
            self.cv.notify_all()

    def wait_healed(self, timeout: float = 600):
        deadline = time.time() + timeout
        for th in self.threads:
            th.join(max(0.1, deadline - time.time()))

    def inject(self, f: Fault):
        """One fault now, in the caller's thread (the recovery mode's one at a time)."""
        with self.cv:
            self.busy.add(self._resource(f))
            self.started += 1
        self._one(f)

    def _one(self, f: Fault):
        f.started = time.time()
        try:
            getattr(self, "_" + f.kind.split("_")[0])(f)
        except Exception as e:  # a fault that could not be carried out is reported, not hidden
            f.ok = False
            f.note = f"{type(e).__name__}: {e}"
            self.log(f"fault {f.seq} {f.kind} {f.target}: {f.note}")
        finally:
            f.ended = time.time()
            with self.cv:
                self.busy.discard(self._resource(f))
                self.cv.notify_all()

    # ---- kinds ----------------------------------------------------------
    def _kill(self, f: Fault):
        svc = self.stack.services[f.target]
        svc.kill9()
        time.sleep(f.hold)
        svc.start(wait=120)

    def _pause(self, svc, hold: float):
        svc.signal(signal.SIGSTOP)
        time.sleep(hold)
        svc.signal(signal.SIGCONT)

    def _redis(self, f: Fault):
        svc = self.stack.services["redis"]
        if f.kind == "redis_restart":
            svc.term(timeout=30)
            time.sleep(f.hold)
            svc.start(wait=60)
        elif f.kind == "redis_pause":
            self._pause(svc, f.hold)
        else:  # redis_loss: everything in the ledger is gone; an operator rebuilds it
            self.stack.redis_cli("FLUSHALL")
            f.detail["flushed_at"] = time.time()
            # Redis itself may fail again during the rebuild; one rebuild at a time.
            self._release("redis")
            self._hold("rebuild")
            try:
                # Losses close together need one rebuild, as an operator
                # would run it: a rebuild that started after this flush
                # restores what it lost (and the final reconcile checks).
                later = [seq for at, seq in self.rebuilds if at > f.detail["flushed_at"]]
                if later:
                    f.detail["rebuilt_by_fault"] = later[0]
                else:
                    self.rebuilds.append((time.time(), f.seq))
                    self._rebuild(f)
            finally:
                self._release("rebuild")

    def _rebuild(self, f: Fault):
        # The window an operator would pick: the run so far, at most the
        # last 10 minutes (older records come back with the final reconcile).
        since = max(self.rebuild_from, time.time() - self.rebuild_window)
        start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
        # The CLI exits on the first dependency error (another fault may be
        # under way); the operator runs it again, for up to 10 tries.
        # A segment the store will not return (Azurite after a restart has
        # lost a blob this way) keeps the mark off and the CLI names it. An
        # operator accepts the loss only for a segment that failed the same
        # way twice (one that failed during a pause would read next time);
        # the campaign's report counts such rebuilds.
        accept: list[str] = []
        named_before: set[str] = set()
        for attempt in range(1, 11):
            r = self.stack.cli("rebuild-ledger", "--from", start, "--quiet", *accept, timeout=120)
            text = re.sub(r"\x1b\[[0-9;]*m", "", r.stdout + r.stderr)
            tail = [line for line in text.strip().splitlines() if line.strip()][-3:]
            f.detail[f"rebuild_{attempt}"] = {"exit": r.returncode, "output": tail}
            if r.returncode == 0:
                break
            if "--accept-unreadable-segments" in text and not accept:
                named = set(SEGMENT_KEY.findall(text))
                if named & named_before:
                    accept = ["--accept-unreadable-segments"]
                    f.detail["accepted_unreadable_segments"] = sorted(named & named_before)
                named_before = named
            time.sleep(5)
        else:
            raise RuntimeError(f"rtpd rebuild-ledger failed 10 times: {tail[-1] if tail else ''}")

    def _servicebus(self, f: Fault):
        svc = self.stack.services["broker"]
        if f.kind == "servicebus_restart_purge":
            # The test broker keeps its queues in memory: a restart is a purge
            # of the queue, its scheduled messages and its dead-letter queue.
            svc.kill9()
            time.sleep(f.hold)
            svc.start(wait=60)
        else:
            self._pause(svc, f.hold)

    def _azurite(self, f: Fault):
        svc = self.stack.services["azurite"]
        if f.kind == "azurite_restart":
            # SIGTERM, not kill -9: Azurite itself loses acknowledged blobs on kill -9.
            svc.term(timeout=30)
            time.sleep(f.hold)
            self.stack.restart_azurite()
        else:
            self._pause(svc, f.hold)

    def _downstream(self, f: Fault):
        mix = {
            "downstream_5xx_storm": "500=1,502=1,503=2",
            "downstream_429_storm": "429=1",
            "downstream_hang_storm": "hang=1",
        }[f.kind]
        self.stack.mock_control(success_rate=0.0, failure_mix=mix)
        try:
            time.sleep(f.hold)
        finally:
            self.stack.mock_base()

    def _clock(self, f: Fault):
        self.stack.set_skew(f.target, f.skew)
        try:
            time.sleep(f.hold)
        finally:
            self.stack.set_skew(f.target, 0)
