"""The production-shaped stack of the fault campaign, on this machine.

Every part is a real process on a free port with its data in one temporary
directory: Azurite (the WAL, started by scripts/azurite.sh), a redis-server
with AOF (the ledger), the in-repo Service Bus test broker (the queue), two
`rtpd api`, two `rtpd processor` and one `rtpd mock-downstream`.

Each rtpd api/processor runs under libfaketime when it is installed, with its
own offset file, so a fault can skew one process's wall clock at run time
(FAKETIME_TIMESTAMP_FILE, re-read every second; the monotonic clock is left
alone, so timers and timeouts are unaffected).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
QUEUE = "rtp-transactions"
CONTAINER = "rtp-wal"
SAS_KEY = "chaos-sas-key"
LIBFAKETIME = [
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_json(method: str, url: str, body: dict | None = None, headers: dict | None = None,
              timeout: float = 10.0):
    """(status, parsed JSON or text) of one request; raises OSError when nothing answers."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        raw = e.read()
        status = e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def wait_until(check, timeout: float, what: str, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(every)
    raise RuntimeError(f"{what} not ready within {timeout:.0f}s")


@dataclass
class Service:
    """One process of the stack, restartable with the same command line."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    ready: object = None  # callable -> bool
    proc: subprocess.Popen | None = None
    pid: int | None = None  # set for a process this runner did not spawn
    starts: int = 0
    respawns: int = 0  # starts that exited before answering

    def start(self, wait: float = 60.0):
        """Spawns the process and waits until it answers; a process that exits
        before it answers (a dependency still down at start-up) is spawned
        again, until `wait` seconds have passed."""
        deadline = time.monotonic() + wait
        while True:
            self._spawn()
            if self.ready is None:
                return
            while time.monotonic() < deadline:
                try:
                    if self.ready():
                        return
                except OSError:
                    pass
                if not self.alive():
                    break
                time.sleep(0.1)
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{self.name} not ready within {wait:.0f}s")
            self.respawns += 1
            time.sleep(1)

    def _spawn(self):
        env = dict(os.environ)
        env.update(self.env)
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(self.argv, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid
        self.starts += 1

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        if self.pid is None:
            return False
        try:
            os.kill(self.pid, 0)
            return True
        except OSError:
            return False

    def signal(self, sig: int):
        if self.pid is not None and self.alive():
            os.kill(self.pid, sig)

    def kill9(self):
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        self._reap(10)

    def term(self, timeout: float = 30.0):
        """SIGTERM and wait; SIGKILL if it does not exit in time."""
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        if not self._reap(timeout):
            self.kill9()

    def _reap(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None:
                try:
                    self.proc.wait(timeout=0.1)
                    return True
                except subprocess.TimeoutExpired:
                    continue
            if not self.alive():
                return True
            time.sleep(0.1)
        return not self.alive()


@dataclass
class Settings:
    """Timeouts of the campaign's rtpd processes (short, so a run fits CI)."""

    lock_secs: int = 5
    downstream_timeout_secs: float = 2.0
    max_retries: int = 5
    backoff_base_secs: float = 1.5
    backoff_max_secs: float = 3.0
    reconcile_interval_secs: float = 2.0
    pending_after_secs: float = 10.0
    processor_concurrency: int = 32
    base_mix: str = "503=1"  # only used when success_rate < 1
    base_success_rate: float = 1.0

    @property
    def hang_secs(self) -> int:
        # A hang lasts past the processor's timeout (the call is abandoned
        # while the downstream still works on it) and ends before the
        # earliest retry (timeout + back-off base - 20% jitter) can arrive.
        # A back-off shorter than that would make the retry overlap the
        # abandoned call: nothing in the pipeline waits for a downstream
        # that is still busy after a timeout (seen with a 0.5 s base).
        hang = int(self.downstream_timeout_secs) + 1
        assert hang < self.downstream_timeout_secs + 0.8 * self.backoff_base_secs
        return hang


class Stack:
    def __init__(self, work: Path, bin_dir: Path, settings: Settings, faketime: bool = True):
        self.work = work
        self.bin = bin_dir
        self.s = settings
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.clock_dir = work / "clock"
        self.clock_dir.mkdir(exist_ok=True)
        self.vendor_key = "ck_" + secrets.token_hex(16)
        self.admin_token = "ca_" + secrets.token_hex(16)
        lib = next((p for p in LIBFAKETIME if Path(p).exists()), None)
        self.libfaketime = lib if faketime else None
        self.services: dict[str, Service] = {}
        self.azurite_env = work / "azurite.env"
        self.conn: dict[str, str] = {}

    # ---- infrastructure -------------------------------------------------
    def start_azurite(self):
        out = subprocess.run([str(REPO / "scripts/azurite.sh"), "start", str(self.azurite_env)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"azurite.sh start failed: {out.stderr.strip()}")
        env = {}
        for line in self.azurite_env.read_text().splitlines():
            k, _, v = line.partition("=")
            env[k] = v.strip("'")
        port = int(env["AZURITE_BLOB_PORT"])
        main = REPO / "azurite/node_modules/azurite/dist/src/blob/main.js"
        svc = Service(
            name="azurite",
            argv=["node", str(main), "--blobHost", "127.0.0.1", "--blobPort", str(port),
                  "--location", env["AZURITE_DATA_DIR"], "--skipApiVersionCheck",
                  "--disableTelemetry", "--silent"],
            log=self.logs / "azurite.log",
            ready=lambda: port_open(port),
            pid=int(env["AZURITE_PID"]),
            starts=1,
        )
        self.services["azurite"] = svc
        self.conn["storage"] = env["RTPD_TEST_AZURITE_CONNECTION_STRING"]
        self.azurite_port = port

    def restart_azurite(self):
        """Starts Azurite again on its port and data (after a stop), and tells azurite.sh its pid."""
        svc = self.services["azurite"]
        svc.start()
        Path(str(self.azurite_env) + ".pid").write_text(f"{svc.pid}\n")

    def start_redis(self):
        port = free_port()
        d = self.work / "redis"
        d.mkdir(exist_ok=True)
        svc = Service(
            name="redis",
            argv=["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(d),
                  "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                  "--daemonize", "no", "--protected-mode", "yes"],
            log=self.logs / "redis.log",
            ready=lambda: self.redis_cli("PING") == "PONG",
        )
        self.redis_port = port
        self.services["redis"] = svc
        svc.start()
        self.conn["redis"] = f"redis://127.0.0.1:{port}"

    def redis_cli(self, *args: str) -> str:
        out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(self.redis_port), *args],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip()

    def start_broker(self):
        port = free_port()
        exe = self.bin / "sb-test-broker"
        svc = Service(
            name="broker",
            argv=[str(exe), "--port", str(port), "--queue", QUEUE,
                  "--lock-duration-secs", str(self.s.lock_secs), "--max-delivery-count", "10",
                  "--duplicate-window-secs", "600", "--sas-key", SAS_KEY],
            log=self.logs / "broker.log",
            ready=lambda: port_open(port),
        )
        self.services["broker"] = svc
        svc.start()
        self.conn["servicebus"] = (f"Endpoint=sb://127.0.0.1:{port};SharedAccessKeyName=RootManageSharedAccessKey;"
                                   f"SharedAccessKey={SAS_KEY};UseDevelopmentEmulator=true;")

    def start_mock(self):
        port = free_port()
        s = self.s
        svc = Service(
            name="mock",
            argv=[str(self.bin / "rtpd"), "mock-downstream", "--addr", f"127.0.0.1:{port}",
                  "--success-rate", str(s.base_success_rate), "--failure-mix", s.base_mix,
                  "--hang-secs", str(s.hang_secs)],
            env={"RTPD_LOG_LEVEL": os.environ.get("CHAOS_RTPD_LOG_LEVEL", "warn")},
            log=self.logs / "mock.log",
            ready=lambda: http_json("GET", f"http://127.0.0.1:{port}/healthz", timeout=2)[0] == 200,
        )
        self.mock_url = f"http://127.0.0.1:{port}"
        self.services["mock"] = svc
        svc.start()

    def mock_control(self, **fields) -> dict:
        status, body = http_json("POST", f"{self.mock_url}/control", fields, timeout=5)
        if status != 200:
            raise RuntimeError(f"mock /control {fields}: {status} {body}")
        return body

    def mock_base(self):
        self.mock_control(success_rate=self.s.base_success_rate, failure_mix=self.s.base_mix)

    # ---- rtpd -----------------------------------------------------------
    def rtpd_env(self) -> dict[str, str]:
        s = self.s
        sha = lambda v: hashlib.sha256(v.encode()).hexdigest()  # noqa: E731
        return {
            "RTPD_WAL": "azure",
            "RTPD_STORAGE_CONNECTION_STRING": self.conn["storage"],
            "RTPD_WAL_CONTAINER": CONTAINER,
            "RTPD_LEDGER": "redis",
            "RTPD_REDIS_URL": self.conn["redis"],
            "RTPD_QUEUE": "servicebus",
            "RTPD_SERVICEBUS_CONNECTION_STRING": self.conn["servicebus"],
            "RTPD_SERVICEBUS_QUEUE": QUEUE,
            "RTPD_DOWNSTREAM_URL": f"{self.mock_url}/process",
            "RTPD_DOWNSTREAM_TIMEOUT_SECS": str(s.downstream_timeout_secs),
            "RTPD_MAX_RETRIES": str(s.max_retries),
            "RTPD_BACKOFF_BASE_SECS": str(s.backoff_base_secs),
            "RTPD_BACKOFF_MAX_SECS": str(s.backoff_max_secs),
            "RTPD_LOCK_DURATION_SECS": str(s.lock_secs),
            "RTPD_PROCESSOR_CONCURRENCY": str(s.processor_concurrency),
            "RTPD_RECONCILE_INTERVAL_SECS": str(s.reconcile_interval_secs),
            "RTPD_RECONCILE_LOOKBACK_SECS": "86400",
            "RTPD_RECONCILE_PENDING_AFTER_SECS": str(s.pending_after_secs),
            "RTPD_AUTH": "keys",
            "RTPD_VENDOR_KEYS": f"chaos:sha256:{sha(self.vendor_key)}",
            "RTPD_ADMIN_TOKENS": f"auditor:sha256:{sha(self.admin_token)}",
            "RTPD_VENDOR_RATE_PER_SEC": "0",
            "RTPD_LOG_LEVEL": os.environ.get("CHAOS_RTPD_LOG_LEVEL", "warn"),
        }

    def set_skew(self, name: str, secs: int):
        """Moves the wall clock of one rtpd process by `secs` (0 = true time)."""
        (self.clock_dir / name).write_text(f"{secs:+d}s\n")

    def start_rtpd(self, name: str, part: str):
        port = free_port()
        env = self.rtpd_env()
        env.update({
            "RTPD_INSTANCE_ID": name,
            "RTPD_HTTP_ADDR": f"127.0.0.1:{port}",
            "RTPD_DATA_DIR": str(self.work / f"data-{name}"),
        })
        if self.libfaketime:
            self.set_skew(name, 0)
            env.update({
                "LD_PRELOAD": self.libfaketime,
                "FAKETIME_TIMESTAMP_FILE": str(self.clock_dir / name),
                "FAKETIME_DONT_FAKE_MONOTONIC": "1",
                "FAKETIME_CACHE_DURATION": "1",
            })
        url = f"http://127.0.0.1:{port}"
        svc = Service(
            name=name,
            argv=[str(self.bin / "rtpd"), part],
            env=env,
            log=self.logs / f"{name}.log",
            ready=lambda: http_json("GET", f"{url}/healthz", timeout=2)[0] == 200,
        )
        svc.url = url  # type: ignore[attr-defined]
        self.services[name] = svc
        svc.start()

    @property
    def api_urls(self) -> list[str]:
        return [self.services[n].url for n in ("api-1", "api-2")]  # type: ignore[attr-defined]

    @property
    def rtpd_names(self) -> list[str]:
        return ["api-1", "api-2", "processor-1", "processor-2"]

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """An operator's `rtpd` command against the stack (true clock)."""
        env = dict(os.environ)
        env.update(self.rtpd_env())
        env["RTPD_INSTANCE_ID"] = "operator"
        env["RTPD_DATA_DIR"] = str(self.work / "data-operator")
        return subprocess.run([str(self.bin / "rtpd"), *args], env=env, capture_output=True,
                              text=True, timeout=timeout)

    def admin_headers(self) -> dict:
        return {"Authorization": f"Bearer {self.admin_token}"}

    # ---- whole stack ----------------------------------------------------
    def start(self, log=print):
        log("starting Azurite");
        self.start_azurite()
        log("starting redis-server (AOF)")
        self.start_redis()
        log("starting the Service Bus test broker")
        self.start_broker()
        log("starting rtpd mock-downstream")
        self.start_mock()
        for name, part in (("api-1", "api"), ("api-2", "api"), ("processor-1", "processor"),
                           ("processor-2", "processor")):
            log(f"starting rtpd {part} ({name})")
            self.start_rtpd(name, part)

    def heal(self):
        """Every process up and unpaused, true clocks, the mock's base mix."""
        for name in self.rtpd_names:
            if self.libfaketime:
                self.set_skew(name, 0)
        for svc in self.services.values():
            svc.signal(signal.SIGCONT)
        for name, svc in self.services.items():
            if not svc.alive():
                if name == "azurite":
                    self.restart_azurite()
                else:
                    svc.start()
        self.mock_base()

    def rss_kib(self) -> dict[str, int]:
        """VmRSS of every rtpd process (api, processor, mock)."""
        out = {}
        for name in [*self.rtpd_names, "mock"]:
            svc = self.services[name]
            try:
                for line in Path(f"/proc/{svc.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        out[name] = int(line.split()[1])
            except OSError:
                pass
        return out

    def stop(self):
        for name in [*self.rtpd_names, "mock", "broker", "redis"]:
            svc = self.services.get(name)
            if svc is not None:
                svc.term(timeout=25)
        if "azurite" in self.services:
            self.services["azurite"].signal(signal.SIGCONT)
        subprocess.run([str(REPO / "scripts/azurite.sh"), "stop", str(self.azurite_env)],
                       capture_output=True, text=True)
