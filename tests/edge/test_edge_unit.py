"""corral.edge without sockets: feed bytes, record what the handler is told, check what is refused and why."""

from __future__ import annotations

import pytest

from corral import edge
from corral.config import ServerConfig
from corral.datapath.client import Edge
from corral.edge import EdgeError, EdgeLimits, RequestReader, ResponseReader, UpstreamError

pytestmark = pytest.mark.unit  # in-process: no child process, no listener (tests/conftest.py)

# Every status RequestReader may raise; the proxy adds 408 from its timers.
READER_STATUSES = {400, 413, 414, 417, 431, 501, 505}


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.heads: list[edge.RequestHead] = []

    def on_request(self, head: edge.RequestHead) -> None:
        self.heads.append(head)
        self.events.append(("head", head.method, head.target))

    def on_request_body(self, data: bytes) -> None:
        if self.events and self.events[-1][0] == "body":
            self.events[-1] = ("body", self.events[-1][1] + data)  # splits must not matter
        else:
            self.events.append(("body", data))

    def on_tunnel_data(self, data: bytes) -> None:
        self.events.append(("tunnel", data))

    def on_request_end(self) -> None:
        self.events.append(("end",))


def parse(data: bytes, split: int | None = None, **limits: int) -> tuple[Recorder, EdgeError | None]:
    rec = Recorder()
    reader = RequestReader(rec, EdgeLimits(**limits))
    pieces = [data] if split is None else [data[i : i + split] for i in range(0, len(data), split)]
    try:
        for piece in pieces:
            reader.feed(piece)
    except EdgeError as exc:
        return rec, exc
    return rec, None


def status_of(data: bytes, **limits: int) -> int | None:
    _, err = parse(data, **limits)
    return None if err is None else err.status


GET = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
CHUNKED_POST = (
    b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;name=value;flag\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n"
)


# --- what must parse ------------------------------------------------------------------------------
def test_get_is_one_request_whatever_the_split():
    expected = [("head", b"GET", b"/x"), ("end",)]
    for split in (None, 1, 2, 5, 7):
        rec, err = parse(GET, split)
        assert err is None and rec.events == expected, split


def test_chunked_body_with_extensions_and_trailers_whatever_the_split():
    expected = [("head", b"POST", b"/up"), ("body", b"abcde"), ("end",)]
    for split in (None, 1, 3, 4, 11):
        rec, err = parse(CHUNKED_POST + GET, split)
        assert err is None, (split, err)
        assert rec.events == [*expected, ("head", b"GET", b"/x"), ("end",)], split
        assert rec.heads[0].chunked and rec.heads[0].header(b"x-trailer") is None  # trailers are not fields


def test_content_length_body_and_pipelined_requests():
    data = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: a\r\n\r\n"
    for split in (None, 1, 6):
        rec, err = parse(data, split)
        assert err is None
        assert rec.events == [("head", b"POST", b"/a"), ("body", b"hello"), ("end",), ("head", b"GET", b"/b"), ("end",)]


def test_blank_lines_before_a_request_are_skipped():
    rec, err = parse(b"\r\n\r\n" + GET)
    assert err is None and rec.events[0] == ("head", b"GET", b"/x")


def test_head_exactly_at_the_bound_is_accepted_one_more_byte_is_not():
    base = b"GET / HTTP/1.1\r\nHost: a\r\nX: \r\n\r\n"
    pad = 300 - len(base)
    exact = base.replace(b"X: ", b"X: " + b"v" * pad)
    assert len(exact) == 300
    assert status_of(exact, max_header_bytes=300) is None
    assert status_of(exact.replace(b"X: ", b"X: v"), max_header_bytes=300) == 431


