"""A seeded soak over real sockets: misbehaving clients against misbehaving workers, judged by the clients.

Six client threads open connection after connection for CORRAL_SOAK_SECONDS (default 40) against
`corral run -w 2..3` of tests/support/soak_worker.py (which closes idle kept-alive connections after 50 ms). Every
plan comes from CORRAL_SOAK_SEED (default 19): slow readers with a small SO_RCVBUF that pause mid-body
(some longer than send_timeout), slow uploaders trickling or stalling their bodies (some longer than
body_timeout), aborts (RST or FIN) mid-upload and mid-answer, half-closes, 2-3 pipelined requests,
Expect: 100-continue, keep-alive reuse, HTTP/1.0, refusals (413, 400); and workers answering with a length,
chunked or until close, early (before reading the body), after an interim 100, trickled, big (MBs), cut
mid-body, dying mid-answer or before it, or outlasting request_timeout. request_timeout, send_timeout,
body_timeout, response_buffer and response_buffer_file are small, so every knob meets every misbehaviour.

What the clients saw is the truth; then corral's account (JSON access log, status, /metrics) must match it:

* an answer received whole is the worker's deterministic body byte for byte, for this request (its seed,
  its X-Request-Id), or one of corral's own answers with a cause the client can see (502: the worker died
  or cut; 504: the client waited past request_timeout; 503: past queue_timeout; 408: the client itself
  stalled its body past body_timeout; 413/400: it sent one corral must refuse); its log line says the same
  status, no cut, and the body's length;
* an answer cut short (the connection closed before its declared end) has a cause the client can see
  (the worker cut it or died, the client stopped reading past send_timeout or aborted, request_timeout),
  is a prefix of the right body, and its log line says cut, with fewer bytes than the whole;
* no answer at all has such a cause too (the client aborted or half-closed, or its pipelined request sat
  behind an answer that ended the connection); if it has a log line, that line says cut;
* one log line per request corral had a head for (the client got an answer, a 100 Continue, or the worker
  saw the request), none for any other, refusals included; no request reaches a worker twice, and no
  worker dies but of the requests that asked it to;
* afterwards corral is alive, every worker idle (inflight 0, queue 0), and its counters (served, failed,
  refused, abandoned) and /metrics add up to the access log's lines.

A failure prints the seed: CORRAL_SOAK_SEED=<seed> reruns the same plans (thread interleaving aside).
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import SUPPORT, poll
from support.soak_client import Req, Session, run_session
from support.soak_worker import pattern

SEED = int(os.environ.get("CORRAL_SOAK_SEED", "19"))
SECONDS = float(os.environ.get("CORRAL_SOAK_SECONDS", "40"))
THREADS = 6
SOAK_WORKER = str(SUPPORT / "soak_worker.py")
MiB = 1024 * 1024

REQUEST_TIMEOUT = 3.0
SEND_TIMEOUT = 1.5
BODY_TIMEOUT = 1.0
KEEPALIVE_TIMEOUT = 2.0
QUEUE_TIMEOUT = 15.0
RESPONSE_BUFFER = 128 * 1024
RESPONSE_BUFFER_FILE = 2 * MiB
MAX_BODY = 4 * MiB
DEATH_SPACING = 4.0  # seconds between two requests that kill their worker (restarts back off per slot)
REFUSALS = (400, 408, 413, 414, 431)


def soak_args(access: Path, *extra: str) -> list[str]:
    return [
        "--request-timeout", str(REQUEST_TIMEOUT), "--send-timeout", str(SEND_TIMEOUT),
        "--body-timeout", str(BODY_TIMEOUT), "--keepalive-timeout", str(KEEPALIVE_TIMEOUT),
        "--queue-timeout", str(QUEUE_TIMEOUT), "--response-buffer", str(RESPONSE_BUFFER),
        "--response-buffer-file", str(RESPONSE_BUFFER_FILE), "--max-body", str(MAX_BODY),
        "--access-log", str(access), "--log-format", "json", *extra,
        "--", sys.executable, SOAK_WORKER, "{port}", "--idle-close-ms", "50",
    ]  # fmt: skip


# --- plans ---------------------------------------------------------------------------------------------
class DeathGate:
    """Lets a request that kills its worker through only every DEATH_SPACING seconds: each death restarts
    a worker with a backoff that doubles per slot, and a soak of crashes would measure only the backoff."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last = -DEATH_SPACING

    def allow(self) -> bool:
        with self.lock:
            now = time.monotonic()
            if now - self.last < DEATH_SPACING:
                return False
            self.last = now
            return True


