"""`corral export kubernetes`: the manifests that run one corral per pod, its workers inside the pod.

    ConfigMap                 the corral.toml, as written, mounted over /app/corral.toml
    Deployment                corral is the container's command; requests and limits are sized from the
                              worker count; liveness and readiness probe --health-listen; the grace period
                              covers shutdown_delay + the drain + the kill; preStop runs `corral stop`
    Service                   ClusterIP on port 80 -> the public port
    HorizontalPodAutoscaler   (--hpa) on CPU, with a commented example on corral's queue wait

Kubernetes spreads connections over pods; inside each pod corral keeps its central queue, so a pod is
one corral exactly as on one host (docs/scaling-out.md). Everything is printed as YAML by a small
emitter (yaml_emitter.py: corral does not depend on a YAML library); tests check the output against
the Kubernetes schemas with `kubernetes-validate`.
"""

from __future__ import annotations

import hashlib
import math
import os
import posixpath
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import Config, MiB, autoscaled, effective_workers, first_port, parse_health, plain_number, port_span
from ..net import is_loopback, parse_address
from .common import STOP_MARGIN, stop_bound
from .yaml_emitter import Commented, Note, document

APP_DIR = "/app"  # where the image keeps the API and corral.toml (deploy/Dockerfile)
CONFIG_FILE = "corral.toml"
DEFAULT_HEALTH_PORT = 9000
POD_SHUTDOWN_DELAY = 5.0  # when corral.toml has none: endpoint updates reach kube-proxy and ingresses in seconds
TLS_DIR = "/etc/corral/tls"  # tls_cert/tls_key in the pod: the keys of a kubernetes.io/tls Secret, mounted here
RUN_AS = 10001  # the image's user (deploy/Dockerfile); any non-root uid that can read /app works
SERVICE_PORT = 80
CPU_PER_WORKER_M = 1000  # a single-threaded worker uses at most one core, and a busy one all of it
CORRAL_CPU_REQUEST_M = 250  # the proxy: ~110 us of CPU per request (bench/RESULTS.md, T7)
CORRAL_CPU_LIMIT_M = 1000  # a core of headroom, so the proxy is never throttled while every worker runs
WORKER_MEM_REQUEST_MI = 256  # R + plumber: ~100 MB resident at start (docs/operations.md), more with data
WORKER_MEM_LIMIT_MI = 1024  # per worker, when max_memory does not say
CORRAL_MEM_REQUEST_MI = 128
CORRAL_MEM_LIMIT_MI = 256  # plus the in-memory response buffers of every request workers may hold
CPU_TARGET = 70  # HPA: average CPU utilisation (of the requests) to keep; requests are a core per worker


class ExportError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --- what the pod needs ---------------------------------------------------------------------
@dataclass(frozen=True)
class Sizing:
    workers_min: int  # workers in the pod at the least (autoscaling's min_workers)
    workers_max: int  # and at the most
    cpu_request_m: int
    cpu_limit_m: int
    memory_request_mi: int
    memory_limit_mi: int


def sizing(cfg: Config) -> Sizing:
    """Requests for the workers a pod runs at the least, limits for the most: a core per worker (R is
    single-threaded; a busy worker uses all of it), and memory per worker from max_memory when set
    (with room above it, so corral's recycle comes before the OOM killer)."""
    lo = hi = 0
    mem_request = CORRAL_MEM_REQUEST_MI
    mem_limit = CORRAL_MEM_LIMIT_MI
    for app in cfg.apps:
        if app.upstreams:
            continue
        least, most = _worker_range(app)
        lo, hi = lo + least, hi + most
        per_limit = max(128, math.ceil(app.max_memory * 1.25)) if app.max_memory else WORKER_MEM_LIMIT_MI
        mem_request += least * min(WORKER_MEM_REQUEST_MI, per_limit)
        mem_limit += most * per_limit
        mem_limit += math.ceil(most * app.max_inflight * app.response_buffer / MiB)
    return Sizing(
        workers_min=lo,
        workers_max=hi,
        cpu_request_m=CORRAL_CPU_REQUEST_M + lo * CPU_PER_WORKER_M,
        cpu_limit_m=CORRAL_CPU_LIMIT_M + hi * CPU_PER_WORKER_M,
        memory_request_mi=mem_request,
        memory_limit_mi=mem_limit,
    )


