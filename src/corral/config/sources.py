"""An app's source files: the plumber file or directory, the Shiny app directory, and the near miss
to suggest when a path names nothing.

What counts as each mirrors what plumber, plumber2 and shiny::runApp accept: workers are launched on
what these find, and `corral check` refuses a path where they find nothing, before a worker fails on it.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

SERVER_YML = ("_server.yml", "_server.yaml")  # the R server description plumber2 reads (its `engine:` names it)


def resolve_plumber(path: str) -> Path | None:
    """A .R file, a plumber2 `_server.yml`, or a directory with plumber.R, entrypoint.R or _server.yml."""
    p = Path(path)
    if p.is_file() and (p.suffix.lower() == ".r" or p.name in SERVER_YML):
        return p.resolve()
    if p.is_dir() and any((p / name).is_file() for name in ("plumber.R", "entrypoint.R", *SERVER_YML)):
        return p.resolve()
    return None


_SHINY_CALL = re.compile(r"\bshinyApp\s*\(")  # also shiny::shinyApp(


def resolve_shiny(path: str) -> Path | None:
    """A Shiny app directory, as shiny::runApp reads one: app.R that builds a shinyApp(...) (its last
    value), or the older ui.R + server.R pair. None for anything else, plumber directories included."""
    p = Path(path)
    if not p.is_dir():
        return None
    if (p / "ui.R").is_file() and (p / "server.R").is_file():
        return p.resolve()
    app = p / "app.R"
    if app.is_file():
        try:
            text = app.read_text(errors="replace")
        except OSError:
            return None
        if _SHINY_CALL.search(text):
            return p.resolve()
    return None


def near_file(path: str) -> str:
    """' (did you mean 'plumber.R'?)' when a file or directory next to a missing `path` is a near miss."""
    p = Path(path)
    parent = p.parent
    try:
        names = [e.name for e in parent.iterdir()] if parent.is_dir() else []
    except OSError:
        return ""
    close = difflib.get_close_matches(p.name, names, n=1, cutoff=0.7)
    if not close:
        return ""
    shown = close[0] if str(parent) in (".", "") else str(parent / close[0])
    return f" (did you mean '{shown}'?)"
