"""Run wrk (closed-loop load) and parse bench/wrk_report.lua's JSON line."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

REPORT_LUA = Path(__file__).resolve().parent / "wrk_report.lua"
MARKER = "WRKJSON "


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    connect: int
    read: int
    write: int
    status: int
    timeout: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0

    @property
    def socket_errors(self) -> int:
        return self.connect + self.read + self.write + self.timeout

    @property
    def failed(self) -> int:
        """Non-2xx/3xx responses plus socket errors, as wrk counts them."""
        return self.status + self.socket_errors

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "rps": self.rps, "failed": self.failed}


def wrk_argv(
    url: str,
    connections: int,
    duration_s: float,
    threads: int = 1,
    timeout_s: float = 10.0,
    headers: Sequence[str] = (),
) -> list[str]:
    argv = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s:g}s",
        f"--timeout={timeout_s:g}s", "-s", str(REPORT_LUA),
    ]  # fmt: skip
    for h in headers:
        argv += ["-H", h]
    return [*argv, url]


def parse(stdout: str) -> WrkResult:
    for line in stdout.splitlines():
        if line.startswith(MARKER):
            d = json.loads(line[len(MARKER) :])
            return WrkResult(
                requests=d["requests"],
                duration_s=d["duration_us"] / 1e6,
                connect=d["connect"],
                read=d["read"],
                write=d["write"],
                status=d["status"],
                timeout=d["timeout"],
                p50_ms=d["p50_us"] / 1e3,
                p90_ms=d["p90_us"] / 1e3,
                p99_ms=d["p99_us"] / 1e3,
                mean_ms=d["mean_us"] / 1e3,
                max_ms=d["max_us"] / 1e3,
            )
    raise RuntimeError(f"wrk printed no report:\n{stdout[-2000:]}")


def run_wrk(
    url: str,
    connections: int,
    duration_s: float,
    threads: int = 1,
    timeout_s: float = 10.0,
    headers: Sequence[str] = (),
) -> WrkResult:
    argv = wrk_argv(url, connections, duration_s, threads, timeout_s, headers)
    # Hard bound in case wrk wedges: its own duration plus generous slack.
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"wrk exited {out.returncode}: {out.stderr.strip() or out.stdout[-500:]}")
    return parse(out.stdout)


def run_wrk_each(urls: Sequence[str], connections: int, duration_s: float, headers: Sequence[str] = ()) -> WrkResult:
    """One wrk per URL, all at once, `connections` each: their requests and failures summed, latencies averaged."""
    runs = [BackgroundWrk(u, connections, duration_s, headers=headers) for u in urls]
    try:
        rs = [b.result() for b in runs]
    finally:
        for b in runs:
            b.stop()
    n = len(rs)
    return WrkResult(
        requests=sum(r.requests for r in rs),
        duration_s=max(r.duration_s for r in rs),
        connect=sum(r.connect for r in rs),
        read=sum(r.read for r in rs),
        write=sum(r.write for r in rs),
        status=sum(r.status for r in rs),
        timeout=sum(r.timeout for r in rs),
        p50_ms=sum(r.p50_ms for r in rs) / n,
        p90_ms=sum(r.p90_ms for r in rs) / n,
        p99_ms=max(r.p99_ms for r in rs),
        mean_ms=sum(r.mean_ms for r in rs) / n,
        max_ms=max(r.max_ms for r in rs),
    )


class BackgroundWrk:
    """wrk running while the caller does something else (T6 kills workers meanwhile)."""

    def __init__(
        self, url: str, connections: int, duration_s: float, timeout_s: float = 10.0, headers: Sequence[str] = ()
    ) -> None:
        self.duration_s = duration_s
        # wrk is started in its own session only so it never receives our terminal's signals.
        self.proc = subprocess.Popen(
            wrk_argv(url, connections, duration_s, timeout_s=timeout_s, headers=headers),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def result(self) -> WrkResult:
        try:
            out, err = self.proc.communicate(timeout=self.duration_s + 60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise
        if self.proc.returncode != 0:
            raise RuntimeError(f"wrk exited {self.proc.returncode}: {err.strip()}")
        return parse(out)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
