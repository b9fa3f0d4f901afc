"""YAML in, typed `Policy` out; every failure is one line naming file:line, field path and the fix.

Line numbers come from YAML's node marks: the document is composed into a node
tree, each field path is mapped to the line of its key (or list item), and a
pydantic error's location is mapped back onto that table.

`extends:` merges a base policy under this one before validation: mappings merge
key by key (recursively); scalars AND lists in the child replace the base's
whole value (lists never merge). Cycles are errors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from worldlm_secure.errors import PolicyError
from worldlm_secure.policy.schema import FieldProblem, Policy

FieldPath = tuple[Union[str, int], ...]


_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: about 20x faster


class _Loader(_Base):
    """SafeLoader that reads YAML 1.2 floats (``1e-5``) as floats, not strings (PyYAML is YAML 1.1)."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


@dataclass
class Sourced:
    """A parsed document plus, for every field path, the (file, line) it was written at."""

    data: dict[str, Any]
    where: dict[FieldPath, tuple[str, int]] = field(default_factory=dict)


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_$*-]+$")


def dotted(path: FieldPath) -> str:
    """`("a", 0, "b")` -> `a.0.b`; keys that are not plain words are quoted (`a.'x y'`)."""
    return ".".join(str(p) if isinstance(p, int) or _PLAIN_KEY.match(str(p)) else repr(str(p)) for p in path)


def _fail(file: str, line: int | None, path: str, message: str) -> PolicyError:
    loc = f"{file}:{line}" if line else file
    text = f"{loc} {path}: {message}" if path else f"{loc}: {message}"
    return PolicyError(text.replace("\r", "\\r").replace("\n", "\\n"))  # always one line


