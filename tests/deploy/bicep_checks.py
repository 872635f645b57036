"""The Bicep half of check_deploy.py: every .bicep file under bicep/, parsed.

    BicepProject.load(root)   parse every file (bicep_tree)
    .expand(file, value)      the concrete values an expression may stand for
    .resolve(value)           a single literal value, or CheckError
    .rtpd_containers()        the rtpd containers of the container apps
    .env_entries(container)   the env entries a container may get

Checks that raise CheckError live in check_deploy.Checker; this module only
models the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import arm_schema
import bicep_tree
from bicep_tree import BicepFile, Expr, Interp, Loop, Ref, Resource

# rtpd subcommands a container app runs; the first `args` entry tells an rtpd
# container from another image's (the metrics collector).
RTPD_COMMANDS = {"api", "processor", "serve"}


class BicepError(Exception):
    pass


@dataclass
class Container:
    file: BicepFile
    resource: Resource
    body: dict  # the container object
    template: dict  # properties.template
    configuration: dict  # properties.configuration

    @property
    def label(self) -> str:
        return f"{self.resource.symbol}/{self.command}"

    @property
    def command(self) -> str:
        args = self.body.get("args")
        return args[0] if isinstance(args, list) and args and isinstance(args[0], str) else "?"


@dataclass
class EnvEntry:
    name: str
    kind: str  # value | secretRef | missing
    value: Any
    file: BicepFile


class BicepProject:
    def __init__(self, root: Path, files: dict[Path, BicepFile]):
        self.root = root
        self.files = files

    @classmethod
    def load(cls, root: Path) -> BicepProject:
        files = {}
        for path in sorted(root.rglob("*.bicep")):
            try:
                files[path] = bicep_tree.parse_file(path)
            except bicep_tree.BicepSyntaxError as e:
                raise BicepError(str(e)) from e
        return cls(root, files)

    # ------------------------------------------------------------ values

    def expand(self, f: BicepFile, value: Any, depth: int = 0) -> list[Any]:
        """Concrete values `value` may stand for: variables are followed,
        concat() joins arrays, both branches of a conditional count. What
        cannot be seen through (a parameter, a function result) is returned
        as is, and the schema validator counts it as unchecked."""
        if depth > 30:
            return [value]
        if isinstance(value, Ref):
            if value.name in f.variables:
                return self.expand(f, f.variables[value.name], depth + 1)
            return [value]
        if isinstance(value, Expr):
            if value.kind == "concat":
                items: list[Any] = []
                for arg in value.args:
                    for candidate in self.expand(f, arg, depth + 1):
                        if not isinstance(candidate, list):
                            return [value]
                        items.extend(candidate)
                return [items]
            if value.kind == "conditional":
                return self.expand(f, value.args[1], depth + 1) + self.expand(f, value.args[2], depth + 1)
            # The grammar nests `a == b ? x : y` as `a == (b ? x : y)`.
            if value.kind in ("equals", "not_equals", "and_op", "or_op", "not_op"):
                for arg in value.args:
                    if isinstance(arg, Expr) and arg.kind == "conditional":
                        return self.expand(f, arg.args[1], depth + 1) + self.expand(f, arg.args[2], depth + 1)
        return [value]

    def resolve(self, value: Any, depth: int = 0) -> str | int | bool:
        """One literal: strings, numbers, booleans, interpolations and string()
        of those, and parameters/variables whose default is one (searched in
        every file; conflicting defaults are an error)."""
        if depth > 12:
            raise BicepError("cannot resolve: too deeply nested")
        if isinstance(value, (str, int, bool)):
            return value
        if isinstance(value, Interp):
            return "".join(
                p if isinstance(p, str) else _as_text(self.resolve(p, depth + 1)) for p in value.parts
            )
        if isinstance(value, Expr) and value.kind == "string" and len(value.args) == 1:
            return _as_text(self.resolve(value.args[0], depth + 1))
        if isinstance(value, Ref):
            candidates = set()
            for f in self.files.values():
                sources = []
                if value.name in f.variables:
                    sources.append(f.variables[value.name])
                param = f.params.get(value.name)
                if param is not None and param.has_default:
                    sources.append(param.default)
                for source in sources:
                    try:
                        candidates.add(self.resolve(source, depth + 1))
                    except BicepError:
                        continue
            if len(candidates) == 1:
                return candidates.pop()
            if candidates:
                raise BicepError(f"{value.name} has conflicting defaults {sorted(map(str, candidates))}")
            raise BicepError(
                f"cannot resolve {value.name!r} statically: give it a literal default (param or var) in one Bicep file"
            )
        raise BicepError(f"cannot resolve {value!r} statically")

    def allowed_values(self, name: str) -> set[str]:
        """@allowed values of a parameter, across files (empty: unconstrained)."""
        out: set[str] = set()
        for f in self.files.values():
            param = f.params.get(name)
            if param is not None and isinstance(param.decorators.get("allowed"), list):
                out |= {v for v in param.decorators["allowed"] if isinstance(v, str)}
        return out

    # ------------------------------------------------------------ resources

    def resources(self, type_name: str) -> list[tuple[BicepFile, Resource]]:
        return [(f, r) for f in self.files.values() for r in f.resources if r.type == type_name]

    def containers(self) -> list[Container]:
        out = []
        for f, r in self.resources("Microsoft.App/containerApps"):
            props = r.body.get("properties")
            if not isinstance(props, dict):
                continue
            template = props.get("template") if isinstance(props.get("template"), dict) else {}
            configuration = props.get("configuration") if isinstance(props.get("configuration"), dict) else {}
            for containers in self.expand(f, template.get("containers")):
                if isinstance(containers, list):
                    for c in containers:
                        for body in self.expand(f, c):
                            if isinstance(body, dict):
                                out.append(Container(f, r, body, template, configuration))
        return out

    def rtpd_containers(self) -> list[Container]:
        return [c for c in self.containers() if c.command in RTPD_COMMANDS]

    def env_entries(self, container: Container) -> list[EnvEntry]:
        entries = []
        for env in self.expand(container.file, container.body.get("env")):
            if not isinstance(env, list):
                raise BicepError(f"{container.label}: env is not an array the checks can follow ({env!r})")
            for item in env:
                for obj in self.expand(container.file, item):
                    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                        raise BicepError(f"{container.label}: env entry without a literal name ({obj!r})")
                    if "value" in obj:
                        entries.append(EnvEntry(obj["name"], "value", obj["value"], container.file))
                    elif "secretRef" in obj:
                        entries.append(EnvEntry(obj["name"], "secretRef", obj["secretRef"], container.file))
                    else:
                        entries.append(EnvEntry(obj["name"], "missing", None, container.file))
        return entries

    def objects(self, f: BicepFile, value: Any) -> list[dict]:
        """Objects a value (an array of objects, or variables of them) may hold."""
        out = []
        for candidate in self.expand(f, value):
            if isinstance(candidate, list):
                for item in candidate:
                    out += [o for o in self.expand(f, item) if isinstance(o, dict)]
            elif isinstance(candidate, Loop) and isinstance(candidate.body, dict):
                out.append(candidate.body)
        return out

    def schema_of(self, resource: Resource) -> arm_schema.Schema:
        return arm_schema.resource_schema(resource.type, resource.api_version)


def _as_text(value: str | int | bool) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
