"""Collect per-run figures, judge them against the scenario targets, render the table.

Every figure is kept per run; the table shows the median and the spread
(min..max) across runs, plus corral's ratio to the best peer and, with a
baseline (corral@REV), the current/baseline ratio of medians with the spread
of the per-run ratios (the two ran next to each other in every run).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from baseline import is_baseline
from stats import median

CORRAL = "corral"
# Column order of the table; anything else is appended in first-seen order.
COLUMNS = [
    "corral", "corral-fifo", "corral-none", "corral-r0", "nginx", "nginx-rr", "nginx-ka", "haproxy", "haproxy-ka",
    "direct", "direct-ka", "ideal",
]  # fmt: skip
# Reference points: shown, but never the "best peer".
REFERENCES = {"direct", "direct-ka", "ideal", "corral-fifo", "corral-none", "corral-r0"}
LEGEND = """\
Columns: corral and the peers run in turn over the same worker processes.
nginx = least_conn, no upstream keep-alive; nginx-rr = round-robin, no upstream keep-alive;
nginx-ka = least_conn with upstream keep-alive; haproxy = `maxconn 1` per server,
http-server-close; haproxy-ka = no per-server cap, server keep-alive (configs in bench/peers/).
corral-fifo = corral with `--dispatch fifo` (cost-aware dispatch off; a reference, not a peer);
corral-none = corral with `--fair-key none` (one FIFO); corral-r0 = fair queueing without the reserve for
other clients (`--reserve 0`) (T8; references, not peers);
direct = straight to a worker (T2: one connection per request; T3: the nginx backend;
T5: N x one worker loaded alone); direct-ka = one kept-alive connection to a worker (httpuv's
delayed-ACK stall); ideal = T4 zero-overhead central FIFO replay (bench/ggc.py), T5 N/0.05 s.
Ratios use medians; "best peer" excludes direct/ideal."""
BASELINE_LEGEND = """\
corral@REV = corral built from git revision REV (`--baseline`), run right next to the current tree's corral
in every run, the two alternating who goes first; never a peer. corral / corral@REV = ratio of the medians
(per-run ratios min..max)."""
BEGIN = "<!-- compare:begin -->"
END = "<!-- compare:end -->"

Better = Literal["higher", "lower", ""]


@dataclass(frozen=True)
class Goal:
    """A target on corral's median: ratio to `ref` (a peer, or "best" peer) or an absolute bound."""

    ref: str  # "best", a column name, or "abs"
    op: Literal[">=", "<="]
    value: float

    def text(self) -> str:
        if self.ref == "abs":
            return f"{self.op} {self.value:g}"
        who = "best peer" if self.ref == "best" else self.ref
        return f"{self.op} {self.value:g}x {who}"


@dataclass
class Metric:
    scenario: str
    name: str
    better: Better = ""
    goals: list[Goal] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, target: str, value: float) -> None:
        self.values.setdefault(target, []).append(float(value))

    def med(self, target: str) -> float | None:
        vs = [v for v in self.values.get(target, []) if not math.isnan(v)]
        return median(vs) if vs else None

    def best_peer(self) -> str | None:
        peers = [t for t in self.values if t != CORRAL and not is_reference(t) and self.med(t) is not None]
        if not peers or not self.better:
            return None
        pick = max if self.better == "higher" else min
        return pick(peers, key=lambda t: self.med(t) or 0.0)

    def ratio_to(self, ref: str | None) -> float | None:
        mine = self.med(CORRAL)
        other = self.med(ref) if ref else None
        if mine is None or other is None or other == 0:
            return None
        return mine / other

    def paired_ratios(self, ref: str) -> list[float]:
        """corral / ref run by run; empty unless both have a value for every run."""
        mine, other = self.values.get(CORRAL, []), self.values.get(ref, [])
        if not mine or len(mine) != len(other):
            return []
        pairs = zip(mine, other, strict=True)
        return [a / b for a, b in pairs if b != 0 and not math.isnan(a) and not math.isnan(b)]

    def goal_value(self, g: Goal) -> float | None:
        """The number `g` bounds: corral's median, or its ratio to the reference."""
        if g.ref == "abs":
            return self.med(CORRAL)
        return self.ratio_to(self.best_peer() if g.ref == "best" else g.ref)

    def verdict(self) -> bool | None:
        """True/False when every goal can be judged, None when data is missing."""
        if not self.goals:
            return None
        oks: list[bool] = []
        for g in self.goals:
            lhs = self.goal_value(g)
            if lhs is None:
                return None
            oks.append(lhs >= g.value if g.op == ">=" else lhs <= g.value)
        return all(oks)


def is_reference(target: str) -> bool:
    """Shown for comparison, never the "best peer": direct/ideal, corral variants, baselines."""
    return target in REFERENCES or is_baseline(target)


