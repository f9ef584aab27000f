"""The `corral` command. `run` options are generated from the configuration model (config/model.py)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import click

from .. import config as C
from ..config import AppConfig, Config, ConfigError, ServerConfig
from ..supervision.launch import preflight, transport
from . import verbs

ENV_PREFIX = "CORRAL_"  # every option of run/check/export can also come from CORRAL_<OPTION> (containers)


class Invalid:
    """A knob value from the command line that is not a number: reported with the config's other problems."""

    def __init__(self, raw: str, want: type, where: str | None = None) -> None:
        self.raw = raw
        self.want = want
        self.where = where  # "environment: CORRAL_WORKERS" when it came from there


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
            where = None
            source = ctx.get_parameter_source(param.name) if ctx is not None and param and param.name else None
            if source is click.core.ParameterSource.ENVIRONMENT and param is not None:
                where = f"environment: {param.envvar}"
            return Invalid(str(value), self.want, where)


# Value placeholders in `run --help`: by what the knob holds, else by unit, else by type.
UNIT_METAVARS = {"s": "SECONDS", "bytes": "BYTES", "MB": "MB", "lines": "N"}
METAVARS = {
    "port": "PORT",
    "base_port": "PORT",
    "host": "HOST",
    "admin": "ADDR",
    "admin_token": "TOKEN",
    "health_listen": "HOST:PORT",
    "access_log": "PATH|-",
    "log_dir": "DIR",
    "env_file": "FILE",
    "health_path": "PATH",
    "worker_host": "IP",
    "trusted_proxies": "CIDR,...",
    "crash_limit": "K/T",
}


def _metavar(cls: type, f: Any) -> str:
    m = f.metadata
    if m["choices"]:
        return "[" + "|".join(m["choices"]) + "]"
    if f.name in METAVARS:
        return METAVARS[f.name]
    if m["unit"] in UNIT_METAVARS:
        return UNIT_METAVARS[m["unit"]]
    t = C.base_type(cls, f.name)
    if t is int:
        return "N"
    if t is float:
        return "NUMBER"
    return f.name.upper()


def _default_text(f: Any) -> str:
    """` [default: 30 s]` for help, from the field (options themselves default to None: 'not given')."""
    d = f.default
    if d is None or d == "" or d is dataclasses.MISSING or isinstance(d, bool):
        return ""
    if isinstance(d, (int, float)):
        d = C.unit_text(d, f.metadata["unit"]) if f.metadata["unit"] in ("s", "bytes") else C.plain_number(d)
    return f" [default: {d}]"


def _knob_options(cls: type) -> list[click.Option]:
    opts = []
    for f in C.fields_of(cls):
        m = f.metadata
        if not m["cli"]:
            continue
        decls = [C.option_name(f.name)]
        if m["short"]:
            decls.insert(0, m["short"])
        env = {"envvar": ENV_PREFIX + f.name.upper(), "show_envvar": True}
        if m["flag"]:
            flag = f"{decls[-1]}/--no-{f.name.replace('_', '-')}"
            opts.append(click.Option([flag], default=None, help=m["help"] + _default_text(f), **env))
            continue
        t = C.base_type(cls, f.name)
        ctype: Any = _Knob(t) if t in (int, float) else str
        unit = f" [{m['unit']}]" if m["unit"] else ""
        bounds = f" [{C.range_text(f)}]" if m["minimum"] is not None else unit
        help_text = m["help"] + bounds + _default_text(f)
        opts.append(click.Option(decls, type=ctype, default=None, help=help_text, metavar=_metavar(cls, f), **env))
    return opts


def _with_knobs(fn: Any) -> Any:
    for opt in reversed(_knob_options(ServerConfig) + _knob_options(AppConfig)):
        fn.__click_params__ = [*getattr(fn, "__click_params__", []), opt]
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="corral")
def cli() -> None:
    """corral: run N copies of a single-threaded web API behind one port, with a central queue."""