def _worker_range(app: Any) -> tuple[int, int]:
    if autoscaled(app):
        most = app.max_workers or port_span(app)
        return min(app.min_workers or 1, most), most
    n = effective_workers(app)
    return n, n


def problems(cfg: Config) -> list[str]:
    """What keeps this config from running as is in a pod."""
    out = []
    for app in cfg.apps:
        if app.upstreams:
            continue
        if autoscaled(app) and app.max_workers is None:
            out.append(
                f"{cfg.source}: app '{app.name}': max_workers: set it for Kubernetes: its default follows the CPUs "
                "of the node, not the pod's limits, and the pod's resources are sized from it"
            )
        elif not autoscaled(app) and app.workers is None:
            out.append(
                f"{cfg.source}: app '{app.name}': workers: set it for Kubernetes: without it corral starts one "
                "worker per CPU of the node, not of the pod, and the pod's resources are sized from it"
            )
    return out


def health_port(cfg: Config) -> int:
    """health_listen's port when corral.toml has one; else 9000, or the first free port above it."""
    if cfg.server.health_listen is not None:
        return parse_health(cfg.server.health_listen)[1]
    used = {cfg.server.port}
    if cfg.server.admin is not None and parse_address(cfg.server.admin)[0] == "tcp":
        used.add(parse_address(cfg.server.admin)[2])
    for app in cfg.apps:
        if not app.upstreams:
            base = first_port(cfg, app)
            used.update(range(base, base + 2 * port_span(app)))  # and the replacements' ports above
    port = DEFAULT_HEALTH_PORT
    while port in used:
        port += 1
    return port


def run_args(cfg: Config, hport: int) -> list[str]:
    """`corral run` in the pod: the mounted corral.toml, listening on the pod's address, probes on hport."""
    any_host = "::" if ":" in cfg.server.host else "0.0.0.0"
    health = f"[{any_host}]:{hport}" if ":" in any_host else f"{any_host}:{hport}"
    args = ["run", "-c", f"{APP_DIR}/{CONFIG_FILE}", "--host", any_host, "--health-listen", health]
    if cfg.server.shutdown_delay == 0:
        args += ["--shutdown-delay", plain_number(POD_SHUTDOWN_DELAY)]
    if cfg.server.tls_cert is not None:  # the host's paths mean nothing in the pod: the Secret's files instead
        args += ["--tls-cert", f"{TLS_DIR}/tls.crt", "--tls-key", f"{TLS_DIR}/tls.key"]
    return args


def shutdown_delay(cfg: Config) -> float:
    return cfg.server.shutdown_delay or POD_SHUTDOWN_DELAY


def grace_period(cfg: Config) -> int:
    """terminationGracePeriodSeconds: corral's own stop bound (shutdown_delay + the drain + the kill +
    1 s) with the pod's delay, plus a margin for the preStop hook and process exit."""
    bound = stop_bound(cfg) - cfg.server.shutdown_delay + shutdown_delay(cfg)  # with the pod's delay
    return math.ceil(bound) + STOP_MARGIN


def prestop_command(cfg: Config) -> list[str]:
    """`corral stop --no-wait` against this corral's admin channel: it begins the same stop as SIGTERM
    (/readyz 503, shutdown_delay, drain) and returns at once; the kubelet's SIGTERM that follows is a
    no-op. No shell and no other binary: corral is in every image this Deployment can run."""
    cmd = ["corral", "stop", "--no-wait"]
    spec = cfg.server.admin
    if spec is None:
        return [*cmd, "-p", str(cfg.server.port)]  # the default unix socket, found by the public port
    kind, host, port = parse_address(spec)
    if kind == "unix":
        return [*cmd, "--admin", spec]
    if not is_loopback(host):
        host = "::1" if ":" in host else "127.0.0.1"  # bound to every address: reach it over loopback
    return [*cmd, "--admin", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]


