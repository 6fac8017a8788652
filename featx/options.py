"""Options declared once, on their config dataclass field, and read from flags and TOML files.

``option(...)`` is a dataclass field whose metadata carries the flag, the help and the rule of an
"auto" default; the CLI builds its Typer options from it (``declared``), and ``settings`` fills
the dataclass from flags and a TOML table by field or flag name, checking every value against
the field's real type hint. No torch, no Typer: `featx --help` imports this.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from featx.defaults import describe
from featx.errors import UsageError

C = TypeVar("C")


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    short: str | None = None,
    auto: Callable[..., Any] | None = None,
    shown: str | None = None,
    parse: Callable[[str], Any] | None = None,
    expects: str | None = None,
) -> Any:
    """A config field declared as an option: its default, help, flag and how unset reads.

    ``flag``: the long flag when it is not ``--field-name`` (``--progress/--no-progress`` for an
    on/off pair); ``short``: a one-letter alias. The help's ``[default: ...]`` is the first line
    of ``auto``'s docstring (a rule in ``featx.defaults``), else ``shown``, else the default.
    ``parse`` reads a command-line string (``"3/16"``); ``expects`` says what fits, when the type
    hint alone says it badly.
    Example: ``batch_size: int | None = option(None, "Images per forward pass", auto=rule)``
    """
    meta = {"help": help, "flag": flag, "short": short, "auto": auto, "shown": shown}
    return dataclasses.field(default=default, metadata={**meta, "parse": parse, "expects": expects})


def listed(kind: type, flag: str) -> Callable[[str], tuple[Any, ...]]:
    """A ``parse`` for a comma-separated value: ``listed(int, "--n")("1,5")`` is ``(1, 5)``."""

    def parse(text: str) -> tuple[Any, ...]:
        try:
            return tuple(kind(word.strip()) for word in text.split(",") if word.strip())
        except ValueError:
            raise UsageError(
                f"{flag} {text!r}: expected {kind.__name__}[,{kind.__name__}...]"
            ) from None

    return parse


@dataclass(frozen=True)
class Declared:
    """One option as the CLI shows it: ``decls`` for Typer, ``text`` alone, ``help`` with its
    default."""

    name: str
    flag: str
    decls: tuple[str, ...]
    text: str
    help: str
    default: Any


def declared(cls: type, name: str) -> Declared:
    """Field ``name`` of dataclass ``cls`` as an option (its flag, help and shown default)."""
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    meta = field.metadata
    if "help" not in meta:
        raise TypeError(f"{cls.__name__}.{name} is not declared with option(...)")
    decls = (meta["flag"] or "--" + name.replace("_", "-"),) + (
        (meta["short"],) * bool(meta["short"])
    )
    shown = default_text(field)
    help_text = f"{meta['help']} [default: {shown}]" if shown else meta["help"]
    return Declared(name, decls[0].split("/")[0], decls, meta["help"], help_text, field.default)


def default_text(field: dataclasses.Field[Any]) -> str | None:
    """What ``[default: ...]`` says for ``field``: its rule, its description, or its value."""
    meta, default = field.metadata, field.default
    if meta.get("auto") is not None:
        rule = describe(meta["auto"])
        return f"{default}: {rule}" if isinstance(default, str) else rule
    if meta.get("shown") is not None:
        return str(meta["shown"])
    if default is None or default is False or default == ():
        return None
    if isinstance(default, tuple):
        return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
    return str(default)


def options_of(cls: type) -> dict[str, Declared]:
    """Every option of ``cls`` by field name."""
    return {f.name: declared(cls, f.name) for f in dataclasses.fields(cls) if "help" in f.metadata}


# --- reading them ------------------------------------------------------------------------------


def load_toml(path: str | os.PathLike[str], section: str) -> dict[str, Any]:
    """Options for one command from a TOML file: its ``[section]`` table, or the top level."""
    from featx.inputs import MAX_CONFIG_BYTES, read_input

    text = read_input(path, "--config", MAX_CONFIG_BYTES)
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"--config {path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"--config {path}: not valid TOML ({error})") from None
    table = data.get(section, data)
    if not isinstance(table, dict):
        raise UsageError(f"--config {path}: [{section}] must be a table")
    # Sub-tables are other commands' sections; a plain ``head = "mlp"`` is train-head's option.
    return {key: value for key, value in table.items() if not isinstance(value, dict)}


def _names(cls: type) -> dict[str, str]:
    """Every key that names a field of ``cls``: the field's name and its flag's, with ``_``."""
    names = {}
    for name, spec in options_of(cls).items():
        names[spec.flag.lstrip("-").replace("-", "_")] = name
    names.update({f.name: f.name for f in dataclasses.fields(cls)})
    return names


def settings(
    cls: type[C],
    flags: dict[str, Any],
    config_file: str | os.PathLike[str] | None = None,
    section: str = "",
) -> C:
    """The config dataclass ``cls`` from a TOML file's ``[section]`` and command-line flags.

    Both are matched to fields by the field's or its flag's name (``batch-size``, ``batch_size``;
    ``layer`` fills ``layers``); flags given (not None) override the file; keys that are not
    fields of ``cls`` are ignored in ``flags`` and refused in the file. Every value is checked
    against the field's real type hint, then by the dataclass's own validators, so a bad value
    is one line whether it came from a flag or a file.

    Example: ``settings(ExtractConfig, {"batch_size": 8}, "run.toml", "extract")``
    """
    names, specs = _names(cls), options_of(cls)
    values: dict[str, Any] = {}
    if config_file is not None:
        source = f"--config {config_file}"
        for key, value in load_toml(config_file, section).items():
            name = names.get(key.replace("-", "_"))
            if name is None:
                raise UsageError(f"{source}: unknown option {key!r}")
            values[name] = _checked(cls, name, value, f"{source}: {key} = {value!r}")
    for key, value in flags.items():
        name = names.get(key)
        if name is not None and value is not None:
            value = os.fspath(value) if isinstance(value, os.PathLike) else value
            flag = specs[name].flag if name in specs else "--" + key
            values[name] = _checked(cls, name, value, f"{flag} {value!r}")
    return cls(**values)


def _checked(cls: type, name: str, value: Any, where: str) -> Any:
    """``value`` made to fit field ``name``'s type hint, or a UsageError that says what fits."""
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    parse = field.metadata.get("parse")
    if parse is not None and isinstance(value, str):
        return parse(value)
    hint = typing.get_type_hints(cls)[name]
    converted = fit(hint, value)
    if converted is NO_FIT:
        raise UsageError(f"{where}: expected {field.metadata.get('expects') or _describe(hint)}")
    return converted