def _size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.10:
        return 0
    if r < 0.40:
        return rng.randint(1, 1000)
    if r < 0.65:
        return rng.randint(1000, 65536)
    if r < 0.85:
        return rng.randint(65536, 512 * 1024)
    if r < 0.97:
        return rng.randint(512 * 1024, 3 * MiB)
    return rng.randint(3 * MiB, 8 * MiB)


def _answer(rng: random.Random, req: Req, post: bool) -> None:
    """How the worker answers: the query of the request."""
    q = req.q
    q["seed"] = str(rng.getrandbits(40))
    n = _size(rng)
    if post and rng.random() < 0.6:
        q["echo"] = "1"
        n = len(req.upload or b"")
    else:
        q["n"] = str(n)
    frame = rng.choices(["cl", "chunked", "close"], [5, 3, 2])[0]
    if frame != "cl":
        q["frame"] = frame
    if post and "echo" not in q and rng.random() < 0.12:
        q["early"] = rng.choice(["1", "close"])
    elif post and rng.random() < 0.1:
        q["cont"] = "1"
    if rng.random() < 0.15 and n:
        q["pieces"] = str(rng.randint(2, 6))
        q["gap_ms"] = str(rng.randint(20, 150))
    if rng.random() < 0.1:
        q["delay_ms"] = str(rng.randint(10, 300))
    # A stop mid-body is visible only with a length or chunks: a close-delimited body cut short looks whole.
    if n >= 2 and frame != "close" and rng.random() < 0.04:
        q["cut_at"] = str(rng.randrange(0, n))
    r = rng.random()
    if r < 0.02:
        req.death = True
        q["die_at"] = "-1"
    elif r < 0.04 and n >= 2 and frame != "close":
        req.death = True
        q["die_at"] = str(rng.randrange(0, n))
        q.pop("cut_at", None)
    elif r < 0.055:
        req.death = True
        q["delay_ms"] = str(int((REQUEST_TIMEOUT + 1.5) * 1000))
    req.path = "/" + ("early" if "early" in q else "echo" if "echo" in q else frame)


def _reading(rng: random.Random, req: Req) -> None:
    r = rng.random()
    full = len(req.expected()) if req.method != "HEAD" else 0
    if r < 0.18:
        req.read_mode = "slow"
    elif r < 0.33 and full:
        req.read_mode = "pause"
        req.pause_at = rng.randrange(0, full)
        req.pause_s = SEND_TIMEOUT + 2.0 if rng.random() < 0.25 else rng.uniform(0.05, 0.4)
    elif r < 0.41 and full > 1:
        req.read_mode = "abort"
        req.abort_at = rng.randrange(1, full)
        req.abort_rst = rng.random() < 0.5


def plan_session(index: int) -> Session:
    rng = random.Random(f"{SEED}:{index}")
    count = rng.choices([1, 2, 3, 4], [40, 25, 20, 15])[0]
    version = "1.0" if rng.random() < 0.08 else "1.1"
    pipelined = count >= 2 and version == "1.1" and rng.random() < 0.2
    sess = Session(
        index=index,
        reqs=[],
        pipelined=pipelined,
        rcvbuf=rng.randint(4096, 65536) if rng.random() < 0.25 else None,
        idle=rng.uniform(0.01, 0.3) if rng.random() < 0.2 else 0.0,
    )
    for k in range(count):
        req = Req(rid=f"soak-{SEED}-{index}-{k}", version=version)
        sess.reqs.append(req)
        if not pipelined and rng.random() < 0.04:
            req.method = "POST"
            req.refusal = rng.choice(["too_big", "too_big", "too_big_sent", "bad"])
            req.path = "/refuse"
            if req.refusal != "bad":
                req.q["declare"] = str(MAX_BODY + 1 + rng.randrange(MiB))
                req.expect = req.refusal == "too_big"
            break  # corral closes the connection after a refusal
        post = rng.random() < (0.2 if pipelined else 0.35)
        if post:
            req.method = "POST"
            r = rng.random()
            size = (
                rng.randint(0, 2000)
                if r < 0.5
                else rng.randint(2000, 200_000)
                if r < 0.85
                else rng.randint(200_000, 2 * MiB)
            )
            req.upload = pattern(rng.getrandbits(40), size)
            if not pipelined:
                req.chunked_upload = version == "1.1" and rng.random() < 0.3
                req.expect = version == "1.1" and rng.random() < 0.3
                if size >= 3:
                    r = rng.random()
                    if r < 0.25:
                        req.send_mode, req.pieces, req.gap = "trickle", rng.randint(2, 6), rng.uniform(0.05, 0.25)
                    elif r < 0.31:
                        req.send_mode, req.stall = "stall", BODY_TIMEOUT + 1.0
                    elif r < 0.37:
                        req.send_mode, req.abort_upload_at = "abort", rng.randrange(1, size)
        elif rng.random() < 0.03:
            req.method = "HEAD"
        _answer(rng, req, post)
        if not pipelined or not req.death:
            _reading(rng, req)
        if pipelined and req.read_mode == "abort" and k < count - 1:
            req.read_mode = "normal"
    last = sess.reqs[-1]
    if (
        not pipelined
        and len(sess.reqs) == 1
        and not last.expect
        and last.send_mode in ("whole", "trickle")
        and last.read_mode != "abort"
        and last.refusal is None
        and rng.random() < 0.05
    ):
        sess.half_close = True
    if version == "1.0" and rng.random() < 0.5:
        for r in sess.reqs:
            r.close = True
    return sess


