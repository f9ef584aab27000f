"""Issue 14: docs/operations.md covers every operations feature (logs, crash loops, systemd, log rotation,
`corral ls`, CORRAL_* variables)."""

from __future__ import annotations

import pytest
from conftest import ROOT

pytestmark = pytest.mark.unit  # in-process: no child process, no listener (tests/conftest.py)


def test_docs_cover_every_operations_feature():
    ops = (ROOT / "docs" / "operations.md").read_text()
    for heading in ("## Logs", "## Crash loops", "## Running under systemd", "## Log rotation", "## corral ls"):
        assert heading in ops, heading
    assert "fresh port" in ops and "CORRAL_" in ops and "NOTIFY_SOCKET" in ops and "LISTEN_FDS" in ops