class Results:
    def __init__(self) -> None:
        self.metrics: dict[tuple[str, str], Metric] = {}
        self.errors: list[dict[str, str]] = []
        self.raw: list[dict[str, Any]] = []

    def metric(self, scenario: str, name: str, better: Better = "", goals: Sequence[Goal] = ()) -> Metric:
        key = (scenario, name)
        if key not in self.metrics:
            self.metrics[key] = Metric(scenario, name, better, list(goals))
        return self.metrics[key]

    def error(self, scenario: str, target: str, message: str) -> None:
        self.errors.append({"scenario": scenario, "target": target, "error": message})

    def record(self, scenario: str, target: str, run: int, data: dict[str, Any]) -> None:
        self.raw.append({"scenario": scenario, "target": target, "run": run, "data": data})

    def failed_targets(self, scenario: str) -> set[str]:
        return {e["target"] for e in self.errors if e["scenario"] == scenario}

    def to_json(self, meta: dict[str, Any]) -> dict[str, Any]:
        return {
            "meta": meta,
            "metrics": [
                {**asdict(m), "goals": [g.text() for g in m.goals], "ok": m.verdict()} for m in self.metrics.values()
            ],
            "errors": self.errors,
            "raw": self.raw,
        }


def fmt(x: float | None) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    a = abs(x)
    if a >= 100 or x.is_integer():
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def cell(values: Sequence[float]) -> str:
    vs = [v for v in values if not math.isnan(v)]
    if not vs:
        return "n/a"
    mid = fmt(median(vs))
    return mid if len(vs) == 1 else f"{mid} ({fmt(min(vs))}..{fmt(max(vs))})"


def _columns(results: Results) -> list[str]:
    seen: list[str] = []
    for m in results.metrics.values():
        for t in m.values:
            if t not in seen:
                seen.append(t)
    known = [c for c in COLUMNS if c in seen or c == CORRAL]
    bases = [c for c in seen if is_baseline(c)]
    known[1:1] = bases  # right after corral
    return known + [c for c in seen if c not in COLUMNS and c not in bases]


def baseline_columns(results: Results) -> list[str]:
    return [c for c in _columns(results) if is_baseline(c)]


def ratio_cell(m: Metric, ref: str) -> str:
    """corral / ref: ratio of medians, then the spread of the per-run ratios."""
    ratio = m.ratio_to(ref)
    if ratio is None:
        return ""
    runs = m.paired_ratios(ref)
    spread = f" ({min(runs):.3f}..{max(runs):.3f})" if len(runs) > 1 else ""
    return f"{ratio:.3f}{spread}"


def table(results: Results) -> str:
    cols = _columns(results)
    bases = baseline_columns(results)
    head = ["test", "metric", *cols, *(f"{CORRAL} / {b}" for b in bases), "corral / best peer", "target", "ok"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in results.metrics.values():
        failed = results.failed_targets(m.scenario)
        cells = []
        for c in cols:
            if c in m.values:
                cells.append(cell(m.values[c]))
            else:
                cells.append("n/a" if c in failed or c == CORRAL else "")
        best = m.best_peer()
        ratio = m.ratio_to(best)
        ratio_txt = f"{fmt(ratio)} ({best})" if ratio is not None else ""
        goal_txt = "; ".join(g.text() for g in m.goals)
        verdict = m.verdict()
        ok = "" if not m.goals else {True: "PASS", False: "FAIL", None: "n/a"}[verdict]
        vs_base = [ratio_cell(m, b) for b in bases]
        lines.append("| " + " | ".join([m.scenario, m.name, *cells, *vs_base, ratio_txt, goal_txt, ok]) + " |")
    return "\n".join(lines)


def errors_text(results: Results) -> str:
    if not results.errors:
        return ""
    out = ["Errors:"]
    for e in results.errors:
        lines = [ln.strip() for ln in e["error"].splitlines() if ln.strip()] or ["?"]
        # First line says what failed; the last is usually the process's own complaint.
        text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
        out.append(f"- {e['scenario']} {e['target']}: {text[:400]}")
    return "\n".join(out)


def markdown_block(results: Results, meta: dict[str, Any]) -> str:
    m, v = meta["machine"], meta["versions"]
    parts = [
        f"Run `{meta['command']}` on {meta['date']} ({meta['runs']} run(s) per figure; cells are median (min..max)).",
        "",
        f"Machine: {m['nproc']} CPUs, {m['cpu']}, Linux {m['kernel']}.",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + ".",
        "",
        *_trees_lines(meta),
        table(results),
        "",
        LEGEND,
        *([BASELINE_LEGEND] if baseline_columns(results) else []),
    ]
    errs = errors_text(results)
    if errs:
        parts += ["", errs]
    return "\n".join(parts)


def _trees_lines(meta: dict[str, Any]) -> list[str]:
    """Which code the corral columns ran."""
    if "corral_tree" not in meta:
        return []
    line = f"corral = {meta['corral_tree']}"
    base = meta.get("baseline")
    if base:
        line += f"; {base['name']} = git revision {base['commit']} (extracted)"
    return [line + ".", ""]


def update_results_md(path: Path, block: str) -> None:
    """Replace the text between the markers; everything outside them is left untouched."""
    text = path.read_text() if path.exists() else "# corral benchmark results\n"
    body = f"{BEGIN}\n{block}\n{END}"
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: body, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(text)


def write_json(path: Path, results: Results, meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results.to_json(meta), indent=1, default=str) + "\n")
