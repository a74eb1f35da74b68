"""Read a user's YAML or JSON file and build a dataclass config from it; hostile input is refused, never obeyed.

A config file comes from a person (or a script) and is read by every command, so it is read with bounds: at most
`Bounds.max_bytes` of UTF-8 text, nesting at most `max_depth` deep, at most `max_values` values counting each use
of a YAML alias (so a "billion laughs" document is refused while it is parsed, before anything expands it), no
integer longer than `MAX_INT_DIGITS` digits, no NaN or infinity in JSON. Each refusal is a `SpecError` (exit code 2)
naming the file and, where there is one, the line.

`parse_config` then walks the data against a dataclass declared with `setting`: unknown keys (with a did-you-mean
taken from that dataclass's own fields), wrong types at every level, non-finite numbers and values outside each
field's limits are collected as `Problem`s, all reported at once. Command-line overrides are OmegaConf dotlists
and `${...}` interpolations are resolved by OmegaConf, both bounded the same way.

This module knows no particular config: the job spec's rules live in `orchestrator.validate`, the prep config's in
`dataprep.config`. It imports nothing of the project but `orchestrator.errors`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

from orchestrator.errors import Problem, SpecError, UserError

T = TypeVar("T")
MAX_INT_DIGITS = 64  # beyond every setting's range, and far below Python's own 4300-digit refusal
MAX_INTERPOLATED_CHARS = 1 << 20
MAX_INTERPOLATIONS = 100
_ENV_CHARS = 4096  # what an environment variable is taken to add
_SHOWN_CHARS = 60
SEED_MAX = 2**32 - 1  # what numpy's and DeepSpeed's seeding accept


@dataclass(frozen=True)
class Bounds:
    """How much of a document is read before it is refused as too large."""

    max_bytes: int = 1 << 20
    max_depth: int = 32
    max_values: int = 10_000


CONFIG_BOUNDS = Bounds()
# Files the project writes that grow with the data (manifest.json holds an entry per shard).
WRITTEN_FILE_BOUNDS = Bounds(max_bytes=64 << 20, max_values=5_000_000)


def setting(default: Any, help: str, **limits: Any) -> Any:
    """A field with its help text and limits (`min`, `max`, `choices`) kept where the field is declared.

    The numeric range is appended to the help text, so the reference and the error messages state the same bounds.
    `aliases` maps values an older version of the field took (as lower-case text: "true") to today's, so files
    written before a field changed type still load, as the new value.
    """
    if "min" in limits or "max" in limits:
        help = f"{help} ({limits.get('min', '…')} to {limits.get('max', '…')})"
    return field(default=default, metadata={"help": help, **limits})


def leaf_fields(cls: type, prefix: str = "") -> Iterable[tuple[str, Any, str]]:
    """(dotted path, default, help) of every leaf field of a config dataclass, nested sections walked."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaf_fields(hints[f.name], path + ".")
        elif typing.get_origin(hints[f.name]) is not dict:
            yield path, f.default, f.metadata.get("help", "")


def show(value: Any) -> str:
    """`repr` cut to a readable length: a message quotes what was given, not a megabyte of it."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + f"… ({len(text)} characters)"


# ---------------------------------------------------------------------------------------------- reading files


class _Refused(Exception):
    """Why a document is not read; turned into the caller's error with the file name."""


class _Malformed(_Refused):
    """The text is not YAML at all (as opposed to YAML past a bound)."""


def read_text(path: str, bounds: Bounds = CONFIG_BOUNDS) -> str:
    """The file's text: at most `bounds.max_bytes` bytes of UTF-8 (a larger file is not read past the bound)."""
    try:
        with open(path, "rb") as f:
            data = f.read(bounds.max_bytes + 1)
    except OSError as e:
        raise _Refused(f"cannot read the file: {e.strerror or e}") from None
    return _decode(data, bounds)


def _check_size(size: int, bounds: Bounds) -> None:
    if size > bounds.max_bytes:
        raise _Refused(f"larger than {bounds.max_bytes:,} bytes; this is not a config file")


def _decode(data: bytes, bounds: Bounds) -> str:
    _check_size(len(data), bounds)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise _Refused(f"not UTF-8 text: byte 0x{data[e.start]:02x} at line {line}, column {column} "
                       "(save the file as UTF-8)") from None


