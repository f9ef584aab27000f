"""A lower bound for issue 8: can ANY non-pre-emptive policy meet both T4 targets on a given schedule?

Clairvoyant: the policy may know every future arrival and every service time exactly. It must keep
the slow p99 within `slow_target` x FIFO's slow p99 on the same schedule, so every long request but
the few the p99 ignores starts within W = slow_target * FIFO_p99 - service of its arrival. A fast
request is late (over `fast_target_ms`) when all workers hold long requests for the whole window
[arrival, arrival + fast_target - fast service]. We minimise the number of late fast requests with a
MILP (scipy/HiGHS); if even the minimum exceeds what the fast p99 tolerates, no policy can do it.

Every simplification makes the bound weaker, never wrong:
  * short requests occupy no worker (they only make things worse);
  * start times are on a grid of `step` s; a long starting anywhere in [g, g + step) runs at least
    over [g + step, g + service], and only that shrunk interval counts towards lateness;
  * worker capacity (at most `workers` long requests at once) is enforced only at fast arrivals;
  * the long requests the p99 may ignore are dropped outright (they occupy nothing);
  * a fast request counts as late only if 4 single long requests each span its whole window.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import ggc
import loadgen
from stats import percentile


def allowed_over(n: int, q: float = 99.0) -> int:
    """How many of n samples may exceed a limit while the linear-interpolated q-th percentile stays within."""
    if n == 0:
        return 0
    lo = math.floor((n - 1) * q / 100.0)
    return n - 1 - lo  # xs[lo] must be within the limit; everything above it may not be


def lower_bound(
    arrivals: Sequence[loadgen.Arrival],
    slow_s: float,
    fast_s: float,
    workers: int,
    slow_target: float,
    fast_target_ms: float,
    step: float = 0.02,
    time_limit: float = 300.0,
    clairvoyant: bool = True,
    exceptions: bool = True,
    fast_rate: float = 20.0,
) -> dict[str, object]:
    """Fewest late fast requests (clairvoyant: on these arrivals; else: expected) under the slow target.

    exceptions=True is the p99 rule exactly: with n < 101 long requests, p99 = xs[n-2] + f * (xs[n-1] -
    xs[n-2]), so all but one must wait at most W and the worst at most W / f. exceptions=False: all
    within W (what a policy that never sacrifices a request could offer).
    """
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_array

    t0 = time.monotonic()
    fifo = ggc.simulate(arrivals, {"fast": fast_s, "slow": slow_s}, workers)
    fifo_p99 = percentile([t for c, t in fifo if c == "slow"], 99)
    wait = slow_target * fifo_p99 - slow_s  # the most a counted long request may wait
    longs = [a.at for a in arrivals if a.cls == "slow"]
    fasts = [a.at for a in arrivals if a.cls == "fast"]
    n = len(longs)
    over = allowed_over(n) if exceptions else 0
    frac = (n - 1) * 0.99 - math.floor((n - 1) * 0.99)
    stretch = over == 1 and frac > 1e-9  # the one exception still counts, with weight frac
    drop = 0 if stretch else over  # otherwise p99 ignores the exceptions: let them vanish
    longest = wait / frac if stretch else wait
    window = fast_target_ms / 1e3 - fast_s
    if clairvoyant:  # the policy knows when each fast request comes: count those caught
        points, weight = fasts, 1.0
    else:  # it does not: a fast request is caught at rate `fast_rate` while the window is covered
        end = max(longs, default=0.0) + longest + slow_s
        points = [k * step for k in range(int(end / step) + 1)]
        weight = fast_rate * step
        window += step  # spanning [t, t + step + window] covers every start in [t, t + step): a sound count

    # columns: x[i, g] (long i starts in [g, g + step)), e[i] (long i dropped), y[j] (point j caught)
    cand: list[tuple[int, float, bool]] = []  # (long, grid start, beyond the common wait)
    for i, a in enumerate(longs):
        g = math.floor(a / step) * step
        while g <= a + longest + 1e-12:
            cand.append((i, g, g > a + wait + 1e-12))
            g += step
    nx, nl, npts = len(cand), n, len(points)
    triplets: list[tuple[int, int, float]] = []
    lo: list[float] = []
    hi: list[float] = []

    def row(entries: list[tuple[int, float]], low: float, high: float) -> None:
        r = len(lo)
        triplets.extend((r, c, v) for c, v in entries)
        lo.append(low)
        hi.append(high)

    by_long: list[list[tuple[int, float]]] = [[] for _ in range(nl)]
    for k, (i, _, _) in enumerate(cand):
        by_long[i].append((k, 1.0))
    for i in range(nl):  # each long starts once, or (when p99 ignores it) is dropped
        row([*by_long[i], (nx + i, 1.0)], 1.0, 1.0)
    row([(nx + i, 1.0) for i in range(nl)], 0.0, float(drop))
    row([(k, 1.0) for k, c in enumerate(cand) if c[2]], 0.0, 1.0 if stretch else 0.0)
    starts = np.array([g for _, g, _ in cand])
    for j, t in enumerate(points):  # capacity at t; y_t >= (#longs spanning [t, t + window]) - (workers - 1)
        running = np.nonzero((starts + step <= t) & (starts + slow_s >= t))[0]
        row([(int(k), 1.0) for k in running], 0.0, float(workers))
        spanning = np.nonzero((starts + step <= t) & (starts + slow_s >= t + window))[0]
        row([*((int(k), 1.0) for k in spanning), (nx + nl + j, -1.0)], -np.inf, float(workers - 1))
    ncol = nx + nl + npts
    r_idx, c_idx, vals = zip(*triplets, strict=True) if triplets else ((), (), ())
    a_mat = coo_array((vals, (r_idx, c_idx)), shape=(len(lo), ncol)).tocsr()
    c = np.zeros(ncol)
    c[nx + nl :] = weight
    integrality = np.zeros(ncol)
    integrality[: nx + nl] = 1
    res = milp(
        c,
        constraints=LinearConstraint(a_mat, lo, hi),
        integrality=integrality,
        bounds=Bounds(np.zeros(ncol), np.ones(ncol)),
        options={"time_limit": time_limit, "disp": False},
    )
    # Stopped by the time limit, only the dual bound is proven.
    proven = getattr(res, "mip_dual_bound", None)
    best = res.fun if res.fun is not None else math.nan
    bound = proven if proven is not None and not math.isnan(proven) else best
    value = (math.ceil(bound - 1e-6) if clairvoyant else round(bound, 2)) if not math.isnan(bound) else -1
    return {
        "mode": "clairvoyant" if clairvoyant else "online (expected)",
        "exceptions": "p99 rule" if exceptions else "none",
        "fast": len(fasts),
        "slow": n,
        "fifo_slow_p99_ms": fifo_p99 * 1e3,
        "max_wait_s": wait,
        "exception_max_wait_s": longest,
        "dropped_allowed": drop,
        "allowed_late": allowed_over(len(fasts)),
        "min_late_fast": value,
        "best_found": best,
        "status": "optimal" if res.status == 0 else str(res.message),
        "seconds": time.monotonic() - t0,
        "step_s": step,
    }
