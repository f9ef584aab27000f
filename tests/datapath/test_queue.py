"""The central queue, end to end: one request per worker, the rest wait at the proxy (FIFO) and go to the
first worker that frees up; a full queue or a long wait answers 503 + Retry-After; a client that leaves while
queued never reaches a worker."""

from __future__ import annotations

import concurrent.futures as cf
import socket
import time

from conftest import get, stub_args


def test_one_request_per_worker_rest_wait_in_central_queue(corral):
    """Two workers, four 1 s requests: never more than one on a worker; the 3rd and 4th wait at the proxy."""
    c = corral(stub_args(), workers=2)
    with cf.ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(get, c.port, "/sleep?s=1") for _ in range(4)]
        # while the first two run, a fast request also waits (FIFO): it is the fifth in line
        results = [f.result() for f in futs]
    assert [r.status for r in results] == [200] * 4
    by_pid: dict[int, int] = {}
    for r in results:
        by_pid[r.json()["pid"]] = by_pid.get(r.json()["pid"], 0) + 1
    assert sorted(by_pid.values()) == [2, 2]
    # Each stub numbers the requests it sees: per worker, the two are consecutive, nothing in between.
    for pid in by_pid:
        seen = sorted(r.json()["seen"] for r in results if r.json()["pid"] == pid)
        assert seen[1] - seen[0] == 1


def test_queued_request_goes_to_first_worker_that_frees_up(corral):
    c = corral(stub_args(), workers=2)
    with cf.ThreadPoolExecutor(3) as pool:
        long = pool.submit(get, c.port, "/sleep?s=4")
        time.sleep(0.3)
        short = pool.submit(get, c.port, "/sleep?s=0.5")
        time.sleep(0.1)
        queued = pool.submit(get, c.port, "/x")  # both workers busy: waits centrally
        q = queued.result()
        assert short.result().json()["pid"] == q.json()["pid"]  # not stuck behind the 4 s one
        assert long.result().json()["pid"] != q.json()["pid"]


def test_queue_full_answers_503_with_retry_after_at_once(corral):
    c = corral(stub_args("--max-queue", "1"), workers=1)
    with cf.ThreadPoolExecutor(2) as pool:
        busy = pool.submit(get, c.port, "/sleep?s=2")
        time.sleep(0.3)
        waiting = pool.submit(get, c.port, "/x")
        time.sleep(0.3)
        r = get(c.port, "/x")
        assert r.status == 503
        assert r.header("retry-after") is not None and int(r.header("retry-after")) >= 1
        assert busy.result().status == 200 and waiting.result().status == 200


def test_queue_timeout_answers_503_with_retry_after(corral, tmp_path):
    log = tmp_path / "stub.log"
    c = corral(stub_args("--queue-timeout", "0.5"), workers=1, env={"STUB_LOG": str(log)})
    with cf.ThreadPoolExecutor(2) as pool:
        busy = pool.submit(get, c.port, "/sleep?s=2.5")
        time.sleep(0.3)
        r = get(c.port, "/never-reached")
        assert r.status == 503 and int(r.header("retry-after")) >= 1
        assert busy.result().status == 200
    assert get(c.port, "/after").status == 200
    seen = log.read_text()
    assert "/never-reached" not in seen and "/after" in seen


def test_client_that_leaves_while_queued_never_reaches_a_worker(corral, tmp_path):
    log = tmp_path / "stub.log"
    c = corral(stub_args(), workers=1, env={"STUB_LOG": str(log)})
    with cf.ThreadPoolExecutor(1) as pool:
        busy = pool.submit(get, c.port, "/sleep?s=1.5")
        time.sleep(0.3)
        s = socket.create_connection(("127.0.0.1", c.port))
        s.sendall(b"GET /abandoned HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.3)
        s.close()
        assert busy.result().status == 200
    assert get(c.port, "/after").status == 200
    lines = log.read_text().splitlines()
    assert not any("/abandoned" in line for line in lines)
    assert any("/after" in line for line in lines)
