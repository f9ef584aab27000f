"""The per-route cost learner (corral.datapath.costs), in-process: route keys, classification, declared routes,
the bounded route table and how fast old costs decay. Pure: no clock, no sockets.

The basics (ids collapsed, learn and re-learn, a bounded table, declared classes win, a route running
long) are in test_scheduler.py; these cover the rest of the contract.
"""

from __future__ import annotations

import pytest

from corral.datapath.costs import ALPHA, LONG, MAX_ROUTES, MIN_SAMPLES, RING, SHORT, RouteCosts, route_key

pytestmark = pytest.mark.unit  # in-process: no child process, no listener (tests/conftest.py)


# --- route keys ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("target", "key"),
    [
        (b"/users/42", "GET /users/:id"),
        (b"/users/42/orders/7", "GET /users/:id/orders/:id"),
        (b"/blob/abcdef0123", "GET /blob/:id"),  # hex run
        (b"/order/ab_12-c", "GET /order/:id"),  # token with a digit in it
        (b"/users/profile", "GET /users/profile"),  # words stay
        (b"/word/deadbeef", "GET /word/deadbeef"),  # all letters: a word even when it is hex
        (b"/users/42?page=3&x=1", "GET /users/:id"),  # the query is not part of the route
        (b"/a/", "GET /a/"),
        (b"", "GET /"),
        (b"*", "GET *"),
    ],
)
def test_route_key_collapses_id_segments_only(target, key):
    assert route_key(b"GET", target) == key


def test_route_key_keeps_the_method_and_survives_any_byte():
    assert route_key(b"POST", b"/users/42") == "POST /users/:id" != route_key(b"GET", b"/users/42")
    assert route_key(b"GET", b"/caf\xe9/\xff\xfe") == "GET /caf\xe9/\xff\xfe"  # latin-1: never raises


def test_requests_for_different_ids_share_one_route():
    c = RouteCosts(long_threshold=0.5)
    for i in range(MIN_SAMPLES):
        c.observe(route_key(b"GET", f"/report/{1000 + i}".encode()), 2.0)
    assert list(c.routes) == ["GET /report/:id"]
    assert c.classify(route_key(b"GET", b"/report/999999")) == (LONG, pytest.approx(2.0))


# --- classification -----------------------------------------------------------------------------
def test_a_fast_route_costs_nothing_until_it_has_min_samples():
    c = RouteCosts(long_threshold=0.5)
    for _ in range(MIN_SAMPLES - 1):
        c.observe("GET /fast", 0.01)
    assert c.classify("GET /fast") == (SHORT, 0.0)
    c.observe("GET /fast", 0.01)
    assert c.classify("GET /fast") == (SHORT, pytest.approx(0.01))


def test_one_sample_past_the_threshold_is_long_at_once():
    c = RouteCosts(long_threshold=0.5)
    c.observe("POST /fit", 3.0)
    cls, predicted = c.classify("POST /fit")
    assert cls == LONG
    assert predicted == 0.0  # the class is known, the cost not yet (fewer than MIN_SAMPLES)


def test_the_threshold_itself_is_long():
    c = RouteCosts(long_threshold=0.5)
    for _ in range(MIN_SAMPLES):
        c.observe("GET /edge", 0.5)
        c.observe("GET /under", 0.49)
    assert c.classify("GET /edge")[0] == LONG
    assert c.classify("GET /under")[0] == SHORT


def test_classify_registers_an_unknown_route_without_learning_anything():
    c = RouteCosts(long_threshold=0.5)
    assert c.classify("GET /new") == (SHORT, 0.0)
    row = next(r for r in c.table() if r["route"] == "GET /new")
    assert row["count"] == 0 and row["class"] == "short" and not row["declared"]


# --- declared routes (long_routes / short_routes) -----------------------------------------------
def test_a_pattern_with_a_method_matches_that_method_only():
    c = RouteCosts(0.5, long_routes=["POST /fit*"])
    assert c.classify("POST /fit")[0] == LONG
    assert c.classify("POST /fitted/model")[0] == LONG  # fnmatch: * crosses slashes
    assert c.classify("GET /fit")[0] == SHORT


def test_a_pattern_without_a_method_matches_every_method():
    c = RouteCosts(0.5, long_routes=["/export*"])
    assert c.classify("GET /export")[0] == LONG
    assert c.classify("DELETE /export/all")[0] == LONG


def test_patterns_match_the_collapsed_route_key():
    c = RouteCosts(0.5, long_routes=["GET /model/*/fit"], short_routes=["GET /model/:id"])
    assert c.classify(route_key(b"GET", b"/model/17/fit"))[0] == LONG
    key = route_key(b"GET", b"/model/17")
    for _ in range(5):
        c.observe(key, 9.0)
    assert c.classify(key)[0] == SHORT


