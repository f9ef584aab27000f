"""The `corral` command. `run` options are generated from the configuration model (config.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from . import config as C
from . import control
from .config import AppConfig, Config, ConfigError, ServerConfig
from .launch import preflight


class Invalid:
    """A knob value from the command line that is not a number: reported with the config's other problems."""

    def __init__(self, raw: str, want: type) -> None:
        self.raw = raw
        self.want = want


class _Knob(click.ParamType):
    """int or float that never fails in click (whose errors are a usage screen, not one line): a value
    that does not parse becomes Invalid, and build_config reports it in the config's own words. Ranges,
    non-finite floats and choices are checked by config.validate, like the same keys in corral.toml."""

    def __init__(self, want: type) -> None:
        self.want = want
        self.name = want.__name__

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, self.want) and not isinstance(value, bool):
            return value
        try:
            return self.want(value)
        except (TypeError, ValueError):  # ValueError also for integers of more than 4300 digits
            return Invalid(str(value), self.want)


def _knob_options(cls: type) -> list[click.Option]:
    opts = []
    for f in C.fields_of(cls):
        m = f.metadata
        if not m["cli"]:
            continue
        decls = [C.option_name(f.name)]
        if m["short"]:
            decls.insert(0, m["short"])
        unit = f" [{m['unit']}]" if m["unit"] else ""
        if m["flag"]:
            opts.append(click.Option([f"{decls[-1]}/--no-{f.name.replace('_', '-')}"], default=None, help=m["help"]))
            continue
        t = C.base_type(cls, f.name)
        ctype: Any = _Knob(t) if t in (int, float) else str
        bounds = f" [{C.range_text(f)}]" if m["minimum"] is not None else unit
        metavar = "[" + "|".join(m["choices"]) + "]" if m["choices"] else ""
        opts.append(click.Option(decls, type=ctype, default=None, help=m["help"] + bounds, metavar=metavar))
    return opts


def _with_knobs(fn: Any) -> Any:
    for opt in reversed(_knob_options(ServerConfig) + _knob_options(AppConfig)):
        fn.__click_params__ = [*getattr(fn, "__click_params__", []), opt]
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="corral")
def cli() -> None:
    """corral: run N copies of a single-threaded web API behind one port, with a central queue."""


@cli.command(context_settings={"ignore_unknown_options": False})
@click.argument("app_or_command", nargs=-1, type=click.UNPROCESSED)
@click.option("-c", "--config", "config_path", metavar="FILE", help="corral.toml to load")
@click.option(
    "--upstream",
    "upstreams",
    multiple=True,
    metavar="HOST:PORT[-PORT]",
    help="balance workers corral does not start (repeatable)",
)
@click.option("--name", default=None, help="app name for logs and metrics (default: from APP)")
@click.option("--supervise-only", is_flag=True, help="run and supervise the workers without the balancer")
@_with_knobs
def run(
    app_or_command: tuple[str, ...],
    config_path: str | None,
    upstreams: tuple[str, ...],
    name: str | None,
    supervise_only: bool,
    **knobs: Any,
) -> None:
    """Start workers and balance one port across them.

    \b
      corral run -w 4 app/plumber.R
      corral run -w 4 -- python3 my_server.py {port}
      corral run -c corral.toml
    """
    try:
        cfg = build_config(app_or_command, config_path, upstreams, name, knobs)
    except ConfigError as exc:
        for p in exc.problems:
            click.echo(f"corral: {p}", err=True)
        sys.exit(2)
    sys.exit(serve(cfg, balance=not supervise_only))


def build_config(
    args: tuple[str, ...],
    config_path: str | None,
    upstreams: tuple[str, ...],
    name: str | None,
    knobs: dict[str, Any],
) -> Config:
    cfg = C.load_toml(config_path, strict=False) if config_path else Config()
    given = {k: v for k, v in knobs.items() if v is not None}
    # Options that are not numbers at all: reported first, in the same one-line style, with the rest.
    bad = [
        f"command line: {C.option_name(k)}: must be {C._type_word(v.want)} (got {v.raw!r})"
        for k, v in given.items()
        if isinstance(v, Invalid)
    ]
    given = {k: v for k, v in given.items() if not isinstance(v, Invalid)}
    server_keys = {f.name for f in C.fields_of(ServerConfig)}
    for key, value in given.items():
        if key in server_keys:
            setattr(cfg.server, key, value)
    if args or upstreams or not cfg.apps:
        try:
            cfg.apps = [_app_from_args(args, upstreams, name)]
        except ConfigError as exc:
            raise ConfigError(bad + exc.problems) from None
    elif len(cfg.apps) > 1 and any(k not in server_keys for k in given):
        raise ConfigError([*bad, f"{cfg.source}: per-app options on the command line need a single [[app]]"])
    for app in cfg.apps[:1] if len(cfg.apps) == 1 else []:
        for key, value in given.items():
            if key not in server_keys:
                setattr(app, key, value)
        if name:
            app.name = name
    problems = bad + C.validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def _app_from_args(args: tuple[str, ...], upstreams: tuple[str, ...], name: str | None) -> AppConfig:
    app = AppConfig()
    if upstreams:
        if args:
            raise ConfigError(["command line: give either --upstream or an APP/command, not both"])
        app.upstreams = list(upstreams)
    elif len(args) == 1 and (args[0].lower().endswith(".r") or Path(args[0]).is_dir()):
        app.plumber = args[0]
    elif args:
        app.command = list(args)
    else:
        raise ConfigError(
            [
                "command line: nothing to run: give APP (a plumber .R file), a command after --, "
                "--upstream, or -c corral.toml"
            ]
        )
    app.name = name or _default_name(app)
    return app


