"""`corral export haproxy`: a complete haproxy.cfg that balances corral's workers.

For people who already run HAProxy: `corral run --supervise-only` keeps the workers alive on fixed
ports and HAProxy balances them. HAProxy has corral's central queue (maxconn per server); what it
lacks is said in the file's opening comments.
"""

from __future__ import annotations

from ..config import AppConfig, Config, ServerConfig, sticky_mode
from ..tls import INTERMEDIATE_CIPHERS
from .common import (
    NOT_FOUND_JSON,
    Target,
    address,
    generated_header,
    read_timeout,
    seconds,
    targets,
    trusted_proxies,
)

WS_ACL = "corral_websocket"
STICKY_COOKIE = "corral_sticky"


def haproxy(cfg: Config) -> str:
    server = cfg.server
    tgts = targets(cfg)
    lines = [*generated_header("haproxy", cfg.source)]
    lines += [
        "# A complete haproxy.cfg: check it with `haproxy -c -f haproxy.cfg`.",
        "# HAProxy has corral's central queue: `maxconn` = max_inflight per server makes requests wait",
        "# in the backend queue for the first free worker (up to `timeout queue` = queue_timeout).",
        "# max_queue has no equivalent (HAProxy's queue is bounded only by maxconn and time), nor have",
        "# response_buffer and response_buffer_file (HAProxy buffers a few kB and reads as the client reads).",
        "# WebSocket sessions (`Upgrade: websocket`) go to a second backend per app over the same workers,",
        "# `<app>_ws`, whose maxconn is max_sessions: an open session never takes a worker's request slot,",
        "# and a new session waits in that backend's queue when every worker holds max_sessions.",
        "",
        "global",
        "    # no global maxconn: HAProxy derives it from the file-descriptor limit it is given",
        "    log stdout format raw local0",
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option httplog",
        "    option dontlognull",
        # No upstream keep-alive: plumber's two-segment responses stall ~40 ms on reused connections.
        "    option http-server-close",
        "    option forwardfor",
        "    option redispatch",
        "    retries 2",
        f"    timeout http-request {seconds(server.header_timeout)}",
        f"    timeout http-keep-alive {seconds(server.keepalive_timeout)}",
        f"    timeout client {seconds(max(server.body_timeout, server.keepalive_timeout, server.send_timeout))}",
        "    timeout connect 5s",
        "",
        *_haproxy_redirect(server),
        "frontend corral",
        *_haproxy_bind(server),
        *(
            [f"    maxconn {server.max_connections}"]
            if server.max_connections is not None
            else ["    # no maxconn: max_connections is automatic (from the fd limit), as HAProxy's own default"]
        ),
        '    unique-id-format "%[uuid()]"',
        "    unique-id-header X-Request-Id",
        *(
            [f"    http-request del-header X-Forwarded-For unless {{ src {' '.join(trusted_proxies(cfg))} }}"]
            if trusted_proxies(cfg)
            else ["    http-request del-header X-Forwarded-For  # as corral: a client's own is replaced"]
        ),
        f"    http-request set-header X-Forwarded-Proto {'https' if server.tls_cert else 'http'}",
        "    http-request set-header X-Forwarded-Host %[req.hdr(host)]",
        f"    http-request deny deny_status 413 if {{ req.hdr_val(content-length) gt {server.max_body} }}",
        f"    acl {WS_ACL} hdr(upgrade) -i websocket",
    ]
    default = None
    for t in tgts:
        if t.route == "/":
            default = t.ident
            continue
        # Segment boundaries: /api and /api/..., never /apix. First match wins: longest first.
        lines += [f"    acl {t.ident} path {t.route}", f"    acl {t.ident} path_beg {t.route}/"]
        lines.append(f"    use_backend {t.ident}_ws if {t.ident} {WS_ACL}")
        lines.append(f"    use_backend {t.ident} if {t.ident}")
    if default is not None:
        lines.append(f"    use_backend {default}_ws if {WS_ACL}")
    lines += [f"    default_backend {default or 'corral_not_found'}", ""]
    for t in tgts:
        lines += _haproxy_backend(t)
        lines += _haproxy_ws_backend(t)
    if default is None:
        body = NOT_FOUND_JSON.replace('"', '\\"')
        lines += [
            "backend corral_not_found",
            "    # A path no app claims: answered here, never by a worker.",
            f'    http-request return status 404 content-type application/json string "{body}"',
            "",
        ]
    return "\n".join(lines)


def _haproxy_bind(server: ServerConfig) -> list[str]:
    """The public bind; with tls_cert, HTTPS as corral serves it (TLS 1.2/1.3, Mozilla intermediate, ALPN
    http/1.1)."""
    bind = f"    bind {address(server.host, server.port)}"
    if server.tls_cert is None:
        return [bind]
    return [
        "    # TLS: HAProxy reads the certificate and its key from ONE PEM file (cat fullchain.pem privkey.pem),",
        f"    # or, HAProxy >= 2.2, the key from a file beside it named {server.tls_cert}.key. A renewed pair is read",
        "    # by a reload (systemctl reload haproxy), as corral's by `corral reload`.",
        f"{bind} ssl crt {server.tls_cert} alpn http/1.1 ssl-min-ver TLSv1.2 ciphers {INTERMEDIATE_CIPHERS}",
    ]


