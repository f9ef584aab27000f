#!/usr/bin/env python3
"""Instructions per request on bench/hotpath.py, counted by callgrind, in total and by module (issue 22).

A count of instructions does not follow the load of a shared machine as a time does. Each run is one process
under `valgrind --tool=callgrind` that imports bench/hotpath.py and serves 200 requests (imports, first calls),
then N requests on a fresh rig, then 2N on another. os.getppid() marks the phases and `--dump-before=os_getppid`
makes callgrind write one part per phase, so start-up never enters the figure:

    instructions per request = (I(2N run) - I(N run)) / N      (the rig's set-up and teardown cancel out too)

--repeats runs, each in its own memory layout (see the comment above CHILD: the count moves a little with the layout,
which any change to the code moves too), PYTHONHASHSEED=0. The figure is the median, with min..max. By module:

  * by object file: callgrind's self cost per request, grouped by the ELF object the instructions ran in:
    nearly everything is libpython (the interpreter runs corral, the rig's fakes and hotpath's loop alike);
    its top functions are listed.
  * by Python module: callgrind cannot see Python modules. Per module, Python calls per request (cProfile's
    exact counts) and bytecode instructions executed per request (sys.settrace opcode events), both exact and
    run without valgrind. Bytecodes are work done, not instructions: one costs from a few instructions
    (LOAD_FAST) to thousands (a call).

    .venv/bin/python bench/instructions.py                  # the working tree, 5 runs (~2 min)
    .venv/bin/python bench/instructions.py --rev HEAD       # a commit (git archive, nothing checked out)
    .venv/bin/python bench/instructions.py --requests 100 --repeats 1   # a quick check that it works

--rev REV extracts REV with `git archive` into bench/out/instructions-rev-<sha>/ (kept for the next run) and
runs its own hotpath.py and rig on its src/.
The data path reads the real clock and a few of its branches follow the times it measures (route costs, idle
connections): a run slowed down a lot by the load could take another branch; the median absorbs one.
Garbage collection: gc.collect() runs before each measured run, outside it; the runs hold the generation 0 and 1
collections their requests trigger (printed per run) and no full one (a note says when one does). The rig keeps
every exchange until its run ends (rig.observed), so freeing them is outside the runs too.

Needs valgrind (apt-get install valgrind when missing, unless --no-install). Prints markdown tables, writes
bench/out/instructions-<timestamp>.json. Every child runs under --timeout; callgrind's files go to a temp dir
that is removed (--keep keeps it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType

import baseline  # bench/: the one `git archive` of a revision

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
OUT = BENCH / "out"
PKG = REPO / "src" / "corral"  # the corral package measured: this tree's, or a built revision's (--rev)
HOTPATH_DIR = BENCH  # where hotpath.py is (a revision's own, with --rev)
PYTHONPATH: str | None = None  # what the children import corral from, when not the editable install
MARKER = "os_getppid"  # the C function behind os.getppid() in libpython: called only as a phase marker
WARM = 200
TRACE_REQUESTS = 200  # bytecodes are counted over runs of this many requests and twice as many


# --- the child: runs under valgrind (or cProfile) -----------------------------------------------------------
def _shape(args: argparse.Namespace) -> tuple[int, int, int, bool]:
    return args.clients, args.workers, args.max_inflight, args.split


def _loaded() -> dict[str, str]:
    import corral

    return {"corral": corral.__file__}


# The process callgrind counts. It is handed to `python -c` rather than imported from this file, so that editing
# this driver does not move the counts: the memory layout of the process (see below) is part of what they are.
#
# Layout i: i classes given a type version tag and i * 97 small strings, made before anything is imported. The
# interpreter's type attribute cache is indexed by a type's version tag and the address of the attribute's name:
# these shift both, so each layout has its own collisions in that cache, and the count moves by ~0.2 % from one
# layout to another; any change to the code moves the layout as much, so the repeats run in different layouts
# and the median is the figure.
CHILD = """
import gc, json, os, sys
layout, requests, hotpath_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
shape = (int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7] == "split")
keep = [type(f"_Layout{i}", (), {})() for i in range(layout)]
for obj in keep:
    getattr(obj, "x", None)
