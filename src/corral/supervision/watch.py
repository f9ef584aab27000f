"""--watch (development): a rolling reload of an app when its files change, as gunicorn's --reload.

What is watched (`watch_plan`):

* a plumber/plumber2 app: its directory tree, for R sources (`*.R`), YAML (`_server.yml`, config files)
  and `.Renviron`: not data files the app may write there (a reload loop otherwise);
* a command: the directory tree corral runs in (the workers' working directory), every file except
  version control, caches, editor swap files, `*.log` and corral's own access log and `--log-dir`;
* `watch_paths` instead, when given: every file under them (the same exceptions);
* always the app's `env_file`.

Changes are debounced (an editor's save is several events; a `git checkout` many more) and each batch is
one `Supervisor.reload()`: the same surge-one rolling reload as `corral reload`, so a change whose new
workers fail to start (an R syntax error) is aborted there and the old workers keep serving.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass

from ..config import AppConfig, ServerConfig, resolve_plumber, resolve_shiny
from ..logs import say, warn
from ..portable import paths as platform_paths

DEBOUNCE_MS = 1600  # a batch of changes is cut after this long at most...
STEP_MS = 100  # ...or once no new change has come for this long
RUST_TIMEOUT_MS = 1000  # the watch thread looks up this often, so a stop never waits on it for long
R_SUFFIXES = (".r", ".yml", ".yaml")
R_NAMES = (".Renviron",)
IGNORE_DIRS = (
    "__pycache__", ".git", ".hg", ".svn", ".tox", ".venv", "venv", ".idea", ".vscode", "node_modules",
    ".mypy_cache", ".pytest_cache", ".ruff_cache", ".hypothesis", ".Rproj.user", "renv", "packrat",
)  # fmt: skip
IGNORE_NAMES = (
    r"\.py[cod]$", r"\.sw.$", r"~$", r"^\.#", r"^\.DS_Store$", r"^flycheck_", r"\.___jb_...___$", r"\.tmp$",
    r"\.log$", r"^\.Rhistory$", r"^\.RData$",
)  # fmt: skip


@dataclass
class WatchPlan:
    paths: list[str]  # what the watcher is given: directories (recursive) and files
    counts: Callable[[str], bool]  # whether a change to this path means a reload


def watch_plan(app: AppConfig, server: ServerConfig, cwd: str | None = None) -> WatchPlan:
    from watchfiles import Change, DefaultFilter

    ignore_paths = [p for p in (server.log_dir, server.access_log) if p and p != "-"]
    base = DefaultFilter(
        ignore_dirs=IGNORE_DIRS,
        ignore_entity_patterns=IGNORE_NAMES,
        ignore_paths=[os.path.abspath(p) for p in ignore_paths],
    )
    env_file = os.path.abspath(app.env_file) if app.env_file else None
    source = _r_app_dir(app)
    if app.watch_paths:
        roots, r_only = [os.path.abspath(p) for p in app.watch_paths], False
    elif source is not None:
        roots, r_only = [source], True
    else:
        roots, r_only = [os.path.abspath(cwd or os.getcwd())], False

    def counts(path: str) -> bool:
        if path == env_file:
            return True
        if not base(Change.modified, path):
            return False
        if not r_only:
            return True
        name = os.path.basename(path)
        return name.lower().endswith(R_SUFFIXES) or name in R_NAMES

    paths = list(roots)
    if env_file is not None and not any(_under(env_file, r) for r in roots):
        paths.append(env_file)
    return WatchPlan(paths, counts)


def _r_app_dir(app: AppConfig) -> str | None:
    """The directory of a plumber, plumber2 or Shiny app: where its sources live."""
    target = resolve_plumber(app.plumber) if app.plumber else resolve_shiny(app.shiny) if app.shiny else None
    if target is None:
        return None
    return str(target if target.is_dir() else target.parent)


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class Watcher:
    """Reloads one app (`reload`: its supervisor's) after each debounced batch of changes that count."""

    def __init__(self, app: AppConfig, server: ServerConfig, reload: Callable[[], str]) -> None:
        self.app = app
        self.plan = watch_plan(app, server)
        self.reload = reload

    async def run(self) -> None:
        """Never raises: a watcher that cannot watch (a path gone, polling that fails too) says so and ends;
        the app goes on being served."""
        try:
            await self._watch()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            warn(f"corral: watch: app {self.app.name}: stopped watching: {type(exc).__name__}: {exc}")

    async def _watch(self) -> None:
        paths = [p for p in self.plan.paths if os.path.exists(p)]
        for gone in sorted(set(self.plan.paths) - set(paths)):
            warn(f"corral: watch: app {self.app.name}: {gone} does not exist; not watched")
        if not paths:
            return
        how = platform_paths().file_watch
        try:
            await self._batches(paths, how)
        except (OSError, RuntimeError) as exc:
            if how == "polling":
                raise
            # The OS's notifier can run out (inotify's per-user watch and instance limits) or be missing in a
            # container or a network file system: polling reads the tree's modification times instead.
            warn(f"corral: watch: app {self.app.name}: {how} failed ({exc}); polling instead")
            await self._batches(paths, "polling")

    async def _batches(self, paths: list[str], how: str) -> None:
        from watchfiles import awatch

        say(f"corral: watch: app {self.app.name}: watching {', '.join(paths)} for changes ({how})")
        counts = self.plan.counts
        async for changes in awatch(
            *paths,
            watch_filter=lambda _change, path: counts(path),
            debounce=DEBOUNCE_MS,
            step=STEP_MS,
            rust_timeout=RUST_TIMEOUT_MS,
            ignore_permission_denied=True,
            force_polling=how == "polling",
        ):
            changed = sorted({self._show(path) for _change, path in changes})
            shown = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
            say(f"corral: watch: app {self.app.name}: {shown} changed; {self.reload()}")

    def _show(self, path: str) -> str:
        for root in self.plan.paths:
            if _under(path, root) and path != root:
                return os.path.relpath(path, root)
        return path
