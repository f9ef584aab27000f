"""Command line of bench/compare (see that script's docstring)."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

import baseline
import environment
import report
from scenarios import SCENARIOS, Context

BENCH = Path(__file__).resolve().parent
OUT_DIR = BENCH / "out"
RESULTS_MD = BENCH / "RESULTS.md"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bench/compare", description="corral vs nginx vs HAProxy")
    ap.add_argument("--runs", type=int, default=3, help="repeats per figure (default 3)")
    ap.add_argument("--quick", action="store_true", help="1 run, shorter durations")
    ap.add_argument("--only", default="", help="comma-separated scenarios, e.g. T1,T4")
    ap.add_argument("--corral-args", default="", help="extra args appended to `corral run`")
    ap.add_argument(
        "--baseline", metavar="REV", default=None,
        help="also run corral built from git revision REV (git archive, PYTHONPATH) next to the current tree's",
    )  # fmt: skip
    ap.add_argument(
        "--corral-rev", metavar="REV", default=None,
        help="run the corral column from git revision REV (extracted the same way) instead of the working tree",
    )  # fmt: skip
    ap.add_argument(
        "--asyncio-twin", action="store_true",
        help="also run corral on asyncio's own loop (--loop asyncio), as corral@asyncio, right next to corral",
    )  # fmt: skip
    ap.add_argument("--no-install", action="store_true", help="never apt-get / pip install")
    ap.add_argument("--no-write", action="store_true", help="do not touch bench/RESULTS.md")
    ap.add_argument("--keep-tmp", action="store_true", help="keep configs and logs of the run")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs = 1
    args.only = [s.strip().upper() for s in args.only.split(",") if s.strip()] or list(SCENARIOS)
    unknown = [s for s in args.only if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    return args


def _terminate(signum: int, _frame: FrameType | None) -> None:
    # Turn SIGTERM into an exception so every `finally` stops the processes it started.
    raise SystemExit(128 + signum)


def command_line(argv: list[str] | None) -> str:
    args = argv if argv is not None else sys.argv[1:]
    return " ".join(["bench/compare", *(shlex.quote(a) for a in args)])


def build_meta(
    args: argparse.Namespace,
    argv: list[str] | None,
    started: dt.datetime,
    current: baseline.Revision | None,
    base: baseline.Revision | None,
) -> dict[str, Any]:
    return {
        "command": command_line(argv),
        "date": started.strftime("%Y-%m-%d %H:%M %Z").strip(),
        "runs": args.runs,
        "quick": args.quick,
        "scenarios": args.only,
        "corral_args": args.corral_args,
        "corral_tree": baseline.current_tree() if current is None else current.describe(),
        "baseline": None if base is None else {"rev": base.rev, "commit": base.commit, "name": base.name},
        "machine": environment.machine(),
        "loadavg_at_end": os.getloadavg(),
        "versions": environment.versions(),
    }


def run_scenarios(ctx: Context, names: list[str]) -> None:
    for name in names:
        log(f"=== {name} ===")
        t0 = time.monotonic()
        try:
            SCENARIOS[name](ctx)
        except Exception as exc:  # a broken scenario (e.g. workers failing) must not lose the others
            log(f"{name} aborted: {exc}")
            ctx.results.error(name, "scenario", str(exc))
        log(f"=== {name} done in {time.monotonic() - t0:.0f}s ===")


def prepare_revision(role: str, rev: str | None, tmp: Path) -> baseline.Revision | None:
    if rev is None:
        return None
    got = baseline.prepare(rev, tmp)
    log(f"{role}: {got.commit} extracted to {got.build.pythonpath}")
    return got


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    started = dt.datetime.now().astimezone()
    corral_error = None
    if not args.no_install:
        environment.ensure_tools(log)
        corral_error = environment.ensure_corral(log)
    corral_cmd = environment.corral_command()
    if corral_cmd is None:
        corral_error = corral_error or "corral is not importable (run without --no-install to pip install it)"
        log(f"corral unavailable, its columns will be n/a: {corral_error}")

    load1 = os.getloadavg()[0]
    if load1 > 0.5:
        log(f"warning: 1-min load average is {load1:.2f} before starting; figures will be noisy")
    results = report.Results()
    tmp = Path(tempfile.mkdtemp(prefix="corral-bench-"))
    # nginx workers drop root privileges and still need to reach their temp dirs.
    os.chmod(tmp, 0o755)
    log(f"configs and logs in {tmp}")
    try:
        current = prepare_revision("corral", args.corral_rev, tmp)
        base = prepare_revision("baseline", args.baseline, tmp)
    except baseline.BaselineError as exc:
        _remove_tree(tmp)
        log(str(exc))
        return 2
    ctx = Context(
        runs=args.runs,
        quick=args.quick,
        tmp=tmp,
        results=results,
        log=log,
        corral_cmd=corral_cmd,
        corral_error=corral_error,
        corral_args=shlex.split(args.corral_args),
        baseline=base,
        corral_build=None if current is None else current.build,
        asyncio_twin=args.asyncio_twin,
    )
    try:
        run_scenarios(ctx, args.only)
    finally:
        meta = build_meta(args, argv, started, current, base)
        out = OUT_DIR / f"compare-{started.strftime('%Y%m%d-%H%M%S')}.json"
        report.write_json(out, results, {**meta, "loadavg_at_start": load1, "tmp": str(tmp)})
        if not args.keep_tmp:
            _remove_tree(tmp)
    print(report.table(results))
    errs = report.errors_text(results)
    if errs:
        print("\n" + errs)
    if not args.no_write:
        report.update_results_md(RESULTS_MD, report.markdown_block(results, meta))
        log(f"table written to {RESULTS_MD}")
    log(f"raw results in {out}")
    return 0


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
