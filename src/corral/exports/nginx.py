"""`corral export nginx`: an nginx conf.d file that balances corral's workers.

For people who already run nginx: `corral run --supervise-only` keeps the workers alive on fixed ports
and nginx balances them. Each of corral's knobs maps onto the nearest nginx setting, and the file says
in comments where there is none (NGINX_LIMITS).
"""

from __future__ import annotations

import math
import re

from ..config import AppConfig, Config, KiB, ServerConfig, sticky_mode
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

NGINX_LIMITS = """\
#
# What nginx (open source) cannot do that corral's own balancer does:
#  - No central queue. nginx hands every request to a worker at once (least_conn), so on
#    single-threaded workers a request can wait behind a slow one while another worker is idle.
#    `max_conns` would cap a worker at max_inflight, but waiting for a free worker (`queue`) is
#    NGINX Plus only: without it, requests over the cap get 502, so this file sets no max_conns.
#  - No active health checks (`health_check` is NGINX Plus). A dead worker is noticed only when a
#    real request fails to connect (max_fails/fail_timeout), and nginx cannot tell a busy
#    single-threaded worker from a hung one; corral probes only idle workers.
#  - No upstream keep-alive here, on purpose: plumber (httpuv) writes a response's head and body
#    as two segments, and on a reused connection the body waits for nginx's delayed ACK: about
#    40 ms per request. corral re-arms TCP_QUICKACK per read; nginx cannot, so every request
#    gets a fresh connection (no `keepalive` in the upstream blocks).
#  - max_queue, queue_timeout and request_timeout have no nginx equivalent: proxy_read_timeout
#    below covers queue_timeout + request_timeout, the longest a request may take in corral.
#  - No session limit: max_sessions (WebSocket sessions per worker) has no nginx equivalent, and
#    an open session is one more connection to its worker for least_conn to count."""

# WebSocket (RFC 6455): only `Upgrade: websocket` is passed on, as corral does (h2c and other upgrades
# are served as plain requests); nginx tunnels the connection after the worker's 101. Every other
# request keeps `Connection: close` (no upstream keep-alive, above). The variables are named corral_*
# so they cannot clash with a `map $http_upgrade $connection_upgrade` already in the http {} block.
NGINX_WEBSOCKET = [
    "map $http_upgrade $corral_upgrade {",
    '    "~*^websocket$" websocket;',
    '    default "";',
    "}",
    "map $http_upgrade $corral_connection_upgrade {",
    '    "~*^websocket$" upgrade;',
    "    default close;",
    "}",
    "",
]


def nginx(cfg: Config) -> str:
    server = cfg.server
    lines = [*generated_header("nginx", cfg.source)]
    lines += [
        "# Include it from the http {} block, e.g. as /etc/nginx/conf.d/corral.conf, then `nginx -t`.",
        NGINX_LIMITS,
        "",
        *NGINX_WEBSOCKET,
    ]
    tgts = targets(cfg)
    for t in tgts:
        lines += _nginx_upstream(t)
    # As corral does: a client's own X-Forwarded-For is replaced, unless it comes via trusted_proxies
    # (then also add `set_real_ip_from` for them, or nginx appends to what anyone sends).
    xff = "$proxy_add_x_forwarded_for" if trusted_proxies(cfg) else "$remote_addr"
    lines += _nginx_redirect(server)
    lines += [
        "server {",
        f"    listen {address(server.host, server.port)}{' ssl' if server.tls_cert else ''};",
        "    server_name _;",
        *_nginx_tls(server),
        f"    client_max_body_size {max(server.max_body, 1)};",
        f"    large_client_header_buffers 4 {math.ceil(server.max_header_bytes / 1024)}k;",
        f"    client_header_timeout {seconds(server.header_timeout)};",
        f"    client_body_timeout {seconds(server.body_timeout)};",
        f"    keepalive_timeout {seconds(server.keepalive_timeout)};",
        f"    send_timeout {seconds(server.send_timeout)};",
        "",
        "    # What every app's worker is told (a location that set its own proxy_set_header would",
        "    # lose all of these, so the per-app prefix travels in a variable instead).",
        '    set $corral_prefix "";',
        "    proxy_http_version 1.1;",
        "    proxy_set_header Upgrade $corral_upgrade;  # not sent when empty: only WebSocket upgrades pass",
        "    proxy_set_header Connection $corral_connection_upgrade;  # close, or upgrade for a WebSocket",
        "    proxy_set_header Host $http_host;",
        f"    proxy_set_header X-Forwarded-For {xff};",
        "    proxy_set_header X-Forwarded-Proto $scheme;",
        "    proxy_set_header X-Forwarded-Host $http_host;",
        "    proxy_set_header X-Forwarded-Prefix $corral_prefix;  # not sent when empty",
        "    proxy_set_header X-Request-Id $request_id;",
        "    # Only a failed connect moves a request to another worker: one that timed out has run.",
        "    proxy_next_upstream error;",
        f"    proxy_send_timeout {seconds(server.body_timeout)};",
        "",
    ]
    for t in tgts:
        lines += _nginx_locations(t)
    if not any(t.route == "/" for t in tgts):
        lines += [
            "    # A path no app claims: answered here, never by a worker.",
            "    location / {",
            "        default_type application/json;",
            f"        return 404 '{NOT_FOUND_JSON}\\n';",
            "    }",
        ]
    lines += ["}", ""]
    return "\n".join(lines)