def _haproxy_redirect(server: ServerConfig) -> list[str]:
    """--http-redirect: plain HTTP answered with a 308 to the same host (its port dropped), path and query over
    https on the public port."""
    if server.http_redirect is None or server.tls_cert is None:
        return []
    port = "" if server.port == 443 else f":{server.port}"
    return [
        "frontend corral_http_redirect",
        f"    bind {address(server.host, server.http_redirect)}",
        f"    http-request redirect prefix https://%[req.hdr(host),field(1,:)]{port} code 308",
        "",
    ]


def _haproxy_backend(t: Target) -> list[str]:
    app = t.app
    read = read_timeout(app)
    # A single-threaded worker busy with a request answers its check only when that request is
    # done: the check may take as long as a request may, or busy workers would be marked down.
    check_timeout = read + app.health_timeout
    lines = [
        f"backend {t.ident}",
        f"    # app '{app.name}'",
        *_haproxy_balance(app),
        f"    timeout queue {seconds(app.queue_timeout)}",
        f"    timeout server {seconds(read)}",
        f"    timeout check {seconds(check_timeout)}",
        *(
            # HAProxy waits for the body only up to its buffer (tune.bufsize, 16 KiB): larger ones stream
            ["    option http-buffer-request  # request_buffering (up to tune.bufsize; corral buffers all)"]
            if app.request_buffering
            else []
        ),
        "    option httpchk",
        f"    http-check send meth GET uri {app.health_path or '/'} ver HTTP/1.1 hdr Host localhost",
    ]
    if app.health_path:
        lines.append("    http-check expect status 200-399")
    else:
        lines.append("    http-check expect rstatus ^[1-5]")  # without a health path any HTTP answer counts
    if app.strip_prefix:
        lines += [
            f"    http-request set-header X-Forwarded-Prefix {t.route}",
            f"    http-request replace-path ^{t.route}/?(.*) /\\1",
        ]
    # A refused connect on real traffic marks the server down at once; checks bring it back.
    lines.append(
        f"    default-server check inter {seconds(app.health_interval)} fall {app.health_fails} rise 1 "
        f"maxconn {app.max_inflight} observe layer4 error-limit 1 on-error mark-down"
    )
    for i, (host, port) in enumerate(t.servers):
        lines.append(f"    server {app.name}{i} {address(host, port)}{_haproxy_cookie(app, i)}")
    return [*lines, ""]


def _haproxy_balance(app: AppConfig) -> list[str]:
    """Balancing and stickiness (config.sticky_mode); the same in an app's two backends, so that a
    client's page requests and its WebSocket session reach the same worker."""
    mode = sticky_mode(app)
    if mode == "cookie":
        # As corral's own: an opaque cookie naming the worker. `indirect`: the worker never sees it,
        # and a client whose cookie names a live worker is not sent it again; with `option redispatch`
        # a client whose worker is gone goes to another and gets a new cookie.
        return ["    balance leastconn", f"    cookie {STICKY_COOKIE} insert indirect nocache httponly"]
    if mode == "ip":
        # Consistent: a worker that goes away moves only its own clients. With trusted_proxies, use
        # `balance hdr(X-Forwarded-For)` instead if every request comes through them.
        return ["    balance source", "    hash-type consistent"]
    return ["    balance leastconn"]


def _haproxy_cookie(app: AppConfig, index: int) -> str:
    return f" cookie s{index}" if sticky_mode(app) == "cookie" else ""


def _haproxy_ws_backend(t: Target) -> list[str]:
    """An app's WebSocket sessions: the same workers (their health tracked from the plain backend),
    maxconn = max_sessions, and the tunnel's own idle timeout once the worker has answered 101."""
    app = t.app
    lines = [
        f"backend {t.ident}_ws",
        f"    # app '{app.name}': WebSocket sessions, at most max_sessions = {app.max_sessions} per worker",
        *_haproxy_balance(app),
        f"    timeout queue {seconds(app.queue_timeout)}",
        f"    timeout server {seconds(read_timeout(app))}  # until the worker's 101",
        f"    timeout tunnel {seconds(app.ws_idle_timeout)}  # ws_idle_timeout: after the 101, both ways",
    ]
    if app.strip_prefix:
        lines += [
            f"    http-request set-header X-Forwarded-Prefix {t.route}",
            f"    http-request replace-path ^{t.route}/?(.*) /\\1",
        ]
    lines.append(f"    default-server maxconn {app.max_sessions}")
    for i, (host, port) in enumerate(t.servers):
        name = f"{app.name}{i}"
        lines.append(f"    server {name} {address(host, port)} track {t.ident}/{name}{_haproxy_cookie(app, i)}")
    return [*lines, ""]