def test_expect_100_continue_is_flagged_and_not_a_forwarded_field():
    rec, err = parse(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\nx")
    assert err is None and rec.heads[0].expect_continue
    assert b"expect" not in edge.forward_head(rec.heads[0], b"10.0.0.1", b"rid", trusted=False).lower()


def test_hop_by_hop_and_connection_named_fields_are_dropped():
    rec, err = parse(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Private\r\nX-Private: 1\r\nKeep-Alive: 5\r\n"
        b"TE: trailers\r\nTrailer: X\r\nUpgrade: h2c\r\nProxy-Authorization: secret\r\nProxy-Connection: x\r\n"
        b"X-Kept: 2\r\n\r\n"
    )
    assert err is None
    names = [k for k, _ in rec.heads[0].headers]
    assert names == [b"host", b"x-kept"]


def test_absolute_form_target_becomes_origin_form_and_replaces_host():
    rec, err = parse(b"GET http://example.com:8080/p?q=1 HTTP/1.1\r\nHost: other\r\n\r\n")
    assert err is None
    head = rec.heads[0]
    assert head.target == b"/p?q=1" and head.host == b"example.com:8080"
    assert head.header(b"host") == b"example.com:8080"


def test_upgrade_offer_other_than_websocket_is_declined_and_parsing_continues():
    rec, err = parse(b"GET /h HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n" + GET)
    assert err is None
    assert rec.events == [("head", b"GET", b"/h"), ("end",), ("head", b"GET", b"/x"), ("end",)]
    assert rec.heads[0].header(b"upgrade") is None and not rec.heads[0].websocket


@pytest.mark.parametrize("split", [None, 1])
def test_websocket_upgrade_is_accepted_and_what_follows_is_tunnel_data(split):
    ws = b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    rec, err = parse(ws + GET, split)  # after the head, even HTTP-looking bytes belong to the tunnel
    assert err is None
    assert rec.events[:2] == [("head", b"GET", b"/ws"), ("end",)]
    assert b"".join(e[1] for e in rec.events[2:] if e[0] == "tunnel") == GET
    assert rec.heads[0].websocket and len(rec.heads) == 1
    forwarded = edge.forward_head(rec.heads[0], b"1.2.3.4", b"rid", trusted=False)
    assert b"upgrade: websocket\r\nconnection: upgrade\r\n" in forwarded


@pytest.mark.parametrize(
    "head",
    [
        b"POST /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",  # not GET
        b"GET /ws HTTP/1.0\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",  # not 1.1
        b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n",  # Connection does not say upgrade
    ],
)
def test_not_quite_websocket_is_declined(head):
    rec, err = parse(head + GET)
    assert err is None and not rec.heads[0].websocket and len(rec.heads) == 2


def test_http10_needs_no_host_and_closes_by_default():
    rec, err = parse(b"GET / HTTP/1.0\r\n\r\n")
    assert err is None and rec.heads[0].version == b"1.0" and not rec.heads[0].keep_alive


# --- what must be refused -------------------------------------------------------------------------
H = b"Host: a\r\n"
TEC = b"Transfer-Encoding: chunked\r\n"
REFUSED = {
    # framing (RFC 9112 6)
    "cl-and-te": (
        b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "te-and-cl": (
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
        400,
    ),
    "cl-differing": (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    "cl-duplicate": (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    "cl-list": (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabc", 400),
    "cl-plus": (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc", 400),
    "cl-hex": (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x3\r\n\r\nabc", 400),
    "cl-negative": (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", 400),
    "cl-overflow": (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 99999999999999999999999\r\n\r\n", 400),
    "te-gzip-final": (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\n\r\n", 400),
    "te-chunked-not-final": (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, gzip\r\n\r\n", 400),
    "te-empty": (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: \r\n\r\n", 400),
    "te-unknown": (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: foo\r\n\r\n", 501),
    "te-identity": (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: identity\r\n\r\n", 501),
    "te-gzip-chunked": (b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    "te-in-http10": (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "te-split-over-fields": (
        b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    "chunk-size-not-hex": (b"POST / HTTP/1.1\r\n" + H + TEC + b"\r\nzz\r\n", 400),
    "chunk-size-negative": (b"POST / HTTP/1.1\r\n" + H + TEC + b"\r\n-1\r\n", 400),
    "chunk-size-space": (b"POST / HTTP/1.1\r\n" + H + TEC + b"\r\n3 \r\nabc\r\n0\r\n\r\n", 400),
    "chunk-size-overflow": (
        b"POST / HTTP/1.1\r\n" + H + TEC + b"\r\n10000000000000000\r\n",
        400,
    ),
    "chunk-size-bare-lf": (b"POST / HTTP/1.1\r\n" + H + TEC + b"\r\n3\nabc\r\n0\r\n\r\n", 400),
    "chunk-data-too-long": (b"POST / HTTP/1.1\r\n" + H + TEC + b"\r\n3\r\nabcd\r\n0\r\n\r\n", 400),
    "chunk-ext-bad-char": (b"POST / HTTP/1.1\r\n" + H + TEC + b"\r\n3;a b\r\nabc\r\n0\r\n\r\n", 400),
    "chunk-ext-too-long": (
        b"POST / HTTP/1.1\r\n" + H + TEC + b"\r\n3;" + b"e" * 5000 + b"\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    "trailers-too-many": (
        b"POST / HTTP/1.1\r\n" + H + TEC + b"\r\n0\r\n" + b"T: 1\r\n" * 101 + b"\r\n",
        431,
    ),
    "trailers-too-large": (
        b"POST / HTTP/1.1\r\n" + H + TEC + b"\r\n0\r\nT: " + b"t" * 17000 + b"\r\n\r\n",
        431,
    ),
    # field syntax (RFC 9112 5)
    "ws-before-colon": (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    "tab-before-colon": (b"GET / HTTP/1.1\r\n" + H + b"X\t: a\r\n\r\n", 400),
    "obs-fold": (b"GET / HTTP/1.1\r\n" + H + b"X: a\r\n b\r\n\r\n", 400),
    "obs-fold-tab": (b"GET / HTTP/1.1\r\n" + H + b"X: a\r\n\tb\r\n\r\n", 400),
    "bare-cr-in-value": (b"GET / HTTP/1.1\r\n" + H + b"X: a\rb\r\n\r\n", 400),
    "bare-lf-line-end": (b"GET / HTTP/1.1\r\n" + H + b"X: a\n\r\n", 400),
    "bare-lf-head-end": (b"GET / HTTP/1.1\n\n", 400),
    "nul-in-value": (b"GET / HTTP/1.1\r\n" + H + b"X: a\x00b\r\n\r\n", 400),
    "ctl-in-value": (b"GET / HTTP/1.1\r\n" + H + b"X: a\x01b\r\n\r\n", 400),
    "del-in-value": (b"GET / HTTP/1.1\r\n" + H + b"X: a\x7fb\r\n\r\n", 400),
    "ctl-in-name": (b"GET / HTTP/1.1\r\n" + H + b"X\x01Y: a\r\n\r\n", 400),
    "empty-name": (b"GET / HTTP/1.1\r\n" + H + b": a\r\n\r\n", 400),
    "nul-in-target": (b"GET /a\x00b HTTP/1.1\r\n" + H + b"\r\n", 400),
    # request line (RFC 9112 3)
    "double-space": (b"GET  / HTTP/1.1\r\n" + H + b"\r\n", 400),
    "double-space-before-version": (b"GET /  HTTP/1.1\r\n" + H + b"\r\n", 400),
    "tab-separator": (b"GET\t/ HTTP/1.1\r\n" + H + b"\r\n", 400),
    "http09": (b"GET /\r\n\r\n", 400),
    "trailing-space": (b"GET / HTTP/1.1 \r\n" + H + b"\r\n", 400),
    "lowercase-method": (b"get / HTTP/1.1\r\n" + H + b"\r\n", 400),
    "unknown-method": (b"FOO / HTTP/1.1\r\n" + H + b"\r\n", 400),
    "rtsp-version": (b"GET / RTSP/1.0\r\n" + H + b"\r\n", 400),
    "lowercase-http": (b"GET / http/1.1\r\n" + H + b"\r\n", 400),
    "version-1.2-no-host": (b"GET / HTTP/1.2\r\n\r\n", 400),  # served as 1.1, so Host is required
    "version-2": (b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    "h2-preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    "space-in-target": (b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400),
    "fragment": (b"GET /a#b HTTP/1.1\r\n" + H + b"\r\n", 400),
    "relative-target": (b"GET a HTTP/1.1\r\n" + H + b"\r\n", 400),
    "asterisk-not-options": (b"GET * HTTP/1.1\r\n" + H + b"\r\n", 400),
    "absolute-bad-scheme": (b"GET ftp://a/ HTTP/1.1\r\n" + H + b"\r\n", 400),
    "absolute-userinfo": (b"GET http://u@a/ HTTP/1.1\r\n" + H + b"\r\n", 400),
    "connect": (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 501),  # 405 would need an Allow list
    # Host (RFC 9112 3.2)
    "no-host": (b"GET / HTTP/1.1\r\n\r\n", 400),
    "two-hosts": (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "empty-then-host": (b"GET / HTTP/1.1\r\nHost:\r\nHost: b\r\n\r\n", 400),
    "bad-host": (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    "bad-host-slash": (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
    # Expect, Upgrade
    "expect-other": (b"GET / HTTP/1.1\r\n" + H + b"Expect: 200-ok\r\n\r\n", 417),
    "upgrade-with-body": (
        b"POST / HTTP/1.1\r\n" + H + b"Upgrade: h2c\r\nConnection: upgrade\r\nContent-Length: 1\r\n\r\nx",
        501,
    ),
    # limits (defaults)
    "too-many-fields": (b"GET / HTTP/1.1\r\n" + H + b"X: 1\r\n" * 100 + b"\r\n", 431),
    "too-many-connection-fields": (b"GET / HTTP/1.1\r\n" + H + b"Connection: x\r\n" * 100 + b"\r\n", 431),
    "head-too-large": (b"GET / HTTP/1.1\r\n" + H + b"X: " + b"v" * 17000 + b"\r\n\r\n", 431),
    "line-too-long": (b"GET /" + b"p" * 17000 + b" HTTP/1.1\r\n" + H + b"\r\n", 414),
    "endless-blank-lines": (b"\r\n" * 9000, 414),
    "body-too-large": (b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 104857601\r\n\r\n", 413),
    "chunk-too-large": (b"POST / HTTP/1.1\r\n" + H + TEC + b"\r\n6400001\r\n", 413),
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_whole_and_byte_by_byte(name):
    data, status = REFUSED[name]
    for split in (None, 1):
        rec, err = parse(data, split)
        assert err is not None, (name, split, rec.events)
        assert err.status == status, (name, split, err.status, err.reason)
        assert ("end",) not in rec.events


def test_a_refused_request_is_never_announced_when_its_head_and_fault_arrive_together():
    # The worker would see the head the moment on_request fires; here it must not fire at all.
    for name in ("chunk-size-not-hex", "chunk-ext-too-long", "chunk-too-large", "chunk-data-too-long"):
        rec, err = parse(REFUSED[name][0])
        assert err is not None and rec.events == [], name


def test_requests_before_a_refused_one_are_still_delivered():
    rec, err = parse(GET + b"GET  /bad HTTP/1.1\r\nHost: a\r\n\r\n")
    assert err is not None and err.status == 400
    assert rec.events == [("head", b"GET", b"/x"), ("end",)]


def test_a_failed_reader_stays_failed():
    rec = Recorder()
    reader = RequestReader(rec, EdgeLimits())
    with pytest.raises(EdgeError):
        reader.feed(b"GET  / HTTP/1.1\r\n\r\n")
    with pytest.raises(EdgeError):
        reader.feed(GET)
    assert rec.events == []


def test_limits_are_configurable():
    big = b"GET / HTTP/1.1\r\n" + H + b"X: 1\r\n" * 5 + b"\r\n"
    assert status_of(big, max_headers=5) == 431 and status_of(big, max_headers=6) is None
    post = b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 11\r\n\r\nhello world"
    assert status_of(post, max_body=10) == 413 and status_of(post, max_body=11) is None
    chunks = b"POST / HTTP/1.1\r\n" + H + TEC + b"\r\n" + b"4\r\nabcd\r\n" * 3 + b"0\r\n\r\n"
    assert status_of(chunks, max_body=11) == 413 and status_of(chunks, max_body=12) is None
    ext = b"POST / HTTP/1.1\r\n" + H + TEC + b"\r\n1;" + b"e" * 95 + b"\r\nx\r\n0\r\n\r\n"
    assert status_of(ext, max_chunk_line=98) == 400 and status_of(ext, max_chunk_line=99) is None  # 99-byte line


def test_server_config_defaults_reach_the_edge():
    e = Edge(ServerConfig(max_connections=10000))  # server.py sizes the default (None) from the fd limit
    assert (e.limits.max_header_bytes, e.limits.max_headers, e.limits.max_body) == (16384, 100, 100 * 1024 * 1024)
    assert (e.header_timeout, e.body_timeout, e.keepalive_timeout, e.max_connections) == (10, 30, 5, 10000)
    assert e.send_timeout == 60
    assert e.trusted == [] and not e.is_trusted("127.0.0.1")
    e = Edge(ServerConfig(trusted_proxies="10.0.0.0/8, ::1"))
    assert e.is_trusted("10.1.2.3") and e.is_trusted("::1") and not e.is_trusted("11.0.0.1")


# --- forwarding -----------------------------------------------------------------------------------
def _head(raw: bytes) -> edge.RequestHead:
    rec, err = parse(raw)
    assert err is None
    return rec.heads[0]


def _fields(forwarded: bytes) -> list[tuple[bytes, bytes]]:
    lines = forwarded.split(b"\r\n")
    assert lines[-2:] == [b"", b""]
    out = []
    for line in lines[1:-2]:
        k, _, v = line.partition(b": ")
        out.append((k, v))
    return out


SPOOF = (
    b"GET /p HTTP/1.1\r\nHost: app.example\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-For: 7.7.7.7\r\n"
    b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\nX-Forwarded-Prefix: /evil\r\n"
    b"X-Forwarded-Port: 1\r\nForwarded: for=6.6.6.6\r\n\r\n"
)


def test_untrusted_peer_cannot_choose_forwarding_headers():
    fields = dict(_fields(edge.forward_head(_head(SPOOF), b"10.0.0.9", b"rid-1", trusted=False)))
    assert fields[b"x-forwarded-for"] == b"10.0.0.9"
    assert fields[b"x-forwarded-proto"] == b"http"
    assert fields[b"x-forwarded-host"] == b"app.example"
    for name in (b"forwarded", b"x-forwarded-prefix", b"x-forwarded-port"):
        assert name not in fields


def test_trusted_peer_forwarding_headers_are_kept_and_appended_to():
    out = edge.forward_head(_head(SPOOF), b"10.0.0.9", b"rid-1", trusted=True, prefix=b"/api")
    fields = dict(_fields(out))
    assert fields[b"x-forwarded-for"] == b"6.6.6.6, 7.7.7.7, 10.0.0.9"
    assert fields[b"x-forwarded-proto"] == b"https"
    assert fields[b"x-forwarded-host"] == b"evil.example"
    assert fields[b"x-forwarded-prefix"] == b"/evil/api"
    assert fields[b"x-forwarded-port"] == b"1"
    assert fields[b"forwarded"] == b"for=6.6.6.6, for=10.0.0.9;proto=http"
    v6 = dict(_fields(edge.forward_head(_head(SPOOF), b"::1", b"r", trusted=True)))
    assert v6[b"forwarded"].endswith(b'for="[::1]";proto=http')


def test_forwarded_head_regenerates_framing_and_adds_via_and_request_id():
    head = _head(b"POST /u?q HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\nContent-Length: 3\r\n\r\nabc")
    out = edge.forward_head(head, b"1.2.3.4", b"rid-9", trusted=False)
    assert out.startswith(b"POST /u?q HTTP/1.1\r\n")
    fields = _fields(out)
    names = [k for k, _ in fields]
    assert names.count(b"content-length") == 1 and (b"content-length", b"3") in fields
    assert (b"via", b"1.1 corral") in fields and (b"x-request-id", b"rid-9") in fields
    assert b"connection" not in names
    chunked = edge.forward_head(_head(CHUNKED_POST), b"1.2.3.4", b"r", trusted=False)
    assert (b"transfer-encoding", b"chunked") in _fields(chunked)


def test_existing_request_id_and_via_are_kept():
    head = _head(b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: abc\r\nVia: 1.0 a\r\nVia: 1.1 b\r\n\r\n")
    fields = _fields(edge.forward_head(head, b"1.2.3.4", b"new", trusted=False))
    assert [v for k, v in fields if k == b"x-request-id"] == [b"abc"]
    assert [v for k, v in fields if k == b"via"] == [b"1.0 a", b"1.1 b, 1.1 corral"]


# --- responses ------------------------------------------------------------------------------------
class ResponseRecorder:
    def __init__(self) -> None:
        self.head: tuple | None = None
        self.body = b""
        self.ended: bool | None = None

        self.surplus = False

    def on_response(self, status: int, headers: list[tuple[bytes, bytes]], framing: int) -> None:
        self.head = (status, headers, framing)

    def on_response_body(self, data: bytes) -> None:
        self.body += data

    def on_response_end(self, reusable: bool) -> None:
        self.ended = reusable

    def on_surplus(self) -> None:
        self.surplus = True


def reader_for(rec: ResponseRecorder, method: bytes = b"GET") -> ResponseReader:
    reader = ResponseReader(rec)
    reader.start(method)
    return reader


@pytest.mark.parametrize(
    "raw",
    [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nX: a\x00\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
    ],
)
def test_malformed_response_raises_upstream_error(raw):
    with pytest.raises(UpstreamError):
        reader_for(ResponseRecorder()).feed(raw)


def test_endless_response_head_is_bounded():
    reader = reader_for(ResponseRecorder())
    reader.feed(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(UpstreamError):
        for _ in range(300):
            reader.feed(b"X-Filler: " + b"f" * 8000 + b"\r\n")


def test_response_hop_by_hop_fields_are_stripped():
    rec = ResponseRecorder()
    reader_for(rec).feed(
        b"HTTP/1.1 200 OK\r\nConnection: X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\n"
        b"Content-Length: 2\r\nX-Kept: y\r\n\r\n{}"
    )
    assert rec.head is not None
    assert [k for k, _ in rec.head[1]] == [b"content-length", b"x-kept"]
    assert rec.body == b"{}" and rec.ended is True


def test_close_delimited_response_has_no_length_and_ends_at_eof():
    rec = ResponseRecorder()
    reader = reader_for(rec)
    reader.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil-")
    reader.feed(b"close")
    assert rec.head is not None and rec.head[2] == edge.UNTIL_CLOSE and rec.ended is None
    assert reader.eof() and rec.body == b"until-close" and rec.ended is False


def test_interim_responses_are_not_relayed():
    rec = ResponseRecorder()
    reader_for(rec).feed(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
    assert rec.head is not None and rec.head[0] == 204


def test_response_head_appends_via_and_request_id():
    out = edge.response_head(200, [(b"via", b"1.1 up")], b"rid", chunked=True, connection=b"close")
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"via: 1.1 up, 1.1 corral\r\n" in out and out.count(b"via:") == 1
    assert b"x-request-id: rid\r\n" in out and b"transfer-encoding: chunked\r\n" in out
    assert out.endswith(b"connection: close\r\n\r\n")


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_error_pages_are_short_and_leak_nothing(name):
    _, err = parse(REFUSED[name][0])
    assert err is not None
    page = edge.error_response(err.status, err.reason)
    head, _, body = page.partition(b"\r\n\r\n")
    assert len(body) < 100 and body.startswith(b"%d " % err.status)
    lowered = page.lower()
    for leak in (b"traceback", b"python", b"httptools", b"llhttp", b"corral", b".py", b"/usr", b"/home", b"server:"):
        assert leak not in lowered, (name, page)
    assert b"content-type: text/plain" in head


def test_truncated_chunked_or_sized_response_is_not_a_clean_eof():
    for raw in (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-Le",
    ):
        rec = ResponseRecorder()
        reader = reader_for(rec)
        reader.feed(raw)
        assert not reader.eof(), raw


def test_an_empty_chunk_never_ends_a_body():
    assert edge.chunk(b"") == b""
    assert edge.chunk(b"abc") == b"3\r\nabc\r\n"


# --- framing: one decision, and surplus bytes (issue 11) ---------------------------------------
@pytest.mark.parametrize(
    ("method", "status", "chunked", "length", "want"),
    [
        (b"HEAD", 200, False, 5, edge.NO_BODY),
        (b"GET", 204, False, 5, edge.NO_BODY),
        (b"GET", 304, False, 5, edge.NO_BODY),
        (b"GET", 101, False, None, edge.NO_BODY),
        (b"GET", 200, True, None, edge.CHUNKED),
        (b"GET", 200, False, 5, edge.LENGTH),
        (b"GET", 200, False, 0, edge.NO_BODY),
        (b"GET", 200, False, None, edge.UNTIL_CLOSE),
        (b"POST", None, False, None, edge.NO_BODY),
        (b"POST", None, False, 3, edge.LENGTH),
        (b"POST", None, True, None, edge.CHUNKED),
    ],
)
def test_body_framing_is_decided_in_one_place(method, status, chunked, length, want):
    assert edge.body_framing(method, status, chunked, length) == want


def test_client_framing_and_connection_token():
    assert edge.client_framing(edge.LENGTH, b"1.0") == (False, False)
    assert edge.client_framing(edge.CHUNKED, b"1.1") == (True, False)
    assert edge.client_framing(edge.UNTIL_CLOSE, b"1.0") == (False, True)
    assert edge.connection_token(b"1.0", True) == b"keep-alive"
    assert edge.connection_token(b"1.1", True) is None
    assert edge.connection_token(b"1.1", False) == b"close"


@pytest.mark.parametrize(
    ("method", "raw"),
    [
        (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"),
        (b"GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nXXXXX"),
        (b"GET", b"HTTP/1.1 304 Not Modified\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"),
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
        (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\nEXTRA"),
    ],
)
def test_surplus_bytes_end_the_response_and_the_connection(method, raw):
    rec = ResponseRecorder()
    reader_for(rec, method).feed(raw)
    assert rec.surplus and rec.ended is False  # the response is delivered; the connection is not reused


def test_bytes_before_any_request_are_surplus():
    reader = ResponseReader(ResponseRecorder())
    with pytest.raises(UpstreamError, match="more data than specified"):
        reader.feed(b"HTTP/1.1 200 OK\r\n")


def test_head_answer_split_over_reads_ends_at_its_head():
    rec = ResponseRecorder()
    reader = reader_for(rec, b"HEAD")
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Len")
    reader.feed(b"gth: 0\r\n\r\n")
    assert rec.ended is True and not rec.surplus and rec.head[2] == edge.NO_BODY
    reader.start(b"GET")  # the connection is reused: the next answer parses afresh
    reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert rec.body == b"ok"


def test_exact_response_leaves_the_connection_reusable():
    rec = ResponseRecorder()
    reader_for(rec).feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    assert rec.ended is True and not rec.surplus


@pytest.mark.parametrize("split", [None, 1, 7])
@pytest.mark.parametrize("lead", [b"", b"\r\n"])
def test_higher_http1_minor_version_is_served_as_11(split, lead):
    data = lead + b"GET /v HTTP/1.2\r\nHost: a\r\n\r\n" + GET
    rec, err = parse(data, split)
    assert err is None
    assert [e[:3] for e in rec.events if e[0] == "head"] == [("head", b"GET", b"/v"), ("head", b"GET", b"/x")]


def test_http09_line_is_refused_before_its_head_would_end():
    rec, err = parse(b"GET /v\r\n")  # no blank line follows: nothing to wait for
    assert err is not None and err.status == 400 and rec.events == []


def test_expect_continue_is_ignored_for_http10():
    rec, err = parse(b"POST / HTTP/1.0\r\nContent-Length: 1\r\nExpect: 100-continue\r\n\r\nx")
    assert err is None and not rec.heads[0].expect_continue


def test_connection_cannot_strip_host_or_headers_corral_vouches_for():
    rec, err = parse(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: host, via, x-forwarded-for, x-a\r\nX-A: 1\r\n\r\n")
    assert err is None
    names = [k for k, _ in rec.heads[0].headers]
    assert b"host" in names and b"x-a" not in names


@pytest.mark.parametrize(
    ("method", "raw", "reusable"),
    [
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", False),  # its body may still come, late
        (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True),
        (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", False),
        (b"GET", b"HTTP/1.1 304 Not Modified\r\n\r\n", True),
        (b"GET", b"HTTP/1.1 204 No Content\r\n\r\n", True),
    ],
)
def test_bodyless_answer_declaring_a_body_is_not_reused(method, raw, reusable):
    rec = ResponseRecorder()
    reader_for(rec, method).feed(raw)
    assert rec.ended is reusable and not rec.surplus