def _gated(sess: Session, gate: DeathGate) -> Session:
    for req in sess.reqs:
        if req.death and not gate.allow():
            req.death = False
            req.q.pop("die_at", None)
            if float(req.q.get("delay_ms", 0)) > REQUEST_TIMEOUT * 1000:
                req.q["delay_ms"] = "50"
    return sess


# --- the run ----------------------------------------------------------------------------------------------
def run_soak(port: int, seconds: float) -> list[Session]:
    gate = DeathGate()
    done: list[Session] = []
    lock = threading.Lock()
    counter = iter(range(10**9))
    deadline = time.monotonic() + seconds
    errors: list[BaseException] = []

    def client() -> None:
        try:
            while time.monotonic() < deadline:
                with lock:
                    index = next(counter)
                sess = _gated(plan_session(index), gate)
                run_session(port, sess)
                with lock:
                    done.append(sess)
        except BaseException as exc:  # a bug in the client itself: reported, never hidden
            errors.append(exc)
            raise

    threads = [threading.Thread(target=client, daemon=True) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 200)
        assert not t.is_alive(), "a soak client did not finish (a hang past every socket timeout)"
    if errors:
        raise errors[0]
    return sorted(done, key=lambda s: s.index)


# --- judging ------------------------------------------------------------------------------------------------
class Verdict:
    def __init__(self) -> None:
        self.problems: list[tuple[str, str]] = []
        self.notes: Counter[str] = Counter()

    def bad(self, kind: str, detail: str) -> None:
        self.problems.append((kind, detail))

    def report(self, header: str) -> str:
        kinds = Counter(k for k, _ in self.problems)
        shown: Counter[str] = Counter()
        lines = [header, f"problems by kind: {dict(kinds)}"]
        for kind, detail in self.problems:
            shown[kind] += 1
            if shown[kind] <= 6:
                lines.append(f"[{kind}] {detail}")
        return "\n".join(lines)


def _cause_of_cut(req: Req, line: dict | None, session_of: dict[str, Session]) -> str | None:
    """Why the client may see this answer cut (or absent), from what the client knows; None: no reason."""
    if req.client_abort:
        return "client aborted"
    if req.half_closed:
        return "client half-closed"
    if req.behind_close:
        return "pipelined behind an answer that ended the connection"
    if "cut_at" in req.q or "die_at" in req.q:
        return "worker cut or died"
    if max(req.paused, req.read_gap) >= SEND_TIMEOUT:
        return "client stopped reading past send_timeout"
    if session_of[req.rid].pipelined and req.conn_gap >= SEND_TIMEOUT:
        return "client stopped reading an earlier pipelined answer past send_timeout"
    if req.status is None and req.prev_sent is not None and req.t_sent - req.prev_sent >= KEEPALIVE_TIMEOUT:
        # corral's idle clock starts once the previous answer is in the socket, maybe long before the client
        # (a slow reader) has read it: the kept connection may have been closed as idle.
        return "sent on a kept connection idle (for corral) past keepalive_timeout"
    if req.send_mode == "stall" and req.max_gap >= BODY_TIMEOUT and req.send_error:
        return "client stalled its body past body_timeout, then sent into the closed connection"
    if req.elapsed >= REQUEST_TIMEOUT and (line is None or line.get("status") == 504):
        return "request_timeout"
    return None