NO_FIT: Any = object()


def fit(hint: Any, value: Any) -> Any:
    """``value`` as an instance of ``hint`` (int, float, bool, str, unions, tuples), or NO_FIT.

    The only conversions are the lossless ones a user means: an int where a float is wanted, a
    list (TOML has no tuples) where a tuple is, and a lone string for a tuple of strings.
    """
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return _fit_union(typing.get_args(hint), value)
    if origin is tuple:
        return _fit_tuple(typing.get_args(hint), value)
    check = _SCALARS.get(hint)
    return NO_FIT if check is None else check(value)


def _fit_union(options: tuple[Any, ...], value: Any) -> Any:
    for option_type in options:
        converted = fit(option_type, value)
        if converted is not NO_FIT:
            return converted
    return NO_FIT


def _fit_tuple(args: tuple[Any, ...], value: Any) -> Any:
    if isinstance(value, str) and args == (str, ...):
        return (value,)
    if not isinstance(value, (list, tuple)):
        return NO_FIT
    kinds = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
    if len(kinds) != len(value):
        return NO_FIT
    items = tuple(fit(kind, item) for kind, item in zip(kinds, value, strict=True))
    return NO_FIT if any(item is NO_FIT for item in items) else items


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_SCALARS: dict[Any, Callable[[Any], Any]] = {
    type(None): lambda v: None if v is None else NO_FIT,
    bool: lambda v: v if isinstance(v, bool) else NO_FIT,
    int: lambda v: v if isinstance(v, int) and not isinstance(v, bool) else NO_FIT,
    float: lambda v: float(v) if _is_number(v) else NO_FIT,
    str: lambda v: v if isinstance(v, str) else NO_FIT,
}
_SINGULAR = {int: "an int", float: "a number", bool: "true or false", str: "a string"}
_PLURAL = {int: "ints", float: "numbers", bool: "booleans", str: "strings"}


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_PLURAL[args[0]]}"
        return f"a list of {len(args)} {_PLURAL[args[0]]}"
    return _SINGULAR.get(hint, str(hint))
