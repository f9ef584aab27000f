#!/usr/bin/env python3
"""The edge fuzzing of tests/edge/test_edge_fuzz.py, run for much longer than CI can afford.

Same strategies and properties; only the number of cases grows. Defaults (~10 minutes on 2 cores):
sans-I/O x40 (about 144,000 cases), live x5 (about 2,400 requests to a real corral + stub worker).

    bench/fuzz_long.py                     # defaults
    bench/fuzz_long.py --scale 200 --live-scale 0   # sans-I/O only, ~700,000 cases
    bench/fuzz_long.py --seed 1234         # reproduce a run

Everything runs on 127.0.0.1; the live part starts one corral with one stub worker and stops it.
A failure prints hypothesis's minimal falsifying example; exit status is pytest's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=40, help="multiplier on the sans-I/O case counts (CI: 1)")
    ap.add_argument("--live-scale", type=float, default=5, help="multiplier on the live case counts; 0 skips them")
    ap.add_argument("--seed", type=int, default=None, help="hypothesis seed, to reproduce a run")
    args = ap.parse_args()

    env = dict(os.environ, CORRAL_FUZZ_SCALE=str(args.scale), CORRAL_FUZZ_LIVE_SCALE=str(max(args.live_scale, 0.001)))
    cmd = [
        sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_edge_fuzz.py"),
        "-q", "-p", "no:cacheprovider", "-o", "timeout=0", "--hypothesis-show-statistics", "-rA",
    ]  # fmt: skip
    if args.live_scale <= 0:
        cmd += ["-k", "not live"]
    if args.seed is not None:
        cmd += [f"--hypothesis-seed={args.seed}"]
    print("running:", " ".join(cmd), f"(scale {args.scale}, live scale {args.live_scale})", flush=True)
    t0 = time.monotonic()
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    print(f"fuzz_long: exit {rc} after {time.monotonic() - t0:.0f} s", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
