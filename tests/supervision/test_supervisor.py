"""The supervisor's decisions in-process: no processes, no sockets, a clock the test moves.

A FakeSupervisor records what it would start and signal; the test plays the operating system
(a process exits, a worker answers its readiness probe) and calls `reconcile(now)`.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import signal

import pytest

from corral.config import AppConfig, Config
from corral.datapath.scheduler import Scheduler
from corral.datapath.worker import State, Worker
from corral.supervision import supervisor as supmod
from corral.supervision.supervisor import Supervisor

pytestmark = pytest.mark.unit  # in-process: no child process, no listener (tests/conftest.py)


class FakePool:
    """What the supervisor uses of a Pool, without the data path."""

    def __init__(self) -> None:
        self.scheduler = Scheduler(100, 30.0)
        self.workers: list[Worker] = []
        self.on_hung = None
        self.exited: list[Worker] = []

    def join(self, worker: Worker) -> None:
        self.workers.append(worker)

    def set_state(self, worker: Worker, state: State) -> None:
        worker.state = state
        if state is State.READY:
            self.scheduler.add_worker(worker)

    def forget(self, worker: Worker) -> None:
        self.scheduler.remove_worker(worker)
        if worker in self.workers:
            self.workers.remove(worker)

    def worker_exited(self, worker: Worker) -> None:
        self.exited.append(worker)

    def lift_quarantine(self, why: str) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeSupervisor(Supervisor):
    def __init__(self, app: AppConfig, loop: asyncio.AbstractEventLoop) -> None:
        cfg = Config(apps=[app])
        super().__init__(app, cfg, FakePool(), loop)  # type: ignore[arg-type]
        self.clock = Clock()
        self.launched: list[Worker] = []
        self.signals: list[tuple[Worker, int]] = []
        self.launch_error: Exception | None = None
        self.exit_on_signal = False

    def _start_process(self, worker: Worker) -> None:
        if self.launch_error is not None:
            raise self.launch_error
        self.launched.append(worker)

    def _signal(self, worker: Worker, sig: int) -> None:
        self.signals.append((worker, sig))
        if self.exit_on_signal and worker.state is not State.STOPPED:
            self.loop.call_soon(self._after_exit, worker, f"killed by {signal.Signals(sig).name}")

    # the test plays the OS
    def ready(self, worker: Worker) -> None:
        self._became_ready(worker)

    def crash(self, worker: Worker) -> None:
        self._after_exit(worker, "killed by SIGKILL")

    def tick(self, seconds: float = 0.0) -> None:
        self.clock.now += seconds
        self.reconcile(self.clock.now)


def make(loop: asyncio.AbstractEventLoop, workers: int = 1, base_port: int = 30000, **kw) -> FakeSupervisor:
    app = AppConfig(name="app", command=["true"], workers=workers, base_port=base_port, **kw)
    return FakeSupervisor(app, loop)


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(autouse=True)
def ports_are_free(monkeypatch):
    monkeypatch.setattr(supmod, "port_free", lambda host, port: True)


def started_ready(sup: FakeSupervisor) -> list[Worker]:
    sup.tick()
    for w in sup.launched:
        sup.ready(w)
    return list(sup.launched)


# --- #11: spawning can fail, the loop goes on ----------------------------------------------------
def test_failed_spawn_after_the_app_was_ready_backs_off_exponentially(loop):
    sup = make(loop)
    [w] = started_ready(sup)
    sup.launch_error = OSError(errno.EAGAIN, "Resource temporarily unavailable")
    sup.crash(w)
    attempts = []
    for _ in range(200):  # 10 s of 50 ms ticks, on the test's clock
        before = sup.index_restarts.get(0, 0)
        sup.tick(0.05)
        if sup.index_restarts.get(0, 0) > before:
            attempts.append(sup.clock.now)
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    # doubling from 0.1 s, as after a crash, not every tick (to within one tick of the test's clock)
    assert gaps[:5] == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2], abs=0.051)
    assert sup.fatal is None  # it has served: never gives up
    assert sup.restarts.get("spawn failed", 0) == len(attempts)


def test_a_failed_spawn_is_reported_with_its_cause(loop, capsys):
    sup = make(loop)
    [w] = started_ready(sup)
    sup.launch_error = OSError(errno.EMFILE, "Too many open files")
    sup.crash(w)
    sup.tick(1.0)
    out = capsys.readouterr().out
    assert "cannot start: Too many open files; spawn failed; restarting in 0.2s" in out


def test_a_spawn_raising_anything_does_not_end_the_loop(loop, capsys):
    sup = make(loop)
    sup.launch_error = RuntimeError("boom")
    sup.ever_ready = True

    async def main():
        task = loop.create_task(sup.run())
        while not sup.index_restarts.get(0):
            await asyncio.sleep(0.01)
        sup.stopping = True
        await task

    loop.run_until_complete(main())
    assert "cannot start: boom" in capsys.readouterr().out


def test_no_port_left_for_a_replacement_aborts_the_reload_and_the_loop_goes_on(loop):
    sup = make(loop, workers=2, base_port=65534)
    ws = started_ready(sup)
    assert sorted(w.port for w in ws) == [65534, 65535]
    assert sup._fresh_port() is None  # never 65536
    sup.reload()
    sup.tick(0.1)
    sup.tick(0.1)
    assert "reload aborted" in (sup.reload_note or "") and "no free port" in sup.reload_note
    assert all(sup.slots[i] is ws[i] for i in (0, 1))  # old workers kept, in service
    sup.crash(ws[0])
    sup.tick(1.0)
    assert sup.slots[0] is not ws[0] and sup.slots[0].port == 65534  # a crashed worker still restarts


def test_a_worker_scaled_past_the_last_port_is_a_failed_spawn(loop):
    sup = make(loop, workers=1, base_port=65535)
    started_ready(sup)
    sup.scale(2)
    sup.tick(0.1)
    assert sup.restarts.get("spawn failed") == 1 and len(sup.launched) == 1


def test_an_unexpected_error_in_reconcile_is_logged_once_and_the_loop_goes_on(loop, capsys):
    sup = make(loop)
    calls = 0
    real = sup._reconcile_index

    def flaky(index: int, now: float) -> None:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise KeyError("surprise")
        real(index, now)

    sup._reconcile_index = flaky  # type: ignore[method-assign]

    async def main():
        task = loop.create_task(sup.run())
        while not sup.launched:
            sup.wake()
            await asyncio.sleep(0.01)
        sup.stopping = True
        await task

    loop.run_until_complete(main())
    err = capsys.readouterr().err
    assert err.count("corral: internal error in supervisor for app app: KeyError('surprise')") == 1
    assert "Traceback" in err and "in flaky" in err


# --- hung workers are killed by reconcile, not by the pool's callback ------------------------------
def test_kill_hung_only_records_and_reconcile_kills(loop):
    sup = make(loop)
    [w] = started_ready(sup)
    sup.pool.on_hung(w, "request exceeded request_timeout (1s)")
    assert w.state is State.UNHEALTHY and w.stop_reason.startswith("request exceeded")
    assert sup.signals == [] and not w.routable  # out of rotation at once, killed by the loop
    sup.tick()
    assert sup.signals == [(w, signal.SIGKILL)]


def test_a_hung_draining_worker_is_killed_too(loop):
    sup = make(loop)
    [w] = started_ready(sup)
    w.inflight = 1
    sup.reload()
    sup.tick()
    [succ] = sup.launched[1:]
    sup.ready(succ)
    sup.tick()
    assert w in sup.retiring and w.state is State.DRAINING
    sup.pool.on_hung(w, "request exceeded request_timeout (1s)")
    sup.tick()
    assert (w, signal.SIGKILL) in sup.signals


def test_a_hung_successor_is_killed_too(loop):
    sup = make(loop)
    [w] = started_ready(sup)
    sup.reload()
    sup.tick()
    [succ] = sup.launched[1:]
    succ.state = State.READY  # answering already, not yet promoted by reconcile
    sup.kill_hung(succ, "request exceeded request_timeout (1s)")
    sup.tick()
    assert (succ, signal.SIGKILL) in sup.signals and sup.slots[0] is w


# --- #7: one stop deadline ---------------------------------------------------------------------------
def test_shutdown_stops_holding_workers_at_the_deadline_it_is_given(loop):
    sup = make(loop, graceful_timeout=30.0)
    [w] = started_ready(sup)
    w.inflight = 1  # a request that never finishes
    sup.exit_on_signal = True
    # the proxy's drain already used the whole deadline: the supervisor must not start another one
    loop.run_until_complete(sup.shutdown(deadline=sup.clock() - 0.001))
    assert sup.signals[0] == (w, signal.SIGTERM) and w.state is State.STOPPED