keep += ["x" * (i % 64) + str(i) for i in range(layout * 97)]
sys.path.insert(0, hotpath_dir)
import hotpath
import corral
hotpath.run(200, *shape)  # imports and first calls
gc.collect()
got, collections = [], []
for count in (requests, 2 * requests):
    before = [g["collections"] for g in gc.get_stats()]
    os.getppid()  # the marker: callgrind dumps what it counted so far
    got.append(hotpath.run(count, *shape))
    os.getppid()
    collections.append([g["collections"] - b for g, b in zip(gc.get_stats(), before)])
    gc.collect()
print(json.dumps({"corral": corral.__file__, "received": got, "collections": collections, "layout": layout,
                  "kept": len(keep)}))
"""


def _module_of(filename: str) -> str:
    path = Path(filename)
    if filename == "~":
        return "(C functions and methods)"
    try:
        rel = path.resolve().relative_to(PKG.resolve())
        return "corral." + ".".join(rel.with_suffix("").parts)
    except (ValueError, OSError):
        pass
    if path.name == "exchange_rig.py":
        return "(rig: tests/support/exchange_rig.py)"
    if path.name == "hotpath.py":
        return "(bench/hotpath.py)"
    return f"(other: {'/'.join(path.parts[-2:])})"


def _count_bytecodes(run: Callable[[], object]) -> dict[str, int]:
    """Bytecode instructions executed per source file while run() runs (sys.settrace's opcode events)."""
    counts: dict[str, int] = defaultdict(int)

    def local(frame: FrameType, event: str, _arg: object) -> Callable:
        if event == "opcode":
            counts[frame.f_code.co_filename] += 1
        return local

    def on_call(frame: FrameType, _event: str, _arg: object) -> Callable:
        frame.f_trace_opcodes = True
        return local

    sys.settrace(on_call)
    try:
        run()
    finally:
        sys.settrace(None)
    return counts


def calls_child(args: argparse.Namespace) -> None:
    """Per request, by module, without valgrind: Python calls (cProfile's exact counts) and bytecode
    instructions executed (sys.settrace), each as (count over a 2N run - count over an N run) / N."""
    import cProfile
    import pstats

    sys.path.insert(0, str(HOTPATH_DIR))
    import hotpath

    shape = _shape(args)
    hotpath.run(WARM, *shape)

    def profiled(count: int) -> dict[str, int]:
        prof = cProfile.Profile()
        prof.runcall(hotpath.run, count, *shape)
        by_file: dict[str, int] = defaultdict(int)
        for (filename, _line, _fn), (_cc, nc, *_rest) in pstats.Stats(prof).stats.items():
            by_file[filename] += nc
        return by_file

    def per_request(count: Callable[[int], dict[str, int]], n: int) -> dict[str, float]:
        small, big = count(n), count(2 * n)
        by_module: dict[str, float] = defaultdict(float)
        for filename in set(small) | set(big):
            by_module[_module_of(filename)] += (big.get(filename, 0) - small.get(filename, 0)) / n
        return dict(by_module)

    calls = per_request(profiled, args.requests)
    n = min(args.requests, TRACE_REQUESTS)
    bytecodes = per_request(lambda n: _count_bytecodes(lambda: hotpath.run(n, *shape)), n)
    print(json.dumps({**_loaded(), "calls": calls, "bytecodes": bytecodes}))


# --- callgrind output ------------------------------------------------------------------------------------
def parse_callgrind(path: Path) -> tuple[int, dict[tuple[str, str], int]]:
    """(part number, self Ir per (object file, function)) of one callgrind output file (name compression
    handled; the cost line after `calls=` is the callee's inclusive cost, not self, and is skipped)."""
    names: dict[str, dict[str, str]] = {"ob": {}, "fn": {}}
    kind_of = {"ob": "ob", "cob": "ob", "fn": "fn", "cfn": "fn"}
    ob = fn = "???"
    part, skip_next = 0, False
    cost: dict[tuple[str, str], int] = defaultdict(int)
    with path.open() as f:
        for line in f:
            c = line[0]
            if c.isdigit() or c in "+-*":
                if skip_next:
                    skip_next = False
                    continue
                fields = line.split()
                if len(fields) > 1:
                    cost[(ob, fn)] += int(fields[1])
                continue
            key, sep, value = line.rstrip("\n").partition("=")
            if not sep:
                if line.startswith("part:"):
                    part = int(line.split(":")[1])
                continue
            if key == "calls":
                skip_next = True
                continue
            kind = kind_of.get(key)
            if kind is None:
                continue
            m = re.match(r"\((\d+)\)(?: (.*))?$", value)
            if m:
                if m.group(2) is not None:
                    names[kind][m.group(1)] = m.group(2)
                value = names[kind].get(m.group(1), f"id{m.group(1)}")
            if key == "ob":
                ob = value
            elif key == "fn":
                fn = value
    return part, dict(cost)


def object_label(ob: str) -> str:
    """A readable name for an object file: libraries by file name, extension modules by dotted name."""
    path = Path(ob)
    if path.name.startswith("libpython"):
        return "libpython3 (interpreter)"
    if "site-packages" in path.parts:
        i = path.parts.index("site-packages")
        return ".".join((*path.parts[i + 1 : -1], path.name.split(".")[0])) + " (.so)"
    if "lib-dynload" in path.parts:
        return path.name.split(".")[0] + " (stdlib .so)"
    return path.name if ob != "???" else "??? (no object)"


# --- one measurement ---------------------------------------------------------------------------------------
def env_for() -> dict[str, str]:
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # str hashes, and so dict and set layouts, the same in every run
    if PYTHONPATH:
        env["PYTHONPATH"] = PYTHONPATH
    return env


RUNNING: set[subprocess.Popen] = set()  # the children now running, stopped by main() if it stops early
RUNNING_LOCK = threading.Lock()


def run_child(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """subprocess.run, with the child in RUNNING while it runs; killed after `timeout` seconds."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with RUNNING_LOCK:
        RUNNING.add(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"{argv[0]} killed after {timeout:.0f} s (--timeout)") from None
    finally:
        with RUNNING_LOCK:
            RUNNING.discard(proc)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def _child_argv(args: argparse.Namespace, mode: str) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), mode, "--requests", str(args.requests)]
    argv += ["--pkg-dir", str(PKG), "--hotpath-dir", str(HOTPATH_DIR)]
    argv += ["--clients", str(args.clients), "--workers", str(args.workers), "--max-inflight", str(args.max_inflight)]
    return [*argv, "--split" if args.split else "--no-split"]


def _check_source(report: dict) -> str | None:
    if not Path(report["corral"]).resolve().is_relative_to(PKG.resolve()):
        return f"corral imported from {report['corral']}, not {PKG}"
    return None


def measure(args: argparse.Namespace, tmp: Path, tag: str, layout: int) -> dict:
    """One process under callgrind, in the given memory layout; per-request self Ir by (object, function)."""
    out = tmp / f"{tag}.cg"
    argv = ["valgrind", "--tool=callgrind", f"--dump-before={MARKER}", f"--callgrind-out-file={out}"]
    argv += [sys.executable, "-c", CHILD, str(layout), str(args.requests), str(HOTPATH_DIR)]
    argv += [str(args.clients), str(args.workers), str(args.max_inflight), "split" if args.split else "whole"]
    start = time.monotonic()
    proc = run_child(argv, env_for(), args.timeout)
    took = time.monotonic() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{tag}: exit {proc.returncode}: {proc.stderr.strip()[-800:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    want = [args.requests, 2 * args.requests]
    if report["received"] != want:
        raise RuntimeError(f"{tag}: the clients received {report['received']} responses, expected {want}")
    problem = _check_source(report)
    if problem:
        raise RuntimeError(f"{tag}: {problem}")
    parts = dict(parse_callgrind(p) for p in sorted(tmp.glob(f"{tag}.cg*")))
    if sorted(parts) != [1, 2, 3, 4, 5]:
        raise RuntimeError(f"{tag}: expected 5 callgrind parts, got {sorted(parts)} (marker {MARKER} not hit?)")
    if not args.keep:
        for p in tmp.glob(f"{tag}.cg*"):
            p.unlink()
    # parts: 1 start-up and warm-up, 2 run(N), 3 gc, 4 run(2N), 5 gc and exit
    small, big = parts[2], parts[4]
    per_fn = {k: (big.get(k, 0) - small.get(k, 0)) / args.requests for k in set(small) | set(big)}
    total = (sum(big.values()) - sum(small.values())) / args.requests
    startup, full_gc = sum(parts[1].values()), sum(parts[3].values())
    gcs = " and ".join("/".join(map(str, c)) for c in report["collections"])
    line = (
        f"  {tag:<28} {total:>10,.0f} instr/request   ({took:.0f} s; start-up {startup / 1e6:,.0f} M, "
        f"collections per generation in the N and 2N runs {gcs}, a full one after {full_gc / 1e6:,.1f} M)\n"
    )
    if any(c[2] for c in report["collections"]):
        line += f"  note: {tag}: a full (generation 2) collection ran inside a measured run; the figure holds it\n"
    sys.stdout.write(line)  # one write: the runs finish in threads
    sys.stdout.flush()
    return {
        "tag": tag,
        "layout": layout,
        "total": total,
        "per_fn": per_fn,
        "seconds": took,
        "collections": report["collections"],
        "full_collection": full_gc,
    }


def by_object(per_fn: dict[tuple[str, str], float]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for (ob, _fn), v in per_fn.items():
        out[object_label(ob)] += v
    return dict(out)


# --- the report --------------------------------------------------------------------------------------------
def spread(values: list[float]) -> dict:
    med = statistics.median(values)
    return {
        "median": med,
        "min": min(values),
        "max": max(values),
        "runs": values,
        "spread_pct": (max(values) - min(values)) / med * 100 if med else 0.0,
    }


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def object_table(objects: dict[str, float], total: float, min_ir: float) -> str:
    rows, rest = [], 0.0
    for name, v in sorted(objects.items(), key=lambda kv: -kv[1]):
        if abs(v) < min_ir:
            rest += v
            continue
        rows.append([name, f"{v:,.0f}", f"{v / total * 100:.1f} %"])
    if rest:
        rows.append([f"(others, each under {min_ir:,.0f})", f"{rest:,.0f}", f"{rest / total * 100:.1f} %"])
    rows.append(["**total**", f"**{total:,.0f}**", "100 %"])
    return table(["object file (self cost)", "instr/request", "share"], rows)


def interpreter_functions(per_fn: dict[tuple[str, str], float]) -> dict[str, float]:
    """libpython's self cost per function (callgrind's recursion suffix, `fn'2`, folded into fn)."""
    out: dict[str, float] = defaultdict(float)
    for (ob, fn), v in per_fn.items():
        if object_label(ob).startswith("libpython"):
            out[re.sub(r"'\d+$", "", fn)] += v
    return dict(out)


def function_table(functions: dict[str, float], total: float, top: int) -> str:
    rows = sorted(functions.items(), key=lambda kv: -kv[1])[:top]
    header = ["libpython function (self)", "instr/request", "share of all"]
    return table(header, [[f"`{fn}`", f"{v:,.0f}", f"{v / total * 100:.1f} %"] for fn, v in rows])


def module_table(profile: dict) -> str:
    """By module: Python calls and bytecodes per request (exact counts, no valgrind)."""
    calls, bytecodes = profile.get("calls", {}), profile.get("bytecodes", {})
    all_bytecodes = sum(bytecodes.values()) or 1.0
    names = {m for m, v in [*calls.items(), *bytecodes.items()] if abs(v) >= 0.05}
    corral_names = sorted((m for m in names if m.startswith("corral.")), key=lambda m: -bytecodes.get(m, 0))
    other_names = sorted((m for m in names if not m.startswith("corral.")), key=lambda m: -bytecodes.get(m, 0))

    def row(m: str, label: str) -> list[str]:
        cells = [label, f"{calls.get(m, 0):,.1f}", f"{bytecodes.get(m, 0):,.1f}"]
        return [*cells, f"{bytecodes.get(m, 0) / all_bytecodes * 100:.1f} %"]

    rows = [row(m, f"`{m}`") for m in corral_names]
    corral_total = {k: sum(d.get(m, 0) for m in corral_names) for k, d in (("c", calls), ("b", bytecodes))}
    total = ["**corral's modules**", f"{corral_total['c']:,.1f}", f"{corral_total['b']:,.1f}"]
    rows.append([*total, f"{corral_total['b'] / all_bytecodes * 100:.1f} %"])
    rows += [row(m, m) for m in other_names]
    return table(["module", "Python calls/request", "bytecodes/request", "share of bytecodes"], rows)


# --- main --------------------------------------------------------------------------------------------------
def ensure_valgrind(install: bool) -> None:
    if shutil.which("valgrind"):
        return
    if not install:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    print("installing valgrind (apt-get) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, env=env, timeout=600)
    subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", "valgrind"], check=True, env=env, timeout=900
    )


def check_import() -> None:
    """corral imports, from the package measured (PKG), in the children's environment."""
    probe = "import corral; print(corral.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], env=env_for(), capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise SystemExit(f"corral does not import: {out.stderr.strip()[-500:]}")
    where = out.stdout.strip().splitlines()[-1]
    if not Path(where).resolve().is_relative_to(PKG.resolve()):
        raise SystemExit(f"corral imports from {where}, not from {PKG}")


def prepare_rev(rev: str) -> tuple[Path, str]:
    """REV's tree (baseline.extract: `git archive`, nothing checked out), kept in bench/out/ per commit and reused.
    Returns (the directory holding its corral package, a description)."""
    try:
        commit, short = baseline.resolve(rev)
        home = OUT / f"instructions-rev-{commit[:12]}"
        tree = home / "tree"
        if not (tree / "src" / "corral" / "__init__.py").exists():
            shutil.rmtree(home, ignore_errors=True)
            baseline.extract(commit, tree)
    except baseline.BaselineError as exc:
        raise SystemExit(str(exc)) from None
    if not (tree / "bench" / "hotpath.py").exists():
        raise SystemExit(f"{short} has no bench/hotpath.py")
    return tree / "src", f"git revision {short} (git archive, in {home.relative_to(REPO)})"


def machine(tree: str) -> dict[str, str]:
    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    valgrind = subprocess.run(["valgrind", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "valgrind": valgrind,
        "tree": tree,
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000, help="N: runs of N and 2N requests are differenced")
    ap.add_argument("--repeats", type=int, default=5, help="callgrind processes, each in its own memory layout")
    ap.add_argument("--jobs", type=int, default=2, help="callgrind processes at once")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-inflight", type=int, default=1)
    ap.add_argument(
        "--split",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the worker's head and body arrive in two reads (hotpath --split; the default here)",
    )
    ap.add_argument("--top", type=int, default=10, help="libpython functions listed")
    ap.add_argument("--min-ir", type=float, default=500, help="object files under this many instr/request: 'others'")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per callgrind process")
    ap.add_argument("--json", type=Path, default=None, help="default bench/out/instructions-<timestamp>.json")
    ap.add_argument("--keep", action="store_true", help="keep the callgrind files (the temp dir is printed)")
    ap.add_argument("--rev", help="measure this git revision, built from `git archive` (default: the working tree)")
    ap.add_argument("--no-install", action="store_true", help="never apt-get valgrind")
    ap.add_argument("--calls-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pkg-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--hotpath-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global PKG, HOTPATH_DIR, PYTHONPATH
    if args.pkg_dir:
        PKG, HOTPATH_DIR = args.pkg_dir, args.hotpath_dir
    if args.calls_child:
        return calls_child(args)

    ensure_valgrind(not args.no_install)
    if args.rev:
        src, tree = prepare_rev(args.rev)
        PKG, HOTPATH_DIR, PYTHONPATH = src / "corral", src.parent / "bench", str(src)
    else:
        tree = baseline.current_tree()
    check_import()
    info = machine(tree)
    print(
        f"{info['cpu']}, {info['nproc']} CPUs, Python {info['python']}, {info['valgrind']}; {tree}; load {info['load']}"
    )
    print(
        f"hotpath: {args.clients} clients, {args.workers} workers, max-inflight {args.max_inflight}, "
        f"split {args.split}; N = {args.requests}; per request = (I(2N) - I(N)) / N",
        flush=True,
    )

    tmp = Path(tempfile.mkdtemp(prefix="corral-instructions-"))
    started = time.monotonic()
    runs: list[dict] = []
    profile: dict = {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally below stops the children
    pool = ThreadPoolExecutor(max_workers=max(1, args.jobs))
    try:
        calls_job = pool.submit(run_child, _child_argv(args, "--calls-child"), env_for(), args.timeout)
        jobs = [pool.submit(measure, args, tmp, f"run-{r + 1}", r) for r in range(args.repeats)]
        runs = [job.result() for job in jobs]
        done = calls_job.result()
        if done.returncode != 0:
            raise RuntimeError(f"cProfile run failed: {done.stderr.strip()[-800:]}")
        profile = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        with RUNNING_LOCK:
            for proc in RUNNING:
                proc.kill()
        pool.shutdown(wait=True)
        if args.keep:
            print(f"callgrind files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{time.monotonic() - started:.0f} s\n")
    totals = spread([r["total"] for r in runs])
    med = sorted(runs, key=lambda r: r["total"])[len(runs) // 2]
    objects = by_object(med["per_fn"])
    print(
        f"### {totals['median']:,.0f} instructions/request, {totals['min']:,.0f}..{totals['max']:,.0f} over "
        f"{len(runs)} runs, one memory layout each (spread {totals['spread_pct']:.2f} %); the tables are "
        f"{med['tag']}'s\n"
    )
    print(object_table(objects, med["total"], args.min_ir) + "\n")
    functions = interpreter_functions(med["per_fn"])
    print(function_table(functions, med["total"], args.top) + "\n")
    print("### by module\n")
    print(module_table(profile) + "\n")
    interp = objects.get("libpython3 (interpreter)", 0.0)
    all_bytecodes = sum(profile.get("bytecodes", {}).values())
    if all_bytecodes:
        print(
            f"{all_bytecodes:,.0f} bytecodes/request, {interp / all_bytecodes:,.1f} libpython instructions per "
            "bytecode on average (over all modules, rig and hotpath included)"
        )
    report = {
        "machine": info,
        "args": {k: str(v) for k, v in vars(args).items()},
        "total": totals,
        "objects": objects,
        "libpython": {fn: v for fn, v in functions.items() if abs(v) >= 1},
        "runs": [
            {k: r[k] for k in ("tag", "layout", "total", "collections", "full_collection")}
            | {"objects": by_object(r["per_fn"])}
            for r in runs
        ],
        "modules": {
            "python_calls_per_request": profile.get("calls", {}),
            "bytecodes_per_request": profile.get("bytecodes", {}),
        },
    }
    path = args.json or OUT / f"instructions-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"raw: {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


if __name__ == "__main__":
    main()
