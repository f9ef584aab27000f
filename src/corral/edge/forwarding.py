"""What crosses the proxy: the hop-by-hop fields that never do, and the request head a worker receives."""

from __future__ import annotations

from .head import RequestHead

# RFC 9110 7.6.1 + the de-facto ones every proxy strips. Both readers (request.py, response.py) drop them
# while parsing, so no head corral forwards or relays ever carries them.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Headers corral regenerates toward the worker (framing) or answers itself (Expect).
_REGENERATED = frozenset({b"content-length", b"expect"})


def forward_head(
    head: RequestHead,
    client_ip: bytes,
    request_id: bytes,
    trusted: bool,
    proto: bytes = b"http",
    prefix: bytes = b"",
    traceparent: bytes = b"",
) -> bytes:
    """The request head corral sends a worker: regenerated framing, forwarding headers, no hop-by-hop.

    X-Forwarded-* and Forwarded from an untrusted peer are dropped (a client must not be able to pick
    the address an app logs or rate-limits); from a trusted proxy they are kept and appended to.
    `traceparent` (tracing.py) replaces the client's; its tracestate goes along only when the
    traceparent is the client's own, unchanged (W3C: a restarted trace drops the old tracestate).
    """
    parts = [head.method, b" ", head.target, b" HTTP/1.1\r\n"]
    xff: list[bytes] = []
    fwd: list[bytes] = []
    xfp = xfh = xfprefix = b""
    has_rid = False
    via = -1
    tracestate: list[bytes] = []
    continued = False
    for name, value in head.headers:
        if name in _REGENERATED:
            continue
        if name[:12] == b"x-forwarded-" or name == b"forwarded":
            if not trusted:
                continue
            if name == b"x-forwarded-for":
                xff.append(value)
                continue
            if name == b"forwarded":
                fwd.append(value)
                continue
            if name == b"x-forwarded-proto":
                xfp = xfp or value
                continue
            if name == b"x-forwarded-host":
                xfh = xfh or value
                continue
            if name == b"x-forwarded-prefix":
                xfprefix = xfprefix or value
                continue
        elif name == b"x-request-id":
            has_rid = True
        elif name == b"via":
            via = len(parts) + 2  # RFC 9110 7.6.3: corral's entry goes after the last one
        elif traceparent and (name == b"traceparent" or name == b"tracestate"):
            if name == b"tracestate":
                tracestate.append(value)
            else:
                continued = continued or value == traceparent
            continue
        parts += [name, b": ", value, b"\r\n"]
    if via >= 0:
        parts[via] += b", 1.1 corral"
    else:
        parts.append(b"via: 1.1 corral\r\n")
    if not has_rid:
        parts += [b"x-request-id: ", request_id, b"\r\n"]
    if traceparent:
        parts += [b"traceparent: ", traceparent, b"\r\n"]
        if continued and tracestate:
            parts += [b"tracestate: ", b",".join(tracestate), b"\r\n"]
    xff.append(client_ip)
    parts += [b"x-forwarded-for: ", b", ".join(xff), b"\r\nx-forwarded-proto: ", xfp or proto, b"\r\n"]
    if xfh or head.host:
        parts += [b"x-forwarded-host: ", xfh or head.host, b"\r\n"]
    if xfprefix or prefix:
        parts += [b"x-forwarded-prefix: ", xfprefix + prefix, b"\r\n"]
    if fwd:
        node = b'"[%s]"' % client_ip if b":" in client_ip else client_ip
        fwd.append(b"for=%s;proto=%s" % (node, proto))
        parts += [b"forwarded: ", b", ".join(fwd), b"\r\n"]
    if head.websocket:
        parts.append(b"upgrade: websocket\r\nconnection: upgrade\r\n")
    if head.chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    elif head.content_length is not None:
        parts += [b"content-length: ", str(head.content_length).encode(), b"\r\n"]
    parts.append(b"\r\n")
    return b"".join(parts)
