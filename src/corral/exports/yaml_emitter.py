"""A small YAML emitter for the Kubernetes manifests (corral does not depend on a YAML library).

Mappings, lists and scalars as block YAML, plus comments: a Note as a key or a list item prints as
`# ...` lines, a Commented list item prints commented out. Scalars are plain when YAML would read them
back as the same string, double-quoted otherwise; multi-line strings are literal blocks when they can be.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..config import plain_number


class Note(str):
    """A comment: as a key of a mapping (its value is ignored) or as an item of a list."""


@dataclass(frozen=True)
class Commented:
    """A list item printed commented out: uncommenting its lines in place gives the item."""

    value: Any


_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./-]*")
_RESERVED = {"y", "n", "yes", "no", "true", "false", "on", "off", "null", "~"}


def scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return plain_number(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _RESERVED:
        return text
    return quote(text)


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _printable(c: str) -> bool:
    """YAML's printable characters, less those YAML 1.1 parsers read as line breaks (LS, PS) and the BOM."""
    o = ord(c)
    if o in (0x2028, 0x2029, 0xFEFF):
        return False
    return 0x20 <= o <= 0x7E or 0xA0 <= o <= 0xD7FF or 0xE000 <= o <= 0xFFFD or o >= 0x10000


def quote(text: str) -> str:
    """A YAML double-quoted scalar: everything not printable escaped (\\x, \\u, \\U), nothing else."""
    out = []
    for c in text:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif _printable(c):
            out.append(c)
        else:
            o = ord(c)
            out.append(f"\\x{o:02x}" if o <= 0xFF else f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}")
    return '"' + "".join(out) + '"'


def _block(text: str) -> str | None:
    """The header of a literal block (`|`, `|-`, `|+`, with an indentation indicator when the first
    line starts with a space), or None when the text cannot be one (non-printable characters, CR)."""
    if not text.strip() or not all(c in "\t\n" or _printable(c) for c in text):
        return None
    stripped = text.rstrip("\n")
    trailing = len(text) - len(stripped)
    chomp = "-" if trailing == 0 else "" if trailing == 1 else "+"
    first = next(line for line in text.split("\n") if line.strip())
    # YAML guesses a block's indentation from its first non-blank line: say it when that would mislead
    explicit = text[0] in " \n" or first.startswith(" ")
    return "|" + ("2" if explicit else "") + chomp


def to_yaml(value: Any, indent: int = 0) -> list[str]:
    pad = " " * indent
    out: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, Note):
                out += [f"{pad}# {line}".rstrip() for line in key.split("\n")]
                continue
            head = f"{pad}{scalar(key)}:"
            if isinstance(item, (dict, list)) and item:
                out += [head, *to_yaml(item, indent + 2)]
            elif isinstance(item, (dict, list)):
                out.append(f"{head} {'{}' if isinstance(item, dict) else '[]'}")
            elif isinstance(item, str) and "\n" in item and _block(item):
                out.append(f"{head} {_block(item)}")
                out += [f"{pad}  {line}" if line else "" for line in item.rstrip("\n").split("\n")]
                out += [""] * (len(item) - len(item.rstrip("\n")) - 1)
            else:
                out.append(f"{head} {scalar(item)}")
        return out
    if isinstance(value, list):
        for item in value:
            if isinstance(item, Note):
                out += [f"{pad}# {line}".rstrip() for line in item.split("\n")]
            elif isinstance(item, Commented):
                out += [f"{pad}# {line[indent:]}" for line in to_yaml([item.value], indent)]
            elif isinstance(item, (dict, list)) and item:
                inner = to_yaml(item, indent + 2)
                assert not inner[0].lstrip().startswith("#"), "a list item must not begin with a comment"
                out += [f"{pad}- {inner[0][indent + 2 :]}", *inner[1:]]
            elif isinstance(item, (dict, list)):
                out.append(f"{pad}- {'{}' if isinstance(item, dict) else '[]'}")
            else:
                out.append(f"{pad}- {scalar(item)}")
        return out
    return [f"{pad}{scalar(value)}"]


def document(obj: dict[str, Any], comments: list[str] | None = None) -> str:
    return "\n".join([*(f"# {c}".rstrip() for c in comments or []), *to_yaml(obj)]) + "\n"