def _default_name(app: AppConfig) -> str:
    if app.plumber:
        p = Path(app.plumber)
        return (p.parent.name if p.stem in ("plumber", "entrypoint") else p.stem) or "app"
    if app.command:
        return Path(app.command[0]).name
    return "upstream"


def serve(cfg: Config, balance: bool = True) -> int:
    import uvloop

    from .server import Corral, StartupError

    problems = launch_problems(cfg)
    for problem in problems:
        click.echo(f"corral: {problem}", err=True)
    if problems:
        return 2
    corral = Corral(cfg, balance=balance)
    try:
        sock = corral.preflight()
    except StartupError as exc:
        click.echo(f"corral: {exc}", err=True)
        return 2
    return uvloop.run(corral.run(sock))


def launch_problems(cfg: Config) -> list[str]:
    """What would stop an app's workers from starting at all: no R, no such command."""
    out = []
    for app in cfg.apps:
        why = preflight(app)
        if why:
            out.append(f"{cfg.source}: app '{app.name}': {why}")
    return out


def load_checked(config_path: str) -> Config:
    """corral.toml loaded and validated, or ConfigError with every problem found."""
    cfg = C.load_toml(config_path, strict=False)
    problems = C.validate(cfg)
    if not problems:
        problems = launch_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def _summary(cfg: Config, app: AppConfig) -> str:
    if app.upstreams:
        n = sum(len(C.parse_upstream(s)) for s in app.upstreams)
        return f"{app.name} {app.route} -> {n} upstream{'s' * (n != 1)}"
    ports = C.worker_ports(cfg, app)
    span = f"{ports[0]}-{ports[-1]}" if len(ports) > 1 else str(ports[0])
    what = f"plumber {app.plumber}" if app.plumber else " ".join(app.command)
    n = len(ports)
    return f"{app.name} {app.route} -> {n} worker{'s' * (n != 1)} on {app.worker_host}:{span} ({what})"


def _load_or_exit(config_path: str) -> Config:
    """The checked config, or every problem on stderr and exit 2."""
    try:
        return load_checked(config_path)
    except ConfigError as exc:
        for p in exc.problems:
            click.echo(p, err=True)
        sys.exit(2)


@cli.command()
@click.option("-c", "--config", "config_path", required=True, metavar="FILE")
def check(config_path: str) -> None:
    """Validate a corral.toml: exit 0 with a one-line summary, or 2 with every problem listed."""
    cfg = _load_or_exit(config_path)
    apps = "; ".join(_summary(cfg, a) for a in cfg.apps)
    n = len(cfg.apps)
    click.echo(f"{config_path}: ok: {n} app{'s' * (n != 1)} on {cfg.server.host}:{cfg.server.port}: {apps}")


@cli.command()
@click.argument("kind", type=click.Choice(["nginx", "haproxy", "systemd"]))
@click.option("-c", "--config", "config_path", required=True, metavar="FILE")
@click.option("--supervise-only", is_flag=True, help="systemd: a unit for the workers only (nginx/HAProxy in front)")
def export(kind: str, config_path: str, supervise_only: bool) -> None:
    """Print an nginx conf.d file, a haproxy.cfg or a systemd unit for the apps in corral.toml.

    \b
      corral export nginx -c corral.toml > /etc/nginx/conf.d/corral.conf
      corral export haproxy -c corral.toml > /etc/haproxy/haproxy.cfg
      corral export systemd -c corral.toml > /etc/systemd/system/corral.service
    """
    from . import export as X

    cfg = _load_or_exit(config_path)
    if kind == "systemd":
        click.echo(X.systemd(cfg, supervise_only), nl=False)
    else:
        click.echo(X.EXPORTERS[kind](cfg), nl=False)


for _verb in control.COMMANDS:  # status, reload, scale, stop: talk to a running corral's admin channel
    cli.add_command(_verb)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