def load_yaml(path: str | os.PathLike, *, empty: str | None, bounds: Bounds = CONFIG_BOUNDS,
              error: Callable[[str], UserError] | None = None) -> Any:
    """Read a YAML file; an unreadable, oversized, non-UTF-8 or malformed one raises `error("<path>: <why>")`, or a
    `SpecError` naming the file when no `error` is given.

    `empty` says what the file needs, for the `SpecError` shown when it holds no document at all; None returns None.
    """
    source = os.fspath(path)
    try:
        raw = _parse_yaml(read_text(source, bounds), bounds)
    except _Refused as e:
        raise _as_error(source, e, error) from None
    if raw is None and empty is not None:
        raise SpecError(source, [Problem("", f"the file is empty: {empty}")])
    return raw


def parse_yaml(text: str, *, source: str, bounds: Bounds = CONFIG_BOUNDS,
               error: Callable[[str], UserError] | None = None) -> Any:
    """Plain data of YAML text not read from a file (an environment variable, a checkpoint's spec.yaml fetched from
    an object store); a refusal raises `error("<source>: <why>")`, or a `SpecError` naming `source` when no `error`
    is given. An empty document is None."""
    try:
        _check_size(len(text.encode("utf-8", "surrogatepass")), bounds)
        return _parse_yaml(text, bounds)
    except _Refused as e:
        raise _as_error(source, e, error) from None


def _parse_yaml(text: str, bounds: Bounds = CONFIG_BOUNDS) -> Any:
    """Plain data (dicts, lists, text, numbers, booleans, null) of one YAML document, refused past `bounds`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a command-line argument that was not UTF-8 arrives as lone surrogates
        code = ord(text[e.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X}"
        line = text.count("\n", 0, e.start) + 1
        column = e.start - (text.rfind("\n", 0, e.start) + 1) + 1
        raise _Refused(f"not UTF-8 text: {what} at line {line}, column {column}") from None
    try:
        _check_yaml_events(text, bounds)
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise _Malformed(f"not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None


def load_json(path: str | os.PathLike, *, bounds: Bounds = CONFIG_BOUNDS,
              error: Callable[[str], UserError] | None = None) -> Any:
    """Read a JSON file written by the project or by a user (manifest.json, config.json, layout.json), bounded like
    YAML and refusing NaN, infinity and oversized integers. A refusal raises `error("<path>: <why>")`, or a
    `SpecError` naming the file when no `error` is given."""
    source = os.fspath(path)
    try:
        return parse_json(read_text(source, bounds), bounds)
    except _Refused as e:
        raise _as_error(source, e, error) from None


def loads_json(data: bytes, *, source: str, bounds: Bounds = CONFIG_BOUNDS,
               error: Callable[[str], UserError] | None = None) -> Any:
    """`load_json` for bytes already read (from an object store, say); `source` names them in the message."""
    try:
        return parse_json(_decode(data, bounds), bounds)
    except _Refused as e:
        raise _as_error(source, e, error) from None


def load_json_lines(path: str | os.PathLike, *, bounds: Bounds = WRITTEN_FILE_BOUNDS,
                    error: Callable[[str], UserError] | None = None) -> list[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSON-lines file (results.jsonl, a metrics history), the
    file bounded as a whole and each line as `load_json` would be; a refusal raises `error("<path>, line <n>:
    <why>")` (or `error("<path>: <why>")` for the file), a `SpecError` when no `error` is given."""
    source = os.fspath(path)
    try:
        lines = read_text(source, bounds).splitlines()
    except _Refused as e:
        raise _as_error(source, e, error) from None
    values = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                values.append((number, parse_json(line, bounds)))
            except _Refused as e:
                raise _as_error(f"{source}, line {number}", e, error) from None
    return values


def _as_error(source: str, refused: _Refused, error: Callable[[str], UserError] | None) -> UserError:
    return SpecError(source, [Problem("", str(refused))]) if error is None else error(f"{source}: {refused}")


def parse_json(text: str, bounds: Bounds = CONFIG_BOUNDS) -> Any:
    if not text.strip():
        raise _Refused("the file is empty")
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_int=_bounded_int, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise _Refused(f"not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise _Refused(f"nested deeper than {bounds.max_depth} levels") from None
    problem = plain_data_problem(value, bounds)
    if problem is not None:
        raise _Refused(str(problem))
    return value


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a number JSON allows here; every number must be finite")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(text.lstrip('-'))} digits is out of every setting's range")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused(f"{text} is out of the range of a finite number")
    return value


