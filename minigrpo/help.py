"""`--help` for every entry point: its usage (the module docstring) and its config tree, one line per key.

    if wants_help(argv):
        return print_help(__doc__, DrgTrainConfig)

Each key line shows the default and the comment written beside the field in its dataclass (and the
choices of a `Literal`), so the help text is the config's own source and cannot drift from it.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import tokenize
import typing
from typing import Any, Literal

KEY_WIDTH = 44  # "    key: value" is padded to this column before its comment


def wants_help(argv: list[str]) -> bool:
    return "-h" in argv or "--help" in argv


def field_comments(cls: type) -> dict[str, str]:
    """{field name: the `# comment` on its line} for `cls` and its dataclass bases (the nearest wins)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        line_field: dict[int, str] = {}
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.NAME and token.start[1] == 4 and token.start[0] not in line_field:
                line_field[token.start[0]] = token.string  # a name at the class body's indent: a field
            elif token.type == tokenize.COMMENT and token.start[0] in line_field:
                comments[line_field[token.start[0]]] = token.string.lstrip("# ").rstrip()
    return comments


def _choices(cls: type, name: str) -> str:
    hint = typing.get_type_hints(cls).get(name)
    if typing.get_origin(hint) is Literal:
        return "one of " + "|".join(str(c) if c != "" else '""' for c in typing.get_args(hint))
    return ""


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(required)"


def config_lines(config: Any, indent: int = 2) -> list[str]:
    """The tree of a config class or instance: a line per section, a line per key with its default."""
    cls = config if isinstance(config, type) else type(config)
    comments = field_comments(cls)
    lines = []
    for f in dataclasses.fields(cls):
        value = _default(f) if isinstance(config, type) else getattr(config, f.name)
        pad = " " * indent
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            lines += config_lines(value, indent + 2)
            continue
        note = "; ".join(n for n in (comments.get(f.name, ""), _choices(cls, f.name)) if n)
        key = f"{pad}{f.name}: {json.dumps(value)}"
        lines.append(f"{key:<{KEY_WIDTH}}  # {note}" if note else key)
    return lines


def format_help(doc: str | None, config: Any) -> str:
    """Usage text, then the config tree (a class: its defaults; an instance: its values)."""
    head = inspect.cleandoc(doc or "")
    tree = "\n".join(config_lines(config))
    how = "config (defaults shown): override a key with --section.key=value, or give a YAML file with --config FILE"
    return f"{head}\n\n{how}\n{tree}\n"


def print_help(doc: str | None, config: Any) -> int:
    """Print `format_help(doc, config)`; returns 0, the exit code of a help request."""
    print(format_help(doc, config), end="")
    return 0
