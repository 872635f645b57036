"""Bicep files as Python values, for the deployment checks.

pycep-parser (a Lark grammar of Bicep) does the parsing; this module turns its
parse tree into plain values the checks can walk:

    object -> dict, array -> list, 'text' -> str, 'a${b}' -> Interp,
    1 -> int, true/false -> bool, null -> None, an identifier -> Ref,
    a function call, operator or accessor -> Expr, [for ...] -> Loop.

pycep's own JSON output cannot tell the string 'x' from the identifier x, and
its operator precedence is loose (`a.?b ?? c` nests as `a.(b ?? c)`), so the
checks here never rely on an expression's evaluation order: they collect the
names an expression refers to and the values it may produce.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from lark import Token, Tree
from pycep import BicepParser


class BicepSyntaxError(Exception):
    pass


@dataclass(frozen=True)
class Ref:
    """An identifier: a parameter, variable, resource, module or loop variable."""

    name: str


@dataclass
class Interp:
    """An interpolated string: literal text and ${...} expressions."""

    parts: list[Any]  # str | value


@dataclass
class Expr:
    """Anything computed: kind is the grammar rule (function name for calls)."""

    kind: str
    args: list[Any]


@dataclass
class Loop:
    """[for var in source: body]: body is one element of the resulting array."""

    variables: list[str]
    source: Any
    condition: Any
    body: Any


@dataclass
class Param:
    name: str
    type: str
    default: Any  # None when absent; a value otherwise (NO_DEFAULT sentinel not needed)
    has_default: bool
    decorators: dict[str, Any]
    line: int


@dataclass
class Resource:
    symbol: str
    type: str
    api_version: str
    existing: bool
    condition: Any
    loop: bool
    body: dict
    line: int
    parent_symbol: str | None = None  # for nested child resources


@dataclass
class Module:
    symbol: str
    path: str
    condition: Any
    body: dict
    line: int


@dataclass
class BicepFile:
    path: Path
    params: dict[str, Param] = field(default_factory=dict)
    variables: dict[str, Any] = field(default_factory=dict)
    resources: list[Resource] = field(default_factory=list)
    modules: list[Module] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    output_lines: dict[str, int] = field(default_factory=dict)
    variable_lines: dict[str, int] = field(default_factory=dict)

    def symbols(self) -> set[str]:
        return (
            set(self.params)
            | set(self.variables)
            | {r.symbol for r in self.resources}
            | {m.symbol for m in self.modules}
        )

    def resource(self, symbol: str) -> Resource | None:
        return next((r for r in self.resources if r.symbol == symbol), None)

    def module(self, symbol: str) -> Module | None:
        return next((m for m in self.modules if m.symbol == symbol), None)


_PARSER: BicepParser | None = None


def _parser() -> BicepParser:
    global _PARSER
    if _PARSER is None:
        _PARSER = BicepParser()
    return _PARSER


def _tree(text: str, where: str) -> Tree:
    try:
        return _parser()._create_tree(text=text, file_path=None)
    except Exception as e:  # lark raises several error types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BicepSyntaxError(f"{where}: {first}") from e


def _line(node: Tree) -> int:
    meta = getattr(node, "meta", None)
    return getattr(meta, "line", 0) if meta is not None and not getattr(meta, "empty", True) else 0


def _unquote(text: str) -> str:
    body = text[1:-1]
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m.group(1), m.group(1)), body)


def _split_interpolation(text: str) -> list[tuple[bool, str]]:
    """'a${b}c' (with quotes) -> [(False,'a'), (True,'b'), (False,'c')]; braces nest."""
    body = text[1:-1]
    out: list[tuple[bool, str]] = []
    i, literal = 0, []
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            literal.append(body[i : i + 2])
            i += 2
        elif body.startswith("${", i):
            if literal:
                out.append((False, _unquote("'" + "".join(literal) + "'")))
                literal = []
            depth, j = 1, i + 2
            while j < len(body) and depth:
                if body[j] == "{":
                    depth += 1
                elif body[j] == "}":
                    depth -= 1
                j += 1
            out.append((True, body[i + 2 : j - 1]))
            i = j
        else:
            literal.append(body[i])
            i += 1
    if literal:
        out.append((False, _unquote("'" + "".join(literal) + "'")))
    return out


@lru_cache(maxsize=4096)
def parse_expression(text: str) -> Any:
    tree = _tree(f"var __expression__ = {text}\n", f"expression {text!r}")
    var = tree.children[0]
    return _value(var.children[3])


def _string(token: Token) -> Any:
    text = str(token)
    if not text.startswith("'"):
        return Ref(text)
    if "${" not in text:
        return _unquote(text)
    parts = [parse_expression(t) if is_expr else t for is_expr, t in _split_interpolation(text)]
    return Interp(parts)


def _value(node: Any) -> Any:
    if isinstance(node, Token):
        if node.type in ("STRING", "QUOTED_INTERPOLATION", "QUOTED_STRING"):
            return _string(node)
        if node.type == "INT":
            return int(node)
        return str(node)
    if node is None:
        return None
    kind = node.data
    kids = node.children
    if kind == "string":
        return _string(kids[0])
    if kind == "multi_line_string":
        return str(kids[0])[3:-3]
    if kind == "int_type":
        return int(kids[0])
    if kind == "true":
        return True
    if kind == "false":
        return False
    if kind == "null":
        return None
    if kind == "object":
        obj: dict[str, Any] = {}
        for pair in kids:
            if isinstance(pair, Tree) and pair.data == "pair":
                key_node, value_node = pair.children[0], pair.children[1]
                key = key_node.children[0]
                key_text = str(key)
                obj[_unquote(key_text) if key_text.startswith("'") else key_text] = _value(value_node)
        return obj
    if kind == "array":
        return [_value(k) for k in kids if isinstance(k, (Tree, Token)) and not _is_newline(k)]
    if kind == "loop":
        head = kids[0]
        if head.data == "loop_array":
            variables, source = [str(head.children[0])], _value(head.children[1])
        elif head.data == "loop_array_index":
            variables, source = [str(head.children[0]), str(head.children[1])], _value(head.children[2])
        else:
            variables, source = [str(head.children[0])], _value(head.children[1])
        return Loop(variables, source, _value(kids[1]), _value(kids[2]))
    if kind == "function":
        name = str(kids[0]).rstrip("(").strip()
        return Expr(name, [_value(k) for k in kids[1:] if k is not None])
    if kind == "operator":
        return _value(kids[0])
    if kind == "deploy_condition":
        return Expr("if", [_value(kids[0]), _value(kids[1])])
    if kind == "lambda_expression":
        return Expr("lambda", [_value(k) for k in kids])
    if kind == "function_accessor":
        return Expr(
            "function_accessor",
            [_value(kids[0]), str(kids[1])] + [_value(k) for k in kids[2:] if k is not None],
        )
    return Expr(kind, [_value(k) for k in kids if k is not None])


def _is_newline(node: Any) -> bool:
    return isinstance(node, Token) and node.type.endswith("NEWLINE")


def _decorators(node: Tree | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if node is None:
        return out
    for decorator in node.children:
        name = str(decorator.children[0]).removeprefix("sys.")
        arg = decorator.children[1] if len(decorator.children) > 1 else None
        out[name] = _value(arg) if arg is not None else True
    return out


def _type_text(node: Tree) -> str:
    return " ".join(str(t) for t in node.scan_values(lambda v: isinstance(v, Token)))


def _resource_parts(value: Any) -> tuple[Any, bool, dict]:
    """(condition, is_loop, body) of a resource or module value."""
    if isinstance(value, Expr) and value.kind == "if":
        return value.args[0], False, value.args[1] if isinstance(value.args[1], dict) else {}
    if isinstance(value, Loop):
        body = value.body
        if isinstance(body, Expr) and body.kind == "if":
            body = body.args[1]
        return value.condition, True, body if isinstance(body, dict) else {}
    return None, False, value if isinstance(value, dict) else {}


def _child_resources(
    tree_value: Tree, parent: Resource, parent_type: str, parent_api: str, out: list[Resource]
) -> None:
    """Nested `resource x 'secrets' = {...}` declarations inside a resource body."""
    for node in tree_value.iter_subtrees_topdown():
        if node.data != "child_resource":
            continue
        symbol = str(node.children[0])
        type_text = _unquote(str(node.children[1]))
        if "@" in type_text:
            full_type, api = type_text.split("@", 1)
        else:
            full_type, api = f"{parent_type}/{type_text}", parent_api
        existing = any(isinstance(c, Token) and c.type == "EXISTING" for c in node.children)
        condition, is_loop, body = _resource_parts(_value(node.children[-1]))
        out.append(
            Resource(symbol, full_type, api, existing, condition, is_loop, body, _line(node), parent.symbol)
        )


def parse_file(path: Path) -> BicepFile:
    tree = _tree(path.read_text(), str(path))
    f = BicepFile(path)
    for element in tree.children:
        if not isinstance(element, Tree):
            continue
        kind, kids = element.data, element.children
        if kind == "param":
            name, type_node = str(kids[1]), kids[2]
            default = kids[3] if len(kids) > 3 else None
            f.params[name] = Param(
                name,
                _type_text(type_node),
                _value(default) if default is not None else None,
                default is not None,
                _decorators(kids[0]),
                _line(element),
            )
        elif kind == "var":
            f.variables[str(kids[1])] = _value(kids[3])
            f.variable_lines[str(kids[1])] = _line(element)
        elif kind == "output":
            f.outputs[str(kids[1])] = _value(kids[3])
            f.output_lines[str(kids[1])] = _line(element)
        elif kind == "resource":
            symbol = str(kids[1])
            type_text = _unquote(str(kids[2].children[0]))
            rtype, _, api = type_text.partition("@")
            existing = any(isinstance(c, Token) and c.type == "EXISTING" for c in kids)
            condition, is_loop, body = _resource_parts(_value(kids[-1]))
            resource = Resource(symbol, rtype, api, existing, condition, is_loop, body, _line(element))
            f.resources.append(resource)
            _child_resources(kids[-1], resource, rtype, api, f.resources)
        elif kind == "module":
            symbol = str(kids[1])
            module_path = _unquote(str(kids[2].children[0]))
            condition, _is_loop, body = _resource_parts(_value(kids[-1]))
            f.modules.append(Module(symbol, module_path, condition, body, _line(element)))
    return f


# ---------------------------------------------------------------- walking values


def references(value: Any) -> set[str]:
    """Identifiers a value refers to (not member names after a dot, not keys)."""
    out: set[str] = set()
    _refs(value, out, set())
    return out


def _refs(value: Any, out: set[str], bound: set[str]) -> None:
    if isinstance(value, Ref):
        if value.name not in bound:
            out.add(value.name)
    elif isinstance(value, Interp):
        for part in value.parts:
            if not isinstance(part, str):
                _refs(part, out, bound)
    elif isinstance(value, dict):
        for v in value.values():
            _refs(v, out, bound)
    elif isinstance(value, list):
        for v in value:
            _refs(v, out, bound)
    elif isinstance(value, Loop):
        _refs(value.source, out, bound)
        inner = bound | set(value.variables)
        _refs(value.condition, out, inner)
        _refs(value.body, out, inner)
    elif isinstance(value, Expr):
        if value.kind == "property_accessor":
            _refs(value.args[0], out, bound)
            _refs_after_member(value.args[1], out, bound)
        elif value.kind == "function_accessor":
            _refs(value.args[0], out, bound)
            for a in value.args[2:]:
                _refs(a, out, bound)
        elif value.kind == "lambda":
            params = {a.name for a in value.args[:-1] if isinstance(a, Ref)}
            _refs(value.args[-1], out, bound | params)
        else:
            for a in value.args:
                _refs(a, out, bound)


def _refs_after_member(value: Any, out: set[str], bound: set[str]) -> None:
    """The right side of `x.member...`: its leftmost identifier is a member name."""
    if isinstance(value, Ref):
        return
    if isinstance(value, Expr) and value.args:
        _refs_after_member(value.args[0], out, bound)
        for a in value.args[1:]:
            if isinstance(a, str) and value.kind == "function_accessor":
                continue
            if value.kind == "property_accessor":
                _refs_after_member(a, out, bound)
            else:
                _refs(a, out, bound)
    else:
        _refs(value, out, bound)


def access_paths(value: Any) -> list[list[str]]:
    """Every `a.b.c` chain in a value, as ['a', 'b', 'c'] (`.?` included)."""
    found: list[list[str]] = []
    _paths(value, found)
    return found


def _chain(value: Any) -> list[str]:
    """Member names along the leftmost spine of the right side of an accessor."""
    if isinstance(value, Ref):
        return [value.name]
    if isinstance(value, Expr) and value.kind == "property_accessor":
        return _chain(value.args[0]) + _chain(value.args[1])
    if isinstance(value, Expr) and value.kind in ("coalesce", "index_accessor") and value.args:
        return _chain(value.args[0])
    if isinstance(value, Expr) and value.kind == "function_accessor":
        return _chain(value.args[0]) + [f"{value.args[1]}()"]
    return []


def _paths(value: Any, found: list[list[str]]) -> None:
    if isinstance(value, Expr) and value.kind == "property_accessor":
        chain = _chain(value)
        if len(chain) > 1:
            found.append(chain)
        # Accessors nested in other operands (e.g. the right side of `??`).
        for a in value.args:
            _paths_skip_spine(a, found)
        return
    if isinstance(value, Interp):
        for p in value.parts:
            if not isinstance(p, str):
                _paths(p, found)
    elif isinstance(value, dict):
        for v in value.values():
            _paths(v, found)
    elif isinstance(value, list):
        for v in value:
            _paths(v, found)
    elif isinstance(value, Loop):
        _paths(value.source, found)
        _paths(value.condition, found)
        _paths(value.body, found)
    elif isinstance(value, Expr):
        for a in value.args:
            _paths(a, found)


def _paths_skip_spine(value: Any, found: list[list[str]]) -> None:
    if isinstance(value, Expr):
        if value.kind == "property_accessor":
            for a in value.args:
                _paths_skip_spine(a, found)
        else:
            for i, a in enumerate(value.args):
                if i == 0 and value.kind in ("coalesce", "index_accessor"):
                    _paths_skip_spine(a, found)
                else:
                    _paths(a, found)