class RunCommand(click.Command):
    """run, check and export: a command's own options must follow `--`, or corral reads them as its own;
    say so, with the command line fixed, instead of click's 'no such option'."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        hint = _dash_hint(self, ctx.info_name or "run", args)
        if hint:
            raise click.UsageError(hint, ctx)
        return super().parse_args(ctx, args)


def _dash_hint(cmd: click.Command, verb: str, args: list[str]) -> str | None:
    """A hint when an option follows a command given without `--` (`corral run python3 -m http.server`)."""
    if "--" in args:
        return None
    takes_value = {
        o for p in cmd.params if isinstance(p, click.Option) and not p.is_flag and not p.count for o in p.opts
    }
    fixed = sum(1 for p in cmd.params if isinstance(p, click.Argument) and p.nargs == 1)  # export's KIND
    i, seen = 0, 0
    while i < len(args):
        a = args[i]
        if a.startswith("-") and len(a) > 1:
            i += 2 if a in takes_value else 1
            continue
        if seen == fixed:
            break
        seen += 1
        i += 1
    if i >= len(args) or _looks_like_app(args[i]):
        return None  # no command, or an APP file / directory: options after it are corral's (run app.R -w 4)
    if not any(a.startswith("-") and len(a) > 1 for a in args[i + 1 :]):
        return None
    fixed_line = " ".join(["corral", verb, *args[:i], "--", *args[i:]])
    return f"the command's options would be read as corral's: put -- before the command:\n  {fixed_line}"


def _looks_like_app(arg: str) -> bool:
    p = Path(arg)
    return arg.lower().endswith(".r") or p.is_dir() or p.name in C.SERVER_YML


def _run_options(fn: Any) -> Any:
    """The flags of `corral run`, shared by check and export: the same config, the same CORRAL_* names."""
    env = {"show_envvar": True}
    for deco in (
        _with_knobs,
        click.option(
            "--supervise-only",
            is_flag=True,
            envvar="CORRAL_SUPERVISE_ONLY",
            help="run and supervise the workers without the balancer (export systemd: a unit for the workers)",
            **env,
        ),
        click.option(
            "--name",
            default=None,
            envvar="CORRAL_NAME",
            metavar="NAME",
            help="app name for logs and metrics (default: from APP); export kubernetes: the objects' name",
            **env,
        ),
        click.option(
            "--upstream",
            "upstreams",
            multiple=True,
            envvar="CORRAL_UPSTREAM",
            metavar="HOST:PORT[-PORT]",
            help="balance workers corral does not start (repeatable)",
            **env,
        ),
        click.option(
            "-c", "--config", "config_path", envvar="CORRAL_CONFIG", metavar="FILE", help="corral.toml to load", **env
        ),
        click.argument("app_or_command", nargs=-1, type=click.UNPROCESSED),
    ):
        fn = deco(fn)
    return fn


@cli.command(cls=RunCommand, context_settings={"ignore_unknown_options": False})
@_run_options
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
      corral run -w 4 shiny-app/              (app.R calling shinyApp(), or ui.R + server.R)
      corral run -w 4 -- python3 my_server.py {port}
      corral run -c corral.toml
      corral run                  (plumber.R or entrypoint.R in this directory)

    Every option can also be set as CORRAL_<OPTION> (CORRAL_WORKERS=4, CORRAL_QUEUE_TIMEOUT=10);
    the command line wins.
    """
    if not (app_or_command or upstreams or config_path):
        here = _app_here()
        if here is not None:
            click.echo(f"corral: no APP given: serving {here[1]} ({here[0]})")
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
        f"{v.where or 'command line: ' + C.option_name(k)}: must be {C.type_word(v.want)} (got {v.raw!r})"
        for k, v in given.items()
        if isinstance(v, Invalid)
    ]
    given = {k: v for k, v in given.items() if not isinstance(v, Invalid)}
    server_keys = {f.name for f in C.fields_of(ServerConfig)}
    for key, value in given.items():
        if key in server_keys:
            setattr(cfg.server, key, value)
    if args or upstreams or not (cfg.apps or config_path):  # a corral.toml without apps: validate says so
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
    elif len(args) == 1 and Path(args[0]).is_dir() and C.resolve_plumber(args[0]) is None and C.resolve_shiny(args[0]):
        app.shiny = args[0]  # a Shiny app directory: recognised by its files, no option needed
    elif len(args) == 1 and (args[0].lower().endswith(".r") or Path(args[0]).is_dir() or _is_server_yml(args[0])):
        app.plumber = args[0]
    elif args:
        app.command = list(args)
    elif (here := _app_here()) is not None:
        setattr(app, here[0], here[1])  # `corral run` in the app's directory, as `Rscript -e 'plumber::pr_run()'`
    else:
        raise ConfigError(
            [
                f"command line: nothing to run: no plumber.R or entrypoint.R here ({Path.cwd()}); "
                "give APP (a plumber .R file or a Shiny app directory), a command after --, --upstream, "
                "or -c corral.toml"
            ]
        )
    app.name = name or _default_name(app)
    return app


def _app_here() -> tuple[str, str] | None:
    """("plumber" | "shiny", this directory) when it holds an app `corral run` can serve without APP."""
    cwd = str(Path.cwd())
    if C.resolve_plumber(cwd) is not None:
        return "plumber", cwd
    if C.resolve_shiny(cwd):
        return "shiny", cwd
    return None