def plain_data_problem(value: Any, bounds: Bounds = CONFIG_BOUNDS) -> Problem | None:
    """The first way `value` is not bounded plain data: too deep, too many values (each shared object counted at
    each use), or a value that no config file holds (a date, bytes, a set, an object)."""
    stack, count = [(value, "", 1)], 0
    while stack:
        item, path, depth = stack.pop()
        count += 1
        if count > bounds.max_values:
            return Problem("", f"holds more than {bounds.max_values:,} values (aliases counted at each use)")
        if isinstance(item, (dict, list)) and depth > bounds.max_depth:
            return Problem("", f"nested deeper than {bounds.max_depth} levels")
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, (str, int)) or isinstance(key, bool):
                    return Problem(path, f"key {show(key)} is not a name")
                stack.append((child, f"{path}.{key}" if path else str(key), depth + 1))
        elif isinstance(item, (list, tuple)):
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))
        elif item is not None and not isinstance(item, (str, int, float, bool)):
            return Problem(path, f"got {show(item)}, which a config file cannot hold (quote it to make it text)")
    return None


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """The safe loader, keeping dates as text and refusing tags whose values no config holds (binary, set, ...)."""

    def construct_bounded_int(self, node: yaml.ScalarNode) -> int:
        digits = len(re.sub(r"[^0-9a-fA-F]", "", node.value))
        if digits > MAX_INT_DIGITS:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {digits} digits is out of every setting's range", node.start_mark)
        return self.construct_yaml_int(node)

    def refuse_tag(self, node: yaml.Node) -> Any:
        raise yaml.constructor.ConstructorError(
            None, None, f"values tagged {node.tag} cannot be config settings", node.start_mark)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_bounded_int)
_Loader.add_constructor("tag:yaml.org,2002:timestamp", _Loader.construct_yaml_str)
for _tag in ("binary", "set", "omap", "pairs"):
    _Loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _Loader.refuse_tag)


def _check_yaml_events(text: str, bounds: Bounds) -> None:
    """Refuse a YAML document nested too deep or holding too many values once its aliases are expanded.

    Counted on the parser's events, before any node is built: an alias adds the size of the node it names, so the
    expanded size is known without expanding anything.
    """
    open_sizes, open_anchors, anchors, total = [0], [], {}, 0
    loader = _Loader(text)
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.CollectionStartEvent):
                if len(open_sizes) > bounds.max_depth:
                    raise _Refused(f"nested deeper than {bounds.max_depth} levels at line {event.start_mark.line + 1}")
                open_sizes.append(1)
                open_anchors.append(event.anchor)
                total += 1
            elif isinstance(event, yaml.CollectionEndEvent):
                size, anchor = open_sizes.pop(), open_anchors.pop()
                open_sizes[-1] += size
                if anchor is not None:
                    anchors[anchor] = size
            elif isinstance(event, yaml.ScalarEvent):
                open_sizes[-1] += 1
                total += 1
                if event.anchor is not None:
                    anchors[event.anchor] = 1
            elif isinstance(event, yaml.AliasEvent):
                if event.anchor in open_anchors:
                    raise _Refused(f"the alias *{event.anchor} at line {event.start_mark.line + 1} refers to a "
                                   "collection that contains it")
                size = anchors.get(event.anchor, 1)
                open_sizes[-1] += size
                total += size
            if total > bounds.max_values:
                raise _Refused(f"holds more than {bounds.max_values:,} values (aliases counted at each use), at "
                               f"line {event.start_mark.line + 1}")
    finally:
        loader.dispose()


# ---------------------------------------------------------------------------------------------- building configs


def parse_config(
    cls: type[T], raw: Any, *, source: str, overrides: Sequence[str] = (),
    problems: list[Problem] | None = None, bad: set[str] | None = None, prefix: str = "",
) -> T:
    """Build any config dataclass declared with `setting` from plain data, checking keys, types and limits.

    Without a `problems` list to collect into, every problem found raises one `SpecError`; with one, the caller
    adds its own cross-field rules and raises. `bad` collects the dotted paths of fields found wrong, so those
    rules can skip what is already reported. `prefix` roots every path, for a section parsed on its own (one of
    a mapping of named sections, like the prep config's sources).
    """
    collect = problems is not None
    problems = [] if problems is None else problems
    bad = set() if bad is None else bad
    where = prefix.rstrip(".")
    if not isinstance(raw, dict):
        raise SpecError(source, [Problem(where, f"expected a mapping of sections, got {type(raw).__name__}")])
    shape = plain_data_problem(raw)
    if shape is not None:
        raise SpecError(source, [shape])
    found: list[Problem] = []
    raw = _apply_overrides(raw, overrides, found)
    raw = _resolve_interpolations(raw, found)
    problems.extend(Problem(f"{prefix}{p.path}" if p.path else where, p.message) for p in found)
    config = _build(cls, raw, prefix, problems, bad, (cls, prefix))
    _check_limits(config, prefix, problems, bad)
    if problems and not collect:
        raise SpecError(source, problems)
    return config


