"""Delivery through corral between real programs: curl downloading at a limited rate, a client with a small
receive window that stops reading, and workers that close idle kept-alive connections (tests/support/soak_worker.py
after 50 ms, and the real gunicorn with --keep-alive 1).

The client's view comes first (exit code, status, size and every byte against the worker's deterministic
body), then corral's account of the same exchanges (JSON access log: status, bytes, cut; status: failed
counters). Every run is bounded (curl --max-time, socket timeouts, a fixed number of requests).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SUPPORT, poll, read_response
from support.soak_worker import pattern, pattern_pieces

SOAK = str(SUPPORT / "soak_worker.py")
APPS = SUPPORT / "apps"


def soak_args(*extra: str, worker: tuple[str, ...] = ()) -> list[str]:
    return [*extra, "--", sys.executable, SOAK, "{port}", *worker]


def access_lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def lines_by_id(path: Path, prefix: str, count: int) -> dict[str, dict]:
    """The access-log lines of the requests whose X-Request-Id starts with prefix, once there are count."""

    def ready():
        got = {ln["request_id"]: ln for ln in access_lines(path) if str(ln.get("request_id")).startswith(prefix)}
        return got if len(got) >= count else None

    return poll(f"{count} access-log lines for {prefix}*", ready, timeout=30)


def status_doc(port: int) -> dict:
    from corral.cli.verbs import AdminClient, locate

    return AdminClient(locate(port, None)).ok("GET", "/status")


def sha256_of_pattern(seed: int, n: int) -> str:
    h = hashlib.sha256()
    for piece in pattern_pieces(seed, n, 1 << 20):
        h.update(piece)
    return h.hexdigest()


def assert_delivered(line: dict, status: int, n: int, what: str) -> None:
    assert line["status"] == status, f"{what}: the client got {status}, the access log says {line}"
    assert line["bytes"] == n, f"{what}: the client got all {n} bytes, the access log says {line}"
    assert not line.get("cut"), f"{what}: the client got the answer whole, the access log says {line}"


def assert_no_failures(port: int, what: str) -> dict:
    doc = status_doc(port)
    app = doc["apps"][0]
    failed = {w["index"]: w["failed"] for w in app["workers"]}
    assert app["failed"] == 0 and not any(failed.values()), f"{what}: workers counted failed: {failed}, {app}"
    assert not app.get("restarts_total"), f"{what}: workers restarted: {app.get('restarts')}"
    return doc


# --- (a) curl at a limited rate: six 20 MB downloads at once --------------------------------------------
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
@pytest.mark.timeout(240)
def test_curl_rate_limited_20mb_downloads_arrive_whole(corral, tmp_path):
    """curl --limit-rate reads in bursts and sleeps between them, longer than corral's 0.5 s timer tick, so
    corral sees a client that stops reading again and again; the answers are bigger than the memory buffer
    (4 MiB) and go through the spill file. Each must arrive whole and be logged as delivered."""
    n = 20_000_000
    access = tmp_path / "access.log"
    c = corral(soak_args("--access-log", str(access), "--log-format", "json"), workers=2)
    runs = []
    for i in range(6):
        out = tmp_path / f"download-{i}"
        argv = [
            "curl",
            "-sS",
            "--limit-rate",
            "5M",
            "--max-time",
            "120",
            "-H",
            f"X-Request-Id: dl-{i}",
            "-o",
            str(out),
            "-w",
            "%{http_code} %{size_download}",
            f"{c.url}/cl?seed={1000 + i}&n={n}",
        ]
        runs.append((i, out, subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    results = {}
    for i, out, proc in runs:
        try:
            stdout, stderr = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
            pytest.fail(f"curl {i} did not finish: {stdout} {stderr}\n{c.log()[-3000:]}")
        results[i] = (proc.returncode, stdout, stderr, out)
    for i, (rc, stdout, stderr, out) in results.items():
        assert rc == 0 and stdout.split() == ["200", str(n)], (
            f"download {i}: curl exit {rc}, {stdout!r} {stderr!r}\n{c.log()[-3000:]}"
        )
        assert out.stat().st_size == n, f"download {i}: {out.stat().st_size} bytes of {n}"
        got = hashlib.sha256(out.read_bytes()).hexdigest()
        assert got == sha256_of_pattern(1000 + i, n), f"download {i}: right size, wrong bytes"
    lines = lines_by_id(access, "dl-", 6)
    for i in range(6):
        assert_delivered(lines[f"dl-{i}"], 200, n, f"download {i}")
    poll("workers idle", lambda: all(not w["inflight"] for w in status_doc(c.port)["apps"][0]["workers"]))
    assert_no_failures(c.port, "downloads")


# --- (b) a client with a 64 KiB receive window that stops reading for 2 s ----------------------------------
def _read_pattern(sock: socket.socket, buf: bytearray, seed: int, n: int, pause_at: int, pause: float) -> int:
    """Read an n-byte body after the head, checking each byte against pattern(seed); pause once at pause_at.
    The number of bytes that arrived (and matched)."""
    got = 0
    paused = False
    while got < n:
        if not buf:
            data = sock.recv(262144)
            if not data:
                return got
            buf += data
        take = min(len(buf), n - got)
        chunk = bytes(buf[:take])
        del buf[:take]
        assert chunk == pattern(seed, take, got), f"wrong bytes in {got}..{got + take}"
        got += take
        if not paused and got >= pause_at:
            paused = True
            time.sleep(pause)  # the behaviour under test: a reader that stops, longer than the 0.5 s tick
    return got


@pytest.mark.parametrize(
    ("config", "n"),
    [
        pytest.param([], 50_000_000, id="buffered"),
        # No spill file: the worker is read only as fast as the client reads, so each pause holds it back
        # longer than request_timeout; corral holding it back must not count as the worker hanging. 8 MB: the
        # worker's own time to write it stays far below the 1 s, so only the pauses could add up to that.
        pytest.param(
            ["--response-buffer", "65536", "--response-buffer-file", "0", "--request-timeout", "1"],
            8_000_000,
            id="back-pressure",
        ),
    ],
)
@pytest.mark.timeout(180)
def test_a_paused_small_window_client_gets_every_byte(corral, tmp_path, config, n):
    access = tmp_path / "access.log"
    c = corral(soak_args(*config, "--access-log", str(access), "--log-format", "json"), workers=1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.settimeout(60)
    with sock:
        sock.connect(("127.0.0.1", c.port))
        sock.sendall(f"GET /cl?seed=77&n={n} HTTP/1.1\r\nHost: t\r\nX-Request-Id: paused-0\r\n\r\n".encode())
        time.sleep(2.0)  # the behaviour under test: nothing read at all for 2 s
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            data = sock.recv(65536)
            assert data, f"closed before the head: {bytes(buf)!r}\n{c.log()[-3000:]}"
            buf += data
        end = buf.index(b"\r\n\r\n")
        head = bytes(buf[:end]).decode("latin-1")
        del buf[: end + 4]
        assert head.startswith("HTTP/1.1 200"), head
        assert f"content-length: {n}" in head.lower(), head
        got = _read_pattern(sock, buf, 77, n, pause_at=n // 2, pause=2.0)
        assert got == n, f"the connection closed after {got} of {n} bytes\n{c.log()[-3000:]}"
        # The connection is still good for the next request.
        sock.sendall(b"GET /cl?seed=78&n=1000 HTTP/1.1\r\nHost: t\r\nX-Request-Id: paused-1\r\n\r\n")
        r = read_response(sock, buf)
        assert r.status == 200 and r.body == pattern(78, 1000)
    lines = lines_by_id(access, "paused-", 2)
    assert_delivered(lines["paused-0"], 200, n, "the paused download")
    assert_delivered(lines["paused-1"], 200, 1000, "the request after it")
    assert_no_failures(c.port, "a paused reader")


# --- (c) workers that close idle kept-alive connections -----------------------------------------------------
def _spaced_requests(port: int, count: int, gaps: list[float], rng: random.Random, path: str) -> list[str]:
    """count requests on one kept-alive client connection, each gaps[i] seconds after the previous answer
    ended (a new connection when corral closes one); GETs with deterministic bodies and POSTs. The problems
    seen, as text."""
    problems = []
    sock = None
    buf = bytearray()
    for i in range(count):
        time.sleep(gaps[i])  # the spacing under test: around the worker's idle timeout
        if sock is None:
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            buf = bytearray()
        seed, n = rng.getrandbits(32), rng.choice([0, 10, 1000, 70000])
        if rng.random() < 0.3:
            upload = pattern(seed ^ 1, rng.choice([1, 5000, 100000]))
            raw = (
                f"POST {path}?echo=1&seed={seed} HTTP/1.1\r\nHost: t\r\nX-Request-Id: spaced-{i}\r\n"
                f"Content-Length: {len(upload)}\r\n\r\n"
            ).encode() + upload
            want = upload
        else:
            raw = f"GET {path}?seed={seed}&n={n} HTTP/1.1\r\nHost: t\r\nX-Request-Id: spaced-{i}\r\n\r\n".encode()
            want = pattern(seed, n)
        try:
            sock.sendall(raw)
            r = read_response(sock, buf)
        except (OSError, ConnectionError) as exc:
            problems.append(f"request {i}: {exc!r}")
            sock.close()
            sock = None
            continue
        if r.status != 200:
            problems.append(f"request {i}: {r.status} {r.body[:200]!r}")
        elif path == "/data" and raw.startswith(b"POST"):
            if r.body != f"POST /data {len(want)}".encode():
                problems.append(f"request {i}: wrong answer {r.body[:100]!r}")
        elif r.body != want:
            problems.append(f"request {i}: wrong body ({len(r.body)} bytes, {len(want)} expected)")
        if (r.header("connection") or "").lower() == "close":
            sock.close()
            sock = None
    if sock is not None:
        sock.close()
    return problems


@pytest.mark.timeout(180)
def test_a_worker_closing_idle_connections_after_50ms_costs_no_request(corral, tmp_path):
    """The worker closes a kept-alive connection on which nothing came for 50 ms (gunicorn and uvicorn do
    the same after their keep-alive timeout). 242 requests come about every 50 ms, so some reach corral
    just as the worker closes the connection corral would reuse: none may be answered 502, and the worker
    must not be counted failed (nor passed over) for a close it was entitled to."""
    count = 242
    access = tmp_path / "access.log"
    seen_log = tmp_path / "seen.log"
    c = corral(
        soak_args("--access-log", str(access), "--log-format", "json", worker=("--idle-close-ms", "50")),
        workers=1,
        env={"SOAK_LOG": str(seen_log)},
    )
    rng = random.Random(50)
    gaps = [rng.uniform(0.035, 0.065) for _ in range(count)]
    problems = _spaced_requests(c.port, count, gaps, rng, "/cl")
    lines = lines_by_id(access, "spaced-", count - len(problems))
    seen = seen_log.read_text().splitlines() if seen_log.exists() else []
    assert not problems, (
        f"{len(problems)} of {count} requests failed: {problems[:10]}\n"
        + "".join(f"  {_failed_detail(p, lines, seen)}\n" for p in problems[:10])
        + c.log()[-2000:]
    )
    bad = [ln for ln in lines.values() if ln["status"] != 200 or ln.get("cut")]
    assert not bad, bad[:5]
    assert_no_failures(c.port, "idle closes after 50 ms")


def _failed_detail(problem: str, lines: dict[str, dict], seen: list[str]) -> str:
    rid = "spaced-" + problem.split(":", 1)[0].split()[-1]
    return f"{rid}: reached the worker {seen.count(f'seen {rid}')} times; access log: {lines.get(rid)}"


@pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import gunicorn"], capture_output=True).returncode != 0,
    reason="gunicorn not installed (pip install '.[test]')",
)
@pytest.mark.timeout(180)
def test_gunicorn_closing_idle_keepalive_connections_costs_no_request(corral, tmp_path):
    """The real gunicorn (gthread worker, one thread, --keep-alive 1) closes a kept-alive connection 1.001 s
    after its last answer (measured: its loop wakes once a second and closes what expired). Each request
    here comes 0.990-1.008 s after the previous answer, a sweep in 0.75 ms steps across that moment, so
    some reach corral just as gunicorn closes the connection corral would reuse: no 502, and the worker is
    never counted failed."""
    count = 24
    access = tmp_path / "access.log"
    cmd = [
        sys.executable,
        "-m",
        "gunicorn",
        "-k",
        "gthread",
        "-w",
        "1",
        "--threads",
        "1",
        "--keep-alive",
        "1",
        "-b",
        "127.0.0.1:{port}",
        "--chdir",
        str(APPS),
        "gunicorn_app:app",
    ]
    helps = subprocess.run([sys.executable, "-m", "gunicorn", "--help"], capture_output=True, text=True, timeout=60)
    if "--no-control-socket" in helps.stdout:
        cmd.append("--no-control-socket")  # gunicorn 25+: else every instance listens on ~/.gunicorn/gunicorn.ctl
    c = corral(["--access-log", str(access), "--log-format", "json", "--", *cmd], workers=1)
    rng = random.Random(1)
    gaps = [0.990 + 0.00075 * i for i in range(count)]
    rng.shuffle(gaps)
    problems = _spaced_requests(c.port, count, gaps, rng, "/data")
    lines = lines_by_id(access, "spaced-", count - len(problems))
    assert not problems, f"{len(problems)} of {count} requests failed: {problems[:10]}\n{c.log()[-2000:]}"
    bad = [ln for ln in lines.values() if ln["status"] != 200 or ln.get("cut")]
    assert not bad, bad[:5]
    assert_no_failures(c.port, "gunicorn keep-alive closes")