def _nginx_tls(server: ServerConfig) -> list[str]:
    """corral's TLS settings in nginx's words (Mozilla intermediate, as corral). A renewed certificate is read
    by `nginx -s reload`, as corral's by `corral reload`."""
    if server.tls_cert is None:
        return []
    return [
        f"    ssl_certificate {server.tls_cert};",
        f"    ssl_certificate_key {server.tls_key};",
        "    ssl_protocols TLSv1.2 TLSv1.3;",
        f"    ssl_ciphers {INTERMEDIATE_CIPHERS};",
        "    ssl_prefer_server_ciphers off;",
        "    # The handshake is bounded by client_header_timeout below (nginx >= 1.25.3: ssl_handshake_timeout).",
    ]


def _nginx_redirect(server: ServerConfig) -> list[str]:
    """--http-redirect: plain HTTP answered with a 308 to https. nginx's $host is the request's host, lower-cased
    and without its port, and nginx refuses a malformed Host itself (400)."""
    if server.http_redirect is None or server.tls_cert is None:
        return []
    port = "" if server.port == 443 else f":{server.port}"
    return [
        "server {",
        f"    listen {address(server.host, server.http_redirect)};",
        "    server_name _;",
        f"    return 308 https://$host{port}$request_uri;",
        "}",
        "",
    ]


def _nginx_upstream(t: Target) -> list[str]:
    app = t.app
    lines = [f"# app '{app.name}': " + ("workers corral supervises" if t.started_by_corral else "external upstreams")]
    lines += [f"upstream {t.ident} {{", *_nginx_balance(app)]
    # A refused connect takes a worker out at once (as in corral); after fail_timeout one real
    # request tries it again, standing in for corral's probe every health_interval.
    fail = seconds(max(app.health_interval, 1.0))
    for host, port in t.servers:
        lines.append(f"    server {address(host, port)} max_fails=1 fail_timeout={fail};")
    lines += ["    # no `keepalive`: see the note at the top of this file", "}", ""]
    return lines


def _nginx_balance(app: AppConfig) -> list[str]:
    """The upstream's balancing method, from the app's stickiness (config.sticky_mode)."""
    mode = sticky_mode(app)
    if mode == "none":
        return ["    least_conn;"]
    # A consistent hash of the whole address, not ip_hash (which keys IPv4 clients on their /24): a
    # worker that goes away moves only its own clients, as corral's ip mode does.
    why = [
        "    # sticky = ip: a client's address picks its worker; with trusted_proxies, add set_real_ip_from",
        "    # and real_ip_header X-Forwarded-For so that $remote_addr is the client's, not the proxy's.",
    ]
    if mode == "cookie":
        why = [
            "    # sticky = cookie, approximated: nginx open source cannot set a cookie (`sticky cookie` is",
            "    # NGINX Plus), and hashing $cookie_corral_sticky would hash nothing, since corral's balancer,",
            "    # which sets that cookie, is not in front here. So the client's address picks its worker:",
            "    # clients behind one NAT or proxy share a worker, and one whose address changes moves (its",
            "    # Shiny session reconnects and starts over). For real cookie stickiness use the HAProxy export.",
        ]
    return [*why, "    hash $remote_addr consistent;"]