def _apply_overrides(raw: dict, overrides: Sequence[str], problems: list[Problem]) -> dict:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    items = []
    for item in overrides:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            problems.append(Problem(key if eq else "", f"override {show(item)} is not of the form section.key=value"))
        elif key.count(".") >= CONFIG_BOUNDS.max_depth:
            problems.append(Problem("", f"override {show(item)} is nested deeper than {CONFIG_BOUNDS.max_depth} "
                                    "levels"))
        else:
            try:
                _parse_yaml(value)
            except _Malformed:
                pass  # OmegaConf takes such a value as text
            except _Refused as e:
                problems.append(Problem(key, f"override value: {e}"))
                continue
            items.append(item)
    if not items:
        return raw
    try:
        merged = OmegaConf.merge(OmegaConf.create(raw), OmegaConf.from_dotlist(items))
        merged_raw = OmegaConf.to_container(merged, resolve=False)
    except OmegaConfBaseException as e:
        problems.append(Problem(getattr(e, "full_key", "") or "", f"cannot apply overrides {show(items)}: {e.msg}"))
        return raw
    except (ValueError, TypeError, KeyError, yaml.YAMLError) as e:
        problems.append(Problem("", f"cannot apply overrides {show(items)}: {e}"))
        return raw
    shape = plain_data_problem(merged_raw)
    if shape is not None:
        problems.append(Problem(shape.path, f"after the overrides: {shape.message}"))
        return raw
    return merged_raw


_INTERPOLATION = re.compile(r"\$\{([^${}]*)\}")
_RESOLVER = re.compile(r"\$\{\s*([\w.-]+)\s*:")


def _resolve_interpolations(raw: dict, problems: list[Problem]) -> dict:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    refused = _interpolation_problems(raw)
    if refused:
        problems.extend(refused)
        return {}
    try:
        return OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    except OmegaConfBaseException as e:
        problems.append(Problem(getattr(e, "full_key", "") or "", f"bad interpolation: {e.msg}"))
    except (ValueError, TypeError, KeyError) as e:
        problems.append(Problem("", f"bad interpolation: {e}"))
    return {}


def _interpolation_problems(raw: dict) -> list[Problem]:
    """Refuse resolvers other than `oc.env`, more than `MAX_INTERPOLATIONS` interpolations, and interpolations whose
    text would grow past `MAX_INTERPOLATED_CHARS` (each reference repeating the one before grows the text
    geometrically, and OmegaConf would build it); reference cycles are left to OmegaConf's own check."""
    leaves = dict(_leaves(raw, ""))
    texts = {path: value for path, value in leaves.items() if isinstance(value, str) and "${" in value}
    out = [Problem(path, f"resolver {name!r} is not allowed; an interpolation may name a setting (${{name}}) or an "
                   "environment variable (${oc.env:HOME})")
           for path, value in texts.items() for name in _RESOLVER.findall(value) if name != "oc.env"]
    count = sum(value.count("${") for value in texts.values())
    if count > MAX_INTERPOLATIONS:
        out.append(Problem("", f"holds {count} interpolations; at most {MAX_INTERPOLATIONS} are allowed"))
    if out:
        return out
    sizes: dict[str, int] = {}

    def size(path: str, seen: frozenset[str]) -> int:
        if path in sizes or path in seen:
            return sizes.get(path, 0)
        if path in texts:
            refs = [re.sub(r"\[(\d+)\]", r".\1", ref.strip()) for ref in _INTERPOLATION.findall(texts[path])]
            total = len(texts[path]) + sum(_ENV_CHARS if ref.startswith("oc.env") else size(ref, seen | {path})
                                           for ref in refs)
        elif path in leaves:
            total = len(str(leaves[path]))
        else:  # a section, or a name OmegaConf will report as missing
            total = sum(size(p, seen | {path}) for p in leaves if p.startswith(path + "."))
        sizes[path] = min(total, MAX_INTERPOLATED_CHARS + 1)
        return sizes[path]

    return [Problem(path, f"its interpolations expand to more than {MAX_INTERPOLATED_CHARS:,} characters")
            for path in texts if size(path, frozenset()) > MAX_INTERPOLATED_CHARS][:1]


