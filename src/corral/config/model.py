"""The knobs: every setting corral has, as the fields of one configuration model.

Each knob's metadata carries its help, unit, bounds and what happens on breach (HAProxy's manual style).
`corral run` options, corral.toml keys (same names, with underscores) and the reference table in
docs/configuration.md are all made from it, so they cannot drift apart. The helpers at the end read it back.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from ..net import PORT_MAX

# Bounds and units shared by several knobs.
WORKERS_MAX = 4096  # workers per app: far beyond what one machine runs, small enough to plan ports and fds for
DAY = 86400
MONTH = 30 * DAY
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


def knob(
    default: Any,
    help: str,
    unit: str = "",
    breach: str = "",
    short: str | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] | None = None,
    cli: bool = True,
    flag: bool = False,
) -> Any:
    """A knob's field. Numeric knobs carry both bounds: `check`, `run` and the reference table use them."""
    meta = {
        "help": help,
        "unit": unit,
        "breach": breach,
        "short": short,
        "minimum": minimum,
        "maximum": maximum,
        "choices": choices,
        "cli": cli,
        "flag": flag,
    }
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class AppConfig:
    """Per-app settings: one [[app]] table, or the single app of `corral run`."""

    name: str = knob("app", "name used in logs, metrics and status", cli=False)
    route: str = knob("/", "path prefix this app serves; longest prefix wins, on segment boundaries", cli=False)
    strip_prefix: bool = knob(
        False, "remove the route prefix before forwarding (X-Forwarded-Prefix tells the worker)", cli=False
    )
    plumber: str | None = knob(None, "plumber API file or directory (plumber.R / entrypoint.R)", cli=False)
    shiny: str | None = knob(None, "Shiny app directory (app.R calling shinyApp(), or ui.R + server.R)", cli=False)
    command: list[str] = knob(
        [],
        "command run per worker; {port}, {index}, {host} and {socket} (worker_transport unix) are replaced",
        cli=False,
    )
    upstreams: list[str] = knob(
        [],
        "HOST:PORT or HOST:LO-HI of workers corral does not start; probed and joined when they answer",
        cli=False,
    )
    env: dict[str, str] = knob({}, "extra environment for every worker", cli=False)
    env_file: str | None = knob(
        None,
        "dotenv file (NAME=value lines) whose variables every worker gets, read at each worker start; "
        "`env` wins over it. Relative paths: to corral.toml, or on the command line to where corral runs",
        breach="a bad line is a config error naming the file and line",
    )
    workers: int | None = knob(
        None, "number of workers (default: one per CPU)", short="-w", minimum=1, maximum=WORKERS_MAX, breach="n/a"
    )
    base_port: int | None = knob(
        None,
        "worker i listens on base_port + i (default: public port + 1); replacements during a reload or recycle "
        "start on the ports just above the range, so as many ports above it must exist",
        minimum=1,
        maximum=PORT_MAX,
        breach="n/a",
    )
    worker_host: str = knob(
        "127.0.0.1",
        "address workers listen on (plumber's host; {host} and $CORRAL_WORKER_HOST for commands); "
        "0.0.0.0 lets other hosts reach them",
    )
    worker_transport: str = knob(
        "auto",
        "how corral reaches the workers it starts: tcp (a port each, from base_port) or unix (a Unix socket each, "
        "in a private 0700 directory of corral's: no other local user can reach a worker behind the edge). "
        "unix runs plumber with httpuv's startPipeServer; a command gets the path as {socket} and "
        "$CORRAL_WORKER_SOCKET (uvicorn --uds {socket}, gunicorn -b unix:{socket}). auto: unix for a plumber "
        "app on a loopback worker_host and for a command that takes {socket}; tcp for the rest (Shiny, plumber2, "
        "commands with {port}, --supervise-only)",
        choices=("auto", "tcp", "unix"),
        breach="n/a",
    )
    worker_scheduling: str = knob(
        "batch",
        "Linux scheduling policy of the workers corral starts (elsewhere, and under CORRAL_PORTABLE=1, "
        "the system's default either way). batch (SCHED_BATCH, same nice level): a worker "
        "woken by its next request waits for its turn instead of preempting corral mid-dispatch, so corral "
        "hands every free worker its request sooner (+19 % throughput with 2 plumber workers on 2 CPUs, "
        "bench/RESULTS.md; ~0.7 ms more at p99 under light load). normal: the system's default (SCHED_OTHER), "
        "for workers that must preempt other processes on the host",
        choices=("batch", "normal"),
        breach="n/a",
    )
    max_inflight: int = knob(
        1, "requests one worker may hold at once", minimum=1, maximum=1024, breach="further requests wait in the queue"
    )
    max_sessions: int = knob(
        20,
        "WebSocket sessions one worker may hold at once (Posit Connect's max connections per process); "
        "a session does not hold the worker's request slot",
        minimum=1,
        maximum=100000,
        breach="a new session waits in the queue (503 + Retry-After at the queue's limits)",
    )
    sticky: str = knob(
        "auto",
        "send a client back to the same worker: cookie (corral sets an opaque cookie naming the worker), "
        "ip (hash of the client address), none; auto is cookie for Shiny apps, none otherwise",
        choices=("auto", "none", "cookie", "ip"),
        breach="a sticky request waits for its own worker; if that worker is gone it goes to another",
    )
    ws_idle_timeout: float = knob(
        3600.0,
        "a WebSocket tunnel with no bytes either way for this long is closed",
        unit="s",
        minimum=1,
        maximum=30 * 86400,
        breach="both sides closed",
    )
    max_queue: int = knob(
        1000,
        "requests allowed to wait at the proxy",
        minimum=0,
        maximum=1_000_000,
        breach="503 with Retry-After, at once",
    )
    queue_timeout: float = knob(
        30.0, "longest wait in the queue", unit="s", minimum=0, maximum=DAY, breach="503 with Retry-After"
    )
    fair_key: str = knob(
        "ip",
        "fair queueing: whose requests take turns in the queue. ip: the client's address (an IPv6 client's /64; "
        "behind trusted_proxies, the client they forwarded for, read from the right of X-Forwarded-For); "
        "header:NAME: that header's value (set by a proxy you trust: a client picks its own), else the address; "
        "none: one FIFO. Clients take turns weighted by the learned cost of their requests, FIFO within one "
        "client; while others are around, one client holds at most all workers but `reserve`",
        breach="n/a",
    )
    max_queue_per_client: int | None = knob(
        None,
        "requests one client (fair_key) may have waiting in the queue (default: no limit but max_queue)",
        minimum=1,
        maximum=1_000_000,
        breach="429 with Retry-After, at once",
    )
    health_path: str | None = knob(
        None,
        "readiness and health probe path; without it any HTTP answer on / counts",
        breach="worker not ready / taken out after health_fails",
    )
    startup_timeout: float = knob(
        60.0,
        "time a new worker has to answer its readiness probe",
        unit="s",
        minimum=0.1,
        maximum=DAY,
        breach="worker killed and restarted with backoff",
    )
    request_timeout: float = knob(
        300.0,
        "longest time a worker may hold one request. 300 s by default: the longest an R handler is expected to "
        "legitimately run, and the bound on how long a frozen (SIGSTOPped, swapped-out) worker can hold a "
        "request; raise it for longer jobs",
        unit="s",
        minimum=0.01,
        maximum=MONTH,
        breach="client gets 504; the worker is killed and replaced (a frozen worker holds a request no longer)",
    )
    response_buffer: int = knob(
        4 * MiB,
        "response bytes held in memory per request, so the worker is freed before a slow client has read them "
        "(nginx proxy_buffering)",
        unit="bytes",
        minimum=0,
        maximum=GiB,
        breach="further bytes go to a temporary file",
    )
    response_buffer_file: int = knob(
        GiB,
        "response bytes spilled to a temporary file per request beyond response_buffer",
        unit="bytes",
        minimum=0,
        maximum=64 * GiB,
        breach="the worker is read only as fast as the client reads (back-pressure)",
    )
    request_buffering: bool = knob(
        True,
        "read a request's whole body before the request goes to a worker (nginx proxy_request_buffering), so a "
        "slow uploader never holds one: the body is held in memory up to request_buffer, then in a temporary "
        "file up to max_body. --no-request-buffering streams bodies as they arrive, for an app that reads an "
        "upload while it comes in; a streamed request cannot be sent again (see upstream_keepalive_timeout)",
        flag=True,
    )
    request_buffer: int = knob(
        64 * KiB,
        "request body bytes held in memory per request while it is buffered",
        unit="bytes",
        minimum=0,
        maximum=GiB,
        breach="the rest of the body goes to a temporary file (up to max_body)",
    )
    upstream_keepalive_timeout: float = knob(
        1.0,
        "an idle kept-alive connection to a worker is closed after this long: shorter than the idle timeouts of "
        "common servers (gunicorn 2 s, uvicorn and Node 5 s), so corral, not the worker, closes it first. Should "
        "a worker close one anyway just as a request goes out on it (no byte of answer, the worker alive), the "
        "request is sent once more on a fresh connection to the same worker and not held against it",
        unit="s",
        minimum=0.01,
        maximum=DAY,
        breach="connection closed; the next request opens a new one",
    )
    health_interval: float = knob(
        5.0,
        "every worker is probed once per interval, busy ones too (never while it holds a request)",
        unit="s",
        minimum=0.05,
        maximum=DAY,
        breach="a busy worker whose probe is due takes no new request until it frees; then the probe goes first",
    )
    health_timeout: float = knob(
        2.0, "probe answer deadline", unit="s", minimum=0.01, maximum=DAY, breach="counts as one failed probe"
    )
    health_fails: int = knob(
        3, "failed probes in a row that take a worker out", minimum=1, maximum=1000, breach="worker replaced"
    )
    max_requests: int | None = knob(
        None,
        "recycle a worker after this many requests",
        minimum=1,
        maximum=10**12,
        breach="graceful replacement",
    )
    max_requests_jitter: int = knob(
        0,
        "random 0..N added to max_requests per worker, so workers do not recycle together",
        minimum=0,
        maximum=10**12,
    )
    max_memory: float | None = knob(
        None,
        "resident memory of a worker's process tree",
        unit="MB",
        minimum=1,
        maximum=16 * 1024 * 1024,
        breach="graceful replacement",
    )
    graceful_timeout: float = knob(
        30.0,
        "drain deadline for in-flight requests on stop, reload and recycle",
        unit="s",
        minimum=0,
        maximum=MONTH,
        breach="SIGTERM regardless",
    )
    kill_timeout: float = knob(5.0, "SIGTERM to SIGKILL grace", unit="s", minimum=0, maximum=DAY, breach="SIGKILL")
    crash_limit: str = knob(
        "5/60",
        "K/T: workers exiting K times within T seconds mark the app crash-looping (status, metrics, logs, "
        "dashboard, with the last lines a worker printed); K from 1 to 10000, T from 1 s to 1 d",
        breach="the app is shown crash-looping until T seconds pass without an exit; restarts go on with backoff",
    )
    docs: bool = knob(False, "serve plumber's API docs (off by default)", flag=True)
    engine: str = knob(
        "auto",
        "how a plumber app is run: plumber (plumb(APP)$run), plumber2 (plumber2::api(APP) |> api_run()); auto "
        "is plumber2 for a directory with _server.yml or an R file that attaches plumber2, else plumber",
        choices=("auto", "plumber", "plumber2"),
    )
    watch: bool = knob(
        False,
        "development: a rolling reload when the app's files change (R sources, _server.yml, .Renviron, "
        "env_file; for a command, the files under the directory corral runs in)",
        flag=True,
        breach="a change whose workers fail to start is not rolled out; the old workers keep serving",
    )
    watch_paths: list[str] = knob(
        [], "files or directories --watch watches instead of the default; any file under them counts", cli=False
    )
    dispatch: str = knob(
        "cost",
        "queue policy: cost (learn route costs, keep a reserve for short requests) or fifo",
        choices=("cost", "fifo"),
    )
    reserve: int | None = knob(
        None,
        "workers kept free for short requests, and with fair queueing for the other clients while one client "
        "is busy (default: 1 when there are 2 or more workers)",
        minimum=0,
        maximum=WORKERS_MAX,
        breach="long requests, and the busy client's further requests, wait in the queue",
    )
    long_threshold: float = knob(
        0.5, "a route whose learned service time reaches this is long", unit="s", minimum=0.001, maximum=DAY
    )
    long_bias: float = knob(
        5.0,
        "ageing: a queued long request is passed by short ones for at most this long",
        unit="s",
        minimum=0,
        maximum=DAY,
    )
    long_routes: list[str] = knob([], "route patterns always long, e.g. 'POST /fit*' or '/model/*'", cli=False)
    short_routes: list[str] = knob([], "route patterns always short", cli=False)
    no_retry_routes: list[str] = knob(
        [],
        "route patterns never sent again, e.g. 'GET /report*' or '/admin/*' ('*': none of the app's). A request "
        "whose worker is killed from outside (SIGKILL or SIGTERM corral did not send) goes once to another worker "
        "when its method is idempotent (GET, HEAD, OPTIONS, PUT, DELETE) or it carries Idempotency-Key, and no "
        "byte of its response has reached the client",
        cli=False,
        breach="a matching request whose worker is killed gets 502, as one whose worker dies on its own",
    )
    quarantine_period: float = knob(
        300.0,
        "a request (method, path, hash of query and body) that made two workers exit within 10 minutes is "
        "refused for this long, without reaching a worker (0: never); a reload lifts every quarantine",
        unit="s",
        minimum=0,
        maximum=DAY,
        breach="502 at once, with Retry-After; one log line when it begins",
    )
    min_workers: int | None = knob(
        None,
        "autoscale: never fewer workers than this (setting min or max turns autoscaling on); 0: scale to zero, "
        "the last worker stops after idle_timeout without a request or session and the next request starts one",
        minimum=0,
        maximum=WORKERS_MAX,
        breach="0: a request arriving at zero waits for a worker to start (cold start), within startup_timeout",
    )
    max_workers: int | None = knob(
        None,
        "autoscale: never more workers than this; also the ceiling for `corral scale`; default ceiling: "
        "max(4 x CPUs, 16), bounded by the fd limit",
        minimum=1,
        maximum=WORKERS_MAX,
        breach="scale requests above it are refused",
    )
    scale_up_wait: float = knob(
        1.0,
        "autoscale: add workers when the oldest queued request has waited this long",
        unit="s",
        minimum=0.05,
        maximum=DAY,
        breach="one more worker (up to doubling), until max_workers",
    )
    idle_timeout: float = knob(
        60.0,
        "autoscale: workers unused for this long are drained and stopped (with min_workers 0, the last one too)",
        unit="s",
        minimum=0.5,
        maximum=MONTH,
        breach="surplus workers drained, down to min_workers (0: idle, scaled to zero)",
    )


