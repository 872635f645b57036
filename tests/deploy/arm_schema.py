"""Published ARM schemas of the resource types the Bicep files use.

Microsoft's Python management SDKs (azure-mgmt-*) are generated from the same
REST API specifications ARM validates deployments against, one model class per
request body, per API version:

* older ("msrest") packages keep one subpackage per API version
  (azure.mgmt.monitor.v2018_03_01, ...) whose models carry `_attribute_map`
  (property name -> wire key, flattened as `properties.x`, and type) and
  `_validation` (required, readonly);
* newer (TypeSpec) packages target one API version (the client's default
  api_version) and describe each property with `rest_field(name=...,
  visibility=[...])` plus a type annotation (Optional[...] when not required).

This module turns either kind into one Schema tree and checks a Bicep value
against it: unknown property names, read-only properties that are set,
required properties that are missing, enum values and primitive types. It
never imports a client or talks to Azure.
"""

from __future__ import annotations

import enum
import importlib
import pkgutil
import re
import sys
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

# Resource type -> (azure.mgmt.<package>, request-body model class). The class
# is the PUT body: for most types the resource model, for a few a dedicated
# "create parameters" model.
RESOURCE_MODELS: dict[str, tuple[str, str]] = {
    "Microsoft.App/containerApps": ("appcontainers", "ContainerApp"),
    "Microsoft.App/managedEnvironments": ("appcontainers", "ManagedEnvironment"),
    "Microsoft.Authorization/roleAssignments": ("authorization", "RoleAssignmentCreateParameters"),
    "Microsoft.Cache/redisEnterprise": ("redisenterprise", "Cluster"),
    "Microsoft.Cache/redisEnterprise/databases": ("redisenterprise", "Database"),
    "Microsoft.Cache/redisEnterprise/databases/accessPolicyAssignments": (
        "redisenterprise",
        "AccessPolicyAssignment",
    ),
    "Microsoft.ContainerRegistry/registries": ("containerregistry", "Registry"),
    "Microsoft.DBforPostgreSQL/flexibleServers": ("postgresqlflexibleservers", "Server"),
    "Microsoft.DBforPostgreSQL/flexibleServers/administrators": (
        "postgresqlflexibleservers",
        "AdministratorMicrosoftEntraAdd",
    ),
    "Microsoft.DBforPostgreSQL/flexibleServers/databases": ("postgresqlflexibleservers", "Database"),
    "Microsoft.DBforPostgreSQL/flexibleServers/firewallRules": ("postgresqlflexibleservers", "FirewallRule"),
    "Microsoft.Insights/components": ("applicationinsights", "ApplicationInsightsComponent"),
    "Microsoft.Insights/diagnosticSettings": ("monitor", "DiagnosticSettingsResource"),
    "Microsoft.Insights/metricAlerts": ("monitor", "MetricAlertResource"),
    "Microsoft.Insights/scheduledQueryRules": ("monitor", "ScheduledQueryRuleResource"),
    "Microsoft.Insights/workbooks": ("applicationinsights", "Workbook"),
    "Microsoft.KeyVault/vaults": ("keyvault", "VaultCreateOrUpdateParameters"),
    "Microsoft.KeyVault/vaults/secrets": ("keyvault", "SecretCreateOrUpdateParameters"),
    "Microsoft.ManagedIdentity/userAssignedIdentities": ("msi", "Identity"),
    "Microsoft.OperationalInsights/workspaces": ("loganalytics", "Workspace"),
    "Microsoft.ServiceBus/namespaces": ("servicebus", "SBNamespace"),
    "Microsoft.ServiceBus/namespaces/queues": ("servicebus", "SBQueue"),
    "Microsoft.Storage/storageAccounts": ("storage", "StorageAccountCreateParameters"),
    "Microsoft.Storage/storageAccounts/blobServices": ("storage", "BlobServiceProperties"),
    "Microsoft.Storage/storageAccounts/blobServices/containers": ("storage", "BlobContainer"),
    "Microsoft.Storage/storageAccounts/blobServices/containers/immutabilityPolicies": (
        "storage",
        "ImmutabilityPolicy",
    ),
}

# Where the PUT body is a separate model, what a GET returns (what
# `resource.properties.x` reads in Bicep).
READ_MODELS: dict[str, str] = {
    "Microsoft.Authorization/roleAssignments": "RoleAssignment",
    "Microsoft.KeyVault/vaults": "Vault",
    "Microsoft.KeyVault/vaults/secrets": "Secret",
    "Microsoft.Storage/storageAccounts": "StorageAccount",
    "Microsoft.DBforPostgreSQL/flexibleServers/administrators": "AdministratorMicrosoftEntra",
}

# Every resource symbol has these, whatever its schema says.
SYMBOL_MEMBERS = {"id", "name", "type", "apiVersion"}