def _claims_delivery(line: dict) -> bool:
    """Whether a log line says an answer reached its client: no cut, and not an exchange the client
    abandoned before any answer (status 499, or the new code's outcome "abandoned", with no bytes)."""
    if line.get("cut"):
        return False
    return not (line.get("outcome") == "abandoned" or line.get("status") == 499) or bool(line.get("bytes"))


def _own_answer_cause(req: Req) -> str | None:
    """Why corral itself may have answered this request with req.status (a whole answer of its own)."""
    s = req.status
    if s == 502 and req.q.get("die_at") == "-1":
        return "worker died before answering"
    if s == 502 and ("cut_at" in req.q or "die_at" in req.q) and req.from_worker is False:
        return "worker cut or died"
    if s == 504 and req.elapsed >= REQUEST_TIMEOUT:
        return "request_timeout"
    if s == 503 and req.elapsed >= QUEUE_TIMEOUT:
        return "queue_timeout"
    if s == 408 and req.max_gap >= BODY_TIMEOUT:
        return "client stalled its body"
    if s == 413 and req.refusal in ("too_big", "too_big_sent"):
        return "body over max_body"
    if s == 400 and req.refusal == "bad":
        return "malformed request"
    return None


def judge(sessions: list[Session], lines: list[dict], seen: list[str], v: Verdict) -> None:
    reqs = [r for s in sessions for r in s.reqs]
    session_of = {r.rid: s for s in sessions for r in s.reqs}

    def before(req: Req) -> str:
        """The requests before req on its connection, and how their answers ended (context for a loss)."""
        sess = session_of[req.rid]
        earlier = sess.reqs[: sess.reqs.index(req)]
        head = f" (pipelined, rcvbuf {sess.rcvbuf})" if sess.pipelined else f" (rcvbuf {sess.rcvbuf})"
        return head + "".join(f"\n      before it: {r.describe()} headers={r.headers}" for r in earlier)

    sent = {r.rid: r for r in reqs if r.head_sent}
    by_rid: dict[str, list[dict]] = {}
    unknown: list[dict] = []
    for line in lines:
        rid = line.get("request_id")
        if rid in sent:
            by_rid.setdefault(rid, []).append(line)
        elif isinstance(rid, str) and rid.startswith(f"soak-{SEED}-"):
            v.bad("phantom line", f"a log line for a request never sent: {line}")
        else:
            unknown.append(line)
    seen_count = Counter(x.split(" ", 1)[1] for x in seen if x.startswith("seen "))
    for rid, n in seen_count.items():
        if n > 1 and rid in sent:
            v.bad("reached a worker twice", f"{sent[rid].describe()} (seen by workers {n} times)")

    unmatched_refusals: list[int] = []
    for rid, req in sent.items():
        got = by_rid.get(rid, [])
        line = got[0] if got else None
        if len(got) > 1:
            v.bad("logged twice", f"{req.describe()} lines={got}")
        evidence = req.status is not None or req.got_continue or seen_count.get(rid)
        sess = session_of[rid]
        # Bytes arrive in order: a head the client sent whole on a connection corral had not closed, and did
        # not reset, reached corral before anything else happened to that connection.
        head_arrived = (
            not req.client_abort
            and not req.behind_close
            and not (req.prev_sent is not None and req.t_sent - req.prev_sent >= KEEPALIVE_TIMEOUT)
            and (not sess.pipelined or req is sess.reqs[0])
        )
        if head_arrived and not evidence and not got:
            v.bad(
                "not logged",
                f"the client sent this head whole and nothing closed its connection before, "
                f"but there is no log line: {req.describe()}{before(req)}",
            )
            continue
        if evidence and not got:
            if req.status in REFUSALS and req.headers.get("x-request-id") != rid:
                unmatched_refusals.append(req.status)  # matched against the lines without our id, below
                continue
            v.bad("not logged", f"corral had this request's head but logged nothing: {req.describe()}")
            continue
        cut = (line or {}).get("cut")
        expected = req.expected() if req.method != "HEAD" else b""
        if req.end == "hang":
            v.bad("hang", f"neither answered nor closed in time: {req.describe()}")
        if req.status is not None and req.headers.get("x-request-id") not in (rid, None):
            v.bad("crossed answer", f"x-request-id {req.headers.get('x-request-id')!r}: {req.describe()}")
            continue
        if req.status is None:
            v.notes["no answer"] += 1
            cause = _cause_of_cut(req, line, session_of)
            if cause is None:
                v.bad(
                    "lost answer", f"the connection ended without an answer: {req.describe()} line={line}{before(req)}"
                )
            if line is not None and _claims_delivery(line) and not req.client_abort:
                v.bad(
                    "log says delivered",
                    f"the client got no answer but the log has no cut: {req.describe()} line={line}",
                )
            continue
        if req.from_worker:
            if req.headers.get("x-soak-seed") != str(req.seed) or req.headers.get("x-soak-rid") != rid:
                v.bad("crossed answer", f"worker headers {req.headers}: {req.describe()}")
                continue
            if not expected.startswith(bytes(req.body)):
                at = next(
                    (i for i, (a, b) in enumerate(zip(req.body, expected, strict=False)) if a != b),
                    min(len(req.body), len(expected)),
                )
                v.bad("wrong bytes", f"body differs from the worker's at byte {at}: {req.describe()}")
                continue
            whole = req.complete and len(req.body) == len(expected)
        else:
            whole = req.complete
        if whole:
            v.notes[f"whole {req.status}"] += 1
            if not req.from_worker and _own_answer_cause(req) is None:
                v.bad(
                    f"unexplained {req.status}",
                    f"{req.describe()} body={bytes(req.body[:200])!r} line={line} "
                    f"(reached a worker: {seen_count.get(rid, 0)} times)",
                )
            if not req.from_worker and not seen_count.get(rid) and req.status == 502:
                v.notes["502 for a request no worker read"] += 1
            if req.from_worker and req.status != 200:
                v.bad("wrong status", req.describe())
            if line is None:
                continue
            if line.get("status") != req.status:
                v.bad("log status", f"client got {req.status}, log says {line.get('status')}: {req.describe()}")
            if cut:
                v.bad("log says cut", f"the client got the answer whole, the log says cut={cut!r}: {req.describe()}")
            if req.from_worker and line.get("bytes") != len(expected):
                v.bad(
                    "log bytes",
                    f"whole answer of {len(expected)} bytes logged as {line.get('bytes')}: {req.describe()}",
                )
            continue
        # Cut: the client saw the connection end before the declared end (or, HTTP/1.0 close-delimited, short).
        v.notes["cut"] += 1
        cause = _cause_of_cut(req, line, session_of)
        if cause is None:
            v.bad("unexplained cut", f"{req.describe()} line={line}")
        if line is None:
            continue
        full = len(expected) if req.from_worker else None
        if not cut and not req.client_abort:
            v.bad("cut not logged", f"the client saw the answer cut, the log has no cut: {req.describe()} line={line}")
        # A client that closes with bytes unread in its socket has them counted: its TCP took them.
        if (
            cut
            and not req.client_abort
            and full is not None
            and isinstance(line.get("bytes"), int)
            and line["bytes"] >= full
        ):
            v.bad("cut logged whole", f"a cut answer logged with all its bytes: {req.describe()} line={line}")
        if not cut and req.client_abort and full is not None and line.get("bytes") != full:
            v.bad(
                "log bytes",
                f"a delivered answer logged with {line.get('bytes')} of {full} bytes: {req.describe()} line={line}",
            )
        if isinstance(line.get("bytes"), int) and req.from_worker and line["bytes"] < len(req.body):
            v.bad(
                "log bytes",
                f"the client read {len(req.body)} body bytes, the log says {line['bytes']}: "
                f"{req.describe()} line={line}",
            )

    # Lines without one of our request ids: refusals logged before the id was read. One per refusal the
    # client got without its id, nothing else.
    extra = Counter(line.get("status") for line in unknown)
    missing = Counter(unmatched_refusals)
    if extra != missing:
        v.bad(
            "refusal lines",
            f"log lines without a request id by status {dict(extra)}; refusals the clients "
            f"got without their id {dict(missing)}; lines: {unknown[:5]}",
        )


