#!/usr/bin/env python3
"""Static checks of the deployment definitions against each other and against rtpd.

    python3 tests/deploy/check_deploy.py --env-names FILE [--repo DIR]

FILE is the output of `rtpd config --env-names`: the RTPD_* variables rtpd reads,
one per line. Nothing is built, started or deployed: this reads
docker-compose.yml (and the env files and configs it references), the Service
Bus emulator config, bicep/**/*.bicep and infra/*.bicepparam, and checks

  1. compose: parses; depends_on targets exist and health-gated ones have a
     healthcheck; named volumes are declared; env files, bind mounts and
     Dockerfiles it references exist in the repo;
  2. env: every RTPD_* variable compose or Bicep sets is one rtpd reads, and
     the production-relevant ones (REQUIRED_* below) are set in both;
  3. queue: the emulator's queue has the name rtpd is given in compose and
     Bicep, and the delivery/lock settings of the Bicep queue;
  4. bicep: module paths and parameter files' `using` targets exist, and the
     parameter files set only (and all required) parameters of main.bicep.

It prints one line per check, then `N passed, M failed`, and exits 1 if any
check failed (2 on bad usage). Needs Python 3.11 and PyYAML only.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

try:
    import yaml
except ImportError:  # pragma: no cover - environment problem, not a check failure
    sys.exit("check_deploy.py needs PyYAML: pip install -r tests/deploy/requirements.txt")

# Variables a deployment must set explicitly instead of inheriting rtpd's
# defaults. The defaults suit `rtpd dev` on a laptop (listen on 127.0.0.1,
# embedded WAL/ledger/queue, mock downstream on localhost, verbose text logs);
# a container that silently kept one of them would look healthy while being
# unreachable, or while keeping "durable" data on its own ephemeral disk. The
# retry policy and auth mode are money-relevant, so they are stated, not implied.
REQUIRED_COMMON = (
    "RTPD_HTTP_ADDR",
    "RTPD_WAL",
    "RTPD_LEDGER",
    "RTPD_QUEUE",
    "RTPD_WAL_CONTAINER",
    "RTPD_SERVICEBUS_QUEUE",
    "RTPD_DOWNSTREAM_URL",
    "RTPD_MAX_RETRIES",
    "RTPD_BACKOFF_BASE_SECS",
    "RTPD_BACKOFF_MAX_SECS",
    "RTPD_AUTH",
    "RTPD_LOG_FORMAT",
)
# Backend connection settings. Compose talks to the emulators, which only take
# connection strings; Azure uses Entra ID through the managed identity.
REQUIRED_COMPOSE_BACKEND = (
    "RTPD_STORAGE_CONNECTION_STRING",
    "RTPD_REDIS_URL",
    "RTPD_SERVICEBUS_CONNECTION_STRING",
)
REQUIRED_AZURE_BACKEND = (
    "RTPD_STORAGE_ACCOUNT_URL",
    "RTPD_REDIS_URL",
    "RTPD_REDIS_ENTRA",
    "RTPD_SERVICEBUS_NAMESPACE",
    "RTPD_AZURE_CLIENT_ID",
)
# Local auth is disabled on the Azure storage account and namespace, so a
# connection string there is a mistake (and a secret in plain config).
FORBIDDEN_AZURE = ("RTPD_STORAGE_CONNECTION_STRING", "RTPD_SERVICEBUS_CONNECTION_STRING")
EXPECTED_BACKENDS = {"RTPD_WAL": "azure", "RTPD_LEDGER": "redis", "RTPD_QUEUE": "servicebus"}

APP_SERVICES = ("api", "processor")
COMPOSE_FILE = "docker-compose.yml"
EMULATOR_CONFIG_TARGET = "/ServiceBus_Emulator/ConfigFiles/Config.json"
EMULATOR_NAMESPACE = "sbemulatorns"  # the only name the emulator accepts
HEALTHY_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


class CheckError(Exception):
    """A check's finding: the message says what is wrong and where."""


