"""`python -m corral.config` prints the reference table; `--update FILE` rewrites it inside FILE's markers."""

import sys
from pathlib import Path

from .reference import reference_markdown, update_reference

if sys.argv[1:2] == ["--update"] and len(sys.argv) == 3:
    target = Path(sys.argv[2])
    target.write_text(update_reference(target.read_text()))
else:
    print(reference_markdown())