# Keys of a Bicep resource body that are Bicep's, not the resource's.
BICEP_ONLY_KEYS = {"parent", "scope", "dependsOn"}


class SchemaUnavailable(Exception):
    """No installed package describes this type at this API version."""


@dataclass
class Prop:
    schema: Schema
    required: bool = False
    readonly: bool = False


@dataclass
class Schema:
    """kind: object | array | map | string | int | number | bool | any."""

    kind: str
    name: str = ""
    props: dict[str, Prop] = field(default_factory=dict)
    item: Schema | None = None
    enum: tuple[str, ...] = ()
    open: bool = False  # object taking any additional property
    discriminator: str | None = None  # wire name of the discriminator property
    variants: dict[str, Schema] = field(default_factory=dict)
    resolved: bool = True


ANY = Schema("any")


def _version_module(api_version: str) -> str:
    return "v" + api_version.replace("-", "_")


def _package(package: str):
    try:
        return importlib.import_module(f"azure.mgmt.{package}")
    except ImportError as e:
        raise SchemaUnavailable(f"azure-mgmt-{package} is not installed ({e})") from e


def _default_api_version(package: str) -> str | None:
    try:
        config = importlib.import_module(f"azure.mgmt.{package}._configuration")
    except ImportError:
        return None
    source = open(config.__file__, encoding="utf-8").read()
    m = re.search(r'kwargs\.pop\("api_version", "([^"]+)"\)', source)
    return m.group(1) if m else None


@lru_cache(maxsize=None)
def api_versions(package: str) -> tuple[str, ...]:
    """API versions the installed azure-mgmt-<package> has models for."""
    pkg = _package(package)
    versions = []
    for info in pkgutil.iter_modules(pkg.__path__):
        m = re.fullmatch(r"v(\d{4})_(\d{2})_(\d{2})(_preview)?", info.name)
        if m:
            versions.append(f"{m.group(1)}-{m.group(2)}-{m.group(3)}" + ("-preview" if m.group(4) else ""))
    if not versions:
        default = _default_api_version(package)
        if default:
            versions.append(default)
    return tuple(sorted(versions))


def models_module(package: str, api_version: str):
    if api_version not in api_versions(package):
        raise SchemaUnavailable(
            f"azure-mgmt-{package} has no models for api-version {api_version} "
            f"(it has {', '.join(api_versions(package)) or 'none'})"
        )
    subpackage = f"azure.mgmt.{package}.{_version_module(api_version)}"
    try:
        return importlib.import_module(f"{subpackage}.models")
    except ImportError:
        return importlib.import_module(f"azure.mgmt.{package}.models")


def resource_schema(resource_type: str, api_version: str, read: bool = False) -> Schema:
    """The request body's schema, or with read=True the response's."""
    if resource_type not in RESOURCE_MODELS:
        raise SchemaUnavailable(f"no model is mapped for {resource_type} (arm_schema.RESOURCE_MODELS)")
    package, class_name = RESOURCE_MODELS[resource_type]
    if read:
        class_name = READ_MODELS.get(resource_type, class_name)
    module = models_module(package, api_version)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise SchemaUnavailable(f"{module.__name__} has no {class_name}")
    return _Builder(module).model(cls)


# ---------------------------------------------------------------- building schemas