@dataclass
class ServerConfig:
    """Process-wide settings: the public listener, the admin channel, edge limits, logs."""

    host: str = knob("127.0.0.1", "public listen address")
    port: int = knob(8000, "public listen port", short="-p", minimum=1, maximum=PORT_MAX)
    tls_cert: str | None = knob(
        None,
        "PEM certificate chain (leaf first, e.g. certbot's fullchain.pem): the public port speaks HTTPS only, "
        "TLS 1.2 and 1.3 with Mozilla's intermediate ciphers, ALPN http/1.1; needs tls_key. `corral reload` and "
        "SIGHUP read both files again (certbot's deploy hook). Relative paths: to corral.toml",
        breach="a file that is missing, unreadable or not the key's pair stops corral at start; at a reload it is "
        "refused (one log line) and the old pair keeps serving",
    )
    tls_key: str | None = knob(
        None,
        "PEM private key of tls_cert, unencrypted (e.g. certbot's privkey.pem; mode 0600)",
        breach="as tls_cert",
    )
    http_redirect: int | None = knob(
        None,
        "also listen on this port (same host) for plain HTTP and answer every request with a 308 to the same "
        "host, path and query over https on the public port; needs tls_cert",
        minimum=1,
        maximum=PORT_MAX,
        breach="a Host that is not a DNS name or an IP address gets 400, never a redirect",
    )
    admin: str | None = knob(None, "admin channel: HOST:PORT or unix:/path (default: a unix socket per public port)")
    admin_token: str | None = knob(None, "bearer token every admin call must carry")
    admin_hosts: list[str] = knob(
        [],
        "extra Host names a token-less TCP admin channel answers to (besides its address, localhost, 127.0.0.1)",
        breach="421 Misdirected Request; nothing else happens (DNS-rebinding defence)",
        cli=False,
    )
    admin_max_connections: int = knob(
        16,
        "open admin connections (dashboards, corral's commands, scrapes); each owes a whole request within "
        "header_timeout of its accept, or of its request's first byte when kept alive",
        minimum=1,
        maximum=256,
        breach="a further connection gets 503 and is closed at once, unread; a late request gets 408, close",
    )
    health_listen: str | None = knob(
        None,
        "HOST:PORT of a health listener for outer balancers and Kubernetes probes: GET /livez and GET /readyz "
        "only, no token, no data (off by default; the admin channel has both endpoints too)",
    )
    ready_min: int = knob(
        1,
        "workers that must be ready, in every app, for /readyz to answer 200",
        minimum=0,
        maximum=WORKERS_MAX,
        breach="/readyz answers 503, so outer balancers stop sending",
    )
    shutdown_delay: float = knob(
        0.0,
        "on SIGTERM or stop, /readyz turns 503 at once and the public port keeps serving this long before the "
        "drain begins: time for outer balancers and Kubernetes endpoints to stop sending (a few seconds there)",
        unit="s",
        minimum=0,
        maximum=3600,
        breach="then the graceful drain: no new connections, in-flight requests finish within graceful_timeout",
    )
    max_header_bytes: int = knob(
        16384,
        "request line + headers",
        unit="bytes",
        minimum=256,
        maximum=MiB,
        breach="431 (request line alone: 414)",
    )
    max_headers: int = knob(100, "header fields per request", minimum=1, maximum=10000, breach="431")
    max_body: int = knob(
        100 * MiB,
        "request body",
        unit="bytes",
        minimum=0,
        maximum=64 * GiB,
        breach="413 before the worker sees it",
    )
    header_timeout: float = knob(
        10.0, "time to receive a whole request head", unit="s", minimum=0.1, maximum=DAY, breach="408, close"
    )
    body_timeout: float = knob(
        30.0,
        "longest gap between request body bytes",
        unit="s",
        minimum=0.1,
        maximum=DAY,
        breach="408, close; the worker's request is aborted",
    )
    send_timeout: float = knob(
        60.0,
        "longest a client may go without reading any of its response",
        unit="s",
        minimum=1,
        maximum=DAY,
        breach="connection closed; the exchange is counted as cut",
    )
    keepalive_timeout: float = knob(
        5.0, "idle client connection lifetime", unit="s", minimum=0.1, maximum=DAY, breach="close"
    )
    max_connections: int | None = knob(
        None,
        "open client connections (default: auto, sized from the open-file limit: about half of it, since each "
        "client connection can need an upstream connection too)",
        minimum=1,
        maximum=1 << 24,
        breach="new connections get 503 and close",
    )
    trusted_proxies: str = knob(
        "",
        "CIDR,... whose X-Forwarded-*/Forwarded are kept and appended to, and whose W3C traceparent is continued",
        breach="headers replaced; a new trace is started",
    )
    trace_sample: float = knob(
        1.0,
        "share of the traces corral starts that carry the W3C sampled flag, so the app's (parent-based) "
        "OpenTelemetry sampler records them; 1 keeps what the app would do with no corral in front",
        minimum=0,
        maximum=1,
        breach="n/a",
    )
    loop: str = knob(
        "auto",
        "event loop: uvloop (libuv), or asyncio's own, which runs wherever Python does (T1 measured on both in "
        "bench/RESULTS.md). auto: uvloop when it is installed, asyncio's loop when it is not",
        choices=("auto", "uvloop", "asyncio"),
        breach="n/a",
    )
    access_log: str | None = knob(None, "access log path, or - for stdout")
    log_format: str = knob("text", "access log format", choices=("text", "json"))
    log_dir: str | None = knob(None, "directory for one output file per worker")
    log_buffer: int = knob(
        2000,
        "lines of worker output and corral's own events kept in memory for `corral logs` (0: none)",
        unit="lines",
        minimum=0,
        maximum=1_000_000,
        breach="the oldest lines are dropped",
    )


@dataclass
class Config:
    """A whole configuration: the server's settings and its apps, and where they came from (for messages)."""

    server: ServerConfig = field(default_factory=ServerConfig)
    apps: list[AppConfig] = field(default_factory=list)
    source: str = "command line"
    load_problems: list[str] = field(default_factory=list)  # from load_toml(strict=False); validate reports them


class ConfigError(Exception):
    """Every problem found at once, one line each, so a user fixes them in one go."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --- reading the knobs back ------------------------------------------------------------------------
def fields_of(cls: type) -> list[dataclasses.Field[Any]]:
    """A section's knobs: only fields made by knob() carry metadata."""
    return [f for f in dataclasses.fields(cls) if f.metadata]


def base_type(cls: type, name: str) -> type:
    """The type a knob's value must have: `int | None` -> int, `list[str]` -> list (what isinstance can test)."""
    hint = typing.get_type_hints(cls)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    origin = typing.get_origin(hint)
    return origin if origin is not None else hint


def option_name(name: str) -> str:
    """A knob's `corral run` option: max_body -> --max-body."""
    return "--" + name.replace("_", "-")


def plain_number(x: float) -> str:
    """A number as written in a message, a flag or a generated file: 65535, 0.05, 2592000 (never 2.592e+06)."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"
