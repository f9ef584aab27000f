"""Start corral and its peers (nginx, HAProxy) in front of a set of upstream ports.

Peer configs live as templates in bench/peers/; `{{NAME}}` placeholders are
filled at run time and the rendered file is written to the run's temp dir next
to the proxy's logs, so a run can be inspected afterwards.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from baseline import CorralBuild
from procs import HOST, Child, Usage, require_free, tree_usage, wait_http
from workers import upstream_spec

PEERS_DIR = Path(__file__).resolve().parent / "peers"
READY_TIMEOUT_S = 30.0

CORRAL_PORT = 19000
NGINX_PORT = 19001
HAPROXY_PORT = 19002
BACKEND_PORT_BASE = 19200

Kind = Literal["corral", "nginx", "haproxy"]


@dataclass(frozen=True)
class ProxySpec:
    name: str
    kind: Kind
    port: int
    template: str | None = None
    corral_args: tuple[str, ...] = ()
    build: CorralBuild | None = None  # corral only: None = the current tree's corral (the harness's command)
    # corral only: run this app on `own_workers` workers of its own instead of balancing the harness's (T6: only
    # a corral that started its workers can tell a kill from outside from a crash, and send a request again)
    app: str | None = None
    own_workers: int = 0


CORRAL = ProxySpec("corral", "corral", CORRAL_PORT)
NGINX = ProxySpec("nginx", "nginx", NGINX_PORT, "nginx-least-conn.conf")
NGINX_RR = ProxySpec("nginx-rr", "nginx", NGINX_PORT, "nginx-rr.conf")
NGINX_KA = ProxySpec("nginx-ka", "nginx", NGINX_PORT, "nginx-keepalive.conf")
HAPROXY = ProxySpec("haproxy", "haproxy", HAPROXY_PORT, "haproxy.cfg")
HAPROXY_KA = ProxySpec("haproxy-ka", "haproxy", HAPROXY_PORT, "haproxy-keepalive.cfg")


def render(template: str, values: dict[str, str]) -> str:
    text = (PEERS_DIR / template).read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    leftover = re.findall(r"\{\{\w+\}\}", text)
    if leftover:
        raise ValueError(f"{template}: unfilled placeholders {sorted(set(leftover))}")
    return text


def server_lines(kind: Kind, ports: Sequence[int]) -> str:
    if kind == "nginx":
        return "\n".join(f"        server {HOST}:{p};" for p in ports)
    return "\n".join(f"    server w{i} {HOST}:{p}" for i, p in enumerate(ports))


@dataclass
class RunningProxy:
    spec: ProxySpec
    child: Child

    @property
    def port(self) -> int:
        return self.spec.port

    @property
    def pid(self) -> int:
        return self.child.pid

    def usage(self) -> Usage:
        return tree_usage(self.child.pid)


def _nginx_argv(conf: Path, prefix: Path) -> list[str]:
    return [
        "nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log"),
        "-g", f"daemon off; pid {prefix}/nginx.pid;",
    ]  # fmt: skip


def _peer_child(spec: ProxySpec, upstream_ports: Sequence[int], workdir: Path, health_path: str) -> Child:
    assert spec.template is not None
    conf = workdir / spec.template
    conf.write_text(
        render(
            spec.template,
            {
                "PREFIX": str(workdir),
                "HOST": HOST,
                "LISTEN": str(spec.port),
                "SERVERS": server_lines(spec.kind, upstream_ports),
                "HEALTH_PATH": health_path,
            },
        )
    )
    argv = _nginx_argv(conf, workdir) if spec.kind == "nginx" else ["haproxy", "-f", str(conf), "-db"]
    return Child(spec.name, argv, workdir / f"{spec.name}.log")


def _corral_child(
    spec: ProxySpec,
    upstream_ports: Sequence[int],
    workdir: Path,
    build: CorralBuild,
    health_path: str,
    user_args: Sequence[str],
) -> Child:
    workers = ["-w", str(spec.own_workers), spec.app] if spec.app else ["--upstream", upstream_spec(upstream_ports)]
    argv = [
        *build.argv, "run", "--host", HOST, "--port", str(spec.port),
        *workers, "--health-path", health_path,
        *spec.corral_args, *user_args,
    ]  # fmt: skip
    return Child(spec.name, argv, workdir / "corral.log", env=build.env())


@contextmanager
def running_proxy(
    spec: ProxySpec,
    upstream_ports: Sequence[int],
    workdir: Path,
    ready_path: str,
    corral_cmd: Sequence[str] | None = None,
    corral_user_args: Sequence[str] = (),
) -> Iterator[RunningProxy]:
    """Start one proxy, wait until it proxies `ready_path` with a 200, stop it on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    require_free([spec.port])
    if spec.kind == "corral":
        build = spec.build or (CorralBuild(tuple(corral_cmd)) if corral_cmd else None)
        if build is None:
            raise RuntimeError("corral is not installed/importable")
        child = _corral_child(spec, upstream_ports, workdir, build, ready_path, corral_user_args)
    else:
        child = _peer_child(spec, upstream_ports, workdir, ready_path)
    try:
        wait_http(child, spec.port, ready_path, READY_TIMEOUT_S)
        yield RunningProxy(spec, child)
    finally:
        child.stop()


@contextmanager
def running_backend_nginx(ports: Sequence[int], workdir: Path) -> Iterator[Child]:
    """T3's stand-in backend: nginx answering `return 200` on every port in `ports`."""
    workdir.mkdir(parents=True, exist_ok=True)
    require_free(ports)
    conf = workdir / "backend-nginx.conf"
    listens = "\n".join(f"        listen {HOST}:{p} backlog=4096;" for p in ports)
    conf.write_text(render("backend-nginx.conf", {"PREFIX": str(workdir), "LISTENS": listens}))
    child = Child("backend-nginx", _nginx_argv(conf, workdir), workdir / "backend-nginx.log")
    try:
        for p in ports:
            wait_http(child, p, "/", READY_TIMEOUT_S)
        yield child
    finally:
        child.stop()
