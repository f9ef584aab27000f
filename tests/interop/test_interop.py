"""corral driven by HTTP clients written elsewhere (ApacheBench, h2load, curl), judged by their own reports.

Each tool talks to a real corral in front of stub workers and must finish with zero failures. The
clients exercise what a hand-written test tends not to: HTTP/1.0 with and without keep-alive, and
HTTP/1.1 pipelining with several requests in flight per connection. Every tool runs under a deadline
of its own and a subprocess timeout, so a hang fails the test instead of hanging the suite.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import closed_by_peer, get, read_response, stub_args

N = 2000  # requests per load run: a few seconds each against two stub workers
BODY = 1000
# A fixed-length body: ab counts a response whose length differs from the first one as failed
# ("Length" failures), so a truncated or mis-framed body shows up in its report.
PATH = f"/big?n={BODY}"
TOOL_TIMEOUT = 120  # the subprocess deadline; far above the few seconds a healthy run takes


def _needs(binary: str, package: str):
    return pytest.mark.skipif(
        shutil.which(binary) is None,
        reason=f"{binary} not installed (Debian {package}; scripts/setup --test installs it)",
    )


def _run(argv: list[str], corral_proc, timeout: float = TOOL_TIMEOUT, diagnose=None) -> str:
    """Run a client to completion; its stdout+stderr. A non-zero exit or a timeout fails the test with
    the tool's output, the end of corral's log and, when given, what `diagnose()` finds."""

    def context() -> str:
        extra = f"\n--- diagnosis ---\n{diagnose()}" if diagnose else ""
        return f"--- corral log ---\n{corral_proc.log()[-3000:]}{extra}"

    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"{argv[0]} did not finish in {timeout} s (hang):\n{out}\n{err}\n{context()}")
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"{' '.join(argv)} exited {r.returncode}:\n{out}\n{context()}"
    return out


def _http10_keepalive_exchange(port: int) -> str:
    """What corral answers one HTTP/1.0 keep-alive request (as ab -k sends it), and whether it then closes."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /big?n=10 HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: Keep-Alive\r\n\r\n")
            r = read_response(s)
            closed = closed_by_peer(s, timeout=3)
        return f"{r.raw_head.decode('latin-1')}\n(connection {'closed' if closed else 'left open'} after the body)"
    except OSError as e:
        return f"probe failed: {e!r}"


def _field(report: str, name: str) -> int:
    m = re.search(rf"^{re.escape(name)}:\s+(\d+)", report, re.M)
    assert m, f"no {name!r} line in the report:\n{report}"
    return int(m.group(1))


def _assert_ab_clean(report: str) -> None:
    assert _field(report, "Complete requests") == N, report
    assert _field(report, "Failed requests") == 0, report
    assert "Non-2xx responses" not in report, report  # ab prints the line only when there are some
    assert _field(report, "Document Length") == BODY, report


def _assert_still_serving(c) -> None:
    assert get(c.port, "/after", timeout=10).status == 200
    # corral's own tracebacks only: worker output is relayed with a "[name:index] " prefix
    assert not re.search(r"^Traceback", c.log(), re.M), c.log()[-4000:]


@_needs("ab", "apache2-utils")
def test_ab_http10_one_request_per_connection(corral):
    c = corral(stub_args(), workers=2)
    report = _run(["ab", "-q", "-s", "10", "-n", str(N), "-c", "8", c.url + PATH], c)
    _assert_ab_clean(report)
    _assert_still_serving(c)


@_needs("ab", "apache2-utils")
def test_ab_http10_keepalive(corral):
    """ab -k sends HTTP/1.0 with `Connection: Keep-Alive`. An HTTP/1.0 client keeps the connection only
    when the response says `Connection: keep-alive`; otherwise it reads until close. So corral must
    either say keep-alive or close: a connection kept open silently leaves ab waiting (-s 10 then fails).
    The idle-client timeout is raised above ab's -s: at its default (5 s) corral would close each silent
    connection before ab gave up, and the run would crawl (5 s per request) instead of failing."""
    c = corral(stub_args("--keepalive-timeout", "60"), workers=2)
    report = _run(
        ["ab", "-q", "-k", "-s", "10", "-n", str(N), "-c", "8", c.url + PATH],
        c,
        diagnose=lambda: _http10_keepalive_exchange(c.port),
    )
    _assert_ab_clean(report)
    _assert_still_serving(c)


@_needs("h2load", "nghttp2-client")
def test_h2load_http11_pipelining_four_in_flight(corral):
    c = corral(stub_args(), workers=2)
    # -N: a connection idle that long is an error, so a stalled pipeline ends the run instead of hanging it
    report = _run(["h2load", "--h1", "-N", "10s", "-n", str(N), "-c", "4", "-m", "4", c.url + PATH], c)
    m = re.search(
        r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        report,
    )
    assert m, report
    total, _started, done, succeeded, failed, errored, timeouts = map(int, m.groups())
    context = f"{report}\n--- corral log ---\n{c.log()[-3000:]}"
    assert (total, done, succeeded, failed, errored, timeouts) == (N, N, N, 0, 0, 0), context
    assert f"status codes: {N} 2xx, 0 3xx, 0 4xx, 0 5xx" in report, context
    _assert_still_serving(c)


@_needs("curl", "curl")
def test_curl_http10_single_request(corral, tmp_path: Path):
    c = corral(stub_args(), workers=2)
    body = tmp_path / "one"
    out = _run(
        ["curl", "-sS", "--http1.0", "--max-time", "20", "-o", str(body), "-w", "%{http_code}\n", c.url + "/one?x=1"],
        c,
        timeout=60,
    )
    assert out.split() == ["200"], out
    seen = _json(body)
    assert seen["path"] == "/one?x=1"
    _assert_still_serving(c)


@_needs("curl", "curl")
def test_curl_http10_keepalive_two_urls_on_one_command(corral, tmp_path: Path):
    """curl keeps an HTTP/1.0 connection for the second URL only if the first response says keep-alive;
    either way both must arrive whole. The second answer is chunked upstream: an HTTP/1.0 client must
    get it without chunked framing."""
    c = corral(stub_args(), workers=2)
    first, second = tmp_path / "first", tmp_path / "second"
    out = _run(
        [
            "curl",
            "-sS",
            "--http1.0",
            "-H",
            "Connection: keep-alive",
            "--max-time",
            "20",
            "-w",
            "%{http_code} %{num_connects}\n",
            "-o",
            str(first),
            c.url + "/first",
            "-o",
            str(second),
            c.url + "/chunked",
        ],
        c,
        timeout=60,
    )
    codes = [line.split()[0] for line in out.strip().splitlines()]
    assert codes == ["200", "200"], out
    assert _json(first)["path"] == "/first"
    assert second.read_bytes() == b"hello chunked world"
    _assert_still_serving(c)


def _json(path: Path):
    raw = path.read_bytes()
    try:
        return json.loads(raw)
    except ValueError:
        pytest.fail(f"not a JSON body: {raw[:500]!r}")