class _Builder:
    def __init__(self, module):
        self.module = module
        self.cache: dict[type, Schema] = {}

    def model(self, cls: type) -> Schema:
        if cls in self.cache:
            return self.cache[cls]
        schema = Schema("object", name=cls.__name__, resolved=False)
        self.cache[cls] = schema  # recursion-safe: filled in below
        if hasattr(cls, "_attribute_map"):
            self._msrest(cls, schema)
        else:
            self._typespec(cls, schema)
        schema.resolved = True
        return schema

    # msrest models: _attribute_map {attr: {key, type}}, _validation {attr: {required, readonly}}
    def _msrest(self, cls: type, schema: Schema) -> None:
        validation = getattr(cls, "_validation", {}) or {}
        for attr, spec in cls._attribute_map.items():
            key, type_text = spec["key"], spec["type"]
            if key == "":
                schema.open = True  # additional_properties
                continue
            rules = validation.get(attr, {})
            parts = [p.replace("\\.", ".") for p in re.split(r"(?<!\\)\.", key)]
            target = schema
            for part in parts[:-1]:
                if part not in target.props:
                    target.props[part] = Prop(Schema("object", name=f"{target.name}.{part}"))
                target = target.props[part].schema
            target.props[parts[-1]] = Prop(
                self._msrest_type(type_text, cls, attr),
                required=bool(rules.get("required")) and not rules.get("readonly"),
                readonly=bool(rules.get("readonly")),
            )
        # A subclass inherits its base's _subtype_map: only the base chooses.
        subtypes = cls.__dict__.get("_subtype_map")
        if subtypes and len(subtypes) == 1:
            ((attr, mapping),) = subtypes.items()
            schema.discriminator = cls._attribute_map[attr]["key"].replace("\\.", ".")
            for value, sub_name in mapping.items():
                sub = getattr(self.module, sub_name, None)
                if sub is not None:
                    schema.variants[value] = schema if sub is cls else self.model(sub)
        elif getattr(cls, "_subtype_map", None):
            # A variant: its own tag value is the one that chose it.
            attr = next(iter(cls._subtype_map))
            schema.discriminator = cls._attribute_map[attr]["key"].replace("\\.", ".")

    def _msrest_type(self, text: str, cls: type, attr: str) -> Schema:
        if text.startswith("[") and text.endswith("]"):
            return Schema("array", item=self._msrest_type(text[1:-1], cls, attr))
        if text.startswith("{") and text.endswith("}"):
            return Schema("map", item=self._msrest_type(text[1:-1], cls, attr))
        primitive = {
            "str": "string",
            "int": "int",
            "long": "int",
            "float": "number",
            "bool": "bool",
            "object": "any",
            "iso-8601": "string",
            "rfc-1123": "string",
            "duration": "string",
            "date": "string",
            "bytearray": "string",
            "base64": "string",
            "unix-time": "int",
        }
        if text in primitive:
            schema = Schema(primitive[text])
            if text == "str":
                schema.enum = self._msrest_enum(cls, attr)
            return schema
        model = getattr(self.module, text, None)
        if isinstance(model, type) and issubclass(model, enum.Enum):
            return Schema("string", enum=tuple(str(m.value) for m in model))
        if isinstance(model, type):
            return self.model(model)
        return ANY

    def _msrest_enum(self, cls: type, attr: str) -> tuple[str, ...]:
        """An enum shows only in the __init__ annotation: Union[str, "_models.Kind"]."""
        try:
            hints = typing.get_type_hints(
                cls.__init__, globalns=vars(sys.modules[cls.__module__]), localns={"_models": self.module}
            )
        except Exception:  # a forward reference this module cannot see
            return ()
        return _enum_values(hints.get(attr))

    # TypeSpec models: rest_field(name=..., visibility=[...]) + annotations
    def _typespec(self, cls: type, schema: Schema) -> None:
        cls.__new__(cls)  # the base class fills in _attr_to_rest_field on first construction
        hints = typing.get_type_hints(
            cls, globalns=vars(sys.modules[cls.__module__]), localns={"_models": self.module}
        )
        for attr, rest_field in cls._attr_to_rest_field.items():
            hint = hints.get(attr)
            visibility = rest_field._visibility or []
            readonly = bool(visibility) and set(visibility) <= {"read"}
            required = not _is_optional(hint) and not readonly
            prop = Prop(self._hint(hint), required=required, readonly=readonly)
            schema.props[rest_field._rest_name] = prop
            if getattr(rest_field, "_is_discriminator", False):
                schema.discriminator = rest_field._rest_name
        mapping = cls.__dict__.get("__mapping__")
        if schema.discriminator and mapping:
            for value, sub in mapping.items():
                schema.variants[value] = schema if sub is cls else self.model(sub)

    def _hint(self, hint: Any) -> Schema:
        if hint is None:
            return ANY
        origin = typing.get_origin(hint)
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if origin is typing.Union:
            values = _enum_values(hint)
            if values:
                return Schema("string", enum=values)
            if len(args) == 1:
                return self._hint(args[0])
            return ANY
        if origin in (list, typing.List):
            return Schema("array", item=self._hint(args[0]) if args else ANY)
        if origin in (dict, typing.Dict):
            return Schema("map", item=self._hint(args[1]) if len(args) == 2 else ANY)
        if isinstance(hint, type):
            if issubclass(hint, enum.Enum):
                return Schema("string", enum=tuple(str(m.value) for m in hint))
            if hint is str:
                return Schema("string")
            if hint is bool:
                return Schema("bool")
            if hint is int:
                return Schema("int")
            if hint is float:
                return Schema("number")
            if hasattr(hint, "_attr_to_rest_field") or hasattr(hint, "_attribute_map"):
                return self.model(hint)
            if hint.__module__.startswith("azure.mgmt.") and hint.__module__.endswith("_models"):
                return self.model(hint)
        return ANY


def _is_optional(hint: Any) -> bool:
    return hint is None or type(None) in typing.get_args(hint)


def _enum_values(hint: Any) -> tuple[str, ...]:
    for arg in typing.get_args(hint) or ():
        if isinstance(arg, type) and issubclass(arg, enum.Enum):
            return tuple(str(m.value) for m in arg)
    return ()


# ---------------------------------------------------------------- validating values


@dataclass
class Finding:
    path: str
    message: str