def dns_name(text: str) -> str:
    """A Kubernetes object name (an RFC 1035 label: the Service needs one) from a file name."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if not name or not name[0].isalpha():
        name = f"corral-{name}"
    return name[:50].strip("-")


NAME_RULE = re.compile(r"[a-z]([-a-z0-9]{0,48}[a-z0-9])?")


def image_paths(cfg: Config, text: str) -> list[str]:
    """What the image must hold for the apps in corral.toml, as the pod will look for it."""
    try:
        raw = tomllib.loads(text).get("app", [])
    except tomllib.TOMLDecodeError:
        raw = []
    raw = [raw] if isinstance(raw, dict) else raw
    out = []
    for i, app in enumerate(cfg.apps):
        given = raw[i] if i < len(raw) and isinstance(raw[i], dict) else {}
        for key in ("plumber", "shiny"):
            value = given.get(key)
            if isinstance(value, str) and value:
                where = value if value.startswith("/") else posixpath.normpath(f"{APP_DIR}/{value}")
                out.append(f"{where}  ({key} of app '{app.name}')")
        if app.command:
            out.append(f"{app.command[0]}  (command of app '{app.name}', with what it needs)")
    return out


# --- the objects --------------------------------------------------------------------------------
def kubernetes(
    cfg: Config,
    text: str,
    image: str,
    hpa: bool = False,
    name: str | None = None,
    replicas: int = 2,
    max_replicas: int = 10,
) -> str:
    """The manifests, as one multi-document YAML stream. Raises ExportError for what cannot run in a pod."""
    found = problems(cfg)
    name = name or dns_name(Path(cfg.source).stem)
    if not NAME_RULE.fullmatch(name):
        found.append(f"--name: {name!r}: use lower-case letters, digits and '-', starting with a letter (<= 50)")
    if not 1 <= replicas <= max_replicas:
        found.append(f"--replicas {replicas} / --max-replicas {max_replicas}: need 1 <= replicas <= max-replicas")
    if found:
        raise ExportError(found)
    labels = {"app.kubernetes.io/name": "corral", "app.kubernetes.io/instance": name}
    docs = [
        configmap(cfg, text, name, labels),
        deployment(cfg, text, image, name, labels, None if hpa else replicas),
        service(cfg, name, labels),
    ]
    if hpa:
        docs.append(autoscaler(cfg, name, labels, replicas, max_replicas))
    head = [
        f"# Generated by `corral export kubernetes -c {cfg.source}` (corral {__version__}).",
        "# Apply with `kubectl apply -f FILE`; docs/scaling-out.md explains each part.",
    ]
    return "\n".join(head) + "\n---\n" + "---\n".join(docs)


def configmap(cfg: Config, text: str, name: str, labels: dict[str, str]) -> str:
    obj = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-config", "labels": labels},
        "data": {CONFIG_FILE: text},
    }
    return document(obj, [f"corral.toml as written; the pod mounts it over {APP_DIR}/{CONFIG_FILE}."])


def deployment(cfg: Config, text: str, image: str, name: str, labels: dict[str, str], replicas: int | None) -> str:
    size = sizing(cfg)
    hport = health_port(cfg)
    grace = grace_period(cfg)
    delay = shutdown_delay(cfg)
    drain = max((a.graceful_timeout for a in cfg.apps), default=0.0)
    kill = max((a.kill_timeout for a in cfg.apps), default=0.0)
    ports: list[dict[str, Any]] = [
        {"name": "http", "containerPort": cfg.server.port, "protocol": "TCP"},
        {"name": "health", "containerPort": hport, "protocol": "TCP"},
    ]
    env: list[Any] = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    admin = cfg.server.admin
    if admin is not None and parse_address(admin)[0] == "tcp":
        _, host, aport = parse_address(admin)
        if not is_loopback(host):
            ports.append({"name": "admin", "containerPort": aport, "protocol": "TCP"})
            if cfg.server.admin_token is None:
                env.append(
                    Note(
                        f"the admin channel on {admin} needs a token: kubectl create secret generic "
                        f"{name}-admin --from-literal=token=..."
                    )
                )
                env.append(
                    {
                        "name": "CORRAL_ADMIN_TOKEN",
                        "valueFrom": {"secretKeyRef": {"name": f"{name}-admin", "key": "token"}},
                    }
                )
    spec: dict[str, Any] = {}
    if replicas is not None:
        spec["replicas"] = replicas
    else:
        spec[Note("no replicas: the HorizontalPodAutoscaler below owns the count")] = None
    spec.update(
        {
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": labels},
            "strategy": {
                Note("a new pod must be ready before an old one stops: rollouts lose no capacity"): None,
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        Note("a changed corral.toml changes this, and so rolls the pods"): None,
                        "corral/config-sha256": hashlib.sha256(text.encode()).hexdigest(),
                    },
                },
                "spec": pod_spec(cfg, image, name, size, hport, grace, delay, drain, kill, ports, env),
            },
        }
    )
    obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": spec,
    }
    needs = image_paths(cfg, text)
    comments = [
        f"One corral per pod, its workers inside the pod ({_workers(size)}); Kubernetes spreads connections",
        "over pods and each pod's corral queues and dispatches to its own workers.",
        f"The image ({image}) must contain corral, and for this corral.toml (mounted as {APP_DIR}/{CONFIG_FILE}):",
        *(f"  {line}" for line in needs),
    ]
    return document(obj, comments)


def _workers(size: Sizing) -> str:
    if size.workers_min == size.workers_max:
        return f"{size.workers_max} worker{'s' * (size.workers_max != 1)}"
    return f"{size.workers_min} to {size.workers_max} workers, autoscaled inside the pod"


def pod_spec(
    cfg: Config,
    image: str,
    name: str,
    size: Sizing,
    hport: int,
    grace: int,
    delay: float,
    drain: float,
    kill: float,
    ports: list[dict[str, Any]],
    env: list[Any],
) -> dict[str, Any]:
    container = {
        "name": "corral",
        "image": image,
        Note("corral is the entrypoint: it handles SIGTERM itself and runs the workers as its children"): None,
        "command": ["corral"],
        "args": run_args(cfg, hport),
        "workingDir": APP_DIR,
        "env": env,
        "ports": ports,
        "readinessProbe": {
            Note(
                f"/readyz: 200 while every app has {cfg.server.ready_min} ready worker"
                f"{'s' * (cfg.server.ready_min != 1)} (ready_min) and corral is not stopping; 503 from the "
                "first moment of a stop"
            ): None,
            "httpGet": {"path": "/readyz", "port": "health"},
            "periodSeconds": 2,
            "timeoutSeconds": 2,
            "failureThreshold": 2,
            "successThreshold": 1,
        },
        "livenessProbe": {
            Note("/livez: 200 while corral's event loop runs (workers starting, busy or draining included)"): None,
            "httpGet": {"path": "/livez", "port": "health"},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 3,
        },
        "lifecycle": {
            "preStop": {
                Note(
                    "`corral stop` over the admin channel begins the same stop as SIGTERM (/readyz 503, then\n"
                    f"serving on for shutdown_delay = {plain_number(delay)} s, then the drain) and returns at once; "
                    "the "
                    "SIGTERM after it\nchanges nothing. An exec of corral itself: no shell, nothing the image "
                    "lacks, and the stop\nbegins even if a wrapper in front of corral were to swallow SIGTERM."
                ): None,
                "exec": {"command": prestop_command(cfg)},
            }
        },
        "resources": {
            Note(
                f"a core per worker ({size.workers_min} at the least, {size.workers_max} at the most) and "
                f"{CORRAL_CPU_REQUEST_M}m for corral's proxy;\nmemory per worker "
                "(max_memory x 1.25 when set) and corral's response buffers"
            ): None,
            "requests": {"cpu": f"{size.cpu_request_m}m", "memory": f"{size.memory_request_mi}Mi"},
            "limits": {"cpu": f"{size.cpu_limit_m}m", "memory": f"{size.memory_limit_mi}Mi"},
        },
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [
            {"name": "config", "mountPath": f"{APP_DIR}/{CONFIG_FILE}", "subPath": CONFIG_FILE, "readOnly": True},
            *_tls_mount(cfg),
        ],
    }
    return {
        Note(
            f"shutdown_delay {plain_number(delay)} s + graceful_timeout {plain_number(drain)} s + "
            f"kill_timeout {plain_number(kill)} s "
            f"+ 1 s, and {STOP_MARGIN} s for the\npreStop hook and exit: corral always ends by itself before "
            "the kubelet's SIGKILL"
        ): None,
        "terminationGracePeriodSeconds": grace,
        Note(
            "the pod's pause process is PID 1 and reaps orphans (children a worker left behind): no init\n"
            "is needed in the image, and corral gets SIGTERM as an ordinary process"
        ): None,
        "shareProcessNamespace": True,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS},
        "containers": [container],
        "volumes": [{"name": "config", "configMap": {"name": f"{name}-config"}}, *_tls_volume(cfg, name)],
    }


def _tls_mount(cfg: Config) -> list[dict[str, Any]]:
    if cfg.server.tls_cert is None:
        return []
    return [
        {
            "name": "tls",
            Note(
                "tls_cert/tls_key: the pod serves HTTPS itself (end-to-end TLS). Usually TLS belongs to the\n"
                "Ingress instead (its tls: section): then drop tls_cert and tls_key from corral.toml. No subPath,\n"
                "so a renewed Secret reaches these files (within a minute); `corral reload` in the pod reads them"
            ): None,
            "mountPath": TLS_DIR,
            "readOnly": True,
        }
    ]


def _tls_volume(cfg: Config, name: str) -> list[dict[str, Any]]:
    if cfg.server.tls_cert is None:
        return []
    return [
        {
            "name": "tls",
            Note(f"kubectl create secret tls {name}-tls --cert=fullchain.pem --key=privkey.pem"): None,
            "secret": {"secretName": f"{name}-tls"},
        }
    ]


def service(cfg: Config, name: str, labels: dict[str, str]) -> str:
    obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "type": "ClusterIP",
            "selector": labels,
            "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": "http", "protocol": "TCP"}],
            Note(
                "Sticky clients (sessions held in one R process): `sessionAffinity: ClientIP` here, or cookie\n"
                "affinity at the ingress; see docs/scaling-out.md"
            ): None,
        },
    }
    return document(obj, ["The pods' public port; the health port is for the kubelet's probes only."])


def queue_wait_metric() -> dict[str, Any]:
    """The HPA metric on corral's mean queue wait, as the commented example prints it."""
    return {
        "type": "Pods",
        "pods": {
            "metric": {"name": "corral_queue_wait_seconds_mean"},
            "target": {"type": "AverageValue", "averageValue": "250m"},
        },
    }


