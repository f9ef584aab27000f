"""The query-of-death quarantine and its fingerprint (datapath/quarantine.py), and how the supervisor tells a
kill from outside from a death on its own (supervision/processes.exit_cause): pure, no process."""

from __future__ import annotations

import signal

import pytest

from corral.datapath.buffers import RequestBody
from corral.datapath.quarantine import DEATH_WINDOW, HASHED_BODY, Quarantine, Quarantined, fingerprint
from corral.datapath.worker import DIED, KILLED, STOPPED
from corral.supervision.processes import exit_cause

pytestmark = pytest.mark.unit


def body(data: bytes, memory: int = 1 << 20) -> RequestBody:
    b = RequestBody(memory)
    b.add(data)
    return b


# --- the fingerprint ---------------------------------------------------------------------------------
def test_the_fingerprint_is_method_path_and_a_hash_of_query_and_body():
    fp = fingerprint(b"GET", b"/crash?n=1", None)
    assert fp[:2] == (b"GET", b"/crash")
    assert fingerprint(b"GET", b"/crash?n=1", None) == fp
    assert fingerprint(b"GET", b"/crash?n=2", None) != fp
    assert fingerprint(b"HEAD", b"/crash?n=1", None) != fp
    assert fingerprint(b"POST", b"/fit", body(b"a")) != fingerprint(b"POST", b"/fit", body(b"b"))
    assert fingerprint(b"POST", b"/fit", body(b"a")) == fingerprint(b"POST", b"/fit", body(b"a"))
    # a body in a temporary file hashes as the same bytes in memory
    assert fingerprint(b"POST", b"/fit", body(b"xyz" * 1000, memory=10)) == fingerprint(
        b"POST", b"/fit", body(b"xyz" * 1000)
    )


def test_a_long_body_is_fingerprinted_by_its_first_mib_and_its_size():
    head = b"x" * HASHED_BODY
    assert fingerprint(b"POST", b"/u", body(head + b"a", memory=0)) == fingerprint(
        b"POST", b"/u", body(head + b"b", memory=0)
    )
    assert fingerprint(b"POST", b"/u", body(head + b"a", memory=0)) != fingerprint(
        b"POST", b"/u", body(head + b"ab", memory=0)
    )


# --- the quarantine ----------------------------------------------------------------------------------
def test_two_deaths_within_the_window_quarantine_a_fingerprint_for_the_period():
    q = Quarantine(period=60)
    fp = fingerprint(b"GET", b"/crash", None)
    assert q.death(fp, 100.0) is None and not q.entries  # one worker: remembered, not refused
    q.check(b"GET", b"/crash", None, False, 101.0)  # not raised
    entry = q.death(fp, 110.0)
    assert entry is not None and entry.route == "GET /crash" and entry.deaths == 2
    with pytest.raises(Quarantined) as refused:
        q.check(b"GET", b"/crash", None, False, 120.0)
    assert refused.value.retry_after == 50
    assert q.refused == 1 and q.total == 1
    assert q.death(fp, 121.0) is None  # already quarantined: no second log line
    q.check(b"GET", b"/crash?other", None, False, 120.0)  # another request of the same path
    q.check(b"GET", b"/crash", None, False, 170.0)  # lifted once the period is over
    assert not q.entries and not q.paths


def test_deaths_further_apart_than_the_window_do_not_quarantine():
    q = Quarantine(period=60)
    fp = fingerprint(b"GET", b"/crash", None)
    q.death(fp, 0.0)
    assert q.death(fp, DEATH_WINDOW + 1) is None
    assert q.death(fp, DEATH_WINDOW + 2) is not None  # the second death counted from the last one


def test_a_retried_request_whose_second_worker_died_is_quarantined_at_once():
    q = Quarantine(period=60)
    entry = q.death(fingerprint(b"GET", b"/oom", None), 5.0, weight=2)
    assert entry is not None and entry.deaths == 2


def test_period_zero_never_quarantines_and_clear_lifts_everything():
    off = Quarantine(period=0)
    fp = fingerprint(b"GET", b"/crash", None)
    assert off.death(fp, 1.0, weight=2) is None and not off.entries
    q = Quarantine(period=60)
    q.death(fp, 1.0, weight=2)
    assert q.clear() == 1 and not q.entries and not q.paths and not q.deaths
    assert q.death(fp, 2.0) is None  # forgotten: one death is one again


def test_shown_lists_live_entries_with_a_short_digest():
    q = Quarantine(period=60)
    q.death(fingerprint(b"GET", b"/a", None), 0.0, weight=2)
    ((route, digest, deaths, since, left),) = q.shown(10.0)
    assert route == "GET /a" and len(digest) == 12 and deaths == 2 and since == 10.0 and left == 50.0
    assert q.shown(61.0) == []


# --- how a worker ended ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("code", "sent", "cause"),
    [
        (-signal.SIGKILL, 0, KILLED),  # kill -9, the OOM killer
        (-signal.SIGTERM, 0, KILLED),  # a drain
        (128 + signal.SIGKILL, 0, KILLED),  # a shell wrapper reporting its child's death
        (-signal.SIGSEGV, 0, DIED),
        (-signal.SIGABRT, 0, DIED),
        (-signal.SIGBUS, 0, DIED),
        (3, 0, DIED),  # an exit status
        (0, 0, DIED),
        (-signal.SIGKILL, signal.SIGKILL, STOPPED),  # corral's own kill: a deadline, a failed probe
        (-signal.SIGTERM, signal.SIGTERM, STOPPED),  # stop, reload, scale down
        (0, signal.SIGTERM, STOPPED),
    ],
)
def test_exit_cause(code: int, sent: int, cause: str):
    assert exit_cause(code, sent) == cause