# ---------------------------------------------------------------- small parsers


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines as docker compose reads them (comments, blanks, quotes)."""
    env: dict[str, str] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key):
            raise CheckError(f"{path}:{lineno}: not a KEY=VALUE line: {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value
    return env


def iso8601_seconds(text: str) -> int:
    """Seconds in an ISO 8601 duration without years or months (PT1M, PT60S, P1DT2H)."""
    m = re.fullmatch(r"P(?:(\d+)D)?(?:T(?:(\d+)H)?(?:(\d+)M)?(?:(\d+)S)?)?", text)
    if not m or text in ("P", "PT") or text.endswith("T"):
        raise CheckError(f"not an ISO 8601 duration of days/hours/minutes/seconds: {text!r}")
    d, h, mi, s = (int(g) if g else 0 for g in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


def strip_bicep_comments(text: str) -> str:
    """Remove // and /* */ comments, keeping strings (which may contain //) intact."""
    out: list[str] = []
    i, n = 0, len(text)
    in_string = False
    while i < n:
        c = text[i]
        if in_string:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if c == "'":
                in_string = False
            i += 1
        elif c == "'":
            in_string = True
            out.append(c)
            i += 1
        elif text.startswith("//", i):
            while i < n and text[i] != "\n":
                i += 1
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            skipped = text[i : n if end < 0 else end + 2]
            out.append("\n" * skipped.count("\n"))
            i = n if end < 0 else end + 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def bicep_block(text: str, start: int) -> str:
    """The text of the {...} block that opens at or after `start` (strings respected)."""
    open_at = text.find("{", start)
    if open_at < 0:
        raise CheckError("no block after resource declaration")
    depth, in_string = 0, False
    for i in range(open_at, len(text)):
        c = text[i]
        if in_string:
            if c == "'" and text[i - 1] != "\\":
                in_string = False
        elif c == "'":
            in_string = True
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[open_at : i + 1]
    raise CheckError("unbalanced braces")


def object_rest(text: str, start: int) -> str:
    """Text from `start` to the `}` closing the object it is in (strings respected)."""
    in_string = False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if c == "'" and text[i - 1] != "\\":
                in_string = False
        elif c == "'":
            in_string = True
        elif c == "}":
            return text[start:i]
    return text[start:]


@dataclass
class BicepEnvEntry:
    name: str
    kind: str  # "value" or "secretRef"
    expr: str
    file: Path


@dataclass
class Bicep:
    """Comment-stripped Bicep sources and what the checks need from them."""

    root: Path
    files: dict[Path, str] = field(default_factory=dict)

    @classmethod
    def load(cls, root: Path) -> Bicep:
        bicep = cls(root)
        for path in sorted(root.rglob("*.bicep")):
            bicep.files[path] = strip_bicep_comments(path.read_text())
        return bicep

    def env_entries(self) -> list[BicepEnvEntry]:
        entries = []
        for path, text in self.files.items():
            for m in re.finditer(r"\bname:\s*'(RTPD_[A-Za-z0-9_]*)'", text):
                # The value belongs to the same object: look up to its closing brace.
                window = object_rest(text, m.end())
                v = re.search(r"\b(value|secretRef):\s*([^\n]+)", window)
                if v:
                    entries.append(BicepEnvEntry(m.group(1), v.group(1), v.group(2).strip(), path))
                else:
                    entries.append(BicepEnvEntry(m.group(1), "missing", "", path))
        return entries

    def literal_defaults(self, name: str) -> list[str]:
        """Right-hand sides of `param name <type> = X` and `var name = X`, all files."""
        found = []
        pattern = re.compile(
            rf"^\s*(?:param\s+{re.escape(name)}\s+\w+\s*=|var\s+{re.escape(name)}\s*=)\s*(.+?)\s*$",
            re.M,
        )
        for text in self.files.values():
            found += [m.group(1) for m in pattern.finditer(text)]
        return found

    def resolve(self, expr: str, depth: int = 0) -> str | int | bool:
        """Statically evaluate the few expression forms the definitions use for
        values the checks compare: literals, interpolated strings, string(x), and
        parameters/variables whose default is one of these."""
        expr = expr.strip()
        if depth > 8:
            raise CheckError(f"cannot resolve {expr!r}: too deeply nested")
        if re.fullmatch(r"-?\d+", expr):
            return int(expr)
        if expr in ("true", "false"):
            return expr == "true"
        m = re.fullmatch(r"'((?:[^'\\]|\\.)*)'", expr)
        if m:
            return re.sub(
                r"\$\{([^}]*)\}", lambda g: str(self.resolve(g.group(1), depth + 1)), m.group(1)
            )
        m = re.fullmatch(r"string\((.+)\)", expr)
        if m:
            value = self.resolve(m.group(1), depth + 1)
            return str(value).lower() if isinstance(value, bool) else str(value)
        if re.fullmatch(r"[A-Za-z_]\w*", expr):
            candidates = set()
            for rhs in self.literal_defaults(expr):
                try:
                    candidates.add(self.resolve(rhs, depth + 1))
                except CheckError:
                    continue
            if len(candidates) == 1:
                return candidates.pop()
            if candidates:
                raise CheckError(f"{expr} has conflicting defaults {sorted(map(str, candidates))}")
            raise CheckError(
                f"cannot resolve {expr!r} statically: give it a literal default "
                "(param or var) in one Bicep file"
            )
        raise CheckError(f"cannot resolve {expr!r} statically")

    def resources(self, type_prefix: str) -> list[tuple[Path, str]]:
        """Bodies of every `resource x '<type_prefix>@version' = {...}` declaration."""
        found = []
        pattern = re.compile(rf"^\s*resource\s+\w+\s+'{re.escape(type_prefix)}@[^']+'", re.M)
        for path, text in self.files.items():
            for m in pattern.finditer(text):
                found.append((path, bicep_block(text, m.end())))
        return found


