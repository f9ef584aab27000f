"""Issue 14: Ctrl-C on `corral run`: the first says what the drain waits for, a second stops at once.

Real corral processes over real sockets; every wait is a bounded poll, nothing asserts on timing.
"""

from __future__ import annotations

import signal
import socket

import psutil
from conftest import poll, stub_args


def test_first_ctrl_c_says_what_it_waits_for_and_a_second_one_stops_at_once(corral, tmp_path):
    seen = tmp_path / "seen.log"
    c = corral(stub_args("--graceful-timeout", "600"), workers=1, env={"STUB_LOG": str(seen)})
    worker = psutil.Process(c.worker_pids()[0])
    with socket.create_connection(("127.0.0.1", c.port)) as held:
        held.sendall(b"GET /hang HTTP/1.1\r\nHost: t\r\n\r\n")
        poll("the worker to hold /hang", lambda: seen.exists() and "GET /hang" in seen.read_text())
        c.proc.send_signal(signal.SIGINT)
        c.wait_for(r"corral: stopping: draining 1 request, up to 600 s; Ctrl-C again to quit now")
        assert c.proc.poll() is None  # it waits for the request
        c.proc.send_signal(signal.SIGINT)
        rc = c.proc.wait(60)  # far inside the 600 s drain: the second Ctrl-C did not wait for it
    assert rc == 130, c.log()
    assert "corral: second Ctrl-C: stopped at once" in c.log()
    poll("the worker to be gone", lambda: not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE)