class Validator:
    """Checks a Bicep value (bicep_tree values) against a Schema.

    `expand(value)` returns the concrete values an expression may stand for
    (variables, concat, conditionals); an expression it cannot see through
    (a parameter, a function result) is skipped and counted in `opaque`.
    """

    def __init__(self, expand):
        self.expand = expand
        self.findings: list[Finding] = []
        self.checked_properties = 0
        self.opaque = 0

    def check(self, value: Any, schema: Schema, path: str) -> None:
        from bicep_tree import Expr, Interp, Loop, Ref

        if schema.kind == "any":
            return
        candidates = self.expand(value)
        if not candidates:
            self.opaque += 1
            return
        for candidate in candidates:
            if isinstance(candidate, (Ref, Expr)):
                self.opaque += 1
                continue
            if isinstance(candidate, Loop):
                self.check(candidate.body, schema.item if schema.kind == "array" else schema, f"{path}[for]")
                continue
            self._check_concrete(candidate, schema, path, Interp)

    def _check_concrete(self, value: Any, schema: Schema, path: str, Interp: type) -> None:
        kind = schema.kind
        if kind == "object":
            if not isinstance(value, dict):
                self.findings.append(
                    Finding(path, f"expected an object ({schema.name}), found {_describe(value)}")
                )
                return
            self._object(value, schema, path)
        elif kind == "array":
            if not isinstance(value, list):
                self.findings.append(Finding(path, f"expected an array, found {_describe(value)}"))
                return
            for i, item in enumerate(value):
                self.check(item, schema.item or ANY, f"{path}[{i}]")
        elif kind == "map":
            if not isinstance(value, dict):
                self.findings.append(Finding(path, f"expected an object (map), found {_describe(value)}"))
                return
            for key, item in value.items():
                self.check(item, schema.item or ANY, f"{path}.{key}")
        elif kind == "string":
            if isinstance(value, (bool, int, dict, list)) or value is None:
                self.findings.append(Finding(path, f"expected a string, found {_describe(value)}"))
            elif isinstance(value, str) and schema.enum and value not in schema.enum:
                near = [e for e in schema.enum if e.lower() == value.lower()]
                hint = f" (case: {near[0]!r})" if near else ""
                self.findings.append(Finding(path, f"{value!r} is not one of {list(schema.enum)}{hint}"))
        elif kind in ("int", "number"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                if not isinstance(value, Interp):
                    self.findings.append(Finding(path, f"expected a number, found {_describe(value)}"))
                else:
                    self.findings.append(Finding(path, "expected a number, found an interpolated string"))
        elif kind == "bool":
            if not isinstance(value, bool):
                self.findings.append(Finding(path, f"expected true/false, found {_describe(value)}"))

    def _object(self, value: dict, schema: Schema, path: str) -> None:
        if schema.discriminator and schema.variants:
            tag = value.get(schema.discriminator)
            if isinstance(tag, str):
                if tag in schema.variants:
                    schema = schema.variants[tag]
                else:
                    self.findings.append(
                        Finding(
                            f"{path}.{schema.discriminator}",
                            f"{tag!r} is not one of {sorted(schema.variants)}",
                        )
                    )
                    return
        for key, item in value.items():
            prop = schema.props.get(key)
            if prop is None:
                if schema.open:
                    continue
                near = [k for k in schema.props if k.lower() == key.lower()]
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                self.findings.append(
                    Finding(
                        f"{path}.{key}",
                        f"not a property of {schema.name}{hint}; known: {sorted(schema.props)}",
                    )
                )
                continue
            self.checked_properties += 1
            if prop.readonly:
                self.findings.append(
                    Finding(f"{path}.{key}", f"read-only in {schema.name}: ARM ignores or rejects it")
                )
                continue
            self.check(item, prop.schema, f"{path}.{key}")
        for key, prop in schema.props.items():
            if prop.required and key not in value:
                self.findings.append(Finding(f"{path}.{key}", f"required by {schema.name} but not set"))


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def member_path_exists(schema: Schema, members: list[str]) -> str | None:
    """None if `members` (e.g. ['properties', 'vaultUri']) names a property of
    the schema (read-only ones included); else what is wrong. Bicep matches
    member names without regard to case."""
    if members and members[0] in SYMBOL_MEMBERS:
        return None
    current = schema
    for i, member in enumerate(members):
        if current.kind in ("any", "map") or current.open:
            return None
        if current.kind != "object":
            return f"{'.'.join(members[:i])} is not an object"
        match = next((p for k, p in current.props.items() if k.lower() == member.lower()), None)
        if match is None:
            for variant in current.variants.values():
                match = next((p for k, p in variant.props.items() if k.lower() == member.lower()), None)
                if match:
                    break
        if match is None:
            return f"{schema.name} has no {'.'.join(members[: i + 1])}"
        current = match.schema
    return None