ADAPTER_RULE = """\
Scaling on corral's queue wait instead of (or besides) CPU: uncomment the Pods metric below. It needs
Prometheus scraping each pod's /metrics (the admin channel: `admin = "0.0.0.0:9180"` with a token) and
prometheus-adapter serving the mean wait over the last minute as a per-pod metric, e.g. this rule:
  rules:
    custom:
    - seriesQuery: 'corral_queue_wait_seconds_sum{namespace!="",pod!=""}'
      resources: {overrides: {namespace: {resource: namespace}, pod: {resource: pod}}}
      name: {matches: "^(.*)_sum$", as: "${1}_mean"}
      metricsQuery: >-
        sum(rate(corral_queue_wait_seconds_sum{<<.LabelMatchers>>}[1m])) by (<<.GroupBy>>)
        / clamp_min(sum(rate(corral_queue_wait_seconds_count{<<.LabelMatchers>>}[1m])) by (<<.GroupBy>>), 1e-9)
A target of 250m: add pods when requests wait a quarter of a second on average in corral's queue."""


def autoscaler(cfg: Config, name: str, labels: dict[str, str], replicas: int, max_replicas: int) -> str:
    inner = [a.name for a in cfg.apps if not a.upstreams and autoscaled(a)]
    metrics: list[Any] = [
        {
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": CPU_TARGET}},
        },
        Note(ADAPTER_RULE),
        Commented(queue_wait_metric()),
    ]
    obj = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": replicas,
            "maxReplicas": max_replicas,
            Note(
                f"CPU requests are a core per worker: {CPU_TARGET}% average utilisation means the workers are "
                f"busy {CPU_TARGET}% of the time"
            ): None,
            "metrics": metrics,
            "behavior": {
                "scaleDown": {
                    Note("a pod removed drains first (grace period above); scale down slowly"): None,
                    "stabilizationWindowSeconds": 300,
                }
            },
        },
    }
    comments = ["More pods when the workers are busy: Kubernetes adds pods, each pod's corral its queue."]
    if inner:
        comments.append(
            f"Apps {', '.join(inner)} also autoscale workers inside each pod (min/max_workers): two loops on one "
            "signal; fixed workers per pod are simpler to reason about (docs/scaling-out.md)."
        )
    return document(obj, comments)


def source_text(path: str) -> str:
    with open(os.fspath(path), encoding="utf-8") as f:
        return f.read()