def _is_server_yml(arg: str) -> bool:
    """plumber2's _server.yml given as the app: a plumber app run through plumber2 (launch.r_engine)."""
    return Path(arg).name in C.SERVER_YML and Path(arg).is_file()


def _default_name(app: AppConfig) -> str:
    if app.plumber:
        p = Path(app.plumber)
        return (p.parent.name if p.stem in ("plumber", "entrypoint", "_server") else p.stem) or "app"
    if app.shiny:
        return Path(app.shiny).resolve().name or "app"
    if app.command:
        return Path(app.command[0]).name
    return "upstream"


def serve(cfg: Config, balance: bool = True) -> int:
    from ..server import Corral, StartupError

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
    try:
        run = event_loop_runner(cfg.server.loop, corral)
    except RuntimeError as exc:
        if sock is not None:
            sock.close()
        click.echo(f"corral: {exc}", err=True)
        return 2
    return run(corral.run(sock))


def event_loop_runner(setting: str, corral: Any) -> Any:
    """uvloop.run or asyncio.run, by the `loop` knob (corral.portable.choose_loop); the reason for asyncio's
    loop goes to the start line. RuntimeError: `--loop uvloop` without uvloop installed."""
    import asyncio

    from .. import portable

    try:
        import uvloop
    except ImportError:
        uvloop = None
    loop, why = portable.choose_loop(setting, uvloop is not None)
    corral.loop_why = why
    if loop == "asyncio":
        return asyncio.run
    if uvloop is None:
        raise RuntimeError("--loop uvloop: uvloop is not installed (pip install uvloop), or use --loop asyncio")
    return uvloop.run


def launch_problems(cfg: Config) -> list[str]:
    """What would stop an app's workers from starting at all: no R, no such command."""
    out = []
    for app in cfg.apps:
        why = preflight(app)
        if why and len(app.command) == 1 and "not found" in why:
            why += C.near_file(app.command[0])  # `corral run plumbr`: a misspelt file, not a command
        if why:
            out.append(f"{cfg.source}: app '{app.name}': {why}")
    return out


def _summary(cfg: Config, app: AppConfig) -> str:
    if app.upstreams:
        n = sum(len(C.parse_upstream(s)) for s in app.upstreams)
        return f"{app.name} {app.route} -> {n} upstream{'s' * (n != 1)}"
    ports = C.worker_ports(cfg, app)
    span = f"{ports[0]}-{ports[-1]}" if len(ports) > 1 else str(ports[0])
    what = f"plumber {app.plumber}" if app.plumber else f"shiny {app.shiny}" if app.shiny else " ".join(app.command)
    n = len(ports)
    where = "unix sockets" if transport(app) == "unix" else f"{app.worker_host}:{span}"
    zero = " (0 when idle: min_workers 0)" if C.scales_to_zero(app) else ""
    return f"{app.name} {app.route} -> {n} worker{'s' * (n != 1)}{zero} on {where} ({what})"


def _checked_or_exit(
    args: tuple[str, ...], config_path: str | None, upstreams: tuple[str, ...], name: str | None, knobs: dict[str, Any]
) -> Config:
    """The config `corral run` would build from the same flags, checked (R and commands included), or
    every problem on stderr and exit 2."""
    try:
        cfg = build_config(args, config_path, upstreams, name, knobs)
        problems = launch_problems(cfg)
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        for p in exc.problems:
            click.echo(p, err=True)
        sys.exit(2)
    return cfg


@cli.command(cls=RunCommand)
@_run_options
def check(
    app_or_command: tuple[str, ...],
    config_path: str | None,
    upstreams: tuple[str, ...],
    name: str | None,
    supervise_only: bool,
    **knobs: Any,
) -> None:
    """Validate what `corral run` with the same flags would run: exit 0 with a one-line summary, or 2
    with every problem listed.

    \b
      corral check -c corral.toml
      corral check -w 4 app/plumber.R
    """
    cfg = _checked_or_exit(app_or_command, config_path, upstreams, name, knobs)
    if supervise_only:
        problems = C.supervise_only_problems(cfg)
        for problem in problems:
            click.echo(f"{config_path or cfg.source}: {problem}", err=True)
        if problems:
            sys.exit(2)
    apps = "; ".join(_summary(cfg, a) for a in cfg.apps)
    n = len(cfg.apps)
    where = config_path or cfg.source
    click.echo(f"{where}: ok: {n} app{'s' * (n != 1)} on {cfg.server.host}:{cfg.server.port}: {apps}")


