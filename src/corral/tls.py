"""TLS at the public edge: the server SSLContext built from `tls_cert` and `tls_key`, and its rotation.

One function builds every context (server_context), so the one the listener starts with and each one a reload
loads carry the same versions, ciphers and ALPN. Certificates holds the live pair: the listener keeps one
context for good, and each handshake is switched, as its ClientHello arrives, to the newest context loaded
(the standard library's sni_callback, called for every ClientHello, SNI or not). A reload therefore never
touches a context a handshake is using: a connection already past its ClientHello finishes with the pair it
started with, every later one gets the new pair, and a pair that does not load leaves the old one serving.
Standard library only: the configuration (config.validation) loads a pair with it before corral starts.
"""

from __future__ import annotations

import functools
import os
import ssl
from typing import Any

# Mozilla Server Side TLS guidelines, version 5.7, "intermediate" configuration
# (ssl-config.mozilla.org/guidelines/5.7.json): its TLS 1.2 cipher suites, in its order. TLS 1.3's suites
# (AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305) are OpenSSL's defaults, which the guideline keeps. The DHE
# suites take effect only with DH parameters, which corral does not load: ECDHE serves every client the
# intermediate configuration names.
INTERMEDIATE_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "DHE-RSA-AES128-GCM-SHA256",
        "DHE-RSA-AES256-GCM-SHA384",
        "DHE-RSA-CHACHA20-POLY1305",
    )
)
# HTTP/1.1 only: corral's edge is an HTTP/1.1 parser (docs/security.md says why no HTTP/2).
ALPN = ("http/1.1",)


class TLSError(ValueError):
    """A certificate or key that cannot serve; the message is one line, names the file and says the fix,
    without the knob's name (the caller knows whether it was `--tls-cert` or `server.tls_cert`)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key  # "tls_cert" or "tls_key": which setting is at fault


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context for this certificate chain (PEM, leaf first) and private key (PEM).

    TLS 1.2 and 1.3 only, Mozilla's intermediate suites, ALPN http/1.1, no compression, no renegotiation.
    Raises TLSError when a file is missing or unreadable, is not PEM, or the key is not the certificate's."""
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        _readable(name, path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(INTERMEDIATE_CIPHERS)
    ctx.set_alpn_protocols(list(ALPN))
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    try:
        ctx.load_cert_chain(cert, key, password=functools.partial(_encrypted, key))
    except ssl.SSLError as exc:
        raise _load_error(cert, key, exc) from None
    except OSError as exc:  # a file that vanished between the check and the load
        raise TLSError("tls_cert", f"{cert} or {key}: cannot be read ({exc.strerror})") from None
    return ctx


def _encrypted(key: str) -> bytes:
    # Called only for a passphrase-protected key: corral never prompts (it may run under systemd, no terminal).
    raise TLSError("tls_key", f"{key}: the key is encrypted: store it unencrypted, mode 0600 (openssl pkey -in KEY)")


def _readable(name: str, path: str) -> None:
    if not os.path.exists(path):
        raise TLSError(name, f"{path}: no such file")
    if os.path.isdir(path):
        raise TLSError(name, f"{path}: is a directory, not a PEM file")
    if not os.access(path, os.R_OK):
        raise TLSError(name, f"{path}: not readable by this user (uid {os.getuid()}): fix its mode or owner")


def _load_error(cert: str, key: str, exc: ssl.SSLError) -> TLSError:
    """OpenSSL's reason, as one line that says which file to fix."""
    if "KEY_VALUES_MISMATCH" in str(exc.reason or exc):
        return TLSError("tls_key", f"{key} is not the private key of {cert}: give the key the certificate was made for")
    if not _loads_as_certificate(cert):
        return TLSError("tls_cert", f"{cert}: not a PEM certificate (chain): give the full-chain PEM file")
    return TLSError("tls_key", f"{key}: not a PEM private key: give the certificate's unencrypted PEM key")


def _loads_as_certificate(cert: str) -> bool:
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=cert)
    except (ssl.SSLError, OSError):
        return False
    return True


def describe(cert: str) -> str:
    """`subject CN=example.org, serial 1A2B, expires Jan 1 00:00:00 2027 GMT`, for the log line of a load."""
    try:
        info: dict[str, Any] = ssl._ssl._test_decode_cert(cert)  # type: ignore[attr-defined]
    except Exception:
        return os.path.basename(cert)
    subject = ", ".join(f"{k}={v}" for rdn in info.get("subject", ()) for k, v in rdn if k == "commonName")
    subject = subject.replace("commonName", "CN") or "(no CN)"
    return f"subject {subject}, serial {info.get('serialNumber', '?')}, expires {info.get('notAfter', '?')}"


class Certificates:
    """The live certificate and key. `context` is what the listener holds, for good; `reload` loads the files
    again into a new context, which every handshake from then on is switched to."""

    def __init__(self, cert: str, key: str) -> None:
        self.cert = cert
        self.key = key
        self.current = server_context(cert, key)
        self.context = self.current
        self.context.sni_callback = self._switch
        self.loaded = describe(cert)

    def _switch(self, conn: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        # Called during each ClientHello: the handshake continues with the newest pair. Every context comes
        # from server_context, so versions, suites and ALPN are the same whichever one a handshake ends on.
        current = self.current
        if current is not ctx:
            conn.context = current

    def reload(self) -> tuple[bool, str]:
        """Read the pair again. (True, what is served now) or (False, why not: the old pair keeps serving)."""
        try:
            fresh = server_context(self.cert, self.key)
        except TLSError as exc:
            return False, f"TLS certificate not reloaded: {exc}; still serving {self.loaded}"
        self.current = fresh
        self.loaded = describe(self.cert)
        return True, f"TLS certificate reloaded: {self.loaded}"
