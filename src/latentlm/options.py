"""Strict typing of recipe (YAML) and command-line values against the config dataclasses' field types.

One rule set for both sources, so a value means the same in a recipe and on the command line:

* ``bool``: YAML ``true``/``false``, or one of the strings true/false, yes/no, on/off, 1/0 (any case);
  ``hflip: "no"`` is False, never a truthy string.
* ``int``: an integer, or a number with an integral value (``8.0``, YAML's string ``1e3``); ``1.5`` is refused.
* ``float``: any number, or a string that reads as one (YAML 1.1 reads ``1e-4`` as a string).
* ``Literal``: one of the listed choices. YAML 1.1 reads unquoted ``no``/``off`` as False and ``yes``/``on``
  as True; where such a word is a choice (``mixed_precision: no``, ``fused: on``) it is taken as that word.
* ``tuple``: a list (command line: several values after the flag); fixed-length tuples need that many.
* a nested config (``model``, ``data``, ...) is a mapping of its own options, never a scalar.

Unknown keys and flags are refused with the closest known name. Every error is a ``ConfigError`` naming
where the value came from (``<recipe file>: <key>`` or ``command line: --flag``), the value and the fix.
Torch-free, like ``config.py``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Union

from latentlm.config import ConfigError

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


def suggestion(name: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``known`` to ``name``, else the list of known names."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; known: {', '.join(known)}"


def describe(hint: Any) -> str:
    """A field type in words, for error messages."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if o is type(None) else describe(o) for o in typing.get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(hint))
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {describe(args[0])}s"
        return f"a list of {len(args)} values"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _options(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)


def coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` (from YAML or a command-line string) as field type ``hint``; ``ConfigError`` if it is not one."""
    options = _options(hint)
    if value is None or (isinstance(value, str) and value == "None" and type(None) in options):
        if type(None) in options:
            return None
        raise ConfigError(f"{where}: expected {describe(hint)}, got an empty value (null)")
    rest = [o for o in options if o is not type(None)]
    if len(rest) > 1:
        for option in rest:
            try:
                return coerce(value, option, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {describe(hint)}, got {value!r}")
    return _coerce_one(value, rest[0], where)


def _coerce_one(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return _literal(value, typing.get_args(hint), where)
    if origin is tuple:
        return _tuple(value, typing.get_args(hint), where)
    if hint is bool:
        return _bool(value, where)
    if hint is int:
        return _int(value, where)
    if hint is float:
        return _float(value, where)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}; quote it in YAML (\"{value}\")")
        return value
    return value


def _bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigError(f"{where}: expected true or false (also yes/no, on/off, 1/0), got {value!r}")


def _number(value: Any, where: str, expected: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where}: expected {expected}, got {value!r}")
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
        try:
            return float(value.strip())
        except ValueError as err:
            raise ConfigError(f"{where}: expected {expected}, got {value!r}") from err
    return value


def _int(value: Any, where: str) -> int:
    number = _number(value, where, "an integer")
    if isinstance(number, float):
        if not number.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r} (not a whole number)")
        return int(number)
    return number


def _float(value: Any, where: str) -> float:
    return float(_number(value, where, "a number"))


def _literal(value: Any, choices: tuple[Any, ...], where: str) -> Any:
    if isinstance(value, bool):  # YAML 1.1's unquoted no/off/yes/on
        words = FALSE_WORDS if value is False else TRUE_WORDS
        for word in words:
            if word in choices:
                return word
    elif value in choices:
        return value
    listed = ", ".join(repr(c) for c in choices)
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{where}: {value!r} is not a choice; choose one of {listed}{hint}")


def _tuple(value: Any, args: tuple[Any, ...], where: str) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list (e.g. [{value!r}]), got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{where}: expected a list of {len(args)} values, got {len(value)}: {list(value)}")
    return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))


def section_error(key: str, value: Any, cls: type, where: str) -> ConfigError:
    """The error for a scalar where the nested config ``cls`` (a mapping of options) was expected."""
    names = ", ".join(f.name for f in dataclasses.fields(cls))
    if key == "model" and isinstance(value, str):
        return ConfigError(f"{where}: {value!r} is not a mapping: pick a preset with `model: {{name: {value}}}` "
                           f"(or --model.name {value})")
    return ConfigError(f"{where}: {key} is a section of options ({names}), got {value!r}; write "
                       f"`{key}: {{option: value}}`")


def merge_into(instance: Any, data: dict[str, Any] | None, source: str, section: str = "") -> Any:
    """A copy of dataclass ``instance`` with the (nested) values of ``data``, each strictly typed.

    Errors read ``<source>: <section.key>: ...`` (e.g. ``recipe.yaml: data.pth: unknown option; did you mean
    'path'?``).
    """
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {section or 'recipe'}: expected a mapping of options, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(instance)}
    hints = typing.get_type_hints(type(instance))
    changes = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        at = f"{section}.{key}" if section else key
        if key not in fields:
            inside = [f"{n}.{key}" for n in fields if dataclasses.is_dataclass(getattr(instance, n))
                      and key in {f.name for f in dataclasses.fields(getattr(instance, n))}]
            hint = f"; did you mean {inside[0]!r}?" if inside else suggestion(key, fields)
            raise ConfigError(f"{source}: {at}: unknown option{hint}")
        current = getattr(instance, key)
        if dataclasses.is_dataclass(current):
            if value is not None and not isinstance(value, dict):
                raise section_error(key, value, type(current), f"{source}: {at}")
            changes[key] = merge_into(current, value, source, at)
        else:
            changes[key] = coerce(value, hints[key], f"{source}: {at}")
    return dataclasses.replace(instance, **changes)


# ---------------------------------------------------------------------------------------------
# Command-line flags (tyro's names): checked and normalized before tyro parses them
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flag:
    """One command-line flag of a config class: the field type it sets; bools have a ``--x`` / ``--no-x`` pair."""

    hint: Any
    pair: str = ""  # bools: "--x / --no-x", tyro's spelling (nested: --data.hflip / --data.no-hflip)


@functools.cache
def flag_table(cls: type, prefix: str = "") -> dict[str, Flag]:
    """Every flag tyro generates for config class ``cls``: ``--a.b-c`` for field ``a.b_c``; bools also ``--a.no-b``."""
    table: dict[str, Flag] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint, name = hints[f.name], f.name.replace("_", "-")
        if dataclasses.is_dataclass(hint):
            table.update(flag_table(hint, f"{prefix}{name}."))
        elif hint is bool:
            pair = f"--{prefix}{name} / --{prefix}no-{name}"
            table[f"--{prefix}{name}"] = table[f"--{prefix}no-{name}"] = Flag(bool, pair)
        else:
            table[f"--{prefix}{name}"] = Flag(hint)
    return table


def check_flags(command: str, cls: type, args: list[str]) -> list[str]:
    """``args`` (after the command name) with every flag known and every value strictly typed and normalized
    (``--batch-size 8.0`` -> ``8``), so that tyro then parses them exactly as a recipe's values.

    Raises ``ConfigError`` for an unknown flag (with the closest known one), a value where none is taken, a
    missing value, or a value of the wrong type.
    """
    table = flag_table(cls)
    out: list[str] = []
    for flag, inline, values in _groups(args):
        if flag is None:
            raise ConfigError(f"command line: unexpected value {values[0]!r} for `latentlm {command}`: every value "
                              "follows its --flag")
        name = flag.replace("_", "-")  # tyro takes --batch_size as --batch-size
        if name not in table:
            raise ConfigError(f"command line: {flag}: unknown option of `latentlm {command}`"
                              f"{suggestion(flag, table)} (see latentlm {command} --help)")
        out.extend(_normalize(name, table[name], inline, values))
    return out


def _groups(args: list[str]) -> list[tuple[str | None, bool, list[str]]]:
    """``(flag, given as --flag=value, its values)`` in order; a leading value has flag None."""
    groups: list[tuple[str | None, bool, list[str]]] = []
    for arg in args:
        if arg.startswith("--") and len(arg) > 2:
            flag, eq, value = arg.partition("=")
            groups.append((flag, bool(eq), [value] if eq else []))
        elif groups:
            groups[-1][2].append(arg)
        else:
            groups.append((None, False, [arg]))
    return groups


def _normalize(name: str, flag: Flag, inline: bool, values: list[str]) -> list[str]:
    where = f"command line: {name}"
    if flag.hint is bool:
        if values:
            raise ConfigError(f"{where} takes no value (got {' '.join(values)!r}): pass one of {flag.pair}")
        return [name]
    is_tuple = any(typing.get_origin(o) is tuple for o in _options(flag.hint))
    if is_tuple:
        if values == ["None"] and type(None) in _options(flag.hint):
            return [name, "None"]
        coerced = coerce(list(values), flag.hint, where)
        return [name, *map(_text, coerced)]
    if len(values) != 1:
        raise ConfigError(f"{where}: expected one value ({describe(flag.hint)}), got {len(values)}"
                          + (f": {' '.join(values)}" if values else ""))
    value = coerce(values[0], flag.hint, where)
    text = "None" if value is None else _text(value)
    return [f"{name}={text}"] if inline else [name, text]


def _text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)
