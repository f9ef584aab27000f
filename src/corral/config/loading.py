"""corral.toml -> Config: the file read into the model, with every problem it has listed at once.

Loading only checks what each key holds on its own (a known key in the right table, a value of the
right type); what the values say together is config.validation's job. Paths in the file are taken
relative to the file, not to wherever corral runs.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from pathlib import Path
from typing import Any

from .derived import normalize_route
from .model import AppConfig, Config, ConfigError, ServerConfig, base_type, fields_of


def load_toml(path: str | Path, strict: bool = True) -> Config:
    """Read corral.toml. Unreadable files always raise; other problems raise when strict, else they
    wait in cfg.load_problems so that validate() can list them together with its own."""
    path = Path(path)
    data = _read(path)
    where = str(path)
    problems: list[str] = []
    for key in data:
        if key not in ("server", "app"):
            problems.append(f"{where}: {key}: {_misplaced(key, None) or _unknown('section', key, ['server', 'app'])}")
    server = build_section(ServerConfig, data.get("server", {}), f"{where}: server", problems)
    cfg = Config(server=server, apps=_build_apps(data.get("app", []), where, problems), source=where)
    base = path.resolve().parent
    for name in ("tls_cert", "tls_key"):
        value = getattr(server, name)
        if isinstance(value, str) and not os.path.isabs(value):
            setattr(server, name, os.path.normpath(base / value))
    for app in cfg.apps:
        _anchor_paths(app, base)
        if app.route.startswith("/"):  # any other route is kept as written, for validate's message
            app.route = normalize_route(app.route)
    if problems and strict:
        raise ConfigError(problems)
    cfg.load_problems = problems
    return cfg


def _read(path: Path) -> dict[str, Any]:
    """The file's TOML; a file that cannot be read as TOML at all raises, since there is nothing to check."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{path}: is a directory, not a corral.toml"]) from None
    except (tomllib.TOMLDecodeError, ValueError) as exc:  # ValueError: an integer of more than 4300 digits
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None


def _build_apps(raw: Any, where: str, problems: list[str]) -> list[AppConfig]:
    """The [[app]] tables, each labelled by its name (or its position when it has none) in messages."""
    if isinstance(raw, dict):
        raw = [raw]  # a lone [app] table: read it as the one [[app]]
    if not isinstance(raw, list):
        problems.append(f"{where}: app: must be [[app]] tables (got {raw!r})")
        raw = []
    apps = []
    for i, table in enumerate(raw):
        name = table.get("name") if isinstance(table, dict) else None
        label = name if isinstance(name, str) else f"#{i + 1}"
        apps.append(build_section(AppConfig, table, f"{where}: app '{label}'", problems))
    return apps


def _anchor_paths(app: AppConfig, base: Path) -> None:
    """Relative paths in the file are relative to the file (its directory `base`), not to the cwd."""
    if app.plumber and not os.path.isabs(app.plumber):
        app.plumber = os.path.normpath(base / app.plumber)
    if app.shiny and not os.path.isabs(app.shiny):
        app.shiny = os.path.normpath(base / app.shiny)
    if app.env_file and not os.path.isabs(app.env_file):
        app.env_file = os.path.normpath(base / app.env_file)
    app.watch_paths = [p if os.path.isabs(p) else os.path.normpath(base / p) for p in app.watch_paths]


def build_section(cls: type, raw: Any, where: str, problems: list[str]) -> Any:
    """One table as a `cls` (ServerConfig or AppConfig). A key that cannot be used is listed in
    `problems` and keeps its default, so the rest can still be checked."""
    obj = cls()
    if not isinstance(raw, dict):
        problems.append(f"{where}: must be a table")
        return obj
    names = [f.name for f in fields_of(cls)]
    for key, value in raw.items():
        if key not in names:
            problems.append(f"{where}: {key}: {_misplaced(key, cls) or _unknown('key', key, names)}")
            continue
        err = _coerce_check(cls, key, value)
        if err:
            problems.append(f"{where}: {key}: {err}")
        else:
            setattr(obj, key, float(value) if base_type(cls, key) is float else value)
    return obj


def _unknown(what: str, key: str, names: list[str]) -> str:
    """Why `key` is not one of `names`, with the likely fix: CLI spelling (dashes) or a near miss."""
    if key.replace("-", "_") in names:
        return f"unknown {what} (keys use underscores: '{key.replace('-', '_')}')"
    return f"unknown {what}{_did_you_mean(key, names)}"


def _misplaced(key: str, cls: type | None) -> str | None:
    """A real key in the wrong table is the commonest slip: say where it goes."""
    if cls is not ServerConfig and key in {f.name for f in fields_of(ServerConfig)}:
        return "belongs in [server]"
    if cls is not AppConfig and key in {f.name for f in fields_of(AppConfig)}:
        return "belongs in an [[app]] table"
    return None


def _coerce_check(cls: type, key: str, value: Any) -> str | None:
    """Why `value` cannot be the knob's value, or None. TOML's integers are taken for a float knob,
    but a bool is never taken for an integer (in Python it is one)."""
    want = base_type(cls, key)
    if want is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            float(value)
        except OverflowError:
            return f"must be a finite number (got an integer of {len(str(value))} digits)"
        return None
    if want is int and isinstance(value, bool):
        return f"must be an integer (got {value!r})"
    if not isinstance(value, want):
        return f"must be {type_word(want)} (got {value!r})"
    if want is list and not all(isinstance(v, str) for v in value):
        return f"must be a list of strings (got {value!r})"
    if want is dict:
        for k, v in value.items():
            if not isinstance(v, str):
                return f'{k}: must be a string (got {v!r}); quote it: {k} = "{v}"'
    return None


def type_word(t: type) -> str:
    """A type as a message names it to someone writing TOML: bool -> 'true or false'."""
    return {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        list: "a list",
        dict: "a table",
    }.get(t, t.__name__)


def _did_you_mean(key: str, names: list[str]) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