def _leaves(value: Any, path: str) -> Iterable[tuple[str, Any]]:
    """(dotted path, value) of every scalar; list items are numbered as OmegaConf names them (`key.0`)."""
    if isinstance(value, (dict, list)):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, child in items:
            yield from _leaves(child, f"{path}.{key}" if path else str(key))
    else:
        yield path, value


def _build(cls: type, data: dict, prefix: str, problems: list[Problem], bad: set[str], root: tuple[type, str]) -> Any:
    """Instantiate `cls` from `data`, keeping defaults where a value is unknown or of the wrong type; `root` is the
    dataclass parsed and its prefix, where a misspelt key's did-you-mean is looked up."""
    hints = typing.get_type_hints(cls)
    metadata = {f.name: f.metadata for f in dataclasses.fields(cls)}
    names = list(metadata)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in names:
            problems.append(Problem(path, "unknown key" + _did_you_mean(str(key), names, prefix, root)))
            continue
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            if isinstance(value, dict):
                kwargs[key] = _build(kind, value, path + ".", problems, bad, root)
            else:
                problems.append(Problem(path, f"got {show(value)}, expected a section (a mapping of keys)"))
                bad.add(path)
            continue
        aliases = metadata[key].get("aliases", {})
        if isinstance(value, (bool, str)) and str(value).lower() in aliases:
            value = aliases[str(value).lower()]
        why, converted = _coerce(value, kind)
        if why is None:
            kwargs[key] = converted
        else:
            problems.append(Problem(path, f"got {show(value)}, expected {why}"))
            bad.add(path)
    return cls(**kwargs)


def _coerce(value: Any, kind: Any) -> tuple[str | None, Any]:
    """(None, the value as `kind`), or (what was expected, None)."""
    args = typing.get_args(kind)
    if type(None) in args:
        if value is None:
            return None, None
        inner = next(a for a in args if a is not type(None))
        why, converted = _coerce(value, inner)
        return (None, converted) if why is None else (f"{why} or null", None)
    if kind is bool:
        if isinstance(value, bool):
            return None, value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return None, value.lower() == "true"
        return "true or false", None
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return None, value
        if isinstance(value, float) and value.is_integer():
            return None, int(value)
        return "an integer", None
    if kind is float:
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                return "a number", None
        if not isinstance(number, (int, float)) or isinstance(number, bool):
            return "a number", None
        if not math.isfinite(number):
            return "a finite number", None
        return None, float(number)
    if kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return None, str(value)
        return "a string", None
    if typing.get_origin(kind) is tuple:  # a list of names: YAML's [a, b], or "a,b" as an override gives it
        items = value.split(",") if isinstance(value, str) else value
        if isinstance(items, (list, tuple)) and all(isinstance(item, str) for item in items):
            return None, tuple(item.strip() for item in items)
        return "a list of names", None
    return ("a mapping" if typing.get_origin(kind) is dict else str(kind)), None


def _did_you_mean(key: str, names: list[str], prefix: str, root: tuple[type, str]) -> str:
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    elsewhere = [path for path, _, _ in leaf_fields(*root) if path.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f" (did you mean '{elsewhere[0]}'?)"
    return f"; allowed here: {', '.join(names)}"


def _check_limits(obj: Any, prefix: str, problems: list[Problem], bad: set[str]) -> None:
    for f in dataclasses.fields(obj):
        path, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_limits(value, path + ".", problems, bad)
            continue
        if value is None or path in bad:
            continue
        meta = f.metadata
        message = None
        if isinstance(value, tuple):
            message = _list_problem(value, meta.get("choices"))
        elif "choices" in meta and value not in meta["choices"]:
            message = f"got {show(value)}, allowed: {', '.join(repr(c) for c in meta['choices'])}"
        elif "min" in meta and value < meta["min"]:
            message = f"got {show(value)}, must be ≥ {meta['min']}"
        elif "max" in meta and value > meta["max"]:
            message = f"got {show(value)}, must be ≤ {meta['max']}"
        if message:
            problems.append(Problem(path, message))
            bad.add(path)


def _list_problem(items: tuple[str, ...], choices: Sequence[str] | None) -> str | None:
    """What is wrong with a list of names: one outside `choices`, or one named twice."""
    for item in items:
        if choices is not None and item not in choices:
            return f"got {show(item)}, allowed: {', '.join(repr(c) for c in choices)}"
    twice = sorted({item for item in items if items.count(item) > 1})
    return f"{show(twice[0])} is named twice" if twice else None