def _nginx_locations(t: Target) -> list[str]:
    app = t.app
    route = t.route
    ws = f"@{t.ident}_websocket"
    body = [
        f"proxy_connect_timeout {seconds(max(app.health_timeout, 1.0))};",
        f"proxy_read_timeout {seconds(app.queue_timeout + read_timeout(app))};  # queue_timeout + request_timeout",
        *_nginx_buffering(app),
    ]
    upgrade = [  # after any `set` above: rewrite directives run in order, and `return` ends them
        f"error_page 418 = {ws};  # WebSocket upgrades: see {ws} below",
        'if ($http_upgrade ~* "^websocket$") { return 418; }',
    ]
    if route == "/":
        locations = [("/", f"http://{t.ident}")]
        note = "every path no other app claims"
    elif app.strip_prefix:
        # With a URI part, proxy_pass swaps the matched location for it: /api/x -> /x, /api -> /.
        locations = [(f"= {route}", f"http://{t.ident}/"), (f"{route}/", f"http://{t.ident}/")]
        body.append(f"set $corral_prefix {route};")
        note = f"{route} and everything under it, prefix stripped (X-Forwarded-Prefix: {route})"
    else:
        locations = [(f"= {route}", f"http://{t.ident}"), (f"{route}/", f"http://{t.ident}")]
        note = f"{route} and everything under it (never {route}x)"
    out = [f"    # app '{app.name}': {note}"]
    for loc, target in locations:
        out += [f"    location {loc} {{", f"        proxy_pass {target};"]
        out += [*(f"        {b}" for b in body + upgrade), "    }"]
    return [*out, *_nginx_websocket_location(t, ws), ""]


def _nginx_websocket_location(t: Target, name: str) -> list[str]:
    """The app's WebSocket tunnels. nginx has one read timeout per location and a tunnel needs
    ws_idle_timeout, far longer than a request may take; so upgrades are sent here (error_page to a
    named location, the one way to switch location on a header) instead of raising the plain one."""
    app = t.app
    idle = seconds(app.ws_idle_timeout)
    lines = [f"    # app '{app.name}': its WebSocket sessions; a tunnel idle for {idle} (ws_idle_timeout) is closed"]
    lines += [f"    location {name} {{"]
    if app.strip_prefix and t.route != "/":
        # A named location's proxy_pass takes no URI part: the prefix is cut by a rewrite instead.
        lines += [f"        set $corral_prefix {t.route};", f"        rewrite ^{re.escape(t.route)}/?(.*)$ /$1 break;"]
    return [
        *lines,
        f"        proxy_pass http://{t.ident};",
        f"        proxy_connect_timeout {seconds(max(app.health_timeout, 1.0))};",
        f"        proxy_read_timeout {idle};",
        f"        proxy_send_timeout {idle};",
        "    }",
    ]


def _nginx_buffering(app: AppConfig) -> list[str]:
    """response_buffer / response_buffer_file as nginx's proxy_buffering: memory, then a temporary file."""
    if app.response_buffer == 0 and app.response_buffer_file == 0:
        return ["proxy_buffering off;  # response_buffer = response_buffer_file = 0: read as the client reads"]
    # nginx wants at least a few buffers (busy buffers < all buffers minus one): small budgets use 4k ones.
    size = 64 * KiB if app.response_buffer >= 4 * 64 * KiB else 4 * KiB
    n = max(4, math.ceil(app.response_buffer / size))
    return [
        f"proxy_buffer_size {size // KiB}k;",
        f"proxy_buffers {n} {size // KiB}k;  # response_buffer",
        f"proxy_max_temp_file_size {app.response_buffer_file};  # response_buffer_file",
        *_nginx_request_buffering(app),
    ]


def _nginx_request_buffering(app: AppConfig) -> list[str]:
    """request_buffering / request_buffer as nginx's proxy_request_buffering: memory, then a temporary file."""
    if not app.request_buffering:
        return ["proxy_request_buffering off;  # request_buffering = false: bodies stream to the worker"]
    return [
        "proxy_request_buffering on;  # request_buffering: a worker sees a request once its body is whole",
        f"client_body_buffer_size {max(app.request_buffer, KiB) // KiB}k;  # request_buffer",
    ]