def coverage(sessions: list[Session]) -> str:
    """What the run exercised: each misbehaviour and what came of it (printed, so a run shows its reach)."""
    reqs = [r for s in sessions for r in s.reqs if r.head_sent]
    c: Counter[str] = Counter()
    for s in sessions:
        c["pipelined sessions"] += s.pipelined
        c["half-closed sessions"] += s.half_close
        c["small SO_RCVBUF sessions"] += bool(s.rcvbuf)
    for r in reqs:
        c[f"read {r.read_mode}"] += 1
        if r.upload is not None:
            c[f"upload {r.send_mode}{' chunked' if r.chunked_upload else ''}{' expect' if r.expect else ''}"] += 1
        c[f"worker frame={r.q.get('frame', 'cl')}"] += 1
        for k in ("early", "cont", "pieces", "delay_ms", "cut_at", "die_at"):
            c[f"worker {k}"] += k in r.q
        c[f"refusal {r.refusal}"] += bool(r.refusal)
        c[f"HTTP/{r.version}"] += 1
        c[f"status {r.status}"] += 1
    return "coverage: " + ", ".join(f"{k}: {n}" for k, n in sorted(c.items()) if n)


def _status(port: int) -> dict:
    from corral.cli.verbs import AdminClient, locate

    return AdminClient(locate(port, None)).ok("GET", "/status")


