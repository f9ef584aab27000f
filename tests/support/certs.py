"""Certificates for the TLS tests, made with `openssl req` (the test environment has no `cryptography`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

OPENSSL = shutil.which("openssl")


def make_pair(where: Path, name: str, cn: str, days: int = 2) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for localhost and 127.0.0.1 (a CA of its own, so a client can trust it
    by --cacert) and its key."""
    cert, key = where / f"{name}.crt", where / f"{name}.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"),
            *("-keyout", str(key), "-out", str(cert), "-days", str(days), "-subj", f"/CN={cn}"),
            *("-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def serial_of(cert: Path) -> str:
    out = subprocess.run(["openssl", "x509", "-noout", "-serial", "-in", str(cert)], capture_output=True, text=True)
    return out.stdout.strip().split("=", 1)[1].upper()
