"""dotenv files (`--env-file`, `env_file`): a small strict reader.

Why not python-dotenv: it skips a line it cannot parse with a logged warning and expands `${VAR}` by
default. A mistyped line in a service's environment should be an error naming the file and line, at
`corral check` and before any worker starts, like every other configuration problem; and a value
should arrive as written. The syntax is the common subset of dotenv, docker and systemd files:

    # comment                      blank lines and comment lines are skipped
    NAME=value                     unquoted: trimmed; " #" starts a comment
    export NAME=value              `export ` is allowed (the file can be sourced by a shell too)
    NAME='literal'                 single quotes: nothing is special inside, may span lines
    NAME="a\\nb \\"q\\" \\\\"         double quotes: \\n \\t \\r \\" \\\\ \\$ are escapes, may span lines

No variable expansion: `$HOME` stays `$HOME`. A later line for the same name wins.
"""

from __future__ import annotations

import re

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$", "'": "'"}


class EnvFileError(Exception):
    """One problem, as `FILE:LINE: what`."""


def load(path: str) -> dict[str, str]:
    """The variables of the file at `path`. Raises EnvFileError (unreadable file, bad line)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise EnvFileError(f"{path}: does not exist") from None
    except UnicodeDecodeError:
        raise EnvFileError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise EnvFileError(f"{path}: {exc.strerror or exc}") from None
    return parse(text, path)


def parse(text: str, where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        number, line = i + 1, lines[i]
        i += 1
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("export ") or stripped.startswith("export\t"):
            stripped = stripped[len("export") :].lstrip()
        name, eq, rest = stripped.partition("=")
        name = name.strip()
        if not eq:
            raise EnvFileError(f"{where}:{number}: no '=' in {stripped!r}")
        if not _NAME.match(name):
            raise EnvFileError(f"{where}:{number}: {name!r} is not a variable name")
        rest = rest.lstrip()
        if rest[:1] in ("'", '"'):
            value, i = _quoted(rest, lines, i, where, number)
        else:
            value = re.split(r"\s#", rest, maxsplit=1)[0].strip()
        if "\x00" in value:
            raise EnvFileError(f"{where}:{number}: NUL byte in the value")
        out[name] = value
    return out


def _quoted(rest: str, lines: list[str], i: int, where: str, number: int) -> tuple[str, int]:
    """The value of a quoted assignment starting at `rest`, which may continue on the next lines.
    Returns it and the index of the line after it."""
    quote = rest[0]
    text = rest[1:]
    value: list[str] = []
    while True:
        j = 0
        while j < len(text):
            ch = text[j]
            if ch == quote:
                tail = text[j + 1 :].strip()
                if tail and not tail.startswith("#"):
                    raise EnvFileError(f"{where}:{number}: text after the closing quote: {tail!r}")
                return "".join(value), i
            if ch == "\\" and quote == '"' and j + 1 < len(text) and text[j + 1] in _ESCAPES:
                value.append(_ESCAPES[text[j + 1]])
                j += 2
                continue
            value.append(ch)
            j += 1
        if i >= len(lines):
            kind = "double" if quote == '"' else "single"
            raise EnvFileError(f"{where}:{number}: the {kind} quote is never closed")
        value.append("\n")  # the value goes on past the end of this line
        text = lines[i]
        i += 1
