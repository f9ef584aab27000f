"""Issue 14: the package metadata: the license is an SPDX string, so setuptools does not warn on every build."""

from __future__ import annotations

import re
import tomllib

import pytest
from conftest import ROOT

pytestmark = pytest.mark.unit  # in-process: no child process, no listener (tests/conftest.py)


def test_license_is_an_spdx_string_so_setuptools_does_not_warn():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "MIT"  # a table is deprecated (setuptools >= 77 warns on every build)
    assert any(re.fullmatch(r"setuptools>=(7[7-9]|[89]\d)(\.\d+)*", r) for r in meta["build-system"]["requires"])
