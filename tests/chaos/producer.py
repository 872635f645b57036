"""The vendor of the fault campaign: posts transactions at a steady rate to
both API processes (as a load balancer would), re-POSTs the same bytes after
a 5xx, 429 or a broken connection (what a 5xx means here: "maybe accepted"),
and records every answer with the sha256 of the bytes it sent.

Each transaction gets a fate from the seed: most are plain; some carry a mock
script (`"_mock": {"script": [...]}`) so that retries, permanent refusals and
exhausted retries happen without any fault. After an acknowledgement some are
posted again with the same bytes (must be 200/202, never 409) or with other
bytes under the same id (must be 409, never 2xx).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import queue
import random
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Tx:
    n: int
    id: str
    body: bytes
    fate: str
    due: float = 0.0  # seconds after the producer's start
    attempts: list = field(default_factory=list)
    ack: dict | None = None
    final: str = ""  # acked | refused | gave_up
    dup: list = field(default_factory=list)
    conflict: list = field(default_factory=list)
    conflict_sha256: str | None = None  # sha256 of the other bytes posted under this id

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()

    def record(self) -> dict:
        return {
            "n": self.n, "id": self.id, "fate": self.fate, "sha256": self.sha256,
            "body": self.body.decode(), "attempts": self.attempts, "ack": self.ack,
            "final": self.final, "dup": self.dup, "conflict": self.conflict,
            "conflict_sha256": self.conflict_sha256,
        }


# fate -> (weight, mock script or None)
FATES = {
    "plain": (88, None),
    "retry_503": (3, ["503", "ok"]),
    "retry_429": (2, ["429", "ok"]),
    "retry_hang": (1, ["hang", "ok"]),
    "permanent_400": (3, ["400"]),
    "exhausted_503": (3, None),  # script set from max_retries
}

_TEXT = "abcdefghijklmnopqrstuvwxyzäöüé€ "


def make_transactions(rng: random.Random, prefix: str, count: int, rate: float,
                      max_retries: int, plain_only: bool = False) -> list[Tx]:
    names = list(FATES)
    weights = [FATES[f][0] for f in names]
    out = []
    for n in range(count):
        fate = "plain" if plain_only else rng.choices(names, weights)[0]
        tid = f"{prefix}-{n:07d}"
        script = FATES[fate][1]
        if fate == "exhausted_503":
            script = ["503"] * (max_retries + 2)
        pad = "".join(rng.choice(_TEXT) for _ in range(rng.randint(16, 300)))
        fields = [
            f'"transaction_id":"{tid}"',
            f'"amount":"{rng.randint(1, 10**6) / 100:.2f}"',
            f'"currency":"{rng.choice(["EUR", "USD", "GBP"])}"',
            f'"memo":{json.dumps(pad, ensure_ascii=rng.random() < 0.5)}',
        ]
        if script:
            fields.append(f'"_mock":{{"script":{json.dumps(script)}}}')
        rng.shuffle(fields)
        # Irregular spacing: the WAL must keep the bytes, not a re-serialisation.
        sep = rng.choice([",", ", ", " ,\n  "])
        body = ("{" + rng.choice(["", " ", "\n"]) + sep.join(fields) + rng.choice(["", "\n"]) + "}").encode()
        out.append(Tx(n=n, id=tid, body=body, fate=fate, due=n / rate))
    return out


def _post(base: str, body: bytes, key: str, timeout: float) -> tuple[int | None, dict | str, dict]:
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", "/v1/transactions", body=body,
                     headers={"Content-Type": "application/json", "X-Api-Key": key})
        r = conn.getresponse()
        raw = r.read()
        headers = {k.lower(): v for k, v in r.getheaders()}
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = raw.decode(errors="replace")[:200]
        return r.status, parsed, headers
    finally:
        conn.close()


TRANSIENT = {408, 429, 500, 502, 503, 504}


class Producer:
    def __init__(self, apis: list[str], key: str, txs: list[Tx], rng: random.Random,
                 workers: int = 64, retry_budget_secs: float = 90.0, probe_rate: float = 0.05,
                 timeout: float = 10.0):
        self.apis = apis
        self.key = key
        self.txs = txs
        self.rng_seed = rng.random()
        self.workers = workers
        self.budget = retry_budget_secs
        self.probe_rate = probe_rate
        self.timeout = timeout
        self.q: queue.Queue = queue.Queue()
        self.stop_sending = threading.Event()
        self.t0 = 0.0  # time.time() at start
        self.sent = 0
        self.done: list[Tx] = []
        self.lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self):
        self.t0 = time.time()
        for i in range(self.workers):
            t = threading.Thread(target=self._worker, args=(i,), daemon=True)
            t.start()
            self._threads.append(t)
        s = threading.Thread(target=self._schedule, daemon=True)
        s.start()
        self._threads.append(s)

    def _schedule(self):
        for tx in self.txs:
            if self.stop_sending.is_set():
                break
            delay = self.t0 + tx.due - time.time()
            if delay > 0 and self.stop_sending.wait(delay):
                break
            self.q.put(tx)
            self.sent += 1
        for _ in range(self.workers):
            self.q.put(None)

    def finish(self, timeout: float):
        """Stops scheduling new transactions and waits for those in flight."""
        self.stop_sending.set()
        deadline = time.time() + timeout
        for t in self._threads:
            t.join(max(0.1, deadline - time.time()))

    def _attempt(self, rng: random.Random, body: bytes, api: int) -> dict:
        base = self.apis[api % len(self.apis)]
        t0 = time.time()
        try:
            status, parsed, headers = _post(base, body, self.key, self.timeout)
            return {"t0": t0, "t1": time.time(), "api": api % len(self.apis), "status": status,
                    "body": parsed, "retry_after": headers.get("retry-after")}
        except (OSError, http.client.HTTPException) as e:
            return {"t0": t0, "t1": time.time(), "api": api % len(self.apis), "status": None,
                    "error": f"{type(e).__name__}: {e}"}

    def _send_until_answered(self, rng: random.Random, body: bytes, api: int, budget: float) -> list[dict]:
        """POSTs `body` until a 2xx or a definitive 4xx, re-POSTing the same
        bytes after anything transient, for `budget` seconds at most."""
        out = []
        deadline = time.time() + budget
        backoff = 0.2
        while True:
            a = self._attempt(rng, body, api)
            out.append(a)
            st = a["status"]
            if st is not None and st < 300:
                return out
            if st is not None and st not in TRANSIENT:
                return out
            if time.time() >= deadline:
                return out
            if st is None:
                api += 1  # the load balancer tries the other instance
            wait = backoff * rng.uniform(0.8, 1.2)
            try:
                if a.get("retry_after"):
                    wait = max(wait, min(float(a["retry_after"]), 3.0))
            except ValueError:
                pass
            time.sleep(wait)
            backoff = min(backoff * 2, 2.0)

    def _worker(self, i: int):
        rng = random.Random(f"{self.rng_seed}-{i}")
        while True:
            tx = self.q.get()
            if tx is None:
                return
            tx.attempts = self._send_until_answered(rng, tx.body, tx.n, self.budget)
            last = tx.attempts[-1]
            st = last["status"]
            if st is not None and st < 300:
                tx.final = "acked"
                body = last["body"] if isinstance(last["body"], dict) else {}
                wal = body.get("wal") or {}
                tx.ack = {"t": last["t1"], "status": st, "wal_ref": wal.get("ref"),
                          "sha256": wal.get("sha256")}
                if rng.random() < self.probe_rate:
                    time.sleep(rng.uniform(0, 2))
                    tx.dup = self._send_until_answered(rng, tx.body, tx.n + 1, 20)
                if rng.random() < self.probe_rate:
                    time.sleep(rng.uniform(0, 2))
                    other = tx.body.replace(b'"amount":"', b'"amount":"9', 1)
                    tx.conflict_sha256 = hashlib.sha256(other).hexdigest()
                    tx.conflict = self._send_until_answered(rng, other, tx.n, 20)
            elif st is not None:
                tx.final = "refused"
            else:
                tx.final = "gave_up"
            with self.lock:
                self.done.append(tx)