def test_a_declared_long_route_stays_long_however_fast_it_runs():
    c = RouteCosts(0.5, long_routes=["POST /fit"])
    for _ in range(50):
        c.observe("POST /fit", 0.001)
    assert c.classify("POST /fit") == (LONG, pytest.approx(0.001))  # class declared, cost still learned
    row = next(r for r in c.table() if r["route"] == "POST /fit")
    assert row["declared"] and row["class"] == "long"


def test_running_long_never_overrides_a_declared_short_route():
    c = RouteCosts(0.5, short_routes=["/health"])
    c.running_long("GET /health", 30.0)
    assert c.classify("GET /health")[0] == SHORT


# --- the bounded route table --------------------------------------------------------------------
def test_past_max_routes_new_routes_share_one_overflow_bucket_per_method():
    c = RouteCosts(0.5)
    for i in range(MAX_ROUTES):
        c.observe(f"GET /r{'x' * (i % 5)}/w{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}", 0.01)
    assert len(c.routes) == MAX_ROUTES
    tracked = list(c.routes)
    for i in range(100):
        c.observe(f"GET /late/w{chr(97 + i % 26)}{chr(97 + i // 26)}", 2.0)
        c.observe(f"POST /late/w{chr(97 + i % 26)}{chr(97 + i // 26)}", 0.01)
    assert len(c.routes) == MAX_ROUTES + 2
    assert c.routes["GET (other)"].count == 100 and c.routes["POST (other)"].count == 100
    assert c.classify("GET /never/seen")[0] == LONG  # the overflow bucket's class, learned from its members
    assert c.stats("GET /never/seen") is c.routes["GET (other)"]
    c.observe(tracked[0], 0.01)  # routes learned before the table filled are still tracked on their own
    assert c.routes[tracked[0]].count == 2


# --- decay --------------------------------------------------------------------------------------
def test_the_mean_is_an_ewma_of_weight_alpha():
    c = RouteCosts(long_threshold=0.5)
    c.observe("GET /x", 1.0)
    assert c.routes["GET /x"].ewma == 1.0  # the first sample is the mean
    c.observe("GET /x", 0.0)
    assert c.routes["GET /x"].ewma == pytest.approx(1.0 - ALPHA)


def test_a_route_that_got_fast_is_relearned_within_a_few_requests():
    """1 s, then instant: the mean halves within ln(0.5)/ln(1 - ALPHA) requests (about 3 at ALPHA 0.2),
    and the class flips to short exactly when the mean falls under the threshold."""
    c = RouteCosts(long_threshold=0.5)
    for _ in range(MIN_SAMPLES):
        c.observe("GET /x", 1.0)
    assert c.classify("GET /x")[0] == LONG
    mean, flipped_after = 1.0, None
    for k in range(1, 30):
        c.observe("GET /x", 0.0)
        mean *= 1 - ALPHA
        assert c.routes["GET /x"].ewma == pytest.approx(mean)
        if flipped_after is None and c.classify("GET /x")[0] == SHORT:
            flipped_after = k
    first_under = next(k for k in range(1, 30) if (1 - ALPHA) ** k < 0.5)
    assert flipped_after == first_under
    assert c.routes["GET /x"].ewma < 0.01  # and it keeps decaying toward the new cost


def test_percentiles_come_from_the_last_ring_of_samples_only():
    c = RouteCosts(long_threshold=0.5)
    for _ in range(RING):
        c.observe("GET /x", 5.0)
    for _ in range(RING):
        c.observe("GET /x", 0.01)
    st = c.routes["GET /x"]
    assert len(st.ring) == RING
    assert st.percentile(0.5) == st.percentile(0.99) == 0.01  # the slow era is forgotten
    assert st.count == 2 * RING


def test_table_reports_percentiles_and_is_busiest_first():
    c = RouteCosts(long_threshold=0.5)
    for ms in range(1, 11):
        c.observe("GET /busy", ms / 1000)
    c.observe("GET /rare", 0.2)
    rows = c.table()
    assert [r["route"] for r in rows] == ["GET /busy", "GET /rare"]
    busy = rows[0]
    assert busy["count"] == 10
    assert busy["p99_s"] == 0.01  # the largest of ten samples
    assert 0.001 <= busy["p50_s"] <= busy["p99_s"]
    assert busy["mean_s"] == round(c.routes["GET /busy"].ewma, 6)
    assert c.routes["GET /rare"].percentile(0.5) == 0.2
    assert RouteCosts(0.5).table() == []