def _metrics(port: int) -> str:
    from corral.cli.verbs import AdminClient, locate

    doc = AdminClient(locate(port, None)).ok("GET", "/metrics")
    return doc.decode() if isinstance(doc, bytes) else str(doc)


def _idle(doc: dict) -> bool:
    app = doc["apps"][0]
    busy = [w for w in app["workers"] if w.get("inflight")]
    return not busy and not app["queue"]["depth"] and doc["totals"].get("inflight", 0) == 0


@pytest.mark.timeout(SECONDS + 300)
def test_soak_misbehaving_clients_and_workers(corral, tmp_path):
    access = tmp_path / "access.log"
    seen_log = tmp_path / "seen.log"
    workers = random.Random(SEED).choice([2, 3])
    c = corral(soak_args(access), workers=workers, env={"SOAK_LOG": str(seen_log)})
    header = f"soak seed {SEED} ({SECONDS:g} s, {workers} workers): rerun with CORRAL_SOAK_SEED={SEED}"
    print(header, flush=True)  # in the captured output of any failure, a timeout's too
    sessions = run_soak(c.port, SECONDS)
    v = Verdict()

    assert c.proc.poll() is None, f"{header}\ncorral exited ({c.proc.returncode}):\n{c.log()[-4000:]}"
    try:
        doc = poll(
            "every worker idle (inflight 0, queue 0)", lambda: (d := _status(c.port)) and _idle(d) and d, timeout=30
        )
    except AssertionError:
        pytest.fail(f"{header}\nnot idle 30 s after the last client left:\n{json.dumps(_status(c.port))[:3000]}")
    text = access.read_text()
    lines = [json.loads(x) for x in text.splitlines() if x.strip()]
    seen = seen_log.read_text().splitlines() if seen_log.exists() else []
    judge(sessions, lines, seen, v)

    # corral's own account: counters and metrics against the log.
    app = doc["apps"][0]
    names = ("served", "failed", "refused", "abandoned")
    counters = {k: app.get(k, doc["totals"].get(k)) for k in names}
    present = {k: n for k, n in counters.items() if isinstance(n, int)}
    if sum(present.values()) != len(lines) or len(present) != len(names):
        v.bad(
            "counters",
            f"status counters {counters} (missing: {[k for k in names if k not in present]}) add "
            f"up to {sum(present.values())}, the access log has {len(lines)} lines",
        )
    metric = sum(
        float(m.group(1)) for m in re.finditer(r"^corral_requests_total\{[^}]*\} (\S+)$", _metrics(c.port), re.M)
    )
    if metric != len(lines):
        v.bad("metrics", f"corral_requests_total adds up to {metric:g}, the access log has {len(lines)} lines")
    deaths = sum(1 for s in sessions for r in s.reqs if r.death and r.head_sent)
    restarts = app.get("restarts_total", 0)
    if restarts > deaths:
        v.bad(
            "collateral deaths",
            f"{restarts} worker restarts ({app.get('restarts')}) for {deaths} requests that "
            f"asked a worker to die or outlast request_timeout",
        )
    own = [ln for ln in c.log().splitlines() if not ln.startswith("[")]
    if any(ln.startswith("Traceback") for ln in own):
        v.bad("corral traceback", "\n".join(own[-60:]))
    assert c.proc.poll() is None, f"{header}\ncorral exited ({c.proc.returncode}):\n{c.log()[-4000:]}"

    reqs = [r for s in sessions for r in s.reqs if r.head_sent]
    print(coverage(sessions))
    summary = (
        f"{len(sessions)} sessions, {len(reqs)} requests sent, {len(lines)} log lines, outcomes {dict(v.notes)}, "
        f"counters {counters}, restarts {restarts} for {deaths} deaths asked"
    )
    print(f"{header}\n{summary}")
    assert not v.problems, v.report(f"{header}\n{summary}") + f"\n--- corral log ---\n{c.log()[-3000:]}"
    assert len(reqs) > 50, f"{header}: too few requests to mean anything: {summary}"