def _tuples(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _index_lines(node: yaml.Node, file: str, prefix: FieldPath, out: dict[FieldPath, tuple[str, int]]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                raise _fail(file, key_node.start_mark.line + 1, dotted(prefix + (key,)),
                            "key appears twice; keep one")
            seen.add(key)
            out[prefix + (key,)] = (file, key_node.start_mark.line + 1)
            _index_lines(value_node, file, prefix + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            out[prefix + (i,)] = (file, item.start_mark.line + 1)
            _index_lines(item, file, prefix + (i,), out)


def parse_yaml(path: Path) -> Sourced:
    """Parse one YAML file into a mapping (lists as tuples) with a line for every field path."""
    file = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolicyError(f"{file}: no such policy file; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"{file}: cannot read ({exc.__class__.__name__}); give a readable UTF-8 YAML file") from None
    loader: _Loader | None = None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        if node is None:
            raise _fail(file, None, "", "empty file; a policy needs apiVersion, kind, name and jurisdiction")
        where: dict[FieldPath, tuple[str, int]] = {(): (file, node.start_mark.line + 1)}
        _index_lines(node, file, (), where)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        problem = " ".join(str(exc.problem or exc.context or "invalid YAML").split())
        raise _fail(file, line, "", f"YAML syntax error: {problem}; fix the indentation or quoting") from None
    except yaml.reader.ReaderError as exc:
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else repr(exc.character)
        raise _fail(file, None, "", f"YAML error: character {char} at offset {exc.position} is not allowed; "
                    "remove it") from None
    except yaml.YAMLError as exc:
        raise _fail(file, None, "", f"YAML error: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise _fail(file, None, "", "YAML nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(data, dict):
        raise _fail(file, where[()][1], "", f"a policy must be a YAML mapping (got {type(data).__name__})")
    bad_key = next((k for k in data if not isinstance(k, str)), None)
    if bad_key is not None:
        raise _fail(file, where[()][1], str(bad_key), "keys must be strings")
    return Sourced(_tuples(data), where)


def _merge(base: Sourced, child: Sourced) -> Sourced:
    """`child` over `base`: mappings merge per key, everything else (scalars, lists) is replaced whole."""

    def merge(b: dict[str, Any], c: dict[str, Any], prefix: FieldPath, where: dict[FieldPath, tuple[str, int]]) -> dict:
        out = dict(b)
        for key, value in c.items():
            if isinstance(value, dict) and isinstance(b.get(key), dict):
                out[key] = merge(b[key], value, prefix + (key,), where)
            else:
                out[key] = value
                # the child's whole subtree replaces the base's: drop the base's lines below it
                for p in [p for p in where if p[: len(prefix) + 1] == prefix + (key,)]:
                    del where[p]
        return out

    where = dict(base.where)
    data = merge(base.data, child.data, (), where)
    where.update(child.where)
    return Sourced(data, where)


_OWN_KEYS = {"apiVersion": "worldlm-secure/v1", "kind": "JurisdictionPolicy", "name": "<this policy's name>"}


def resolve(path: Path, _stack: tuple[Path, ...] = ()) -> Sourced:
    """Parse `path` and everything it `extends:`, merged; raises PolicyError on cycles or missing bases."""
    here = parse_yaml(path)
    ext = here.data.get("extends")
    if ext is None:
        return here
    file, line = here.where.get(("extends",), (str(path), None))
    if not isinstance(ext, str) or not ext.strip():
        raise _fail(file, line, "extends", f"must be a relative path to a policy file (got {ext!r})")
    if Path(ext).is_absolute():
        raise _fail(file, line, "extends", f"must be a path relative to this file, not absolute (got {ext!r})")
    base_path = path.parent / ext
    me = path.resolve()
    chain = _stack + (me,)
    if base_path.resolve() in chain:
        cycle = " -> ".join(p.name for p in chain[chain.index(base_path.resolve()):]) + f" -> {base_path.name}"
        raise _fail(file, line, "extends", f"cycle {cycle}; remove one of these extends")
    if not base_path.is_file():
        raise _fail(file, line, "extends", f"base policy {str(base_path)!r} not found; fix the relative path")
    merged = _merge(resolve(base_path, chain), here)
    for key in _OWN_KEYS:  # every file says what it is, even when it extends another
        if key not in here.data:
            raise _fail(str(path), here.where[()][1], key, f"required in every policy file, also one that extends "
                        f"another; add `{key}: {_OWN_KEYS[key]}`")
    merged.data["extends"] = ext
    return merged


# ---------------------------------------------------------------- validation errors -> one line


def _clean_path(loc: tuple[Any, ...], data: Any) -> FieldPath:
    """Drop pydantic's union/validator tags from `loc`, keeping keys and indices that exist in `data`."""
    out: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            out.append(part)
            node = node[part]
        elif isinstance(node, (list, tuple)) and isinstance(part, int) and 0 <= part < len(node):
            out.append(part)
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and not _is_tag(part):
            out.append(part)  # a missing or unknown key: still part of the path
            node = None
    return tuple(out)


def _is_tag(part: str) -> bool:
    # pydantic names union members / validators like "int", "literal['auto']", "function-after[...]"
    return "[" in part or part in {"int", "float", "str", "bool", "tuple", "dict", "list", "none"}


def _model_at(path: FieldPath) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Policy
    for part in path:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        info = model.model_fields.get(part)
        if info is None:
            return None
        model = _model_in(info.annotation)
    return model


def _model_in(tp: Any) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in get_args(tp) if get_origin(tp) is not None else ():
        found = _model_in(arg)
        if found:
            return found
    return None


def _describe(err: ErrorDetails, path: FieldPath) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        model = _model_at(path[:-1])
        valid = ", ".join(model.model_fields) if model else "see `worldlm-secure policy schema`"
        return f"unknown key; valid keys here: {valid}"
    if kind == "missing":
        return "required; add it"
    ctx_err = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_err, FieldProblem):
        return str(ctx_err)
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    msg = msg.replace("Input should be", "must be").replace("String should", "must")
    msg = msg.replace("Tuple should", "list must").replace("a valid tuple", "a list").replace("a valid number", "a number")
    msg = msg.replace("a valid integer", "an integer").replace("a valid boolean", "true or false")
    msg = msg.replace("a valid string", "a string").replace("a valid dictionary or instance of", "a mapping (of keys) for")
    got = err.get("input")
    if "(got " not in msg and not isinstance(got, (dict, tuple, list)) and kind != "value_error":
        msg = f"{msg} (got {got!r})"
    return msg


def format_validation_error(exc: ValidationError, src: Sourced, path: Path) -> PolicyError:
    """The first problem as one line `file:line path: what is wrong (got X); what is valid`."""
    by_path: dict[FieldPath, list[str]] = {}
    for err in exc.errors():
        fpath = _clean_path(err["loc"], src.data)
        ctx_err = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_err, FieldProblem):
            fpath = fpath + tuple(ctx_err.path.split("."))
        text = _describe(err, fpath)
        by_path.setdefault(fpath, [])
        if text not in by_path[fpath]:
            by_path[fpath].append(text)
    fpath, texts = next(iter(by_path.items()))
    if len(texts) > 1:  # a union: "must be an integer (got 2.5) or must be 'auto' (got 2.5)" -> join plainly
        texts = [t.replace(" (got", "\0").split("\0")[0] for t in texts]
        got = next((e.get("input") for e in exc.errors() if _clean_path(e["loc"], src.data) == fpath), None)
        message = " or ".join(t.removeprefix("must be ") if i else t for i, t in enumerate(texts)) + f" (got {got!r})"
    else:
        message = texts[0]
    more = len(by_path) - 1
    if more:
        message += f" [+{more} more problem{'s' if more > 1 else ''}]"
    file, line = _locate(fpath, src, str(path))
    return _fail(file, line, dotted(fpath), message)


def _locate(fpath: FieldPath, src: Sourced, default_file: str) -> tuple[str, int | None]:
    for n in range(len(fpath), -1, -1):
        hit = src.where.get(fpath[:n])
        if hit:
            return hit
    return default_file, None


def load_policy(path: str | Path) -> Policy:
    """Load and validate one policy file (resolving `extends:`). Raises PolicyError (one line)."""
    path = Path(path)
    src = resolve(path)
    try:
        policy = Policy.model_validate(src.data)
    except ValidationError as exc:
        raise format_validation_error(exc, src, path) from None
    except FieldProblem as exc:  # pragma: no cover - pydantic wraps these; kept as a safety net
        raise _fail(str(path), None, exc.path, str(exc)) from None
    policy._source = path
    policy._where = src.where
    return policy
