"""Fair queueing end to end: two real clients (two source addresses, or one address and two header values)
against a real corral and stub workers. What is asserted is the order in which the worker received the
requests and what each client got back, never how long anything took."""

from __future__ import annotations

import socket
from pathlib import Path

from conftest import poll, read_response, stub_args

from corral.cli.verbs import AdminClient, locate

BUSY, POLITE = "127.0.0.1", "127.0.0.2"  # both loopback: the kernel routes 127/8 to lo
HEAVY = 6  # the busy client's requests: one runs, five wait
SLOW = "/sleep?s=0.5"  # long enough that several still wait when the polite request comes


def send(port: int, path: str, source: str = BUSY, headers: str = "") -> socket.socket:
    """A request sent from `source` (its response read later with read_response)."""
    s = socket.socket()
    s.settimeout(60)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{headers}\r\n".encode())
    return s


def status(port: int) -> dict:
    (app,) = AdminClient(locate(port, None)).ok("GET", "/status")["apps"]
    return app


def worker_order(log: Path) -> list[str]:
    """The paths the worker received, in order (health probes left out)."""
    return [line.split()[2] for line in log.read_text().splitlines() if "/sleep" in line or "/polite" in line]


def busy_after_polite(log: Path) -> int:
    """How many of the busy client's requests the worker received after the polite one."""
    order = worker_order(log)
    return len(order) - 1 - order.index("/polite")


def busy_then_polite(port: int, busy_headers: str = "", polite_headers: str = "", source: str = POLITE):
    """The busy client sends HEAVY requests; once three or more wait, the polite client sends one."""
    heavy = [send(port, f"{SLOW}&n={i}", BUSY, busy_headers) for i in range(HEAVY)]
    poll("the busy client's requests queued", lambda: status(port)["queue"]["depth"] >= 3)
    polite = send(port, "/polite", source, polite_headers)
    return [read_response(s) for s in heavy], read_response(polite)


def test_a_polite_client_is_served_before_a_busy_clients_waiting_requests(corral, tmp_path):
    log = tmp_path / "stub.log"
    c = corral(stub_args(), workers=1, env={"STUB_LOG": str(log)})
    heavy, polite = busy_then_polite(c.port)
    assert polite.status == 200 and [r.status for r in heavy] == [200] * HEAVY
    # Of the three or more busy requests waiting when it came, at most the busy client's current turn (one)
    # goes before it.
    assert busy_after_polite(log) >= 2, worker_order(log)
    fair = status(c.port)["fair"]
    assert fair["key"] == "ip" and fair["rejected"] == 0
    shown = [row["client"] for row in fair["clients"]]
    assert len(shown) == 2 and not any(BUSY in s or POLITE in s for s in shown), shown  # never a whole address
    assert fair["clients"][0]["share"] > 0.9  # the busy one had nearly all the worker time


def test_without_fair_queueing_the_polite_client_waits_for_all_of_them(corral, tmp_path):
    """The control: `--fair-key none` is one FIFO, and the polite request is the last the worker sees."""
    log = tmp_path / "stub.log"
    c = corral(stub_args("--fair-key", "none"), workers=1, env={"STUB_LOG": str(log)})
    _, polite = busy_then_polite(c.port)
    assert polite.status == 200
    assert busy_after_polite(log) == 0
    assert status(c.port)["fair"] is None


def test_a_header_keys_clients_behind_one_address_and_a_clients_share_answers_429(corral, tmp_path):
    """header:X-Client: two clients from one address are told apart; past --max-queue-per-client waiting,
    the busy one hears 429 with Retry-After (refused, counted), the other is still served first."""
    log = tmp_path / "stub.log"
    args = stub_args("--fair-key", "header:X-Client", "--max-queue-per-client", "3")
    c = corral(args, workers=1, env={"STUB_LOG": str(log)})
    heavy = [send(c.port, f"/sleep?s=1&n={i}", BUSY, "X-Client: batch\r\n") for i in range(4)]
    poll("the busy client's requests queued", lambda: status(c.port)["queue"]["depth"] == 3)
    refused = read_response(send(c.port, "/sleep?s=1&n=late", BUSY, "X-Client: batch\r\n"))
    assert refused.status == 429 and int(refused.header("retry-after")) >= 1
    polite = send(c.port, "/polite", BUSY, "X-Client: dashboard\r\n")
    assert [read_response(s).status for s in heavy] == [200] * 4 and read_response(polite).status == 200
    assert "/sleep?s=1&n=late" not in worker_order(log) and busy_after_polite(log) >= 1, worker_order(log)
    app = status(c.port)
    assert app["fair"]["rejected"] == 1 and app["refused"] >= 1
    assert not any("batch" in row["client"] or "dashboard" in row["client"] for row in app["fair"]["clients"])


def test_behind_a_trusted_proxy_the_forwarded_client_is_the_key(corral, tmp_path):
    """X-Forwarded-For from a trusted proxy keys the client it forwarded for (the proxy's own address is one
    for every client); the left-most entry, which a client writes itself, does not."""
    log = tmp_path / "stub.log"
    c = corral(stub_args("--trusted-proxies", "127.0.0.1/32"), workers=1, env={"STUB_LOG": str(log)})
    spoofed = [f"X-Forwarded-For: 198.51.100.{i}, 203.0.113.1\r\n" for i in range(HEAVY)]
    heavy = [send(c.port, f"{SLOW}&n={i}", BUSY, spoofed[i]) for i in range(HEAVY)]
    poll("the busy client's requests queued", lambda: status(c.port)["queue"]["depth"] >= 3)
    polite = send(c.port, "/polite", BUSY, "X-Forwarded-For: 203.0.113.2\r\n")
    assert [read_response(s).status for s in heavy] == [200] * HEAVY and read_response(polite).status == 200
    assert busy_after_polite(log) >= 2, worker_order(log)
    assert len(status(c.port)["fair"]["clients"]) == 2  # two clients, not one per spoofed entry