# ---------------------------------------------------------------- the checker


class Checker:
    def __init__(self, repo: Path, env_names: set[str]):
        self.repo = repo
        self.env_names = env_names
        self.passed = 0
        self.failed = 0
        self.compose: dict | None = None
        self.bicep: Bicep | None = None

    def run(self, title: str, check: Callable[[], str]) -> None:
        try:
            detail = check()
        except CheckError as e:
            self.failed += 1
            print(f"FAIL  {title}: {e}")
        else:
            self.passed += 1
            print(f"ok    {title}" + (f" ({detail})" if detail else ""))

    def rel(self, path: Path) -> str:
        try:
            return str(path.resolve().relative_to(self.repo.resolve()))
        except ValueError:
            return str(path)

    def in_repo(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self.repo.resolve())

    # ------------------------------------------------------------ compose helpers

    def need_compose(self) -> dict:
        if self.compose is None:
            raise CheckError(f"not checked: {COMPOSE_FILE} did not load")
        return self.compose

    def services(self) -> dict[str, dict]:
        return self.need_compose()["services"]

    def compose_path(self, text: str, what: str) -> Path:
        """A path named in compose, relative to the compose file, with ${VAR:-default} expanded."""

        def expand(m: re.Match) -> str:
            if m.group(2) is None:
                raise CheckError(f"{what} {text!r} uses ${{{m.group(1)}}} without a default")
            return m.group(2)

        text = re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", expand, text)
        path = Path(text).expanduser()
        return path if path.is_absolute() else self.repo / path

    @staticmethod
    def depends_on(service: dict) -> dict[str, str]:
        deps = service.get("depends_on") or {}
        if isinstance(deps, list):
            return {name: "service_started" for name in deps}
        return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}

    @staticmethod
    def env_files(service: dict) -> list[tuple[str, bool]]:
        spec = service.get("env_file")
        if spec is None:
            return []
        items = spec if isinstance(spec, list) else [spec]
        out = []
        for item in items:
            if isinstance(item, dict):
                out.append((item["path"], item.get("required", True)))
            else:
                out.append((item, True))
        return out

    def service_env(self, name: str) -> dict[str, str | None]:
        """The environment compose gives a service: env_file(s), then `environment`."""
        service = self.services()[name]
        env: dict[str, str | None] = {}
        for path_text, required in self.env_files(service):
            path = self.compose_path(path_text, "env_file")
            if path.is_file():
                env.update(parse_env_file(path))
            elif required:
                raise CheckError(f"service {name}: env_file {path_text} does not exist")
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            for item in environment:
                key, sep, value = str(item).partition("=")
                env[key] = value if sep else None
        else:
            env.update({k: None if v is None else str(v) for k, v in environment.items()})
        return env

    def volume_mounts(self, service: dict) -> list[tuple[str, str | None, str]]:
        """(type, source, target) for each entry of a service's volumes."""
        mounts = []
        for item in service.get("volumes") or []:
            if isinstance(item, dict):
                mounts.append((item.get("type", "volume"), item.get("source"), item.get("target", "")))
                continue
            parts = str(item).split(":")
            if len(parts) == 1:
                mounts.append(("volume", None, parts[0]))  # anonymous volume
                continue
            source, target = parts[0], parts[1]
            is_path = source.startswith((".", "/", "~", "$")) or "/" in source
            mounts.append(("bind" if is_path else "volume", source, target))
        return mounts

    def dockerfile_of(self, service: dict) -> Path | None:
        build = service.get("build")
        if build is None:
            return None
        if isinstance(build, str):
            build = {"context": build}
        if "dockerfile_inline" in build:
            return None
        context = self.compose_path(build.get("context", "."), "build context")
        return context / build.get("dockerfile", "Dockerfile")

    def has_healthcheck(self, service: dict) -> bool:
        health = service.get("healthcheck")
        if health is not None:
            return not health.get("disable", False) and health.get("test") not in (None, ["NONE"])
        dockerfile = self.dockerfile_of(service)
        return bool(
            dockerfile
            and dockerfile.is_file()
            and re.search(r"^\s*HEALTHCHECK\s+(?!NONE)", dockerfile.read_text(), re.M | re.I)
        )

    # ------------------------------------------------------------ 1. compose

    def compose_parses(self) -> str:
        path = self.repo / COMPOSE_FILE
        if not path.is_file():
            raise CheckError(f"{COMPOSE_FILE} not found in {self.repo}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise CheckError(f"{COMPOSE_FILE} is not valid YAML: {e}") from e
        if not isinstance(data, dict) or not isinstance(data.get("services"), dict) or not data["services"]:
            raise CheckError(f"{COMPOSE_FILE} has no services mapping")
        for name, service in data["services"].items():
            if not isinstance(service, dict):
                raise CheckError(f"service {name} is not a mapping")
        missing = [s for s in APP_SERVICES if s not in data["services"]]
        if missing:
            raise CheckError(f"services {missing} are missing (the checks below need them)")
        self.compose = data
        return f"{len(data['services'])} services"

    def compose_depends_on(self) -> str:
        services = self.services()
        problems, edges = [], 0
        for name, service in services.items():
            for dep, condition in self.depends_on(service).items():
                edges += 1
                if dep not in services:
                    problems.append(f"{name} depends on undefined service {dep}")
                elif condition not in HEALTHY_CONDITIONS:
                    problems.append(f"{name} -> {dep}: unknown condition {condition!r}")
                elif condition == "service_healthy" and not self.has_healthcheck(services[dep]):
                    problems.append(f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck")
        for name in APP_SERVICES:
            for dep, condition in self.depends_on(services[name]).items():
                if condition != "service_healthy":
                    problems.append(f"{name} starts after {dep} only {condition!r}, not service_healthy")
        if problems:
            raise CheckError("; ".join(problems))
        return f"{edges} dependencies, app services health-gated"

    def compose_volumes(self) -> str:
        compose = self.need_compose()
        declared = set((compose.get("volumes") or {}).keys())
        used, problems = set(), []
        for name, service in self.services().items():
            for kind, source, _target in self.volume_mounts(service):
                if kind == "volume" and source:
                    used.add(source)
                    if source not in declared:
                        problems.append(f"service {name} uses undeclared volume {source}")
        if problems:
            raise CheckError("; ".join(problems))
        return f"{len(used)} named volumes, all declared"

    def compose_files(self) -> str:
        compose = self.need_compose()
        refs: list[tuple[str, str, Path]] = []  # (who, what, path)
        for name, service in self.services().items():
            for path_text, required in self.env_files(service):
                if required:
                    refs.append((name, "env_file", self.compose_path(path_text, "env_file")))
            for kind, source, _target in self.volume_mounts(service):
                if kind == "bind" and source:
                    refs.append((name, "bind mount", self.compose_path(source, "bind mount")))
        for section in ("configs", "secrets"):
            for key, spec in (compose.get(section) or {}).items():
                if isinstance(spec, dict) and "file" in spec:
                    refs.append((f"{section}.{key}", "file", self.compose_path(spec["file"], section)))
        problems = []
        for who, what, path in refs:
            if not self.in_repo(path):
                problems.append(f"{who}: {what} {path} is outside the repo")
            elif not path.exists():
                problems.append(f"{who}: {what} {self.rel(path)} does not exist")
        if problems:
            raise CheckError("; ".join(problems))
        return f"{len(refs)} referenced files exist"

    def compose_build(self) -> str:
        dockerfiles = set()
        for name, service in self.services().items():
            dockerfile = self.dockerfile_of(service)
            if dockerfile is None:
                continue
            if not dockerfile.is_file():
                raise CheckError(f"service {name} builds from {self.rel(dockerfile)}, which does not exist")
            dockerfiles.add(self.rel(dockerfile))
        if not dockerfiles:
            raise CheckError("no service builds the rtpd image")
        return ", ".join(sorted(dockerfiles))

    # ------------------------------------------------------------ 2. environment

    def compose_env_known(self) -> str:
        unknown = {}
        for name in self.services():
            for key in self.service_env(name):
                if key.startswith("RTPD_") and key not in self.env_names:
                    unknown.setdefault(key, []).append(name)
        if unknown:
            listing = ", ".join(f"{k} (in {', '.join(v)})" for k, v in sorted(unknown.items()))
            raise CheckError(f"rtpd does not read: {listing}")
        return ""

    def compose_env_required(self) -> str:
        problems = []
        for name in APP_SERVICES:
            env = self.service_env(name)
            missing = [k for k in REQUIRED_COMMON + REQUIRED_COMPOSE_BACKEND if k not in env]
            if missing:
                problems.append(f"{name} does not set {', '.join(missing)}")
            for key, expected in EXPECTED_BACKENDS.items():
                if key in env and env[key] != expected:
                    problems.append(f"{name}: {key}={env[key]!r}, expected {expected!r}")
        if problems:
            raise CheckError("; ".join(problems))
        return f"{', '.join(APP_SERVICES)}"

    def need_bicep(self) -> Bicep:
        if self.bicep is None:
            root = self.repo / "bicep"
            if not root.is_dir():
                raise CheckError("bicep/ not found")
            self.bicep = Bicep.load(root)
            if not self.bicep.files:
                raise CheckError("no .bicep files under bicep/")
        return self.bicep

    def bicep_env(self) -> list[BicepEnvEntry]:
        entries = self.need_bicep().env_entries()
        if not entries:
            raise CheckError("no `name: 'RTPD_...'` entries in bicep/")
        return entries

    def bicep_env_known(self) -> str:
        entries = self.bicep_env()
        unknown = sorted({f"{e.name} ({self.rel(e.file)})" for e in entries if e.name not in self.env_names})
        if unknown:
            raise CheckError(f"rtpd does not read: {', '.join(unknown)}")
        return f"{len({e.name for e in entries})} variables"

    def bicep_env_required(self) -> str:
        bicep = self.need_bicep()
        entries = self.bicep_env()
        if not bicep.resources("Microsoft.App/containerApps"):
            raise CheckError("no Microsoft.App/containerApps resource in bicep/")
        names = {e.name for e in entries}
        problems = []
        missing = [k for k in REQUIRED_COMMON + REQUIRED_AZURE_BACKEND if k not in names]
        if missing:
            problems.append(f"not set: {', '.join(missing)}")
        forbidden = sorted(names & set(FORBIDDEN_AZURE))
        if forbidden:
            problems.append(f"connection strings set (Azure uses Entra ID): {', '.join(forbidden)}")
        for e in entries:
            if e.kind == "missing":
                problems.append(f"{e.name} in {self.rel(e.file)} has neither value nor secretRef")
            if e.name in EXPECTED_BACKENDS:
                if e.kind != "value":
                    problems.append(f"{e.name} must be a plain value")
                    continue
                value = bicep.resolve(e.expr)
                if value != EXPECTED_BACKENDS[e.name]:
                    problems.append(f"{e.name}={value!r}, expected {EXPECTED_BACKENDS[e.name]!r}")
        if problems:
            raise CheckError("; ".join(problems))
        return "container apps"

    # ------------------------------------------------------------ 3. queue

    def emulator_config_path(self) -> Path:
        for name, service in self.services().items():
            for kind, source, target in self.volume_mounts(service):
                if kind == "bind" and source and target == EMULATOR_CONFIG_TARGET:
                    return self.compose_path(source, "bind mount")
        raise CheckError(f"no service mounts a config at {EMULATOR_CONFIG_TARGET}")

    def emulator_queue(self) -> dict:
        path = self.emulator_config_path()
        try:
            config = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckError(f"{self.rel(path)}: {e}") from e
        try:
            namespaces = config["UserConfig"]["Namespaces"]
            logging_type = config["UserConfig"]["Logging"]["Type"]
        except (KeyError, TypeError) as e:
            raise CheckError(f"{self.rel(path)}: missing {e} (UserConfig.Namespaces, UserConfig.Logging.Type)") from e
        if not isinstance(namespaces, list) or len(namespaces) != 1:
            raise CheckError(f"{self.rel(path)}: the emulator takes exactly one namespace")
        namespace = namespaces[0]
        if namespace.get("Name") != EMULATOR_NAMESPACE:
            raise CheckError(f"{self.rel(path)}: namespace must be named {EMULATOR_NAMESPACE}")
        for key in ("Queues", "Topics"):
            if not isinstance(namespace.get(key), list):
                raise CheckError(f"{self.rel(path)}: namespace needs a {key} list (may be empty)")
        if logging_type not in ("File", "Console", "File,Console", "Console,File"):
            raise CheckError(f"{self.rel(path)}: Logging.Type {logging_type!r} is not one the emulator knows")
        queues = namespace["Queues"]
        if len(queues) != 1:
            raise CheckError(f"{self.rel(path)}: expected one queue, found {len(queues)}")
        return {"path": path, **queues[0]}

    def emulator_config_valid(self) -> str:
        queue = self.emulator_queue()
        props = queue.get("Properties") or {}
        where = self.rel(queue["path"])
        # The emulator's documented limits (its Config-schema.json).
        limits = {
            "LockDuration": (5, 300),
            "DuplicateDetectionHistoryTimeWindow": (5, 300),
            "DefaultMessageTimeToLive": (300, 3600),
        }
        problems = []
        for key, (low, high) in limits.items():
            if key in props:
                seconds = iso8601_seconds(props[key])
                if not low <= seconds <= high:
                    problems.append(f"{key}={props[key]} outside the emulator's {low}s..{high}s")
        mdc = props.get("MaxDeliveryCount")
        if mdc is not None and not (isinstance(mdc, int) and 1 <= mdc <= 10):
            problems.append(f"MaxDeliveryCount={mdc!r} outside the emulator's 1..10")
        if problems:
            raise CheckError(f"{where}: " + "; ".join(problems))
        return f"{where}, queue {queue.get('Name')}"

    def bicep_queue(self) -> dict[str, object]:
        bicep = self.need_bicep()
        queues = bicep.resources("Microsoft.ServiceBus/namespaces/queues")
        if len(queues) != 1:
            raise CheckError(f"expected one Microsoft.ServiceBus/namespaces/queues resource, found {len(queues)}")
        _path, body = queues[0]

        def prop(key: str) -> object:
            m = re.search(rf"^\s*{key}:\s*(.+?)\s*$", body, re.M)
            if not m:
                raise CheckError(f"the Bicep queue does not set {key}")
            return bicep.resolve(m.group(1))

        return {
            "name": prop("name"),
            "maxDeliveryCount": prop("maxDeliveryCount"),
            "lockDuration": prop("lockDuration"),
            "requiresDuplicateDetection": prop("requiresDuplicateDetection"),
            "deadLetteringOnMessageExpiration": prop("deadLetteringOnMessageExpiration"),
        }

    def bicep_env_value(self, name: str) -> list[str | int | bool]:
        bicep = self.need_bicep()
        values = [bicep.resolve(e.expr) for e in self.bicep_env() if e.name == name and e.kind == "value"]
        if not values:
            raise CheckError(f"Bicep does not set {name}")
        return values

    def queue_name_agrees(self) -> str:
        emulator = self.emulator_queue()["Name"]
        seen = {"emulator Config.json": emulator}
        for name in APP_SERVICES:
            seen[f"compose {name} RTPD_SERVICEBUS_QUEUE"] = self.service_env(name).get("RTPD_SERVICEBUS_QUEUE")
        for i, value in enumerate(self.bicep_env_value("RTPD_SERVICEBUS_QUEUE")):
            seen[f"Bicep RTPD_SERVICEBUS_QUEUE #{i + 1}"] = value
        seen["Bicep queue resource"] = self.bicep_queue()["name"]
        if len(set(map(str, seen.values()))) != 1:
            raise CheckError("queue names differ: " + ", ".join(f"{k}={v!r}" for k, v in seen.items()))
        return str(emulator)

    def queue_properties_agree(self) -> str:
        props = self.emulator_queue().get("Properties") or {}
        azure = self.bicep_queue()
        problems = []
        emulator_lock = iso8601_seconds(props.get("LockDuration", "PT1M"))  # emulator default PT1M
        azure_lock = iso8601_seconds(str(azure["lockDuration"]))
        if emulator_lock != azure_lock:
            problems.append(f"lock duration: emulator {emulator_lock}s, Bicep {azure_lock}s")
        emulator_mdc = props.get("MaxDeliveryCount", 3)  # emulator default 3
        if emulator_mdc != azure["maxDeliveryCount"]:
            problems.append(f"max delivery count: emulator {emulator_mdc}, Bicep {azure['maxDeliveryCount']}")
        for emu_key, azure_key in (
            ("RequiresDuplicateDetection", "requiresDuplicateDetection"),
            ("DeadLetteringOnMessageExpiration", "deadLetteringOnMessageExpiration"),
        ):
            if props.get(emu_key, False) != azure[azure_key]:
                problems.append(f"{emu_key}: emulator {props.get(emu_key, False)}, Bicep {azure[azure_key]}")
        # rtpd renews/plans around the lock; it must be told the real one.
        for name in APP_SERVICES:
            value = self.service_env(name).get("RTPD_LOCK_DURATION_SECS")
            if value is not None and str(value) != str(emulator_lock):
                problems.append(f"compose {name} RTPD_LOCK_DURATION_SECS={value}, queue lock {emulator_lock}s")
        if any(e.name == "RTPD_LOCK_DURATION_SECS" for e in self.bicep_env()):
            for value in self.bicep_env_value("RTPD_LOCK_DURATION_SECS"):
                if str(value) != str(azure_lock):
                    problems.append(f"Bicep RTPD_LOCK_DURATION_SECS={value}, queue lock {azure_lock}s")
        if problems:
            raise CheckError("; ".join(problems))
        return f"maxDeliveryCount {emulator_mdc}, lock {emulator_lock}s"

    # ------------------------------------------------------------ 4. bicep references

    def bicep_modules_exist(self) -> str:
        bicep = self.need_bicep()
        count, problems = 0, []
        for path, text in bicep.files.items():
            for m in re.finditer(r"^\s*module\s+\w+\s+'([^']+)'", text, re.M):
                ref = m.group(1)
                if re.match(r"^(br|ts)[:/]", ref):
                    continue  # registry or template spec reference, not a file
                count += 1
                target = path.parent / ref
                if not target.is_file():
                    problems.append(f"{self.rel(path)}: module '{ref}' does not exist")
        if problems:
            raise CheckError("; ".join(problems))
        if not count:
            raise CheckError("no local modules referenced from bicep/")
        return f"{count} module references"

    def param_files(self) -> list[Path]:
        files = sorted((self.repo / "infra").glob("*.bicepparam"))
        if not files:
            raise CheckError("no infra/*.bicepparam files")
        return files

    def param_file_target(self, path: Path) -> Path:
        text = strip_bicep_comments(path.read_text())
        m = re.search(r"^\s*using\s+'([^']+)'", text, re.M)
        if not m:
            raise CheckError(f"{self.rel(path)} has no `using '<file>.bicep'` line")
        return path.parent / m.group(1)

    def param_files_using(self) -> str:
        problems = []
        for path in self.param_files():
            target = self.param_file_target(path)
            if not target.is_file():
                problems.append(f"{self.rel(path)}: using target {self.rel(target)} does not exist")
        if problems:
            raise CheckError("; ".join(problems))
        return ", ".join(self.rel(p) for p in self.param_files())

    def param_files_match(self) -> str:
        problems = []
        for path in self.param_files():
            target = self.param_file_target(path)
            if not target.is_file():
                raise CheckError(f"not checked: {self.rel(target)} does not exist")
            declared: dict[str, bool] = {}  # name -> has default
            for m in re.finditer(r"^\s*param\s+(\w+)\s+([^\n]*)$", strip_bicep_comments(target.read_text()), re.M):
                declared[m.group(1)] = "=" in m.group(2)
            given = set(re.findall(r"^\s*param\s+(\w+)\s*=", strip_bicep_comments(path.read_text()), re.M))
            unknown = sorted(given - set(declared))
            missing = sorted(n for n, has_default in declared.items() if not has_default and n not in given)
            if unknown:
                problems.append(f"{self.rel(path)} sets undeclared {', '.join(unknown)}")
            if missing:
                problems.append(f"{self.rel(path)} leaves required {', '.join(missing)} unset")
        if problems:
            raise CheckError("; ".join(problems))
        return ""


def usage_error(message: str) -> None:
    print(f"check_deploy.py: {message}", file=sys.stderr)
    sys.exit(2)


def load_env_names(path: Path) -> set[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        usage_error(f"cannot read --env-names file: {e}")
    names = {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}
    bad = sorted(n for n in names if not re.fullmatch(r"RTPD_[A-Z0-9_]+", n))
    if bad:
        usage_error(f"{path} is not a list of RTPD_* names, one per line (e.g. {bad[0]!r})")
    if not names:
        usage_error(f"{path} names no variables")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-names", required=True, type=Path, help="output of `rtpd config --env-names`")
    parser.add_argument(
        "--repo",
        type=Path,
        default=Path(__file__).resolve().parents[2],
        help="repository root to check (default: this script's repository)",
    )
    args = parser.parse_args(argv)
    if not args.repo.is_dir():
        parser.error(f"--repo {args.repo} is not a directory")

    c = Checker(args.repo, load_env_names(args.env_names))
    print(f"checking {args.repo.resolve()} against {len(c.env_names)} variable names")

    c.run("compose: docker-compose.yml parses", c.compose_parses)
    c.run("compose: depends_on targets exist and are health-gated", c.compose_depends_on)
    c.run("compose: named volumes are declared", c.compose_volumes)
    c.run("compose: env files, bind mounts and configs exist", c.compose_files)
    c.run("compose: Dockerfile exists", c.compose_build)

    c.run("env: compose sets only variables rtpd reads", c.compose_env_known)
    c.run("env: compose api/processor set the required variables", c.compose_env_required)
    c.run("env: Bicep sets only variables rtpd reads", c.bicep_env_known)
    c.run("env: Bicep container apps set the required variables", c.bicep_env_required)

    c.run("queue: emulator config is valid for the emulator", c.emulator_config_valid)
    c.run("queue: one queue name in emulator, compose and Bicep", c.queue_name_agrees)
    c.run("queue: emulator and Bicep agree on delivery and lock settings", c.queue_properties_agree)

    c.run("bicep: module files exist", c.bicep_modules_exist)
    c.run("bicep: parameter files' using targets exist", c.param_files_using)
    c.run("bicep: parameter files match main.bicep's parameters", c.param_files_match)

    print(f"{c.passed} passed, {c.failed} failed")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
