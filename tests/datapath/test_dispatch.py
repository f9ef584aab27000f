"""Cost-aware dispatch against real worker processes: the reserve, ageing, admission control."""

from __future__ import annotations

import concurrent.futures as cf
import time

from conftest import get, stub_args


def teach(port: int, path: str, n: int = 3) -> None:
    for _ in range(n):
        assert get(port, path).status == 200


def _lines(log) -> list[tuple[int, str]]:
    out = []
    for line in log.read_text().splitlines():
        pid, _, rest = line.partition(" ")
        out.append((int(pid), rest))
    return out


def test_short_request_is_served_while_long_ones_fill_all_but_the_reserve(corral, tmp_path):
    log = tmp_path / "stub.log"
    c = corral(stub_args("--long-threshold", "0.3", "--reserve", "1"), workers=3, env={"STUB_LOG": str(log)})
    teach(c.port, "/sleep-long?s=0.35")
    teach(c.port, "/x", 5)  # short traffic is around (the reserve is kept while shorts come ~1/s or more)
    with cf.ThreadPoolExecutor(4) as pool:
        longs = [pool.submit(get, c.port, "/sleep-long?s=3") for _ in range(3)]
        time.sleep(0.3)  # let the three long requests be placed (two run, one waits for a long slot)
        short = get(c.port, "/x?probe")
        assert short.status == 200
        assert not any(f.done() for f in longs)  # answered while every long request still ran or waited
        assert all(f.result().status == 200 for f in longs)
    lines = _lines(log)
    at = lines.index((short.json()["pid"], "GET /x?probe"))
    started = [pid for pid, req in lines[:at] if req == "GET /sleep-long?s=3"]
    assert len(started) == 2  # the third long request was held back for the reserve
    assert short.json()["pid"] not in started  # and the short one ran on the worker they left free


def test_fifo_dispatch_lets_long_requests_take_every_worker(corral, tmp_path):
    log = tmp_path / "stub.log"
    c = corral(stub_args("--long-threshold", "0.3", "--dispatch", "fifo"), workers=2, env={"STUB_LOG": str(log)})
    teach(c.port, "/sleep-long?s=0.35")
    with cf.ThreadPoolExecutor(3) as pool:
        longs = [pool.submit(get, c.port, "/sleep-long?s=1.5") for _ in range(2)]
        time.sleep(0.3)
        short = get(c.port, "/x")
        assert short.status == 200 and all(f.result().status == 200 for f in longs)
    lines = _lines(log)
    pid = short.json()["pid"]
    before = [req for p, req in lines[: lines.index((pid, "GET /x"))] if p == pid]
    assert before[-1] == "GET /sleep-long?s=1.5"  # it waited for a long request to finish on that worker


def test_a_long_request_is_not_starved_by_a_stream_of_short_ones(corral):
    c = corral(stub_args("--long-threshold", "0.2", "--reserve", "1", "--long-bias", "0.5"), workers=2)
    teach(c.port, "/sleep-long?s=0.25")
    with cf.ThreadPoolExecutor(6) as pool:
        shorts = [pool.submit(get, c.port, "/sleep?s=0.1") for _ in range(4)]
        long = pool.submit(get, c.port, "/sleep-long?s=0.3")
        shorts += [pool.submit(get, c.port, "/sleep?s=0.1") for _ in range(30)]
        assert long.result().status == 200
        done_before_long = sum(f.done() for f in shorts)
        assert done_before_long < len(shorts)  # it did not wait for the whole stream
        assert {f.result().status for f in shorts} == {200}


def test_admission_control_refuses_at_once_when_the_predicted_wait_is_too_long(corral, tmp_path):
    log = tmp_path / "stub.log"
    c = corral(stub_args("--long-threshold", "0.3", "--queue-timeout", "1"), workers=1, env={"STUB_LOG": str(log)})
    teach(c.port, "/sleep-long?s=0.8")
    with cf.ThreadPoolExecutor(3) as pool:
        running = pool.submit(get, c.port, "/sleep-long?s=0.8")
        time.sleep(0.2)
        queued = pool.submit(get, c.port, "/sleep-long?s=0.8")  # predicted start ~0.6 s: within 1 s
        time.sleep(0.2)
        r = get(c.port, "/sleep-long?s=0.8&tag=refused")  # ~0.4 + 0.8 s ahead of it: over 1 s
        assert r.status == 503
        assert b"predicted wait" in r.body
        assert int(r.header("retry-after")) >= 1
        assert running.result().status == 200 and queued.result().status == 200
    assert "tag=refused" not in log.read_text()


def test_learned_route_costs_are_visible_in_status_and_metrics(corral):
    from prometheus_client.parser import text_string_to_metric_families

    from corral.cli.verbs import AdminClient, locate

    c = corral(stub_args("--long-threshold", "0.2"), workers=1)
    teach(c.port, "/sleep-long?s=0.25")
    teach(c.port, "/users/42", 4)
    admin = AdminClient(locate(c.port, None))
    status, body = admin.call("GET", "/status")
    assert status == 200
    routes = {r["route"]: r for r in body["apps"][0]["routes"]}
    assert routes["GET /sleep-long"]["class"] == "long" and routes["GET /sleep-long"]["count"] == 3
    assert routes["GET /users/:id"]["class"] == "short" and routes["GET /users/:id"]["count"] == 4
    assert routes["GET /sleep-long"]["p50_s"] >= 0.25 > routes["GET /users/:id"]["p99_s"]
    status, text = admin.call("GET", "/metrics")
    samples = [s for f in text_string_to_metric_families(text.decode()) for s in f.samples]
    long_p50 = [
        s
        for s in samples
        if s.name == "corral_route_service_seconds"
        and s.labels["route"] == "GET /sleep-long"
        and s.labels["quantile"] == "0.5"
    ]
    assert long_p50 and long_p50[0].labels["class"] == "long" and long_p50[0].value >= 0.25


def test_status_table_lists_learned_routes(corral):
    from conftest import corral_cli

    c = corral(stub_args("--long-threshold", "0.2"), workers=1)
    teach(c.port, "/sleep-long?s=0.25")
    r = corral_cli("status", "-p", str(c.port))
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if "GET /sleep-long" in ln)
    assert line.split()[2:4] == ["long", "3"]
