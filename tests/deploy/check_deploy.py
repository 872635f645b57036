#!/usr/bin/env python3
"""Static checks of the deployment definitions against each other, against rtpd
and against the published ARM schemas.

    python3 tests/deploy/check_deploy.py --env-names FILE [--pending-env-names FILE] [--repo DIR]

FILE is the output of `rtpd config --env-names`: the RTPD_* variables rtpd reads,
one per line. The pending file (default tests/deploy/pending-env-names.txt)
lists RTPD_* names the deployment already sets for a change to rtpd that has
not landed yet; keep it empty otherwise. Nothing is built, started or
deployed: this reads docker-compose.yml (and the env files and configs it
references), the Service Bus emulator config, bicep/**/*.bicep and
infra/*.bicepparam, and checks

  1. compose: parses; depends_on targets exist and health-gated ones have a
     healthcheck; named volumes are declared; env files, bind mounts and
     Dockerfiles it references exist in the repo; every image is pinned;
  2. env: every variable compose or Bicep gives rtpd is one rtpd reads (RTPD_*)
     or a standard OpenTelemetry / Azure SDK one, and the production-relevant
     ones (REQUIRED_* below) are set in both; secrets come from mounted files;
     each rtpd container app has startup, liveness and readiness probes;
  3. queue: the emulator's queue has the name rtpd is given in compose and
     Bicep, and the delivery/lock settings of the Bicep queue;
  4. bicep: every file parses; module paths, module parameters and outputs,
     names and resource property paths resolve; parameter files set only (and
     all required) parameters of main.bicep;
  5. schema: every resource's api-version exists for its type, and its body
     uses only known, writable property names of that api-version, sets every
     required one, and uses known enum values (azure-mgmt-* SDK models).

It prints one line per check, then `N passed, M failed`, and exits 1 if any
check failed (2 on bad usage). Needs Python 3.11 and tests/deploy/requirements.txt.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

try:
    import arm_schema
    import bicep_tree
    import yaml
    from bicep_checks import BicepError, BicepProject, Container
except ImportError as e:  # pragma: no cover - environment problem, not a check failure
    sys.exit(f"check_deploy.py needs its packages ({e}): pip install -r tests/deploy/requirements.txt")

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
    "RTPD_POSTGRES_URL",
    "RTPD_SERVICEBUS_CONNECTION_STRING",
)
# Every rtpd service in compose exports telemetry to the collector.
REQUIRED_COMPOSE_TELEMETRY = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME")
REQUIRED_AZURE_BACKEND = (
    "RTPD_STORAGE_ACCOUNT_URL",
    "RTPD_SERVICEBUS_NAMESPACE",
    # Two identities are attached to the processor: rtpd must be told its own.
    "AZURE_CLIENT_ID",
    "RTPD_ADMIN_TOKENS_FILE",
)
# Per container app (its first argument): the api authenticates vendors.
REQUIRED_AZURE_BY_COMMAND = {"api": ("RTPD_VENDOR_KEYS_FILE",)}
# Each ledger's connection settings, required when RTPD_LEDGER can take that value.
LEDGER_SETTINGS = {
    "redis": ("RTPD_REDIS_URL", "RTPD_REDIS_ENTRA"),
    "postgres": ("RTPD_POSTGRES_URL", "RTPD_POSTGRES_ENTRA"),
}
# Local auth is disabled on the Azure storage account and namespace, so a
# connection string there is a mistake (and a secret in plain config). HMAC
# vendor secrets are refused from the environment: credentials come as files.
FORBIDDEN_AZURE = (
    "RTPD_STORAGE_CONNECTION_STRING",
    "RTPD_SERVICEBUS_CONNECTION_STRING",
    "RTPD_VENDOR_KEYS",
    "RTPD_ADMIN_TOKENS",
    "RTPD_AZURE_CLIENT_ID",  # the standard AZURE_CLIENT_ID replaces it
)
EXPECTED_BACKENDS = {"RTPD_WAL": "azure", "RTPD_LEDGER": "redis", "RTPD_QUEUE": "servicebus"}
# Bicep may choose the ledger with a parameter; these are the values rtpd takes.
AZURE_LEDGERS = set(LEDGER_SETTINGS)

# Standard variables rtpd honours besides its own RTPD_* ones (issue 15, 16):
# the OpenTelemetry SDK environment variables and the Azure SDK identity ones.
STANDARD_OTEL = {
    "OTEL_SDK_DISABLED",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_LOG_LEVEL",
    "OTEL_PROPAGATORS",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_TRACES_EXPORTER",
    "OTEL_METRICS_EXPORTER",
    "OTEL_LOGS_EXPORTER",
    "OTEL_METRIC_EXPORT_INTERVAL",
    "OTEL_METRIC_EXPORT_TIMEOUT",
    "OTEL_BSP_SCHEDULE_DELAY",
    "OTEL_BSP_EXPORT_TIMEOUT",
    "OTEL_BSP_MAX_QUEUE_SIZE",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
    "OTEL_BLRP_SCHEDULE_DELAY",
    "OTEL_BLRP_EXPORT_TIMEOUT",
    "OTEL_BLRP_MAX_QUEUE_SIZE",
    "OTEL_BLRP_MAX_EXPORT_BATCH_SIZE",
} | {
    f"OTEL_EXPORTER_OTLP_{signal}{setting}"
    for signal in ("", "TRACES_", "METRICS_", "LOGS_")
    for setting in ("ENDPOINT", "PROTOCOL", "HEADERS", "TIMEOUT", "COMPRESSION", "CERTIFICATE", "INSECURE")
}
STANDARD_AZURE = {
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_AUTHORITY_HOST",
    "AZURE_CLIENT_SECRET",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_CLIENT_CERTIFICATE_PASSWORD",
}
STANDARD_ENV = STANDARD_OTEL | STANDARD_AZURE
# Probes every rtpd container app has: (type, path).
REQUIRED_PROBES = {("Startup", "/healthz"), ("Liveness", "/healthz"), ("Readiness", "/readyz")}
PENDING_ENV_NAMES = Path(__file__).resolve().parent / "pending-env-names.txt"

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


def interpolate(text: str) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} / ${VAR} / $$ with no variable
    set: what a plain `docker compose up` gives the container."""

    def value(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return m.group(3) or ""

    return re.sub(r"\$\$|\$\{(\w+)(:?-([^}]*))?\}", value, text)


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


# ---------------------------------------------------------------- the checker


class Checker:
    def __init__(self, repo: Path, env_names: set[str], pending_names: set[str] | None = None):
        self.repo = repo
        self.env_names = env_names
        # Names rtpd will read once a change in flight lands (pending-env-names.txt).
        self.pending_names = (pending_names or set()) - env_names
        self.passed = 0
        self.failed = 0
        self.compose: dict | None = None
        self.bicep: BicepProject | None = None

    def known_rtpd(self, name: str) -> bool:
        return name in self.env_names or name in self.pending_names

    def unknown_env(self, name: str) -> str | None:
        """Why rtpd would not read `name`, or None if it would."""
        if name.startswith("RTPD_"):
            return None if self.known_rtpd(name) else "rtpd does not read it"
        if name.startswith(("OTEL_", "AZURE_")):
            return None if name in STANDARD_ENV else "not a standard OpenTelemetry / Azure SDK variable"
        return "neither RTPD_* nor a standard OTEL_* / AZURE_* variable"

    def run(self, title: str, check: Callable[[], str]) -> None:
        try:
            detail = check()
        except (CheckError, BicepError, bicep_tree.BicepSyntaxError) as e:
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
                env[key] = interpolate(value) if sep else None
        else:
            env.update({k: None if v is None else interpolate(str(v)) for k, v in environment.items()})
        return env

    def rtpd_services(self) -> list[str]:
        """Services running the rtpd image (built from the Dockerfile)."""
        return [name for name, service in self.services().items() if service.get("build") is not None]

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
        unknown: dict[str, list[str]] = {}
        names: set[str] = set()
        for name in self.services():
            rtpd_image = name in self.rtpd_services()
            for key in self.service_env(name):
                # Other images have their own variables; an RTPD_ one there is a misplaced setting.
                if key.startswith("RTPD_") or rtpd_image:
                    names.add(key)
                    why = self.unknown_env(key)
                    if why:
                        unknown.setdefault(f"{key}: {why}", []).append(name)
        if unknown:
            listing = "; ".join(f"{k} (in {', '.join(v)})" for k, v in sorted(unknown.items()))
            raise CheckError(listing)
        pending = sorted(names & self.pending_names)
        return f"{len(names)} variables" + (f"; pending in rtpd: {', '.join(pending)}" if pending else "")

    def compose_images_pinned(self) -> str:
        problems, count = [], 0
        for name, service in self.services().items():
            image = service.get("image")
            if image is None or service.get("build") is not None:
                continue  # built here
            count += 1
            reference = str(image)
            if "@sha256:" in reference:
                continue
            last = reference.rsplit("/", 1)[-1]
            tag = last.partition(":")[2]
            if not tag:
                problems.append(f"{name}: {reference} has no tag")
            elif tag in ("latest", "stable", "edge", "main") or not re.search(r"\d", tag):
                problems.append(f"{name}: {reference} is a moving tag")
            elif re.fullmatch(r"\d+", tag):
                problems.append(f"{name}: {reference} names only a major version")
        if problems:
            raise CheckError("; ".join(problems))
        return f"{count} images"

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
        service_names = {}
        for name in self.rtpd_services():
            env = self.service_env(name)
            missing = [k for k in REQUIRED_COMPOSE_TELEMETRY if not env.get(k)]
            if missing:
                problems.append(f"{name} does not set {', '.join(missing)}")
            service_names.setdefault(env.get("OTEL_SERVICE_NAME"), []).append(name)
        shared = {k: v for k, v in service_names.items() if k and len(v) > 1}
        if shared:
            problems.append(f"services share an OTEL_SERVICE_NAME: {shared}")
        if problems:
            raise CheckError("; ".join(problems))
        return f"{', '.join(APP_SERVICES)}; telemetry: {', '.join(self.rtpd_services())}"

    def need_bicep(self) -> BicepProject:
        if self.bicep is None:
            root = self.repo / "bicep"
            if not root.is_dir():
                raise CheckError("bicep/ not found")
            self.bicep = BicepProject.load(root)
            if not self.bicep.files:
                raise CheckError("no .bicep files under bicep/")
        return self.bicep

    def rtpd_containers(self) -> list[Container]:
        containers = self.need_bicep().rtpd_containers()
        if not containers:
            raise CheckError("no container app in bicep/ runs rtpd (args: api | processor | serve)")
        return containers

    def bicep_parses(self) -> str:
        bicep = self.need_bicep()
        resources = sum(len(f.resources) for f in bicep.files.values())
        return f"{len(bicep.files)} files, {resources} resources"

    def bicep_env_known(self) -> str:
        bicep = self.need_bicep()
        unknown, names = {}, set()
        for container in self.rtpd_containers():
            for entry in bicep.env_entries(container):
                names.add(entry.name)
                why = self.unknown_env(entry.name)
                if why:
                    unknown.setdefault(f"{entry.name}: {why}", set()).add(container.label)
        if unknown:
            raise CheckError(
                "; ".join(f"{k} (in {', '.join(sorted(v))})" for k, v in sorted(unknown.items()))
            )
        pending = sorted(names & self.pending_names)
        return f"{len(names)} variables" + (f"; pending in rtpd: {', '.join(pending)}" if pending else "")

    def bicep_env_required(self) -> str:
        bicep = self.need_bicep()
        problems = []
        for container in self.rtpd_containers():
            entries = bicep.env_entries(container)
            names = {e.name for e in entries}
            required = (
                REQUIRED_COMMON
                + REQUIRED_AZURE_BACKEND
                + REQUIRED_AZURE_BY_COMMAND.get(container.command, ())
            )
            missing = [k for k in required if k not in names]
            if missing:
                problems.append(f"{container.label} does not set {', '.join(missing)}")
            forbidden = sorted(names & set(FORBIDDEN_AZURE))
            if forbidden:
                problems.append(
                    f"{container.label} sets {', '.join(forbidden)} (Azure uses Entra ID and secret files)"
                )
            for e in entries:
                if e.kind == "missing":
                    problems.append(f"{container.label}: {e.name} has neither value nor secretRef")
            problems += self._backends(container, entries)
        if problems:
            raise CheckError("; ".join(problems))
        return ", ".join(c.label for c in self.rtpd_containers())

    def _backends(self, container: Container, entries: list) -> list[str]:
        bicep = self.need_bicep()
        problems = []
        names = {e.name for e in entries}
        for e in entries:
            if e.name not in EXPECTED_BACKENDS:
                continue
            if e.kind != "value":
                problems.append(f"{container.label}: {e.name} must be a plain value")
                continue
            if e.name == "RTPD_LEDGER" and isinstance(e.value, bicep_tree.Ref):
                # A parameter chooses the ledger: each value it allows must be a
                # ledger rtpd has, with that ledger's settings present.
                allowed = bicep.allowed_values(e.value.name)
                if not allowed:
                    problems.append(
                        f"{container.label}: RTPD_LEDGER comes from {e.value.name}, which has no @allowed list"
                    )
                for ledger in sorted(allowed):
                    if ledger not in AZURE_LEDGERS:
                        problems.append(
                            f"{container.label}: {e.value.name} allows {ledger!r}, not an Azure ledger"
                        )
                        continue
                    missing = [k for k in LEDGER_SETTINGS[ledger] if k not in names]
                    if missing:
                        problems.append(f"{container.label}: ledger {ledger} needs {', '.join(missing)}")
                continue
            value = bicep.resolve(e.value)
            if value != EXPECTED_BACKENDS[e.name]:
                problems.append(
                    f"{container.label}: {e.name}={value!r}, expected {EXPECTED_BACKENDS[e.name]!r}"
                )
        return problems

    def bicep_secret_files(self) -> str:
        """Every *_FILE variable names a file in a mounted secret volume, and
        every secret behind it is a Key Vault reference through an identity."""
        bicep = self.need_bicep()
        problems, checked = [], 0
        for container in self.rtpd_containers():
            f = container.file
            secrets = {s.get("name"): s for s in bicep.objects(f, container.configuration.get("secrets"))}
            volumes = {v.get("name"): v for v in bicep.objects(f, container.template.get("volumes"))}
            mounts = bicep.objects(f, container.body.get("volumeMounts"))
            for e in bicep.env_entries(container):
                if not e.name.endswith("_FILE") or not e.name.startswith("RTPD_"):
                    continue
                checked += 1
                path = str(bicep.resolve(e.value))
                mount = next(
                    (
                        m
                        for m in mounts
                        if path.startswith(str(bicep.resolve(m.get("mountPath", ""))).rstrip("/") + "/")
                    ),
                    None,
                )
                if mount is None:
                    problems.append(f"{container.label}: {e.name}={path} is under no volume mount")
                    continue
                volume = volumes.get(mount.get("volumeName"))
                if volume is None or volume.get("storageType") != "Secret":
                    problems.append(
                        f"{container.label}: {e.name} is on volume {mount.get('volumeName')!r}, not a Secret volume of the app"
                    )
                    continue
                file_name = path[len(str(bicep.resolve(mount["mountPath"])).rstrip("/")) + 1 :]
                item = next(
                    (i for i in bicep.objects(f, volume.get("secrets")) if i.get("path") == file_name), None
                )
                if item is None:
                    problems.append(
                        f"{container.label}: volume {volume.get('name')!r} has no file {file_name!r}"
                    )
                    continue
                secret = secrets.get(item.get("secretRef"))
                if secret is None:
                    problems.append(
                        f"{container.label}: {file_name} refers to secret {item.get('secretRef')!r}, which the app does not define"
                    )
                elif "keyVaultUrl" not in secret or "identity" not in secret:
                    problems.append(
                        f"{container.label}: secret {secret.get('name')!r} is not a Key Vault reference with an identity"
                    )
        if problems:
            raise CheckError("; ".join(problems))
        if not checked:
            raise CheckError("no RTPD_*_FILE variable in the rtpd container apps")
        return f"{checked} secret files"

    def bicep_probes(self) -> str:
        bicep = self.need_bicep()
        problems = []
        for container in self.rtpd_containers():
            found = set()
            port = None
            for probe in bicep.objects(container.file, container.body.get("probes")):
                get = probe.get("httpGet") if isinstance(probe.get("httpGet"), dict) else {}
                found.add((probe.get("type"), get.get("path")))
                port = get.get("port", port)
            missing = sorted(REQUIRED_PROBES - found)
            if missing:
                problems.append(f"{container.label} lacks {', '.join(f'{t} {p}' for t, p in missing)}")
            http_addr = next((e for e in bicep.env_entries(container) if e.name == "RTPD_HTTP_ADDR"), None)
            if http_addr is not None and port is not None:
                addr, probe_port = str(bicep.resolve(http_addr.value)), bicep.resolve(port)
                if not addr.endswith(f":{probe_port}"):
                    problems.append(
                        f"{container.label}: probes use port {probe_port}, rtpd listens on {addr}"
                    )
        if problems:
            raise CheckError("; ".join(problems))
        return "startup /healthz, liveness /healthz, readiness /readyz"

    # ------------------------------------------------------------ 3. queue

    def emulator_config_path(self) -> Path:
        for service in self.services().values():
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
            raise CheckError(
                f"{self.rel(path)}: missing {e} (UserConfig.Namespaces, UserConfig.Logging.Type)"
            ) from e
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
            raise CheckError(
                f"expected one Microsoft.ServiceBus/namespaces/queues resource, found {len(queues)}"
            )
        _file, resource = queues[0]
        properties = (
            resource.body.get("properties") if isinstance(resource.body.get("properties"), dict) else {}
        )

        def prop(key: str) -> object:
            source = resource.body if key == "name" else properties
            if key not in source:
                raise CheckError(f"the Bicep queue does not set {key}")
            return bicep.resolve(source[key])

        return {
            "name": prop("name"),
            "maxDeliveryCount": prop("maxDeliveryCount"),
            "lockDuration": prop("lockDuration"),
            "requiresDuplicateDetection": prop("requiresDuplicateDetection"),
            "deadLetteringOnMessageExpiration": prop("deadLetteringOnMessageExpiration"),
        }

    def bicep_env_value(self, name: str) -> list[str | int | bool]:
        bicep = self.need_bicep()
        values = [
            bicep.resolve(e.value)
            for container in self.rtpd_containers()
            for e in bicep.env_entries(container)
            if e.name == name and e.kind == "value"
        ]
        if not values:
            raise CheckError(f"Bicep does not set {name}")
        return values

    def queue_name_agrees(self) -> str:
        emulator = self.emulator_queue()["Name"]
        seen = {"emulator Config.json": emulator}
        for name in APP_SERVICES:
            seen[f"compose {name} RTPD_SERVICEBUS_QUEUE"] = self.service_env(name).get(
                "RTPD_SERVICEBUS_QUEUE"
            )
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
                problems.append(
                    f"compose {name} RTPD_LOCK_DURATION_SECS={value}, queue lock {emulator_lock}s"
                )
        bicep = self.need_bicep()
        if any(
            e.name == "RTPD_LOCK_DURATION_SECS" for c in self.rtpd_containers() for e in bicep.env_entries(c)
        ):
            for value in self.bicep_env_value("RTPD_LOCK_DURATION_SECS"):
                if str(value) != str(azure_lock):
                    problems.append(f"Bicep RTPD_LOCK_DURATION_SECS={value}, queue lock {azure_lock}s")
        if problems:
            raise CheckError("; ".join(problems))
        return f"maxDeliveryCount {emulator_mdc}, lock {emulator_lock}s"

    # ------------------------------------------------------------ telemetry

    # Application Insights tables filled from spans. Spans are sampled
    # (OTEL_TRACES_SAMPLER) and dropped while the collector is unreachable,
    # so an alert reading them goes quiet exactly when it is needed; alerts
    # read metrics (customMetrics, Azure platform metrics), which are
    # exported whatever the sampling.
    SPAN_TABLES = ("requests", "dependencies", "traces", "exceptions", "AppRequests", "AppDependencies", "AppTraces", "AppExceptions")

    def alert_queries(self) -> list[tuple[str, str]]:
        bicep = self.need_bicep()
        out = []

        def walk(f, value, name):
            for v in bicep.expand(f, value):
                if isinstance(v, dict):
                    for k, item in v.items():
                        if k == "query":
                            for q in bicep.expand(f, item):
                                if isinstance(q, bicep_tree.Interp):
                                    q = "".join(p if isinstance(p, str) else "${}" for p in q.parts)
                                if isinstance(q, str):
                                    out.append((name, q))
                        else:
                            walk(f, item, name)
                elif isinstance(v, list):
                    for item in v:
                        walk(f, item, name)

        for f, r in bicep.resources("Microsoft.Insights/scheduledQueryRules"):
            walk(f, r.body, r.symbol)
        return out

    def alerts_read_metrics(self) -> str:
        queries = self.alert_queries()
        if not queries:
            raise CheckError("no scheduledQueryRules query found")
        problems = []
        for name, q in queries:
            tables = set(re.findall(r"\b(" + "|".join(self.SPAN_TABLES) + r")\b", q))
            if tables:
                problems.append(f"{name} reads {', '.join(sorted(tables))} (spans, sampled): {q}")
        if problems:
            raise CheckError("; ".join(problems))
        return ", ".join(sorted({n for n, _ in queries}))

    # ------------------------------------------------------------ 4. bicep references

    def module_target(self, path: Path, module) -> Path | None:
        if re.match(r"^(br|ts)[:/]", module.path):
            return None  # registry or template spec reference, not a file
        return (path.parent / module.path).resolve()

    def bicep_modules_exist(self) -> str:
        bicep = self.need_bicep()
        count, problems = 0, []
        for path, f in bicep.files.items():
            for module in f.modules:
                target = self.module_target(path, module)
                if target is None:
                    continue
                count += 1
                if not target.is_file():
                    problems.append(f"{self.rel(path)}: module '{module.path}' does not exist")
        if problems:
            raise CheckError("; ".join(problems))
        if not count:
            raise CheckError("no local modules referenced from bicep/")
        return f"{count} module references"

    def bicep_module_params(self) -> str:
        """Each module is given only parameters it declares, and all it requires."""
        bicep = self.need_bicep()
        by_path = {path.resolve(): f for path, f in bicep.files.items()}
        problems, count = [], 0
        for path, f in bicep.files.items():
            for module in f.modules:
                target = self.module_target(path, module)
                if target is None or target not in by_path:
                    continue
                count += 1
                declared = by_path[target].params
                given = module.body.get("params") if isinstance(module.body.get("params"), dict) else {}
                unknown = sorted(set(given) - set(declared))
                missing = sorted(n for n, p in declared.items() if not p.has_default and n not in given)
                where = f"{self.rel(path)}:{module.line} module {module.symbol}"
                if unknown:
                    problems.append(f"{where} passes undeclared {', '.join(unknown)}")
                if missing:
                    problems.append(f"{where} leaves required {', '.join(missing)} unset")
        if problems:
            raise CheckError("; ".join(problems))
        return f"{count} module calls"

    def bicep_names_resolve(self) -> str:
        """Every identifier names a parameter, variable, resource, module or loop
        variable of its file, and every parameter and variable is used."""
        bicep = self.need_bicep()
        problems, count = [], 0
        for path, f in bicep.files.items():
            symbols = f.symbols()
            used: set[str] = set()
            values = [p.default for p in f.params.values() if p.has_default]
            values += list(f.variables.values()) + list(f.outputs.values())
            for r in f.resources:
                values += [r.body, r.condition]
                if r.parent_symbol:
                    used.add(r.parent_symbol)
            for m in f.modules:
                values += [m.body, m.condition]
            for value in values:
                refs = bicep_tree.references(value)
                used |= refs
                count += len(refs)
                for name in sorted(refs - symbols):
                    problems.append(f"{self.rel(path)}: {name!r} is not defined")
            for name in sorted((set(f.params) | set(f.variables)) - used):
                problems.append(f"{self.rel(path)}: {name!r} is declared but never used")
        if problems:
            raise CheckError("; ".join(sorted(set(problems))))
        return f"{count} references"

    def bicep_members_resolve(self) -> str:
        """`module.outputs.x` names an output of that module; `resource.a.b`
        names a property of the resource's schema (read-only ones included)."""
        bicep = self.need_bicep()
        by_path = {path.resolve(): f for path, f in bicep.files.items()}
        problems, count = [], 0
        for path, f in bicep.files.items():
            values = list(f.variables.values()) + list(f.outputs.values())
            values += [r.body for r in f.resources] + [m.body for m in f.modules]
            for value in values:
                for chain in bicep_tree.access_paths(value):
                    head, members = chain[0], chain[1:]
                    module = f.module(head)
                    resource = f.resource(head)
                    if module is not None and members[:1] == ["outputs"] and len(members) > 1:
                        target = self.module_target(path, module)
                        if target in by_path:
                            count += 1
                            if members[1] not in by_path[target].outputs:
                                problems.append(
                                    f"{self.rel(path)}: module {head} has no output {members[1]!r}"
                                )
                    elif resource is not None and members:
                        # `logs.listKeys().x` reads a function's result, not the resource.
                        if any(m.endswith("()") for m in members):
                            members = members[: next(i for i, m in enumerate(members) if m.endswith("()"))]
                        if not members:
                            continue
                        try:
                            schema = arm_schema.resource_schema(
                                resource.type, resource.api_version, read=True
                            )
                        except arm_schema.SchemaUnavailable:
                            continue  # reported by the schema checks
                        count += 1
                        why = arm_schema.member_path_exists(schema, members)
                        if why:
                            problems.append(f"{self.rel(path)}: {head}.{'.'.join(members)}: {why}")
        if problems:
            raise CheckError("; ".join(sorted(set(problems))))
        return f"{count} member accesses"

    def bicep_api_versions(self) -> str:
        bicep = self.need_bicep()
        problems, pairs = [], set()
        for path, f in bicep.files.items():
            for r in f.resources:
                pairs.add((r.type, r.api_version))
                try:
                    arm_schema.resource_schema(r.type, r.api_version)
                except arm_schema.SchemaUnavailable as e:
                    problems.append(f"{self.rel(path)}:{r.line} {r.type}@{r.api_version}: {e}")
        if problems:
            raise CheckError("; ".join(sorted(set(problems))))
        return f"{len(pairs)} type/api-version pairs"

    def bicep_schema(self) -> str:
        bicep = self.need_bicep()
        problems, checked, opaque, resources = [], 0, 0, 0
        for path, f in bicep.files.items():
            for r in f.resources:
                where = f"{self.rel(path)}:{r.line} {r.symbol}"
                if "name" not in r.body:
                    problems.append(f"{where}: no name")
                if r.existing:
                    extra = sorted(set(r.body) - {"name", "scope", "parent"})
                    if extra:
                        problems.append(
                            f"{where}: an existing resource takes only name, scope, parent, not {extra}"
                        )
                    continue
                try:
                    schema = bicep.schema_of(r)
                except arm_schema.SchemaUnavailable:
                    continue  # reported by the api-version check
                resources += 1
                validator = arm_schema.Validator(lambda v, f=f: bicep.expand(f, v))
                body = {
                    k: v for k, v in r.body.items() if k not in arm_schema.BICEP_ONLY_KEYS and k != "name"
                }
                validator.check(body, schema, where)
                checked += validator.checked_properties
                opaque += validator.opaque
                problems += [f"{x.path}: {x.message}" for x in validator.findings]
        if problems:
            raise CheckError("; ".join(problems))
        return f"{resources} resources, {checked} properties checked, {opaque} computed values not checked"

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
            for m in re.finditer(
                r"^\s*param\s+(\w+)\s+([^\n]*)$", strip_bicep_comments(target.read_text()), re.M
            ):
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


def load_env_names(path: Path, what: str = "--env-names", allow_empty: bool = False) -> set[str]:
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        usage_error(f"cannot read {what} file: {e}")
    names = {line.split("#", 1)[0].strip() for line in lines}
    names.discard("")
    bad = sorted(n for n in names if not re.fullmatch(r"RTPD_[A-Z0-9_]+", n))
    if bad:
        usage_error(f"{path} is not a list of RTPD_* names, one per line (e.g. {bad[0]!r})")
    if not names and not allow_empty:
        usage_error(f"{path} names no variables")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-names", required=True, type=Path, help="output of `rtpd config --env-names`")
    parser.add_argument(
        "--pending-env-names",
        type=Path,
        default=PENDING_ENV_NAMES,
        help="RTPD_* names set before rtpd reads them (default: %(default)s)",
    )
    parser.add_argument(
        "--repo",
        type=Path,
        default=Path(__file__).resolve().parents[2],
        help="repository root to check (default: this script's repository)",
    )
    args = parser.parse_args(argv)
    if not args.repo.is_dir():
        parser.error(f"--repo {args.repo} is not a directory")

    pending = load_env_names(args.pending_env_names, "--pending-env-names", allow_empty=True)
    c = Checker(args.repo, load_env_names(args.env_names), pending)
    print(
        f"checking {args.repo.resolve()} against {len(c.env_names)} variable names"
        + (
            f" (+{len(c.pending_names)} pending: {', '.join(sorted(c.pending_names))})"
            if c.pending_names
            else ""
        )
    )

    c.run("compose: docker-compose.yml parses", c.compose_parses)
    c.run("compose: depends_on targets exist and are health-gated", c.compose_depends_on)
    c.run("compose: named volumes are declared", c.compose_volumes)
    c.run("compose: env files, bind mounts and configs exist", c.compose_files)
    c.run("compose: Dockerfile exists", c.compose_build)
    c.run("compose: every image is pinned to a version", c.compose_images_pinned)

    c.run("bicep: every file parses", c.bicep_parses)

    c.run("env: compose sets only variables rtpd reads", c.compose_env_known)
    c.run("env: compose api/processor set the required variables", c.compose_env_required)
    c.run("env: Bicep sets only variables rtpd reads", c.bicep_env_known)
    c.run("env: Bicep container apps set the required variables", c.bicep_env_required)
    c.run("env: Bicep secret files are mounted Key Vault secrets", c.bicep_secret_files)
    c.run("env: Bicep rtpd apps have startup, liveness and readiness probes", c.bicep_probes)

    c.run("queue: emulator config is valid for the emulator", c.emulator_config_valid)
    c.run("queue: one queue name in emulator, compose and Bicep", c.queue_name_agrees)
    c.run("queue: emulator and Bicep agree on delivery and lock settings", c.queue_properties_agree)

    c.run("bicep: module files exist", c.bicep_modules_exist)
    c.run("bicep: modules get exactly their parameters", c.bicep_module_params)
    c.run("bicep: every name is defined and every parameter/variable used", c.bicep_names_resolve)
    c.run("bicep: module outputs and resource properties referenced exist", c.bicep_members_resolve)
    c.run("bicep: parameter files' using targets exist", c.param_files_using)
    c.run("bicep: parameter files match main.bicep's parameters", c.param_files_match)

    c.run("telemetry: alert rules read metrics, not sampled spans", c.alerts_read_metrics)

    c.run("schema: every resource type/api-version has a published schema", c.bicep_api_versions)
    c.run("schema: resource bodies match their schema", c.bicep_schema)

    print(f"{c.passed} passed, {c.failed} failed")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