def _run_argv(
    ctx: click.Context,
    args: tuple[str, ...],
    config_path: str | None,
    upstreams: tuple[str, ...],
    name: str | None,
    supervise_only: bool,
    knobs: dict[str, Any],
) -> list[str]:
    """The flags of this invocation as `corral run` arguments, for the systemd unit's ExecStart: paths
    that exist made absolute (the unit runs elsewhere), numbers as written in the docs."""
    out: list[str] = []
    if config_path:
        out += ["-c", str(Path(config_path).resolve())]
    for spec in upstreams:
        out += ["--upstream", spec]
    if name:
        out += ["--name", name]
    if supervise_only:
        out.append("--supervise-only")
    for param in ctx.command.params:  # declaration order: stable, whatever order they were typed in
        value = knobs.get(param.name or "")
        if value is None or not isinstance(param, click.Option):
            continue
        if isinstance(value, bool):
            out.append(param.opts[0] if value else param.secondary_opts[0])
        elif isinstance(value, (int, float)):
            out += [param.opts[0], C.plain_number(value)]
        else:
            out += [param.opts[0], str(Path(value).resolve()) if Path(value).exists() else value]
    if len(args) == 1 and _looks_like_app(args[0]):
        out.append(str(Path(args[0]).resolve()))
    elif args:
        out += ["--", *args]
    return out


@cli.command(cls=RunCommand)
@click.argument("kind", type=click.Choice(["nginx", "haproxy", "systemd", "kubernetes"]))
@_run_options
@click.option(
    "--socket",
    "with_socket",
    is_flag=True,
    help="systemd: also a .socket unit; systemd holds the public port, so a restart of corral refuses no connection",
)
@click.option("--image", default="corral-app:latest", show_default=True, help="kubernetes: the container image")
@click.option("--hpa", is_flag=True, help="kubernetes: add a HorizontalPodAutoscaler (CPU)")
@click.option("--replicas", type=click.IntRange(1, 1000), default=2, show_default=True, help="kubernetes: pods")
@click.option("--max-replicas", type=click.IntRange(1, 1000), default=10, show_default=True, help="kubernetes: HPA")
def export(
    kind: str,
    app_or_command: tuple[str, ...],
    config_path: str | None,
    upstreams: tuple[str, ...],
    name: str | None,
    supervise_only: bool,
    with_socket: bool,
    image: str,
    hpa: bool,
    replicas: int,
    max_replicas: int,
    **knobs: Any,
) -> None:
    """Print an nginx conf.d file, a haproxy.cfg, a systemd unit or Kubernetes manifests for corral.toml.

    \b
      corral export nginx -c corral.toml > /etc/nginx/conf.d/corral.conf
      corral export haproxy -c corral.toml > /etc/haproxy/haproxy.cfg
      corral export systemd -c corral.toml > /etc/systemd/system/corral.service
      corral export systemd -w 4 app/plumber.R      (the flags of `corral run`)
      corral export kubernetes -c corral.toml --image my-api:1 --hpa | kubectl apply -f -
    """
    if kind == "kubernetes":
        if not config_path:
            click.echo("corral: export kubernetes: give -c corral.toml (the manifests carry the file)", err=True)
            sys.exit(2)
        _export_kubernetes(config_path, image, hpa, name, replicas, max_replicas)
        return
    from ..exports import formats

    cfg = _checked_or_exit(app_or_command, config_path, upstreams, name, knobs)
    if kind == "systemd":
        ctx = click.get_current_context()
        argv = _run_argv(ctx, app_or_command, config_path, upstreams, name, supervise_only, knobs)
        click.echo(formats.systemd(cfg, supervise_only, run_args=argv, socket=with_socket), nl=False)
    else:
        click.echo(formats.EXPORTERS[kind](cfg), nl=False)


def _export_kubernetes(
    config_path: str, image: str, hpa: bool, name: str | None, replicas: int, max_replicas: int
) -> None:
    """The config is checked as `corral check` does, except for R and commands on this machine: they
    run in the image, not here."""
    from ..exports import kubernetes

    try:
        cfg = C.load_toml(config_path, strict=False)
        problems = C.validate(cfg)
        if problems:
            raise ConfigError(problems)
        text = kubernetes.source_text(config_path)
        click.echo(kubernetes.kubernetes(cfg, text, image, hpa, name, replicas, max_replicas), nl=False)
    except (ConfigError, kubernetes.ExportError) as exc:
        for p in exc.problems:
            click.echo(p, err=True)
        sys.exit(2)


for _verb in verbs.COMMANDS:  # status, reload, scale, stop: talk to a running corral's admin channel
    cli.add_command(_verb)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
